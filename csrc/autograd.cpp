// Autograd of fbfast::rollout_forward, for every device: the backward is one call of
// fbfast::rollout_backward (the fused reverse-time sweep of the device's kernel), which
// recomputes every hidden layer from Y and the inputs. On the CPU, for wide layers, the forward
// instead keeps what the backward reads (fbfast::rollout_forward_hidden, as much memory as a
// per-step loop keeps) and the backward reads it (rollout_backward_hidden): there recomputing
// costs GEMMs per step.
//
// It lives in C++ rather than in torch.library.register_autograd because at small shapes the
// Python autograd.Function costs several times the rollout itself (measured: ~35 us per
// forward; benchmarks/README.md). Double backward (create_graph=True) takes an exact, slower
// path: autograd of an ATen transcription of the reference, so a second derivative is never a
// silent zero.
#include <ATen/ATen.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "cpu/path_rule.h"
#include "op_calls.h"
#include "rollout_checks.h"

namespace fbfast {

at::Tensor call_forward(const at::Tensor& x0, const std::optional<at::Tensor>& u, at::TensorList w, const BiasList& b,
                        const c10::SymInt& steps, int64_t delay, int64_t truncate, c10::string_view act, double p,
                        at::IntArrayRef lags, int64_t feedback, bool residual) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fbfast::rollout_forward", "")
                       .typed<at::Tensor(const at::Tensor&, const std::optional<at::Tensor>&, at::TensorList,
                                         const BiasList&, c10::SymInt, int64_t, int64_t, c10::string_view, double,
                                         at::IntArrayRef, int64_t, bool)>();
  return op.call(x0, u, w, b, steps, delay, truncate, act, p, lags, feedback, residual);
}

namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;
using GradTuple = std::tuple<at::Tensor, at::Tensor, std::vector<at::Tensor>, std::vector<at::Tensor>>;

// act(z) with ATen's differentiable ops (their derivatives are torch's, to any order).
at::Tensor activate(const at::Tensor& z, Act act, double p) {
  switch (act) {
    case Act::kRelu: return at::relu(z);
    case Act::kLeakyRelu: return at::leaky_relu(z, p);
    case Act::kElu: return at::elu(z, p);
    case Act::kTanh: return at::tanh(z);
    case Act::kSigmoid: return at::sigmoid(z);
    case Act::kSilu: return at::silu(z);
    case Act::kGelu: return at::gelu(z, "none");
    case Act::kGeluTanh: return at::gelu(z, "tanh");
    case Act::kMish: return at::mish(z);
  }
  return z;
}

std::optional<at::Tensor> opt(const at::Tensor& t) {
  return t.defined() ? std::optional<at::Tensor>(t) : std::nullopt;
}

// One layer: nn.Linear's x W^T + b, or for an ensemble (W (E, out, in), x (E, B, in)) one
// batched GEMM per member, as fbfast/reference.py does.
at::Tensor layer(const at::Tensor& in, const at::Tensor& w, const at::Tensor& b) {
  if (w.dim() == 2) return at::linear(in, w, opt(b));
  const at::Tensor wt = w.transpose(1, 2);
  return b.defined() ? at::baddbmm(b.unsqueeze(1), in, wt) : at::bmm(in, wt);
}

