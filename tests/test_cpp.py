"""The fused C++ CPU kernel ("cpp") against the reference: every mode, both paths, both ISAs."""

from __future__ import annotations

import pytest
import torch

import fbfast
from testing import CPP, MODE_GRID, assert_close, cpu_variant, grads, make_problem

pytestmark = pytest.mark.skipif(not CPP, reason="the C++ kernel is not built")

# The CPU kernel has two paths (per-tile SIMD loop, per-step BLAS) and three instruction-set
# variants of the tile path (avx512 / avx2 / base: "auto" is the widest this CPU has);
# fbfast.kernel_options pins them for a test (tests/testing.py, cpu_variant).
VARIANTS = [("auto", "auto"), ("tile", "avx2"), ("tile", "base"), ("blas", "auto")]


@pytest.fixture
def variant(request):
    path, isa = request.param
    with cpu_variant(path, isa):
        yield request.param


def _compare(p, dtype, label):
    y = p.run("cpp")
    y_ref = p.reference()
    assert y.dtype == dtype and y.shape == y_ref.shape
    assert_close(y, y_ref, dtype, "out", f"{label} Y")
    gy = torch.randn_like(y_ref)
    ins = p.inputs()
    for name, a, b in zip("x0 u w1 b1 w2 b2".split(), grads(y, ins, gy), grads(y_ref, ins, gy)):
        assert_close(a, b, dtype, "grad", f"{label} d{name}")


def _case_id(c):
    return "B{B}-Du{Du}-T{T}-k{delay}-K{truncate}-{b}".format(b="bias" if c["bias"] else "nobias", **c)


@pytest.mark.parametrize("variant", VARIANTS, indirect=True, ids=lambda v: f"{v[0]}-{v[1]}")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("case", MODE_GRID, ids=_case_id)
def test_mode_grid_matches_reference(case, dtype, variant):
    c = dict(case)
    p = make_problem(c.pop("B"), c.pop("Du"), O=3, H=5, T=c.pop("T"), dtype=dtype, **c)
    _compare(p, dtype, _case_id(case))


# Widths that are not multiples of the vector width (4 to 16 floats) or the 4/8-row micro
# tile, batches that are not multiples of the 16- or 64-row backward tile, and both sides of
# work H * (Du + 2 O) = 32768 (above it: wide backward tiles, and BLAS for the portable build).
@pytest.mark.parametrize("variant", VARIANTS, indirect=True, ids=lambda v: f"{v[0]}-{v[1]}")
@pytest.mark.parametrize("B,Du,O,H,T,delay,truncate", [
    (33, 3, 17, 37, 7, 2, None),
    (17, 0, 9, 31, 6, 1, 2),
    (5, 11, 1, 1, 4, 3, None),
    (70, 5, 8, 24, 5, 1, 4),
    (3, 0, 64, 256, 3, 1, None),   # exactly at the switch
    (67, 0, 64, 257, 3, 2, None),  # just above: 64-row backward tiles, two of them
])
def test_odd_widths(B, Du, O, H, T, delay, truncate, variant):
    for dtype in (torch.float64, torch.float32):
        p = make_problem(B, Du, O, H, T, delay=delay, truncate=truncate, dtype=dtype)
        _compare(p, dtype, f"{B},{Du},{O},{H},{T} {dtype}")


@pytest.mark.parametrize("delay,truncate", [(1, None), (1, 1), (2, None), (3, 2)])
@pytest.mark.parametrize("Du,bias", [(0, True), (2, False)])
@pytest.mark.parametrize("path", ["tile", "blas"])
def test_gradcheck_and_gradgradcheck(delay, truncate, Du, bias, path):
    with cpu_variant(path):
        _gradcheck_and_gradgradcheck(delay, truncate, Du, bias)


