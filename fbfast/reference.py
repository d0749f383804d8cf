"""The pure-PyTorch reference rollout: the oracle of every test and the ``"eager"`` backend.

It is written for clarity, not speed: one ``F.linear -> relu -> F.linear`` per step, exactly as
docs/spec.md §1 states the recurrence, so that autograd of this function *defines* the gradients every
compiled backend must reproduce.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["rollout_reference"]


def rollout_reference(
    x0: Tensor,
    w1: Tensor,
    b1: Optional[Tensor],
    w2: Tensor,
    b2: Optional[Tensor],
    steps: int,
    u: Optional[Tensor] = None,
    delay: int = 1,
    truncate: Optional[int] = None,
) -> Tensor:
    """Run ``steps`` steps of ``y_t = W2 relu(W1 [u_t; x_t] + b1) + b2`` with fed-back outputs.

    Shapes (``k = delay``, ``Du = 0`` when ``u`` is None)::

        x0 : (k, B, O)        the first k fed-back inputs (callers normalise (B, O) to (1, B, O))
        u  : (T, B, Du)       exogenous input of each step, or None
        w1 : (H, Du + O)      columns [0:Du] read u_t, columns [Du:] read x_t
        b1 : (H,) or None
        w2 : (O, H)
        b2 : (O,) or None
        returns Y : (T, B, O) with T = steps

    ``x_t = x0[t]`` for ``t < k``, else ``y_{t-k}``; with ``truncate = K`` the edge
    ``y_{t-k} -> x_t`` is detached when ``t % K == 0`` (truncated BPTT). ``x0`` and ``u`` are
    never detached. Arguments are assumed valid (``fbfast.rollout`` validates them); the
    computation runs in the inputs' dtype, with no silent upcast.
    """
    k = delay
    B, O = x0.shape[1], x0.shape[2]
    if steps == 0 or B == 0 or O == 0:
        # An empty Y (no steps, rows or features): one step over an expanded input gives its
        # (steps, B, O) shape attached to every input's graph, so backward works (zero gradients)
        # whatever requires grad, and a huge `steps` with nothing to compute does not loop.
        x = x0[:1].expand(steps, B, O)
        xin = x if u is None else torch.cat([u, x], dim=-1)
        return F.linear(F.relu(F.linear(xin, w1, b1)), w2, b2)
    ys: list[Tensor] = []
    for t in range(steps):
        if t < k:
            x = x0[t]
        else:
            x = ys[t - k]
            if truncate is not None and t % truncate == 0:
                x = x.detach()
        xin = x if u is None else torch.cat([u[t], x], dim=-1)
        h = F.relu(F.linear(xin, w1, b1))
        ys.append(F.linear(h, w2, b2))
    return torch.stack(ys)
