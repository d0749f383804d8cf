"""Ensembles (docs/spec.md §1.3): 3-D weights roll out E networks side by side.

Checked against a hand-written loop in the style of mbrl-lib's ensemble layers (one
``torch.baddbmm`` per layer and step), against the 2-D rollout of each member, and through
the API: backends, validation, `FeedbackMLP(ensemble=E)` and `make_problem(ensemble=E)`.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import fbfast
from fbfast.modules import EnsembleLinear
from testing import CPP, CPP_REASON, assert_close, cpu_variant, grads, make_problem

F64 = torch.float64
E = 3


def baddbmm_loop(x0, weights, biases, steps, u, lags, truncate, feedback, residual, act=torch.relu):
    """The recurrence of docs/spec.md §1.2 for an ensemble, written independently of
    fbfast/reference.py: a shared x0/u is expanded to the member axis, then per step and layer
    ``h = baddbmm(b[:, None], h, W^T)``."""
    D = max(lags)
    W = weights[0]
    Ens = W.shape[0]
    if x0.dim() == 3:
        x0 = x0.unsqueeze(1).expand(x0.shape[0], Ens, *x0.shape[1:])
    if u is not None and u.dim() == 3:
        u = u.unsqueeze(1).expand(u.shape[0], Ens, *u.shape[1:])
    hist = [x0[i] for i in range(D)]  # hist[j]: past(j - D)
    ys = []
    for t in range(steps):
        reads = []
        for d in lags:
            p = hist[t - d + D]
            if truncate is not None and t % truncate == 0 and t - d >= 0:
                p = p.detach()
            reads.append(p)
        h = torch.cat(([u[t]] if u is not None else []) + reads, dim=-1)
        for l, (w, b) in enumerate(zip(weights, biases)):
            h = torch.bmm(h, w.transpose(1, 2)) if b is None else torch.baddbmm(b[:, None, :], h, w.transpose(1, 2))
            if l < len(weights) - 1:
                h = act(h)
        if residual:
            F = reads[0].shape[-1]
            h = torch.cat([h[..., :F] + reads[0], h[..., F:]], dim=-1)
        ys.append(h)
        hist.append(h if feedback is None else h[..., :feedback])
    return torch.stack(ys)


CONFIGS = [
    dict(),
    dict(delay=2, truncate=2),
    dict(lags=(1, 3), feedback=1, O=3),
    dict(residual=True, truncate=1),
    dict(lags=(2, 1), residual=True, feedback=2, O=3, truncate=3),
    dict(Du=0, layers=3),
    dict(bias=(True, False), activation="tanh"),
]


def _problem(cfg, shared_x0, shared_u, seed=0, **kw):
    args = dict(B=4, Du=2, O=2, H=5, T=6, ensemble=E, shared_x0=shared_x0, shared_u=shared_u, seed=seed)
    args.update(cfg)
    args.update(kw)
    if args["Du"] == 0:
        args["shared_u"] = False
    return make_problem(**args)


@pytest.mark.parametrize("shared_x0,shared_u", [(False, False), (True, True), (True, False), (False, True)])
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_reference_matches_baddbmm_loop(cfg, shared_x0, shared_u):
    p = _problem(cfg, shared_x0, shared_u)
    y = p.reference()
    assert y.shape == (p.steps, E, 4, p.weights[-1].shape[1])
    act = torch.tanh if p.activation == "tanh" else torch.relu
    want = baddbmm_loop(p.x0, p.weights, p.biases, p.steps, p.u, p.lags, p.truncate, p.feedback, p.residual, act)
    assert_close(y, want, F64, msg="values")
    gy = torch.randn_like(y)
    for got, exp, name in zip(grads(y, p.inputs(), gy), grads(want, p.inputs(), gy), p.names):
        assert_close(got, exp, F64, "grad", msg=name)


@pytest.mark.parametrize("cfg", CONFIGS[:5], ids=str)
def test_member_equals_its_2d_rollout(cfg):
    """Member e of the ensemble is the 2-D rollout of member e's weights: values and gradients;
    a shared x0 and u get the sum over members of the members' gradients."""
    p = _problem(cfg, shared_x0=True, shared_u=True)
    y = p.reference()
    gy = torch.randn_like(y)
    ens = grads(y, p.inputs(), gy)
    x0_sum, u_sum = torch.zeros_like(p.x0), torch.zeros_like(p.u)
    for e in range(E):
        ws = [w[e] for w in p.weights]
        bs = [None if b is None else b[e] for b in p.biases]
        params = [t for pair in zip(ws, bs) for t in pair]
        ye = fbfast.rollout_reference(p.x0, *params, steps=p.steps, u=p.u, truncate=p.truncate,
                                      activation=p.activation, **p.structure)
        assert_close(y[:, e], ye, F64, msg=f"member {e}")
        inputs = [p.x0, p.u] + [t for t in params if t is not None]
        g = torch.autograd.grad(ye, inputs, gy[:, e])
        x0_sum += g[0]
        u_sum += g[1]
        for name, got, want in zip(p.names[2:], ens[2:], g[2:]):
            assert_close(got[e], want, F64, "grad", msg=f"member {e} {name}")
    assert_close(ens[0], x0_sum, F64, "grad", msg="shared x0 = sum over members")
    assert_close(ens[1], u_sum, F64, "grad", msg="shared u = sum over members")


