"""Checks of the CUDA backend that run without a GPU (docs/spec.md §5).

1. Every ``csrc/cuda/*.cu`` compiles with this machine's nvcc for sm_80 and sm_90 against the
   installed torch's headers, with torch's own nvcc flags, and with no warning from the
   project's code (ptxas register-spill warnings included). Skipped when nvcc is not on PATH.
2. Every ``csrc/cuda/*.cpp`` (host code, compiled by the C++ compiler into the extension)
   passes ``g++ -fsyntax-only -Wall -Wextra`` with the CUDA headers, warning-free.
3. The kernels themselves, compiled for the host by ``csrc/cuda/emulation/`` (one thread per
   CUDA thread, a barrier per block, ThreadSanitizer when the compiler has it), match
   ``fbfast.rollout_reference`` in float64 for every activation and depths 1-4, in every mode
   (delay, truncate, u, biases, output masks, 16-bit dtypes), for the feedback structures of
   docs/spec.md §1.2 (several lags, F < O, residual, with truncation) and for ensembles (§1.3,
   own and shared x0 / u), through the same launch plan as on a GPU, and report no data race,
   no unbalanced barrier and no shared-memory overrun. This is what lets the kernels'
   indexing be tested on the project's GPU-less machines; the real-GPU checks are in
   tests/test_cuda.py.

The CPU torch wheel lacks the generated ``c10/cuda/impl/cuda_cmake_macros.h``; a two-line
stand-in is put on the include path.
"""

from __future__ import annotations

import itertools
import math
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
from torch import nn
from torch.utils import cpp_extension

import fbfast
from testing import load_script

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
# 3. the kernels under host emulation, against a float64 reference

EMULATION = CUDA_SRC / "emulation" / "emulate_rollout.cpp"
ACTIVATION_HEADER = ROOT / "csrc" / "common" / "act_kind.h"
_DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

# Every activation of docs/spec.md §1.1 with the parameter these tests give it (leaky_relu's
# slope, elu's alpha) and the `activation` argument that gives fbfast.rollout_reference the same.
ACTIVATIONS = {
    "relu": (0.0, "relu"),
    "leaky_relu": (0.2, nn.LeakyReLU(0.2)),
    "elu": (0.7, nn.ELU(0.7)),
    "tanh": (0.0, "tanh"),
    "sigmoid": (0.0, "sigmoid"),
    "silu": (0.0, "silu"),
    "gelu": (0.0, "gelu"),
    "gelu_tanh": (0.0, "gelu_tanh"),
    "mish": (0.0, "mish"),
}


def _activation_codes() -> dict:
    """name -> the kernels' fbfast::Act value: the index in kActNames of csrc/common/act_kind.h."""
    match = re.search(r"kActNames\[kNumActs\]\s*=\s*\{([^}]*)\}", ACTIVATION_HEADER.read_text())
    assert match, f"no kActNames table in {ACTIVATION_HEADER}"
    return {name: i for i, name in enumerate(re.findall(r'"(\w+)"', match.group(1)))}


ACT_CODES = _activation_codes()


def test_activation_table_matches_the_header():
    assert set(ACT_CODES) == set(ACTIVATIONS)