// The recurrence of docs/spec.md with ATen ops, differentiable; the same steps as
// fbfast/reference.py. b[l] undefined: no bias.
// lags, f, residual: the feedback of docs/spec.md §1.2 (f: the fed-back outputs).
// An ensemble (3-D weights, §1.3) reads a shared x0 (D, B, F) or u (T, B, Du) expanded to every
// member, so that their gradients sum over the members.
at::Tensor reference_rollout(const at::Tensor& x0_in, const std::optional<at::Tensor>& u_in,
                             const std::vector<at::Tensor>& w, const std::vector<at::Tensor>& b, int64_t steps,
                             int64_t delay, int64_t truncate, Act act, double p, const std::vector<int64_t>& lags,
                             int64_t f, bool residual) {
  const int64_t O = w.back().size(-2);
  at::Tensor x0 = x0_in;
  std::optional<at::Tensor> u = u_in;
  if (w[0].dim() == 3) {
    const int64_t E = w[0].size(0);
    if (x0.dim() == 3) x0 = x0.unsqueeze(1).expand({x0.size(0), E, x0.size(1), x0.size(2)});
    if (u.has_value() && u->dim() == 3) u = u->unsqueeze(1).expand({u->size(0), E, u->size(1), u->size(2)});
  }
  auto step = [&](const std::vector<at::Tensor>& x, const std::optional<at::Tensor>& ut) {
    at::Tensor in = x.size() == 1 ? x[0] : at::cat(x, -1);
    if (ut.has_value()) in = at::cat({*ut, in}, -1);
    for (size_t l = 0; l < w.size(); ++l) {
      in = layer(in, w[l], b[l]);
      if (l + 1 < w.size()) in = activate(in, act, p);
    }
    // residual: the first lag's value added to the first f outputs.
    return residual ? in + at::constant_pad_nd(x[0], {0, O - f}) : in;
  };
  if (steps == 0 || x0.numel() == 0 || O == 0) {
    // Nothing to feed back: one step over an expanded input gives the (steps, [E,] B, O) result,
    // attached to every input, without looping `steps` times over empty tensors.
    std::vector<int64_t> shape = x0.sizes().vec();
    shape[0] = steps;
    const at::Tensor x = x0.narrow(0, 0, std::min<int64_t>(1, x0.size(0))).expand(shape);
    if (w[0].dim() == 3) {
      // The batched GEMMs take (E, rows, in): fold the steps into the rows and back.
      // Sizes spelled out: a -1 is ambiguous for a tensor of no elements (E, B or a width 0).
      auto fold = [&](const at::Tensor& t) {
        return t.transpose(0, 1).reshape({t.size(1), t.size(0) * t.size(2), t.size(-1)});
      };
      std::optional<at::Tensor> uf;
      if (u.has_value()) uf = fold(*u);
      const at::Tensor y = step(std::vector<at::Tensor>(lags.size(), fold(x)), uf);
      return y.reshape({x.size(1), steps, x.size(2), O}).transpose(0, 1);
    }
    return step(std::vector<at::Tensor>(lags.size(), x), u);
  }
  std::vector<at::Tensor> ys;
  ys.reserve(steps);
  std::vector<at::Tensor> x(lags.size());
  for (int64_t t = 0; t < steps; ++t) {
    const bool cut = truncate && t % truncate == 0;
    for (size_t j = 0; j < lags.size(); ++j) {
      const int64_t s = t - lags[j];
      if (s < 0) {
        x[j] = x0.select(0, s + delay);
      } else {
        x[j] = f == O ? ys[s] : ys[s].narrow(-1, 0, f);
        if (cut) x[j] = x[j].detach();
      }
    }
    ys.push_back(step(x, u.has_value() ? std::optional<at::Tensor>(u->select(0, t)) : std::nullopt));
  }
  return at::stack(ys);
}

GradTuple call_backward(const at::Tensor& grad_y, const at::Tensor& y, const at::Tensor& x0,
                        const std::optional<at::Tensor>& u, at::TensorList w, const BiasList& b, int64_t delay,
                        int64_t truncate, c10::string_view act, double p, const c10::List<bool>& mask,
                        at::IntArrayRef lags, int64_t feedback, bool residual) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fbfast::rollout_backward", "")
                       .typed<GradTuple(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                        const std::optional<at::Tensor>&, at::TensorList, const BiasList&, int64_t,
                                        int64_t, c10::string_view, double, const c10::List<bool>&, at::IntArrayRef,
                                        int64_t, bool)>();
  return op.call(grad_y, y, x0, u, w, b, delay, truncate, act, p, mask, lags, feedback, residual);
}

std::tuple<at::Tensor, std::vector<at::Tensor>> call_forward_hidden(const at::Tensor& x0,
                                                                    const std::optional<at::Tensor>& u,
                                                                    at::TensorList w, const BiasList& b,
                                                                    const c10::SymInt& steps, int64_t delay,
                                                                    c10::string_view act, double p,
                                                                    at::IntArrayRef lags, int64_t feedback,
                                                                    bool residual) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fbfast::rollout_forward_hidden", "")
                       .typed<std::tuple<at::Tensor, std::vector<at::Tensor>>(
                           const at::Tensor&, const std::optional<at::Tensor>&, at::TensorList, const BiasList&,
                           c10::SymInt, int64_t, c10::string_view, double, at::IntArrayRef, int64_t, bool)>();
  return op.call(x0, u, w, b, steps, delay, act, p, lags, feedback, residual);
}

