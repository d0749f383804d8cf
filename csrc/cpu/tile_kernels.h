// The "tile" path of the CPU rollout: one batch tile (a few rows) runs all T steps with its
// state in L1, using a register-blocked small GEMM written with GCC/Clang vector extensions.
//
// This header is compiled twice, once per instruction set (tile_kernels_avx2.cpp with
// `#pragma GCC target("avx2,fma")`, tile_kernels_base.cpp for plain x86-64 / aarch64), each
// time inside its own namespace FBFAST_ISA, and the host picks one at run time (CPUID). To keep
// the two copies from mixing (an AVX2 instantiation of a shared inline function could be chosen
// by the linker for the baseline path), it includes no C++ library header and no torch header:
// only raw pointers and the C allocator.
//
// Layout conventions (all row-major; the row strides ld_h, ld_o, ld_du are set by the host, and
// every packed buffer and workspace has one vector of slack after its last row, so a
// whole-vector load that starts inside a row never leaves its buffer):
//   x0     (min(delay, T), B, O)   u (T, B, Du)      y, grad_y (T, B, O)
//   w1u_t  (Du, ld_h)  = W1[:, :Du]^T          w1x_t (O, ld_h) = W1[:, Du:]^T
//   w2_t   (H, ld_o)   = W2^T                  w2    (O, ld_h)
//   w1u    (H, ld_du)  = W1[:, :Du]            w1x   (H, ld_o) = W1[:, Du:]
//   b1 (H), b2 (O), or null
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>

#include "tile_params.h"

#ifndef FBFAST_ISA
#error "define FBFAST_ISA (the namespace of this instruction-set variant) before including"
#endif
// Vector width in bytes and rows per register block of this variant: 32 / 4 fill the 16
// AVX2 registers with 8 accumulators; 64 / 8 use 16 of the 32 AVX-512 registers; the portable
// build uses 16-byte vectors (SSE2 / NEON).
#ifndef FBFAST_VEC_BYTES
#define FBFAST_VEC_BYTES 32
#endif
#ifndef FBFAST_MR
#define FBFAST_MR 4
#endif

namespace fbfast {
namespace cpu {
namespace FBFAST_ISA {

// FBFAST_VEC_BYTES-byte vectors: one SSE/NEON (16), AVX2 (32) or AVX-512 (64) register.
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(FBFAST_VEC_BYTES)));
  static constexpr int kWidth = FBFAST_VEC_BYTES / sizeof(T);
};

template <typename T>
inline typename Vec<T>::type load(const T* p) {
  typename Vec<T>::type v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}

template <typename T>
inline void store(T* p, typename Vec<T>::type v) {
  __builtin_memcpy(p, &v, sizeof(v));
}

enum class Epilogue { kNone, kRelu, kMaskByH };

// C[i, j] = (C[i, j] if accumulate) + bias[j] + sum_p A[i*as0 + p*as1] * B[p*ldb + j]
//                                              + sum_q A2[i*a2s0 + q] * B2[q*ldb2 + j]
// then, for kRelu, relu (NaN kept, as torch.relu); for kMaskByH, 0 where mask[i, j] <= 0 (as
// torch's threshold_backward, so a NaN activation passes its gradient like the reference).
// The second operand pair (k2 may be 0) lets [u_t ; x_t] enter without being concatenated.
// Only the first n columns of C are written; B, B2, bias and mask must be readable up to the
// next multiple of the vector width past each row's start (the host leaves kSlackBytes >= every
// variant's width after the last row of each buffer; lanes past n are computed and dropped).
struct GemmArgs {
  int64_t m, n, k, k2;
  int64_t as0, as1, ldb, a2s0, ldb2, ldm, ldc;
  bool accumulate;
};

