"""The compiled operators `torch.ops.fbfast.*`: loading the library, and the handles.

The C++ side (`csrc/fbfast.cpp`) defines the schemas; each backend registers its kernels for
its dispatch key.

From Python only the batching rule of `rollout_forward` is registered (fbfast/_vmap.py): the
fake (meta) kernels that torch.compile traces with are C++ (`csrc/meta.cpp`) and run the same
argument checks as the real kernels (`csrc/rollout_checks.h`); autograd is C++ too
(`csrc/autograd.cpp`): the backward of `rollout_forward` is one `rollout_backward` call, and the
Python autograd.Function it replaces cost more than the whole rollout at small shapes.

If the extension is missing, fails to load, or was built from other sources (its schemas are
not the ones called here), `LOAD_ERROR` says why and `LOADED` is False: the compiled backends
are reported missing, and `import fbfast` still works on the pure-PyTorch backends.
"""

from __future__ import annotations

import glob
import os
import sys
from typing import Optional

import torch

# Whether a built library is present at all: "not built" and "built but broken" (say, against
# another torch) are different problems with different messages.
BUILT = bool(glob.glob(os.path.join(os.path.dirname(__file__), "_C*.so"))
             + glob.glob(os.path.join(os.path.dirname(__file__), "_C*.pyd")))


def _shadowed_install() -> Optional[str]:
    """Where an installed, built fbfast lies when Python imported this unbuilt source tree
    instead (python run from the checkout after a non-editable install), else None."""
    package = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(package)
    if not (os.path.isfile(os.path.join(root, "setup.py")) and os.path.isdir(os.path.join(root, "csrc"))):
        return None
    for entry in sys.path:
        candidate = os.path.join(os.path.abspath(entry or os.curdir), "fbfast")
        if os.path.abspath(entry or os.curdir) != root and glob.glob(os.path.join(candidate, "_C*")):
            return candidate
    return None


LOAD_ERROR: Optional[str] = None
# True when this is the unbuilt source tree imported in place of an installed, built fbfast.
SHADOWED = False
try:
    from . import _C  # noqa: F401  (loading the library runs TORCH_LIBRARY)
except Exception as exc:  # ImportError, or an undefined symbol from a build against another torch
    if BUILT:
        LOAD_ERROR = f"{type(exc).__name__}: {exc}"
        try:  # written by setup.py at build time: which torch the library was built against
            from ._build_info import TORCH_VERSION as _BUILT_AGAINST
        except ImportError:
            _BUILT_AGAINST = None
        if _BUILT_AGAINST and _BUILT_AGAINST != torch.__version__:
            LOAD_ERROR += (f" (the library was built against torch {_BUILT_AGAINST}, this is torch "
                           f"{torch.__version__}: a compiled extension loads only with the torch it was built against)")
    elif (_installed := _shadowed_install()) is not None:
        SHADOWED = True
        LOAD_ERROR = (f"you are in the source tree: Python imported the unbuilt sources in "
                      f"{os.path.dirname(os.path.abspath(__file__))} instead of the installed, built fbfast "
                      f"in {_installed}; run from another directory, or install with "
                      "`pip install --no-build-isolation -e .`")
    else:
        LOAD_ERROR = "fbfast._C is not built (no compiled library in the package)"

# The argument names of the schemas this Python code calls (csrc/fbfast.cpp). A library built
# from older sources (an editable install pulled without a rebuild) still loads and registers
# its own schemas; calling them with these arguments would fail inside the dispatcher with a
# message about argument counts. Reported instead as a library that needs a rebuild. The
# feedback structure (lags, feedback, residual; docs/spec.md §1.2) came last, with defaults: a
# library from before it would run a lag tuple or a residual model as plain single-lag feedback
# if it were called without them, so its absence marks the library stale too.
_FEEDBACK_ARGUMENTS = ("lags", "feedback", "residual")
EXPECTED_ARGUMENTS = {
    "rollout_forward": ("x0", "u", "weights", "biases", "steps", "delay", "truncate", "activation",
                        "activation_param") + _FEEDBACK_ARGUMENTS,
    "rollout_backward": ("grad_y", "y", "x0", "u", "weights", "biases", "delay", "truncate", "activation",
                         "activation_param", "output_mask") + _FEEDBACK_ARGUMENTS,
}


def _schema_mismatch() -> Optional[str]:
    for name, expected in EXPECTED_ARGUMENTS.items():
        packet = getattr(torch.ops.fbfast, name, None)
        found = None if packet is None else tuple(a.name for a in packet.default._schema.arguments)
        if found != expected:
            have = "no such operator" if found is None else f"fbfast::{name}({', '.join(found)})"
            why = (f"the compiled library was built from other sources than this Python package: it "
                   f"has {have}, this fbfast calls fbfast::{name}({', '.join(expected)})")
            if found is not None and found + _FEEDBACK_ARGUMENTS == expected:
                why += " (it predates the lags, feedback and residual arguments of docs/spec.md §1.2)"
            return why
    return None


# True when the library loaded but its schemas are not the ones called here (a stale build).
STALE = False
if LOAD_ERROR is None:
    LOAD_ERROR = _schema_mismatch()
    STALE = LOAD_ERROR is not None

LOADED = LOAD_ERROR is None


def has_kernel(dispatch_key: str) -> bool:
    """Whether the extension registered a `rollout_forward` kernel for this dispatch key."""
    return LOADED and torch._C._dispatch_has_kernel_for_dispatch_key(
        "fbfast::rollout_forward", dispatch_key)


# The operator handle, looked up once: torch.ops attribute chains cost ~0.5 us per call, a
# measurable share of a small rollout.
forward_op = torch.ops.fbfast.rollout_forward.default if LOADED else None

# fbfast.rollout's direct entry for plain CPU tensors (csrc/python_entry.cpp): the operator's
# typed dispatcher call without torch.ops' argument boxing, and without the Python validation
# that the operator repeats. It returns None where it does not serve a call.
direct_rollout = getattr(_C, "rollout", None) if LOADED and has_kernel("CPU") else None

if LOADED:
    # torch.func.vmap of a rollout runs the fused kernel once for the whole batch (fbfast/_vmap.py).
    from ._vmap import register as _register_vmap

    _register_vmap()
