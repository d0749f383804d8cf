// The fused forward rollout: y_t = W2 relu(W1 [u_t ; x_t] + b1) + b2 for all T steps in one
// launch (docs/spec.md §1).
//
// Batch rows are independent, so a block owns a tile of R rows for the whole time loop and no
// grid-wide synchronisation is needed. The weights are loaded into shared memory once per block
// and stay there; the tile's last `delay` outputs live in a ring in shared memory (slot t % k
// holds x_t: x0[t] at first, then y_{t-k}), so only u (staged S steps at a time) is read from
// and only Y is written to global memory inside the loop. The grid is persistent: a block that
// finishes its tile takes the next one (tile += gridDim.x), keeping its weights.
//
// Numerics: inputs of any dtype are widened to fp32, every product accumulates in fp32, h stays
// fp32, and y_t is rounded to the output dtype once. The ring keeps that rounded y_t, so the
// fed-back value is exactly the stored Y (a chunked rollout continued from Y[-k:] equals one long
// rollout, and the backward recomputes z_t from Y bit for bit).
#pragma once

#include "tile_common.cuh"

namespace fbfast {
namespace cuda {

template <typename scalar_t, int kRB>
__global__ void __launch_bounds__(kMaxThreads) rollout_forward_kernel(const ForwardParams p) {
  extern __shared__ float4 fbfast_smem[];
  float* smem = reinterpret_cast<float*>(fbfast_smem);
  const Dims& d = p.dims;
  const SmemLayout& L = p.lay;
  const int R = L.rows;
  const int64_t B = d.batch, T = d.steps;
  const int64_t step_x = B * d.o, step_u = B * d.du;

  const auto* x0 = static_cast<const scalar_t*>(p.x0);
  const auto* u = static_cast<const scalar_t*>(p.u);
  auto* y = static_cast<scalar_t*>(p.y);

  float* ring = smem + L.ring;        // (slots, R, O_pad)
  float* u_stage = smem + L.u_stage;  // (S, R, Du_pad)
  float* h = smem + L.h;              // (R, H_pad)
  float* w1 = smem + L.w1;
  float* w2 = smem + L.w2;
  float* b1 = smem + L.b1;
  float* b2 = smem + L.b2;

  zero_fill(smem, L.total);
  __syncthreads();
  load_w1(w1, static_cast<const scalar_t*>(p.w1), d, L);
  load_w2(w2, static_cast<const scalar_t*>(p.w2), d, L);
  load_vector(b1, static_cast<const scalar_t*>(p.b1), d.h);
  load_vector(b2, static_cast<const scalar_t*>(p.b2), d.o);

  const int ring_slot = R * L.o_pad;
  const int u_step = R * L.du_pad;
  for (int64_t tile = blockIdx.x; tile < p.tiles; tile += gridDim.x) {
    const int64_t row0 = tile * R;
    const int rows_valid = static_cast<int>(B - row0 < R ? B - row0 : R);
    // The previous tile's last step ended with a barrier, so the ring is free to refill.
    stage_rows<scalar_t>(ring, [&](int64_t t) { return x0 + t * step_x; }, 0, L.slots, row0, R, B,
                         d.o, L.o_pad);
    __syncthreads();

    int s = 0;     // t % S: position of step t in the staged chunk of u
    int slot = 0;  // t % k: ring slot of x_t, which y_t then replaces
    for (int64_t t = 0; t < T; ++t) {
      if (d.du > 0 && s == 0) {
        const int count = static_cast<int>(T - t < L.chunk ? T - t : L.chunk);
        stage_rows<scalar_t>(u_stage, [&](int64_t tt) { return u + tt * step_u; }, t, count, row0,
                             R, B, d.du, L.du_pad);
        __syncthreads();
      }
      float* x_t = ring + slot * ring_slot;

      const TileGemm layer1{{u_stage + s * u_step, x_t}, {L.du_pad, L.o_pad}, {L.du_pad, L.o_pad},
                           w1, L.ld1, b1, R, d.h};
      tile_gemm<kRB, WeightLayout::kRowPerOutput>(layer1, [&](int r, int n, float z) {
        h[r * L.h_pad + n] = z <= 0.f ? 0.f : z;  // keeps NaN, as torch.relu
      });
      __syncthreads();

      // x_t was consumed above (barrier), so its slot takes y_t: the input of step t + k.
      const TileGemm layer2{{h, nullptr}, {L.h_pad, 0}, {L.h_pad, 0}, w2, L.ld2, b2, R, d.o};
      scalar_t* y_t = y + t * step_x + row0 * d.o;
      tile_gemm<kRB, WeightLayout::kRowPerOutput>(layer2, [&](int r, int n, float v) {
        const scalar_t out = static_cast<scalar_t>(v);
        x_t[r * L.o_pad + n] = static_cast<float>(out);
        if (r < rows_valid) y_t[r * d.o + n] = out;
      });
      __syncthreads();

      if (++s == L.chunk) s = 0;
      if (++slot == L.slots) slot = 0;
    }
  }
}

}  // namespace cuda
}  // namespace fbfast
