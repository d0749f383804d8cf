"""The compiled operators `torch.ops.fbfast.*`: loading, fake (meta) kernels and autograd.

The C++ side (`csrc/fbfast.cpp`) defines the schemas; each backend registers its kernels for
its dispatch key. This module adds what every backend shares, in Python:

* `register_fake` for both operators, so they trace under `torch.compile(fullgraph=True)`.

Autograd is registered in C++ (`csrc/autograd.cpp`): the backward of `rollout_forward` is one
`rollout_backward` call, and the Python autograd.Function it replaces cost more than the whole
rollout at small shapes.

If the extension is missing or fails to load, `LOAD_ERROR` says why and nothing is registered:
`import fbfast` still works on the pure-PyTorch backends.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


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


# The operator handle, looked up once: torch.ops attribute chains cost ~0.5 us per call, a
# measurable share of a small rollout.
forward_op = torch.ops.fbfast.rollout_forward.default if LOADED else None

if LOADED:

    def _check_one_device(**tensors) -> None:
        # The dispatcher sends a call that mixes meta and CPU tensors here (Meta outranks CPU),
        # where a shape-only kernel would answer with a meta result instead of an error.
        device = tensors["x0"].device
        for name, t in tensors.items():
            if t is not None:
                torch._check(t.device == device,
                             lambda: f"fbfast: {name} is on {t.device} but x0 is on {device}; "
                                     "all tensors must be on one device")

    @torch.library.register_fake("fbfast::rollout_forward")
    def _rollout_forward_fake(x0, u, w1, b1, w2, b2, steps, delay, truncate):
        _check_one_device(x0=x0, u=u, w1=w1, b1=b1, w2=w2, b2=b2)
        torch._check(steps >= 0, lambda: f"steps must be >= 0, got {steps}")
        torch._check(x0.dim() == 3 and x0.shape[0] == delay,
                     lambda: f"x0 must be (delay={delay}, B, O), got {tuple(x0.shape)}")
        return x0.new_empty((steps, x0.shape[1], x0.shape[2]))

    @torch.library.register_fake("fbfast::rollout_backward")
    def _rollout_backward_fake(grad_y, y, x0, u, w1, b1, w2, delay, truncate, output_mask):
        _check_one_device(x0=x0, grad_y=grad_y, y=y, u=u, w1=w1, b1=b1, w2=w2)
        def like(i, t):
            return t.new_empty(t.shape) if output_mask[i] and t is not None else grad_y.new_empty((0,))
        db2 = grad_y.new_empty((w2.shape[0],)) if output_mask[5] else grad_y.new_empty((0,))
        return like(0, x0), like(1, u), like(2, w1), like(3, b1), like(4, w2), db2
