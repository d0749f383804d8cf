"""The fused operator's autograd node (csrc/autograd.cpp) behaves as any torch node does.

It is written as ATen's generated nodes are (a torch Node with SavedVariables), not as a
torch::autograd::Function, so what Function did for free is checked here: a second backward
through freed buffers, inputs modified in place after the forward, gradients for only some
inputs, saved-tensor hooks, forward-mode AD (which the kernels have no rule for: the reference
runs), and the graph the node leaves for the garbage collector.
"""

from __future__ import annotations

import gc
import weakref

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from torch.func import jacfwd, jvp

import fbfast
from testing import CPP, CPP_REASON

pytestmark = pytest.mark.skipif(not CPP, reason=CPP_REASON)
F64 = torch.float64


def _inputs(seed=0, requires_grad=True, lags=1):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: (torch.randn(*s, generator=g, dtype=F64) * 0.5).requires_grad_(requires_grad)  # noqa: E731
    # x0 (D, B, F), w1 (H, Du + lags * F), b1, w2 (O, H), b2, u (T, B, Du); F = O = 3
    return r(2, 4, 3), r(6, 2 + 3 * lags), r(6), r(3, 6), r(3), r(5, 4, 2)


def _run(backend, x0, w1, b1, w2, b2, u, **kw):
    return fbfast.rollout(x0, w1, b1, w2, b2, u=u, backend=backend, **kw)


def test_node_is_fbfasts_and_its_gradients_are_the_references():
    ins = _inputs(0)
    y = _run("cpp", *ins, delay=2)
    assert "RolloutFunction" in y.grad_fn.name()
    assert len(y.grad_fn.next_functions) == 2 + 2 * 2  # x0, u, w1, w2, b1, b2
    gy = torch.randn_like(y)
    got = torch.autograd.grad(y, ins, gy)
    want = torch.autograd.grad(_run("eager", *ins, delay=2), ins, gy)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_a_second_backward_through_freed_buffers_is_refused():
    y = _run("cpp", *_inputs(1), delay=2)
    y.sum().backward()
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        y.sum().backward()


def test_retain_graph_allows_a_second_backward_with_the_same_gradients():
    ins = _inputs(2)
    y = _run("cpp", *ins, delay=2)
    first = torch.autograd.grad(y.sum(), ins, retain_graph=True)
    second = torch.autograd.grad(y.sum(), ins)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


@pytest.mark.parametrize("which", [0, 1, 3])  # x0, w1, w2
def test_an_input_modified_in_place_after_the_forward_is_refused(which):
    ins = list(_inputs(3))
    ins = [t.detach().clone().requires_grad_() for t in ins]
    leafs = list(ins)
    ins[which] = ins[which] * 1  # a non-leaf, so that it may be modified in place
    y = _run("cpp", *ins, delay=2)
    with torch.no_grad():
        ins[which].add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(y.sum(), leafs[which])


def test_gradients_for_some_inputs_only():
    x0, w1, b1, w2, b2, u = _inputs(4)
    y = _run("cpp", x0, w1, b1, w2, b2, u, delay=2)
    (gw2,) = torch.autograd.grad(y.square().sum(), w2)
    ye = _run("eager", x0, w1, b1, w2, b2, u, delay=2)
    (want,) = torch.autograd.grad(ye.square().sum(), w2)
    torch.testing.assert_close(gw2, want, rtol=1e-10, atol=1e-10)


def test_inputs_that_do_not_require_grad_get_none_and_no_bias_is_no_edge():
    x0, w1, _, w2, _, u = _inputs(5, requires_grad=False)
    w1.requires_grad_()
    y = _run("cpp", x0, w1, None, w2, None, u, delay=2)
    y.sum().backward()
    assert w1.grad is not None and x0.grad is None and u.grad is None and w2.grad is None
    assert sum(fn is not None for fn, _ in y.grad_fn.next_functions) == 1


def test_saved_tensor_hooks_see_the_saved_tensors():
    ins = _inputs(6)
    packed = []

    def pack(t):
        packed.append(t.shape)
        return t.clone()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = _run("cpp", *ins, delay=2)
    # x0, u, y and the four parameters: the kernel recomputes the rest
    assert sorted(packed) == sorted(t.shape for t in (*ins, y)), packed
    got = torch.autograd.grad(y.sum(), ins)
    want = torch.autograd.grad(_run("eager", *ins, delay=2).sum(), ins)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_the_graph_is_freed_with_its_output():
    x0, w1, b1, w2, b2, u = _inputs(7)
    saved = weakref.ref(u)  # the node holds u once the test lets it go
    y = _run("cpp", x0, w1, b1, w2, b2, u, delay=2)
    del u
    gc.collect()
    assert saved() is not None
    del y
    gc.collect()
    assert saved() is None  # node and saved tensors gone with y: no reference cycle through y


@pytest.mark.parametrize("kw", [dict(delay=2), dict(delay=(2, 1), residual=True, lags=2),
                                dict(delay=2, truncate=2, activation="tanh")])
def test_forward_mode_ad_runs_the_reference(kw):
    lags = kw.pop("lags", 1)
    ins = _inputs(8, requires_grad=False, lags=lags)
    tangents = _inputs(9, requires_grad=False, lags=lags)
    with fwAD.dual_level():
        got = _run("cpp", *(fwAD.make_dual(p, t) for p, t in zip(ins, tangents)), **kw)
        got_p, got_t = fwAD.unpack_dual(got)
        want = _run("eager", *(fwAD.make_dual(p, t) for p, t in zip(ins, tangents)), **kw)
        want_p, want_t = fwAD.unpack_dual(want)
    assert got_t is not None
    torch.testing.assert_close(got_p, want_p, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got_t, want_t, rtol=1e-12, atol=1e-12)


def test_jvp_and_jacfwd_match_the_reference():
    x0, w1, b1, w2, b2, u = _inputs(10, requires_grad=False)
    f = lambda backend: lambda w: _run(backend, x0, w, b1, w2, b2, u, delay=2)  # noqa: E731
    t = torch.randn_like(w1)
    for a, b in zip(jvp(f("auto"), (w1,), (t,)), jvp(f("eager"), (w1,), (t,))):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(jacfwd(f("auto"))(w1), jacfwd(f("eager"))(w1), rtol=1e-12, atol=1e-12)


def test_forward_ad_and_backward_together():
    ins = _inputs(11)
    with fwAD.dual_level():
        w1 = fwAD.make_dual(ins[1], torch.ones_like(ins[1]))
        y = _run("cpp", ins[0], w1, *ins[2:], delay=2)
        (g,) = torch.autograd.grad(fwAD.unpack_dual(y).primal.sum(), ins[3])
    (want,) = torch.autograd.grad(_run("eager", *ins, delay=2).sum(), ins[3])
    torch.testing.assert_close(g, want, rtol=1e-10, atol=1e-10)
