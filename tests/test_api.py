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


def test_from_module_rejects_softplus_sequential():
    with pytest.raises(TypeError, match=r"Sequential\(Linear, Softplus, Linear\)"):
        fbfast.from_module(nn.Sequential(nn.Linear(10, 5), nn.Softplus(), nn.Linear(5, 2)))
    assert fbfast.from_module(nn.Sequential(nn.Linear(10, 5), nn.Tanh(), nn.Linear(5, 2))).activation == "tanh"


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


# --- deeper networks and other activations (docs/spec.md §1.1, §3) -----------------------------


def _loop(module, x0, u):
    """The module's own forward, called once per step: what its rollout must reproduce."""
    x, ys = x0, []
    for t in range(u.shape[0]):
        x = module(torch.cat([u[t], x], -1))
        ys.append(x)
    return torch.stack(ys)


def test_feedback_mlp_deep_silu_rolls_out_and_trains():
    torch.manual_seed(8)
    fb = fbfast.FeedbackMLP(6, 9, 2, hidden_layers=3, activation="silu", dtype=torch.float64)
    assert fb.num_layers == 4 and [type(m) for m in fb.layers] == [nn.Linear] * 4
    assert [(m.in_features, m.out_features) for m in fb.layers] == [(6, 9), (9, 9), (9, 9), (9, 2)]
    assert set(fb.state_dict()) == {f"fc{l}.{p}" for l in range(1, 5) for p in ("weight", "bias")}
    assert (fb.activation, fb.activation_param, fb.exo_features) == ("silu", 0.0, 4)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 2, generator=g, dtype=torch.float64)
    u = torch.randn(7, 3, 4, generator=g, dtype=torch.float64)
    target = torch.randn(7, 3, 2, generator=g, dtype=torch.float64)

    # The rollout is the module's own forward fed back, with the same gradients.
    want = _loop(fb, x0, u)
    for backend in ["eager", "compile"] + (["cpp"] if CPP.available else []):
        fb.zero_grad()
        y = fb.rollout(x0, u=u, backend=backend)
        torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-12)
        y.square().sum().backward()
        got = [p.grad.clone() for p in fb.parameters()]
        fb.zero_grad()
        want.square().sum().backward(retain_graph=True)
        for a, p in zip(got, fb.parameters()):
            torch.testing.assert_close(a, p.grad, rtol=1e-9, atol=1e-11)

    # And it trains: twenty SGD steps through the rollout lower the loss.
    opt = torch.optim.SGD(fb.parameters(), lr=0.05)
    losses = []
    for _ in range(20):
        loss = F.mse_loss(fb.rollout(x0, u=u, truncate=3), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.9 * losses[0], losses


@pytest.mark.parametrize("activation, name, param", [
    (nn.LeakyReLU(0.2), "leaky_relu", 0.2), ("leaky_relu", "leaky_relu", 0.01), (nn.ELU(alpha=0.5), "elu", 0.5),
    ("elu", "elu", 1.0), (nn.GELU(approximate="tanh"), "gelu_tanh", 0.0), (nn.GELU(), "gelu", 0.0),
    (nn.Mish(), "mish", 0.0), ("sigmoid", "sigmoid", 0.0),
], ids=["LeakyReLU(0.2)", "leaky_relu", "ELU(0.5)", "elu", "GELU(tanh)", "GELU", "Mish", "sigmoid"])
def test_feedback_mlp_honours_the_activation_and_its_parameter(activation, name, param):
    torch.manual_seed(9)
    fb = fbfast.FeedbackMLP(5, 6, 3, hidden_layers=2, activation=activation, dtype=torch.float64)
    assert (fb.activation, fb.activation_param) == (name, param)
    assert name in repr(fb)
    act = activation if isinstance(activation, nn.Module) else {
        "leaky_relu": nn.LeakyReLU(), "elu": nn.ELU(), "sigmoid": nn.Sigmoid()}[activation]
    seq = nn.Sequential(fb.fc1, act, fb.fc2, act, fb.fc3)
    x = torch.randn(4, 5, dtype=torch.float64) * 3
    torch.testing.assert_close(fb(x), seq(x), rtol=0, atol=0)
    x0, u = torch.randn(4, 3, dtype=torch.float64), torch.randn(5, 4, 2, dtype=torch.float64)
    torch.testing.assert_close(fb.rollout(x0, u=u, backend="eager"), _loop(seq, x0, u), rtol=1e-12, atol=1e-12)
    assert fbfast.from_module(fb) is fb


def test_feedback_mlp_without_hidden_layers_is_one_linear():
    fb = fbfast.FeedbackMLP(5, 100, 3, hidden_layers=0, dtype=torch.float64)
    assert fb.num_layers == 1 and (fb.fc1.in_features, fb.fc1.out_features) == (5, 3) and not hasattr(fb, "fc2")
    x0, u = torch.randn(4, 3, dtype=torch.float64), torch.randn(3, 4, 2, dtype=torch.float64)
    y = fb.rollout(x0, u=u)
    torch.testing.assert_close(y[0], F.linear(torch.cat([u[0], x0], -1), fb.fc1.weight, fb.fc1.bias))
    torch.testing.assert_close(y[1], F.linear(torch.cat([u[1], y[0]], -1), fb.fc1.weight, fb.fc1.bias))


@pytest.mark.parametrize("kwargs, exc, says", [
    (dict(hidden_layers=-1), ValueError, r"FeedbackMLP: hidden_layers must be >= 0, got -1"),
    (dict(hidden_layers=2.0), TypeError, r"FeedbackMLP: hidden_layers must be an int, got float 2\.0"),
    (dict(hidden_layers=True), TypeError, r"hidden_layers must be an int, got bool"),
    (dict(activation="swish"), ValueError, r"FeedbackMLP: activation must be one of the names 'relu', .*'swish'"),
    (dict(activation=nn.Softplus()), TypeError, r"FeedbackMLP: activation .*Softplus"),
    (dict(activation=nn.LeakyReLU), TypeError, r"the class LeakyReLU itself, not an instance.*nn\.LeakyReLU\(\)"),
], ids=["hidden_layers_negative", "hidden_layers_float", "hidden_layers_bool", "unknown_activation",
        "unsupported_module", "module_class"])
def test_feedback_mlp_refuses_bad_arguments(kwargs, exc, says):
    with pytest.raises(exc, match=says):
        fbfast.FeedbackMLP(4, 3, 2, **kwargs)


def test_rollout_takes_the_activation_as_a_name_or_a_module():
    g = torch.Generator().manual_seed(10)
    x0 = torch.randn(3, 2, generator=g, dtype=torch.float64)
    params = [torch.randn(4, 2, generator=g, dtype=torch.float64), None,
              torch.randn(4, 4, generator=g, dtype=torch.float64), torch.randn(4, generator=g, dtype=torch.float64),
              torch.randn(2, 4, generator=g, dtype=torch.float64), None]

    def run(activation):
        return fbfast.rollout(x0, *params, steps=5, activation=activation, backend="eager")

    torch.testing.assert_close(run("leaky_relu"), run(nn.LeakyReLU()), rtol=0, atol=0)
    torch.testing.assert_close(run("gelu_tanh"), run(nn.GELU(approximate="tanh")), rtol=0, atol=0)
    assert not torch.allclose(run(nn.LeakyReLU(0.2)), run("leaky_relu"))
    assert not torch.allclose(run("gelu"), run("gelu_tanh"))
    assert not torch.allclose(run("relu"), run("leaky_relu"))


def test_compile_backend_for_a_deeper_network():
    """Three layers, gelu_tanh, one bias missing; and the cache keys everything the unrolled
    graph depends on: another activation parameter compiles another graph."""
    from fbfast import functional
    d = torch.float64

    def inputs():
        g = torch.Generator().manual_seed(11)
        shapes = [(2, 3, 2), (4, 3, 2), (5, 4), (5,), (3, 5), None, (2, 3), (2,)]
        return [None if s is None else torch.randn(*s, generator=g, dtype=d).requires_grad_(True) for s in shapes]

    grad_y = torch.randn(4, 3, 2, dtype=d, generator=torch.Generator().manual_seed(12))
    results = []
    for backend in ("compile", "eager"):
        x0, u, *params = ins = inputs()
        y = fbfast.rollout(x0, *params, u=u, delay=2, truncate=3, activation="gelu_tanh", backend=backend)
        present = [t for t in ins if t is not None]
        results.append((y, torch.autograd.grad(y, present, grad_y)))
    (yc, gc), (ye, ge) = results
    assert _grad_fn_name(yc) != "StackBackward0"  # it really ran something else than eager
    torch.testing.assert_close(yc, ye)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)

    x0, u, *params = [None if t is None else t.detach() for t in inputs()]
    before = len(functional._COMPILED)
    for slope in (0.1, 0.1, 0.3):
        y = fbfast.rollout(x0, *params, u=u, delay=2, activation=nn.LeakyReLU(slope), backend="compile")
        want = fbfast.rollout(x0, *params, u=u, delay=2, activation=nn.LeakyReLU(slope), backend="eager")
        torch.testing.assert_close(y, want)
    assert len(functional._COMPILED) == before + 2