def _gradcheck_and_gradgradcheck(delay, truncate, Du, bias):
    p = make_problem(3, Du, 2, 4, 5, delay=delay, truncate=truncate, bias=bias)
    names = [n for n, t in zip("x0 u w1 b1 w2 b2".split(), (p.x0, p.u, p.w1, p.b1, p.w2, p.b2)) if t is not None]

    def fn(*ins):
        kw = dict(zip(names, ins))
        return fbfast.rollout(kw["x0"], kw["w1"], kw.get("b1"), kw["w2"], kw.get("b2"), steps=p.steps,
                              u=kw.get("u"), delay=delay, truncate=truncate, backend="cpp")

    if truncate is None:
        assert torch.autograd.gradcheck(fn, p.inputs())
        assert torch.autograd.gradgradcheck(fn, p.inputs())
        return
    # A truncated gradient is by definition not the derivative of the forward values (the cut
    # edges still carry values), so numerical checks do not apply; the first and second
    # derivatives must equal autograd of the reference, which detaches the same edges.
    gy = torch.randn(p.steps, 3, 2, dtype=torch.float64)
    first = torch.autograd.grad(p.run("cpp"), p.inputs(), gy, create_graph=True)
    first_ref = torch.autograd.grad(p.reference(), p.inputs(), gy, create_graph=True)
    for a, b in zip(first, first_ref):
        assert_close(a, b, torch.float64, "grad")
    second = grads(sum((g * g).sum() for g in first), p.inputs(), torch.tensor(1.0, dtype=torch.float64))
    second_ref = grads(sum((g * g).sum() for g in first_ref), p.inputs(), torch.tensor(1.0, dtype=torch.float64))
    for a, b in zip(second, second_ref):
        assert_close(a, b, torch.float64, "grad")


# Direct operator arguments: (x0, u, weights, biases, steps, delay, truncate, activation, param).
_OPCHECK_NETWORKS = [(1, "relu", 0.0), (2, "silu", 0.0), (3, "leaky_relu", 0.2), (4, "tanh", 0.0)]


def _opcheck_samples():
    out = []
    for requires_grad in (False, True):
        for (Du, bias), (delay, truncate), (layers, act, param) in zip(
                ((0, True), (3, False), (0, False), (3, True)), ((1, 0), (3, 2), (2, 1), (1, 3)), _OPCHECK_NETWORKS):
            g = torch.Generator().manual_seed(layers)
            widths = [Du + 3] + [6, 5, 7][: layers - 1] + [3]
            rnd = lambda *s: torch.randn(*s, generator=g).requires_grad_(requires_grad)  # noqa: E731
            weights = [rnd(widths[l + 1], widths[l]) for l in range(layers)]
            biases = [rnd(widths[l + 1]) if bias or l == 0 else None for l in range(layers)]
            out.append((rnd(delay, 5, 3), rnd(4, 5, Du) if Du else None, weights, biases, 4, delay, truncate,
                        act, param))
    return out


def _detached(args):
    def d(a):
        if isinstance(a, torch.Tensor):
            return a.detach()
        if isinstance(a, list):
            return [d(t) for t in a]
        return a
    return [d(a) for a in args]


def _mask(u, weights, biases):
    return [True, u is not None] + [True] * len(weights) + [b is not None for b in biases]


@pytest.mark.parametrize("args", _opcheck_samples())
def test_opcheck_forward(args):
    torch.library.opcheck(torch.ops.fbfast.rollout_forward.default, args)


@pytest.mark.parametrize("args", _opcheck_samples())
def test_opcheck_backward(args):
    x0, u, w, b, steps, delay, truncate, act, param = _detached(args)
    y = torch.ops.fbfast.rollout_forward.default(x0, u, w, b, steps, delay, truncate, act, param)
    torch.library.opcheck(torch.ops.fbfast.rollout_backward.default,
                          (torch.randn_like(y), y, x0, u, w, b, delay, truncate, act, param, _mask(u, w, b)))


@pytest.mark.parametrize("args", _opcheck_samples())
@pytest.mark.parametrize("path", ["blas", "tile"])
def test_opcheck_hidden_variants(args, path):
    # The pair autograd uses on the CPU for wide layers: the forward keeps what every hidden
    # layer's backward reads, the backward reads it instead of recomputing (csrc/cpu/path_rule.h),
    # on either path; a narrow first layer of a deeper network is recomputed, its entry (0,).
    x0, u, w, b, steps, delay, truncate, act, param = _detached(args)
    with fbfast.kernel_options(cpu_path=path):
        torch.library.opcheck(torch.ops.fbfast.rollout_forward_hidden.default, (x0, u, w, b, steps, delay, act, param))
        y, hidden = torch.ops.fbfast.rollout_forward_hidden.default(x0, u, w, b, steps, delay, act, param)
        assert len(hidden) == len(w) - 1
        assert [tuple(h.shape) for h in hidden] == [
            (0,) if l == 0 and len(w) >= 3 and w[0].shape[1] < 64 else (steps, 5, w[l].shape[0])
            for l in range(len(w) - 1)]
        # The same calls, writing into buffers of another alignment: MKL may round differently.
        torch.testing.assert_close(y, torch.ops.fbfast.rollout_forward.default(x0, u, w, b, steps, delay, 0, act, param),
                                   rtol=1e-5, atol=1e-6)
        gy = torch.randn_like(y)
        args_b = (gy, y, hidden, x0, u, w, b, delay, truncate, act, param, _mask(u, w, b))
        torch.library.opcheck(torch.ops.fbfast.rollout_backward_hidden.default, args_b)
        expected = torch.ops.fbfast.rollout_backward.default(gy, y, x0, u, w, b, delay, truncate, act, param,
                                                             _mask(u, w, b))
        got = torch.ops.fbfast.rollout_backward_hidden.default(*args_b)
    for a, e in zip([got[0], got[1], *got[2], *got[3]], [expected[0], expected[1], *expected[2], *expected[3]]):
        assert_close(a, e, torch.float32, "grad")  # MKL may split its GEMMs differently from call to call


