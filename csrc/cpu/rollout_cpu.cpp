// CPU host code of the fused rollout: argument checks, layout, choice of path, threading.
//
// Two paths compute the same recurrence (docs/spec.md):
//  * tile path (small and medium widths): batch rows are independent, so each thread takes
//    tiles of rows and runs the whole serial time loop on them with the tile's state in L1
//    (tile_kernels.h). Weight gradients are summed per fixed group of tiles, then the groups
//    in order, so gradients are bitwise identical for any thread count.
//  * BLAS path (wide layers): the time loop runs outside and every layer of every step is a
//    full-batch GEMM (MKL/OpenBLAS through ATen, itself multi-threaded): the per-step ATen
//    path that the CUDA kernel's general path shares (csrc/gemm_path.cpp).
// The crossovers between them were measured with benchmarks/crossover.py (kTileMaxWork*).
//
// Process settings (a pinned instruction set or path) are read from the environment once, when
// the library loads, and changed afterwards only through the fbfast::cpu_options operator
// (fbfast.set_kernel_options): no call reads the environment, because getenv races with a
// setenv in another thread (Python's os.environ[...] = ...) and can crash.
#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <c10/util/irange.h>
#include <torch/library.h>

#include <unistd.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <map>
#include <mutex>
#include <new>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "../gemm_path.h"
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
// update of every layer's gradient accumulators must amortise reading them.
constexpr int64_t kBackwardTileRows = 16;
constexpr int64_t kWideBackwardTileRows = 64;
constexpr int64_t kWideWork = 32768;
constexpr int64_t kMaxGroups = 8;
// "Work" is one step's multiply-adds per batch row, the sum over layers of in_l * out_l
// (H (Du + 2 O) for two layers). The tile path holds the
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
// Deeper networks of narrow layers reach the same work with small per-layer GEMMs, which per-step
// BLAS calls run badly: with 3 hidden GELU layers of 128 (Du = 4, O = 16, T = 50) the tile path
// trained 1.8x (B = 64) and 2.4x (B = 128) faster, and still won at 192; a two-layer network with
// a 128 x 256 layer lost on it at B = 64 (benchmarks/crossover.py --deep, and --batch 64). So a
// network none of whose layers exceeds 128 x 128 trains on the tile path; two-layer networks
// above kWideWork always have a larger layer, and keep the rule below.
constexpr int64_t kNarrowLayerWork = 16384;
// An ensemble's members are tiles of their own (parallel tasks even at B = 64), so its training
// rule counts E B rows: with 4 hidden SiLU layers of 200 (Du = 6, F = 17, O = 18) the tile path
// trained E = 7, B = 64, T = 10 2.9x faster than the members' per-step GEMMs, E = 2, B = 64 1.4x
// (T = 10) and 1.3x (T = 8); at T = 4, or E = 2 with B = 16, the per-step GEMMs won by up to 1.6x
// (the tile backward's packing and accumulators are paid per call).
constexpr int64_t kTileMinEnsembleRows = 128;
constexpr int64_t kTileMinEnsembleSteps = 8;
// Above this work, and up to kTileMaxWorkSimd, the two paths trade places with the machine. The
// rule above was measured on an AMD EPYC, whose MKL takes its AVX2 code; on an Intel Xeon with
// AVX-512 MKL, at (B, Du, O, H, T) = (4096, 0, 256, 512, 20), per-step GEMMs trained 1.26x and
// ran a forward 1.2x faster than the tile path (benchmarks/results/paths.md). There "auto"
// measures (Calibration, below).
constexpr int64_t kCalibrateMinWork = 16384;
// A cap on the BLAS path's backward chunk buffers (csrc/gemm_path.cpp): small beside what the
// per-step loop keeps.
constexpr int64_t kChunkBytes = int64_t(32) << 20;

int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// New CPU tensors without a trip through the dispatcher: at::empty and at::zeros are operator
// calls of several thousand instructions each, which at the seed's shape were a third of a
// backward's instructions (callgrind, benchmarks/README.md). Contiguous, like at::empty's.
at::Tensor cpu_empty(at::IntArrayRef shape, at::ScalarType dtype) {
  return at::detail::empty_cpu(shape, dtype, /*pin_memory=*/false, std::nullopt);
}
at::Tensor cpu_zeros(at::IntArrayRef shape, at::ScalarType dtype) {
  at::Tensor t = cpu_empty(shape, dtype);
  if (t.numel() > 0) std::memset(t.mutable_data_ptr(), 0, t.nbytes());
  return t;
}

// Row stride for rows of `cols` elements with vectors of `width` elements: padded to whole
// vectors (aligned loads) only when that costs at most 1/8 more memory. A narrow matrix
// (O = 1 or Du = 1) padded to 16 floats per row would take 16x its size.
int64_t row_stride(int64_t cols, int64_t width) {
  const int64_t padded = round_up(cols, width);
  return (padded - cols) * 8 <= cols ? padded : cols;
}

enum class Isa : int { kBase = 0, kAvx2 = 1, kAvx512 = 2 };
// kAuto: the static rule below, replaced by a measurement on this machine where the two paths
// are close (see "Calibration"); kRule: the static rule alone; kTile, kBlas: pinned.
enum class Path : int { kAuto = 0, kTile = 1, kBlas = 2, kRule = 3 };

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
const char* path_name(Path path) {
  return path == Path::kTile ? "tile" : path == Path::kBlas ? "blas" : path == Path::kRule ? "rule" : "auto";
}

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
  if (name == "rule") return Path::kRule;
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
    TORCH_CHECK(new_path.has_value(), "fbfast.set_kernel_options: cpu_path must be 'auto', 'rule', 'tile' or 'blas', got '",
                *path, "'");
  }
  if (new_isa) g_isa.store(static_cast<int>(*new_isa));
  if (new_path) g_path.store(static_cast<int>(*new_path));
  return previous;
}

// What the choice of path reads of a call: the layer widths in_0, out_0, ..., out_{L-1}, the
// exogenous features, each member's batch, the steps, E (1 for one network), the activation and
// the dtype; training: the path of a backward, and of a forward whose backward follows
// (autograd asks through saves_hidden).
struct PathShape {
  std::vector<int64_t> widths;
  int64_t du = 0, batch = 0, steps = 0, members = 1;
  Act act = Act::kRelu;
  at::ScalarType dtype = at::kFloat;
  bool training = false;

  // One step's multiply-adds per batch row, sum_l in_l out_l, and the largest layer's share.
  int64_t work() const {
    int64_t w = 0;
    for (size_t l = 0; l + 1 < widths.size(); ++l) w += widths[l] * widths[l + 1];
    return w;
  }
  int64_t widest() const {
    int64_t w = 0;
    for (size_t l = 0; l + 1 < widths.size(); ++l) w = std::max(w, widths[l] * widths[l + 1]);
    return w;
  }
};

