// Plain data shared by the CUDA host code (rollout_cuda.cpp), the kernels (forward_kernel.cuh,
// backward_kernel.cuh) and their host emulation (emulation/): problem sizes, the shared-memory
// layout of one thread block, the launch plan, and the parameters of one call with the one
// function that fills them. No CUDA or torch header is needed here, so all three read the same
// layout code.
//
// The network is data (csrc/fbfast.cpp): L <= kMaxLayers layers, layer l mapping in_l inputs to
// out_l outputs, in_0 = Du + m F (the step's [u_t ; x_t], x_t the F fed-back outputs of each of
// the m lags, docs/spec.md §1.2), in_{l+1} = out_l, out_{L-1} = O. An ensemble (§1.3) is E such
// networks of the same sizes, one per grid row (blockIdx.y), each reading its own weights.
//
// Two kinds of feedback, decided by Dims::plain():
//  * version 1's (one lag k, every output fed back, no residual): the ring holds the tile's last
//    min(k, T) outputs O wide, and x_t is read from it in place, exactly as version 1 did;
//  * every other structure (several lags, F < O, residual): the ring holds D = max(d_j) fed-back
//    values F wide, the value of step s (x0's row s + D for s < 0) at slot (s + D) % D, and each
//    step gathers its m lags into x_t (forward: x_buf; backward: x_stage). The backward's ring
//    holds their adjoints the same way, so the adjoints of x0's rows are in slots 0 .. D-1 once
//    step 0 is done, and no gradient is accumulated in global memory.
//
// Shared-memory plan of the fused path (all buffers fp32, whatever the input dtype: the inner
// loops then need no conversion, and the smem boundary does not depend on the dtype):
//   forward : ring (slots, R, ring_pad) | u_stage (S, R, Du_pad) | x_buf (R, X_pad), other
//             structures only | act[0..1] (R, A_pad) | per layer l: W_l (out_pad_l, ld_l) | b_l
//   backward: ring | u_stage | x_stage (S, R, X_pad) | gy_stage (S, R, O_pad) | act[0..1]
//             | per hidden layer l < L-1: hidden_l (R, out_pad_l) | pre_l (R, out_pad_l)
//             | per layer l: W_l | b_l (l < L-1) | dW_l (out_pad_l, ld_l) | db_l (out_pad_l)
// R = tile rows, S = steps staged per global load, X_pad = round_up4(m F) (O_pad for version 1's
// feedback), ring_pad = O_pad (version 1) or F_pad. The forward's act[] holds the hidden layers'
// outputs act(z_l), layer l writing act[l % 2] while it reads act[(l - 1) % 2]; the backward's
// holds the adjoints dL/dz_l the same way, walking down the layers. hidden_l = act(z_l) is what
// layer l + 1 reads and its weight gradient needs; pre_l = z_l is kept only for the activations
// whose derivative reads z (act_needs_z, csrc/common/act_kind.h).
//
// Tensor cores (SmemLayout::tensor_cores): where Du, m F and every layer's width are multiples of
// 16 and both directions' tiles are too (tensor_cores_fit), every product of a step runs on
// 16 x 16 x 8 TF32 tensor-core tiles, each fp32 operand split into a TF32 high part and a TF32
// remainder and three products summed (hi lo + lo hi + hi hi), which keeps about fp32's accuracy.
// The widths are then their own pads, every buffer's size is a multiple of 8 floats (so every
// buffer starts 32-byte aligned, as the tensor-core loads need), and one more buffer holds a
// 16 x 16 result tile per warp (tc_scratch) on its way to the GEMM's epilogue.
//
// W_0 rows hold the u columns at [0, Du) and the x columns at [Du_pad, Du_pad + m F), so both k
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
// The tensor-core tile (16 x 16 outputs, 8 deep) and the per-warp result tile it needs.
constexpr int kTcTile = 16;
constexpr int64_t kTcScratchFloats = int64_t(kMaxThreads / 32) * kTcTile * kTcTile;
// Persistent grid: at most this many blocks per SM; blocks loop over the remaining tiles, so the
// backward's per-block gradient workspace stays O(SMs) for any batch.
constexpr int kBlocksPerSm = 2;
// Layers the fused kernels hold (fixed-size arrays in the kernel parameters). Deeper networks
// take the general path (csrc/gemm_path.h); at such depths the weights of all layers rarely fit
// in one block's shared memory anyway.
constexpr int kMaxLayers = 8;
// Lags the fused kernels hold (fixed-size arrays in the kernel parameters); a longer tapped delay
// line takes the general path.
constexpr int kMaxLags = 16;
// Ensemble members are the grid's y axis, which CUDA caps at 65535 blocks.
constexpr int64_t kMaxMembers = 65535;

