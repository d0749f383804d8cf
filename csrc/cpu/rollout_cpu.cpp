// CPU host code of the fused rollout: argument checks, layout, choice of path, threading.
//
// Two paths compute the same recurrence (docs/spec.md):
//  * tile path (small and medium widths): batch rows are independent, so each thread takes
//    tiles of rows and runs the whole serial time loop on them with the tile's state in L1
//    (tile_kernels.h). Weight gradients are summed per fixed group of tiles, then the groups
//    in order, so gradients are bitwise identical for any thread count.
//  * BLAS path (wide layers): the time loop runs outside and every step is a full-batch GEMM
//    (MKL/OpenBLAS through ATen, itself multi-threaded) with a fused bias+ReLU epilogue. The
//    backward recomputes z for a chunk of steps in one GEMM and forms dW1, dW2, du as a few
//    GEMMs over chunk_steps x B rows; only the feedback adjoint is walked step by step.
// The crossovers between them were measured with benchmarks/crossover.py (kTileMaxWork*).
//
// Process settings (a pinned instruction set or path) are read from the environment once, when
// the library loads, and changed afterwards only through the fbfast::cpu_options operator
// (fbfast.set_kernel_options): no call reads the environment, because getenv races with a
// setenv in another thread (Python's os.environ[...] = ...) and can crash.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <unistd.h>

#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <new>
#include <string>
#include <vector>

#include "../rollout_checks.h"
#include "parallel.h"
#include "path_rule.h"
#include "tile_params.h"

