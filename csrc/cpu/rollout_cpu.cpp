// CPU host code of the fused rollout: argument checks, layout, choice of path, threading.
//
// Two paths compute the same recurrence (SPEC §1):
//  * tile path (small widths): batch rows are independent, so each thread takes tiles of rows
//    and runs the whole serial time loop on them with the tile's state in L1
//    (tile_kernels.h). Weight gradients are summed per fixed group of tiles, then the groups
//    in order, so gradients are bitwise identical for any thread count.
//  * BLAS path (large widths): the time loop runs outside and every step is a full-batch GEMM
//    (MKL/OpenBLAS through ATen, itself multi-threaded) with a fused bias+ReLU epilogue. The
//    backward recomputes z for a chunk of steps in one GEMM and forms dW1, dW2, du as a few
//    GEMMs over chunk_steps x B rows; only the feedback adjoint is walked step by step.
// The crossover between them was measured with benchmarks/crossover.py (see kTileMaxWork).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../rollout_checks.h"
#include "tile_params.h"

namespace fbfast::cpu {
namespace {

// Packed weights and workspaces are padded to this many bytes: the widest vector of any variant.
constexpr int64_t kPadBytes = 64;
// Backward tiles have a size fixed by the shape alone (so a fixed summation order of weight
// gradients for any thread count): 16 rows, or 64 for wide layers, where each step's rank-k
// update of the (O x H) and ((Du + O) x H) gradient accumulators must amortise reading them.
constexpr int64_t kBackwardTileRows = 16;
constexpr int64_t kWideBackwardTileRows = 64;
constexpr int64_t kMaxGroups = 8;
// "Work" is one step's multiply-adds per batch row, H * (Du + 2 O). With AVX2 or AVX-512 the
// tile path beat per-step MKL GEMMs at every width measured, up to (O, H) = (256, 512)
// (benchmarks/crossover.py; MKL does not use AVX-512 on this project's AMD CPUs). The portable
// build loses to BLAS above this work, and wide layers switch to wide backward tiles above it.
constexpr int64_t kTileMaxWork = 32768;
// Rows per backward chunk of the BLAS path: large enough for efficient GEMMs, small enough that
// the chunk buffers (rows x (2H + O)) stay a few MB and are reused across chunks.
constexpr int64_t kChunkRows = 4096;

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

enum class Isa { kBase, kAvx2, kAvx512 };

Isa detect_isa() {
#if defined(__x86_64__) || defined(_M_X64)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq"))
    return Isa::kAvx512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
#endif
  return Isa::kBase;
}

// The widest variant this CPU runs; FBFAST_CPU_ISA=avx2|base pins a narrower one (the tests
// run every variant on one machine). Read per call so that tests can switch it.
Isa active_isa() {
  static const Isa best = detect_isa();
  const char* env = std::getenv("FBFAST_CPU_ISA");
  if (env && std::strcmp(env, "base") == 0) return Isa::kBase;
  if (env && std::strcmp(env, "avx2") == 0 && best != Isa::kBase) return Isa::kAvx2;
  return best;
}

enum class Path { kTile, kBlas };

// FBFAST_CPU_PATH=tile|blas overrides the measured rule (tests cover both paths).
Path choose_path(int64_t du, int64_t o, int64_t h) {
  const char* env = std::getenv("FBFAST_CPU_PATH");
  if (env && std::strcmp(env, "tile") == 0) return Path::kTile;
  if (env && std::strcmp(env, "blas") == 0) return Path::kBlas;
  if (active_isa() != Isa::kBase) return Path::kTile;
  return h * (du + 2 * o) <= kTileMaxWork ? Path::kTile : Path::kBlas;
}

void check_inputs(const at::Tensor& x0, const std::optional<at::Tensor>& u, const at::Tensor& w1,
                  const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                  const std::optional<at::Tensor>& b2, int64_t steps, int64_t delay,
                  int64_t truncate) {
  check_rollout_args(x0, u, w1, b1, w2, b2, steps, delay, truncate);
  const auto dtype = x0.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble,
              "fbfast::rollout (CPU kernel): dtype must be float32 or float64, got ", dtype);
}

// dst (rows, dst_ld) <- src^T or src, zero-padded; src is a row-major (src_rows, src_cols)
// block with row stride `ld`. Raw loops: these run on every call and ATen ops would cost more
// than the whole rollout at small shapes.
template <typename T>
void pack(const T* src, int64_t src_rows, int64_t src_cols, int64_t ld, bool transpose, T* dst,
          int64_t dst_ld) {
  const int64_t rows = transpose ? src_cols : src_rows, cols = transpose ? src_rows : src_cols;
  for (const auto i : c10::irange(rows)) {
    T* d = dst + i * dst_ld;
    for (const auto j : c10::irange(cols)) d[j] = transpose ? src[j * ld + i] : src[i * ld + j];
    for (int64_t j = cols; j < dst_ld; ++j) d[j] = T(0);
  }
}

// Weights and biases laid out for the tile kernels (see tile_kernels.h), in one buffer.
template <typename T>
struct PackedWeights {
  std::vector<T> buf;
  const T *w1u_t = nullptr, *w1x_t = nullptr, *w2_t = nullptr, *b1 = nullptr, *b2 = nullptr;
  const T *w2 = nullptr, *w1u = nullptr, *w1x = nullptr;

