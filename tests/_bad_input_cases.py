"""The bad-input matrix: every case, every column, and the child process that runs them.

`tests/test_bad_input_matrix.py` starts this file as a script, sends it a JSON list of
``"column/case"`` tasks on stdin, and reads one JSON line per task on stdout, so that a segfault
or an abort in one case shows up as a missing line instead of killing pytest.

Columns:
* ``eager``, ``cpp``, ``compile``, ``auto``: `fbfast.rollout` with that backend, over
  `API_CASES` (test_validation.BAD, reused, plus `EXTRA_API_CASES` here);
* ``backend-arg``: a bad ``backend`` argument or ``FBFAST_BACKEND`` (`BACKEND_CASES`);
* ``op-forward``, ``op-backward``: direct calls of ``torch.ops.fbfast.rollout_forward.default``
  and ``rollout_backward.default`` with bad arguments; the C++ checks must raise RuntimeError.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import traceback
from typing import Callable, Dict, List, NamedTuple, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

import fbfast  # noqa: E402
from test_validation import BAD as VALIDATION_BAD  # noqa: E402
from test_validation import B, DU, F32, F64, H, O, T, call, good  # noqa: E402


class Case(NamedTuple):
    make: Callable  # API columns: -> kwargs of `call`; op columns: -> a thunk that calls the op
    exc: type
    patterns: List[str]  # regexes that must all be found in the message
    known_gap: Optional[str] = None  # why it fails today (the test is a strict xfail)


def _rnd(*shape, dtype=F64):
    return torch.randn(*shape, dtype=F64).to(dtype)


def _one_by_one(steps, dtype=F32):
    """B = O = 1, no u: the smallest Y per step."""
    return good(dtype, x0=_rnd(1, 1, dtype=dtype), w1=_rnd(H, 1, dtype=dtype), b1=_rnd(H, dtype=dtype),
                w2=_rnd(1, H, dtype=dtype), b2=_rnd(1, dtype=dtype), u=None, steps=steps)


def _meta(kw):
    return {k: v.to("meta") if isinstance(v, torch.Tensor) else v for k, v in kw.items()}


def _nested_x0():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "nested tensors are a prototype"
        return torch.nested.nested_tensor([_rnd(B, O), _rnd(B, O)])


def _sparse_csr(t):
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "sparse CSR support is in beta"
        return t.to_sparse_csr()


# Beyond test_validation.BAD: other ranks, dtypes, devices, layouts, sizes and argument types.
EXTRA_API_CASES: Dict[str, Case] = {
    # ranks
    "x0_4d": Case(lambda: good(x0=_rnd(1, 1, B, O)), ValueError, [r"\bx0\b", r"\(1, 1, 4, 2\)"]),
    "x0_0d": Case(lambda: good(x0=torch.tensor(1.0, dtype=F64)), ValueError, [r"\bx0\b", r"got \(\)"]),
    "u_4d": Case(lambda: good(u=_rnd(1, T, B, DU)), ValueError, [r"\bu\b", r"3-D", r"\(1, 6, 4, 3\)"]),
    "u_0d": Case(lambda: good(u=torch.tensor(1.0, dtype=F64)), ValueError, [r"\bu\b", r"3-D", r"got shape \(\)"]),
    "w1_1d": Case(lambda: good(w1=_rnd(H)), ValueError, [r"\bw1\b", r"2-D", r"\(5,\)"]),
    "w1_0d": Case(lambda: good(w1=torch.tensor(1.0, dtype=F64)), ValueError, [r"\bw1\b", r"2-D", r"got shape \(\)"]),
    "w2_3d": Case(lambda: good(w2=_rnd(O, H, 1)), ValueError, [r"\bw2\b", r"2-D", r"\(2, 5, 1\)"]),
    "w2_0d": Case(lambda: good(w2=torch.tensor(1.0, dtype=F64)), ValueError, [r"\bw2\b", r"2-D", r"\(\)"]),
    "b1_0d": Case(lambda: good(b1=torch.tensor(1.0, dtype=F64)), ValueError, [r"\bb1\b", r"\(5,\)", r"got \(\)"]),
    "b2_2d": Case(lambda: good(b2=_rnd(1, O)), ValueError, [r"\bb2\b", r"\(2,\)", r"\(1, 2\)"]),
    # sizes that do not add up
    "x0_delay_axis_too_long": Case(lambda: good(x0=_rnd(3, B, O), delay=2), ValueError,
                                   [r"\bx0\b", r"\(3, 4, 2\)", r"\(2, B, O\)"]),
    "x0_2d_for_delay_2": Case(lambda: good(x0=_rnd(B, O), delay=2, truncate=1), ValueError,
                              [r"\bx0\b", r"\(4, 2\)", r"delay=2"]),
    "u_T_shorter_than_steps": Case(lambda: good(steps=T - 1), ValueError, [r"\bsteps=5\b", r"\bu\b", r"T = 6"]),
    "u_B_smaller": Case(lambda: good(u=_rnd(T, B - 1, DU)), ValueError, [r"\bu\b", r"batch size 3", r"B = 4"]),
    "u_Du_vs_w1_columns": Case(lambda: good(u=_rnd(T, B, DU + 1)), ValueError,
                               [r"\bw1\b", r"Du = 4", r"Du \+ O = 6"]),
    "w1_columns_zero": Case(lambda: good(w1=_rnd(H, 0)), ValueError, [r"\bw1\b", r"0 input columns"]),
    "w2_rows_not_O_no_b2": Case(lambda: good(w2=_rnd(O + 1, H), b2=None), ValueError,
                                [r"\bw2\b", r"\(3, 5\)", r"O = 3", r"\bx0\b"]),
    "w2_rows_not_O_with_b2": Case(lambda: good(w2=_rnd(O + 1, H)), ValueError,
                                  [r"\bb2\b", r"\(3,\)", r"got \(2,\)"]),
    "w2_columns_not_H": Case(lambda: good(w2=_rnd(O, H + 2)), ValueError, [r"\bw1\b", r"H = 7", r"\(5, 5\)"]),
    "b1_too_long": Case(lambda: good(b1=_rnd(H + 3)), ValueError, [r"\bb1\b", r"\(5,\)", r"got \(8,\)"]),
    "b2_empty": Case(lambda: good(b2=_rnd(0)), ValueError, [r"\bb2\b", r"\(2,\)", r"got \(0,\)"]),
    # dtypes
    "x0_complex64": Case(lambda: good(x0=_rnd(B, O).to(torch.complex64)), TypeError,
                         [r"\bx0\b", r"torch\.complex64", r"floating"]),
    "u_complex128": Case(lambda: good(u=_rnd(T, B, DU).to(torch.complex128)), TypeError,
                         [r"\bu\b", r"torch\.complex128"]),
    "b1_int8": Case(lambda: good(b1=torch.ones(H, dtype=torch.int8)), TypeError, [r"\bb1\b", r"torch\.int8"]),
    "w2_uint8": Case(lambda: good(w2=torch.ones(O, H, dtype=torch.uint8)), TypeError, [r"\bw2\b", r"torch\.uint8"]),
    "b2_bool": Case(lambda: good(b2=torch.ones(O, dtype=torch.bool)), TypeError, [r"\bb2\b", r"torch\.bool"]),
    "u_int64": Case(lambda: good(u=torch.ones(T, B, DU, dtype=torch.int64)), TypeError, [r"\bu\b", r"torch\.int64"]),
    "all_int32": Case(lambda: {k: v.to(torch.int32) if isinstance(v, torch.Tensor) else v for k, v in good().items()},
                      TypeError, [r"\bx0\b", r"torch\.int32"]),
    "x0_float16_rest_float64": Case(lambda: good(x0=_rnd(B, O, dtype=torch.float16)), TypeError,
                                    [r"\bw1\b", r"torch\.float64", r"torch\.float16"]),
    "w2_float32_rest_float64": Case(lambda: good(w2=_rnd(O, H, dtype=F32)), TypeError,
                                    [r"\bw2\b", r"torch\.float32", r"torch\.float64"]),
    "b1_float32_rest_float64": Case(lambda: good(b1=_rnd(H, dtype=F32)), TypeError, [r"\bb1\b", r"torch\.float32"]),
    "x0_float64_rest_float32": Case(lambda: good(F32, x0=_rnd(B, O)), TypeError,
                                    [r"\bw1\b", r"torch\.float32", r"torch\.float64"]),
    "bfloat16_u_rest_float32": Case(lambda: good(F32, u=_rnd(T, B, DU, dtype=torch.bfloat16)), TypeError,
                                    [r"\bu\b", r"torch\.bfloat16"]),
    # devices
    "u_on_meta": Case(lambda: good(u=_rnd(T, B, DU).to("meta")), ValueError, [r"\bu\b", r"\bmeta\b", r"\bcpu\b"]),
    "b2_on_meta": Case(lambda: good(b2=_rnd(O).to("meta")), ValueError, [r"\bb2\b", r"\bmeta\b"]),
    "x0_on_meta_rest_cpu": Case(lambda: good(x0=_rnd(B, O).to("meta")), ValueError,
                                [r"\bw1\b", r"\bcpu\b", r"x0 is on meta"]),
    # layouts: sparse and nested tensors must not reach ATen or the kernel
    "w1_sparse_coo": Case(lambda: good(w1=_rnd(H, DU + O).to_sparse()), TypeError,
                          [r"\bw1\b", r"sparse_coo", r"dense"]),
    "x0_sparse_coo": Case(lambda: good(x0=_rnd(B, O).to_sparse()), TypeError, [r"\bx0\b", r"sparse_coo"]),
    "u_sparse_coo": Case(lambda: good(u=_rnd(T, B, DU).to_sparse()), TypeError, [r"\bu\b", r"sparse_coo"]),
    "w2_sparse_csr": Case(lambda: good(w2=_sparse_csr(_rnd(O, H))), TypeError, [r"\bw2\b", r"sparse_csr"]),
    "x0_nested": Case(lambda: good(x0=_nested_x0()), TypeError, [r"\bx0\b", r"nested"]),
    # steps
    "steps_too_large_to_allocate_B1_O1": Case(
        lambda: _one_by_one(2**40), RuntimeError,
        [r"\bsteps=1099511627776\b", r"too large", r"\(1099511627776, 1, 1\)", r"GiB"]),
    "steps_too_large_to_allocate": Case(
        lambda: good(steps=2**34, u=None, w1=_rnd(H, O)), RuntimeError, [r"\bsteps=17179869184\b", r"GiB"]),
    "steps_numel_beyond_int64": Case(
        lambda: good(steps=2**62, u=None, w1=_rnd(H, O)), RuntimeError, [r"\bsteps=4611686018427387904\b"]),
    "steps_beyond_int64": Case(lambda: _one_by_one(2**64), ValueError,
                               [r"\bsteps\b", r"2\*\*63", r"18446744073709551616"]),
    "steps_bool": Case(lambda: _one_by_one(True), TypeError, [r"\bsteps\b", r"\bbool\b"]),
    "steps_str": Case(lambda: _one_by_one("5"), TypeError, [r"\bsteps\b", r"\bstr\b"]),
    "steps_tensor": Case(lambda: _one_by_one(torch.tensor(5)), TypeError, [r"\bsteps\b", r"\bTensor\b"]),
    "steps_negative_no_u_large": Case(lambda: _one_by_one(-(2**40)), ValueError, [r"\bsteps\b", r">= 0"]),
    # delay and truncate
    "delay_none": Case(lambda: good(delay=None), TypeError, [r"\bdelay\b", r"NoneType"]),
    "delay_str": Case(lambda: good(delay="2"), TypeError, [r"\bdelay\b", r"\bstr\b"]),
    "delay_beyond_int64": Case(lambda: good(delay=2**64), ValueError, [r"\bdelay\b", r"2\*\*63"]),
    "delay_very_negative": Case(lambda: good(delay=-(2**70)), ValueError, [r"\bdelay\b", r">= 1"]),
    "truncate_bool": Case(lambda: good(truncate=True), TypeError, [r"\btruncate\b", r"\bbool\b"]),
    "truncate_str": Case(lambda: good(truncate="3"), TypeError, [r"\btruncate\b", r"\bstr\b"]),
    "truncate_beyond_int64": Case(lambda: good(truncate=2**64), ValueError, [r"\btruncate\b", r"2\*\*63"]),
    # not tensors
    "x0_numpy": Case(lambda: good(x0=_rnd(B, O).numpy()), TypeError, [r"\bx0\b", r"ndarray"]),
    "b1_list": Case(lambda: good(b1=[0.0] * H), TypeError, [r"\bb1\b", r"\blist\b"]),
    "w1_none": Case(lambda: good(w1=None), TypeError, [r"\bw1\b", r"None"]),
    "u_float": Case(lambda: good(u=1.0), TypeError, [r"\bu\b", r"\bfloat\b"]),
}

E = 3  # the ensembles' size (docs/spec.md §1.3)


def _ensemble(**over):
    """`good`'s call as a valid ensemble of E networks: 3-D weights, (E, out) biases, x0 and u
    with the member axis; ``over`` replaces any of them."""
    kw = good(x0=_rnd(1, E, B, O), w1=_rnd(E, H, DU + O), b1=_rnd(E, H), w2=_rnd(E, O, H), b2=_rnd(E, O),
              u=_rnd(T, E, B, DU))
    kw.update(over)
    return kw


# Invalid ensembles: the validation error comes first on every backend, "cpp" included.
ENSEMBLE_CASES: Dict[str, Case] = {
    "ensemble_mixed_ranks": Case(lambda: _ensemble(w2=_rnd(O, H)), ValueError,
                                 [r"\bw2\b", r"2-D", r"\(2, 5\)", r"\bw1\b", r"3-D", r"\(3, 5, 5\)"]),
    "ensemble_w_sizes_disagree": Case(lambda: _ensemble(w2=_rnd(4, O, H)), ValueError,
                                      [r"\bw2\b", r"\(4, 2, 5\)", r"E = 4", r"\bw1\b", r"E = 3"]),
    "ensemble_b_size_disagrees": Case(lambda: _ensemble(b1=_rnd(4, H)), ValueError,
                                      [r"\bb1\b", r"\(3, 5\)", r"got \(4, 5\)", r"E = 3"]),
    "ensemble_b_1d": Case(lambda: _ensemble(b2=_rnd(O)), ValueError, [r"\bb2\b", r"\(3, 2\)", r"got \(2,\)"]),
    "ensemble_w_4d": Case(lambda: _ensemble(w1=_rnd(1, E, H, DU + O)), ValueError,
                          [r"\bw1\b", r"3-D", r"\(1, 3, 5, 5\)"]),
    "ensemble_x0_member_axis": Case(lambda: _ensemble(x0=_rnd(1, 4, B, O)), ValueError,
                                    [r"\bx0\b", r"\(1, 4, 4, 2\)", r"member axis", r"E = 3"]),
    "ensemble_x0_5d": Case(lambda: _ensemble(x0=_rnd(1, 1, E, B, O)), ValueError, [r"\bx0\b", r"\(1, 1, 3, 4, 2\)"]),
    "ensemble_u_member_axis": Case(lambda: _ensemble(u=_rnd(T, 2, B, DU)), ValueError,
                                   [r"\bu\b", r"\(6, 2, 4, 3\)", r"member axis", r"E = 3"]),
    "ensemble_u_batch": Case(lambda: _ensemble(u=_rnd(T, E, B + 1, DU)), ValueError,
                             [r"\bu\b", r"batch size 5", r"B = 4"]),
    "ensemble_shared_u_2d": Case(lambda: _ensemble(u=_rnd(T, DU)), ValueError, [r"\bu\b", r"\(6, 3\)"]),
}

API_CASES: Dict[str, Case] = {
    **{f"validation.{k}": Case(*v) for k, v in VALIDATION_BAD.items()},
    **EXTRA_API_CASES,
    **ENSEMBLE_CASES,
}


@contextlib.contextmanager
def _env(name, value):
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


def _cuda_case():
    if fbfast.backends()["cuda"].available:  # a CUDA machine: CPU tensors are the misuse
        return Case(lambda: dict(good(), backend="cuda"), ValueError, [r"'cuda'", r"cuda tensors", r"\bcpu\b"])
    return Case(lambda: dict(good(), backend="cuda"), RuntimeError, [r"'cuda'", r"not available"])


_CPP_MISSING = not fbfast.backends()["cpp"].available


def _cpp_case(make, exc, patterns):
    if _CPP_MISSING:  # explicit "cpp" without the build: the availability error comes first
        return Case(make, RuntimeError, [r"'cpp'", r"not available", r"pip install --no-build-isolation"])
    return Case(make, exc, patterns)


# A bad backend argument: one column, "backend" comes from the case.
BACKEND_CASES: Dict[str, Case] = {
    "cuda_not_built_or_wrong_device": _cuda_case(),
    "unknown_name": Case(lambda: dict(good(), backend="nope"), ValueError, [r"\bbackend\b", r"'nope'", r"'eager'"]),
    "none": Case(lambda: dict(good(), backend=None), ValueError, [r"\bbackend\b", r"got None"]),
    "wrong_case": Case(lambda: dict(good(), backend="CPP"), ValueError, [r"\bbackend\b", r"'CPP'"]),
    "env_unknown_name": Case(lambda: dict(good(), backend="auto", env=("FBFAST_BACKEND", "nope")), ValueError,
                             [r"FBFAST_BACKEND", r"'nope'"]),
    "cpp_float16": _cpp_case(lambda: dict(good(torch.float16), backend="cpp"), TypeError,
                             [r"'cpp'", r"float16", r"eager"]),
    "cpp_bfloat16": _cpp_case(lambda: dict(good(torch.bfloat16), backend="cpp"), TypeError,
                              [r"'cpp'", r"bfloat16"]),
    "cpp_meta_tensors": _cpp_case(lambda: dict(_meta(good()), backend="cpp"), ValueError,
                                  [r"'cpp'", r"cpu tensors", r"\bmeta\b"]),
}


# Direct calls of the operators: what the C++ checks (and the fake kernels) do with bad input.
# Arguments as in csrc/fbfast.cpp: (x0, u, weights, biases, steps, delay, truncate, activation,
# activation_param, lags=[], feedback=0, residual=False); the layers are given as w1, b1, w2, b2,
# ... and gathered into the lists.
def _op_inputs(dtype=F64, layers=2):
    widths = [DU + O] + [H] * (layers - 1) + [O]
    a = dict(x0=_rnd(1, B, O, dtype=dtype), u=_rnd(T, B, DU, dtype=dtype))
    for l in range(layers):
        a[f"w{l + 1}"] = _rnd(widths[l + 1], widths[l], dtype=dtype)
        a[f"b{l + 1}"] = _rnd(widths[l + 1], dtype=dtype)
    return a


def _lists(a):
    """(weights, biases) of ``a``: w1, w2, ... and b1, b2, ... in order (a bias given as
    ``_MISSING`` is left out of the list, to make a list one entry short)."""
    layers = sum(1 for k in a if k[0] == "w" and k[1:].isdigit())
    weights = [a[f"w{l + 1}"] for l in range(layers)]
    biases = [a[f"b{l + 1}"] for l in range(layers) if a.get(f"b{l + 1}") is not _MISSING]
    return weights, biases


_MISSING = object()


def _forward(steps=T, delay=1, truncate=0, dtype=F64, layers=2, activation="relu", param=0.0, fb=None, **over):
    """``fb``: the trailing feedback-structure arguments (lags, feedback, residual), by keyword
    as fbfast.rollout passes them; left out, the schema's defaults."""
    a = _op_inputs(dtype, layers)
    a.update(over)
    op = torch.ops.fbfast.rollout_forward.default
    return lambda: op(a["x0"], a["u"], *_lists(a), steps, delay, truncate, activation, param, **(fb or {}))


