"""fbfast.rollout under torch.func transforms (grad, vmap, jacrev).

vmap runs the fused kernel once for the whole batch through the operator's batching rule
(fbfast/_vmap.py): vmapped weights become an ensemble's member axis, vmapped data more batch rows.
grad and jacrev cannot pass through the operator's C++ autograd, so "auto" runs the reference
there, which the transforms differentiate like any torch function; an explicitly named kernel
backend refuses with a message that names fbfast and what to do instead."""

from __future__ import annotations

import pytest
import torch
from torch.func import grad, jacrev, vmap

import fbfast
from testing import CPP, CPP_REASON

pytestmark = pytest.mark.skipif(not CPP, reason=CPP_REASON)
F64 = torch.float64


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64) * 0.5  # noqa: E731
    return r(4, 3), r(6, 2 + 3), r(6), r(3, 6), r(3), r(5, 4, 2)  # x0, w1, b1, w2, b2, u


def test_grad_equals_autograd_of_the_kernel():
    x0, w1, b1, w2, b2, u = _inputs()
    loss = lambda w: fbfast.rollout(x0, w, b1, w2, b2, u=u, activation="tanh").square().sum()  # noqa: E731
    got = grad(loss)(w1)
    w = w1.clone().requires_grad_()
    (want,) = torch.autograd.grad(fbfast.rollout(x0, w, b1, w2, b2, u=u, activation="tanh").square().sum(), w)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_jacrev_of_a_lagged_rollout():
    x0, w1, b1, w2, b2, u = _inputs(1)
    x0 = torch.randn(2, 4, 3, dtype=F64)
    w1 = torch.randn(6, 2 + 2 * 3, dtype=F64) * 0.3
    f = lambda x: fbfast.rollout(x, w1, b1, w2, b2, u=u, delay=(2, 1), residual=True)  # noqa: E731
    jac = jacrev(f)(x0)
    assert jac.shape == (5, 4, 3, 2, 4, 3)
    eps = 1e-6
    bumped = x0.clone()
    bumped[1, 2, 0] += eps
    torch.testing.assert_close(jac[..., 1, 2, 0], (f(bumped) - f(x0)) / eps, rtol=1e-4, atol=1e-5)


def test_vmap_over_stacked_weights_is_the_ensemble():
    x0, _, b1, w2, b2, u = _inputs(2)
    W1 = torch.randn(7, 6, 5, dtype=F64) * 0.4
    y = vmap(lambda w: fbfast.rollout(x0, w, b1, w2, b2, u=u, activation="silu"))(W1)
    members = torch.stack([fbfast.rollout(x0, W1[e], b1, w2, b2, u=u, activation="silu") for e in range(7)])
    torch.testing.assert_close(y, members, rtol=1e-10, atol=1e-10)
    ens = fbfast.rollout(x0, W1, b1.expand(7, 6), w2.expand(7, 3, 6), b2.expand(7, 3), u=u, activation="silu")
    torch.testing.assert_close(y.transpose(0, 1), ens, rtol=1e-10, atol=1e-10)


@pytest.fixture
def no_reference(monkeypatch):
    """Fail if the reference runs: under vmap the fused kernel must."""
    def refuse(*args, **kwargs):
        raise AssertionError("the reference ran instead of the fused kernel")
    monkeypatch.setattr(fbfast.functional, "run_reference", refuse)


@pytest.mark.parametrize("backend", ["auto", "cpp"])
def test_vmap_runs_the_ensemble_kernel(backend, no_reference):
    x0, _, b1, w2, b2, u = _inputs(5)
    W1 = torch.randn(7, 6, 5, dtype=F64) * 0.4
    B2 = torch.randn(7, 3, dtype=F64) * 0.4
    y = vmap(lambda w, b: fbfast.rollout(x0, w, b1, w2, b, u=u, activation="silu", backend=backend))(W1, B2)
    members = [fbfast.rollout_reference(x0, W1[e], b1, w2, B2[e], u=u, activation="silu") for e in range(7)]
    torch.testing.assert_close(y, torch.stack(members), rtol=1e-10, atol=1e-10)


