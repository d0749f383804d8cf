"""Bad input (docs/spec.md §4): every misuse raises the documented type, naming the argument and what it
got; non-contiguous and zero-size inputs are valid and match the reference on every backend."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

import fbfast

B, O, H, DU, T = 4, 2, 5, 3, 6
F32, F64 = torch.float32, torch.float64
NAMES = ("x0", "u", "w1", "b1", "w2", "b2")


def _backend_params():
    out = [pytest.param("eager")]
    cpp = fbfast.backends()["cpp"]
    out.append(pytest.param("cpp", marks=pytest.mark.skipif(not cpp.available, reason=cpp.reason)))
    return out


BACKENDS = _backend_params()


def good(dtype=F64, **over):
    """A valid call with u: x0 (B, O), u (T, B, Du), w1 (H, Du + O), ..., steps inferred."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=F64).to(dtype)

    kw = dict(x0=rnd(B, O), w1=rnd(H, DU + O), b1=rnd(H), w2=rnd(O, H), b2=rnd(O), u=rnd(T, B, DU),
              steps=None, delay=1, truncate=None)
    kw.update(over)
    return kw


def deep(dtype=F64, **over):
    """A valid three-layer call: w1 (H, Du + O), w2 (H, H), w3 (O, H), tanh, given as
    ``params`` (the positional layers), with ``over`` replacing w1 .. b3 or any keyword."""
    g = torch.Generator().manual_seed(1)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=F64).to(dtype)

    layers = dict(w1=rnd(H, DU + O), b1=rnd(H), w2=rnd(H, H), b2=rnd(H), w3=rnd(O, H), b3=rnd(O))
    kw = dict(x0=rnd(B, O), u=rnd(T, B, DU), steps=None, delay=1, truncate=None, activation="tanh")
    for name, value in over.items():
        (layers if name in layers else kw)[name] = value
    kw["params"] = [layers[n] for n in ("w1", "b1", "w2", "b2", "w3", "b3")]
    return kw


def layered(params, **over):
    """`good`'s call with the layers replaced by ``params(good's kwargs)``, positional after x0."""
    kw = good(**over)
    kw["params"] = params(kw)
    for name in ("w1", "b1", "w2", "b2"):
        del kw[name]
    return kw


def call(kw, backend):
    """fbfast.rollout on `good`'s or `deep`'s kwargs: w1 .. b2, or ``params`` for any layers."""
    kw = dict(kw)
    if "params" in kw:
        params = kw.pop("params")
    else:
        params = [kw.pop(n) for n in ("w1", "b1", "w2", "b2")]
    return fbfast.rollout(kw.pop("x0"), *params, backend=backend, **kw)


class _ReLUOverridden(nn.ReLU):
    def forward(self, x):
        return x.clamp(min=-1)


def _seed_case():
    # The seed's loop 2 as printed: Linear(10, 5) -> ReLU -> Linear(5, 2), a 2-feature output fed
    # back with no u: 8 input features are missing.
    return good(x0=torch.randn(B, 2, dtype=F64), w1=torch.randn(5, 10, dtype=F64),
                b1=torch.randn(5, dtype=F64), w2=torch.randn(2, 5, dtype=F64),
                b2=torch.randn(2, dtype=F64), u=None, steps=5)