def test_rollout_reference_takes_version_1_positional_form_and_keywords():
    g = torch.Generator().manual_seed(13)
    d = torch.float64
    x0, u = torch.randn(2, 3, 2, generator=g, dtype=d), torch.randn(5, 3, 3, generator=g, dtype=d)
    w1, b1 = torch.randn(4, 5, generator=g, dtype=d), torch.randn(4, generator=g, dtype=d)
    w2, b2 = torch.randn(2, 4, generator=g, dtype=d), torch.randn(2, generator=g, dtype=d)
    keyword = fbfast.rollout_reference(x0, w1, b1, w2, b2, steps=5, u=u, delay=2, truncate=2)
    for positional in (fbfast.rollout_reference(x0, w1, b1, w2, b2, 5, u, 2, 2),
                       fbfast.rollout_reference(x0, w1, b1, w2, b2, 5, u, delay=2, truncate=2),
                       fbfast.rollout_reference(x0, w1, b1, w2, b2, u=u, delay=2, truncate=2)):
        torch.testing.assert_close(positional, keyword, rtol=0, atol=0)
    with pytest.raises(TypeError, match=r"rollout_reference: got delay both positionally .* and as a keyword"):
        fbfast.rollout_reference(x0, w1, b1, w2, b2, 5, u, 2, delay=3)
    with pytest.raises(TypeError, match=r"at most steps, u, delay, truncate; got 5 arguments from steps=5"):
        fbfast.rollout_reference(x0, w1, b1, w2, b2, 5, u, 2, 2, 1)
    with pytest.raises(ValueError, match=r"^fbfast\.rollout_reference: u has batch size 3"):
        fbfast.rollout_reference(x0[:, :2], w1, b1, w2, b2, 5, u, 2)