  PackedWeights(const TileParams<T>& p, const T* w1, const T* b1_src, const T* w2_src,
                const T* b2_src, bool for_backward) {
    const int64_t du = p.du, o = p.o, h = p.h, ld1 = du + o;
    const int64_t n_fwd = (du + o) * p.h_pad + h * p.o_pad + p.h_pad + p.o_pad;
    const int64_t n_bwd = for_backward ? o * p.h_pad + h * p.du_pad + h * p.o_pad : 0;
    buf.resize(n_fwd + n_bwd);
    T* d = buf.data();
    pack(w1, h, du, ld1, true, d, p.h_pad);
    w1u_t = du ? d : nullptr;
    d += du * p.h_pad;
    pack(w1 + du, h, o, ld1, true, d, p.h_pad);
    w1x_t = d;
    d += o * p.h_pad;
    pack(w2_src, o, h, h, true, d, p.o_pad);
    w2_t = d;
    d += h * p.o_pad;
    if (b1_src) pack(b1_src, 1, h, h, false, d, p.h_pad);
    b1 = b1_src ? d : nullptr;
    d += p.h_pad;
    if (b2_src) pack(b2_src, 1, o, o, false, d, p.o_pad);
    b2 = b2_src ? d : nullptr;
    d += p.o_pad;
    if (!for_backward) return;
    pack(w2_src, o, h, h, false, d, p.h_pad);
    w2 = d;
    d += o * p.h_pad;
    pack(w1, h, du, ld1, false, d, p.du_pad);
    w1u = d;
    d += h * p.du_pad;
    pack(w1 + du, h, o, ld1, false, d, p.o_pad);
    w1x = d;
  }
};

template <typename T>
TileParams<T> make_params(const at::Tensor& x0, const at::Tensor& u, int64_t steps, int64_t H,
                          int64_t delay, int64_t truncate) {
  constexpr int64_t W = kPadBytes / sizeof(T);
  TileParams<T> p{};
  p.steps = steps;
  p.batch = x0.size(1);
  p.o = x0.size(2);
  p.du = u.defined() ? u.size(2) : 0;
  p.h = H;
  p.delay = delay;
  p.truncate = truncate;
  p.du_pad = round_up(p.du, W);
  p.o_pad = round_up(p.o, W);
  p.h_pad = round_up(H, W);
  p.x0 = x0.data_ptr<T>();
  p.u = p.du ? u.data_ptr<T>() : nullptr;
  return p;
}

template <typename T>
bool run_forward_tile(Isa isa, const TileParams<T>& p, int64_t r0, int64_t r1) {
#if defined(__x86_64__) || defined(_M_X64)
  if (isa == Isa::kAvx512) return avx512::forward_tile<T>(p, r0, r1);
  if (isa == Isa::kAvx2) return avx2::forward_tile<T>(p, r0, r1);
#endif
  return base::forward_tile<T>(p, r0, r1);
}

template <typename T>
bool run_backward_tile(Isa isa, const TileParams<T>& p, int64_t r0, int64_t r1, const TileGrads<T>& g) {
#if defined(__x86_64__) || defined(_M_X64)
  if (isa == Isa::kAvx512) return avx512::backward_tile<T>(p, r0, r1, g);
  if (isa == Isa::kAvx2) return avx2::backward_tile<T>(p, r0, r1, g);
#endif
  return base::backward_tile<T>(p, r0, r1, g);
}

at::Tensor opt_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

// ---------------------------------------------------------------------------------------------
// Forward

template <typename T>
void forward_tile_path(const at::Tensor& x0, const at::Tensor& u, const at::Tensor& w1,
                       const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                       int64_t steps, int64_t delay, at::Tensor& y) {
  TileParams<T> p = make_params<T>(x0, u, steps, w2.size(1), delay, 0);
  PackedWeights<T> pw(p, w1.data_ptr<T>(), b1.defined() ? b1.data_ptr<T>() : nullptr,
                      w2.data_ptr<T>(), b2.defined() ? b2.data_ptr<T>() : nullptr, false);
  p.w1u_t = pw.w1u_t;
  p.w1x_t = pw.w1x_t;
  p.w2_t = pw.w2_t;
  p.b1 = pw.b1;
  p.b2 = pw.b2;
  p.y = y.data_ptr<T>();
  // Rows are independent and each row's arithmetic does not depend on its tile, so the forward
  // tile size may follow the thread count: about one tile per thread, 4..64 rows.
  const int64_t B = p.batch;
  const int64_t rows = std::min<int64_t>(64, std::max<int64_t>(4, round_up((B + at::get_num_threads() - 1) / at::get_num_threads(), 4)));
  const int64_t ntiles = (B + rows - 1) / rows;
  const Isa isa = active_isa();
  std::atomic<bool> ok{true};
  at::parallel_for(0, ntiles, 1, [&](int64_t t0, int64_t t1) {
    for (int64_t i = t0; i < t1; ++i)
      if (!run_forward_tile<T>(isa, p, i * rows, std::min(B, (i + 1) * rows))) ok = false;
  });
  TORCH_CHECK(ok, "fbfast::rollout_forward: out of memory for the tile workspace");
}

// out = relu(out + b) in one pass over the GEMM result: the fused epilogue of the first layer.
void bias_relu_(at::Tensor& out, const at::Tensor& b) {
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "fbfast_bias_relu", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t* bias = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
    const int64_t n = out.size(1);
    at::parallel_for(0, out.size(0), 64, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        scalar_t* row = o + r * n;
        for (int64_t j = 0; j < n; ++j) {
          const scalar_t z = bias ? row[j] + bias[j] : row[j];
          row[j] = z <= scalar_t(0) ? scalar_t(0) : z;  // keeps NaN, as torch.relu
        }
      }
    });
  });
}

