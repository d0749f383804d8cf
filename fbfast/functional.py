"""`fbfast.rollout`: validate once, pick a backend, run the whole T-step rollout."""

from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import dispatch, ops
from ._spec import ResolvedActivation, params_from_keywords
from ._validation import check_rollout_args
from .reference import run_reference


def rollout(
    x0: Tensor,
    *params: Optional[Tensor],
    steps: Optional[int] = None,
    u: Optional[Tensor] = None,
    delay: int = 1,
    truncate: Optional[int] = None,
    activation="relu",
    backend: str = "auto",
    **layers: Optional[Tensor],
) -> Tensor:
    """Run ``steps`` steps of the feedback MLP ``y_t = f([u_t; x_t])`` (docs/spec.md §1).

    ``f(x) = wL · act(... act(w1 · x + b1) ...) + bL``: ``L >= 1`` layers in ``nn.Linear``
    layout, one activation after every layer but the last. Version 1's
    ``rollout(x0, w1, b1, w2, b2, ...)`` is the case ``L = 2``, ReLU.

    Args:
        x0: ``(B, O)`` when ``delay == 1`` (``(1, B, O)`` also accepted), else ``(delay, B, O)``:
            the first ``delay`` fed-back inputs.
        w1, b1, ..., wL, bL: the layers, weights and biases alternating. ``wl`` is
            ``(out_l, in_l)`` with ``in_{l+1} = out_l``; ``w1`` has ``Du + O`` columns, ``[0:Du]``
            reading ``u_t`` and ``[Du:]`` the fed-back ``x_t``; ``wL`` has ``O`` rows. Each bias
            is ``(out_l,)`` or None.
        steps: number of steps ``T``; inferred from ``u`` when given, required otherwise.
        u: ``(T, B, Du)`` exogenous input of every step, or None.
        delay: ``k >= 1``; step ``t`` reads the output of step ``t - k`` (``k = 1``: in-step).
        truncate: None for full BPTT, or ``K >= 1`` to cut the feedback edge into every step
            ``t`` with ``t % K == 0`` (``K = 1`` is ``x = y.detach()`` at every step).
        activation: "relu" (default), "leaky_relu", "elu", "tanh", "sigmoid", "silu", "gelu",
            "gelu_tanh", "mish", or an instance of the matching ``nn`` module (``nn.LeakyReLU(0.2)``,
            ``nn.ELU(alpha)``, ``nn.GELU(approximate="tanh")``, ...), whose parameters are honoured.
        backend: "auto", "cuda", "cpp", "compile" or "eager" (see `fbfast.backends()`).

    The layers may also be named, ``rollout(x0, w1=..., b1=..., w2=..., b2=..., steps=...)``,
    as version 1's signature allowed.

    Returns:
        ``Y`` of shape ``(T, B, O)``; ``Y[-delay:].detach()`` is the ``x0`` that continues the
        rollout in a next call.
    """
    if layers:
        params = params_from_keywords("fbfast.rollout", params, layers)
    args = check_rollout_args(x0, params, steps, u, delay, truncate, activation)
    name = dispatch.resolve(backend, args.x0)
    act = args.activation
    if name == "cpp" or name == "cuda":
        return ops.forward_op(args.x0, u, args.weights, args.biases, args.steps, delay, truncate or 0,
                              act.name, act.param)
    if name == "compile":
        fn = _compiled(args.steps, delay, truncate, act, tuple(b is not None for b in args.biases))
        return fn(args.x0, u, *args.weights, *(b for b in args.biases if b is not None))
    return run_reference(args.x0, args.weights, args.biases, args.steps, u, delay, truncate, act)


# (steps, delay, truncate, L, activation name, its parameter as float.hex, which biases exist)
_CompileKey = Tuple[int, int, Optional[int], int, str, str, Tuple[bool, ...]]
_COMPILED: Dict[_CompileKey, Callable] = {}


def _compiled(steps: int, delay: int, truncate: Optional[int], act: ResolvedActivation,
              has_bias: Sequence[bool]) -> Callable:
    """`torch.compile` of the reference for one configuration.

    The reference's Python loop is unrolled while tracing, so compile time grows with `steps`.
    Each configuration gets a function with its own code object: dynamo's recompile limit
    counts per code object, and one shared function would stop compiling after a few configs.
    The key holds everything the unrolled graph depends on besides the tensors' shapes: the
    number of layers, the activation and its parameter (a constant of the graph; keyed by
    ``float.hex`` so that a NaN parameter finds its entry again), and which biases are None
    (absent biases are not arguments of the compiled function, so that dynamo sees only tensors).
    """
    L = len(has_bias)
    key = (steps, delay, truncate, L, act.name, float(act.param).hex(), tuple(has_bias))
    fn = _COMPILED.get(key)
    if fn is None:
        weights = [f"w{l + 1}" for l in range(L)]
        biases = [f"b{l + 1}" if has_bias[l] else "None" for l in range(L)]
        signature = ", ".join(["x0", "u"] + weights + [b for b in biases if b != "None"])
        scope = {"_ref": run_reference, "STEPS": steps, "DELAY": delay, "TRUNCATE": truncate, "ACT": act}
        src = (f"def rollout_unrolled({signature}):\n"
               f"    return _ref(x0, [{', '.join(weights)}], [{', '.join(biases)}], STEPS, u, DELAY, TRUNCATE, ACT)\n")
        label = (f"<fbfast.compile steps={steps} delay={delay} truncate={truncate} layers={L} "
                 f"activation={act.describe()} biases={''.join('1' if b else '0' for b in has_bias)}>")
        exec(compile(src, label, "exec"), scope)
        fn = _COMPILED[key] = torch.compile(scope["rollout_unrolled"])
    return fn
