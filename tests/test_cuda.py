"""The fused CUDA kernel ("cuda") against the reference, on a GPU (scripts/gpu_check.sh runs it).

Every check runs on both CUDA paths (the fused persistent kernels and the general per-step
GEMM path, pinned with fbfast.kernel_options(cuda_path=...)) and on "auto" (the plan's own choice):

* float32 outputs and gradients against the float64 reference, over the mode grid of the
  foundation (delay 1/2/3, u on/off, truncate None/1/3, bias on/off), odd widths and batches
  (B in 1, 7, 130; H=5, O=3; a width that does not fit in shared memory), every activation
  at depths 1-4 (more layers than the fused kernels hold take the general path), the feedback
  structures (lags, partial feedback, residual, truncation; more lags than the fused kernels
  hold take the general path) and ensembles with their own or shared x0 / u;
* bfloat16/float16: the kernel's error against float64 is at most twice the error of the
  eager reference run in that dtype (plus one unit roundoff, for problems where eager happens
  to be nearly exact);
* the plan kinds that fixed shapes miss on a large GPU, sized at run time from this device's
  SM count and opt-in shared memory: a partial 4-row tile, persistent blocks (more tiles than
  blocks, also per member of an ensemble with a residual two-lag structure), a forward plan
  above 48 KB of shared memory, a backward plan near the opt-in limit (also for a three-layer
  GELU network, which keeps every hidden layer's z); and the grid (a row per member), block and
  shared memory of those launches, as the profiler records them;
* opcheck, output masks, zero sizes, NaN, non-contiguous inputs, bitwise determinism, a
  non-default stream, and torch.compile(mode="reduce-overhead", fullgraph=True);
* tensor cores (3xTF32) against the fp32 FMA kernels, on device-sized plans that use them;
* the general path's CUDA graphs (csrc/cuda/graphed_call.h): replays against step-by-step runs
  for several structures, an ensemble and bfloat16, new inputs and in-place weight updates,
  recording on the second call only, no recording inside a user's capture, eviction.

Skipped as a whole unless CUDA is available and the extension was built with the CUDA kernel.
Every test here has a time limit (tests/conftest.py, FBFAST_CUDA_TEST_TIMEOUT). With
FBFAST_CUDA_TESTS=quick (scripts/gpu_check.sh sets it, to fit its time budget) opcheck runs on
2 of its 8 samples and the general path's activation-by-depth cases at depth 3 only; everything
else runs in full.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib

import pytest
import torch
from torch import nn

import fbfast
from testing import MODE_GRID, assert_close, grads, load_script, make_problem

CUDA_KERNEL = torch.cuda.is_available() and fbfast.backends()["cuda"].available
pytestmark = pytest.mark.skipif(not CUDA_KERNEL, reason="needs a GPU and fbfast built with its CUDA kernel")
QUICK = os.environ.get("FBFAST_CUDA_TESTS", "full") == "quick"


def _load_gpu_smoke():
    """scripts/gpu_smoke.py, by path (scripts/ is no package): it holds the Python mirror of
    plan_rollout (csrc/cuda/rollout_params.h) and the problems sized from it. Importing it
    touches no GPU."""
    return load_script(pathlib.Path(__file__).resolve().parent.parent / "scripts" / "gpu_smoke.py", "fbfast_gpu_smoke")


smoke = _load_gpu_smoke()

PATHS = ["auto", "fused", "general"]


@pytest.fixture
def path(request):
    with fbfast.kernel_options(cuda_path=request.param):
        yield request.param


def _cuda_problem(B, Du, O, H, T, dtype=torch.float32, **kw):
    return make_problem(B, Du, O, H, T, dtype=dtype, device="cuda", **kw)


def _as_float64(p):
    """The same problem in float64 (from the already-rounded values), on its own leaves."""
    def conv(t):
        return None if t is None else t.detach().double().requires_grad_(t.requires_grad)
    return dataclasses.replace(p, x0=conv(p.x0), u=conv(p.u), weights=[conv(w) for w in p.weights],
                               biases=[conv(b) for b in p.biases])


def _grad_y(y):
    g = torch.Generator(device=y.device).manual_seed(1)
    return torch.randn(y.shape, generator=g, device=y.device, dtype=torch.float64)


def _check_float32(p, label):
    y = p.run("cuda")
    q = _as_float64(p)
    y_ref = q.reference()
    assert y.dtype == torch.float32 and y.is_cuda and y.shape == y_ref.shape
    assert_close(y.double(), y_ref, torch.float32, "out", f"{label} Y")
    gy = _grad_y(y_ref)
    for name, a, b in zip(p.names, grads(y, p.inputs(), gy.float()), grads(y_ref, q.inputs(), gy)):
        assert a.dtype == torch.float32
        assert_close(a.double(), b, torch.float32, "grad", f"{label} d{name}")


def _case_id(c):
    return "B{B}-Du{Du}-T{T}-k{delay}-K{truncate}-{b}".format(b="bias" if c["bias"] else "nobias", **c)


# "auto" is the fused path at these widths, so the grid runs the two paths once each.
@pytest.mark.parametrize("path", ["fused", "general"], indirect=True)
@pytest.mark.parametrize("case", MODE_GRID, ids=_case_id)
def test_mode_grid_matches_reference(case, path):
    c = dict(case)
    p = _cuda_problem(c.pop("B"), c.pop("Du"), O=3, H=5, T=c.pop("T"), **c)
    _check_float32(p, _case_id(case))


# Odd widths and batches: several blocks per call (the gradient reduction), staging chunks
# shorter than T, delay > T, H = 0. The plan is about one tile of ceil(B / SMs) rows per SM
# (plan_rollout, csrc/cuda/rollout_params.h), so on a GPU with 100+ SMs these give 1-row tiles
# (B <= SMs) or one 8- or 12-row tile per SM (B = 1000), and never a partial 4-row tile or a
# block that loops over tiles: the device-sized cases below do.
ODD = [
    (1, 8, 2, 5, 40, 1, None),     # the seed's NARX shape
    (7, 0, 3, 5, 9, 2, 3),
    (130, 3, 3, 5, 6, 3, 1),
    (130, 11, 17, 37, 50, 2, None),
    (33, 0, 64, 64, 12, 1, 4),
    (5, 2, 3, 5, 3, 5, None),      # delay > steps
    (9, 0, 5, 0, 5, 2, None),      # H = 0
    (1000, 0, 8, 24, 5, 1, None),  # 132 SMs: 8-row tiles, the last partial; no tile left over
]


@pytest.mark.parametrize("path", PATHS, indirect=True)
@pytest.mark.parametrize("B,Du,O,H,T,delay,truncate", ODD)
def test_odd_widths(B, Du, O, H, T, delay, truncate, path):
    p = _cuda_problem(B, Du, O, H, T, delay=delay, truncate=truncate)
    _check_float32(p, f"{B},{Du},{O},{H},{T},{delay},{truncate}")


# Every activation (docs/spec.md §1.1; leaky_relu and elu with a parameter other than their
# default) at depths 1-4, with odd widths, a bias missing in the second layer, delay 2 and
# truncation: the fused kernels' layer loop, their activation buffers and each activation's
# epilogues, and the general path's, against the reference.
ACTIVATIONS = {"relu": "relu", "leaky_relu": nn.LeakyReLU(0.2), "elu": nn.ELU(0.7), "tanh": "tanh",
               "sigmoid": "sigmoid", "silu": "silu", "gelu": "gelu", "gelu_tanh": "gelu_tanh", "mish": "mish"}
DEPTH_HIDDEN = {1: (), 2: (5,), 3: (7, 5), 4: (9, 6, 7)}  # the hidden widths of each depth


@pytest.mark.parametrize("path", ["fused", "general"], indirect=True)
@pytest.mark.parametrize("depth", sorted(DEPTH_HIDDEN), ids=lambda L: f"L{L}")
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_activation_and_depth(activation, depth, path):
    if QUICK and path == "general" and depth != 3:
        pytest.skip("FBFAST_CUDA_TESTS=quick: the general path (ATen ops, csrc/gemm_path.h) at depth 3 only")
    bias = tuple(l != 1 for l in range(depth))
    p = _cuda_problem(7, 3, 3, 0, 9, delay=2, truncate=4, bias=bias, layers=DEPTH_HIDDEN[depth],
                      activation=ACTIVATIONS[activation])
    _check_float32(p, f"{activation} L={depth}")


# Feedback structures (docs/spec.md §1.2) on both paths: the fused kernels gather the lags from a
# ring of D fed-back values and keep their adjoints in the backward's ring (rollout_params.h).
FEEDBACK_STRUCTURES = {
    "3,1-F2-residual": dict(lags=(3, 1), feedback=2, residual=True, truncate=2),
    "narx5-F1": dict(lags=(1, 2, 3, 4, 5), feedback=1),
    "2-residual": dict(lags=(2,), residual=True),
    "1-F2-K1": dict(lags=(1,), feedback=2, truncate=1),
    "4,2-residual-T3": dict(lags=(4, 2), residual=True, T=3),
}


@pytest.mark.parametrize("path", ["fused", "general"], indirect=True)
@pytest.mark.parametrize("structure", sorted(FEEDBACK_STRUCTURES))
def test_feedback_structures(structure, path):
    kw = dict(FEEDBACK_STRUCTURES[structure])
    p = _cuda_problem(5, 2, 3, 8, kw.pop("T", 9), layers=3, activation="tanh", **kw)
    _check_float32(p, structure)


def test_more_lags_than_the_fused_kernels_hold():
    # kMaxLags (csrc/cuda/rollout_params.h): "auto" takes the general path without an error, a
    # pinned fused path says why it cannot.
    p = _cuda_problem(3, 1, 2, 6, 20, lags=tuple(range(1, smoke.K_MAX_LAGS + 2)), feedback=1)
    _check_float32(p, f"{len(p.lags)} lags, auto")
    with fbfast.kernel_options(cuda_path="fused"), pytest.raises(RuntimeError, match="at most"):
        p.run("cuda")


# Ensembles (docs/spec.md §1.3): the fused kernels run every member in one launch (a grid row per
# member), the general path member after member; own and shared x0 / u, whose gradients are the
# sums over the members.
ENSEMBLES = {
    "E3-own-v1": dict(ensemble=3, delay=2, truncate=3),
    "E3-shared-x0-u-v1": dict(ensemble=3, delay=2, shared_x0=True, shared_u=True),
    "E4-shared-u-lags31-F2-residual": dict(ensemble=4, lags=(3, 1), feedback=2, residual=True, truncate=2,
                                           shared_u=True),
    "E2-shared-x0-narx3-gelu": dict(ensemble=2, lags=(1, 2, 3), feedback=1, shared_x0=True, activation="gelu"),
}


@pytest.mark.parametrize("path", ["fused", "general"], indirect=True)
@pytest.mark.parametrize("ensemble", sorted(ENSEMBLES))
def test_ensembles(ensemble, path):
    kw = dict(ENSEMBLES[ensemble])
    p = _cuda_problem(7, 2, 3, 8, 9, layers=kw.pop("layers", 2), **kw)
    _check_float32(p, ensemble)


def test_more_layers_than_the_fused_kernels_hold():
    # kMaxLayers (csrc/cuda/rollout_params.h): "auto" takes the general path without an error,
    # a pinned fused path says why it cannot.
    p = _cuda_problem(5, 2, 3, 6, 7, delay=2, truncate=3, layers=smoke.K_MAX_LAYERS + 1, activation="silu")
    _check_float32(p, f"{p.layers} layers, auto")
    with fbfast.kernel_options(cuda_path="fused"), pytest.raises(RuntimeError, match="at most"):
        p.run("cuda")


# Plan kinds sized from this device at run time. The extension does not report the plan it
# takes, so the sizes come from the Python mirror of plan_rollout in scripts/gpu_smoke.py (the
# same formulas; see there), and test_launch_config_matches_the_mirror checks the mirror against
# the grid, block and shared memory of the launches themselves.
PLAN_KINDS = list(smoke.PLAN_SHAPES)


def _plan_problem(kind):
    dev = smoke.device_limits()
    try:
        shape, fwd, bwd = smoke.plan_shape_problem(kind, dev["sms"], dev["smem_optin"])
    except LookupError as exc:  # e.g. no opt-in beyond 48 KB on this device
        pytest.skip(str(exc))
    structure = shape.structure()
    p = _cuda_problem(shape.B, shape.Du, shape.O, shape.H, shape.T, truncate=shape.truncate, bias=shape.bias,
                      layers=shape.layers, activation=shape.activation, ensemble=shape.ensemble,
                      shared_x0=shape.shared_x0, shared_u=shape.shared_u, **structure)
    if shape.activation in smoke.KINKED:
        # Millions of pre-activations: keep them away from the kink, where float32 and the float64
        # reference would take different branches (scripts/gpu_smoke.py, away_from_kinks).
        assert shape.layers == 2, f"{kind}: only the first layer is steered away from the kinks"
        w1, b1 = smoke.away_from_kinks(p.w1, p.b1)
        with torch.no_grad():
            p.w1.copy_(w1)
            p.b1.copy_(b1)
        margin = smoke.min_abs_preactivation(p.x0, p.u, p.weights, p.biases, _as_float64(p).reference(), p.delay,
                                             shape.activation, shape.feedback, shape.ensemble)
        assert margin > 1e-3, f"{kind}: a pre-activation within {margin:.1e} of the kink; pick other inputs"
    return p, shape, fwd, bwd, dev


# Pinned to the fused path: a plan that does not fit raises instead of silently taking the
# general path.
@pytest.mark.parametrize("path", ["fused"], indirect=True)
@pytest.mark.parametrize("kind", PLAN_KINDS)
def test_device_sized_plans(kind, path):
    p, shape, fwd, bwd, dev = _plan_problem(kind)
    _check_float32(p, f"{kind} on {dev['sms']} SMs, {dev['smem_optin']} B: {shape}, forward plan {fwd}, "
                      f"backward plan {bwd}")


def _kernel_launches(trace_path):
    """{kernel name: [trace event]} of the fbfast kernels in a profiler's chrome trace."""
    with open(trace_path) as f:
        events = json.load(f).get("traceEvents", [])
    out = {}
    for ev in events:
        name = ev.get("name", "")
        if str(ev.get("cat", "")).lower() == "kernel" and "fbfast" in name and "rollout_" in name:
            out.setdefault(name, []).append(ev)
    return out


