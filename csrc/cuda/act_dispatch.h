// The activation as a template argument of the fused kernels: the one place where the runtime
// value (parsed once per call, parse_activation in csrc/rollout_checks.h) selects an
// instantiation, so that the kernels' epilogues apply act_forward / act_backward with a
// compile-time activation instead of a switch per element. Used by the launch files and the
// host emulation alike; no CUDA or torch header.
#pragma once

#include <type_traits>

#include "../common/act_kind.h"

namespace fbfast {
namespace cuda {

// fn(std::integral_constant<Act, act>{}), whose ::value is usable as a template argument.
template <typename Fn>
decltype(auto) dispatch_act(Act act, Fn&& fn) {
  switch (act) {
    case Act::kLeakyRelu: return fn(std::integral_constant<Act, Act::kLeakyRelu>{});
    case Act::kElu: return fn(std::integral_constant<Act, Act::kElu>{});
    case Act::kTanh: return fn(std::integral_constant<Act, Act::kTanh>{});
    case Act::kSigmoid: return fn(std::integral_constant<Act, Act::kSigmoid>{});
    case Act::kSilu: return fn(std::integral_constant<Act, Act::kSilu>{});
    case Act::kGelu: return fn(std::integral_constant<Act, Act::kGelu>{});
    case Act::kGeluTanh: return fn(std::integral_constant<Act, Act::kGeluTanh>{});
    case Act::kMish: return fn(std::integral_constant<Act, Act::kMish>{});
    case Act::kRelu: break;
  }
  return fn(std::integral_constant<Act, Act::kRelu>{});
}

}  // namespace cuda
}  // namespace fbfast