def test_shared_inputs_are_not_copied_per_member():
    """A shared x0/u equals passing it expanded to the member axis (the zero-stride view the
    reference builds), and a per-member x0 that repeats one start gives the same Y."""
    p = _problem({}, shared_x0=True, shared_u=True)
    y = p.reference()
    x0e = p.x0.unsqueeze(1).expand(1, E, *p.x0.shape[1:])
    ue = p.u.unsqueeze(1).expand(p.u.shape[0], E, *p.u.shape[1:])
    y2 = fbfast.rollout(x0e, *p.params, u=ue, backend="eager")
    torch.testing.assert_close(y, y2, rtol=0, atol=0)


def test_gradcheck_and_gradgradcheck():
    for shared in (False, True):
        # No truncate: a detached edge makes the gradient differ from finite differences by design.
        p = make_problem(B=2, Du=1, O=2, H=3, T=3, lags=(1, 2), feedback=1, residual=True,
                         ensemble=2, shared_x0=shared, shared_u=shared, activation="tanh")

        def f(*inputs):
            x0, u, *params = inputs
            return fbfast.rollout(x0, *params, u=u, truncate=p.truncate, activation="tanh", backend="eager",
                                  **p.structure)

        inputs = p.inputs()
        assert torch.autograd.gradcheck(f, inputs)
        assert torch.autograd.gradgradcheck(f, inputs)


def test_zero_size_ensembles_backprop():
    for kw in (dict(T=0), dict(B=0)):
        args = dict(B=2, Du=1, O=2, H=3, T=3, ensemble=E)
        args.update(kw)
        p = make_problem(**args)
        y = p.reference()
        assert y.shape == (args["T"], E, args["B"], 2)
        for g, t in zip(grads(y, p.inputs(), torch.ones_like(y)), p.inputs()):
            assert g.shape == t.shape and not g.any()


def test_compile_matches_eager():
    for shared in (False, True):
        p = _problem(dict(lags=(1, 2), residual=True, truncate=2), shared, shared, T=4)
        y = p.run("eager")
        yc = p.run("compile")
        assert_close(yc, y, F64, msg=f"compile, shared={shared}")
        gy = torch.randn_like(y)
        for got, want, name in zip(grads(yc, p.inputs(), gy), grads(y, p.inputs(), gy), p.names):
            assert_close(got, want, F64, "grad", msg=f"compile {name} shared={shared}")
    keys = [k for k in fbfast.functional._COMPILED if k[-1] is not None and k[-1][0] == E]
    assert {k[-1][1:] for k in keys} >= {(False, False), (True, True)}


