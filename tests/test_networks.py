"""The compiled "cpp" backend on general networks (docs/spec.md §1.1): every activation, depths 1
to 5, against the reference.

Over activations x depths, each test runs a handful of modes (delay, u, truncate, which biases
exist, float32/float64, odd widths and batch sizes) rather than their full product, which
tests/test_cpp.py covers for two-layer ReLU. Also: values and derivatives where every hidden
pre-activation is exactly 0 (the kink), non-contiguous and expanded inputs, zero sizes, float64
gradcheck and gradgradcheck through the C++ autograd, torch.library.opcheck of the operators
with the list schema, and torch.compile(fullgraph=True) around a deep rollout.

float32 results are compared with the float64 reference run on the same (rounded) values, with
the tolerances of fbfast/testing.py.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import fbfast
from fbfast._spec import ACTIVATIONS as TABLE
from fbfast._spec import ResolvedActivation, resolve_activation
from testing import CPP, CPP_REASON, Problem, assert_close, cpu_variant, grads, make_problem

pytestmark = pytest.mark.skipif(not CPP, reason=CPP_REASON)

F32, F64 = torch.float32, torch.float64

# id -> activation as fbfast.rollout takes it (non-default parameters too).
ACTIVATIONS = {
    "relu": "relu", "leaky_relu": "leaky_relu", "leaky_relu_0.2": nn.LeakyReLU(0.2), "elu": "elu",
    "elu_0.5": nn.ELU(alpha=0.5), "tanh": "tanh", "sigmoid": "sigmoid", "silu": "silu", "gelu": "gelu",
    "gelu_tanh": "gelu_tanh", "mish": "mish",
}
# depth -> hidden widths: odd, not multiples of any vector width.
DEPTHS = {1: (), 2: (7,), 3: (5, 9), 5: (3, 11, 6, 5)}
# (B, Du, O, T, delay, truncate, bias, dtype): odd batch sizes; both sides of every mode.
MODES = [
    (7, 3, 3, 6, 1, None, True, F64),
    (1, 0, 5, 5, 2, 2, False, F64),
    (33, 2, 3, 4, 3, 1, "mixed", F32),
    (5, 5, 1, 7, 1, 3, True, F32),
]


def _as_float64(p):
    """The same problem in float64, from the already-rounded values, on leaves of its own."""
    def conv(t):
        return None if t is None else t.detach().double().requires_grad_(t.requires_grad)
    return Problem(conv(p.x0), conv(p.u), [conv(w) for w in p.weights], [conv(b) for b in p.biases],
                                  p.steps, p.delay, p.truncate, p.activation)


def _compare(p, label, backend="cpp"):
    """Y and every gradient of ``backend`` against the float64 reference, in p's dtype's tolerance."""
    dtype = p.x0.dtype
    y = p.run(backend)
    q = _as_float64(p)
    y_ref = q.reference()
    assert y.dtype == dtype and y.shape == y_ref.shape, label
    assert_close(y.double(), y_ref, dtype, "out", f"{label} Y")
    gy = torch.randn(y_ref.shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    for name, a, b in zip(p.names, grads(y, p.inputs(), gy.to(dtype)), grads(y_ref, q.inputs(), gy)):
        assert a.dtype == dtype, name
        assert_close(a.double(), b, dtype, "grad", f"{label} d{name}")


def _problem(depth, activation, B, Du, O, T, delay, truncate, bias, dtype, seed=0, **kw):
    layers = len(DEPTHS[depth]) + 1
    if bias == "mixed":
        bias = [l % 2 == 0 for l in range(layers)]
    return make_problem(B, Du, O, 0, T, delay=delay, truncate=truncate, bias=bias, dtype=dtype, seed=seed,
                        layers=DEPTHS[depth], activation=activation, **kw)


@pytest.mark.parametrize("depth", list(DEPTHS))
@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_matches_reference(act, depth):
    for i, mode in enumerate(MODES):
        p = _problem(depth, ACTIVATIONS[act], *mode, seed=i)
        _compare(p, f"{act} depth={depth} mode={mode}")


VARIANTS = [("tile", "base"), ("tile", "avx2"), ("blas", "auto")]


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: f"{v[0]}-{v[1]}")
@pytest.mark.parametrize("act", ["elu_0.5", "silu", "gelu_tanh", "mish"])
def test_kernel_variants(act, variant):
    """The CPU kernel's paths and instruction sets, each pinned (tests/testing.py, cpu_variant)."""
    with cpu_variant(*variant):
        for depth, mode in ((3, MODES[0]), (2, MODES[2])):
            _compare(_problem(depth, ACTIVATIONS[act], *mode, seed=depth), f"{act} {variant} depth={depth}")


