// The plain data exchanged between the CPU host code (rollout_cpu.cpp) and the tile kernels
// (tile_kernels.h, compiled once per instruction set), and the declarations of those kernels.
#pragma once

#include <cstdint>

namespace fbfast {
namespace cpu {

// The pointers and sizes of one rollout; filled by the host (rollout_cpu.cpp).
template <typename T>
struct TileParams {
  int64_t steps, batch, du, o, h, delay, truncate;  // truncate == 0: full BPTT
  // Row strides of the packed weights and workspaces: a width rounded up to the vector width
  // when that adds at most 1/8, else the width itself (rollout_cpu.cpp, row_stride). Every
  // buffer has one vector of slack after its last row, so whole-vector loads stay inside it.
  int64_t ld_du, ld_o, ld_h;
  const T* x0;  // (min(delay, steps), B, O): only the inputs that are read
  const T* u;  // null when du == 0
  const T* w1u_t;
  const T* w1x_t;
  const T* b1;  // null: no bias
  const T* w2_t;
  const T* b2;  // null: no bias
  T* y;         // forward output
  // Backward only.
  const T* y_saved;
  const T* grad_y;
  const T* w2;
  const T* w1u;
  const T* w1x;
  T* grad_x0;  // null: not wanted
  T* grad_u;   // null: not wanted
};

// One group of tiles accumulates its weight gradients here (transposed where noted);
// the host sums the groups in a fixed order, so results do not depend on the thread count.
template <typename T>
struct TileGrads {
  T* w1_t;  // (Du + O, ld_h) = dW1^T, or null
  T* b1;    // (H), or null
  T* w2;    // (O, ld_h) = dW2, or null
  T* b2;    // (O), or null
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
