"""Argument checks shared by every backend (docs/spec.md §4).

Everything here reads only shapes, dtypes and devices — no tensor operation runs — so the
check costs a few microseconds and never touches the data. Every message names the argument,
what it got, and what it needed.
"""

from __future__ import annotations

import os
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._spec import ResolvedActivation, bias_name, param_names, resolve_activation, weight_name

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# steps, delay and truncate travel as int64 in the operator schemas (csrc/fbfast.cpp).
_INT64_MAX = 2**63 - 1


class RolloutArgs(NamedTuple):
    x0: Tensor  # always (delay, B, O)
    weights: List[Tensor]  # (out_l, in_l) each
    biases: List[Optional[Tensor]]  # (out_l,) or None each
    steps: int
    batch: int
    exo_features: int  # Du
    out_features: int  # O
    widths: Tuple[int, ...]  # out_l of every layer; widths[-1] == O
    activation: ResolvedActivation


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


def _check_tensor(who: str, name: str, t, optional: bool) -> None:
    if t is None:
        if optional:
            return
        raise TypeError(f"{who}: {name} must be a Tensor, got None")
    if not isinstance(t, Tensor):
        hint = ""
        if name[0] in "wb" and isinstance(t, int) and not isinstance(t, bool):
            # rollout(x0, w1, b1, w2, b2, 5): version 1's rollout_reference took steps here.
            hint = (" (weights and biases alternate after x0; steps, u, delay, truncate and "
                    "activation are keyword arguments: steps=...)")
        raise TypeError(f"{who}: {name} must be a Tensor, got {type(t).__name__}{hint}")
    if t.layout is not torch.strided or t.is_nested:
        # Sparse and nested tensors would otherwise fail deep inside ATen or the custom op.
        layout, fix = ("nested", "stack the batch into one tensor") if t.is_nested else (t.layout, "use .to_dense()")
        raise TypeError(f"{who}: {name} has layout {layout}; dense (torch.strided) tensors "
                        f"are needed ({fix})")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"{who}: {name} has dtype {t.dtype}; a floating dtype is needed "
            "(float32, float64, float16 or bfloat16)"
        )


def _check_int(who: str, name: str, value, minimum: int) -> int:
    # bool is an int subclass; True as a delay is a bug, not a 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{who}: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"{who}: {name} must be >= {minimum}, got {value}")
    if value > _INT64_MAX:
        raise ValueError(f"{who}: {name} must be < 2**63 (an int64), got {value}")
    return value


def _host_memory_bytes() -> Optional[int]:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX, or the value is unknown
        return None


_HOST_MEMORY_BYTES = _host_memory_bytes()
_CUDA_MEMORY_BYTES: Dict[int, int] = {}


def _memory_bytes(device: torch.device) -> Optional[int]:
    """Total memory a result on ``device`` can occupy (None: unknown, so no bound)."""
    if device.type in ("cpu", "meta"):
        # meta allocates nothing, but "eager" would still run every step before failing.
        return _HOST_MEMORY_BYTES
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _CUDA_MEMORY_BYTES:
            _CUDA_MEMORY_BYTES[index] = torch.cuda.get_device_properties(index).total_memory
        return _CUDA_MEMORY_BYTES[index]
    return None


def _gib(n: int) -> str:
    return f"{n / 2**30:.3g} GiB"


def _check_result_fits(who: str, x0: Tensor, steps: int, batch: int, out_features: int) -> None:
    # Y alone must fit in the device's memory: otherwise the compiled kernels fail in the
    # allocator with a message that names no argument, and "eager" runs step after step for
    # hours before it does. Only sizes are read, so the check is free. Under torch.compile the
    # check is left to the eager calls (shapes may be symbolic there).
    if torch.compiler.is_compiling():
        return
    nbytes = steps * batch * out_features * x0.element_size()
    limit = _memory_bytes(x0.device)
    if nbytes > _INT64_MAX or (limit is not None and nbytes > limit):
        where = f"the {_gib(limit)} of {x0.device} memory" if limit is not None else "an int64 byte count"
        raise RuntimeError(
            f"{who}: steps={steps} is too large: the result Y of shape ({steps}, {batch}, "
            f"{out_features}) in {x0.dtype} needs {_gib(nbytes)}, more than {where}; use fewer "
            "steps, or run the rollout in chunks (pass Y[-delay:].detach() as the next call's x0)"
        )


# ("w1", "b1", ..., "wL", "bL") per number of arguments: names are built once, not per call (the
# check runs on every rollout, and a small rollout takes a few tens of microseconds).
_PARAM_NAMES: Dict[int, Tuple[str, ...]] = {}


