// Autograd of fbfast::rollout_forward, for every device: the backward is one call of
// fbfast::rollout_backward (the fused reverse-time sweep of the device's kernel), which
// recomputes the hidden activations from Y and the inputs. On the CPU, for wide layers, the
// forward instead keeps them (fbfast::rollout_forward_hidden, as much memory as a per-step loop
// keeps) and the backward reads them (rollout_backward_hidden): there recomputing costs a GEMM
// per step.
//
// It lives in C++ rather than in torch.library.register_autograd because at small shapes the
// Python autograd.Function costs several times the rollout itself (measured: ~35 us per
// forward; benchmarks/README.md). Double backward (create_graph=True) takes an
// exact, slower path: autograd of an ATen transcription of the reference, so a second
// derivative is never a silent zero.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "cpu/path_rule.h"
#include "rollout_checks.h"

namespace fbfast {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// The recurrence of docs/spec.md with ATen ops, differentiable; the same steps as
// fbfast/reference.py.
at::Tensor reference_rollout(const at::Tensor& x0, const std::optional<at::Tensor>& u,
                             const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                             const at::Tensor& w2, const std::optional<at::Tensor>& b2,
                             int64_t steps, int64_t delay, int64_t truncate) {
  if (steps == 0 || x0.size(1) == 0 || x0.size(2) == 0) {
    // Nothing to feed back: one step over an expanded input gives the (steps, B, O) result,
    // attached to every input, without looping `steps` times over empty tensors.
    const at::Tensor x = x0.narrow(0, 0, std::min<int64_t>(1, x0.size(0))).expand({steps, x0.size(1), x0.size(2)});
    const at::Tensor xin = u.has_value() ? at::cat({*u, x}, -1) : x;
    return at::linear(at::relu(at::linear(xin, w1, b1)), w2, b2);
  }
  std::vector<at::Tensor> ys;
  ys.reserve(steps);
  for (int64_t t = 0; t < steps; ++t) {
    at::Tensor x = t < delay ? x0.select(0, t) : ys[t - delay];
    if (t >= delay && truncate && t % truncate == 0) x = x.detach();
    const at::Tensor xin = u.has_value() ? at::cat({u->select(0, t), x}, -1) : x;
    ys.push_back(at::linear(at::relu(at::linear(xin, w1, b1)), w2, b2));
  }
  return at::stack(ys);
}

at::Tensor call_forward(const at::Tensor& x0, const std::optional<at::Tensor>& u, const at::Tensor& w1,
                        const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                        const std::optional<at::Tensor>& b2, const c10::SymInt& steps, int64_t delay,
                        int64_t truncate) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fbfast::rollout_forward", "")
                       .typed<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, c10::SymInt, int64_t, int64_t)>();
  return op.call(x0, u, w1, b1, w2, b2, steps, delay, truncate);
}

using Grads6 = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Grads6 call_backward(const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& x0,
                     const std::optional<at::Tensor>& u, const at::Tensor& w1,
                     const std::optional<at::Tensor>& b1, const at::Tensor& w2, int64_t delay,
                     int64_t truncate, std::array<bool, 6> mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fbfast::rollout_backward", "")
                       .typed<Grads6(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const std::optional<at::Tensor>&, const at::Tensor&,
                                     const std::optional<at::Tensor>&, const at::Tensor&, int64_t,
                                     int64_t, std::array<bool, 6>)>();
  return op.call(grad_y, y, x0, u, w1, b1, w2, delay, truncate, mask);
}

std::tuple<at::Tensor, at::Tensor> call_forward_hidden(const at::Tensor& x0, const std::optional<at::Tensor>& u,
                                                       const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                                                       const at::Tensor& w2, const std::optional<at::Tensor>& b2,
                                                       const c10::SymInt& steps, int64_t delay) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fbfast::rollout_forward_hidden", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const std::optional<at::Tensor>&, const at::Tensor&,
                           const std::optional<at::Tensor>&, const at::Tensor&, const std::optional<at::Tensor>&,
                           c10::SymInt, int64_t)>();
  return op.call(x0, u, w1, b1, w2, b2, steps, delay);
}

