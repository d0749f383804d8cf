// CUDA host code of the fused rollout: argument checks, layout, the choice between the fused
// kernels and the general path, and the registration of both operators for the CUDA dispatch
// key (rollout_forward_hidden / rollout_backward_hidden are CPU and meta only: the fused
// backward recomputes the hidden layers on chip, and the general path does in chunks).
//
//  * fused path (forward_kernel.cuh, backward_kernel.cuh): one persistent launch runs all T
//    steps; a block owns a tile of batch rows, with the weights of every layer and the tile's
//    state in shared memory. Every feedback structure (lags, partial feedback, residual,
//    truncation) and a whole ensemble in one launch (a grid row per member). Taken whenever the
//    network has at most kMaxLayers layers, the rollout at most kMaxLags lags and the plan fits
//    the device's opt-in shared memory (plan_rollout, rollout_params.h). Its GEMMs run on tensor
//    cores (3xTF32) where the widths allow (cuda_tensor_cores='auto'|'off').
//  * general path (csrc/gemm_path.h): per-step cuBLAS GEMMs through ATen, for any size (an
//    ensemble member after member); the same code serves the CPU's wide layers. With
//    cuda_graphs='auto'|'always' (default 'off'), a call of the same sizes seen again is recorded
//    as a CUDA graph and replayed as one launch (graphed_call.h).
// cuda_path='fused'|'general' (fbfast.set_kernel_options, or FBFAST_CUDA_PATH read at load)
// overrides the rule (the tests run both paths).
// Everything runs on the current stream of the tensors' device, under a device guard.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/sum.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "../gemm_path.h"
#include "../rollout_checks.h"
#include "graphed_call.h"
#include "rollout_launch.h"
#include "rollout_params.h"

