// Portable instantiation of the tile kernels (baseline x86-64 SSE2, aarch64 NEON, ...): the
// vector-extension code compiles to whatever the target has.
#define FBFAST_ISA base
#include "tile_kernels.h"

namespace fbfast::cpu::base {
template bool forward_tile<float>(const TileParams<float>&, int64_t, int64_t);
template bool forward_tile<double>(const TileParams<double>&, int64_t, int64_t);
template bool backward_tile<float>(const TileParams<float>&, int64_t, int64_t, const TileGrads<float>&);
template bool backward_tile<double>(const TileParams<double>&, int64_t, int64_t, const TileGrads<double>&);
}  // namespace fbfast::cpu::base
