"""`fbfast.from_module` verifies what it views (fbfast/modules.py): it returns a view only of a
module whose own forward computes ``fc2(relu(fc1(x)))`` with ``x = [u_t ; x_t]``, and refuses
anything else with a TypeError that says what differs.

Every test here pairs what must pass with what must be refused, so that each one fails if the
verification is taken out: without it, from_module accepts every module with fc1/fc2.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fbfast

pytestmark = pytest.mark.usefixtures("one_thread")


# --- modules -------------------------------------------------------------------------------------


class RecurrentNetwork(nn.Module):
    """The seed's network: fc1 = Linear(10, 5), fc2 = Linear(5, 2), fc2(relu(fc1(x)))."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(10, 5)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(5, 2)

    def forward(self, x):
        return self.fc2(self.relu(self.fc1(x)))


class Activated(nn.Module):
    """fc2(act(fc1(x))), with the activation spelled however the caller likes."""

    def __init__(self, act):
        super().__init__()
        self.fc1 = nn.Linear(10, 5)
        self.fc2 = nn.Linear(5, 2)
        self.act = act  # an nn.Module registers as a child, a function stays a plain attribute

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TanhOnOutput(RecurrentNetwork):
    def forward(self, x):
        return torch.tanh(self.fc2(F.relu(self.fc1(x))))


class ThirdLayer(RecurrentNetwork):
    def __init__(self):
        super().__init__()
        self.fc3 = nn.Linear(2, 2)

    def forward(self, x):
        return self.fc3(self.fc2(F.relu(self.fc1(x))))


class WithLayerNorm(RecurrentNetwork):
    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(5)

    def forward(self, x):
        return self.fc2(F.relu(self.norm(self.fc1(x))))


class ForwardUX(RecurrentNetwork):
    def forward(self, u, x):
        return self.fc2(F.relu(self.fc1(torch.cat([u, x], -1))))


class ForwardUXCatXU(RecurrentNetwork):
    def forward(self, u, x):
        return self.fc2(F.relu(self.fc1(torch.cat([x, u], -1))))


class ForwardXU(RecurrentNetwork):
    def forward(self, x, u):
        return self.fc2(F.relu(self.fc1(torch.cat([u, x], -1))))


class ForwardXUCatXU(RecurrentNetwork):
    def forward(self, x, u):
        return self.fc2(F.relu(self.fc1(torch.cat([x, u], -1))))


class ForwardAB(RecurrentNetwork):
    def forward(self, a, b):
        return self.fc2(F.relu(self.fc1(torch.cat([a, b], -1))))


class ForwardABCatBA(RecurrentNetwork):
    def forward(self, a, b):
        return self.fc2(F.relu(self.fc1(torch.cat([b, a], -1))))


class LeakyInDisguise(nn.ReLU):
    def forward(self, x):
        return F.leaky_relu(x)


class FeedbackSubclass(fbfast.FeedbackMLP):
    def __init__(self):
        super().__init__(10, 5, 2)


class FeedbackSubclassTanh(FeedbackSubclass):
    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


def sequential(act=nn.ReLU):
    return nn.Sequential(nn.Linear(10, 5), act(), nn.Linear(5, 2))