# id -> (kwargs, exception type, patterns that must all be found in the message).
# The first pattern names the argument, the others what it got (and, where useful, what it needed).
BAD = {
    "w1_columns_vs_u": (
        lambda: good(w1=torch.randn(H, 7, dtype=F64)),
        ValueError, [r"\bw1\b", r"7 input columns", r"Du = 3", r"Du \+ O = 5", r"\(5, 7\)"]),
    "w1_columns_no_u_seed_case": (
        _seed_case, ValueError, [r"\bw1\b", r"10 input columns", r"\bu\b", r"\b8\b", r"\(T, B, 8\)"]),
    "w1_columns_too_few_no_u": (
        lambda: good(w1=torch.randn(H, 1, dtype=F64), u=None, steps=3),
        ValueError, [r"\bw1\b", r"1 input columns", r"O = 2"]),
    "w1_rows_vs_H": (
        lambda: good(w1=torch.randn(H + 1, DU + O, dtype=F64)),
        ValueError, [r"\bw1\b", r"H = 5", r"\(6, 5\)"]),
    "w1_not_2d": (
        lambda: good(w1=torch.randn(H, DU + O, 1, dtype=F64)),
        ValueError, [r"\bw1\b", r"2-D", r"\(5, 5, 1\)"]),
    "w2_not_2d": (
        lambda: good(w2=torch.randn(O * H, dtype=F64)),
        ValueError, [r"\bw2\b", r"2-D", r"\(10,?\)"]),
    "b1_wrong_length": (
        lambda: good(b1=torch.randn(H - 1, dtype=F64)),
        ValueError, [r"\bb1\b", r"\(5,\)", r"got \(4,?\)"]),
    "b2_wrong_length": (
        lambda: good(b2=torch.randn(O + 1, dtype=F64)),
        ValueError, [r"\bb2\b", r"\(2,\)", r"got \(3,?\)"]),
    "b1_2d": (
        lambda: good(b1=torch.randn(1, H, dtype=F64)),
        ValueError, [r"\bb1\b", r"\(1, 5\)"]),
    "x0_missing_delay_axis": (
        lambda: good(delay=3),
        ValueError, [r"\bx0\b", r"\(4, 2\)", r"delay=3"]),
    "x0_wrong_delay_axis": (
        lambda: good(x0=torch.randn(2, B, O, dtype=F64), delay=3),
        ValueError, [r"\bx0\b", r"\(2, 4, 2\)", r"\(3, B, O\)"]),
    "x0_3d_with_delay1_wrong_leading": (
        lambda: good(x0=torch.randn(2, B, O, dtype=F64)),
        ValueError, [r"\bx0\b", r"\(2, 4, 2\)"]),
    "x0_1d": (
        lambda: good(x0=torch.randn(O, dtype=F64)),
        ValueError, [r"\bx0\b", r"got \(2,?\)"]),
    "x0_wrong_features": (
        lambda: good(x0=torch.randn(B, O + 1, dtype=F64)),
        ValueError, [r"\bx0\b", r"\(4, 3\)", r"O = 2"]),
    "x0_wrong_features_3d": (
        lambda: good(x0=torch.randn(2, B, O + 1, dtype=F64), delay=2),
        ValueError, [r"\bx0\b", r"\(2, 4, 3\)", r"O = 2"]),
    "u_wrong_T_vs_steps": (
        lambda: good(steps=T + 1),
        ValueError, [r"\bu\b", r"steps=7", r"T = 6", r"\(6, 4, 3\)"]),
    "u_wrong_B": (
        lambda: good(u=torch.randn(T, B + 1, DU, dtype=F64)),
        ValueError, [r"\bu\b", r"batch size 5", r"B = 4", r"\(6, 5, 3\)"]),
    "u_not_3d": (
        lambda: good(u=torch.randn(T * B, DU, dtype=F64)),
        ValueError, [r"\bu\b", r"3-D", r"\(24, 3\)"]),
    "steps_negative": (
        lambda: good(u=None, w1=torch.randn(H, O, dtype=F64), steps=-1),
        ValueError, [r"\bsteps\b", r"-1", r">= 0"]),
    "steps_negative_with_u": (
        lambda: good(steps=-2),
        ValueError, [r"\bsteps\b", r"-2"]),
    "steps_missing_without_u": (
        lambda: good(u=None, w1=torch.randn(H, O, dtype=F64)),
        ValueError, [r"\bsteps\b", r"\bu is None\b"]),
    "steps_float": (
        lambda: good(steps=6.0),
        TypeError, [r"\bsteps\b", r"float", r"6\.0"]),
    "delay_zero": (
        lambda: good(delay=0),
        ValueError, [r"\bdelay\b", r">= 1", r"got 0"]),
    "delay_negative": (
        lambda: good(delay=-1),
        ValueError, [r"\bdelay\b", r"got -1"]),
    "delay_bool": (
        lambda: good(delay=True),
        TypeError, [r"\bdelay\b", r"\bbool\b", r"True"]),
    "delay_float": (
        lambda: good(delay=1.5),
        TypeError, [r"\bdelay\b", r"\bfloat\b", r"1\.5"]),
    "truncate_zero": (
        lambda: good(truncate=0),
        ValueError, [r"\btruncate\b", r">= 1", r"got 0"]),
    "truncate_negative": (
        lambda: good(truncate=-3),
        ValueError, [r"\btruncate\b", r"got -3"]),
    "truncate_float": (
        lambda: good(truncate=2.0),
        TypeError, [r"\btruncate\b", r"\bfloat\b"]),
    "x0_integer_dtype": (
        lambda: good(x0=torch.ones(B, O, dtype=torch.int64)),
        TypeError, [r"\bx0\b", r"torch\.int64", r"floating"]),
    "w1_integer_dtype": (
        lambda: good(w1=torch.ones(H, DU + O, dtype=torch.int32)),
        TypeError, [r"\bw1\b", r"torch\.int32"]),
    "x0_bool_dtype": (
        lambda: good(x0=torch.ones(B, O, dtype=torch.bool)),
        TypeError, [r"\bx0\b", r"torch\.bool"]),
    "mixed_w1_float64_x0_float32": (
        lambda: good(x0=torch.randn(B, O, dtype=F32)),
        TypeError, [r"\bw1\b", r"torch\.float64", r"torch\.float32", r"\bx0\b"]),
    "mixed_u_float32": (
        lambda: good(u=torch.randn(T, B, DU, dtype=F32)),
        TypeError, [r"\bu\b", r"torch\.float32", r"torch\.float64"]),
    "mixed_b2_float32": (
        lambda: good(b2=torch.randn(O, dtype=F32)),
        TypeError, [r"\bb2\b", r"torch\.float32"]),
    "x0_none": (
        lambda: good(x0=None),
        TypeError, [r"\bx0\b", r"None"]),
    "w2_not_a_tensor": (
        lambda: good(w2=[[1.0] * H] * O),
        TypeError, [r"\bw2\b", r"\blist\b"]),
    "w1_on_other_device": (
        lambda: good(w1=torch.empty(H, DU + O, dtype=F64, device="meta")),
        ValueError, [r"\bw1\b", r"\bmeta\b", r"\bcpu\b"]),
    # layers: count, ranks, chaining, biases (docs/spec.md §4)
    "odd_number_of_params": (
        lambda: layered(lambda g: [g["w1"], None, g["w2"]]),
        TypeError, [r"\bb2\b", r"3 weight/bias arguments", r"odd number", r"\bw2\b"]),
    "no_layers": (
        lambda: layered(lambda g: []),
        TypeError, [r"\bw1\b", r"at least one layer", r"got none"]),
    "w3_not_2d": (
        lambda: deep(w3=torch.randn(O, H, 1, dtype=F64)),
        ValueError, [r"\bw3\b", r"2-D", r"\(2, 5, 1\)"]),
    "w3_1d": (
        lambda: deep(w3=torch.randn(O * H, dtype=F64)),
        ValueError, [r"\bw3\b", r"2-D", r"\(10,\)"]),
    "layers_do_not_chain_w2_w3": (
        lambda: deep(w3=torch.randn(O, H + 1, dtype=F64)),
        ValueError, [r"\bw3\b", r"do not chain", r"\(2, 6\)", r"H = 6", r"\bw2\b", r"\(5, 5\)"]),
    "layers_do_not_chain_w1_w2": (
        lambda: deep(w2=torch.randn(H, H + 2, dtype=F64)),
        ValueError, [r"\bw2\b", r"do not chain", r"\(5, 7\)", r"\bw1\b", r"\(5, 5\)"]),
    "b3_wrong_length": (
        lambda: deep(b3=torch.randn(O + 1, dtype=F64)),
        ValueError, [r"\bb3\b", r"\(2,\)", r"got \(3,\)", r"\bw3\b"]),
    "b2_hidden_wrong_length": (
        lambda: deep(b2=torch.randn(O, dtype=F64)),
        ValueError, [r"\bb2\b", r"\(5,\)", r"got \(2,\)"]),
    "w3_rows_not_x0_features": (
        lambda: deep(w3=torch.randn(O + 1, H, dtype=F64), b3=None),
        ValueError, [r"\bx0\b", r"O = 3", r"\bw3\b", r"\(3, 5\)"]),
    "w1_columns_deep": (
        lambda: deep(w1=torch.randn(H, DU + O + 1, dtype=F64)),
        ValueError, [r"\bw1\b", r"6 input columns", r"Du \+ O = 5"]),
    "w3_none": (
        lambda: deep(w3=None),
        TypeError, [r"\bw3\b", r"None"]),
    "b3_list": (
        lambda: deep(b3=[0.0, 0.0]),
        TypeError, [r"\bb3\b", r"\blist\b"]),
    "steps_positional_after_the_layers": (
        lambda: layered(lambda g: [g["w1"], None, g["w2"], None, 6]),
        TypeError, [r"\bw3\b", r"\bint\b", r"steps="]),
    "mixed_w3_float32": (
        lambda: deep(w3=torch.randn(O, H, dtype=F32)),
        TypeError, [r"\bw3\b", r"torch\.float32", r"torch\.float64"]),
    "b3_on_other_device": (
        lambda: deep(b3=torch.empty(O, dtype=F64, device="meta")),
        ValueError, [r"\bb3\b", r"\bmeta\b", r"\bcpu\b"]),
    # activation (docs/spec.md §1.1)
    "activation_unknown_name": (
        lambda: good(activation="swish"),
        ValueError, [r"\bactivation\b", r"'swish'", r"'relu'", r"'gelu_tanh'", r"'mish'", r"nn\.LeakyReLU"]),
    "activation_wrong_case": (
        lambda: good(activation="ReLU"),
        ValueError, [r"\bactivation\b", r"'ReLU'", r"lower case: 'relu'"]),
    "activation_unsupported_module": (
        lambda: deep(activation=nn.Softplus()),
        TypeError, [r"\bactivation\b", r"Softplus", r"'silu'", r"nn\.GELU\(approximate='tanh'\)"]),
    "activation_module_class": (
        lambda: good(activation=nn.ReLU),
        TypeError, [r"\bactivation\b", r"class ReLU", r"nn\.ReLU\(\)"]),
    "activation_int": (
        lambda: good(activation=3),
        TypeError, [r"\bactivation\b", r"\bint\b", r"'relu'"]),
    "activation_none": (
        lambda: good(activation=None),
        TypeError, [r"\bactivation\b", r"NoneType"]),
    "activation_param_str": (
        lambda: good(activation=nn.LeakyReLU("0.2")),
        TypeError, [r"\bactivation\b", r"negative_slope", r"\bstr\b", r"'0\.2'", r"real number"]),
    "activation_param_bool": (
        lambda: deep(activation=nn.ELU(alpha=True)),
        TypeError, [r"\bactivation\b", r"\balpha\b", r"\bbool\b"]),
    "activation_param_tensor": (
        lambda: good(activation=nn.LeakyReLU(torch.tensor(0.2))),
        TypeError, [r"\bactivation\b", r"negative_slope", r"Tensor"]),
    "activation_gelu_unknown_approximate": (
        lambda: good(activation=nn.GELU(approximate="fast")),
        ValueError, [r"\bactivation\b", r"approximate='fast'", r"'tanh'"]),
    "activation_subclass_overrides_forward": (
        lambda: good(activation=_ReLUOverridden()),
        TypeError, [r"\bactivation\b", r"_ReLUOverridden", r"overrides forward", r"'relu'"]),
    # the feedback structure (docs/spec.md §1.2): lags, feedback, residual
    "delay_lags_not_distinct": (
        lambda: good(x0=torch.randn(2, B, O, dtype=F64), delay=(2, 1, 2)),
        ValueError, [r"\bdelay\b", r"\(2, 1, 2\)", r"distinct", r"got 2 more than once"]),
    "delay_lag_zero": (
        lambda: good(x0=torch.randn(2, B, O, dtype=F64), delay=(2, 0)),
        ValueError, [r"\bdelay\b", r">= 1", r"got 0 at position 1"]),
    "delay_lag_negative": (
        lambda: good(x0=torch.randn(1, B, O, dtype=F64), delay=[1, -3]),
        ValueError, [r"\bdelay\b", r"\[1, -3\]", r"got -3 at position 1"]),
    "delay_lag_float": (
        lambda: good(x0=torch.randn(2, B, O, dtype=F64), delay=(1, 2.0)),
        TypeError, [r"\bdelay\b", r"\bint\b", r"float 2\.0 at position 1"]),
    "delay_lag_bool": (
        lambda: good(delay=(True,)),
        TypeError, [r"\bdelay\b", r"bool True at position 0"]),
    "delay_lag_str": (
        lambda: good(delay=("1",)),
        TypeError, [r"\bdelay\b", r"str '1' at position 0"]),
    "delay_empty": (
        lambda: good(delay=()),
        ValueError, [r"\bdelay\b", r"at least one lag", r"\(\)"]),
    "delay_set": (
        lambda: good(x0=torch.randn(2, B, O, dtype=F64), delay={1, 2}),
        TypeError, [r"\bdelay\b", r"sequence of distinct positive ints", r"\bset\b"]),
    "delay_tensor": (
        lambda: good(x0=torch.randn(2, B, O, dtype=F64), delay=torch.tensor([1, 2])),
        TypeError, [r"\bdelay\b", r"\bTensor\b"]),
    "feedback_zero": (
        lambda: good(feedback=0),
        ValueError, [r"\bfeedback\b", r"1\.\.O = 2", r"got 0"]),
    "feedback_above_O": (
        lambda: good(feedback=3),
        ValueError, [r"\bfeedback\b", r"1\.\.O = 2", r"got 3", r"w2 is \(2, 5\)"]),
    "feedback_negative": (
        lambda: good(feedback=-1),
        ValueError, [r"\bfeedback\b", r"got -1"]),
    "feedback_float": (
        lambda: good(feedback=1.0),
        TypeError, [r"\bfeedback\b", r"\bint\b", r"float 1\.0"]),
    "feedback_bool": (
        lambda: good(feedback=True),
        TypeError, [r"\bfeedback\b", r"bool True"]),
    "residual_int": (
        lambda: good(residual=1),
        TypeError, [r"\bresidual\b", r"\bbool\b", r"int 1"]),
    "residual_none": (
        lambda: good(residual=None),
        TypeError, [r"\bresidual\b", r"NoneType None"]),
    "residual_tensor": (
        lambda: good(residual=torch.tensor(True)),
        TypeError, [r"\bresidual\b", r"\bTensor\b"]),
    "x0_leading_axis_not_the_longest_lag": (
        lambda: good(x0=torch.randn(2, B, O, dtype=F64), delay=(1, 3)),
        ValueError, [r"\bx0\b", r"\(2, 4, 2\)", r"\(3, B, O\)", r"D = 3", r"delay=\(1, 3\)"]),
    "x0_2d_with_two_lags": (
        lambda: good(delay=(2, 1)),
        ValueError, [r"\bx0\b", r"\(4, 2\)", r"\(2, B, O\)"]),
    "x0_width_not_F": (
        lambda: good(feedback=1, w1=torch.randn(H, DU + 1, dtype=F64)),
        ValueError, [r"\bx0\b", r"2 features", r"feedback=1", r"F = 1", r"O = 2"]),
    "x0_width_F_without_feedback": (
        lambda: good(x0=torch.randn(B, 1, dtype=F64), w1=torch.randn(H, DU + 1, dtype=F64)),
        ValueError, [r"\bx0\b", r"1 features", r"O = 2", r"feedback=1"]),
    "x0_leading_axis_with_feedback": (
        lambda: good(x0=torch.randn(1, B, 1, dtype=F64), delay=(1, 2), feedback=1),
        ValueError, [r"\bx0\b", r"\(1, 4, 1\)", r"\(2, B, F\)"]),
    "w1_columns_vs_lags": (
        lambda: good(x0=torch.randn(2, B, O, dtype=F64), delay=(1, 2)),
        ValueError, [r"\bw1\b", r"5 input columns", r"Du = 3", r"m = 2", r"F = 2", r"Du \+ m·F = 3 \+ 4 = 7"]),
    "w1_columns_vs_feedback": (
        lambda: good(x0=torch.randn(B, 1, dtype=F64), feedback=1),
        ValueError, [r"\bw1\b", r"5 input columns", r"m = 1", r"F = 1", r"= 4 needed"]),
    "w1_columns_lags_no_u": (
        lambda: good(x0=torch.randn(3, B, O, dtype=F64), delay=(3, 1), u=None, steps=4,
                     w1=torch.randn(H, 9, dtype=F64)),
        ValueError, [r"\bw1\b", r"9 input columns", r"m·F = 2·2 = 4", r"u is None", r"\(T, B, 5\)"]),
    "w1_columns_lags_deep": (
        lambda: deep(x0=torch.randn(3, B, 1, dtype=F64), delay=(2, 1, 3), feedback=1),
        ValueError, [r"\bw1\b", r"5 input columns", r"m = 3", r"Du \+ m·F = 3 \+ 3 = 6"]),
}


