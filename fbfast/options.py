"""Process-wide settings of the compiled kernels, safe to change while other threads call them.

The kernels read ``FBFAST_CPU_ISA``, ``FBFAST_CPU_PATH``, ``FBFAST_CUDA_PATH`` and
``FBFAST_CUDA_GRAPHS`` once, when the
extension loads; a call never reads the environment (``getenv`` in a kernel races with
``os.environ[...] = ...`` in another thread and can crash the process). To change a setting
afterwards, use `set_kernel_options` or the `kernel_options` context manager:

    with fbfast.kernel_options(cpu_path="blas"):
        Y = fbfast.rollout(...)

| option      | values                                  | effect                                  |
| ----------- | --------------------------------------- | --------------------------------------- |
| `cpu_isa`   | "auto", "avx512", "avx2", "base"        | the CPU tile kernels' instruction set   |
| `cpu_path`  | "auto", "rule", "tile", "blas"          | the CPU kernel's path (csrc/cpu/)       |
| `cuda_path` | "auto", "fused", "general"              | the CUDA kernel's path (csrc/cuda/)     |
| `cuda_graphs` | "auto", "always", "off"               | CUDA-graph replay of the general path   |
| `cuda_tensor_cores` | "auto", "off"                   | tensor cores in the fused CUDA kernels  |

"auto" is the default, except for `cuda_graphs` ("off"). For `cpu_path` it is the static rule of csrc/cpu/rollout_cpu.cpp except
where the tile path and per-step BLAS GEMMs trade places between machines (layers of 128 x 128
to 512 x 512): there the first call of a shape class times both paths on a reduced copy of the
call and keeps the faster for the rest of the process (`cpu_path_calibration` lists them).
"rule" is the static rule alone, which repeats bit for bit across processes. `cuda_graphs`
(default "off") replays the CUDA general path (per-step cuBLAS GEMMs, taken where the weights do
not fit in shared memory) from a recorded CUDA graph: "auto" records a call of at least 4 steps
the second time its sizes are seen, "always" from the first call; "off" drops every recorded
graph (csrc/cuda/graphed_call.h, which says why it is not the default yet; `cuda_graph_stats`
counts them). Calls through one graph repeat bit for bit; against the step-by-step path they
agree to cuBLAS's rounding. For `cuda_tensor_cores`, "auto" runs the fused kernels' products on TF32 tensor cores where every
width is a multiple of 16 and the tiles hold whole 16-row groups, each fp32 operand split in two
TF32 parts ("3xTF32", close to fp32's accuracy; csrc/cuda/rollout_params.h); "off" keeps the
fp32 FMA kernels everywhere. The environment variable is ``FBFAST_CUDA_TENSOR_CORES``. The settings hold for the whole process, in every thread.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, List, Optional

import torch

from . import ops

__all__ = ["set_kernel_options", "kernel_options", "cpu_path_calibration", "cuda_graph_stats"]


def _require(kernel: str) -> None:
    if not ops.LOADED:
        raise RuntimeError(f"fbfast.set_kernel_options: the compiled extension is not loaded ({ops.LOAD_ERROR})")
    if not ops.has_kernel(kernel):
        raise RuntimeError(f"fbfast.set_kernel_options: this build of fbfast has no {kernel} kernel")


def set_kernel_options(*, cpu_isa: Optional[str] = None, cpu_path: Optional[str] = None,
                       cuda_path: Optional[str] = None, cuda_graphs: Optional[str] = None,
                       cuda_tensor_cores: Optional[str] = None) -> Dict[str, str]:
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
    cuda = dict(cuda_path=cuda_path, cuda_graphs=cuda_graphs, cuda_tensor_cores=cuda_tensor_cores)
    if any(v is not None for v in cuda.values()):
        _require("CUDA")
        values = torch.ops.fbfast.cuda_options(cuda_path, cuda_graphs, cuda_tensor_cores)
        previous.update((k, v) for (k, given), v in zip(cuda.items(), values) if given is not None)
    return previous


def get_kernel_options() -> Dict[str, str]:
    """The current settings of the kernels that are built here."""
    current: Dict[str, str] = {}
    if ops.LOADED and ops.has_kernel("CPU"):
        current["cpu_isa"], current["cpu_path"] = torch.ops.fbfast.cpu_options(None, None)
    if ops.LOADED and ops.has_kernel("CUDA"):
        current["cuda_path"], current["cuda_graphs"], current["cuda_tensor_cores"] = (
            torch.ops.fbfast.cuda_options(None, None, None))
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


def cpu_path_calibration() -> List[str]:
    """What ``cpu_path="auto"`` measured in this process: one line per shape class, with the
    time of each path on the reduced call and the path taken (empty before the first call that
    needed a measurement, and without the CPU kernel)."""
    if not (ops.LOADED and ops.has_kernel("CPU")):
        return []
    return list(torch.ops.fbfast.cpu_path_calibration())


def cuda_graph_stats() -> Dict[str, int]:
    """What ``cuda_graphs`` did in this process: general-path calls ``recorded`` as CUDA graphs,
    their ``replayed`` calls, recordings that ``failed`` (those sizes then run step by step), and
    the graphs ``held`` now (all zero without the CUDA kernel)."""
    names = ("recorded", "replayed", "failed", "held")
    if not (ops.LOADED and ops.has_kernel("CUDA")):
        return dict.fromkeys(names, 0)
    return dict(zip(names, torch.ops.fbfast.cuda_graph_stats()))