class Net:
    """A random rollout problem: x0 (D, [E,] B, F), u (T, [E,] B, Du) or None, weights[l]
    ([E,] out_l, in_l) scaled ~1/sqrt(in_l) so that long rollouts stay bounded, biases[l]
    ([E,] out_l) or None; every tensor rounded to `dtype` once, so the kernel and the float64
    reference see the same values.

    The feedback structure of docs/spec.md §1.2: `delay` is one lag or the lags in order (D their
    maximum), `feedback` F (None: every output), `residual`. `ensemble=E` makes E members
    (docs/spec.md §1.3), x0 and u each their own or, with shared_x0 / shared_u, shared. With the
    defaults (one lag, F = O, one network) the draws are those of version 1's cases."""

    def __init__(self, B, Du, widths, T, delay=1, truncate=None, bias=True, activation="relu",
                 dtype=torch.float32, seed=0, feedback=None, residual=False, ensemble=None,
                 shared_x0=False, shared_u=False, tensor_cores=True):
        g = torch.Generator().manual_seed(seed)

        def rnd(*shape, scale=1.0):
            return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

        widths = tuple(widths)
        O = widths[-1]
        self.lags = (delay,) if isinstance(delay, int) else tuple(delay)
        F = O if feedback is None else feedback
        members = () if ensemble is None else (ensemble,)
        ins = (Du + len(self.lags) * F,) + widths[:-1]
        has_bias = bias if isinstance(bias, tuple) else (bias,) * len(widths)
        self.x0 = rnd(max(self.lags), *(() if shared_x0 else members), B, F)
        self.u = rnd(T, *(() if shared_u else members), B, Du) if Du else None
        self.weights = [rnd(*members, out, n, scale=0.9 / max(1, n) ** 0.5) for out, n in zip(widths, ins)]
        self.biases = [rnd(*members, out, scale=0.1) if b else None for out, b in zip(widths, has_bias)]
        self.widths, self.steps, self.delay, self.truncate = widths, T, max(self.lags), truncate
        self.activation, self.dtype = activation, dtype
        self.batch, self.du, self.feedback, self.residual = B, Du, F, residual
        self.ensemble, self.shared_x0, self.shared_u = ensemble, shared_x0, shared_u
        self.tensor_cores = tensor_cores  # allowed (the plan decides), as cuda_tensor_cores="auto"

    @property
    def y_shape(self):
        return (self.steps, *(() if self.ensemble is None else (self.ensemble,)), self.batch, self.widths[-1])

    @property
    def structure(self) -> dict:
        """The structure as scripts/gpu_smoke.py's plan_rollout takes it."""
        return dict(lags=self.lags, feedback=self.feedback, residual=self.residual, members=self.ensemble or 1,
                    tensor_cores=self.tensor_cores)

    def tensors(self):
        """x0, u, w_1 .. w_L, b_1 .. b_L: the order of the operator's output_mask."""
        return [self.x0, self.u, *self.weights, *self.biases]


def _reference(net: Net, tensors) -> torch.Tensor:
    """Y of docs/spec.md §1 from fbfast.rollout_reference, in the dtype of `tensors` (Net.tensors
    order)."""
    L = len(net.widths)
    x0, u, weights, biases = tensors[0], tensors[1], tensors[2:2 + L], tensors[2 + L:]
    params = [t for pair in zip(weights, biases) for t in pair]
    return fbfast.rollout_reference(x0, *params, steps=net.steps, u=u,
                                    delay=net.lags[0] if len(net.lags) == 1 else net.lags, truncate=net.truncate,
                                    activation=ACTIVATIONS[net.activation][1], feedback=net.feedback,
                                    residual=net.residual)


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


