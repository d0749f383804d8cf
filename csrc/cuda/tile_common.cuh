// Device helpers shared by the fused forward and backward kernels: the tile GEMM that runs
// every step's matrix products out of shared memory, the loaders that fill shared memory, and
// the conversions between a call's dtype and the fp32 the kernels compute in.
//
// Thread-block conventions: every helper is called by all threads of the block with the same
// arguments and splits its work by threadIdx.x / blockDim.x; none of them synchronises, so the
// kernels place every __syncthreads() themselves.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

#include "rollout_params.h"

// The tensor-core API (nvcuda::wmma); the host emulation brings its own (host_emulation.h).
#if !defined(FBFAST_HOST_EMULATION)
#include <mma.h>
#endif

namespace fbfast {
namespace cuda {

__device__ __forceinline__ float4 load_float4(const float* p) {
  return *reinterpret_cast<const float4*>(p);
}

// Element i of a global tensor of the call's dtype, widened to fp32. The dtype is uniform over
// the grid, so the branch costs no divergence; these run at global loads and stores only.
__device__ __forceinline__ float load_element(const void* base, int64_t i, Dtype dtype) {
  switch (dtype) {
    case Dtype::kFloat16: return static_cast<float>(static_cast<const c10::Half*>(base)[i]);
    case Dtype::kBFloat16: return static_cast<float>(static_cast<const c10::BFloat16*>(base)[i]);
    case Dtype::kFloat32: break;
  }
  return static_cast<const float*>(base)[i];
}

// v rounded to the call's dtype (and widened back): the value a stored element holds.
__device__ __forceinline__ float round_to(Dtype dtype, float v) {
  switch (dtype) {
    case Dtype::kFloat16: return static_cast<float>(static_cast<c10::Half>(v));
    case Dtype::kBFloat16: return static_cast<float>(static_cast<c10::BFloat16>(v));
    case Dtype::kFloat32: break;
  }
  return v;
}

// base advanced by i elements of the call's dtype (null stays null): member e's weights in an
// ensemble's (E, out, in) tensor.
__device__ __forceinline__ const void* element_at(const void* base, int64_t i, Dtype dtype) {
  if (!base) return nullptr;
  return static_cast<const char*>(base) + i * (dtype == Dtype::kFloat32 ? 4 : 2);
}
__device__ __forceinline__ void* element_at(void* base, int64_t i, Dtype dtype) {
  return const_cast<void*>(element_at(static_cast<const void*>(base), i, dtype));
}

__device__ __forceinline__ void store_element(void* base, int64_t i, Dtype dtype, float v) {
  switch (dtype) {
    case Dtype::kFloat16: static_cast<c10::Half*>(base)[i] = static_cast<c10::Half>(v); return;
    case Dtype::kBFloat16: static_cast<c10::BFloat16*>(base)[i] = static_cast<c10::BFloat16>(v); return;
    case Dtype::kFloat32: break;
  }
  static_cast<float*>(base)[i] = v;
}

// How the tile GEMM reads W(k, n), the weight linking input k to output n, from shared memory.
enum class WeightLayout {
  kRowPerOutput,  // w[n * ldw + k]: a weight as nn.Linear stores it, read for x -> x W^T
  kRowPerInput,   // w[k * ldw + n]: the same stored matrix read for g -> g W (backward)
};

// out(r, n) = bias[n] + sum_k A(r, k) W(k, n) for the rows of one tile, with A given as up to
// two k segments (z_0 = W_0 [u ; x] without concatenating u and x). All widths are zero-padded
// multiples of 4 and every A row starts 16-byte aligned.
struct TileGemm {
  const float* a[2];  // rows of each k segment of A (shared memory)
  int lda[2];         // row stride of each segment
  int k[2];           // padded width of each segment (0: unused)
  const float* w;     // weights (shared memory); segment 1 continues segment 0's k index
  int ldw;
  const float* bias;  // (n) or null
  int rows;           // multiple of kRB
  int n;              // outputs per row
  // Null: the SIMT tile GEMM. Else the tensor-core one (SmemLayout::tensor_cores: rows, n and
  // every k multiples of 16, every row start 32-byte aligned), whose per-warp 16 x 16 result
  // tiles pass through here on their way to the epilogue.
  float* tc_scratch = nullptr;
};

// The GEMM of `g` on tensor cores, for layouts that allow it (TileGemm::tc_scratch). Each warp
// takes 16 x 16 output tiles in turn; per 8-deep slice of k, each fp32 operand x is split into
// hi = tf32(x) and lo = tf32(x - hi), and lo hi + hi lo + hi hi accumulate in fp32 ("3xTF32":
// the product loses about lo lo, so the result keeps close to fp32's accuracy, where one TF32
// product would keep 11 bits). An output's arithmetic depends only on its own row and column,
// never on the tile's position or the warp that computes it, so the backward's recomputation
// (same layouts, forward_kernel.cuh) reproduces the forward's z bit for bit. A slice whose
// operands hold an Inf or NaN (x - hi would be NaN there, and Inf lo = Inf 0 = NaN) takes hi hi
// alone, so Inf and NaN propagate as in fp32; the rest of that 16 x 16 tile then keeps TF32's 11
// bits in that slice (the choice depends on the data only: forward and backward still agree).
// TF32 tensor cores exist from sm_80 on; the host code plans them only there.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define FBFAST_TENSOR_CORES 1
template <WeightLayout kLayout, typename Epilogue>
__device__ __forceinline__ void tile_gemm_tc(const TileGemm& g, Epilogue&& epilogue) {
  namespace wmma = nvcuda::wmma;
  using BLayout = std::conditional_t<kLayout == WeightLayout::kRowPerOutput, wmma::col_major, wmma::row_major>;
  using FragA = wmma::fragment<wmma::matrix_a, kTcTile, kTcTile, 8, wmma::precision::tf32, wmma::row_major>;
  using FragB = wmma::fragment<wmma::matrix_b, kTcTile, kTcTile, 8, wmma::precision::tf32, BLayout>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const int col_tiles = g.n / kTcTile, tiles = (g.rows / kTcTile) * col_tiles;
  float* out = g.tc_scratch + warp * kTcTile * kTcTile;
  // hi, lo = the split of hi's elements; true when all of them are finite.
  auto split = [](auto& hi, auto& lo) {
    bool finite = true;
#pragma unroll
    for (int i = 0; i < hi.num_elements; ++i) {
      const float x = hi.x[i];
      finite = finite && isfinite(x);
      hi.x[i] = wmma::__float_to_tf32(x);
      lo.x[i] = wmma::__float_to_tf32(x - hi.x[i]);
    }
    return finite;
  };
  for (int tile = warp; tile < tiles; tile += warps) {
    const int r0 = (tile / col_tiles) * kTcTile, n0 = (tile % col_tiles) * kTcTile;
    wmma::fragment<wmma::accumulator, kTcTile, kTcTile, 8, float> acc;
    wmma::fill_fragment(acc, 0.f);
    for (int seg = 0; seg < 2; ++seg) {
      const int k_offset = seg == 0 ? 0 : g.k[0];
      for (int k = 0; k < g.k[seg]; k += 8) {
        FragA a_hi, a_lo;
        FragB b_hi, b_lo;
        wmma::load_matrix_sync(a_hi, g.a[seg] + r0 * g.lda[seg] + k, g.lda[seg]);
        // W(k, n) is w[n ldw + k] (a column-major B) or w[k ldw + n] (row-major).
        const float* w = kLayout == WeightLayout::kRowPerOutput ? g.w + n0 * g.ldw + k_offset + k
                                                                : g.w + (k_offset + k) * g.ldw + n0;
        wmma::load_matrix_sync(b_hi, w, g.ldw);
        const bool finite = split(a_hi, a_lo) & split(b_hi, b_lo);
        if (__all_sync(0xffffffffu, finite)) {
          wmma::mma_sync(acc, a_lo, b_hi, acc);
          wmma::mma_sync(acc, a_hi, b_lo, acc);
        }
        wmma::mma_sync(acc, a_hi, b_hi, acc);
      }
    }
    wmma::store_matrix_sync(out, acc, kTcTile, wmma::mem_row_major);
    __syncwarp();
    for (int i = lane; i < kTcTile * kTcTile; i += 32) {
      const int n = n0 + i % kTcTile;
      epilogue(r0 + i / kTcTile, n, (g.bias ? g.bias[n] : 0.f) + out[i]);
    }
    __syncwarp();  // the tile is read before the warp's next one overwrites it
  }
}
#endif

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
// recomputation of every layer's z reproduces the forward's bit for bit (and with it every
// activation's branch).
// epilogue(r, n, value) is called once per output.
template <int kRB, WeightLayout kLayout, typename Epilogue>
__device__ __forceinline__ void tile_gemm(const TileGemm& g, Epilogue&& epilogue) {
  // Tensor-core plans run the one-row kernels (Plan::rows_per_item), which alone hold this path:
  // in the 4-row kernels its fragments would add to the register pressure of the SIMT path's
  // time loop, which then spills.
#if defined(FBFAST_TENSOR_CORES)
  if constexpr (kRB == 1) {
    if (g.tc_scratch) {  // uniform over the block: the plan's choice
      tile_gemm_tc<kLayout>(g, epilogue);
      return;
    }
  }
#endif
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

// TileGemm::tc_scratch of a layout: null unless it runs on tensor cores.
__device__ __forceinline__ float* tc_scratch(const SmemLayout& lay, float* smem) {
  return lay.tensor_cores ? smem + lay.tc_scratch : nullptr;
}

// z_l = W_l h_l + b_l for the rows of one tile, W_l and b_l in shared memory (`smem`): h_0 is
// [u_t ; x_t], two segments of pitch Du_pad and X_pad (x_t's rows: version 1's ring slots, O_pad
// wide, or the gathered lags); h_l for l > 0 the rows of h, pitch ldh.
__device__ __forceinline__ TileGemm layer_gemm(const Dims& d, const SmemLayout& lay, float* smem, int l,
                                               const float* u_t, const float* x_t, const float* h, int ldh) {
  const LayerLayout& layer = lay.layer[l];
  if (l == 0)
    return TileGemm{{u_t, x_t}, {lay.du_pad, lay.x_pad}, {lay.du_pad, lay.x_pad}, smem + layer.w, layer.ld,
                    smem + layer.b, lay.rows, d.width[0], tc_scratch(lay, smem)};
  return TileGemm{{h, nullptr}, {ldh, 0}, {layer.in_pad, 0}, smem + layer.w, layer.ld, smem + layer.b, lay.rows,
                  d.width[l], tc_scratch(lay, smem)};
}

// The offset of this block's member (blockIdx.y, docs/spec.md §1.3) in a tensor with these rows.
// Read where it is used rather than held across the time loop: the kernels' register budget is
// tight, and a special register and a multiply are cheap.
__device__ __forceinline__ int64_t member_offset(const Rows& rows) { return int64_t(blockIdx.y) * rows.member; }

// Where step t's (batch, width) matrix starts in a global tensor: element (row, c) of the step
// is base[first + row * width + c].
struct StepRows {
  const void* base;
  int64_t first;
};

// dst[(s * rows + r) * pitch + c] = step_rows(t0 + s)(row0 + r, c) for s < count, r < rows,
// c < pitch; zero for the padding c >= width and for rows past the batch. step_rows(t) returns
// the StepRows of step t. Consecutive threads read consecutive elements, so each staged step is
// one coalesced sweep.
template <typename StepFn>
__device__ __forceinline__ void stage_rows(float* dst, StepFn&& step_rows, Dtype dtype, int64_t t0,
                                           int count, int64_t row0, int rows, int64_t batch, int width,
                                           int pitch) {
  const int total = count * rows * pitch;
  for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
    const int c = idx % pitch;
    const int sr = idx / pitch;
    const int r = sr % rows;
    const int s = sr / rows;
    float v = 0.f;
    if (c < width && row0 + r < batch) {
      const StepRows src = step_rows(t0 + s);
      v = load_element(src.base, src.first + (row0 + r) * width + c, dtype);
    }
    dst[idx] = v;
  }
}

// ---------------------------------------------------------------------------------------------
// Feedback structures other than version 1's (rollout_params.h): a ring of D slots, the value of
// step s (F wide; x0's row s + D for s < 0) at slot (s + D) % D, forward and backward alike.

// The slot of step t - lag's value, from t's own slot t % D (1 <= lag <= D).
__device__ __forceinline__ int lag_slot(int slot_t, int lag, int D) {
  const int s = slot_t - lag;
  return s < 0 ? s + D : s;
}

// The row of gemm_path::read_x0's copy that holds x0's row i (the value of step i - D): lag j
// reads it at step t = i - D + d_j when that is a step of the rollout (t < d_j always holds), at
// copied row x0_base[j] + t; the first such lag is taken. -1: no lag reads it in this rollout.
__device__ __forceinline__ int64_t x0_copy_row(const RolloutParams& p, int i) {
  const Dims& d = p.dims;
  for (int j = 0; j < d.m; ++j) {
    const int64_t t = i - d.delay + d.lags[j];
    if (t >= 0 && t < d.steps) return p.x0_base[j] + t;
  }
  return -1;
}

// The ring's D slots (R, ring_pad) for a tile starting at batch row row0: slot i holds x0's row i
// (zero where no lag reads it, in the pad columns and for rows past the batch).
__device__ __forceinline__ void stage_x0_ring(float* ring, const RolloutParams& p, int64_t row0) {
  const Dims& d = p.dims;
  const int R = p.lay.rows, pitch = p.lay.ring_pad;
  const int total = static_cast<int>(d.delay) * R * pitch;
  for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
    const int c = idx % pitch;
    const int sr = idx / pitch;
    const int r = sr % R;
    float v = 0.f;
    if (c < d.f && row0 + r < d.batch) {
      const int64_t row = x0_copy_row(p, sr / R);
      if (row >= 0)
        v = load_element(p.x0, row * p.x0_rows.step + member_offset(p.x0_rows) + (row0 + r) * d.f + c, p.dtype);
    }
    ring[idx] = v;
  }
}

// x_t = [past(t - d_1) ; ... ; past(t - d_m)] for the rows of a tile, from the ring into x
// (pitch X_pad; its pad columns are never written, so they stay zero). slot_t = t % D.
__device__ __forceinline__ void gather_lags(float* x, const float* ring, const Dims& d, const SmemLayout& lay,
                                            int slot_t) {
  const int width = d.x(), D = static_cast<int>(d.delay), slot_size = lay.rows * lay.ring_pad;
  for (int i = threadIdx.x; i < lay.rows * width; i += blockDim.x) {
    const int r = i / width, c = i - r * width, j = c / d.f, cc = c - j * d.f;
    x[r * lay.x_pad + c] = ring[lag_slot(slot_t, d.lags[j], D) * slot_size + r * lay.ring_pad + cc];
  }
}

// Steps [t0, t0 + count) of x_t for the rows of a tile from global memory: past(s) from Y's
// first F columns for s >= 0, else x0's copied rows; dst (count, R, X_pad), zero in the pad
// columns and for rows past the batch. The backward's staging of x.
__device__ __forceinline__ void stage_lags(float* dst, const RolloutParams& p, int64_t t0, int count,
                                           int64_t row0) {
  const Dims& d = p.dims;
  const int R = p.lay.rows, pitch = p.lay.x_pad, width = d.x();
  const int total = count * R * pitch;
  for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
    const int c = idx % pitch;
    const int sr = idx / pitch;
    const int r = sr % R;
    float v = 0.f;
    if (c < width && row0 + r < d.batch) {
      const int64_t t = t0 + sr / R;
      const int j = c / d.f, cc = c - j * d.f;
      const int64_t s = t - d.lags[j];
      v = s >= 0 ? load_element(p.y, s * p.y_rows.step + member_offset(p.y_rows) + (row0 + r) * d.o + cc, p.dtype)
                 : load_element(p.x0, (p.x0_base[j] + t) * p.x0_rows.step + member_offset(p.x0_rows) +
                                          (row0 + r) * d.f + cc,
                                p.dtype);
    }
    dst[idx] = v;
  }
}

