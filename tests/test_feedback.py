"""The feedback structures of docs/spec.md §1.2: lags (tapped delay lines, NARX), partial
feedback (outputs that are not fed back) and residual (delta) models, with truncation of both
the feedback and the skip edge, and streaming.

Oracles written here without fbfast:
* `window_loop`: the per-step loop a user writes, keeping a window of the last D fed-back
  values and concatenating the lags out of it with ``torch.cat``; explicit matmuls, the
  hand-written activations of tests/test_reference.py, the skip added with ``F.pad``;
* closed forms for a network whose weights are zero (a pure integrator), which say exactly
  which edges truncation cuts;
* `torch.autograd.gradcheck` / ``gradgradcheck`` for the reference's own derivatives.
The reference is then the oracle of "compile" and of the fused "cpp" kernel, for outputs and
every gradient over the grid lags x feedback x residual x truncate x u x dtype.
"""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

import fbfast
from fbfast.testing import make_problem
from test_reference import HAND
from testing import CPP, CPP_REASON, assert_close, cpu_variant, grads

F64, F32 = torch.float64, torch.float32
needs_cpp = pytest.mark.skipif(not CPP, reason=CPP_REASON)
pytestmark = pytest.mark.usefixtures("one_thread")

# Lags: version 1's in-step and delayed, a NARX tapped delay line, and two read out of order.
LAGS = {"1": 1, "3": 3, "narx5": (1, 2, 3, 4, 5), "3,1": (3, 1), "2,5,1": (2, 5, 1)}


def window_loop(x0, params, steps, u, lags, feedback, residual, truncate, act="relu", param=0.0):
    """docs/spec.md §1.2 as a user would write it by hand (``x0`` is ``(D, B, F)``).

    ``window`` holds the last D fed-back values, oldest first, each with whether it came from
    an output (x0 never is cut); step t reads ``window[-d]`` for each lag d, in order."""
    lags = (lags,) if isinstance(lags, int) else tuple(lags)
    O = params[-2].shape[0]
    fed = O if feedback is None else feedback
    window = [(x0[i], False) for i in range(x0.shape[0])]
    ys = []
    for t in range(steps):
        cut = truncate is not None and t % truncate == 0
        read = [window[-d][0].detach() if cut and window[-d][1] else window[-d][0] for d in lags]
        h = torch.cat(([u[t]] if u is not None else []) + read, dim=-1)
        for l in range(0, len(params), 2):
            w, b = params[l], params[l + 1]
            if l > 0:
                h = HAND[act](h, param)
            h = h @ w.T
            if b is not None:
                h = h + b
        if residual:
            h = h + F.pad(read[0], (0, O - fed))
        ys.append(h)
        window.append((h[..., :fed], True))
    if not ys:
        return x0.new_zeros((0, x0.shape[1], O))
    return torch.stack(ys)


def _problem(lags, feedback, residual, truncate, Du, *, dtype=F64, B=3, O=3, T=9, layers=2, seed=0, **kw):
    return make_problem(B, Du, O, 5, T, lags=(lags,) if isinstance(lags, int) else lags, feedback=feedback,
                        residual=residual, truncate=truncate, dtype=dtype, layers=layers, seed=seed, **kw)


def _gy(y, seed=11):
    return torch.randn(y.shape, dtype=F64, generator=torch.Generator().manual_seed(seed)).to(y.dtype)


def _ok_grads(y, inputs, gy):
    if not y.requires_grad:
        return [torch.zeros_like(t) for t in inputs]
    return grads(y, inputs, gy)


# --- the reference against the hand-written loop ---------------------------------------------