@pytest.mark.parametrize("kind", PLAN_KINDS)
def test_launch_config_matches_the_mirror(kind, tmp_path):
    p, shape, fwd, bwd, dev = _plan_problem(kind)
    gy = torch.randn(shape.T, *shape.members, shape.B, shape.O, device="cuda")
    with fbfast.kernel_options(cuda_path="fused"):
        torch.autograd.grad(p.run("cuda"), p.inputs(), gy)  # first calls outside the profile
        torch.cuda.synchronize()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            torch.autograd.grad(p.run("cuda"), p.inputs(), gy)
            torch.cuda.synchronize()
    trace = tmp_path / "trace.json"
    prof.export_chrome_trace(str(trace))
    launches = _kernel_launches(trace)
    if not launches:
        pytest.skip("the profiler recorded no fbfast kernel (no CUPTI kernel records on this machine)")
    for which, plan in (("rollout_forward_kernel", fwd), ("rollout_backward_kernel", bwd)):
        names = [n for n in launches if which in n]
        assert len(names) == 1, f"{kind}: expected one {which} launch, got {sorted(launches)}"
        ev = launches[names[0]][0]
        args = ev.get("args", {})
        if "grid" not in args or "block" not in args:
            pytest.skip(f"the profiler's kernel records carry no launch configuration: {sorted(args)}")
        got = {"blocks": args["grid"][0], "members": args["grid"][1] if len(args["grid"]) > 1 else 1,
               "threads": args["block"][0],
               "smem_bytes": args.get("shared memory", plan["smem_bytes"]),
               # the kernel's template argument, demangled (<float, 4>) or not (ILi4E)
               "rows_per_item": 4 if ", 4>" in names[0] or "Li4E" in names[0] else 1}
        want = {k: plan[k] for k in got if k != "members"}
        want["members"] = shape.ensemble or 1
        assert got == want, f"{kind}: {names[0]} launched with {got}, the mirror of plan_rollout says {want}"


