// The "tile" path of the CPU rollout: one batch tile (a few rows) runs all T steps with its
// state in L1, using a register-blocked small GEMM written with GCC/Clang vector extensions.
//
// This header is compiled once per instruction set (tile_kernels_avx512.cpp and
// tile_kernels_avx2.cpp under a `#pragma GCC target`, tile_kernels_base.cpp for plain x86-64 /
// aarch64), each time inside its own namespace FBFAST_ISA, and the host picks one at run time
// (CPUID). To keep the copies from mixing (an AVX2 instantiation of a shared inline function
// could be chosen by the linker for the baseline path), everything it includes is included by
// each tile_kernels_<isa>.cpp before its pragma (the include guards then make the includes
// below no-ops), and no torch header at all: only raw pointers and the C allocator.
//
// Layout conventions (all row-major; the row strides are set by the host, and every packed
// buffer and workspace has one vector of slack after its last row, so a whole-vector load that
// starts inside a row never leaves its buffer): x0 (the rows read, B, F), u (T, B, Du),
// y and grad_y (T, B, O), where consecutive steps lie TileParams::rows_* rows apart (an
// ensemble member's rows inside (T, E, B, .) tensors); each layer's packed weights as
// TileLayer (tile_params.h) describes.
// The activation (csrc/common/act_kind.h) is applied by the GEMM epilogue for ReLU and by a
// vector pass over the tile's rows for the others (vec_math.h); the backward recomputes every
// hidden layer's pre-activation per step and keeps z only where act' needs it.
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

#include "vec_math.h"

enum class Epilogue { kNone, kRelu, kMaskByH, kScale };

// C[i, j] = (C[i, j] if accumulate) + bias[j] + sum_p A[i*as0 + p*as1] * B[p*ldb + j]
//                                              + sum_q A2[i*a2s0 + q] * B2[q*ldb2 + j]
// then, for kRelu, relu (NaN kept, as torch.relu); for kMaskByH, 0 where mask[i, j] <= 0 (as
// torch's threshold_backward, so a NaN activation passes its gradient like the reference); for
// kScale, times mask[i, j] (an activation's derivative).
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
      if constexpr (E == Epilogue::kScale) out = out * load(mask + r * g.ldm + v * W);
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

// One panel of C: the columns [j, j + ncols), ncols <= NV W, over all m rows.
template <typename T, int NV, Epilogue E>
inline void gemm_panel(const GemmArgs& g, const T* a, const T* b, const T* a2, const T* b2,
                       const T* bias, const T* mask, T* c, int64_t ncols) {
  constexpr int kMR = FBFAST_MR;
  int64_t i = 0;
  for (; i + kMR <= g.m; i += kMR)
    gemm_block<T, kMR, NV, E>(g, a + i * g.as0, b, a2 + i * g.a2s0, b2, bias, mask ? mask + i * g.ldm : nullptr,
                              c + i * g.ldc, ncols);
  for (; i < g.m; ++i)
    gemm_block<T, 1, NV, E>(g, a + i * g.as0, b, a2 + i * g.a2s0, b2, bias, mask ? mask + i * g.ldm : nullptr,
                            c + i * g.ldc, ncols);
}