@pytest.mark.parametrize("Du", [0, 2], ids=["no_u", "u"])
@pytest.mark.parametrize("truncate", [None, 1, 2, 3])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("feedback", [None, 1, 2], ids=["F=O", "F=1", "F=2"])
@pytest.mark.parametrize("lags", list(LAGS))
def test_reference_matches_the_hand_loop(lags, feedback, residual, truncate, Du):
    p = _problem(LAGS[lags], feedback, residual, truncate, Du, seed=len(lags) + Du)
    want = window_loop(p.x0, p.params, p.steps, p.u, p.lags, feedback, residual, truncate)
    y = p.reference()
    assert y.shape == (p.steps, 3, 3)
    torch.testing.assert_close(y, want, rtol=1e-12, atol=1e-12)
    # The "eager" backend is the reference itself, bit for bit. (Not the hand loop bit for bit: its
    # `h @ w.T + b` and the reference's nn.Linear are different BLAS calls, which MKL rounds
    # differently on some CPUs.)
    torch.testing.assert_close(p.run("eager"), y, rtol=0, atol=0)
    gy = _gy(y)
    for name, a, b in zip(p.names, grads(y, p.inputs(), gy), grads(want, p.inputs(), gy)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12, msg=lambda m: f"d{name}: {m}")


def test_hand_loop_cases_are_not_trivial():
    """The structures really change the result, so the comparisons above can fail."""
    base = _problem((3, 1), None, False, None, 2, requires_grad=False)
    y = base.reference()
    other_order = fbfast.rollout_reference(base.x0, *base.params, u=base.u, delay=(1, 3))
    assert (y - other_order).abs().max() > 1e-3  # the order of the lags picks w1's columns
    skip = fbfast.rollout_reference(base.x0, *base.params, u=base.u, delay=(3, 1), residual=True)
    assert (y - skip).abs().max() > 1e-3
    # feedback=F < O: the outputs past F are computed but never read back
    p = _problem(2, 1, False, None, 0, requires_grad=False)
    y = p.reference()
    w1 = p.w1
    p.w2 = p.w2.clone()
    p.w2[1:] += 1.0  # changes only outputs 1..O-1, which are not fed back
    changed = p.reference()
    torch.testing.assert_close(changed[..., :1], y[..., :1], rtol=0, atol=0)
    assert (changed[..., 1:] - y[..., 1:]).abs().max() > 1e-3
    assert w1.shape == (5, 1)  # Du + m·F columns: one lag of one output


def test_narx_loop_written_with_cat_of_past_outputs():
    """A tapped delay line as in the literature: y_t = f([u_t, y_{t-1}, ..., y_{t-na}])."""
    na, B, O, Du, T = 4, 2, 2, 3, 11
    g = torch.Generator().manual_seed(3)
    x0 = torch.randn(na, B, O, generator=g, dtype=F64)
    u = torch.randn(T, B, Du, generator=g, dtype=F64)
    net = torch.nn.Sequential(torch.nn.Linear(Du + na * O, 7), torch.nn.Tanh(), torch.nn.Linear(7, O)).double()
    history = list(x0)  # oldest first: history[-1] is y_{t-1}
    want = []
    for t in range(T):
        y = net(torch.cat([u[t]] + [history[-k] for k in range(1, na + 1)], -1))
        want.append(y)
        history.append(y)
    params = [t for m in (net[0], net[2]) for t in (m.weight, m.bias)]
    got = fbfast.rollout_reference(x0, *params, u=u, delay=tuple(range(1, na + 1)), activation="tanh")
    torch.testing.assert_close(got, torch.stack(want), rtol=1e-12, atol=1e-12)
    view = fbfast.from_module(net, delay=tuple(range(1, na + 1)))
    torch.testing.assert_close(view.rollout(x0, u=u, backend="eager"), got, rtol=0, atol=0)


