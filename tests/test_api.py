"""Public API: FeedbackMLP, from_module, backends() and backend selection (docs/spec.md §3)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fbfast

CPP = fbfast.backends()["cpp"]
needs_cpp = pytest.mark.skipif(not CPP.available, reason=f"cpp backend: {CPP.reason}")


class RecurrentNetwork(nn.Module):
    """The seed's network (loops 2 and 3)."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(10, 5)
        self.fc2 = nn.Linear(5, 2)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


class NoLinears(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 2)


def seed_inputs(B=3, T=5, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, 2, generator=g).to(dtype), torch.randn(T, B, 8, generator=g).to(dtype))


def manual_rollout(w1, b1, w2, b2, x0, u):
    x, ys = x0, []
    for t in range(u.shape[0]):
        y = F.relu(torch.cat([u[t], x], -1) @ w1.T + b1) @ w2.T + b2
        ys.append(y)
        x = y
    return torch.stack(ys)


# --- FeedbackMLP -------------------------------------------------------------------------------


def test_feedback_mlp_state_dict_round_trips_with_seed_network():
    torch.manual_seed(0)
    fb = fbfast.FeedbackMLP(10, 5, 2)
    seed = RecurrentNetwork()
    assert set(fb.state_dict()) == set(seed.state_dict()) == {
        "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}
    seed.load_state_dict(fb.state_dict())  # strict
    x = torch.randn(4, 10)
    torch.testing.assert_close(seed(x), fb(x), rtol=0, atol=0)

    other = RecurrentNetwork()
    fb2 = fbfast.FeedbackMLP(10, 5, 2)
    fb2.load_state_dict(other.state_dict())
    torch.testing.assert_close(fb2(x), other(x), rtol=0, atol=0)
    assert fb2.exo_features == 8


def test_feedback_mlp_forward_is_one_step():
    torch.manual_seed(1)
    fb = fbfast.FeedbackMLP(10, 5, 2)
    x0, u = seed_inputs(T=1)
    step = fb(torch.cat([u[0], x0], -1))
    w1, b1, w2, b2 = fb.fc1.weight, fb.fc1.bias, fb.fc2.weight, fb.fc2.bias
    torch.testing.assert_close(step, F.relu(torch.cat([u[0], x0], -1) @ w1.T + b1) @ w2.T + b2)
    torch.testing.assert_close(fb.rollout(x0, u=u)[0], step)


@pytest.mark.parametrize("backend", ["auto", "eager"])
@pytest.mark.parametrize("delay,truncate", [(1, None), (2, 2)])
def test_feedback_mlp_rollout_equals_functional(backend, delay, truncate):
    torch.manual_seed(2)
    fb = fbfast.FeedbackMLP(10, 5, 2, dtype=torch.float64)
    x0 = torch.randn(delay, 3, 2, dtype=torch.float64)
    u = torch.randn(6, 3, 8, dtype=torch.float64)
    got = fb.rollout(x0, u=u, delay=delay, truncate=truncate, backend=backend)
    want = fbfast.rollout(x0, fb.fc1.weight, fb.fc1.bias, fb.fc2.weight, fb.fc2.bias, u=u,
                          delay=delay, truncate=truncate, backend="eager")
    torch.testing.assert_close(got, want)
    if delay == 1:
        torch.testing.assert_close(
            got, manual_rollout(fb.fc1.weight, fb.fc1.bias, fb.fc2.weight, fb.fc2.bias, x0[0], u))


def test_feedback_mlp_without_bias_and_pure_feedback():
    fb = fbfast.FeedbackMLP(3, 4, 3, bias=False, dtype=torch.float64)
    assert fb.fc1.bias is None and fb.fc2.bias is None and fb.exo_features == 0
    x0 = torch.randn(2, 3, dtype=torch.float64)
    y = fb.rollout(x0, steps=3)
    assert y.shape == (3, 2, 3)
    torch.testing.assert_close(y[0], fb(x0))
    torch.testing.assert_close(y[1], fb(y[0]))


def test_feedback_mlp_rejects_in_smaller_than_out():
    with pytest.raises(ValueError, match=r"in_features \(1\).*out_features \(2\)"):
        fbfast.FeedbackMLP(1, 5, 2)
    fbfast.FeedbackMLP(2, 5, 2)  # equal is fine: Du = 0


# --- from_module -------------------------------------------------------------------------------


def _seed_module():
    torch.manual_seed(3)
    return RecurrentNetwork()


def _sequential_module():
    torch.manual_seed(4)
    return nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 2))


@pytest.mark.parametrize("make", [_seed_module, _sequential_module], ids=["fc1_fc2", "sequential"])
def test_from_module_shares_parameters(make):
    module = make()
    view = fbfast.from_module(module)
    assert isinstance(view, fbfast.FeedbackMLP)
    x0, u = seed_inputs(seed=5)
    torch.testing.assert_close(view(torch.cat([u[0], x0], -1)), module(torch.cat([u[0], x0], -1)))

    # An optimizer over the original's parameters moves the view.
    before = view.rollout(x0, u=u).detach().clone()
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    module(torch.randn(4, 10)).pow(2).sum().backward()
    opt.step()
    after = view.rollout(x0, u=u).detach()
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after[0], module(torch.cat([u[0], x0], -1)).detach())

    # Gradients of the view's rollout land in the original's .grad.
    opt.zero_grad(set_to_none=True)
    view.rollout(x0, u=u).sum().backward()
    params = list(module.parameters())
    assert all(p.grad is not None for p in params)
    refs = [p.detach().clone().requires_grad_(True) for p in params]
    want = torch.autograd.grad(manual_rollout(*refs, x0, u).sum(), refs)
    for p, g in zip(params, want):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-5)