# ---------------------------------------------------------------------------------------------
# The fused CPU kernel (csrc/cpu/rollout_cpu.cpp): members as more tiles on the tile path, one
# member after another on the BLAS path.

needs_cpp = pytest.mark.skipif(not CPP, reason=CPP_REASON)
SHARED = [(False, False), (True, True), (True, False), (False, True)]
VARIANTS = [("tile", "auto"), ("blas", "auto"), ("tile", "avx2"), ("tile", "base")]


def _check_cpp(p, dtype, what):
    y = p.run("cpp")
    want = p.reference()
    assert y.shape == want.shape and y.dtype == dtype
    assert y.grad_fn is not None and y.grad_fn.name() != "StackBackward0", "the fused operator ran"
    assert_close(y, want, dtype, "out", f"Y {what}")
    gy = torch.randn(y.shape, dtype=F64, generator=torch.Generator().manual_seed(3)).to(dtype)
    for name, a, b in zip(p.names, grads(y, p.inputs(), gy), grads(want, p.inputs(), gy)):
        assert a.shape == b.shape
        assert_close(a, b, dtype, "grad", f"d{name} {what}")


@needs_cpp
@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("shared_x0,shared_u", SHARED)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_cpp_matches_the_reference(cfg, shared_x0, shared_u, dtype):
    p = _problem(cfg, shared_x0, shared_u, dtype=dtype, B=5, T=7)
    _check_cpp(p, dtype, f"{cfg} shared={shared_x0, shared_u}")


@needs_cpp
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "-".join(v))
@pytest.mark.parametrize("shared", [False, True], ids=["own", "shared"])
def test_every_cpu_path_and_instruction_set(variant, shared):
    """Each path pinned, with more rows than one tile (B = 37) and a deep SiLU network: member
    tiles with their own weights, x0 and u rows (csrc/cpu/tile_params.h rows_*), and the BLAS
    path's member loop over strided views of Y and the gradients."""
    with cpu_variant(*variant):
        for dtype in (F64, torch.float32):
            for cfg in (dict(lags=(2, 1), residual=True, feedback=2, O=3, truncate=3), dict(Du=0, delay=2)):
                p = _problem(cfg, shared, shared, dtype=dtype, B=37, T=9, layers=3, activation="silu")
                _check_cpp(p, dtype, f"{cfg} {variant} shared={shared}")


@needs_cpp
@pytest.mark.parametrize("variant", VARIANTS[:2], ids=lambda v: "-".join(v))
def test_cpp_gradcheck_and_gradgradcheck(variant):
    with cpu_variant(*variant):
        for shared in (False, True):
            p = make_problem(B=2, Du=1, O=2, H=3, T=3, lags=(1, 2), feedback=1, residual=True,
                             ensemble=2, shared_x0=shared, shared_u=shared, activation="tanh")

            def f(*inputs):
                x0, u, *params = inputs
                return fbfast.rollout(x0, *params, u=u, activation="tanh", backend="cpp", **p.structure)

            assert torch.autograd.gradcheck(f, p.inputs())
            assert torch.autograd.gradgradcheck(f, p.inputs())


@needs_cpp
@pytest.mark.parametrize("case", [dict(T=0), dict(B=0), dict(O=0), dict(ensemble=1)], ids=["T0", "B0", "O0", "E1"])
def test_cpp_zero_size_ensembles(case):
    args = dict(B=2, Du=1, O=2, H=3, T=3, ensemble=E)
    args.update(case)
    for shared in (False, True):
        p = make_problem(**args, shared_x0=shared, shared_u=shared)
        y, want = p.run("cpp"), p.reference()
        assert y.shape == want.shape == (args["T"], args["ensemble"], args["B"], args["O"])
        assert_close(y, want, F64, "out", f"Y {case}")
        gy = torch.ones_like(y)
        for name, a, b in zip(p.names, grads(y, p.inputs(), gy), grads(want, p.inputs(), gy)):
            assert a.shape == b.shape
            assert_close(a, b, F64, "grad", f"d{name} {case}")


