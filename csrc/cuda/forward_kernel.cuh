// The fused forward rollout: for all T steps in one launch (docs/spec.md §1),
//   h_0 = [u_t ; x_t],  h_{l+1} = act(W_l h_l + b_l) for l < L-1,  y_t = W_{L-1} h_{L-1} + b_{L-1}.
//
// Batch rows are independent, so a block owns a tile of R rows for the whole time loop and no
// grid-wide synchronisation is needed. The weights of every layer are loaded into shared memory
// once per block and stay there; the tile's last `delay` outputs live in a ring in shared memory
// (x_t at slot t % slots: x0[t] at first, then y_{t-k}), and the hidden layers' outputs in two
// buffers that the layers take in turn, so only u (staged S steps at a time) is read from and
// only Y is written to global memory inside the loop. The grid is persistent: a block that
// finishes its tile takes the next one (tile += gridDim.x), keeping its weights.
//
// Numerics: inputs of any dtype are widened to fp32, every product accumulates in fp32, hidden
// activations stay fp32, and y_t is rounded to the output dtype once. The ring keeps that
// rounded y_t, so the fed-back value is exactly the stored Y (a chunked rollout continued from
// Y[-k:] equals one long rollout, and the backward recomputes every z from Y bit for bit).
#pragma once

#include "../common/activation.h"
#include "act_dispatch.h"
#include "tile_common.cuh"

namespace fbfast {
namespace cuda {

template <Act kAct, int kRB>
__global__ void __launch_bounds__(kMaxThreads) rollout_forward_kernel(const RolloutParams p) {
  extern __shared__ float4 fbfast_smem[];
  float* smem = reinterpret_cast<float*>(fbfast_smem);
  const Dims& d = p.dims;
  const SmemLayout& lay = p.lay;
  const int R = lay.rows, last = d.layers - 1;
  const int64_t B = d.batch, T = d.steps, k = d.delay;
  const int64_t step_x = B * d.o, step_u = B * d.du;

  float* ring = smem + lay.ring;        // (slots, R, O_pad)
  float* u_stage = smem + lay.u_stage;  // (S, R, Du_pad)

  zero_fill(smem, lay.total);
  __syncthreads();
  for (int l = 0; l < d.layers; ++l) {
    const LayerLayout& layer = lay.layer[l];
    load_weight(smem + layer.w, p.w[l], p.dtype, d.width[l], d.in(l), layer.ld, column_map(d, lay, l));
    load_vector(smem + layer.b, p.b[l], p.dtype, d.width[l]);
  }

  const int fed = static_cast<int>(k < T ? k : T);  // steps that read x0
  const int slots = static_cast<int>(lay.slots);
  const int ring_slot = R * lay.o_pad;
  const int u_step = R * lay.du_pad;
  for (int64_t tile = blockIdx.x; tile < p.tiles; tile += gridDim.x) {
    const int64_t row0 = tile * R;
    const int rows_valid = static_cast<int>(B - row0 < R ? B - row0 : R);
    // The previous tile's last step ended with a barrier, so the ring is free to refill.
    stage_rows(ring, [&](int64_t t) { return StepRows{p.x0, t * step_x}; }, p.dtype, 0, fed, row0, R, B, d.o,
               lay.o_pad);
    __syncthreads();

    int s = 0;     // t % S: position of step t in the staged chunk of u
    int slot = 0;  // t % slots: ring slot of x_t
    int y_slot = static_cast<int>(k % slots);  // (t + k) % slots: ring slot of y_t = x_{t+k}
    for (int64_t t = 0; t < T; ++t) {
      if (d.du > 0 && s == 0) {
        const int count = static_cast<int>(T - t < lay.chunk ? T - t : lay.chunk);
        stage_rows(u_stage, [&](int64_t tt) { return StepRows{p.u, tt * step_u}; }, p.dtype, t, count, row0, R, B,
                   d.du, lay.du_pad);
        __syncthreads();
      }
      // y_t is fed back only when a step t + k exists; its slot is free: x_t's own slot once the
      // first layer has read it (barrier), or in a one-layer network a slot of its own.
      float* y_ring = t + k < T ? ring + y_slot * ring_slot : nullptr;
      const int64_t y_first = t * step_x + row0 * d.o;

      const float* u_t = u_stage + s * u_step;
      const float* x_t = ring + slot * ring_slot;
      for (int l = 0; l <= last; ++l) {
        // Layer l > 0 reads layer l - 1's output from the other act buffer.
        const TileGemm gemm = layer_gemm(d, lay, smem, l, u_t, x_t, smem + lay.act[(l + 1) & 1], lay.act_pad);
        if (l < last) {
          float* h_out = smem + lay.act[l & 1];
          tile_gemm<kRB, WeightLayout::kRowPerOutput>(gemm, [&](int r, int n, float z) {
            h_out[r * lay.act_pad + n] = act_forward<float>(kAct, p.act_param, z);
          });
          clear_columns(h_out, R, lay.act_pad, d.width[l], lay.layer[l].out_pad);
        } else {
          tile_gemm<kRB, WeightLayout::kRowPerOutput>(gemm, [&](int r, int n, float v) {
            const float out = round_to(p.dtype, v);
            if (y_ring) y_ring[r * lay.o_pad + n] = out;
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