def _backward(delay=1, truncate=0, mask=None, layers=2, activation="relu", param=0.0, fb=None, **over):
    a = _op_inputs(layers=layers)
    y = torch.ops.fbfast.rollout_forward.default(a["x0"], a["u"], *_lists(a), T, 1, 0, "relu", 0.0)
    a.update(grad_y=torch.ones_like(y), y=y)
    a.update(over)
    mask = [True] * (2 + 2 * layers) if mask is None else mask
    op = torch.ops.fbfast.rollout_backward.default
    return lambda: op(a["grad_y"], a["y"], a["x0"], a["u"], *_lists(a), delay, truncate, activation, param,
                      list(mask), **(fb or {}))


def _on_meta(make):
    """The same direct call with every tensor on the meta device: the shape-only kernels that
    torch.compile traces with must refuse what the real kernels refuse."""
    def call():
        inner = make()
        cells = [c.cell_contents for c in (inner.__closure__ or ())]
        args = next(c for c in cells if isinstance(c, dict) and "x0" in c)  # not `fb`, the structure
        for key, value in list(args.items()):
            if isinstance(value, torch.Tensor):
                args[key] = value.to("meta")
        return inner()
    return call


OP_FORWARD_CASES: Dict[str, Case] = {
    "meta_w1_columns": Case(lambda: _on_meta(lambda: _forward(w1=_rnd(H, DU + O + 1))), RuntimeError,
                            [r"\bw1\b", r"\[5, 6\]"]),
    "meta_steps_disagree_with_u": Case(lambda: _on_meta(lambda: _forward(steps=T + 1)), RuntimeError,
                                       [r"\bu\b", r"steps=7"]),
    "x0_2d": Case(lambda: _forward(x0=_rnd(B, O)), RuntimeError, [r"\bx0\b", r"delay=1", r"\[4, 2\]"]),
    "x0_wrong_delay_axis": Case(lambda: _forward(delay=2), RuntimeError, [r"\bx0\b", r"delay=2", r"\[1, 4, 2\]"]),
    "x0_wrong_features": Case(lambda: _forward(x0=_rnd(1, B, O + 1)), RuntimeError,
                              [r"\bx0\b", r"3 features", r"O = 2"]),
    "w1_1d": Case(lambda: _forward(w1=_rnd(H * (DU + O))), RuntimeError, [r"\bw1\b", r"\[25\]"]),
    "w1_columns": Case(lambda: _forward(w1=_rnd(H, DU + O + 1)), RuntimeError, [r"\bw1\b", r"\[5, 6\]"]),
    "w1_rows": Case(lambda: _forward(w1=_rnd(H + 1, DU + O)), RuntimeError, [r"\bw1\b", r"\[6, 5\]"]),
    "w2_1d": Case(lambda: _forward(w2=_rnd(O * H)), RuntimeError, [r"\bw2\b", r"\[10\]"]),
    "u_2d": Case(lambda: _forward(u=_rnd(T, DU)), RuntimeError, [r"\bu\b", r"\[6, 3\]"]),
    "u_0d": Case(lambda: _forward(u=torch.tensor(1.0, dtype=F64)), RuntimeError, [r"\bu\b"]),
    "u_wrong_T": Case(lambda: _forward(steps=T + 1), RuntimeError, [r"\bu\b", r"steps=7"]),
    "u_wrong_B": Case(lambda: _forward(u=_rnd(T, B + 1, DU)), RuntimeError, [r"\bu\b", r"B=4"]),
    "b1_wrong_length": Case(lambda: _forward(b1=_rnd(H + 1)), RuntimeError, [r"\bb1\b", r"\[6\]"]),
    "b1_0d": Case(lambda: _forward(b1=torch.tensor(1.0, dtype=F64)), RuntimeError, [r"\bb1\b", r"\[\]"]),
    "b2_wrong_length": Case(lambda: _forward(b2=_rnd(O, 1)), RuntimeError, [r"\bb2\b", r"\[2, 1\]"]),
    "steps_negative": Case(lambda: _forward(steps=-1, u=None, w1=_rnd(H, O)), RuntimeError, [r"\bsteps\b", r"-1"]),
    "steps_too_large_to_allocate": Case(
        lambda: _forward(steps=2**40, x0=_rnd(1, 1, 1), u=None, w1=_rnd(H, 1), w2=_rnd(1, H), b2=None),
        RuntimeError, [r"\bsteps=1099511627776\b", r"too large", r"GiB"]),
    "steps_numel_beyond_int64": Case(lambda: _forward(steps=2**62, u=None, w1=_rnd(H, O)), RuntimeError,
                                     [r"\bsteps=4611686018427387904\b", r"too large"]),
    "steps_beyond_int64": Case(lambda: _forward(steps=2**64, u=None, w1=_rnd(H, O)), RuntimeError, [r"\bsteps\b"]),
    "delay_zero": Case(lambda: _forward(delay=0), RuntimeError, [r"\bdelay\b", r"got 0"]),
    "truncate_negative": Case(lambda: _forward(truncate=-1), RuntimeError, [r"\btruncate\b", r"-1"]),
    "int64_dtype": Case(lambda: _forward(dtype=torch.int64), RuntimeError, [r"dtype", r"Long"]),
    "complex_dtype": Case(lambda: _forward(dtype=torch.complex128), RuntimeError, [r"dtype", r"ComplexDouble"]),
    "float16_dtype": Case(lambda: _forward(dtype=torch.float16), RuntimeError, [r"dtype", r"Half"]),
    "mixed_u_float32": Case(lambda: _forward(u=_rnd(T, B, DU, dtype=F32)), RuntimeError, [r"\bu\b", r"Float"]),
    "mixed_w2_float32": Case(lambda: _forward(w2=_rnd(O, H, dtype=F32)), RuntimeError, [r"\bw2\b", r"Float"]),
    "w1_on_meta": Case(lambda: _forward(w1=_rnd(H, DU + O).to("meta")), RuntimeError, [r"\bw1\b", r"\bmeta\b"]),
    "x0_on_meta": Case(lambda: _forward(x0=_rnd(1, B, O).to("meta")), RuntimeError,
                       [r"\bx0 is on meta\b", r"\bcpu\b", r"one device"]),
    "x0_sparse": Case(lambda: _forward(x0=_rnd(1, B, O).to_sparse()), RuntimeError,
                      [r"fbfast::rollout_forward", r"\bx0\b", r"Sparse", r"dense"]),
    "u_nested": Case(lambda: _forward(u=torch.nested.nested_tensor([_rnd(B, DU)] * T)), RuntimeError,
                     [r"fbfast::rollout_forward", r"\bu\b", r"nested"]),
    # layers as lists, and the activation (csrc/rollout_checks.h)
    "layers_do_not_chain": Case(lambda: _forward(layers=3, w3=_rnd(O, H + 1)), RuntimeError,
                                [r"layer sizes do not chain", r"\bw3\b", r"\[2, 6\]", r"6 input columns", r"\bw2\b",
                                 r"\[5, 5\]", r"5 outputs"]),
    "meta_layers_do_not_chain": Case(lambda: _on_meta(lambda: _forward(layers=3, w2=_rnd(H, H - 1))), RuntimeError,
                                     [r"layer sizes do not chain", r"\bw2\b", r"\[5, 4\]", r"\bw1\b"]),
    "w3_1d": Case(lambda: _forward(layers=3, w3=_rnd(O * H)), RuntimeError, [r"\bw3\b", r"2-D", r"\[10\]"]),
    "b3_wrong_length": Case(lambda: _forward(layers=3, b3=_rnd(O + 1)), RuntimeError, [r"\bb3\b", r"\(2,\)", r"\[3\]"]),
    "w3_float32": Case(lambda: _forward(layers=3, w3=_rnd(O, H, dtype=F32)), RuntimeError, [r"\bw3\b", r"Float"]),
    "biases_one_short": Case(lambda: _forward(b2=_MISSING), RuntimeError,
                             [r"\bbiases\b", r"weights has 2 layers", r"biases has 1 entries"]),
    "meta_biases_one_short": Case(lambda: _on_meta(lambda: _forward(layers=3, b3=_MISSING)), RuntimeError,
                                  [r"\bbiases\b", r"3 layers", r"2 entries"]),
    "no_layers": Case(lambda: lambda: torch.ops.fbfast.rollout_forward.default(_rnd(1, B, O), None, [], [], T, 1, 0,
                                                                                "relu", 0.0),
                      RuntimeError, [r"\bweights\b", r"at least one layer", r"got none"]),
    # the feedback structure (lags, feedback, residual; docs/spec.md §1.2)
    "lags_not_distinct": Case(lambda: _forward(delay=2, x0=_rnd(2, B, O), fb=dict(lags=[2, 1, 2])), RuntimeError,
                              [r"\blags\b", r"distinct", r"\[2, 1, 2\]"]),
    "meta_lags_not_distinct": Case(lambda: _on_meta(lambda: _forward(fb=dict(lags=[1, 1]))), RuntimeError,
                                   [r"\blags\b", r"distinct"]),
    "lags_zero": Case(lambda: _forward(delay=2, x0=_rnd(2, B, O), fb=dict(lags=[2, 0])), RuntimeError,
                      [r"\blags\b", r"\[2, 0\]"]),
    "lags_longest_is_not_delay": Case(lambda: _forward(delay=2, x0=_rnd(2, B, O), fb=dict(lags=[3, 1])),
                                      RuntimeError, [r"\bdelay\b", r"longest lag", r"\b3\b"]),
    "feedback_negative": Case(lambda: _forward(fb=dict(feedback=-1)), RuntimeError, [r"\bfeedback\b", r"-1"]),
    "feedback_above_O": Case(lambda: _forward(fb=dict(feedback=3)), RuntimeError,
                             [r"\bfeedback\b", r"O = 2", r"got 3"]),
    "meta_feedback_above_O": Case(lambda: _on_meta(lambda: _forward(fb=dict(feedback=3))), RuntimeError,
                                  [r"\bfeedback\b", r"got 3"]),
    "x0_width_not_F": Case(lambda: _forward(w1=_rnd(H, DU + 1), fb=dict(feedback=1)), RuntimeError,
                           [r"\bx0\b", r"2 features", r"F = 1"]),
    "w1_columns_vs_lags": Case(lambda: _forward(delay=2, x0=_rnd(2, B, O), fb=dict(lags=[1, 2], residual=True)),
                               RuntimeError, [r"\bw1\b", r"\b7\b", r"\[5, 5\]"]),
    "meta_w1_columns_vs_lags": Case(lambda: _on_meta(lambda: _forward(delay=2, x0=_rnd(2, B, O),
                                                                      fb=dict(lags=[2, 1]))),
                                    RuntimeError, [r"\bw1\b", r"\b7\b"]),
    "unknown_activation": Case(lambda: _forward(activation="swish"), RuntimeError,
                               [r"\bactivation\b", r"'relu'", r"'gelu_tanh'", r"'mish'", r"got 'swish'"]),
    "meta_unknown_activation": Case(lambda: _on_meta(lambda: _forward(activation="ReLU")), RuntimeError,
                                    [r"\bactivation\b", r"got 'ReLU'"]),
}

