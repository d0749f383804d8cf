"""The reference rollout (`fbfast.rollout_reference`, backend="eager") against independent oracles.

Oracles, each written here without using fbfast:
* `loop_rollout`: an explicit per-step loop of matmuls, truncation as ``x = y.detach()``;
* `rnn_rollout`: for delay 1, the rollout is an Elman ReLU RNN over the hidden state
  (``h_t = relu(W1u u_t + W1x W2 h_{t-1} + W1x b2 + b1)``), run by ``torch.nn.RNN``.
* `hand_loop` / `sequential_loop`: any depth and every activation, written out with elementary
  ops, and as the ``nn.Sequential`` a user would feed back by hand;
* `version1_reference`: version 1's reference, which two-layer ReLU rollouts equal bit for bit.
Everything that compares gradients runs in float64.
"""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import fbfast

F64 = torch.float64
NAMES = ("x0", "u", "w1", "b1", "w2", "b2")


def make_inputs(*, B=3, O=2, H=6, Du=3, T=5, delay=1, bias=True, dtype=F64, seed=0,
                requires_grad=True):
    """Random rollout inputs; x0 is always (delay, B, O); u is None when Du == 0."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=g, dtype=F64) * scale).to(dtype)
        return t.requires_grad_(requires_grad)

    # Scales keep the feedback roughly norm-preserving, so relu has both signs for many steps.
    x0 = rnd(delay, B, O)
    u = rnd(T, B, Du) if Du > 0 else None
    w1 = rnd(H, Du + O, scale=(Du + O) ** -0.5)
    b1 = rnd(H, scale=0.3) if bias else None
    w2 = rnd(O, H, scale=H ** -0.5 * 1.5)
    b2 = rnd(O, scale=0.3) if bias else None
    return dict(x0=x0, u=u, w1=w1, b1=b1, w2=w2, b2=b2)


def loop_rollout(x0, w1, b1, w2, b2, steps, u=None, delay=1, truncate=None):
    """docs/spec.md §1 for version 1's network, step by step with explicit matmuls (no F.linear,
    no cat): `hand_loop` with two layers and ReLU."""
    return hand_loop(x0, [w1, b1, w2, b2], steps, u, delay, truncate, "relu", 0.0)


def grads(y, inputs, grad_y):
    """Gradients of ``(y * grad_y).sum()`` w.r.t. every tensor input; None (unused) -> zeros."""
    names = [n for n in NAMES if inputs.get(n) is not None and inputs[n].requires_grad]
    tensors = [inputs[n] for n in names]
    if not y.requires_grad:
        got = [None] * len(tensors)
    else:
        got = torch.autograd.grad(y, tensors, grad_y, allow_unused=True)
    return {n: torch.zeros_like(t) if g is None else g for n, t, g in zip(names, tensors, got)}


def assert_grads_close(got, want, **tol):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], msg=lambda m: f"d{name}: {m}", **tol)


def run_reference(fn, inp, steps, delay, truncate):
    if fn == "reference":
        return fbfast.rollout_reference(inp["x0"], inp["w1"], inp["b1"], inp["w2"], inp["b2"],
                                        steps, inp["u"], delay, truncate)
    return fbfast.rollout(inp["x0"], inp["w1"], inp["b1"], inp["w2"], inp["b2"], steps=steps,
                          u=inp["u"], delay=delay, truncate=truncate, backend=fn)


# --- reference vs the explicit loop --------------------------------------------------------


@pytest.mark.parametrize("fn", ["reference", "eager"])
@pytest.mark.parametrize("T", [0, 1, 5])
@pytest.mark.parametrize("B", [1, 7])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("truncate", [None, 1, 3])
@pytest.mark.parametrize("Du", [0, 3], ids=["no_u", "u"])
@pytest.mark.parametrize("delay", [1, 2, 3])
def test_matches_loop(fn, T, B, bias, truncate, Du, delay):
    inp = make_inputs(B=B, Du=Du, T=T, delay=delay, bias=bias, seed=T * 100 + B * 10 + delay)
    y = run_reference(fn, inp, T, delay, truncate)
    want = loop_rollout(inp["x0"], inp["w1"], inp["b1"], inp["w2"], inp["b2"], T, inp["u"],
                        delay, truncate)
    assert y.shape == (T, B, 2)
    assert y.dtype == F64
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    grad_y = torch.randn(y.shape, dtype=F64, generator=torch.Generator().manual_seed(7))
    assert_grads_close(grads(y, inp, grad_y), grads(want, inp, grad_y), rtol=1e-10, atol=1e-12)


def test_loop_cases_are_not_trivial():
    """The loop comparison above must exercise relu's both sides and a real feedback path."""
    inp = make_inputs(B=7, Du=3, T=5, delay=1)
    w1, b1 = inp["w1"].detach(), inp["b1"].detach()
    y = loop_rollout(inp["x0"], inp["w1"], inp["b1"], inp["w2"], inp["b2"], 5, inp["u"])
    z = torch.cat([inp["u"][1:].detach(), y[:-1].detach()], -1) @ w1.T + b1
    assert (z > 0).any() and (z < 0).any()
    # Full BPTT and truncate=1 differ in dw1, so the truncate cases can fail.
    g = torch.randn_like(y)
    full = grads(y, inp, g)
    cut = grads(loop_rollout(inp["x0"], inp["w1"], inp["b1"], inp["w2"], inp["b2"], 5, inp["u"],
                             1, 1), inp, g)
    assert not torch.allclose(full["w1"], cut["w1"])
    assert not torch.allclose(full["x0"], cut["x0"])


