"""The compiled operators `torch.ops.fbfast.*`: loading, fake (meta) kernels and autograd.

The C++ side (`csrc/fbfast.cpp`) defines the schemas; each backend registers its kernels for
its dispatch key. This module adds what every backend shares, in Python:

* `register_fake` for both operators, so they trace under `torch.compile(fullgraph=True)`;
* `register_autograd` for `rollout_forward`, whose backward is `rollout_backward` — one fused
  call for the whole reverse-time sweep.

If the extension is missing or fails to load, `LOAD_ERROR` says why and nothing is registered:
`import fbfast` still works on the pure-PyTorch backends.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from .reference import rollout_reference

import glob
import os

# Whether a built library is present at all: "not built" and "built but broken" (say, against
# another torch) are different problems with different messages.
BUILT = bool(glob.glob(os.path.join(os.path.dirname(__file__), "_C*.so"))
             + glob.glob(os.path.join(os.path.dirname(__file__), "_C*.pyd")))
LOAD_ERROR: Optional[str] = None
try:
    from . import _C  # noqa: F401  (loading the library runs TORCH_LIBRARY)
except Exception as exc:  # ImportError, or an undefined symbol from a build against another torch
    LOAD_ERROR = (f"{type(exc).__name__}: {exc}" if BUILT
                  else "fbfast._C is not built (no compiled library in the package)")

LOADED = LOAD_ERROR is None


def has_kernel(dispatch_key: str) -> bool:
    """Whether the extension registered a `rollout_forward` kernel for this dispatch key."""
    return LOADED and torch._C._dispatch_has_kernel_for_dispatch_key(
        "fbfast::rollout_forward", dispatch_key)


if LOADED:
    _forward_op = torch.ops.fbfast.rollout_forward.default
    _backward_op = torch.ops.fbfast.rollout_backward.default

    @torch.library.register_fake("fbfast::rollout_forward")
    def _rollout_forward_fake(x0, u, w1, b1, w2, b2, steps, delay, truncate):
        torch._check(steps >= 0, lambda: f"steps must be >= 0, got {steps}")
        torch._check(x0.dim() == 3 and x0.shape[0] == delay,
                     lambda: f"x0 must be (delay={delay}, B, O), got {tuple(x0.shape)}")
        return x0.new_empty((steps, x0.shape[1], x0.shape[2]))

    @torch.library.register_fake("fbfast::rollout_backward")
    def _rollout_backward_fake(grad_y, y, x0, u, w1, b1, w2, delay, truncate, output_mask):
        def like(i, t):
            return t.new_empty(t.shape) if output_mask[i] and t is not None else grad_y.new_empty((0,))
        db2 = grad_y.new_empty((w2.shape[0],)) if output_mask[5] else grad_y.new_empty((0,))
        return like(0, x0), like(1, u), like(2, w1), like(3, b1), like(4, w2), db2

    def _setup_context(ctx, inputs, output):
        x0, u, w1, b1, w2, b2, steps, delay, truncate = inputs
        ctx.steps, ctx.delay, ctx.truncate = steps, delay, truncate
        ctx.save_for_backward(x0, u, w1, b1, w2, b2, output)

    def _backward(ctx, grad_y):
        x0, u, w1, b1, w2, b2, y = ctx.saved_tensors
        mask = ctx.needs_input_grad[:6]
        if torch.is_grad_enabled() and (
                grad_y.requires_grad or any(t is not None and t.requires_grad
                                            for t in (x0, u, w1, b1, w2, b2))):
            # create_graph=True: the backward itself is being differentiated. The fused backward
            # has no derivative of its own, so take the exact (slower) path through autograd of
            # the reference rather than return a silently wrong zero.
            grads = _differentiable_backward(ctx, grad_y, (x0, u, w1, b1, w2, b2), mask)
        else:
            grads = _backward_op(grad_y, y, x0, u, w1, b1, w2, ctx.delay, ctx.truncate, list(mask))
        return tuple(g if m else None for g, m in zip(grads, mask)) + (None, None, None)

    def _differentiable_backward(ctx, grad_y, inputs, mask):
        x0, u, w1, b1, w2, b2 = inputs
        wanted = [t for t, m in zip(inputs, mask) if m]
        y = rollout_reference(x0, w1, b1, w2, b2, ctx.steps, u, ctx.delay, ctx.truncate or None)
        got = iter(torch.autograd.grad(y, wanted, grad_y, create_graph=True, allow_unused=True))
        out = []
        for t, m in zip(inputs, mask):
            g = next(got) if m else None
            out.append(torch.zeros_like(t) if m and g is None else g)
        return out

    torch.library.register_autograd(
        "fbfast::rollout_forward", _backward, setup_context=_setup_context)


def rollout_forward(x0: Tensor, u: Optional[Tensor], w1: Tensor, b1: Optional[Tensor], w2: Tensor,
                    b2: Optional[Tensor], steps: int, delay: int, truncate: int) -> Tensor:
    """Typed wrapper of `torch.ops.fbfast.rollout_forward` (x0 already `(delay, B, O)`)."""
    return _forward_op(x0, u, w1, b1, w2, b2, steps, delay, truncate)
