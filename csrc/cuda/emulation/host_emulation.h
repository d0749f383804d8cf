// Runs the CUDA kernel templates of csrc/cuda/ on the host, one std::thread per CUDA thread and
// a std::barrier per block for __syncthreads(), so that their indexing, shared-memory layout,
// barrier placement and numerics can be tested on machines without a GPU (the project's own;
// see tests/test_cuda_compile.py). Built with -fsanitize=thread it also reports data races on
// shared memory between barriers. Not part of the extension: setup.py compiles only
// csrc/cuda/*.cu and csrc/cuda/*.cpp.
//
// Include this before any kernel header; define FBFAST_EMULATION_SMEM_FLOATS in one place.
#pragma once

#include <math.h>

#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__

struct alignas(16) float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

struct EmulatedDim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local EmulatedDim3 threadIdx, blockIdx;
inline EmulatedDim3 blockDim, gridDim;

namespace fbfast::emulation {

inline thread_local std::barrier<>* block_barrier = nullptr;
inline thread_local int64_t barrier_count = 0;

// Shared memory of the one block that runs at a time, with a guard zone after it: the kernels
// declare `extern __shared__ float4 fbfast_smem[]` in namespace fbfast::cuda, which names the
// array defined by the including program.
constexpr float kGuard = -1.2345678e38f;

// Runs kernel(params) on a grid of `blocks` x `blocks_y` blocks of `threads` emulated threads,
// block after block. Shared memory starts as NaN (the kernels must not rely on its initial
// content). Returns false, with a message, when a block's threads passed different numbers of
// barriers or wrote past `smem_floats`.
template <typename Params>
bool launch(void (*kernel)(const Params), int64_t blocks, int64_t blocks_y, int threads, int64_t smem_floats,
            float* smem, int64_t smem_capacity, const Params& params) {
  if (smem_floats > smem_capacity) {
    std::fprintf(stderr, "emulation: kernel wants %lld floats of shared memory, capacity %lld\n",
                 static_cast<long long>(smem_floats), static_cast<long long>(smem_capacity));
    return false;
  }
  gridDim = EmulatedDim3{static_cast<unsigned>(blocks), static_cast<unsigned>(blocks_y), 1};
  blockDim = EmulatedDim3{static_cast<unsigned>(threads), 1, 1};
  for (int64_t flat = 0; flat < blocks * blocks_y; ++flat) {
    const int64_t b = flat % blocks, by = flat / blocks;
    for (int64_t i = 0; i < smem_capacity; ++i) smem[i] = i < smem_floats ? NAN : kGuard;
    std::barrier<> barrier(threads);
    std::vector<int64_t> counts(threads);
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        threadIdx = EmulatedDim3{static_cast<unsigned>(t), 0, 0};
        blockIdx = EmulatedDim3{static_cast<unsigned>(b), static_cast<unsigned>(by), 0};
        block_barrier = &barrier;
        barrier_count = 0;
        kernel(params);
        counts[t] = barrier_count;
        // A thread that returns early must not hang the others; the count check reports it.
        barrier.arrive_and_drop();
      });
    }
    for (auto& th : pool) th.join();
    for (int t = 1; t < threads; ++t) {
      if (counts[t] != counts[0]) {
        std::fprintf(stderr, "emulation: block (%lld, %lld) thread %d passed %lld barriers, thread 0 %lld\n",
                     static_cast<long long>(b), static_cast<long long>(by), t, static_cast<long long>(counts[t]),
                     static_cast<long long>(counts[0]));
        return false;
      }
    }
    for (int64_t i = smem_floats; i < smem_capacity; ++i) {
      if (smem[i] != kGuard) {
        std::fprintf(stderr, "emulation: block (%lld, %lld) wrote shared memory at %lld, past its %lld floats\n",
                     static_cast<long long>(b), static_cast<long long>(by), static_cast<long long>(i),
                     static_cast<long long>(smem_floats));
        return false;
      }
    }
  }
  return true;
}

}  // namespace fbfast::emulation

inline void __syncthreads() {
  ++fbfast::emulation::barrier_count;
  fbfast::emulation::block_barrier->arrive_and_wait();
}
