"""Argument checks shared by every backend (docs/spec.md §4).

Everything here reads only shapes, dtypes and devices — no tensor operation runs — so the
check costs a few microseconds and never touches the data. Every message names the argument,
what it got, and what it needed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence as _SequenceABC
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ._spec import ResolvedActivation, bias_name, param_names, resolve_activation, weight_name

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
# steps, delay and truncate travel as int64 in the operator schemas (csrc/fbfast.cpp).
_INT64_MAX = 2**63 - 1


class RolloutArgs(NamedTuple):
    x0: Tensor  # (D, B, F), D = max(lags); an ensemble's own starts (D, E, B, F)
    weights: List[Tensor]  # (out_l, in_l) each; an ensemble's (E, out_l, in_l)
    biases: List[Optional[Tensor]]  # (out_l,) or None each; an ensemble's (E, out_l) or None
    steps: int
    batch: int
    exo_features: int  # Du
    out_features: int  # O
    widths: Tuple[int, ...]  # out_l of every layer; widths[-1] == O
    activation: ResolvedActivation
    lags: Tuple[int, ...]  # d_1 .. d_m in the order step t reads them (docs/spec.md §1.2)
    fed_back: int  # F: y[..., :F] is fed back; F == O when feedback is None
    residual: bool
    # docs/spec.md §1.3: E when every weight is 3-D, else None; and whether x0 / u (when given)
    # lack the member axis, one tensor read by every member.
    ensemble: Optional[int] = None
    shared_x0: bool = False
    shared_u: bool = False


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


def check_lags(who: str, delay) -> Tuple[int, ...]:
    """The lags ``(d_1, ..., d_m)`` of ``delay``: an int k (the single lag ``(k,)``) or a
    sequence of distinct positive ints, read in the order given (docs/spec.md §1.2)."""
    if isinstance(delay, int) and not isinstance(delay, bool):
        # Every version-1 call: one range check, no sequence machinery.
        return (_check_int(who, "delay", delay, 1),)
    if isinstance(delay, (str, bytes)) or not isinstance(delay, _SequenceABC):
        # Tensors and arrays are not Sequences: a lag is a structural constant of the rollout,
        # so it must be a Python int that the compiled graph and the operator schema can hold.
        raise TypeError(f"{who}: delay must be an int or a sequence of distinct positive ints (the lags, e.g. "
                        f"(1, 2, 3)), got {type(delay).__name__} {delay!r}")
    lags = tuple(delay)
    if not lags:
        raise ValueError(f"{who}: delay must hold at least one lag, got an empty {type(delay).__name__} "
                         f"{delay!r} (delay=1 is in-step feedback)")
    for j, d in enumerate(lags):
        if isinstance(d, bool) or not isinstance(d, int):
            raise TypeError(f"{who}: delay={delay!r}: every lag must be an int, got {type(d).__name__} {d!r} "
                            f"at position {j}")
        if d < 1:
            raise ValueError(f"{who}: delay={delay!r}: every lag must be >= 1 (step t reads step t - lag), "
                             f"got {d} at position {j}")
        if d > _INT64_MAX:
            raise ValueError(f"{who}: delay={delay!r}: every lag must be < 2**63 (an int64), got {d} at "
                             f"position {j}")
    if len(set(lags)) != len(lags):
        seen = set()
        twice = next(d for d in lags if d in seen or seen.add(d))
        raise ValueError(f"{who}: delay={delay!r}: the lags must be distinct, got {twice} more than once "
                         "(each lag reads its own F columns of w1; repeat none)")
    return lags


def check_feedback_type(who: str, feedback) -> None:
    if feedback is not None and (isinstance(feedback, bool) or not isinstance(feedback, int)):
        raise TypeError(f"{who}: feedback must be an int F (the first F outputs are fed back) or None (all "
                        f"of them), got {type(feedback).__name__} {feedback!r}")


def check_residual(who: str, residual) -> bool:
    # Only a real bool: residual=1 or a tensor is a misplaced argument more often than a flag.
    if residual is not True and residual is not False:
        raise TypeError(f"{who}: residual must be a bool (True: add the first lag's fed-back value to the "
                        f"first F outputs), got {type(residual).__name__} {residual!r}")
    return residual


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


def _check_result_fits(who: str, x0: Tensor, steps: int, batch: int, out_features: int,
                       ensemble: Optional[int] = None) -> None:
    # Y alone must fit in the device's memory: otherwise the compiled kernels fail in the
    # allocator with a message that names no argument, and "eager" runs step after step for
    # hours before it does. Only sizes are read, so the check is free. Under torch.compile the
    # check is left to the eager calls (shapes may be symbolic there).
    if torch.compiler.is_compiling():
        return
    members = 1 if ensemble is None else ensemble
    nbytes = steps * members * batch * out_features * x0.element_size()
    limit = _memory_bytes(x0.device)
    if nbytes > _INT64_MAX or (limit is not None and nbytes > limit):
        where = f"the {_gib(limit)} of {x0.device} memory" if limit is not None else "an int64 byte count"
        shape = (steps, batch, out_features) if ensemble is None else (steps, ensemble, batch, out_features)
        raise RuntimeError(
            f"{who}: steps={steps} is too large: the result Y of shape {shape} in {x0.dtype} needs "
            f"{_gib(nbytes)}, more than {where}; use fewer "
            "steps, or run the rollout in chunks (pass Y[-D:, ..., :F].detach() as the next call's x0, "
            "D the longest lag)"
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


def _last_layer(weights: Sequence[Tensor]) -> str:
    return f"{weight_name(len(weights) - 1)} is {_shape(weights[-1])}"


def _fed(lags: Tuple[int, ...], feedback: Optional[int], F: int) -> str:
    """How many features the feedback gives w1, for messages: version 1's wording ``O = 2``
    where one lag feeds back every output."""
    m = len(lags)
    if m == 1 and feedback is None:
        return f"O = {F}"
    return f"m·F = {m}·{F} = {m * F} (m = {m} lags {lags}, F = {F} fed-back outputs)"


def _check_ranks(who: str, weights: Sequence[Tensor]) -> Optional[int]:
    """``None`` when every weight is 2-D, ``E`` when every weight is 3-D with the same ``E``
    (an ensemble, docs/spec.md §1.3); anything else raises, naming the weight that differs."""
    if all(w.dim() == 2 for w in weights):  # the common case, checked on every rollout
        return None
    L = len(weights)
    for l, w in enumerate(weights):
        if w.dim() not in (2, 3):
            shape = "(O, H)" if l == L - 1 and L > 1 else "(H, Du + m·F)" if l == 0 and L > 1 else "(out, in)"
            raise ValueError(f"{who}: {weight_name(l)} must be 2-D {shape} like nn.Linear.weight, or 3-D "
                             f"(E, out, in) for an ensemble of E networks; got shape {_shape(w)}")
    first = weights[0]
    for l in range(1, L):
        w = weights[l]
        if w.dim() != first.dim():
            raise ValueError(
                f"{who}: {weight_name(l)} is {w.dim()}-D {_shape(w)} but {weight_name(0)} is {first.dim()}-D "
                f"{_shape(first)}: every weight must be 2-D (out, in) like nn.Linear.weight, or every weight "
                "3-D (E, out, in) for an ensemble of E networks; the ranks may not differ between layers")
        if w.dim() == 3 and w.shape[0] != first.shape[0]:
            raise ValueError(
                f"{who}: ensemble sizes disagree: {weight_name(l)} is {_shape(w)}, E = {w.shape[0]} networks, "
                f"but {weight_name(0)} is {_shape(first)}, E = {first.shape[0]}; every 3-D weight (E, out, in) "
                "needs the same E")
    return first.shape[0] if first.dim() == 3 else None


def check_rollout_args(x0, params: Sequence, steps, u, delay, truncate, activation,
                       who: str = "fbfast.rollout", *, feedback=None, residual=False) -> RolloutArgs:
    """Validate the arguments of ``fbfast.rollout`` (``params`` = ``(w1, b1, ..., wL, bL)``),
    resolve the activation and the lags, and normalise ``x0`` to ``(D, B, F)``."""
    # The common case, one int lag, without a call: this check runs on every rollout.
    lags = (delay,) if delay.__class__ is int and 1 <= delay <= _INT64_MAX else check_lags(who, delay)
    if truncate is not None:
        _check_int(who, "truncate", truncate, 1)
    if steps is not None:
        _check_int(who, "steps", steps, 0)
    if feedback is not None:
        check_feedback_type(who, feedback)
    if residual is not False:
        check_residual(who, residual)

    _check_tensor(who, "x0", x0, optional=False)
    weights, biases = _split_layers(who, params, x0)
    _check_tensor(who, "u", u, optional=True)
    if u is not None:
        _check_like_x0(who, "u", u, x0.dtype, x0.device)
    act = resolve_activation(activation, who)
    L = len(weights)

    E = _check_ranks(who, weights)
    lead = 0 if E is None else 1  # where (out, in) starts in a weight's shape
    widths = []
    for l, (w, b) in enumerate(zip(weights, biases)):
        out, reads = w.shape[lead], w.shape[lead + 1]
        if l and reads != widths[-1]:
            raise ValueError(
                f"{who}: layer sizes do not chain: {weight_name(l)} is {_shape(w)}, reading "
                f"H = {reads} features, so {weight_name(l - 1)} must have {reads} rows, got shape "
                f"{_shape(weights[l - 1])} (each layer's rows feed the next layer's columns, as in a "
                "stack of nn.Linear)")
        widths.append(out)
    for l, b in enumerate(biases):
        if b is None:
            continue
        if E is None and (b.dim() != 1 or b.shape[0] != widths[l]):
            raise ValueError(f"{who}: {bias_name(l)} must have shape ({widths[l]},), got {_shape(b)}: "
                             f"one entry per row of {weight_name(l)} {_shape(weights[l])}")
        if E is not None and (b.dim() != 2 or b.shape[0] != E or b.shape[1] != widths[l]):
            why = (f"its ensemble size {b.shape[0]} disagrees with E = {E} of the weights"
                   if b.dim() == 2 and b.shape[0] != E and b.shape[1] == widths[l] else
                   f"one row per member, one entry per row of {weight_name(l)} {_shape(weights[l])}")
            raise ValueError(f"{who}: {bias_name(l)} must have shape ({E}, {widths[l]}) (E, out) in an ensemble "
                             f"of E = {E} networks (3-D weights), got {_shape(b)}: {why}")
    widths = tuple(widths)
    O = widths[-1]
    w1 = weights[0]
    if feedback is None:
        F = O
    elif not 1 <= feedback <= O:
        raise ValueError(f"{who}: feedback must be in 1..O = {O} (how many of the first outputs are fed "
                         f"back; {_last_layer(weights)}), got {feedback}")
    else:
        F = feedback
    m = len(lags)
    D = lags[0] if m == 1 else max(lags)
    # Messages speak of O where every output is fed back (version 1's words), of F otherwise.
    f_name = "O" if feedback is None else "F"

    x0_given = x0  # messages show the shape the caller passed, before normalisation
    shared_x0 = E is None or x0.dim() != 4
    if E is not None and x0.dim() == 4:
        # docs/spec.md §1.3: (D, E, B, F), each member's own starts.
        if x0.shape[0] != D or x0.shape[1] != E:
            axis = (f"its leading axis must be D = {D} (the longest lag of delay={delay!r})"
                    if x0.shape[0] != D else
                    f"its member axis (the second) has {x0.shape[1]} but the weights hold E = {E} networks "
                    f"({weight_name(0)} is {_shape(w1)})")
            raise ValueError(f"{who}: x0 must have shape ({D}, {E}, B, {f_name}) (D, E, B, {f_name}) for an "
                             f"ensemble's own starts, or ({D}, B, {f_name}) shared by every member; got "
                             f"{_shape(x0_given)}: {axis}")
    elif x0.dim() == 2 and D == 1:
        x0 = x0.unsqueeze(0)
    elif x0.dim() != 3 or x0.shape[0] != D:
        if D == 1:
            need = f"(B, {f_name}) or (1, B, {f_name})"
        elif m == 1:
            need = f"({D}, B, {f_name}): the leading axis holds the first delay={D} inputs"
        else:
            need = (f"({D}, B, {f_name}): the leading axis holds the D = {D} fed-back values before step 0, "
                    f"oldest first, D being the longest lag of delay={delay!r}")
        if E is not None:
            need += f", or ({D}, {E}, B, {f_name}) with a member axis for each of the E = {E} networks"
        raise ValueError(f"{who}: x0 must have shape {need}, got {_shape(x0_given)}")
    B = x0.shape[-2]
    if x0.shape[-1] != F:
        got = f"{who}: x0 has {x0.shape[-1]} features in its last axis (shape {_shape(x0_given)})"
        if feedback is None:
            hint = (f"; to feed back only the first {x0.shape[-1]} outputs, pass feedback={x0.shape[-1]}"
                    if 0 < x0.shape[-1] < O else "")
            raise ValueError(f"{got} but the network outputs O = {O} ({_last_layer(weights)}); fed-back inputs "
                             f"must match outputs{hint}")
        raise ValueError(f"{got} but feedback={feedback} feeds back F = {F} of the O = {O} outputs "
                         f"({_last_layer(weights)}); x0 holds fed-back values, so it needs F = {F} features")

    if u is None:
        Du = 0
        if steps is None:
            raise ValueError(f"{who}: steps is required when u is None (it cannot be inferred)")
        if w1.shape[-1] != m * F:
            extra = w1.shape[-1] - m * F
            hint = (f"; pass the other {extra} input features as u of shape (T, B, {extra})"
                    if extra > 0 else "")
            need = f"Du + O = {O}" if m == 1 and feedback is None else f"Du + m·F = 0 + {m * F} = {m * F}"
            raise ValueError(
                f"{who}: w1 has {w1.shape[-1]} input columns but the feedback has {_fed(lags, feedback, F)} "
                f"features and u is None ({need} needed){hint}"
            )
    else:
        if E is None and u.dim() != 3:
            raise ValueError(f"{who}: u must be 3-D (T, B, Du), got shape {_shape(u)}")
        if E is not None and (u.dim() not in (3, 4) or (u.dim() == 4 and u.shape[1] != E)):
            axis = (f": its member axis (the second) has {u.shape[1]} but the weights hold E = {E} networks "
                    f"({weight_name(0)} is {_shape(w1)})" if u.dim() == 4 else "")
            raise ValueError(f"{who}: u must be 4-D (T, E, B, Du) = (T, {E}, B, Du) with a member axis, or 3-D "
                             f"(T, B, Du) shared by every member of the ensemble of E = {E} networks; got shape "
                             f"{_shape(u)}{axis}")
        T_u, B_u, Du = u.shape[0], u.shape[-2], u.shape[-1]
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
        if w1.shape[-1] != Du + m * F:
            need = (f"Du + O = {Du + O}" if m == 1 and feedback is None
                    else f"Du + m·F = {Du} + {m * F} = {Du + m * F}")
            raise ValueError(
                f"{who}: w1 has {w1.shape[-1]} input columns but u has Du = {Du} features "
                f"and the feedback has {_fed(lags, feedback, F)} ({need} needed; w1 is {_shape(w1)})"
            )
    _check_result_fits(who, x0, steps, B, O, E)
    if E is None:
        return RolloutArgs(x0, weights, biases, steps, B, Du, O, widths, act, lags, F, residual)
    return RolloutArgs(x0, weights, biases, steps, B, Du, O, widths, act, lags, F, residual, E, shared_x0,
                       u is None or u.dim() == 3)