FBFAST_HD inline int round_up4(int n) { return (n + 3) & ~3; }

// Row stride of a weight matrix in shared memory, >= n (a multiple of 4) and == 4 (mod 32):
// when the lanes of a warp read float4s of consecutive rows (z = x W^T, one output per lane),
// each quarter-warp then covers all 32 banks once, and rows stay 16-byte aligned.
FBFAST_HD inline int weight_ld(int n) { return n + (36 - n % 32) % 32; }

// The element type of every tensor of one call. The kernels convert at global loads and stores
// only (a branch on a value uniform over the grid), so one instantiation serves all three.
enum class Dtype : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

struct Dims {
  int64_t steps, batch;  // batch: each member's B
  int du, o;
  int layers;
  int width[kMaxLayers];    // out_l; width[layers - 1] == o
  int64_t delay, truncate;  // delay: D = max(lags); truncate == 0: full BPTT
  // The feedback (docs/spec.md §1.2): step t reads the first f outputs of y_{t - lags[j]} for
  // j < m, in this order; residual adds lag 0's value to the first f outputs.
  int m, f;
  int lags[kMaxLags];  // ints: plan_rollout takes no delay beyond INT32_MAX (x0 has D rows)
  bool residual;
  int64_t members;  // E networks side by side (1: one network)

  FBFAST_HD int x() const { return m * f; }  // width of x_t
  FBFAST_HD int in(int l) const { return l == 0 ? du + x() : width[l - 1]; }
  // Version 1's feedback, which keeps version 1's code path and results bit for bit.
  FBFAST_HD bool plain() const { return m == 1 && f == o && !residual; }
};

// Dims of a network of `layers` <= kMaxLayers layers whose output widths are widths[0 .. layers),
// with version 1's feedback (the one lag `delay`, every output fed back) and one member;
// set_feedback and `members` change those.
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
  d.m = 1;
  d.lags[0] = static_cast<int>(delay);
  d.f = d.o;
  d.residual = false;
  d.members = 1;
  return d;
}

// The feedback structure: m <= kMaxLags distinct lags whose maximum is d.delay, f fed-back outputs.
inline void set_feedback(Dims& d, int m, const int64_t* lags, int f, bool residual) {
  d.m = m;
  for (int j = 0; j < kMaxLags; ++j) d.lags[j] = j < m ? static_cast<int>(lags[j]) : 0;
  d.f = f;
  d.residual = residual;
}

// Offsets (in floats) and padded widths of one layer's buffers; see the file comment.
struct LayerLayout {
  int in_pad, out_pad, ld;  // ld: row stride of W_l and (in shared memory) dW_l, weight_ld(in_pad)
  // dw, db: offsets in shared memory, or, when SmemLayout::grads_global, in the block's
  // workspace row (grad_elements' dense layout, dW_l row stride in_l).
  int64_t w, b, dw, db, hidden, pre;
};

