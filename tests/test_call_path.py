"""How a call reaches the CPU kernel: the direct entry of fbfast.rollout (csrc/python_entry.cpp)
and the calibrated choice between the tile and BLAS paths (csrc/cpu/rollout_cpu.cpp).

The direct entry must give exactly what the general path gives (torch.ops and the Python
checks), hand every call it does not serve to the general path (None), and leave every bad-input
message to the general path's checks. The calibration must choose one of the two paths exactly
(its result is bitwise one of the pinned paths'), once per shape class, without touching the
global random state.
"""

from __future__ import annotations

import threading

import pytest
import torch
from torch.overrides import TorchFunctionMode

import fbfast
import fbfast.functional as functional
from fbfast import ops
from testing import CPP, grads

pytestmark = pytest.mark.skipif(not CPP or ops.direct_rollout is None, reason="the C++ kernel is not built")

F64, F32 = torch.float64, torch.float32


def _net(Du=3, F=2, O=2, H=7, L=2, E=None, dtype=F64, m=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    widths = [Du + m * F] + [H] * (L - 1) + [O]
    lead = () if E is None else (E,)
    params = []
    for a, b in zip(widths[:-1], widths[1:]):
        params += [(torch.randn(*lead, b, a, generator=g, dtype=dtype) * 0.4).requires_grad_(),
                   (torch.randn(*lead, b, generator=g, dtype=dtype) * 0.1).requires_grad_()]
    return params


def _general(x0, params, **kw):
    """fbfast.rollout without the direct entry: the Python checks and torch.ops."""
    saved = functional._direct
    functional._direct = None
    try:
        return fbfast.rollout(x0, *params, **kw)
    finally:
        functional._direct = saved


CALLS = {
    "v1": dict(T=6, Du=3, kw={}),
    "no_u": dict(T=5, Du=0, kw={}),
    "x0_2d": dict(T=4, Du=3, kw={}, x0_2d=True),
    "delay3": dict(T=7, Du=3, kw=dict(delay=3)),
    "lags": dict(T=8, Du=2, kw=dict(delay=(1, 3)), m=2),
    "lag_list": dict(T=8, Du=2, kw=dict(delay=[2, 1]), m=2),
    "truncate": dict(T=9, Du=3, kw=dict(truncate=2)),
    "feedback": dict(T=5, Du=3, kw=dict(feedback=1), F=1, O=3),
    "residual": dict(T=5, Du=3, kw=dict(residual=True, feedback=2), F=2, O=3),
    "deep_silu": dict(T=5, Du=3, kw=dict(activation="silu"), L=3),
    "leaky": dict(T=5, Du=3, kw=dict(activation=fbfast.FeedbackMLP(5, 4, 2, activation=torch.nn.LeakyReLU(0.3))
                                       ._activation)),
    "ensemble": dict(T=5, Du=3, kw={}, E=3),
    "ensemble_own": dict(T=5, Du=3, kw={}, E=3, own=True),
    "empty": dict(T=0, Du=3, kw={}),
    "no_rows": dict(T=4, Du=3, kw={}, B=0),
}


@pytest.mark.parametrize("dtype", [F64, F32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", list(CALLS))
def test_direct_entry_equals_the_general_path(name, dtype):
    c = CALLS[name]
    F, O, m, E, B = c.get("F", 2), c.get("O", 2), c.get("m", 1), c.get("E"), c.get("B", 4)
    params = _net(Du=c["Du"], F=F, O=O, L=c.get("L", 2), E=E, m=m, dtype=dtype)
    kw = dict(c["kw"])
    lags = kw.get("delay", 1)
    D = lags if isinstance(lags, int) else max(lags)
    g = torch.Generator().manual_seed(1)
    shape = (D, E, B, F) if c.get("own") else (B, F) if c.get("x0_2d") else (D, B, F)
    x0 = torch.randn(*shape, generator=g, dtype=dtype).requires_grad_()
    u = torch.randn(c["T"], B, c["Du"], generator=g, dtype=dtype).requires_grad_() if c["Du"] else None
    if u is None:
        kw["steps"] = c["T"]
    served = ops.direct_rollout(x0, u, tuple(params), kw.get("steps"), lags, kw.get("truncate"), "relu", 0.0,
                                kw.get("feedback"), kw.get("residual", False))
    assert served is not None, "the direct entry must serve plain CPU tensors"
    y = fbfast.rollout(x0, *params, u=u, **kw)
    want = _general(x0, params, u=u, **kw)
    assert y.shape == want.shape and y.dtype == want.dtype
    assert torch.equal(y, want)
    if y.numel():
        ins = [x0] + ([u] if u is not None else []) + params
        gy = torch.randn(y.shape, generator=g, dtype=dtype)
        for a, b in zip(grads(y, ins, gy), grads(want, ins, gy)):
            assert torch.equal(a, b)


def test_direct_entry_skips_the_python_checks(monkeypatch):
    """The served call runs no Python validation (the operator checks once)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the Python checks ran")

    params = _net()
    x0, u = torch.zeros(4, 2, dtype=F64), torch.randn(5, 4, 3, dtype=F64)
    monkeypatch.setattr(functional, "check_rollout_args", refuse)
    y = fbfast.rollout(x0, *params, u=u)
    y.sum().backward()
    assert params[0].grad is not None
    with torch.no_grad():
        assert not fbfast.rollout(x0, *params, u=u).requires_grad
    with torch.inference_mode():
        assert fbfast.rollout(x0, *params, u=u).is_inference()


def _args(**over):
    params = _net(dtype=F32)
    base = dict(x0=torch.zeros(1, 4, 2), u=torch.randn(5, 4, 3), params=tuple(params), steps=None, delay=1,
                truncate=None, act="relu", param=0.0, feedback=None, residual=False)
    base.update(over)
    return base


class _Sub(torch.Tensor):
    pass


NOT_SERVED = {
    "bool delay": dict(delay=True),
    "zero delay": dict(delay=0),
    "float steps": dict(steps=5.0),
    "bool steps": dict(steps=True),
    "negative steps": dict(steps=-1),
    "truncate 0": dict(truncate=0),
    "feedback 0": dict(feedback=0),
    "bool feedback": dict(feedback=True),
    "residual 1": dict(residual=1),
    "repeated lags": dict(delay=(1, 1)),
    "empty lags": dict(delay=()),
    "int param": dict(param=0),
    "half": dict(x0=torch.zeros(1, 4, 2, dtype=torch.float16)),
    "meta": dict(x0=torch.zeros(1, 4, 2, device="meta")),
    "subclass": dict(x0=torch.zeros(1, 4, 2).as_subclass(_Sub)),
    "odd params": dict(params=tuple(_net(dtype=F32))[:3]),
    "int tensor weight": dict(params=(torch.zeros(2, 5, dtype=torch.int64), None)),
    "list params": dict(params=list(_net(dtype=F32))),
    "no steps no u": dict(u=None),
    "bad shapes": dict(u=torch.randn(5, 4, 7)),  # the operator refuses: the general path says why
    "steps disagree": dict(steps=6),
    "conj weight": dict(params=(torch.zeros(2, 5, dtype=torch.complex64).conj(), None)),
}


@pytest.mark.parametrize("case", list(NOT_SERVED))
def test_direct_entry_leaves_calls_to_the_general_path(case):
    a = _args(**NOT_SERVED[case])
    assert ops.direct_rollout(a["x0"], a["u"], a["params"], a["steps"], a["delay"], a["truncate"], a["act"],
                              a["param"], a["feedback"], a["residual"]) is None


@pytest.mark.parametrize("kw, match", [
    (dict(steps=6), r"fbfast.rollout: steps=6 disagrees with u"),
    (dict(truncate=0), r"fbfast.rollout: truncate must be >= 1, got 0"),
    (dict(delay=True), r"fbfast.rollout: delay must be an int"),
    (dict(feedback=0), r"fbfast.rollout: feedback must be in 1..O = 2"),
])
def test_bad_input_gets_the_api_message(kw, match):
    params = _net(dtype=F32)
    with pytest.raises((ValueError, TypeError), match=match):
        fbfast.rollout(torch.zeros(4, 2), *params, u=torch.randn(5, 4, 3), **kw)


def test_bad_widths_get_the_api_message():
    params = _net(dtype=F32)
    with pytest.raises(ValueError, match=r"fbfast.rollout: w1 has 5 input columns but u has Du = 4 features"):
        fbfast.rollout(torch.zeros(4, 2), *params, u=torch.randn(5, 4, 4))


def test_torch_function_modes_see_the_operator():
    """A __torch_function__ mode sees the call through torch.ops, as before the direct entry."""
    seen = []

    class Record(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    params = _net()
    with Record():
        fbfast.rollout(torch.zeros(4, 2, dtype=F64), *params, u=torch.randn(5, 4, 3, dtype=F64))
    assert any("rollout_forward" in s for s in seen), seen


def test_fbfast_backend_variable_is_honoured(monkeypatch):
    params = _net()
    monkeypatch.setenv("FBFAST_BACKEND", "eager")
    y = fbfast.rollout(torch.zeros(4, 2, dtype=F64), *params, u=torch.randn(5, 4, 3, dtype=F64))
    assert "Rollout" not in type(y.grad_fn).__name__  # the reference's graph, not the fused node


# --- the calibrated path ------------------------------------------------------------------------

def _wide(B, T, H=160, seed=2):
    g = torch.Generator().manual_seed(seed)
    w1 = (torch.randn(H, 130, generator=g) / 12).requires_grad_()
    b1 = torch.zeros(H).requires_grad_()
    w2 = (torch.randn(128, H, generator=g) / 12).requires_grad_()
    b2 = torch.zeros(128).requires_grad_()
    return torch.randn(B, 128, generator=g), torch.randn(T, B, 2, generator=g), [w1, b1, w2, b2]


def _run(x0, u, params):
    y = fbfast.rollout(x0, *params, u=u)
    return [y.detach()] + list(torch.autograd.grad(y, params, torch.ones_like(y)))


# The portable build (no AVX2) keeps its static rule and measures nothing.
calibrates = pytest.mark.skipif(fbfast.get_kernel_options().get("cpu_isa") not in ("avx2", "avx512"),
                                reason="the portable build's path rule is not calibrated")


@calibrates
def test_auto_is_exactly_one_of_the_paths():
    """Work above the calibration threshold (layers of 130 x 160 and 160 x 128): "auto" measures
    both paths for the class once, and its results are bitwise the chosen path's."""
    x0, u, params = _wide(B=48, T=9)
    state = torch.get_rng_state()
    got = _run(x0, u, params)
    assert torch.equal(torch.get_rng_state(), state), "the calibration must not draw from torch's generator"
    lines = [s for s in fbfast.cpu_path_calibration() if s.startswith("widths 130-160-128, Du 2, E 1, B <= 64, T <= 16")]
    assert {("forward" in s, "training" in s) for s in lines} >= {(False, True)}, fbfast.cpu_path_calibration()
    chosen = [s.rsplit("-> ", 1)[1] for s in lines if "training" in s]
    assert chosen[0] in ("tile", "blas")
    with fbfast.kernel_options(cpu_path=chosen[0]):
        want = _run(x0, u, params)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    # Another B and T of the same class (B <= 64, T <= 16) reuses the measurement.
    before = len(fbfast.cpu_path_calibration())
    _run(*_wide(B=40, T=12))
    assert len(fbfast.cpu_path_calibration()) == before


def test_rule_and_pinned_paths_measure_nothing():
    x0, u, params = _wide(B=20, T=3, H=150)
    before = fbfast.cpu_path_calibration()
    for path in ("rule", "tile", "blas"):
        with fbfast.kernel_options(cpu_path=path):
            assert fbfast.get_kernel_options()["cpu_path"] == path
            _run(x0, u, params)
    assert fbfast.cpu_path_calibration() == before


@calibrates
def test_calibration_from_many_threads():
    """Threads that meet a new class at once all get one path's results, the same for all."""
    x0, u, params = _wide(B=24, T=5, H=170)
    out, errors = [None] * 4, []

    def work(i):
        try:
            out[i] = _run(x0, u, params)
        except Exception as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for other in out[1:]:
        for a, b in zip(out[0], other):
            assert torch.equal(a, b)
