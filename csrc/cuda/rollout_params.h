// Plain data shared by the CUDA host code (rollout_cuda.cpp) and the kernels
// (forward_kernel.cuh, backward_kernel.cuh): problem sizes, the shared-memory layout of one
// thread block, the launch plan, and the pointers of one call. No CUDA or torch header is
// needed here, so the host file, the kernels and the host emulation used by the tests
// (emulation/) all read the same layout code.
//
// Shared-memory plan of the fused path (all buffers fp32, whatever the input dtype: the inner
// loops then need no conversion, and the smem boundary does not depend on the dtype):
//   forward : ring (slots, R, O_pad) | u_stage (S, R, Du_pad) | h (R, H_pad)
//             | W1 (H_pad, ld1) | W2 (O_pad, ld2) | b1 (H_pad) | b2 (O_pad)
//   backward: ring | u_stage | x_stage (S, R, O_pad) | gy_stage (S, R, O_pad) | h | g (R, O_pad)
//             | dz (R, H_pad) | W1 | W2 | b1 | dW1 (H_pad, ld1) | db1 | dW2 (O_pad, ld2) | db2
// R = tile rows, S = steps staged per global load, slots = min(delay, steps). W1 rows hold the
// u columns at [0, Du) and the x columns at [Du_pad, Du_pad + O), so both k segments of
// z = W1 [u; x] start 16-byte aligned. Every buffer is a multiple of 4 floats and starts at one,
// and every pad is zero, so the tile GEMM runs float4 loads over padded widths without tails.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define FBFAST_HD __host__ __device__
#else
#define FBFAST_HD
#endif