# Rows whose message is wrong today (see the reasons); strict, so they flip when fixed.
XFAIL: dict = {}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", [
    pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=XFAIL[c])) if c in XFAIL else c
    for c in BAD], ids=list(BAD))
def test_bad_input(case, backend):
    make, exc, patterns = BAD[case]
    kw = make()
    with pytest.raises(exc, match=patterns[0]) as err:
        call(kw, backend)
    message = str(err.value)
    assert message.startswith("fbfast.rollout:"), message
    for pattern in patterns[1:]:
        assert re.search(pattern, message), f"{pattern!r} not in {message!r}"


def test_one_d_shapes_are_printed_as_tuples():
    with pytest.raises(ValueError, match=r"b1 must have shape \(5,\), got \(4,\)"):
        call(good(b1=torch.randn(H - 1, dtype=F64)), "eager")


def test_good_baseline_runs():
    """The table's starting point is valid, so each row fails for the reason it names."""
    for backend in ("eager", "cpp") if fbfast.backends()["cpp"].available else ("eager",):
        assert call(good(), backend).shape == (T, B, O)
        assert call(good(delay=3, x0=torch.randn(3, B, O, dtype=F64), truncate=2), backend).shape == (T, B, O)
        # the structures the feedback rows start from (w1 has Du + m·F = 3 + 2 columns)
        structured = deep(x0=torch.randn(2, B, 1, dtype=F64), delay=(2, 1), feedback=1, residual=True)
        assert call(structured, backend).shape == (T, B, O)
        assert call(good(x0=torch.randn(1, B, 1, dtype=F64), w1=torch.randn(H, DU + 1, dtype=F64), feedback=1),
                    backend).shape == (T, B, O)