# Pre-activations from the smallest to beyond exp's range: the tile kernels' vectorised
# activations (csrc/cpu/vec_math.h) must keep torch's relative accuracy near 0 (tanh(1e-8),
# elu(-1e-8): no cancellation) and its limits far out (silu(-1000) = -0, mish(90) = 90).
_Z = [0.0, 1e-30, 1e-8, 1e-5, 1e-3, 0.03, 0.3, 0.7, 1.0, 2.5, 6.0, 15.0, 30.0, 45.0, 90.0, 1000.0]
_Z = _Z + [-z for z in _Z[1:]]


@pytest.mark.parametrize("variant", VARIANTS + [("tile", "auto")], ids=lambda v: f"{v[0]}-{v[1]}")
@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_activation_values_and_derivatives(act, dtype, variant):
    """One step of Linear -> act -> Linear with identity weights: Y = act(u) exactly, du =
    act'(u) * grad_y, compared with torch's activation in float64 on the same values.

    Values: to a relative 4e-6 in float32 (GELU's erfc approximation: 1.2e-7) and 1e-12 in
    float64, plus 8 ulp of |z| absolute: formulas such as GELU's z (1 + erf(z / sqrt 2)) / 2 lose
    that much to cancellation in torch itself, while a cancellation near z = 0 (tanh or elu from
    exp(z) - 1) is still caught. Derivatives: the same relative bound plus 8 ulp of 1 + |z|
    (1 - tanh(z)^2 at z = 15 is all rounding error of tanh(z))."""
    n = len(_Z)
    u = torch.tensor(_Z, dtype=dtype).reshape(1, 1, n).requires_grad_()
    eye = torch.eye(n, dtype=dtype)
    w1 = torch.cat([eye, torch.zeros(n, n, dtype=dtype)], 1)
    spec = ACTIVATIONS[act]
    with cpu_variant(*variant):
        y = fbfast.rollout(torch.zeros(1, n, dtype=dtype), w1, None, eye, None, u=u, activation=spec,
                           backend="cpp")
        (du,) = torch.autograd.grad(y, u, torch.ones_like(y))
    fn = resolve_activation(spec).fn
    z = u.detach().double().flatten().requires_grad_()
    h = fn(z)
    (dz,) = torch.autograd.grad(h, z, torch.ones_like(h))
    rtol, eps = (1e-12, torch.finfo(F64).eps) if dtype == F64 else (4e-6, torch.finfo(F32).eps)
    zabs = z.detach().abs()
    for what, got, want, atol in (("values", y, h, 8 * eps * zabs), ("derivatives", du, dz, 8 * eps * (1 + zabs))):
        got, want = got.double().flatten(), want.detach()
        bad = (got - want).abs() > rtol * want.abs() + atol
        assert not bad.any(), (f"{act} {what} at z = {z[bad].tolist()}: got {got[bad].tolist()}, "
                               f"torch {want[bad].tolist()}")


def test_wide_layers_take_both_cpu_paths():
    """Above the tile/BLAS switch (csrc/cpu/path_rule.h) too: wide hidden layers, a few activations."""
    for act in ("gelu", "leaky_relu_0.2", "sigmoid"):
        p = make_problem(9, 3, 17, 0, 4, delay=2, dtype=F32, layers=(300, 129), activation=ACTIVATIONS[act])
        _compare(p, f"wide {act}")