# --- an independent oracle: torch.nn.RNN --------------------------------------------------


def rnn_rollout(x0, w1, b1, w2, b2, u, steps):
    """Delay-1 rollout through ``torch.nn.RNN(nonlinearity="relu")``.

    h_t = relu(W1u u_t + W1x y_{t-1} + b1) with y_{t-1} = W2 h_{t-1} + b2, so the hidden state is
    an Elman RNN with W_ih = W1u, W_hh = W1x W2, b_ih = W1x b2 + b1, b_hh = 0, over inputs
    u[1:]; its h_0 is the first step, applied by hand. The RNN weights are built from the
    rollout's tensors and passed through functional_call, so gradients reach W1, b1, W2, b2.
    """
    H, D = w1.shape
    O = w2.shape[0]
    Du = D - O
    B = x0.shape[-2]
    x0 = x0.reshape(B, O)
    zeros_h = torch.zeros(H, dtype=w1.dtype)
    b1_ = b1 if b1 is not None else zeros_h
    b2_ = b2 if b2 is not None else torch.zeros(O, dtype=w1.dtype)
    w1u, w1x = w1[:, :Du], w1[:, Du:]
    if Du == 0:
        # nn.RNN refuses input_size=0: feed a 1-wide zero input through a zero W_ih.
        rnn_in = torch.zeros(steps - 1, B, 1, dtype=w1.dtype)
        w_ih = torch.zeros(H, 1, dtype=w1.dtype)
        z0 = x0 @ w1x.T + b1_
    else:
        rnn_in = u[1:]
        w_ih = w1u
        z0 = u[0] @ w1u.T + x0 @ w1x.T + b1_
    h0 = torch.relu(z0)
    rnn = torch.nn.RNN(w_ih.shape[1], H, nonlinearity="relu", dtype=w1.dtype)
    params = {"weight_ih_l0": w_ih, "weight_hh_l0": w1x @ w2,
              "bias_ih_l0": w1x @ b2_ + b1_, "bias_hh_l0": zeros_h}
    hs, _ = functional_call(rnn, params, (rnn_in, h0.unsqueeze(0)))
    h = torch.cat([h0.unsqueeze(0), hs], 0)
    return h @ w2.T + b2_


def _backends_for_oracle():
    out = ["reference", "eager"]
    cpp = fbfast.backends()["cpp"]
    out.append(pytest.param("cpp", marks=pytest.mark.skipif(not cpp.available, reason=cpp.reason)))
    return out