template <typename T, int MR, int NV, Epilogue E>
inline void gemm_block(const GemmArgs& g, const T* __restrict__ a, const T* __restrict__ b,
                       const T* __restrict__ a2, const T* __restrict__ b2,
                       const T* __restrict__ bias, const T* __restrict__ mask, T* __restrict__ c,
                       int64_t ncols) {
  using V = typename Vec<T>::type;
  constexpr int W = Vec<T>::kWidth;
  V acc[MR][NV];
  for (int v = 0; v < NV; ++v) {
    V init = bias ? load(bias + v * W) : V{};
    for (int r = 0; r < MR; ++r) acc[r][v] = init;
  }
  for (int64_t p = 0; p < g.k; ++p) {
    V bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = load(b + p * g.ldb + v * W);
    for (int r = 0; r < MR; ++r) {
      const T av = a[r * g.as0 + p * g.as1];
      for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
    }
  }
  for (int64_t q = 0; q < g.k2; ++q) {
    V bv[NV];
    for (int v = 0; v < NV; ++v) bv[v] = load(b2 + q * g.ldb2 + v * W);
    for (int r = 0; r < MR; ++r) {
      const T av = a2[r * g.a2s0 + q];
      for (int v = 0; v < NV; ++v) acc[r][v] += av * bv[v];
    }
  }
  const V zero{};
  for (int r = 0; r < MR; ++r) {
    T* crow = c + r * g.ldc;
    for (int v = 0; v < NV; ++v) {
      V out = acc[r][v];
      if constexpr (E == Epilogue::kRelu) out = (out <= zero) ? zero : out;
      if constexpr (E == Epilogue::kMaskByH) out = (load(mask + r * g.ldm + v * W) <= zero) ? zero : out;
      const int64_t valid = ncols - v * W;
      if (valid >= W) {
        if (g.accumulate) out += load(crow + v * W);
        store(crow + v * W, out);
      } else {
        T tmp[W];
        store(tmp, out);
        for (int64_t j = 0; j < valid; ++j) crow[v * W + j] = g.accumulate ? crow[v * W + j] + tmp[j] : tmp[j];
      }
    }
  }
}

template <typename T, int MR, Epilogue E>
inline void gemm_rows(const GemmArgs& g, const T* a, const T* b, const T* a2, const T* b2,
                      const T* bias, const T* mask, T* c) {
  constexpr int W = Vec<T>::kWidth;
  for (int64_t j = 0; j < g.n; j += 2 * W) {
    const int64_t ncols = g.n - j < 2 * W ? g.n - j : 2 * W;
    const T* bias_j = bias ? bias + j : nullptr;
    const T* mask_j = mask ? mask + j : nullptr;
    if (ncols > W)
      gemm_block<T, MR, 2, E>(g, a, b + j, a2, b2 + j, bias_j, mask_j, c + j, ncols);
    else
      gemm_block<T, MR, 1, E>(g, a, b + j, a2, b2 + j, bias_j, mask_j, c + j, ncols);
  }
}

template <typename T, Epilogue E>
void gemm(const GemmArgs& g, const T* a, const T* b, const T* a2, const T* b2, const T* bias,
          const T* mask, T* c) {
  constexpr int kMR = FBFAST_MR;
  int64_t i = 0;
  for (; i + kMR <= g.m; i += kMR)
    gemm_rows<T, kMR, E>(g, a + i * g.as0, b, a2 + i * g.a2s0, b2, bias, mask ? mask + i * g.ldm : nullptr, c + i * g.ldc);
  for (; i < g.m; ++i)
    gemm_rows<T, 1, E>(g, a + i * g.as0, b, a2 + i * g.a2s0, b2, bias, mask ? mask + i * g.ldm : nullptr, c + i * g.ldc);
}

// Workspace of one tile, from the C allocator (see the header comment for why not std::vector),
// with one vector of slack after its n elements.
template <typename T>
struct Scratch {
  T* data;
  explicit Scratch(int64_t n) : data(static_cast<T*>(std::calloc(n + Vec<T>::kWidth, sizeof(T)))) {}
  ~Scratch() { std::free(data); }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
};

// Forward of rows [r0, r1): all steps, writing y[t, r0:r1, :].
template <typename T>
bool forward_tile(const TileParams<T>& p, int64_t r0, int64_t r1) {
  const int64_t rows = r1 - r0, B = p.batch, O = p.o, Du = p.du, k = p.delay;
  Scratch<T> hbuf(rows * p.ld_h);
  if (!hbuf.data) return false;
  T* h = hbuf.data;
  for (int64_t t = 0; t < p.steps; ++t) {
    const T* x = t < k ? p.x0 + (t * B + r0) * O : p.y + ((t - k) * B + r0) * O;
    const T* ut = Du ? p.u + (t * B + r0) * Du : x;
    // h = relu(b1 + u_t W1u^T + x_t W1x^T)
    GemmArgs g1{rows, p.h, Du, O, Du, 1, p.ld_h, O, p.ld_h, 0, p.ld_h, false};
    gemm<T, Epilogue::kRelu>(g1, ut, p.w1u_t ? p.w1u_t : p.w1x_t, x, p.w1x_t, p.b1, nullptr, h);
    // y_t = b2 + h W2^T
    GemmArgs g2{rows, O, p.h, 0, p.ld_h, 1, p.ld_o, 0, p.ld_o, 0, O, false};
    gemm<T, Epilogue::kNone>(g2, h, p.w2_t, h, p.w2_t, p.b2, nullptr, p.y + (t * B + r0) * O);
  }
  return true;
}