// h = relu([u ; x] W1^T + b1) for a block of rows (u undefined when Du == 0); h contiguous.
void first_layer_(at::Tensor& h, const at::Tensor& u, const at::Tensor& x, const at::Tensor& w1u,
                  const at::Tensor& w1x, const at::Tensor& b1) {
  at::mm_out(h, x, w1x.t());
  if (u.defined()) h.addmm_(u, w1u.t());
  bias_relu_(h, b1);
}

void forward_blas_path(const at::Tensor& x0, const at::Tensor& u, const at::Tensor& w1,
                       const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                       int64_t steps, int64_t delay, at::Tensor& y) {
  const int64_t du = u.defined() ? u.size(2) : 0, B = x0.size(1), H = w2.size(1);
  const at::Tensor w1u = w1.narrow(1, 0, du), w1x = w1.narrow(1, du, w1.size(1) - du);
  at::Tensor h = at::empty({B, H}, y.options());
  for (const auto t : c10::irange(steps)) {
    const at::Tensor x = t < delay ? x0.select(0, t) : y.select(0, t - delay);
    first_layer_(h, du ? u.select(0, t) : at::Tensor(), x, w1u, w1x, b1);
    at::Tensor yt = y.select(0, t);
    if (b2.defined())
      at::addmm_out(yt, b2, h, w2.t());
    else
      at::mm_out(yt, h, w2.t());
  }
}