@pytest.mark.parametrize("fn", _backends_for_oracle())
@pytest.mark.parametrize("T", [2, 6])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("Du", [0, 3], ids=["no_u", "u"])
@pytest.mark.parametrize("B", [1, 4])
def test_matches_torch_rnn(fn, T, bias, Du, B):
    inp = make_inputs(B=B, Du=Du, T=T, delay=1, bias=bias, H=5, seed=11 + T + Du + B)
    y = run_reference(fn, inp, T, 1, None)
    want = rnn_rollout(inp["x0"], inp["w1"], inp["b1"], inp["w2"], inp["b2"], inp["u"], T)
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-12)
    grad_y = torch.randn(y.shape, dtype=F64, generator=torch.Generator().manual_seed(3))
    got = grads(y, inp, grad_y)
    assert set(got) == {n for n in NAMES if inp[n] is not None}
    assert_grads_close(got, grads(want, inp, grad_y), rtol=1e-9, atol=1e-11)


# --- truncated BPTT --------------------------------------------------------------------------


def seed_loop_truncate1(x0, w1, b1, w2, b2, u, steps):
    """The seed's loop 2: ``input = output.detach().requires_grad_(True)`` at every step."""
    Du = u.shape[-1]
    x, ys = x0[0], []
    for t in range(steps):
        h = torch.relu(u[t] @ w1[:, :Du].T + x @ w1[:, Du:].T + b1)
        y = h @ w2.T + b2
        ys.append(y)
        x = y.detach().requires_grad_(True)
    return torch.stack(ys)


@pytest.mark.parametrize("fn", ["reference", "eager"])
@pytest.mark.parametrize("delay", [1, 2])
@pytest.mark.parametrize("truncate", [1, 2, 3])
def test_truncated_gradients(fn, delay, truncate):
    T = 8
    inp = make_inputs(B=4, Du=3, T=T, delay=delay, seed=5 + truncate)
    y = run_reference(fn, inp, T, delay, truncate)
    want = loop_rollout(inp["x0"], inp["w1"], inp["b1"], inp["w2"], inp["b2"], T, inp["u"],
                        delay, truncate)
    full = loop_rollout(inp["x0"], inp["w1"], inp["b1"], inp["w2"], inp["b2"], T, inp["u"],
                        delay, None)
    torch.testing.assert_close(y, full, rtol=1e-12, atol=1e-12)  # truncation is backward-only
    grad_y = torch.randn(y.shape, dtype=F64, generator=torch.Generator().manual_seed(1))
    got = grads(y, inp, grad_y)
    assert_grads_close(got, grads(want, inp, grad_y), rtol=1e-10, atol=1e-12)
    # The cut must be real: a reference that ignored `truncate` fails here.
    assert not torch.allclose(got["w1"], grads(full, inp, grad_y)["w1"])


