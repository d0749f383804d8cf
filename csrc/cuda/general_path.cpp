// The general path (general_path.h): the same recurrence and gradient rules as the fused
// kernels and as the CPU BLAS path (csrc/cpu/rollout_cpu.cpp), as full-batch ATen GEMMs.
//
// The backward recomputes h for a chunk of steps in one GEMM, walks the feedback adjoint step by
// step (the only serial part), and forms the weight gradients and du as a few GEMMs over
// chunk_steps x B rows. In float16/bfloat16 the weight gradients accumulate across chunks in
// fp32 buffers and are cast once at the end.
#include "general_path.h"

#include <ATen/ops/add.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/threshold_backward.h>
#include <ATen/ops/zeros.h>

#include <algorithm>
#include <vector>

namespace fbfast {
namespace cuda {
namespace {

// Chunk buffers of the backward (rows x (2H + O) elements) stay below this size.
constexpr int64_t kChunkBytes = int64_t(256) << 20;

// out = a w_t + bias (bias undefined: none), written in place.
void linear_out(at::Tensor& out, const at::Tensor& a, const at::Tensor& w_t, const at::Tensor& bias) {
  if (bias.defined())
    at::addmm_out(out, bias, a, w_t);
  else
    at::mm_out(out, a, w_t);
}

// acc += a b, where acc may be fp32 while a, b are 16-bit (the GEMM still accumulates
// in fp32 inside; its result is rounded once before the fp32 sum).
void add_product(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) {
  if (acc.scalar_type() == a.scalar_type())
    acc.addmm_(a, b);
  else
    acc.add_(at::mm(a, b));
}

}  // namespace

void forward_general(const at::Tensor& x0, const at::Tensor& u, const at::Tensor& w1,
                     const at::Tensor& b1, const at::Tensor& w2, const at::Tensor& b2,
                     int64_t delay, at::Tensor& y) {
  const int64_t steps = y.size(0), B = x0.size(1), O = x0.size(2), H = w2.size(1);
  const int64_t du = u.defined() ? u.size(2) : 0;
  const at::Tensor w1_t = w1.t(), w2_t = w2.t();
  at::Tensor h = at::empty({B, H}, y.options());
  at::Tensor in = du ? at::empty({B, du + O}, y.options()) : at::Tensor();
  for (int64_t t = 0; t < steps; ++t) {
    const at::Tensor x = t < delay ? x0.select(0, t) : y.select(0, t - delay);
    if (du) at::cat_out(in, {u.select(0, t), x}, 1);
    linear_out(h, du ? in : x, w1_t, b1);
    h.relu_();
    at::Tensor y_t = y.select(0, t);
    linear_out(y_t, h, w2_t, b2);
  }
}

void backward_general(const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& x0,
                      const at::Tensor& u, const at::Tensor& w1, const at::Tensor& b1,
                      const at::Tensor& w2, int64_t delay, int64_t truncate, Gradients& out) {
  const int64_t steps = y.size(0), B = y.size(1), O = y.size(2), H = w2.size(1);
  const int64_t du = u.defined() ? u.size(2) : 0;
  const auto opts = y.options();
  const int64_t step_bytes = B * (2 * H + O) * int64_t(y.element_size());
  const int64_t chunk = std::clamp<int64_t>(kChunkBytes / std::max<int64_t>(step_bytes, 1), 1, steps);
  at::Tensor h_buf = at::empty({chunk, B, H}, opts), dz_buf = at::empty({chunk, B, H}, opts);
  at::Tensor g_buf = at::empty({chunk, B, O}, opts);
  const int64_t slots = std::min(delay, steps);
  at::Tensor ring = at::zeros({slots, B, O}, opts);  // adjoint into y_{t-k}, slot t % k

  // 16-bit gradients accumulate in fp32 buffers; others accumulate in place.
  const at::ScalarType acc_type = c10::isReducedFloatingType(y.scalar_type()) ? at::kFloat : y.scalar_type();
  const bool in_place = acc_type == y.scalar_type();
  auto accumulator = [&](at::Tensor& grad) {
    if (!grad.defined()) return at::Tensor();
    return in_place ? grad.zero_() : at::zeros(grad.sizes(), opts.dtype(acc_type));
  };
  at::Tensor acc_w1 = accumulator(out.w1), acc_b1 = accumulator(out.b1);
  at::Tensor acc_w2 = accumulator(out.w2), acc_b2 = accumulator(out.b2);
  at::Tensor dw1u = acc_w1.defined() ? acc_w1.narrow(1, 0, du) : at::Tensor();
  at::Tensor dw1x = acc_w1.defined() ? acc_w1.narrow(1, du, O) : at::Tensor();
  const at::Tensor w1u = w1.narrow(1, 0, du), w1x = w1.narrow(1, du, O), w1_t = w1.t();

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
    const at::Tensor uc = du ? u.narrow(0, t0, n).reshape({rows, du}) : at::Tensor();
    at::Tensor hc = h_buf.narrow(0, 0, n).view({rows, H});
    at::Tensor dzc = dz_buf.narrow(0, 0, n).view({rows, H});
    const at::Tensor gc = g_buf.narrow(0, 0, n).view({rows, O});
    linear_out(hc, du ? at::cat({uc, xc}, 1) : xc, w1_t, b1);
    hc.relu_();
    for (int64_t t = t1 - 1; t >= t0; --t) {
      const int64_t i = t - t0;
      at::Tensor slot = ring.select(0, t % slots);
      at::Tensor g = g_buf.select(0, i), dz = dz_buf.select(0, i);
      at::add_out(g, grad_y.select(0, t), slot);
      at::mm_out(dz, g, w2);
      at::threshold_backward_out(dz, dz, h_buf.select(0, i), 0);
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
    if (acc_w2.defined()) add_product(acc_w2, gc.t(), hc);
    if (acc_b2.defined()) acc_b2.add_(gc.sum(0, false, acc_type));
    if (acc_w1.defined()) {
      add_product(dw1x, dzc.t(), xc);
      if (du) add_product(dw1u, dzc.t(), uc);
    }
    if (acc_b1.defined()) acc_b1.add_(dzc.sum(0, false, acc_type));
    if (out.u.defined() && du) {
      at::Tensor duc = out.u.narrow(0, t0, n).view({rows, du});
      at::mm_out(duc, dzc, w1u);
    }
  }
  if (!in_place) {
    auto finish = [](at::Tensor& grad, const at::Tensor& acc) {
      if (grad.defined()) grad.copy_(acc);
    };
    finish(out.w1, acc_w1);
    finish(out.b1, acc_b1);
    finish(out.w2, acc_w2);
    finish(out.b2, acc_b2);
  }
}

}  // namespace cuda
}  // namespace fbfast
