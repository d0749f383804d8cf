// What csrc/autograd.cpp needs to know of the CPU kernel's choice of path: whether a training
// rollout of these widths should keep its hidden activations for the backward
// (fbfast::rollout_forward_hidden). True where the CPU kernel's backward takes its BLAS path
// (wide layers, short or narrow-batch rollouts of medium ones, or cpu_path='blas' pinned):
// there, recomputing the activations is a full GEMM per step.
#pragma once

#include <cstdint>

namespace fbfast::cpu {

bool saves_hidden(int64_t du, int64_t o, int64_t h, int64_t batch, int64_t steps);

}  // namespace fbfast::cpu