@pytest.mark.parametrize("depth", [2, 3])
@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_kink_matches_torch(act, depth):
    """Every hidden pre-activation exactly 0 (w1, b1 and, at depth 3, w2, b2 zero): values and
    gradients, through act(0) and act'(0), equal the reference's, which are torch's modules'."""
    p = _problem(depth, ACTIVATIONS[act], 4, 2, 3, 5, 1, None, True, F64, seed=3, requires_grad=False)
    with torch.no_grad():
        for l in range(depth - 1):
            p.weights[l].zero_()
            p.biases[l].zero_()
    for t in p.inputs():
        t.requires_grad_(True)
    _compare(p, f"kink {act} depth={depth}")
    # The case is the kink: the first gradient that crosses act'(0) is exactly what torch says.
    y = p.run("cpp")
    (gb,) = torch.autograd.grad(y.sum(), p.biases[depth - 2])
    resolved = resolve_activation(ACTIVATIONS[act])
    module = TABLE[resolved.name].make_module(resolved.param)
    zero = torch.zeros(p.weights[depth - 1].shape[1], dtype=F64, requires_grad=True)
    (slope,) = torch.autograd.grad(module(zero).sum(), zero)
    rows = y.shape[0] * y.shape[1]  # d(sum Y)/dY is 1 for every step and row
    want = slope * (torch.full((y.shape[-1],), float(rows), dtype=F64) @ p.weights[depth - 1].detach())
    torch.testing.assert_close(gb, want, rtol=1e-12, atol=1e-12)


def _strided(t):
    big = torch.zeros(*t.shape[:-1], 2 * t.shape[-1] + 1, dtype=t.dtype)
    big[..., 1::2] = t
    return big[..., 1::2]


@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
@pytest.mark.parametrize("act", ["relu", "elu_0.5", "silu", "gelu"])
def test_noncontiguous_and_expanded_inputs(act, dtype):
    """Transposed weights, strided biases, x0 expanded along B and u along T (stride 0): the
    result equals the one on contiguous copies and the reference."""
    p = _problem(3, ACTIVATIONS[act], 6, 3, 3, 5, 2, None, True, dtype, seed=5, requires_grad=False)

    def leaf(t):
        return t.detach().requires_grad_(True)

    q = Problem(
        leaf(p.x0[:, :1].expand(p.x0.shape)), leaf(p.u[:1].expand(p.u.shape)),
        [leaf(w.t().contiguous().t()) for w in p.weights], [leaf(_strided(b)) for b in p.biases],
        p.steps, p.delay, p.truncate, p.activation)
    assert q.x0.stride(1) == 0 and q.u.stride(0) == 0
    assert not any(t.is_contiguous() for t in q.inputs())
    _compare(q, f"non-contiguous {act}")
    contiguous = Problem(*(leaf(t.contiguous()) for t in (q.x0, q.u)),
                                        [leaf(w.contiguous()) for w in q.weights],
                                        [leaf(b.contiguous()) for b in q.biases], q.steps, q.delay, q.truncate,
                                        q.activation)
    torch.testing.assert_close(q.run("cpp"), contiguous.run("cpp"), rtol=0, atol=0)


ZERO_SIZE = {
    # id: (B, T, hidden widths, Du)
    "B0": (0, 5, (4, 3), 2),
    "T0": (3, 0, (4, 3), 0),
    "middle_width0": (3, 5, (4, 0), 2),
    "first_width0": (3, 5, (0, 3, 2), 0),
    "O_only_one_layer_B0": (0, 4, (), 1),
}


@pytest.mark.parametrize("act", ["relu", "mish"])
@pytest.mark.parametrize("case", list(ZERO_SIZE))
def test_zero_size(case, act):
    B, T, widths, Du = ZERO_SIZE[case]
    p = make_problem(B, Du, 3, 0, T, dtype=F64, layers=widths, activation=act)
    y = p.run("cpp")
    assert y.shape == (T, B, 3)
    _compare(p, f"zero-size {case} {act}")


@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_gradcheck_and_gradgradcheck(act):
    """float64 first and second derivatives through backend="cpp" (the C++ autograd), tiny shapes."""
    p = make_problem(2, 1, 2, 0, 3, delay=2, dtype=F64, seed=7, layers=(3, 2), bias=(True, False, True),
                     activation=ACTIVATIONS[act])
    params = p.params

    def fn(x0, u, *present):
        it = iter(present)
        full = [None if t is None else next(it) for t in params]
        return fbfast.rollout(x0, *full, u=u, delay=2, activation=p.activation, backend="cpp")

    inputs = [p.x0, p.u] + [t for t in params if t is not None]
    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


# (depth, activation, parameter, Du, delay, truncate, bias): direct operator arguments.
OPCHECK = [
    (1, "mish", 0.0, 2, 1, 0, True),
    (2, "sigmoid", 0.0, 0, 2, 1, False),
    (3, "gelu_tanh", 0.0, 3, 1, 2, "mixed"),
    (5, "elu", 0.5, 1, 3, 0, True),
]


