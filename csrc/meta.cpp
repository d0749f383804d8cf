// Shape-only (meta) kernels of the operators: what torch.compile, torch.export and
// torch.library.opcheck trace with. They run the very checks of the real kernels
// (rollout_checks.h), on symbolic sizes, so a call that the CPU or CUDA kernel would refuse is
// refused while tracing too, with the same message.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "rollout_checks.h"

namespace fbfast {
namespace {

constexpr const char* kForwardOp = "fbfast::rollout_forward";
constexpr const char* kBackwardOp = "fbfast::rollout_backward";
using GradTuple = std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>;

at::Tensor rollout_forward_meta(const at::Tensor& x0, const std::optional<at::Tensor>& u, at::TensorList weights,
                                const BiasList& biases, c10::SymInt steps, int64_t delay, int64_t truncate,
                                c10::string_view activation, double /*param*/, at::IntArrayRef lags,
                                int64_t feedback, bool residual) {
  const RolloutSizes s = check_rollout_args(kForwardOp, x0, u, weights, biases, steps, delay, truncate, activation,
                                            {lags, feedback, residual});
  check_result_fits(kForwardOp, s, x0.element_size(), 0);
  if (s.ensemble()) return at::empty_symint({s.steps, s.members, s.batch, s.o}, x0.options());
  return at::empty_symint({s.steps, s.batch, s.o}, x0.options());
}

// The backward's gradients for the output mask, shaped like what they differentiate.
GradTuple backward_outputs(const at::Tensor& x0, const std::optional<at::Tensor>& u, at::TensorList weights,
                           const BiasList& biases, const c10::List<bool>& mask) {
  const auto opts = x0.options();
  auto like = [&](bool want, const at::Tensor* t) {
    return want && t ? at::empty_symint(t->sym_sizes(), opts) : at::empty({0}, opts);
  };
  const size_t L = weights.size();
  std::vector<at::Tensor> w, b;
  for (size_t l = 0; l < L; ++l) {
    w.push_back(like(mask[2 + l], &weights[l]));
    const std::optional<at::Tensor> bl = biases.get(l);
    b.push_back(like(mask[2 + L + l], bl ? &*bl : nullptr));
  }
  return {like(mask[0], &x0), like(mask[1], u ? &*u : nullptr), w, b};
}

GradTuple rollout_backward_meta(const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& x0,
                                const std::optional<at::Tensor>& u, at::TensorList weights, const BiasList& biases,
                                int64_t delay, int64_t truncate, c10::string_view activation, double /*param*/,
                                const c10::List<bool>& mask, at::IntArrayRef lags, int64_t feedback, bool residual) {
  check_backward_args(kBackwardOp, grad_y, y, x0, u, weights, biases, delay, truncate, activation, mask,
                      {lags, feedback, residual});
  return backward_outputs(x0, u, weights, biases, mask);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> rollout_forward_hidden_meta(
    const at::Tensor& x0, const std::optional<at::Tensor>& u, at::TensorList weights, const BiasList& biases,
    c10::SymInt steps, int64_t delay, c10::string_view activation, double /*param*/, at::IntArrayRef lags,
    int64_t feedback, bool residual) {
  const char* op = "fbfast::rollout_forward_hidden";
  const RolloutSizes s =
      check_rollout_args(op, x0, u, weights, biases, steps, delay, 0, activation, {lags, feedback, residual});
  check_result_fits(op, s, x0.element_size(), 0);
  // (T, [E,] B, width) for the hidden layers and Y.
  auto shaped = [&](const c10::SymInt& width) {
    return s.ensemble() ? at::empty_symint({s.steps, s.members, s.batch, width}, x0.options())
                        : at::empty_symint({s.steps, s.batch, width}, x0.options());
  };
  std::vector<at::Tensor> hidden;
  for (int64_t l = 0; l + 1 < s.layers(); ++l)
    hidden.push_back(keeps_layer(l, s.layers(), weights[0].sym_size(-1)) ? shaped(s.widths[l])
                                                                          : at::empty({0}, x0.options()));
  return {shaped(s.o), hidden};
}

GradTuple rollout_backward_hidden_meta(const at::Tensor& grad_y, const at::Tensor& y, at::TensorList hidden,
                                       const at::Tensor& x0, const std::optional<at::Tensor>& u,
                                       at::TensorList weights, const BiasList& biases, int64_t delay,
                                       int64_t truncate, c10::string_view activation, double /*param*/,
                                       const c10::List<bool>& mask, at::IntArrayRef lags, int64_t feedback,
                                       bool residual) {
  const char* op = "fbfast::rollout_backward_hidden";
  const RolloutSizes s = check_backward_args(op, grad_y, y, x0, u, weights, biases, delay, truncate, activation, mask,
                                             {lags, feedback, residual});
  check_hidden(op, hidden, s, x0, weights[0].sym_size(-1));
  return backward_outputs(x0, u, weights, biases, mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(fbfast, Meta, m) {
  m.impl("rollout_forward", &rollout_forward_meta);
  m.impl("rollout_backward", &rollout_backward_meta);
  m.impl("rollout_forward_hidden", &rollout_forward_hidden_meta);
  m.impl("rollout_backward_hidden", &rollout_backward_hidden_meta);
}

}  // namespace fbfast
