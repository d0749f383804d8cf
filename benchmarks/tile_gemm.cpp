// The tile path's register-blocked GEMM (csrc/cpu/tile_kernels.h) alone, single-threaded, at the
// model-based-RL ensemble's widths (benchmarks/mbrl.py: layers of 200, 64-row backward tiles):
// the loop order the kernels use (panel of columns outside, blocks of rows inside) against the
// other (blocks of rows outside), interleaved, GFLOP/s median and best of 4000 pairs.
//
//   g++ -O3 -std=c++20 -Icsrc/cpu benchmarks/tile_gemm.cpp -o /tmp/tile_gemm && /tmp/tile_gemm
//
// Needs a CPU with AVX-512 (the variant compiled here).
#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "tile_params.h"

#pragma GCC target("avx512f,avx512vl,avx512dq,avx2,fma")
#define FBFAST_ISA avx512
#define FBFAST_VEC_BYTES 64
#define FBFAST_MR 8
#include "tile_kernels.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <vector>

using namespace fbfast::cpu::avx512;

// Blocks of rows outside, panels of columns inside.
template <int MR>
void row_blocks(const GemmArgs& g, const float* a, const float* b, float* c) {
  constexpr int W = Vec<float>::kWidth;
  for (int64_t j = 0; j < g.n; j += 2 * W) {
    const int64_t ncols = g.n - j < 2 * W ? g.n - j : 2 * W;
    if (ncols > W)
      gemm_block<float, MR, 2, Epilogue::kNone>(g, a, b + j, a, b, nullptr, nullptr, c + j, ncols);
    else
      gemm_block<float, MR, 1, Epilogue::kNone>(g, a, b + j, a, b, nullptr, nullptr, c + j, ncols);
  }
}

void rows_outside(const GemmArgs& g, const float* a, const float* b, float* c) {
  int64_t i = 0;
  for (; i + FBFAST_MR <= g.m; i += FBFAST_MR) row_blocks<FBFAST_MR>(g, a + i * g.as0, b, c + i * g.ldc);
  for (; i < g.m; ++i) row_blocks<1>(g, a + i * g.as0, b, c + i * g.ldc);
}

int main() {
  if (!__builtin_cpu_supports("avx512f")) {
    std::printf("this CPU has no AVX-512\n");
    return 0;
  }
  const int64_t rows = 64, ld = 208;  // a backward tile's rows; 200 padded to whole vectors
  std::vector<float> a(rows * ld + 64, 0.01f), b(ld * ld + 64, 0.02f), c(ld * ld + 64);
  struct Case {
    const char* name;
    GemmArgs g;
  };
  const Case cases[] = {
      {"layer forward  (64 x 200) (200 x 200)", GemmArgs{.m = rows, .n = 200, .k = 200, .as0 = ld, .as1 = 1, .ldb = ld, .ldc = ld}},
      {"weight grad    (200 x 64) (64 x 200) ",
       GemmArgs{.m = 200, .n = 200, .k = rows, .as0 = 1, .as1 = ld, .ldb = ld, .ldc = ld, .accumulate = true}},
  };
  for (const Case& cs : cases) {
    std::vector<double> t[2];
    for (int rep = 0; rep < 4000; ++rep)
      for (int v = 0; v < 2; ++v) {
        const auto t0 = std::chrono::steady_clock::now();
        for (int it = 0; it < 5; ++it) {
          if (v == 0)
            gemm<float, Epilogue::kNone>(cs.g, a.data(), b.data(), a.data(), b.data(), nullptr, nullptr, c.data());
          else
            rows_outside(cs.g, a.data(), b.data(), c.data());
        }
        t[v].push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / 5);
      }
    const double flops = 2.0 * cs.g.m * cs.g.n * cs.g.k;
    std::printf("%s", cs.name);
    const char* names[2] = {"panels outside (the kernels')", "rows outside"};
    for (int v = 0; v < 2; ++v) {
      std::sort(t[v].begin(), t[v].end());
      std::printf(" | %s: median %.0f, best %.0f GFLOP/s", names[v], flops / t[v][t[v].size() / 2] / 1e9, flops / t[v][0] / 1e9);
    }
    std::printf("\n");
  }
  return 0;
}