namespace fbfast {
namespace cuda {
namespace {

constexpr const char* kForwardOp = "fbfast::rollout_forward (CUDA)";
constexpr const char* kBackwardOp = "fbfast::rollout_backward (CUDA)";
// The general path's backward keeps its chunk buffers below this size.
constexpr int64_t kChunkBytes = int64_t(256) << 20;

void check_dtype(const char* op, const at::Tensor& x0) {
  const auto dtype = x0.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": x0 has dtype ", dtype,
              "; the CUDA kernel takes float32, float16 or bfloat16 (all tensors share x0's dtype)");
  TORCH_CHECK(x0.device().is_cuda(), op, ": x0 must be a CUDA tensor, got ", x0.device());
}

at::Tensor opt_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

const void* data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }
void* mutable_data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

struct DeviceLimits {
  int sms = 0;
  int major = 0;           // compute capability: TF32 tensor cores from 8 on
  int64_t smem_optin = 0;  // bytes of shared memory one block may opt in to
  int64_t memory = 0;      // bytes of global memory
};

// Read once per device: cudaDeviceGetAttribute is cheap, but this runs on every call.
DeviceLimits device_limits(c10::DeviceIndex device) {
  static std::mutex mutex;
  static std::vector<DeviceLimits> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  if (cache.size() <= static_cast<size_t>(device)) cache.resize(device + 1);
  DeviceLimits& limits = cache[device];
  if (limits.sms == 0) {
    int sms = 0, smem = 0, major = 0;
    size_t free_bytes = 0, total_bytes = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    {
      const c10::cuda::CUDAGuard guard(device);
      C10_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
    }
    limits = DeviceLimits{sms, major, smem, static_cast<int64_t>(total_bytes)};
  }
  return limits;
}

int64_t device_memory(c10::DeviceIndex device) { return device_limits(device).memory; }

enum class PathChoice : int { kAuto = 0, kFused = 1, kGeneral = 2 };

std::optional<PathChoice> parse_path(const std::string& name) {
  if (name.empty() || name == "auto") return PathChoice::kAuto;
  if (name == "fused") return PathChoice::kFused;
  if (name == "general") return PathChoice::kGeneral;
  return std::nullopt;
}
const char* path_name(PathChoice c) {
  return c == PathChoice::kFused ? "fused" : c == PathChoice::kGeneral ? "general" : "auto";
}

// FBFAST_CUDA_PATH is read once, when the library loads; afterwards only fbfast::cuda_options
// changes the setting. No call reads the environment: getenv races with a setenv in another
// thread (Python's os.environ[...] = ...) and can crash.
PathChoice path_from_env() {
  const char* env = std::getenv("FBFAST_CUDA_PATH");
  return parse_path(env ? env : "").value_or(PathChoice::kAuto);
}
std::atomic<int> g_path{static_cast<int>(path_from_env())};

PathChoice path_override() { return static_cast<PathChoice>(g_path.load(std::memory_order_relaxed)); }

// Tensor cores in the fused kernels where the widths allow (rollout_params.h): "auto" (default)
// or "off" (FBFAST_CUDA_TENSOR_CORES, read at load, like FBFAST_CUDA_PATH).
std::optional<bool> parse_tensor_cores(const std::string& name) {
  if (name.empty() || name == "auto") return true;
  if (name == "off") return false;
  return std::nullopt;
}
bool tensor_cores_from_env() {
  const char* env = std::getenv("FBFAST_CUDA_TENSOR_CORES");
  return parse_tensor_cores(env ? env : "").value_or(true);
}
std::atomic<bool> g_tensor_cores{tensor_cores_from_env()};

std::vector<std::string> cuda_options(const std::optional<std::string>& path,
                                      const std::optional<std::string>& graphs,
                                      const std::optional<std::string>& tensor_cores) {
  const bool tc_now = g_tensor_cores.load();
  std::vector<std::string> previous{path_name(path_override()), graph_mode_name(graph_mode()),
                                    tc_now ? "auto" : "off"};
  // Every value is checked before any is set.
  const auto choice = path.has_value() ? parse_path(*path) : std::optional<PathChoice>(path_override());
  TORCH_CHECK(choice.has_value(), "fbfast.set_kernel_options: cuda_path must be 'auto', 'fused' or 'general', got '",
              path.value_or(""), "'");
  const auto mode = graphs.has_value() ? parse_graph_mode(*graphs) : std::optional<GraphMode>(graph_mode());
  TORCH_CHECK(mode.has_value(), "fbfast.set_kernel_options: cuda_graphs must be 'auto', 'always' or 'off', got '",
              graphs.value_or(""), "'");
  const auto tc = tensor_cores.has_value() ? parse_tensor_cores(*tensor_cores) : std::optional<bool>(tc_now);
  TORCH_CHECK(tc.has_value(), "fbfast.set_kernel_options: cuda_tensor_cores must be 'auto' or 'off', got '",
              tensor_cores.value_or(""), "'");
  g_path.store(static_cast<int>(*choice));
  set_graph_mode(*mode);
  if (*mode == GraphMode::kOff) release_graphs();
  g_tensor_cores.store(*tc);
  return previous;
}

// fbfast::cuda_graph_stats(): graphed_call.h's counters, for fbfast.cuda_graph_stats().
std::vector<int64_t> cuda_graph_stats() {
  const GraphStats s = graph_stats();
  return {s.recorded, s.replayed, s.failed, s.held};
}

// The layers, contiguous, as the general path takes them (csrc/gemm_path.h).
gemm_path::Network make_network(at::TensorList weights, const BiasList& biases, const RolloutSizes& sizes,
                                double param, int64_t du) {
  const Act act = sizes.act;
  gemm_path::Network net;
  net.lags = sizes.lags;
  net.f = sizes.f.expect_int();
  net.residual = sizes.residual;
  for (size_t l = 0; l < weights.size(); ++l) {
    net.w.push_back(weights[l].contiguous());
    net.b.push_back(opt_or_undefined(biases.get(l)));
  }
  net.act = act;
  net.param = param;
  net.du = du;
  return net;
}

// Widths beyond this never fit in shared memory; checking first keeps them out of Dims' ints.
constexpr int64_t kMaxFusedWidth = int64_t(1) << 20;

// "Du=2, O=3, widths 16x16x3, lags (3, 1), F=2, residual": the sizes that decide whether the
// fused path fits.
std::string describe(const RolloutSizes& s) {
  std::string widths, lags;
  for (const auto& w : s.widths) widths += (widths.empty() ? "" : "x") + std::to_string(w.expect_int());
  for (const int64_t d : s.lags) lags += (lags.empty() ? "" : ", ") + std::to_string(d);
  return "Du=" + std::to_string(s.du.expect_int()) + ", O=" + std::to_string(s.o.expect_int()) + ", widths " +
         widths + (s.lags.size() == 1 ? ", delay=" + lags : ", lags (" + lags + ")") +
         ", F=" + std::to_string(s.f.expect_int()) + (s.residual ? ", residual" : "");
}

// The fused plan of one call (plan.fused == false: the general path), and in `dims` the problem
// as the fused kernels see it: every member of an ensemble in one launch.
Plan choose_plan(const RolloutSizes& s, int64_t steps, int64_t truncate, bool backward, c10::DeviceIndex device,
                 const char* op, Dims& dims) {
  const PathChoice choice = path_override();
  if (choice == PathChoice::kGeneral) return Plan{};
  const bool pinned = choice == PathChoice::kFused;
  auto general = [&](const std::string& why) {
    TORCH_CHECK(!pinned, op, ": the fused path is pinned (cuda_path='fused'), but ", why,
                "; set cuda_path='auto' to take the general path");
    return Plan{};
  };
  const int64_t L = s.layers(), m = static_cast<int64_t>(s.lags.size());
  const int64_t E = s.ensemble() ? s.members.expect_int() : 1;
  if (L > kMaxLayers)
    return general(c10::str("the network has ", L, " layers and the fused kernels hold at most ", kMaxLayers));
  if (m > kMaxLags)
    return general(c10::str("the rollout reads ", m, " lags and the fused kernels hold at most ", kMaxLags));
  if (E > kMaxMembers)
    return general(c10::str("the ensemble has ", E, " members and the fused kernels launch at most ", kMaxMembers));
  const int64_t du = s.du.expect_int();
  bool small = du < kMaxFusedWidth;
  std::vector<int> widths;
  for (const auto& w : s.widths) {
    small = small && w.expect_int() < kMaxFusedWidth;
    widths.push_back(static_cast<int>(std::min(w.expect_int(), kMaxFusedWidth)));
  }
  const DeviceLimits limits = device_limits(device);
  Plan plan;
  if (small) {
    dims = make_dims(steps, s.batch.expect_int(), static_cast<int>(du), static_cast<int>(L), widths.data(), s.delay,
                     truncate);
    set_feedback(dims, static_cast<int>(m), s.lags.data(), static_cast<int>(s.f.expect_int()), s.residual);
    dims.members = E;
    // Both operators read the setting: one changed between a forward and its backward makes the
    // backward recompute z with the other arithmetic (results then agree to rounding only).
    plan = plan_rollout(dims, backward, s.act, limits.sms, limits.smem_optin,
                        g_tensor_cores.load() && limits.major >= 8);
  }
  TORCH_CHECK(plan.fused || !pinned, op, ": the fused path is pinned (cuda_path='fused'), but the weights (",
              describe(s), ") do not fit in the ", limits.smem_optin,
              " bytes of shared memory per block of this GPU; set cuda_path='auto' to take the "
              "general path, or reduce the widths");
  return plan;
}

Dtype dtype_of(at::ScalarType dtype) {
  switch (dtype) {
    case at::kHalf: return Dtype::kFloat16;
    case at::kBFloat16: return Dtype::kBFloat16;
    default: return Dtype::kFloat32;  // check_dtype admits no other
  }
}

std::vector<const void*> weight_pointers(const gemm_path::Network& net) {
  std::vector<const void*> w;
  for (const auto& t : net.w) w.push_back(t.data_ptr());
  return w;
}

std::vector<const void*> bias_pointers(const gemm_path::Network& net) {
  std::vector<const void*> b;
  for (const auto& t : net.b) b.push_back(data_or_null(t));
  return b;
}

// What, besides the sizes and dtypes of its tensors, decides the work of a general-path call:
// the key of its recorded graph (graphed_call.h). kind: 0 forward, 1 backward.
std::vector<int64_t> general_key(int64_t kind, const gemm_path::Network& net, int64_t delay, int64_t truncate,
                                 const c10::List<bool>* mask) {
  int64_t param_bits = 0;
  static_assert(sizeof(param_bits) == sizeof(net.param));
  std::memcpy(&param_bits, &net.param, sizeof(param_bits));
  std::vector<int64_t> key{kind, static_cast<int64_t>(net.act), param_bits, net.du, net.f, net.residual, delay,
                           truncate, net.layers(), static_cast<int64_t>(net.lags.size())};
  key.insert(key.end(), net.lags.begin(), net.lags.end());
  key.insert(key.end(), net.x0_base.begin(), net.x0_base.end());
  if (mask)
    for (const bool want : *mask) key.push_back(want);
  return key;
}

// The general path's inputs as run_graphed takes them: `first`, then w_1..w_L, b_1..b_L.
std::vector<at::Tensor> general_inputs(std::vector<at::Tensor> first, const gemm_path::Network& net) {
  first.insert(first.end(), net.w.begin(), net.w.end());
  first.insert(first.end(), net.b.begin(), net.b.end());
  return first;
}

// `net` with its weights and biases taken from a general_inputs list whose first `skip` entries
// are not parameters.
gemm_path::Network with_parameters(gemm_path::Network net, const std::vector<at::Tensor>& in, size_t skip) {
  const size_t L = net.w.size();
  for (size_t l = 0; l < L; ++l) {
    net.w[l] = in[skip + l];
    net.b[l] = in[skip + L + l];
  }
  return net;
}

// The general path's forward: replayed from a recorded graph where graphed_call.h's rules allow.
void general_forward(const at::Tensor& x0, const at::Tensor& u, const gemm_path::Network& net, at::Tensor& y,
                     int64_t delay, int64_t truncate) {
  const GraphBody body = [&net](const std::vector<at::Tensor>& in, const std::vector<at::Tensor>& out) {
    at::Tensor y_out = out[0];
    gemm_path::forward(kForwardOp, in[0], in[1], with_parameters(net, in, 2), y_out, nullptr);
  };
  // With graphs off (the default), no key or input list is built.
  if (graph_mode() != GraphMode::kOff &&
      run_graphed(general_key(0, net, delay, truncate, nullptr), y.size(0), general_inputs({x0, u}, net), {y}, body))
    return;
  gemm_path::forward(kForwardOp, x0, u, net, y, nullptr);
}

// The general path's backward into g (the wanted gradients, zero-filled), likewise.
void general_backward(const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& x0, const at::Tensor& u,
                      const gemm_path::Network& net, int64_t delay, int64_t truncate,
                      const c10::List<bool>& output_mask, gemm_path::Grads& g) {
  const GraphBody body = [&](const std::vector<at::Tensor>& in, const std::vector<at::Tensor>& out) {
    // The graph's own gradients are zero-filled inside it, as the general path needs them.
    for (const auto& t : out)
      if (t.defined()) t.zero_();
    const size_t L = net.w.size();
    gemm_path::Grads own{out[0], out[1], std::vector<at::Tensor>(out.begin() + 2, out.begin() + 2 + L),
                         std::vector<at::Tensor>(out.begin() + 2 + L, out.end())};
    gemm_path::backward(kBackwardOp, in[0], in[1], in[2], in[3], with_parameters(net, in, 4), delay, truncate, own,
                        {}, kChunkBytes);
  };
  if (graph_mode() != GraphMode::kOff) {
    std::vector<at::Tensor> out{g.x0, g.u};
    out.insert(out.end(), g.w.begin(), g.w.end());
    out.insert(out.end(), g.b.begin(), g.b.end());
    if (run_graphed(general_key(1, net, delay, truncate, &output_mask), y.size(0),
                    general_inputs({grad_y, y, x0, u}, net), out, body))
      return;
  }
  gemm_path::backward(kBackwardOp, grad_y, y, x0, u, net, delay, truncate, g, {}, kChunkBytes);
}

// An ensemble (docs/spec.md §1.3) on the general path runs its members one after another: member
// e's weights w[e], its own x0[:, e] and u[:, e] or the shared ones. (The fused path launches all
// members at once.)
struct Member {
  std::vector<at::Tensor> w;
  BiasList b;
  std::optional<at::Tensor> x0, u;
};
Member member(const RolloutSizes& s, int64_t e, const at::Tensor& x0, const std::optional<at::Tensor>& u,
              at::TensorList weights, const BiasList& biases) {
  Member m;
  for (const auto& w : weights) m.w.push_back(w.select(0, e));
  for (size_t l = 0; l < biases.size(); ++l) {
    const std::optional<at::Tensor> b = biases.get(l);
    m.b.push_back(b.has_value() ? std::optional<at::Tensor>(b->select(0, e)) : std::nullopt);
  }
  m.x0 = s.x0_shared ? x0 : x0.select(1, e);
  if (u.has_value()) m.u = s.u_shared ? *u : u->select(1, e);
  return m;
}

at::Tensor rollout_forward_cuda(const at::Tensor& x0_in, const std::optional<at::Tensor>& u_in,
                                at::TensorList weights, const BiasList& biases, int64_t steps, int64_t delay,
                                int64_t truncate, c10::string_view activation, double activation_param,
                                at::IntArrayRef lags, int64_t feedback, bool residual) {
  const RolloutSizes sizes = check_rollout_args(kForwardOp, x0_in, u_in, weights, biases, steps, delay, truncate,
                                                activation, {lags, feedback, residual});
  check_dtype(kForwardOp, x0_in);
  const c10::cuda::CUDAGuard guard(x0_in.device());
  check_result_fits(kForwardOp, sizes, x0_in.element_size(), device_memory(x0_in.get_device()));
  const bool ensemble = sizes.ensemble();
  const int64_t E = ensemble ? sizes.members.expect_int() : 1, B = sizes.batch.expect_int(),
                O = sizes.o.expect_int();
  const std::vector<int64_t> y_shape =
      ensemble ? std::vector<int64_t>{steps, E, B, O} : std::vector<int64_t>{steps, B, O};
  at::Tensor y = checked_empty(kForwardOp, "the result Y", y_shape, x0_in.options(),
                               "use fewer steps or a smaller batch, or run the rollout in chunks");
  if (steps == 0 || B == 0 || O == 0 || E == 0) return y;

  Dims dims{};
  const Plan plan = choose_plan(sizes, steps, truncate, false, x0_in.get_device(), kForwardOp, dims);
  if (!plan.fused && ensemble) {
    for (int64_t e = 0; e < E; ++e) {
      const Member m = member(sizes, e, x0_in, u_in, weights, biases);
      y.select(1, e).copy_(rollout_forward_cuda(*m.x0, m.u, m.w, m.b, steps, delay, truncate, activation,
                                                activation_param, lags, feedback, residual));
    }
    return y;
  }
  // Only the rows of x0 that the rollout reads are copied (gemm_path::read_x0), an ensemble's
  // along with their member axis.
  gemm_path::X0Rows rows = gemm_path::read_x0(x0_in, sizes.lags, steps);
  const at::Tensor x0 = rows.rows, u = opt_or_undefined(u_in);
  gemm_path::Network net = make_network(weights, biases, sizes, activation_param, sizes.du.expect_int());
  net.x0_base = rows.base;
  if (!plan.fused) {
    general_forward(x0, u, net, y, delay, truncate);
    return y;
  }
  RolloutParams p{};
  set_rollout_params(p, dims, plan, dtype_of(x0.scalar_type()), static_cast<float>(net.param), x0.data_ptr(),
                     rows.base.data(), data_or_null(u), Shared{sizes.x0_shared, sizes.u_shared},
                     weight_pointers(net).data(), bias_pointers(net).data(), y.data_ptr());
  launch_rollout_forward(p, c10::cuda::getCurrentCUDAStream(x0.get_device()).stream());
  return y;
}

std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>> rollout_backward_cuda(
    const at::Tensor& grad_y_in, const at::Tensor& y_in, const at::Tensor& x0_in, const std::optional<at::Tensor>& u_in,
    at::TensorList weights, const BiasList& biases, int64_t delay, int64_t truncate, c10::string_view activation,
    double activation_param, const c10::List<bool>& output_mask, at::IntArrayRef lags, int64_t feedback,
    bool residual) {
  const RolloutSizes sizes = check_backward_args(kBackwardOp, grad_y_in, y_in, x0_in, u_in, weights, biases, delay,
                                                 truncate, activation, output_mask, {lags, feedback, residual});
  check_dtype(kBackwardOp, x0_in);
  const int64_t steps = y_in.size(0);
  const c10::cuda::CUDAGuard guard(x0_in.device());
  const bool ensemble = sizes.ensemble();
  const int64_t E = ensemble ? sizes.members.expect_int() : 1, B = sizes.batch.expect_int(),
                O = sizes.o.expect_int(), F = sizes.f.expect_int(), du = sizes.du.expect_int();
  const int64_t L = sizes.layers();
  const bool empty_problem = steps == 0 || B == 0 || O == 0 || E == 0;
  Dims dims{};
  const Plan plan =
      empty_problem ? Plan{} : choose_plan(sizes, steps, truncate, true, x0_in.get_device(), kBackwardOp, dims);
  if (ensemble && !plan.fused) {
    // Member by member (see Member); a shared x0's or u's gradient sums the members'.
    const auto opts = x0_in.options();
    auto zeros_if = [&](bool want, at::IntArrayRef shape) {
      return want ? checked_empty(kBackwardOp, "an ensemble's gradient", shape, opts, "split the batch into smaller parts")
                        .zero_()
                  : at::empty({0}, opts);
    };
    at::Tensor gx0 = zeros_if(output_mask[0], x0_in.sizes());
    at::Tensor gu = zeros_if(output_mask[1] && u_in.has_value(), u_in.has_value() ? u_in->sizes() : at::IntArrayRef{0});
    std::vector<at::Tensor> gw, gb;
    for (int64_t l = 0; l < L; ++l) {
      const std::optional<at::Tensor> b = biases.get(l);
      gw.push_back(zeros_if(output_mask[2 + l], weights[l].sizes()));
      gb.push_back(zeros_if(output_mask[2 + L + l] && b.has_value(), b.has_value() ? b->sizes() : at::IntArrayRef{0}));
    }
    for (int64_t e = 0; e < E; ++e) {
      const Member m = member(sizes, e, x0_in, u_in, weights, biases);
      const auto [d_x0, d_u, d_w, d_b] =
          rollout_backward_cuda(grad_y_in.select(1, e), y_in.select(1, e), *m.x0, m.u, m.w, m.b, delay, truncate,
                                activation, activation_param, output_mask, lags, feedback, residual);
      if (output_mask[0]) (sizes.x0_shared ? gx0 : gx0.select(1, e)).add_(d_x0);
      if (output_mask[1] && u_in.has_value()) (sizes.u_shared ? gu : gu.select(1, e)).add_(d_u);
      for (int64_t l = 0; l < L; ++l) {
        if (output_mask[2 + l]) gw[l].select(0, e).copy_(d_w[l]);
        if (d_b[l].numel()) gb[l].select(0, e).copy_(d_b[l]);
      }
    }
    return {gx0, gu, gw, gb};
  }
  // Only the rows of x0 that the rollout reads are copied (gemm_path::read_x0).
  gemm_path::X0Rows rows = gemm_path::read_x0(x0_in, sizes.lags, steps);
  const at::Tensor x0 = rows.rows, u = opt_or_undefined(u_in);
  const at::Tensor y = y_in.contiguous(), grad_y = grad_y_in.contiguous();
  gemm_path::Network net = make_network(weights, biases, sizes, activation_param, du);
  net.x0_base = rows.base;

  // The general path accumulates into zero-filled gradients, and so does the fused kernel into
  // x0's for version 1's feedback (it writes only the rows t < min(delay, steps)); the fused
  // kernel writes the others in full. A shared x0's or u's gradient is each member's own first,
  // (steps, E, B, .), summed over the members after the kernel: no atomics, so the sum is the same
  // on every run.
  const auto opts = x0.options();
  const bool x0_in_full = plan.fused && !dims.plain();
  auto wanted = [&](bool want, const std::string& what, at::IntArrayRef shape, bool written_in_full) {
    if (!want) return at::Tensor();
    at::Tensor t = checked_empty(kBackwardOp, what.c_str(), shape, opts, "split the batch into smaller parts");
    return plan.fused && written_in_full ? t : t.zero_();
  };
  const std::vector<int64_t> x0_members{x0_in.size(0), E, B, F}, u_members{steps, E, B, du};
  gemm_path::Grads g;
  g.x0 = wanted(output_mask[0], "the gradient of x0", sizes.x0_shared ? x0_members : x0_in.sizes().vec(),
                x0_in_full);
  g.u = wanted(output_mask[1] && u.defined(), "the gradient of u",
               !u.defined() ? std::vector<int64_t>{} : sizes.u_shared ? u_members : u.sizes().vec(), true);
  for (int64_t l = 0; l < L; ++l) {
    g.w.push_back(wanted(output_mask[2 + l], "the gradient of " + layer_arg('w', l), net.w[l].sizes(), true));
    g.b.push_back(wanted(output_mask[2 + L + l] && net.b[l].defined(), "the gradient of " + layer_arg('b', l),
                         net.b[l].defined() ? net.b[l].sizes() : at::IntArrayRef(), true));
  }

  if (!empty_problem && !plan.fused) {
    general_backward(grad_y, y, x0, u, net, delay, truncate, output_mask, g);
  } else if (!empty_problem) {
    std::vector<void*> grad_w, grad_b;
    bool any_weight = false;
    for (int64_t l = 0; l < L; ++l) {
      grad_w.push_back(mutable_data_or_null(g.w[l]));
      grad_b.push_back(mutable_data_or_null(g.b[l]));
      any_weight = any_weight || g.w[l].defined() || g.b[l].defined();
    }
    // Several blocks per member, or accumulators too large for shared memory: per-block fp32
    // partials, summed in block order by a second kernel.
    at::Tensor workspace;
    if (uses_workspace(plan) && any_weight)
      workspace = checked_empty(kBackwardOp, "the per-block weight gradients", {E * plan.blocks, grad_elements(dims)},
                                opts.dtype(at::kFloat), "split the batch into smaller parts");
    BackwardParams p{};
    set_backward_params(p, dims, plan, dtype_of(x0.scalar_type()), static_cast<float>(net.param), x0.data_ptr(),
                        rows.base.data(), data_or_null(u), Shared{sizes.x0_shared, sizes.u_shared},
                        weight_pointers(net).data(), bias_pointers(net).data(), y.data_ptr(), grad_y.data_ptr(),
                        mutable_data_or_null(g.x0), mutable_data_or_null(g.u), grad_w.data(), grad_b.data(),
                        workspace.defined() ? workspace.data_ptr<float>() : nullptr);
    launch_rollout_backward(p, c10::cuda::getCurrentCUDAStream(x0.get_device()).stream());
  }
  if (sizes.x0_shared && g.x0.defined()) g.x0 = g.x0.sum(1);
  if (sizes.u_shared && g.u.defined()) g.u = g.u.sum(1);
  auto or_empty = [&](const at::Tensor& t) { return t.defined() ? t : at::empty({0}, opts); };
  std::vector<at::Tensor> grad_w, grad_b;
  for (int64_t l = 0; l < L; ++l) {
    grad_w.push_back(or_empty(g.w[l]));
    grad_b.push_back(or_empty(g.b[l]));
  }
  return {or_empty(g.x0), or_empty(g.u), grad_w, grad_b};
}

}  // namespace

TORCH_LIBRARY_IMPL(fbfast, CUDA, m) {
  m.impl("rollout_forward", &rollout_forward_cuda);
  m.impl("rollout_backward", &rollout_backward_cuda);
}

// A device-less operator: the one way to change the CUDA kernels' process settings while other
// threads may be calling them (fbfast.set_kernel_options in fbfast/options.py).
TORCH_LIBRARY_FRAGMENT(fbfast, m) {
  m.def("cuda_options(str? path=None, str? graphs=None, str? tensor_cores=None) -> str[]", &cuda_options);
  m.def("cuda_graph_stats() -> int[]", &cuda_graph_stats);
}

}  // namespace cuda
}  // namespace fbfast
