// The fused backward of the rollout: one reverse-time sweep that recomputes every layer's z from
// Y (nothing but the forward's inputs and output is saved) and produces every gradient of
// docs/spec.md §1.
//
// Same structure as the forward (forward_kernel.cuh): a block owns a tile of rows of one member
// (blockIdx.y), the weights of every layer stay in shared memory, and the grid is persistent.
// Per step t, from T-1 down:
//   z_l, h_{l+1} = act(z_l)  for l < L-1, recomputed from [u_t ; x_t] with the forward's exact
//                            arithmetic (kept per layer: h_{l+1}, and z_l where act' reads z)
//   g_{L-1} = dL/dy_t + the ring's adjoint of y_t[:F], sent by the steps that read it
//   g_{l-1} = act'(z_{l-1}) * (g_l W_l)  for l = L-1 .. 1, dL/dz of each layer in turn
//   dx_t = g_0 W_0x: each lag's share to the adjoint of the value it read, unless truncation cuts
//          the edges into step t;   du_t = g_0 W_0u
//   dW_l += g_l^T h_l, db_l += sum g_l
// The ring of adjoints (rollout_params.h), like the CPU tile kernel's (csrc/cpu/tile_kernels.h):
//  * version 1's feedback: slot t % k holds the adjoint of y_t sent by step t + k; once read into
//    g it takes dx_t, the adjoint of y_{t-k} (zero when truncation cuts y_{t-k} -> x_t), or dx_t
//    goes to dL/dx0[t] when t < k. This is version 1's code, unchanged.
//  * other structures: D slots, the adjoint of the value of step s (x0's row s + D for s < 0) at
//    slot (s + D) % D. Step t reads and clears its own slot t % D, adds a residual model's
//    dL/dy_t[:F] to the first lag's value and every lag's share of dx_t to its value; after step 0
//    the slots hold the adjoints of x0's rows, written to grad_x0 in full. The values of steps
//    s >= 0 get nothing from a step that truncation cuts; x0's never are cut.
// The weight gradients accumulate in fp32 in shared memory, per block, over all its tiles and
// steps. With several blocks per member each writes its partials to a workspace row and
// reduce_gradients_kernel sums the rows in block order: no atomics, so the result is the same
// on every run. Where weights and accumulators do not both fit on chip (SmemLayout::grads_global)
// the accumulators are the block's workspace row itself, in global memory: each element has one
// owning thread for the whole kernel (the same StridedIndex walk every step), so the updates
// need no atomics and keep the same order as in shared memory.
#pragma once

#include "../common/activation.h"
#include "act_dispatch.h"
#include "tile_common.cuh"

