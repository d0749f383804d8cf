// Plain data shared by the CUDA host code (rollout_cuda.cpp), the kernels (forward_kernel.cuh,
// backward_kernel.cuh) and their host emulation (emulation/): problem sizes, the shared-memory
// layout of one thread block, the launch plan, and the parameters of one call with the one
// function that fills them. No CUDA or torch header is needed here, so all three read the same
// layout code.
//
// The network is data (csrc/fbfast.cpp): L <= kMaxLayers layers, layer l mapping in_l inputs to
// out_l outputs, in_0 = Du + O (the step's [u_t ; x_t]), in_{l+1} = out_l, out_{L-1} = O.
//
// Shared-memory plan of the fused path (all buffers fp32, whatever the input dtype: the inner
// loops then need no conversion, and the smem boundary does not depend on the dtype):
//   forward : ring (slots, R, O_pad) | u_stage (S, R, Du_pad) | act[0..1] (R, A_pad)
//             | per layer l: W_l (out_pad_l, ld_l) | b_l (out_pad_l)
//   backward: ring | u_stage | x_stage (S, R, O_pad) | gy_stage (S, R, O_pad) | act[0..1]
//             | per hidden layer l < L-1: hidden_l (R, out_pad_l) | pre_l (R, out_pad_l)
//             | per layer l: W_l | b_l (l < L-1) | dW_l (out_pad_l, ld_l) | db_l (out_pad_l)
// R = tile rows, S = steps staged per global load. The forward's act[] holds the hidden layers'
// outputs act(z_l), layer l writing act[l % 2] while it reads act[(l - 1) % 2]; the backward's
// holds the adjoints dL/dz_l the same way, walking down the layers. hidden_l = act(z_l) is what
// layer l + 1 reads and its weight gradient needs; pre_l = z_l is kept only for the activations
// whose derivative reads z (act_needs_z, csrc/common/act_kind.h).
//
// W_0 rows hold the u columns at [0, Du) and the x columns at [Du_pad, Du_pad + O), so both k
// segments of z_0 = W_0 [u ; x] start 16-byte aligned. Every buffer is a multiple of 4 floats
// and starts at one, and every pad is zero (the kernels clear the pad columns of act[], which
// layers of different widths share), so the tile GEMM runs float4 loads over padded widths
// without tails.
#pragma once

#include <cstdint>

#include "../common/act_kind.h"

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
// Layers the fused kernels hold (fixed-size arrays in the kernel parameters). Deeper networks
// take the general path (csrc/gemm_path.h); at such depths the weights of all layers rarely fit
// in one block's shared memory anyway.
constexpr int kMaxLayers = 8;

FBFAST_HD inline int round_up4(int n) { return (n + 3) & ~3; }

// Row stride of a weight matrix in shared memory, >= n (a multiple of 4) and == 4 (mod 32):
// when the lanes of a warp read float4s of consecutive rows (z = x W^T, one output per lane),
// each quarter-warp then covers all 32 banks once, and rows stay 16-byte aligned.
FBFAST_HD inline int weight_ld(int n) { return n + (36 - n % 32) % 32; }

// The element type of every tensor of one call. The kernels convert at global loads and stores
// only (a branch on a value uniform over the grid), so one instantiation serves all three.
enum class Dtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct Dims {
  int64_t steps, batch;
  int du, o;
  int layers;
  int width[kMaxLayers];    // out_l; width[layers - 1] == o
  int64_t delay, truncate;  // truncate == 0: full BPTT

  FBFAST_HD int in(int l) const { return l == 0 ? du + o : width[l - 1]; }
};

// Dims of a network of `layers` <= kMaxLayers layers whose output widths are widths[0 .. layers).
inline Dims make_dims(int64_t steps, int64_t batch, int du, int layers, const int* widths, int64_t delay,
                      int64_t truncate) {
  Dims d{};
  d.steps = steps;
  d.batch = batch;
  d.du = du;
  d.layers = layers;
  for (int l = 0; l < layers; ++l) d.width[l] = widths[l];
  d.o = widths[layers - 1];
  d.delay = delay;
  d.truncate = truncate;
  return d;
}

// Offsets (in floats) and padded widths of one layer's buffers; see the file comment.
struct LayerLayout {
  int in_pad, out_pad, ld;  // ld: row stride of W_l and dW_l, weight_ld(in_pad)
  int64_t w, b, dw, db, hidden, pre;
};

// Offsets (in floats) of the buffers of one block's dynamic shared memory; see the file comment.
struct SmemLayout {
  int rows, chunk;
  int64_t slots;  // ring slots: min(delay, steps), one more in a one-layer forward (see make_layout)
  int du_pad, o_pad, act_pad;
  int64_t ring, u_stage, x_stage, gy_stage, act[2];
  LayerLayout layer[kMaxLayers];
  int64_t total;
};

