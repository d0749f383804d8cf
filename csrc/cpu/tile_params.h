// The plain data exchanged between the CPU host code (rollout_cpu.cpp) and the tile kernels
// (tile_kernels.h, compiled once per instruction set), and the declarations of those kernels.
#pragma once

#include <cstdint>

// Included here, before the instruction-set pragma of tile_kernels_<isa>.cpp, so that its inline
// functions are compiled for the baseline ISA only (see tile_kernels.h).
#include "../common/act_kind.h"

namespace fbfast {
namespace cpu {

// One linear layer as the tile kernels read it: packed copies of its weight, each row padded to
// a stride (the host's row_stride: the width rounded up to the vector width when that adds at
// most 1/8, else the width itself), with one vector of slack after the last row so that
// whole-vector loads stay inside the buffer.
template <typename T>
struct TileLayer {
  int64_t in, out;        // W is (out, in)
  int64_t ld_in, ld_out;  // row strides of buffers with rows of `in` and of `out` elements (the
                          // first layer's input is u and x, with strides ld_du and ld_x instead)
  const T* wt;  // (in, ld_out) = W^T, read by the forward; layer 0: the u rows, then the x rows
  const T* w;   // (out, ld_in) = W, read by the backward (g W); layer 0: the u columns only
  const T* wx;  // layer 0 only: (out, ld_x) = W[:, Du:], the fed-back columns (m lags of F)
  const T* b;   // (out) or null
};

// The pointers and sizes of one rollout; filled by the host (rollout_cpu.cpp).
template <typename T>
struct TileParams {
  int64_t steps, batch, du, o, delay, truncate;  // truncate == 0: full BPTT
  int64_t ld_du, ld_o;  // row strides of u-wide and O-wide buffers
  // The feedback (docs/spec.md §1.2): step t reads the first f outputs of steps t - lags[j],
  // j < m (x0's row t - lags[j] + delay before step 0); residual adds lag 0's value to the first
  // f outputs. plain: version 1's feedback (m = 1, f = o, no residual), whose backward writes
  // the adjoint of y_{t-k} into the ring slot it has just read instead of accumulating.
  int64_t m, f;
  const int64_t* lags;
  const int64_t* x0_base;  // lag j's value before step t = lags[j] is x0's row x0_base[j] + t
  bool residual, plain;
  int64_t ld_f, ld_x;  // row strides of F-wide buffers (the ring) and of the m F gathered values
  int64_t n_layers;
  const TileLayer<T>* layers;  // n_layers, the last one producing y
  int act;                     // fbfast::Act (csrc/common/act_kind.h)
  T act_param;
  // Rows from one step to the next in x0, u, and y (also y_saved, grad_y, grad_x0, grad_u): B
  // for one network; E B in an ensemble's (T, E, B, .) tensors, whose member e starts e B rows
  // in (a shared x0 or u keeps B). The kernels read and write rows [r0, r1) of the member.
  int64_t rows_x0, rows_u, rows_y;
  const T* x0;  // (rows read, B, F): only the rows that are read (gemm_path::read_x0)
  const T* u;   // null when du == 0
  T* y;         // forward output
  // Null, or one pointer per hidden layer l < n_layers - 1 to a contiguous (T, rows_y, out_l)
  // tensor at the member's first row: what a training forward keeps for its backward (z where
  // act' reads it, act_needs_z; act(z) otherwise), written by forward_tile and read by
  // backward_tile instead of recomputing the layer's GEMM. A null entry: that layer is
  // recomputed (keeps_layer, csrc/rollout_checks.h).
  T* const* kept;
  // Backward only.
  const T* y_saved;
  const T* grad_y;
  T* grad_x0;  // null: not wanted
  T* grad_u;   // null: not wanted
};

// One group of tiles accumulates its weight gradients here; the host sums the groups in a fixed
// order, so results do not depend on the thread count. Per layer l: w[l] is dW0^T laid out
// (in, ld_out) for the first layer (its rows split into u and x parts like TileLayer::wt) and
// dW_l laid out (out, ld_in) for the others; b[l] is (out). Null entries are not wanted.
template <typename T>
struct TileGrads {
  T* const* w;
  T* const* b;
};

// One declaration per instruction-set variant; definitions in tile_kernels_<isa>.cpp.
#define FBFAST_DECLARE_TILE_KERNELS(isa)                                                        \
  namespace isa {                                                                               \
  template <typename T>                                                                         \
  bool forward_tile(const TileParams<T>& p, int64_t r0, int64_t r1);                           \
  template <typename T>                                                                         \
  bool backward_tile(const TileParams<T>& p, int64_t r0, int64_t r1, const TileGrads<T>& acc); \
  }
FBFAST_DECLARE_TILE_KERNELS(base)
#if defined(__x86_64__) || defined(_M_X64)
FBFAST_DECLARE_TILE_KERNELS(avx2)
FBFAST_DECLARE_TILE_KERNELS(avx512)
#endif
#undef FBFAST_DECLARE_TILE_KERNELS

}  // namespace cpu
}  // namespace fbfast