@pytest.mark.parametrize("fn", ["reference", "eager"])
def test_truncate_1_is_the_seed_loop(fn):
    T = 5
    inp = make_inputs(B=4, Du=8, O=2, H=5, T=T, delay=1, seed=21)
    y = run_reference(fn, inp, T, 1, 1)
    want = seed_loop_truncate1(inp["x0"], inp["w1"], inp["b1"], inp["w2"], inp["b2"], inp["u"], T)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    grad_y = torch.randn(y.shape, dtype=F64, generator=torch.Generator().manual_seed(2))
    assert_grads_close(grads(y, inp, grad_y), grads(want, inp, grad_y), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("fn", ["reference", "eager"])
def test_truncate_never_cuts_x0(fn):
    """With delay 3 and truncate 1, x0's rows still get gradient from the steps that read them."""
    inp = make_inputs(B=2, Du=0, T=4, delay=3, seed=4)
    y = run_reference(fn, inp, 4, 3, 1)
    g = grads(y, inp, torch.ones_like(y))["x0"]
    assert (g.abs().sum(dim=(1, 2)) > 0).all()


# --- streaming -------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", ["reference", "eager"])
@pytest.mark.parametrize("Du", [0, 3], ids=["no_u", "u"])
@pytest.mark.parametrize("delay", [1, 3])
def test_streaming_two_chunks_equal_one_call(fn, Du, delay):
    T1, T2 = 4, 5
    inp = make_inputs(B=3, Du=Du, T=T1 + T2, delay=delay, seed=9 + delay, requires_grad=False)
    u = inp["u"]
    whole = run_reference(fn, inp, T1 + T2, delay, None)
    first = run_reference(fn, dict(inp, u=None if u is None else u[:T1]), T1, delay, None)
    x0_next = first[-delay:].detach()
    second = run_reference(fn, dict(inp, x0=x0_next, u=None if u is None else u[T1:]), T2,
                           delay, None)
    torch.testing.assert_close(torch.cat([first, second]), whole, rtol=1e-12, atol=1e-12)
    # The split is not a no-op: the second chunk really depends on what the first one fed it.
    other = run_reference(fn, dict(inp, x0=torch.zeros_like(x0_next),
                                   u=None if u is None else u[T1:]), T2, delay, None)
    assert not torch.allclose(other, second)


def test_streaming_delay1_accepts_2d_x0():
    inp = make_inputs(B=3, Du=3, T=6, delay=1, seed=1, requires_grad=False)
    whole = fbfast.rollout(inp["x0"][0], inp["w1"], inp["b1"], inp["w2"], inp["b2"], u=inp["u"],
                           backend="eager")
    first = fbfast.rollout(inp["x0"][0], inp["w1"], inp["b1"], inp["w2"], inp["b2"],
                           u=inp["u"][:2], backend="eager")
    second = fbfast.rollout(first[-1].detach(), inp["w1"], inp["b1"], inp["w2"], inp["b2"],
                            u=inp["u"][2:], backend="eager")
    torch.testing.assert_close(torch.cat([first, second]), whole, rtol=1e-12, atol=1e-12)


# --- dtype -----------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", ["reference", "eager"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16],
                         ids=lambda d: str(d).replace("torch.", ""))
def test_output_and_grads_keep_input_dtype(fn, dtype):
    inp = make_inputs(B=2, Du=3, T=4, delay=2, dtype=dtype, seed=3)
    y = run_reference(fn, inp, 4, 2, None)
    assert y.dtype == dtype
    for name, g in grads(y, inp, torch.ones_like(y)).items():
        assert g.dtype == dtype, name


def test_float32_matches_float64_loop():
    """float32 is computed in float32 (no silent upcast) and still agrees to float32 accuracy."""
    inp32 = make_inputs(B=5, Du=3, T=6, delay=1, dtype=torch.float32, seed=8, requires_grad=False)
    y = fbfast.rollout_reference(inp32["x0"], inp32["w1"], inp32["b1"], inp32["w2"], inp32["b2"],
                                 6, inp32["u"], 1, None)
    inp64 = {n: None if t is None else t.double() for n, t in inp32.items()}
    want = loop_rollout(inp64["x0"], inp64["w1"], inp64["b1"], inp64["w2"], inp64["b2"], 6,
                        inp64["u"])
    assert y.dtype == torch.float32
    torch.testing.assert_close(y.double(), want, rtol=1e-5, atol=1e-5)


def test_steps_zero_is_empty_and_attached():
    inp = make_inputs(B=3, Du=0, T=0, delay=2, seed=2)
    y = fbfast.rollout_reference(inp["x0"], inp["w1"], inp["b1"], inp["w2"], inp["b2"], 0, None, 2)
    assert y.shape == (0, 3, 2) and y.dtype == F64
    # backward through an empty rollout works and gives zero gradients
    assert_grads_close(grads(y, inp, torch.zeros_like(y)),
                       {n: torch.zeros_like(inp[n]) for n in NAMES if inp[n] is not None})



# --- deeper networks and every activation (docs/spec.md §1.1) -----------------------------------

SQRT_HALF = 0.5 ** 0.5
GELU_TANH_BETA = (2 / torch.pi) ** 0.5

