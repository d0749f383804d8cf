// The operators' argument checks, written once for every kernel that takes the operators'
// arguments: the CPU kernels (csrc/cpu/), the CUDA kernels (csrc/cuda/) and the shape-only
// meta kernels that torch.compile and torch.export trace with (csrc/meta.cpp). Sizes are read
// as SymInts so that the meta kernels check symbolic shapes with the same code; on real
// tensors every SymInt is a plain integer.
//
// The Python API validates before any operator runs (fbfast/_validation.py); these checks guard
// direct calls of torch.ops.fbfast.* and must turn every misuse into a RuntimeError that names
// the argument, never a crash or an opaque ATen message. Light headers only: this is included
// by host code compiled with nvcc's host compiler too.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/SymInt.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <new>
#include <optional>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "common/activation.h"
#include "cpu/huge_pages.h"

namespace fbfast {

// Every tensor argument must be dense: sparse and nested tensors have no strides to read
// (a nested tensor fails in ATen with "NestedTensorImpl doesn't support sizes").
inline void check_dense(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(!t.is_nested(), op, ": ", name, " is a nested tensor; dense (torch.strided) tensors are "
              "needed (stack the batch into one tensor)");
  TORCH_CHECK(t.layout() == at::kStrided, op, ": ", name, " has layout ", t.layout(),
              "; dense (torch.strided) tensors are needed (use .to_dense())");
}

// One dtype and one device for all tensors: x0's.
inline void check_like_x0(const char* op, const char* name, const at::Tensor& t, const at::Tensor& x0) {
  TORCH_CHECK(t.scalar_type() == x0.scalar_type(), op, ": ", name, " has dtype ", t.scalar_type(), " but x0 has ",
              x0.scalar_type(), "; all tensors must share one dtype");
  TORCH_CHECK(t.device() == x0.device(), op, ": ", name, " is on ", t.device(), " but x0 is on ", x0.device(),
              "; all tensors must be on one device");
}

// One bias per layer, each possibly None: the C++ type of the schema's Tensor?[].
using BiasList = c10::List<std::optional<at::Tensor>>;

// The activation named in the schema's `activation` argument.
inline Act parse_activation(const char* op, c10::string_view name) {
  for (int i = 0; i < kNumActs; ++i)
    if (name == kActNames[i]) return static_cast<Act>(i);
  std::string known;
  for (int i = 0; i < kNumActs; ++i) known += std::string(i ? ", " : "") + "'" + kActNames[i] + "'";
  TORCH_CHECK(false, op, ": activation must be one of ", known, "; got '", std::string(name), "'");
}

// The feedback structure of a call (docs/spec.md §1.2) as the operators take it: the lags in
// the order step t reads them (empty: the single lag `delay`), F (0: every output is fed back)
// and whether the first lag's value is added to the first F outputs.
struct FeedbackArgs {
  at::IntArrayRef lags;
  int64_t feedback = 0;
  bool residual = false;
};

// The shapes of a rollout, once its arguments are checked.
struct RolloutSizes {
  c10::SymInt steps, batch, du, o;
  c10::SymInt f;                    // fed-back outputs, 1 <= F <= O
  std::vector<c10::SymInt> widths;  // out_l of every layer; widths.back() == o
  std::vector<int64_t> lags;        // the lags, in the order read; max == delay
  int64_t delay = 1;                // D = max(lags), x0's leading axis
  bool residual = false;
  Act act = Act::kRelu;
  // An ensemble (docs/spec.md §1.3): E > 0 networks side by side, weights (E, out, in); x0
  // (D, E, B, F) or shared (D, B, F), u (T, E, B, Du) or shared (T, B, Du); Y (T, E, B, O).
  // batch is each member's B; an ensemble may have E = 0 members (then Y is empty).
  bool is_ensemble = false;
  c10::SymInt members = 0;
  bool x0_shared = false, u_shared = false;

