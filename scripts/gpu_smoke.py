#!/usr/bin/env python3
"""Smoke run of fbfast's CUDA kernels: one small case per kind of launch plan, in its own process.

    CUDA_LAUNCH_BLOCKING=1 python3 scripts/gpu_smoke.py [--only WORD ...] [--json PATH]
    python3 scripts/gpu_smoke.py --plans [--pretend-sms 132 --pretend-smem 232448]
    python3 scripts/gpu_smoke.py --simulate-cpu    # this script's own logic, on a CPU

scripts/gpu_check.sh runs this first, before pytest: a device fault (an illegal address, a
launch that asks for more shared memory than the device grants) poisons the CUDA context of the
whole process, and in a pytest run every later test then fails with the same error, naming
none of the cases that caused it. Here each case's name and plan are printed (and flushed)
before it runs, so the last name in the log is the culprit even when the process dies, and its
max error against ``fbfast.rollout_reference`` in float64 after. The reference runs on the CPU,
so that under compute-sanitizer almost every instrumented kernel is one of fbfast's own.

The cases are sized from the device's own SM count and opt-in shared memory, through the
Python mirror of ``plan_rollout`` below, so that each plan kind is really hit on this GPU:
1-row and 4-row tiles with a partial last tile, several blocks (the ordered gradient
reduction), persistent blocks (more tiles than blocks), a forward plan above the 48 KB that
needs the opt-in, staged chunks shorter than T, delay > 1 with truncation, bfloat16 and
float16, the feedback structures (lags, partial feedback, residual) and ensembles (own and shared
x0 / u, persistent blocks per member), and the general path (pinned, and chosen by "auto" for a
width that does not fit).

Exit status: 0 every case within its bound; 1 a case out of bound or raising a Python error;
2 a CUDA error (the cases after it are not run: the context is unusable); 77 no GPU; 78 a GPU,
but fbfast was built without its CUDA kernel.

``--json PATH`` rewrites PATH before and after every case, so a process that dies mid-case still
leaves the results so far and the name of the case that was running.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import traceback
from typing import Callable, Dict, List, Optional, Sequence, Tuple

if __name__ == "__main__":
    # Read by the driver when the CUDA context is created: every launch then returns only once
    # the kernel has finished, and a fault is reported by the launch that caused it.
    os.environ.setdefault("CUDA_LAUNCH_BLOCKING", "1")
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

EXIT_OK, EXIT_FAILED, EXIT_CUDA_ERROR, EXIT_NO_GPU, EXIT_NO_KERNEL = 0, 1, 2, 77, 78

# ---------------------------------------------------------------------------------------------
# Python mirror of plan_rollout (csrc/cuda/rollout_params.h). The extension does not report the
# plan it takes, so the tests (tests/test_cuda.py) and the cases below size their problems with
# these same formulas; keep them in step with the header. tests/test_cuda.py also compares them
# with the grid, block and shared memory of the launches that the profiler records.

K_MAX_THREADS = 256
K_MAX_ROWS = 64
K_MAX_CHUNK = 32
K_STAGE_BUDGET_FLOATS = 8192
K_BLOCKS_PER_SM = 2
K_MAX_LAYERS = 8
K_MAX_LAGS = 16
K_MAX_MEMBERS = 65535
DEFAULT_SMEM_BYTES = 48 * 1024  # a launch above this needs cudaFuncAttributeMaxDynamicSharedMemorySize
K_TC_TILE = 16
K_TC_SCRATCH_FLOATS = (K_MAX_THREADS // 32) * K_TC_TILE * K_TC_TILE


def _round_up4(n: int) -> int:
    return (n + 3) & ~3


def _weight_ld(n: int) -> int:
    return n + (36 - n % 32) % 32


def _ceil_div(a: int, b: int) -> int:
    return (a + b - 1) // b


# The activations whose derivative reads the pre-activation z (act_needs_z in
# csrc/common/act_kind.h): the fused backward keeps z of every hidden layer for them.
NEEDS_Z = {"leaky_relu", "elu", "silu", "gelu", "gelu_tanh", "mish"}


def _structure(widths: Sequence[int], delay: int, lags: Optional[Sequence[int]], feedback: Optional[int],
               residual: bool):
    """(m, F, plain) of a feedback structure (Dims in csrc/cuda/rollout_params.h): plain is version
    1's feedback (one lag, every output fed back, no residual), which keeps version 1's layout."""
    m = 1 if lags is None else len(lags)
    f = widths[-1] if feedback is None else feedback
    return m, f, m == 1 and f == widths[-1] and not residual


def make_layout(steps: int, du: int, widths: Sequence[int], delay: int, activation: str, rows: int, chunk: int,
                backward: bool, lags: Optional[Sequence[int]] = None, feedback: Optional[int] = None,
                residual: bool = False, grads_global: bool = False, tensor_cores: bool = False) -> Dict[str, int]:
    """SmemLayout's slots and total (in floats) of make_layout(); widths are out_0 .. out_{L-1};
    delay is D = max(lags) (lags None: the one lag delay). grads_global: the backward's weight
    gradients accumulate in global memory, not in shared memory; tensor_cores: the layout has
    the per-warp result tiles of the tensor-core GEMM."""
    L, o = len(widths), widths[-1]
    m, f, plain = _structure(widths, delay, lags, feedback, residual)
    fed = min(delay, steps)
    slots = delay if not plain else fed + 1 if not backward and L == 1 and delay < steps else fed
    du_pad, o_pad, x_pad = _round_up4(du), _round_up4(o), _round_up4(m * f)
    ring_pad = o_pad if plain else _round_up4(f)
    in_pad = [du_pad + x_pad] + [_round_up4(w) for w in widths[:-1]]
    out_pad = [_round_up4(w) for w in widths]
    act_pad = max([out_pad[l] for l in range(L) if backward or l < L - 1], default=0)
    act_buffers = min(L, 2) if backward else min(L - 1, 2)
    R, S, bw = rows, chunk, int(backward)
    keep_pre = int(backward and activation in NEEDS_Z)
    x_buf = R * x_pad if not backward and not plain else 0
    total = (slots * R * ring_pad + S * R * du_pad + x_buf + bw * S * R * (x_pad + o_pad)
             + act_buffers * R * act_pad)
    for l in range(L):
        hidden = int(l < L - 1)
        weights = out_pad[l] * _weight_ld(in_pad[l])
        total += (bw + keep_pre) * hidden * R * out_pad[l] + weights + (1 - bw * (1 - hidden)) * out_pad[l]
        if not grads_global:
            total += bw * (weights + out_pad[l])
    total += K_TC_SCRATCH_FLOATS if tensor_cores else 0
    return {"rows": rows, "chunk": chunk, "slots": slots, "total": total}


def _plan_rows(B, steps, du, widths, delay, activation, backward, num_sms, limit, members, structure) -> int:
    """plan_rows(): one direction's tile rows (0: not even one row fits)."""
    def fits(rows: int) -> bool:
        return make_layout(steps, du, widths, delay, activation, rows, 1, backward, **structure)["total"] <= limit

    rows = min(_ceil_div(B * members, num_sms if num_sms > 0 else 1), B)
    rows = max(1, min(K_MAX_ROWS, rows))
    if rows >= 4:
        rows = _round_up4(rows)
    if structure.get("tensor_cores") and rows >= K_TC_TILE:
        rows = _ceil_div(rows, K_TC_TILE) * K_TC_TILE
    while not fits(rows):
        if rows == 1:
            return 0
        if structure.get("tensor_cores") and rows > K_TC_TILE:
            rows = max(K_TC_TILE, (rows // 2) & ~(K_TC_TILE - 1))
        else:
            rows = (rows // 2) & ~3 if rows > 4 else rows // 2
    return rows


def plan_rollout(B: int, steps: int, du: int, widths: Sequence[int], delay: int, activation: str, backward: bool,
                 num_sms: int, smem_limit_bytes: int, lags: Optional[Sequence[int]] = None,
                 feedback: Optional[int] = None, residual: bool = False,
                 members: int = 1, tensor_cores: bool = True) -> Optional[Dict[str, int]]:
    """The fused plan of plan_rollout(), or None where it takes the general path. ``blocks`` and
    ``tiles`` are per member: an ensemble's grid is blocks x members. ``tensor_cores``: whether
    they are allowed (the extension's default, cuda_tensor_cores="auto"); the plan's own
    ``tensor_cores`` says whether it uses them (tensor_cores_fit)."""
    m, f, _ = _structure(widths, delay, lags, feedback, residual)
    if len(widths) > K_MAX_LAYERS or not 1 <= m <= K_MAX_LAGS or not 1 <= members <= K_MAX_MEMBERS:
        return None
    limit = smem_limit_bytes // 4
    structure = dict(lags=lags, feedback=feedback, residual=residual)
    # The weight-gradient accumulators leave shared memory only when not even a one-row tile fits.
    global_bwd = make_layout(steps, du, widths, delay, activation, 1, 1, True, **structure)["total"] > limit
    grads_global = backward and global_bwd
    # Tensor cores: widths in whole 16-wide tiles, and tiles of whole 16-row groups both ways.
    tc = tensor_cores and all(w % K_TC_TILE == 0 for w in (du, m * f, *widths))
    for direction in (False, True) if tc else ():
        rows = _plan_rows(B, steps, du, widths, delay, activation, direction, num_sms, limit, members,
                          dict(structure, grads_global=direction and global_bwd, tensor_cores=True))
        tc = tc and rows >= K_TC_TILE and rows % K_TC_TILE == 0
    structure.update(grads_global=grads_global, tensor_cores=tc)

    def fits(rows: int, chunk: int) -> bool:
        return make_layout(steps, du, widths, delay, activation, rows, chunk, backward, **structure)["total"] <= limit

    rows = _plan_rows(B, steps, du, widths, delay, activation, backward, num_sms, limit, members, structure)
    if rows == 0:
        return None

    o = widths[-1]
    stage_per_step = rows * (_round_up4(du) + _round_up4(m * f) + _round_up4(o) if backward else _round_up4(du))
    chunk = 1
    if stage_per_step > 0:
        chunk = min(steps, K_MAX_CHUNK)
        chunk = max(1, min(chunk, K_STAGE_BUDGET_FLOATS // stage_per_step))
        while chunk > 1 and not fits(rows, chunk):
            chunk //= 2

    rows_per_item = 4 if rows % 4 == 0 and not tc else 1
    ins = [du + m * f] + list(widths[:-1])
    widest = max(max(widths), max(ins) if backward else 0)
    work = (rows // rows_per_item) * widest
    if backward:
        work = max(work, sum(w * i for w, i in zip(widths, ins)) // 8)
    work = (work + 31) // 32 * 32
    tiles = _ceil_div(B, rows)
    share = max(1, max(num_sms, 1) * K_BLOCKS_PER_SM // members)
    lay = make_layout(steps, du, widths, delay, activation, rows, chunk, backward, **structure)
    return {"rows": rows, "rows_per_item": rows_per_item, "chunk": chunk, "slots": lay["slots"],
            "threads": max(32, min(K_MAX_THREADS, work)), "tiles": tiles,
            "blocks": min(tiles, share), "smem_bytes": 4 * lay["total"], "grads_global": int(grads_global),
            "tensor_cores": int(tc)}


def device_limits(device=None) -> Dict[str, int]:
    """SM count and opt-in shared memory per block of a CUDA device, as the extension reads them
    (cudaDevAttrMultiProcessorCount, cudaDevAttrMaxSharedMemoryPerBlockOptin)."""
    props = torch.cuda.get_device_properties(torch.cuda.current_device() if device is None else device)
    optin = getattr(props, "shared_memory_per_block_optin", None)
    if not optin:  # older torch: the opt-in limit of the architecture (CUDA programming guide)
        optin = {(8, 0): 163 << 10, (8, 7): 163 << 10, (9, 0): 227 << 10, (10, 0): 227 << 10}.get(
            (props.major, props.minor), 99 << 10)
    return {"sms": props.multi_processor_count, "smem_optin": int(optin),
            "name": props.name, "capability": f"{props.major}.{props.minor}"}


# ---------------------------------------------------------------------------------------------
# Problems sized so that the plan on this device is of a given kind. Each returns the problem's
# sizes; `plans_of` gives the mirrored forward and backward plans.

@dataclasses.dataclass
class Shape:
    """A rollout's sizes: ``layers`` linear layers, every hidden one ``H`` wide, with
    ``activation`` (a name of csrc/common/act_kind.h) after each. The feedback structure of
    docs/spec.md §1.2: ``lags`` (None: the one lag ``delay``), ``feedback`` F (None: every
    output) and ``residual``; ``ensemble`` E members (docs/spec.md §1.3, None: one network) with
    x0 / u shared by them or each member's own."""

    B: int
    Du: int
    O: int
    H: int
    T: int
    delay: int = 1
    truncate: Optional[int] = None
    bias: bool = True
    layers: int = 2
    activation: str = "relu"
    lags: Optional[Tuple[int, ...]] = None
    feedback: Optional[int] = None
    residual: bool = False
    ensemble: Optional[int] = None
    shared_x0: bool = False
    shared_u: bool = False

    def __post_init__(self):
        if self.lags is not None:
            self.delay = max(self.lags)

    def __repr__(self) -> str:
        # The fields past T only where they differ from their default, so that a log line stays short.
        fields = [(f.name, getattr(self, f.name)) for f in dataclasses.fields(self)]
        shown = [f"{n}={v!r}" for i, (n, v) in enumerate(fields)
                 if i < 5 or v != dataclasses.fields(self)[i].default]
        return f"Shape({', '.join(shown)})"

    @property
    def widths(self) -> List[int]:
        """out_l of every layer: H for the hidden ones, then O."""
        return [self.H] * (self.layers - 1) + [self.O]

    @property
    def F(self) -> int:
        return self.O if self.feedback is None else self.feedback

    @property
    def lag_tuple(self) -> Tuple[int, ...]:
        return (self.delay,) if self.lags is None else tuple(self.lags)

    @property
    def members(self) -> Tuple[int, ...]:
        """() for one network, (E,) for an ensemble: the member axis of the tensors."""
        return () if self.ensemble is None else (self.ensemble,)

    def structure(self) -> Dict:
        """The feedback keywords of fbfast.rollout."""
        return dict(delay=self.delay if self.lags is None else tuple(self.lags), feedback=self.feedback,
                    residual=self.residual)


def plans_of(s: Shape, sms: int, smem: int):
    args = (s.B, s.T, s.Du, s.widths, s.delay, s.activation)
    kw = dict(lags=s.lags, feedback=s.feedback, residual=s.residual, members=s.ensemble or 1)
    return plan_rollout(*args, False, sms, smem, **kw), plan_rollout(*args, True, sms, smem, **kw)


def partial_four_row_tile(sms: int, smem: int) -> Shape:
    """4-row tiles (the rows_per_item = 4 kernels) whose last tile has 1 valid row, one tile per
    SM: B = 4 SMs - 3 makes ceil(B / SMs) = 4 on any GPU with 4 or more SMs."""
    return Shape(B=max(4 * sms - 3, 5), Du=3, O=4, H=16, T=12, delay=2, truncate=5)


def persistent_blocks(sms: int, smem: int) -> Shape:
    """More tiles than the 2 blocks per SM of the grid: 64-row tiles (the cap), 2 SMs + 3 of
    them, the last partial, so every block loops and some take a second tile."""
    return Shape(B=K_MAX_ROWS * (K_BLOCKS_PER_SM * sms + 3) - 5, Du=3, O=8, H=24, T=6, delay=2, truncate=3)


def forward_smem_above_48k(sms: int, smem: int) -> Optional[Shape]:
    """The narrowest hidden width (multiple of 32) whose fused forward plan needs more than the
    default 48 KB of shared memory per block, which the launch must opt in to."""
    for H in range(64, 4096, 32):
        s = Shape(B=2 * sms + 5, Du=2, O=16, H=H, T=7, delay=2, truncate=None)
        fwd, _ = plans_of(s, sms, smem)
        if fwd is None:
            break
        if fwd["smem_bytes"] > DEFAULT_SMEM_BYTES + 4096:
            return s
    return None  # a device with no opt-in beyond 48 KB


def backward_smem_near_limit(sms: int, smem: int, layers: int = 2, activation: str = "relu") -> Optional[Shape]:
    """The widest hidden width (multiple of 32) whose fused backward plan still fits the opt-in
    shared memory, with a batch that asks for 64-row tiles: the rows are halved until one fits."""
    if smem <= DEFAULT_SMEM_BYTES:
        return None
    best = None
    for H in range(32, 4096, 32):
        s = Shape(B=K_MAX_ROWS * sms, Du=0, O=8, H=H, T=5, delay=1, truncate=None, layers=layers,
                  activation=activation)
        _, bwd = plans_of(s, sms, smem)
        if bwd is None or bwd["grads_global"]:
            break
        best = s
    return best


def backward_grads_global(sms: int, smem: int) -> Optional[Shape]:
    """The narrowest hidden width (multiple of 32) whose fused backward keeps its weight-gradient
    accumulators in global memory: weights and accumulators no longer fit the opt-in shared
    memory, the weights alone still do (at (256, 0, 64, 256, 100) on an H100 or A100)."""
    for H in range(32, 4096, 32):
        s = Shape(B=2 * sms + 5, Du=3, O=64, H=H, T=12, delay=2, truncate=5)
        _, bwd = plans_of(s, sms, smem)
        if bwd is None:
            return None
        if bwd["grads_global"]:
            return s
    return None


def deep_backward_smem_near_limit(sms: int, smem: int) -> Optional[Shape]:
    """The same for three layers and GELU, whose backward also keeps every hidden layer's z: the
    largest layout of the fused backward, with both weight buffers and all per-layer ones."""
    return backward_smem_near_limit(sms, smem, layers=3, activation="gelu")


def ensemble_persistent_blocks(sms: int, smem: int) -> Shape:
    """An ensemble of 5 delta models with more tiles per member than its share of the persistent
    grid (2 SMs // 5 blocks per member): 64-row tiles, the last partial, so every member's blocks
    loop over tiles and reduce their gradients per member."""
    share = max(1, K_BLOCKS_PER_SM * sms // 5)
    return Shape(B=K_MAX_ROWS * (share + 2) - 7, Du=2, O=4, H=16, T=5, lags=(2, 1), feedback=3, residual=True,
                 truncate=3, ensemble=5)


def medium_shape(sms: int, smem: int) -> Optional[Shape]:
    """The performance benchmarks' medium shape, (B, Du, O, H, T) = (256, 0, 64, 256, 100), where
    its fused backward fits the device (with its accumulators in global memory on an H100)."""
    s = Shape(B=256, Du=0, O=64, H=256, T=100, delay=1)
    fwd, bwd = plans_of(s, sms, smem)
    return s if fwd is not None and bwd is not None else None


def tensor_core_tiles(sms: int, smem: int) -> Shape:
    """Widths in whole 16-wide tiles and 32-row tiles (B = 32 SMs + 7: ceil(B / SMs) = 33, rounded
    up to 48 rows per tile, the last partial), with u and truncation: every GEMM of both
    directions on tensor cores (cuda_tensor_cores="auto")."""
    return _with_tensor_cores(Shape(B=32 * sms + 7, Du=16, O=16, H=64, T=12, delay=2, truncate=5), sms, smem)


def tensor_core_structure(sms: int, smem: int) -> Shape:
    """Tensor cores with two lags, F = 16 < O = 32, a residual skip and a three-layer SiLU network
    (z kept per layer), 16-row tiles."""
    return _with_tensor_cores(Shape(B=16 * sms, Du=0, O=32, H=32, T=10, lags=(2, 1), feedback=16, residual=True,
                                    layers=3, activation="silu"), sms, smem)


def _with_tensor_cores(s: Shape, sms: int, smem: int) -> Optional[Shape]:
    """s where its plans use tensor cores on this device (too little shared memory: None)."""
    fwd, bwd = plans_of(s, sms, smem)
    return s if fwd and bwd and fwd["tensor_cores"] and bwd["tensor_cores"] else None


# What each sized problem must give on the device (checked on the mirrored plans).
PLAN_SHAPES: Dict[str, Callable[[int, int], Optional[Shape]]] = {
    "partial-4-row-tile": partial_four_row_tile,
    "persistent-blocks": persistent_blocks,
    "forward-smem-above-48k": forward_smem_above_48k,
    "backward-smem-near-limit": backward_smem_near_limit,
    "deep-gelu-backward-smem-near-limit": deep_backward_smem_near_limit,
    "ensemble-persistent-blocks": ensemble_persistent_blocks,
    "backward-grads-global": backward_grads_global,
    "tensor-core-tiles": tensor_core_tiles,
    "tensor-core-structure": tensor_core_structure,
}


def plan_shape_problem(kind: str, sms: int, smem: int):
    """(shape, forward plan, backward plan) of one plan kind on a device, and the checks that the
    mirrored plans are of that kind; raises AssertionError naming the kind otherwise, and
    LookupError where the device cannot give that kind at all (no opt-in beyond 48 KB)."""
    s = PLAN_SHAPES[kind](sms, smem)
    if s is None:
        raise LookupError(f"{kind}: no such plan on a device with {sms} SMs and {smem} B of opt-in shared memory")
    fwd, bwd = plans_of(s, sms, smem)
    why = f"{kind}: {s} on {sms} SMs / {smem} B gives forward {fwd}, backward {bwd}"
    assert fwd is not None, why
    if kind == "partial-4-row-tile":
        assert fwd["rows_per_item"] == 4 and s.B % fwd["rows"] and fwd["tiles"] > 1, why
        assert bwd is not None and bwd["rows_per_item"] == 4 and s.B % bwd["rows"] and bwd["blocks"] > 1, why
    elif kind in ("persistent-blocks", "ensemble-persistent-blocks"):
        assert fwd["tiles"] > fwd["blocks"] and bwd is not None and bwd["tiles"] > bwd["blocks"] > 1, why
    elif kind == "forward-smem-above-48k":
        assert fwd["smem_bytes"] > DEFAULT_SMEM_BYTES, why
    elif kind in ("backward-smem-near-limit", "deep-gelu-backward-smem-near-limit"):
        assert bwd is not None and bwd["rows"] < K_MAX_ROWS and bwd["smem_bytes"] > DEFAULT_SMEM_BYTES, why
        assert not bwd["grads_global"], why
    elif kind == "backward-grads-global":
        assert bwd is not None and bwd["grads_global"] and bwd["blocks"] > 1, why
    elif kind.startswith("tensor-core"):
        assert bwd is not None and fwd["tensor_cores"] and bwd["tensor_cores"], why
    return s, fwd, bwd


# ---------------------------------------------------------------------------------------------
# Smoke cases

@dataclasses.dataclass
class Case:
    name: str
    shape: Shape
    dtype: torch.dtype = torch.float32
    path: str = "fused"     # fbfast.kernel_options(cuda_path=...)
    backward: bool = True
    expect: str = "fused"   # the mirrored plan the case is meant to hit: "fused" or "general"


def smoke_cases(sms: int, smem: int) -> List[Case]:
    """In order of increasing machinery, so the first failure is the simplest one."""
    narx = Shape(B=1, Du=8, O=2, H=5, T=40)
    small = Shape(B=33, Du=4, O=3, H=8, T=20, delay=2)
    cases = [
        Case("fused-forward-f32-1row", narx, backward=False),
        Case("fused-backward-f32-1block", narx),
        Case("fused-backward-f32-4row-partial-tile-blocks", partial_four_row_tile(sms, smem)),
        Case("fused-backward-f32-persistent-blocks", persistent_blocks(sms, smem)),
        Case("fused-backward-f32-forward-smem-above-48k", forward_smem_above_48k(sms, smem)),
        Case("fused-backward-f32-delay3-truncate2-nobias",
             Shape(B=7, Du=2, O=3, H=8, T=10, delay=3, truncate=2, bias=False)),
        Case("fused-backward-f32-chunked-T70", Shape(B=3, Du=5, O=4, H=9, T=70, delay=2)),
        Case("fused-backward-bf16", small, dtype=torch.bfloat16),
        Case("fused-backward-f16", small, dtype=torch.float16),
        # Other depths and activations: no hidden layer (the forward's extra ring slot), the
        # layer loop with both activation buffers, z kept per layer, and a bf16 deep network.
        Case("fused-backward-f32-tanh-L1", Shape(B=6, Du=2, O=3, H=0, T=11, delay=2, truncate=3, layers=1,
                                                 activation="tanh")),
        Case("fused-backward-f32-silu-L3-blocks", Shape(B=2 * sms + 5, Du=3, O=4, H=24, T=15, delay=2, truncate=4,
                                                        layers=3, activation="silu")),
        Case("fused-backward-f32-gelu-L4-chunked-T50", Shape(B=9, Du=0, O=3, H=9, T=50, delay=3, layers=4,
                                                             activation="gelu")),
        Case("fused-backward-f32-gelu-L3-smem-near-limit", deep_backward_smem_near_limit(sms, smem)),
        # Weight gradients accumulated in global memory (the weights alone fill shared memory),
        # and the medium shape, which needs it on an H100.
        Case("fused-backward-f32-grads-global", backward_grads_global(sms, smem)),
        Case("fused-backward-f32-medium-256-64-256-T100", medium_shape(sms, smem)),
        Case("fused-backward-f32-tensor-cores", tensor_core_tiles(sms, smem)),
        Case("fused-backward-bf16-tensor-cores-lags21-silu-L3", tensor_core_structure(sms, smem), dtype=torch.bfloat16),
        Case("fused-backward-bf16-mish-L3", Shape(B=33, Du=4, O=3, H=8, T=20, delay=2, layers=3, activation="mish"),
             dtype=torch.bfloat16),
        # Feedback structures (docs/spec.md §1.2) and ensembles (§1.3) in the fused kernels: D ring
        # slots gathered per step, the adjoint ring, x0's adjoints written from it; a grid row per
        # member, own and shared x0 / u (their gradients summed over the members' own), several
        # blocks per member (the reduction per member) and persistent blocks.
        Case("fused-backward-f32-lags31-F2-residual-K2",
             Shape(B=7, Du=2, O=3, H=8, T=10, lags=(3, 1), feedback=2, residual=True, truncate=2)),
        Case("fused-backward-f32-narx5-F1-gelu-L3-blocks",
             Shape(B=2 * sms + 5, Du=0, O=3, H=16, T=20, lags=(1, 2, 3, 4, 5), feedback=1, layers=3,
                   activation="gelu")),
        Case("fused-backward-f32-ensemble3-shared-x0-u", Shape(B=33, Du=4, O=3, H=8, T=12, delay=2, truncate=3,
                                                               ensemble=3, shared_x0=True, shared_u=True)),
        Case("fused-backward-f32-ensemble5-residual-persistent", ensemble_persistent_blocks(sms, smem)),
        Case("fused-backward-bf16-ensemble4-shared-u-lags21",
             Shape(B=33, Du=4, O=4, H=8, T=16, lags=(2, 1), feedback=2, residual=True, ensemble=4, shared_u=True,
                   activation="silu"), dtype=torch.bfloat16),
        Case("general-backward-f32", Shape(B=5, Du=2, O=3, H=7, T=6, delay=2, truncate=3), path="general",
             expect="general"),
        Case("general-backward-f32-ensemble3-lags31", Shape(B=5, Du=2, O=3, H=7, T=6, lags=(3, 1), feedback=2,
                                                            residual=True, truncate=2, ensemble=3, shared_x0=True),
             path="general", expect="general"),
        Case("general-backward-f32-elu-L3", Shape(B=5, Du=2, O=3, H=7, T=6, delay=2, truncate=3, layers=3,
                                                  activation="elu"), path="general", expect="general"),
        Case("auto-general-large-width-f32", Shape(B=3, Du=2, O=300, H=700, T=4, delay=2, truncate=3), path="auto",
             expect="general"),
        Case("auto-general-9-layers-f32", Shape(B=4, Du=2, O=3, H=6, T=5, layers=K_MAX_LAYERS + 1,
                                                activation="sigmoid"), path="auto", expect="general"),
    ]
    return [c for c in cases if c.shape is not None]  # a device without the opt-in has no >48 KB case


# ---------------------------------------------------------------------------------------------
# Instances whose kinked activations stay away from their kink. With millions of
# pre-activations (B H T of the large plans), a few land within float32 rounding (~1e-7) of
# zero, where float32 and the float64 reference take different branches: that unit's gradient
# then differs by O(|W|) and an elementwise check fails for no fault of the kernel. b1 = +-1 and
# rows of W1 of norm 0.05 keep the first layer's |z| >= 1 - 0.05 |[u; x]| (about 0.6 here), and
# `min_abs_preactivation` confirms it. The feedback still matters: a wrong fed-back x moves y by
# ~1e-2, far above the tolerances. Only the first layer is steered: the large and deep cases
# use smooth activations, and the small ones with kinks have too few units to meet one.

# The activations with a kink at 0 (elu's derivative jumps unless alpha == 1).
KINKED = {"relu", "leaky_relu", "elu"}
# The torch function of each activation at its default parameter (docs/spec.md §1.1), for the
# margins below.
ACT_FN = {
    "relu": torch.relu, "leaky_relu": torch.nn.functional.leaky_relu, "elu": torch.nn.functional.elu,
    "tanh": torch.tanh, "sigmoid": torch.sigmoid, "silu": torch.nn.functional.silu,
    "gelu": torch.nn.functional.gelu, "gelu_tanh": lambda z: torch.nn.functional.gelu(z, approximate="tanh"),
    "mish": torch.nn.functional.mish,
}


def away_from_kinks(w1: torch.Tensor, b1: torch.Tensor):
    """(w1, b1) rescaled as above, in their own dtype and device (an ensemble's, (E, out, in) and
    (E, out), member by member)."""
    w = w1.detach().double()
    w = w * (0.05 / w.norm(dim=-1, keepdim=True).clamp_min(1e-30))
    signs = torch.where(torch.arange(b1.shape[-1], device=b1.device) % 2 == 0, 1.0, -1.0)
    return w.to(w1.dtype), signs.expand(b1.shape).to(b1.dtype).contiguous()


def _linear(h, w, b):
    """One layer for one network or an ensemble (w (E, out, in), h (E, B, in))."""
    z = torch.matmul(h, w.transpose(-1, -2))
    return z if b is None else z + b.unsqueeze(-2)


def min_abs_preactivation(x0, u, weights, biases, y, delay, activation: str = "relu", feedback=None,
                          ensemble=None) -> float:
    """min |z_t| over every step, row and hidden unit of a rollout, from its output y (float64).
    ``delay`` is one lag or the lags in order (docs/spec.md §1.2); ``ensemble`` E broadcasts a
    shared x0 or u to the members."""
    lags = (delay,) if isinstance(delay, int) else tuple(delay)
    D = max(lags)
    x0, y = x0.detach().double(), y.detach().double()
    F = y.shape[-1] if feedback is None else feedback
    weights = [w.detach().double() for w in weights]
    biases = [None if b is None else b.detach().double() for b in biases]
    if ensemble is not None:  # every tensor (T or D, E, B, .)
        if x0.dim() == 3:
            x0 = x0.unsqueeze(1).expand(-1, ensemble, -1, -1)
        if u is not None and u.dim() == 3:
            u = u.unsqueeze(1).expand(-1, ensemble, -1, -1)
    worst = float("inf")
    for t in range(y.shape[0]):
        x = torch.cat([x0[t - d + D] if t < d else y[t - d][..., :F] for d in lags], -1)
        h = x if u is None else torch.cat([u[t].detach().double(), x], -1)
        for w, b in zip(weights[:-1], biases[:-1]):
            z = _linear(h, w, b)
            if z.numel():
                worst = min(worst, z.abs().min().item())
            h = ACT_FN[activation](z)
    return worst


def layer_names(layers: int) -> List[str]:
    """w1, b1, ..., wL, bL: the order `fbfast.rollout` takes the layers in after x0."""
    return [f"{kind}{l + 1}" for l in range(layers) for kind in "wb"]


def _problem(s: Shape, dtype: torch.dtype, seed: int = 0):
    """Inputs drawn in float64 on the CPU (weights ~ 1/sqrt(fan_in), as tests/testing.py does;
    with a bias and a kinked activation, the first layer kept away from the kinks), rounded to
    `dtype` once: the same values feed the kernel and the float64 reference."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dtype)

    E = s.members
    t = {"x0": rnd(s.delay, *(() if s.shared_x0 else E), s.B, s.F),
         "u": rnd(s.T, *(() if s.shared_u else E), s.B, s.Du) if s.Du else None}
    fan_in = s.Du + len(s.lag_tuple) * s.F
    for l, out in enumerate(s.widths):
        t[f"w{l + 1}"] = rnd(*E, out, fan_in, scale=0.9 / max(1, fan_in) ** 0.5)
        t[f"b{l + 1}"] = rnd(*E, out, scale=0.1) if s.bias else None
        fan_in = out
    if s.bias and s.activation in KINKED and s.layers > 1:
        t["w1"], t["b1"] = away_from_kinks(t["w1"], t["b1"])
    return t


def _rollout(fn, t: Dict, s: Shape, backward: bool, grad_y: torch.Tensor, **kw):
    leaves = {n: (v.requires_grad_(backward) if v is not None else None) for n, v in t.items()}
    params = [leaves[n] for n in layer_names(s.layers)]
    y = fn(leaves["x0"], *params, steps=s.T, u=leaves["u"], truncate=s.truncate, activation=s.activation,
           **s.structure(), **kw)
    out = {"Y": y.detach()}
    if backward:
        wanted = [n for n in ["x0", "u"] + layer_names(s.layers) if leaves[n] is not None]
        got = torch.autograd.grad(y, [leaves[n] for n in wanted], grad_y.to(device=y.device, dtype=y.dtype))
        out.update({f"d{n}": g for n, g in zip(wanted, got)})
    return out


def _reference(t: Dict, s: Shape, backward: bool, grad_y: torch.Tensor, device: str, dtype: torch.dtype):
    import fbfast

    conv = {n: None if v is None else v.detach().to(device=device, dtype=dtype) for n, v in t.items()}
    return _rollout(fbfast.rollout_reference, conv, s, backward, grad_y)


def _err(a: torch.Tensor, b: torch.Tensor) -> Dict[str, float]:
    """Max absolute error, and that over max |reference|; NaN anywhere counts as infinite."""
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    if b.numel() == 0:
        return {"abs": 0.0, "rel": 0.0}
    diff = (a - b).abs()
    worst = float("inf") if not torch.isfinite(a).all() else diff.max().item()
    return {"abs": worst, "rel": worst / max(b.abs().max().item(), 1e-12)}


def run_case(case: Case, log: Callable[[str], None], device: str = "cuda") -> Dict:
    """One case on `device`: "cuda" runs fbfast's CUDA kernel; "cpu" (--simulate-cpu) runs the
    "cpp" backend (or "eager" for 16-bit dtypes) through the same code, which checks this
    script and nothing about the CUDA kernels."""
    import contextlib

    import fbfast

    s, dtype = case.shape, case.dtype
    t_cpu = _problem(s, dtype)
    g = torch.Generator().manual_seed(1)
    grad_y = torch.randn(s.T, *s.members, s.B, s.O, generator=g, dtype=torch.float64).to(dtype)
    exact = _reference(t_cpu, s, case.backward, grad_y.double(), "cpu", torch.float64)
    weights = [t_cpu[f"w{l + 1}"] for l in range(s.layers)]
    biases = [t_cpu[f"b{l + 1}"] for l in range(s.layers)]
    margin = min_abs_preactivation(t_cpu["x0"], t_cpu["u"], weights, biases, exact["Y"], s.structure()["delay"],
                                   s.activation, s.feedback, s.ensemble)
    t_dev = {n: None if v is None else v.to(device) for n, v in t_cpu.items()}
    if device == "cuda":
        backend, options = "cuda", fbfast.kernel_options(cuda_path=case.path)
    else:
        backend, options = ("cpp" if dtype == torch.float32 else "eager"), contextlib.nullcontext()
    with options:
        got = _rollout(fbfast.rollout, t_dev, s, case.backward, grad_y, backend=backend)
        if device == "cuda":
            torch.cuda.synchronize()
    # float32: the bounds of tests/testing.py's TOLERANCES, over the norm. 16-bit: at most twice
    # the error of the eager reference run in that dtype on the GPU, plus half an ulp (the rule
    # of tests/test_cuda.py).
    eager = _reference(t_cpu, s, case.backward, grad_y, device, dtype) if dtype != torch.float32 else None
    errors, ok = {}, True
    for name, ref in exact.items():
        e = _err(got[name], ref)
        if eager is None:
            rtol, atol = (1e-4, 1e-5) if name == "Y" else (1e-3, 1e-4)
            e["bound"] = atol / max(ref.abs().max().item(), 1e-12) + rtol
        else:
            e["bound"] = 2 * _err(eager[name], ref)["rel"] + torch.finfo(dtype).eps / 2
        e["ok"] = bool(e["rel"] <= e["bound"])
        ok &= e["ok"] and got[name].dtype == dtype and got[name].device.type == device
        errors[name] = e
    shown = [f"{n} {e['abs']:.2e} (rel {e['rel']:.1e}{'' if e['ok'] else ' > ' + format(e['bound'], '.1e')})"
             for n, e in errors.items()]
    log("  " + "  ".join(shown) + f"  [min |z| {margin:.2g}]")
    return {"status": "ok" if ok else "failed", "errors": errors, "min_abs_z": margin}


def _is_cuda_error(exc: BaseException) -> bool:
    accel = getattr(torch, "AcceleratorError", None)
    return (accel is not None and isinstance(exc, accel)) or "CUDA error" in str(exc) or "cudaError" in str(exc)


def _plan_text(p: Optional[Dict]) -> str:
    if p is None:
        return "general"
    return (f"rows {p['rows']} (x{p['rows_per_item']}) chunk {p['chunk']} threads {p['threads']} "
            f"tiles {p['tiles']} blocks {p['blocks']} smem {p['smem_bytes']} B"
            + (", weight gradients in global memory" if p.get("grads_global") else ""))


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", nargs="+", metavar="WORD", help="run the cases whose name contains any WORD")
    ap.add_argument("--json", metavar="PATH", help="write the results here (rewritten after each case)")
    ap.add_argument("--plans", action="store_true", help="print the cases and their mirrored plans, run nothing")
    ap.add_argument("--pretend-sms", type=int, default=132, help="with --plans and no GPU: the SM count")
    ap.add_argument("--pretend-smem", type=int, default=227 << 10, help="with --plans and no GPU: opt-in bytes")
    ap.add_argument("--simulate-cpu", action="store_true",
                    help="run the cases on the CPU (\"cpp\" backend; \"eager\" for 16-bit) for a pretend device: "
                         "checks this script on a machine without a GPU, not the CUDA kernels")
    args = ap.parse_args(argv)

    def log(msg: str) -> None:
        print(msg, flush=True)

    have_gpu = torch.cuda.is_available()
    if args.plans:
        dev = device_limits() if have_gpu else {"sms": args.pretend_sms, "smem_optin": args.pretend_smem,
                                                "name": "pretend device", "capability": "?"}
        log(f"{dev['name']}: {dev['sms']} SMs, {dev['smem_optin']} B opt-in shared memory")
        for c in smoke_cases(dev["sms"], dev["smem_optin"]):
            fwd, bwd = (None, None) if c.path == "general" else plans_of(c.shape, dev["sms"], dev["smem_optin"])
            log(f"{c.name}: {c.shape}\n  forward  {_plan_text(fwd)}\n  backward {_plan_text(bwd)}")
        for kind in PLAN_SHAPES:
            try:
                s, fwd, bwd = plan_shape_problem(kind, dev["sms"], dev["smem_optin"])
            except LookupError as exc:
                log(f"[tests] {exc}")
                continue
            log(f"[tests] {kind}: {s}\n  forward  {_plan_text(fwd)}\n  backward {_plan_text(bwd)}")
        return EXIT_OK

    import fbfast

    device = "cpu" if args.simulate_cpu else "cuda"
    if device == "cuda":
        if not have_gpu:
            log(f"gpu_smoke: no GPU: torch.cuda.is_available() is False (torch {torch.__version__}, "
                f"built for CUDA {torch.version.cuda}); nothing was run")
            return EXIT_NO_GPU
        status = fbfast.backends()["cuda"]
        if not status.available:
            log(f"gpu_smoke: a GPU, but no fbfast CUDA kernel: {status.reason}")
            return EXIT_NO_KERNEL
        dev = device_limits()
    else:
        dev = {"sms": args.pretend_sms, "smem_optin": args.pretend_smem, "capability": "-",
               "name": "CPU simulation (cpp/eager backends, pretend device)"}
    cases = smoke_cases(dev["sms"], dev["smem_optin"])
    if args.only:
        cases = [c for c in cases if any(w in c.name for w in args.only)]
    report: Dict = {"device": dev, "torch": torch.__version__, "cuda": torch.version.cuda,
                    "launch_blocking": os.environ.get("CUDA_LAUNCH_BLOCKING", ""), "cases": [], "exit": None}

    def save() -> None:
        if args.json:
            tmp = args.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump(report, f, indent=1)
            os.replace(tmp, args.json)

    log(f"gpu_smoke: {dev['name']} (sm_{dev['capability']}), {dev['sms']} SMs, {dev['smem_optin']} B opt-in "
        f"shared memory; torch {torch.__version__}, CUDA {torch.version.cuda}; "
        f"CUDA_LAUNCH_BLOCKING={report['launch_blocking'] or 'unset'}; {len(cases)} cases")
    code = EXIT_OK
    for case in cases:
        # A pinned general path launches no fused kernel, whatever the plan would be.
        fwd, bwd = (None, None) if case.path == "general" else plans_of(case.shape, dev["sms"], dev["smem_optin"])
        entry = {"name": case.name, "shape": dataclasses.asdict(case.shape), "dtype": str(case.dtype),
                 "path": case.path, "plan_forward": fwd, "plan_backward": bwd if case.backward else None,
                 "status": "running"}
        report["cases"].append(entry)
        save()
        log(f"== {case.name}: {case.shape}, {str(case.dtype).replace('torch.', '')}, cuda_path={case.path}"
            f"{'' if case.backward else ', forward only'}")
        log(f"  forward plan  {_plan_text(fwd)}")
        if case.backward:
            log(f"  backward plan {_plan_text(bwd)}")
        if (fwd is not None) != (case.expect == "fused"):
            log(f"  NOTE: the mirrored plan is not the intended {case.expect} one on this device")
        t0 = time.perf_counter()
        try:
            entry.update(run_case(case, log, device))
        except Exception as exc:  # noqa: BLE001 - every failure is reported by case
            cuda = _is_cuda_error(exc)
            entry.update(status="cuda-error" if cuda else "error",
                         message=f"{type(exc).__name__}: {exc}"[:2000])
            log(f"  {'CUDA ERROR' if cuda else 'ERROR'} in {case.name}: {type(exc).__name__}: {exc}")
            traceback.print_exc(limit=4)
            if cuda:
                entry["seconds"] = round(time.perf_counter() - t0, 3)
                code = EXIT_CUDA_ERROR
                break
        entry["seconds"] = round(time.perf_counter() - t0, 3)
        log(f"  {entry['status'].upper()} ({entry['seconds']:.2f} s)")
        if entry["status"] != "ok":
            code = EXIT_FAILED
    report["exit"] = code
    if code == EXIT_CUDA_ERROR:
        not_run = [c.name for c in cases[len(report["cases"]):]]
        report["not_run"] = not_run
        log(f"gpu_smoke: stopped after a CUDA error; not run: {', '.join(not_run) or 'none'}")
    save()
    bad = [c["name"] for c in report["cases"] if c["status"] != "ok"]
    log(f"gpu_smoke: {len(report['cases']) - len(bad)}/{len(cases)} ok"
        + (f"; failed: {', '.join(bad)}" if bad else ""))
    return code


if __name__ == "__main__":
    sys.exit(main())