@pytest.mark.parametrize("path", ["tile", "blas", "auto"])
def test_wide_training_keeps_hidden_only_on_the_blas_path(path):
    # Autograd saves the forward's hidden activations exactly where the kernel takes its BLAS
    # path; either way the gradients equal the reference's.
    p = make_problem(5, 2, 3, 7, 6, delay=2, truncate=4)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with cpu_variant(path):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            y = p.run("cpp")
        got = grads(y, p.inputs(), torch.ones_like(y))
    keeps = path == "blas"  # at these widths "auto" takes the tile path
    assert any(tuple(t.shape) == (6, 5, 7) for t in saved) == keeps, [tuple(t.shape) for t in saved]
    for a, b in zip(got, grads(p.reference(), p.inputs(), torch.ones_like(y))):
        assert_close(a, b, torch.float64, "grad")


def test_backward_masks_return_empty_for_unwanted():
    p = make_problem(4, 2, 3, 5, 6, delay=2, requires_grad=False)
    y = p.run("cpp")
    gx0, gu, gw, gb = torch.ops.fbfast.rollout_backward.default(
        torch.ones_like(y), y, p.x0, p.u, [p.w1, p.w2], [p.b1, p.b2], 2, 0, "relu", 0.0,
        [False, True, False, True, False, False])
    assert [tuple(t.shape) for t in (gx0, gu, *gw, *gb)] == [(0,), tuple(p.u.shape), (0,), tuple(p.w2.shape), (0,), (0,)]