namespace fbfast {
namespace cuda {

// The rows of h_l, layer l's input, as its weight gradient reads them: column c < split from a0
// (row pitch lda0), the others from a1 at column c - split (pitch lda1). Layer 0: u_t, then x_t;
// the others: the layer below's output alone.
struct LayerInput {
  const float* a0;
  int lda0, split;
  const float* a1;
  int lda1;
};

// dW(i, col(j)) += sum_{r < rows} g(r, i) h(r, j) for i < out, j < in; g has row pitch ldg.
__device__ __forceinline__ void accumulate_weight_grad(float* dw, int ld, ColumnMap col, const float* g, int ldg,
                                                       const LayerInput& h, int out, int in, int rows) {
  if (in == 0) return;
  for (StridedIndex e(threadIdx.x, blockDim.x, in); e.row < out; e.advance(in)) {
    const bool first = e.col < h.split;
    const float* a = first ? h.a0 + e.col : h.a1 + (e.col - h.split);
    const int lda = first ? h.lda0 : h.lda1;
    float* w = dw + e.row * ld + col(e.col);
    float acc = *w;
    for (int r = 0; r < rows; ++r) acc = fmaf(g[r * ldg + e.row], a[r * lda], acc);
    *w = acc;
  }
}

// db(i) += sum_{r < rows} g(r, i) for i < out.
__device__ __forceinline__ void accumulate_bias_grad(float* db, const float* g, int ldg, int out, int rows) {
  for (int i = threadIdx.x; i < out; i += blockDim.x) {
    float acc = db[i];
    for (int r = 0; r < rows; ++r) acc += g[r * ldg + i];
    db[i] = acc;
  }
}

// This block's row of the workspace (rollout_params.h: grad_elements): member blockIdx.y's
// blocks own rows blockIdx.y * gridDim.x + 0, 1, ...
__device__ __forceinline__ float* workspace_row(const BackwardParams& p) {
  return p.workspace + (int64_t(blockIdx.y) * gridDim.x + blockIdx.x) * grad_elements(p.dims);
}

// Register budget: with one-row blocking (kRB = 1, tiles of 1-3 rows) ptxas otherwise aims at
// more resident blocks than the plan ever places on an SM (kBlocksPerSm; such small tiles mean
// about one tile per SM) and spills the per-step state of the feedback code to reach them. The
// 4-row kernels keep ptxas's own choice (a minimum of 0 blocks: none asked for).
template <Act kAct, int kRB>
__global__ void __launch_bounds__(kMaxThreads, kRB == 1 ? kBlocksPerSm : 0)
    rollout_backward_kernel(const BackwardParams p) {
  // 128-byte aligned: the tensor-core loads need 32 (dynamic shared memory guarantees 16).
  extern __shared__ __align__(128) float4 fbfast_smem[];
  float* smem = reinterpret_cast<float*>(fbfast_smem);
  constexpr bool kNeedsZ = act_needs_z(kAct);
  const Dims& d = p.dims;
  const SmemLayout& lay = p.lay;
  const int R = lay.rows, last = d.layers - 1;
  const int64_t B = d.batch, T = d.steps, k = d.delay;
  const bool plain = d.plain();
  const int64_t e = blockIdx.y;  // this block's member (0 for one network)

  float* ring = smem + lay.ring;          // (slots, R, ring_pad) adjoints of the fed-back values
  float* u_stage = smem + lay.u_stage;    // (S, R, Du_pad)
  float* x_stage = smem + lay.x_stage;    // (S, R, X_pad)
  float* gy_stage = smem + lay.gy_stage;  // (S, R, O_pad)

  zero_fill(smem, lay.total);
  // With grads_global the accumulators are the workspace row (null when no weight gradient is
  // wanted).
  if (lay.grads_global && p.workspace) zero_fill(workspace_row(p), grad_elements(d));
  __syncthreads();
  for (int l = 0; l <= last; ++l) {
    const LayerLayout& layer = lay.layer[l];
    const int64_t out = d.width[l], in = d.in(l);
    load_weight(smem + layer.w, element_at(p.w[l], e * out * in, p.dtype), p.dtype, d.width[l], d.in(l), layer.ld,
                column_map(d, lay, l));
    if (l < last) load_vector(smem + layer.b, element_at(p.b[l], e * out, p.dtype), p.dtype, d.width[l]);
  }

  const int slots = static_cast<int>(lay.slots);
  const int ring_slot = R * lay.ring_pad;
  const int u_step = R * lay.du_pad, x_step = R * lay.x_pad, gy_step = R * lay.o_pad;
  const int D = static_cast<int>(k);
  for (int64_t tile = blockIdx.x; tile < p.tiles; tile += gridDim.x) {
    const int64_t row0 = tile * R;
    const int rows_valid = static_cast<int>(B - row0 < R ? B - row0 : R);
    // No adjoint reaches y_t from beyond the last step. The previous tile ended with a barrier.
    zero_fill(ring, int64_t(slots) * ring_slot);

    int s = static_cast<int>((T - 1) % lay.chunk);  // t % S
    int slot = static_cast<int>((T - 1) % slots);   // t % slots (other structures: t % D)
    for (int64_t t = T - 1; t >= 0; --t) {
      if (t == T - 1 || s == lay.chunk - 1) {
        // Steps [t - s, t] of u, x and dL/dY, the chunk this reverse sweep enters now.
        const int64_t chunk_start = t - s;
        const int count = s + 1;
        if (d.du > 0)
          stage_rows(u_stage, [&](int64_t tt) { return StepRows{p.u, tt * p.u_rows.step + member_offset(p.u_rows)}; },
                     p.dtype, chunk_start, count, row0, R, B, d.du, lay.du_pad);
        if (plain)
          stage_rows(
              x_stage,
              [&](int64_t tt) {
                return tt < k ? StepRows{p.x0, tt * p.x0_rows.step + member_offset(p.x0_rows)}
                              : StepRows{p.y, (tt - k) * p.y_rows.step + member_offset(p.y_rows)};
              },
              p.dtype, chunk_start, count, row0, R, B, d.o, lay.o_pad);
        else
          stage_lags(x_stage, p, chunk_start, count, row0);
        stage_rows(gy_stage,
                   [&](int64_t tt) { return StepRows{p.grad_y, tt * p.y_rows.step + member_offset(p.y_rows)}; },
                   p.dtype, chunk_start, count, row0, R, B, d.o, lay.o_pad);
        __syncthreads();
      }
      const float* u_t = u_stage + s * u_step;
      const float* x_t = x_stage + s * x_step;
      const float* gy_t = gy_stage + s * gy_step;
      float* adj = ring + slot * ring_slot;
      const bool cut = d.truncate > 0 && t % d.truncate == 0;

      // g_{L-1} = dL/dy_t + the adjoint of y_t[:F] through the later steps. Its pad columns are
      // zero (those of gy_t and of the ring are), so the product through W_{L-1} reads no stale
      // value.
      float* g_out = smem + lay.act[last & 1];
      if (plain) {
        for (int i = threadIdx.x; i < ring_slot; i += blockDim.x)
          g_out[(i / lay.o_pad) * lay.act_pad + i % lay.o_pad] = gy_t[i] + adj[i];
      } else {
        // The slot is cleared as it is read (from now on it collects the value of step t - D), by
        // the thread that reads it; a residual model's dL/dy_t[:F] goes to the first lag's value,
        // whose slot (possibly this very one) no other thread touches in this loop.
        float* skip = d.residual && !(cut && t >= d.lags[0]) ? ring + lag_slot(slot, d.lags[0], D) * ring_slot
                                                              : nullptr;
        for (int i = threadIdx.x; i < R * lay.o_pad; i += blockDim.x) {
          const int r = i / lay.o_pad, n = i - r * lay.o_pad;
          float v = gy_t[i];
          if (n < d.f) {
            float* a = adj + r * lay.ring_pad + n;
            v += *a;
            *a = 0.f;
            if (skip) skip[r * lay.ring_pad + n] += v;
          }
          g_out[r * lay.act_pad + n] = v;
        }
      }
      // The hidden layers, recomputed in the forward's order (each barrier also publishes g_out;
      // a one-layer network has no hidden layer and needs a barrier of its own).
      for (int l = 0; l < last; ++l) {
        const LayerLayout& layer = lay.layer[l];
        const float* h_in = l > 0 ? smem + lay.layer[l - 1].hidden : nullptr;
        const int ldh = l > 0 ? lay.layer[l - 1].out_pad : 0;
        tile_gemm<kRB, WeightLayout::kRowPerOutput>(
            layer_gemm(d, lay, smem, l, u_t, x_t, h_in, ldh), [&](int r, int n, float z) {
              const int i = r * layer.out_pad + n;
              smem[layer.hidden + i] = act_forward<float>(kAct, p.act_param, z);
              if constexpr (kNeedsZ) smem[layer.pre + i] = z;
            });
        __syncthreads();
      }
      if (last == 0) __syncthreads();

      // Down the layers: phase l reads g_l and writes g_{l-1} (or, at l = 0, the adjoints of
      // x_t and u_t), and adds layer l's weight gradients.
      for (int l = last; l >= 0; --l) {
        const LayerLayout& layer = lay.layer[l];
        const float* g = smem + lay.act[l & 1];
        const float* w = smem + layer.w;
        LayerInput h_l{u_t, lay.du_pad, d.du, x_t, lay.x_pad};
        if (l > 0) {
          // act' reads z_{l-1} or h_l = act(z_{l-1}), whichever act_needs_z says was kept.
          const LayerLayout& below = lay.layer[l - 1];
          float* g_below = smem + lay.act[(l - 1) & 1];
          const TileGemm through{{g, nullptr}, {lay.act_pad, 0}, {layer.out_pad, 0}, w, layer.ld, nullptr, R,
                                 d.width[l - 1], tc_scratch(lay, smem)};
          tile_gemm<kRB, WeightLayout::kRowPerInput>(through, [&](int r, int n, float v) {
            const int i = r * below.out_pad + n;
            float dz;
            if constexpr (kNeedsZ)
              dz = act_backward<float>(kAct, p.act_param, v, smem[below.pre + i], 0.f);
            else
              dz = act_backward<float>(kAct, p.act_param, v, 0.f, smem[below.hidden + i]);
            g_below[r * lay.act_pad + n] = dz;
          });
          clear_columns(g_below, R, lay.act_pad, d.width[l - 1], below.out_pad);
          h_l = LayerInput{nullptr, 0, 0, smem + below.hidden, below.out_pad};
        } else {
          const TileGemm through_x{{g, nullptr}, {lay.act_pad, 0}, {layer.out_pad, 0}, w + lay.du_pad, layer.ld,
                                   nullptr, R, d.x(), tc_scratch(lay, smem)};
          if (plain) {
            // The ring slot was read into g_out at the top of this step (barriers since); it now
            // takes the adjoint of y_{t-k}.
            const bool to_ring = t >= k;
            if (to_ring && cut) {
              for (int i = threadIdx.x; i < ring_slot; i += blockDim.x) adj[i] = 0.f;
            } else if (to_ring || p.grad_x0) {
              const int64_t gx0_first = t * p.grad_x0_rows.step + member_offset(p.grad_x0_rows) + row0 * d.o;
              tile_gemm<kRB, WeightLayout::kRowPerInput>(through_x, [&](int r, int n, float v) {
                if (to_ring)
                  adj[r * lay.o_pad + n] = v;
                else if (r < rows_valid)
                  store_element(p.grad_x0, gx0_first + r * d.o + n, p.dtype, v);
              });
            }
          } else if (p.grad_x0 || !cut) {
            // Lag j's share, columns [j F, (j + 1) F) of dx_t, to the adjoint of the value it read:
            // distinct lags, distinct slots, so each element has one writer. When truncation cuts
            // the edges into step t, the lags d_j <= min(t, D) (values of this rollout) are
            // dropped and x0's values still get theirs; the GEMM is skipped only when every
            // share would be dropped (cut, and x0's adjoints not wanted).
            const int dropped = cut ? (t < D ? static_cast<int>(t) : D) : 0;
            tile_gemm<kRB, WeightLayout::kRowPerInput>(through_x, [&](int r, int n, float v) {
              const int j = n / d.f, lag = d.lags[j];
              if (lag <= dropped) return;
              ring[lag_slot(slot, lag, D) * ring_slot + r * lay.ring_pad + (n - j * d.f)] += v;
            });
          }
          if (p.grad_u && d.du > 0) {
            const int64_t gu_first = t * p.grad_u_rows.step + member_offset(p.grad_u_rows) + row0 * d.du;
            const TileGemm through_u{{g, nullptr}, {lay.act_pad, 0}, {layer.out_pad, 0}, w, layer.ld, nullptr, R,
                                     d.du, tc_scratch(lay, smem)};
            tile_gemm<kRB, WeightLayout::kRowPerInput>(through_u, [&](int r, int n, float v) {
              if (r < rows_valid) store_element(p.grad_u, gu_first + r * d.du + n, p.dtype, v);
            });
          }
        }
        if (p.grad_w[l] || p.grad_b[l]) {
          // The accumulators' base, computed here rather than kept live across the step (the
          // 4-row kernels have no register to spare). In global memory a weight's accumulator is
          // the workspace's dense (out_l, in_l) block.
          float* grads = lay.grads_global ? workspace_row(p) : smem;
          if (p.grad_w[l]) {
            const int ld = lay.grads_global ? d.in(l) : layer.ld;
            const ColumnMap col = lay.grads_global ? ColumnMap{0, 0} : column_map(d, lay, l);
            accumulate_weight_grad(grads + layer.dw, ld, col, g, lay.act_pad, h_l, d.width[l], d.in(l), rows_valid);
          }
          if (p.grad_b[l]) accumulate_bias_grad(grads + layer.db, g, lay.act_pad, d.width[l], rows_valid);
        }
        __syncthreads();
      }

      if (--s < 0) s = lay.chunk - 1;
      if (--slot < 0) slot = slots - 1;
    }
    if (!plain && p.grad_x0) {
      // Slot i now holds the adjoint of x0's row i (rows no step reads hold zero). The barrier
      // keeps the next tile's clearing of the ring behind these reads.
      const int total = D * R * d.f;
      for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
        const int c = idx % d.f;
        const int sr = idx / d.f;
        const int r = sr % R, i = sr / R;
        if (r < rows_valid)
          store_element(p.grad_x0, i * p.grad_x0_rows.step + member_offset(p.grad_x0_rows) + (row0 + r) * d.f + c,
                        p.dtype, ring[i * ring_slot + r * lay.ring_pad + c]);
      }
      __syncthreads();
    }
  }

