// The fused forward rollout: for all T steps in one launch (docs/spec.md §1),
//   h_0 = [u_t ; x_t],  h_{l+1} = act(W_l h_l + b_l) for l < L-1,  y_t = W_{L-1} h_{L-1} + b_{L-1}
//   (+ [x_t's first lag ; 0] for a residual model).
//
// Batch rows are independent, so a block owns a tile of R rows for the whole time loop and no
// grid-wide synchronisation is needed. The weights of every layer are loaded into shared memory
// once per block and stay there; the tile's last fed-back values live in a ring in shared memory
// (rollout_params.h: version 1's feedback reads x_t in place, at slot t % slots: x0[t] at first,
// then y_{t-k}; so does one lag of another structure in a deeper network; other structures
// gather the m lags of x_t from D slots into x_buf first), and the
// hidden layers' outputs in two buffers that the layers take in turn, so only u (staged S steps at
// a time) is read from and only Y is written to global memory inside the loop. The grid is
// persistent: a block that finishes its tile takes the next one (tile += gridDim.x), keeping its
// weights. An ensemble's member e runs on the blocks with blockIdx.y = e, with its own weights
// and its own or the shared rows of x0 and u (RolloutParams::x0_rows, u_rows).
//
// Numerics: inputs of any dtype are widened to fp32, every product accumulates in fp32 (on
// tensor cores where the plan says so: 3xTF32, tile_gemm_tc in tile_common.cuh), hidden
// activations stay fp32, and y_t (with a residual model's skip added in fp32) is rounded to the
// output dtype once. The ring keeps that rounded y_t, so the fed-back value is exactly the stored
// Y (a chunked rollout continued from Y[-D:] equals one long rollout, and the backward recomputes
// every z from Y bit for bit).
#pragma once

#include "../common/activation.h"
#include "act_dispatch.h"
#include "tile_common.cuh"