// Offsets (in floats) of the buffers of one block's dynamic shared memory; see the file comment.
struct SmemLayout {
  int rows, chunk;
  // Ring slots: version 1's feedback min(delay, steps), one more in a one-layer forward; other
  // structures D (see make_layout).
  int64_t slots;
  int du_pad, o_pad, act_pad;
  int f_pad, x_pad, ring_pad;  // F, x_t (m F) and ring rows, padded
  int64_t ring, u_stage, x_buf, x_stage, gy_stage, act[2];
  LayerLayout layer[kMaxLayers];
  int64_t total;
  // Backward only: the fp32 weight-gradient accumulators live in the block's workspace row in
  // global memory (L2-resident on the GPUs this targets) rather than in shared memory. Chosen
  // where the weights fit on chip but weights plus accumulators do not (plan_rollout), so that
  // such a backward stays one fused kernel instead of the per-step general path.
  bool grads_global;
  // Every tile GEMM on tensor cores (the file comment); tc_scratch: a 16 x 16 tile per warp.
  bool tensor_cores;
  int64_t tc_scratch;
};

// Whether the widths let every GEMM of a step run on whole 16 x 16 x 8 tensor-core tiles (the
// tile rows are checked by the plan).
inline FBFAST_HD bool tensor_core_widths(const Dims& d) {
  if (d.du % kTcTile || d.x() % kTcTile) return false;
  for (int l = 0; l < d.layers; ++l)
    if (d.width[l] % kTcTile) return false;
  return true;
}

