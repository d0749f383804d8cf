"""`fbfast.from_module` verifies what it views (fbfast/modules.py): it returns a view only of a
module whose own forward computes the network of docs/spec.md §1.1, ``fcL(act(... act(fc1(x))))``
with ``x = [u_t ; x_t]`` and one supported activation, and refuses anything else with a TypeError
that says what differs.

Every test here pairs what must pass with what must be refused, so that each one fails if the
verification is taken out: without it, from_module accepts every module with fc1/fc2.
"""

from __future__ import annotations

import copy
import re

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


class ThirdLayerActivated(ThirdLayer):
    def forward(self, x):
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


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

class LeakyInCode(RecurrentNetwork):
    """A leaky_relu whose slope only the forward's code knows."""

    def forward(self, x):
        return self.fc2(F.leaky_relu(self.fc1(x), 0.2))


# id -> (accepted module, its nearest refused sibling, how to call them, what the refusal names)
PAIRS = {
    "seed_recurrent_network": (lambda: make(RecurrentNetwork),
                               lambda: make(Activated, F.softplus), "cat", r"fc2\(softplus\(fc1\(x\)\)\)"),
    "F.relu": (lambda: make(Activated, F.relu), lambda: make(Activated, F.relu6), "cat", "relu6"),
    "torch.relu": (lambda: make(Activated, torch.relu), lambda: make(Activated, F.hardtanh), "cat", "hardtanh"),
    "nn.ReLU_member": (lambda: make(Activated, nn.ReLU()), lambda: make(Activated, nn.Softplus()), "cat", "softplus"),
    "Tensor.relu": (lambda: make(Activated, lambda t: t.relu()),
                    lambda: make(Activated, lambda t: t.clamp(-1, 1)), "cat", "hardtanh"),
    "nn.SiLU_member": (lambda: make(Activated, nn.SiLU()), lambda: make(Activated, nn.Softsign()), "cat", "softsign"),
    "nn.LeakyReLU(0.2)_member": (lambda: make(Activated, nn.LeakyReLU(0.2)), lambda: make(LeakyInCode), "cat",
                                 r"activation=nn\.LeakyReLU\(0\.2\)\) names it"),
    "float32": (lambda: make(RecurrentNetwork, dtype=torch.float32),
                lambda: make(Activated, F.softplus, dtype=torch.float32), "cat", "softplus"),
    "float64": (lambda: make(RecurrentNetwork, dtype=torch.float64),
                lambda: make(Activated, F.softplus, dtype=torch.float64), "cat", "softplus"),
    "forward(u,x)": (lambda: make(ForwardUX), lambda: make(ForwardUXCatXU), "u,x", "column order"),
    "forward(x,u)": (lambda: make(ForwardXU), lambda: make(ForwardXUCatXU), "x,u", "column order"),
    "forward(a,b)": (lambda: make(ForwardAB), lambda: make(ForwardABCatBA), "u,x", "assumed its own order"),
    "sequential": (lambda: make(sequential), lambda: make(sequential, LeakyInDisguise), "cat",
                   r"its hidden activation is leaky_relu, but its activation modules \(LeakyInDisguise\) say relu"),
    "FeedbackMLP_subclass": (lambda: make(FeedbackSubclass), lambda: make(FeedbackSubclassTanh), "cat",
                             r"its hidden activation is tanh, but its activation attribute says relu"),
}


def hand_loop(module, step, x0, u):
    """The module's own per-step loop: what the view's rollout must reproduce."""
    x, ys = x0, []
    for t in range(u.shape[0]):
        x = step(module, u[t], x)
        ys.append(x)
    return torch.stack(ys)


def linears(module):
    if isinstance(module, nn.Sequential):
        return list(module)[0::2]
    return [getattr(module, f"fc{l}") for l in range(1, 10) if hasattr(module, f"fc{l}")]


# --- accepted: the view rolls out what the module's own loop computes ---------------------------