def test_rollout_refuses_positional_steps_with_a_hint():
    x0, w1, _, w2, _ = _small_case()
    with pytest.raises(TypeError, match=r"w3 must be a Tensor, got int .*keyword arguments: steps="):
        fbfast.rollout(x0, w1, None, w2, None, 4)


# --- fbfast.testing, the package's test helpers --------------------------------------------------


def test_make_problem_keeps_two_layer_draws_and_names_layers():
    import dataclasses

    from fbfast.testing import make_problem
    p = make_problem(3, 2, 4, 5, 6, delay=2, seed=3)
    # The draws of the generator version 1's tests were written against, in its order.
    g = torch.Generator().manual_seed(3)
    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    want = [rnd(2, 3, 4), rnd(6, 3, 2), rnd(5, 6) * (0.9 / 6 ** 0.5), rnd(5) * 0.1, rnd(4, 5) * (0.9 / 5 ** 0.5),
            rnd(4) * 0.1]
    got = [p.x0, p.u, p.w1, p.b1, p.w2, p.b2]
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert p.names == ["x0", "u", "w1", "b1", "w2", "b2"] and p.params == [p.w1, p.b1, p.w2, p.b2]
    with pytest.raises(AttributeError, match=r"2 layers: no attribute 'w3'"):
        p.w3
    q = dataclasses.replace(p, w1=p.w1.detach() * 2, x0=p.x0.detach())
    assert torch.equal(q.w1, p.w1.detach() * 2) and q.w2 is p.w2 and p.w1.requires_grad
    q.b2 = None  # assigning a layer's tensor changes what the problem runs
    assert q.biases[1] is None and q.params[3] is None and "b2" not in q.names
    torch.testing.assert_close(q.run("eager"), fbfast.rollout(q.x0, q.w1, q.b1, q.w2, None, u=q.u, delay=2,
                                                              backend="eager"), rtol=0, atol=0)
    deep = make_problem(2, 0, 3, 99, 4, layers=(7, 5), bias=(True, False, True), activation="mish")
    assert [tuple(w.shape) for w in deep.weights] == [(7, 3), (5, 7), (3, 5)] and deep.b2 is None
    assert deep.names == ["x0", "w1", "b1", "w2", "w3", "b3"]
    torch.testing.assert_close(deep.run("eager"), deep.reference(), rtol=0, atol=0)