def test_large_width_takes_the_general_path(monkeypatch):
    # 4 (H (Du+O) + O H) bytes of fp32 weights = 1.7 MB: far beyond any block's shared memory.
    p = _cuda_problem(3, 2, 300, 700, 4, delay=2, truncate=3)
    _check_float32(p, "large width, auto")
    with fbfast.kernel_options(cuda_path="fused"), pytest.raises(RuntimeError, match="do not fit"):
        p.run("cuda")


# (B, Du, O, H, T, delay, truncate, hidden layers, activation)
LOW_PRECISION_CASES = [
    (1, 8, 2, 5, 100, 1, None, 1, "relu"),
    (64, 0, 32, 64, 50, 1, None, 1, "relu"),
    (33, 4, 3, 8, 20, 2, 3, 1, "relu"),
    (130, 0, 16, 48, 30, 3, None, 1, "relu"),
    (33, 4, 3, 8, 20, 2, 3, 2, "silu"),
    (64, 0, 16, 32, 30, 1, None, 3, "gelu_tanh"),
]


def _rel_err(a, b):
    b = b.double()
    return ((a.double() - b).abs().max() / b.abs().max().clamp_min(1e-12)).item() if b.numel() else 0.0


@pytest.mark.parametrize("path", ["fused", "general"], indirect=True)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("B,Du,O,H,T,delay,truncate,hidden,activation", LOW_PRECISION_CASES)
def test_low_precision_error_at_most_twice_eager(B, Du, O, H, T, delay, truncate, hidden, activation, dtype, path):
    p = _cuda_problem(B, Du, O, H, T, dtype=dtype, delay=delay, truncate=truncate, layers=hidden + 1,
                      activation=activation)
    q = _as_float64(p)
    y, y_eager, y_ref = p.run("cuda"), p.run("eager"), q.reference()
    assert y.dtype == dtype
    gy = _grad_y(y_ref)
    got = [y] + grads(y, p.inputs(), gy.to(dtype))
    eager = [y_eager] + grads(y_eager, p.inputs(), gy.to(dtype))
    exact = [y_ref] + grads(y_ref, q.inputs(), gy)
    slack = torch.finfo(dtype).eps / 2
    names = ["Y"] + p.names
    for name, a, e, b in zip(names, got, eager, exact):
        assert a.dtype == dtype and torch.isfinite(a).all(), name
        err, err_eager = _rel_err(a, b), _rel_err(e, b)
        assert err <= 2 * err_eager + slack, (
            f"{name}: kernel error {err:.3e} > 2 x eager {dtype} error {err_eager:.3e} + {slack:.1e}")


