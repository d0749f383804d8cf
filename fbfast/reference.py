"""The pure-PyTorch reference rollout: the oracle of every test and the ``"eager"`` backend.

It is written for clarity, not speed: per step, one ``F.linear`` per layer with the activation
between them, exactly as docs/spec.md §1 states the recurrence, so that autograd of this
function *defines* the gradients every compiled backend must reproduce.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from ._spec import ResolvedActivation, params_from_keywords, resolve_activation
from ._validation import check_rollout_args

__all__ = ["rollout_reference"]

# Version 1's positional order after the layers: rollout_reference(x0, w1, b1, w2, b2, steps,
# u, delay, truncate). The first int after x0 ends the layers and starts these.
_LEGACY_POSITIONAL = ("steps", "u", "delay", "truncate")
_WHO = "fbfast.rollout_reference"


def rollout_reference(x0: Tensor, *args, steps: Optional[int] = None, u: Optional[Tensor] = None,
                      delay: Union[int, Sequence[int]] = 1, truncate: Optional[int] = None, activation="relu",
                      feedback: Optional[int] = None, residual: bool = False,
                      **layers: Optional[Tensor]) -> Tensor:
    """Run ``steps`` steps of the feedback MLP of docs/spec.md §1 in plain PyTorch.

    Called like `fbfast.rollout` (without ``backend``)::

        rollout_reference(x0, w1, b1, ..., wL, bL, steps=None, u=None, delay=1, truncate=None,
                          activation="relu", feedback=None, residual=False)

    or in version 1's positional form, which keeps working::

        rollout_reference(x0, w1, b1, w2, b2, steps, u=None, delay=1, truncate=None)

    The positional arguments after ``x0`` are weight/bias pairs up to the first ``int``, which
    is ``steps``; ``u``, ``delay`` and ``truncate`` may follow it positionally, in that order.
    The layers may also be named (``w1=..., b1=...``), as version 1's signature allowed.

    Shapes (lags ``d_1 .. d_m``: ``delay=k`` is ``(k,)``; ``D = max(d_j)``; ``F = feedback``,
    ``O`` when None; ``Du = 0`` when ``u`` is None)::

        x0 : (D, B, F), or (B, F) when D == 1   the D fed-back values before step 0, oldest first
        u  : (T, B, Du)       exogenous input of each step, or None
        w1 : (H_1, Du + m·F)  columns [0:Du] read u_t, then F columns per lag, in the order given
        wl : (H_l, H_{l-1})   wL: (O, H_{L-1}); every bias (out_l,) or None
        returns Y : (T, B, O) with T = steps (inferred from u when None)

    An ensemble of E networks (docs/spec.md §1.3) has every weight 3-D ``(E, out_l, in_l)`` and
    every bias ``(E, out_l)``; x0 is then ``(D, E, B, F)`` or shared ``(D, B, F)`` (``(B, F)``
    when D == 1), u ``(T, E, B, Du)`` or shared ``(T, B, Du)``, and Y ``(T, E, B, O)``.

    With ``past(s) = y_s[..., :F]`` for ``s >= 0`` and ``x0[s + D]`` for ``s < 0``, step ``t``
    reads ``x_t = [past(t - d_1); ...; past(t - d_m)]`` and outputs ``y_t = f([u_t; x_t])``, plus
    ``[past(t - d_1); 0]`` when ``residual``. With ``truncate = K`` every ``past(s)``, ``s >= 0``,
    read by a step ``t`` with ``t % K == 0`` is detached, the residual skip included (truncated
    BPTT); ``x0`` and ``u`` are never detached. The arguments are validated as `fbfast.rollout`
    validates them; the computation runs in the inputs' dtype, with no silent upcast.
    """
    params, legacy = _split_positional(args)
    if layers:
        params = params_from_keywords(_WHO, params, layers)
    given = dict(steps=steps, u=u, delay=delay, truncate=truncate)
    defaults = dict(steps=None, u=None, delay=1, truncate=None)
    for name, value in zip(_LEGACY_POSITIONAL, legacy):
        if given[name] is not defaults[name]:
            raise TypeError(f"{_WHO}: got {name} both positionally (version 1's order: steps, u, delay, "
                            f"truncate after the layers) and as a keyword")
        given[name] = value
    a = check_rollout_args(x0, params, given["steps"], given["u"], given["delay"], given["truncate"],
                           activation, who=_WHO, feedback=feedback, residual=residual)
    return run_reference(a.x0, a.weights, a.biases, a.steps, given["u"], a.lags, given["truncate"],
                         a.activation, feedback, residual)


def _split_positional(args: Sequence):
    """``(layers, legacy)``: the weight/bias arguments before the first int, and what follows."""
    for i, value in enumerate(args):
        if isinstance(value, int) and not isinstance(value, bool):
            legacy = args[i:]
            if len(legacy) > len(_LEGACY_POSITIONAL):
                raise TypeError(
                    f"{_WHO}: after the layers, version 1's positional form takes at most steps, u, "
                    f"delay, truncate; got {len(legacy)} arguments from steps={value} on")
            return args[:i], legacy
    return args, ()


def run_reference(x0: Tensor, weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]], steps: int,
                  u: Optional[Tensor], lags: Sequence[int], truncate: Optional[int],
                  activation: ResolvedActivation, feedback: Optional[int] = None,
                  residual: bool = False) -> Tensor:
    """The rollout on validated arguments (x0 is ``(D, B, F)``, ``D = max(lags)``; ``feedback``
    is F, or None when every output is fed back): what `rollout_reference`, ``backend="eager"``
    and the unrolled ``backend="compile"`` graphs run.

    A version-1 call (one lag, every output fed back, no skip) runs exactly the ops version 1
    ran: no slice of y, no concatenation of lags, no addition, so that it stays bit for bit."""
    act = resolve_activation(activation).fn
    if weights[0].dim() == 3:
        return _run_ensemble(x0, weights, biases, steps, u, lags, truncate, act, feedback, residual)
    D, m = max(lags), len(lags)
    B, fed = x0.shape[1], x0.shape[2]
    O = weights[-1].shape[0]
    if steps == 0 or B == 0 or O == 0:
        # An empty Y (no steps, rows or features): one step over an expanded input gives its
        # (steps, B, O) shape attached to every input's graph, so backward works (zero gradients)
        # whatever requires grad, and a huge `steps` with nothing to compute does not loop.
        x = x0[:1].expand(steps, B, fed)
        xs = x if m == 1 else torch.cat([x] * m, dim=-1)
        xin = xs if u is None else torch.cat([u, xs], dim=-1)
        return _skip(_network(xin, weights, biases, act), x, feedback, residual)
    return _loop(x0, weights, biases, steps, u, lags, truncate, act, feedback, residual, _network)


def _loop(x0: Tensor, weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]], steps: int,
          u: Optional[Tensor], lags: Sequence[int], truncate: Optional[int], act: Callable[[Tensor], Tensor],
          feedback: Optional[int], residual: bool, network: Callable) -> Tensor:
    """The recurrence of docs/spec.md §1.2, one step at a time; ``x0[s]`` and ``u[t]`` are what
    step ``t`` reads (``(B, ·)``, or ``(E, B, ·)`` in an ensemble)."""
    D, m = max(lags), len(lags)
    ys: List[Tensor] = []
    past: List[Tensor] = []  # y_s[..., :F]: what later steps read of step s
    for t in range(steps):
        cut = truncate is not None and t % truncate == 0
        parts = []
        for d in lags:
            s = t - d
            if s < 0:
                p = x0[s + D]
            else:
                p = past[s]
                if cut:
                    p = p.detach()
            parts.append(p)
        x = parts[0] if m == 1 else torch.cat(parts, dim=-1)
        xin = x if u is None else torch.cat([u[t], x], dim=-1)
        y = _skip(network(xin, weights, biases, act), parts[0], feedback, residual)
        ys.append(y)
        past.append(y if feedback is None else y[..., :feedback])
    return torch.stack(ys)


def _run_ensemble(x0: Tensor, weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]], steps: int,
                  u: Optional[Tensor], lags: Sequence[int], truncate: Optional[int],
                  act: Callable[[Tensor], Tensor], feedback: Optional[int], residual: bool) -> Tensor:
    """An ensemble (docs/spec.md §1.3): weights ``(E, out, in)``, x0 ``(D, E, B, F)`` or shared
    ``(D, B, F)``, u ``(T, E, B, Du)`` or shared ``(T, B, Du)``; returns ``(T, E, B, O)``.

    A shared x0 or u is expanded to the member axis (a zero-stride view, never a copy), so each
    member reads the one tensor and autograd sums the members' gradients into it, as the
    contract says. The rest is the 2-D recurrence over ``(E, B, ·)`` tensors: the feedback, the
    residual skip and truncation act member by member because nothing mixes the member axis."""
    E, D = weights[0].shape[0], max(lags)
    B, fed = x0.shape[-2], x0.shape[-1]
    O = weights[-1].shape[1]
    if x0.dim() == 3:
        x0 = x0.unsqueeze(1).expand(D, E, B, fed)
    if u is not None and u.dim() == 3:
        u = u.unsqueeze(1).expand(u.shape[0], E, B, u.shape[-1])
    if steps == 0 or E == 0 or B == 0 or O == 0:
        # An empty Y, attached to every input's graph as in the 2-D path of run_reference.
        x = x0[:1].expand(steps, E, B, fed)
        xs = x if len(lags) == 1 else torch.cat([x] * len(lags), dim=-1)
        xin = xs if u is None else torch.cat([u, xs], dim=-1)
        return _skip(_ensemble_network(xin, weights, biases, act), x, feedback, residual)
    return _loop(x0, weights, biases, steps, u, lags, truncate, act, feedback, residual, _ensemble_network)


def _skip(z: Tensor, first: Tensor, feedback: Optional[int], residual: bool) -> Tensor:
    """``y = z + [first ; 0]`` when ``residual`` (the first lag's fed-back value added to the
    first F outputs), else ``z``. The outputs past F are concatenated, not added to a zero: an
    addition would turn a -0.0 output into +0.0."""
    if not residual:
        return z
    if feedback is None:
        return z + first
    return torch.cat([z[..., :feedback] + first, z[..., feedback:]], dim=-1)


def _network(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]],
             act: Callable[[Tensor], Tensor]) -> Tensor:
    """``f(x) = W_L act(... act(W_1 x + b_1) ...) + b_L`` (docs/spec.md §1.1): for two layers
    and ReLU the very ops version 1 ran, ``F.linear(F.relu(F.linear(x, w1, b1)), w2, b2)``."""
    last = len(weights) - 1
    for l, (w, b) in enumerate(zip(weights, biases)):
        x = F.linear(x, w, b)
        if l < last:
            x = act(x)
    return x


def _ensemble_network(x: Tensor, weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]],
                      act: Callable[[Tensor], Tensor]) -> Tensor:
    """Every member's ``f`` at once: ``x`` is ``(..., E, B, in)``, weights ``(E, out, in)``,
    biases ``(E, out)``. A step's ``(E, B, in)`` runs one ``torch.baddbmm`` per layer (a batched
    GEMM over the members, the formulation of mbrl-lib's ensemble layers); the empty case's
    leading step axis goes through the broadcasting ``torch.matmul``."""
    last = len(weights) - 1
    for l, (w, b) in enumerate(zip(weights, biases)):
        wt = w.transpose(1, 2)
        if x.dim() == 3:
            x = torch.bmm(x, wt) if b is None else torch.baddbmm(b.unsqueeze(1), x, wt)
        else:
            x = torch.matmul(x, wt) if b is None else torch.matmul(x, wt) + b.unsqueeze(1)
        if l < last:
            x = act(x)
    return x