  bool ensemble() const { return is_ensemble; }
  int64_t layers() const { return static_cast<int64_t>(widths.size()); }
};

// "w3" / "b3": the name of layer l's weight or bias in the Python API (fbfast.rollout).
inline std::string layer_arg(char kind, size_t l) { return std::string(1, kind) + std::to_string(l + 1); }

inline RolloutSizes check_rollout_args(const char* op, const at::Tensor& x0, const std::optional<at::Tensor>& u,
                                       at::TensorList weights, const BiasList& biases, const c10::SymInt& steps,
                                       int64_t delay, int64_t truncate, c10::string_view activation,
                                       const FeedbackArgs& fb = {}) {
  RolloutSizes s;
  s.act = parse_activation(op, activation);
  const size_t L = weights.size();
  TORCH_CHECK(L >= 1, op, ": weights must hold at least one layer's weight, got none");
  TORCH_CHECK(biases.size() == L, op, ": biases must hold one entry (a tensor or None) per layer: weights has ", L,
              " layers, biases has ", biases.size(), " entries");
  check_dense(op, "x0", x0);
  if (u.has_value()) check_dense(op, "u", *u);
  // The layers' biases, read out of the list once. Names ("w3") are built only for a message.
  std::vector<std::optional<at::Tensor>> bias(L);
  auto dense = [](const at::Tensor& t) { return !t.is_nested() && t.layout() == at::kStrided; };
  for (size_t l = 0; l < L; ++l) {
    if (!dense(weights[l])) check_dense(op, layer_arg('w', l).c_str(), weights[l]);
    bias[l] = biases.get(l);
    if (bias[l].has_value() && !dense(*bias[l])) check_dense(op, layer_arg('b', l).c_str(), *bias[l]);
  }
  TORCH_CHECK(delay >= 1, op, ": delay must be >= 1, got ", delay);
  if (fb.lags.empty()) {
    s.lags = {delay};
  } else {
    int64_t longest = 0;
    for (size_t j = 0; j < fb.lags.size(); ++j) {
      TORCH_CHECK(fb.lags[j] >= 1, op, ": lags must be positive, got ", fb.lags);
      for (size_t i = 0; i < j; ++i)
        TORCH_CHECK(fb.lags[i] != fb.lags[j], op, ": lags must be distinct, got ", fb.lags);
      longest = std::max(longest, fb.lags[j]);
    }
    TORCH_CHECK(longest == delay, op, ": delay must be the longest lag, max(lags) = ", longest, ", got delay = ",
                delay, " (lags ", fb.lags, ")");
    s.lags = fb.lags.vec();
  }
  s.delay = delay;
  s.residual = fb.residual;
  TORCH_CHECK(fb.feedback >= 0, op, ": feedback must be >= 1 (or 0: every output), got ", fb.feedback);
  TORCH_CHECK(truncate >= 0, op, ": truncate must be >= 0 (0 = full BPTT), got ", truncate);
  TORCH_CHECK(steps >= 0, op, ": steps must be >= 0, got ", steps);
  // 2-D weights: one network; 3-D: an ensemble of E (w1's leading axis), every layer alike.
  TORCH_CHECK(weights[0].dim() == 2 || weights[0].dim() == 3, op,
              ": w1 must be 2-D (out, in) like nn.Linear.weight, or 3-D (E, out, in) for an ensemble, got ",
              weights[0].sym_sizes());
  const bool ens = weights[0].dim() == 3;
  const int64_t wdim = weights[0].dim();
  for (size_t l = 1; l < L; ++l)
    TORCH_CHECK(weights[l].dim() == wdim, op, ": every weight must have w1's rank (", wdim, "-D: ",
                ens ? "(E, out, in), an ensemble" : "(out, in)", "), but ", layer_arg('w', l), " is ",
                weights[l].sym_sizes());
  const c10::SymInt E = ens ? weights[0].sym_size(0) : c10::SymInt(0);
  for (size_t l = 1; ens && l < L; ++l)
    TORCH_CHECK(weights[l].sym_size(0) == E, op, ": ensemble sizes disagree: w1 has E = ", E, " members, ",
                layer_arg('w', l), " is ", weights[l].sym_sizes());
  // (out, in) of layer l, whatever the rank.
  auto w_out = [&](size_t l) { return weights[l].sym_size(wdim - 2); };
  auto w_in = [&](size_t l) { return weights[l].sym_size(wdim - 1); };
  const c10::SymInt O = w_out(L - 1);
  const c10::SymInt F = fb.feedback == 0 ? O : c10::SymInt(fb.feedback);
  TORCH_CHECK(F <= O, op, ": feedback must be at most the O = ", O, " outputs of ", layer_arg('w', L - 1), ", got ",
              fb.feedback);
  if (ens) {
    TORCH_CHECK((x0.dim() == 3 || x0.dim() == 4) && x0.sym_size(0) == delay, op, ": x0 must be (delay=", delay,
                ", E, B, F) or shared by the E = ", E, " members (delay=", delay, ", B, F), got ", x0.sym_sizes());
    TORCH_CHECK(x0.dim() == 3 || x0.sym_size(1) == E, op, ": ensemble sizes disagree: x0 ", x0.sym_sizes(),
                " has E = ", x0.sym_size(1), " members, the weights have E = ", E);
  } else {
    TORCH_CHECK(x0.dim() == 3 && x0.sym_size(0) == delay, op, ": x0 must be (delay=", delay, ", B, F), got ",
                x0.sym_sizes());
  }
  s.x0_shared = ens && x0.dim() == 3;
  const c10::SymInt B = x0.sym_size(x0.dim() - 2);
  TORCH_CHECK(x0.sym_size(x0.dim() - 1) == F, op, ": x0 has ", x0.sym_size(x0.dim() - 1), " features, but F = ", F,
              " outputs are fed back (", layer_arg('w', L - 1), " outputs O = ", O, ")");
  // The rank of u is checked before its last axis is read.
  if (u.has_value() && ens) {
    TORCH_CHECK((u->dim() == 4 && u->sym_size(0) == steps && u->sym_size(1) == E && u->sym_size(2) == B) ||
                    (u->dim() == 3 && u->sym_size(0) == steps && u->sym_size(1) == B),
                op, ": u must be (steps=", steps, ", E=", E, ", B=", B, ", Du) or shared by the members (steps=",
                steps, ", B=", B, ", Du), got ", u->sym_sizes());
    s.u_shared = u->dim() == 3;
  } else if (u.has_value()) {
    TORCH_CHECK(u->dim() == 3 && u->sym_size(0) == steps && u->sym_size(1) == B, op, ": u must be (steps=", steps,
                ", B=", B, ", Du), got ", u->sym_sizes());
  }
  const c10::SymInt du = u.has_value() ? u->sym_size(u->dim() - 1) : c10::SymInt(0);
  const int64_t m = static_cast<int64_t>(s.lags.size());
  TORCH_CHECK(w_in(0) == du + F * m, op, ": w1 must have Du + m F = ", du + F * m,
              " input columns (Du = ", du, " from u, m = ", m, " lags of F = ", F, " fed-back values), got ",
              weights[0].sym_sizes());
  for (size_t l = 1; l < L; ++l)
    TORCH_CHECK(w_in(l) == w_out(l - 1), op, ": layer sizes do not chain: ", layer_arg('w', l), " is ",
                weights[l].sym_sizes(), " with ", w_in(l), " input columns, but ", layer_arg('w', l - 1), " is ",
                weights[l - 1].sym_sizes(), " with ", w_out(l - 1), " outputs");
  s.widths.reserve(L);
  for (size_t l = 0; l < L; ++l) {
    const std::optional<at::Tensor>& b = bias[l];
    const c10::SymInt out = w_out(l);
    if (ens) {
      TORCH_CHECK(!b.has_value() || (b->dim() == 2 && b->sym_size(0) == E && b->sym_size(1) == out), op, ": ",
                  layer_arg('b', l), " must be (E=", E, ", ", out, ") in an ensemble, got ",
                  b.has_value() ? b->sym_sizes() : c10::SymIntArrayRef());
    } else {
      TORCH_CHECK(!b.has_value() || (b->dim() == 1 && b->sym_size(0) == out), op, ": ", layer_arg('b', l),
                  " must be (", out, ",), got ", b.has_value() ? b->sym_sizes() : c10::SymIntArrayRef());
    }
    s.widths.push_back(out);
  }
  s.is_ensemble = ens;
  s.members = E;
  if (u.has_value()) check_like_x0(op, "u", *u, x0);
  auto like_x0 = [&](const at::Tensor& t) { return t.scalar_type() == x0.scalar_type() && t.device() == x0.device(); };
  for (size_t l = 0; l < L; ++l) {
    if (!like_x0(weights[l])) check_like_x0(op, layer_arg('w', l).c_str(), weights[l], x0);
    if (bias[l].has_value() && !like_x0(*bias[l])) check_like_x0(op, layer_arg('b', l).c_str(), *bias[l], x0);
  }
  s.steps = steps;
  s.batch = B;
  s.du = du;
  s.o = O;
  s.f = F;
  return s;
}

// The backward's arguments: the forward's (steps is y's leading axis), grad_y and y, which
// must both be (T, B, O) in x0's dtype and on x0's device, and one output_mask entry per
// gradient (x0, u, w_1 .. w_L, b_1 .. b_L).
inline RolloutSizes check_backward_args(const char* op, const at::Tensor& grad_y, const at::Tensor& y,
                                        const at::Tensor& x0, const std::optional<at::Tensor>& u,
                                        at::TensorList weights, const BiasList& biases, int64_t delay,
                                        int64_t truncate, c10::string_view activation,
                                        const c10::List<bool>& output_mask, const FeedbackArgs& fb = {}) {
  check_dense(op, "grad_y", grad_y);
  check_dense(op, "y", y);
  // An ensemble's y is (T, E, B, O) (w1 3-D); its rank is checked before its axes are read, once
  // w1's rank is known good (else the forward's checks name w1).
  const bool ens = !weights.empty() && weights[0].dim() == 3;
  const char* shape = ens ? "(T, E, B, O)" : "(T, B, O)";
  if (!weights.empty() && (weights[0].dim() == 2 || weights[0].dim() == 3))
    TORCH_CHECK(y.dim() == (ens ? 4 : 3), op, ": y must be ", shape, ", got ", y.sym_sizes());
  TORCH_CHECK(y.dim() >= 1, op, ": y must be ", shape, ", got a 0-d tensor");
  const RolloutSizes s =
      check_rollout_args(op, x0, u, weights, biases, y.sym_size(0), delay, truncate, activation, fb);
  if (ens) {
    TORCH_CHECK(y.sym_size(1) == s.members && y.sym_size(2) == s.batch && y.sym_size(3) == s.o, op,
                ": y must be (T, E=", s.members, ", B=", s.batch, ", O=", s.o, "), got ", y.sym_sizes());
  } else {
    TORCH_CHECK(y.sym_size(1) == s.batch && y.sym_size(2) == s.o, op, ": y must be (T, B=", s.batch, ", O=", s.o,
                "), got ", y.sym_sizes());
  }
  TORCH_CHECK(grad_y.sym_sizes() == y.sym_sizes(), op, ": grad_y ", grad_y.sym_sizes(), " and y ", y.sym_sizes(),
              " must have the same shape ", shape);
  check_like_x0(op, "grad_y", grad_y, x0);
  check_like_x0(op, "y", y, x0);
  TORCH_CHECK(static_cast<int64_t>(output_mask.size()) == 2 + 2 * s.layers(), op, ": output_mask must have 2 + 2 L = ",
              2 + 2 * s.layers(), " entries (x0, u, w1..wL, b1..bL), got ", output_mask.size());
  return s;
}

// Whether a training forward keeps hidden layer l's activations for the backward
// (rollout_forward_hidden) or the backward recomputes them: the first layer of a deeper network
// (L >= 3) is recomputed when its input is narrow (in_1 = Du + m F < 64, the state and action of
// a dynamics model): its GEMM is a few percent of a step's work, while keeping it would cost as
// much memory as any other layer. A two-layer network (version 1's) keeps its one hidden layer.
constexpr int64_t kKeepMinInputs = 64;
// On a symbolic width (a dynamic-shape trace) the comparison guards on it, so that the traced
// graph's shapes are the kernel's.
inline bool keeps_layer(size_t l, size_t layers, const c10::SymInt& in) {
  return l != 0 || layers < 3 || in >= kKeepMinInputs;
}

// What a forward kept for its backward (rollout_forward_hidden): one (T, B, out_l) tensor per
// hidden layer l < L - 1 (an ensemble's (T, E, B, out_l)), in x0's dtype and on its device; an
// empty (0,) tensor for a layer that is recomputed (keeps_layer).
inline void check_hidden(const char* op, at::TensorList hidden, const RolloutSizes& s, const at::Tensor& x0,
                         const c10::SymInt& in_1) {
  TORCH_CHECK(static_cast<int64_t>(hidden.size()) == s.layers() - 1, op, ": hidden must hold one tensor per hidden layer (",
              s.layers() - 1, "), got ", hidden.size());
  for (size_t l = 0; l < hidden.size(); ++l) {
    const at::Tensor& h = hidden[l];
    check_dense(op, "hidden", h);
    if (!keeps_layer(l, s.layers(), in_1)) {
      TORCH_CHECK(h.dim() == 1 && h.sym_size(0) == 0, op, ": hidden[", l, "] must be an empty (0,) tensor (layer ",
                  l + 1, " is recomputed: its input is narrow), got ", h.sym_sizes());
    } else if (s.ensemble()) {
      TORCH_CHECK(h.dim() == 4 && h.sym_size(0) == s.steps && h.sym_size(1) == s.members &&
                      h.sym_size(2) == s.batch && h.sym_size(3) == s.widths[l],
                  op, ": hidden[", l, "] must be (T=", s.steps, ", E=", s.members, ", B=", s.batch, ", ",
                  s.widths[l], "), got ", h.sym_sizes());
    } else {
      TORCH_CHECK(h.dim() == 3 && h.sym_size(0) == s.steps && h.sym_size(1) == s.batch && h.sym_size(2) == s.widths[l],
                  op, ": hidden[", l, "] must be (T=", s.steps, ", B=", s.batch, ", ", s.widths[l], "), got ",
                  h.sym_sizes());
    }
    check_like_x0(op, "hidden", h, x0);
  }
}

inline std::string format_bytes(long double bytes) {
  std::ostringstream s;
  s.precision(3);
  if (bytes >= (1LL << 30))
    s << bytes / (1LL << 30) << " GiB";
  else
    s << bytes / (1LL << 20) << " MiB";
  return s.str();
}

// Y of shape (steps, B, O) must fit in `limit_bytes` (the device's memory; 0: only an int64 byte
// count), or the allocator fails with a message that names no argument. Checked only when the
// sizes are concrete: under tracing they may be symbolic, and the real kernel checks at run time.
inline void check_result_fits(const char* op, const RolloutSizes& s, int64_t itemsize, int64_t limit_bytes) {
  const auto steps = s.steps.maybe_as_int(), B = s.batch.maybe_as_int(), O = s.o.maybe_as_int();
  if (!steps || !B || !O) return;
  const auto E = s.ensemble() ? s.members.maybe_as_int() : std::optional<int64_t>(1);
  if (!E) return;
  const long double bytes = static_cast<long double>(*steps) * *E * *B * *O * itemsize;
  const long double limit = limit_bytes > 0 ? limit_bytes : static_cast<long double>(std::numeric_limits<int64_t>::max());
  TORCH_CHECK(bytes <= limit, op, ": steps=", *steps, " is too large: the result Y of shape (", *steps, ", ",
              s.ensemble() ? std::to_string(*E) + ", " : std::string(), *B, ", ", *O, ") needs ", format_bytes(bytes), ", more than ",
              limit_bytes > 0 ? "the device's " + format_bytes(limit) + " of memory" : std::string("an int64 byte count"),
              "; use fewer steps, or run the rollout in chunks (pass Y[-D:, ..., :F].detach() as the next call's x0)");
}

// at::empty that, when the allocator fails, says what was being allocated, for which sizes, and
// what to do, instead of the allocator's bare message (docs/spec.md §4: a rollout too large for memory
// says how much it needs). A large CPU buffer is put on huge pages before anything writes it
// (csrc/cpu/huge_pages.h).
inline at::Tensor checked_empty(const char* op, const char* what, at::IntArrayRef shape,
                                const at::TensorOptions& options, const char* remedy) {
  try {
    at::Tensor t = at::empty(shape, options);
    cpu::advise_huge_pages(t);
    return t;
  } catch (const c10::Error& e) {
    long double bytes = c10::elementSize(c10::typeMetaToScalarType(options.dtype()));
    for (const int64_t n : shape) bytes *= n;
    TORCH_CHECK(false, op, ": could not allocate ", format_bytes(bytes), " for ", what, " of shape ", shape,
                " on ", options.device(), "; ", remedy, " (allocator: ", e.msg().substr(0, e.msg().find('\n')), ")");
  } catch (const std::bad_alloc&) {
    TORCH_CHECK(false, op, ": could not allocate ", what, " of shape ", shape, "; ", remedy);
  }
}

}  // namespace fbfast