# (activation, its parameter, hidden widths): the operators' samples cycle through these.
OPCHECK_NETWORKS = [("relu", 0.0, (6,)), ("gelu", 0.0, (6, 5)), ("leaky_relu", 0.2, ()), ("tanh", 0.0, (4, 6, 5))]


def _opcheck_samples():
    out = []
    if not CUDA_KERNEL:  # parametrisation runs at collection, before the skip
        return out
    for requires_grad in (False, True):
        for Du, bias in ((0, True), (3, False)):
            for delay, truncate in ((1, 0), (3, 2)):
                # quick: two samples that still differ in every axis (each opcheck costs 1-2 s)
                if QUICK and (requires_grad, Du, delay) not in ((False, 0, 1), (True, 3, 3)):
                    continue
                activation, param, hidden = OPCHECK_NETWORKS[len(out) % len(OPCHECK_NETWORKS)]
                p = _cuda_problem(5, Du, 3, 6, 4, delay=delay, bias=bias, requires_grad=requires_grad,
                                  layers=hidden)
                out.append((p.x0, p.u, p.weights, p.biases, p.steps, delay, truncate, activation, param))
    return out


def _sample_id(args):
    return f"{args[7]}-L{len(args[2])}-k{args[5]}-{'grad' if args[0].requires_grad else 'nograd'}"