Grads6 call_backward_hidden(const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& hidden,
                            const at::Tensor& x0, const std::optional<at::Tensor>& u, const at::Tensor& w1,
                            const std::optional<at::Tensor>& b1, const at::Tensor& w2, int64_t delay,
                            int64_t truncate, std::array<bool, 6> mask) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fbfast::rollout_backward_hidden", "")
                       .typed<Grads6(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                     const std::optional<at::Tensor>&, const at::Tensor&,
                                     const std::optional<at::Tensor>&, const at::Tensor&, int64_t, int64_t,
                                     std::array<bool, 6>)>();
  return op.call(grad_y, y, hidden, x0, u, w1, b1, w2, delay, truncate, mask);
}

// Whether the forward should keep the hidden activations for the backward: on the CPU, for the
// widths where the kernel takes its BLAS path (csrc/cpu/path_rule.h). Symbolic widths (a
// dynamic-shape trace) keep the default, recomputing backward.
bool keep_hidden(const at::Tensor& x0, const std::optional<at::Tensor>& u, const at::Tensor& w2,
                 const c10::SymInt& steps) {
  // Runs before the operator's argument checks: a shape it cannot read is left to them.
  if (!x0.device().is_cpu() || x0.dim() != 3 || w2.dim() != 2 || (u && u->dim() != 3)) return false;
  const auto du = u ? u->sym_size(2).maybe_as_int() : std::optional<int64_t>(0);
  const auto o = w2.sym_size(0).maybe_as_int(), h = w2.sym_size(1).maybe_as_int();
  const auto batch = x0.sym_size(1).maybe_as_int(), t = steps.maybe_as_int();
  return du && o && h && batch && t && cpu::saves_hidden(*du, *o, *h, *batch, *t);
}

std::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

