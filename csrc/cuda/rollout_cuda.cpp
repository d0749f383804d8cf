// CUDA host code of the fused rollout: argument checks, layout, the choice between the fused
// kernels and the general path, dtype dispatch, and the registration of both operators for the
// CUDA dispatch key.
//
//  * fused path (forward_kernel.cuh, backward_kernel.cuh): one persistent launch runs all T
//    steps; a block owns a tile of batch rows, with the weights and the tile's state in shared
//    memory. Taken whenever the plan fits the device's opt-in shared memory (plan_rollout).
//  * general path (general_path.cpp): per-step cuBLAS GEMMs through ATen, for any size.
// FBFAST_CUDA_PATH=fused|general overrides the rule (the tests run both paths).
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

#include <array>
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

void check_inputs(const at::Tensor& x0, const std::optional<at::Tensor>& u, const at::Tensor& w1,
                  const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                  const std::optional<at::Tensor>& b2, int64_t steps, int64_t delay,
                  int64_t truncate) {
  check_rollout_args(x0, u, w1, b1, w2, b2, steps, delay, truncate);
  const auto dtype = x0.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
              "fbfast::rollout (CUDA kernel): dtype must be float32, float16 or bfloat16, got ", dtype);
  TORCH_CHECK(x0.device().is_cuda(), "fbfast::rollout (CUDA kernel): x0 must be a CUDA tensor, got ", x0.device());
}

at::Tensor opt_or_undefined(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->contiguous() : at::Tensor();
}

const void* data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }
void* mutable_data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

struct DeviceLimits {
  int sms = 0;
  int64_t smem_optin = 0;  // bytes of shared memory one block may opt in to
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
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
    limits = DeviceLimits{sms, smem};
  }
  return limits;
}

enum class PathChoice { kAuto, kFused, kGeneral };

PathChoice path_override() {
  const char* env = std::getenv("FBFAST_CUDA_PATH");
  if (env && std::strcmp(env, "fused") == 0) return PathChoice::kFused;
  if (env && std::strcmp(env, "general") == 0) return PathChoice::kGeneral;
  return PathChoice::kAuto;
}

// Widths beyond this never fit in shared memory; checking first keeps them out of Dims' ints.
constexpr int64_t kMaxFusedWidth = int64_t(1) << 20;

Plan choose_plan(const Dims& d, bool backward, c10::DeviceIndex device, const char* op) {
  const PathChoice choice = path_override();
  if (choice == PathChoice::kGeneral) return Plan{};
  const DeviceLimits limits = device_limits(device);
  Plan plan = plan_rollout(d, backward, limits.sms, limits.smem_optin);
  TORCH_CHECK(plan.fused || choice != PathChoice::kFused, op,
              ": FBFAST_CUDA_PATH=fused, but the weights (H=", d.h, ", Du=", d.du, ", O=", d.o,
              ", delay=", d.delay, ") do not fit in the ", limits.smem_optin,
              " bytes of shared memory per block of this GPU; unset FBFAST_CUDA_PATH to take the "
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
  check_inputs(x0_in, u_in, w1_in, b1_in, w2_in, b2_in, steps, delay, truncate);
  const c10::cuda::CUDAGuard guard(x0_in.device());
  const at::Tensor x0 = x0_in.contiguous(), w1 = w1_in.contiguous(), w2 = w2_in.contiguous();
  const at::Tensor u = opt_or_undefined(u_in), b1 = opt_or_undefined(b1_in), b2 = opt_or_undefined(b2_in);
  const int64_t B = x0.size(1), O = x0.size(2), H = w2.size(1);
  const int64_t du = u.defined() ? u.size(2) : 0;
  at::Tensor y = at::empty({steps, B, O}, x0.options());
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
  TORCH_CHECK(y_in.dim() == 3, "fbfast::rollout_backward: y must be (T, B, O), got ", y_in.sizes());
  const int64_t steps = y_in.size(0);
  check_inputs(x0_in, u_in, w1_in, b1_in, w2_in, std::nullopt, steps, delay, truncate);
  TORCH_CHECK(grad_y_in.sizes() == y_in.sizes() && y_in.size(1) == x0_in.size(1) &&
                  y_in.size(2) == x0_in.size(2),
              "fbfast::rollout_backward: grad_y ", grad_y_in.sizes(), " and y ", y_in.sizes(),
              " must both be (T, B, O)");
  TORCH_CHECK(grad_y_in.scalar_type() == x0_in.scalar_type() && y_in.scalar_type() == x0_in.scalar_type(),
              "fbfast::rollout_backward: mixed dtypes");
  TORCH_CHECK(grad_y_in.device() == x0_in.device() && y_in.device() == x0_in.device(),
              "fbfast::rollout_backward: grad_y and y must be on ", x0_in.device());
  const c10::cuda::CUDAGuard guard(x0_in.device());
  const at::Tensor x0 = x0_in.contiguous(), w1 = w1_in.contiguous(), w2 = w2_in.contiguous();
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
  Gradients g{wanted(output_mask[0], x0.sizes(), true),
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

}  // namespace cuda
}  // namespace fbfast