namespace fbfast::cpu {
namespace {

constexpr const char* kForwardOp = "fbfast::rollout_forward (CPU)";
constexpr const char* kBackwardOp = "fbfast::rollout_backward (CPU)";

// Slack after the last row of every packed buffer and workspace: the widest vector of any
// variant, so that whole-vector loads starting inside a row stay inside the buffer.
constexpr int64_t kSlackBytes = 64;
// Backward tiles have a size fixed by the shape alone (so a fixed summation order of weight
// gradients for any thread count): 16 rows, or 64 for wide layers, where each step's rank-k
// update of the (O x H) and ((Du + O) x H) gradient accumulators must amortise reading them.
constexpr int64_t kBackwardTileRows = 16;
constexpr int64_t kWideBackwardTileRows = 64;
constexpr int64_t kWideWork = 32768;
constexpr int64_t kMaxGroups = 8;
// "Work" is one step's multiply-adds per batch row, H * (Du + 2 O). The tile path holds the
// weights in L1/L2, so its forward wins while they are small: with AVX2 or AVX-512 up to about
// (O, H) = (512, 512) on this project's machines, losing to per-step MKL GEMMs at width 1024
// (benchmarks/crossover.py; MKL does not use AVX-512 on AMD CPUs). Its backward also updates a
// copy of the weight gradients per group of tiles at every step, which pays off only over
// enough rows and steps: above kWideWork it lost to the per-step loop with B = 64 (one tile,
// no parallelism) and in 4-step rollouts, and won with B >= 256 over 16 steps or more
// (benchmarks/crossover.py, --batch/--steps). The portable build loses to BLAS above 32768.
constexpr int64_t kTileMaxWorkSimd = 262144;
constexpr int64_t kTileMinTrainingRows = 256;
constexpr int64_t kTileMinTrainingSteps = 16;
constexpr int64_t kTileMaxWorkBase = 32768;
// Rows per backward chunk of the BLAS path, and a cap on its chunk buffers (rows x (2H + O)
// elements): large enough for efficient GEMMs, small beside what the per-step loop keeps.
constexpr int64_t kChunkRows = 4096;
constexpr int64_t kChunkBytes = int64_t(32) << 20;

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// Row stride for rows of `cols` elements with vectors of `width` elements: padded to whole
// vectors (aligned loads) only when that costs at most 1/8 more memory. A narrow matrix
// (O = 1 or Du = 1) padded to 16 floats per row would take 16x its size.
int64_t row_stride(int64_t cols, int64_t width) {
  const int64_t padded = round_up(cols, width);
  return (padded - cols) * 8 <= cols ? padded : cols;
}

enum class Isa : int { kBase = 0, kAvx2 = 1, kAvx512 = 2 };
enum class Path : int { kAuto = 0, kTile = 1, kBlas = 2 };

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

const Isa kBestIsa = detect_isa();

const char* isa_name(Isa isa) {
  return isa == Isa::kAvx512 ? "avx512" : isa == Isa::kAvx2 ? "avx2" : "base";
}
const char* path_name(Path path) { return path == Path::kTile ? "tile" : path == Path::kBlas ? "blas" : "auto"; }

// Parses an ISA name; "auto" or "" is the widest this CPU runs. A wider ISA than the CPU has is
// an error for the setter and ignored (with the best one used) for the environment variable.
std::optional<Isa> parse_isa(const std::string& name) {
  if (name.empty() || name == "auto") return kBestIsa;
  if (name == "base") return Isa::kBase;
  if (name == "avx2") return Isa::kAvx2;
  if (name == "avx512") return Isa::kAvx512;
  return std::nullopt;
}
std::optional<Path> parse_path(const std::string& name) {
  if (name.empty() || name == "auto") return Path::kAuto;
  if (name == "tile") return Path::kTile;
  if (name == "blas") return Path::kBlas;
  return std::nullopt;
}

// Read once, at load time (static initialisation runs while the library is being loaded,
// before any call can run).
Isa isa_from_env() {
  const char* env = std::getenv("FBFAST_CPU_ISA");
  const auto isa = parse_isa(env ? env : "");
  return isa && static_cast<int>(*isa) <= static_cast<int>(kBestIsa) ? *isa : kBestIsa;
}
Path path_from_env() {
  const char* env = std::getenv("FBFAST_CPU_PATH");
  return parse_path(env ? env : "").value_or(Path::kAuto);
}
std::atomic<int> g_isa{static_cast<int>(isa_from_env())};
std::atomic<int> g_path{static_cast<int>(path_from_env())};

Isa active_isa() { return static_cast<Isa>(g_isa.load(std::memory_order_relaxed)); }

// fbfast::cpu_options(isa, path): sets the pinned ISA and/or path (None: unchanged; "auto": the
// default rule) and returns the previous [isa, path].
std::vector<std::string> cpu_options(const std::optional<std::string>& isa, const std::optional<std::string>& path) {
  std::vector<std::string> previous{isa_name(active_isa()),
                                    path_name(static_cast<Path>(g_path.load(std::memory_order_relaxed)))};
  std::optional<Isa> new_isa;
  std::optional<Path> new_path;
  if (isa.has_value()) {
    new_isa = parse_isa(*isa);
    TORCH_CHECK(new_isa.has_value(), "fbfast.set_kernel_options: cpu_isa must be 'auto', 'avx512', 'avx2' or 'base', got '",
                *isa, "'");
    TORCH_CHECK(static_cast<int>(*new_isa) <= static_cast<int>(kBestIsa), "fbfast.set_kernel_options: cpu_isa='", *isa,
                "' is not supported by this CPU (the widest it runs is '", isa_name(kBestIsa), "')");
  }
  if (path.has_value()) {
    new_path = parse_path(*path);
    TORCH_CHECK(new_path.has_value(), "fbfast.set_kernel_options: cpu_path must be 'auto', 'tile' or 'blas', got '",
                *path, "'");
  }
  if (new_isa) g_isa.store(static_cast<int>(*new_isa));
  if (new_path) g_path.store(static_cast<int>(*new_path));
  return previous;
}

// for_training: the path of a backward, and of a forward whose backward follows (autograd asks
// through saves_hidden); a forward alone takes the tile path at any work it wins.
Path choose_path(int64_t du, int64_t o, int64_t h, bool for_training, int64_t batch, int64_t steps) {
  const Path pinned = static_cast<Path>(g_path.load(std::memory_order_relaxed));
  if (pinned != Path::kAuto) return pinned;
  const int64_t work = h * (du + 2 * o);
  if (active_isa() == Isa::kBase) return work <= kTileMaxWorkBase ? Path::kTile : Path::kBlas;
  if (work > kTileMaxWorkSimd) return Path::kBlas;
  if (!for_training || work <= kWideWork) return Path::kTile;
  return batch >= kTileMinTrainingRows && steps >= kTileMinTrainingSteps ? Path::kTile : Path::kBlas;
}

int64_t host_memory_bytes() {
  static const int64_t bytes = [] {
    const long pages = sysconf(_SC_PHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
    return pages > 0 && page > 0 ? static_cast<int64_t>(pages) * page : int64_t(0);
  }();
  return bytes;
}

int64_t available_memory_bytes() {
  const long pages = sysconf(_SC_AVPHYS_PAGES), page = sysconf(_SC_PAGE_SIZE);
  return pages > 0 && page > 0 ? static_cast<int64_t>(pages) * page : int64_t(0);
}

// The message of a tile-path workspace allocation that failed: what it was for, the sizes, how
// much it needed against what is available now, and what would fit. These buffers (packed
// copies of the weights, per-tile activations, gradient accumulators) grow with the widths,
// not with the batch, and the BLAS path keeps none of them.
[[noreturn]] void workspace_failed(const char* op, const char* what, int64_t B, int64_t du, int64_t O, int64_t H,
                                   int64_t steps, long double bytes) {
  const int64_t available = available_memory_bytes();
  TORCH_CHECK(false, op, ": out of memory: ", format_bytes(bytes), " needed for the ", what, " (B=", B, ", Du=", du,
              ", O=", O, ", H=", H, ", steps=", steps, "); ",
              available > 0 ? format_bytes(available) + " of memory is available now" : std::string("memory is short"),
              ". The BLAS path needs none of these buffers: fbfast.set_kernel_options(cpu_path='blas'); or use "
              "narrower layers");
}

RolloutSizes check_dtype(const char* op, const RolloutSizes& sizes, const at::Tensor& x0) {
  const auto dtype = x0.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op, ": dtype must be float32 or float64, got ", dtype);
  TORCH_CHECK(x0.device().is_cpu(), op, ": x0 must be a CPU tensor, got ", x0.device());
  return sizes;
}

// Only x0[:min(delay, steps)] is ever read: copying all of it (an expanded x0 with a huge delay)
// would allocate for nothing.
at::Tensor read_x0(const at::Tensor& x0, int64_t steps) {
  return x0.narrow(0, 0, std::min(x0.size(0), steps)).contiguous();
}

// dst (rows, dst_ld) <- src^T or src; src is a row-major (src_rows, src_cols) block with row
// stride `ld`. Raw loops: these run on every call and ATen ops would cost more than the whole
// rollout at small shapes.
template <typename T>
void pack(const T* src, int64_t src_rows, int64_t src_cols, int64_t ld, bool transpose, T* dst,
          int64_t dst_ld) {
  const int64_t rows = transpose ? src_cols : src_rows, cols = transpose ? src_rows : src_cols;
  for (const auto i : c10::irange(rows)) {
    T* d = dst + i * dst_ld;
    for (const auto j : c10::irange(cols)) d[j] = transpose ? src[j * ld + i] : src[i * ld + j];
  }
}

// Weights and biases laid out for the tile kernels (see tile_kernels.h), in one zeroed buffer
// with kSlackBytes after its end.
template <typename T>
struct PackedWeights {
  std::vector<T> buf;
  const T *w1u_t = nullptr, *w1x_t = nullptr, *w2_t = nullptr, *b1 = nullptr, *b2 = nullptr;
  const T *w2 = nullptr, *w1u = nullptr, *w1x = nullptr;