// The static rule, from measurements on this project's machines (the constants above). A forward
// alone takes the tile path at any work it wins.
Path rule_path(const PathShape& s) {
  const int64_t work = s.work(), widest = s.widest();
  if (active_isa() == Isa::kBase) return work <= kTileMaxWorkBase ? Path::kTile : Path::kBlas;
  if (work > kTileMaxWorkSimd) return Path::kBlas;
  if (!s.training || work <= kWideWork || widest <= kNarrowLayerWork) return Path::kTile;
  if (s.members > 1)
    return s.members * s.batch >= kTileMinEnsembleRows && s.steps >= kTileMinEnsembleSteps ? Path::kTile
                                                                                            : Path::kBlas;
  return s.batch >= kTileMinTrainingRows && s.steps >= kTileMinTrainingSteps ? Path::kTile : Path::kBlas;
}

// Whether a training forward on `path` keeps the hidden activations for its backward (what
// saves_hidden tells autograd): always on the BLAS path, and on the tile path for layers wider
// than 128 x 128, where recomputing them costs a GEMM per step.
bool keeps_hidden_on(Path path, const PathShape& s) { return path == Path::kBlas || s.widest() > kNarrowLayerWork; }

// Set while the calibration times one path (see "Calibration" below), for its own calls.
thread_local Path t_forced = Path::kAuto;
// Set by a TrainingForward (path_rule.h).
thread_local bool t_training_forward = false;

Path calibrated_path(const PathShape& s, Path rule);

// The path of a call: pinned (fbfast.set_kernel_options, FBFAST_CPU_PATH), else the static rule,
// else, where the two paths are close on some machines, what this machine measured.
Path choose_path(const PathShape& s) {
  const Path pinned = static_cast<Path>(g_path.load(std::memory_order_relaxed));
  if (pinned == Path::kTile || pinned == Path::kBlas) return pinned;
  if (t_forced != Path::kAuto) return t_forced;
  const Path rule = rule_path(s);
  const int64_t work = s.work();
  if (pinned == Path::kRule || active_isa() == Isa::kBase || work <= kCalibrateMinWork || work > kTileMaxWorkSimd ||
      s.batch == 0 || s.steps == 0)
    return rule;
  return calibrated_path(s, rule);
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

// The network of one call, contiguous, with the sizes the host code reads.
struct Net {
  gemm_path::Network layers;
  int64_t batch = 0, o = 0;

  int64_t depth() const { return layers.layers(); }
  int64_t out(int64_t l) const { return layers.w[l].size(0); }
  int64_t in(int64_t l) const { return layers.w[l].size(1); }
  // One step's multiply-adds per batch row, and those of its largest layer.
  int64_t work() const {
    int64_t w = 0;
    for (int64_t l = 0; l < depth(); ++l) w += in(l) * out(l);
    return w;
  }
  int64_t widest() const {
    int64_t w = 0;
    for (int64_t l = 0; l < depth(); ++l) w = std::max(w, in(l) * out(l));
    return w;
  }
  // The sum of the hidden layers' widths.
  int64_t hidden() const {
    int64_t h = 0;
    for (int64_t l = 0; l + 1 < depth(); ++l) h += out(l);
    return h;
  }
  // "Du=3, widths 16 -> 64 -> 64 -> 16" for messages.
  std::string describe() const {
    std::string s = "Du=" + std::to_string(layers.du) + ", widths " + std::to_string(in(0) - layers.du);
    for (int64_t l = 0; l < depth(); ++l) s += " -> " + std::to_string(out(l));
    return s;
  }
};

// member < 0: the one network of 2-D weights; else member `member` of an ensemble (3-D weights).
Net make_net(const RolloutSizes& sizes, at::TensorList weights, const BiasList& biases, double param,
             const std::optional<at::Tensor>& u, int64_t member = -1) {
  Net net;
  auto of_member = [&](const at::Tensor& t) { return (member < 0 ? t : t.select(0, member)).contiguous(); };
  for (size_t l = 0; l < weights.size(); ++l) {
    net.layers.w.push_back(of_member(weights[l]));
    const std::optional<at::Tensor> b = biases.get(l);
    net.layers.b.push_back(b.has_value() ? of_member(*b) : at::Tensor());
  }
  net.layers.act = sizes.act;
  net.layers.param = param;
  net.layers.du = u.has_value() ? u->size(-1) : 0;
  net.layers.lags = sizes.lags;
  net.layers.f = sizes.f.expect_int();
  net.layers.residual = sizes.residual;
  net.batch = sizes.batch.expect_int();
  net.o = sizes.o.expect_int();
  return net;
}

// The networks of a call: one, or an ensemble's E members (docs/spec.md §1.3), each with its own
// contiguous weights and the call's sizes (B is each member's batch).
std::vector<Net> make_nets(const RolloutSizes& sizes, at::TensorList weights, const BiasList& biases, double param,
                           const std::optional<at::Tensor>& u) {
  if (!sizes.ensemble()) return {make_net(sizes, weights, biases, param, u)};
  std::vector<Net> nets;
  for (int64_t e = 0; e < sizes.members.expect_int(); ++e) nets.push_back(make_net(sizes, weights, biases, param, u, e));
  return nets;
}

// Where member e's rows lie in an ensemble's tensors: x0 (D, E, B, F), u (T, E, B, Du), y and
// every gradient (., E, B, .) hold member e's B rows at e B within each step's E B rows; a shared
// x0 (D, B, F) or u (T, B, Du) has B rows per step, read by every member. One network is the
// case E = 1.
struct Members {
  int64_t count = 1, batch = 0;
  bool x0_shared = false, u_shared = false;

  static Members of(const RolloutSizes& s) {
    return {s.ensemble() ? s.members.expect_int() : 1, s.batch.expect_int(), s.x0_shared, s.u_shared};
  }
  int64_t rows() const { return count * batch; }
  int64_t rows_x0() const { return x0_shared ? batch : rows(); }
  int64_t rows_u() const { return u_shared ? batch : rows(); }
  // Member e's first element in a tensor of rows `width` wide (own: at e B rows; shared: 0).
  int64_t own(int64_t e, int64_t width) const { return e * batch * width; }
  int64_t x0_at(int64_t e, int64_t width) const { return x0_shared ? 0 : own(e, width); }
  int64_t u_at(int64_t e, int64_t width) const { return u_shared ? 0 : own(e, width); }
};

PathShape path_shape(const Net& net, int64_t steps, const Members& mem, at::ScalarType dtype, bool training) {
  PathShape s;
  s.widths.push_back(net.in(0));
  for (int64_t l = 0; l < net.depth(); ++l) s.widths.push_back(net.out(l));
  s.du = net.layers.du;
  s.batch = net.batch;
  s.steps = steps;
  s.members = mem.count;
  s.act = net.layers.act;
  s.dtype = dtype;
  s.training = training;
  return s;
}

// The message of a tile-path workspace allocation that failed: what it was for, the sizes, how
// much it needed against what is available now, and what would fit. These buffers (packed
// copies of the weights, per-tile activations, gradient accumulators) grow with the widths,
// not with the batch, and the BLAS path keeps none of them.
[[noreturn]] void workspace_failed(const char* op, const char* what, const Net& net, int64_t steps,
                                   long double bytes) {
  const int64_t available = available_memory_bytes();
  TORCH_CHECK(false, op, ": out of memory: ", format_bytes(bytes), " needed for the ", what, " (B=", net.batch, ", ",
              net.describe(), ", steps=", steps, "); ",
              available > 0 ? format_bytes(available) + " of memory is available now" : std::string("memory is short"),
              ". The BLAS path needs none of these buffers: fbfast.set_kernel_options(cpu_path='blas'); or use "
              "narrower layers");
}

void check_dtype(const char* op, const at::Tensor& x0) {
  const auto dtype = x0.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble, op, ": x0 has dtype ", dtype,
              "; the CPU kernel takes float32 or float64 (all tensors share x0's dtype)");
  TORCH_CHECK(x0.device().is_cpu(), op, ": x0 must be a CPU tensor, got ", x0.device());
}