// Panel by panel of 2 W columns, and within a panel block by block of rows: a panel's k x 2 W
// slice of B (25 KB at k = 200 in float) stays in L1 while every row block reads it, where
// row blocks outside would stream all of B from L2 once per block of rows. Each element of C is
// the same sum in the same order either way.
template <typename T, Epilogue E>
void gemm(const GemmArgs& g, const T* a, const T* b, const T* a2, const T* b2, const T* bias,
          const T* mask, T* c) {
  constexpr int W = Vec<T>::kWidth;
  for (int64_t j = 0; j < g.n; j += 2 * W) {
    const int64_t ncols = g.n - j < 2 * W ? g.n - j : 2 * W;
    const T* bias_j = bias ? bias + j : nullptr;
    const T* mask_j = mask ? mask + j : nullptr;
    if (ncols > W)
      gemm_panel<T, 2, E>(g, a, b + j, a2, b2 + j, bias_j, mask_j, c + j, ncols);
    else
      gemm_panel<T, 1, E>(g, a, b + j, a2, b2 + j, bias_j, mask_j, c + j, ncols);
  }
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

// The widest row stride of the hidden layers' activations (0 without hidden layers).
template <typename T>
int64_t widest_hidden(const TileParams<T>& p) {
  int64_t widest = 0;
  for (int64_t l = 0; l + 1 < p.n_layers; ++l)
    if (p.layers[l].ld_out > widest) widest = p.layers[l].ld_out;
  return widest;
}

// out (rows, ld_out) = layer l applied to its input: [u_t ; x_t] for the first layer (two
// operand pairs, not concatenated), else the previous layer's activations `in`. ReLU comes
// from the epilogue; the other activations are the caller's.
// The values step t reads (docs/spec.md §1.2), as the rows of one matrix: x (rows, ldx).
template <typename T>
struct FedBack {
  const T* x;
  int64_t ldx;
  const T* first;  // lag 0's value (the residual's), with row stride ld_first
  int64_t ld_first;
};

// Lag j's value for the rows from r0: a pointer and its row stride. `y` is the forward's output
// (written, or saved for the backward).
template <typename T>
inline void lag_value(const TileParams<T>& p, const T* y, int64_t t, int64_t j, int64_t r0, const T** at,
                      int64_t* ld) {
  const int64_t s = t - p.lags[j];
  if (s < 0) {
    *at = p.x0 + ((p.x0_base[j] + t) * p.rows_x0 + r0) * p.f;
    *ld = p.f;
  } else {
    *at = y + (s * p.rows_y + r0) * p.o;
    *ld = p.o;
  }
}

// With one lag the value is read where it lies; several are gathered into `buf` (rows, ld_x).
template <typename T>
inline FedBack<T> fed_back(const TileParams<T>& p, const T* y, int64_t t, int64_t r0, int64_t rows, T* buf) {
  FedBack<T> fb{};
  lag_value(p, y, t, 0, r0, &fb.first, &fb.ld_first);
  if (p.m == 1) {
    fb.x = fb.first;
    fb.ldx = fb.ld_first;
    return fb;
  }
  for (int64_t j = 0; j < p.m; ++j) {
    const T* src;
    int64_t ld;
    lag_value(p, y, t, j, r0, &src, &ld);
    // A plain loop: rows of a few values each, where a memcpy call per row would cost more.
    for (int64_t i = 0; i < rows; ++i)
      for (int64_t c = 0; c < p.f; ++c) buf[i * p.ld_x + j * p.f + c] = src[i * ld + c];
  }
  fb.x = buf;
  fb.ldx = p.ld_x;
  return fb;
}

template <typename T, Epilogue E>
void layer_forward(const TileParams<T>& p, int64_t l, int64_t rows, const T* ut, const FedBack<T>& fb, const T* in,
                   T* out, int64_t ldc) {
  const TileLayer<T>& ly = p.layers[l];
  if (l == 0) {
    const GemmArgs g{.m = rows, .n = ly.out, .k = p.du, .k2 = p.m * p.f, .as0 = p.du, .as1 = 1, .ldb = ly.ld_out,
                     .a2s0 = fb.ldx, .ldb2 = ly.ld_out, .ldc = ldc};
    const T* x = fb.x;
    gemm<T, E>(g, ut, ly.wt, x, ly.wt + p.du * ly.ld_out, ly.b, nullptr, out);
  } else {
    const GemmArgs g{.m = rows, .n = ly.out, .k = ly.in, .as0 = ly.ld_in, .as1 = 1, .ldb = ly.ld_out, .ldc = ldc};
    gemm<T, E>(g, in, ly.wt, in, ly.wt, ly.b, nullptr, out);
  }
}

// Row r0 of step t of a kept hidden layer l (TileParams::kept): rows `out` wide follow it.
template <typename T>
T* kept_at(const TileParams<T>& p, int64_t l, int64_t t, int64_t r0) {
  return p.kept[l] + (t * p.rows_y + r0) * p.layers[l].out;
}

// Rows [r0, r1) of step t of a kept hidden layer to or from a tile buffer of row stride ld.
template <typename T>
void keep_rows(const TileParams<T>& p, int64_t l, int64_t t, int64_t r0, int64_t rows, const T* buf, int64_t ld) {
  const int64_t out = p.layers[l].out;
  T* dst = kept_at(p, l, t, r0);
  for (int64_t i = 0; i < rows; ++i) std::memcpy(dst + i * out, buf + i * ld, sizeof(T) * out);
}
template <typename T>
void kept_rows(const TileParams<T>& p, int64_t l, int64_t t, int64_t r0, int64_t rows, T* buf, int64_t ld) {
  const int64_t out = p.layers[l].out;
  const T* src = kept_at(p, l, t, r0);
  for (int64_t i = 0; i < rows; ++i) std::memcpy(buf + i * ld, src + i * out, sizeof(T) * out);
}

// Forward of rows [r0, r1): all steps, writing y[t, r0:r1, :] (and the kept layers, if any).
template <typename T>
bool forward_tile(const TileParams<T>& p, int64_t r0, int64_t r1) {
  const int64_t rows = r1 - r0, O = p.o, Du = p.du, L = p.n_layers;
  const bool relu = p.act == static_cast<int>(Act::kRelu);
  const bool keep_z = act_needs_z(static_cast<Act>(p.act));
  // Buffers of the widest hidden layer, two when hidden layers follow each other: layer l writes
  // one while reading the other. (One for a single hidden layer keeps version 1's workspace,
  // which stays below glibc's 128 KiB mmap threshold for 64 rows of 256 floats: a larger one is
  // mapped and zero-filled by page faults on every call.)
  const int64_t widest = widest_hidden(p);
  Scratch<T> buf((L > 2 ? 2 : 1) * rows * widest);
  Scratch<T> xbuf(p.m > 1 ? rows * p.ld_x : 0);
  if (!buf.data || !xbuf.data) return false;
  for (int64_t t = 0; t < p.steps; ++t) {
    const FedBack<T> fb = fed_back(p, p.y, t, r0, rows, xbuf.data);
    const T* ut = Du ? p.u + (t * p.rows_u + r0) * Du : fb.x;
    const T* in = nullptr;
    for (int64_t l = 0; l + 1 < L; ++l) {
      T* h = buf.data + (l % 2) * rows * widest;
      const int64_t ld = p.layers[l].ld_out;
      if (relu) {
        layer_forward<T, Epilogue::kRelu>(p, l, rows, ut, fb, in, h, ld);
      } else {
        layer_forward<T, Epilogue::kNone>(p, l, rows, ut, fb, in, h, ld);
        if (keep_z && p.kept && p.kept[l])
          activation_keep_rows<T>(p.act, p.act_param, h, ld, kept_at(p, l, t, r0), rows, p.layers[l].out);
        else
          activation_forward<T>(p.act, p.act_param, h, h, rows * ld);
      }
      if (!keep_z && p.kept && p.kept[l]) keep_rows(p, l, t, r0, rows, h, ld);
      in = h;
    }
    T* yt = p.y + (t * p.rows_y + r0) * O;
    layer_forward<T, Epilogue::kNone>(p, L - 1, rows, ut, fb, in, yt, O);
    if (p.residual)
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < p.f; ++j) yt[i * O + j] += fb.first[i * fb.ld_first + j];
  }
  return true;
}

