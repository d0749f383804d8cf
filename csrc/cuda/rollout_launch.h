// The entry points of the fused kernels, called by the host code (rollout_cuda.cpp) with a
// filled-in plan; defined and instantiated for float, c10::Half and c10::BFloat16 in
// rollout_forward.cu and rollout_backward.cu. Each launches on `stream` and checks the launch.
#pragma once

#include <cuda_runtime_api.h>

#include "rollout_params.h"

namespace fbfast {
namespace cuda {

template <typename scalar_t>
void launch_rollout_forward(const ForwardParams& p, cudaStream_t stream);

// The backward kernel and, when p.workspace is set, the deterministic gradient reduction.
template <typename scalar_t>
void launch_rollout_backward(const BackwardParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace fbfast
