"""Checks of the CUDA backend that run without a GPU (docs/spec.md §5).

1. Every ``csrc/cuda/*.cu`` compiles with this machine's nvcc for sm_80 and sm_90 against the
   installed torch's headers, with torch's own nvcc flags, and with no warning from the
   project's code (ptxas register-spill warnings included). Skipped when nvcc is not on PATH.
2. Every ``csrc/cuda/*.cpp`` (host code, compiled by the C++ compiler into the extension)
   passes ``g++ -fsyntax-only -Wall -Wextra`` with the CUDA headers, warning-free.
3. The kernels themselves, compiled for the host by ``csrc/cuda/emulation/`` (one thread per
   CUDA thread, a barrier per block, ThreadSanitizer when the compiler has it), match the
   float64 reference in every mode, through the same launch plan as on a GPU, and report no
   data race, no unbalanced barrier and no shared-memory overrun. This is what lets the
   kernels' indexing be tested on the project's GPU-less machines; the real-GPU checks are in
   tests/test_cuda.py.

The CPU torch wheel lacks the generated ``c10/cuda/impl/cuda_cmake_macros.h``; a two-line
stand-in is put on the include path.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils import cpp_extension

import fbfast
from testing import grads, make_problem

ROOT = Path(__file__).resolve().parents[1]
CUDA_SRC = ROOT / "csrc" / "cuda"
CU_FILES = sorted(CUDA_SRC.glob("*.cu"))
HOST_FILES = sorted(CUDA_SRC.glob("*.cpp"))
NVCC = shutil.which("nvcc")
CXX = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")
TORCH_INCLUDES = cpp_extension.include_paths() + [sysconfig.get_paths()["include"]]
ARCHS = ("80", "90")


def _project_warnings(output: str) -> list[str]:
    """Warning lines about the project's own code (csrc/), or from ptxas (kernel resources).

    Third-party headers are passed with -isystem, so their warnings are mostly silenced; any
    that remain name a path outside csrc/ and are not the project's to fix.
    """
    lines = []
    for line in output.splitlines():
        if not re.search(r"warning", line, re.IGNORECASE):
            continue
        if "csrc/" in line or line.lstrip().lower().startswith("ptxas"):
            lines.append(line)
    return lines


@pytest.fixture(scope="module")
def stand_in_includes(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("stand_in_includes")
    macros = root / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    macros.parent.mkdir(parents=True)
    macros.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return root


def _nvcc_include_dirs() -> list[str]:
    """The CUDA include directories nvcc itself uses (nvcc may be a wrapper script on PATH)."""
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.cu"
        probe.write_text("")
        out = subprocess.run([NVCC, "--dryrun", "-c", str(probe), "-o", str(Path(tmp) / "p.o")],
                             capture_output=True, text=True, timeout=60)
    dirs = []
    for line in (out.stdout + out.stderr).splitlines():
        if "INCLUDES=" in line:
            dirs += re.findall(r'-I"?([^"\s]+)"?', line)
    home = cpp_extension.CUDA_HOME
    if not dirs and home:
        dirs.append(os.path.join(home, "include"))
    return [d for d in dirs if os.path.isfile(os.path.join(d, "cuda_runtime_api.h"))]


def _run(cmd: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))


# ---------------------------------------------------------------------------------------------
# 1. nvcc, every .cu, sm_80 and sm_90

@pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH")
@pytest.mark.parametrize("source", CU_FILES, ids=lambda p: p.name)
def test_cu_file_compiles_for_sm80_and_sm90(source, stand_in_includes, tmp_path):
    includes = [f"-I{stand_in_includes}"] + [a for d in TORCH_INCLUDES for a in ("-isystem", d)]
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    cmd = ([NVCC, "-c", str(source), "-o", str(tmp_path / (source.stem + ".o")), "-std=c++20",
            "-O3", "-lineinfo", *cpp_extension.COMMON_NVCC_FLAGS, *gencode, *includes,
            "-Xcompiler=-Wall,-Wextra,-Wno-unknown-pragmas", "-Xptxas=-warn-spills,-warn-lmem-usage"])
    out = _run(cmd)
    log = out.stdout + out.stderr
    assert out.returncode == 0, f"nvcc failed on {source.name}:\n{' '.join(cmd)}\n{log}"
    assert not _project_warnings(log), f"warnings in {source.name}:\n{log}"


def test_cuda_sources_exist():
    # The glob above must not silently find nothing (a renamed folder would skip every check).
    assert CU_FILES and HOST_FILES, f"no CUDA sources under {CUDA_SRC}"


# ---------------------------------------------------------------------------------------------
# 2. g++, every host .cpp of the CUDA backend

@pytest.mark.skipif(NVCC is None or CXX is None, reason="nvcc (for the CUDA headers) or g++ missing")
@pytest.mark.parametrize("source", HOST_FILES, ids=lambda p: p.name)
def test_host_file_syntax(source, stand_in_includes):
    cuda_includes = _nvcc_include_dirs()
    assert cuda_includes, "could not find cuda_runtime_api.h next to nvcc"
    includes = [f"-I{stand_in_includes}"] + [a for d in TORCH_INCLUDES + cuda_includes for a in ("-isystem", d)]
    cmd = [CXX, "-fsyntax-only", "-std=c++20", "-Wall", "-Wextra", "-DFBFAST_WITH_CUDA", *includes, str(source)]
    out = _run(cmd)
    log = out.stdout + out.stderr
    assert out.returncode == 0, f"{source.name} does not compile:\n{' '.join(cmd)}\n{log}"
    assert not _project_warnings(log), f"warnings in {source.name}:\n{log}"


# ---------------------------------------------------------------------------------------------
# 3. the kernels under host emulation, against the reference

EMULATION = CUDA_SRC / "emulation" / "emulate_rollout.cpp"
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def _sanitizer_flags(tmp: Path) -> list[str]:
    probe = tmp / "probe.cpp"
    probe.write_text("int main() { return 0; }\n")
    ok = _run([CXX, "-fsanitize=thread", str(probe), "-o", str(tmp / "probe")], timeout=60).returncode == 0
    return ["-fsanitize=thread"] if ok else []


@pytest.fixture(scope="module")
def emulator(tmp_path_factory) -> Path:
    if CXX is None:
        pytest.skip("no C++ compiler")
    tmp = tmp_path_factory.mktemp("emulation")
    exe = tmp / "emulate_rollout"
    includes = [a for d in cpp_extension.include_paths()[:1] for a in ("-isystem", d)]
    cmd = [CXX, "-std=c++20", "-O1", "-g", "-pthread", "-Wall", "-Wextra", "-Wno-unknown-pragmas",
           *_sanitizer_flags(tmp), *includes, str(EMULATION), "-o", str(exe)]
    out = _run(cmd)
    log = out.stdout + out.stderr
    assert out.returncode == 0, f"the host emulation does not build:\n{' '.join(cmd)}\n{log}"
    assert not _project_warnings(log), f"warnings in the kernels (host build):\n{log}"
    return exe


def _emulate(exe: Path, p, grad_y: torch.Tensor, mask, num_sms: int, smem: int, dtype):
    """Runs the emulated forward + backward; returns (y, [grad or None] * 6) as float32 and the plan."""
    k, B, O = p.x0.shape
    H, T = p.w2.shape[1], p.steps
    du = p.u.shape[2] if p.u is not None else 0
    header = [_DTYPE_CODE[dtype], B, T, du, O, H, p.delay, p.truncate or 0, p.u is not None,
              p.b1 is not None, p.b2 is not None, num_sms, smem, *map(int, mask)]
    tensors = (p.x0, p.u, p.w1, p.b1, p.w2, p.b2)
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.bin", Path(tmp) / "out.bin"
        with open(src, "wb") as f:
            f.write(np.asarray(header, dtype=np.int64).tobytes())
            for t in (*tensors, grad_y):
                if t is not None:
                    f.write(t.detach().to(torch.float32).contiguous().numpy().tobytes())
        out = subprocess.run([str(exe), str(src), str(dst)], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"emulation failed (rc {out.returncode}):\n{out.stdout}\n{out.stderr}"
        data = torch.from_numpy(np.fromfile(dst, dtype=np.float32))
    y, offset = data[: T * B * O].reshape(T, B, O), T * B * O
    got = []
    for t, m in zip(tensors, mask):
        if m and t is not None:
            got.append(data[offset: offset + t.numel()].reshape(t.shape))
            offset += t.numel()
        else:
            got.append(None)
    assert offset == data.numel()
    return y, got, out.stdout


def _max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if b.numel() == 0:
        return 0.0
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-6)).item()


# (B, Du, O, H, T, delay, truncate, bias, num_sms, smem_bytes): the pretend device picks the
# plan, so the cases cover one-row tiles (rows_per_item 1) and 4-row blocking with a partial last
# tile, persistent blocks that take several tiles, staging chunks shorter than T, delay > T,
# H = 0, and the multi-block gradient reduction.
EMULATED_CASES = [
    (1, 8, 2, 5, 7, 1, None, True, 4, 48 << 10),      # the seed's NARX shape, one block
    (7, 0, 3, 5, 9, 2, 3, True, 1, 48 << 10),         # 8-row tile, 7 valid rows
    (130, 3, 3, 6, 6, 3, 1, True, 1, 48 << 10),       # 64-row tiles, 2 blocks for 3 tiles
    (13, 5, 4, 9, 40, 1, 3, False, 3, 48 << 10),      # T > chunk (32)
    (20, 2, 6, 33, 70, 2, None, True, 5, 24 << 10),   # small smem: 4-row tiles, chunk 16
    (9, 2, 5, 7, 3, 5, None, True, 2, 48 << 10),      # delay > steps
    (9, 0, 5, 0, 5, 2, None, True, 2, 48 << 10),      # H = 0: y = b2
    (5, 0, 3, 6, 8, 1, None, True, 8, 48 << 10),      # one-row tiles, several blocks
]


@pytest.mark.parametrize("case", EMULATED_CASES, ids=lambda c: "B{}-Du{}-O{}-H{}-T{}-k{}-K{}".format(*c[:7]))
def test_emulated_kernels_match_reference(emulator, case):
    B, Du, O, H, T, delay, truncate, bias, num_sms, smem = case
    _check_emulated(emulator, B, Du, O, H, T, delay, truncate, bias, num_sms, smem, torch.float32)


@pytest.mark.parametrize("mask", [(0, 1, 0, 1, 1, 0), (1, 0, 1, 0, 0, 1), (0,) * 6])
def test_emulated_output_mask(emulator, mask):
    _check_emulated(emulator, 8, 1, 2, 3, 5, 2, 2, True, 2, 48 << 10, torch.float32, mask=mask)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_emulated_low_precision(emulator, dtype):
    _check_emulated(emulator, 33, 4, 3, 8, 10, 2, None, True, 4, 48 << 10, dtype)


def _check_emulated(exe, B, Du, O, H, T, delay, truncate, bias, num_sms, smem, dtype,
                    mask=(1, 1, 1, 1, 1, 1)):
    # Inputs rounded to `dtype` once; the reference then runs them in float64 (exact).
    p = make_problem(B, Du, O, H, T, delay=delay, truncate=truncate, bias=bias,
                     dtype=dtype, requires_grad=False)
    gen = torch.Generator().manual_seed(1)
    grad_y = torch.randn(T, B, O, generator=gen).to(dtype)
    mask = tuple(m and t is not None for m, t in zip(mask, (p.x0, p.u, p.w1, p.b1, p.w2, p.b2)))
    y, got, plan = _emulate(exe, p, grad_y, mask, num_sms, smem, dtype)

    def run(run_dtype):
        ins = [None if t is None else t.to(run_dtype).requires_grad_(bool(m))
               for t, m in zip((p.x0, p.u, p.w1, p.b1, p.w2, p.b2), mask)]
        y_ref = fbfast.rollout_reference(ins[0], ins[2], ins[3], ins[4], ins[5], T, ins[1], delay, truncate)
        wanted = [t for t in ins if t is not None and t.requires_grad]
        g = iter(grads(y_ref, wanted, grad_y.to(run_dtype)) if wanted else ())
        return [y_ref.detach()] + [next(g) if t is not None and t.requires_grad else None for t in ins]

    exact = run(torch.float64)
    # float32: a fixed bound; 16-bit: at most twice the error of the eager reference run in that
    # dtype (the rule of tests/test_cuda.py), plus a little slack for tiny problems.
    eager = run(dtype) if dtype != torch.float32 else None
    names = ("y", "x0", "u", "w1", "b1", "w2", "b2")
    for i, (name, a, b) in enumerate(zip(names, [y] + got, exact)):
        if b is None:
            assert a is None, f"{name}: not asked for, but returned"
            continue
        assert a is not None and torch.isfinite(a).all(), f"{name}: missing or not finite\n{plan}"
        err = _max_rel_err(a, b)
        if eager is None:
            assert err < 1e-4, f"{name}: relative error {err:.2e}\n{plan}"
        else:
            bound = 2 * _max_rel_err(eager[i], b) + 2e-3
            assert err <= bound, f"{name}: error {err:.2e} > {bound:.2e} ({dtype})\n{plan}"
