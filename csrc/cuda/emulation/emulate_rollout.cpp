// Command-line driver of the host emulation (host_emulation.h): runs the fused forward kernel,
// then the fused backward kernel and the gradient reduction, on inputs read from a file, with
// the launch plan of plan_rollout() for a pretend device (SM count, shared memory per block).
//
//   emulate_rollout IN OUT
// IN : int64 header {dtype (0 float32, 1 float16, 2 bfloat16), B, T, Du, O, H, delay, truncate,
//      has_u, has_b1, has_b2, num_sms, smem_limit_bytes, mask[6]}, then float32 arrays x0, u?,
//      w1, b1?, w2, b2?, grad_y (row-major, shapes of docs/spec.md §1 with x0 as (delay, B, O)).
// OUT: float32 y, then each gradient whose mask bit is set (x0, u, w1, b1, w2, b2).
// Prints the forward and backward plans on stdout; exits non-zero on a plan that does not fit
// or an emulation error (host_emulation.h).
#include "host_emulation.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../backward_kernel.cuh"
#include "../forward_kernel.cuh"

namespace fbfast::cuda {
constexpr int64_t kSmemCapacity = int64_t(1) << 16;
float4 fbfast_smem[kSmemCapacity / 4];
}  // namespace fbfast::cuda

namespace {

using fbfast::cuda::BackwardParams;
using fbfast::cuda::Dims;
using fbfast::cuda::ForwardParams;
using fbfast::cuda::Plan;

struct Header {
  int64_t dtype, B, T, du, o, h, delay, truncate, has_u, has_b1, has_b2, num_sms, smem_limit;
  int64_t mask[6];
};

template <typename T>
std::vector<T> convert(const std::vector<float>& v) {
  return std::vector<T>(v.begin(), v.end());
}

template <typename T>
void append(std::vector<float>& out, const std::vector<T>& v) {
  for (const T& x : v) out.push_back(static_cast<float>(x));
}

void print_plan(const char* name, const Plan& p) {
  std::printf("%s rows=%d rows_per_item=%d chunk=%d threads=%d tiles=%lld blocks=%lld smem_bytes=%lld\n",
              name, p.rows, p.rows_per_item, p.lay.chunk, p.threads, static_cast<long long>(p.tiles),
              static_cast<long long>(p.blocks), static_cast<long long>(p.lay.total * 4));
}

float* smem() { return reinterpret_cast<float*>(fbfast::cuda::fbfast_smem); }

// On a GPU the tile GEMM's float4 loads fault unless 16-byte aligned, which the emulation does
// not enforce: every buffer offset, padded width and row stride must be a multiple of 4 floats.
bool aligned(const fbfast::cuda::SmemLayout& L) {
  const int64_t values[] = {L.ring, L.u_stage, L.x_stage, L.gy_stage, L.h,     L.g,      L.dz,
                            L.w1,   L.w2,      L.b1,      L.b2,       L.dw1,   L.db1,    L.dw2,
                            L.db2,  L.total,   L.du_pad,  L.o_pad,    L.h_pad, L.ld1,    L.ld2};
  for (const int64_t v : values)
    if (v % 4) return false;
  return L.ld1 % 32 == 4 && L.ld2 % 32 == 4;
}

template <typename T>
int run(const Header& hd, std::vector<std::vector<float>>& in, std::vector<float>& out) {
  namespace fc = fbfast::cuda;
  const Dims d{hd.T, hd.B, static_cast<int>(hd.du), static_cast<int>(hd.o), static_cast<int>(hd.h),
               hd.delay, hd.truncate};
  std::vector<T> x0 = convert<T>(in[0]), u = convert<T>(in[1]), w1 = convert<T>(in[2]);
  std::vector<T> b1 = convert<T>(in[3]), w2 = convert<T>(in[4]), b2 = convert<T>(in[5]);
  std::vector<T> grad_y = convert<T>(in[6]);
  const int64_t ny = hd.T * hd.B * hd.o;
  std::vector<T> y(ny, T(NAN));

  const Plan pf = fc::plan_rollout(d, false, static_cast<int>(hd.num_sms), hd.smem_limit);
  const Plan pb = fc::plan_rollout(d, true, static_cast<int>(hd.num_sms), hd.smem_limit);
  if (!pf.fused || !pb.fused) {
    std::fprintf(stderr, "plan does not fit: forward %d backward %d\n", pf.fused, pb.fused);
    return 3;
  }
  print_plan("forward", pf);
  print_plan("backward", pb);
  if (!aligned(pf.lay) || !aligned(pb.lay)) {
    std::fprintf(stderr, "shared-memory layout not 16-byte aligned\n");
    return 3;
  }

  ForwardParams fp{};
  fp.dims = d;
  fp.lay = pf.lay;
  fp.rows_per_item = pf.rows_per_item;
  fp.threads = pf.threads;
  fp.tiles = pf.tiles;
  fp.blocks = pf.blocks;
  fp.x0 = x0.data();
  fp.u = hd.has_u ? u.data() : nullptr;
  fp.w1 = w1.data();
  fp.b1 = hd.has_b1 ? b1.data() : nullptr;
  fp.w2 = w2.data();
  fp.b2 = hd.has_b2 ? b2.data() : nullptr;
  fp.y = y.data();
  auto fwd = pf.rows_per_item == 4 ? fc::rollout_forward_kernel<T, 4> : fc::rollout_forward_kernel<T, 1>;
  if (!fbfast::emulation::launch(fwd, pf.blocks, pf.threads, pf.lay.total, smem(), fc::kSmemCapacity, fp))
    return 4;
  append(out, y);

  // Outputs that the host allocates with at::empty start as NaN here, so a missed element shows.
  std::vector<T> gx0(x0.size(), T(0)), gu(u.size(), T(NAN)), gw1(w1.size(), T(NAN));
  std::vector<T> gb1(hd.h, T(NAN)), gw2(w2.size(), T(NAN)), gb2(hd.o, T(NAN));
  BackwardParams bp{};
  bp.dims = d;
  bp.lay = pb.lay;
  bp.rows_per_item = pb.rows_per_item;
  bp.threads = pb.threads;
  bp.tiles = pb.tiles;
  bp.blocks = pb.blocks;
  bp.grad_y = grad_y.data();
  bp.y = y.data();
  bp.x0 = x0.data();
  bp.u = hd.has_u ? u.data() : nullptr;
  bp.w1 = w1.data();
  bp.b1 = hd.has_b1 ? b1.data() : nullptr;
  bp.w2 = w2.data();
  bp.grad_x0 = hd.mask[0] ? gx0.data() : nullptr;
  bp.grad_u = hd.mask[1] && hd.has_u ? gu.data() : nullptr;
  bp.grad_w1 = hd.mask[2] ? gw1.data() : nullptr;
  bp.grad_b1 = hd.mask[3] && hd.has_b1 ? gb1.data() : nullptr;
  bp.grad_w2 = hd.mask[4] ? gw2.data() : nullptr;
  bp.grad_b2 = hd.mask[5] ? gb2.data() : nullptr;
  const bool any_weight = bp.grad_w1 || bp.grad_b1 || bp.grad_w2 || bp.grad_b2;
  std::vector<float> workspace;
  if (pb.blocks > 1 && any_weight) {
    workspace.assign(pb.blocks * fc::grad_offsets(d).total, NAN);
    bp.workspace = workspace.data();
  }
  auto bwd = pb.rows_per_item == 4 ? fc::rollout_backward_kernel<T, 4> : fc::rollout_backward_kernel<T, 1>;
  if (!fbfast::emulation::launch(bwd, pb.blocks, pb.threads, pb.lay.total, smem(), fc::kSmemCapacity, bp))
    return 4;
  if (bp.workspace) {
    // A small grid, so that each thread reduces several elements (the grid-stride loop).
    if (!fbfast::emulation::launch(fc::reduce_gradients_kernel<T>, 2, 32, 0, smem(), fc::kSmemCapacity, bp))
      return 4;
  }
  if (hd.mask[0]) append(out, gx0);
  if (hd.mask[1] && hd.has_u) append(out, gu);
  if (hd.mask[2]) append(out, gw1);
  if (hd.mask[3] && hd.has_b1) append(out, gb1);
  if (hd.mask[4]) append(out, gw2);
  if (hd.mask[5]) append(out, gb2);
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s IN OUT\n", argv[0]);
    return 2;
  }
  FILE* f = std::fopen(argv[1], "rb");
  if (!f) return 2;
  Header hd{};
  if (std::fread(&hd, sizeof(hd), 1, f) != 1) return 2;
  const int64_t k1 = hd.du + hd.o;
  const int64_t sizes[7] = {hd.delay * hd.B * hd.o, hd.has_u ? hd.T * hd.B * hd.du : 0, hd.h * k1,
                            hd.has_b1 ? hd.h : 0, hd.o * hd.h, hd.has_b2 ? hd.o : 0, hd.T * hd.B * hd.o};
  std::vector<std::vector<float>> in(7);
  for (int i = 0; i < 7; ++i) {
    in[i].resize(sizes[i]);
    if (sizes[i] && std::fread(in[i].data(), sizeof(float), sizes[i], f) != static_cast<size_t>(sizes[i])) return 2;
  }
  std::fclose(f);
  std::vector<float> out;
  int rc = 2;
  if (hd.dtype == 0) rc = run<float>(hd, in, out);
  if (hd.dtype == 1) rc = run<c10::Half>(hd, in, out);
  if (hd.dtype == 2) rc = run<c10::BFloat16>(hd, in, out);
  if (rc) return rc;
  FILE* g = std::fopen(argv[2], "wb");
  if (!g || std::fwrite(out.data(), sizeof(float), out.size(), g) != out.size()) return 2;
  std::fclose(g);
  return 0;
}
