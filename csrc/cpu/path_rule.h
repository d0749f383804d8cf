// What csrc/autograd.cpp needs to know of the CPU kernel's choice of path: whether a training
// rollout of these widths should keep its hidden activations for the backward
// (fbfast::rollout_forward_hidden). True where the CPU kernel's backward takes its BLAS path
// (wide layers, short or narrow-batch rollouts of medium ones, or cpu_path='blas' pinned), and
// on the tile path for layers wider than 128 x 128: there recomputing the activations is a full
// GEMM per step (a quarter of a training step's multiply-adds), while the kept layers take at
// most what a per-step loop keeps (z alone where act' reads z, where the loop keeps z and act(z)).
#pragma once

#include <cstdint>

namespace fbfast::cpu {

// work: one step's multiply-adds per batch row, the sum over layers of in_l * out_l; widest: the
// largest layer's in_l * out_l.
bool saves_hidden(int64_t work, int64_t widest, int64_t batch, int64_t steps);

}  // namespace fbfast::cpu
