"""fbfast.rollout under torch.func transforms (grad, vmap, jacrev): "auto" runs the reference
there, which the transforms differentiate and batch like any torch function (the fused operator's
autograd is a C++ torch::autograd::Function and it has no batching rule yet); an explicitly named
kernel backend refuses with a message that names fbfast and what to do instead."""

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


@pytest.mark.parametrize("transform", ["grad", "vmap"])
def test_an_explicit_kernel_backend_says_what_to_do(transform):
    x0, w1, b1, w2, b2, u = _inputs(3)
    f = lambda w: fbfast.rollout(x0, w, b1, w2, b2, u=u, backend="cpp")  # noqa: E731
    with pytest.raises(RuntimeError, match=r"fbfast\.rollout: backend 'cpp' cannot run under torch\.func "
                                           r"transforms.*backend='auto' or backend='eager'"):
        if transform == "grad":
            grad(lambda w: f(w).sum())(w1)
        else:
            vmap(f)(torch.stack([w1, w1]))


def test_outside_a_transform_nothing_changes():
    # The fused operator still runs (the fallback is only for wrapped tensors).
    x0, w1, b1, w2, b2, u = _inputs(4)
    w = w1.clone().requires_grad_()
    y = fbfast.rollout(x0, w, b1, w2, b2, u=u)
    assert y.grad_fn is not None and y.grad_fn.name() != "StackBackward0"