def make(cls, *args, seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    return cls(*args).to(dtype)


# How each kind of module is called for one step of the hand-written loop.
STEPS = {
    "cat": lambda m, u, x: m(torch.cat([u, x], -1)),
    "u,x": lambda m, u, x: m(u, x),
    "x,u": lambda m, u, x: m(x, u),
}

# id -> (accepted module, its nearest refused sibling, how to call them, what the refusal names)
PAIRS = {
    "seed_recurrent_network": (lambda: make(RecurrentNetwork),
                               lambda: make(Activated, torch.tanh), "cat", r"fc2\(tanh\(fc1\(x\)\)\)"),
    "F.relu": (lambda: make(Activated, F.relu), lambda: make(Activated, F.tanh), "cat", "tanh"),
    "torch.relu": (lambda: make(Activated, torch.relu), lambda: make(Activated, torch.tanh), "cat", "tanh"),
    "nn.ReLU_member": (lambda: make(Activated, nn.ReLU()), lambda: make(Activated, nn.Tanh()), "cat", "tanh"),
    "Tensor.relu": (lambda: make(Activated, lambda t: t.relu()),
                    lambda: make(Activated, lambda t: t.tanh()), "cat", "tanh"),
    "float32": (lambda: make(RecurrentNetwork, dtype=torch.float32),
                lambda: make(Activated, F.silu, dtype=torch.float32), "cat", "SiLU"),
    "float64": (lambda: make(RecurrentNetwork, dtype=torch.float64),
                lambda: make(Activated, F.silu, dtype=torch.float64), "cat", "SiLU"),
    "forward(u,x)": (lambda: make(ForwardUX), lambda: make(ForwardUXCatXU), "u,x", "column order"),
    "forward(x,u)": (lambda: make(ForwardXU), lambda: make(ForwardXUCatXU), "x,u", "column order"),
    "forward(a,b)": (lambda: make(ForwardAB), lambda: make(ForwardABCatBA), "u,x", "assumed its own order"),
    "sequential": (lambda: make(sequential), lambda: make(sequential, LeakyInDisguise), "cat", "LeakyReLU"),
    "FeedbackMLP_subclass": (lambda: make(FeedbackSubclass), lambda: make(FeedbackSubclassTanh), "cat", "tanh"),
}


def hand_loop(module, step, x0, u):
    """The module's own per-step loop: what the view's rollout must reproduce."""
    x, ys = x0, []
    for t in range(u.shape[0]):
        x = step(module, u[t], x)
        ys.append(x)
    return torch.stack(ys)


def linears(module):
    return (module[0], module[2]) if isinstance(module, nn.Sequential) else (module.fc1, module.fc2)


# --- accepted: the view rolls out what the module's own loop computes ---------------------------


@pytest.mark.parametrize("case", list(PAIRS))
def test_accepted_view_rolls_out_the_modules_own_loop_and_its_sibling_is_refused(case):
    make_good, make_bad, how, names = PAIRS[case]
    good = make_good()
    fc1, fc2 = linears(good)
    dtype = fc1.weight.dtype
    view = fbfast.from_module(good)
    assert isinstance(view, fbfast.FeedbackMLP)
    assert view.fc1 is fc1 and view.fc2 is fc2  # the very same nn.Linear objects

    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(4, 2, generator=g, dtype=dtype)
    u = torch.randn(6, 4, 8, generator=g, dtype=dtype)
    rtol, atol = (1e-10, 1e-12) if dtype == torch.float64 else (1e-5, 1e-6)
    twin = copy.deepcopy(good)
    fused = view.rollout(x0, u=u)
    by_hand = hand_loop(twin, STEPS[how], x0, u)
    torch.testing.assert_close(fused, by_hand, rtol=rtol, atol=atol)
    fused.square().sum().backward()
    by_hand.square().sum().backward()
    for p, q in zip(good.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=100 * rtol, atol=100 * atol)

    with pytest.raises(TypeError, match=names):
        fbfast.from_module(make_bad())


# --- refused: the four modules that used to pass, and why --------------------------------------


def test_refuses_tanh_hidden_activation():
    with pytest.raises(TypeError, match=r"matches fc2\(tanh\(fc1\(x\)\)\).*fbfast fuses only ReLU") as err:
        fbfast.from_module(make(Activated, torch.tanh))
    assert "differs from the fused network by up to" in str(err.value)


def test_refuses_silu_hidden_activation():
    with pytest.raises(TypeError, match=r"matches fc2\(SiLU\(fc1\(x\)\)\).*fbfast fuses only ReLU"):
        fbfast.from_module(make(Activated, F.silu))


def test_refuses_tanh_on_the_output():
    with pytest.raises(TypeError, match=r"matches tanh\(fc2\(relu\(fc1\(x\)\)\)\).*applies tanh to the output"):
        fbfast.from_module(make(TanhOnOutput))


@pytest.mark.parametrize("identity", [False, True], ids=["random_fc3", "identity_fc3"])
def test_refuses_a_third_layer_that_would_never_get_a_gradient(identity):
    """Refused whatever its values: an fc3 that is the identity now computes the same as the view,
    but the view would leave it out of every gradient, and training would move it."""
    module = make(ThirdLayer)
    if identity:
        with torch.no_grad():
            module.fc3.weight.copy_(torch.eye(2))
            module.fc3.bias.zero_()
    with pytest.raises(TypeError, match=r"fc3 \(Linear\(in_features=2, out_features=2.*never get a gradient"):
        fbfast.from_module(module)


def test_refuses_a_layer_norm_between_the_layers():
    with pytest.raises(TypeError, match=r"norm \(LayerNorm\(\(5,\).*not part of the fused network"):
        fbfast.from_module(make(WithLayerNorm))


@pytest.mark.parametrize("cls", [ForwardUXCatXU, ForwardXUCatXU])
def test_refuses_columns_concatenated_as_x_then_u(cls):
    with pytest.raises(TypeError, match=r"cat\(\[x, u\]\).*column order.*columns \[0:8\] of fc1\.weight "
                                        r"reading u.*torch\.cat\(\[u, x\], -1\).*fc1\.weight\[:, 2:\]"):
        fbfast.from_module(make(cls))


def test_refuses_tanh_that_zero_initialized_weights_hide():
    """With fc2's weight all zero every activation gives fc2's bias: only the random-weight probe
    sees the tanh, which would show as soon as training moved fc2."""
    module = make(Activated, torch.tanh)
    nn.init.zeros_(module.fc2.weight)
    with pytest.raises(TypeError, match=r"with random weights.*fc2\(tanh\(fc1\(x\)\)\)"):
        fbfast.from_module(module)


class Dropped(RecurrentNetwork):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.2)

    def forward(self, x):
        return self.fc2(self.drop(F.relu(self.fc1(x))))


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_refuses_dropout_in_either_mode(mode):
    """In eval mode the dropout is the identity, but the view would leave it out of training too."""
    module = getattr(make(Dropped), mode)()
    with pytest.raises(TypeError, match=r"does not compute.*besides fc1 and fc2 it has .*drop \(Dropout"):
        fbfast.from_module(module)
    assert module.training == (mode == "train")