def _emulate(exe: Path, net: Net, grad_y: torch.Tensor, mask, num_sms: int, smem: int):
    """Runs the emulated forward + backward; returns y, the gradients in Net.tensors order (None
    where not asked for), as float32, and the plans the emulator printed."""
    T, L = net.steps, len(net.widths)
    header = [_DTYPE_CODE[net.dtype], ACT_CODES[net.activation], net.batch, T, net.du, L, net.delay,
              net.truncate or 0, net.u is not None, num_sms, smem, len(net.lags), net.feedback, net.residual,
              net.ensemble or 0, net.shared_x0, net.shared_u, net.tensor_cores]
    tail = [*net.widths, *(b is not None for b in net.biases), *map(int, mask), *net.lags]
    tensors = net.tensors()
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp) / "in.bin", Path(tmp) / "out.bin"
        with open(src, "wb") as f:
            f.write(np.asarray(header, dtype=np.int64).tobytes())
            f.write(np.asarray([ACTIVATIONS[net.activation][0]], dtype=np.float64).tobytes())
            f.write(np.asarray(tail, dtype=np.int64).tobytes())
            for t in (*tensors, grad_y):
                if t is not None:
                    f.write(t.detach().to(torch.float32).contiguous().numpy().tobytes())
        out = subprocess.run([str(exe), str(src), str(dst)], capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, f"emulation failed (rc {out.returncode}):\n{out.stdout}\n{out.stderr}"
        data = torch.from_numpy(np.fromfile(dst, dtype=np.float32))
    y = data[: math.prod(net.y_shape)].reshape(net.y_shape)
    offset = y.numel()
    got = []
    for t, m in zip(tensors, mask):
        if m and t is not None:
            got.append(data[offset: offset + t.numel()].reshape(t.shape))
            offset += t.numel()
        else:
            got.append(None)
    assert offset == data.numel()
    return y, got, out.stdout


def _load_gpu_smoke():
    """scripts/gpu_smoke.py, by path (scripts/ is no package): its Python mirror of plan_rollout
    sizes the GPU tests' problems, and is checked here against the plans the kernels' own header
    computes (the emulator prints them)."""
    return load_script(ROOT / "scripts" / "gpu_smoke.py", "fbfast_gpu_smoke")


smoke = _load_gpu_smoke()


def _check_plan_mirror(net: Net, num_sms: int, smem: int, printed: str):
    """The emulator's "forward rows=4 rows_per_item=4 ..." lines equal the mirror's plans."""
    for line in printed.splitlines():
        direction, *fields = line.split()
        got = {k: int(v) for k, v in (f.split("=") for f in fields)}
        want = smoke.plan_rollout(net.batch, net.steps, net.du, net.widths, net.delay, net.activation,
                                  direction == "backward", num_sms, smem, **net.structure)
        assert want is not None and got == {k: want[k] for k in got}, (
            f"scripts/gpu_smoke.py's plan_rollout disagrees with csrc/cuda/rollout_params.h ({direction}): "
            f"mirror {want}, header {got}")


def _max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    if b.numel() == 0:
        return 0.0
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-6)).item()


def _check_emulated(exe, net: Net, num_sms: int, smem: int, mask=None, fp32_bound: float = 1e-4):
    tensors = net.tensors()
    mask = tuple(bool(m) and t is not None for m, t in zip(mask or (1,) * len(tensors), tensors))
    gen = torch.Generator().manual_seed(1)
    grad_y = torch.randn(net.y_shape, generator=gen).to(net.dtype)
    y, got, plan = _emulate(exe, net, grad_y, mask, num_sms, smem)
    _check_plan_mirror(net, num_sms, smem, plan)

    def run(dtype):
        ins = [None if t is None else t.to(dtype).requires_grad_(m) for t, m in zip(tensors, mask)]
        y_ref = _reference(net, ins)
        wanted = [t for t in ins if t is not None and t.requires_grad]
        g = iter(torch.autograd.grad(y_ref, wanted, grad_y.to(dtype), allow_unused=True) if wanted else ())
        out = [y_ref.detach()]
        for t in ins:
            if t is not None and t.requires_grad:
                d = next(g)
                out.append(torch.zeros_like(t) if d is None else d)
            else:
                out.append(None)
        return out

    exact = run(torch.float64)
    # float32: a fixed bound; 16-bit: at most twice the error of the eager reference run in that
    # dtype (the rule of tests/test_cuda.py), plus a little slack for tiny problems.
    eager = run(net.dtype) if net.dtype != torch.float32 else None
    L = len(net.widths)
    names = ["y", "x0", "u"] + [f"w{l + 1}" for l in range(L)] + [f"b{l + 1}" for l in range(L)]
    for i, (name, a, b) in enumerate(zip(names, [y] + got, exact)):
        if b is None:
            assert a is None, f"{name}: not asked for, but returned"
            continue
        assert a is not None and torch.isfinite(a).all(), f"{name}: missing or not finite\n{plan}"
        err = _max_rel_err(a, b)
        if eager is None:
            assert err < fp32_bound, f"{name}: relative error {err:.2e}\n{plan}"
        else:
            bound = 2 * _max_rel_err(eager[i], b) + 2e-3
            assert err <= bound, f"{name}: error {err:.2e} > {bound:.2e} ({net.dtype})\n{plan}"