def test_steps_agreeing_with_u_is_fine():
    y = call(good(steps=T), "eager")
    assert y.shape == (T, B, O)


# --- valid but unusual inputs: non-contiguous and zero-size --------------------------------------


def _params(kw):
    return kw["params"] if "params" in kw else [kw[n] for n in ("w1", "b1", "w2", "b2")]


def _as_inputs(kw):
    """name -> tensor or None: x0, u, w1, b1, ..., wL, bL."""
    params = _params(kw)
    names = [f"{k}{l + 1}" for l in range(len(params) // 2) for k in "wb"]
    return dict(x0=kw["x0"], u=kw["u"], **dict(zip(names, params)))


def _reference(kw):
    x0 = kw["x0"] if kw["x0"].dim() == 3 else kw["x0"].unsqueeze(0)
    steps = kw["steps"] if kw["steps"] is not None else kw["u"].shape[0]
    return fbfast.rollout_reference(x0, *_params(kw), steps=steps, u=kw["u"], delay=kw["delay"],
                                    truncate=kw["truncate"], activation=kw.get("activation", "relu"))


def _grads(y, kw, grad_y):
    inputs = {n: t for n, t in _as_inputs(kw).items() if t is not None and t.requires_grad}
    if not y.requires_grad:
        got = [None] * len(inputs)
    else:
        got = torch.autograd.grad(y, list(inputs.values()), grad_y, allow_unused=True)
    # None and zeros are the same answer: no path from that input to Y.
    return {n: torch.zeros_like(t) if g is None else g for (n, t), g in zip(inputs.items(), got)}


def _check_against_reference(kw, backend):
    y = call(kw, backend)
    want = _reference(kw)
    assert y.shape == want.shape and y.dtype == want.dtype
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-12)
    grad_y = torch.randn(y.shape, dtype=y.dtype, generator=torch.Generator().manual_seed(1))
    got, ref = _grads(y, kw, grad_y), _grads(want, kw, grad_y)
    assert got.keys() == ref.keys()
    for name in ref:
        assert got[name].shape == _as_inputs(kw)[name].shape, name
        torch.testing.assert_close(got[name], ref[name], rtol=1e-9, atol=1e-11,
                                   msg=lambda m: f"d{name}: {m}")
    return y, got


def _leaf(t):
    return t.detach().requires_grad_(True)


def _noncontiguous(delay, with_u, bias):
    g = torch.Generator().manual_seed(delay)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=F64)

    Du = DU if with_u else 0
    # Weights stored transposed, x0 a strided slice, u with (B, T) memory order.
    w1 = rnd(Du + O, H).t()
    w2 = rnd(H, O).t() * 0.8
    x0_big = rnd(delay, B * 2, O + 3)
    x0 = x0_big[:, ::2, 1:1 + O]
    u = rnd(B, T, Du).transpose(0, 1) if with_u else None
    b1 = rnd(2 * H)[::2] if bias else None
    b2 = rnd(2 * O)[::2] if bias else None
    tensors = [w1, w2, x0] + ([u] if with_u else []) + ([b1, b2] if bias else [])
    assert not any(t.is_contiguous() for t in tensors)
    kw = dict(x0=_leaf(x0), w1=_leaf(w1), b1=None if b1 is None else _leaf(b1), w2=_leaf(w2),
              b2=None if b2 is None else _leaf(b2), u=None if u is None else _leaf(u),
              steps=None if with_u else T, delay=delay, truncate=None)
    # _leaf keeps the strides: the call really sees non-contiguous tensors.
    assert not kw["x0"].is_contiguous() and not kw["w1"].is_contiguous()
    return kw


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("with_u", [True, False], ids=["u", "no_u"])
@pytest.mark.parametrize("delay", [1, 3])
def test_noncontiguous_inputs(backend, delay, with_u, bias):
    kw = _noncontiguous(delay, with_u, bias)
    # delay 1 with a 3-D x0 slice: also pass the (B, O) form.
    if delay == 1:
        kw["x0"] = _leaf(kw["x0"][0])
        assert not kw["x0"].is_contiguous()
    _check_against_reference(kw, backend)
    # And the answer equals the one on contiguous copies.
    contiguous = {n: (None if v is None else _leaf(v.contiguous())) if n in NAMES else v
                  for n, v in kw.items()}
    torch.testing.assert_close(call(kw, backend), call(contiguous, backend), rtol=1e-12, atol=1e-12)


