// Runs the CUDA kernel templates of csrc/cuda/ on the host, one std::thread per CUDA thread and
// a std::barrier per block for __syncthreads(), so that their indexing, shared-memory layout,
// barrier placement and numerics can be tested on machines without a GPU (the project's own;
// see tests/test_cuda_compile.py). Built with -fsanitize=thread it also reports data races on
// shared memory between barriers. Not part of the extension: setup.py compiles only
// csrc/cuda/*.cu and csrc/cuda/*.cpp.
//
// Warp-level pieces get a std::barrier per warp: __syncwarp(), and the tensor-core API the
// kernels use (nvcuda::wmma below, TF32 16 x 16 x 8 tiles). The emulated fragments spread a
// tile's elements over the warp's lanes in an order of their own (element i of the row-major
// tile at lane i % 32), which the kernels cannot observe: they touch fragments only through
// load / store / fill / mma and element-wise conversions, as the CUDA API requires, so code that
// passes here does not depend on the GPU's own (unspecified) order.
//
// Include this before any kernel header; define FBFAST_EMULATION_SMEM_FLOATS in one place.
#pragma once

#define FBFAST_HOST_EMULATION 1

#include <math.h>

#include <atomic>
#include <barrier>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>
#include <type_traits>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// The kernels' `extern __shared__ __align__(n)` array is defined by the including program, with
// its alignment there (emulate_rollout.cpp).
#define __align__(n)
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

// One warp's barrier and the exchange buffers of its collective tensor-core operations.
struct Warp {
  explicit Warp(int lanes) : lanes(lanes), barrier(lanes) {}
  int lanes;
  std::barrier<> barrier;
  float a[16 * 8], b[8 * 16], c[16 * 16];
  int vote[32];
};

inline thread_local Warp* warp = nullptr;

