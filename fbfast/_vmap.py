"""The batching rule of ``fbfast::rollout_forward`` (``torch.func.vmap``): one call of the fused
kernel for the whole vmapped batch, never a loop over it.

A vmapped dimension becomes one of the axes the operator already has (docs/spec.md §1.3):

* weights or biases vmapped: the batch is an ensemble. Its networks are the member axis of 3-D
  weights, ``(V, out, in)``; for a rollout that is already an ensemble, ``(V, E, out, in)`` folds
  into ``V·E`` members. An x0 or u that is not vmapped stays shared (zero-copy) when it was
  shared, and is expanded when it is an ensemble's own.
* only x0 and/or u vmapped: the rollouts differ only in their data, so the vmapped axis folds
  into the batch rows, ``B -> V·B``: one network, V times the rows.

The result is unfolded back to the vmapped axis. The operator's autograd (csrc/autograd.cpp)
sees the folded call, so vmap inside ordinary autograd trains through the fused kernel;
``torch.func.grad`` still cannot (fbfast/functional.py falls back to the reference there).
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import torch
from torch import Tensor


def _fold_rows(t: Optional[Tensor], bdim: Optional[int], V: int) -> Optional[Tensor]:
    """(..., B, X) with the vmapped axis at ``bdim`` (or none) -> (..., V·B, X)."""
    if t is None:
        return None
    if bdim is None:
        t = t.unsqueeze(-3).expand(*t.shape[:-2], V, *t.shape[-2:])
    else:
        t = t.movedim(bdim, -3)
    # Sizes spelled out: a -1 is ambiguous for a tensor of no elements (T = 0, or an empty axis).
    return t.reshape(*t.shape[:-3], V * t.shape[-2], t.shape[-1])


def rollout_forward_vmap(info: Any, in_dims: Tuple[Any, ...], x0: Tensor, u: Optional[Tensor],
                         weights: Sequence[Tensor], biases: Sequence[Optional[Tensor]], steps: int, delay: int,
                         truncate: int, activation: str, param: float, *rest: Any,
                         **kwargs: Any) -> Tuple[Tensor, int]:
    from . import ops

    V = info.batch_size
    x0_dim, u_dim, w_dims, b_dims = in_dims[0], in_dims[1], list(in_dims[2]), list(in_dims[3])
    op = ops.forward_op
    ensemble = weights[0].dim() - (w_dims[0] is not None) == 3
    if all(d is None for d in w_dims + b_dims):
        # Only the data differ: V·B rows of one network (or of each member).
        x0f = _fold_rows(x0, x0_dim, V)
        uf = _fold_rows(u, u_dim, V)
        y = op(x0f, uf, list(weights), list(biases), steps, delay, truncate, activation, param, *rest, **kwargs)
        y = y.reshape(*y.shape[:-2], V, y.shape[-2] // V, y.shape[-1])
        return y, y.dim() - 3

    # The networks differ: an ensemble of V (or V·E) members on axis 0 of every weight.
    def member_axis(t: Optional[Tensor], d: Optional[int]) -> Optional[Tensor]:
        if t is None:
            return None
        t = t.movedim(d, 0) if d is not None else t.unsqueeze(0).expand(V, *t.shape)
        return t.reshape(V * t.shape[1], *t.shape[2:]) if ensemble else t

    w = [member_axis(t, d) for t, d in zip(weights, w_dims)]
    b = [member_axis(t, d) for t, d in zip(biases, b_dims)]
    E = weights[0].shape[0 if w_dims[0] != 0 else 1] if ensemble else 1
    M = V * E

    def data(t: Optional[Tensor], d: Optional[int]) -> Optional[Tensor]:
        """x0 (D, [E,] B, F) or u (T, [E,] B, Du) for the M members: shared ones stay shared."""
        if t is None:
            return None
        own = ensemble and t.dim() - (d is not None) == 4
        if d is None:
            if not own:
                return t
            t = t.unsqueeze(1).expand(t.shape[0], V, *t.shape[1:])  # (D, V, E, B, F)
        else:
            t = t.movedim(d, 1)  # (D, V, [E,] B, F)
            if ensemble and not own:
                t = t.unsqueeze(2).expand(t.shape[0], V, E, *t.shape[2:])
        return t.reshape(t.shape[0], M, *t.shape[-2:])

    y = op(data(x0, x0_dim), data(u, u_dim), w, b, steps, delay, truncate, activation, param, *rest, **kwargs)
    # (T, M, B, O) -> (T, V, [E,] B, O)
    y = y.reshape(y.shape[0], V, *([E] if ensemble else []), *y.shape[2:])
    return y, 1


def register() -> None:
    """Register the rule for the loaded operator (fbfast/ops.py calls this once)."""
    torch.library.register_vmap("fbfast::rollout_forward", rollout_forward_vmap)