@pytest.mark.parametrize("case", list(PAIRS))
def test_accepted_view_rolls_out_the_modules_own_loop_and_its_sibling_is_refused(case):
    make_good, make_bad, how, names = PAIRS[case]
    good = make_good()
    fcs = linears(good)
    dtype = fcs[0].weight.dtype
    view = fbfast.from_module(good)
    assert isinstance(view, fbfast.FeedbackMLP)
    assert view.layers == fcs and all(a is b for a, b in zip(view.layers, fcs))  # the very same nn.Linear objects

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


# --- refused: modules that compute something else, and why ------------------------------------


def test_refuses_an_activation_fbfast_does_not_fuse():
    with pytest.raises(TypeError, match=r"matches fc2\(softplus\(fc1\(x\)\)\).*softplus, which fbfast does "
                                        r"not fuse \(it fuses relu, leaky_relu, .*mish\)") as err:
        fbfast.from_module(make(Activated, F.softplus))
    assert "differs from the fused network with relu by up to" in str(err.value)


class SigmoidOnOutput(Activated):
    def forward(self, x):
        return torch.sigmoid(self.fc2(self.act(self.fc1(x))))


@pytest.mark.parametrize("act, name, param", [
    (torch.tanh, "tanh", 0.0), (F.silu, "silu", 0.0), (torch.sigmoid, "sigmoid", 0.0), (F.gelu, "gelu", 0.0),
    (lambda t: F.gelu(t, approximate="tanh"), "gelu_tanh", 0.0), (F.mish, "mish", 0.0), (F.elu, "elu", 1.0),
    (F.leaky_relu, "leaky_relu", 0.01), (nn.ELU(0.5), "elu", 0.5), (nn.LeakyReLU(0.3), "leaky_relu", 0.3),
], ids=["tanh", "silu", "sigmoid", "gelu", "gelu_tanh", "mish", "F.elu", "F.leaky_relu", "nn.ELU(0.5)",
        "nn.LeakyReLU(0.3)"])
def test_finds_the_activation_the_forward_computes(act, name, param):
    """A module with fc1/fc2 says what it computes only through its forward: the view takes the
    activation that reproduces it (activation modules it holds first, with their parameters)."""
    module = make(Activated, act, dtype=torch.float64)
    view = fbfast.from_module(module)
    assert (view.activation, view.activation_param) == (name, param)
    x = torch.randn(5, 10, dtype=torch.float64)
    torch.testing.assert_close(view(x), module(x), rtol=1e-12, atol=1e-12)
    # The nearest refused sibling: the same forward with an activation on the output.
    sibling = make(SigmoidOnOutput, act, dtype=torch.float64)
    says = rf"matches sigmoid\(fc2\({name}\(fc1\(x\)\)\)\).*applies sigmoid to the output"
    with pytest.raises(TypeError, match=says):
        fbfast.from_module(sibling)


def test_activation_override_names_a_parameter_the_forward_spells_in_code():
    module = make(LeakyInCode, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"None of the variants"):
        fbfast.from_module(module)
    view = fbfast.from_module(module, activation=nn.LeakyReLU(0.2))
    assert (view.activation, view.activation_param) == ("leaky_relu", 0.2)
    x = torch.randn(5, 10, dtype=torch.float64)
    torch.testing.assert_close(view(x), module(x), rtol=1e-12, atol=1e-12)
    # A wrong override is refused, naming what the forward computes instead.
    with pytest.raises(TypeError, match=r"its hidden activation is tanh, but activation= asks for relu"):
        fbfast.from_module(make(Activated, torch.tanh), activation="relu")
    with pytest.raises(TypeError, match=r"activation modules say tanh, but activation=relu was asked for"):
        fbfast.from_module(make(sequential, nn.Tanh), activation="relu")
    with pytest.raises(ValueError, match=r"activation must be one of the names.*'swish'"):
        fbfast.from_module(make(RecurrentNetwork), activation="swish")


def test_refuses_tanh_on_the_output():
    with pytest.raises(TypeError, match=r"matches tanh\(fc2\(relu\(fc1\(x\)\)\)\).*applies tanh to the output"):
        fbfast.from_module(make(TanhOnOutput))


