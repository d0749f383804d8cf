// What csrc/autograd.cpp needs to know of the CPU kernel's choice of path: whether a training
// rollout of these widths should keep its hidden activations for the backward
// (fbfast::rollout_forward_hidden). True where the CPU kernel takes its BLAS path (wide layers,
// or cpu_path='blas' pinned): there, recomputing the activations is a full GEMM per step.
#pragma once

#include <cstdint>

namespace fbfast::cpu {

bool saves_hidden(int64_t du, int64_t o, int64_t h);

}  // namespace fbfast::cpu