// Backward of rows [r0, r1), reverse time, adding this tile's weight gradients into `acc`.
template <typename T>
bool backward_tile(const TileParams<T>& p, int64_t r0, int64_t r1, const TileGrads<T>& acc) {
  const int64_t rows = r1 - r0, O = p.o, Du = p.du, L = p.n_layers, F = p.f;
  const int64_t op = p.ld_o, lf = p.ld_f;
  const bool relu = p.act == static_cast<int>(Act::kRelu);
  const bool keep_z = act_needs_z(static_cast<Act>(p.act));
  // Per hidden layer l: h_l (rows, ld_out_l) and, where act' reads it, z_l; g (rows, ld_o), the
  // adjoint of y_t; adjoint buffers of the widest hidden layer for the walk down the layers (two
  // alternating ones when hidden layers follow each other, as in the forward); ring: slots of
  // (rows, ld_f), slot s % slots holding the adjoint of step s's fed-back value, filled by the
  // steps that read it (all later) and read at step s. slots = min(D, steps): a delay longer
  // than the rollout costs no memory. xbuf: the gathered values of several lags.
  const int64_t slots = p.delay < p.steps ? p.delay : p.steps;
  const int64_t widest = widest_hidden(p);
  int64_t hidden = 0;
  for (int64_t l = 0; l + 1 < L; ++l) hidden += rows * p.layers[l].ld_out;
  const int64_t n_adj = L > 2 ? 2 : L - 1;
  Scratch<T> ws((keep_z ? 2 : 1) * hidden + rows * op + n_adj * rows * widest + slots * rows * lf);
  Scratch<T> xbuf(p.m > 1 ? rows * p.ld_x : 0);
  if (!ws.data || !xbuf.data) return false;
  // h_l, then z_l where act' reads it, layer after layer at the start of ws; once h_l is
  // recomputed, z_l's buffer holds act'(z_l) (activation_value_slope_rows), which the walk down the
  // layers multiplies in (Epilogue::kScale).
  auto h_of = [&](int64_t l) {
    T* at = ws.data;
    for (int64_t i = 0; i < l; ++i) at += (keep_z ? 2 : 1) * rows * p.layers[i].ld_out;
    return at;
  };
  auto z_of = [&](int64_t l) { return keep_z ? h_of(l) + rows * p.layers[l].ld_out : nullptr; };
  T* next = ws.data + (keep_z ? 2 : 1) * hidden;
  T* g = next;
  T* adj_buf[2] = {g + rows * op, g + rows * op + (n_adj > 1 ? rows * widest : 0)};
  T* ring = g + rows * op + n_adj * rows * widest;

  for (int64_t t = p.steps - 1; t >= 0; --t) {
    const FedBack<T> fb = fed_back(p, p.y_saved, t, r0, rows, xbuf.data);
    const T* ut = Du ? p.u + (t * p.rows_u + r0) * Du : fb.x;
    T* slot = ring + (t % slots) * rows * lf;

    // The hidden layers of this step: what the forward kept (act(z) recomputed from a kept z),
    // or recomputed as the forward computed them. Either way the same bits.
    for (int64_t l = 0; l + 1 < L; ++l) {
      const int64_t ld = p.layers[l].ld_out;
      const T* in = l ? h_of(l - 1) : nullptr;
      T* h = h_of(l);
      const bool kept = p.kept && p.kept[l];
      const int64_t out = p.layers[l].out;
      if (kept && keep_z) {  // h, and act'(z) in z's buffer for the walk down the layers
        activation_value_slope_rows<T>(p.act, p.act_param, kept_at(p, l, t, r0), out, h, z_of(l), ld, rows, out);
      } else if (kept) {
        kept_rows(p, l, t, r0, rows, h, ld);
      } else if (relu) {
        layer_forward<T, Epilogue::kRelu>(p, l, rows, ut, fb, in, h, ld);
      } else if (keep_z) {
        layer_forward<T, Epilogue::kNone>(p, l, rows, ut, fb, in, z_of(l), ld);
        activation_value_slope_rows<T>(p.act, p.act_param, z_of(l), ld, h, z_of(l), ld, rows, out);
      } else {
        layer_forward<T, Epilogue::kNone>(p, l, rows, ut, fb, in, h, ld);
        activation_forward<T>(p.act, p.act_param, h, h, rows * ld);
      }
    }

    // g = dL/dy_t: the loss's, plus what the later steps that read y_t[:F] sent back.
    const T* gy = p.grad_y + (t * p.rows_y + r0) * O;
    for (int64_t i = 0; i < rows; ++i) {
      for (int64_t j = 0; j < F; ++j) g[i * op + j] = gy[i * O + j] + slot[i * lf + j];
      for (int64_t j = F; j < O; ++j) g[i * op + j] = gy[i * O + j];
    }
    // Read: from now on the slot collects the adjoint of step t - slots (version 1's feedback
    // overwrites it below instead).
    if (!p.plain) std::memset(slot, 0, sizeof(T) * rows * lf);

    // Down the layers: adj is the adjoint of layer l's output (row stride adj_ld).
    T* adj = g;
    int64_t adj_ld = op;
    for (int64_t l = L - 1; l >= 1; --l) {
      const TileLayer<T>& ly = p.layers[l];
      const T* h_in = h_of(l - 1);  // the layer's input, (rows, ld_in)
      if (acc.w[l]) {  // dW_l += adj^T h_{l-1}
        const GemmArgs gw{.m = ly.out, .n = ly.in, .k = rows, .as0 = 1, .as1 = adj_ld, .ldb = ly.ld_in, .ldc = ly.ld_in,
                          .accumulate = true};
        gemm<T, Epilogue::kNone>(gw, adj, h_in, adj, h_in, nullptr, nullptr, acc.w[l]);
      }
      if (acc.b[l])
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t j = 0; j < ly.out; ++j) acc.b[l][j] += adj[i * adj_ld + j];
      // dz_{l-1} = (adj W_l) * act'(z_{l-1})
      T* dz = adj_buf[(L - 1 - l) % 2];
      const GemmArgs gd{.m = rows, .n = ly.in, .k = ly.out, .as0 = adj_ld, .as1 = 1, .ldb = ly.ld_in, .ldm = ly.ld_in,
                        .ldc = ly.ld_in};
      if (relu) {
        gemm<T, Epilogue::kMaskByH>(gd, adj, ly.w, adj, ly.w, nullptr, h_in, dz);
      } else if (keep_z) {  // z_of holds act'(z) (above)
        gemm<T, Epilogue::kScale>(gd, adj, ly.w, adj, ly.w, nullptr, z_of(l - 1), dz);
      } else {
        gemm<T, Epilogue::kNone>(gd, adj, ly.w, adj, ly.w, nullptr, nullptr, dz);
        activation_backward<T>(p.act, p.act_param, dz, z_of(l - 1), h_in, dz, rows * ly.ld_in);
      }
      adj = dz;
      adj_ld = ly.ld_in;
    }

    const TileLayer<T>& first = p.layers[0];
    const int64_t n0 = first.out, ld0 = first.ld_out;
    if (acc.w[0]) {  // dW0^T += [u_t ; x_t]^T adj
      if (Du) {
        const GemmArgs gu{.m = Du, .n = n0, .k = rows, .as0 = 1, .as1 = Du, .ldb = adj_ld, .ldc = ld0, .accumulate = true};
        gemm<T, Epilogue::kNone>(gu, ut, adj, ut, adj, nullptr, nullptr, acc.w[0]);
      }
      const GemmArgs gx{.m = p.m * F, .n = n0, .k = rows, .as0 = 1, .as1 = fb.ldx, .ldb = adj_ld, .ldc = ld0,
                        .accumulate = true};
      gemm<T, Epilogue::kNone>(gx, fb.x, adj, fb.x, adj, nullptr, nullptr, acc.w[0] + Du * ld0);
    }
    if (acc.b[0])
      for (int64_t i = 0; i < rows; ++i)
        for (int64_t j = 0; j < n0; ++j) acc.b[0][j] += adj[i * adj_ld + j];
    if (p.grad_u && Du) {  // du_t = adj W0u
      const GemmArgs gu{.m = rows, .n = Du, .k = n0, .as0 = adj_ld, .as1 = 1, .ldb = p.ld_du, .ldc = Du};
      gemm<T, Epilogue::kNone>(gu, adj, first.w, adj, first.w, nullptr, nullptr, p.grad_u + (t * p.rows_y + r0) * Du);
    }
    // dx_t = adj W0x: each lag's share to the step that produced the value unless the edges into
    // step t are cut (truncate), or to x0; the residual's dL/dy_t[:F] to lag 0's value alike.
    const bool cut = p.truncate && t % p.truncate == 0;
    if (p.plain) {  // one lag k = delay: the slot just read is y_{t-k}'s
      GemmArgs gx{.m = rows, .n = O, .k = n0, .as0 = adj_ld, .as1 = 1, .ldb = p.ld_x, .ldc = op};
      if (t >= p.delay) {
        if (cut)
          std::memset(slot, 0, sizeof(T) * rows * op);
        else
          gemm<T, Epilogue::kNone>(gx, adj, first.wx, adj, first.wx, nullptr, nullptr, slot);
      } else if (p.grad_x0) {
        gx.ldc = O;
        gemm<T, Epilogue::kNone>(gx, adj, first.wx, adj, first.wx, nullptr, nullptr, p.grad_x0 + (t * p.rows_y + r0) * O);
      }
      continue;
    }
    auto target = [&](int64_t j, int64_t* ld) -> T* {
      const int64_t s = t - p.lags[j];
      *ld = s >= 0 ? lf : F;
      if (s >= 0) return cut ? nullptr : ring + (s % slots) * rows * lf;
      return p.grad_x0 ? p.grad_x0 + ((s + p.delay) * p.rows_y + r0) * F : nullptr;
    };
    if (p.m == 1) {
      int64_t ld;
      if (T* dst = target(0, &ld)) {
        const GemmArgs gx{.m = rows, .n = F, .k = n0, .as0 = adj_ld, .as1 = 1, .ldb = p.ld_x, .ldc = ld,
                          .accumulate = true};
        gemm<T, Epilogue::kNone>(gx, adj, first.wx, adj, first.wx, nullptr, nullptr, dst);
      }
    } else {
      // Every lag's share in one GEMM (dx_t, m F wide, into xbuf: the gathered values were read
      // above), then added to each value's slot.
      const GemmArgs gx{.m = rows, .n = p.m * F, .k = n0, .as0 = adj_ld, .as1 = 1, .ldb = p.ld_x, .ldc = p.ld_x};
      gemm<T, Epilogue::kNone>(gx, adj, first.wx, adj, first.wx, nullptr, nullptr, xbuf.data);
      for (int64_t j = 0; j < p.m; ++j) {
        int64_t ld;
        T* dst = target(j, &ld);
        if (!dst) continue;
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t c = 0; c < F; ++c) dst[i * ld + c] += xbuf.data[i * p.ld_x + j * F + c];
      }
    }
    if (p.residual) {
      int64_t ld;
      T* dst = target(0, &ld);
      if (dst)
        for (int64_t i = 0; i < rows; ++i)
          for (int64_t j = 0; j < F; ++j) dst[i * ld + j] += g[i * op + j];
    }
  }
  return true;
}

}  // namespace FBFAST_ISA
}  // namespace cpu
}  // namespace fbfast
