"""Which backend runs a rollout: availability, the "auto" rule and `FBFAST_BACKEND`.

| name      | what runs                                    | devices    | dtypes                      |
| --------- | -------------------------------------------- | ---------- | --------------------------- |
| "cuda"    | fused CUDA kernel (torch.ops.fbfast)         | cuda       | float32, bfloat16, float16  |
| "cpp"     | fused C++ CPU kernel (torch.ops.fbfast)      | cpu        | float32, float64            |
| "compile" | torch.compile of the reference (unrolled)    | any        | any floating                |
| "eager"   | the pure-PyTorch reference                   | any        | any floating                |

"auto" takes the compiled kernel of the tensors' device when it is built and supports the
dtype, else "eager". The environment variable FBFAST_BACKEND, when set, replaces "auto".
Ensembles (3-D weights, docs/spec.md §1.3) run on every backend; the kernels take them as
3-D weights (docs/internals.md, "Ensembles").
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from . import ops

REBUILD_HINT = "rebuild it with `pip install --no-build-isolation -v .` in the fbfast source tree"

NAMES = ("cuda", "cpp", "compile", "eager")

_KERNEL_DTYPES = {
    "cpp": (torch.float32, torch.float64),
    "cuda": (torch.float32, torch.bfloat16, torch.float16),
}
_KERNEL_DEVICE = {"cpp": "cpu", "cuda": "cuda"}


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str  # why it is missing, or what it runs when available
    devices: Tuple[str, ...]
    dtypes: Tuple[str, ...]

    def __str__(self) -> str:
        state = "available" if self.available else "missing"
        return f"{self.name:8s} {state:9s} devices={','.join(self.devices)} dtypes={','.join(self.dtypes)}  {self.reason}"


def _dtype_names(dtypes) -> Tuple[str, ...]:
    return tuple(str(d).replace("torch.", "") for d in dtypes)


def _status() -> Dict[str, BackendStatus]:
    floats = ("float32", "float64", "float16", "bfloat16")
    out = {}
    if not ops.LOADED:
        if ops.STALE:
            why = f"the compiled extension is out of date ({ops.LOAD_ERROR}); {REBUILD_HINT}"
        elif ops.BUILT:
            why = f"the compiled extension did not load ({ops.LOAD_ERROR}); {REBUILD_HINT}"
        elif ops.SHADOWED:
            why = ops.LOAD_ERROR
        else:
            why = f"{ops.LOAD_ERROR}; build it with `pip install --no-build-isolation -v .`"
        cpp_ok, cpp_why, cuda_ok = False, why, False
        cuda_why = f"{why} (the CUDA kernels are part of the same library, fbfast._C)"
    else:
        cpp_ok = ops.has_kernel("CPU")
        cpp_why = "fused C++ rollout kernel" if cpp_ok else f"fbfast._C was built without the CPU kernel; {REBUILD_HINT}"
        cuda_ok = ops.has_kernel("CUDA") and torch.cuda.is_available()
        if cuda_ok:
            cuda_why = "fused CUDA rollout kernel"
        elif not ops.has_kernel("CUDA"):
            cuda_why = ("fbfast._C was built without CUDA (no CUDA toolkit or CUDA torch at build "
                        "time, or FBFAST_SKIP_CUDA=1); on a CUDA machine " + REBUILD_HINT)
        else:
            cuda_why = "built, but torch.cuda.is_available() is False on this machine"
    out["cuda"] = BackendStatus("cuda", cuda_ok, cuda_why, ("cuda",), _dtype_names(_KERNEL_DTYPES["cuda"]))
    out["cpp"] = BackendStatus("cpp", cpp_ok, cpp_why, ("cpu",), _dtype_names(_KERNEL_DTYPES["cpp"]))
    out["compile"] = BackendStatus("compile", True, "torch.compile of the reference (compiles an unrolled loop per "
                                   "steps, lags, truncate, depth, activation, feedback and residual)",
                                   ("cpu", "cuda"), floats)
    out["eager"] = BackendStatus("eager", True, "pure-PyTorch reference", ("any",), floats)
    return out


_STATUS = _status()
_warned_fallback = False


def backends() -> Dict[str, BackendStatus]:
    """Every backend, whether it is available here, and why a missing one is missing."""
    return dict(_STATUS)


def resolve(backend: str, x0: torch.Tensor) -> str:
    """The backend that will run for tensors like ``x0`` (validated already)."""
    source = "backend"
    if backend == "auto" and os.environ.get("FBFAST_BACKEND"):
        backend, source = os.environ["FBFAST_BACKEND"], "the FBFAST_BACKEND environment variable"
    if backend == "auto":
        device = x0.device.type
        if device == "cpu":
            if _STATUS["cpp"].available and x0.dtype in _KERNEL_DTYPES["cpp"]:
                return "cpp"
            _warn_fallback("cpp")
        elif device == "cuda" and _STATUS["cuda"].available and x0.dtype in _KERNEL_DTYPES["cuda"]:
            return "cuda"
        return "eager"
    if backend in ("eager", "compile"):
        return backend
    if backend not in _KERNEL_DEVICE:
        raise ValueError(f"fbfast.rollout: {source} must be one of 'auto', {', '.join(map(repr, NAMES))}; got {backend!r}")
    status = _STATUS[backend]
    if not status.available:
        raise RuntimeError(f"fbfast.rollout: backend {backend!r} is not available: {status.reason}")
    if x0.device.type != _KERNEL_DEVICE[backend]:
        raise ValueError(f"fbfast.rollout: backend {backend!r} runs on {_KERNEL_DEVICE[backend]} tensors, "
                         f"got tensors on {x0.device}")
    if x0.dtype not in _KERNEL_DTYPES[backend]:
        raise TypeError(f"fbfast.rollout: backend {backend!r} supports dtypes "
                        f"{', '.join(status.dtypes)}; got {x0.dtype} (use backend='eager' or convert)")
    return backend


def _warn_fallback(kernel: str) -> None:
    # Once per process, and only when the extension is absent or failed to load: a
    # loaded build that merely lacks a dtype (float16 on CPU) falls back silently.
    global _warned_fallback
    if _warned_fallback or ops.LOADED:
        return
    _warned_fallback = True
    warnings.warn(f"fbfast: the compiled {kernel!r} backend is unavailable ({_STATUS[kernel].reason}); "
                  "falling back to the pure-PyTorch 'eager' backend", RuntimeWarning, stacklevel=4)