class RolloutFunction : public torch::autograd::Function<RolloutFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x0,
                            const std::optional<at::Tensor>& u, const at::Tensor& w1,
                            const std::optional<at::Tensor>& b1, const at::Tensor& w2,
                            const std::optional<at::Tensor>& b2, const c10::SymInt& steps, int64_t delay,
                            int64_t truncate, bool backward_follows) {
    at::Tensor y, hidden;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      if (backward_follows && keep_hidden(x0, u, w2, steps))
        std::tie(y, hidden) = call_forward_hidden(x0, u, w1, b1, w2, b2, steps, delay);
      else
        y = call_forward(x0, u, w1, b1, w2, b2, steps, delay, truncate);
    }
    const at::Tensor none;
    ctx->save_for_backward({x0, u.value_or(none), w1, b1.value_or(none), w2, b2.value_or(none), y, hidden});
    ctx->saved_data["steps"] = steps;
    ctx->saved_data["delay"] = delay;
    ctx->saved_data["truncate"] = truncate;
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const at::Tensor &x0 = saved[0], &u = saved[1], &w1 = saved[2], &b1 = saved[3], &w2 = saved[4],
                     &b2 = saved[5], &y = saved[6], &hidden = saved[7];
    const c10::SymInt steps = ctx->saved_data["steps"].toSymInt();
    const int64_t delay = ctx->saved_data["delay"].toInt();
    const int64_t truncate = ctx->saved_data["truncate"].toInt();
    at::Tensor grad_y = grad_outputs[0];
    if (!grad_y.defined()) grad_y = at::zeros_like(y);

    // needs_input_grad counts only the tensor inputs that were given (a None has no edge).
    const at::Tensor* inputs[6] = {&x0, &u, &w1, &b1, &w2, &b2};
    std::array<bool, 6> mask{};
    size_t edge = 0;
    for (int i = 0; i < 6; ++i)
      if (inputs[i]->defined()) mask[i] = ctx->needs_input_grad(edge++);

    variable_list out(10);
    const bool differentiate_backward =
        at::GradMode::is_enabled() &&
        (grad_y.requires_grad() || x0.requires_grad() || (u.defined() && u.requires_grad()) ||
         w1.requires_grad() || (b1.defined() && b1.requires_grad()) || w2.requires_grad() ||
         (b2.defined() && b2.requires_grad()));
    if (differentiate_backward) {
      // create_graph=True: the fused backward has no derivative of its own. Differentiate the
      // reference with respect to fresh aliases of the inputs: torch::autograd::grad with the
      // inputs themselves would return total derivatives, adding every path through the inputs'
      // own history (x0 computed from w1, or one tensor passed as w1 and w2), which the engine
      // then propagates again from this node.
      at::Tensor alias[6];
      for (int i = 0; i < 6; ++i)
        if (inputs[i]->defined()) alias[i] = inputs[i]->view_as(*inputs[i]);
      variable_list wanted;
      for (int i = 0; i < 6; ++i)
        if (mask[i]) wanted.push_back(alias[i]);
      const at::Tensor y_ref = reference_rollout(alias[0], opt(alias[1]), alias[2], opt(alias[3]), alias[4],
                                                 opt(alias[5]), steps.guard_int(__FILE__, __LINE__), delay, truncate);
      const variable_list g = torch::autograd::grad({y_ref}, wanted, {grad_y}, /*retain_graph=*/true,
                                                    /*create_graph=*/true, /*allow_unused=*/true);
      size_t j = 0;
      for (int i = 0; i < 6; ++i) {
        if (!mask[i]) continue;
        out[i] = g[j].defined() ? g[j] : at::zeros_like(*inputs[i]);
        ++j;
      }
      return out;
    }
    auto grads = hidden.defined()
                     ? call_backward_hidden(grad_y, y, hidden, x0, opt(u), w1, opt(b1), w2, delay, truncate, mask)
                     : call_backward(grad_y, y, x0, opt(u), w1, opt(b1), w2, delay, truncate, mask);
    const at::Tensor g6[6] = {std::get<0>(grads), std::get<1>(grads), std::get<2>(grads),
                              std::get<3>(grads), std::get<4>(grads), std::get<5>(grads)};
    for (int i = 0; i < 6; ++i)
      if (mask[i]) out[i] = g6[i];
    return out;
  }
};

at::Tensor rollout_forward_autograd(const at::Tensor& x0, const std::optional<at::Tensor>& u,
                                    const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                                    const at::Tensor& w2, const std::optional<at::Tensor>& b2,
                                    c10::SymInt steps, int64_t delay, int64_t truncate) {
  // The operator's checks first: before autograd touches the inputs (it reads their sizes,
  // which a nested tensor refuses with an internal error that names no argument), and before
  // keep_hidden reads shapes and the device.
  check_rollout_args("fbfast::rollout_forward", x0, u, w1, b1, w2, b2, steps, delay, truncate);
  // Hidden activations are kept only for a backward that can follow: not under no_grad, and
  // not when nothing requires grad (a forward alone takes the faster tile path, and the (T, B, H)
  // buffer would be memory for nothing).
  auto wants_grad = [](const std::optional<at::Tensor>& t) { return t && t->requires_grad(); };
  const bool backward_follows = at::GradMode::is_enabled() &&
                                (x0.requires_grad() || w1.requires_grad() || w2.requires_grad() ||
                                 wants_grad(u) || wants_grad(b1) || wants_grad(b2));
  return RolloutFunction::apply(x0, u, w1, b1, w2, b2, steps, delay, truncate, backward_follows);
}

}  // namespace

TORCH_LIBRARY_IMPL(fbfast, Autograd, m) {
  m.impl("rollout_forward", &rollout_forward_autograd);
}

}  // namespace fbfast