@needs_cpp
def test_cpp_ensemble_of_no_networks():
    """E = 0 (weights (0, out, in)): an empty Y (T, 0, B, O) and zero gradients, as the reference."""
    w1, b1 = torch.randn(0, 4, 3, dtype=F64), torch.randn(0, 4, dtype=F64)
    w2, b2 = torch.randn(0, 2, 4, dtype=F64), torch.randn(0, 2, dtype=F64)
    inputs = [t.requires_grad_(True) for t in (torch.randn(1, 2, 2, dtype=F64), torch.randn(5, 2, 1, dtype=F64),
                                               w1, b1, w2, b2)]
    ys = [fbfast.rollout(inputs[0], *inputs[2:], u=inputs[1], backend=b) for b in ("cpp", "eager")]
    assert ys[0].shape == ys[1].shape == (5, 0, 2, 2)
    for a, b in zip(*(grads(y, inputs, torch.ones_like(y)) for y in ys)):
        assert a.shape == b.shape and not a.any()


@needs_cpp
@pytest.mark.parametrize("case", ["E0", "O0", "Du0_T0"])
def test_cpp_double_backward_of_empty_ensembles(case):
    """create_graph=True on an empty ensemble: zero second derivatives, no error."""
    E = 0 if case == "E0" else 2
    O = 0 if case == "O0" else 2
    Du, T = (0, 0) if case == "Du0_T0" else (1, 3)
    ws = [torch.randn(E, 4, Du + O, dtype=F64), torch.randn(E, O, 4, dtype=F64)]
    inputs = [torch.randn(1, 3, O, dtype=F64)] + ([torch.randn(T, 3, Du, dtype=F64)] if Du else []) + ws
    inputs = [t.requires_grad_(True) for t in inputs]
    u = inputs[1] if Du else None
    y = fbfast.rollout(inputs[0], ws[0], None, ws[1], None, u=u, steps=T, backend="cpp")
    assert y.shape == (T, E, 3, O)
    g = torch.autograd.grad(y.sum(), ws, create_graph=True, allow_unused=True)
    assert all(t is None or not t.any() for t in g)


@needs_cpp
def test_cpp_reads_strided_and_expanded_inputs():
    """An own x0 and u that are one start expanded along the member axis (stride 0), and weights
    transposed in memory: the kernel reads them through their strides."""
    p = _problem(dict(lags=(1, 2), residual=True), False, False, B=5, T=6, layers=3, activation="tanh")
    x0 = torch.randn(2, 1, 5, 2, dtype=F64).expand(2, E, 5, 2).requires_grad_(True)
    u = torch.randn(6, 1, 5, 2, dtype=F64).expand(6, E, 5, 2).requires_grad_(True)
    weights = [w.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_(True) for w in p.weights]
    assert x0.stride(1) == 0 and u.stride(1) == 0 and not weights[0].is_contiguous()
    params = [t for w, b in zip(weights, p.biases) for t in (w, b)]
    kw = dict(u=u, activation="tanh", **p.structure)
    y = fbfast.rollout(x0, *params, backend="cpp", **kw)
    want = fbfast.rollout_reference(x0, *params, **kw)
    assert_close(y, want, F64, "out", "Y")
    inputs = [x0, u, *params]
    gy = torch.randn_like(y)
    for a, b in zip(grads(y, inputs, gy), grads(want, inputs, gy)):
        assert_close(a, b, F64, "grad", "strided inputs")


@needs_cpp
def test_cpp_double_backward():
    p = _problem(dict(lags=(2, 1), residual=True, feedback=1, truncate=2), True, False, T=5, activation="tanh")
    inputs = p.inputs()

    def second(out):
        g = torch.autograd.grad(out.pow(2).sum(), inputs, create_graph=True)
        return torch.autograd.grad(sum(t.pow(2).sum() for t in g), inputs)

    for name, a, b in zip(p.names, second(p.run("cpp")), second(p.reference())):
        assert_close(a, b, F64, "grad", f"second derivative d{name}")


