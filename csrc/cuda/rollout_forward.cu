// Launch of the fused forward kernel (forward_kernel.cuh): one instantiation per activation and
// rows-per-thread blocking (1 for tiles of 1-3 rows, 4 otherwise), every dtype served by each.
#include "forward_kernel.cuh"
#include "launch_utils.cuh"
#include "rollout_launch.h"

namespace fbfast {
namespace cuda {

void launch_rollout_forward(const RolloutParams& p, cudaStream_t stream) {
  const ForwardKernel kernel = forward_kernel(p.act, p.rows_per_item);
  const int64_t bytes = p.lay.total * int64_t(sizeof(float));
  allow_shared_memory(kernel, bytes);
  kernel<<<static_cast<unsigned>(p.blocks), p.threads, static_cast<size_t>(bytes), stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace fbfast
