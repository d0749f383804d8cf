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
#include <ATen/FuncTorchTLS.h>
#include <torch/autograd.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
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

// The reference of one operator call: its lags ([]: the one lag `delay`) and fed-back outputs
// (0: all of them) spelled out as reference_rollout takes them. b[l] undefined: no bias.
at::Tensor reference_of_call(const at::Tensor& x0, const std::optional<at::Tensor>& u, const std::vector<at::Tensor>& w,
                             const std::vector<at::Tensor>& b, const c10::SymInt& steps, int64_t delay,
                             int64_t truncate, c10::string_view activation, double param, at::IntArrayRef lags,
                             int64_t feedback, bool residual) {
  const std::vector<int64_t> all_lags = lags.empty() ? std::vector<int64_t>{delay} : lags.vec();
  return reference_rollout(x0, u, w, b, steps.guard_int(__FILE__, __LINE__), delay, truncate,
                           parse_activation("fbfast::rollout_forward", activation), param, all_lags,
                           feedback ? feedback : w.back().size(-2), residual);
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

// The autograd node of one rollout, written as ATen's generated nodes are (a torch::Node with
// SavedVariables) rather than as a torch::autograd::Function: at the seed's shape Function::apply
// spends about as many instructions on its own bookkeeping (a VariableInfo per input and output,
// the saved_data map, output wrapping) as the rollout itself (benchmarks/README.md, "callgrind").
//
// Its next edges are one per slot, in the operator's order: x0, u, w_1..w_L, b_1..b_L; a slot
// with no tensor (u or a bias that is None) has an invalid edge, so the gradient list it returns
// lines up with the operator's mask.
struct RolloutBackward final : public torch::autograd::Node {
  using SavedVariable = torch::autograd::SavedVariable;

  SavedVariable x0, u, y;
  std::vector<SavedVariable> w, b, hidden;  // b: one per layer, undefined where no bias
  c10::SymInt steps;
  int64_t delay = 1, truncate = 0, feedback = 0;
  std::string activation;
  double param = 0;
  std::vector<int64_t> lags;
  bool residual = false;

  std::string name() const override { return "fbfast::RolloutFunctionBackward"; }

  void release_variables() override {
    std::lock_guard<std::mutex> lock(mutex_);
    x0.reset_data();
    u.reset_data();
    y.reset_data();
    for (auto* list : {&w, &b, &hidden})
      for (SavedVariable& v : *list) v.reset_data();
  }

  variable_list apply(variable_list&& grad_outputs) override {
    std::lock_guard<std::mutex> lock(mutex_);
    const size_t L = w.size(), slots = 2 + 2 * L;
    // The inputs in slot order: x0, u, w_1..w_L, b_1..b_L (undefined where none was given).
    std::vector<at::Tensor> in;
    in.reserve(slots);
    in.push_back(x0.unpack());
    in.push_back(u.unpack());
    for (const SavedVariable& v : w) in.push_back(v.unpack());
    for (const SavedVariable& v : b) in.push_back(v.unpack());
    const std::vector<at::Tensor> w_t(in.begin() + 2, in.begin() + 2 + L), b_t(in.begin() + 2 + L, in.end());
    const at::Tensor y_t = y.unpack(getptr());
    at::Tensor grad_y = grad_outputs[0];
    if (!grad_y.defined()) grad_y = at::zeros_like(y_t);

    // Which slots this backward pass wants (torch.autograd.grad may ask for only some inputs).
    std::vector<bool> wanted(slots);
    for (size_t i = 0; i < slots; ++i) wanted[i] = task_should_compute_output(i) && in[i].defined();
    variable_list out(slots);

    bool differentiate_backward = false;
    if (at::GradMode::is_enabled()) {
      differentiate_backward = grad_y.requires_grad();
      for (const at::Tensor& t : in) differentiate_backward |= t.defined() && t.requires_grad();
    }
    if (differentiate_backward) {
      // create_graph=True: the fused backward has no derivative of its own. Differentiate the
      // reference with respect to fresh aliases of the inputs: torch::autograd::grad with the
      // inputs themselves would return total derivatives, adding every path through the inputs'
      // own history (x0 computed from w1, or one tensor passed as w1 and w2), which the engine
      // then propagates again from this node.
      std::vector<at::Tensor> alias(slots);
      for (size_t i = 0; i < slots; ++i)
        if (in[i].defined()) alias[i] = in[i].view_as(in[i]);
      variable_list targets;
      for (size_t i = 0; i < slots; ++i)
        if (wanted[i]) targets.push_back(alias[i]);
      const at::Tensor y_ref = reference_of_call(
          alias[0], opt(alias[1]), std::vector<at::Tensor>(alias.begin() + 2, alias.begin() + 2 + L),
          std::vector<at::Tensor>(alias.begin() + 2 + L, alias.end()), steps, delay, truncate, activation, param,
          lags, feedback, residual);
      const variable_list g = torch::autograd::grad({y_ref}, targets, {grad_y}, /*retain_graph=*/true,
                                                    /*create_graph=*/true, /*allow_unused=*/true);
      size_t j = 0;
      for (size_t i = 0; i < slots; ++i) {
        if (!wanted[i]) continue;
        out[i] = g[j].defined() ? g[j] : at::zeros_like(in[i]);
        ++j;
      }
      return out;
    }
    // The operator's mask is `wanted`: x0, u, w_1..w_L, b_1..b_L (a slot without a tensor asks
    // for none).
    c10::List<bool> mask;
    mask.reserve(slots);
    for (size_t i = 0; i < slots; ++i) mask.push_back(wanted[i]);
    BiasList biases;
    biases.reserve(L);
    for (const at::Tensor& t : b_t) biases.push_back(opt(t));
    std::vector<at::Tensor> hidden_t;
    for (const SavedVariable& v : hidden) hidden_t.push_back(v.unpack());
    // No graph of the backward is built (differentiate_backward is false): straight to the
    // device's kernel, past autograd's fallback for the backward operators, which would inspect
    // every argument for nothing (about a seventh of this node's cost at the seed's shape).
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    GradTuple grads = !hidden_t.empty()
                          ? call_backward_hidden(grad_y, y_t, hidden_t, in[0], opt(in[1]), w_t, biases, delay,
                                                 truncate, activation, param, mask, lags, feedback, residual)
                          : call_backward(grad_y, y_t, in[0], opt(in[1]), w_t, biases, delay, truncate, activation,
                                          param, mask, lags, feedback, residual);
    if (wanted[0]) out[0] = std::move(std::get<0>(grads));
    if (wanted[1]) out[1] = std::move(std::get<1>(grads));
    for (size_t l = 0; l < L; ++l) {
      if (wanted[2 + l]) out[2 + l] = std::move(std::get<2>(grads)[l]);
      if (wanted[2 + L + l]) out[2 + L + l] = std::move(std::get<3>(grads)[l]);
    }
    return out;
  }
};

// Forward-mode AD (torch.autograd.forward_ad, torch.func.jvp): the kernels have no tangent rule,
// so the rollout runs as the reference's ATen ops, whose forward and backward derivatives are
// torch's own. Without this, tangents would silently come back as none or zeros.
bool has_forward_grad(const at::Tensor& x0, const std::optional<at::Tensor>& u, at::TensorList weights,
                      const BiasList& biases) {
  using torch::autograd::isFwGradDefined;
  bool any = isFwGradDefined(x0) || isFwGradDefined(u);
  for (const at::Tensor& t : weights) any |= isFwGradDefined(t);
  for (size_t l = 0; l < biases.size(); ++l) any |= isFwGradDefined(biases.get(l));
  return any;
}

at::Tensor rollout_forward_autograd(const at::Tensor& x0, const std::optional<at::Tensor>& u, at::TensorList weights,
                                    const BiasList& biases, c10::SymInt steps, int64_t delay, int64_t truncate,
                                    c10::string_view activation, double param, at::IntArrayRef lags, int64_t feedback,
                                    bool residual) {
  // The operator's checks first: before autograd touches the inputs (it reads their sizes,
  // which a nested tensor refuses with an internal error that names no argument), and before
  // keep_hidden reads shapes and the device.
  check_rollout_args("fbfast::rollout_forward", x0, u, weights, biases, steps, delay, truncate, activation,
                     {lags, feedback, residual});
  if (has_forward_grad(x0, u, weights, biases)) {
    std::vector<at::Tensor> b;
    for (size_t l = 0; l < biases.size(); ++l) b.push_back(biases.get(l).value_or(at::Tensor()));
    return reference_of_call(x0, u, weights.vec(), b, steps, delay, truncate, activation, param, lags, feedback,
                             residual);
  }
  // A backward can follow unless grad mode is off or no input requires grad. Otherwise the
  // kernel runs alone: no node that could never run (about a microsecond per call, a tenth of a
  // small forward rollout), and no hidden activations kept (a forward alone takes the faster
  // tile path, and the kept buffers would be memory for nothing).
  using torch::autograd::impl::gradient_edge;
  using torch::autograd::Edge;
  bool requires_grad = false;
  if (at::GradMode::is_enabled()) {
    requires_grad = x0.requires_grad() || (u && u->requires_grad());
    for (const auto& t : weights) requires_grad |= t.requires_grad();
    for (size_t l = 0; l < biases.size(); ++l) {
      const std::optional<at::Tensor> b = biases.get(l);
      requires_grad |= b.has_value() && b->requires_grad();
    }
  }
  if (!requires_grad) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return call_forward(x0, u, weights, biases, steps, delay, truncate, activation, param, lags, feedback, residual);
  }

  // Under torch.func's grad transforms (grad, vjp, jacrev) this node would be differentiated
  // with wrappers whose level has ended; refuse as torch::autograd::Function does, with its
  // words, which fbfast.rollout (fbfast/functional.py) answers by running the reference there.
  if (const auto& functorch = at::functorch::functorchTLSAccessor()) functorch->checkSupportsCppAutogradFunction();
  const size_t L = weights.size();
  auto node = c10::make_intrusive<RolloutBackward>();
  torch::autograd::edge_list edges;
  edges.reserve(2 + 2 * L);
  edges.push_back(gradient_edge(x0));
  edges.push_back(u.has_value() ? gradient_edge(*u) : Edge());
  for (const at::Tensor& t : weights) edges.push_back(gradient_edge(t));
  for (size_t l = 0; l < L; ++l) {
    const std::optional<at::Tensor> b = biases.get(l);
    edges.push_back(b.has_value() ? gradient_edge(*b) : Edge());
  }
  node->set_next_edges(std::move(edges));

  at::Tensor y;
  std::vector<at::Tensor> hidden;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    // Grad mode off as well, as torch::autograd::Function runs its forward: under a functorch
    // transform (torch.func.grad, vjp, jacrev) the call below re-enters this kernel one level
    // down, where it must run the kernel alone rather than build a second node.
    at::AutoGradMode no_grad(false);
    c10::AutoFwGradMode no_fw_grad(false);
    if (keep_hidden(x0, u, weights, steps, activation)) {
      std::tie(y, hidden) =
          call_forward_hidden(x0, u, weights, biases, steps, delay, activation, param, lags, feedback, residual);
    } else {
      // On the CPU, the path its backward takes (csrc/cpu/path_rule.h).
      std::optional<cpu::TrainingForward> training;
      if (x0.device().is_cpu()) training.emplace();
      y = call_forward(x0, u, weights, biases, steps, delay, truncate, activation, param, lags, feedback, residual);
    }
  }
  torch::autograd::set_history(y, node);

  using torch::autograd::SavedVariable;
  node->x0 = SavedVariable(x0, false);
  if (u.has_value()) node->u = SavedVariable(*u, false);
  node->y = SavedVariable(y, /*is_output=*/true);
  node->w.reserve(L);
  node->b.reserve(L);
  for (size_t l = 0; l < L; ++l) {
    node->w.emplace_back(weights[l], false);
    node->b.emplace_back(biases.get(l).value_or(at::Tensor()), false);
  }
  node->hidden.reserve(hidden.size());
  for (const at::Tensor& h : hidden) node->hidden.emplace_back(h, false);
  node->steps = std::move(steps);
  node->delay = delay;
  node->truncate = truncate;
  node->activation = std::string(activation);
  node->param = param;
  node->lags = lags.vec();
  node->feedback = feedback;
  node->residual = residual;
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(fbfast, Autograd, m) {
  m.impl("rollout_forward", &rollout_forward_autograd);
}

}  // namespace fbfast