// Only the rows of x0 that the rollout reads are copied (gemm_path::read_x0): copying all of it
// (an expanded x0 with a huge delay) would allocate for nothing. Records where each lag's rows
// start in net.
at::Tensor read_x0(const at::Tensor& x0, std::vector<Net>& nets, int64_t steps) {
  gemm_path::X0Rows r = gemm_path::read_x0(x0, nets[0].layers.lags, steps);
  for (Net& net : nets) net.layers.x0_base = r.base;
  return r.rows;
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

// The layers laid out for the tile kernels (TileLayer in tile_params.h), in one zeroed buffer
// with kSlackBytes after its end, and the TileParams of a call pointing at them.
template <typename T>
struct PackedNetwork {
  std::vector<TileLayer<T>> layers;
  std::vector<T> buf;

  // Elements of the packed copies: W^T and b per layer, and W (split into its u and x columns
  // for the first layer) for a backward; the last layer's bias is not read by a backward.
  static int64_t size(const Net& net, const std::vector<int64_t>& ld, int64_t ld_du, int64_t ld_x, bool for_backward) {
    int64_t n = kSlackBytes / static_cast<int64_t>(sizeof(T));
    for (int64_t l = 0; l < net.depth(); ++l) {
      n += net.in(l) * ld[l + 1] + net.out(l);
      if (for_backward) n += l == 0 ? net.out(0) * (ld_du + ld_x) : net.out(l) * ld[l];
    }
    return n;
  }

  // ld[l]: the row stride of layer l's input rows (ld[0] unused), ld[l + 1] of its output rows.
  PackedNetwork(const Net& net, const std::vector<int64_t>& ld, int64_t ld_du, int64_t ld_x, bool for_backward) {
    buf.resize(size(net, ld, ld_du, ld_x, for_backward));
    T* d = buf.data();
    const int64_t du = net.layers.du;
    for (int64_t l = 0; l < net.depth(); ++l) {
      const int64_t in = net.in(l), out = net.out(l);
      const T* w = net.layers.w[l].data_ptr<T>();
      const at::Tensor& b = net.layers.b[l];
      TileLayer<T> ly{in, out, ld[l], ld[l + 1], d, nullptr, nullptr, nullptr};
      pack(w, out, in, in, true, d, ld[l + 1]);
      d += in * ld[l + 1];
      if (b.defined() && (!for_backward || l + 1 < net.depth())) {
        pack(b.data_ptr<T>(), 1, out, out, false, d, out);
        ly.b = d;
      }
      d += out;
      if (for_backward && l == 0) {
        pack(w, out, du, in, false, d, ld_du);
        ly.w = d;
        d += out * ld_du;
        pack(w + du, out, in - du, in, false, d, ld_x);
        ly.wx = d;
        d += out * ld_x;
      } else if (for_backward) {
        pack(w, out, in, in, false, d, ld[l]);
        ly.w = d;
        d += out * ld[l];
      }
      layers.push_back(ly);
    }
  }
};

// Row strides of a call: ld[l + 1] for layer l's outputs (ld[L] = ld_o), ld[0] = ld_du; ld_f
// for F-wide rows (the feedback ring), ld_x for the m F fed-back values of a step.
struct Strides {
  std::vector<int64_t> ld;
  int64_t ld_du, ld_o, ld_f, ld_x;
};

template <typename T>
Strides strides_of(const Net& net) {
  constexpr int64_t W = kSlackBytes / sizeof(T);
  Strides s;
  s.ld_du = row_stride(net.layers.du, W);
  s.ld_o = row_stride(net.o, W);
  s.ld_f = row_stride(net.layers.f, W);
  s.ld_x = row_stride(net.layers.f * static_cast<int64_t>(net.layers.lags.size()), W);
  s.ld.push_back(s.ld_du);
  for (int64_t l = 0; l < net.depth(); ++l) s.ld.push_back(row_stride(net.out(l), W));
  return s;
}

// Member e's TileParams (e = 0 for one network).
template <typename T>
TileParams<T> make_params(const Net& net, const Strides& st, const PackedNetwork<T>& packed, const at::Tensor& x0,
                          const at::Tensor& u, int64_t steps, int64_t delay, int64_t truncate, const Members& mem,
                          int64_t e) {
  TileParams<T> p{};
  p.steps = steps;
  p.batch = net.batch;
  p.o = net.o;
  p.du = net.layers.du;
  p.delay = delay;
  p.truncate = truncate;
  p.ld_du = st.ld_du;
  p.ld_o = st.ld_o;
  p.n_layers = net.depth();
  p.layers = packed.layers.data();
  p.m = static_cast<int64_t>(net.layers.lags.size());
  p.f = net.layers.f;
  p.lags = net.layers.lags.data();
  p.x0_base = net.layers.x0_base.data();
  p.residual = net.layers.residual;
  p.plain = net.layers.plain_feedback();
  p.ld_f = st.ld_f;
  p.ld_x = st.ld_x;
  p.act = static_cast<int>(net.layers.act);
  p.act_param = static_cast<T>(net.layers.param);
  p.rows_x0 = mem.rows_x0();
  p.rows_u = mem.rows_u();
  p.rows_y = mem.rows();
  p.x0 = x0.data_ptr<T>() + mem.x0_at(e, p.f);
  p.u = p.du ? u.data_ptr<T>() + mem.u_at(e, p.du) : nullptr;
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

// The widest hidden row stride, for the size of the tile workspaces in messages.
int64_t widest_of(const Strides& st) {
  int64_t w = 0;
  for (size_t l = 1; l + 1 < st.ld.size(); ++l) w = std::max(w, st.ld[l]);
  return w;
}

// ---------------------------------------------------------------------------------------------
// Forward

// Every member's packed weights (one per network of the call).
template <typename T>
std::vector<PackedNetwork<T>> pack_members(const char* op, const std::vector<Net>& nets, const Strides& st,
                                           int64_t steps, bool for_backward) {
  std::vector<PackedNetwork<T>> packed;
  packed.reserve(nets.size());
  try {
    for (const Net& net : nets) packed.emplace_back(net, st.ld, st.ld_du, st.ld_x, for_backward);
  } catch (const std::bad_alloc&) {
    workspace_failed(op, "packed weights", nets[0], steps,
                     static_cast<long double>(nets.size()) *
                         PackedNetwork<T>::size(nets[0], st.ld, st.ld_du, st.ld_x, for_backward) * sizeof(T));
  }
  return packed;
}

// Per member, the pointers TileParams::kept reads: member e's first row of each kept (T, [E,] B,
// out_l) tensor; empty when nothing is kept.
template <typename T>
std::vector<std::vector<T*>> kept_pointers(at::TensorList kept, const Members& mem) {
  std::vector<std::vector<T*>> ptrs(kept.empty() ? 0 : mem.count);
  for (int64_t e = 0; e < static_cast<int64_t>(ptrs.size()); ++e)
    for (const at::Tensor& k : kept)  // a (0,) entry: a layer the backward recomputes
      ptrs[e].push_back(k.dim() > 1 ? k.data_ptr<T>() + mem.own(e, k.size(-1)) : nullptr);
  return ptrs;
}

// Forward of every member: the members' row tiles are independent tasks ("more tiles"). kept:
// empty, or the contiguous (T, [E,] B, out_l) tensors a training forward fills (TileParams::kept).
template <typename T>
void forward_tile_path(const std::vector<Net>& nets, const Members& mem, const at::Tensor& x0, const at::Tensor& u,
                       int64_t steps, int64_t delay, at::Tensor& y, at::TensorList kept) {
  const Net& net = nets[0];
  const Strides st = strides_of<T>(net);
  const int64_t B = net.batch, E = mem.count;
  const std::vector<PackedNetwork<T>> packed = pack_members<T>(kForwardOp, nets, st, steps, false);
  const std::vector<std::vector<T*>> kept_at = kept_pointers<T>(kept, mem);
  std::vector<TileParams<T>> params;
  for (int64_t e = 0; e < E; ++e) {
    params.push_back(make_params<T>(nets[e], st, packed[e], x0, u, steps, delay, 0, mem, e));
    params.back().y = y.data_ptr<T>() + mem.own(e, net.o);
    if (!kept_at.empty()) params.back().kept = kept_at[e].data();
  }
  // Rows are independent and each row's arithmetic does not depend on its tile, so the tile
  // size may follow the thread count: one tile per thread (members share them out), 4..64 rows.
  const int threads = threads_for(2.0 * E * B * steps * net.work());
  const int64_t per_member = std::max<int64_t>(1, threads / E);
  const int64_t rows = std::min<int64_t>(64, std::max<int64_t>(4, round_up((B + per_member - 1) / per_member, 4)));
  const int64_t ntiles = (B + rows - 1) / rows;
  const Isa isa = active_isa();
  std::atomic<bool> ok{true};
  run_tasks(E * ntiles, threads, [&](int64_t task) {
    const int64_t e = task / ntiles, i = task % ntiles;
    if (!run_forward_tile<T>(isa, params[e], i * rows, std::min(B, (i + 1) * rows))) ok = false;
  });
  if (!ok)
    workspace_failed(kForwardOp, "tile workspace", net, steps,
                     static_cast<long double>(threads) * rows * (net.depth() > 2 ? 2 : 1) * widest_of(st) * sizeof(T));
}

// An ensemble member's slice of a tensor whose axis 1 is the member axis (x0 (D, E, B, F), u,
// y and their gradients), or the tensor itself when every member shares it.
at::Tensor member_of(const at::Tensor& t, bool shared, int64_t e) {
  return !t.defined() || shared ? t : t.select(1, e);
}

// Both forward operators: rollout_forward (keep_hidden false: the path rule picks tile or BLAS)
// and rollout_forward_hidden (the path of a training rollout, keeping what the backward of every
// hidden layer reads, act_needs_z in csrc/common/act_kind.h: one contiguous (T, [E,] B, out_l)
// tensor per hidden layer, in the same form on both paths).
std::tuple<at::Tensor, std::vector<at::Tensor>> forward_impl(
    const char* op, const at::Tensor& x0_in, const std::optional<at::Tensor>& u_in, at::TensorList weights,
    const BiasList& biases, int64_t steps, int64_t delay, int64_t truncate, c10::string_view activation,
    double param, const FeedbackArgs& fb, bool keep_hidden) {
  const RolloutSizes sizes =
      check_rollout_args(op, x0_in, u_in, weights, biases, steps, delay, truncate, activation, fb);
  check_dtype(op, x0_in);
  check_result_fits(op, sizes, x0_in.element_size(), host_memory_bytes());
  const char* remedy = "use fewer steps or a smaller batch, or run the rollout in chunks";
  // Y and the kept layers: (T, [E,] B, width); a layer the backward recomputes keeps a (0,) entry.
  auto result = [&](const char* what, const c10::SymInt& width) {
    std::vector<int64_t> shape{steps, sizes.batch.expect_int(), width.expect_int()};
    if (sizes.ensemble()) shape.insert(shape.begin() + 1, sizes.members.expect_int());
    return checked_empty(op, what, shape, x0_in.options(), remedy);
  };
  auto kept_layers = [&] {
    std::vector<at::Tensor> kept;
    for (int64_t l = 0; l + 1 < sizes.layers(); ++l)
      kept.push_back(keeps_layer(l, sizes.layers(), weights[0].size(-1))
                         ? result("the hidden activations kept for the backward", sizes.widths[l])
                         : at::empty({0}, x0_in.options()));
    return kept;
  };
  if (sizes.ensemble() && sizes.members == 0)  // an ensemble of no networks: no member to slice
    return {result("the result Y", sizes.o), keep_hidden ? kept_layers() : std::vector<at::Tensor>()};
  std::vector<Net> nets = make_nets(sizes, weights, biases, param, u_in);
  const Members mem = Members::of(sizes);
  const at::Tensor x0 = read_x0(x0_in, nets, steps), u = opt_or_undefined(u_in);
  const Net& net = nets[0];
  at::Tensor y = result("the result Y", sizes.o);
  // The kept layers, allocated here for the tile path and the ensembles (the one-network BLAS
  // path allocates its own, gemm_path::forward).
  const Path path =
      choose_path(path_shape(net, steps, mem, x0_in.scalar_type(), /*training=*/keep_hidden || t_training_forward));
  const bool own_kept = keep_hidden && (y.numel() == 0 || path == Path::kTile || sizes.ensemble());
  std::vector<at::Tensor> kept = own_kept ? kept_layers() : std::vector<at::Tensor>();
  if (y.numel() == 0) return {y, kept};
  if (path == Path::kTile) {
    AT_DISPATCH_FLOATING_TYPES(x0.scalar_type(), "fbfast_rollout_forward_tile", [&] {
      forward_tile_path<scalar_t>(nets, mem, x0, u, steps, delay, y, kept);
    });
  } else if (!sizes.ensemble()) {
    // The mm_out on y.select(0, t) fills the matrix in place; with a zero-width hidden layer it
    // writes the bias or 0.
    gemm_path::forward(op, x0, u, net.layers, y, keep_hidden ? &kept : nullptr);
  } else {
    // The members one after another, each step of each a full-batch GEMM per layer: this path is
    // taken for layers wide enough that one member's GEMMs are already large (choose_path), so
    // batching members into one call would add little; y.select(1, e)'s steps are contiguous
    // (B, O) blocks that the GEMMs write in place. A member's kept layers are its own
    // (T, B, out_l) tensors, copied into the ensemble's.
    for (int64_t e = 0; e < mem.count; ++e) {
      at::Tensor ye = y.select(1, e);
      std::vector<at::Tensor> kept_e;
      gemm_path::forward(op, member_of(x0, mem.x0_shared, e), member_of(u, mem.u_shared, e), nets[e].layers, ye,
                         keep_hidden ? &kept_e : nullptr);
      for (size_t l = 0; l < kept_e.size(); ++l)
        if (kept[l].dim() > 1) kept[l].select(1, e).copy_(kept_e[l]);
    }
  }
  return {y, kept};
}

at::Tensor rollout_forward_cpu(const at::Tensor& x0, const std::optional<at::Tensor>& u, at::TensorList weights,
                               const BiasList& biases, int64_t steps, int64_t delay, int64_t truncate,
                               c10::string_view activation, double param, at::IntArrayRef lags, int64_t feedback,
                               bool residual) {
  return std::get<0>(forward_impl(kForwardOp, x0, u, weights, biases, steps, delay, truncate, activation, param,
                                  {lags, feedback, residual}, false));
}

// ---------------------------------------------------------------------------------------------
// Backward

using GradTuple = std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>;

// Gradients that are asked for start at zero: steps t < k that never run (steps < delay) and
// zero-size inputs then come out right without special cases. x0's gradient has the full shape
// of the x0 passed in; the kernels write its first min(delay, steps) slots.
gemm_path::Grads zero_grads(const char* op, const at::Tensor& x0_in, const at::Tensor& u, at::TensorList weights,
                            const BiasList& biases, const c10::List<bool>& mask) {
  const auto opts = x0_in.options();
  // The argument's name is spelled out only for the message of a failed allocation.
  auto zeros = [&](const char* kind, int64_t l, at::IntArrayRef shape) {
    try {
      return cpu_zeros(shape, x0_in.scalar_type());
    } catch (const std::exception&) {
      const std::string what = std::string("the gradient of ") + (l < 0 ? std::string(kind) : layer_arg(kind[0], l));
      return checked_empty(op, what.c_str(), shape, opts, "split the batch into smaller parts").zero_();
    }
  };
  const int64_t L = static_cast<int64_t>(weights.size());
  gemm_path::Grads g;
  g.x0 = mask[0] ? zeros("x0", -1, x0_in.sizes()) : at::Tensor();
  g.u = mask[1] && u.defined() ? zeros("u", -1, u.sizes()) : at::Tensor();
  for (int64_t l = 0; l < L; ++l) {
    const std::optional<at::Tensor> b = biases.get(l);
    g.w.push_back(mask[2 + l] ? zeros("w", l, weights[l].sizes()) : at::Tensor());
    g.b.push_back(mask[2 + L + l] && b.has_value() ? zeros("b", l, b->sizes()) : at::Tensor());
  }
  return g;
}

// The operator's result: a gradient that is not asked for is an empty (0,) tensor.
GradTuple as_tuple(const gemm_path::Grads& g, const at::TensorOptions& opts) {
  auto or_empty = [&](const at::Tensor& t) { return t.defined() ? t : cpu_empty({0}, opts.dtype().toScalarType()); };
  std::vector<at::Tensor> w, b;
  for (const auto& t : g.w) w.push_back(or_empty(t));
  for (const auto& t : g.b) b.push_back(or_empty(t));
  return {or_empty(g.x0), or_empty(g.u), w, b};
}

// Backward of every member. Each member's weight gradients are summed per fixed group of its
// tiles, and the (member, group) pairs are the parallel tasks. grad_x0 and grad_u are in the
// ensemble's layout (., E, B, .) (for a shared x0 or u, per member, summed by the caller).
template <typename T>
void backward_tile_path(const std::vector<Net>& nets, const Members& mem, const at::Tensor& grad_y,
                        const at::Tensor& y, const at::Tensor& x0, const at::Tensor& u, int64_t delay,
                        int64_t truncate, gemm_path::Grads& out, const at::Tensor& grad_x0,
                        const at::Tensor& grad_u, at::TensorList kept) {
  const Net& net = nets[0];
  const int64_t steps = y.size(0), B = net.batch, O = net.o, L = net.depth(), E = mem.count;
  const Strides st = strides_of<T>(net);
  const int64_t tile_rows = net.work() > kWideWork ? kWideBackwardTileRows : kBackwardTileRows;
  const int64_t ntiles = (B + tile_rows - 1) / tile_rows;
  // Per layer, the size of its weight and bias accumulators within one group's block: the first
  // layer's dW0^T rows are (Du + O) of stride ld_out, the others' dW rows are out of stride ld_in.
  std::vector<int64_t> n_w(L), n_b(L);
  int64_t per_group = 0;
  for (int64_t l = 0; l < L; ++l) {
    n_w[l] = out.w[l].defined() ? (l == 0 ? net.in(0) * st.ld[1] : net.out(l) * st.ld[l]) : 0;
    n_b[l] = out.b[l].defined() ? net.out(l) : 0;
    per_group += n_w[l] + n_b[l];
  }
  // Each group of tiles keeps its own copy of the weight gradients. The number of groups
  // depends on the shape alone (a fixed summation order for any thread count), and their copies
  // together take no more than the activations a per-step loop keeps for its backward
  // (steps x B x (hidden + O)), so that memory stays within that of the loop at any width. An
  // ensemble's members are parallel tasks already: at most kMaxGroups groups over all members
  // (E = 7, 4 x 200 SiLU, B = 256, T = 10: one group per member trained as fast as four, with a
  // quarter of the accumulators: 7 copies of every weight gradient instead of 28).
  const int64_t loop_elems = steps * B * (net.hidden() + O);
  const int64_t max_groups = std::max<int64_t>(1, kMaxGroups / E);
  const int64_t groups = std::max<int64_t>(
      1, std::min({ntiles, max_groups, per_group > 0 ? loop_elems / per_group : max_groups}));
  const std::vector<PackedNetwork<T>> packed = pack_members<T>(kBackwardOp, nets, st, steps, true);
  std::vector<T> acc;
  try {
    acc.assign(static_cast<size_t>(E * groups * per_group), T(0));
  } catch (const std::bad_alloc&) {
    workspace_failed(kBackwardOp, "gradient accumulators", net, steps,
                     static_cast<long double>(E) * groups * per_group * sizeof(T));
  }
  const std::vector<std::vector<T*>> kept_at = kept_pointers<T>(kept, mem);
  std::vector<TileParams<T>> params;
  for (int64_t e = 0; e < E; ++e) {
    TileParams<T> p = make_params<T>(nets[e], st, packed[e], x0, u, steps, delay, truncate, mem, e);
    if (!kept_at.empty()) p.kept = kept_at[e].data();
    p.y_saved = y.data_ptr<T>() + mem.own(e, O);
    p.grad_y = grad_y.data_ptr<T>() + mem.own(e, O);
    p.grad_x0 = grad_x0.defined() ? grad_x0.data_ptr<T>() + mem.own(e, net.layers.f) : nullptr;
    p.grad_u = grad_u.defined() ? grad_u.data_ptr<T>() + mem.own(e, net.layers.du) : nullptr;
    params.push_back(p);
  }

  // Where layer l's accumulators start in a group's block.
  std::vector<int64_t> w_at(L), b_at(L);
  for (int64_t l = 0, at = 0; l < L; ++l) {
    w_at[l] = at;
    at += n_w[l];
    b_at[l] = at;
    at += n_b[l];
  }
  const Isa isa = active_isa();
  std::atomic<bool> ok{true};
  // The backward does about twice the forward's multiply-adds.
  run_tasks(E * groups, threads_for(4.0 * E * B * steps * net.work()), [&](int64_t task) {
    const int64_t e = task / groups, g = task % groups;
    T* base = acc.data() + task * per_group;
    std::vector<T*> w(L), b(L);
    for (int64_t l = 0; l < L; ++l) {
      w[l] = n_w[l] ? base + w_at[l] : nullptr;
      b[l] = n_b[l] ? base + b_at[l] : nullptr;
    }
    const TileGrads<T> tg{w.data(), b.data()};
    // Tiles [g*ntiles/groups, (g+1)*ntiles/groups) in order: a fixed summation order.
    for (int64_t i = g * ntiles / groups; i < (g + 1) * ntiles / groups; ++i)
      if (!run_backward_tile<T>(isa, params[e], i * tile_rows, std::min(B, (i + 1) * tile_rows), tg)) ok = false;
  });
  if (!ok) {
    const int64_t slots = std::min(delay, steps);
    int64_t hidden_ld = 0;
    for (int64_t l = 1; l < L; ++l) hidden_ld += st.ld[l];
    const int64_t z = act_needs_z(net.layers.act) ? 2 : 1;
    workspace_failed(kBackwardOp, "tile workspace", net, steps,
                     static_cast<long double>(E * groups) * tile_rows *
                         (z * hidden_ld + std::min<int64_t>(2, L - 1) * widest_of(st) + st.ld_o + slots * st.ld_f) * sizeof(T));
  }
  for (int64_t e = 0; e < E; ++e) {
    T* sum = acc.data() + e * groups * per_group;
    for (int64_t g = 1; g < groups; ++g)
      for (int64_t i = 0; i < per_group; ++i) sum[i] += sum[g * per_group + i];
    for (int64_t l = 0; l < L; ++l) {
      const int64_t in = net.in(l), o = net.out(l);
      if (n_w[l] && l == 0) {  // dW0[h, c] = (dW0^T)[c, h]
        T* d = out.w[0].data_ptr<T>() + e * o * in;
        for (int64_t h = 0; h < o; ++h)
          for (int64_t c = 0; c < in; ++c) d[h * in + c] = sum[w_at[0] + c * st.ld[1] + h];
      } else if (n_w[l]) {
        T* d = out.w[l].data_ptr<T>() + e * o * in;
        for (int64_t r = 0; r < o; ++r) std::memcpy(d + r * in, sum + w_at[l] + r * st.ld[l], sizeof(T) * in);
      }
      if (n_b[l]) std::memcpy(out.b[l].data_ptr<T>() + e * o, sum + b_at[l], sizeof(T) * o);
    }
  }
}

// The members of an ensemble one after another through the per-step ATen path (see
// forward_impl). grad_x0 and grad_u are in the ensemble's layout, as for backward_tile_path.
void backward_members_gemm(const char* op, const std::vector<Net>& nets, const Members& mem,
                           const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& x0, const at::Tensor& u,
                           int64_t delay, int64_t truncate, gemm_path::Grads& out, const at::Tensor& grad_x0,
                           const at::Tensor& grad_u, at::TensorList kept) {
  for (int64_t e = 0; e < mem.count; ++e) {
    gemm_path::Grads g;
    for (const auto& t : out.w) g.w.push_back(t.defined() ? t.select(0, e) : t);
    for (const auto& t : out.b) g.b.push_back(t.defined() ? t.select(0, e) : t);
    g.x0 = member_of(grad_x0, false, e);
    // The ATen path views a chunk of u's gradient as (rows, Du): it needs the member's own
    // contiguous block.
    if (grad_u.defined())
      g.u = checked_empty(op, "a member's gradient of u", {y.size(0), mem.batch, nets[e].layers.du}, y.options(),
                          "split the batch into smaller parts")
                .zero_();
    // The ATen path views chunks of the kept layers as (rows, out_l) blocks: the member's own
    // contiguous copy, one member at a time.
    std::vector<at::Tensor> kept_e;
    for (const at::Tensor& k : kept) kept_e.push_back(k.dim() > 1 ? k.select(1, e).contiguous() : k);
    gemm_path::backward(op, grad_y.select(1, e), y.select(1, e), member_of(x0, mem.x0_shared, e),
                        member_of(u, mem.u_shared, e), nets[e].layers, delay, truncate, g, kept_e, kChunkBytes);
    if (grad_u.defined()) grad_u.select(1, e).copy_(g.u);
  }
}

// Both backward operators: rollout_backward (kept empty: recomputed, on the path the rule
// picks) and rollout_backward_hidden (reading what the forward kept, on the path the rule picks).
GradTuple backward_impl(const char* op, const at::Tensor& grad_y_in, const at::Tensor& y_in, at::TensorList kept_in,
                        bool from_kept, const at::Tensor& x0_in, const std::optional<at::Tensor>& u_in,
                        at::TensorList weights, const BiasList& biases, int64_t delay, int64_t truncate,
                        c10::string_view activation, double param, const c10::List<bool>& output_mask,
                        const FeedbackArgs& fb) {
  const RolloutSizes sizes = check_backward_args(op, grad_y_in, y_in, x0_in, u_in, weights, biases, delay, truncate,
                                                 activation, output_mask, fb);
  check_dtype(op, x0_in);
  if (from_kept) check_hidden(op, kept_in, sizes, x0_in, weights[0].sym_size(-1));
  const int64_t steps = y_in.size(0);
  if (sizes.ensemble() && sizes.members == 0)
    return as_tuple(zero_grads(op, x0_in, opt_or_undefined(u_in), weights, biases, output_mask), x0_in.options());
  std::vector<Net> nets = make_nets(sizes, weights, biases, param, u_in);
  const Members mem = Members::of(sizes);
  const Net& net = nets[0];
  const at::Tensor x0 = read_x0(x0_in, nets, steps), u = opt_or_undefined(u_in);
  const at::Tensor y = y_in.contiguous(), grad_y = grad_y_in.contiguous();
  std::vector<at::Tensor> kept;
  for (const auto& t : kept_in) kept.push_back(t.contiguous());

  gemm_path::Grads g = zero_grads(op, x0_in, u, weights, biases, output_mask);
  if (y.numel() == 0) return as_tuple(g, x0.options());
  const bool tile =
      choose_path(path_shape(net, steps, mem, x0_in.scalar_type(), /*training=*/true)) == Path::kTile;
  if (!sizes.ensemble() && !tile) {
    gemm_path::backward(op, grad_y, y, x0, u, net.layers, delay, truncate, g, kept, kChunkBytes);
    return as_tuple(g, x0.options());
  }
  // The kernels write x0's and u's gradients in the ensemble's layout, one block per member: a
  // shared x0 or u gets per-member gradients here, summed over the members below.
  auto per_member = [&](const at::Tensor& grad, bool shared, const char* what) {
    if (!grad.defined() || !shared) return grad;
    std::vector<int64_t> shape = grad.sizes().vec();
    shape.insert(shape.begin() + 1, mem.count);
    return checked_empty(op, what, shape, grad.options(), "split the batch or the ensemble into smaller parts")
        .zero_();
  };
  const at::Tensor gx0 = per_member(g.x0, mem.x0_shared, "the members' gradients of the shared x0");
  const at::Tensor gu = per_member(g.u, mem.u_shared, "the members' gradients of the shared u");
  if (tile) {
    AT_DISPATCH_FLOATING_TYPES(x0.scalar_type(), "fbfast_rollout_backward_tile", [&] {
      backward_tile_path<scalar_t>(nets, mem, grad_y, y, x0, u, delay, truncate, g, gx0, gu, kept);
    });
  } else {
    backward_members_gemm(op, nets, mem, grad_y, y, x0, u, delay, truncate, g, gx0, gu, kept);
  }
  if (gx0.defined() && !gx0.is_same(g.x0)) at::sum_out(g.x0, gx0, {1});
  if (gu.defined() && !gu.is_same(g.u)) at::sum_out(g.u, gu, {1});
  return as_tuple(g, x0.options());
}

GradTuple rollout_backward_cpu(const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& x0,
                               const std::optional<at::Tensor>& u, at::TensorList weights, const BiasList& biases,
                               int64_t delay, int64_t truncate, c10::string_view activation, double param,
                               const c10::List<bool>& output_mask, at::IntArrayRef lags, int64_t feedback,
                               bool residual) {
  return backward_impl(kBackwardOp, grad_y, y, {}, false, x0, u, weights, biases, delay, truncate, activation, param,
                       output_mask, {lags, feedback, residual});
}

// ---------------------------------------------------------------------------------------------
// Training wide layers: the forward keeps every step's hidden activations (or pre-activations),
// as a per-step loop does, so that the backward need not recompute them. There the
// recomputation is GEMMs of the loop's per-step work (benchmarks/wide.py), while the memory is
// what the loop keeps anyway. csrc/autograd.cpp takes these when saves_hidden() says so.

std::tuple<at::Tensor, std::vector<at::Tensor>> rollout_forward_hidden_cpu(
    const at::Tensor& x0, const std::optional<at::Tensor>& u, at::TensorList weights, const BiasList& biases,
    int64_t steps, int64_t delay, c10::string_view activation, double param, at::IntArrayRef lags,
    int64_t feedback, bool residual) {
  return forward_impl("fbfast::rollout_forward_hidden (CPU)", x0, u, weights, biases, steps, delay, 0, activation,
                      param, {lags, feedback, residual}, true);
}

GradTuple rollout_backward_hidden_cpu(const at::Tensor& grad_y, const at::Tensor& y, at::TensorList hidden,
                                      const at::Tensor& x0, const std::optional<at::Tensor>& u, at::TensorList weights,
                                      const BiasList& biases, int64_t delay, int64_t truncate,
                                      c10::string_view activation, double param, const c10::List<bool>& output_mask,
                                      at::IntArrayRef lags, int64_t feedback, bool residual) {
  return backward_impl("fbfast::rollout_backward_hidden (CPU)", grad_y, y, hidden, true, x0, u, weights, biases, delay,
                       truncate, activation, param, output_mask, {lags, feedback, residual});
}

// ---------------------------------------------------------------------------------------------
// Calibration: which path is faster is a property of the machine, not only of the shape. The
// tile kernels' speed follows the instruction set, the BLAS path's the BLAS library's code for
// this CPU (MKL runs AVX-512 on Intel but AVX2 on AMD), so a rule tuned on one machine picks the
// slower path on another (kCalibrateMinWork). Where the two are close, "auto" times both once
// per process and shape class on a reduced copy of the call and keeps the faster:
//  * the class: the widths, Du, E, activation, dtype, instruction set, training or not, and B
//    and T rounded up to powers of two;
//  * the copy: the same network with weights 0.5 / in_l (no overflow, no subnormals), the call's
//    rows up to 4096 over the members (kCalibrationMaxRows) and T' <= T steps, 16 to 64,
//    enough for the reduced call to run on as many threads as the full one (threads_for); a
//    training step is the forward and backward that autograd runs for that path (kept
//    activations where it keeps them);
//  * each path three times, alternating, the fastest of each (the first pays one-time costs);
//    the rule's path stays unless the other was faster by a margin (calibration_margin): 3% for
//    noise, more where the copy has fewer steps than the call.
// A path's result differs from the other's in float32 rounding only (docs/internals.md), but a
// process may choose differently from another, so cpu_path='rule' (the static rule alone) and
// 'tile'/'blas' remain for runs that must repeat bit for bit. fbfast.cpu_path_calibration()
// lists what was measured (benchmarks/results/path-calibration.md has this project's machines).

struct ClassKey {
  std::vector<int64_t> widths;
  int64_t du, members, batch_class, steps_class;
  int act, dtype, isa;
  bool training;
  bool operator<(const ClassKey& o) const {
    return std::tie(widths, du, members, batch_class, steps_class, act, dtype, isa, training) <
           std::tie(o.widths, o.du, o.members, o.batch_class, o.steps_class, o.act, o.dtype, o.isa, o.training);
  }
};

struct Measured {
  Path path;
  double tile_ms = 0, blas_ms = 0;  // 0: not measured (the rule's choice, after an error)
  int64_t batch = 0, steps = 0;     // the reduced call's
};

// The reduced call's steps, and how much faster than the rule's path the other must be there
// (calibration_margin). A copy of fewer steps than the call overstates the per-call costs of a
// path, the tile backward's packing and accumulators most: measured with benchmarks/paths.py, at
// (256, 0, 64, 256, 100) training the tile path was 2.6% slower than BLAS on a 12-step copy and
// 10% faster on the full call. So the margin grows with the steps the copy leaves out, up to 15%,
// over a floor of 3% for timings that are noise on a shared machine: where the copy has nearly
// the call's steps (at (4096, 0, 256, 512, 20), 16 of 20), a path 5% faster on it is faster.
constexpr int64_t kCalibrationMinSteps = 16;
constexpr int64_t kCalibrationMaxSteps = 64;
constexpr double kCalibrationNoise = 1.03;
constexpr double kCalibrationPerCallMargin = 0.15;
double calibration_margin(int64_t copy_steps, int64_t call_steps) {
  const double left_out = 1.0 - static_cast<double>(copy_steps) / static_cast<double>(std::max<int64_t>(call_steps, 1));
  return std::max(kCalibrationNoise, 1.0 + kCalibrationPerCallMargin * left_out);
}
// The reduced call's rows: the call's own up to this many. BLAS GEMMs gain on the tile kernels
// as the rows grow (at (B, Du, O, H) = (4096, 0, 256, 512) training, the tile path took 1.15x the
// BLAS path's time on 1024 rows and 1.17x on 4096, and the calibration on 1024 rows, within its
// margin, kept the tile path: benchmarks/paths.py), so a copy of fewer rows than the call
// misjudges wide layers; beyond 4096 the GEMMs are as efficient as they get.
constexpr int64_t kCalibrationMaxRows = 4096;

std::mutex g_calibration_mutex;
std::map<ClassKey, Measured>& calibrated() {
  static std::map<ClassKey, Measured> table;
  return table;
}

int64_t power_of_two_above(int64_t n) {
  int64_t c = 1;
  while (c < n) c <<= 1;
  return c;
}

constexpr const char* kCalibrationOp = "fbfast: timing the CPU paths (calibration)";

// The reduced call of a class, and the wall time of one path on it in milliseconds.
struct ReducedCall {
  at::Tensor x0, u, grad_y;
  std::vector<at::Tensor> w;
  BiasList b;
  int64_t steps = 0, feedback = 0;
  bool training = false;
  Act act = Act::kRelu;

  PathShape shape;

  explicit ReducedCall(const PathShape& s) : training(s.training), act(s.act), shape(s) {
    const auto opts = at::TensorOptions().dtype(s.dtype);
    const int64_t O = s.widths.back(), in0 = s.widths[0], E = s.members;
    const int64_t F = std::min(O, in0), du = in0 - F;  // one lag reading F outputs, the rest u
    const int64_t B = std::min(s.batch, std::max<int64_t>(1, kCalibrationMaxRows / E));
    const double row_flops = 2.0 * E * B * s.work();
    steps = std::min(s.steps, std::clamp<int64_t>(static_cast<int64_t>(std::ceil(kParallelMinFlops / row_flops)),
                                                  kCalibrationMinSteps, kCalibrationMaxSteps));
    feedback = F == O ? 0 : F;
    auto member = [&](std::vector<int64_t> shape) {
      if (E > 1) shape.insert(shape.begin(), E);
      return shape;
    };
    x0 = at::full({1, B, F}, 0.25, opts);
    if (du > 0) u = at::full({steps, B, du}, 0.25, opts);
    for (size_t l = 0; l + 1 < s.widths.size(); ++l) {
      w.push_back(at::full(member({s.widths[l + 1], s.widths[l]}), 0.5 / std::max<int64_t>(1, s.widths[l]), opts));
      b.push_back(at::full(member({s.widths[l + 1]}), 0.01, opts));
    }
    std::vector<int64_t> y_shape{steps, B, O};
    if (E > 1) y_shape.insert(y_shape.begin() + 1, E);
    grad_y = at::full(y_shape, 1e-3, opts);
  }

  double time_ms(Path path) const {
    const ForcePath force(path);
    const c10::string_view name = kActNames[static_cast<int>(act)];
    const std::optional<at::Tensor> uo = u.defined() ? std::optional<at::Tensor>(u) : std::nullopt;
    const std::vector<int64_t> no_lags;
    const FeedbackArgs fb{no_lags, feedback, false};
    c10::List<bool> mask({false, false});
    for (size_t l = 0; l < 2 * w.size(); ++l) mask.push_back(true);
    const auto start = std::chrono::steady_clock::now();
    if (!training) {
      forward_impl(kCalibrationOp, x0, uo, w, b, steps, 1, 0, name, 0.0, fb, false);
    } else {
      // What autograd runs for this path (csrc/autograd.cpp, saves_hidden).
      const bool keep = keeps_hidden_on(path, shape);
      auto [y, kept] = forward_impl(kCalibrationOp, x0, uo, w, b, steps, 1, 0, name, 0.0, fb, keep);
      backward_impl(kCalibrationOp, grad_y, y, kept, keep, x0, uo, w, b, 1, 0, name, 0.0, mask, fb);
    }
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
  }

  struct ForcePath {
    Path previous;
    explicit ForcePath(Path p) : previous(t_forced) { t_forced = p; }
    ~ForcePath() { t_forced = previous; }
  };
};

Path calibrated_path(const PathShape& s, Path rule) {
  const ClassKey key{s.widths, s.du, s.members, power_of_two_above(s.batch), power_of_two_above(s.steps),
                     static_cast<int>(s.act), static_cast<int>(s.dtype), static_cast<int>(active_isa()), s.training};
  {
    const std::lock_guard<std::mutex> lock(g_calibration_mutex);
    const auto found = calibrated().find(key);
    if (found != calibrated().end()) return found->second.path;
  }
  // Measured outside the lock: another thread may measure the same class meanwhile; the first
  // result stored is the one every later call uses.
  Measured m{rule};
  try {
    const ReducedCall call(s);
    double tile = std::numeric_limits<double>::infinity(), blas = tile;
    for (int rep = 0; rep < 3; ++rep) {
      tile = std::min(tile, call.time_ms(Path::kTile));
      blas = std::min(blas, call.time_ms(Path::kBlas));
    }
    // The rule's path unless the other one is clearly faster: a reduced call overstates the
    // per-call costs of a path (the tile backward's packing and accumulators are paid once per
    // call, over fewer steps), and two timings a few percent apart are noise on a shared machine.
    const double rule_ms = rule == Path::kTile ? tile : blas, other_ms = rule == Path::kTile ? blas : tile;
    const Path other = rule == Path::kTile ? Path::kBlas : Path::kTile;
    m = {other_ms * calibration_margin(call.steps, s.steps) < rule_ms ? other : rule, tile, blas, call.x0.size(1),
         call.steps};
  } catch (const std::exception&) {
    // Out of memory for the reduced call, say: the rule decides, and the call itself reports
    // its own errors.
  }
  const std::lock_guard<std::mutex> lock(g_calibration_mutex);
  return calibrated().emplace(key, m).first->second.path;
}

// fbfast::cpu_path_calibration(): one line per measured class, for fbfast.cpu_path_calibration().
std::vector<std::string> calibration_report() {
  const std::lock_guard<std::mutex> lock(g_calibration_mutex);
  std::vector<std::string> lines;
  for (const auto& [k, m] : calibrated()) {
    std::ostringstream line;
    line << "widths ";
    for (size_t i = 0; i < k.widths.size(); ++i) line << (i ? "-" : "") << k.widths[i];
    line << ", Du " << k.du << ", E " << k.members << ", B <= " << k.batch_class << ", T <= " << k.steps_class << ", "
         << kActNames[k.act] << ", " << (static_cast<at::ScalarType>(k.dtype) == at::kDouble ? "float64" : "float32") << ", "
         << isa_name(static_cast<Isa>(k.isa)) << ", " << (k.training ? "training" : "forward") << ": ";
    if (m.tile_ms > 0)
      line << "tile " << m.tile_ms << " ms, blas " << m.blas_ms << " ms at B " << m.batch << ", T " << m.steps << " -> ";
    else
      line << "not measured, the rule's ";
    line << path_name(m.path);
    lines.push_back(line.str());
  }
  return lines;
}

}  // namespace

TrainingForward::TrainingForward() : previous_(t_training_forward) { t_training_forward = true; }
TrainingForward::~TrainingForward() { t_training_forward = previous_; }

bool saves_hidden(const at::Tensor& x0, const std::optional<at::Tensor>& u, at::TensorList weights, int64_t steps,
                  c10::string_view activation) {
  PathShape s;
  s.widths.push_back(weights[0].size(-1));
  for (const at::Tensor& w : weights) s.widths.push_back(w.size(-2));
  s.du = u.has_value() ? u->size(-1) : 0;
  s.batch = x0.size(-2);
  s.steps = steps;
  s.members = weights[0].dim() == 3 ? weights[0].size(0) : 1;
  s.act = parse_activation("fbfast::rollout_forward", activation);
  s.dtype = x0.scalar_type();
  s.training = true;
  return keeps_hidden_on(choose_path(s), s);
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
  m.def("cpu_path_calibration() -> str[]", &calibration_report);
}

}  // namespace fbfast::cpu
