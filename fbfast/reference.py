"""The pure-PyTorch reference rollout: the oracle of every test and the ``"eager"`` backend.

It is written for clarity, not speed: per step, one ``F.linear`` per layer with the activation
between them, exactly as docs/spec.md §1 states the recurrence, so that autograd of this
function *defines* the gradients every compiled backend must reproduce.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

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
                      delay: int = 1, truncate: Optional[int] = None, activation="relu",
                      **layers: Optional[Tensor]) -> Tensor:
    """Run ``steps`` steps of the feedback MLP of docs/spec.md §1 in plain PyTorch.

    Called like `fbfast.rollout` (without ``backend``)::

        rollout_reference(x0, w1, b1, ..., wL, bL, steps=None, u=None, delay=1, truncate=None,
                          activation="relu")

    or in version 1's positional form, which keeps working::

        rollout_reference(x0, w1, b1, w2, b2, steps, u=None, delay=1, truncate=None)

    The positional arguments after ``x0`` are weight/bias pairs up to the first ``int``, which
    is ``steps``; ``u``, ``delay`` and ``truncate`` may follow it positionally, in that order.
    The layers may also be named (``w1=..., b1=...``), as version 1's signature allowed.

    Shapes (``k = delay``, ``Du = 0`` when ``u`` is None)::

        x0 : (k, B, O), or (B, O) when k == 1   the first k fed-back inputs
        u  : (T, B, Du)       exogenous input of each step, or None
        w1 : (H_1, Du + O)    columns [0:Du] read u_t, columns [Du:] read x_t
        wl : (H_l, H_{l-1})   wL: (O, H_{L-1}); every bias (out_l,) or None
        returns Y : (T, B, O) with T = steps (inferred from u when None)

    ``x_t = x0[t]`` for ``t < k``, else ``y_{t-k}``; with ``truncate = K`` the edge
    ``y_{t-k} -> x_t`` is detached when ``t % K == 0`` (truncated BPTT). ``x0`` and ``u`` are
    never detached. The arguments are validated as `fbfast.rollout` validates them; the
    computation runs in the inputs' dtype, with no silent upcast.
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
                           activation, who=_WHO)
    return run_reference(a.x0, a.weights, a.biases, a.steps, given["u"], given["delay"], given["truncate"],
                         a.activation)


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
                  u: Optional[Tensor], delay: int, truncate: Optional[int],
                  activation: ResolvedActivation) -> Tensor:
    """The rollout on validated arguments (x0 is ``(delay, B, O)``): what `rollout_reference`,
    ``backend="eager"`` and the unrolled ``backend="compile"`` graphs run."""
    act = resolve_activation(activation).fn
    k = delay
    B, O = x0.shape[1], x0.shape[2]
    if steps == 0 or B == 0 or O == 0:
        # An empty Y (no steps, rows or features): one step over an expanded input gives its
        # (steps, B, O) shape attached to every input's graph, so backward works (zero gradients)
        # whatever requires grad, and a huge `steps` with nothing to compute does not loop.
        x = x0[:1].expand(steps, B, O)
        xin = x if u is None else torch.cat([u, x], dim=-1)
        return _network(xin, weights, biases, act)
    ys: List[Tensor] = []
    for t in range(steps):
        if t < k:
            x = x0[t]
        else:
            x = ys[t - k]
            if truncate is not None and t % truncate == 0:
                x = x.detach()
        xin = x if u is None else torch.cat([u[t], x], dim=-1)
        ys.append(_network(xin, weights, biases, act))
    return torch.stack(ys)


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