# (B, Du, widths, T, delay, truncate, bias, num_sms, smem_bytes): the pretend device picks the
# plan, so the cases cover one-row tiles (rows_per_item 1) and 4-row blocking with a partial last
# tile, persistent blocks that take several tiles, staging chunks shorter than T, delay > T, a
# zero-width hidden layer, and the multi-block gradient reduction. Version 1's network (one
# hidden ReLU layer).
PLAN_CASES = [
    (1, 8, (5, 2), 7, 1, None, True, 4, 48 << 10),      # the seed's NARX shape, one block
    (7, 0, (5, 3), 9, 2, 3, True, 1, 48 << 10),         # 8-row tile, 7 valid rows
    (130, 3, (6, 3), 6, 3, 1, True, 1, 48 << 10),       # 64-row tiles, 2 blocks for 3 tiles
    (13, 5, (9, 4), 40, 1, 3, False, 3, 48 << 10),      # T > chunk (32)
    (20, 2, (33, 6), 70, 2, None, True, 5, 24 << 10),   # small smem: 4-row tiles, chunk 16
    (9, 2, (7, 5), 3, 5, None, True, 2, 48 << 10),      # delay > steps
    (9, 0, (0, 5), 5, 2, None, True, 2, 48 << 10),      # H = 0: y = b2
    (5, 0, (6, 3), 8, 1, None, True, 8, 48 << 10),      # one-row tiles, several blocks
]


def _plan_id(c):
    return "B{}-Du{}-W{}-T{}-k{}-K{}".format(c[0], c[1], "x".join(map(str, c[2])), *c[3:6])


@pytest.mark.parametrize("case", PLAN_CASES, ids=_plan_id)
def test_emulated_plans_match_reference(emulator, case):
    B, Du, widths, T, delay, truncate, bias, num_sms, smem = case
    _check_emulated(emulator, Net(B, Du, widths, T, delay, truncate, bias), num_sms, smem)


# One shape per depth, each with odd widths, a bias missing in some layer and its own plan kind:
# L = 1 (no hidden layer; the forward's extra ring slot) with 3-row tiles; L = 2 with a partial
# 4-row tile and 2 blocks; L = 3 with one 12-row tile and delay 3; L = 4 with T past the staging
# chunk, 2-row tiles and 3 blocks.
DEPTHS = {
    1: dict(B=6, Du=2, widths=(3,), T=11, delay=2, truncate=3, bias=(True,), num_sms=2),
    2: dict(B=7, Du=3, widths=(5, 3), T=9, delay=1, truncate=None, bias=(False, True), num_sms=2),
    3: dict(B=9, Du=0, widths=(7, 5, 2), T=12, delay=3, truncate=4, bias=(True, False, True), num_sms=1),
    4: dict(B=5, Du=4, widths=(9, 6, 7, 3), T=37, delay=2, truncate=5, bias=(True, True, False, True), num_sms=3),
}


@pytest.mark.parametrize("depth", sorted(DEPTHS), ids=lambda L: f"L{L}")
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_emulated_activation_and_depth(emulator, activation, depth):
    c = dict(DEPTHS[depth])
    num_sms = c.pop("num_sms")
    _check_emulated(emulator, Net(**c, activation=activation), num_sms, 48 << 10)


# The mode grid of the foundation (tests/testing.py's MODE_GRID: u on/off, delay 1/2/3, truncate
# None/1/3, bias on/off) for an activation whose derivative reads h (tanh), two layers, 4-row
# tiles with a partial one, and for one that reads z (gelu), three layers, one-row tiles.
MODE_GRID = list(itertools.product((0, 3), (1, 2, 3), (None, 1, 3), (True, False)))


@pytest.mark.parametrize("activation,widths,B", [("tanh", (5, 3), 7), ("gelu", (5, 4, 3), 1)],
                         ids=["tanh-L2-B7", "gelu-L3-B1"])
