// What csrc/autograd.cpp needs to know of the CPU kernel's choice of path: whether a training
// rollout of these widths should keep its hidden activations for the backward
// (fbfast::rollout_forward_hidden). True where the CPU kernel's backward takes its BLAS path
// (wide layers, short or narrow-batch rollouts of medium ones, or cpu_path='blas' pinned), and
// on the tile path for layers wider than 128 x 128: there recomputing the activations is a full
// GEMM per step (a quarter of a training step's multiply-adds), while the kept layers take at
// most what a per-step loop keeps (z alone where act' reads z, where the loop keeps z and act(z)).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

namespace fbfast::cpu {

// For a call whose arguments the operator has checked: x0 (D, [E,] B, F), u or none, the
// weights, steps and the activation's name. May time both paths once for the call's shape class
// (the calibration in csrc/cpu/rollout_cpu.cpp).
bool saves_hidden(const at::Tensor& x0, const std::optional<at::Tensor>& u, at::TensorList weights, int64_t steps,
                  c10::string_view activation);

// While one is alive on a thread, a CPU rollout_forward there takes the path of training, the one
// its backward will take, rather than the path of a forward alone: autograd's forward when a
// backward follows and nothing is kept (where the calibration measures the two separately, a
// training step must still run on one path, so that its backward's recomputed activations are
// the forward's bits).
class TrainingForward {
 public:
  TrainingForward();
  ~TrainingForward();
  TrainingForward(const TrainingForward&) = delete;
  TrainingForward& operator=(const TrainingForward&) = delete;

 private:
  bool previous_;
};

}  // namespace fbfast::cpu