def test_layers_may_be_named_as_version_1_allowed():
    x0, w1, _, w2, _ = _small_case(torch.float64, requires_grad=False)
    b2 = torch.randn(2, dtype=torch.float64)
    want = fbfast.rollout(x0, w1, None, w2, b2, steps=3, backend="eager")
    for got in (fbfast.rollout(x0, w1=w1, w2=w2, b2=b2, steps=3, backend="eager"),
                fbfast.rollout_reference(x0, w1=w1, w2=w2, b2=b2, steps=3)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'trunate'"):
        fbfast.rollout(x0, w1, None, w2, None, steps=3, trunate=2)
    with pytest.raises(TypeError, match=r"got w1, w3 as keywords but not w2"):
        fbfast.rollout(x0, w1=w1, w3=w2, steps=3)
    with pytest.raises(TypeError, match=r"both positionally and as keywords \(w2\)"):
        fbfast.rollout(x0, w1, None, w2=w2, steps=3)


# --- the feedback structure on the module and in fbfast.testing (docs/spec.md §1.2) ---------------


def test_feedback_mlp_stores_its_structure_and_rolls_it_out():
    torch.manual_seed(0)
    fb = fbfast.FeedbackMLP(3 + 2 * 2, 6, 4, delay=(3, 1), feedback=2, residual=True, dtype=torch.float64)
    assert (fb.delay, fb.lags, fb.feedback, fb.fed_back, fb.residual, fb.exo_features) == ((3, 1), (3, 1), 2, 2,
                                                                                         True, 3)
    assert "delay=(3, 1), feedback=2, residual=True" in repr(fb)
    assert list(fb.state_dict()) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]  # no new state
    x0, u = torch.randn(3, 5, 2, dtype=torch.float64), torch.randn(6, 5, 3, dtype=torch.float64)
    want = fbfast.rollout(x0, *fb.params(), u=u, delay=(3, 1), feedback=2, residual=True, backend="eager")
    torch.testing.assert_close(fb.rollout(x0, u=u, backend="eager"), want, rtol=0, atol=0)
    # version 1's modules took the delay per call: it still overrides the module's lags
    plain = fbfast.FeedbackMLP(4, 5, 2, dtype=torch.float64)
    assert plain.delay == 1 and plain.lags == (1,) and "delay" not in repr(plain)
    x0 = torch.randn(2, 3, 2, dtype=torch.float64)
    u = torch.randn(5, 3, 2, dtype=torch.float64)
    torch.testing.assert_close(plain.rollout(x0, None, u, 2), fbfast.rollout(x0, *plain.params(), u=u, delay=2,
                                                                            backend="auto"), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"x0 must have shape \(B, O\) or \(1, B, O\), got \(2, 3, 2\)"):
        plain.rollout(x0, u=u)  # its own delay is 1: a 2-row x0 is refused, naming x0