def test_emulated_mode_grid(emulator, activation, widths, B):
    for Du, delay, truncate, bias in MODE_GRID:
        _check_emulated(emulator, Net(B, Du, widths, 5, delay, truncate, bias, activation), 2, 48 << 10)


@pytest.mark.parametrize("mask", [(0, 1, 0, 1, 1, 1, 0, 1), (1, 0, 1, 0, 0, 0, 1, 0), (0,) * 8])
def test_emulated_output_mask(emulator, mask):
    net = Net(8, 1, (4, 5, 2), 5, 2, 2, True, "silu")
    _check_emulated(emulator, net, 2, 48 << 10, mask=mask)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("activation,widths", [("relu", (8, 3)), ("mish", (8, 6, 3))], ids=["relu-L2", "mish-L3"])
def test_emulated_low_precision(emulator, activation, widths, dtype):
    net = Net(33, 4, widths, 10, 2, None, True, activation, dtype=dtype)
    _check_emulated(emulator, net, 4, 48 << 10)


# ---------------------------------------------------------------------------------------------
# Feedback structures other than version 1's (docs/spec.md §1.2) in the fused kernels: D ring
# slots of F-wide values gathered per step, their adjoints in the backward's ring, x0's adjoints
# written in full from it (rollout_params.h).

# (name, Net keywords, num_sms): each with odd widths and batches and its own plan kind: a
# partial 4-row tile with 2 blocks, one-row tiles with z kept per layer, no hidden layer (one
# GEMM reads x_t and writes y_t), T < D (x0's rows read by few steps; some by none, whose
# gradient must come out zero), T past the staging chunk with several blocks, persistent blocks
# over 64-row tiles, truncate=1, a zero-width hidden layer.
STRUCTURES = [
    ("lags31-F2-residual-K2", dict(B=7, Du=2, widths=(5, 3), T=9, delay=(3, 1), feedback=2, residual=True,
                                   truncate=2, activation="tanh"), 2),
    ("narx123-F1-gelu-L3", dict(B=5, Du=0, widths=(7, 5, 3), T=11, delay=(1, 2, 3), feedback=1,
                                activation="gelu", bias=(True, False, True)), 5),
    ("lag2-residual-L1-K3", dict(B=6, Du=3, widths=(3,), T=8, delay=2, residual=True, truncate=3,
                                 activation="elu"), 2),
    ("lags42-F2-residual-T3", dict(B=6, Du=1, widths=(5, 4), T=3, delay=(4, 2), feedback=2, residual=True), 2),
    ("lag1-F2-T40-K4", dict(B=13, Du=5, widths=(9, 4), T=40, delay=1, feedback=2, truncate=4, bias=False), 3),
    ("lags15-F3-B130", dict(B=130, Du=3, widths=(6, 5), T=7, delay=(1, 5), feedback=3, truncate=3,
                            activation="silu"), 1),
    ("lags213-residual-K1", dict(B=9, Du=2, widths=(6, 4, 3), T=6, delay=(2, 1, 3), residual=True, truncate=1,
                                 activation="mish"), 2),
    ("lags12-F1-H0", dict(B=9, Du=0, widths=(0, 5), T=5, delay=(1, 2), feedback=1, residual=True), 2),
    ("lags51-T2-unread-x0-rows", dict(B=5, Du=2, widths=(6, 3), T=2, delay=(5, 1), feedback=2, residual=True), 2),
]


@pytest.mark.parametrize("name,kw,num_sms", STRUCTURES, ids=[c[0] for c in STRUCTURES])
def test_emulated_feedback_structures(emulator, name, kw, num_sms):
    _check_emulated(emulator, Net(**kw), num_sms, 48 << 10)


# The structure grid: lags one (not version 1's: with F < O or residual), delayed, (3, 1) and a
# tapped delay line (1, 2, 3); F = 2 < O = 3 or every output; residual or not; truncate None, 1,
# 3; with u, two tanh layers, 4-row tiles with a partial one. Version 1's combinations are the
# mode grid above.
STRUCTURE_GRID = [
    (lags, feedback, residual, truncate)
    for lags, feedback, residual, truncate in itertools.product(
        ((1,), (2,), (3, 1), (1, 2, 3)), (None, 2), (False, True), (None, 1, 3))
    if not (len(lags) == 1 and feedback is None and not residual)
]