// Backward of rows [r0, r1), reverse time, adding this tile's weight gradients into `acc`.
template <typename T>
bool backward_tile(const TileParams<T>& p, int64_t r0, int64_t r1, const TileGrads<T>& acc) {
  const int64_t rows = r1 - r0, B = p.batch, O = p.o, Du = p.du, H = p.h, k = p.delay;
  const int64_t hp = p.ld_h, op = p.ld_o;  // row strides of the workspaces
  // h, dz: (rows, ld_h); g: (rows, ld_o); ring: slots of (rows, ld_o) holding the adjoint
  // flowing into y_{t-k} from step t until step t-k consumes it. Slot t % k < min(k, steps), so
  // a delay longer than the rollout costs no memory.
  const int64_t slots = k < p.steps ? k : p.steps;
  Scratch<T> ws(rows * (2 * hp + op) + slots * rows * op);
  if (!ws.data) return false;
  T* h = ws.data;
  T* dz = h + rows * hp;
  T* g = dz + rows * hp;
  T* ring = g + rows * op;
  for (int64_t t = p.steps - 1; t >= 0; --t) {
    const T* x = t < k ? p.x0 + (t * B + r0) * O : p.y_saved + ((t - k) * B + r0) * O;
    const T* ut = Du ? p.u + (t * B + r0) * Du : x;
    T* slot = ring + (t % k) * rows * op;

    GemmArgs gz{rows, H, Du, O, Du, 1, hp, O, hp, 0, hp, false};
    gemm<T, Epilogue::kRelu>(gz, ut, p.w1u_t ? p.w1u_t : p.w1x_t, x, p.w1x_t, p.b1, nullptr, h);

    const T* gy = p.grad_y + (t * B + r0) * O;
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t j = 0; j < O; ++j) g[i * op + j] = gy[i * O + j] + slot[i * op + j];

    // dz = (g W2) * (h > 0)
    GemmArgs gd{rows, H, O, 0, op, 1, hp, 0, hp, hp, hp, false};
    gemm<T, Epilogue::kMaskByH>(gd, g, p.w2, g, p.w2, nullptr, h, dz);

    if (acc.w2) {  // dW2 += g^T h
      GemmArgs gw{O, H, rows, 0, 1, op, hp, 0, hp, 0, hp, true};
      gemm<T, Epilogue::kNone>(gw, g, h, g, h, nullptr, nullptr, acc.w2);
    }
    if (acc.b2)
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < O; ++j) acc.b2[j] += g[i * op + j];
    if (acc.w1_t) {  // dW1^T += [u_t ; x_t]^T dz
      if (Du) {
        GemmArgs gu{Du, H, rows, 0, 1, Du, hp, 0, hp, 0, hp, true};
        gemm<T, Epilogue::kNone>(gu, ut, dz, ut, dz, nullptr, nullptr, acc.w1_t);
      }
      GemmArgs gx{O, H, rows, 0, 1, O, hp, 0, hp, 0, hp, true};
      gemm<T, Epilogue::kNone>(gx, x, dz, x, dz, nullptr, nullptr, acc.w1_t + Du * hp);
    }
    if (acc.b1)
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < H; ++j) acc.b1[j] += dz[i * hp + j];
    if (p.grad_u && Du) {  // du_t = dz W1u
      GemmArgs gu{rows, Du, H, 0, hp, 1, p.ld_du, 0, p.ld_du, 0, Du, false};
      gemm<T, Epilogue::kNone>(gu, dz, p.w1u, dz, p.w1u, nullptr, nullptr, p.grad_u + (t * B + r0) * Du);
    }
    // dx_t = dz W1x: to y_{t-k} unless the edge is cut (truncate), or to x0[t].
    GemmArgs gx{rows, O, H, 0, hp, 1, op, 0, op, 0, op, false};
    if (t >= k) {
      if (p.truncate && t % p.truncate == 0)
        std::memset(slot, 0, sizeof(T) * rows * op);
      else
        gemm<T, Epilogue::kNone>(gx, dz, p.w1x, dz, p.w1x, nullptr, nullptr, slot);
    } else if (p.grad_x0) {
      gx.ldc = O;
      gemm<T, Epilogue::kNone>(gx, dz, p.w1x, dz, p.w1x, nullptr, nullptr, p.grad_x0 + (t * B + r0) * O);
    }
  }
  return true;
}

}  // namespace FBFAST_ISA
}  // namespace cpu
}  // namespace fbfast