  // This block's weight gradients: to its workspace row, or (one block per member) straight to
  // its member's outputs. The row is laid out as grad_elements (rollout_params.h) says:
  // dW_0 | db_0 | dW_1 | ... With grads_global they are in that row already.
  if (lay.grads_global) return;
  float* partial = p.workspace ? workspace_row(p) : nullptr;
  int64_t base = 0;
  auto emit = [&](void* out, int64_t member_first, int64_t i, float v) {
    if (partial)
      partial[base + i] = v;
    else
      store_element(out, member_first + i, p.dtype, v);
  };
  for (int l = 0; l <= last; ++l) {
    const LayerLayout& layer = lay.layer[l];
    const int in = d.in(l), out = d.width[l];
    if (p.grad_w[l] && in > 0) {
      const ColumnMap col = column_map(d, lay, l);
      const float* dw = smem + layer.dw;
      int i = threadIdx.x;
      for (StridedIndex x(threadIdx.x, blockDim.x, in); x.row < out; x.advance(in), i += blockDim.x)
        emit(p.grad_w[l], e * out * in, i, dw[x.row * layer.ld + col(x.col)]);
    }
    base += int64_t(out) * in;
    if (p.grad_b[l])
      for (int i = threadIdx.x; i < out; i += blockDim.x) emit(p.grad_b[l], e * out, i, smem[layer.db + i]);
    base += out;
  }
}

// grad[e][i] = sum over member e's blocks b = 0, 1, ... of workspace[e blocks + b][i], in that
// order, cast to the parameter dtype. One thread per gradient element, member e on blockIdx.y;
// reads are coalesced along i.
__global__ void reduce_gradients_kernel(const BackwardParams p) {
  const int64_t row = grad_elements(p.dims);
  const int64_t first = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  const int64_t e = blockIdx.y;
  const float* rows = p.workspace + e * p.blocks * row;
  int64_t base = 0;  // offset of the current gradient in a workspace row
  auto reduce = [&](void* out, int64_t n) {
    if (out) {
      for (int64_t i = first; i < n; i += stride) {
        float sum = 0.f;
        for (int64_t b = 0; b < p.blocks; ++b) sum += rows[b * row + base + i];
        store_element(out, e * n + i, p.dtype, sum);
      }
    }
    base += n;
  };
  for (int l = 0; l < p.dims.layers; ++l) {
    reduce(p.grad_w[l], int64_t(p.dims.width[l]) * p.dims.in(l));
    reduce(p.grad_b[l], p.dims.width[l]);
  }
}

// The instantiation for a call's activation and rows per thread (Plan::rows_per_item), for the
// launch (rollout_backward.cu) and the host emulation alike.
using BackwardKernel = void (*)(const BackwardParams);

inline BackwardKernel backward_kernel(Act act, int rows_per_item) {
  return dispatch_act(act, [&](auto a) -> BackwardKernel {
    return rows_per_item == 4 ? rollout_backward_kernel<decltype(a)::value, 4>
                              : rollout_backward_kernel<decltype(a)::value, 1>;
  });
}

}  // namespace cuda
}  // namespace fbfast