at::Tensor rollout_forward_cpu(const at::Tensor& x0_in, const std::optional<at::Tensor>& u_in,
                               const at::Tensor& w1_in, const std::optional<at::Tensor>& b1_in,
                               const at::Tensor& w2_in, const std::optional<at::Tensor>& b2_in,
                               int64_t steps, int64_t delay, int64_t truncate) {
  check_inputs(x0_in, u_in, w1_in, b1_in, w2_in, b2_in, steps, delay, truncate);
  const at::Tensor x0 = x0_in.contiguous(), w1 = w1_in.contiguous(), w2 = w2_in.contiguous();
  const at::Tensor u = opt_or_undefined(u_in), b1 = opt_or_undefined(b1_in), b2 = opt_or_undefined(b2_in);
  const int64_t B = x0.size(1), O = x0.size(2), H = w2.size(1);
  at::Tensor y = at::empty({steps, B, O}, x0.options());
  if (steps == 0 || B == 0 || O == 0) return y;
  const int64_t du = u.defined() ? u.size(2) : 0;
  if (choose_path(du, O, H) == Path::kTile) {
    AT_DISPATCH_FLOATING_TYPES(x0.scalar_type(), "fbfast_rollout_forward_tile", [&] {
      forward_tile_path<scalar_t>(x0, u, w1, b1, w2, b2, steps, delay, y);
    });
  } else {
    // The mm_out on y.select(0, t) fills the matrix in place; with H == 0 it writes b2 or 0.
    forward_blas_path(x0, u, w1, b1, w2, b2, steps, delay, y);
  }
  return y;
}

// ---------------------------------------------------------------------------------------------
// Backward

struct Grads {
  at::Tensor x0, u, w1, b1, w2, b2;
};