class Normalized(RecurrentNetwork):
    """An input normalization whose buffers are inert at their initial values."""

    def __init__(self, read: bool):
        super().__init__()
        self.read = read
        self.register_buffer("mean", torch.zeros(10))
        self.register_buffer("seen", torch.zeros(()))  # bookkeeping the forward never reads

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x - self.mean if self.read else x)))


def test_refuses_buffers_the_forward_reads_and_accepts_those_it_does_not():
    fbfast.from_module(make(Normalized, False))
    with pytest.raises(TypeError, match=r"reads buffers outside fc1 and fc2 \(mean\)"):
        fbfast.from_module(make(Normalized, True))


class Raises(RecurrentNetwork):
    def forward(self, x):
        raise RuntimeError("needs a hidden state")


class ReturnsTuple(RecurrentNetwork):
    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x))), None


class ReturnsWrongShape(RecurrentNetwork):
    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x))).unsqueeze(1)


class ThreeArguments(RecurrentNetwork):
    def forward(self, u, x, h):
        return self.fc2(F.relu(self.fc1(torch.cat([u, x], -1))))


@pytest.mark.parametrize("cls, says", [
    (Raises, r"raised RuntimeError: needs a hidden state"),
    (ReturnsTuple, r"returned a tuple of 2, not one tensor of shape \(16, 2\)"),
    (ReturnsWrongShape, r"returned shape \(16, 1, 2\), but fc2\(relu\(fc1\(x\)\)\) has shape \(16, 2\)"),
    (ThreeArguments, r"forward\(u, x, h\) is neither forward\(x\) nor forward\(u, x\)"),
], ids=["raises", "tuple", "shape", "three_arguments"])
def test_refuses_a_forward_it_cannot_verify(cls, says):
    with pytest.raises(TypeError, match=rf"could not verify.*{says}.*from_module accepts nn\.Sequential"):
        fbfast.from_module(make(cls))


def test_refuses_lazy_and_meta_modules():
    lazy = nn.Sequential(nn.LazyLinear(5), nn.ReLU(), nn.Linear(5, 2))
    with pytest.raises(ValueError, match=r"0\.weight is not initialized yet"):
        fbfast.from_module(lazy)
    with torch.device("meta"):
        meta = RecurrentNetwork()
    with pytest.raises(ValueError, match=r"fc1\.weight is on the meta device"):
        fbfast.from_module(meta)
    # Once materialized, the same modules are accepted.
    lazy(torch.zeros(1, 10))
    fbfast.from_module(lazy)
    fbfast.from_module(meta.to_empty(device="cpu").apply(
        lambda m: m.reset_parameters() if isinstance(m, nn.Linear) else None))


# --- the original is left alone ----------------------------------------------------------------


class Recording(RecurrentNetwork):
    """Records which instance ran its forward, and draws from the global RNG (to no effect)."""

    calls: list = []

    def forward(self, x):
        Recording.calls.append((id(self), x.dtype))
        return self.fc2(self.relu(self.fc1(x))) + 0 * torch.rand(())


@pytest.mark.parametrize("broken", [False, True], ids=["accepted", "refused"])
def test_verification_runs_on_a_float64_copy_and_leaves_the_module_alone(broken):
    module = make(Recording)
    if broken:
        module.relu = nn.Tanh()
    module.fc1.weight.requires_grad_(False)  # frozen: must stay so
    module.fc2.weight.grad = torch.full_like(module.fc2.weight, 7.0)
    module.eval()
    opt = torch.optim.Adam([p for p in module.parameters() if p.requires_grad], lr=0.1)
    module(torch.randn(3, 10)).sum().backward()
    opt.step()
    state = {k: v.clone() for k, v in module.state_dict().items()}
    grads = {n: None if p.grad is None else p.grad.clone() for n, p in module.named_parameters()}
    flags = {n: p.requires_grad for n, p in module.named_parameters()}
    params = list(module.parameters())
    opt_state = copy.deepcopy(opt.state_dict())
    rng = torch.get_rng_state()
    Recording.calls.clear()

    if broken:
        with pytest.raises(TypeError, match="tanh"):
            fbfast.from_module(module)
    else:
        fbfast.from_module(module)

    # The forward did run, on probes in float64, and never on the original.
    assert Recording.calls and all(dtype == torch.float64 for _, dtype in Recording.calls)
    assert id(module) not in {who for who, _ in Recording.calls}
    assert list(module.parameters()) == params
    for k, v in module.state_dict().items():
        assert v.dtype == state[k].dtype and torch.equal(v, state[k]), k
    for n, p in module.named_parameters():
        assert (p.grad is None) == (grads[n] is None) and (p.grad is None or torch.equal(p.grad, grads[n])), n
        assert p.requires_grad == flags[n], n
    assert not module.training and all(not m.training for m in module.modules())
    assert torch.equal(torch.get_rng_state(), rng)
    assert str(opt.state_dict()) == str(opt_state)