@needs_cpp
@pytest.mark.parametrize("shared", [False, True], ids=["own", "shared"])
def test_operator_takes_3d_weights_and_passes_opcheck(shared):
    p = _problem(dict(lags=(1, 3), feedback=1, O=3, residual=True), shared, shared, T=5)
    op = torch.ops.fbfast.rollout_forward.default
    args = (p.x0, p.u, p.weights, p.biases, p.steps, 3, 2, "relu", 0.0)
    kwargs = dict(lags=[1, 3], feedback=1, residual=True)
    y = op(*args, **kwargs)
    assert y.shape == (5, E, 4, 3)
    torch.library.opcheck(op, args, kwargs)


@needs_cpp
def test_operator_refuses_inconsistent_ensembles():
    """Direct calls of the operator (no Python validation) get the operator's own messages."""
    p = _problem({}, False, False)
    op = torch.ops.fbfast.rollout_forward.default
    w1, w2 = p.weights
    b1, b2 = p.biases

    def call(x0=p.x0, u=p.u, weights=(w1, w2), biases=(b1, b2)):
        return op(x0, u, list(weights), list(biases), p.steps, 1, 0, "relu", 0.0)

    cases = [
        (dict(weights=(w1, w2[0])), r"every weight must have w1's rank \(3-D: \(E, out, in\), an ensemble\), but w2"),
        (dict(weights=(w1, w2[:2])), r"ensemble sizes disagree: w1 has E = 3 members, w2 is \[2, 2, 5\]"),
        (dict(biases=(b1[:2], b2)), r"b1 must be \(E=3, 5\) in an ensemble, got \[2, 5\]"),
        (dict(x0=p.x0[:, :2]), r"ensemble sizes disagree: x0 \[1, 2, 4, 2\] has E = 2 members"),
        (dict(u=p.u[:, :2]), r"u must be \(steps=6, E=3, B=4, Du\) or shared"),
        (dict(x0=p.x0[0]), r"x0 must be \(delay=1, E, B, F\) or shared"),
    ]
    for over, pattern in cases:
        with pytest.raises(RuntimeError, match=pattern):
            call(**over)
    with pytest.raises(RuntimeError, match=r"hidden\[0\] must be \(T=6, E=3, B=4, 5\), got \[6, 4, 5\]"):
        torch.ops.fbfast.rollout_backward_hidden(torch.zeros(6, E, 4, 2, dtype=F64), torch.zeros(6, E, 4, 2, dtype=F64),
                                                 [torch.zeros(6, 4, 5, dtype=F64)], p.x0, p.u, p.weights, p.biases,
                                                 1, 0, "relu", 0.0, [True] * 6)