ZERO_SIZE = {
    # id: (batch, steps, hidden, with_u, delay)
    "B0": (0, T, H, True, 1),
    "B0_delay2_no_u": (0, T, H, False, 2),
    "steps0_u": (B, 0, H, True, 1),
    "steps0_no_u_delay3": (B, 0, H, False, 3),
    "steps_less_than_delay": (B, 2, H, True, 3),
    "H0": (B, T, 0, True, 1),
    "H0_no_u": (B, T, 0, False, 2),
    "all_zero": (0, 0, 0, True, 1),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(ZERO_SIZE), ids=list(ZERO_SIZE))
def test_zero_size_inputs(case, backend):
    batch, steps, hidden, with_u, delay = ZERO_SIZE[case]
    g = torch.Generator().manual_seed(2)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=F64).requires_grad_(True)

    Du = DU if with_u else 0
    kw = dict(x0=rnd(delay, batch, O), w1=rnd(hidden, Du + O), b1=rnd(hidden), w2=rnd(O, hidden),
              b2=rnd(O), u=rnd(steps, batch, Du) if with_u else None,
              steps=None if with_u else steps, delay=delay, truncate=None)
    y, got = _check_against_reference(kw, backend)
    assert y.shape == (steps, batch, O)
    if hidden == 0 and steps > 0 and batch > 0:
        # No hidden units: every step outputs b2, and only b2 gets gradient.
        torch.testing.assert_close(y, kw["b2"].detach().expand(steps, batch, O))
    if steps < delay:
        # Rows of x0 that no step reads get zero gradient.
        assert got["x0"][steps:].abs().sum() == 0