@pytest.mark.parametrize("identity", [False, True], ids=["random_fc3", "identity_fc3"])
def test_a_third_layer_is_part_of_the_network_only_with_an_activation_before_it(identity):
    """fc3 joins the fused network: fc3(fc2(relu(fc1(x)))) lacks the activation between fc2 and
    fc3, so it is refused whatever fc3's values (an identity fc3 would still train apart from
    the view's network); with relu before fc3 the same module is accepted."""
    module = make(ThirdLayer)
    if identity:
        with torch.no_grad():
            module.fc3.weight.copy_(torch.eye(2))
            module.fc3.bias.zero_()
    with pytest.raises(TypeError, match=r"does not compute fc3\(act\(fc2\(act\(fc1\(x\)\)\)\)\)"):
        fbfast.from_module(module)
    module.__class__ = ThirdLayerActivated
    view = fbfast.from_module(module)
    assert view.num_layers == 3 and view.fc3 is module.fc3


class Headed(RecurrentNetwork):
    """fc1, fc2 and a layer under another name, which the view would leave out."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(2, 2)

    def forward(self, x):
        return self.head(self.fc2(F.relu(self.fc1(x))))


@pytest.mark.parametrize("identity", [False, True], ids=["random_head", "identity_head"])
def test_refuses_a_layer_that_would_never_get_a_gradient(identity):
    """Refused whatever its values: a head that is the identity now computes the same as the
    view, but the view would leave it out of every gradient, and training would move it."""
    module = make(Headed)
    if identity:
        with torch.no_grad():
            module.head.weight.copy_(torch.eye(2))
            module.head.bias.zero_()
    with pytest.raises(TypeError, match=r"outside fc1 and fc2: head \(Linear\(in_features=2, out_features=2"
                                        r".*never get a gradient"):
        fbfast.from_module(module)


def test_refuses_a_layer_norm_between_the_layers():
    with pytest.raises(TypeError, match=r"norm \(LayerNorm\(\(5,\).*not part of the fused network"):
        fbfast.from_module(make(WithLayerNorm))


@pytest.mark.parametrize("cls", [ForwardUXCatXU, ForwardXUCatXU])
def test_refuses_columns_concatenated_as_x_then_u(cls):
    with pytest.raises(TypeError, match=r"cat\(\[x, u\]\).*column order.*columns \[0:8\] of fc1\.weight "
                                        r"reading u.*torch\.cat\(\[u, x\], -1\).*fc1\.weight\[:, 2:\]"):
        fbfast.from_module(make(cls))


def test_zero_initialized_weights_hide_nothing():
    """With fc2's weight all zero every activation gives fc2's bias: only the random-weight probe
    tells them apart. A missing activation is refused there, and among the supported ones the
    random-weight probe picks the one the forward computes (not the first that matched)."""
    module = make(Activated, lambda t: t)
    nn.init.zeros_(module.fc2.weight)
    with pytest.raises(TypeError, match=r"with random weights.*matches fc2\(fc1\(x\)\): it has no activation "
                                        r"between the layers"):
        fbfast.from_module(module)
    module = make(Activated, torch.tanh)
    nn.init.zeros_(module.fc2.weight)
    assert fbfast.from_module(module).activation == "tanh"


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
        module.relu = nn.Softplus()
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
        with pytest.raises(TypeError, match="softplus"):
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


# --- every activation class and depth -----------------------------------------------------------

ACTIVATION_MODULES = {
    "ReLU": (nn.ReLU, "relu", 0.0), "LeakyReLU": (nn.LeakyReLU, "leaky_relu", 0.01),
    "LeakyReLU(0.2)": (lambda: nn.LeakyReLU(0.2), "leaky_relu", 0.2), "ELU": (nn.ELU, "elu", 1.0),
    "ELU(0.5)": (lambda: nn.ELU(alpha=0.5), "elu", 0.5), "Tanh": (nn.Tanh, "tanh", 0.0),
    "Sigmoid": (nn.Sigmoid, "sigmoid", 0.0), "SiLU": (nn.SiLU, "silu", 0.0), "GELU": (nn.GELU, "gelu", 0.0),
    "GELU(tanh)": (lambda: nn.GELU(approximate="tanh"), "gelu_tanh", 0.0), "Mish": (nn.Mish, "mish", 0.0),
}


def deep_sequential(make_act, layers, widths=(10, 7, 5, 6, 4)):
    """Linear(10, 7), act, Linear(7, 5), act, ..., Linear(., 2): ``layers`` Linear layers."""
    sizes = list(widths[:layers]) + [2]
    mods = []
    for l in range(layers):
        mods.append(nn.Linear(sizes[l], sizes[l + 1]))
        if l < layers - 1:
            mods.append(make_act())
    return nn.Sequential(*mods)


class DeepFc(nn.Module):
    """fc1 .. fcL attributes with the activation held as a module, the forward a loop."""

    def __init__(self, make_act, layers):
        super().__init__()
        seq = deep_sequential(make_act, layers)
        for l, fc in enumerate(list(seq)[0::2]):
            setattr(self, f"fc{l + 1}", fc)
        self.act = make_act()
        self.layers = layers

    def forward(self, x):
        for l in range(1, self.layers + 1):
            x = getattr(self, f"fc{l}")(x)
            if l < self.layers:
                x = self.act(x)
        return x


def _check_view(module, name, param, layers):
    view = fbfast.from_module(module)
    assert view.num_layers == layers
    if layers > 1:  # one layer has no activation: any name computes the same
        assert (view.activation, view.activation_param) == (name, param)
    assert all(a is b for a, b in zip(view.layers, linears(module)))
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 2, generator=g, dtype=torch.float64)
    u = torch.randn(5, 4, 8, generator=g, dtype=torch.float64)
    twin = copy.deepcopy(module)
    fused = view.rollout(x0, u=u, backend="eager")
    by_hand = hand_loop(twin, STEPS["cat"], x0, u)
    torch.testing.assert_close(fused, by_hand, rtol=1e-12, atol=1e-12)
    fused.square().sum().backward()
    by_hand.square().sum().backward()
    for p, q in zip(module.parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("layers", [1, 2, 3, 5])
@pytest.mark.parametrize("act", list(ACTIVATION_MODULES))
def test_accepts_a_sequential_of_every_activation_class_and_depth(act, layers):
    make_act, name, param = ACTIVATION_MODULES[act]
    torch.manual_seed(layers)
    _check_view(deep_sequential(make_act, layers).double(), name, param, layers)


@pytest.mark.parametrize("layers", [1, 3, 5])
@pytest.mark.parametrize("act", list(ACTIVATION_MODULES))
def test_accepts_fc_attributes_of_every_activation_and_depth(act, layers):
    make_act, name, param = ACTIVATION_MODULES[act]
    torch.manual_seed(layers)
    _check_view(DeepFc(make_act, layers).double(), name, param, layers)


class DeepFcOutputActivated(DeepFc):
    def forward(self, x):
        return torch.tanh(super().forward(x))


@pytest.mark.parametrize("layers", [2, 4])
@pytest.mark.parametrize("act", ["ELU(0.5)", "SiLU", "GELU(tanh)"])
def test_refuses_a_deep_module_with_an_output_activation(act, layers):
    make_act, name, _ = ACTIVATION_MODULES[act]
    torch.manual_seed(0)
    module = DeepFcOutputActivated(make_act, layers)
    inner = "fc1(x)"
    for l in range(2, layers + 1):
        inner = f"fc{l}({name}({inner}))"
    with pytest.raises(TypeError, match=re.escape(f"matches tanh({inner})") + ".*applies tanh to the output"):
        fbfast.from_module(module)


@pytest.mark.parametrize("mods, says", [
    ([nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 2)],
     r"Sequential\(Linear, ReLU, Linear, Tanh, Linear\) mixes activations: position 1 is ReLU\(\) \(relu\), "
     r"position 3 is Tanh\(\) \(tanh\)"),
    ([nn.Linear(10, 5), nn.LeakyReLU(0.1), nn.Linear(5, 5), nn.LeakyReLU(0.2), nn.Linear(5, 2)],
     r"mixes activations: .*leaky_relu\(negative_slope=0\.1\).*leaky_relu\(negative_slope=0\.2\).*one parameter"),
    ([nn.Linear(10, 5), nn.GELU(), nn.Linear(5, 5), nn.GELU(approximate="tanh"), nn.Linear(5, 2)],
     r"mixes activations: .*\(gelu\).*\(gelu_tanh\)"),
    ([nn.Linear(10, 5), nn.Softplus(), nn.Linear(5, 2)],
     r"Sequential\(Linear, Softplus, Linear\) holds Softplus at position 1, an activation fbfast does not "
     r"fuse; the activation must be one of the names 'relu', .*'mish', or an instance of nn\.ReLU"),
    ([nn.Linear(10, 5), nn.ReLU(), nn.ReLU(), nn.Linear(5, 2)],
     r"needs nn\.Sequential\(Linear, act, Linear, \.\.\., act, Linear\).*got Sequential\(Linear, ReLU, ReLU, Linear\)"),
    ([nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 2), nn.ReLU()],
     r"got Sequential\(Linear, ReLU, Linear, ReLU\)"),
    ([nn.Linear(10, 5), nn.ReLU(), nn.Dropout(0.1), nn.Linear(5, 2)],
     r"got Sequential\(Linear, ReLU, Dropout, Linear\)"),
], ids=["relu_then_tanh", "two_slopes", "gelu_forms", "softplus", "two_activations", "ends_in_activation",
        "dropout"])
def test_refuses_a_sequential_that_is_not_one_network(mods, says):
    with pytest.raises(TypeError, match=says):
        fbfast.from_module(nn.Sequential(*mods))
    # The same Sequential with one supported activation throughout is accepted.
    fbfast.from_module(nn.Sequential(nn.Linear(10, 5), nn.ReLU(), nn.Linear(5, 5), nn.ReLU(), nn.Linear(5, 2)))


def test_refuses_deep_layer_sizes_that_do_not_chain():
    with pytest.raises(ValueError, match=r"fc2 is Linear\(5, 4\) and fc3 is Linear\(3, 2\); need fc2\.out == fc3\.in"):
        fbfast.from_module(nn.Sequential(nn.Linear(10, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(3, 2)))
    with pytest.raises(ValueError, match=r"fc1 is Linear\(1, 3\); need fc1\.in >= fc1\.out"):
        fbfast.from_module(nn.Sequential(nn.Linear(1, 3)))


def test_refuses_a_gap_in_the_fc_numbering():
    """fc1, fc2 and fc4: fc4 is not part of fc1 .. fcL, so it would never get a gradient."""
    module = make(RecurrentNetwork)
    module.fc4 = nn.Linear(2, 2)
    with pytest.raises(TypeError, match=r"outside fc1 and fc2: fc4 \(Linear.*never get a gradient"):
        fbfast.from_module(module)


# --- the feedback structure of the view (docs/spec.md §1.2) ------------------------------------


class DeltaWithReward(nn.Module):
    """A delta model written by hand: fc1 reads [u (4), s_{t-1} (2), s_{t-3} (2)], fc2 outputs
    [ds (2), reward (1)]; the loop adds ds to s_{t-1} and feeds s back."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(8, 6)
        self.fc2 = nn.Linear(6, 3)

    def forward(self, u, state):
        return self.fc2(torch.tanh(self.fc1(torch.cat([u, state], -1))))