GradTuple call_backward_hidden(const at::Tensor& grad_y, const at::Tensor& y, at::TensorList hidden,
                               const at::Tensor& x0, const std::optional<at::Tensor>& u, at::TensorList w,
                               const BiasList& b, int64_t delay, int64_t truncate, c10::string_view act, double p,
                               const c10::List<bool>& mask, at::IntArrayRef lags, int64_t feedback, bool residual) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("fbfast::rollout_backward_hidden", "")
                       .typed<GradTuple(const at::Tensor&, const at::Tensor&, at::TensorList, const at::Tensor&,
                                        const std::optional<at::Tensor>&, at::TensorList, const BiasList&, int64_t,
                                        int64_t, c10::string_view, double, const c10::List<bool>&, at::IntArrayRef,
                                        int64_t, bool)>();
  return op.call(grad_y, y, hidden, x0, u, w, b, delay, truncate, act, p, mask, lags, feedback, residual);
}

// Whether the forward should keep the hidden activations for the backward: on the CPU, for the
// widths where the kernel takes its BLAS path (csrc/cpu/path_rule.h). Symbolic widths (a
// dynamic-shape trace) keep the default, recomputing backward. Runs after the operator's
// checks, so every shape read here is valid.
bool keep_hidden(const at::Tensor& x0, const std::optional<at::Tensor>& u, at::TensorList w, const c10::SymInt& steps,
                 c10::string_view activation) {
  if (!x0.device().is_cpu() || w.size() < 2) return false;
  for (const at::Tensor& wl : w)  // (out, in), or an ensemble's (E, out, in)
    if (!wl.sym_size(-2).maybe_as_int() || !wl.sym_size(-1).maybe_as_int()) return false;
  const auto t = steps.maybe_as_int();
  if (!t || !x0.sym_size(-2).maybe_as_int() || (u.has_value() && !u->sym_size(-1).maybe_as_int())) return false;
  return cpu::saves_hidden(x0, u, w, *t, activation);
}

// The biases as the operators take them: None where has_bias is false, else the next of `given`.
BiasList bias_list(const std::vector<at::Tensor>& given, const std::vector<bool>& has_bias) {
  BiasList out;
  size_t next = 0;
  for (const bool has : has_bias) out.push_back(has ? std::optional<at::Tensor>(given[next++]) : std::nullopt);
  return out;
}

