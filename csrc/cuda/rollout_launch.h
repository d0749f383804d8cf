// The entry points of the fused kernels, called by the host code (rollout_cuda.cpp) with
// parameters filled by set_rollout_params / set_backward_params (rollout_params.h); defined in
// rollout_forward.cu and rollout_backward.cu. The kernel instantiation follows p.act and
// p.rows_per_item (forward_kernel / backward_kernel). Each launches on `stream` and checks the
// launch.
#pragma once

#include <cuda_runtime_api.h>

#include "rollout_params.h"

namespace fbfast {
namespace cuda {

void launch_rollout_forward(const RolloutParams& p, cudaStream_t stream);

// The backward kernel and, when p.workspace is set, the deterministic gradient reduction.
void launch_rollout_backward(const BackwardParams& p, cudaStream_t stream);

}  // namespace cuda
}  // namespace fbfast
