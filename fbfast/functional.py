"""`fbfast.rollout`: validate once, pick a backend, run the whole T-step rollout."""

from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import dispatch, ops
from ._spec import _BY_NAME, ResolvedActivation, params_from_keywords
from ._validation import check_rollout_args
from .reference import run_reference


def rollout(
    x0: Tensor,
    *params: Optional[Tensor],
    steps: Optional[int] = None,
    u: Optional[Tensor] = None,
    delay: Union[int, Sequence[int]] = 1,
    truncate: Optional[int] = None,
    activation="relu",
    residual: bool = False,
    feedback: Optional[int] = None,
    backend: str = "auto",
    **layers: Optional[Tensor],
) -> Tensor:
    """Run ``steps`` steps of the feedback MLP ``y_t = f([u_t; x_t])`` (docs/spec.md §1).

    ``f(x) = wL · act(... act(w1 · x + b1) ...) + bL``: ``L >= 1`` layers in ``nn.Linear``
    layout, one activation after every layer but the last. Version 1's
    ``rollout(x0, w1, b1, w2, b2, ...)`` is the case ``L = 2``, ReLU, one lag.

    Sizes: ``O`` outputs, ``F`` of them fed back (``feedback``), lags ``d_1 .. d_m``
    (``delay``), ``D = max(d_j)``, ``Du`` exogenous features. With ``past(s) = y_s[..., :F]``
    for ``s >= 0`` and ``x0[s + D]`` for ``s < 0``, step ``t`` reads
    ``x_t = [past(t - d_1); ...; past(t - d_m)]``.

    Args:
        x0: ``(D, B, F)`` (also ``(B, F)`` when ``D == 1``): the ``D`` fed-back values before
            step 0, oldest first. For one lag ``k``, ``x0[t]`` is the input of step ``t < k``.
        w1, b1, ..., wL, bL: the layers, weights and biases alternating. ``wl`` is
            ``(out_l, in_l)`` with ``in_{l+1} = out_l``; ``w1`` has ``Du + m·F`` columns, ``[0:Du]``
            reading ``u_t``, then ``F`` columns per lag in the order of ``delay``; ``wL`` has
            ``O`` rows. Each bias is ``(out_l,)`` or None.
        steps: number of steps ``T``; inferred from ``u`` when given, required otherwise.
        u: ``(T, B, Du)`` exogenous input of every step, or None.
        delay: an int ``k >= 1`` (step ``t`` reads the output of step ``t - k``; ``k = 1``:
            in-step), or a sequence of distinct positive lags, read in the order given
            (``(1, 2, ..., na)``: a tapped delay line, NARX).
        truncate: None for full BPTT, or ``K >= 1`` to cut every feedback edge into every step
            ``t`` with ``t % K == 0`` (``K = 1`` is ``x = y.detach()`` at every step); the
            residual skip edge is cut with its feedback edge. ``x0`` and ``u`` are never cut.
        activation: "relu" (default), "leaky_relu", "elu", "tanh", "sigmoid", "silu", "gelu",
            "gelu_tanh", "mish", or an instance of the matching ``nn`` module (``nn.LeakyReLU(0.2)``,
            ``nn.ELU(alpha)``, ``nn.GELU(approximate="tanh")``, ...), whose parameters are honoured.
        residual: True for a delta model: ``y_t = f(...) + [past(t - d_1) ; 0]``, the first
            lag's fed-back value added to the first ``F`` outputs.
        feedback: ``F`` in ``1..O``: only ``y[..., :F]`` is fed back, the other outputs (a reward
            head, a log-variance) are computed and returned; None feeds back all ``O``.
        backend: "auto", "cuda", "cpp", "compile" or "eager" (see `fbfast.backends()`).

    The layers may also be named, ``rollout(x0, w1=..., b1=..., w2=..., b2=..., steps=...)``,
    as version 1's signature allowed.

    Ensembles (docs/spec.md §1.3): with every weight 3-D ``(E, out_l, in_l)`` and every bias
    ``(E, out_l)``, E networks roll out side by side; x0 is ``(D, E, B, F)`` or shared
    ``(D, B, F)``, u ``(T, E, B, Du)`` or shared ``(T, B, Du)``, and Y ``(T, E, B, O)``, on every
    backend.

    Returns:
        ``Y`` of shape ``(T, B, O)``; ``Y[-D:, ..., :F].detach()`` is the ``x0`` that continues
        the rollout in a next call.
    """
    if (backend == "cpp" or backend == "auto") and _direct is not None and not layers:
        # Plain CPU tensors: straight into the operator, which checks the arguments once
        # (csrc/python_entry.cpp). None: the general path below serves the call, and on bad
        # input raises the API's own message (docs/spec.md §4).
        act = _BY_NAME.get(activation) if activation.__class__ is str else (
            activation if activation.__class__ is ResolvedActivation else None)
        if act is not None and (backend == "cpp" or _BACKEND_VARIABLE not in _environ) and not _is_compiling():
            y = _direct(x0, u, params, steps, delay, truncate, act.name, act.param, feedback, residual)
            if y is not None:
                return y
    if layers:
        params = params_from_keywords("fbfast.rollout", params, layers)
    args = check_rollout_args(x0, params, steps, u, delay, truncate, activation, feedback=feedback,
                              residual=residual)
    name = dispatch.resolve(backend, args.x0)
    act = args.activation
    if name == "cpp" or name == "cuda":
        try:
            return _fused(args, u, truncate, act, feedback, residual)
        except RuntimeError as exc:
            # torch.func's grad-like transforms (grad, jacrev, vjp, ...) cannot pass through the
            # fused operator, whose autograd is a C++ node that refuses them as a C++
            # torch::autograd::Function does, in its words (csrc/autograd.cpp; vmap can: the
            # operator's batching rule, fbfast/_vmap.py); the reference, plain torch ops, is
            # transformed like any function. Any other error is the kernel's own and is raised.
            if not (_under_functorch(args.x0, u, *args.weights, *args.biases) and _FUNCTORCH_REFUSAL in str(exc)):
                raise
            if backend != "auto" or os.environ.get("FBFAST_BACKEND"):
                raise RuntimeError(
                    f"fbfast.rollout: backend {name!r} cannot run under torch.func's grad transforms (grad, "
                    "jacrev, vjp, ...): its fused kernel has a C++ autograd; use backend='auto' or "
                    "backend='eager' there (the reference, which the transforms differentiate), or call the "
                    "rollout outside the transform (torch.func.vmap alone runs the fused kernel)") from exc
            name = "eager"
    if name == "compile":
        ens = None if args.ensemble is None else (args.ensemble, args.shared_x0, args.shared_u)
        fn = _compiled(args.steps, args.lags, truncate, act, tuple(b is not None for b in args.biases), feedback,
                       residual, ens)
        return fn(args.x0, u, *args.weights, *(b for b in args.biases if b is not None))
    return run_reference(args.x0, args.weights, args.biases, args.steps, u, args.lags, truncate, act, feedback,
                         residual)