def test_delta_model_and_reward_head():
    """A delta model with a reward head: the state s (2 features) is fed back and integrated,
    s_t = s_{t-1} + f(...)[:2]; the reward r_t = f(...)[2] is returned, never fed back."""
    p = _problem(1, 2, True, None, 2, T=6, requires_grad=False)
    y = p.run("eager")
    z = []
    s = p.x0[0]
    for t in range(6):
        out = F.linear(F.relu(F.linear(torch.cat([p.u[t], s], -1), p.w1, p.b1)), p.w2, p.b2)
        z.append(out)
        s = s + out[..., :2]
        torch.testing.assert_close(y[t, :, :2], s, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(y[t, :, 2], out[:, 2], rtol=1e-12, atol=1e-12)


# --- truncation cuts the feedback and the skip edge ----------------------------------------------


@pytest.mark.parametrize("backend", ["eager", pytest.param("cpp", marks=needs_cpp)])
@pytest.mark.parametrize("truncate", [None, 1, 3])
def test_truncation_cuts_the_residual_skip_edge(backend, truncate):
    """A zero network (w2 = 0) makes y_t[:F] = x0 + (t + 1) b2 an integrator of the skip edge
    alone: dy_t/dx0 is 1 until the first cut at a step t > 0 and 0 after, and dy_t/db2 counts
    the steps since the last cut: (t % K) + 1 (t + 1 without truncation)."""
    B, O, Fb, T = 2, 3, 2, 8
    x0 = torch.randn(1, B, Fb, dtype=F64, requires_grad=True)
    w1 = torch.randn(4, Fb, dtype=F64, requires_grad=True)
    w2 = torch.zeros(O, 4, dtype=F64, requires_grad=True)
    b2 = torch.randn(O, dtype=F64, requires_grad=True)
    y = fbfast.rollout(x0, w1, None, w2, b2, steps=T, truncate=truncate, residual=True, feedback=Fb,
                       backend=backend)
    steps = torch.arange(T, dtype=F64)
    count = steps + 1 if truncate is None else steps % truncate + 1
    # Truncation changes gradients, never values.
    torch.testing.assert_close(y[..., :Fb], x0.detach() + (steps + 1)[:, None, None] * b2.detach()[:Fb],
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(y[..., Fb:], b2.detach()[Fb:].expand(T, B, O - Fb), rtol=0, atol=0)
    for t in range(T):
        gx0, gb2 = torch.autograd.grad(y[t, :, 0].sum(), (x0, b2), retain_graph=True)
        reaches_x0 = truncate is None or all(s % truncate for s in range(1, t + 1))
        assert gx0[0, :, 0].tolist() == [1.0 if reaches_x0 else 0.0] * B, (t, gx0)
        assert gb2.tolist() == [count[t].item() * B, 0.0, 0.0], (t, gb2)


@pytest.mark.parametrize("backend", ["eager", pytest.param("cpp", marks=needs_cpp)])
def test_truncate_1_is_a_detach_of_every_fed_back_value(backend):
    """truncate=1 with lags, F < O and a skip: every step's gradient stays in that step."""
    p = _problem((2, 1), 2, True, 1, 2, T=6)
    y = p.run(backend)
    ref = []
    for t in range(6):
        one = fbfast.rollout_reference(
            torch.cat([p.x0, y.detach()[..., :2]])[t:t + 2], *p.params, u=p.u[t:t + 1], delay=(2, 1), feedback=2,
            residual=True)
        ref.append(one[0])
    gy = _gy(y)
    want = torch.stack(ref)
    assert_close(y, want, F64, "out", "Y")
    weights = [t for t in p.params if t is not None]
    for a, b in zip(_ok_grads(y, weights, gy), _ok_grads(want, weights, gy)):
        assert_close(a, b, F64, "grad", "weights")


# --- streaming --------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["eager", pytest.param("cpp", marks=needs_cpp)])
@pytest.mark.parametrize("structure", [dict(lags=(3, 1)), dict(lags=(1, 2, 3, 4, 5), feedback=2),
                                       dict(lags=(2, 4), feedback=1, residual=True), dict(lags=1, residual=True)],
                         ids=["lags", "narx_F2", "lags_F1_residual", "residual"])
def test_two_calls_continue_one_call(backend, structure):
    lags = structure.get("lags")
    p = _problem(lags, structure.get("feedback"), structure.get("residual", False), None, 2, T=13,
                 requires_grad=False, activation="silu")
    D, fed = max(p.lags), p.x0.shape[-1]
    long = p.run(backend)
    pieces, x0 = [], p.x0
    for start, stop in ((0, 2), (2, 9), (9, 13)):  # the first chunk is shorter than D
        y = fbfast.rollout(x0, *p.params, u=p.u[start:stop], activation="silu", backend=backend, **p.structure)
        pieces.append(y)
        x0 = torch.cat([x0, y[..., :fed]])[-D:] if stop - start < D else y[-D:, ..., :fed].detach()
    torch.testing.assert_close(torch.cat(pieces), long, rtol=1e-12, atol=1e-12)


# --- gradients of the reference are the derivatives ----------------------------------------------


@pytest.mark.parametrize("structure", [
    dict(lags=(2, 1), feedback=1, residual=True, Du=1),
    dict(lags=(1, 3), feedback=None, residual=True, Du=0),
    dict(lags=2, feedback=1, residual=False, Du=1),
], ids=["lags_F1_residual_u", "lags_residual", "delay2_F1_u"])
def test_gradcheck_and_gradgradcheck(structure):
    p = _problem(structure["lags"], structure["feedback"], structure["residual"], None, structure["Du"], B=2, O=2,
                 T=5, layers=3, activation="tanh", seed=9)
    names, inputs = p.names, p.inputs()

    def fn(*tensors):
        given = dict(zip(names, tensors))
        params = [given.get(f"{k}{l + 1}") for l in range(p.layers) for k in "wb"]
        # Full BPTT: with truncation the gradient is by design not the derivative gradcheck measures.
        return fbfast.rollout_reference(given["x0"], *params, u=given.get("u"), steps=p.steps, activation="tanh",
                                        delay=p.delay, feedback=p.feedback, residual=p.residual)

    assert torch.autograd.gradcheck(fn, inputs)
    assert torch.autograd.gradgradcheck(fn, inputs)


# --- backends against the reference ---------------------------------------------------------------


def test_compile_matches_eager_and_keys_the_structure():
    from fbfast import functional
    p = _problem((3, 1), 2, True, 2, 2, T=5, activation="gelu")
    before = len(functional._COMPILED)
    kw = dict(u=p.u, truncate=p.truncate, activation="gelu", **p.structure)
    y = fbfast.rollout(p.x0, *p.params, backend="compile", **kw)
    want = fbfast.rollout(p.x0, *p.params, backend="eager", **kw)
    assert_close(y, want, F64, "out", "Y")
    gy = _gy(y)
    for name, a, b in zip(p.names, grads(y, p.inputs(), gy), grads(want, p.inputs(), gy)):
        assert_close(a, b, F64, "grad", f"d{name}")
    # Another structure over the same tensors compiles its own graph (values only: compiling a
    # backward per structure would double the time of this test).
    x0, params, u = p.x0.detach(), [t.detach() for t in p.params], p.u.detach()
    for structure in (dict(p.structure, residual=False), dict(p.structure, delay=(1, 3))):
        kw = dict(u=u, truncate=p.truncate, activation="gelu", **structure)
        assert_close(fbfast.rollout(x0, *params, backend="compile", **kw),
                     fbfast.rollout(x0, *params, backend="eager", **kw), F64, "out", f"Y {structure}")
    assert len(functional._COMPILED) == before + 3


# The grid of the fused kernel: every structure on odd sizes (B = 3, O = 3, H = 5, T = 7), float32
# with smooth activations only, since a float32 pre-activation that rounds to the other side of
# ReLU's kink than the reference's is a legitimate difference (tests/test_properties.py).
CPP_LAGS = {"1": 1, "2": 2, "1,2,3": (1, 2, 3), "3,1": (3, 1)}
CPP_NETWORKS = {F64: ((2, "relu"), (3, "silu")), F32: ((2, "tanh"), (3, "gelu"))}


@needs_cpp
@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
@pytest.mark.parametrize("Du", [0, 2], ids=["no_u", "u"])
@pytest.mark.parametrize("truncate", [None, 1, 3])
@pytest.mark.parametrize("residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("feedback", [None, 2], ids=["F=O", "F=2"])
@pytest.mark.parametrize("lags", list(CPP_LAGS))
def test_cpp_matches_the_reference(lags, feedback, residual, truncate, Du, dtype):
    for layers, activation in CPP_NETWORKS[dtype]:
        p = _problem(CPP_LAGS[lags], feedback, residual, truncate, Du, dtype=dtype, T=7, layers=layers,
                     activation=activation, seed=layers + Du)
        y = p.run("cpp")
        want = p.reference()
        assert y.shape == want.shape == (7, 3, 3) and y.dtype == dtype
        assert y.grad_fn is not None and y.grad_fn.name() != "StackBackward0"  # the fused operator ran
        what = f"lags={p.lags} feedback={feedback} residual={residual} truncate={truncate} {layers}-{activation}"
        assert_close(y, want, dtype, "out", f"Y {what}")
        gy = _gy(y)
        for name, a, b in zip(p.names, grads(y, p.inputs(), gy), grads(want, p.inputs(), gy)):
            assert_close(a, b, dtype, "grad", f"d{name} {what}")


@needs_cpp
@pytest.mark.parametrize("variant", [("tile", "base"), ("tile", "avx2"), ("tile", "auto"), ("blas", "auto")],
                         ids=lambda v: "-".join(v))
@pytest.mark.parametrize("structure", [dict(lags=(3, 1), feedback=2, residual=True, truncate=2),
                                       dict(lags=(1, 2, 3, 4, 5), feedback=1),
                                       dict(lags=(2,), feedback=2, residual=True)], ids=["3,1-res", "narx5", "2-res"])
def test_every_cpu_path_and_instruction_set(structure, variant):
    """Each path and instruction set of the CPU kernel pinned: the tile kernels gather several
    lags into one buffer and accumulate each lag's adjoint into the ring (csrc/cpu/tile_kernels.h),
    the BLAS path multiplies each lag by its own columns (csrc/gemm_path.cpp)."""
    structure = dict(structure)
    with cpu_variant(*variant):
        for dtype in (F64, F32):
            p = _problem(structure["lags"], structure.get("feedback"), structure.get("residual", False),
                         structure.get("truncate"), 2, dtype=dtype, B=5, T=8, layers=3, activation="tanh")
            y, want = p.run("cpp"), p.reference()
            assert_close(y, want, dtype, "out", f"Y {structure} {variant}")
            gy = _gy(y)
            for name, a, b in zip(p.names, grads(y, p.inputs(), gy), grads(want, p.inputs(), gy)):
                assert_close(a, b, dtype, "grad", f"d{name} {structure} {variant}")


@needs_cpp
@pytest.mark.parametrize("case", [
    dict(B=0, T=6), dict(B=3, T=0), dict(B=3, T=2), dict(B=1, T=1),
], ids=["B0", "T0", "T_less_than_D", "T1_B1"])
def test_cpp_zero_size_and_short_rollouts(case):
    p = _problem((4, 1), 2, True, None, 2, **case)
    y, want = p.run("cpp"), p.reference()
    assert y.shape == want.shape
    assert_close(y, want, F64, "out", "Y")
    gy = _gy(y)
    got = _ok_grads(y, p.inputs(), gy)
    for name, a, b in zip(p.names, got, _ok_grads(want, p.inputs(), gy)):
        assert_close(a, b, F64, "grad", f"d{name}")
    # x0 rows no step reads get no gradient: step t < 4 reads x0[t] (lag 4), step 0 x0[3] (lag 1).
    read = set(range(min(case["T"], 4))) | ({3} if case["T"] else set())
    assert all(got[0][i].abs().sum() == 0 for i in set(range(4)) - read)


@needs_cpp
@pytest.mark.parametrize("dtype", [F64, F32], ids=["float64", "float32"])
def test_cpp_reads_strided_and_expanded_inputs(dtype):
    """Every lag reads x0 through its strides: x0 expanded along B (stride 0) and sliced along
    F, u expanded along T, weights transposed in memory; no copy changes the answer."""
    p = _problem((3, 1), 2, True, 2, 2, dtype=dtype, T=7, layers=3, activation="tanh")
    x0 = torch.randn(3, 1, 5, dtype=F64).to(dtype)[..., 1:3].expand(3, 3, 2).requires_grad_(True)
    u = torch.randn(1, 3, 2, dtype=F64).to(dtype).expand(7, 3, 2).requires_grad_(True)
    weights = [w.detach().t().contiguous().t().requires_grad_(True) for w in p.weights]
    assert x0.stride(1) == 0 and u.stride(0) == 0 and not weights[0].is_contiguous()
    params = [t for w, b in zip(weights, p.biases) for t in (w, b)]
    kw = dict(u=u, truncate=2, activation="tanh", **p.structure)
    y = fbfast.rollout(x0, *params, backend="cpp", **kw)
    want = fbfast.rollout_reference(x0, *params, **kw)
    assert_close(y, want, dtype, "out", "Y")
    inputs = [x0, u, *params]
    gy = _gy(y)
    for a, b in zip(_ok_grads(y, inputs, gy), _ok_grads(want, inputs, gy)):
        assert a.shape == b.shape
        assert_close(a, b, dtype, "grad", "strided inputs")


@needs_cpp
def test_cpp_double_backward_with_lags():
    p = _problem((2, 1), 1, True, 2, 2, T=5, layers=2, activation="tanh", B=2)
    y = p.run("cpp")
    want = p.reference()
    inputs = p.inputs()

    def second(out):
        g = torch.autograd.grad(out.pow(2).sum(), inputs, create_graph=True)
        return torch.autograd.grad(sum(t.pow(2).sum() for t in g), inputs)

    for name, a, b in zip(p.names, second(y), second(want)):
        assert_close(a, b, F64, "grad", f"second derivative d{name}")


@needs_cpp
def test_operator_takes_the_structure_and_passes_opcheck():
    """The schema's trailing arguments (csrc/fbfast.cpp), called as fbfast.rollout calls them."""
    p = _problem((3, 1), 2, True, 2, 2, T=6)
    op = torch.ops.fbfast.rollout_forward.default
    args = (p.x0, p.u, p.weights, p.biases, p.steps, 3, 2, "relu", 0.0)
    kwargs = dict(lags=[3, 1], feedback=2, residual=True)
    assert_close(op(*args, **kwargs), p.reference(), F64, "out", "direct call")
    torch.library.opcheck(op, args, kwargs)
    # The defaults are version 1's structure: one lag `delay`, every output fed back, no skip.
    q = _problem(2, None, False, None, 2, T=6)
    plain = op(q.x0, q.u, q.weights, q.biases, q.steps, 2, 0, "relu", 0.0)
    torch.testing.assert_close(plain, op(q.x0, q.u, q.weights, q.biases, q.steps, 2, 0, "relu", 0.0, lags=[2],
                                         feedback=3, residual=False), rtol=0, atol=0)


def test_default_structure_spelled_out_is_bit_for_bit_the_default():
    """delay=(k,), feedback=O and residual=False are the version-1 call, exactly."""
    for backend in ["eager"] + (["cpp"] if CPP else []):
        p = _problem(2, None, False, 3, 2, T=7)
        y = p.run(backend)
        gy = _gy(y)
        g = grads(y, p.inputs(), gy)
        spelled = fbfast.rollout(p.x0, *p.params, u=p.u, truncate=3, delay=(2,), feedback=3, residual=False,
                                 backend=backend)
        assert torch.equal(spelled, y), backend
        assert all(torch.equal(a, b) for a, b in zip(grads(spelled, p.inputs(), gy), g)), backend


# --- the module ------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["eager", pytest.param("cpp", marks=needs_cpp)])
def test_feedback_mlp_rolls_out_its_structure(backend):
    torch.manual_seed(0)
    m = fbfast.FeedbackMLP(2 + 3 * 2, 6, 4, hidden_layers=2, activation="silu", delay=(1, 2, 4), feedback=2,
                           residual=True, dtype=F64)
    assert (m.exo_features, m.lags, m.fed_back) == (2, (1, 2, 4), 2)
    x0, u = torch.randn(4, 3, 2, dtype=F64), torch.randn(6, 3, 2, dtype=F64)
    params = [t for fc in m.layers for t in (fc.weight, fc.bias)]
    want = window_loop(x0, params, 6, u, (1, 2, 4), 2, True, 2, "silu")
    torch.testing.assert_close(m.rollout(x0, u=u, truncate=2, backend=backend), want, rtol=1e-10, atol=1e-10)
    # forward is the network once, as from_module verifies it: no skip
    first = torch.cat([u[0], x0[3], x0[2], x0[0]], -1)
    torch.testing.assert_close(m(first) + F.pad(x0[3], (0, 2)), want[0], rtol=1e-12, atol=1e-12)
    # the same layers viewed with another structure
    plain = fbfast.from_module(m, residual=False)
    assert plain is not m and plain.fc1 is m.fc1 and not plain.residual and plain.lags == m.lags
    assert fbfast.from_module(m, delay=[1, 2, 4], feedback=2) is m