// A collective operation of the whole warp: the kernels call them only with all 32 lanes.
inline Warp& full_warp(const char* what) {
  if (warp->lanes != 32) {
    std::fprintf(stderr, "emulation: %s in a warp of %d lanes\n", what, warp->lanes);
    std::abort();
  }
  return *warp;
}

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
    std::vector<std::unique_ptr<Warp>> warps;
    for (int w = 0; w * 32 < threads; ++w)
      warps.push_back(std::make_unique<Warp>(threads - w * 32 < 32 ? threads - w * 32 : 32));
    std::vector<int64_t> counts(threads);
    std::vector<std::thread> pool;
    for (int t = 0; t < threads; ++t) {
      pool.emplace_back([&, t] {
        threadIdx = EmulatedDim3{static_cast<unsigned>(t), 0, 0};
        blockIdx = EmulatedDim3{static_cast<unsigned>(b), static_cast<unsigned>(by), 0};
        block_barrier = &barrier;
        warp = warps[t / 32].get();
        barrier_count = 0;
        kernel(params);
        counts[t] = barrier_count;
        // A thread that returns early must not hang the others; the count check reports it.
        barrier.arrive_and_drop();
        warp->barrier.arrive_and_drop();
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

inline void __syncwarp() { fbfast::emulation::warp->barrier.arrive_and_wait(); }

inline bool __all_sync(unsigned mask, bool pred) {
  fbfast::emulation::Warp& w = fbfast::emulation::full_warp("__all_sync");
  if (mask != 0xffffffffu) std::abort();  // the kernels vote with the whole warp
  w.vote[threadIdx.x % 32] = pred;
  w.barrier.arrive_and_wait();
  bool all = true;
  for (const int v : w.vote) all = all && v;
  w.barrier.arrive_and_wait();  // every lane has read the votes before any lane votes again
  return all;
}

// The subset of CUDA's <mma.h> that the kernels use: TF32 m16n16k8 fragments in fp32 storage.
namespace nvcuda::wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int rows = std::is_same_v<Use, matrix_b> ? K : M;
  static constexpr int cols = std::is_same_v<Use, matrix_a> ? K : N;
  static constexpr int num_elements = rows * cols / 32;
  float x[num_elements];
};

// The lane's k-th element: row-major index lane + 32 k of the rows x cols tile.
inline int lane_element(int k) { return static_cast<int>(threadIdx.x % 32) + 32 * k; }

template <typename Use, int M, int N, int K, typename T, typename Layout>
void load_matrix_sync(fragment<Use, M, N, K, T, Layout>& f, const float* p, unsigned ldm) {
  using F = fragment<Use, M, N, K, T, Layout>;
  static_assert(std::is_same_v<Layout, row_major> || std::is_same_v<Layout, col_major>);
  if (reinterpret_cast<uintptr_t>(p) % 32 || ldm % 4) {
    std::fprintf(stderr, "emulation: wmma::load_matrix_sync needs 32-byte aligned rows, ldm %% 4 == 0\n");
    std::abort();
  }
  for (int k = 0; k < F::num_elements; ++k) {
    const int i = lane_element(k), r = i / F::cols, c = i % F::cols;
    f.x[k] = std::is_same_v<Layout, row_major> ? p[r * ldm + c] : p[r + c * ldm];
  }
}

template <int M, int N, int K>
void store_matrix_sync(float* p, const fragment<accumulator, M, N, K, float>& f, unsigned ldm, layout_t layout) {
  using F = fragment<accumulator, M, N, K, float>;
  if (reinterpret_cast<uintptr_t>(p) % 32 || ldm % 4) {
    std::fprintf(stderr, "emulation: wmma::store_matrix_sync needs a 32-byte aligned pointer, ldm %% 4 == 0\n");
    std::abort();
  }
  for (int k = 0; k < F::num_elements; ++k) {
    const int i = lane_element(k), r = i / F::cols, c = i % F::cols;
    p[layout == mem_row_major ? r * ldm + c : r + c * ldm] = f.x[k];
  }
}

template <typename F>
void fill_fragment(F& f, float v) {
  for (float& x : f.x) x = v;
}

// Round to nearest, ties away from zero, to TF32's 10 mantissa bits (cvt.rna.tf32.f32); Inf and
// NaN pass unchanged.
inline float __float_to_tf32(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  if ((bits & 0x7f800000u) != 0x7f800000u) bits = (bits + 0x1000u) & 0xffffe000u;
  std::memcpy(&v, &bits, 4);
  return v;
}

// The TF32 value the tensor cores read from an fp32 register: its low 13 mantissa bits ignored.
inline float tf32_bits(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits &= 0xffffe000u;
  std::memcpy(&v, &bits, 4);
  return v;
}

// d = a b + c for the warp's 16 x 8 a and 8 x 16 b: a collective operation, so the lanes pool
// their elements first. The operands count with their TF32 bits only, as on the GPU (a kernel
// that skipped its conversions would lose precision here too); products of TF32 values are exact
// in fp32, and the sum runs over k in order.
template <typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, 8, float>& d, const fragment<matrix_a, 16, 16, 8, precision::tf32, LA>& a,
              const fragment<matrix_b, 16, 16, 8, precision::tf32, LB>& b,
              const fragment<accumulator, 16, 16, 8, float>& c) {
  fbfast::emulation::Warp& w = fbfast::emulation::full_warp("wmma::mma_sync");
  for (int k = 0; k < a.num_elements; ++k) w.a[lane_element(k)] = tf32_bits(a.x[k]);
  for (int k = 0; k < b.num_elements; ++k) w.b[lane_element(k)] = tf32_bits(b.x[k]);
  for (int k = 0; k < c.num_elements; ++k) w.c[lane_element(k)] = c.x[k];
  w.barrier.arrive_and_wait();
  float out[8];
  for (int k = 0; k < 8; ++k) {
    const int i = lane_element(k), r = i / 16, n = i % 16;
    float sum = w.c[i];
    for (int j = 0; j < 8; ++j) sum += w.a[r * 8 + j] * w.b[j * 16 + n];
    out[k] = sum;
  }
  w.barrier.arrive_and_wait();  // every lane has read the pool before any lane refills it
  for (int k = 0; k < 8; ++k) d.x[k] = out[k];
}

}  // namespace nvcuda::wmma