_direct = ops.direct_rollout
_environ = os.environ
_BACKEND_VARIABLE = "FBFAST_BACKEND"
# True while dynamo traces: a traced rollout calls the operator through torch.ops, which the
# graph records; the direct entry is opaque to it.
_is_compiling = torch.compiler.is_compiling


def _fused(args, u, truncate, act, feedback, residual) -> Tensor:
    """The compiled operator (csrc/fbfast.cpp) on validated arguments."""
    # lags, feedback and residual are the schema's last arguments, with defaults that mean one
    # lag, every output fed back and no skip (csrc/fbfast.cpp); fbfast/ops.py loads only a
    # library whose schema has them. Version 1's feedback leaves them out: passing keywords
    # costs the operator call ~1.7 us, a tenth of a small rollout.
    D = args.x0.shape[0]
    if len(args.lags) == 1 and feedback is None and not residual:
        return ops.forward_op(args.x0, u, args.weights, args.biases, args.steps, D, truncate or 0, act.name,
                              act.param)
    return ops.forward_op(args.x0, u, args.weights, args.biases, args.steps, D, truncate or 0,
                          act.name, act.param, lags=list(args.lags), feedback=args.fed_back,
                          residual=residual)


# What torch says when a grad transform meets a C++ torch::autograd::Function, and so the
# fused operator's autograd node (csrc/autograd.cpp).
_FUNCTORCH_REFUSAL = "cannot use C++ torch::autograd::Function with functorch transforms"


