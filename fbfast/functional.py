"""`fbfast.rollout`: validate once, pick a backend, run the whole T-step rollout."""

from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

import torch
from torch import Tensor

from . import dispatch, ops
from ._validation import check_rollout_args
from .reference import rollout_reference


def rollout(
    x0: Tensor,
    w1: Tensor,
    b1: Optional[Tensor],
    w2: Tensor,
    b2: Optional[Tensor],
    *,
    steps: Optional[int] = None,
    u: Optional[Tensor] = None,
    delay: int = 1,
    truncate: Optional[int] = None,
    backend: str = "auto",
) -> Tensor:
    """Run ``steps`` steps of the feedback MLP ``y_t = w2 · relu(w1 · [u_t; x_t] + b1) + b2``.

    Args:
        x0: ``(B, O)`` when ``delay == 1`` (``(1, B, O)`` also accepted), else ``(delay, B, O)``:
            the first ``delay`` fed-back inputs.
        w1, b1: first layer, ``(H, Du + O)`` and ``(H,)`` or None. Columns ``[0:Du]`` read
            ``u_t``, columns ``[Du:]`` read the fed-back ``x_t``.
        w2, b2: second layer, ``(O, H)`` and ``(O,)`` or None.
        steps: number of steps ``T``; inferred from ``u`` when given, required otherwise.
        u: ``(T, B, Du)`` exogenous input of every step, or None.
        delay: ``k >= 1``; step ``t`` reads the output of step ``t - k`` (``k = 1``: in-step).
        truncate: None for full BPTT, or ``K >= 1`` to cut the feedback edge into every step
            ``t`` with ``t % K == 0`` (``K = 1`` is ``x = y.detach()`` at every step).
        backend: "auto", "cuda", "cpp", "compile" or "eager" (see `fbfast.backends()`).

    Returns:
        ``Y`` of shape ``(T, B, O)``; ``Y[-delay:].detach()`` is the ``x0`` that continues the
        rollout in a next call.
    """
    args = check_rollout_args(x0, w1, b1, w2, b2, steps, u, delay, truncate)
    name = dispatch.resolve(backend, args.x0)
    if name == "cpp" or name == "cuda":
        return ops.forward_op(args.x0, u, w1, b1, w2, b2, args.steps, delay, truncate or 0)
    if name == "compile":
        return _compiled(args.steps, delay, truncate)(args.x0, w1, b1, w2, b2, u)
    return rollout_reference(args.x0, w1, b1, w2, b2, args.steps, u, delay, truncate)


_COMPILED: Dict[Tuple[int, int, Optional[int]], Callable] = {}


def _compiled(steps: int, delay: int, truncate: Optional[int]) -> Callable:
    """`torch.compile` of the reference for one (steps, delay, truncate).

    The reference's Python loop is unrolled while tracing, so compile time grows with `steps`.
    Each configuration gets a function with its own code object: dynamo's recompile limit
    counts per code object, and one shared function would stop compiling after a few configs.
    """
    key = (steps, delay, truncate)
    fn = _COMPILED.get(key)
    if fn is None:
        scope = {"_ref": rollout_reference, "STEPS": steps, "DELAY": delay, "TRUNCATE": truncate}
        src = ("def rollout_unrolled(x0, w1, b1, w2, b2, u):\n"
               "    return _ref(x0, w1, b1, w2, b2, STEPS, u, DELAY, TRUNCATE)\n")
        exec(compile(src, f"<fbfast.compile steps={steps} delay={delay} truncate={truncate}>", "exec"), scope)
        fn = _COMPILED[key] = torch.compile(scope["rollout_unrolled"])
    return fn
