// The one always-built translation unit: the operator schemas of the `fbfast` namespace and
// the Python module init. Backends add kernels with TORCH_LIBRARY_IMPL(fbfast, CPU|CUDA, m)
// in their own folders (csrc/cpu/, csrc/cuda/), so a CPU-only build needs no #ifdef here.
#include <Python.h>
#include <torch/library.h>

#include "python_entry.h"

extern "C" {
// `import fbfast._C` loads this library, which runs the static registrations below. The
// operators are reached through torch.ops.fbfast.*; the module itself holds one function,
// the direct entry of fbfast.rollout for plain CPU tensors (csrc/python_entry.cpp).
PyObject* PyInit__C(void) {
  static PyMethodDef methods[] = {
      {"rollout", reinterpret_cast<PyCFunction>(reinterpret_cast<void (*)(void)>(&fbfast::python_rollout)),
       METH_FASTCALL, "fbfast.rollout's direct entry for plain CPU tensors; None where it does not serve the call"},
      {nullptr, nullptr, 0, nullptr}};
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, methods};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fbfast, m) {
  // The network of docs/spec.md §1.1 as data: weights[l] is (out_l, in_l) in nn.Linear layout,
  // biases[l] is (out_l,) or None, for L >= 1 layers; in_0 = Du + O (columns [0, Du) read u_t,
  // the rest the fed-back x_t) and out_{L-1} = O. `activation` is one of the names of
  // csrc/common/act_kind.h and `activation_param` its parameter (leaky_relu's negative slope,
  // elu's alpha; ignored by the others). The feedback (docs/spec.md §1.2): step t reads the
  // fed-back values of the steps t - lags[j], in the order given ([] means the single lag
  // `delay`), `delay` is D = max(lags), `feedback` = F outputs are fed back (0 means all O), and
  // `residual` adds the first lag's fed-back value to the first F outputs. x0: (D, B, F) holds
  // the D values before step 0, oldest first; u: (T, B, Du) or None; w1 has Du + len(lags) F
  // columns. truncate = 0
  // means full BPTT (the forward ignores it; it is in the schema so the autograd context has
  // it). steps is a SymInt so that torch.compile and torch.export trace one graph for every T
  // (the meta kernels in csrc/meta.cpp give Y a symbolic leading axis); the CPU and CUDA
  // kernels receive a plain integer.
  m.def(
      "rollout_forward(Tensor x0, Tensor? u, Tensor[] weights, Tensor?[] biases, SymInt steps, int delay, "
      "int truncate, str activation, float activation_param, int[] lags=[], int feedback=0, bool residual=False) "
      "-> Tensor");
  // Gradients of rollout_forward given dL/dY. Only the forward's inputs and its output y are
  // needed: every layer's pre-activation is recomputed. output_mask = (x0, u, w_1 .. w_L,
  // b_1 .. b_L); a gradient that is not asked for comes back as an empty tensor of shape (0,).
  m.def(
      "rollout_backward(Tensor grad_y, Tensor y, Tensor x0, Tensor? u, Tensor[] weights, Tensor?[] biases, "
      "int delay, int truncate, str activation, float activation_param, bool[] output_mask, int[] lags=[], "
      "int feedback=0, bool residual=False) -> (Tensor, Tensor, Tensor[], Tensor[])");
  // The same rollout keeping, for every hidden layer l < L - 1, what its backward reads: the
  // activations act(z_t) of every step, (T, B, out_l), or the pre-activations z_t for the
  // activations whose derivative needs them (act_needs_z in csrc/common/act_kind.h). What
  // autograd uses on the CPU for wide layers, where recomputing them costs GEMMs per step
  // (csrc/cpu/path_rule.h). CPU and meta kernels only.
  m.def(
      "rollout_forward_hidden(Tensor x0, Tensor? u, Tensor[] weights, Tensor?[] biases, SymInt steps, "
      "int delay, str activation, float activation_param, int[] lags=[], int feedback=0, bool residual=False) -> "
      "(Tensor, Tensor[])");
  m.def(
      "rollout_backward_hidden(Tensor grad_y, Tensor y, Tensor[] hidden, Tensor x0, Tensor? u, Tensor[] weights, "
      "Tensor?[] biases, int delay, int truncate, str activation, float activation_param, bool[] output_mask, "
      "int[] lags=[], int feedback=0, bool residual=False) -> (Tensor, Tensor, Tensor[], Tensor[])");
}