@pytest.mark.parametrize("args", _opcheck_samples(), ids=_sample_id)
def test_opcheck_forward(args):
    torch.library.opcheck(torch.ops.fbfast.rollout_forward.default, args)


def _detached(args):
    def detach(a):
        if isinstance(a, list):
            return [detach(t) for t in a]
        return a.detach() if isinstance(a, torch.Tensor) else a
    return [detach(a) for a in args]


@pytest.mark.parametrize("args", _opcheck_samples(), ids=_sample_id)
def test_opcheck_backward(args):
    x0, u, weights, biases, steps, delay, truncate, activation, param = _detached(args)
    y = torch.ops.fbfast.rollout_forward.default(x0, u, weights, biases, steps, delay, truncate, activation, param)
    mask = [True, u is not None] + [True] * len(weights) + [b is not None for b in biases]
    torch.library.opcheck(torch.ops.fbfast.rollout_backward.default,
                          (torch.randn_like(y), y, x0, u, weights, biases, delay, truncate, activation, param, mask))


@pytest.mark.parametrize("path", ["fused", "general"], indirect=True)
def test_backward_masks_return_empty_for_unwanted(path):
    p = _cuda_problem(4, 2, 3, 5, 6, delay=2, requires_grad=False, layers=(5, 4), activation="silu")
    y = p.run("cuda")
    op = torch.ops.fbfast.rollout_backward.default
    # u, w2 and b3 of (x0, u, w1, w2, w3, b1, b2, b3)
    mask = [False, True, False, True, False, False, False, True]
    gx0, gu, gw, gb = op(torch.ones_like(y), y, p.x0, p.u, p.weights, p.biases, 2, 0, "silu", 0.0, mask)
    assert tuple(gx0.shape) == (0,) and gu.shape == p.u.shape
    assert [tuple(t.shape) for t in gw] == [(0,), tuple(p.w2.shape), (0,)]
    assert [tuple(t.shape) for t in gb] == [(0,), (0,), (3,)]
    _, fu, fw, fb = op(torch.ones_like(y), y, p.x0, p.u, p.weights, p.biases, 2, 0, "silu", 0.0, [True] * 8)
    torch.testing.assert_close(gu, fu, rtol=0, atol=0)
    torch.testing.assert_close(gw[1], fw[1], rtol=0, atol=0)
    torch.testing.assert_close(gb[2], fb[2], rtol=0, atol=0)


@pytest.mark.parametrize("path", ["fused", "general"], indirect=True)
@pytest.mark.parametrize("B,T", [(0, 4), (3, 0), (0, 0)])
def test_zero_size(B, T, path):
    p = _cuda_problem(B, 2, 3, 5, T, delay=2)
    y = p.run("cuda")
    assert y.shape == (T, B, 3) and y.is_cuda
    for g, t in zip(grads(y, p.inputs(), torch.ones_like(y)), p.inputs()):
        assert g.shape == t.shape and not g.abs().sum().item()


def test_tensor_cores_propagate_inf_and_nan_like_the_reference():
    p, shape, fwd, bwd, dev = _plan_problem("tensor-core-tiles")
    with torch.no_grad():
        p.u[1, 3, 5] = float("inf")
        p.x0[0, 7, 2] = float("nan")
    with fbfast.kernel_options(cuda_path="fused"), torch.no_grad():
        y = p.run("cuda")
    ref = _as_float64(p).reference()
    assert torch.equal(torch.isnan(y), torch.isnan(ref)) and torch.isnan(y).any()
    assert torch.equal(torch.isinf(y), torch.isinf(ref))


@pytest.mark.parametrize("path", ["fused", "general"], indirect=True)
def test_nan_propagates_like_the_reference(path):
    p = _cuda_problem(6, 2, 3, 5, 5, delay=2)
    with torch.no_grad():
        p.x0[0, 1, 2] = float("nan")
        p.w1[3, 0] = float("inf")
    y = p.run("cuda")
    y_ref = p.reference()
    assert torch.equal(torch.isnan(y), torch.isnan(y_ref))
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5, equal_nan=True)


@pytest.mark.parametrize("path", ["fused", "general"], indirect=True)
def test_non_contiguous_inputs(path):
    p = _cuda_problem(6, 2, 3, 5, 4, delay=2)
    big = torch.randn(2, 12, 6, device="cuda")
    x0 = big[:, ::2, ::2]
    w1 = p.w1.detach().t().contiguous().t()
    u = p.u.detach().transpose(0, 1).contiguous().transpose(0, 1)
    assert not (x0.is_contiguous() or w1.is_contiguous() or u.is_contiguous())
    y = fbfast.rollout(x0, w1, p.b1, p.w2, p.b2, u=u, delay=2, backend="cuda")
    y_ref = fbfast.rollout_reference(x0.double(), w1.double(), p.b1.double(), p.w2.double(),
                                     p.b2.double(), 4, u.double(), 2)
    assert_close(y.double(), y_ref, torch.float32)
    gy = torch.randn(4, 3, 6, device="cuda").transpose(1, 2)  # non-contiguous dL/dY, (T, B, O)
    ins = [p.w1, p.b1, p.w2, p.b2]
    y = fbfast.rollout(x0, *ins, u=u, delay=2, backend="cuda")
    y_ref = fbfast.rollout_reference(x0, *ins, 4, u, 2)
    for a, b in zip(grads(y, ins, gy), grads(y_ref, ins, gy)):
        assert_close(a, b, torch.float32, "grad")