def test_vmap_over_data_only_folds_into_the_batch(no_reference):
    """Only x0 and u vmapped (different starts and inputs, one network): V B rows of one call."""
    _, _, b1, w2, b2, _ = _inputs(6)
    w1 = torch.randn(6, 2 + 2 * 3, dtype=F64) * 0.3
    X0 = torch.randn(3, 2, 4, 3, dtype=F64)
    U = torch.randn(5, 3, 4, 2, dtype=F64)  # vmapped on axis 1
    f = lambda x, v: fbfast.rollout(x, w1, b1, w2, b2, u=v, delay=(2, 1), residual=True)  # noqa: E731
    y = vmap(f, in_dims=(0, 1), out_dims=1)(X0, U)
    assert y.shape == (5, 3, 4, 3)
    for v in range(3):
        want = fbfast.rollout_reference(X0[v], w1, b1, w2, b2, u=U[:, v], delay=(2, 1), residual=True)
        torch.testing.assert_close(y[:, v], want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("shared", [False, True], ids=["own", "shared"])
def test_vmap_of_an_ensemble_folds_into_more_members(shared, no_reference):
    """vmap over a stacked ensemble's weights (V, E, out, in) is one ensemble of V E members; a
    shared x0/u stays shared, an own one is read per member."""
    from fbfast.testing import make_problem
    p = make_problem(B=4, Du=2, O=2, H=5, T=6, ensemble=3, shared_x0=shared, shared_u=shared, lags=(1, 2),
                     residual=True, feedback=1)
    W1 = torch.stack([p.weights[0], 0.5 * p.weights[0]], dim=1)  # vmapped on axis 1
    X0 = torch.stack([p.x0, p.x0.flip(-2)])

    def f(w, x0):
        return fbfast.rollout(x0, w, p.biases[0], p.weights[1], p.biases[1], u=p.u, **p.structure)

    y = vmap(f, in_dims=(1, 0))(W1, X0)
    assert y.shape == (2, 6, 3, 4, 2)
    for v in range(2):
        want = fbfast.rollout_reference(X0[v], W1[:, v], p.biases[0], p.weights[1], p.biases[1], u=p.u,
                                        **p.structure)
        torch.testing.assert_close(y[v], want, rtol=1e-10, atol=1e-10)


def test_vmap_inside_autograd_trains_through_the_kernel(no_reference):
    x0, _, b1, w2, b2, u = _inputs(7)
    W = (torch.randn(4, 6, 5, dtype=F64) * 0.4).requires_grad_()
    y = vmap(lambda w: fbfast.rollout(x0, w, b1, w2, b2, u=u, activation="tanh"))(W)
    (got,) = torch.autograd.grad(y.square().sum(), W)
    # The oracle: each network's own fused rollout and its autograd.
    W2 = W.detach().clone().requires_grad_()
    want_y = torch.stack([fbfast.rollout(x0, W2[e], b1, w2, b2, u=u, activation="tanh", backend="cpp")
                          for e in range(4)])
    (want,) = torch.autograd.grad(want_y.square().sum(), W2)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_grad_with_an_explicit_kernel_backend_says_what_to_do():
    x0, w1, b1, w2, b2, u = _inputs(3)
    f = lambda w: fbfast.rollout(x0, w, b1, w2, b2, u=u, backend="cpp")  # noqa: E731
    with pytest.raises(RuntimeError, match=r"fbfast\.rollout: backend 'cpp' cannot run under torch\.func's "
                                           r"grad transforms.*backend='auto' or backend='eager'"):
        grad(lambda w: f(w).sum())(w1)


@pytest.mark.parametrize("case", ["T0", "E0", "Du0"])
def test_vmap_of_empty_rollouts(case, no_reference):
    """Zero-size rollouts under vmap: the folds spell their sizes out (a -1 cannot be inferred
    for a tensor of no elements)."""
    T = 0 if case == "T0" else 4
    E = 0 if case == "E0" else 2
    Du = 0 if case == "Du0" else 2
    w1, b1 = torch.randn(E, 5, Du + 3, dtype=F64), torch.randn(E, 5, dtype=F64)
    w2, b2 = torch.randn(E, 3, 5, dtype=F64), torch.randn(E, 3, dtype=F64)
    X0 = torch.randn(3, 1, 4, 3, dtype=F64)
    U = torch.randn(3, T, 4, Du, dtype=F64) if Du else None
    y = vmap(lambda x, v: fbfast.rollout(x, w1, b1, w2, b2, u=v, steps=T), in_dims=(0, 0 if Du else None))(X0, U)
    assert y.shape == (3, T, E, 4, 3)
    for v in range(3):
        want = fbfast.ops.forward_op(X0[v], None if U is None else U[v], [w1, w2], [b1, b2], T, 1, 0, "relu", 0.0)
        torch.testing.assert_close(y[v], want)


def test_grad_of_vmap_falls_back_to_the_reference():
    x0, _, b1, w2, b2, u = _inputs(8)
    W1 = torch.randn(3, 6, 5, dtype=F64) * 0.4
    loss = lambda W: vmap(lambda w: fbfast.rollout(x0, w, b1, w2, b2, u=u))(W).square().sum()  # noqa: E731
    got = grad(loss)(W1)
    W = W1.clone().requires_grad_()
    y = torch.stack([fbfast.rollout_reference(x0, W[e], b1, w2, b2, u=u) for e in range(3)])
    (want,) = torch.autograd.grad(y.square().sum(), W)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_outside_a_transform_nothing_changes():
    # The fused operator still runs (the fallback is only for wrapped tensors).
    x0, w1, b1, w2, b2, u = _inputs(4)
    w = w1.clone().requires_grad_()
    y = fbfast.rollout(x0, w, b1, w2, b2, u=u)
    assert y.grad_fn is not None and y.grad_fn.name() != "StackBackward0"