def test_emulated_structure_grid(emulator):
    for lags, feedback, residual, truncate in STRUCTURE_GRID:
        net = Net(7, 2, (5, 3), 6, lags, truncate, True, "tanh", feedback=feedback, residual=residual)
        _check_emulated(emulator, net, 2, 48 << 10)


# ---------------------------------------------------------------------------------------------
# Ensembles (docs/spec.md §1.3): one launch, a grid row per member, each with its own weights
# and its own or the shared x0 / u; a shared one's gradient is the sum of the members' own.

# (name, Net keywords, num_sms): version 1's feedback and other structures; own and shared x0
# and u in every combination; several blocks per member (the reduction per member) and one block
# per member (gradients written directly); a member count that does not divide the resident
# blocks; E = 1; a one-step rollout.
ENSEMBLES = [
    ("E3-own-lags31-F2-residual", dict(B=5, Du=2, widths=(6, 3), T=7, delay=(3, 1), feedback=2, residual=True,
                                       truncate=2, ensemble=3), 4),
    ("E2-shared-x0-u-v1", dict(B=7, Du=2, widths=(6, 3), T=7, delay=2, truncate=3, ensemble=2, shared_x0=True,
                               shared_u=True), 2),
    ("E3-shared-x0-narx-gelu-L3", dict(B=6, Du=3, widths=(5, 4, 3), T=10, delay=(1, 2, 3), feedback=1, ensemble=3,
                                       shared_x0=True, activation="gelu"), 2),
    ("E2-shared-u-1block", dict(B=3, Du=2, widths=(6, 3), T=7, delay=(2, 1), residual=True, ensemble=2,
                                shared_u=True, activation="silu"), 1),
    ("E5-own-v1-L1", dict(B=9, Du=1, widths=(4,), T=5, delay=1, ensemble=5, activation="sigmoid"), 3),
    ("E1-shared-x0-residual", dict(B=4, Du=0, widths=(5, 3), T=6, delay=3, residual=True, truncate=2, ensemble=1,
                                   shared_x0=True), 2),
    ("E4-shared-u-T35-lags14", dict(B=11, Du=2, widths=(7, 3), T=35, delay=(1, 4), feedback=2, truncate=5,
                                    ensemble=4, shared_u=True, activation="leaky_relu"), 8),
    ("E2-shared-x0-T1-lags13", dict(B=5, Du=2, widths=(6, 3), T=1, delay=(1, 3), feedback=2, residual=True,
                                    ensemble=2, shared_x0=True), 2),
]


@pytest.mark.parametrize("name,kw,num_sms", ENSEMBLES, ids=[c[0] for c in ENSEMBLES])
def test_emulated_ensembles(emulator, name, kw, num_sms):
    _check_emulated(emulator, Net(**kw), num_sms, 48 << 10)


# Output masks with other structures and ensembles: x0's gradient alone (no weight gradient, no
# workspace), weights alone (x0's never written), nothing.
@pytest.mark.parametrize("mask", [(1, 0, 0, 0, 0, 0), (0, 1, 1, 0, 1, 0), (0,) * 6])
@pytest.mark.parametrize("ensemble", [None, 3], ids=["one", "E3-shared-x0"])
def test_emulated_structure_output_mask(emulator, mask, ensemble):
    net = Net(8, 1, (4, 3), 6, (2, 1), 2, True, "tanh", feedback=2, residual=True, ensemble=ensemble,
              shared_x0=ensemble is not None)
    _check_emulated(emulator, net, 2, 48 << 10, mask=mask)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("ensemble", [None, 3], ids=["one", "E3-shared-u"])
def test_emulated_structure_low_precision(emulator, dtype, ensemble):
    net = Net(33, 4, (8, 4), 10, (3, 1), 3, True, "silu", dtype=dtype, feedback=3, residual=True,
              ensemble=ensemble, shared_u=ensemble is not None)
    _check_emulated(emulator, net, 4, 48 << 10)


