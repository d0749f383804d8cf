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

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/core/SymInt.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <limits>
#include <new>
#include <optional>
#include <sstream>
#include <string>
#include <utility>

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

// The shapes of a rollout, once its arguments are checked.
struct RolloutSizes {
  c10::SymInt steps, batch, du, o, h;
};

inline RolloutSizes check_rollout_args(const char* op, const at::Tensor& x0, const std::optional<at::Tensor>& u,
                                       const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                                       const at::Tensor& w2, const std::optional<at::Tensor>& b2,
                                       const c10::SymInt& steps, int64_t delay, int64_t truncate) {
  const std::pair<const char*, const at::Tensor*> named[] = {
      {"x0", &x0}, {"w1", &w1}, {"w2", &w2}, {"u", u ? &*u : nullptr}, {"b1", b1 ? &*b1 : nullptr},
      {"b2", b2 ? &*b2 : nullptr}};
  for (const auto& [name, t] : named)
    if (t) check_dense(op, name, *t);
  TORCH_CHECK(delay >= 1, op, ": delay must be >= 1, got ", delay);
  TORCH_CHECK(truncate >= 0, op, ": truncate must be >= 0 (0 = full BPTT), got ", truncate);
  TORCH_CHECK(steps >= 0, op, ": steps must be >= 0, got ", steps);
  TORCH_CHECK(x0.dim() == 3 && x0.sym_size(0) == delay, op, ": x0 must be (delay=", delay, ", B, O), got ",
              x0.sym_sizes());
  TORCH_CHECK(w2.dim() == 2, op, ": w2 must be (O, H), got ", w2.sym_sizes());
  const c10::SymInt O = w2.sym_size(0), H = w2.sym_size(1), B = x0.sym_size(1);
  TORCH_CHECK(x0.sym_size(2) == O, op, ": x0 has ", x0.sym_size(2), " features, w2 outputs O = ", O);
  // The rank of u is checked before its last axis is read.
  if (u.has_value())
    TORCH_CHECK(u->dim() == 3 && u->sym_size(0) == steps && u->sym_size(1) == B, op, ": u must be (steps=", steps,
                ", B=", B, ", Du), got ", u->sym_sizes());
  const c10::SymInt du = u.has_value() ? u->sym_size(2) : c10::SymInt(0);
  TORCH_CHECK(w1.dim() == 2 && w1.sym_size(0) == H && w1.sym_size(1) == du + O, op, ": w1 must be (H, Du + O) = (",
              H, ", ", du + O, "), got ", w1.sym_sizes());
  TORCH_CHECK(!b1.has_value() || (b1->dim() == 1 && b1->sym_size(0) == H), op, ": b1 must be (", H, ",), got ",
              b1.has_value() ? b1->sym_sizes() : c10::SymIntArrayRef());
  TORCH_CHECK(!b2.has_value() || (b2->dim() == 1 && b2->sym_size(0) == O), op, ": b2 must be (", O, ",), got ",
              b2.has_value() ? b2->sym_sizes() : c10::SymIntArrayRef());
  for (const auto& [name, t] : named)
    if (t) check_like_x0(op, name, *t, x0);
  return RolloutSizes{steps, B, du, O, H};
}

// The backward's arguments: the forward's (steps is y's leading axis), and grad_y and y, which
// must both be (T, B, O) in x0's dtype and on x0's device.
inline RolloutSizes check_backward_args(const char* op, const at::Tensor& grad_y, const at::Tensor& y,
                                        const at::Tensor& x0, const std::optional<at::Tensor>& u,
                                        const at::Tensor& w1, const std::optional<at::Tensor>& b1,
                                        const at::Tensor& w2, int64_t delay, int64_t truncate) {
  check_dense(op, "grad_y", grad_y);
  check_dense(op, "y", y);
  TORCH_CHECK(y.dim() == 3, op, ": y must be (T, B, O), got ", y.sym_sizes());
  const RolloutSizes s = check_rollout_args(op, x0, u, w1, b1, w2, std::nullopt, y.sym_size(0), delay, truncate);
  TORCH_CHECK(y.sym_size(1) == s.batch && y.sym_size(2) == s.o, op, ": y must be (T, B=", s.batch, ", O=", s.o,
              "), got ", y.sym_sizes());
  TORCH_CHECK(grad_y.sym_sizes() == y.sym_sizes(), op, ": grad_y ", grad_y.sym_sizes(), " and y ", y.sym_sizes(),
              " must have the same shape (T, B, O)");
  check_like_x0(op, "grad_y", grad_y, x0);
  check_like_x0(op, "y", y, x0);
  return s;
}

// The hidden activations a forward kept for its backward: (T, B, H) in x0's dtype and device.
inline void check_hidden(const char* op, const at::Tensor& hidden, const RolloutSizes& s, const at::Tensor& x0) {
  check_dense(op, "hidden", hidden);
  TORCH_CHECK(hidden.dim() == 3 && hidden.sym_size(0) == s.steps && hidden.sym_size(1) == s.batch &&
                  hidden.sym_size(2) == s.h,
              op, ": hidden must be (T=", s.steps, ", B=", s.batch, ", H=", s.h, "), got ", hidden.sym_sizes());
  check_like_x0(op, "hidden", hidden, x0);
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
  const long double bytes = static_cast<long double>(*steps) * *B * *O * itemsize;
  const long double limit = limit_bytes > 0 ? limit_bytes : static_cast<long double>(std::numeric_limits<int64_t>::max());
  TORCH_CHECK(bytes <= limit, op, ": steps=", *steps, " is too large: the result Y of shape (", *steps, ", ", *B,
              ", ", *O, ") needs ", format_bytes(bytes), ", more than ",
              limit_bytes > 0 ? "the device's " + format_bytes(limit) + " of memory" : std::string("an int64 byte count"),
              "; use fewer steps, or run the rollout in chunks (pass Y[-delay:].detach() as the next call's x0)");
}

// at::empty that, when the allocator fails, says what was being allocated, for which sizes, and
// what to do, instead of the allocator's bare message (docs/spec.md §4: a rollout too large for memory
// says how much it needs).
inline at::Tensor checked_empty(const char* op, const char* what, at::IntArrayRef shape,
                                const at::TensorOptions& options, const char* remedy) {
  try {
    return at::empty(shape, options);
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
