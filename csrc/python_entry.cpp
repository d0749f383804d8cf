// fbfast._C.rollout: the entry `fbfast.rollout` takes for plain CPU tensors, straight from the
// Python call into the operator's typed (unboxed) dispatcher handle.
//
// Why it exists: at small shapes the per-call cost of a rollout is not arithmetic. Through
// `torch.ops.fbfast.rollout_forward` every call converts its twelve arguments to IValues by the
// schema, boxes them and unboxes them again (several microseconds), and `fbfast.rollout` first
// ran its Python validation (fbfast/_validation.py), which the operator repeats in C++
// (csrc/rollout_checks.h). Here the arguments are read from the Python objects directly and the
// operator checks them once.
//
// The contract with fbfast/functional.py: this returns the rollout's Y, or None whenever it
// does not serve the call exactly as the general path would; then the general path runs and
// says what is wrong in the API's own words (docs/spec.md §4). None is returned
//  * for anything but plain dense CPU float32/float64 tensors: a __torch_function__ override
//    (subclass or mode), a functorch wrapper (vmap, grad), a tensor subclass with a Python
//    dispatch key, other devices or dtypes ("auto" may pick another backend for them);
//  * for argument types the general path rejects (a bool as an int, a float steps, ...), and
//    for values it rejects that the operator would accept (truncate 0, feedback 0);
//  * when the operator raises: its checks found a bad argument, or the kernel failed. The
//    general path then validates in Python (raising the API's message) and, if that passes,
//    calls the operator again, which raises its own error again.
// The dispatcher still runs every key the tensors carry (autograd, inference mode), exactly as
// for a torch.ops call.
#include <Python.h>

#include <ATen/ATen.h>
#include <c10/core/DispatchKeySet.h>
#include <ATen/PythonTorchFunctionTLS.h>
#include <torch/csrc/autograd/python_variable.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

#include "op_calls.h"
#include "python_entry.h"
#include "rollout_checks.h"