inline FBFAST_HD SmemLayout make_layout(const Dims& d, Act act, int rows, int chunk, bool backward) {
  SmemLayout s{};
  s.rows = rows;
  s.chunk = chunk;
  const int L = d.layers;
  // Step t reads x_t from slot t % slots and its output y_t becomes x_{t+k}, slot (t + k) % slots.
  // With slots = k these are one slot, which is free once the first layer has read x_t; but a
  // one-layer forward reads x_t and writes y_t in the same GEMM, so it gets a slot more. The
  // backward's ring holds adjoints, read into act[] before the slot is rewritten.
  const int64_t fed = d.delay < d.steps ? d.delay : d.steps;
  s.slots = !backward && L == 1 && d.delay < d.steps ? fed + 1 : fed;
  s.du_pad = round_up4(d.du);
  s.o_pad = round_up4(d.o);
  s.act_pad = 0;
  for (int l = 0; l < L; ++l) {
    LayerLayout& lay = s.layer[l];
    lay.in_pad = l == 0 ? s.du_pad + s.o_pad : round_up4(d.width[l - 1]);
    lay.out_pad = round_up4(d.width[l]);
    lay.ld = weight_ld(lay.in_pad);
    // Forward: the hidden layers' outputs; backward: the adjoints of every layer's z.
    if ((backward || l < L - 1) && lay.out_pad > s.act_pad) s.act_pad = lay.out_pad;
  }
  const int act_buffers = backward ? (L < 2 ? L : 2) : (L - 1 < 2 ? L - 1 : 2);
  const int64_t R = rows, S = chunk;
  int64_t off = 0;
  auto take = [&off](int64_t n) {
    const int64_t at = off;
    off += n;
    return at;
  };
  s.ring = take(s.slots * R * s.o_pad);
  s.u_stage = take(S * R * s.du_pad);
  s.x_stage = take(backward ? S * R * s.o_pad : 0);
  s.gy_stage = take(backward ? S * R * s.o_pad : 0);
  for (int i = 0; i < 2; ++i) s.act[i] = take(i < act_buffers ? R * s.act_pad : 0);
  const bool keep_pre = backward && act_needs_z(act);
  for (int l = 0; l < L; ++l) {
    LayerLayout& lay = s.layer[l];
    const bool hidden = l < L - 1;
    lay.hidden = take(backward && hidden ? R * lay.out_pad : 0);
    lay.pre = take(keep_pre && hidden ? R * lay.out_pad : 0);
    lay.w = take(int64_t(lay.out_pad) * lay.ld);
    // The backward never recomputes the last layer's z (it reads y_t from Y), so needs no b_{L-1}.
    lay.b = take(!backward || hidden ? lay.out_pad : 0);
    lay.dw = take(backward ? int64_t(lay.out_pad) * lay.ld : 0);
    lay.db = take(backward ? lay.out_pad : 0);
  }
  s.total = off;
  return s;
}

