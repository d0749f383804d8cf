// The activations' identities, without any math: the enum the schema's `activation` string
// maps to, the names, and which derivatives need the pre-activation. Split from activation.h
// because the CPU tile kernels (csrc/cpu/tile_kernels.h) may include no library header, not
// even <math.h>, and still need these.
#pragma once

#if defined(__CUDACC__)
#define FBFAST_ACT_HD __host__ __device__ __forceinline__
#else
#define FBFAST_ACT_HD inline
#endif

namespace fbfast {

// The schema's `activation` string maps to this enum once per call (parse_activation in
// csrc/rollout_checks.h); kernels switch on it outside their inner loops.
enum class Act : int {
  kRelu = 0,
  kLeakyRelu = 1,  // param: negative_slope
  kElu = 2,        // param: alpha
  kTanh = 3,
  kSigmoid = 4,
  kSilu = 5,
  kGelu = 6,  // exact, with erf
  kGeluTanh = 7,
  kMish = 8,
};
constexpr int kNumActs = 9;

// Names as the schema and the Python API spell them, indexed by Act.
constexpr const char* kActNames[kNumActs] = {"relu", "leaky_relu", "elu",       "tanh", "sigmoid",
                                             "silu", "gelu",       "gelu_tanh", "mish"};

// Whether the derivative needs the pre-activation z. ReLU, tanh and sigmoid take theirs from
// the output h = act(z) (as torch's threshold/tanh/sigmoid backward do), so a backward can keep
// h alone; the others need z, and a kernel that keeps only h must not run them.
FBFAST_ACT_HD constexpr bool act_needs_z(Act a) {
  return !(a == Act::kRelu || a == Act::kTanh || a == Act::kSigmoid);
}

}  // namespace fbfast