# Version 1's network, and a deeper one whose backward keeps z (the per-layer buffers).
NETWORKS = {"relu-L2": dict(layers=2, activation="relu"), "gelu-L3": dict(layers=3, activation="gelu")}


def _assert_runs_bitwise_equal(p, gy):
    """Three runs of the problem give the same Y and gradients, bit for bit."""
    runs = []
    for _ in range(3):
        y = p.run("cuda")
        runs.append([y] + grads(y, p.inputs(), gy))
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a, b)


@pytest.mark.parametrize("path", ["fused", "general"], indirect=True)
@pytest.mark.parametrize("network", sorted(NETWORKS))
def test_deterministic_bitwise(network, path):
    # 130 rows: several blocks, so the fused weight gradients go through the block reduction.
    p = _cuda_problem(130, 3, 8, 24, 20, delay=2, truncate=5, **NETWORKS[network])
    _assert_runs_bitwise_equal(p, torch.randn(20, 130, 8, device="cuda"))


@pytest.mark.parametrize("path", ["fused", "general"], indirect=True)
def test_deterministic_bitwise_ensemble_structure(path):
    # Several blocks per member (the per-member reduction) and a shared x0 and u, whose gradients
    # are the sums of the members' own: no atomics anywhere, so every run gives the same bits.
    p = _cuda_problem(130, 3, 8, 24, 12, lags=(3, 1), feedback=5, residual=True, truncate=4, ensemble=3,
                      shared_x0=True, shared_u=True, activation="silu")
    _assert_runs_bitwise_equal(p, torch.randn(12, 3, 130, 8, device="cuda"))


@pytest.mark.parametrize("path", ["fused", "general"], indirect=True)
@pytest.mark.parametrize("network", sorted(NETWORKS))
def test_streaming_continues_the_rollout(network, path):
    p = _cuda_problem(9, 2, 3, 7, 12, delay=3, requires_grad=False, **NETWORKS[network])
    act = NETWORKS[network]["activation"]
    whole = p.run("cuda")
    first = fbfast.rollout(p.x0, *p.params, u=p.u[:5], delay=3, activation=act, backend="cuda")
    second = fbfast.rollout(first[-3:], *p.params, u=p.u[5:], delay=3, activation=act, backend="cuda")
    chained = torch.cat([first, second])
    if path == "fused":  # the fed-back value is exactly the stored Y, so this is bit for bit
        assert torch.equal(chained, whole)
    else:
        assert_close(chained, whole, torch.float32)


@pytest.mark.parametrize("path", ["fused", "general"], indirect=True)
def test_non_default_stream(path):
    p = _cuda_problem(40, 3, 4, 16, 30, delay=2, truncate=4)
    y_ref = p.run("cuda")
    gy = torch.randn_like(y_ref)
    g_ref = grads(y_ref, p.inputs(), gy)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        # The inputs are produced on `side` behind a long sleep: a kernel launched on any other
        # stream would read them before they exist.
        torch.cuda._sleep(100_000_000)
        ins = [t.detach().clone().requires_grad_() for t in (p.x0, p.u, p.w1, p.b1, p.w2, p.b2)]
        gy_side = gy.clone()
        y = fbfast.rollout(ins[0], ins[2], ins[3], ins[4], ins[5], u=ins[1], delay=2, truncate=4, backend="cuda")
        g = torch.autograd.grad(y, ins, gy_side)
    side.synchronize()
    # The fused kernels are bitwise reproducible; cuBLAS promises that only per stream.
    same = torch.equal if path == "fused" else (lambda a, b: torch.allclose(a, b, rtol=1e-5, atol=1e-6))
    assert same(y, y_ref)
    for a, b in zip(g, g_ref):
        assert same(a, b)


# ---------------------------------------------------------------------------------------------
# Tensor cores in the fused kernels (3xTF32, tile_gemm_tc in csrc/cuda/tile_common.cuh): the
# device-sized plan kinds "tensor-core-*" above run them against the reference; here against the
# fp32 FMA kernels, which compute the same sums in another order.

@pytest.mark.parametrize("kind", ["tensor-core-tiles", "tensor-core-structure"])
def test_tensor_cores_agree_with_the_fp32_kernels(kind):
    p, shape, fwd, bwd, dev = _plan_problem(kind)
    gy = torch.randn(shape.T, *shape.members, shape.B, shape.O, device="cuda")
    with fbfast.kernel_options(cuda_path="fused"):
        tc = _forward_and_grads(p, gy)
        again = _forward_and_grads(p, gy)
        with fbfast.kernel_options(cuda_tensor_cores="off"):
            fma = _forward_and_grads(p, gy)
    for a, b in zip(tc, again):
        assert torch.equal(a, b)  # deterministic, like the fp32 kernels
    for name, a, b in zip(["Y"] + list(p.names), tc, fma):
        # 3xTF32 keeps close to fp32; one TF32 product (or a lost split) would be ~1e-3 off.
        assert _rel_err(a, b) < 2e-5, f"{kind} {name}: {_rel_err(a, b):.2e}"
    # Another arithmetic: some bits differ (were they all equal, the tensor cores did not run).
    assert not all(torch.equal(a, b) for a, b in zip(tc, fma))