def _under_functorch(*tensors) -> bool:
    """Whether a torch.func transform (grad, vmap, ...) wraps any of these tensors."""
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    return any(t is not None and wrapped(t) for t in tensors)


# (steps, lags, truncate, L, activation name, its parameter as float.hex, which biases exist,
# feedback, residual, ensemble: None or (E, shared x0, shared u))
_CompileKey = Tuple[int, Tuple[int, ...], Optional[int], int, str, str, Tuple[bool, ...], Optional[int], bool,
                    Optional[Tuple[int, bool, bool]]]
_COMPILED: Dict[_CompileKey, Callable] = {}


def _compiled(steps: int, lags: Tuple[int, ...], truncate: Optional[int], act: ResolvedActivation,
              has_bias: Sequence[bool], feedback: Optional[int] = None, residual: bool = False,
              ensemble: Optional[Tuple[int, bool, bool]] = None) -> Callable:
    """`torch.compile` of the reference for one configuration.

    The reference's Python loop is unrolled while tracing, so compile time grows with `steps`.
    Each configuration gets a function with its own code object: dynamo's recompile limit
    counts per code object, and one shared function would stop compiling after a few configs.
    The key holds everything the unrolled graph depends on besides the tensors' shapes: the
    lags in their order, the number of layers, the activation and its parameter (a constant of
    the graph; keyed by ``float.hex`` so that a NaN parameter finds its entry again), which
    biases are None (absent biases are not arguments of the compiled function, so that dynamo
    sees only tensors), the feedback structure: ``feedback`` as given (None feeds back y
    whole, an int slices it) and ``residual``, and for an ensemble (docs/spec.md §1.3) ``(E,
    x0 shared, u shared)``: the reference expands a shared x0/u to the member axis, a different
    graph than indexing one with it, so each gets its own entry rather than a guard failure.
    """
    L = len(has_bias)
    key = (steps, lags, truncate, L, act.name, float(act.param).hex(), tuple(has_bias), feedback, residual,
           ensemble)
    fn = _COMPILED.get(key)
    if fn is None:
        weights = [f"w{l + 1}" for l in range(L)]
        biases = [f"b{l + 1}" if has_bias[l] else "None" for l in range(L)]
        signature = ", ".join(["x0", "u"] + weights + [b for b in biases if b != "None"])
        scope = {"_ref": run_reference, "STEPS": steps, "LAGS": lags, "TRUNCATE": truncate, "ACT": act,
                 "FEEDBACK": feedback, "RESIDUAL": residual}
        src = (f"def rollout_unrolled({signature}):\n"
               f"    return _ref(x0, [{', '.join(weights)}], [{', '.join(biases)}], STEPS, u, LAGS, TRUNCATE, ACT, "
               f"FEEDBACK, RESIDUAL)\n")
        delay = lags[0] if len(lags) == 1 else ",".join(map(str, lags))
        label = (f"<fbfast.compile steps={steps} delay={delay} truncate={truncate} layers={L} "
                 f"activation={act.describe()} biases={''.join('1' if b else '0' for b in has_bias)} "
                 f"feedback={feedback} residual={residual}"
                 + ("" if ensemble is None else
                    f" ensemble={ensemble[0]} shared_x0={ensemble[1]} shared_u={ensemble[2]}") + ">")
        exec(compile(src, label, "exec"), scope)
        fn = _COMPILED[key] = torch.compile(scope["rollout_unrolled"])
    return fn
