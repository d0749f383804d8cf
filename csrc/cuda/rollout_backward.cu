// Launch of the fused backward kernel (backward_kernel.cuh), one instantiation per activation
// and rows-per-thread blocking, and of the deterministic reduction of its per-block weight
// gradients; an ensemble's members are the y axis of both grids.
#include "backward_kernel.cuh"
#include "launch_utils.cuh"
#include "rollout_launch.h"

namespace fbfast {
namespace cuda {

void launch_rollout_backward(const BackwardParams& p, cudaStream_t stream) {
  const BackwardKernel kernel = backward_kernel(p.act, p.rows_per_item);
  const int64_t bytes = p.lay.total * int64_t(sizeof(float));
  allow_shared_memory(kernel, bytes);
  const unsigned members = static_cast<unsigned>(p.dims.members);
  kernel<<<dim3(static_cast<unsigned>(p.blocks), members), p.threads, static_cast<size_t>(bytes), stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!p.workspace) return;
  constexpr int kThreads = 256;
  const int64_t elems = grad_elements(p.dims);
  const int64_t blocks = (elems + kThreads - 1) / kThreads;
  reduce_gradients_kernel<<<dim3(static_cast<unsigned>(blocks < 4096 ? blocks : 4096), members), kThreads, 0,
                            stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace cuda
}  // namespace fbfast