// How one call runs. fused == false: the network does not fit in shared memory and the host
// takes the general path (per-step ATen GEMMs, csrc/gemm_path.h).
struct Plan {
  bool fused = false;
  Act act = Act::kRelu;   // the activation the layout is for (the backward keeps z for act_needs_z)
  int rows = 0;           // R, tile rows per block
  int rows_per_item = 1;  // rows one thread carries per output column (a kernel template argument)
  int threads = 0;
  int64_t tiles = 0, blocks = 0;
  SmemLayout lay{};
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The boundary between the fused and the general path is the device's opt-in shared memory per
// block (`smem_limit_bytes`, e.g. 227 KB on sm_90, 163 KB on sm_80): the fused kernels need the
// fp32 weights of every layer (forward ~ 4 sum_l out_l in_l bytes; backward twice that, for the
// fp32 gradient accumulators) plus one tile row of activations to fit, and they keep every
// weight on chip for the whole rollout. Beyond that a block would have to stream weights from
// L2 at every step, which per-step cuBLAS GEMMs over the full batch do better.
inline Plan plan_rollout(const Dims& d, bool backward, Act act, int num_sms, int64_t smem_limit_bytes) {
  Plan plan;
  const int64_t limit = smem_limit_bytes / int64_t(sizeof(float));
  auto fits = [&](int rows, int chunk) { return make_layout(d, act, rows, chunk, backward).total <= limit; };

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
  plan.act = act;
  plan.rows = static_cast<int>(rows);
  plan.rows_per_item = rows % 4 == 0 ? 4 : 1;
  plan.lay = make_layout(d, act, plan.rows, static_cast<int>(chunk), backward);
  // Enough threads for one output per thread in the widest GEMM of a step (backward: the
  // products through W_l have in_l outputs), and, backward, a few weight-gradient elements
  // each, in whole warps.
  int64_t widest = 0, weights = 0;
  for (int l = 0; l < d.layers; ++l) {
    if (d.width[l] > widest) widest = d.width[l];
    if (backward && d.in(l) > widest) widest = d.in(l);
    weights += int64_t(d.width[l]) * d.in(l);
  }
  int64_t work = rows / plan.rows_per_item * widest;
  if (backward && weights / 8 > work) work = weights / 8;
  work = (work + 31) / 32 * 32;
  plan.threads = static_cast<int>(work < 32 ? 32 : work > kMaxThreads ? kMaxThreads : work);
  plan.tiles = ceil_div(d.batch, rows);
  const int64_t resident = int64_t(num_sms > 0 ? num_sms : 1) * kBlocksPerSm;
  plan.blocks = plan.tiles < resident ? plan.tiles : resident;
  return plan;
}

// One forward call, and the inputs of a backward. Pointers are to data of `dtype`, contiguous:
// x0 (min(delay, steps), B, O), u (T, B, Du) or null, w[l] (out_l, in_l), b[l] (out_l) or null,
// y (T, B, O): written by the forward, read by the backward.
struct RolloutParams {
  Dims dims;
  SmemLayout lay;
  int rows_per_item, threads;
  int64_t tiles, blocks;
  Dtype dtype;
  Act act;
  float act_param;  // leaky_relu's slope, elu's alpha (the kernels compute in fp32)
  const void* x0;
  const void* u;
  const void* w[kMaxLayers];
  const void* b[kMaxLayers];
  void* y;
};

// One backward call: the forward's inputs and y, plus grad_y (T, B, O). A gradient pointer is
// null when it is not wanted. grad_x0 must be zero-filled by the caller (slots t >= steps are
// never written); grad_u is written in full. workspace: null when one block runs (it then
// writes the weight gradients itself), else (blocks, grad_elements(dims)) fp32 partial sums that
// reduce_gradients_kernel adds in block order.
struct BackwardParams : RolloutParams {
  const void* grad_y;
  void* grad_x0;
  void* grad_u;
  void* grad_w[kMaxLayers];
  void* grad_b[kMaxLayers];
  float* workspace;
};

// The one place where a call's parameters are filled, for the host code and the emulator alike.
// w and b hold d.layers pointers each. The activation is the plan's, whose layout it decides.
inline void set_rollout_params(RolloutParams& p, const Dims& d, const Plan& plan, Dtype dtype, float act_param,
                               const void* x0, const void* u, const void* const* w, const void* const* b, void* y) {
  p.dims = d;
  p.lay = plan.lay;
  p.rows_per_item = plan.rows_per_item;
  p.threads = plan.threads;
  p.tiles = plan.tiles;
  p.blocks = plan.blocks;
  p.dtype = dtype;
  p.act = plan.act;
  p.act_param = act_param;
  p.x0 = x0;
  p.u = u;
  for (int l = 0; l < kMaxLayers; ++l) {
    p.w[l] = l < d.layers ? w[l] : nullptr;
    p.b[l] = l < d.layers ? b[l] : nullptr;
  }
  p.y = y;
}

// grad_w and grad_b hold d.layers pointers each (null: not wanted).
inline void set_backward_params(BackwardParams& p, const Dims& d, const Plan& plan, Dtype dtype, float act_param,
                                const void* x0, const void* u, const void* const* w, const void* const* b, void* y,
                                const void* grad_y, void* grad_x0, void* grad_u, void* const* grad_w,
                                void* const* grad_b, float* workspace) {
  set_rollout_params(p, d, plan, dtype, act_param, x0, u, w, b, y);
  p.grad_y = grad_y;
  p.grad_x0 = grad_x0;
  p.grad_u = grad_u;
  for (int l = 0; l < kMaxLayers; ++l) {
    p.grad_w[l] = l < d.layers ? grad_w[l] : nullptr;
    p.grad_b[l] = l < d.layers ? grad_b[l] : nullptr;
  }
  p.workspace = workspace;
}

// Layout of one block's weight-gradient partials in the workspace (and of the reduction):
// dW_0 (out_0, in_0) | db_0 (out_0) | dW_1 | db_1 | ..., compact and row-major like the outputs.
// The kernels walk it layer by layer with a running offset; this is its length.
inline FBFAST_HD int64_t grad_elements(const Dims& d) {
  int64_t total = 0;
  for (int l = 0; l < d.layers; ++l) total += int64_t(d.width[l]) * (d.in(l) + 1);
  return total;
}

}  // namespace cuda
}  // namespace fbfast