OP_BACKWARD_CASES: Dict[str, Case] = {
    "meta_grad_y_and_y_disagree": Case(
        lambda: _on_meta(lambda: _backward(grad_y=torch.ones(T + 1, B, O, dtype=F64))), RuntimeError,
        [r"\bgrad_y\b", r"\by\b"]),
    "meta_w1_columns": Case(lambda: _on_meta(lambda: _backward(w1=_rnd(H, DU + O + 1))), RuntimeError,
                            [r"\bw1\b"]),
    "y_0d": Case(lambda: _backward(y=torch.tensor(1.0, dtype=F64), grad_y=torch.tensor(1.0, dtype=F64)),
                 RuntimeError, [r"\by\b"]),
    "grad_y_wrong_features": Case(lambda: _backward(grad_y=torch.ones(T, B, O + 1, dtype=F64)), RuntimeError,
                                  [r"\bgrad_y\b", r"\[6, 4, 3\]"]),
    "grad_y_and_y_wrong_batch": Case(lambda: _backward(grad_y=torch.ones(T, B + 1, O, dtype=F64),
                                                       y=torch.ones(T, B + 1, O, dtype=F64)),
                                     RuntimeError, [r"\by\b", r"B=4"]),
    "y_longer_than_u": Case(lambda: _backward(grad_y=torch.ones(T + 1, B, O, dtype=F64),
                                              y=torch.ones(T + 1, B, O, dtype=F64)),
                            RuntimeError, [r"\bu\b", r"steps=7"]),
    "x0_wrong_delay_axis": Case(lambda: _backward(delay=2), RuntimeError, [r"\bx0\b", r"delay=2"]),
    "w1_columns": Case(lambda: _backward(w1=_rnd(H, 2)), RuntimeError, [r"\bw1\b", r"\[5, 2\]"]),
    "w2_1d": Case(lambda: _backward(w2=_rnd(O * H)), RuntimeError, [r"\bw2\b"]),
    "b1_wrong_length": Case(lambda: _backward(b1=_rnd(H + 1)), RuntimeError, [r"\bb1\b", r"\[6\]"]),
    "delay_zero": Case(lambda: _backward(delay=0), RuntimeError, [r"\bdelay\b"]),
    "truncate_negative": Case(lambda: _backward(truncate=-1), RuntimeError, [r"\btruncate\b"]),
    "int64_dtype": Case(lambda: _backward(**{k: v.long() for k, v in _op_inputs().items() if k != "b2"},
                                          grad_y=torch.ones(T, B, O, dtype=torch.int64),
                                          y=torch.ones(T, B, O, dtype=torch.int64)),
                        RuntimeError, [r"dtype", r"Long"]),
    "grad_y_float32": Case(lambda: _backward(grad_y=torch.ones(T, B, O, dtype=F32)), RuntimeError,
                           [r"\bgrad_y\b", r"Float"]),
    "output_mask_too_short": Case(lambda: _backward(mask=(True,) * 5), RuntimeError,
                                  [r"\boutput_mask\b", r"2 \+ 2 L = 6 entries", r"got 5"]),
    "output_mask_for_two_layers_of_three": Case(lambda: _backward(layers=3, mask=(True,) * 6), RuntimeError,
                                                [r"\boutput_mask\b", r"2 \+ 2 L = 8 entries", r"got 6"]),
    "meta_output_mask_too_long": Case(lambda: _on_meta(lambda: _backward(mask=(True,) * 7)), RuntimeError,
                                      [r"\boutput_mask\b", r"= 6 entries", r"got 7"]),
    "layers_do_not_chain": Case(lambda: _backward(layers=3, w2=_rnd(H + 1, H), b2=_rnd(H + 1)), RuntimeError,
                                [r"layer sizes do not chain", r"\bw3\b", r"\bw2\b", r"\[6, 5\]"]),
    "biases_one_short": Case(lambda: _backward(b1=_MISSING), RuntimeError, [r"\bbiases\b", r"1 entries"]),
    "unknown_activation": Case(lambda: _backward(activation="swish"), RuntimeError,
                               [r"\bactivation\b", r"'relu'", r"got 'swish'"]),
    "b3_on_meta": Case(lambda: _backward(layers=3, b3=_rnd(O).to("meta")), RuntimeError, [r"\bb3\b", r"\bmeta\b"]),
    "lags_not_distinct": Case(lambda: _backward(fb=dict(lags=[1, 1])), RuntimeError, [r"\blags\b", r"distinct"]),
    "feedback_above_O": Case(lambda: _backward(fb=dict(feedback=3)), RuntimeError, [r"\bfeedback\b", r"got 3"]),
    "meta_w1_columns_vs_lags": Case(lambda: _on_meta(lambda: _backward(delay=2, x0=_rnd(2, B, O),
                                                                       fb=dict(lags=[1, 2]))),
                                    RuntimeError, [r"\bw1\b", r"\b7\b"]),
    "grad_y_on_meta": Case(lambda: _backward(grad_y=torch.ones(T, B, O, dtype=F64, device="meta")), RuntimeError,
                           [r"\bgrad_y\b", r"\bmeta\b"]),
}

