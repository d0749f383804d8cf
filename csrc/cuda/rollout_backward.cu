// Instantiations and launch of the fused backward kernel (backward_kernel.cuh) and of the
// deterministic reduction of its per-block weight gradients.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "backward_kernel.cuh"
#include "launch_utils.cuh"
#include "rollout_launch.h"

namespace fbfast {
namespace cuda {

template <typename scalar_t>
void launch_rollout_backward(const BackwardParams& p, cudaStream_t stream) {
  void (*kernel)(const BackwardParams) = p.rows_per_item == 4
                                             ? rollout_backward_kernel<scalar_t, 4>
                                             : rollout_backward_kernel<scalar_t, 1>;
  const int64_t bytes = p.lay.total * int64_t(sizeof(float));
  allow_shared_memory(kernel, bytes);
  kernel<<<static_cast<unsigned>(p.blocks), p.threads, static_cast<size_t>(bytes), stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (!p.workspace) return;
  constexpr int kThreads = 256;
  const int64_t elems = grad_offsets(p.dims).total;
  const int64_t blocks = (elems + kThreads - 1) / kThreads;
  reduce_gradients_kernel<scalar_t>
      <<<static_cast<unsigned>(blocks < 4096 ? blocks : 4096), kThreads, 0, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template void launch_rollout_backward<float>(const BackwardParams&, cudaStream_t);
template void launch_rollout_backward<c10::Half>(const BackwardParams&, cudaStream_t);
template void launch_rollout_backward<c10::BFloat16>(const BackwardParams&, cudaStream_t);

}  // namespace cuda
}  // namespace fbfast
