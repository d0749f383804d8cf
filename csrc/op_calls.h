// Calls of the fbfast operators from C++ through the dispatcher's typed handles: every key the
// tensors carry runs (autograd, inference mode, a batching rule), as for a torch.ops call, but
// without boxing the arguments by the schema. Defined in csrc/autograd.cpp.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/SymInt.h>

#include <optional>

#include "rollout_checks.h"

namespace fbfast {

at::Tensor call_forward(const at::Tensor& x0, const std::optional<at::Tensor>& u, at::TensorList w, const BiasList& b,
                        const c10::SymInt& steps, int64_t delay, int64_t truncate, c10::string_view act, double p,
                        at::IntArrayRef lags, int64_t feedback, bool residual);

}  // namespace fbfast