COLUMNS: Dict[str, Dict[str, Case]] = {
    "eager": API_CASES,
    "cpp": API_CASES,
    "compile": API_CASES,
    "auto": API_CASES,
    "backend-arg": BACKEND_CASES,
    "op-forward": OP_FORWARD_CASES,
    "op-backward": OP_BACKWARD_CASES,
}
API_COLUMNS = ("eager", "cpp", "compile", "auto")
OP_COLUMNS = ("op-forward", "op-backward")


def run_case(column: str, case_id: str):
    """Run one case of one column; returns what the call returned (a bad case raises)."""
    if column == "selftest":  # the harness's own check that a crash is caught and attributed
        if case_id == "abort":
            os.abort()
        if case_id == "segfault":
            import ctypes
            ctypes.string_at(0)
        return None
    case = COLUMNS[column][case_id]
    if column in OP_COLUMNS:
        return case.make()()
    kw = case.make()
    backend = kw.pop("backend", column)
    env = kw.pop("env", None)
    with _env(*env) if env else contextlib.nullcontext():
        return call(kw, backend)


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        return f"Tensor{tuple(value.shape)} {value.dtype} on {value.device}"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(_describe(v) for v in value) + ")"
    return repr(value)


def main() -> None:
    import faulthandler
    faulthandler.enable()  # a crash prints the Python stack of the case to stderr
    tasks = json.load(sys.stdin)
    for task in tasks:
        column, case_id = task.split("/", 1)
        record = {"task": task}
        try:
            record.update(status="returned", value=_describe(run_case(column, case_id)))
        except BaseException as exc:  # noqa: BLE001 - every exception is the answer
            record.update(status="raised", type=type(exc).__name__,
                          mro=[c.__name__ for c in type(exc).__mro__], message=str(exc),
                          where=traceback.format_exc(limit=-3))
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
