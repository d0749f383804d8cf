// Portable instantiation of the tile kernels (baseline x86-64 SSE2, aarch64 NEON, ...). 16-byte
// vectors are native on both; wider ones would be lowered through memory (measured 40x slower).
#define FBFAST_ISA base
#define FBFAST_VEC_BYTES 16
#include "tile_kernels.h"

namespace fbfast::cpu::base {
template bool forward_tile<float>(const TileParams<float>&, int64_t, int64_t);
template bool forward_tile<double>(const TileParams<double>&, int64_t, int64_t);
template bool backward_tile<float>(const TileParams<float>&, int64_t, int64_t, const TileGrads<float>&);
template bool backward_tile<double>(const TileParams<double>&, int64_t, int64_t, const TileGrads<double>&);
}  // namespace fbfast::cpu::base
