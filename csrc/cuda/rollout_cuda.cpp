// CUDA host code of the fused rollout: argument checks, layout, the choice between the fused
// kernels and the general path, dtype dispatch, and the registration of both operators for the
// CUDA dispatch key.
//
//  * fused path (forward_kernel.cuh, backward_kernel.cuh): one persistent launch runs all T
//    steps; a block owns a tile of batch rows, with the weights and the tile's state in shared
//    memory. Taken whenever the plan fits the device's opt-in shared memory (plan_rollout).
//  * general path (general_path.cpp): per-step cuBLAS GEMMs through ATen, for any size.
// cuda_path='fused'|'general' (fbfast.set_kernel_options, or FBFAST_CUDA_PATH read at load)
// overrides the rule (the tests run both paths).
// Everything runs on the current stream of the tensors' device, under a device guard.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <string>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

#include "../rollout_checks.h"
#include "general_path.h"
#include "rollout_launch.h"
#include "rollout_params.h"

namespace fbfast {
namespace cuda {
namespace {

constexpr const char* kForwardOp = "fbfast::rollout_forward (CUDA)";
constexpr const char* kBackwardOp = "fbfast::rollout_backward (CUDA)";

void check_dtype(const char* op, const at::Tensor& x0) {
  const auto dtype = x0.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16, op,
              ": dtype must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(x0.device().is_cuda(), op, ": x0 must be a CUDA tensor, got ", x0.device());
}

// Only x0[:min(delay, steps)] is ever read: copying all of it (an expanded x0 with a huge delay)
// would allocate for nothing.
at::Tensor read_x0(const at::Tensor& x0, int64_t steps) {
  return x0.narrow(0, 0, std::min(x0.size(0), steps)).contiguous();
}

at::Tensor opt_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

const void* data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }
void* mutable_data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

struct DeviceLimits {
  int sms = 0;
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
    int sms = 0, smem = 0;
    size_t free_bytes = 0, total_bytes = 0;
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    {
      const c10::cuda::CUDAGuard guard(device);
      C10_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
    }
    limits = DeviceLimits{sms, smem, static_cast<int64_t>(total_bytes)};
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

std::vector<std::string> cuda_options(const std::optional<std::string>& path) {
  std::vector<std::string> previous{path_name(path_override())};
  if (path.has_value()) {
    const auto choice = parse_path(*path);
    TORCH_CHECK(choice.has_value(), "fbfast.set_kernel_options: cuda_path must be 'auto', 'fused' or 'general', got '",
                *path, "'");
    g_path.store(static_cast<int>(*choice));
  }
  return previous;
}

// Widths beyond this never fit in shared memory; checking first keeps them out of Dims' ints.
constexpr int64_t kMaxFusedWidth = int64_t(1) << 20;

Plan choose_plan(const Dims& d, bool backward, c10::DeviceIndex device, const char* op) {
  const PathChoice choice = path_override();
  if (choice == PathChoice::kGeneral) return Plan{};
  const DeviceLimits limits = device_limits(device);
  Plan plan = plan_rollout(d, backward, limits.sms, limits.smem_optin);
  TORCH_CHECK(plan.fused || choice != PathChoice::kFused, op,
              ": the fused path is pinned (cuda_path='fused'), but the weights (H=", d.h, ", Du=", d.du, ", O=", d.o,
              ", delay=", d.delay, ") do not fit in the ", limits.smem_optin,
              " bytes of shared memory per block of this GPU; set cuda_path='auto' to take the "
              "general path, or reduce the widths");
  return plan;
}

bool widths_fit(int64_t du, int64_t o, int64_t h) {
  return du < kMaxFusedWidth && o < kMaxFusedWidth && h < kMaxFusedWidth;
}

template <typename Fn>
void dispatch_dtype(at::ScalarType dtype, Fn&& fn) {
  switch (dtype) {
    case at::kFloat: return fn(float{});
    case at::kHalf: return fn(c10::Half{});
    case at::kBFloat16: return fn(c10::BFloat16{});
    default: TORCH_CHECK(false, "fbfast::rollout (CUDA kernel): unsupported dtype ", dtype);
  }
}

at::Tensor rollout_forward_cuda(const at::Tensor& x0_in, const std::optional<at::Tensor>& u_in,
                                const at::Tensor& w1_in, const std::optional<at::Tensor>& b1_in,
                                const at::Tensor& w2_in, const std::optional<at::Tensor>& b2_in,
                                int64_t steps, int64_t delay, int64_t truncate) {
  const RolloutSizes sizes = check_rollout_args(kForwardOp, x0_in, u_in, w1_in, b1_in, w2_in, b2_in, steps, delay, truncate);
  check_dtype(kForwardOp, x0_in);
  const c10::cuda::CUDAGuard guard(x0_in.device());
  check_result_fits(kForwardOp, sizes, x0_in.element_size(), device_memory(x0_in.get_device()));
  const at::Tensor x0 = read_x0(x0_in, steps), w1 = w1_in.contiguous(), w2 = w2_in.contiguous();
  const at::Tensor u = opt_or_undefined(u_in), b1 = opt_or_undefined(b1_in), b2 = opt_or_undefined(b2_in);
  const int64_t B = x0.size(1), O = x0.size(2), H = w2.size(1);
  const int64_t du = u.defined() ? u.size(2) : 0;
  at::Tensor y = checked_empty(kForwardOp, "the result Y", {steps, B, O}, x0.options(),
                               "use fewer steps or a smaller batch, or run the rollout in chunks");
  if (steps == 0 || B == 0 || O == 0) return y;

  Plan plan;
  Dims d{steps, B, static_cast<int>(du), static_cast<int>(O), static_cast<int>(H), delay, truncate};
  if (widths_fit(du, O, H)) plan = choose_plan(d, false, x0.get_device(), "fbfast::rollout_forward");
  if (!plan.fused) {
    forward_general(x0, u, w1, b1, w2, b2, delay, y);
    return y;
  }
  ForwardParams p{};
  p.dims = d;
  p.lay = plan.lay;
  p.rows_per_item = plan.rows_per_item;
  p.threads = plan.threads;
  p.tiles = plan.tiles;
  p.blocks = plan.blocks;
  p.x0 = x0.data_ptr();
  p.u = data_or_null(u);
  p.w1 = w1.data_ptr();
  p.b1 = data_or_null(b1);
  p.w2 = w2.data_ptr();
  p.b2 = data_or_null(b2);
  p.y = y.data_ptr();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x0.get_device()).stream();
  dispatch_dtype(x0.scalar_type(), [&](auto tag) { launch_rollout_forward<decltype(tag)>(p, stream); });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
rollout_backward_cuda(const at::Tensor& grad_y_in, const at::Tensor& y_in, const at::Tensor& x0_in,
                      const std::optional<at::Tensor>& u_in, const at::Tensor& w1_in,
                      const std::optional<at::Tensor>& b1_in, const at::Tensor& w2_in,
                      int64_t delay, int64_t truncate, std::array<bool, 6> output_mask) {
  check_backward_args(kBackwardOp, grad_y_in, y_in, x0_in, u_in, w1_in, b1_in, w2_in, delay, truncate);
  check_dtype(kBackwardOp, x0_in);
  const int64_t steps = y_in.size(0);
  const c10::cuda::CUDAGuard guard(x0_in.device());
  const at::Tensor x0 = read_x0(x0_in, steps), w1 = w1_in.contiguous(), w2 = w2_in.contiguous();
  const at::Tensor y = y_in.contiguous(), grad_y = grad_y_in.contiguous();
  const at::Tensor u = opt_or_undefined(u_in), b1 = opt_or_undefined(b1_in);
  const int64_t B = x0.size(1), O = x0.size(2), H = w2.size(1);
  const int64_t du = u.defined() ? u.size(2) : 0;
  const bool empty_problem = steps == 0 || B == 0 || O == 0;

  // x0's gradient starts at zero (slots t >= steps get none); the others are written in full,
  // unless nothing runs, when every gradient is zero.
  const auto opts = x0.options();
  auto wanted = [&](bool want, at::IntArrayRef shape, bool zero) {
    if (!want) return at::Tensor();
    return zero || empty_problem ? at::zeros(shape, opts) : at::empty(shape, opts);
  };
  Gradients g{wanted(output_mask[0], x0_in.sizes(), true),
              wanted(output_mask[1] && u.defined(), u.defined() ? u.sizes() : at::IntArrayRef(), false),
              wanted(output_mask[2], w1.sizes(), false),
              wanted(output_mask[3] && b1.defined(), {H}, false),
              wanted(output_mask[4], w2.sizes(), false),
              wanted(output_mask[5], {O}, false)};

  if (!empty_problem) {
    Plan plan;
    Dims d{steps, B, static_cast<int>(du), static_cast<int>(O), static_cast<int>(H), delay, truncate};
    if (widths_fit(du, O, H)) plan = choose_plan(d, true, x0.get_device(), "fbfast::rollout_backward");
    if (!plan.fused) {
      backward_general(grad_y, y, x0, u, w1, b1, w2, delay, truncate, g);
    } else {
      BackwardParams p{};
      p.dims = d;
      p.lay = plan.lay;
      p.rows_per_item = plan.rows_per_item;
      p.threads = plan.threads;
      p.tiles = plan.tiles;
      p.blocks = plan.blocks;
      p.grad_y = grad_y.data_ptr();
      p.y = y.data_ptr();
      p.x0 = x0.data_ptr();
      p.u = data_or_null(u);
      p.w1 = w1.data_ptr();
      p.b1 = data_or_null(b1);
      p.w2 = w2.data_ptr();
      p.grad_x0 = mutable_data_or_null(g.x0);
      p.grad_u = mutable_data_or_null(g.u);
      p.grad_w1 = mutable_data_or_null(g.w1);
      p.grad_b1 = mutable_data_or_null(g.b1);
      p.grad_w2 = mutable_data_or_null(g.w2);
      p.grad_b2 = mutable_data_or_null(g.b2);
      // Several blocks: per-block fp32 partials, summed in block order by a second kernel.
      at::Tensor workspace;
      const bool any_weight = g.w1.defined() || g.b1.defined() || g.w2.defined() || g.b2.defined();
      if (plan.blocks > 1 && any_weight) {
        workspace = at::empty({plan.blocks, grad_offsets(d).total}, opts.dtype(at::kFloat));
        p.workspace = workspace.data_ptr<float>();
      }
      const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x0.get_device()).stream();
      dispatch_dtype(x0.scalar_type(), [&](auto tag) { launch_rollout_backward<decltype(tag)>(p, stream); });
    }
  }
  auto or_empty = [&](const at::Tensor& t) { return t.defined() ? t : at::empty({0}, opts); };
  return {or_empty(g.x0), or_empty(g.u), or_empty(g.w1), or_empty(g.b1), or_empty(g.w2), or_empty(g.b2)};
}

}  // namespace

TORCH_LIBRARY_IMPL(fbfast, CUDA, m) {
  m.impl("rollout_forward", &rollout_forward_cuda);
  m.impl("rollout_backward", &rollout_backward_cuda);
}

// A device-less operator: the one way to change the CUDA kernels' process settings while other
// threads may be calling them (fbfast.set_kernel_options in fbfast/options.py).
TORCH_LIBRARY_FRAGMENT(fbfast, m) {
  m.def("cuda_options(str? path=None) -> str[]", &cuda_options);
}

}  // namespace cuda
}  // namespace fbfast