# Each activation written out by hand with elementary ops (no torch.nn.functional), taking which
# side of a kink z == 0 falls on from torch's modules: relu'(0) = 0, leaky_relu'(0) = its slope,
# elu'(0) = alpha (torch.where(z > 0, ...) puts 0 on the lower branch).
HAND = {
    "relu": lambda z, p: torch.where(z > 0, z, torch.zeros_like(z)),
    "leaky_relu": lambda z, p: torch.where(z > 0, z, z * p),
    "elu": lambda z, p: torch.where(z > 0, z, p * (torch.exp(z) - 1)),
    "tanh": lambda z, p: (torch.exp(2 * z) - 1) / (torch.exp(2 * z) + 1),
    "sigmoid": lambda z, p: 1 / (1 + torch.exp(-z)),
    "silu": lambda z, p: z / (1 + torch.exp(-z)),
    "gelu": lambda z, p: 0.5 * z * (1 + torch.erf(z * SQRT_HALF)),
    "gelu_tanh": lambda z, p: 0.5 * z * (1 + torch.tanh(GELU_TANH_BETA * (z + 0.044715 * z ** 3))),
    "mish": lambda z, p: z * torch.tanh(torch.log(1 + torch.exp(z))),
}
# name -> (the nn module, the parameter the rollout gets); non-default parameters too.
MODULES = {
    "relu": (nn.ReLU(), None), "leaky_relu": (nn.LeakyReLU(), 0.01), "leaky_relu_0.3": (nn.LeakyReLU(0.3), 0.3),
    "elu": (nn.ELU(), 1.0), "elu_0.4": (nn.ELU(alpha=0.4), 0.4), "tanh": (nn.Tanh(), None),
    "sigmoid": (nn.Sigmoid(), None), "silu": (nn.SiLU(), None), "gelu": (nn.GELU(), None),
    "gelu_tanh": (nn.GELU(approximate="tanh"), None), "mish": (nn.Mish(), None),
}


def _base(case):
    return case.split("_0.")[0]