# ---------------------------------------------------------------------------------------------
# Weight gradients accumulated in global memory (SmemLayout::grads_global): pretend devices
# whose shared memory holds the weights but not the weights and their accumulators too, as an
# H100's does at (256, 0, 64, 256, 100). (name, Net keywords, num_sms, smem bytes): one-row
# tiles over several blocks, 4-row tiles (rows_per_item 4) with a partial one, three layers
# keeping z, and an ensemble with one block per member (a workspace only for this reason).
GRADS_GLOBAL = [
    ("v1-1row-6blocks", dict(B=20, Du=2, widths=(33, 6), T=12, delay=2, truncate=None), 3, 7168),
    ("v1-4row-partial-tile", dict(B=21, Du=2, widths=(65, 6), T=12, delay=2, truncate=3), 2, 16128),
    ("gelu-L3", dict(B=11, Du=3, widths=(17, 13, 5), T=9, delay=2, truncate=None, activation="gelu",
                     bias=(True, False, True)), 2, 7168),
    ("E3-lags31-residual-1block", dict(B=13, Du=2, widths=(21, 4), T=10, delay=(3, 1), feedback=3, residual=True,
                                       ensemble=3, activation="silu"), 2, 4864),
]


@pytest.mark.parametrize("name,kw,num_sms,smem", GRADS_GLOBAL, ids=[c[0] for c in GRADS_GLOBAL])
def test_emulated_weight_gradients_in_global_memory(emulator, name, kw, num_sms, smem):
    net = Net(**kw)
    plan = smoke.plan_rollout(net.batch, net.steps, net.du, net.widths, net.delay, net.activation, True, num_sms,
                              smem, **net.structure)
    assert plan is not None and plan["grads_global"], plan  # the case tests what it says
    _check_emulated(emulator, net, num_sms, smem)


@pytest.mark.parametrize("mask", [(0, 0, 1, 0, 0, 1), (1, 1, 0, 0, 0, 0)], ids=["w1-b2", "x0-u"])
def test_emulated_global_accumulators_with_masks(emulator, mask):
    """Some weight gradients (the others' rows stay zero, never reduced), or none (no workspace)."""
    _check_emulated(emulator, Net(B=20, Du=2, widths=(33, 6), T=12, delay=2, truncate=4), 3, 7168, mask=mask)


# ---------------------------------------------------------------------------------------------
# Tensor cores (rollout_params.h: Du, m F and every width in whole 16-wide tiles, and tiles of
# whole 16-row groups both ways): every GEMM of both directions through the 3xTF32 tile GEMM of
# tile_common.cuh, run on the emulated nvcuda::wmma of host_emulation.h (which checks the loads'
# 32-byte alignment and spreads fragments over lanes in an order of its own).

# (name, Net keywords, num_sms, smem): version 1's network with u and truncation; a deeper GELU
# network (z kept per layer) with 48-row tiles, the last one partial, over persistent blocks;
# two lags, F < O and a residual skip; an ensemble with a shared x0; one layer; a delta model
# (one lag, residual: the forward reads x_t in place from its ring slot); bfloat16.
TENSOR_CORES = [
    ("v1-relu-u-K3", dict(B=32, Du=16, widths=(32, 16), T=6, delay=2, truncate=3), 2, 48 << 10),
    ("gelu-L3-R48-partial", dict(B=70, Du=0, widths=(16, 32, 16), T=5, delay=1, activation="gelu"), 2, 96 << 10),
    ("lags21-F16-residual-silu", dict(B=16, Du=16, widths=(48, 32), T=7, delay=(2, 1), feedback=16, residual=True,
                                      truncate=2, activation="silu"), 1, 96 << 10),
    ("E2-shared-x0-tanh", dict(B=16, Du=0, widths=(32, 16), T=5, delay=2, ensemble=2, shared_x0=True,
                               activation="tanh"), 2, 48 << 10),
    ("L1-u", dict(B=16, Du=16, widths=(16,), T=5, delay=1), 1, 48 << 10),
    ("delta-model-residual-x-in-place", dict(B=16, Du=16, widths=(32, 16), T=6, delay=1, residual=True,
                                             activation="silu"), 1, 48 << 10),
    ("v1-bf16", dict(B=32, Du=16, widths=(32, 16), T=6, delay=2, dtype=torch.bfloat16), 2, 48 << 10),
]


