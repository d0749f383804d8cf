// Shape-only (meta) kernels of both operators: what torch.compile, torch.export and
// torch.library.opcheck trace with. They run the very checks of the real kernels
// (rollout_checks.h), on symbolic sizes, so a call that the CPU or CUDA kernel would refuse is
// refused while tracing too, with the same message.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <array>
#include <optional>
#include <tuple>

#include "rollout_checks.h"

namespace fbfast {
namespace {

constexpr const char* kForwardOp = "fbfast::rollout_forward";
constexpr const char* kBackwardOp = "fbfast::rollout_backward";

at::Tensor rollout_forward_meta(const at::Tensor& x0, const std::optional<at::Tensor>& u, const at::Tensor& w1,
                                const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                                const std::optional<at::Tensor>& b2, c10::SymInt steps, int64_t delay,
                                int64_t truncate) {
  const RolloutSizes s = check_rollout_args(kForwardOp, x0, u, w1, b1, w2, b2, steps, delay, truncate);
  check_result_fits(kForwardOp, s, x0.element_size(), 0);
  return at::empty_symint({s.steps, s.batch, s.o}, x0.options());
}

// The backward's gradients for the output mask, shaped like what they differentiate.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_outputs(
    const RolloutSizes& s, const at::Tensor& x0, const std::optional<at::Tensor>& u, const at::Tensor& w1,
    const std::optional<at::Tensor>& b1, const at::Tensor& w2, std::array<bool, 6> output_mask) {
  const auto opts = x0.options();
  auto like = [&](bool want, const at::Tensor* t) {
    return want && t ? at::empty_symint(t->sym_sizes(), opts) : at::empty({0}, opts);
  };
  return {like(output_mask[0], &x0),
          like(output_mask[1], u ? &*u : nullptr),
          like(output_mask[2], &w1),
          like(output_mask[3], b1 ? &*b1 : nullptr),
          like(output_mask[4], &w2),
          output_mask[5] ? at::empty_symint({s.o}, opts) : at::empty({0}, opts)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
rollout_backward_meta(const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& x0,
                      const std::optional<at::Tensor>& u, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                      const at::Tensor& w2, int64_t delay, int64_t truncate, std::array<bool, 6> output_mask) {
  return backward_outputs(check_backward_args(kBackwardOp, grad_y, y, x0, u, w1, b1, w2, delay, truncate), x0, u,
                          w1, b1, w2, output_mask);
}

std::tuple<at::Tensor, at::Tensor> rollout_forward_hidden_meta(
    const at::Tensor& x0, const std::optional<at::Tensor>& u, const at::Tensor& w1,
    const std::optional<at::Tensor>& b1, const at::Tensor& w2, const std::optional<at::Tensor>& b2,
    c10::SymInt steps, int64_t delay) {
  const char* op = "fbfast::rollout_forward_hidden";
  const RolloutSizes s = check_rollout_args(op, x0, u, w1, b1, w2, b2, steps, delay, 0);
  check_result_fits(op, s, x0.element_size(), 0);
  return {at::empty_symint({s.steps, s.batch, s.o}, x0.options()),
          at::empty_symint({s.steps, s.batch, s.h}, x0.options())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
rollout_backward_hidden_meta(const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& hidden,
                             const at::Tensor& x0, const std::optional<at::Tensor>& u, const at::Tensor& w1,
                             const std::optional<at::Tensor>& b1, const at::Tensor& w2, int64_t delay,
                             int64_t truncate, std::array<bool, 6> output_mask) {
  const char* op = "fbfast::rollout_backward_hidden";
  const RolloutSizes s = check_backward_args(op, grad_y, y, x0, u, w1, b1, w2, delay, truncate);
  check_hidden(op, hidden, s, x0);
  return backward_outputs(s, x0, u, w1, b1, w2, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(fbfast, Meta, m) {
  m.impl("rollout_forward", &rollout_forward_meta);
  m.impl("rollout_backward", &rollout_backward_meta);
  m.impl("rollout_forward_hidden", &rollout_forward_hidden_meta);
  m.impl("rollout_backward_hidden", &rollout_backward_hidden_meta);
}

}  // namespace fbfast