def _param_names(count: int) -> Tuple[str, ...]:
    names = _PARAM_NAMES.get(count)
    if names is None:
        names = _PARAM_NAMES[count] = tuple(param_names((count + 1) // 2))[:count]
    return names


def _check_like_x0(who: str, name: str, t: Tensor, dtype: torch.dtype, device: torch.device) -> None:
    if t.dtype != dtype:
        raise TypeError(f"{who}: {name} has dtype {t.dtype} but x0 has {dtype}; all tensors "
                        "must share one dtype (convert with .to(dtype))")
    if t.device != device:
        raise ValueError(f"{who}: {name} is on {t.device} but x0 is on {device}; all tensors "
                         "must be on one device")


def _split_layers(who: str, params: Sequence, x0: Tensor) -> Tuple[List, List]:
    """The weights and biases of the alternating ``(w1, b1, ..., wL, bL)``, each checked in
    the order of the call: a Tensor (None for a bias), dense, floating, and of x0's dtype and
    device."""
    if len(params) == 0:
        raise TypeError(
            f"{who}: needs at least one layer after x0: weights and biases alternate, "
            "(x0, w1, b1, ..., wL, bL), with None for a layer without bias; got none")
    dtype, device = x0.dtype, x0.device
    names = _param_names(len(params))
    for i, t in enumerate(params):
        if t is None and i & 1:
            continue  # a layer without bias
        _check_tensor(who, names[i], t, optional=False)
        if t.dtype is not dtype or t.device != device:
            _check_like_x0(who, names[i], t, dtype, device)
    if len(params) % 2:
        L = len(params) // 2 + 1
        raise TypeError(
            f"{who}: got {len(params)} weight/bias arguments after x0, an odd number: weights and "
            f"biases alternate, (x0, w1, b1, ..., wL, bL), so {weight_name(L - 1)} needs its bias "
            f"{bias_name(L - 1)} after it (None for a layer without bias)")
    return list(params[0::2]), list(params[1::2])


def check_rollout_args(x0, params: Sequence, steps, u, delay, truncate, activation,
                       who: str = "fbfast.rollout") -> RolloutArgs:
    """Validate the arguments of ``fbfast.rollout`` (``params`` = ``(w1, b1, ..., wL, bL)``),
    resolve the activation, and normalise ``x0`` to ``(delay, B, O)``."""
    _check_int(who, "delay", delay, 1)
    if truncate is not None:
        _check_int(who, "truncate", truncate, 1)
    if steps is not None:
        _check_int(who, "steps", steps, 0)

    _check_tensor(who, "x0", x0, optional=False)
    weights, biases = _split_layers(who, params, x0)
    _check_tensor(who, "u", u, optional=True)
    if u is not None:
        _check_like_x0(who, "u", u, x0.dtype, x0.device)
    act = resolve_activation(activation, who)
    L = len(weights)

    widths = []
    for l, (w, b) in enumerate(zip(weights, biases)):
        if w.dim() != 2:
            shape = "(O, H)" if l == L - 1 and L > 1 else "(H, Du + O)" if l == 0 and L > 1 else "(out, in)"
            raise ValueError(f"{who}: {weight_name(l)} must be 2-D {shape} like nn.Linear.weight, "
                             f"got shape {_shape(w)}")
        out, reads = w.shape
        if l and reads != widths[-1]:
            raise ValueError(
                f"{who}: layer sizes do not chain: {weight_name(l)} is {_shape(w)}, reading "
                f"H = {reads} features, so {weight_name(l - 1)} must have {reads} rows, got shape "
                f"{_shape(weights[l - 1])} (each layer's rows feed the next layer's columns, as in a "
                "stack of nn.Linear)")
        widths.append(out)
    for l, b in enumerate(biases):
        if b is not None and (b.dim() != 1 or b.shape[0] != widths[l]):
            raise ValueError(f"{who}: {bias_name(l)} must have shape ({widths[l]},), got {_shape(b)}: "
                             f"one entry per row of {weight_name(l)} {_shape(weights[l])}")
    widths = tuple(widths)
    O = widths[-1]
    w1 = weights[0]

    x0_given = x0  # messages show the shape the caller passed, before normalisation
    if x0.dim() == 2 and delay == 1:
        x0 = x0.unsqueeze(0)
    elif x0.dim() != 3 or x0.shape[0] != delay:
        need = "(B, O) or (1, B, O)" if delay == 1 else f"({delay}, B, O): the leading axis holds the first delay={delay} inputs"
        raise ValueError(f"{who}: x0 must have shape {need}, got {_shape(x0_given)}")
    B = x0.shape[1]
    if x0.shape[2] != O:
        raise ValueError(
            f"{who}: x0 has {x0.shape[2]} features in its last axis (shape {_shape(x0_given)}) "
            f"but the network outputs O = {O} ({weight_name(L - 1)} is {_shape(weights[-1])}); fed-back inputs "
            "must match outputs"
        )

    if u is None:
        Du = 0
        if steps is None:
            raise ValueError(f"{who}: steps is required when u is None (it cannot be inferred)")
        if w1.shape[1] != O:
            extra = w1.shape[1] - O
            hint = (f"; pass the other {extra} input features as u of shape (T, B, {extra})"
                    if extra > 0 else "")
            raise ValueError(
                f"{who}: w1 has {w1.shape[1]} input columns but the feedback has "
                f"O = {O} features and u is None (Du + O = {O} needed){hint}"
            )
    else:
        if u.dim() != 3:
            raise ValueError(f"{who}: u must be 3-D (T, B, Du), got shape {_shape(u)}")
        T_u, B_u, Du = u.shape
        if steps is None:
            steps = T_u
        elif steps != T_u:
            raise ValueError(
                f"{who}: steps={steps} disagrees with u, whose leading axis has T = {T_u} "
                f"(u is {_shape(u)})"
            )
        if B_u != B:
            raise ValueError(
                f"{who}: u has batch size {B_u} (shape {_shape(u)}) but x0 has B = {B}"
            )
        if w1.shape[1] != Du + O:
            raise ValueError(
                f"{who}: w1 has {w1.shape[1]} input columns but u has Du = {Du} features "
                f"and the feedback has O = {O} (Du + O = {Du + O} needed; w1 is {_shape(w1)})"
            )
    _check_result_fits(who, x0, steps, B, O)
    return RolloutArgs(x0, weights, biases, steps, B, Du, O, widths, act)
