// Device helpers shared by the fused forward and backward kernels: the tile GEMM that runs
// every step's matrix products out of shared memory, and the loaders that fill shared memory.
//
// Thread-block conventions: every helper is called by all threads of the block with the same
// arguments and splits its work by threadIdx.x / blockDim.x; none of them synchronises, so the
// kernels place every __syncthreads() themselves.
#pragma once

#include <cstdint>

#include "rollout_params.h"

namespace fbfast {
namespace cuda {

__device__ __forceinline__ float4 load_float4(const float* p) {
  return *reinterpret_cast<const float4*>(p);
}

// How the tile GEMM reads W(k, n), the weight linking input k to output n, from shared memory.
enum class WeightLayout {
  kRowPerOutput,  // w[n * ldw + k]: a weight as nn.Linear stores it, read for x -> x W^T
  kRowPerInput,   // w[k * ldw + n]: the same stored matrix read for g -> g W (backward)
};

// out(r, n) = bias[n] + sum_k A(r, k) W(k, n) for the rows of one tile, with A given as up to
// two k segments (z = W1 [u ; x] without concatenating u and x). All widths are zero-padded
// multiples of 4 and every A row starts 16-byte aligned.
struct TileGemm {
  const float* a[2];  // rows of each k segment of A (shared memory)
  int lda[2];         // row stride of each segment
  int k[2];           // width of each segment (0: unused)
  const float* w;     // weights (shared memory); segment 1 continues segment 0's k index
  int ldw;
  const float* bias;  // (n) or null
  int rows;           // multiple of kRB
  int n;              // outputs per row
};

template <int kRB, WeightLayout kLayout>
__device__ __forceinline__ void accumulate_segment(float (&acc)[kRB][4], const float* a, int lda,
                                                   int width, const float* w, int ldw, int n,
                                                   int k_offset) {
  for (int k = 0; k < width; k += 4) {
    float4 wv;
    if constexpr (kLayout == WeightLayout::kRowPerOutput) {
      wv = load_float4(w + n * ldw + k_offset + k);
    } else {
      const float* wk = w + (k_offset + k) * ldw + n;
      wv = make_float4(wk[0], wk[ldw], wk[2 * ldw], wk[3 * ldw]);
    }
#pragma unroll
    for (int i = 0; i < kRB; ++i) {
      const float4 av = load_float4(a + i * lda + k);
      acc[i][0] = fmaf(av.x, wv.x, acc[i][0]);
      acc[i][1] = fmaf(av.y, wv.y, acc[i][1]);
      acc[i][2] = fmaf(av.z, wv.z, acc[i][2]);
      acc[i][3] = fmaf(av.w, wv.w, acc[i][3]);
    }
  }
}

// One work item is kRB rows x one output column; consecutive threads take consecutive columns,
// so their weight reads fall in distinct banks and their A reads are broadcasts. Four partial
// sums per output (k mod 4) keep four independent FMA chains per row. The summation order of an
// output depends only on its own inputs, never on kRB or the thread count, so the backward's
// recomputation of z reproduces the forward's bit for bit (and with it every ReLU decision).
// epilogue(r, n, value) is called once per output.
template <int kRB, WeightLayout kLayout, typename Epilogue>
__device__ __forceinline__ void tile_gemm(const TileGemm& g, Epilogue&& epilogue) {
  const int items = (g.rows / kRB) * g.n;
  for (int item = threadIdx.x; item < items; item += blockDim.x) {
    const int n = item % g.n;
    const int r0 = (item / g.n) * kRB;
    float acc[kRB][4];
#pragma unroll
    for (int i = 0; i < kRB; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
    if (g.k[0])
      accumulate_segment<kRB, kLayout>(acc, g.a[0] + r0 * g.lda[0], g.lda[0], g.k[0], g.w, g.ldw, n, 0);
    if (g.k[1])
      accumulate_segment<kRB, kLayout>(acc, g.a[1] + r0 * g.lda[1], g.lda[1], g.k[1], g.w, g.ldw, n, g.k[0]);
    const float bias = g.bias ? g.bias[n] : 0.f;
#pragma unroll
    for (int i = 0; i < kRB; ++i)
      epilogue(r0 + i, n, bias + ((acc[i][0] + acc[i][1]) + (acc[i][2] + acc[i][3])));
  }
}

// dst[(s * rows + r) * pitch + c] = step_rows(t0 + s)[(row0 + r) * width + c] for s < count,
// r < rows, c < pitch; zero for the padding c >= width and for rows past the batch.
// step_rows(t) returns the (batch, width) matrix of step t in global memory. Consecutive threads
// read consecutive elements, so each staged step is one coalesced sweep.
template <typename scalar_t, typename StepRows>
__device__ __forceinline__ void stage_rows(float* dst, StepRows&& step_rows, int64_t t0, int count,
                                           int64_t row0, int rows, int64_t batch, int width,
                                           int pitch) {
  const int total = count * rows * pitch;
  for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
    const int c = idx % pitch;
    const int sr = idx / pitch;
    const int r = sr % rows;
    const int s = sr / rows;
    float v = 0.f;
    if (c < width && row0 + r < batch) {
      const scalar_t* src = step_rows(t0 + s);
      v = static_cast<float>(src[(row0 + r) * width + c]);
    }
    dst[idx] = v;
  }
}

// The weights in their shared-memory layout (rollout_params.h). Shared memory must have been
// zero-filled (and synchronised) before: only the real elements are written here.
// w1 (H, Du + O) -> w1s[j * ld1 + c'] with c' = c for u columns, Du_pad + (c - Du) for x columns.
template <typename scalar_t>
__device__ __forceinline__ void load_w1(float* w1s, const scalar_t* w1, const Dims& d,
                                        const SmemLayout& L) {
  const int k1 = d.du + d.o;
  const int total = d.h * k1;
  for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
    const int j = idx / k1;
    const int c = idx - j * k1;
    const int cp = c < d.du ? c : L.du_pad + (c - d.du);
    w1s[j * L.ld1 + cp] = static_cast<float>(w1[idx]);
  }
}

// w2 (O, H) -> w2s[o * ld2 + j].
template <typename scalar_t>
__device__ __forceinline__ void load_w2(float* w2s, const scalar_t* w2, const Dims& d,
                                        const SmemLayout& L) {
  const int total = d.o * d.h;
  for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
    const int o = idx / d.h;
    w2s[o * L.ld2 + (idx - o * d.h)] = static_cast<float>(w2[idx]);
  }
}

// A bias vector (n) or, when absent, nothing: its zero-filled buffer then adds exactly 0.
template <typename scalar_t>
__device__ __forceinline__ void load_vector(float* dst, const scalar_t* src, int n) {
  if (!src) return;
  for (int i = threadIdx.x; i < n; i += blockDim.x) dst[i] = static_cast<float>(src[i]);
}

__device__ __forceinline__ void zero_fill(float* dst, int64_t n) {
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) dst[i] = 0.f;
}

// The index pair (row, col) of the elements idx = first, first + stride, ... of a row-major
// (rows, cols) matrix, advanced without a division per element: the weight-gradient loops run
// at every step and their index arithmetic would otherwise cost as much as their FMAs.
struct StridedIndex {
  int row, col, drow, dcol;

  __device__ __forceinline__ StridedIndex(int first, int stride, int cols)
      : row(first / cols), col(first % cols), drow(stride / cols), dcol(stride % cols) {}

  __device__ __forceinline__ void advance(int cols) {
    row += drow;
    col += dcol;
    if (col >= cols) {
      col -= cols;
      ++row;
    }
  }
};

}  // namespace cuda
}  // namespace fbfast