def _op_args(depth, act, param, Du, delay, truncate, bias, requires_grad):
    p = _problem(depth, act, 5, Du, 3, 4, delay, None, bias, F32, seed=depth, requires_grad=requires_grad)
    return (p.x0, p.u, p.weights, p.biases, p.steps, delay, truncate, act, param)


@pytest.mark.parametrize("requires_grad", [False, True], ids=["no_grad", "grad"])
@pytest.mark.parametrize("case", OPCHECK, ids=lambda c: f"L{c[0]}-{c[1]}")
def test_opcheck_forward(case, requires_grad):
    torch.library.opcheck(torch.ops.fbfast.rollout_forward.default, _op_args(*case, requires_grad))


@pytest.mark.parametrize("case", OPCHECK, ids=lambda c: f"L{c[0]}-{c[1]}")
def test_opcheck_backward(case):
    x0, u, weights, biases, steps, delay, truncate, act, param = _op_args(*case, False)
    y = torch.ops.fbfast.rollout_forward.default(x0, u, weights, biases, steps, delay, truncate, act, param)
    mask = [True, u is not None] + [True] * len(weights) + [b is not None for b in biases]
    args = (torch.randn_like(y), y, x0, u, weights, biases, delay, truncate, act, param, mask)
    torch.library.opcheck(torch.ops.fbfast.rollout_backward.default, args)
    # And the operator's gradients are the reference's.
    gx0, gu, gw, gb = torch.ops.fbfast.rollout_backward.default(*args)
    p = Problem(x0.double().requires_grad_(), None if u is None else u.double().requires_grad_(),
                               [w.double().requires_grad_() for w in weights],
                               [None if b is None else b.double().requires_grad_() for b in biases],
                               steps, delay, truncate or None, ResolvedActivation(act, param))
    want = grads(p.reference(), p.inputs(), args[0].double())
    got = [gx0] + ([gu] if u is not None else []) + [
        g for w, b, g_w, g_b in zip(weights, biases, gw, gb) for g in ((g_w,) + ((g_b,) if b is not None else ()))]
    for name, a, b in zip(p.names, got, want):
        assert_close(a.double(), b, F32, "grad", f"d{name}")


def test_auto_takes_the_kernel_for_deep_networks(monkeypatch):
    monkeypatch.delenv("FBFAST_BACKEND", raising=False)
    p = _problem(3, "silu", 4, 2, 3, 5, 1, None, True, F32)
    y = p.run("auto")
    assert "RolloutFunction" in y.grad_fn.name()
    torch.testing.assert_close(y, p.run("cpp"), rtol=0, atol=0)


def test_compile_fullgraph_around_a_deep_rollout():
    """The activation travels as a constant of the graph: no graph break, one graph, and the
    same values and gradients as the eager call."""
    p = _problem(3, nn.LeakyReLU(0.2), 4, 2, 3, 6, 2, 3, "mixed", F32, seed=9)

    def loss(x0, u, *params):
        return fbfast.rollout(x0, *params, u=u, delay=2, truncate=3, activation=nn.LeakyReLU(0.2),
                              backend="cpp").square().sum()

    compiled = torch.compile(loss, fullgraph=True)
    got = compiled(p.x0, p.u, *p.params)
    want = loss(p.x0, p.u, *p.params)
    torch.testing.assert_close(got, want)
    present = [t for t in p.inputs()]
    for a, b in zip(torch.autograd.grad(got, present), torch.autograd.grad(want, present)):
        torch.testing.assert_close(a, b)


def test_the_operator_knows_exactly_the_python_table():
    """fbfast/_spec.py and csrc/common/activation.h name the same activations in the same order:
    the operator's message for an unknown name lists its own."""
    p = _problem(2, "relu", 2, 0, 3, 2, 1, None, True, F64, requires_grad=False)
    with pytest.raises(RuntimeError) as err:
        torch.ops.fbfast.rollout_forward.default(p.x0, None, p.weights, p.biases, 2, 1, 0, "none", 0.0)
    listed = str(err.value).split("activation must be one of ", 1)[1].split(";", 1)[0]
    assert listed == ", ".join(f"'{n}'" for n in TABLE)