def test_from_module_returns_feedback_mlp_unchanged():
    fb = fbfast.FeedbackMLP(4, 3, 2)
    assert fbfast.from_module(fb) is fb


def test_from_module_rejects_tanh_sequential():
    with pytest.raises(TypeError, match=r"Sequential\(Linear, Tanh, Linear\)"):
        fbfast.from_module(nn.Sequential(nn.Linear(10, 5), nn.Tanh(), nn.Linear(5, 2)))


def test_from_module_rejects_module_without_fc1_fc2():
    with pytest.raises(TypeError, match=r"NoLinears.*fc1.*fc2"):
        fbfast.from_module(NoLinears())


def test_from_module_rejects_sizes_that_cannot_feed_back():
    with pytest.raises(ValueError, match=r"fc1 is Linear\(10, 5\).*fc2 is Linear\(4, 2\)"):
        fbfast.from_module(nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(4, 2)))


# --- backends() ----------------------------------------------------------------------------------


def test_backends_report():
    status = fbfast.backends()
    assert set(status) == {"cuda", "cpp", "compile", "eager"}
    for name, s in status.items():
        assert s.name == name
        assert isinstance(s.available, bool)
        assert isinstance(s.reason, str) and s.reason
    assert status["eager"].available and status["compile"].available
    if not status["cuda"].available:
        assert "cuda" in status["cuda"].reason.lower()
    # A copy: callers cannot break dispatch by editing it.
    status.pop("eager")
    assert "eager" in fbfast.backends()


# --- backend selection ---------------------------------------------------------------------------


def _small_case(dtype=torch.float32, requires_grad=True):
    g = torch.Generator().manual_seed(6)
    x0 = torch.randn(3, 2, generator=g).to(dtype).requires_grad_(requires_grad)
    w1 = torch.randn(4, 2, generator=g).to(dtype)
    w2 = torch.randn(2, 4, generator=g).to(dtype)
    return x0, w1, None, w2, None


def _grad_fn_name(y):
    return y.grad_fn.name()


@needs_cpp
def test_auto_uses_cpp_on_cpu_float32(monkeypatch):
    monkeypatch.delenv("FBFAST_BACKEND", raising=False)
    args = _small_case()
    auto = fbfast.rollout(*args, steps=4)
    cpp = fbfast.rollout(*args, steps=4, backend="cpp")
    eager = fbfast.rollout(*args, steps=4, backend="eager")
    assert _grad_fn_name(eager) == "StackBackward0"
    assert _grad_fn_name(auto) == _grad_fn_name(cpp) != "StackBackward0"
    assert "RolloutFunction" in _grad_fn_name(auto)  # fbfast's C++ autograd node
    torch.testing.assert_close(auto, cpp, rtol=0, atol=0)


def test_fbfast_backend_env_overrides_auto(monkeypatch):
    monkeypatch.setenv("FBFAST_BACKEND", "eager")
    y = fbfast.rollout(*_small_case(), steps=4)
    assert _grad_fn_name(y) == "StackBackward0"
    # An explicit backend is not overridden.
    if CPP.available:
        assert _grad_fn_name(fbfast.rollout(*_small_case(), steps=4, backend="cpp")) != "StackBackward0"


def test_auto_falls_back_to_eager_for_float16_on_cpu(monkeypatch):
    monkeypatch.delenv("FBFAST_BACKEND", raising=False)
    y = fbfast.rollout(*_small_case(torch.float16), steps=3)
    assert y.dtype == torch.float16
    assert _grad_fn_name(y) == "StackBackward0"


def test_unknown_backend_is_a_value_error():
    with pytest.raises(ValueError, match=r"backend.*'nope'"):
        fbfast.rollout(*_small_case(), steps=2, backend="nope")


def test_unknown_backend_from_env_names_the_variable(monkeypatch):
    monkeypatch.setenv("FBFAST_BACKEND", "nope")
    with pytest.raises(ValueError, match=r"FBFAST_BACKEND.*'nope'"):
        fbfast.rollout(*_small_case(), steps=2)


@pytest.mark.skipif(fbfast.backends()["cuda"].available, reason="cuda is available here")
def test_cuda_backend_unavailable_is_a_runtime_error():
    with pytest.raises(RuntimeError, match=r"'cuda' is not available") as err:
        fbfast.rollout(*_small_case(), steps=2, backend="cuda")
    assert fbfast.backends()["cuda"].reason in str(err.value)


@needs_cpp
def test_cpp_backend_rejects_float16():
    with pytest.raises(TypeError, match=r"'cpp'.*torch\.float16"):
        fbfast.rollout(*_small_case(torch.float16), steps=2, backend="cpp")


# --- backend="compile" --------------------------------------------------------------------------


def test_compile_backend_matches_eager():
    """One small case only: every (steps, delay, truncate) compiles its own unrolled graph."""
    g = torch.Generator().manual_seed(7)
    d = torch.float64

    def inputs():
        g.manual_seed(7)
        return [torch.randn(*s, generator=g, dtype=d).requires_grad_(True)
                for s in [(2, 3, 2), (3, 3, 2), (4, 4), (4,), (2, 4), (2,)]]

    grad_y = torch.randn(3, 3, 2, dtype=d)
    results = []
    for backend in ("compile", "eager"):
        x0, u, w1, b1, w2, b2 = ins = inputs()
        y = fbfast.rollout(x0, w1, b1, w2, b2, u=u, delay=2, truncate=2, backend=backend)
        results.append((y, torch.autograd.grad(y, ins, grad_y)))
    (yc, gc), (ye, ge) = results
    assert _grad_fn_name(yc) != "StackBackward0"  # it really ran something else than eager
    torch.testing.assert_close(yc, ye)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)