inline FBFAST_HD SmemLayout make_layout(const Dims& d, Act act, int rows, int chunk, bool backward,
                                        bool grads_global = false, bool tensor_cores = false) {
  SmemLayout s{};
  s.rows = rows;
  s.chunk = chunk;
  s.grads_global = backward && grads_global;
  s.tensor_cores = tensor_cores;
  const int L = d.layers;
  const bool plain = d.plain();
  // Version 1's feedback: step t reads x_t from slot t % slots and its output y_t becomes x_{t+k},
  // slot (t + k) % slots. With slots = k these are one slot, which is free once the first layer
  // has read x_t; but a one-layer forward reads x_t and writes y_t in the same GEMM, so it gets a
  // slot more. The backward's ring holds adjoints, read into act[] before the slot is rewritten.
  // Other structures: D slots hold the values of steps t - D .. t - 1 (x0's rows before step 0),
  // which step t gathers into x_t before its first layer, so y_t may then take the slot of
  // step t - D at once; backward, D slots hold their adjoints (the file comment).
  const int64_t fed = d.delay < d.steps ? d.delay : d.steps;
  s.slots = !plain ? d.delay : !backward && L == 1 && d.delay < d.steps ? fed + 1 : fed;
  s.du_pad = round_up4(d.du);
  s.o_pad = round_up4(d.o);
  s.f_pad = round_up4(d.f);
  s.x_pad = round_up4(d.x());
  s.ring_pad = plain ? s.o_pad : s.f_pad;
  s.act_pad = 0;
  for (int l = 0; l < L; ++l) {
    LayerLayout& lay = s.layer[l];
    lay.in_pad = l == 0 ? s.du_pad + s.x_pad : round_up4(d.width[l - 1]);
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
  s.ring = take(s.slots * R * s.ring_pad);
  s.u_stage = take(S * R * s.du_pad);
  s.x_buf = take(!backward && !plain ? R * s.x_pad : 0);
  s.x_stage = take(backward ? S * R * s.x_pad : 0);
  s.gy_stage = take(backward ? S * R * s.o_pad : 0);
  for (int i = 0; i < 2; ++i) s.act[i] = take(i < act_buffers ? R * s.act_pad : 0);
  const bool keep_pre = backward && act_needs_z(act);
  int64_t global_off = 0;  // grads_global: the workspace row's layout, dW_0 | db_0 | dW_1 | ...
  for (int l = 0; l < L; ++l) {
    LayerLayout& lay = s.layer[l];
    const bool hidden = l < L - 1;
    lay.hidden = take(backward && hidden ? R * lay.out_pad : 0);
    lay.pre = take(keep_pre && hidden ? R * lay.out_pad : 0);
    lay.w = take(int64_t(lay.out_pad) * lay.ld);
    // The backward never recomputes the last layer's z (it reads y_t from Y), so needs no b_{L-1}.
    lay.b = take(!backward || hidden ? lay.out_pad : 0);
    if (s.grads_global) {
      lay.dw = global_off;
      global_off += int64_t(d.width[l]) * d.in(l);
      lay.db = global_off;
      global_off += d.width[l];
    } else {
      lay.dw = take(backward ? int64_t(lay.out_pad) * lay.ld : 0);
      lay.db = take(backward ? lay.out_pad : 0);
    }
  }
  s.tc_scratch = take(tensor_cores ? kTcScratchFloats : 0);
  s.total = off;
  return s;
}

// How one call runs. fused == false: the network does not fit in shared memory and the host
// takes the general path (per-step ATen GEMMs, csrc/gemm_path.h).
struct Plan {
  bool fused = false;
  bool tensor_cores = false;  // lay.tensor_cores
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
// fp32 weights of every layer (~ 4 sum_l out_l in_l bytes) plus one tile row of activations to
// fit, and they keep every weight on chip for the whole rollout. The backward also keeps its
// fp32 weight-gradient accumulators there when they fit too, else in its workspace row in global
// memory (SmemLayout::grads_global: at (256, 0, 64, 256, 100) weights and accumulators need
// 278 KB, the weights alone about half). Those accumulators are cheap while every block's row
// stays in L2: E x blocks x grad_elements x 4 bytes, about 17 MB for that shape on an H100
// (128 blocks), against its 50 MB. The switch is made only where not even a one-row tile fits
// with them on chip; just below that, the halving of the rows may leave tiles far smaller than
// one per SM, where global accumulators could keep larger ones (to measure on a GPU). Beyond that a block would have to stream weights from
// L2 at every step, which per-step cuBLAS GEMMs over the full batch do better.
//
// An ensemble's E members share the device: its tiles are sized from all E B rows (E = 1: as for
// one network), and each member gets an equal share of the persistent grid's blocks.
// The tile rows of one direction's plan: about one tile per SM, halved until a one-step chunk
// fits; 0 when not even one row fits. With tensor cores, tiles of 16 or more rows are multiples
// of 16 (a plan whose rows end below 16 then cannot use them).
inline int64_t plan_rows(const Dims& d, bool backward, Act act, int num_sms, int64_t limit, bool grads_global,
                         bool tensor_cores) {
  auto fits = [&](int64_t rows) {
    return make_layout(d, act, static_cast<int>(rows), 1, backward, grads_global, tensor_cores).total <= limit;
  };
  // About one tile per SM: the time loop is serial, so parallelism comes from the batch (and the
  // members) only. A tile holds one member's rows, so never more than B.
  int64_t rows = ceil_div(d.batch * d.members, num_sms > 0 ? num_sms : 1);
  if (rows > d.batch) rows = d.batch;
  rows = rows < 1 ? 1 : rows > kMaxRows ? kMaxRows : rows;
  if (rows >= 4) rows = round_up4(static_cast<int>(rows));
  if (tensor_cores && rows >= kTcTile) rows = ceil_div(rows, kTcTile) * kTcTile;
  // Halve until one chunk of one step fits; tiles of 4 or more rows stay multiples of 4 (with
  // tensor cores, tiles above 16 rows multiples of 16).
  while (!fits(rows)) {
    if (rows == 1) return 0;
    if (tensor_cores && rows > kTcTile) {
      const int64_t half = (rows / 2) & ~int64_t(kTcTile - 1);
      rows = half > kTcTile ? half : kTcTile;
    } else {
      rows = rows > 4 ? (rows / 2) & ~int64_t(3) : rows / 2;
    }
  }
  return rows;
}

// Tensor cores for a call (both directions decide alike, so that the backward recomputes every
// z with the forward's arithmetic): wanted, widths that allow them, and tiles of whole 16-row
// groups in the forward's plan and the backward's.
// backward_grads_global: the backward plan's SmemLayout::grads_global.
inline bool tensor_cores_fit(const Dims& d, Act act, int num_sms, int64_t limit, bool want,
                             bool backward_grads_global) {
  if (!want || !tensor_core_widths(d)) return false;
  for (const bool backward : {false, true}) {
    const int64_t rows = plan_rows(d, backward, act, num_sms, limit, backward && backward_grads_global, true);
    if (rows < kTcTile || rows % kTcTile) return false;
  }
  return true;
}

inline Plan plan_rollout(const Dims& d, bool backward, Act act, int num_sms, int64_t smem_limit_bytes,
                         bool tensor_cores = false) {
  Plan plan;
  if (d.members < 1 || d.members > kMaxMembers || d.m < 1 || d.m > kMaxLags || d.delay > INT32_MAX) return plan;
  const int64_t limit = smem_limit_bytes / int64_t(sizeof(float));
  // The backward's weight-gradient accumulators go to global memory only where they must: with
  // them in shared memory not even a one-row tile fits.
  const bool global_backward = make_layout(d, act, 1, 1, true, false).total > limit;
  const bool grads_global = backward && global_backward;
  const bool tc = tensor_cores_fit(d, act, num_sms, limit, tensor_cores, global_backward);
  auto fits = [&](int rows, int chunk) {
    return make_layout(d, act, rows, chunk, backward, grads_global, tc).total <= limit;
  };
  const int64_t rows = plan_rows(d, backward, act, num_sms, limit, grads_global, tc);
  if (rows == 0) return plan;

  const int64_t stage_per_step =
      rows * (backward ? round_up4(d.du) + round_up4(d.x()) + round_up4(d.o) : round_up4(d.du));
  int64_t chunk = 1;
  if (stage_per_step > 0) {
    chunk = d.steps < kMaxChunk ? d.steps : kMaxChunk;
    const int64_t by_budget = kStageBudgetFloats / stage_per_step;
    if (chunk > by_budget) chunk = by_budget;
    if (chunk < 1) chunk = 1;
    while (chunk > 1 && !fits(static_cast<int>(rows), static_cast<int>(chunk))) chunk /= 2;
  }

  plan.fused = true;
  plan.tensor_cores = tc;
  plan.act = act;
  plan.rows = static_cast<int>(rows);
  plan.rows_per_item = rows % 4 == 0 && !tc ? 4 : 1;  // tile_gemm: tensor cores in the 1-row kernels
  plan.lay = make_layout(d, act, plan.rows, static_cast<int>(chunk), backward, grads_global, tc);
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
  plan.tiles = ceil_div(d.batch, rows);  // per member
  const int64_t resident = int64_t(num_sms > 0 ? num_sms : 1) * kBlocksPerSm;
  const int64_t share = resident / d.members > 0 ? resident / d.members : 1;
  plan.blocks = plan.tiles < share ? plan.tiles : share;  // per member: the grid is blocks x members
  return plan;
}

// Where member e's rows of step t lie in a (steps, [E,] B, width) tensor: element (t, e, r, c) at
// t * step + e * member + r * width + c; member == 0 for a tensor that all members share.
struct Rows {
  int64_t step, member;
};

inline Rows member_rows(const Dims& d, int64_t width, bool shared) {
  const int64_t per_member = d.batch * width;
  return shared ? Rows{per_member, 0} : Rows{d.members * per_member, per_member};
}

// Which of x0 and u all members of an ensemble share (docs/spec.md §1.3); false for one network.
struct Shared {
  bool x0 = false, u = false;
};

// One forward call, and the inputs of a backward. Pointers are to data of `dtype`, contiguous:
// x0 the rows that gemm_path::read_x0 copies, ([E,] B, F) each: lag j's value at step t < d_j is
// row x0_base[j] + t (version 1's feedback: x0[:min(delay, steps)], row t); u (T, [E,] B, Du) or
// null; w[l] ([E,] out_l, in_l), b[l] ([E,] out_l) or null; y (T, [E,] B, O): written by the
// forward, read by the backward. Member e's weights start e out_l in_l elements in.
struct RolloutParams {
  Dims dims;
  SmemLayout lay;
  int rows_per_item, threads;
  int64_t tiles, blocks;  // per member
  Dtype dtype;
  Act act;
  float act_param;  // leaky_relu's slope, elu's alpha (the kernels compute in fp32)
  const void* x0;
  const void* u;
  const void* w[kMaxLayers];
  const void* b[kMaxLayers];
  void* y;
  int64_t x0_base[kMaxLags];
  Rows x0_rows, u_rows, y_rows;  // y_rows also for grad_y
};

// One backward call: the forward's inputs and y, plus grad_y (T, [E,] B, O). A gradient pointer
// is null when it is not wanted. grad_x0 is (D, E, B, F) and grad_u (T, E, B, Du), every member's
// own (for a shared x0 or u the caller sums them over E: per-member buffers, no atomics, so the
// result is the same on every run); grad_u is written in full, and so is grad_x0 for structures
// other than version 1's, whose grad_x0 must be zero-filled by the caller (only rows
// t < min(delay, steps) are written). workspace: null when no weight gradient is wanted or when
// uses_workspace(plan) is false (one block per member, accumulators in shared memory: the block
// writes the weight gradients itself), else (E blocks, grad_elements(dims)) fp32 partial sums
// (with grads_global, the accumulators themselves) that reduce_gradients_kernel adds in block
// order.
struct BackwardParams : RolloutParams {
  const void* grad_y;
  void* grad_x0;
  void* grad_u;
  void* grad_w[kMaxLayers];
  void* grad_b[kMaxLayers];
  float* workspace;
  Rows grad_x0_rows, grad_u_rows;
};

// The one place where a call's parameters are filled, for the host code and the emulator alike.
// w and b hold d.layers pointers each; x0_base d.m row offsets (gemm_path::X0Rows::base). The
// activation is the plan's, whose layout it decides.
inline void set_rollout_params(RolloutParams& p, const Dims& d, const Plan& plan, Dtype dtype, float act_param,
                               const void* x0, const int64_t* x0_base, const void* u, Shared shared,
                               const void* const* w, const void* const* b, void* y) {
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
  for (int j = 0; j < kMaxLags; ++j) p.x0_base[j] = j < d.m ? x0_base[j] : 0;
  p.x0_rows = member_rows(d, d.f, shared.x0);
  p.u_rows = member_rows(d, d.du, shared.u);
  p.y_rows = member_rows(d, d.o, false);
}

// grad_w and grad_b hold d.layers pointers each (null: not wanted).
inline void set_backward_params(BackwardParams& p, const Dims& d, const Plan& plan, Dtype dtype, float act_param,
                                const void* x0, const int64_t* x0_base, const void* u, Shared shared,
                                const void* const* w, const void* const* b, void* y, const void* grad_y,
                                void* grad_x0, void* grad_u, void* const* grad_w, void* const* grad_b,
                                float* workspace) {
  set_rollout_params(p, d, plan, dtype, act_param, x0, x0_base, u, shared, w, b, y);
  p.grad_x0_rows = member_rows(d, d.f, false);
  p.grad_u_rows = member_rows(d, d.du, false);
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
// dW_0 (out_0, in_0) | db_0 (out_0) | dW_1 | db_1 | ..., compact and row-major like the outputs
// of one member. The kernels walk it layer by layer with a running offset; this is its length.
// Member e's blocks own workspace rows e * blocks .. (e + 1) * blocks - 1.
inline FBFAST_HD int64_t grad_elements(const Dims& d) {
  int64_t total = 0;
  for (int l = 0; l < d.layers; ++l) total += int64_t(d.width[l]) * (d.in(l) + 1);
  return total;
}

// Whether a backward of this plan writes its weight gradients to per-block workspace rows, which
// reduce_gradients_kernel then sums: several blocks per member, or accumulators in global memory.
inline bool uses_workspace(const Plan& plan) { return plan.blocks > 1 || plan.lay.grads_global; }

}  // namespace cuda
}  // namespace fbfast