namespace fbfast {
namespace cuda {

constexpr int kMaxThreads = 256;
// Tile rows are capped so that the per-block activations stay small next to the weights and a
// large batch still spreads over every SM.
constexpr int kMaxRows = 64;
// Steps of u (and, backward, of x and dL/dY) staged per coalesced global load: one global
// latency every S steps instead of one per step, the dominant cost of small serial rollouts.
constexpr int kMaxChunk = 32;
constexpr int64_t kStageBudgetFloats = 8192;
// Persistent grid: at most this many blocks per SM; blocks loop over the remaining tiles, so the
// backward's per-block gradient workspace stays O(SMs) for any batch.
constexpr int kBlocksPerSm = 2;

FBFAST_HD inline int round_up4(int n) { return (n + 3) & ~3; }

// Row stride of a weight matrix in shared memory, >= n (a multiple of 4) and == 4 (mod 32):
// when the lanes of a warp read float4s of consecutive rows (z = x W^T, one output per lane),
// each quarter-warp then covers all 32 banks once, and rows stay 16-byte aligned.
FBFAST_HD inline int weight_ld(int n) { return n + (36 - n % 32) % 32; }

struct Dims {
  int64_t steps, batch;
  int du, o, h;
  int64_t delay, truncate;  // truncate == 0: full BPTT
};

// Offsets (in floats) of the buffers of one block's dynamic shared memory; see the file comment.
struct SmemLayout {
  int rows, chunk, slots;
  int du_pad, o_pad, h_pad, ld1, ld2;
  int64_t ring, u_stage, x_stage, gy_stage, h, g, dz, w1, w2, b1, b2, dw1, db1, dw2, db2;
  int64_t total;
};

inline FBFAST_HD SmemLayout make_layout(const Dims& d, int rows, int chunk, bool backward) {
  SmemLayout L{};
  L.rows = rows;
  L.chunk = chunk;
  L.slots = static_cast<int>(d.delay < d.steps ? d.delay : d.steps);
  L.du_pad = round_up4(d.du);
  L.o_pad = round_up4(d.o);
  L.h_pad = round_up4(d.h);
  L.ld1 = weight_ld(L.du_pad + L.o_pad);
  L.ld2 = weight_ld(L.h_pad);
  const int64_t R = rows, S = chunk;
  int64_t off = 0;
  auto take = [&off](int64_t n) {
    const int64_t at = off;
    off += n;
    return at;
  };
  L.ring = take(int64_t(L.slots) * R * L.o_pad);
  L.u_stage = take(S * R * L.du_pad);
  L.x_stage = take(backward ? S * R * L.o_pad : 0);
  L.gy_stage = take(backward ? S * R * L.o_pad : 0);
  L.h = take(R * L.h_pad);
  L.g = take(backward ? R * L.o_pad : 0);
  L.dz = take(backward ? R * L.h_pad : 0);
  L.w1 = take(int64_t(L.h_pad) * L.ld1);
  L.w2 = take(int64_t(L.o_pad) * L.ld2);
  L.b1 = take(L.h_pad);
  L.b2 = take(backward ? 0 : L.o_pad);
  L.dw1 = take(backward ? int64_t(L.h_pad) * L.ld1 : 0);
  L.db1 = take(backward ? L.h_pad : 0);
  L.dw2 = take(backward ? int64_t(L.o_pad) * L.ld2 : 0);
  L.db2 = take(backward ? L.o_pad : 0);
  L.total = off;
  return L;
}

// How one call runs. fused == false: the widths do not fit in shared memory and the host takes
// the general path (per-step ATen GEMMs, general_path.cpp).
struct Plan {
  bool fused = false;
  int rows = 0;           // R, tile rows per block
  int rows_per_item = 1;  // rows one thread carries per output column (a kernel template argument)
  int threads = 0;
  int64_t tiles = 0, blocks = 0;
  SmemLayout lay{};
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The boundary between the fused and the general path is the device's opt-in shared memory per
// block (`smem_limit_bytes`, e.g. 227 KB on sm_90, 163 KB on sm_80): the fused kernels need the
// fp32 weights (forward ~ 4 (H (Du+O) + O H) bytes; backward twice that, for the fp32 gradient
// accumulators) plus one tile row of activations to fit, and they keep every weight on chip
// for the whole rollout. Beyond that a block would have to stream weights from L2 at every
// step, which per-step cuBLAS GEMMs over the full batch do better.
inline Plan plan_rollout(const Dims& d, bool backward, int num_sms, int64_t smem_limit_bytes) {
  Plan plan;
  const int64_t limit = smem_limit_bytes / int64_t(sizeof(float));
  auto fits = [&](int rows, int chunk) { return make_layout(d, rows, chunk, backward).total <= limit; };

  // About one tile per SM: the time loop is serial, so parallelism comes from the batch only.
  int64_t rows = ceil_div(d.batch, num_sms > 0 ? num_sms : 1);
  rows = rows < 1 ? 1 : rows > kMaxRows ? kMaxRows : rows;
  if (rows >= 4) rows = round_up4(static_cast<int>(rows));
  // Halve until one chunk of one step fits; tiles of 4 or more rows stay multiples of 4.
  while (!fits(static_cast<int>(rows), 1)) {
    if (rows == 1) return plan;
    rows = rows > 4 ? (rows / 2) & ~int64_t(3) : rows / 2;
  }

  const int64_t stage_per_step = rows * (backward ? round_up4(d.du) + 2 * round_up4(d.o) : round_up4(d.du));
  int64_t chunk = 1;
  if (stage_per_step > 0) {
    chunk = d.steps < kMaxChunk ? d.steps : kMaxChunk;
    const int64_t by_budget = kStageBudgetFloats / stage_per_step;
    if (chunk > by_budget) chunk = by_budget;
    if (chunk < 1) chunk = 1;
    while (chunk > 1 && !fits(static_cast<int>(rows), static_cast<int>(chunk))) chunk /= 2;
  }

  plan.fused = true;
  plan.rows = static_cast<int>(rows);
  plan.rows_per_item = rows % 4 == 0 ? 4 : 1;
  plan.lay = make_layout(d, plan.rows, static_cast<int>(chunk), backward);
  // Enough threads for one output per thread in the widest GEMM of a step (and, backward, a
  // few weight-gradient elements each), in whole warps.
  const int64_t groups = rows / plan.rows_per_item;
  const int64_t k1 = int64_t(d.du) + d.o;
  int64_t widest = d.h > d.o ? d.h : d.o;
  if (backward && k1 > widest) widest = k1;
  int64_t work = groups * widest;
  if (backward) {
    const int64_t dw = (int64_t(d.o) * d.h + int64_t(d.h) * k1) / 8;
    if (dw > work) work = dw;
  }
  work = (work + 31) / 32 * 32;
  plan.threads = static_cast<int>(work < 32 ? 32 : work > kMaxThreads ? kMaxThreads : work);
  plan.tiles = ceil_div(d.batch, rows);
  const int64_t resident = int64_t(num_sms > 0 ? num_sms : 1) * kBlocksPerSm;
  plan.blocks = plan.tiles < resident ? plan.tiles : resident;
  return plan;
}

// One forward call. Pointers are to scalar_t (float, c10::Half or c10::BFloat16) data, all
// contiguous: x0 (delay, B, O), u (T, B, Du) or null, w1 (H, Du + O), b1 (H) or null,
// w2 (O, H), b2 (O) or null, y (T, B, O) written.
struct ForwardParams {
  Dims dims;
  SmemLayout lay;
  int rows_per_item, threads;
  int64_t tiles, blocks;
  const void* x0;
  const void* u;
  const void* w1;
  const void* b1;
  const void* w2;
  const void* b2;
  void* y;
};

// One backward call. Inputs as in ForwardParams plus grad_y and the forward's y (T, B, O).
// A gradient pointer is null when it is not wanted. grad_x0 must be zero-filled by the caller
// (slots t >= steps are never written); grad_u is written in full. workspace: null when one
// block runs (it then writes the weight gradients itself), else (blocks, grad_elems) fp32
// partial sums that reduce_gradients_kernel adds in block order.
struct BackwardParams {
  Dims dims;
  SmemLayout lay;
  int rows_per_item, threads;
  int64_t tiles, blocks;
  const void* grad_y;
  const void* y;
  const void* x0;
  const void* u;
  const void* w1;
  const void* b1;
  const void* w2;
  void* grad_x0;
  void* grad_u;
  void* grad_w1;
  void* grad_b1;
  void* grad_w2;
  void* grad_b2;
  float* workspace;
};

// Layout of one block's weight-gradient partials in the workspace (and of the reduction):
// dW1 (H, Du + O) | db1 (H) | dW2 (O, H) | db2 (O), compact and row-major like the outputs.
struct GradOffsets {
  int64_t w1, b1, w2, b2, total;
};

inline FBFAST_HD GradOffsets grad_offsets(const Dims& d) {
  GradOffsets g{};
  g.w1 = 0;
  g.b1 = int64_t(d.h) * (d.du + d.o);
  g.w2 = g.b1 + d.h;
  g.b2 = g.w2 + int64_t(d.o) * d.h;
  g.total = g.b2 + d.o;
  return g;
}

}  // namespace cuda
}  // namespace fbfast