// Where the columns of W_l sit in its shared-memory rows: input column c at c, except in the
// first layer, whose x columns (c >= Du) start at Du_pad (rollout_params.h).
struct ColumnMap {
  int split, split_pad;  // layer 0: Du, Du_pad; others: 0, 0

  __device__ __forceinline__ int operator()(int c) const { return c < split ? c : split_pad + (c - split); }
};

__device__ __forceinline__ ColumnMap column_map(const Dims& d, const SmemLayout& s, int l) {
  return l == 0 ? ColumnMap{d.du, s.du_pad} : ColumnMap{0, 0};
}

// Layer l's weight (out_l, in_l) in its shared-memory layout. Shared memory must have been
// zero-filled (and synchronised) before: only the real elements are written here.
__device__ __forceinline__ void load_weight(float* dst, const void* src, Dtype dtype, int out, int in, int ld,
                                            ColumnMap col) {
  const int total = out * in;
  for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
    const int j = idx / in;
    dst[j * ld + col(idx - j * in)] = load_element(src, idx, dtype);
  }
}

// A bias vector (n) or, when absent, nothing: its zero-filled buffer then adds exactly 0.
__device__ __forceinline__ void load_vector(float* dst, const void* src, Dtype dtype, int n) {
  if (!src) return;
  for (int i = threadIdx.x; i < n; i += blockDim.x) dst[i] = load_element(src, i, dtype);
}

__device__ __forceinline__ void zero_fill(float* dst, int64_t n) {
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) dst[i] = 0.f;
}

// Columns [from, to) of `rows` rows of pitch `pitch` set to zero: the pad of a buffer that
// layers of different widths take turns in, which the next GEMM reads against zero weights (a
// stale Inf there would turn into NaN).
__device__ __forceinline__ void clear_columns(float* buf, int rows, int pitch, int from, int to) {
  const int width = to - from;
  for (int i = threadIdx.x; i < rows * width; i += blockDim.x) buf[(i / width) * pitch + from + i % width] = 0.f;
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