// Autograd sees the given biases as one list of tensors (a Tensor?[] is not a variable
// argument of torch::autograd::Function); the Tensor?[] itself comes along as plain data.
class RolloutFunction : public torch::autograd::Function<RolloutFunction> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x0, const std::optional<at::Tensor>& u,
                            at::TensorList weights, at::TensorList biases_given, const BiasList& biases,
                            const c10::SymInt& steps, int64_t delay, int64_t truncate, const std::string& activation,
                            double param, const std::vector<int64_t>& lags, int64_t feedback, bool residual,
                            bool backward_follows) {
    at::Tensor y;
    std::vector<at::Tensor> hidden;
    {
      at::AutoDispatchBelowADInplaceOrView guard;
      if (backward_follows && keep_hidden(x0, u, weights, steps, activation))
        std::tie(y, hidden) =
            call_forward_hidden(x0, u, weights, biases, steps, delay, activation, param, lags, feedback, residual);
      else {
        // On the CPU, the path its backward takes (csrc/cpu/path_rule.h).
        std::optional<cpu::TrainingForward> training;
        if (backward_follows && x0.device().is_cpu()) training.emplace();
        y = call_forward(x0, u, weights, biases, steps, delay, truncate, activation, param, lags, feedback, residual);
      }
    }
    variable_list saved{x0, u.value_or(at::Tensor()), y};
    saved.insert(saved.end(), weights.begin(), weights.end());
    saved.insert(saved.end(), biases_given.begin(), biases_given.end());
    saved.insert(saved.end(), hidden.begin(), hidden.end());
    ctx->save_for_backward(saved);
    // The call's other arguments, as one entry: every entry of saved_data is a hashed insert,
    // and at small shapes this node's bookkeeping is a measurable part of a rollout.
    c10::List<bool> has;
    for (size_t l = 0; l < biases.size(); ++l) has.push_back(biases.get(l).has_value());
    ctx->saved_data["call"] = c10::ivalue::Tuple::create(
        {has, static_cast<int64_t>(hidden.size()), steps, delay, truncate, activation, param, lags, feedback, residual});
    return y;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    const variable_list saved = ctx->get_saved_variables();
    const auto call = ctx->saved_data["call"].toTuple();
    const auto& c = call->elements();
    std::vector<bool> has_bias;
    for (const bool b : c[0].toBoolList()) has_bias.push_back(b);
    const size_t L = has_bias.size();
    const size_t n_bias = static_cast<size_t>(std::count(has_bias.begin(), has_bias.end(), true));
    const size_t n_hidden = static_cast<size_t>(c[1].toInt());
    const at::Tensor &x0 = saved[0], &u = saved[1], &y = saved[2];
    const std::vector<at::Tensor> w(saved.begin() + 3, saved.begin() + 3 + L);
    const std::vector<at::Tensor> b_given(saved.begin() + 3 + L, saved.begin() + 3 + L + n_bias);
    const std::vector<at::Tensor> hidden(saved.begin() + 3 + L + n_bias, saved.begin() + 3 + L + n_bias + n_hidden);
    const c10::SymInt steps = c[2].toSymInt();
    const int64_t delay = c[3].toInt(), truncate = c[4].toInt();
    const std::string activation = c[5].toStringRef();
    const double param = c[6].toDouble();
    const std::vector<int64_t> lags = c[7].toIntVector();
    const int64_t feedback = c[8].toInt();
    const bool residual = c[9].toBool();
    at::Tensor grad_y = grad_outputs[0];
    if (!grad_y.defined()) grad_y = at::zeros_like(y);

    // The variable inputs in autograd's order (x0, u if given, the weights, the given biases);
    // needs_input_grad counts only those that were given (a None has no edge).
    std::vector<const at::Tensor*> inputs{&x0, &u};
    for (const auto& t : w) inputs.push_back(&t);
    for (const auto& t : b_given) inputs.push_back(&t);
    std::vector<bool> wanted(inputs.size(), false);
    size_t edge = 0;
    for (size_t i = 0; i < inputs.size(); ++i)
      if (inputs[i]->defined()) wanted[i] = ctx->needs_input_grad(edge++);

    // One gradient per argument of forward: x0, u, each weight, each given bias, then the
    // 10 non-tensor arguments.
    variable_list out(2 + L + n_bias + 10);
    bool differentiate_backward = at::GradMode::is_enabled() && grad_y.requires_grad();
    for (const at::Tensor* t : inputs) differentiate_backward |= at::GradMode::is_enabled() && t->defined() && t->requires_grad();
    const Act act = parse_activation("fbfast::rollout_forward", activation);
    if (differentiate_backward) {
      // create_graph=True: the fused backward has no derivative of its own. Differentiate the
      // reference with respect to fresh aliases of the inputs: torch::autograd::grad with the
      // inputs themselves would return total derivatives, adding every path through the inputs'
      // own history (x0 computed from w1, or one tensor passed as w1 and w2), which the engine
      // then propagates again from this node.
      std::vector<at::Tensor> alias(inputs.size());
      for (size_t i = 0; i < inputs.size(); ++i)
        if (inputs[i]->defined()) alias[i] = inputs[i]->view_as(*inputs[i]);
      std::vector<at::Tensor> aw(alias.begin() + 2, alias.begin() + 2 + L), ab;
      for (size_t l = 0, next = 2 + L; l < L; ++l) ab.push_back(has_bias[l] ? alias[next++] : at::Tensor());
      variable_list targets;
      for (size_t i = 0; i < inputs.size(); ++i)
        if (wanted[i]) targets.push_back(alias[i]);
      const std::vector<int64_t> all_lags = lags.empty() ? std::vector<int64_t>{delay} : lags;
      const int64_t f = feedback ? feedback : aw.back().size(-2);
      const at::Tensor y_ref = reference_rollout(alias[0], opt(alias[1]), aw, ab, steps.guard_int(__FILE__, __LINE__),
                                                 delay, truncate, act, param, all_lags, f, residual);
      const variable_list g = torch::autograd::grad({y_ref}, targets, {grad_y}, /*retain_graph=*/true,
                                                    /*create_graph=*/true, /*allow_unused=*/true);
      size_t j = 0;
      for (size_t i = 0; i < inputs.size(); ++i) {
        if (!wanted[i]) continue;
        out[i] = g[j].defined() ? g[j] : at::zeros_like(*inputs[i]);
        ++j;
      }
      return out;
    }
    // The operator's mask: x0, u, w_1..w_L, b_1..b_L (a layer without bias asks for none).
    c10::List<bool> mask;
    mask.push_back(wanted[0]);
    mask.push_back(wanted[1]);
    for (size_t l = 0; l < L; ++l) mask.push_back(wanted[2 + l]);
    for (size_t l = 0, next = 2 + L; l < L; ++l) mask.push_back(has_bias[l] && wanted[next++]);
    const BiasList biases = bias_list(b_given, has_bias);
    // No graph of the backward is built (differentiate_backward is false): straight to the
    // device's kernel, past autograd's fallback for the backward operators, which would inspect
    // every argument for nothing (about a seventh of this node's cost at the seed's shape).
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    const GradTuple grads = !hidden.empty()
                                ? call_backward_hidden(grad_y, y, hidden, x0, opt(u), w, biases, delay, truncate,
                                                       activation, param, mask, lags, feedback, residual)
                                : call_backward(grad_y, y, x0, opt(u), w, biases, delay, truncate, activation, param,
                                                mask, lags, feedback, residual);
    if (wanted[0]) out[0] = std::get<0>(grads);
    if (wanted[1]) out[1] = std::get<1>(grads);
    for (size_t l = 0; l < L; ++l)
      if (wanted[2 + l]) out[2 + l] = std::get<2>(grads)[l];
    for (size_t l = 0, next = 2 + L; l < L; ++l) {
      if (!has_bias[l]) continue;
      if (wanted[next]) out[next] = std::get<3>(grads)[l];
      ++next;
    }
    return out;
  }
};