template <typename T>
void backward_tile_path(const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& x0,
                        const at::Tensor& u, const at::Tensor& w1, const at::Tensor& b1,
                        const at::Tensor& w2, int64_t delay, int64_t truncate, Grads& out) {
  const int64_t steps = y.size(0);
  TileParams<T> p = make_params<T>(x0, u, steps, w2.size(1), delay, truncate);
  PackedWeights<T> pw(p, w1.data_ptr<T>(), b1.defined() ? b1.data_ptr<T>() : nullptr,
                      w2.data_ptr<T>(), nullptr, true);
  p.w1u_t = pw.w1u_t;
  p.w1x_t = pw.w1x_t;
  p.b1 = pw.b1;
  p.w2 = pw.w2;
  p.w1u = pw.w1u;
  p.w1x = pw.w1x;
  p.y_saved = y.data_ptr<T>();
  p.grad_y = grad_y.data_ptr<T>();
  p.grad_x0 = out.x0.defined() ? out.x0.data_ptr<T>() : nullptr;
  p.grad_u = out.u.defined() ? out.u.data_ptr<T>() : nullptr;

  const int64_t B = p.batch, du = p.du, O = p.o, H = p.h, hp = p.h_pad, op = p.o_pad;
  const int64_t tile_rows = H * (du + 2 * O) > kTileMaxWork ? kWideBackwardTileRows : kBackwardTileRows;
  const int64_t ntiles = (B + tile_rows - 1) / tile_rows;
  const int64_t groups = std::min(ntiles, kMaxGroups);
  const int64_t n_w1 = out.w1.defined() ? (du + O) * hp : 0, n_b1 = out.b1.defined() ? hp : 0;
  const int64_t n_w2 = out.w2.defined() ? O * hp : 0, n_b2 = out.b2.defined() ? op : 0;
  const int64_t per_group = n_w1 + n_b1 + n_w2 + n_b2;
  std::vector<T> acc(static_cast<size_t>(groups * per_group), T(0));
  const Isa isa = active_isa();
  std::atomic<bool> ok{true};
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    for (int64_t g = g0; g < g1; ++g) {
      T* base = acc.data() + g * per_group;
      TileGrads<T> tg{n_w1 ? base : nullptr, n_b1 ? base + n_w1 : nullptr,
                      n_w2 ? base + n_w1 + n_b1 : nullptr, n_b2 ? base + n_w1 + n_b1 + n_w2 : nullptr};
      // Tiles [g*ntiles/groups, (g+1)*ntiles/groups) in order: a fixed summation order.
      for (int64_t i = g * ntiles / groups; i < (g + 1) * ntiles / groups; ++i)
        if (!run_backward_tile<T>(isa, p, i * tile_rows, std::min(B, (i + 1) * tile_rows), tg))
          ok = false;
    }
  });
  TORCH_CHECK(ok, "fbfast::rollout_backward: out of memory for the tile workspace");
  for (int64_t g = 1; g < groups; ++g)
    for (int64_t i = 0; i < per_group; ++i) acc[i] += acc[g * per_group + i];
  const T* sum = acc.data();
  if (n_w1) {  // dW1[h, c] = (dW1^T)[c, h]
    T* d = out.w1.data_ptr<T>();
    for (int64_t h = 0; h < H; ++h)
      for (int64_t c = 0; c < du + O; ++c) d[h * (du + O) + c] = sum[c * hp + h];
  }
  if (n_b1) std::memcpy(out.b1.data_ptr<T>(), sum + n_w1, sizeof(T) * H);
  if (n_w2) {
    T* d = out.w2.data_ptr<T>();
    for (int64_t o = 0; o < O; ++o) std::memcpy(d + o * H, sum + n_w1 + n_b1 + o * hp, sizeof(T) * H);
  }
  if (n_b2) std::memcpy(out.b2.data_ptr<T>(), sum + n_w1 + n_b1 + n_w2, sizeof(T) * O);
}

// out = a (+ b), zeroed where mask <= 0 (torch's relu backward, so NaN passes), and
// col_sum += the column sums of out: the elementwise work of one backward step in one pass
// over memory instead of three (add, threshold_backward, sum). Parallel over column blocks,
// each column summed by one thread in row order (in double): identical for any thread count.
void fused_rows_(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& mask,
                 at::Tensor& col_sum) {
  constexpr int64_t kCols = 64;
  const int64_t rows = out.size(0), cols = out.size(1);
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "fbfast_fused_rows", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t* pa = a.data_ptr<scalar_t>();
    const scalar_t* pb = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
    const scalar_t* pm = mask.defined() ? mask.data_ptr<scalar_t>() : nullptr;
    scalar_t* ps = col_sum.defined() ? col_sum.data_ptr<scalar_t>() : nullptr;
    at::parallel_for(0, (cols + kCols - 1) / kCols, 1, [&](int64_t c0, int64_t c1) {
      for (int64_t cb = c0; cb < c1; ++cb) {
        const int64_t j0 = cb * kCols, nj = std::min(kCols, cols - j0);
        double acc[kCols] = {};
        for (int64_t r = 0; r < rows; ++r) {
          const int64_t off = r * cols + j0;
          for (int64_t j = 0; j < nj; ++j) {
            scalar_t v = pa[off + j];
            if (pb) v += pb[off + j];
            if (pm && pm[off + j] <= scalar_t(0)) v = scalar_t(0);
            o[off + j] = v;
            acc[j] += v;
          }
        }
        if (ps)
          for (int64_t j = 0; j < nj; ++j) ps[j0 + j] += static_cast<scalar_t>(acc[j]);
      }
    });
  });
}