def test_overrides_set_the_views_structure_and_its_rollout_is_the_modules_loop():
    module = make(DeltaWithReward, dtype=torch.float64)
    view = fbfast.from_module(module, delay=(1, 3), feedback=2, residual=True)
    assert (view.lags, view.feedback, view.residual, view.exo_features) == ((1, 3), 2, True, 4)
    assert view.activation == "tanh" and view.fc1 is module.fc1
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(3, 5, 2, generator=g, dtype=torch.float64)
    u = torch.randn(7, 5, 4, generator=g, dtype=torch.float64)
    states, want = list(x0), []
    for t in range(7):
        out = module(u[t], torch.cat([states[-1], states[-3]], -1))
        y = torch.cat([out[:, :2] + states[-1], out[:, 2:]], -1)
        want.append(y)
        states.append(y[:, :2])
    torch.testing.assert_close(view.rollout(x0, u=u, backend="eager"), torch.stack(want), rtol=1e-12, atol=1e-12)
    # without the overrides, the same module is a one-lag network that feeds back all 3 outputs:
    # fc1's 8 inputs are then Du = 5 and x (3), and the view still verifies (forward(u, x) splits
    # at another column), but it is another rollout.
    plain = fbfast.from_module(module)
    assert (plain.lags, plain.feedback, plain.exo_features) == ((1,), None, 5)


