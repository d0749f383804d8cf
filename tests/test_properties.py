"""Property tests: the compiled "cpp" backend equals the reference on random problems.

Hypothesis draws B, Du, O, the depth (1 to 4 layers) and every hidden width, T, truncate, the
feedback structure (one lag or up to three distinct lags in any order, F fed-back outputs of O,
residual or not; docs/spec.md §1.2), which biases exist, the activation (leaky_relu's slope and
elu's alpha too), which inputs require grad, the memory layout of every tensor (contiguous,
transposed, strided slice, stride-0 expansion), float32/float64, and the kernel variant
(cpu_path tile/blas/auto x cpu_isa base/avx2/auto, read per call by the C++ host). Y and every
requested gradient must match ``fbfast.rollout_reference`` within the tolerances of
fbfast/testing.py.

`make test` runs a fixed (derandomized) set of examples; `make test-long` (``-m slow``) runs many
more with fresh random draws.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

import pytest
import torch
import torch.nn.functional as F

import fbfast
from fbfast._spec import ACTIVATIONS, NAMES as ACTIVATION_NAMES, ResolvedActivation
from testing import CPP, CPP_REASON, TOLERANCES, assert_close, cpu_variant, grads

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, assume, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

pytestmark = pytest.mark.skipif(not CPP, reason=CPP_REASON)

LAYOUTS = ("contiguous", "transposed", "strided", "expanded")
# Parameters drawn for the activations that take one: the default, and others of both signs.
PARAMS = {"leaky_relu": (0.01, 0.2, -0.5), "elu": (1.0, 0.5, 2.0)}
# Activations with a kink at 0: relu and leaky_relu change slope there, elu does too unless
# alpha is 1. float32 only: examples whose float64 pre-activations come closer than this to a
# kink are skipped. There the float32 rounding of the kernel and of the float32 reference may
# fall on opposite sides of 0, a legitimate difference of a whole hidden unit's gradient.
KINKED = ("relu", "leaky_relu", "elu")
KINK_MARGIN_F32 = 2e-5


def layer_names(layers: int) -> List[str]:
    return ["x0", "u"] + [f"{k}{l + 1}" for l in range(layers) for k in "wb"]


@dataclass
class Drawn:
    B: int
    Du: int
    O: int
    T: int
    delay: Union[int, Tuple[int, ...]]  # one lag, or the lags in the order read
    truncate: Optional[int]
    dtype: torch.dtype
    path: str
    isa: str
    seed: int
    widths: Tuple[int, ...] = (5,)  # hidden widths: L - 1 of them
    biases: Tuple[bool, ...] = (True, True)  # one per layer
    activation: str = "relu"
    param: float = 0.0
    layouts: Dict[str, str] = field(default_factory=dict)  # name -> layout; contiguous when absent
    wants_grad: Dict[str, bool] = field(default_factory=dict)  # name -> requires grad; True when absent
    feedback: Optional[int] = None  # F; None feeds back all O
    residual: bool = False
    ensemble: Optional[int] = None  # E networks side by side (docs/spec.md §1.3), or one
    shared_x0: bool = False  # an ensemble's x0 (D, B, F) shared by the members, else (D, E, B, F)
    shared_u: bool = False

    @property
    def lags(self) -> Tuple[int, ...]:
        return (self.delay,) if isinstance(self.delay, int) else self.delay

    @property
    def fed(self) -> int:
        return self.O if self.feedback is None else self.feedback

    @property
    def layers(self) -> int:
        return len(self.widths) + 1

    @property
    def names(self) -> List[str]:
        return layer_names(self.layers)

    def act(self) -> ResolvedActivation:
        return ResolvedActivation(self.activation, self.param)


@st.composite
def problems(draw) -> Drawn:
    layers = draw(st.integers(1, 4))
    activation = draw(st.sampled_from(ACTIVATION_NAMES))
    names = layer_names(layers)
    O = draw(st.integers(1, 40))
    return Drawn(
        B=draw(st.integers(0, 20)), Du=draw(st.integers(0, 40)), O=O,
        T=draw(st.integers(0, 12)),
        delay=draw(st.integers(1, 4) | st.lists(st.integers(1, 5), min_size=1, max_size=3, unique=True).map(tuple)),
        truncate=draw(st.none() | st.integers(1, 6)),
        feedback=draw(st.none() | st.integers(1, O)), residual=draw(st.booleans()),
        dtype=draw(st.sampled_from([torch.float64, torch.float32])),
        path=draw(st.sampled_from(["auto", "tile", "blas"])), isa=draw(st.sampled_from(["auto", "avx2", "base"])),
        seed=draw(st.integers(0, 2**31 - 1)),
        widths=tuple(draw(st.integers(0, 40)) for _ in range(layers - 1)),
        biases=tuple(draw(st.booleans()) for _ in range(layers)),
        activation=activation, param=draw(st.sampled_from(PARAMS.get(activation, (0.0,)))),
        layouts={n: draw(st.sampled_from(LAYOUTS)) for n in names},
        wants_grad={n: draw(st.booleans()) for n in names},
        ensemble=draw(st.none() | st.integers(1, 3)), shared_x0=draw(st.booleans()), shared_u=draw(st.booleans()))


def _laid_out(values: torch.Tensor, layout: str) -> torch.Tensor:
    """A tensor equal in shape to ``values`` (and in value, except "expanded") with that layout."""
    if layout == "transposed" and values.dim() >= 2:
        return values.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "strided" or (layout == "transposed" and values.dim() < 2):
        big = torch.zeros(*values.shape[:-1], 2 * values.shape[-1] + 1, dtype=values.dtype)
        big[..., 1::2] = values
        return big[..., 1::2]
    if layout == "expanded" and values.dim() >= 1 and values.shape[0] > 0:
        return values[:1].expand(values.shape)  # stride 0 along the first axis
    return values.contiguous()


def build(d: Drawn):
    """The problem's inputs by name (x0, u, w1, b1, ...), as leaves with the drawn layouts
    (None for absent ones)."""
    g = torch.Generator().manual_seed(d.seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    sizes = [d.Du + len(d.lags) * d.fed, *d.widths, d.O]
    E = () if d.ensemble is None else (d.ensemble,)  # the member axis of an ensemble's tensors
    x0_e = () if d.shared_x0 else E
    u_e = () if d.shared_u else E
    values = {"x0": rnd(max(d.lags), *x0_e, d.B, d.fed), "u": rnd(d.T, *u_e, d.B, d.Du) if d.Du else None}
    for l in range(d.layers):
        values[f"w{l + 1}"] = rnd(*E, sizes[l + 1], sizes[l], scale=0.9 / max(1, sizes[l]) ** 0.5)
        values[f"b{l + 1}"] = rnd(*E, sizes[l + 1], scale=0.1) if d.biases[l] else None
    out = {}
    for name, v in values.items():
        if v is None:
            out[name] = None
            continue
        t = _laid_out(v.to(d.dtype), d.layouts.get(name, "contiguous"))
        out[name] = t.requires_grad_(d.wants_grad.get(name, True))  # stays a leaf, keeps its strides
    # D == 1 also exercises the (B, F) form of x0 (one network's, or an ensemble's shared one)
    if max(d.lags) == 1 and d.layouts.get("x0") != "expanded" and out["x0"].dim() == 3:
        out["x0"] = out["x0"].detach()[0].requires_grad_(d.wants_grad.get("x0", True))
    return out


def _params(ins, layers: int) -> list:
    return [ins[f"{k}{l + 1}"] for l in range(layers) for k in "wb"]


def _min_abs_preactivation(ins, d: Drawn) -> float:
    """min |z| over every hidden layer's pre-activations of all steps, units and rows, computed
    in float64 (inf when there is none)."""
    def f64(t):
        return None if t is None else t.detach().double()

    x0 = f64(ins["x0"])
    x0 = x0.unsqueeze(0) if x0.dim() == 2 else x0
    u = f64(ins["u"])
    if d.ensemble is not None:  # every member's values, shared inputs expanded
        if x0.dim() == 3:
            x0 = x0.unsqueeze(1).expand(x0.shape[0], d.ensemble, *x0.shape[1:])
        if u is not None and u.dim() == 3:
            u = u.unsqueeze(1).expand(u.shape[0], d.ensemble, *u.shape[1:])
    params = [f64(t) for t in _params(ins, d.layers)]
    act = d.act().fn
    D, fed = max(d.lags), d.fed
    past, smallest = [], float("inf")  # past[s] = y_s[..., :F]
    for t in range(d.T):
        read = [x0[t - lag + D] if t < lag else past[t - lag] for lag in d.lags]
        h = torch.cat(([] if u is None else [u[t]]) + read, -1)
        for l in range(d.layers):
            w, b = params[2 * l], params[2 * l + 1]  # (out, in) or an ensemble's (E, out, in)
            h = h @ w.transpose(-1, -2) + (0 if b is None else b.unsqueeze(-2))
            if l < d.layers - 1:
                if h.numel():
                    smallest = min(smallest, h.abs().min().item())
                h = act(h)
        if d.residual:
            h = torch.cat([h[..., :fed] + read[0], h[..., fed:]], -1)
        past.append(h[..., :fed])
    return smallest


def _grads(y, inputs, gy):
    # With steps == 0 the reference returns x0[:0], which is detached from the weights, while
    # the kernel's empty Y still requires grad: both mean "all gradients are zero".
    if not y.requires_grad:
        return [torch.zeros_like(t) for t in inputs]
    return grads(y, inputs, gy)


@contextlib.contextmanager
def kernel_variant(path: str, isa: str):
    with cpu_variant(path, isa):
        yield


def check_cpp_equals_reference(d: Drawn) -> None:
    ins = build(d)
    if d.dtype == torch.float32 and d.activation in KINKED:
        assume(_min_abs_preactivation(ins, d) > KINK_MARGIN_F32)
    activation = ACTIVATIONS[d.activation].make_module(d.param)
    kw = dict(steps=d.T, u=ins["u"], delay=d.delay, truncate=d.truncate, activation=activation,
              feedback=d.feedback, residual=d.residual)
    args = (ins["x0"], *_params(ins, d.layers))
    with kernel_variant(d.path, d.isa):
        y = fbfast.rollout(*args, backend="cpp", **kw)
    y_ref = fbfast.rollout(*args, backend="eager", **kw)
    E = () if d.ensemble is None else (d.ensemble,)
    assert y.shape == y_ref.shape == (d.T, *E, d.B, d.O) and y.dtype == d.dtype
    assert_close(y, y_ref, d.dtype, "out", f"Y {d}")
    wanted = [(n, ins[n]) for n in d.names if ins[n] is not None and ins[n].requires_grad]
    if not wanted:
        assert not y.requires_grad
        return
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(d.seed + 1), dtype=torch.float64).to(d.dtype)
    with kernel_variant(d.path, d.isa):
        got = _grads(y, [t for _, t in wanted], gy)
    want = _grads(y_ref, [t for _, t in wanted], gy)
    for (name, t), a, b in zip(wanted, got, want):
        assert a.shape == t.shape, name
        assert_close(a, b, d.dtype, "grad", f"d{name} {d}")


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_cpp_equals_reference(d):
    check_cpp_equals_reference(d)


@pytest.mark.slow
@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_cpp_equals_reference_long(d):
    check_cpp_equals_reference(d)


# --- the property test can fail ---------------------------------------------------------------


def test_layouts_are_what_they_claim():
    v = torch.randn(3, 4, 5, dtype=torch.float64)
    for layout in ("transposed", "strided", "expanded"):
        t = _laid_out(v, layout)
        assert t.shape == v.shape and not t.is_contiguous(), layout
    assert torch.equal(_laid_out(v, "transposed"), v) and torch.equal(_laid_out(v, "strided"), v)
    assert _laid_out(v, "expanded").stride(0) == 0


def test_check_detects_a_wrong_kernel(monkeypatch):
    # If "cpp" returned the reference plus a tiny error, the property would catch it.
    d = Drawn(B=3, Du=2, O=4, T=4, delay=(2, 1), truncate=None, dtype=torch.float64, path="auto", isa="auto",
              seed=0, widths=(5, 6), biases=(True, False, True), activation="elu", param=0.5, feedback=3,
              residual=True)
    check_cpp_equals_reference(d)
    real = fbfast.rollout
    tol = TOLERANCES[torch.float64]["out"][1]

    def off_by_a_little(*args, backend, **kw):
        y = real(*args, backend=backend, **kw)
        return y + 100 * tol if backend == "cpp" else y

    monkeypatch.setattr(fbfast, "rollout", off_by_a_little)
    with pytest.raises(AssertionError, match="Y"):
        check_cpp_equals_reference(d)
