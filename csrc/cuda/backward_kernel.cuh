// The fused backward of the rollout: one reverse-time sweep that recomputes z_t from Y (nothing
// but the forward's inputs and output is saved) and produces every gradient of docs/spec.md §1.
//
// Same structure as the forward (forward_kernel.cuh): a block owns a tile of rows, the weights
// stay in shared memory, and the grid is persistent. Per step t, from T-1 down to 0:
//   h   = relu(W1 [u_t ; x_t] + b1)          recomputed with the forward's exact arithmetic
//   g   = dL/dy_t + ring[t % k]              the ring holds the adjoint of y_t sent by step t+k
//   dz  = (g W2) masked where h <= 0         as torch's threshold_backward
//   dx  = dz W1x -> ring[t % k] (the adjoint of y_{t-k}; zero where truncation cuts the edge
//          y_{t-k} -> x_t), or dL/dx0[t] when t < k;   du_t = dz W1u
//   dW2 += g^T h, db2 += sum g, dW1 += dz^T [u_t ; x_t], db1 += sum dz
// The weight gradients accumulate in fp32 in shared memory, per block, over all its tiles and
// steps. With several blocks each writes its partials to a workspace row and
// reduce_gradients_kernel sums the rows in block order: no atomics, so the result is the same
// on every run.
#pragma once

#include "tile_common.cuh"