# ---------------------------------------------------------------------------------------------
# CUDA graphs of the general path (csrc/cuda/graphed_call.h): a recorded call replayed with new
# inputs, against the same call run step by step.

GRAPH_CASES = {
    "v1-relu": dict(B=5, Du=2, O=3, H=16, T=9, delay=2, truncate=4),
    "structure-silu": dict(B=7, Du=3, O=6, H=12, T=10, lags=(3, 1), feedback=4, residual=True, truncate=3,
                           activation="silu"),
    "ensemble-shared-tanh": dict(B=6, Du=2, O=4, H=8, T=8, ensemble=3, shared_x0=True, activation="tanh"),
    "deep-gelu-bf16": dict(B=9, Du=0, O=5, H=12, T=7, layers=4, activation="gelu", dtype=torch.bfloat16),
    "short-T2": dict(B=4, Du=1, O=2, H=6, T=2, delay=3),
}


def _graph_problem(case, seed=0, **over):
    kw = dict(GRAPH_CASES[case], seed=seed, **over)
    return _cuda_problem(kw.pop("B"), kw.pop("Du"), kw.pop("O"), kw.pop("H"), kw.pop("T"), **kw)


def _forward_and_grads(p, gy):
    y = p.run("cuda")
    return [y.detach()] + grads(y, p.inputs(), gy)


@pytest.mark.parametrize("case", sorted(GRAPH_CASES))
def test_graph_replays_match_step_by_step(case):
    p = _graph_problem(case)
    with fbfast.kernel_options(cuda_path="general", cuda_graphs="off"):
        gy = torch.randn(p.run("cuda").shape, device="cuda", dtype=p.x0.dtype)
        before = fbfast.cuda_graph_stats()
        eager = _forward_and_grads(p, gy)
        assert fbfast.cuda_graph_stats() == before  # "off" records nothing
    members = GRAPH_CASES[case].get("ensemble", 1)
    with fbfast.kernel_options(cuda_path="general", cuda_graphs="always"):
        runs = [_forward_and_grads(p, gy) for _ in range(3)]  # record, then two replays
        after = fbfast.cuda_graph_stats()
    # Every general-path call went through a graph: a forward and a backward per member (an
    # ensemble's general path runs member after member, all of one size: one graph each), three
    # times. At most one forward and one backward graph were recorded (none if an earlier test
    # recorded these sizes).
    assert after["failed"] == before["failed"]
    recorded, replayed = after["recorded"] - before["recorded"], after["replayed"] - before["replayed"]
    assert recorded <= 2 and recorded + replayed == 6 * members
    # Calls through one graph get the graph's bits. Against the step-by-step run the results agree
    # to cuBLAS's rounding: it may pick other kernels under capture and on another stream.
    for run in runs[1:]:
        for a, b in zip(run, runs[0]):
            assert torch.equal(a, b)
    for name, a, b in zip(["Y"] + list(p.names), runs[0], eager):
        assert_close(a.double(), b.double(), p.x0.dtype, "grad", f"{case} {name}")


def test_graph_takes_new_inputs_and_leaves_earlier_results_alone():
    with fbfast.kernel_options(cuda_path="general", cuda_graphs="always"):
        first = _graph_problem("structure-silu", seed=1, requires_grad=False)
        second = _graph_problem("structure-silu", seed=2, requires_grad=False)
        y1 = first.run("cuda")
        kept = y1.clone()
        recorded = fbfast.cuda_graph_stats()["recorded"]
        y2 = second.run("cuda")  # a replay, with the second problem's inputs copied in
        assert fbfast.cuda_graph_stats()["recorded"] == recorded
        assert torch.equal(y1, kept)  # the result is the caller's own tensor, not the graph's
        with torch.no_grad():
            for w in first.weights:
                w.mul_(0.5)  # an optimizer's in-place update: same pointers, new values
        y3 = first.run("cuda")
    with fbfast.kernel_options(cuda_path="general", cuda_graphs="off"):
        assert_close(y2, second.run("cuda"), torch.float32)
        assert_close(y3, first.run("cuda"), torch.float32)
    assert not torch.equal(y3, y1)


def test_graph_auto_records_on_the_second_call_of_long_enough_rollouts():
    with fbfast.kernel_options(cuda_path="general", cuda_graphs="auto"), torch.no_grad():
        p = _graph_problem("v1-relu", seed=3, B=11)  # sizes no other test uses
        start = fbfast.cuda_graph_stats()["recorded"]
        p.run("cuda")
        assert fbfast.cuda_graph_stats()["recorded"] == start
        p.run("cuda")
        assert fbfast.cuda_graph_stats()["recorded"] == start + 1
        short = _graph_problem("short-T2", seed=3, B=13)  # T = 2 < kGraphMinSteps
        for _ in range(3):
            short.run("cuda")
        assert fbfast.cuda_graph_stats()["recorded"] == start + 1