@needs_cpp
@pytest.mark.parametrize("path", ["tile", "blas"])
@pytest.mark.parametrize("activation", ["silu", "tanh", "relu"])
def test_wide_layers_keep_their_activations_for_the_backward(path, activation):
    """Layers wider than 128 x 128 keep their hidden activations in a training forward
    (fbfast::rollout_forward_hidden; csrc/cpu/path_rule.h) on either path, for one network and
    for an ensemble, except a narrow first layer: the backward reads them instead of
    recomputing, with the same results."""
    with cpu_variant(path):
        for ensemble in (None, 2):
            p = make_problem(B=5, Du=2, O=3, H=136, T=5, layers=3, activation=activation, ensemble=ensemble,
                             shared_x0=bool(ensemble), lags=(1, 2), residual=True, feedback=2, truncate=3)
            op = torch.ops.fbfast
            # The operators themselves (no autograd kernel for the hidden ones): plain tensors.
            detach = lambda ts: [None if t is None else t.detach() for t in ts]  # noqa: E731
            args = (p.x0.detach(), p.u.detach(), detach(p.weights), detach(p.biases))
            kw = dict(lags=[1, 2], feedback=2, residual=True)
            y, hidden = op.rollout_forward_hidden(*args, p.steps, 2, activation, 0.0, **kw)
            lead = (5, ensemble, 5) if ensemble else (5, 5)
            # The first layer reads only Du + 2F = 6 columns: recomputed, not kept (keeps_layer in
            # csrc/rollout_checks.h); the 136 x 136 layer is kept.
            assert [tuple(h.shape) for h in hidden] == [(0,), lead + (136,)]
            torch.testing.assert_close(y, op.rollout_forward(*args, p.steps, 2, 3, activation, 0.0, **kw),
                                       rtol=0, atol=0)
            gy = torch.randn_like(y)
            mask = [True] * (2 + 2 * 3)
            kept = op.rollout_backward_hidden(gy, y, hidden, *args, 2, 3, activation, 0.0, mask, **kw)
            fresh = op.rollout_backward(gy, y, *args, 2, 3, activation, 0.0, mask, **kw)
            flat = lambda g: [g[0], g[1], *g[2], *g[3]]  # noqa: E731
            for a, b in zip(flat(kept), flat(fresh)):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
            # Through autograd, which asks for the kept activations at these widths.
            _check_cpp(p, F64, f"{path} {activation} E={ensemble}")


@needs_cpp
def test_auto_takes_the_kernel_silently(monkeypatch):
    monkeypatch.delenv("FBFAST_BACKEND", raising=False)
    p = _problem({}, False, False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = p.run("auto")
    assert fbfast.dispatch.resolve("auto", p.x0) == "cpp"
    torch.testing.assert_close(y, p.run("cpp"), rtol=0, atol=0)


def test_validation_messages():
    p = _problem({}, False, False)
    x0, u = p.x0, p.u
    w1, b1, w2, b2 = p.params
    cases = [
        (dict(w2=w2[0]), r"w2 is 2-D \(2, 5\) but w1 is 3-D \(3, 5, 4\)"),
        (dict(w2=w2[:2]), r"ensemble sizes disagree: w2 is \(2, 2, 5\), E = 2 .* w1 is \(3, 5, 4\), E = 3"),
        (dict(b1=b1[:2]), r"b1 must have shape \(3, 5\).* got \(2, 5\)"),
        (dict(x0=x0[:, :2]), r"x0 must have shape .* got \(1, 2, 4, 2\): its member axis .* has 2 .* E = 3"),
        (dict(u=u[:, :1]), r"u must be 4-D \(T, E, B, Du\) .* got shape \(6, 1, 4, 2\)"),
    ]
    for over, pattern in cases:
        kw = dict(x0=x0, w1=w1, b1=b1, w2=w2, b2=b2, u=u)
        kw.update(over)
        with pytest.raises(ValueError, match=pattern):
            fbfast.rollout(kw["x0"], kw["w1"], kw["b1"], kw["w2"], kw["b2"], u=kw["u"], backend="eager")


def test_make_problem_keeps_2d_draws():
    a = make_problem(B=3, Du=2, O=2, H=4, T=5, seed=7)
    b = make_problem(B=3, Du=2, O=2, H=4, T=5, seed=7, ensemble=None)
    for x, y in zip(a.inputs(), b.inputs()):
        torch.testing.assert_close(x, y, rtol=0, atol=0)
    e = make_problem(B=3, Du=2, O=2, H=4, T=5, seed=7, ensemble=2, shared_u=True)
    assert e.x0.shape == (1, 2, 3, 2) and e.u.shape == (5, 3, 2) and e.w1.shape == (2, 4, 4)
    with pytest.raises(ValueError, match="shared_x0"):
        make_problem(B=3, Du=2, O=2, H=4, T=5, shared_x0=True)


def test_ensemble_linear_init_and_forward():
    torch.manual_seed(0)
    lin = EnsembleLinear(4, 100, 7)
    bound = 1 / 100 ** 0.5
    assert lin.weight.shape == (4, 7, 100) and lin.bias.shape == (4, 7)
    assert lin.weight.abs().max() <= bound and lin.weight.abs().max() > 0.9 * bound
    # members drawn independently, not one matrix repeated
    assert not torch.equal(lin.weight[0], lin.weight[1])
    x = torch.randn(5, 100)
    y = lin(x)
    assert y.shape == (4, 5, 7)
    torch.testing.assert_close(y[2], torch.nn.functional.linear(x, lin.weight[2], lin.bias[2]))
    with pytest.raises(ValueError, match=r"x must be \(4, B, 100\)"):
        lin(torch.randn(3, 5, 100))


def test_feedback_mlp_ensemble_state_dict_rollout_and_training():
    torch.manual_seed(0)
    m = fbfast.FeedbackMLP(10, 5, 2, ensemble=E, hidden_layers=2, dtype=F64)
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes == {"fc1.weight": (E, 5, 10), "fc1.bias": (E, 5), "fc2.weight": (E, 5, 5), "fc2.bias": (E, 5),
                      "fc3.weight": (E, 2, 5), "fc3.bias": (E, 2)}
    assert m.exo_features == 8 and m.ensemble == E and "ensemble=3" in repr(m)
    x0, u = torch.randn(4, 2, dtype=F64), torch.randn(6, 4, 8, dtype=F64)
    y = m.rollout(x0, u=u, backend="eager")
    want = baddbmm_loop(x0.unsqueeze(0), [fc.weight for fc in m.layers], [fc.bias for fc in m.layers], 6, u,
                        (1,), None, None, False)
    assert_close(y, want, F64)
    # forward is one step: the rollout's first step from the same inputs
    assert_close(m(torch.cat([u[0], x0], dim=-1)), y[0], F64)
    assert fbfast.FeedbackMLP(10, 5, 2, ensemble=E, bias=False).state_dict().keys() == {
        "fc1.weight", "fc2.weight"}

    opt = torch.optim.SGD(m.parameters(), lr=0.05)
    target = torch.zeros(6, E, 4, 2, dtype=F64)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        loss = (m.rollout(x0, u=u, backend="eager") - target).pow(2).mean()
        loss.backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in m.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]

    m2 = fbfast.FeedbackMLP(10, 5, 2, ensemble=E, hidden_layers=2, dtype=F64)
    m2.load_state_dict(m.state_dict())
    torch.testing.assert_close(m2.rollout(x0, u=u, backend="eager"), m.rollout(x0, u=u, backend="eager"))


