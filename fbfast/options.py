"""Process-wide settings of the compiled kernels, safe to change while other threads call them.

The kernels read ``FBFAST_CPU_ISA``, ``FBFAST_CPU_PATH`` and ``FBFAST_CUDA_PATH`` once, when the
extension loads; a call never reads the environment (``getenv`` in a kernel races with
``os.environ[...] = ...`` in another thread and can crash the process). To change a setting
afterwards, use `set_kernel_options` or the `kernel_options` context manager:

    with fbfast.kernel_options(cpu_path="blas"):
        Y = fbfast.rollout(...)

| option      | values                                  | effect                                  |
| ----------- | --------------------------------------- | --------------------------------------- |
| `cpu_isa`   | "auto", "avx512", "avx2", "base"        | the CPU tile kernels' instruction set   |
| `cpu_path`  | "auto", "tile", "blas"                  | the CPU kernel's path (csrc/cpu/)       |
| `cuda_path` | "auto", "fused", "general"              | the CUDA kernel's path (csrc/cuda/)     |

"auto" is the default rule. The settings hold for the whole process, in every thread.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional

import torch

from . import ops

__all__ = ["set_kernel_options", "kernel_options"]


def _require(kernel: str) -> None:
    if not ops.LOADED:
        raise RuntimeError(f"fbfast.set_kernel_options: the compiled extension is not loaded ({ops.LOAD_ERROR})")
    if not ops.has_kernel(kernel):
        raise RuntimeError(f"fbfast.set_kernel_options: this build of fbfast has no {kernel} kernel")


def set_kernel_options(*, cpu_isa: Optional[str] = None, cpu_path: Optional[str] = None,
                       cuda_path: Optional[str] = None) -> Dict[str, str]:
    """Set the given options (None leaves one unchanged); returns the previous value of each
    option that was given, so that ``set_kernel_options(**previous)`` restores them."""
    previous: Dict[str, str] = {}
    if cpu_isa is not None or cpu_path is not None:
        _require("CPU")
        isa, path = torch.ops.fbfast.cpu_options(cpu_isa, cpu_path)
        if cpu_isa is not None:
            previous["cpu_isa"] = isa
        if cpu_path is not None:
            previous["cpu_path"] = path
    if cuda_path is not None:
        _require("CUDA")
        (previous["cuda_path"],) = torch.ops.fbfast.cuda_options(cuda_path)
    return previous


def get_kernel_options() -> Dict[str, str]:
    """The current settings of the kernels that are built here."""
    current: Dict[str, str] = {}
    if ops.LOADED and ops.has_kernel("CPU"):
        current["cpu_isa"], current["cpu_path"] = torch.ops.fbfast.cpu_options(None, None)
    if ops.LOADED and ops.has_kernel("CUDA"):
        (current["cuda_path"],) = torch.ops.fbfast.cuda_options(None)
    return current


@contextlib.contextmanager
def kernel_options(**options: Optional[str]) -> Iterator[None]:
    """`set_kernel_options` for the duration of a ``with`` block; the previous values return
    afterwards, also when the block raises."""
    previous = set_kernel_options(**options)
    try:
        yield
    finally:
        set_kernel_options(**previous)