  static int64_t size(const TileParams<T>& p, bool for_backward) {
    const int64_t n_fwd = (p.du + p.o) * p.ld_h + p.h * p.ld_o + p.h + p.o;
    const int64_t n_bwd = for_backward ? p.o * p.ld_h + p.h * p.ld_du + p.h * p.ld_o : 0;
    return n_fwd + n_bwd + kSlackBytes / static_cast<int64_t>(sizeof(T));
  }

  // Points p's weight pointers at these copies (those not packed stay null).
  void point(TileParams<T>& p) const {
    p.w1u_t = w1u_t;
    p.w1x_t = w1x_t;
    p.w2_t = w2_t;
    p.b1 = b1;
    p.b2 = b2;
    p.w2 = w2;
    p.w1u = w1u;
    p.w1x = w1x;
  }

  PackedWeights(const TileParams<T>& p, const T* w1, const T* b1_src, const T* w2_src,
                const T* b2_src, bool for_backward) {
    const int64_t du = p.du, o = p.o, h = p.h, ld1 = du + o;
    buf.resize(size(p, for_backward));
    T* d = buf.data();
    pack(w1, h, du, ld1, true, d, p.ld_h);
    w1u_t = du ? d : nullptr;
    d += du * p.ld_h;
    pack(w1 + du, h, o, ld1, true, d, p.ld_h);
    w1x_t = d;
    d += o * p.ld_h;
    pack(w2_src, o, h, h, true, d, p.ld_o);
    w2_t = d;
    d += h * p.ld_o;
    if (b1_src) pack(b1_src, 1, h, h, false, d, h);
    b1 = b1_src ? d : nullptr;
    d += h;
    if (b2_src) pack(b2_src, 1, o, o, false, d, o);
    b2 = b2_src ? d : nullptr;
    d += o;
    if (!for_backward) return;
    pack(w2_src, o, h, h, false, d, p.ld_h);
    w2 = d;
    d += o * p.ld_h;
    pack(w1, h, du, ld1, false, d, p.ld_du);
    w1u = d;
    d += h * p.ld_du;
    pack(w1 + du, h, o, ld1, false, d, p.ld_o);
    w1x = d;
  }
};

template <typename T>
TileParams<T> make_params(const at::Tensor& x0, const at::Tensor& u, int64_t steps, int64_t H,
                          int64_t delay, int64_t truncate) {
  constexpr int64_t W = kSlackBytes / sizeof(T);
  TileParams<T> p{};
  p.steps = steps;
  p.batch = x0.size(1);
  p.o = x0.size(2);
  p.du = u.defined() ? u.size(2) : 0;
  p.h = H;
  p.delay = delay;
  p.truncate = truncate;
  p.ld_du = row_stride(p.du, W);
  p.ld_o = row_stride(p.o, W);
  p.ld_h = row_stride(H, W);
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
  const int64_t B = p.batch;
  std::optional<PackedWeights<T>> pw;
  try {
    pw.emplace(p, w1.data_ptr<T>(), b1.defined() ? b1.data_ptr<T>() : nullptr, w2.data_ptr<T>(),
               b2.defined() ? b2.data_ptr<T>() : nullptr, false);
  } catch (const std::bad_alloc&) {
    workspace_failed(kForwardOp, "packed weights", B, p.du, p.o, p.h, steps,
                     PackedWeights<T>::size(p, false) * sizeof(T));
  }
  pw->point(p);
  p.y = y.data_ptr<T>();
  // Rows are independent and each row's arithmetic does not depend on its tile, so the tile
  // size may follow the thread count: one tile per thread, 4..64 rows.
  const int threads = threads_for(2.0 * B * steps * p.h * (p.du + 2 * p.o));
  const int64_t rows = std::min<int64_t>(64, std::max<int64_t>(4, round_up((B + threads - 1) / threads, 4)));
  const int64_t ntiles = (B + rows - 1) / rows;
  const Isa isa = active_isa();
  std::atomic<bool> ok{true};
  run_tasks(ntiles, threads, [&](int64_t i) {
    if (!run_forward_tile<T>(isa, p, i * rows, std::min(B, (i + 1) * rows))) ok = false;
  });
  if (!ok)
    workspace_failed(kForwardOp, "tile workspace", B, p.du, p.o, p.h, steps,
                     static_cast<long double>(threads) * rows * p.ld_h * sizeof(T));
}

// out = relu(out + b) in one pass over the GEMM result: the fused epilogue of the first layer.
void bias_relu_(at::Tensor& out, const at::Tensor& b) {
  AT_DISPATCH_FLOATING_TYPES(out.scalar_type(), "fbfast_bias_relu", [&] {
    scalar_t* o = out.data_ptr<scalar_t>();
    const scalar_t* bias = b.defined() ? b.data_ptr<scalar_t>() : nullptr;
    const int64_t n = out.size(1);
    // ATen's grain size for elementwise work: small blocks run on the calling thread only.
    at::parallel_for(0, out.size(0), std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(n, 1)),
                     [&](int64_t r0, int64_t r1) {
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

// hidden: (T, B, H) to keep every step's relu(z_t) for the backward, or undefined.
void forward_blas_path(const at::Tensor& x0, const at::Tensor& u, const at::Tensor& w1,
                       const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                       int64_t steps, int64_t delay, at::Tensor& y, const at::Tensor& hidden = at::Tensor()) {
  const int64_t du = u.defined() ? u.size(2) : 0, B = x0.size(1), H = w2.size(1);
  const at::Tensor w1u = w1.narrow(1, 0, du), w1x = w1.narrow(1, du, w1.size(1) - du);
  at::Tensor buffer = hidden.defined() ? at::Tensor()
                                       : checked_empty(kForwardOp, "the hidden activations", {B, H}, y.options(),
                                                       "split the batch into smaller parts");
  for (const auto t : c10::irange(steps)) {
    at::Tensor h = hidden.defined() ? hidden.select(0, t) : buffer;
    const at::Tensor x = t < delay ? x0.select(0, t) : y.select(0, t - delay);
    first_layer_(h, du ? u.select(0, t) : at::Tensor(), x, w1u, w1x, b1);
    at::Tensor yt = y.select(0, t);
    if (b2.defined())
      at::addmm_out(yt, b2, h, w2.t());
    else
      at::mm_out(yt, h, w2.t());
  }
}

// Both forward operators: rollout_forward (keep_hidden false: the path rule picks tile or BLAS)
// and rollout_forward_hidden (the BLAS path, keeping every step's relu(z_t) in `hidden`).
std::tuple<at::Tensor, at::Tensor> forward_impl(const char* op, const at::Tensor& x0_in,
                                                const std::optional<at::Tensor>& u_in, const at::Tensor& w1_in,
                                                const std::optional<at::Tensor>& b1_in, const at::Tensor& w2_in,
                                                const std::optional<at::Tensor>& b2_in, int64_t steps, int64_t delay,
                                                int64_t truncate, bool keep_hidden) {
  const RolloutSizes sizes = check_dtype(
      op, check_rollout_args(op, x0_in, u_in, w1_in, b1_in, w2_in, b2_in, steps, delay, truncate), x0_in);
  check_result_fits(op, sizes, x0_in.element_size(), host_memory_bytes());
  const at::Tensor x0 = read_x0(x0_in, steps), w1 = w1_in.contiguous(), w2 = w2_in.contiguous();
  const at::Tensor u = opt_or_undefined(u_in), b1 = opt_or_undefined(b1_in), b2 = opt_or_undefined(b2_in);
  const int64_t B = x0.size(1), O = x0.size(2), H = w2.size(1);
  const char* remedy = "use fewer steps or a smaller batch, or run the rollout in chunks";
  at::Tensor y = checked_empty(op, "the result Y", {steps, B, O}, x0.options(), remedy);
  const at::Tensor hidden =
      keep_hidden ? checked_empty(op, "the hidden activations kept for the backward", {steps, B, H}, x0.options(),
                                  remedy)
                  : at::Tensor();
  if (steps == 0 || B == 0 || O == 0) return {y, hidden};
  const int64_t du = u.defined() ? u.size(2) : 0;
  if (!keep_hidden && choose_path(du, O, H, /*for_training=*/false, B, steps) == Path::kTile) {
    AT_DISPATCH_FLOATING_TYPES(x0.scalar_type(), "fbfast_rollout_forward_tile", [&] {
      forward_tile_path<scalar_t>(x0, u, w1, b1, w2, b2, steps, delay, y);
    });
  } else {
    // The mm_out on y.select(0, t) fills the matrix in place; with H == 0 it writes b2 or 0.
    forward_blas_path(x0, u, w1, b1, w2, b2, steps, delay, y, hidden);
  }
  return {y, hidden};
}

at::Tensor rollout_forward_cpu(const at::Tensor& x0, const std::optional<at::Tensor>& u, const at::Tensor& w1,
                               const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                               const std::optional<at::Tensor>& b2, int64_t steps, int64_t delay, int64_t truncate) {
  return std::get<0>(forward_impl(kForwardOp, x0, u, w1, b1, w2, b2, steps, delay, truncate, false));
}

// ---------------------------------------------------------------------------------------------
// Backward

// The backward's outputs; a gradient that is not asked for is undefined here and an empty
// (0,) tensor in the operator's result.
struct Grads {
  at::Tensor x0, u, w1, b1, w2, b2;

  std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> as_tuple(
      const at::TensorOptions& opts) const {
    auto or_empty = [&](const at::Tensor& t) { return t.defined() ? t : at::empty({0}, opts); };
    return {or_empty(x0), or_empty(u), or_empty(w1), or_empty(b1), or_empty(w2), or_empty(b2)};
  }
};

// Gradients that are asked for start at zero: steps t < k that never run (steps < delay) and
// zero-size inputs then come out right without special cases. x0's gradient has the full shape
// of the x0 passed in; the kernels write its first min(delay, steps) slots.
Grads zero_grads(const char* op, const at::Tensor& x0_in, const at::Tensor& u, const at::Tensor& w1,
                 const at::Tensor& b1, const at::Tensor& w2, std::array<bool, 6> mask) {
  const auto opts = x0_in.options();
  auto zeros = [&](const char* what, at::IntArrayRef shape) {
    return checked_empty(op, what, shape, opts, "split the batch into smaller parts").zero_();
  };
  return Grads{mask[0] ? zeros("the gradient of x0", x0_in.sizes()) : at::Tensor(),
               mask[1] && u.defined() ? zeros("the gradient of u", u.sizes()) : at::Tensor(),
               mask[2] ? zeros("the gradient of w1", w1.sizes()) : at::Tensor(),
               mask[3] && b1.defined() ? zeros("the gradient of b1", {w1.size(0)}) : at::Tensor(),
               mask[4] ? zeros("the gradient of w2", w2.sizes()) : at::Tensor(),
               mask[5] ? zeros("the gradient of b2", {w2.size(0)}) : at::Tensor()};
}

template <typename T>
void backward_tile_path(const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& x0,
                        const at::Tensor& u, const at::Tensor& w1, const at::Tensor& b1,
                        const at::Tensor& w2, int64_t delay, int64_t truncate, Grads& out) {
  const int64_t steps = y.size(0);
  TileParams<T> p = make_params<T>(x0, u, steps, w2.size(1), delay, truncate);
  const int64_t B = p.batch, du = p.du, O = p.o, H = p.h, hp = p.ld_h;
  const int64_t tile_rows = H * (du + 2 * O) > kWideWork ? kWideBackwardTileRows : kBackwardTileRows;
  const int64_t ntiles = (B + tile_rows - 1) / tile_rows;
  const int64_t n_w1 = out.w1.defined() ? (du + O) * hp : 0, n_b1 = out.b1.defined() ? H : 0;
  const int64_t n_w2 = out.w2.defined() ? O * hp : 0, n_b2 = out.b2.defined() ? O : 0;
  const int64_t per_group = n_w1 + n_b1 + n_w2 + n_b2;
  // Each group of tiles keeps its own copy of the weight gradients. The number of groups
  // depends on the shape alone (a fixed summation order for any thread count), and their copies
  // together take no more than the activations a per-step loop keeps for its backward
  // (steps x B x (H + O)), so that memory stays within that of the loop at any width.
  const int64_t loop_elems = steps * B * (H + O);
  const int64_t groups = std::max<int64_t>(
      1, std::min({ntiles, kMaxGroups, per_group > 0 ? loop_elems / per_group : kMaxGroups}));
  std::optional<PackedWeights<T>> pw;
  std::vector<T> acc;
  try {
    pw.emplace(p, w1.data_ptr<T>(), b1.defined() ? b1.data_ptr<T>() : nullptr, w2.data_ptr<T>(), nullptr, true);
    acc.assign(static_cast<size_t>(groups * per_group), T(0));
  } catch (const std::bad_alloc&) {
    workspace_failed(kBackwardOp, "packed weights and gradient accumulators", B, du, O, H, steps,
                     (PackedWeights<T>::size(p, true) + groups * per_group) * static_cast<long double>(sizeof(T)));
  }
  pw->point(p);
  p.y_saved = y.data_ptr<T>();
  p.grad_y = grad_y.data_ptr<T>();
  p.grad_x0 = out.x0.defined() ? out.x0.data_ptr<T>() : nullptr;
  p.grad_u = out.u.defined() ? out.u.data_ptr<T>() : nullptr;

  const Isa isa = active_isa();
  std::atomic<bool> ok{true};
  // The backward does about twice the forward's multiply-adds.
  run_tasks(groups, threads_for(4.0 * B * steps * H * (du + 2 * O)), [&](int64_t g) {
    T* base = acc.data() + g * per_group;
    TileGrads<T> tg{n_w1 ? base : nullptr, n_b1 ? base + n_w1 : nullptr,
                    n_w2 ? base + n_w1 + n_b1 : nullptr, n_b2 ? base + n_w1 + n_b1 + n_w2 : nullptr};
    // Tiles [g*ntiles/groups, (g+1)*ntiles/groups) in order: a fixed summation order.
    for (int64_t i = g * ntiles / groups; i < (g + 1) * ntiles / groups; ++i)
      if (!run_backward_tile<T>(isa, p, i * tile_rows, std::min(B, (i + 1) * tile_rows), tg)) ok = false;
  });
  if (!ok) {
    const int64_t slots = std::min(delay, steps);
    workspace_failed(kBackwardOp, "tile workspace", B, du, O, H, steps,
                     static_cast<long double>(groups) * tile_rows * (2 * hp + (1 + slots) * p.ld_o) * sizeof(T));
  }
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
// col_sum += the column sums of out: the elementwise work of one backward step. ATen's
// vectorized kernels, measured faster than one fused scalar pass (benchmarks/crossover.py).
void fused_rows_(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, const at::Tensor& mask,
                 at::Tensor& col_sum) {
  if (b.defined())
    at::add_out(out, a, b);
  else if (!out.is_same(a))
    out.copy_(a);
  if (mask.defined()) at::threshold_backward_out(out, out, mask, 0);
  if (col_sum.defined()) col_sum.add_(out.sum(0));
}

// hidden: the forward's relu(z_t) of every step, (T, B, H), or undefined to recompute them
// chunk by chunk.
void backward_blas_path(const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& x0,
                        const at::Tensor& u, const at::Tensor& w1, const at::Tensor& b1,
                        const at::Tensor& w2, int64_t delay, int64_t truncate, Grads& out,
                        const at::Tensor& hidden = at::Tensor()) {
  const int64_t steps = y.size(0), B = y.size(1), O = y.size(2), H = w2.size(1);
  const int64_t du = u.defined() ? u.size(2) : 0;
  const at::Tensor w1u = w1.narrow(1, 0, du), w1x = w1.narrow(1, du, O);
  // Chunk buffers of at most kChunkBytes, and at most half of what a per-step loop keeps for its
  // backward (the hidden activations and outputs of every step), so that short rollouts of wide
  // layers stay within the loop's memory (benchmarks/wide.py).
  const int64_t itemsize = static_cast<int64_t>(y.element_size());
  const int64_t step_bytes = B * ((hidden.defined() ? 1 : 2) * H + O) * itemsize;
  const int64_t budget = std::min(kChunkBytes, steps * B * (H + O) * itemsize / 2);
  const int64_t chunk = std::min({steps, std::max<int64_t>(1, kChunkRows / std::max<int64_t>(B, 1)),
                                  std::max<int64_t>(1, budget / std::max<int64_t>(step_bytes, 1))});
  const auto opts = y.options();
  const char* remedy = "split the batch into smaller parts";
  at::Tensor h_buf = hidden.defined()
                         ? at::Tensor()
                         : checked_empty(kBackwardOp, "the recomputed activations", {chunk, B, H}, opts, remedy);
  at::Tensor dz_buf = checked_empty(kBackwardOp, "the activation adjoints", {chunk, B, H}, opts, remedy);
  at::Tensor g_buf = checked_empty(kBackwardOp, "the output adjoints", {chunk, B, O}, opts, remedy);
  // Adjoint into y_{t-k}, slot t % k; t % k < min(k, steps), so no more slots are needed.
  at::Tensor ring = checked_empty(kBackwardOp, "the feedback adjoints", {std::min(delay, steps), B, O}, opts,
                                  "use a shorter delay or split the batch").zero_();
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
    const at::Tensor h_chunk = hidden.defined() ? hidden.narrow(0, t0, n) : h_buf.narrow(0, 0, n);
    at::Tensor hc = h_chunk.view({rows, H});
    at::Tensor dzc = dz_buf.narrow(0, 0, n).view({rows, H});
    at::Tensor gc = g_buf.narrow(0, 0, n).view({rows, O});
    if (!hidden.defined()) first_layer_(hc, uc, xc, w1u, w1x, b1);
    for (int64_t t = t1 - 1; t >= t0; --t) {
      const int64_t i = t - t0;
      at::Tensor slot = ring.select(0, t % delay);
      at::Tensor g = g_buf.select(0, i), dz = dz_buf.select(0, i);
      fused_rows_(g, grad_y.select(0, t), slot, at::Tensor(), out.b2);
      at::mm_out(dz, g, w2);
      fused_rows_(dz, dz, at::Tensor(), h_chunk.select(0, i), out.b1);
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

// Both backward operators: rollout_backward (hidden undefined: recomputed, on the path the
// rule picks) and rollout_backward_hidden (the BLAS path, reading the forward's hidden).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const char* op, const at::Tensor& grad_y_in, const at::Tensor& y_in, const at::Tensor& hidden_in,
    const at::Tensor& x0_in, const std::optional<at::Tensor>& u_in, const at::Tensor& w1_in,
    const std::optional<at::Tensor>& b1_in, const at::Tensor& w2_in, int64_t delay, int64_t truncate,
    std::array<bool, 6> output_mask) {
  const RolloutSizes sizes = check_dtype(
      op, check_backward_args(op, grad_y_in, y_in, x0_in, u_in, w1_in, b1_in, w2_in, delay, truncate), x0_in);
  if (hidden_in.defined()) check_hidden(op, hidden_in, sizes, x0_in);
  const int64_t steps = y_in.size(0);
  const at::Tensor x0 = read_x0(x0_in, steps), w1 = w1_in.contiguous(), w2 = w2_in.contiguous();
  const at::Tensor y = y_in.contiguous(), grad_y = grad_y_in.contiguous();
  const at::Tensor hidden = hidden_in.defined() ? hidden_in.contiguous() : at::Tensor();
  const at::Tensor u = opt_or_undefined(u_in), b1 = opt_or_undefined(b1_in);
  const int64_t B = x0.size(1), O = x0.size(2), H = w2.size(1);
  const int64_t du = u.defined() ? u.size(2) : 0;

  Grads g = zero_grads(op, x0_in, u, w1, b1, w2, output_mask);
  if (steps > 0 && B > 0 && O > 0) {
    if (!hidden.defined() && choose_path(du, O, H, /*for_training=*/true, B, steps) == Path::kTile) {
      AT_DISPATCH_FLOATING_TYPES(x0.scalar_type(), "fbfast_rollout_backward_tile", [&] {
        backward_tile_path<scalar_t>(grad_y, y, x0, u, w1, b1, w2, delay, truncate, g);
      });
    } else {
      backward_blas_path(grad_y, y, x0, u, w1, b1, w2, delay, truncate, g, hidden);
    }
  }
  return g.as_tuple(x0.options());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
rollout_backward_cpu(const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& x0,
                     const std::optional<at::Tensor>& u, const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                     const at::Tensor& w2, int64_t delay, int64_t truncate, std::array<bool, 6> output_mask) {
  return backward_impl(kBackwardOp, grad_y, y, at::Tensor(), x0, u, w1, b1, w2, delay, truncate, output_mask);
}

// ---------------------------------------------------------------------------------------------
// Training wide layers: the forward keeps every step's hidden activations, as a per-step loop
// does, so that the backward need not recompute them. There the recomputation is one GEMM of
// the loop's six per step (about 1/6 of a training step, benchmarks/wide.py), while the memory
// is what the loop keeps anyway. csrc/autograd.cpp takes these when saves_hidden() says so.

std::tuple<at::Tensor, at::Tensor> rollout_forward_hidden_cpu(
    const at::Tensor& x0, const std::optional<at::Tensor>& u, const at::Tensor& w1,
    const std::optional<at::Tensor>& b1, const at::Tensor& w2, const std::optional<at::Tensor>& b2,
    int64_t steps, int64_t delay) {
  return forward_impl("fbfast::rollout_forward_hidden (CPU)", x0, u, w1, b1, w2, b2, steps, delay, 0, true);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
rollout_backward_hidden_cpu(const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& hidden,
                            const at::Tensor& x0, const std::optional<at::Tensor>& u, const at::Tensor& w1,
                            const std::optional<at::Tensor>& b1, const at::Tensor& w2, int64_t delay,
                            int64_t truncate, std::array<bool, 6> output_mask) {
  return backward_impl("fbfast::rollout_backward_hidden (CPU)", grad_y, y, hidden, x0, u, w1, b1, w2, delay,
                       truncate, output_mask);
}

}  // namespace

bool saves_hidden(int64_t du, int64_t o, int64_t h, int64_t batch, int64_t steps) {
  return choose_path(du, o, h, true, batch, steps) == Path::kBlas;
}

TORCH_LIBRARY_IMPL(fbfast, CPU, m) {
  m.impl("rollout_forward", &rollout_forward_cpu);
  m.impl("rollout_backward", &rollout_backward_cpu);
  m.impl("rollout_forward_hidden", &rollout_forward_hidden_cpu);
  m.impl("rollout_backward_hidden", &rollout_backward_hidden_cpu);
}

// A device-less operator: the one way to change the CPU kernels' process settings while other
// threads may be calling them (fbfast.set_kernel_options in fbfast/options.py).
TORCH_LIBRARY_FRAGMENT(fbfast, m) {
  m.def("cpu_options(str? isa=None, str? path=None) -> str[]", &cpu_options);
}

}  // namespace fbfast::cpu
