// The operators' argument checks shared by every backend (csrc/cpu/, csrc/cuda/): shapes, and one
// dtype and one device for all tensors. Each backend then checks the dtypes it supports. The
// Python API validates before any operator runs (fbfast/_validation.py); these checks guard direct
// calls of torch.ops.fbfast.* and must turn every misuse into a RuntimeError, never a crash.
// Light headers only: this is included by host code compiled with nvcc's host compiler too.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <optional>
#include <utility>

namespace fbfast {

inline void check_rollout_args(const at::Tensor& x0, const std::optional<at::Tensor>& u,
                               const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                               const at::Tensor& w2, const std::optional<at::Tensor>& b2,
                               int64_t steps, int64_t delay, int64_t truncate) {
  TORCH_CHECK(delay >= 1, "fbfast::rollout: delay must be >= 1, got ", delay);
  TORCH_CHECK(truncate >= 0, "fbfast::rollout: truncate must be >= 0 (0 = full BPTT), got ", truncate);
  TORCH_CHECK(steps >= 0, "fbfast::rollout: steps must be >= 0, got ", steps);
  TORCH_CHECK(x0.dim() == 3 && x0.size(0) == delay, "fbfast::rollout: x0 must be (delay=", delay,
              ", B, O), got ", x0.sizes());
  TORCH_CHECK(w2.dim() == 2, "fbfast::rollout: w2 must be (O, H), got ", w2.sizes());
  const int64_t O = w2.size(0), H = w2.size(1), B = x0.size(1);
  TORCH_CHECK(x0.size(2) == O, "fbfast::rollout: x0 has ", x0.size(2), " features, w2 outputs O = ", O);
  // The rank of u is checked before its last axis is read.
  if (u.has_value())
    TORCH_CHECK(u->dim() == 3 && u->size(0) == steps && u->size(1) == B,
                "fbfast::rollout: u must be (steps=", steps, ", B=", B, ", Du), got ", u->sizes());
  const int64_t du = u.has_value() ? u->size(2) : 0;
  TORCH_CHECK(w1.dim() == 2 && w1.size(0) == H && w1.size(1) == du + O,
              "fbfast::rollout: w1 must be (H, Du + O) = (", H, ", ", du + O, "), got ", w1.sizes());
  TORCH_CHECK(!b1.has_value() || (b1->dim() == 1 && b1->size(0) == H),
              "fbfast::rollout: b1 must be (", H, ",), got ", b1.has_value() ? b1->sizes() : at::IntArrayRef());
  TORCH_CHECK(!b2.has_value() || (b2->dim() == 1 && b2->size(0) == O),
              "fbfast::rollout: b2 must be (", O, ",), got ", b2.has_value() ? b2->sizes() : at::IntArrayRef());
  const auto dtype = x0.scalar_type();
  const auto device = x0.device();
  const std::pair<const char*, const at::Tensor*> named[] = {
      {"w1", &w1}, {"w2", &w2}, {"u", u ? &*u : nullptr}, {"b1", b1 ? &*b1 : nullptr}, {"b2", b2 ? &*b2 : nullptr}};
  for (const auto& [name, t] : named) {
    if (!t) continue;
    TORCH_CHECK(t->scalar_type() == dtype, "fbfast::rollout: ", name, " has dtype ", t->scalar_type(),
                " but x0 has ", dtype, "; all tensors must share one dtype");
    TORCH_CHECK(t->device() == device, "fbfast::rollout: ", name, " is on ", t->device(), " but x0 is on ",
                device, "; all tensors must be on one device");
  }
}

}  // namespace fbfast
