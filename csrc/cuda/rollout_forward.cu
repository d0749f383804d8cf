// Instantiations and launch of the fused forward kernel (forward_kernel.cuh): one per dtype and
// per rows-per-thread blocking (1 for tiles of 1-3 rows, 4 otherwise).
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "forward_kernel.cuh"
#include "launch_utils.cuh"
#include "rollout_launch.h"

namespace fbfast {
namespace cuda {

template <typename scalar_t>
void launch_rollout_forward(const ForwardParams& p, cudaStream_t stream) {
  void (*kernel)(const ForwardParams) = p.rows_per_item == 4 ? rollout_forward_kernel<scalar_t, 4>
                                                             : rollout_forward_kernel<scalar_t, 1>;
  const int64_t bytes = p.lay.total * int64_t(sizeof(float));
  allow_shared_memory(kernel, bytes);
  kernel<<<static_cast<unsigned>(p.blocks), p.threads, static_cast<size_t>(bytes), stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template void launch_rollout_forward<float>(const ForwardParams&, cudaStream_t);
template void launch_rollout_forward<c10::Half>(const ForwardParams&, cudaStream_t);
template void launch_rollout_forward<c10::BFloat16>(const ForwardParams&, cudaStream_t);

}  // namespace cuda
}  // namespace fbfast