def test_feedback_mlp_ensemble_checks_and_from_module():
    with pytest.raises(ValueError, match=r"ensemble must be >= 1, got 0"):
        fbfast.FeedbackMLP(10, 5, 2, ensemble=0)
    with pytest.raises(TypeError, match=r"ensemble must be an int"):
        fbfast.FeedbackMLP(10, 5, 2, ensemble=2.0)
    with pytest.raises(TypeError, match=r"from_module.*ensemble"):
        fbfast.from_module(fbfast.FeedbackMLP(10, 5, 2, ensemble=2))


@needs_cpp
def test_cpp_under_torch_compile_fullgraph():
    """The fused operator with 3-D weights inside torch.compile(fullgraph=True): the meta kernel
    gives Y (T, E, B, O) and the compiled graph calls the kernel, forward and backward."""
    p = _problem(dict(lags=(1, 2), residual=True, feedback=1, O=3), True, False, T=5)
    kw = dict(u=p.u, activation="relu", **p.structure)

    def f(x0, *params):
        return fbfast.rollout(x0, *params, backend="cpp", **kw).square().sum()

    compiled = torch.compile(f, fullgraph=True)
    got = torch.autograd.grad(compiled(p.x0, *p.params), p.weights)
    want = torch.autograd.grad(f(p.x0, *p.params), p.weights)
    for a, b in zip(got, want):
        assert_close(a, b, F64, "grad", "compiled")
