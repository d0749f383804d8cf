// Launch of the fused forward kernel (forward_kernel.cuh): one instantiation per activation and
// rows-per-thread blocking (1 for tiles of 1-3 rows, 4 otherwise), every dtype and feedback
// structure served by each; an ensemble's members are the grid's y axis.
#include "forward_kernel.cuh"
#include "launch_utils.cuh"
#include "rollout_launch.h"

namespace fbfast {
namespace cuda {

void launch_rollout_forward(const RolloutParams& p, cudaStream_t stream) {
  const ForwardKernel kernel = forward_kernel(p.act, p.rows_per_item);
  const int64_t bytes = p.lay.total * int64_t(sizeof(float));
  allow_shared_memory(kernel, bytes);
  const dim3 grid(static_cast<unsigned>(p.blocks), static_cast<unsigned>(p.dims.members));
  kernel<<<grid, p.threads, static_cast<size_t>(bytes), stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace fbfast
