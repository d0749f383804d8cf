// The one always-built translation unit: the operator schemas of the `fbfast` namespace and
// the Python module init. Backends add kernels with TORCH_LIBRARY_IMPL(fbfast, CPU|CUDA, m)
// in their own folders (csrc/cpu/, csrc/cuda/), so a CPU-only build needs no #ifdef here.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import fbfast._C` loads this library, which runs the static registrations below. The module
// itself is empty: the operators are reached through torch.ops.fbfast.*.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(fbfast, m) {
  // x0: (delay, B, O); u: (T, B, Du) or None; w1: (H, Du + O); w2: (O, H). truncate = 0 means
  // full BPTT (the forward ignores it; it is in the schema so the autograd context has it).
  // steps is a SymInt so that torch.compile and torch.export trace one graph for every T (the
  // meta kernels in csrc/meta.cpp give Y a symbolic leading axis); the CPU and CUDA kernels
  // receive a plain integer.
  m.def(
      "rollout_forward(Tensor x0, Tensor? u, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, "
      "SymInt steps, int delay, int truncate) -> Tensor");
  // Gradients of rollout_forward given dL/dY. Only the forward's inputs and its output y are
  // needed: z_t is recomputed. output_mask = (x0, u, w1, b1, w2, b2); a gradient that is not
  // asked for comes back as an empty tensor of shape (0,).
  m.def(
      "rollout_backward(Tensor grad_y, Tensor y, Tensor x0, Tensor? u, Tensor w1, Tensor? b1, "
      "Tensor w2, int delay, int truncate, bool[6] output_mask) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // The same rollout keeping every step's hidden activations relu(z_t), (T, B, H), for a
  // backward that does not recompute them: what autograd uses on the CPU for wide layers, where
  // the recomputation costs a GEMM per step (csrc/cpu/path_rule.h). CPU and meta kernels only.
  m.def(
      "rollout_forward_hidden(Tensor x0, Tensor? u, Tensor w1, Tensor? b1, Tensor w2, Tensor? b2, "
      "SymInt steps, int delay) -> (Tensor, Tensor)");
  m.def(
      "rollout_backward_hidden(Tensor grad_y, Tensor y, Tensor hidden, Tensor x0, Tensor? u, Tensor w1, "
      "Tensor? b1, Tensor w2, int delay, int truncate, bool[6] output_mask) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
}
