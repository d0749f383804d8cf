// Launch helpers shared by rollout_forward.cu and rollout_backward.cu.
#pragma once

#include <c10/cuda/CUDAException.h>

#include <cstdint>

namespace fbfast {
namespace cuda {

// Kernels may use more than the default 48 KB of dynamic shared memory only after opting in;
// the host plan never asks for more than the device's opt-in maximum. The attribute is set on
// every launch (a cheap host call, legal during CUDA graph capture), so no cache has to follow
// devices or threads.
template <typename Kernel>
void allow_shared_memory(Kernel kernel, int64_t bytes) {
  constexpr int64_t kDefaultLimit = 48 * 1024;
  if (bytes > kDefaultLimit)
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(bytes)));
}

}  // namespace cuda
}  // namespace fbfast
