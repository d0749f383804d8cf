// AVX-512 instantiation of the tile kernels (64-byte vectors, 8-row register blocks), chosen
// at run time when CPUID reports AVX-512F/VL/DQ; FBFAST_CPU_ISA=avx2|base pins a narrower one.
#if defined(__x86_64__) || defined(_M_X64)
// Library headers first, outside the target pragma (see tile_kernels_avx2.cpp).
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "tile_params.h"

#pragma GCC target("avx512f,avx512vl,avx512dq,avx2,fma")
#define FBFAST_ISA avx512
#define FBFAST_VEC_BYTES 64
#define FBFAST_MR 8
#include "tile_kernels.h"

namespace fbfast::cpu::avx512 {
template bool forward_tile<float>(const TileParams<float>&, int64_t, int64_t);
template bool forward_tile<double>(const TileParams<double>&, int64_t, int64_t);
template bool backward_tile<float>(const TileParams<float>&, int64_t, int64_t, const TileGrads<float>&);
template bool backward_tile<double>(const TileParams<double>&, int64_t, int64_t, const TileGrads<double>&);
}  // namespace fbfast::cpu::avx512
#endif