def test_structure_overrides_are_checked():
    module = make(DeltaWithReward)
    with pytest.raises(ValueError, match=r"from_module: .*need fc1\.in >= m·F = 3·3 = 9.*lags \(1, 2, 3\)"):
        fbfast.from_module(module, delay=(1, 2, 3))
    with pytest.raises(ValueError, match=r"from_module: feedback must be in 1\.\.out_features = 3, got 4"):
        fbfast.from_module(module, feedback=4)
    with pytest.raises(ValueError, match=r"from_module: delay=\(1, 1\): the lags must be distinct"):
        fbfast.from_module(module, delay=(1, 1))
    with pytest.raises(TypeError, match=r"from_module: residual must be a bool .*got str 'yes'"):
        fbfast.from_module(module, residual="yes")
    with pytest.raises(TypeError, match=r"unexpected keyword argument 'lags'.*delay, feedback, residual"):
        fbfast.from_module(module, lags=(1, 2))


def test_a_feedback_mlp_keeps_or_changes_its_structure():
    fb = fbfast.FeedbackMLP(3 + 2 * 2, 5, 3, delay=(2, 1), feedback=2, residual=True)
    assert fbfast.from_module(fb) is fb
    assert fbfast.from_module(fb, delay=[2, 1], residual=True) is fb
    other = fbfast.from_module(fb, delay=(1, 2))
    assert other is not fb and other.fc1 is fb.fc1 and other.fc2 is fb.fc2
    assert (other.lags, other.feedback, other.residual) == ((1, 2), 2, True)
    assert (fb.lags, fb.feedback, fb.residual) == ((2, 1), 2, True)  # the original is left alone
    every = fbfast.from_module(fb, feedback=None, delay=1)  # F = O = 3 of one lag: 7 = Du 4 + 3
    assert (every.feedback, every.exo_features) == (None, 4)
    with pytest.raises(ValueError, match=r"m·F = 3·2 = 6"):
        fbfast.from_module(fbfast.FeedbackMLP(4, 5, 3, feedback=2), delay=(1, 2, 3))


class StructuredSubclass(fbfast.FeedbackMLP):
    def __init__(self):
        super().__init__(2 + 2 * 1, 5, 3, delay=(1, 2), feedback=1, residual=True)

    def forward(self, x):
        return self.fc2(F.relu(self.fc1(x)))


def test_a_feedback_mlp_subclass_is_verified_with_its_structure():
    module = make(StructuredSubclass, dtype=torch.float64)
    view = fbfast.from_module(module)
    assert type(view) is fbfast.FeedbackMLP and (view.lags, view.feedback, view.residual) == ((1, 2), 1, True)
    x0, u = torch.randn(2, 3, 1, dtype=torch.float64), torch.randn(4, 3, 2, dtype=torch.float64)
    torch.testing.assert_close(view.rollout(x0, u=u, backend="eager"), module.rollout(x0, u=u, backend="eager"),
                               rtol=0, atol=0)