@pytest.mark.parametrize("name,kw,num_sms,smem", TENSOR_CORES, ids=[c[0] for c in TENSOR_CORES])
def test_emulated_tensor_cores(emulator, name, kw, num_sms, smem):
    net = Net(**kw)
    for backward in (False, True):
        plan = smoke.plan_rollout(net.batch, net.steps, net.du, net.widths, net.delay, net.activation, backward,
                                  num_sms, smem, **net.structure)
        assert plan is not None and plan["tensor_cores"] and plan["rows"] % 16 == 0, plan
    # 3xTF32 keeps close to fp32 (the fp32 kernels reach ~1e-6 here); one TF32 product per term,
    # or a missed split, gives ~1e-3 and fails.
    _check_emulated(emulator, net, num_sms, smem, fp32_bound=2e-5)


def test_emulated_tensor_cores_propagate_inf_and_nan(emulator):
    # An Inf in u and a NaN in x0 on the tensor-core path: the slices holding them take hi hi
    # alone (tile_gemm_tc), so Y has NaN and Inf exactly where the reference has them (ReLU lets
    # the Inf through); the other rows of those 16-row tiles keep TF32's precision in those slices.
    net = Net(B=32, Du=16, widths=(32, 16), T=4, delay=1, activation="relu")
    net.u[1, 3, 5] = float("inf")
    net.x0[0, 7, 2] = float("nan")
    plan = smoke.plan_rollout(net.batch, net.steps, net.du, net.widths, net.delay, net.activation, False, 2,
                              48 << 10, **net.structure)
    assert plan["tensor_cores"], plan
    y, _, _ = _emulate(emulator, net, torch.zeros(net.y_shape), (1,) * 6, 2, 48 << 10)
    ref = _reference(net, [t if t is None else t.double() for t in net.tensors()])
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.isnan(y).any()
    assert torch.equal(torch.isinf(y), torch.isinf(ref))
    finite = torch.isfinite(ref)
    assert finite.any() and torch.allclose(y[finite].double(), ref[finite], rtol=1e-2, atol=1e-3)


def test_tensor_cores_only_where_both_directions_allow():
    """The plans use tensor cores alike in both directions (the backward recomputes z with the
    forward's arithmetic), and never where a width, the tile rows, or the setting rule them out."""
    def plans(B, Du, widths, num_sms, smem=48 << 10, **kw):
        return [smoke.plan_rollout(B, 5, Du, widths, 1, "relu", backward, num_sms, smem, **kw)["tensor_cores"]
                for backward in (False, True)]
    assert plans(32, 16, (32, 16), 2) == [1, 1]
    assert plans(32, 16, (32, 16), 2, tensor_cores=False) == [0, 0]  # cuda_tensor_cores="off"
    assert plans(32, 16, (33, 16), 2) == [0, 0]     # a width off the 16-grid
    assert plans(32, 8, (32, 16), 2) == [0, 0]      # Du off the grid
    assert plans(32, 16, (32, 16), 4) == [0, 0]     # 8-row tiles
    # Room for 16-row tensor-core tiles forward but not backward: neither direction uses them.
    smem, structure = 80896, dict(lags=None, feedback=None, residual=False, grads_global=False, tensor_cores=True)
    rows = [smoke._plan_rows(16, 5, 0, (256, 16), 1, "relu", backward, 1, smem // 4, 1, structure)
            for backward in (False, True)]
    assert rows[0] == 16 and rows[1] < 16, rows  # the case tests what it says
    assert plans(16, 0, (256, 16), 1, smem) == [0, 0]