def deep_inputs(widths, *, B=3, Du=2, O=2, T=5, delay=1, bias=True, seed=0, scale=1.0, dtype=F64):
    """x0, u and an alternating [w1, b1, ..., wL, bL] for hidden ``widths``."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return (torch.randn(*shape, generator=g, dtype=F64) * s).to(dtype).requires_grad_(True)

    sizes = [Du + O] + list(widths) + [O]
    params = []
    for l in range(len(sizes) - 1):
        params.append(rnd(sizes[l + 1], sizes[l], s=scale * 1.2 / sizes[l] ** 0.5))
        params.append(rnd(sizes[l + 1], s=0.3) if bias else None)
    return rnd(delay, B, O), (rnd(T, B, Du) if Du else None), params


def hand_loop(x0, params, steps, u, delay, truncate, act, param):
    """docs/spec.md §1 for any depth, with explicit matmuls and the hand-written activation."""
    Du = 0 if u is None else u.shape[-1]
    w1 = params[0]
    ys = []
    for t in range(steps):
        if t < delay:
            x = x0[t]
        else:
            x = ys[t - delay]
            if truncate is not None and t % truncate == 0:
                x = x.detach()
        h = x @ w1[:, Du:].T
        if u is not None:
            h = h + u[t] @ w1[:, :Du].T
        for l in range(0, len(params), 2):
            w, b = params[l], params[l + 1]
            if l > 0:
                h = HAND[act](h, param) @ w.T
            if b is not None:
                h = h + b
        ys.append(h)
    if not ys:
        return x0.new_zeros((0, x0.shape[1], params[-2].shape[0]))
    return torch.stack(ys)


def sequential_loop(x0, params, steps, u, module):
    """The per-step loop a user writes: nn.Sequential(Linear, act, ..., Linear) fed back (delay 1)."""
    layers = []
    for l in range(0, len(params), 2):
        w, b = params[l], params[l + 1]
        lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, dtype=w.dtype)
        layers.append(lin)
        layers.append(module)
    seq = nn.Sequential(*layers[:-1])
    names = [n for n, _ in seq.named_parameters()]
    weights = {n: t for n, t in zip(names, [t for t in params if t is not None])}
    x, ys = x0[0], []
    for t in range(steps):
        x = functional_call(seq, weights, (x if u is None else torch.cat([u[t], x], -1),))
        ys.append(x)
    return torch.stack(ys)


def _all_grads(y, tensors, seed=5):
    gy = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(seed))
    got = torch.autograd.grad(y, tensors, gy, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for g, t in zip(got, tensors)]


DEPTH_WIDTHS = {1: (), 2: (6,), 3: (5, 7), 4: (4, 6, 3), 5: (5, 3, 6, 4)}


@pytest.mark.parametrize("depth", list(DEPTH_WIDTHS))
@pytest.mark.parametrize("case", list(MODULES))
def test_every_activation_and_depth_matches_the_hand_loop(case, depth):
    module, param = MODULES[case]
    name = _base(case)
    for delay, truncate, Du, bias in ((1, None, 2, True), (2, 2, 0, False), (3, 1, 3, True)):
        x0, u, params = deep_inputs(DEPTH_WIDTHS[depth], Du=Du, delay=delay, bias=bias, T=6,
                                    seed=depth * 10 + delay)
        y = fbfast.rollout_reference(x0, *params, steps=6, u=u, delay=delay, truncate=truncate, activation=module)
        want = hand_loop(x0, params, 6, u, delay, truncate, name, param)
        torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
        tensors = [t for t in [x0, u] + params if t is not None]
        for a, b in zip(_all_grads(y, tensors), _all_grads(want, tensors)):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("depth", list(DEPTH_WIDTHS))
@pytest.mark.parametrize("case", list(MODULES))
def test_every_activation_and_depth_matches_nn_sequential(case, depth):
    module, _ = MODULES[case]
    x0, u, params = deep_inputs(DEPTH_WIDTHS[depth], Du=3, T=5, seed=depth, scale=1.5)
    y = fbfast.rollout(x0, *params, u=u, activation=module, backend="eager")
    want = sequential_loop(x0, params, 5, u, module)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    tensors = [x0, u] + [t for t in params if t is not None]
    for a, b in zip(_all_grads(y, tensors), _all_grads(want, tensors)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_deep_cases_are_not_trivial():
    """Every activation changes the answer (the cases above can tell them apart), and deep
    hidden pre-activations take both signs."""
    x0, u, params = deep_inputs(DEPTH_WIDTHS[3], Du=3, T=5, seed=3, scale=1.5)
    outs = {case: fbfast.rollout_reference(x0, *params, steps=5, u=u, activation=MODULES[case][0]).detach()
            for case in MODULES}
    for a, b in itertools.combinations(outs, 2):
        assert not torch.allclose(outs[a], outs[b], rtol=1e-6, atol=1e-9), (a, b)
    z = F.linear(torch.cat([u[0], x0[0]], -1), params[0], params[1])
    z = F.linear(F.relu(z), params[2], params[3])
    assert (z > 0).any() and (z < 0).any()


@pytest.mark.parametrize("case", list(MODULES))
def test_value_and_derivative_at_the_kink_are_torchs(case):
    """Every hidden pre-activation exactly 0 (w1 and b1 zero): the rollout's values and its
    gradient through act'(0) equal those of torch's module at 0."""
    module, _ = MODULES[case]
    O, H, B, T = 2, 3, 4, 3
    x0 = torch.randn(1, B, O, dtype=F64)
    w1 = torch.zeros(H, O, dtype=F64, requires_grad=True)
    b1 = torch.zeros(H, dtype=F64, requires_grad=True)
    w2 = torch.randn(O, H, dtype=F64, requires_grad=True)
    b2 = torch.randn(O, dtype=F64, requires_grad=True)
    y = fbfast.rollout_reference(x0, w1, b1, w2, b2, steps=T, activation=module)
    zero = torch.zeros(H, dtype=F64, requires_grad=True)
    act0 = module(zero)
    (dact0,) = torch.autograd.grad(act0.sum(), zero)
    torch.testing.assert_close(y, (act0.detach() @ w2.detach().T + b2.detach()).expand(T, B, O), rtol=0, atol=0)
    gy = torch.randn(T, B, O, dtype=F64)
    (gb1,) = torch.autograd.grad(y, b1, gy)
    torch.testing.assert_close(gb1, dact0 * (gy.sum((0, 1)) @ w2.detach()), rtol=1e-14, atol=1e-15)


@pytest.mark.parametrize("case", list(MODULES))
def test_gradcheck_and_gradgradcheck_every_activation(case):
    module, _ = MODULES[case]
    x0, u, params = deep_inputs((3, 4), B=2, Du=1, T=4, delay=2, seed=7)
    tensors = [x0, u] + [t for t in params if t is not None]

    def fn(x0, u, *ps):
        it = iter(ps)
        full = [next(it) if t is not None else None for t in params]
        # Full BPTT: with truncation the gradient is by design not the derivative gradcheck measures.
        return fbfast.rollout_reference(x0, *full, u=u, delay=2, activation=module)

    assert torch.autograd.gradcheck(fn, tensors)
    assert torch.autograd.gradgradcheck(fn, tensors)


def version1_reference(x0, w1, b1, w2, b2, steps, u=None, delay=1, truncate=None):
    """fbfast/reference.py as version 1 wrote it (two layers, ReLU), verbatim but for the name:
    version 2 must give bit for bit the same values and gradients."""
    k = delay
    B, O = x0.shape[1], x0.shape[2]
    if steps == 0 or B == 0 or O == 0:
        x = x0[:1].expand(steps, B, O)
        xin = x if u is None else torch.cat([u, x], dim=-1)
        return F.linear(F.relu(F.linear(xin, w1, b1)), w2, b2)
    ys = []
    for t in range(steps):
        if t < k:
            x = x0[t]
        else:
            x = ys[t - k]
            if truncate is not None and t % truncate == 0:
                x = x.detach()
        xin = x if u is None else torch.cat([u[t], x], dim=-1)
        h = F.relu(F.linear(xin, w1, b1))
        ys.append(F.linear(h, w2, b2))
    return torch.stack(ys)


@pytest.mark.parametrize("dtype", [F64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("T", [0, 1, 6])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("truncate", [None, 2])
@pytest.mark.parametrize("Du", [0, 3], ids=["no_u", "u"])
@pytest.mark.parametrize("delay", [1, 3])
def test_two_layer_relu_is_version_1_bit_for_bit(dtype, T, bias, truncate, Du, delay):
    inp = make_inputs(B=5, Du=Du, T=T, delay=delay, bias=bias, dtype=dtype, seed=T + Du + delay)
    args = (inp["x0"], inp["w1"], inp["b1"], inp["w2"], inp["b2"])
    want = version1_reference(*args, T, inp["u"], delay, truncate)
    grad_y = torch.randn(want.shape, dtype=F64, generator=torch.Generator().manual_seed(4)).to(dtype)
    want_grads = grads(want, inp, grad_y)
    for y in (fbfast.rollout_reference(*args, T, inp["u"], delay, truncate),
              fbfast.rollout_reference(*args, steps=T, u=inp["u"], delay=delay, truncate=truncate),
              fbfast.rollout(*args, steps=T, u=inp["u"], delay=delay, truncate=truncate, backend="eager"),
              # version 2's spelling of the same structure: the single lag as a tuple, no skip
              fbfast.rollout(*args, steps=T, u=inp["u"], delay=(delay,), truncate=truncate, residual=False,
                             backend="eager")):
        assert torch.equal(y, want)
        for name, g in grads(y, inp, grad_y).items():
            assert torch.equal(g, want_grads[name]), name


def test_one_layer_is_a_linear_recurrence():
    """L = 1: no activation at all, y_t = W1 [u_t; x_t] + b1 (whatever the activation says)."""
    x0, u, params = deep_inputs((), Du=2, T=4, seed=2)
    w1, b1 = params
    want, x = [], x0[0]
    for t in range(4):
        x = torch.cat([u[t], x], -1) @ w1.T + b1
        want.append(x)
    for activation in ("relu", "tanh", nn.ELU(0.3)):
        y = fbfast.rollout_reference(x0, w1, b1, u=u, activation=activation)
        torch.testing.assert_close(y, torch.stack(want), rtol=1e-12, atol=1e-12)
