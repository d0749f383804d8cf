// The general path of the CUDA rollout: per-step GEMMs through ATen (cuBLAS) on the current
// stream, for widths whose weights do not fit in one block's shared memory (see plan_rollout in
// rollout_params.h). Written with device-agnostic ATen ops only, it is correct for any size.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace fbfast {
namespace cuda {

// Gradients of the backward, each undefined when it is not wanted. x0 must arrive zero-filled
// (slots t >= steps get no gradient); the others are fully written.
struct Gradients {
  at::Tensor x0, u, w1, b1, w2, b2;
};

// All tensors contiguous and on one device; u, b1, b2 undefined when absent. x0 (delay, B, O),
// u (T, B, Du), w1 (H, Du + O), w2 (O, H); y (T, B, O) is written.
void forward_general(const at::Tensor& x0, const at::Tensor& u, const at::Tensor& w1,
                     const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                     int64_t delay, at::Tensor& y);

// truncate == 0: full BPTT.
void backward_general(const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& x0,
                      const at::Tensor& u, const at::Tensor& w1, const at::Tensor& b1,
                      const at::Tensor& w2, int64_t delay, int64_t truncate, Gradients& out);

}  // namespace cuda
}  // namespace fbfast