namespace fbfast {
namespace {

// Keys that mark a tensor whose operator calls Python-level code handles (fbfast/functional.py's
// general path and torch.ops): functorch's wrappers, __torch_dispatch__ subclasses, lazy
// conjugate/negative views, functionalization.
const c10::DispatchKeySet kNotPlain({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot,
                                     c10::DispatchKey::FuncTorchBatched, c10::DispatchKey::FuncTorchGradWrapper,
                                     c10::DispatchKey::Functionalize, c10::DispatchKey::Conjugate,
                                     c10::DispatchKey::Negative, c10::DispatchKey::ZeroTensor});

// The tensor of `obj` when it is a plain dense CPU tensor of x0's dtype (any dtype when
// `dtype` is nullopt, then float32/float64 only); nullptr otherwise. Plain: a torch.Tensor or
// nn.Parameter itself, never a subclass, which may override __torch_function__ (the caller
// checks that no torch-function mode is active).
const at::Tensor* plain_tensor(PyObject* obj, std::optional<at::ScalarType> dtype) {
  if (!THPVariable_CheckExact(obj)) return nullptr;
  const at::Tensor& t = THPVariable_Unpack(obj);
  if (!t.defined() || t.key_set().has_any(kNotPlain) || !t.device().is_cpu() || t.layout() != at::kStrided ||
      t.is_nested())
    return nullptr;
  const at::ScalarType s = t.scalar_type();
  if (dtype ? s != *dtype : (s != at::kFloat && s != at::kDouble)) return nullptr;
  return &t;
}

// An exact Python int (not a bool, not an int subclass) that fits an int64.
std::optional<int64_t> exact_int(PyObject* obj) {
  if (!PyLong_CheckExact(obj)) return std::nullopt;
  int overflow = 0;
  const long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
  if (overflow || (v == -1 && PyErr_Occurred())) {
    PyErr_Clear();
    return std::nullopt;
  }
  return static_cast<int64_t>(v);
}

}  // namespace

// rollout(x0, u, params, steps, delay, truncate, activation, activation_param, feedback, residual)
// with the arguments of fbfast.rollout (params: the tuple (w1, b1, ..., wL, bL); activation
// the resolved name and its parameter), or None (see the top of this file).
PyObject* python_rollout(PyObject* /*self*/, PyObject* const* args, Py_ssize_t nargs) {
  if (nargs != 10) {
    PyErr_SetString(PyExc_TypeError, "fbfast._C.rollout takes 10 positional arguments");
    return nullptr;
  }
  PyObject *x0_obj = args[0], *u_obj = args[1], *params = args[2], *steps_obj = args[3], *delay_obj = args[4],
           *truncate_obj = args[5], *act_obj = args[6], *param_obj = args[7], *feedback_obj = args[8],
           *residual_obj = args[9];

  if (at::impl::torch_function_mode_enabled()) Py_RETURN_NONE;  // a mode sees every call through torch.ops
  const at::Tensor* x0 = plain_tensor(x0_obj, std::nullopt);
  if (x0 == nullptr || !PyTuple_CheckExact(params) || !PyUnicode_CheckExact(act_obj) || !PyFloat_CheckExact(param_obj))
    Py_RETURN_NONE;
  const at::ScalarType dtype = x0->scalar_type();

  // (w1, b1, ..., wL, bL): an even number, weights tensors, biases tensors or None.
  const Py_ssize_t n = PyTuple_GET_SIZE(params);
  if (n == 0 || n % 2) Py_RETURN_NONE;
  std::vector<at::Tensor> weights;
  BiasList biases;
  weights.reserve(n / 2);
  biases.reserve(n / 2);
  for (Py_ssize_t i = 0; i < n; i += 2) {
    const at::Tensor* w = plain_tensor(PyTuple_GET_ITEM(params, i), dtype);
    if (w == nullptr) Py_RETURN_NONE;
    weights.push_back(*w);
    PyObject* b_obj = PyTuple_GET_ITEM(params, i + 1);
    if (b_obj == Py_None) {
      biases.push_back(std::nullopt);
      continue;
    }
    const at::Tensor* b = plain_tensor(b_obj, dtype);
    if (b == nullptr) Py_RETURN_NONE;
    biases.push_back(*b);
  }

  std::optional<at::Tensor> u;
  if (u_obj != Py_None) {
    const at::Tensor* ut = plain_tensor(u_obj, dtype);
    if (ut == nullptr || ut->dim() == 0) Py_RETURN_NONE;
    u = *ut;
  }

  // steps: an int >= 0, or inferred from u (the general path's message when neither is given).
  int64_t steps;
  if (steps_obj == Py_None) {
    if (!u) Py_RETURN_NONE;
    steps = u->size(0);
  } else {
    const std::optional<int64_t> s = exact_int(steps_obj);
    if (!s || *s < 0) Py_RETURN_NONE;
    steps = *s;
  }

  // delay: one lag k >= 1 (version 1's form: lags empty), or a tuple/list of distinct lags.
  int64_t delay;
  std::vector<int64_t> lags;
  if (const std::optional<int64_t> k = exact_int(delay_obj)) {
    if (*k < 1) Py_RETURN_NONE;
    delay = *k;
  } else if (PyTuple_CheckExact(delay_obj) || PyList_CheckExact(delay_obj)) {
    const Py_ssize_t m = PySequence_Fast_GET_SIZE(delay_obj);
    if (m == 0) Py_RETURN_NONE;
    for (Py_ssize_t j = 0; j < m; ++j) {
      const std::optional<int64_t> d = exact_int(PySequence_Fast_GET_ITEM(delay_obj, j));
      if (!d || *d < 1 || std::find(lags.begin(), lags.end(), *d) != lags.end()) Py_RETURN_NONE;
      lags.push_back(*d);
    }
    delay = *std::max_element(lags.begin(), lags.end());
  } else {
    Py_RETURN_NONE;
  }

  int64_t truncate = 0;  // the operator's "full BPTT"
  if (truncate_obj != Py_None) {
    const std::optional<int64_t> K = exact_int(truncate_obj);
    if (!K || *K < 1) Py_RETURN_NONE;
    truncate = *K;
  }
  int64_t feedback = 0;  // the operator's "every output"
  if (feedback_obj != Py_None) {
    const std::optional<int64_t> F = exact_int(feedback_obj);
    if (!F || *F < 1) Py_RETURN_NONE;
    feedback = *F;
  }
  if (residual_obj != Py_True && residual_obj != Py_False) Py_RETURN_NONE;
  const bool residual = residual_obj == Py_True;

  Py_ssize_t act_len = 0;
  const char* act_name = PyUnicode_AsUTF8AndSize(act_obj, &act_len);
  if (act_name == nullptr) {
    PyErr_Clear();
    Py_RETURN_NONE;
  }
  const double param = PyFloat_AS_DOUBLE(param_obj);

  // x0 (B, F) is the (1, B, F) of a single in-step lag, as the general path reads it.
  at::Tensor x0_3d = x0->dim() == 2 && delay == 1 ? x0->unsqueeze(0) : *x0;

  at::Tensor y;
  bool failed = false;
  Py_BEGIN_ALLOW_THREADS
  try {
    y = call_forward(x0_3d, u, weights, biases, c10::SymInt(steps), delay, truncate,
                     c10::string_view(act_name, act_len), param, lags, feedback, residual);
  } catch (const std::exception&) {
    failed = true;  // the general path says what is wrong (see the top of this file)
  }
  Py_END_ALLOW_THREADS
  if (failed) Py_RETURN_NONE;
  return THPVariable_Wrap(std::move(y));
}

}  // namespace fbfast