class _Rollout(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = fbfast.FeedbackMLP(5, 16, 3)

    def forward(self, x0, u):
        return self.net.rollout(x0, u=u, delay=2, truncate=3).square().mean()


def test_torch_compile_fullgraph_matches_eager():
    # Inductor with fullgraph=True: a graph break would raise. The fake kernels give shapes, and
    # the C++ autograd puts the fused rollout_backward into the backward graph.
    torch.manual_seed(0)
    model = _Rollout()
    x0, u = torch.randn(2, 4, 3), torch.randn(9, 4, 2)
    loss = model(x0, u)
    (g,) = torch.autograd.grad(loss, [model.net.fc1.weight])
    compiled = torch.compile(model, fullgraph=True)
    loss_c = compiled(x0, u)
    (g_c,) = torch.autograd.grad(loss_c, [model.net.fc1.weight])
    torch.testing.assert_close(loss_c, loss)
    torch.testing.assert_close(g_c, g)


def test_deterministic_bitwise():
    for path in ("tile", "blas"):
        p = make_problem(37, 3, 8, 24, 20, delay=2, truncate=5, dtype=torch.float32)
        gy = torch.randn(20, 37, 8)
        with cpu_variant(path):
            runs = []
            for _ in range(3):
                y = p.run("cpp")
                runs.append([y] + grads(y, p.inputs(), gy))
        for other in runs[1:]:
            for a, b in zip(runs[0], other):
                assert torch.equal(a, b), path


def test_thread_count_does_not_change_tile_results():
    p = make_problem(70, 3, 8, 24, 12, delay=2, dtype=torch.float32)
    gy = torch.randn(12, 70, 8)
    before = torch.get_num_threads()
    results = []
    try:
        for n in (1, before):
            torch.set_num_threads(n)
            y = p.run("cpp")
            results.append([y] + grads(y, p.inputs(), gy))
    finally:
        torch.set_num_threads(before)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_non_contiguous_inputs():
    p = make_problem(6, 2, 3, 5, 4, delay=2, dtype=torch.float64)
    big = torch.randn(2, 12, 6, dtype=torch.float64)
    x0 = big[:, ::2, ::2]  # (2, 6, 3), strided
    w1 = p.w1.detach().t().contiguous().t()
    u = p.u.detach().transpose(0, 1).contiguous().transpose(0, 1)
    assert not (x0.is_contiguous() or w1.is_contiguous() or u.is_contiguous())
    y = fbfast.rollout(x0, w1, p.b1, p.w2, p.b2, u=u, delay=2, backend="cpp")
    y_ref = fbfast.rollout_reference(x0, w1, p.b1, p.w2, p.b2, 4, u, 2)
    assert_close(y, y_ref, torch.float64)


def test_non_contiguous_grad_output():
    p = make_problem(4, 0, 3, 5, 6, dtype=torch.float64)
    y, y_ref = p.run("cpp"), p.reference()
    gy = torch.randn(6, 3, 4, dtype=torch.float64).transpose(1, 2)
    for a, b in zip(grads(y, p.inputs(), gy), grads(y_ref, p.inputs(), gy)):
        assert_close(a, b, torch.float64, "grad")


def test_auto_picks_cpp_for_cpu_float():
    p = make_problem(2, 0, 3, 4, 3, dtype=torch.float32)
    y = fbfast.rollout(p.x0, p.w1, p.b1, p.w2, p.b2, steps=3)
    assert "RolloutFunction" in y.grad_fn.name()


@pytest.mark.parametrize("case", ["x0_from_w1", "w1_is_w2", "chained_rollouts"])
def test_double_backward_counts_each_path_once(case):
    # create_graph=True through the fused op must equal the same derivatives of the reference
    # when the inputs have history of their own (x0 made from w1, one tensor used twice, or a
    # second rollout continued from the first without detaching).
    g = torch.Generator().manual_seed(0)
    w1 = (torch.randn(4, 2, generator=g, dtype=torch.float64) * 0.5).requires_grad_()
    w2 = (torch.randn(2, 4, generator=g, dtype=torch.float64) * 0.5).requires_grad_()

    def run(backend):
        if case == "x0_from_w1":
            return fbfast.rollout(w1.sum() * torch.ones(3, 2, dtype=torch.float64), w1, None, w2, None,
                                  steps=4, backend=backend)
        if case == "w1_is_w2":
            w = w1[:2, :2] * 1.0
            return fbfast.rollout(torch.ones(3, 2, dtype=torch.float64), w, None, w, None, steps=4, backend=backend)
        y1 = fbfast.rollout(torch.ones(2, 3, 2, dtype=torch.float64), w1, None, w2, None, steps=4, delay=2,
                            backend=backend)
        return fbfast.rollout(y1[-2:], w1, None, w2, None, steps=4, delay=2, backend=backend)

    first, = torch.autograd.grad(run("cpp").square().sum(), w1, create_graph=True)
    first_ref, = torch.autograd.grad(run("eager").square().sum(), w1, create_graph=True)
    assert_close(first, first_ref, torch.float64, "grad")
    other = w1 if case == "w1_is_w2" else w2  # w2 takes no part in the w1_is_w2 case
    second, = torch.autograd.grad(first.square().sum(), other)
    second_ref, = torch.autograd.grad(first_ref.square().sum(), other)
    assert_close(second, second_ref, torch.float64, "grad")


def test_empty_result_with_huge_steps_does_not_loop():
    # B = 0: nothing to compute, whatever steps says; double backward included.
    w1 = torch.randn(4, 2, dtype=torch.float64, requires_grad=True)
    w2 = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    for backend in ("eager", "cpp"):
        y = fbfast.rollout(torch.randn(0, 2, dtype=torch.float64), w1, None, w2, None, steps=10**12,
                           backend=backend)
        assert y.shape == (10**12, 0, 2)
        g, = torch.autograd.grad(y.sum(), w1, create_graph=True)
        assert torch.equal(g, torch.zeros_like(w1))


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_backward_hidden_refuses_a_wrong_hidden(device):
    p = make_problem(4, 2, 3, 5, 6, requires_grad=False)
    w, b = [p.w1, p.w2], [p.b1, p.b2]
    y, hidden = torch.ops.fbfast.rollout_forward_hidden.default(p.x0, p.u, w, b, 6, 1, "relu", 0.0)
    to = lambda t: t.to(device)  # noqa: E731
    args = [to(torch.ones_like(y)), to(y), [to(hidden[0][:, :, :4])], to(p.x0), to(p.u), [to(t) for t in w],
            [to(t) for t in b], 1, 0, "relu", 0.0, [True] * 6]
    with pytest.raises(RuntimeError, match=r"hidden\[0\] must be \(T=6, B=4, 5\), got \[6, 4, 4\]"):
        torch.ops.fbfast.rollout_backward_hidden.default(*args)


def _ops_run(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return {e.name for e in prof.events()}


def test_hidden_activations_are_kept_only_when_a_backward_can_follow():
    # A wide layer with a small batch trains on the BLAS path, keeping the hidden activations;
    # the same call under no_grad, or with nothing requiring grad, must not pay for them.
    p = make_problem(8, 0, 64, 512, 5, dtype=torch.float32)
    run = lambda: p.run("cpp")  # noqa: E731
    assert "fbfast::rollout_forward_hidden" in _ops_run(run)
    with torch.no_grad():
        assert "fbfast::rollout_forward_hidden" not in _ops_run(run)
    q = make_problem(8, 0, 64, 512, 5, dtype=torch.float32, requires_grad=False)
    assert "fbfast::rollout_forward_hidden" not in _ops_run(lambda: q.run("cpp"))


def test_direct_forward_checks_truncate_and_devices_before_choosing_a_path():
    p = make_problem(8, 0, 64, 512, 5, dtype=torch.float32)
    with pytest.raises(RuntimeError, match=r"truncate must be >= 0"):
        torch.ops.fbfast.rollout_forward.default(p.x0, None, [p.w1, p.w2], [p.b1, p.b2], 5, 1, -3, "relu", 0.0)
    with pytest.raises(RuntimeError, match=r"w1 is on meta but x0 is on cpu"):
        torch.ops.fbfast.rollout_forward.default(p.x0, None, [p.w1.to("meta"), p.w2], [p.b1, p.b2], 5, 1, 0, "relu",
                                                 0.0)


# The tile backward recomputes every hidden layer's activation (and act'(z)) from Y instead of
# reading what the forward computed; its kernels are written so that both give the same bits
# (csrc/cpu/vec_math.h: one exp, never inlined, behind every activation that needs one). The
# oracle: the same backward reading the forward's own kept values (rollout_backward_hidden) must
# give the same gradients bit for bit, for every activation, dtype and instruction set.
@pytest.mark.parametrize("isa", ["avx512", "avx2", "base"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("activation", ["relu", "leaky_relu", "elu", "tanh", "sigmoid", "silu", "gelu",
                                        "gelu_tanh", "mish"])
@pytest.mark.parametrize("layers,Du", [(2, 3), (3, 64)], ids=["L2", "L3-wide-input"])
def test_tile_backward_recomputes_the_forwards_activations_bitwise(isa, dtype, activation, layers, Du):
    param = {"leaky_relu": 0.2, "elu": 0.7}.get(activation, 0.0)
    p = make_problem(9, Du, 5, 24, 7, delay=2, truncate=3, dtype=dtype, layers=layers, requires_grad=False)
    w, b = list(p.weights), list(p.biases)
    mask = [True] * (2 + 2 * layers)
    with cpu_variant("tile", isa):
        y, kept = torch.ops.fbfast.rollout_forward_hidden.default(p.x0, p.u, w, b, 7, 2, activation, param)
        assert all(k.numel() for k in kept)  # every hidden layer kept: nothing left to recompute there
        assert torch.equal(y, torch.ops.fbfast.rollout_forward.default(p.x0, p.u, w, b, 7, 2, 3, activation, param))
        gy = torch.randn_like(y)
        recomputed = torch.ops.fbfast.rollout_backward.default(gy, y, p.x0, p.u, w, b, 2, 3, activation, param, mask)
        read = torch.ops.fbfast.rollout_backward_hidden.default(gy, y, kept, p.x0, p.u, w, b, 2, 3, activation,
                                                                param, mask)
    for a, e in zip([read[0], read[1], *read[2], *read[3]], [recomputed[0], recomputed[1], *recomputed[2],
                                                               *recomputed[3]]):
        assert torch.equal(a, e), f"max difference {(a - e).abs().max().item():.3e}"
