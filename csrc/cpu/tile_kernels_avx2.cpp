// AVX2 + FMA instantiation of the tile kernels, chosen at run time when CPUID reports both.
// The target pragma (not a -mavx2 flag) keeps the rest of the extension baseline x86-64.
#if defined(__x86_64__) || defined(_M_X64)
// Library headers first, outside the target pragma, so no inline library code is compiled
// for AVX2 here and later picked by the linker for the baseline path.
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "tile_params.h"

#pragma GCC target("avx2,fma")
#define FBFAST_ISA avx2
#include "tile_kernels.h"

namespace fbfast::cpu::avx2 {
template bool forward_tile<float>(const TileParams<float>&, int64_t, int64_t);
template bool forward_tile<double>(const TileParams<double>&, int64_t, int64_t);
template bool backward_tile<float>(const TileParams<float>&, int64_t, int64_t, const TileGrads<float>&);
template bool backward_tile<double>(const TileParams<double>&, int64_t, int64_t, const TileGrads<double>&);
}  // namespace fbfast::cpu::avx2
#endif