void backward_blas_path(const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& x0,
                        const at::Tensor& u, const at::Tensor& w1, const at::Tensor& b1,
                        const at::Tensor& w2, int64_t delay, int64_t truncate, Grads& out) {
  const int64_t steps = y.size(0), B = y.size(1), O = y.size(2), H = w2.size(1);
  const int64_t du = u.defined() ? u.size(2) : 0;
  const at::Tensor w1u = w1.narrow(1, 0, du), w1x = w1.narrow(1, du, O);
  const int64_t chunk = std::min(steps, std::max<int64_t>(1, kChunkRows / std::max<int64_t>(B, 1)));
  const auto opts = y.options();
  at::Tensor h_buf = at::empty({chunk, B, H}, opts), dz_buf = at::empty({chunk, B, H}, opts);
  at::Tensor g_buf = at::empty({chunk, B, O}, opts);
  // Adjoint into y_{t-k}, slot t % k; t % k < min(k, steps), so no more slots are needed.
  at::Tensor ring = at::zeros({std::min(delay, steps), B, O}, opts);
  if (out.w1.defined()) out.w1.zero_();
  if (out.b1.defined()) out.b1.zero_();
  if (out.w2.defined()) out.w2.zero_();
  if (out.b2.defined()) out.b2.zero_();
  at::Tensor dw1u = out.w1.defined() ? out.w1.narrow(1, 0, du) : at::Tensor();
  at::Tensor dw1x = out.w1.defined() ? out.w1.narrow(1, du, O) : at::Tensor();

  for (int64_t t1 = steps; t1 > 0; t1 -= chunk) {
    const int64_t t0 = std::max<int64_t>(0, t1 - chunk), n = t1 - t0, rows = n * B;
    // x_t for t in [t0, t1): x0[t] while t < k, then y[t - k].
    at::Tensor xc;
    if (t0 >= delay) {
      xc = y.narrow(0, t0 - delay, n).reshape({rows, O});
    } else {
      std::vector<at::Tensor> parts{x0.narrow(0, t0, std::min(delay, t1) - t0)};
      if (t1 > delay) parts.push_back(y.narrow(0, 0, t1 - delay));
      xc = at::cat(parts, 0).reshape({rows, O});
    }
    at::Tensor uc = du ? u.narrow(0, t0, n).reshape({rows, du}) : at::Tensor();
    at::Tensor hc = h_buf.narrow(0, 0, n).view({rows, H});
    at::Tensor dzc = dz_buf.narrow(0, 0, n).view({rows, H});
    at::Tensor gc = g_buf.narrow(0, 0, n).view({rows, O});
    first_layer_(hc, uc, xc, w1u, w1x, b1);
    for (int64_t t = t1 - 1; t >= t0; --t) {
      const int64_t i = t - t0;
      at::Tensor slot = ring.select(0, t % delay);
      at::Tensor g = g_buf.select(0, i), dz = dz_buf.select(0, i);
      fused_rows_(g, grad_y.select(0, t), slot, at::Tensor(), out.b2);
      at::mm_out(dz, g, w2);
      fused_rows_(dz, dz, at::Tensor(), h_buf.select(0, i), out.b1);
      if (t >= delay) {
        if (truncate && t % truncate == 0)
          slot.zero_();
        else
          at::mm_out(slot, dz, w1x);
      } else if (out.x0.defined()) {
        at::Tensor dx0 = out.x0.select(0, t);
        at::mm_out(dx0, dz, w1x);
      }
    }
    if (out.w2.defined()) out.w2.addmm_(gc.t(), hc);
    if (out.w1.defined()) {
      dw1x.addmm_(dzc.t(), xc);
      if (du) dw1u.addmm_(dzc.t(), uc);
    }
    if (out.u.defined() && du) {
      at::Tensor duc = out.u.narrow(0, t0, n).view({rows, du});
      at::mm_out(duc, dzc, w1u);
    }
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
rollout_backward_cpu(const at::Tensor& grad_y_in, const at::Tensor& y_in, const at::Tensor& x0_in,
                     const std::optional<at::Tensor>& u_in, const at::Tensor& w1_in,
                     const std::optional<at::Tensor>& b1_in, const at::Tensor& w2_in,
                     int64_t delay, int64_t truncate, std::array<bool, 6> output_mask) {
  TORCH_CHECK(y_in.dim() == 3, "fbfast::rollout_backward: y must be (T, B, O), got ", y_in.sizes());
  const int64_t steps = y_in.size(0);
  check_inputs(x0_in, u_in, w1_in, b1_in, w2_in, std::nullopt, steps, delay, truncate);
  TORCH_CHECK(grad_y_in.sizes() == y_in.sizes() && y_in.dim() == 3 && y_in.size(1) == x0_in.size(1) &&
                  y_in.size(2) == x0_in.size(2),
              "fbfast::rollout_backward: grad_y ", grad_y_in.sizes(), " and y ", y_in.sizes(),
              " must both be (T, B, O)");
  TORCH_CHECK(grad_y_in.scalar_type() == x0_in.scalar_type() && y_in.scalar_type() == x0_in.scalar_type(),
              "fbfast::rollout_backward: grad_y (", grad_y_in.scalar_type(), ") and y (", y_in.scalar_type(),
              ") must have x0's dtype ", x0_in.scalar_type());
  const at::Tensor x0 = x0_in.contiguous(), w1 = w1_in.contiguous(), w2 = w2_in.contiguous();
  const at::Tensor y = y_in.contiguous(), grad_y = grad_y_in.contiguous();
  const at::Tensor u = opt_or_undefined(u_in), b1 = opt_or_undefined(b1_in);
  const int64_t B = x0.size(1), O = x0.size(2), H = w2.size(1);
  const int64_t du = u.defined() ? u.size(2) : 0;

  // Gradients that are asked for start at zero: steps t < k that never run (steps < delay)
  // and zero-size inputs then come out right without special cases.
  const auto opts = x0.options();
  auto wanted = [&](int i, at::IntArrayRef shape) {
    return output_mask[i] ? at::zeros(shape, opts) : at::Tensor();
  };
  Grads g{wanted(0, x0.sizes()), output_mask[1] && u.defined() ? at::zeros(u.sizes(), opts) : at::Tensor(),
          wanted(2, w1.sizes()), output_mask[3] && b1.defined() ? at::zeros({H}, opts) : at::Tensor(),
          wanted(4, w2.sizes()), wanted(5, {O})};
  if (steps > 0 && B > 0 && O > 0) {
    if (choose_path(du, O, H) == Path::kTile) {
      AT_DISPATCH_FLOATING_TYPES(x0.scalar_type(), "fbfast_rollout_backward_tile", [&] {
        backward_tile_path<scalar_t>(grad_y, y, x0, u, w1, b1, w2, delay, truncate, g);
      });
    } else {
      backward_blas_path(grad_y, y, x0, u, w1, b1, w2, delay, truncate, g);
    }
  }
  auto or_empty = [&](const at::Tensor& t) { return t.defined() ? t : at::empty({0}, opts); };
  return {or_empty(g.x0), or_empty(g.u), or_empty(g.w1), or_empty(g.b1), or_empty(g.w2), or_empty(g.b2)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fbfast, CPU, m) {
  m.impl("rollout_forward", &rollout_forward_cpu);
  m.impl("rollout_backward", &rollout_backward_cpu);
}

}  // namespace fbfast::cpu
