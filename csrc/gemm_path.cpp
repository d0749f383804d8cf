// The per-step ATen path (gemm_path.h): one implementation for the CPU and CUDA kernels.
//
// For two layers and ReLU the sequence of ATen calls is the one the CPU BLAS path has always
// made (the first layer as x W_x^T then + u W_u^T, the bias and ReLU in one pass, the last
// layer as one addmm), so version-1 rollouts give the same bits as before.
#include "gemm_path.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/TensorIterator.h>
#include <ATen/ops/add.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/elu.h>
#include <ATen/ops/elu_backward.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/gelu_backward.h>
#include <ATen/ops/leaky_relu.h>
#include <ATen/ops/leaky_relu_backward.h>
#include <ATen/ops/mish.h>
#include <ATen/ops/mish_backward.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/sigmoid.h>
#include <ATen/ops/sigmoid_backward.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/silu_backward.h>
#include <ATen/ops/tanh.h>
#include <ATen/ops/tanh_backward.h>
#include <ATen/ops/threshold_backward.h>
#include <ATen/ops/zeros.h>
#include <c10/util/irange.h>

#include <algorithm>
#include <vector>

#include "rollout_checks.h"

namespace fbfast::gemm_path {
namespace {

// Rows per backward chunk: enough for efficient GEMMs over chunk_steps x B rows.
constexpr int64_t kChunkRows = 4096;
const char* const kRemedy = "split the batch into smaller parts";

// out = relu(out + b) in one pass over the GEMM result (CPU): measured faster than ATen's add
// followed by relu at the small widths this path also serves (benchmarks/crossover.py).
void cpu_bias_relu_(at::Tensor& out, const at::Tensor& b) {
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

// h = act(z), ATen's own kernel for each activation; h may be z itself.
void activation_out(at::Tensor& h, const at::Tensor& z, Act act, double p) {
  switch (act) {
    case Act::kRelu: at::relu_out(h, z); break;
    case Act::kLeakyRelu: at::leaky_relu_out(h, z, p); break;
    case Act::kElu: at::elu_out(h, z, p); break;
    case Act::kTanh: at::tanh_out(h, z); break;
    case Act::kSigmoid: at::sigmoid_out(h, z); break;
    case Act::kSilu: at::silu_out(h, z); break;
    case Act::kGelu: at::gelu_out(h, z, "none"); break;
    case Act::kGeluTanh: at::gelu_out(h, z, "tanh"); break;
    case Act::kMish: at::mish_out(h, z); break;
  }
}

// dz = dh * act'(z) with ATen's backward kernels; dz may be dh itself. z is read only by the
// activations that need it, h only by the others (act_needs_z).
void activation_backward_out(at::Tensor& dz, const at::Tensor& dh, const at::Tensor& z, const at::Tensor& h,
                             Act act, double p) {
  switch (act) {
    case Act::kRelu: at::threshold_backward_out(dz, dh, h, 0); break;
    case Act::kLeakyRelu: at::leaky_relu_backward_out(dz, dh, z, p, false); break;
    case Act::kElu: at::elu_backward_out(dz, dh, p, 1, 1, false, z); break;
    case Act::kTanh: at::tanh_backward_out(dz, dh, h); break;
    case Act::kSigmoid: at::sigmoid_backward_out(dz, dh, h); break;
    case Act::kSilu: at::silu_backward_out(dz, dh, z); break;
    case Act::kGelu: at::gelu_backward_out(dz, dh, z, "none"); break;
    case Act::kGeluTanh: at::gelu_backward_out(dz, dh, z, "tanh"); break;
    case Act::kMish: dz.copy_(at::mish_backward(dh, z)); break;
  }
}

// z (+)= bias, then the activation: in place (h undefined), or into h keeping z.
void bias_activation(at::Tensor& z, const at::Tensor& b, Act act, double p, at::Tensor& h) {
  if (act == Act::kRelu && !h.defined() && z.is_cpu()) return cpu_bias_relu_(z, b);
  if (b.defined()) z.add_(b);
  if (h.defined())
    activation_out(h, z, act, p);
  else
    activation_out(z, z, act, p);
}

// z = [u ; x_1 ; ... ; x_m] W0^T for a block of rows (u undefined when Du == 0), without
// concatenating: x[j] is the value of lag j, w0x[j] the columns of W0 that read it.
void first_layer(at::Tensor& z, const at::Tensor& u, const std::vector<at::Tensor>& x, const at::Tensor& w0u,
                 const std::vector<at::Tensor>& w0x) {
  at::mm_out(z, x[0], w0x[0].t());
  for (size_t j = 1; j < x.size(); ++j) z.addmm_(x[j], w0x[j].t());
  if (u.defined()) z.addmm_(u, w0u.t());
}

// The columns of W0 that read each lag's value.
std::vector<at::Tensor> lag_columns(const at::Tensor& w0, const Network& net) {
  std::vector<at::Tensor> cols;
  for (size_t j = 0; j < net.lags.size(); ++j) cols.push_back(w0.narrow(1, net.du + static_cast<int64_t>(j) * net.f, net.f));
  return cols;
}

// The value of lag j that step t reads: the first f outputs of y_{t - d_j}, or x0's (copied) row
// before step 0 (X0Rows).
at::Tensor past(const at::Tensor& x0, const at::Tensor& y, int64_t t, size_t j, const Network& net) {
  const int64_t s = t - net.lags[j];
  if (s < 0) return x0.select(0, net.x0_base[j] + t);
  const at::Tensor ys = y.select(0, s);
  return net.f == ys.size(1) ? ys : ys.narrow(1, 0, net.f);
}

// The same for steps [t0, t1), as (t1 - t0) B rows.
at::Tensor past_rows(const at::Tensor& x0, const at::Tensor& y, int64_t t0, int64_t t1, size_t j,
                     const Network& net) {
  const int64_t d = net.lags[j], s0 = t0 - d, s1 = t1 - d, B = y.size(1), f = net.f;
  const at::Tensor yf = f == y.size(2) ? y : y.narrow(2, 0, f);
  if (s0 >= 0) return yf.narrow(0, s0, s1 - s0).reshape({(s1 - s0) * B, f});
  std::vector<at::Tensor> parts{x0.narrow(0, net.x0_base[j] + t0, std::min<int64_t>(s1, 0) - s0)};
  if (s1 > 0) parts.push_back(yf.narrow(0, 0, s1));
  return at::cat(parts, 0).reshape({(s1 - s0) * B, f});
}

// acc += a b, where acc may be fp32 while a, b are 16-bit (the GEMM accumulates in fp32 inside;
// its result is rounded once before the fp32 sum).
void add_product(at::Tensor& acc, const at::Tensor& a, const at::Tensor& b) {
  if (acc.scalar_type() == a.scalar_type())
    acc.addmm_(a, b);
  else
    acc.add_(at::mm(a, b));
}

// out = a (+ b) and col_sum += the column sums of out: the output adjoint of one step.
void add_rows(at::Tensor& out, const at::Tensor& a, const at::Tensor& b, at::Tensor& col_sum) {
  if (b.defined())
    at::add_out(out, a, b);
  else if (!out.is_same(a))
    out.copy_(a);
  if (col_sum.defined()) col_sum.add_(out.sum(0));
}

}  // namespace

X0Rows read_x0(const at::Tensor& x0, const std::vector<int64_t>& lags, int64_t steps) {
  const int64_t D = x0.size(0);
  X0Rows r;
  if (lags.size() == 1) {
    // One lag is D: the rows read are x0[0 : min(D, T)], all of x0 when T >= D (no view needed).
    r.rows = (steps >= D ? x0 : x0.narrow(0, D - lags[0], std::min(lags[0], steps))).contiguous();
    r.base = {0};
    return r;
  }
  std::vector<at::Tensor> parts;
  int64_t at = 0;
  for (const int64_t d : lags) {
    const int64_t n = std::min(d, steps);
    parts.push_back(x0.narrow(0, D - d, n));
    r.base.push_back(at);
    at += n;
  }
  r.rows = at::cat(parts, 0);
  return r;
}

void forward(const char* op, const at::Tensor& x0, const at::Tensor& u, const Network& net, at::Tensor& y,
             std::vector<at::Tensor>* kept) {
  const int64_t steps = y.size(0), B = y.size(1), L = net.layers(), du = net.du;
  const at::Tensor w0u = net.w[0].narrow(1, 0, du);
  const std::vector<at::Tensor> w0x = lag_columns(net.w[0], net);
  const bool needs_z = act_needs_z(net.act);
  // Per hidden layer: the buffer the GEMM writes (z, or h activated in place) and, for the
  // activations that need z, the activation h; a kept layer writes z or h into `kept`, a layer
  // the backward recomputes (keeps_layer) gets an empty (0,) entry there.
  std::vector<at::Tensor> zbuf(L), hbuf(L);
  std::vector<bool> keep(L, false);
  const char* remedy = "use fewer steps or a smaller batch, or run the rollout in chunks";
  for (int64_t l = 0; l + 1 < L; ++l) {
    const int64_t H = net.w[l].size(0);
    keep[l] = kept && keeps_layer(l, L, net.w[0].size(1));
    if (kept)
      kept->push_back(keep[l] ? checked_empty(op, "the hidden activations kept for the backward", {steps, B, H},
                                              y.options(), remedy)
                              : at::empty({0}, y.options()));
    if (!keep[l] || needs_z) hbuf[l] = checked_empty(op, "the hidden activations", {B, H}, y.options(), remedy);
  }
  std::vector<at::Tensor> x(net.lags.size());
  for (const auto t : c10::irange(steps)) {
    for (size_t j = 0; j < x.size(); ++j) x[j] = past(x0, y, t, j, net);
    at::Tensor in;  // the activation entering layer l
    for (int64_t l = 0; l < L; ++l) {
      const at::Tensor& b = net.b[l];
      if (l + 1 == L) {
        at::Tensor yt = y.select(0, t);
        if (l == 0) {
          first_layer(yt, du ? u.select(0, t) : at::Tensor(), x, w0u, w0x);
          if (b.defined()) yt.add_(b);
        } else if (b.defined()) {
          at::addmm_out(yt, b, in, net.w[l].t());
        } else {
          at::mm_out(yt, in, net.w[l].t());
        }
        if (net.residual) yt.narrow(1, 0, net.f).add_(x[0]);
        break;
      }
      // z goes to kept[l][t] when the backward reads z, else h is activated in place there.
      at::Tensor z = keep[l] ? (*kept)[l].select(0, t) : hbuf[l];
      at::Tensor h = keep[l] && needs_z ? hbuf[l] : at::Tensor();
      if (l == 0)
        first_layer(z, du ? u.select(0, t) : at::Tensor(), x, w0u, w0x);
      else
        at::mm_out(z, in, net.w[l].t());
      bias_activation(z, b, net.act, net.param, h);
      in = h.defined() ? h : z;
    }
  }
}

void backward(const char* op, const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& x0,
              const at::Tensor& u, const Network& net, int64_t delay, int64_t truncate, Grads& out,
              at::TensorList kept, int64_t chunk_bytes) {
  const int64_t steps = y.size(0), B = y.size(1), O = y.size(2), L = net.layers(), du = net.du, f = net.f;
  const bool needs_z = act_needs_z(net.act);
  // Per hidden layer: recomputed, or read from what the forward kept (a (0,) entry: recomputed).
  std::vector<bool> recompute(L, true);
  for (int64_t l = 0; l + 1 < L && !kept.empty(); ++l) recompute[l] = kept[l].dim() == 1;
  const bool any_recompute = std::find(recompute.begin(), recompute.end() - 1, true) != recompute.end() - 1;
  const at::Tensor w0u = net.w[0].narrow(1, 0, du);
  const std::vector<at::Tensor> w0x = lag_columns(net.w[0], net);
  const size_t m = net.lags.size();
  // Version 1's feedback keeps its sequence of calls: the adjoint of y_{t-k} is written (not
  // accumulated) into the slot step t has just read.
  const bool plain = net.plain_feedback();
  int64_t hidden = 0;  // sum of the hidden widths
  for (int64_t l = 0; l + 1 < L; ++l) hidden += net.w[l].size(0);

  // Chunk buffers of at most chunk_bytes, and at most half of what a per-step loop keeps for its
  // backward (the activations and outputs of every step), so that short rollouts of wide layers
  // stay within the loop's memory (benchmarks/wide.py). Per step: the adjoints of every hidden
  // layer and of y, and the recomputed activations (and pre-activations where act'(z) needs z).
  const int64_t itemsize = static_cast<int64_t>(y.element_size());
  const int64_t recomputed = any_recompute ? (needs_z ? 2 : 1) : (needs_z ? 1 : 0);
  const int64_t step_bytes = B * ((1 + recomputed) * hidden + O) * itemsize;
  const int64_t budget = std::min(chunk_bytes, steps * B * (hidden + O) * itemsize / 2);
  const int64_t chunk = std::min({steps, std::max<int64_t>(1, kChunkRows / std::max<int64_t>(B, 1)),
                                  std::max<int64_t>(1, budget / std::max<int64_t>(step_bytes, 1))});
  const auto opts = y.options();
  std::vector<at::Tensor> zbuf(L), hbuf(L), dzbuf(L);
  for (int64_t l = 0; l + 1 < L; ++l) {
    const int64_t H = net.w[l].size(0);
    if (recompute[l] && needs_z)
      zbuf[l] = checked_empty(op, "the recomputed pre-activations", {chunk, B, H}, opts, kRemedy);
    if (recompute[l] || needs_z)
      hbuf[l] = checked_empty(op, "the recomputed activations", {chunk, B, H}, opts, kRemedy);
    dzbuf[l] = checked_empty(op, "the activation adjoints", {chunk, B, H}, opts, kRemedy);
  }
  at::Tensor g_buf = checked_empty(op, "the output adjoints", {chunk, B, O}, opts, kRemedy);
  // The adjoint of the fed-back value of step s, slot s % slots, filled by the steps that read
  // it (s + d_j, all later) and read at step s; slots = min(D, steps) keep every live one apart.
  const int64_t slots = std::min(delay, steps);
  at::Tensor ring = checked_empty(op, "the feedback adjoints", {slots, B, f}, opts,
                                  "use a shorter delay or split the batch")
                        .zero_();
  // Weight and bias gradients accumulate in fp32 for 16-bit inputs and are rounded once at the end.
  const bool widen = y.scalar_type() == at::kHalf || y.scalar_type() == at::kBFloat16;
  auto accumulator = [&](const at::Tensor& grad) {
    return grad.defined() && widen ? at::zeros(grad.sizes(), grad.options().dtype(at::kFloat)) : grad;
  };
  std::vector<at::Tensor> dw(L), db(L);
  for (int64_t l = 0; l < L; ++l) {
    dw[l] = accumulator(out.w[l]);
    db[l] = accumulator(out.b[l]);
  }
  at::Tensor dw0u = dw[0].defined() ? dw[0].narrow(1, 0, du) : at::Tensor();
  const std::vector<at::Tensor> dw0x = dw[0].defined() ? lag_columns(dw[0], net) : std::vector<at::Tensor>();

  for (int64_t t1 = steps; t1 > 0; t1 -= chunk) {
    const int64_t t0 = std::max<int64_t>(0, t1 - chunk), n = t1 - t0, rows = n * B;
    // Each lag's value for t in [t0, t1).
    std::vector<at::Tensor> xc(m);
    for (size_t j = 0; j < m; ++j) xc[j] = past_rows(x0, y, t0, t1, j, net);
    const at::Tensor uc = du ? u.narrow(0, t0, n).reshape({rows, du}) : at::Tensor();
    // The chunk's pre-activations z (where read) and activations h of every hidden layer,
    // (n, B, H_l) each: recomputed layer by layer, or read from what the forward kept.
    std::vector<at::Tensor> zc(L), hc(L);
    for (int64_t l = 0; l + 1 < L; ++l) {
      const int64_t H = net.w[l].size(0);
      if (!recompute[l]) {
        const at::Tensor k = kept[l].narrow(0, t0, n);
        if (needs_z) {
          zc[l] = k;
          hc[l] = hbuf[l].narrow(0, 0, n);
          activation_out(hc[l], zc[l], net.act, net.param);
        } else {
          hc[l] = k;
        }
        continue;
      }
      hc[l] = hbuf[l].narrow(0, 0, n);
      at::Tensor z = needs_z ? zbuf[l].narrow(0, 0, n) : hc[l];
      at::Tensor z2 = z.view({rows, H});
      if (l == 0)
        first_layer(z2, uc, xc, w0u, w0x);
      else
        at::mm_out(z2, hc[l - 1].view({rows, net.w[l - 1].size(0)}), net.w[l].t());
      at::Tensor h2 = needs_z ? hc[l].view({rows, H}) : at::Tensor();
      bias_activation(z2, net.b[l], net.act, net.param, h2);
      if (needs_z) zc[l] = z;
    }

    for (int64_t t = t1 - 1; t >= t0; --t) {
      const int64_t i = t - t0;
      at::Tensor slot = ring.select(0, t % slots);
      at::Tensor g = g_buf.select(0, i);
      if (plain) {
        add_rows(g, grad_y.select(0, t), slot, db[L - 1]);
      } else {
        g.copy_(grad_y.select(0, t));
        g.narrow(1, 0, f).add_(slot);
        if (db[L - 1].defined()) db[L - 1].add_(g.sum(0));
        slot.zero_();  // read: from now on it collects the adjoint of step t - slots
      }
      // Down the layers: the adjoint of layer l's output becomes that of layer l - 1's z.
      at::Tensor adj = g;
      for (int64_t l = L - 1; l >= 1; --l) {
        at::Tensor dz = dzbuf[l - 1].select(0, i);
        at::mm_out(dz, adj, net.w[l]);
        activation_backward_out(dz, dz, needs_z ? zc[l - 1].select(0, i) : at::Tensor(), hc[l - 1].select(0, i),
                                net.act, net.param);
        if (db[l - 1].defined()) db[l - 1].add_(dz.sum(0));
        adj = dz;
      }
      const bool cut = truncate && t % truncate == 0;
      if (plain) {
        if (t >= delay) {
          if (cut)
            slot.zero_();
          else
            at::mm_out(slot, adj, w0x[0]);
        } else if (out.x0.defined()) {
          at::Tensor dx0 = out.x0.select(0, t);
          at::mm_out(dx0, adj, w0x[0]);
        }
        continue;
      }
      // The adjoint of each value step t read (and, residual, of the one it added to y_t) goes to
      // the step that produced it, unless truncate cuts the edges into step t, or to x0.
      auto target = [&](int64_t s) {
        return s >= 0 ? (cut ? at::Tensor() : ring.select(0, s % slots))
                      : (out.x0.defined() ? out.x0.select(0, s + delay) : at::Tensor());
      };
      for (size_t j = 0; j < m; ++j) {
        at::Tensor dst = target(t - net.lags[j]);
        if (dst.defined()) dst.addmm_(adj, w0x[j]);
      }
      if (net.residual) {
        at::Tensor dst = target(t - net.lags[0]);
        if (dst.defined()) dst.add_(g.narrow(1, 0, f));
      }
    }
    // Weight gradients and du over the chunk's rows: GEMMs of (n B) rows.
    auto adjoint = [&](int64_t l) {
      return l + 1 == L ? g_buf.narrow(0, 0, n).view({rows, O})
                        : dzbuf[l].narrow(0, 0, n).view({rows, net.w[l].size(0)});
    };
    for (int64_t l = L - 1; l >= 1; --l)
      if (dw[l].defined()) add_product(dw[l], adjoint(l).t(), hc[l - 1].view({rows, net.w[l - 1].size(0)}));
    const at::Tensor adj0 = adjoint(0);
    if (dw[0].defined()) {
      for (size_t j = 0; j < m; ++j) {
        at::Tensor dst = dw0x[j];
        add_product(dst, adj0.t(), xc[j]);
      }
      if (du) add_product(dw0u, adj0.t(), uc);
    }
    if (out.u.defined() && du) {
      at::Tensor duc = out.u.narrow(0, t0, n).view({rows, du});
      at::mm_out(duc, adj0, w0u);
    }
  }
  for (int64_t l = 0; l < L; ++l) {
    if (widen && out.w[l].defined()) out.w[l].copy_(dw[l]);
    if (widen && out.b[l].defined()) out.b[l].copy_(db[l]);
  }
}

}  // namespace fbfast::gemm_path
