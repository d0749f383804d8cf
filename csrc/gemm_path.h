// The per-step ATen path of the rollout: the same recurrence as the fused kernels, written once
// with device-agnostic ATen ops (GEMMs through MKL/OpenBLAS on the CPU, cuBLAS on CUDA) for
// any depth, width and activation. The CPU kernel takes it for wide layers (its "BLAS path",
// csrc/cpu/rollout_cpu.cpp) and the CUDA kernel for widths whose weights do not fit in a
// block's shared memory (its "general path", csrc/cuda/rollout_cuda.cpp).
//
// Forward: the time loop runs on the host and every layer of every step is one full-batch
// GEMM with its bias, followed by the activation. Backward: the hidden layers of a chunk of
// steps are recomputed in one GEMM per layer (the inputs of every step are known from Y), the
// adjoint is walked step by step through the layers (the only serial part), and the weight
// gradients and du are formed as GEMMs over chunk_steps x B rows. In float16/bfloat16 the
// weight gradients accumulate across chunks in fp32 and are rounded once at the end.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <vector>

#include "common/activation.h"

namespace fbfast::gemm_path {

// The layers, contiguous, on one device: w[l] (out_l, in_l), b[l] (out_l) or undefined.
struct Network {
  std::vector<at::Tensor> w, b;
  Act act = Act::kRelu;
  double param = 0.0;
  int64_t du = 0;  // columns [0, du) of w[0] read u_t, the rest the fed-back x_t
  // The feedback (docs/spec.md §1.2): step t reads the first f outputs of the steps
  // t - lags[j] (x0 before step 0), in this order, as w[0]'s columns du + j f .. du + (j+1) f;
  // residual adds the first lag's value to the first f outputs.
  std::vector<int64_t> lags{1};
  int64_t f = 0;
  bool residual = false;
  std::vector<int64_t> x0_base{0};  // where each lag's rows of x0 start in the copy (X0Rows)

  int64_t layers() const { return static_cast<int64_t>(w.size()); }
  bool plain_feedback() const { return lags.size() == 1 && !residual && f == w.back().size(0); }
};

// The backward's outputs. Each is undefined when it is not wanted; the caller allocates the
// wanted ones zero-filled, in the inputs' dtype and full shape (x0's slots t >= steps, and
// steps t < delay that never run, then come out right without special cases).
struct Grads {
  at::Tensor x0, u;
  std::vector<at::Tensor> w, b;  // one per layer
};

// x0: X0Rows::rows of the D values before step 0 (net.x0_base says where each lag's are), u
// (T, B, Du) or undefined, contiguous; y (T, B, O) written.
// kept: null, or filled with one (T, B, out_l) tensor per hidden layer l < L - 1, for a backward
// that then need not recompute them: z where the activation's derivative reads it (act_needs_z,
// csrc/common/act_kind.h), act(z) otherwise (ReLU, tanh, sigmoid); an empty (0,) tensor for a
// layer the backward recomputes (keeps_layer, csrc/rollout_checks.h).
// `op` names the operator in allocation failures.
void forward(const char* op, const at::Tensor& x0, const at::Tensor& u, const Network& net, at::Tensor& y,
             std::vector<at::Tensor>* kept);

// The rows of x0 (D, B, F) that a rollout of `steps` steps reads, copied contiguous: lag j reads
// rows D - d_j .. D - d_j + min(d_j, steps) - 1 (at steps 0 .. min(d_j, steps) - 1), stored from
// base[j] on, so that step t < d_j finds lag j's value at row base[j] + t. One lag copies
// x0[:min(D, steps)] as before; several keep a range each (at most m min(D, steps) rows), never
// all D rows of a long delay that is read in a few places.
struct X0Rows {
  at::Tensor rows;
  std::vector<int64_t> base;
};
X0Rows read_x0(const at::Tensor& x0, const std::vector<int64_t>& lags, int64_t steps);

// truncate == 0: full BPTT. kept: empty to recompute, else what forward(..., kept) filled.
// chunk_bytes caps the chunk buffers (they also stay below half of what a per-step loop keeps).
void backward(const char* op, const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& x0,
              const at::Tensor& u, const Network& net, int64_t delay, int64_t truncate, Grads& out,
              at::TensorList kept, int64_t chunk_bytes);

}  // namespace fbfast::gemm_path
