"""Argument checks shared by every backend (docs/spec.md §4).

Everything here reads only shapes, dtypes and devices — no tensor operation runs — so the
check costs a few microseconds and never touches the data. Every message names the argument,
what it got, and what it needed.
"""

from __future__ import annotations

import os
from typing import Dict, NamedTuple, Optional

import torch
from torch import Tensor

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# steps, delay and truncate travel as int64 in the operator schemas (csrc/fbfast.cpp).
_INT64_MAX = 2**63 - 1


class RolloutArgs(NamedTuple):
    x0: Tensor  # always (delay, B, O)
    steps: int
    batch: int
    exo_features: int  # Du
    out_features: int  # O
    hidden_features: int  # H


def _shape(t: Tensor) -> str:
    return str(tuple(t.shape))


def _check_tensor(name: str, t, optional: bool) -> None:
    if t is None:
        if optional:
            return
        raise TypeError(f"fbfast.rollout: {name} must be a Tensor, got None")
    if not isinstance(t, Tensor):
        raise TypeError(f"fbfast.rollout: {name} must be a Tensor, got {type(t).__name__}")
    if t.layout is not torch.strided or t.is_nested:
        # Sparse and nested tensors would otherwise fail deep inside ATen or the custom op.
        layout, fix = ("nested", "stack the batch into one tensor") if t.is_nested else (t.layout, "use .to_dense()")
        raise TypeError(f"fbfast.rollout: {name} has layout {layout}; dense (torch.strided) tensors "
                        f"are needed ({fix})")
    if t.dtype not in _FLOAT_DTYPES:
        raise TypeError(
            f"fbfast.rollout: {name} has dtype {t.dtype}; a floating dtype is needed "
            "(float32, float64, float16 or bfloat16)"
        )


def _check_int(name: str, value, minimum: int) -> int:
    # bool is an int subclass; True as a delay is a bug, not a 1.
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"fbfast.rollout: {name} must be an int, got {type(value).__name__} {value!r}")
    if value < minimum:
        raise ValueError(f"fbfast.rollout: {name} must be >= {minimum}, got {value}")
    if value > _INT64_MAX:
        raise ValueError(f"fbfast.rollout: {name} must be < 2**63 (an int64), got {value}")
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


def _check_result_fits(x0: Tensor, steps: int, batch: int, out_features: int) -> None:
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
            f"fbfast.rollout: steps={steps} is too large: the result Y of shape ({steps}, {batch}, "
            f"{out_features}) in {x0.dtype} needs {_gib(nbytes)}, more than {where}; use fewer "
            "steps, or run the rollout in chunks (pass Y[-delay:].detach() as the next call's x0)"
        )


def check_rollout_args(x0, w1, b1, w2, b2, steps, u, delay, truncate) -> RolloutArgs:
    """Validate the arguments of ``fbfast.rollout`` and normalise ``x0`` to ``(delay, B, O)``."""
    _check_int("delay", delay, 1)
    if truncate is not None:
        _check_int("truncate", truncate, 1)
    if steps is not None:
        _check_int("steps", steps, 0)

    named = (("x0", x0, False), ("w1", w1, False), ("b1", b1, True), ("w2", w2, False),
             ("b2", b2, True), ("u", u, True))
    for name, t, optional in named:
        _check_tensor(name, t, optional)
    dtype, device = x0.dtype, x0.device
    for name, t, _ in named[1:]:
        if t is None:
            continue
        if t.dtype != dtype:
            raise TypeError(
                f"fbfast.rollout: {name} has dtype {t.dtype} but x0 has {dtype}; all tensors "
                "must share one dtype (convert with .to(dtype))"
            )
        if t.device != device:
            raise ValueError(
                f"fbfast.rollout: {name} is on {t.device} but x0 is on {device}; all tensors "
                "must be on one device"
            )

    if w2.dim() != 2:
        raise ValueError(f"fbfast.rollout: w2 must be 2-D (O, H), got shape {_shape(w2)}")
    O, H = w2.shape
    if w1.dim() != 2 or w1.shape[0] != H:
        raise ValueError(
            f"fbfast.rollout: w1 must be 2-D (H, Du + O) with H = {H} rows (w2 is {_shape(w2)}), "
            f"got shape {_shape(w1)}"
        )
    if b1 is not None and tuple(b1.shape) != (H,):
        raise ValueError(f"fbfast.rollout: b1 must have shape ({H},), got {_shape(b1)}")
    if b2 is not None and tuple(b2.shape) != (O,):
        raise ValueError(f"fbfast.rollout: b2 must have shape ({O},), got {_shape(b2)}")

    x0_given = x0  # messages show the shape the caller passed, before normalisation
    if x0.dim() == 2 and delay == 1:
        x0 = x0.unsqueeze(0)
    elif x0.dim() != 3 or x0.shape[0] != delay:
        need = "(B, O) or (1, B, O)" if delay == 1 else f"({delay}, B, O): the leading axis holds the first delay={delay} inputs"
        raise ValueError(f"fbfast.rollout: x0 must have shape {need}, got {_shape(x0_given)}")
    B = x0.shape[1]
    if x0.shape[2] != O:
        raise ValueError(
            f"fbfast.rollout: x0 has {x0.shape[2]} features in its last axis (shape {_shape(x0_given)}) "
            f"but the network outputs O = {O} (w2 is {_shape(w2)}); fed-back inputs must match outputs"
        )

    if u is None:
        Du = 0
        if steps is None:
            raise ValueError("fbfast.rollout: steps is required when u is None (it cannot be inferred)")
        if w1.shape[1] != O:
            extra = w1.shape[1] - O
            hint = (f"; pass the other {extra} input features as u of shape (T, B, {extra})"
                    if extra > 0 else "")
            raise ValueError(
                f"fbfast.rollout: w1 has {w1.shape[1]} input columns but the feedback has "
                f"O = {O} features and u is None (Du + O = {O} needed){hint}"
            )
    else:
        if u.dim() != 3:
            raise ValueError(f"fbfast.rollout: u must be 3-D (T, B, Du), got shape {_shape(u)}")
        T_u, B_u, Du = u.shape
        if steps is None:
            steps = T_u
        elif steps != T_u:
            raise ValueError(
                f"fbfast.rollout: steps={steps} disagrees with u, whose leading axis has T = {T_u} "
                f"(u is {_shape(u)})"
            )
        if B_u != B:
            raise ValueError(
                f"fbfast.rollout: u has batch size {B_u} (shape {_shape(u)}) but x0 has B = {B}"
            )
        if w1.shape[1] != Du + O:
            raise ValueError(
                f"fbfast.rollout: w1 has {w1.shape[1]} input columns but u has Du = {Du} features "
                f"and the feedback has O = {O} (Du + O = {Du + O} needed; w1 is {_shape(w1)})"
            )
    _check_result_fits(x0, steps, B, O)
    return RolloutArgs(x0, steps, B, Du, O, H)


def is_differentiable_request(*tensors: Optional[Tensor]) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