namespace fbfast {
namespace cuda {

// Whether step t's x_t is read in place from the ring: version 1's feedback, and one lag (it is
// D) of another structure (F < O or a residual skip: a delta model) in a network of two or more
// layers, whose value of step t - D sits whole in slot t % D: no gather and no barrier for it.
// Not in a one-layer network, whose single GEMM writes y_t[:F] into that slot while reading x_t.
// A function of the parameters, re-read where used: the 4-row kernels have no register to keep
// it across the time loop.
__device__ __forceinline__ bool reads_x_in_place(const Dims& d) { return d.m == 1 && (d.plain() || d.layers > 1); }

template <Act kAct, int kRB>
__global__ void __launch_bounds__(kMaxThreads) rollout_forward_kernel(const RolloutParams p) {
  // 128-byte aligned: the tensor-core loads need 32 (dynamic shared memory guarantees 16).
  extern __shared__ __align__(128) float4 fbfast_smem[];
  float* smem = reinterpret_cast<float*>(fbfast_smem);
  const Dims& d = p.dims;
  const SmemLayout& lay = p.lay;
  const int R = lay.rows, last = d.layers - 1;
  const int64_t B = d.batch, T = d.steps, k = d.delay;
  const bool plain = d.plain();
  const int64_t e = blockIdx.y;  // this block's member (0 for one network)

  float* ring = smem + lay.ring;        // (slots, R, ring_pad)
  float* u_stage = smem + lay.u_stage;  // (S, R, Du_pad)
  float* x_buf = smem + lay.x_buf;      // (R, X_pad): the gathered lags (not version 1's feedback)

  zero_fill(smem, lay.total);
  __syncthreads();
  for (int l = 0; l < d.layers; ++l) {
    const LayerLayout& layer = lay.layer[l];
    const int64_t out = d.width[l], in = d.in(l);
    load_weight(smem + layer.w, element_at(p.w[l], e * out * in, p.dtype), p.dtype, d.width[l], d.in(l), layer.ld,
                column_map(d, lay, l));
    load_vector(smem + layer.b, element_at(p.b[l], e * out, p.dtype), p.dtype, d.width[l]);
  }

  const int fed = static_cast<int>(k < T ? k : T);  // steps that read x0 (version 1's feedback)
  const int slots = static_cast<int>(lay.slots);
  const int ring_slot = R * lay.ring_pad;
  const int u_step = R * lay.du_pad;
  for (int64_t tile = blockIdx.x; tile < p.tiles; tile += gridDim.x) {
    const int64_t row0 = tile * R;
    const int rows_valid = static_cast<int>(B - row0 < R ? B - row0 : R);
    // The previous tile's last step ended with a barrier, so the ring is free to refill.
    if (plain)
      stage_rows(ring, [&](int64_t t) { return StepRows{p.x0, t * p.x0_rows.step + member_offset(p.x0_rows)}; },
                 p.dtype, 0, fed, row0, R, B, d.o, lay.o_pad);
    else
      stage_x0_ring(ring, p, row0);
    __syncthreads();

    int s = 0;     // t % S: position of step t in the staged chunk of u
    // Version 1's feedback: t % slots, the ring slot of x_t. Other structures: t % D, the slot of
    // the value of step t - D, which y_t[:F] replaces once x_t is gathered.
    int slot = 0;
    int y_slot = static_cast<int>(k % slots);  // version 1: (t + k) % slots, ring slot of y_t = x_{t+k}
    for (int64_t t = 0; t < T; ++t) {
      const bool stage_u = d.du > 0 && s == 0;
      if (stage_u) {
        const int count = static_cast<int>(T - t < lay.chunk ? T - t : lay.chunk);
        stage_rows(u_stage, [&](int64_t tt) { return StepRows{p.u, tt * p.u_rows.step + member_offset(p.u_rows)}; },
                   p.dtype, t, count, row0, R, B, d.du, lay.du_pad);
      }
      const bool gather = !reads_x_in_place(d);
      if (gather) gather_lags(x_buf, ring, d, lay, slot);
      if (stage_u || gather) __syncthreads();
      // Version 1: y_t is fed back only when a step t + k exists; its slot is free: x_t's own slot
      // once the first layer has read it (barrier), or in a one-layer network a slot of its own.
      // Other structures: y_t[:F] always takes slot t % D (x_t was gathered before the barrier).
      float* y_ring = !plain ? ring + slot * ring_slot : t + k < T ? ring + y_slot * ring_slot : nullptr;
      const int64_t y_first = t * p.y_rows.step + member_offset(p.y_rows) + row0 * d.o;

      const float* u_t = u_stage + s * u_step;
      // In place, another structure's one lag D has its value at slot t % D, pitch ring_pad =
      // x_pad (both round_up4(F)).
      const float* x_t = reads_x_in_place(d) ? ring + slot * ring_slot : x_buf;
      for (int l = 0; l <= last; ++l) {
        // Layer l > 0 reads layer l - 1's output from the other act buffer.
        const TileGemm gemm = layer_gemm(d, lay, smem, l, u_t, x_t, smem + lay.act[(l + 1) & 1], lay.act_pad);
        if (l < last) {
          float* h_out = smem + lay.act[l & 1];
          tile_gemm<kRB, WeightLayout::kRowPerOutput>(gemm, [&](int r, int n, float z) {
            h_out[r * lay.act_pad + n] = act_forward<float>(kAct, p.act_param, z);
          });
          clear_columns(h_out, R, lay.act_pad, d.width[l], lay.layer[l].out_pad);
        } else if (plain) {
          tile_gemm<kRB, WeightLayout::kRowPerOutput>(gemm, [&](int r, int n, float v) {
            const float out = round_to(p.dtype, v);
            if (y_ring) y_ring[r * lay.o_pad + n] = out;
            if (r < rows_valid) store_element(p.y, y_first + r * d.o + n, p.dtype, out);
          });
        } else {
          // The residual skip adds the first lag's value, columns [0, F) of x_t. Direct, x_t is
          // the slot y_t[:F] goes to: each element is read, then written, by one thread.
          tile_gemm<kRB, WeightLayout::kRowPerOutput>(gemm, [&](int r, int n, float v) {
            const bool fed_back = n < d.f;
            if (d.residual && fed_back) v += x_t[r * lay.x_pad + n];
            const float out = round_to(p.dtype, v);
            if (fed_back) y_ring[r * lay.ring_pad + n] = out;
            if (r < rows_valid) store_element(p.y, y_first + r * d.o + n, p.dtype, out);
          });
        }
        __syncthreads();
      }

      if (++s == lay.chunk) s = 0;
      if (++slot == slots) slot = 0;
      if (++y_slot == slots) y_slot = 0;
    }
  }
}

// The instantiation for a call's activation and rows per thread (Plan::rows_per_item), for the
// launch (rollout_forward.cu) and the host emulation alike.
using ForwardKernel = void (*)(const RolloutParams);

inline ForwardKernel forward_kernel(Act act, int rows_per_item) {
  return dispatch_act(act, [&](auto a) -> ForwardKernel {
    return rows_per_item == 4 ? rollout_forward_kernel<decltype(a)::value, 4>
                              : rollout_forward_kernel<decltype(a)::value, 1>;
  });
}

}  // namespace cuda
}  // namespace fbfast