namespace fbfast {
namespace cuda {

template <typename scalar_t, int kRB>
__global__ void __launch_bounds__(kMaxThreads) rollout_backward_kernel(const BackwardParams p) {
  extern __shared__ float4 fbfast_smem[];
  float* smem = reinterpret_cast<float*>(fbfast_smem);
  const Dims& d = p.dims;
  const SmemLayout& L = p.lay;
  const int R = L.rows;
  const int64_t B = d.batch, T = d.steps, k = d.delay;
  const int64_t step_x = B * d.o, step_u = B * d.du;
  const int k1 = d.du + d.o;

  const auto* grad_y = static_cast<const scalar_t*>(p.grad_y);
  const auto* y = static_cast<const scalar_t*>(p.y);
  const auto* x0 = static_cast<const scalar_t*>(p.x0);
  const auto* u = static_cast<const scalar_t*>(p.u);
  auto* grad_x0 = static_cast<scalar_t*>(p.grad_x0);
  auto* grad_u = static_cast<scalar_t*>(p.grad_u);
  const bool want_w1 = p.grad_w1 != nullptr, want_b1 = p.grad_b1 != nullptr;
  const bool want_w2 = p.grad_w2 != nullptr, want_b2 = p.grad_b2 != nullptr;

  float* ring = smem + L.ring;          // (slots, R, O_pad) adjoints of y
  float* u_stage = smem + L.u_stage;    // (S, R, Du_pad)
  float* x_stage = smem + L.x_stage;    // (S, R, O_pad)
  float* gy_stage = smem + L.gy_stage;  // (S, R, O_pad)
  float* h = smem + L.h;                // (R, H_pad)
  float* g = smem + L.g;                // (R, O_pad)
  float* dz = smem + L.dz;              // (R, H_pad)
  float* w1 = smem + L.w1;
  float* w2 = smem + L.w2;
  float* b1 = smem + L.b1;
  float* dw1 = smem + L.dw1;
  float* db1 = smem + L.db1;
  float* dw2 = smem + L.dw2;
  float* db2 = smem + L.db2;

  zero_fill(smem, L.total);
  __syncthreads();
  load_w1(w1, static_cast<const scalar_t*>(p.w1), d, L);
  load_w2(w2, static_cast<const scalar_t*>(p.w2), d, L);
  load_vector(b1, static_cast<const scalar_t*>(p.b1), d.h);

  const int ring_slot = R * L.o_pad;
  const int u_step = R * L.du_pad, x_step = R * L.o_pad;
  for (int64_t tile = blockIdx.x; tile < p.tiles; tile += gridDim.x) {
    const int64_t row0 = tile * R;
    const int rows_valid = static_cast<int>(B - row0 < R ? B - row0 : R);
    // No adjoint reaches y_t from beyond the last step. The previous tile ended with a barrier.
    zero_fill(ring, int64_t(L.slots) * ring_slot);

    int s = static_cast<int>((T - 1) % L.chunk);  // t % S
    int slot = static_cast<int>((T - 1) % L.slots);  // t % k
    for (int64_t t = T - 1; t >= 0; --t) {
      if (t == T - 1 || s == L.chunk - 1) {
        // Steps [t - s, t] of u, x and dL/dY, the chunk this reverse sweep enters now.
        const int64_t chunk_start = t - s;
        const int count = s + 1;
        if (d.du > 0)
          stage_rows<scalar_t>(u_stage, [&](int64_t tt) { return u + tt * step_u; }, chunk_start,
                               count, row0, R, B, d.du, L.du_pad);
        stage_rows<scalar_t>(
            x_stage, [&](int64_t tt) { return tt < k ? x0 + tt * step_x : y + (tt - k) * step_x; },
            chunk_start, count, row0, R, B, d.o, L.o_pad);
        stage_rows<scalar_t>(gy_stage, [&](int64_t tt) { return grad_y + tt * step_x; },
                             chunk_start, count, row0, R, B, d.o, L.o_pad);
        __syncthreads();
      }
      const float* u_t = u_stage + s * u_step;
      const float* x_t = x_stage + s * x_step;
      const float* gy_t = gy_stage + s * x_step;
      float* adj = ring + slot * ring_slot;

      const TileGemm layer1{{u_t, x_t}, {L.du_pad, L.o_pad}, {L.du_pad, L.o_pad}, w1, L.ld1, b1, R, d.h};
      tile_gemm<kRB, WeightLayout::kRowPerOutput>(layer1, [&](int r, int n, float z) {
        h[r * L.h_pad + n] = z <= 0.f ? 0.f : z;
      });
      for (int i = threadIdx.x; i < ring_slot; i += blockDim.x) g[i] = gy_t[i] + adj[i];
      __syncthreads();

      const TileGemm through_w2{{g, nullptr}, {L.o_pad, 0}, {L.o_pad, 0}, w2, L.ld2, nullptr, R, d.h};
      tile_gemm<kRB, WeightLayout::kRowPerInput>(through_w2, [&](int r, int n, float v) {
        dz[r * L.h_pad + n] = h[r * L.h_pad + n] <= 0.f ? 0.f : v;
      });
      if (want_w2 && d.h > 0) {
        for (StridedIndex e(threadIdx.x, blockDim.x, d.h); e.row < d.o; e.advance(d.h)) {
          float acc = dw2[e.row * L.ld2 + e.col];
          for (int r = 0; r < rows_valid; ++r)
            acc = fmaf(g[r * L.o_pad + e.row], h[r * L.h_pad + e.col], acc);
          dw2[e.row * L.ld2 + e.col] = acc;
        }
      }
      if (want_b2) {
        for (int o = threadIdx.x; o < d.o; o += blockDim.x) {
          float acc = db2[o];
          for (int r = 0; r < rows_valid; ++r) acc += g[r * L.o_pad + o];
          db2[o] = acc;
        }
      }
      __syncthreads();

      // The adjoint slot was read into g above (barrier); it now takes the adjoint of y_{t-k}.
      const bool to_ring = t >= k;
      const bool cut = to_ring && d.truncate > 0 && t % d.truncate == 0;
      if (cut) {
        for (int i = threadIdx.x; i < ring_slot; i += blockDim.x) adj[i] = 0.f;
      } else if (to_ring || grad_x0) {
        scalar_t* gx0_t = to_ring ? nullptr : grad_x0 + t * step_x + row0 * d.o;
        const TileGemm through_w1x{
            {dz, nullptr}, {L.h_pad, 0}, {L.h_pad, 0}, w1 + L.du_pad, L.ld1, nullptr, R, d.o};
        tile_gemm<kRB, WeightLayout::kRowPerInput>(through_w1x, [&](int r, int n, float v) {
          if (to_ring)
            adj[r * L.o_pad + n] = v;
          else if (r < rows_valid)
            gx0_t[r * d.o + n] = static_cast<scalar_t>(v);
        });
      }
      if (grad_u && d.du > 0) {
        scalar_t* gu_t = grad_u + t * step_u + row0 * d.du;
        const TileGemm through_w1u{
            {dz, nullptr}, {L.h_pad, 0}, {L.h_pad, 0}, w1, L.ld1, nullptr, R, d.du};
        tile_gemm<kRB, WeightLayout::kRowPerInput>(through_w1u, [&](int r, int n, float v) {
          if (r < rows_valid) gu_t[r * d.du + n] = static_cast<scalar_t>(v);
        });
      }
      if (want_w1 && d.h > 0) {
        for (StridedIndex e(threadIdx.x, blockDim.x, k1); e.row < d.h; e.advance(k1)) {
          const bool is_u = e.col < d.du;
          const float* in = is_u ? u_t + e.col : x_t + (e.col - d.du);
          const int ld_in = is_u ? L.du_pad : L.o_pad;
          float* w = dw1 + e.row * L.ld1 + (is_u ? e.col : L.du_pad + e.col - d.du);
          float acc = *w;
          for (int r = 0; r < rows_valid; ++r) acc = fmaf(dz[r * L.h_pad + e.row], in[r * ld_in], acc);
          *w = acc;
        }
      }
      if (want_b1) {
        for (int j = threadIdx.x; j < d.h; j += blockDim.x) {
          float acc = db1[j];
          for (int r = 0; r < rows_valid; ++r) acc += dz[r * L.h_pad + j];
          db1[j] = acc;
        }
      }
      __syncthreads();

      if (--s < 0) s = L.chunk - 1;
      if (--slot < 0) slot = L.slots - 1;
    }
  }

  // This block's weight gradients: to its workspace row, or (one block) straight to the outputs.
  const GradOffsets off = grad_offsets(d);
  float* partial = p.workspace ? p.workspace + blockIdx.x * off.total : nullptr;
  auto emit = [&](void* out, int64_t base, int64_t i, float v) {
    if (partial)
      partial[base + i] = v;
    else
      static_cast<scalar_t*>(out)[i] = static_cast<scalar_t>(v);
  };
  if (want_w1 && d.h > 0) {
    int i = threadIdx.x;
    for (StridedIndex e(threadIdx.x, blockDim.x, k1); e.row < d.h; e.advance(k1), i += blockDim.x) {
      const int cp = e.col < d.du ? e.col : L.du_pad + e.col - d.du;
      emit(p.grad_w1, off.w1, i, dw1[e.row * L.ld1 + cp]);
    }
  }
  if (want_b1)
    for (int j = threadIdx.x; j < d.h; j += blockDim.x) emit(p.grad_b1, off.b1, j, db1[j]);
  if (want_w2 && d.h > 0) {
    int i = threadIdx.x;
    for (StridedIndex e(threadIdx.x, blockDim.x, d.h); e.row < d.o; e.advance(d.h), i += blockDim.x)
      emit(p.grad_w2, off.w2, i, dw2[e.row * L.ld2 + e.col]);
  }
  if (want_b2)
    for (int o = threadIdx.x; o < d.o; o += blockDim.x) emit(p.grad_b2, off.b2, o, db2[o]);
}

// grad[i] = sum over blocks b = 0, 1, ... of workspace[b][i], in that order, cast to the
// parameter dtype. One thread per gradient element; reads are coalesced along i.
template <typename scalar_t>
__global__ void reduce_gradients_kernel(const BackwardParams p) {
  const GradOffsets off = grad_offsets(p.dims);
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < off.total; e += stride) {
    void* out;
    int64_t i;
    if (e < off.b1) {
      out = p.grad_w1, i = e - off.w1;
    } else if (e < off.w2) {
      out = p.grad_b1, i = e - off.b1;
    } else if (e < off.b2) {
      out = p.grad_w2, i = e - off.w2;
    } else {
      out = p.grad_b2, i = e - off.b2;
    }
    if (!out) continue;
    float sum = 0.f;
    for (int64_t b = 0; b < p.blocks; ++b) sum += p.workspace[b * off.total + e];
    static_cast<scalar_t*>(out)[i] = static_cast<scalar_t>(sum);
  }
}

}  // namespace cuda
}  // namespace fbfast