# --- the same for deeper networks ----------------------------------------------------------------


def _deep_layout(delay, activation, seed=3):
    """Three layers (H, H-1 wide), every tensor non-contiguous: transposed weights, strided
    biases and x0, u expanded along T (stride 0) and x0 along B."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, s=1.0):
        return torch.randn(*shape, generator=g, dtype=F64) * s

    w1 = rnd(DU + O, H, s=0.6).t()
    w2 = rnd(H, H - 1, s=0.5).t()
    w3 = rnd(H - 1, O, s=0.5).t()
    b1, b2, b3 = rnd(2 * H)[::2], rnd(2 * (H - 1))[::2], rnd(3 * O)[::3]
    x0 = rnd(delay, 1, O).expand(delay, B, O)
    u = rnd(1, B, DU).expand(T, B, DU)
    tensors = dict(w1=w1, b1=b1, w2=w2, b2=b2, w3=w3, b3=b3)
    assert not any(t.is_contiguous() for t in [x0, u, *tensors.values()])
    return dict(x0=_leaf(x0), u=_leaf(u), params=[_leaf(t) for t in tensors.values()], steps=None, delay=delay,
                truncate=2, activation=activation)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["gelu", nn.LeakyReLU(0.2), "sigmoid"], ids=["gelu", "leaky0.2", "sigmoid"])
@pytest.mark.parametrize("delay", [1, 2])
def test_noncontiguous_and_expanded_inputs_deep(backend, activation, delay):
    kw = _deep_layout(delay, activation)
    assert kw["x0"].stride(1) == 0 and kw["u"].stride(0) == 0
    _check_against_reference(kw, backend)
    contiguous = dict(kw, x0=_leaf(kw["x0"].contiguous()), u=_leaf(kw["u"].contiguous()),
                      params=[_leaf(t.contiguous()) for t in kw["params"]])
    torch.testing.assert_close(call(kw, backend), call(contiguous, backend), rtol=1e-12, atol=1e-12)


DEEP_ZERO_SIZE = {
    # id: (batch, steps, hidden widths, with_u)
    "B0": (0, T, (H, 3), True),
    "steps0": (B, 0, (H, 3), False),
    "middle_width0": (B, T, (H, 0), True),
    "first_width0": (B, T, (0, 3, 4), False),
    "one_layer_B0": (0, T, (), True),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(DEEP_ZERO_SIZE), ids=list(DEEP_ZERO_SIZE))
def test_zero_size_inputs_deep(case, backend):
    batch, steps, widths, with_u = DEEP_ZERO_SIZE[case]
    g = torch.Generator().manual_seed(4)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=F64).requires_grad_(True)

    Du = DU if with_u else 0
    sizes = [Du + O, *widths, O]
    params = [t for l in range(len(sizes) - 1) for t in (rnd(sizes[l + 1], sizes[l]), rnd(sizes[l + 1]))]
    kw = dict(x0=rnd(1, batch, O), u=rnd(steps, batch, Du) if with_u else None, params=params,
              steps=None if with_u else steps, delay=1, truncate=None, activation="silu")
    y, got = _check_against_reference(kw, backend)
    assert y.shape == (steps, batch, O)
    if 0 in widths and steps > 0 and batch > 0:
        # A zero-width layer cuts the network: the output is what the layers after it make of
        # nothing, and no layer before it gets a gradient.
        assert got["w1"].abs().sum() == 0 and got["x0"].abs().sum() == 0
