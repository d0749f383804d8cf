"""Reliability of the compiled "cpp" backend: edge values, memory, leaks, threads,
determinism and meta tensors. Bad input is tests/test_bad_input_matrix.py; random problems are
tests/test_properties.py; installs without the extension are tests/test_degraded_install.py.

Bounds stated by the tests (RSS from /proc/self/status, each measurement in a fresh process):
* steps = 10^5, B = 1, forward + backward: peak RSS growth <= 4 x (bytes of Y + bytes of u) + 8 MiB;
* 10^4 small forward + backward calls: RSS after the last within 4 MiB of RSS after the first
  1000, and no more than 100 extra gc-tracked objects.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import threading

import pytest
import torch

import fbfast
from testing import CPP, TOLERANCES, assert_close, cpu_variant, grads, make_problem

pytestmark = pytest.mark.skipif(not CPP, reason="the C++ kernel is not built")

HERE = os.path.dirname(os.path.abspath(__file__))
NAMES = ("x0", "u", "w1", "b1", "w2", "b2")
PATHS = ("tile", "blas")
DTYPES = (torch.float64, torch.float32)
MiB = 2**20


# (cpu_path, cpu_isa): both paths, and each instruction-set variant of the tile path, pinned with
# fbfast.kernel_options ("auto" is the widest this CPU runs).
VARIANTS = [("tile", "base"), ("tile", "avx2"), ("tile", "auto"), ("blas", "auto")]


def _variant_id(v):
    return "-".join(v)


@pytest.fixture
def cpu_path(request):
    with cpu_variant(request.param):
        yield request.param


@pytest.fixture
def variant(request):
    path, isa = request.param
    with cpu_variant(path, isa):
        yield request.param


def _results(p, grad_y):
    """Y and the gradients of every input of a problem, from "cpp"."""
    y = p.run("cpp")
    return [y.detach()] + grads(y, p.inputs(), grad_y)


# --- edge values -----------------------------------------------------------------------------


# Deeper networks with every activation: the activation passes of the tile kernels
# (csrc/cpu/vec_math.h) and ATen's on the BLAS path must let NaN and infinities through exactly
# as torch's activations do (silu(-inf) = nan, gelu(-inf) = nan, tanh(inf) = 1, ...).
ACTIVATIONS = ("relu", "leaky_relu", "elu", "tanh", "sigmoid", "silu", "gelu", "gelu_tanh", "mish")


def _unless_torch_disagrees_with_itself(activation, dtype, a, b):
    """The elements of a (fbfast) and b (the reference) to compare. Two of torch's CPU
    activation kernels give different results at the same input depending on where an element
    falls in the tensor (their vectorised body or their scalar tail), so there the reference
    does not define one answer: ELU's gradient at z = nan (nan, or the gradient passed through)
    and float32 GELU at z = +inf (nan, or +inf). fbfast's tile and BLAS paths give one of the two;
    such elements are left out, everything else must match."""
    if activation == "elu":
        differ = a.isnan() ^ b.isnan()
    elif activation == "gelu" and dtype == torch.float32:
        differ = (a.isnan() & b.isinf()) | (a.isinf() & b.isnan())
    else:
        return a, b
    return a[~differ], b[~differ]


def _check_nan_and_inf(make, names, activation, dtype):
    """Each input of `names` in turn gets a NaN, +Inf or -Inf in one element or in all of them;
    Y and every gradient must have NaN exactly where the reference has them, the same
    infinities, and the finite values within tolerance. Returns how many of the cases reached
    Y (a -Inf before a ReLU may vanish)."""
    reached = 0
    for name, value, where in itertools.product(names, (float("nan"), float("inf"), -float("inf")), ("one", "all")):
        p = make()
        with torch.no_grad():
            target = getattr(p, name)
            if where == "one":
                target.view(-1)[1] = value
            else:
                target.fill_(value)
        y, y_ref = p.run("cpp"), p.reference()
        reached += not bool(torch.isfinite(y_ref).all())
        grad_y = torch.randn(y.shape, dtype=dtype, generator=torch.Generator().manual_seed(4))
        label = f"{activation}: {name}[{where}] = {value}"
        pairs = [("Y", y, y_ref, "out")] + [
            (f"d{n}", a, b, "grad")
            for n, a, b in zip(p.names, grads(y, p.inputs(), grad_y), grads(y_ref, p.inputs(), grad_y))]
        for what, a, b, kind in pairs:
            a, b = _unless_torch_disagrees_with_itself(activation, dtype, a, b)
            rtol, atol = TOLERANCES[dtype][kind]
            torch.testing.assert_close(a, b, rtol=rtol, atol=atol, equal_nan=True,
                                       msg=lambda m: f"{label} {what}: {m}")
    return reached


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS, indirect=True, ids=_variant_id)
def test_nan_and_inf_propagate_as_in_the_reference(variant, dtype):
    # Version 1's network, every one of its six inputs.
    reached = _check_nan_and_inf(lambda: make_problem(5, 3, 4, 6, 7, delay=2, dtype=dtype, seed=1), NAMES, "relu",
                                 dtype)
    assert reached >= 30, reached


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", [("tile", "auto"), ("tile", "base"), ("blas", "auto")], indirect=True,
                         ids=_variant_id)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_nan_and_inf_propagate_through_every_activation(activation, variant, dtype):
    reached = _check_nan_and_inf(
        lambda: make_problem(5, 3, 4, 6, 5, delay=2, dtype=dtype, seed=2, layers=3, activation=activation),
        ("x0", "u", "w2", "b3"), activation, dtype)
    assert reached >= 12, reached


def _overflowing_problem(dtype, mixed_signs):
    """Activations grow ~1e11x (float32) or ~1e100x (float64) per step: step 0 is finite and step 1
    overflows to Inf product by product, so the result does not depend on summation order.
    With mixed signs in W2, opposite infinities meet and make NaN."""
    scale = 1e10 if dtype == torch.float32 else 1e100
    g = torch.Generator().manual_seed(5)

    def positive(*shape, s=1.0):
        return ((torch.rand(*shape, generator=g, dtype=torch.float64) + 0.5) * s).to(dtype).requires_grad_()

    p = make_problem(3, 2, 3, 4, 6, dtype=dtype)
    p.x0, p.u, p.b1, p.b2 = positive(1, 3, 3), positive(6, 3, 2), positive(4), positive(3)
    p.w1, p.w2 = positive(4, 5, s=scale), positive(3, 4, s=scale)
    if mixed_signs:
        with torch.no_grad():
            p.w2[:, ::2].neg_()
    return p


# With FMA (the AVX2/AVX-512 tile kernels), an accumulator that is already -Inf absorbs a next
# product that overflows only when rounded (fma(a, b, -Inf) = -Inf, exactly), where the
# reference's separately rounded product is +Inf and makes NaN. The next ReLU then turns -Inf
# into 0, and later steps are finite where the reference's are NaN.
_FMA = torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512")
_FMA_GAP = ("tile kernels with FMA: -Inf + (a product that overflows only when rounded) stays -Inf instead of "
            "NaN, then ReLU makes later steps finite; csrc/cpu/tile_kernels.h gemm_block should not contract "
            "the products (or redo rows whose output is not finite without FMA)")


@pytest.mark.parametrize("mixed_signs", [False, True], ids=["inf", "inf-minus-inf"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", VARIANTS, indirect=True, ids=_variant_id)
def test_huge_values_overflow_as_in_the_reference(variant, dtype, mixed_signs, request):
    if variant in (("tile", "avx2"), ("tile", "auto")) and mixed_signs and _FMA:
        request.applymarker(pytest.mark.xfail(strict=True, reason=_FMA_GAP))
    p = _overflowing_problem(dtype, mixed_signs)
    y, y_ref = p.run("cpp"), p.reference()
    assert torch.isfinite(y_ref[0]).all() and not torch.isfinite(y_ref[1:]).any()
    assert bool(y_ref.isnan().any()) == mixed_signs and bool(y_ref.isinf().any()) != mixed_signs
    torch.testing.assert_close(y, y_ref, rtol=TOLERANCES[dtype]["out"][0], atol=0, equal_nan=True)
    # The backward goes through Inf and NaN without trouble (its values are order-dependent).
    got = grads(y, p.inputs(), torch.ones_like(y))
    assert [g.shape for g in got] == [t.shape for t in p.inputs()]


def _probe(cfg, timeout=600):
    env = {k: v for k, v in os.environ.items() if not k.startswith("FBFAST_")}
    proc = subprocess.run([sys.executable, os.path.join(HERE, "_memory_probe.py"), json.dumps(cfg)],
                          capture_output=True, text=True, timeout=timeout, env=env, cwd=os.path.dirname(HERE))
    assert proc.returncode == 0, f"{cfg}: exit code {proc.returncode}\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _needs_proc_memory():
    if not (os.path.exists("/proc/self/status") and os.access("/proc/self/clear_refs", os.W_OK)):
        pytest.skip("needs Linux /proc/self/status and a writable /proc/self/clear_refs")


def _long_bound(r):
    return 4 * (r["y_bytes"] + r["u_bytes"]) + 8 * MiB


def _check_long(r, record_property, label):
    bound = _long_bound(r)
    assert r["finite"] and r["tail_error"] < 1e-4, r
    assert r["peak_growth_bytes"] <= bound, (
        f"{label}: peak RSS grew {r['peak_growth_bytes'] / MiB:.1f} MiB for Y of {r['y_bytes'] / MiB:.1f} MiB "
        f"(bound {bound / MiB:.1f} MiB)")
    line = (f"{label}: steps=1e5, B=1 forward+backward in {r['seconds']:.2f} s, "
            f"peak RSS +{r['peak_growth_bytes'] / MiB:.1f} MiB (Y {r['y_bytes'] / MiB:.1f} MiB, "
            f"u {r['u_bytes'] / MiB:.1f} MiB; bound 4 x (Y + u) + 8 MiB = {bound / MiB:.1f} MiB)")
    print(line)
    record_property("fbfast_summary", line)


def test_1e5_steps_memory_is_proportional_to_y(record_property):
    _needs_proc_memory()
    # B = 1 and these widths take the tile path, the one "auto" picks for them.
    _check_long(_probe(dict(mode="long", steps=10**5)), record_property, "long rollout (tile)")


@pytest.mark.slow
def test_1e5_steps_memory_is_proportional_to_y_blas(record_property):
    _needs_proc_memory()
    _check_long(_probe(dict(mode="long", steps=10**5, env={"FBFAST_CPU_PATH": "blas"})), record_property,
                "long rollout (blas)")


def test_long_rollout_measure_sees_per_step_storage():
    # Keeping one hidden state per step (what a non-fused autograd would store) breaks the bound.
    _needs_proc_memory()
    r = _probe(dict(mode="long", steps=10**5, hog=True))
    assert r["peak_growth_bytes"] > _long_bound(r), r


@pytest.mark.slow
def test_1e4_steps_eager_reference_breaks_the_bound():
    # The unfused reference keeps every step's graph: the bound is one a naive rollout fails.
    _needs_proc_memory()
    r = _probe(dict(mode="long", steps=10**4, backend="eager"))
    assert r["peak_growth_bytes"] > _long_bound(r), r


# --- leaks -----------------------------------------------------------------------------------

LEAK_RSS_BOUND = 4 * MiB
LEAK_OBJECT_BOUND = 100


def _check_no_leak(r, record_property, label):
    assert r["rss_growth_bytes"] < LEAK_RSS_BOUND and r["object_growth"] < LEAK_OBJECT_BOUND, (
        f"{label}: after {r['calls_measured']} more calls RSS grew {r['rss_growth_bytes'] / MiB:.2f} MiB "
        f"(bound {LEAK_RSS_BOUND / MiB:.0f} MiB) and {r['object_growth']} gc objects appeared")
    line = (f"{label}: {r['calls_measured']} fwd+bwd calls after warm-up, RSS {r['rss_growth_bytes'] / MiB:+.2f} MiB "
            f"(bound {LEAK_RSS_BOUND / MiB:.0f} MiB), gc objects {r['object_growth']:+d}")
    print(line)
    record_property("fbfast_summary", line)


def test_no_leak_over_1e4_calls(record_property):
    # B = 4 is one tile, run on the calling thread: fast even when other jobs load the CPUs.
    _needs_proc_memory()
    _check_no_leak(_probe(dict(mode="leak", calls=10**4, warmup=1000, batch=4, env={"FBFAST_CPU_PATH": "tile"})),
                   record_property, "leak (tile, B=4)")


@pytest.mark.slow
def test_no_leak_over_1e4_calls_parallel_tiles(record_property):
    _needs_proc_memory()
    _check_no_leak(_probe(dict(mode="leak", calls=10**4, warmup=1000, batch=40, env={"FBFAST_CPU_PATH": "tile"})),
                   record_property, "leak (tile, B=40, parallel tiles)")


def test_no_leak_blas_path(record_property):
    # The BLAS path runs ATen ops per step; one thread keeps 2000 calls fast on a loaded machine.
    _needs_proc_memory()
    _check_no_leak(_probe(dict(mode="leak", calls=2000, warmup=500, batch=4, threads=1,
                               env={"FBFAST_CPU_PATH": "blas"})),
                   record_property, "leak (blas, 1 thread)")


@pytest.mark.slow
def test_no_leak_blas_path_1e4_calls(record_property):
    _needs_proc_memory()
    _check_no_leak(_probe(dict(mode="leak", calls=10**4, warmup=1000, batch=40, env={"FBFAST_CPU_PATH": "blas"})),
                   record_property, "leak (blas)")


def test_leak_measure_sees_a_small_leak():
    # 2 KiB kept per call over 3000 calls: both signals fire.
    _needs_proc_memory()
    r = _probe(dict(mode="leak", calls=3500, warmup=500, batch=4, leak_bytes=2048))
    assert r["rss_growth_bytes"] >= LEAK_RSS_BOUND and r["object_growth"] >= LEAK_OBJECT_BOUND, r


# --- threads ---------------------------------------------------------------------------------

THREAD_PROBLEMS = [  # (B, Du, O, H, delay, truncate, dtype, layers, activation): different shapes, modes,
    (70, 3, 8, 24, 2, None, torch.float32, 2, "relu"),      # dtypes and networks
    (33, 0, 5, 17, 1, 3, torch.float64, 3, "silu"),
    (150, 2, 4, 40, 3, 2, torch.float32, 4, "gelu"),
    (9, 5, 3, 7, 1, 1, torch.float64, 1, "relu"),
    (40, 2, 6, 12, 1, None, torch.float32, 3, "tanh"),
]


@pytest.mark.parametrize("cpu_path", PATHS, indirect=True)
def test_four_threads_match_sequential_calls(cpu_path):
    problems = [make_problem(B, Du, O, H, 10, delay=k, truncate=K, dtype=dt, seed=i, layers=L, activation=act)
                for i, (B, Du, O, H, k, K, dt, L, act) in enumerate(THREAD_PROBLEMS)]
    grad_ys = [torch.randn(10, p.x0.shape[1], p.x0.shape[2], dtype=p.x0.dtype) for p in problems]
    sequential = [_results(p, gy) for p, gy in zip(problems, grad_ys)]
    concurrent = [[] for _ in problems]
    errors = []
    start = threading.Barrier(len(problems))

    def worker(i):
        try:
            start.wait()
            for _ in range(8):
                concurrent[i].append(_results(problems[i], grad_ys[i]))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(problems))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, errors
    for i, runs in enumerate(concurrent):
        assert len(runs) == 8
        for run in runs:
            for name, a, b in zip(["y"] + problems[i].names, sequential[i], run):
                assert torch.equal(a, b), f"problem {i}, {name}: a concurrent call differs from the sequential one"


NETWORKS = [(2, "relu"), (3, "silu"), (4, "mish")]


@pytest.mark.parametrize("layers,activation", NETWORKS, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("cpu_path", PATHS, indirect=True)
def test_thread_count_does_not_change_results(cpu_path, dtype, layers, activation):
    # The tile path sums weight gradients in a fixed order: bitwise equal for any thread count.
    # The BLAS path inherits MKL's GEMM blocking, which may depend on the thread count: equal
    # within the documented tolerance.
    p = make_problem(150, 3, 8, 24, 12, delay=2, truncate=5, dtype=dtype, layers=layers, activation=activation)
    grad_y = torch.randn(12, 150, 8, dtype=dtype)
    default = torch.get_num_threads()
    runs = {}
    try:
        for n in sorted({1, default, 3}):
            torch.set_num_threads(n)
            runs[n] = _results(p, grad_y)
    finally:
        torch.set_num_threads(default)
    for n, run in runs.items():
        for name, a, b in zip(["y"] + p.names, runs[1], run):
            if cpu_path == "tile":
                assert torch.equal(a, b), f"{name}: {n} threads differ bitwise from 1 thread"
            else:
                assert_close(b, a, dtype, "out" if name == "y" else "grad", f"{name}, {n} threads vs 1")


# --- determinism -----------------------------------------------------------------------------


@pytest.mark.parametrize("layers,activation", NETWORKS, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype,Du", [(torch.float64, 0), (torch.float32, 3)], ids=["float64-no_u", "float32-u"])
@pytest.mark.parametrize("cpu_path", PATHS, indirect=True)
def test_repeated_calls_are_bitwise_identical(cpu_path, dtype, Du, layers, activation):
    # 150 rows: 10 backward tiles over 8 groups, so the group split is uneven.
    p = make_problem(150, Du, 6, 20, 8, delay=3, truncate=4, dtype=dtype, seed=7, layers=layers, activation=activation)
    grad_y = torch.randn(8, 150, 6, dtype=dtype)
    first = _results(p, grad_y)
    for _ in range(2):
        for name, a, b in zip(["y"] + p.names, first, _results(p, grad_y)):
            assert torch.equal(a, b), f"{name} changed between identical calls"


# --- meta tensors ----------------------------------------------------------------------------


def _meta_args():
    p = make_problem(4, 3, 2, 5, 6, delay=2, requires_grad=False)
    return [None if t is None else t.to("meta") for t in (p.x0, p.w1, p.b1, p.w2, p.b2, p.u)]


def test_meta_tensors_give_meta_results_on_eager_and_auto(monkeypatch):
    # Shape inference: "eager" (and "auto", which has no kernel for meta) run the reference on
    # meta tensors and return a meta Y of the right shape, with meta gradients.
    monkeypatch.delenv("FBFAST_BACKEND", raising=False)
    x0, w1, b1, w2, b2, u = _meta_args()
    w1.requires_grad_()
    for backend in ("eager", "auto"):
        y = fbfast.rollout(x0, w1, b1, w2, b2, u=u, delay=2, backend=backend)
        assert y.device.type == "meta" and y.shape == (6, 4, 2)
        (g,) = torch.autograd.grad(y.sum(), [w1])
        assert g.device.type == "meta" and g.shape == w1.shape


def test_meta_tensors_on_cpp_are_a_clear_error():
    x0, w1, b1, w2, b2, u = _meta_args()
    with pytest.raises(ValueError, match=r"backend 'cpp' runs on cpu tensors, got tensors on meta"):
        fbfast.rollout(x0, w1, b1, w2, b2, u=u, delay=2, backend="cpp")


def test_meta_tensors_through_the_operator_use_the_fake_kernel():
    x0, w1, b1, w2, b2, u = _meta_args()
    y = torch.ops.fbfast.rollout_forward.default(x0, u, [w1, w2], [b1, b2], 6, 2, 0, "relu", 0.0)
    assert y.device.type == "meta" and y.shape == (6, 4, 2)
    gx0, gu, gw, gb = torch.ops.fbfast.rollout_backward.default(torch.empty_like(y), y, x0, u, [w1, w2], [b1, b2], 2,
                                                                0, "relu", 0.0, [True] * 6)
    grads_ = [gx0, gu, gw[0], gb[0], gw[1], gb[1]]
    assert [tuple(g.shape) for g in grads_] == [tuple(x0.shape), tuple(u.shape), tuple(w1.shape), tuple(b1.shape),
                                                tuple(w2.shape), tuple(b2.shape)]