at::Tensor rollout_forward_autograd(const at::Tensor& x0, const std::optional<at::Tensor>& u, at::TensorList weights,
                                    const BiasList& biases, c10::SymInt steps, int64_t delay, int64_t truncate,
                                    c10::string_view activation, double param, at::IntArrayRef lags, int64_t feedback,
                                    bool residual) {
  // The operator's checks first: before autograd touches the inputs (it reads their sizes,
  // which a nested tensor refuses with an internal error that names no argument), and before
  // keep_hidden reads shapes and the device.
  check_rollout_args("fbfast::rollout_forward", x0, u, weights, biases, steps, delay, truncate, activation,
                     {lags, feedback, residual});
  std::vector<at::Tensor> given;
  for (size_t l = 0; l < biases.size(); ++l) {
    const std::optional<at::Tensor> b = biases.get(l);
    if (b.has_value()) given.push_back(*b);
  }
  // Hidden activations are kept only for a backward that can follow: not under no_grad, and
  // not when nothing requires grad (a forward alone takes the faster tile path, and the kept
  // buffers would be memory for nothing).
  bool requires_grad = x0.requires_grad() || (u && u->requires_grad());
  for (const auto& t : weights) requires_grad |= t.requires_grad();
  for (const auto& t : given) requires_grad |= t.requires_grad();
  const bool backward_follows = at::GradMode::is_enabled() && requires_grad;
  if (!backward_follows) {
    // Nothing to differentiate (no_grad, or no input requires grad): the kernel itself, without
    // building an autograd node that could never run (about a microsecond per call, a tenth of
    // a small forward rollout).
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_forward(x0, u, weights, biases, steps, delay, truncate, activation, param, lags, feedback, residual);
  }
  return RolloutFunction::apply(x0, u, weights, at::TensorList(given), biases, steps, delay, truncate,
                                std::string(activation), param, lags.vec(), feedback, residual, backward_follows);
}

}  // namespace

TORCH_LIBRARY_IMPL(fbfast, Autograd, m) {
  m.impl("rollout_forward", &rollout_forward_autograd);
}

}  // namespace fbfast