def test_graph_inside_a_users_capture_runs_step_by_step():
    # A rollout inside torch.cuda.graph capture must not record a graph of its own: the general
    # path's kernels become part of the user's graph, which then replays with new inputs.
    p = _graph_problem("v1-relu", seed=4, requires_grad=False)
    with fbfast.kernel_options(cuda_path="general", cuda_graphs="always"), torch.no_grad():
        x0 = p.x0.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            p.run("cuda")  # warm-up outside the capture, as torch.cuda.graph asks
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        recorded = fbfast.cuda_graph_stats()["recorded"]
        with torch.cuda.graph(graph):
            y = fbfast.rollout(x0, *p.params, steps=p.steps, u=p.u, delay=p.delay, truncate=p.truncate,
                               backend="cuda")
        assert fbfast.cuda_graph_stats()["recorded"] == recorded
        x0.copy_(torch.randn_like(x0))
        graph.replay()
        torch.cuda.synchronize()
        expected = fbfast.rollout(x0, *p.params, steps=p.steps, u=p.u, delay=p.delay, truncate=p.truncate,
                                  backend="cuda")
    assert_close(y, expected, torch.float32)


def test_graphs_beyond_the_limit_are_evicted_and_rerecorded():
    with fbfast.kernel_options(cuda_path="general", cuda_graphs="always"), torch.no_grad():
        problems = [_graph_problem("v1-relu", seed=5, B=20 + i, requires_grad=False) for i in range(10)]
        recorded = fbfast.cuda_graph_stats()["recorded"]
        results = [p.run("cuda") for p in problems]  # sizes no other test uses: 10 recordings
        stats = fbfast.cuda_graph_stats()
        assert stats["recorded"] == recorded + 10 and stats["held"] <= 8  # kMaxGraphs, graphed_call.h
        again = problems[0].run("cuda")  # evicted by now: recorded anew
        assert fbfast.cuda_graph_stats()["recorded"] == recorded + 11
        assert_close(again, results[0], torch.float32)
    with fbfast.kernel_options(cuda_path="general", cuda_graphs="off"), torch.no_grad():
        assert_close(results[0], problems[0].run("cuda"), torch.float32)


def test_double_backward_matches_reference():
    # create_graph=True takes the C++ autograd's differentiable path (csrc/autograd.cpp); on CUDA
    # it must still agree with the reference to second order.
    p = _cuda_problem(3, 2, 2, 4, 5, delay=2, truncate=3)
    gy = torch.randn(5, 3, 2, device="cuda")
    first = torch.autograd.grad(p.run("cuda"), p.inputs(), gy, create_graph=True)
    first_ref = torch.autograd.grad(p.reference(), p.inputs(), gy, create_graph=True)
    for a, b in zip(first, first_ref):
        assert_close(a, b, torch.float32, "grad")
    one = torch.tensor(1.0, device="cuda")
    second = grads(sum((g * g).sum() for g in first), p.inputs(), one)
    second_ref = grads(sum((g * g).sum() for g in first_ref), p.inputs(), one)
    for a, b in zip(second, second_ref):
        assert_close(a, b, torch.float32, "grad")


def test_auto_picks_cuda_for_cuda_float32():
    p = _cuda_problem(2, 0, 3, 4, 3)
    y = fbfast.rollout(p.x0, p.w1, p.b1, p.w2, p.b2, steps=3)
    assert "RolloutFunction" in y.grad_fn.name()


# Last: the slowest test (the first compile), so that a run cut short by its time limit has
# done everything else.
def test_torch_compile_reduce_overhead_fullgraph():
    # CUDA graphs (reduce-overhead) capture the fused kernels; fullgraph=True fails on any graph
    # break. Forward and backward must match eager on every replay.
    torch.manual_seed(0)
    net = fbfast.FeedbackMLP(5, 16, 3, device="cuda")
    params = list(net.parameters())

    def loss_fn(x0, u):
        y = fbfast.rollout(x0, net.fc1.weight, net.fc1.bias, net.fc2.weight, net.fc2.bias, u=u,
                           delay=2, truncate=3, backend="cuda")
        return (y - 0.5).square().mean()

    compiled = torch.compile(loss_fn, mode="reduce-overhead", fullgraph=True)
    for step in range(4):
        x0 = torch.randn(2, 4, 3, device="cuda")
        u = torch.randn(9, 4, 2, device="cuda")
        loss = loss_fn(x0, u)
        g = torch.autograd.grad(loss, params)
        torch.compiler.cudagraph_mark_step_begin()
        loss_c = compiled(x0, u)
        g_c = torch.autograd.grad(loss_c, params)
        torch.testing.assert_close(loss_c.detach().clone(), loss.detach(), msg=f"replay {step}")
        for a, b in zip(g_c, g):
            torch.testing.assert_close(a.clone(), b, rtol=1e-5, atol=1e-6, msg=f"replay {step}")
