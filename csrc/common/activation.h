// The nine activations of the network (docs/spec.md §1.1): their names, their one parameter,
// and scalar forms of each value and derivative, written once for every kernel that applies
// them element by element in fp32 or fp64 (the CUDA kernels in csrc/cuda/ and their host
// emulation in csrc/cuda/emulation/). The CPU BLAS path and the CUDA general path call ATen's
// own activation kernels instead (csrc/gemm_path.cpp), and the CPU tile kernels a vectorised
// transcription of these formulas (csrc/cpu/vec_math.h), because their translation units may
// include no library header.
//
// Every formula is the one ATen's elementwise CUDA kernels use (aten/src/ATen/native/cuda/
// Activation*.cu in PyTorch), including which side of a kink z == 0 falls on and how NaN and
// infinities pass, so that the CUDA kernels match the reference run on CUDA
// (fbfast/reference.py). ATen's vectorised CPU kernels differ at NaN in one place, ELU's
// gradient, which csrc/cpu/vec_math.h follows instead.
//
// No torch or CUDA header: this is read by host code, device code and the emulator alike.
#pragma once

#include <math.h>

#include "act_kind.h"

namespace fbfast {

// Per-type math, so that float code calls the float functions on the device.
FBFAST_ACT_HD float act_exp(float x) { return expf(x); }
FBFAST_ACT_HD double act_exp(double x) { return exp(x); }
FBFAST_ACT_HD float act_expm1(float x) { return expm1f(x); }
FBFAST_ACT_HD double act_expm1(double x) { return expm1(x); }
FBFAST_ACT_HD float act_tanh(float x) { return tanhf(x); }
FBFAST_ACT_HD double act_tanh(double x) { return tanh(x); }
FBFAST_ACT_HD float act_erf(float x) { return erff(x); }
FBFAST_ACT_HD double act_erf(double x) { return erf(x); }
FBFAST_ACT_HD float act_log1p(float x) { return log1pf(x); }
FBFAST_ACT_HD double act_log1p(double x) { return log1p(x); }

// sqrt(2 / pi) and 0.044715 of the tanh approximation of GELU; 1/sqrt(2) and 1/sqrt(2 pi) of
// the exact one.
constexpr double kGeluTanhBeta = 0.7978845608028654;
constexpr double kGeluTanhKappa = 0.044715;
constexpr double kSqrtHalf = 0.7071067811865476;
constexpr double kInvSqrt2Pi = 0.3989422804014327;

// h = act(z).
template <typename T>
FBFAST_ACT_HD T act_forward(Act a, T param, T z) {
  switch (a) {
    case Act::kRelu:
      return z <= T(0) ? T(0) : z;  // keeps NaN, as torch.relu
    case Act::kLeakyRelu:
      return z > T(0) ? z : z * param;
    case Act::kElu:
      return z > T(0) ? z : param * act_expm1(z);
    case Act::kTanh:
      return act_tanh(z);
    case Act::kSigmoid:
      return T(1) / (T(1) + act_exp(-z));
    case Act::kSilu:
      return z / (T(1) + act_exp(-z));
    case Act::kGelu:
      return z * T(0.5) * (T(1) + act_erf(z * T(kSqrtHalf)));
    case Act::kGeluTanh:
      return T(0.5) * z * (T(1) + act_tanh(T(kGeluTanhBeta) * (z + T(kGeluTanhKappa) * z * z * z)));
    case Act::kMish:
      return z * act_tanh(act_log1p(act_exp(z)));
  }
  return z;
}

// dL/dz given dL/dh = g, the pre-activation z and the output h = act(z) (only the one that
// act_needs_z says is read).
template <typename T>
FBFAST_ACT_HD T act_backward(Act a, T param, T g, T z, T h) {
  switch (a) {
    case Act::kRelu:
      return h <= T(0) ? T(0) : g;  // torch's threshold_backward: a NaN h passes its gradient
    case Act::kLeakyRelu:
      return z > T(0) ? g : g * param;
    case Act::kElu:
      return z <= T(0) ? g * param * act_exp(z) : g;
    case Act::kTanh:
      return g * (T(1) - h * h);
    case Act::kSigmoid:
      return g * (T(1) - h) * h;
    case Act::kSilu: {
      const T s = T(1) / (T(1) + act_exp(-z));
      return g * s * (T(1) + z * (T(1) - s));
    }
    case Act::kGelu: {
      const T cdf = T(0.5) * (T(1) + act_erf(z * T(kSqrtHalf)));
      const T pdf = act_exp(T(-0.5) * z * z) * T(kInvSqrt2Pi);
      return g * (cdf + z * pdf);
    }
    case Act::kGeluTanh: {
      const T inner = T(kGeluTanhBeta) * (z + T(kGeluTanhKappa) * z * z * z);
      const T t = act_tanh(inner);
      const T left = T(0.5) * z, right = T(1) + t;
      const T d_right = left * (T(1) - t * t) * T(kGeluTanhBeta) * (T(1) + T(3 * kGeluTanhKappa) * z * z);
      return g * (T(0.5) * right + d_right);
    }
    case Act::kMish: {
      const T s = T(1) / (T(1) + act_exp(-z));
      const T tsp = act_tanh(act_log1p(act_exp(z)));
      return g * (tsp + z * s * (T(1) - tsp * tsp));
    }
  }
  return g;
}

}  // namespace fbfast