@pytest.mark.parametrize("kwargs, exc, says", [
    (dict(delay=(1, 1)), ValueError, r"FeedbackMLP: delay=\(1, 1\): the lags must be distinct"),
    (dict(delay=()), ValueError, r"FeedbackMLP: delay must hold at least one lag"),
    (dict(delay=0), ValueError, r"FeedbackMLP: delay must be >= 1, got 0"),
    (dict(delay=1.0), TypeError, r"FeedbackMLP: delay must be an int or a sequence .*got float 1\.0"),
    (dict(feedback=3), ValueError, r"FeedbackMLP: feedback must be in 1\.\.out_features = 2, got 3"),
    (dict(feedback=True), TypeError, r"FeedbackMLP: feedback must be an int .*got bool True"),
    (dict(residual=0), TypeError, r"FeedbackMLP: residual must be a bool .*got int 0"),
    (dict(delay=(1, 2, 3)), ValueError, r"FeedbackMLP: in_features \(4\) must be >= m·F = 3·2 = 6"),
], ids=["lags_repeated", "lags_empty", "delay_zero", "delay_float", "feedback_above_out", "feedback_bool",
        "residual_int", "in_below_m_F"])
def test_feedback_mlp_refuses_a_bad_structure(kwargs, exc, says):
    with pytest.raises(exc, match=says):
        fbfast.FeedbackMLP(4, 3, 2, **kwargs)


def test_make_problem_with_a_structure():
    from fbfast.testing import make_problem
    p = make_problem(3, 2, 4, 5, 6, lags=(2, 5), feedback=3, residual=True, seed=1)
    assert p.delay == (2, 5) and p.lags == (2, 5) and p.structure == dict(delay=(2, 5), feedback=3, residual=True)
    assert p.x0.shape == (5, 3, 3) and p.w1.shape == (5, 2 + 2 * 3)
    # the draws keep version 1's order, x0 first, whatever the shapes
    g = torch.Generator().manual_seed(1)
    assert torch.equal(p.x0, torch.randn(5, 3, 3, generator=g, dtype=torch.float64))
    torch.testing.assert_close(p.run("eager"), p.reference(), rtol=0, atol=0)
    torch.testing.assert_close(p.run("eager"), fbfast.rollout(p.x0, *p.params, u=p.u, delay=(2, 5), feedback=3,
                                                              residual=True, backend="eager"), rtol=0, atol=0)
    assert make_problem(3, 2, 4, 5, 6, delay=(2, 5)).lags == (2, 5)
    with pytest.raises(ValueError, match=r"make_problem: got both delay=2 and lags=\(2, 5\)"):
        make_problem(3, 2, 4, 5, 6, delay=2, lags=(2, 5))


def test_a_library_without_the_feedback_arguments_is_reported_out_of_date(monkeypatch):
    """fbfast/ops.py loads only a library whose schemas take lags, feedback and residual: one
    built from older sources would run every structure as version 1's plain feedback."""
    from fbfast import dispatch, ops
    if not ops.LOADED:
        pytest.skip(ops.LOAD_ERROR)
    assert ops._schema_mismatch() is None
    built = tuple(a.name for a in torch.ops.fbfast.rollout_forward.default._schema.arguments)
    assert built[-3:] == ("lags", "feedback", "residual")
    # This library seen from a Python side one argument newer: its schema now predates the call.
    monkeypatch.setitem(ops.EXPECTED_ARGUMENTS, "rollout_forward", built[:-3] + ops._FEEDBACK_ARGUMENTS + ("x",))
    assert "this fbfast calls fbfast::rollout_forward(" in ops._schema_mismatch()
    monkeypatch.setitem(ops.EXPECTED_ARGUMENTS, "rollout_forward", built + ops._FEEDBACK_ARGUMENTS)
    why = ops._schema_mismatch()
    assert "predates the lags, feedback and residual arguments" in why
    monkeypatch.setattr(ops, "LOADED", False)
    monkeypatch.setattr(ops, "STALE", True)
    monkeypatch.setattr(ops, "LOAD_ERROR", why)
    status = dispatch._status()
    assert not status["cpp"].available and "out of date" in status["cpp"].reason
    assert dispatch.REBUILD_HINT in status["cpp"].reason and "cuda" in status["cuda"].reason.lower()
