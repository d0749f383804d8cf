// Command-line driver of the host emulation (host_emulation.h): runs the fused forward kernel,
// then the fused backward kernel and the gradient reduction, on inputs read from a file, with
// the launch plan of plan_rollout() for a pretend device (SM count, shared memory per block)
// and the parameters of set_rollout_params / set_backward_params, as the host code
// (rollout_cuda.cpp) fills them: x0's rows copied as gemm_path::read_x0 copies them, an
// ensemble's members on the grid's y axis, and a shared x0's or u's gradient summed over the
// members' own.
//
//   emulate_rollout IN OUT
// IN : int64 {dtype (0 float32, 1 float16, 2 bfloat16), activation (fbfast::Act), B, T, Du, L,
//      delay, truncate, has_u, num_sms, smem_limit_bytes, m, F, residual, E, x0_shared,
//      u_shared, tensor_cores (allowed: the plan still decides)}, float64 activation_param, then int64 widths[L] (out_l), has_bias[L],
//      mask[2 + 2L] (x0, u, w_1..w_L, b_1..b_L) and lags[m] (max = delay); then float32 arrays
//      x0 (delay, [E,] B, F), u (T, [E,] B, Du) if has_u, w_l ([E,] out_l, in_l) for every layer,
//      b_l ([E,] out_l) for the layers that have one, grad_y (T, [E,] B, O), all row-major. E = 0:
//      one network (no E axis anywhere); else an ensemble, whose x0 / u lack the E axis when
//      shared.
// OUT: float32 y, then each gradient that its mask entry asks for and that exists, in the mask's
//      order and its input's shape.
// Prints the forward and backward plans on stdout; exits non-zero on a plan that does not fit
// or an emulation error (host_emulation.h).
#include "host_emulation.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../backward_kernel.cuh"
#include "../forward_kernel.cuh"

namespace fbfast::cuda {
constexpr int64_t kSmemCapacity = int64_t(1) << 16;
// 128-byte aligned, like a GPU's dynamic shared memory: the tensor-core loads need 32.
alignas(128) float4 fbfast_smem[kSmemCapacity / 4];
}  // namespace fbfast::cuda

namespace {

namespace fc = fbfast::cuda;

struct Header {
  int64_t dtype, act, B, T, du, layers, delay, truncate, has_u, num_sms, smem_limit, m, f, residual, E, x0_shared,
      u_shared, tensor_cores;
};

// Everything the header describes once its variable-length part is read.
struct Problem {
  Header hd;
  double act_param;
  std::vector<int64_t> widths, has_bias, mask, lags;

  int64_t O() const { return widths.back(); }
  int64_t in(size_t l) const { return l == 0 ? hd.du + hd.m * hd.f : widths[l - 1]; }
  int64_t members() const { return hd.E > 0 ? hd.E : 1; }
  // Members along x0's and u's E axis: 1 when there is none (one network, or shared).
  int64_t x0_members() const { return hd.E > 0 && !hd.x0_shared ? hd.E : 1; }
  int64_t u_members() const { return hd.E > 0 && !hd.u_shared ? hd.E : 1; }
};

template <typename T>
std::vector<T> convert(const std::vector<float>& v) {
  return std::vector<T>(v.begin(), v.end());
}

template <typename T>
void append(std::vector<float>& out, const std::vector<T>& v) {
  for (const T& x : v) out.push_back(static_cast<float>(x));
}

// The members' own (steps, E, rest) gradients summed over E, in fp32 and rounded once, as the
// host's sum over the member axis does for a shared x0 or u.
template <typename T>
std::vector<T> sum_members(const std::vector<T>& v, int64_t steps, int64_t E) {
  const int64_t rest = static_cast<int64_t>(v.size()) / (steps * E);
  std::vector<T> out(steps * rest);
  for (int64_t t = 0; t < steps; ++t)
    for (int64_t i = 0; i < rest; ++i) {
      float sum = 0.f;
      for (int64_t e = 0; e < E; ++e) sum += static_cast<float>(v[(t * E + e) * rest + i]);
      out[t * rest + i] = T(sum);
    }
  return out;
}

// gemm_path::read_x0 (csrc/gemm_path.cpp) on the host's x0 (D, [E,] B, F), `step` elements per
// row: one lag copies rows [0, min(D, steps)); several copy rows [D - d_j, D - d_j + min(d_j,
// steps)) for each lag in turn, lag j's from base[j] on.
template <typename T>
std::vector<T> read_x0(const std::vector<T>& x0, int64_t step, const std::vector<int64_t>& lags, int64_t D,
                       int64_t steps, std::vector<int64_t>& base) {
  std::vector<T> rows;
  base.clear();
  auto copy = [&](int64_t first, int64_t n) {
    rows.insert(rows.end(), x0.begin() + first * step, x0.begin() + (first + n) * step);
  };
  if (lags.size() == 1) {
    base.push_back(0);
    copy(D - lags[0], std::min(lags[0], steps));
    return rows;
  }
  int64_t at = 0;
  for (const int64_t d : lags) {
    const int64_t n = std::min(d, steps);
    base.push_back(at);
    copy(D - d, n);
    at += n;
  }
  return rows;
}

void print_plan(const char* name, const fc::Plan& p) {
  std::printf(
      "%s rows=%d rows_per_item=%d chunk=%d slots=%lld threads=%d tiles=%lld blocks=%lld smem_bytes=%lld "
      "grads_global=%d tensor_cores=%d\n",
      name, p.rows, p.rows_per_item, p.lay.chunk, static_cast<long long>(p.lay.slots), p.threads,
      static_cast<long long>(p.tiles), static_cast<long long>(p.blocks), static_cast<long long>(p.lay.total * 4),
      p.lay.grads_global ? 1 : 0, p.tensor_cores ? 1 : 0);
}

float* smem() { return reinterpret_cast<float*>(fc::fbfast_smem); }

// On a GPU the tile GEMM's float4 loads fault unless 16-byte aligned, which the emulation does
// not enforce: every buffer offset, padded width and row stride must be a multiple of 4 floats
// (the tensor-core loads check their own 32-byte alignment, host_emulation.h); with tensor
// cores every buffer offset a multiple of 8.
bool aligned(const fc::SmemLayout& s, int layers) {
  if (s.tensor_cores) {
    std::vector<int64_t> starts{s.ring, s.u_stage, s.x_buf, s.x_stage, s.gy_stage, s.act[0], s.act[1], s.tc_scratch};
    for (int l = 0; l < layers; ++l)
      starts.insert(starts.end(), {s.layer[l].w, s.layer[l].b, s.layer[l].hidden, s.layer[l].pre});
    for (const int64_t v : starts)
      if (v % 8) return false;
  }
  std::vector<int64_t> values{s.ring,   s.u_stage, s.x_buf, s.x_stage, s.gy_stage, s.act[0], s.act[1],  s.total,
                              s.du_pad, s.o_pad,   s.f_pad, s.x_pad,   s.ring_pad, s.act_pad};
  for (int l = 0; l < layers; ++l) {
    const fc::LayerLayout& layer = s.layer[l];
    values.insert(values.end(), {layer.in_pad, layer.out_pad, layer.ld, layer.w, layer.b, layer.hidden, layer.pre});
    // Accumulators in global memory are read and written element by element, at any offset.
    if (!s.grads_global) values.insert(values.end(), {layer.dw, layer.db});
    if (layer.ld % 32 != 4) return false;
  }
  for (const int64_t v : values)
    if (v % 4) return false;
  return true;
}

template <typename T>
int run(const Problem& pr, std::vector<std::vector<float>>& in, std::vector<float>& out) {
  const Header& hd = pr.hd;
  const int L = static_cast<int>(hd.layers);
  const int64_t E = pr.members();
  std::vector<int> widths(pr.widths.begin(), pr.widths.end());
  fc::Dims d = fc::make_dims(hd.T, hd.B, static_cast<int>(hd.du), L, widths.data(), hd.delay, hd.truncate);
  fc::set_feedback(d, static_cast<int>(hd.m), pr.lags.data(), static_cast<int>(hd.f), hd.residual != 0);
  d.members = E;
  const auto act = static_cast<fbfast::Act>(hd.act);
  const auto dtype = static_cast<fc::Dtype>(hd.dtype);
  const float param = static_cast<float>(pr.act_param);
  const fc::Shared shared{hd.E > 0 && hd.x0_shared != 0, hd.E > 0 && hd.u_shared != 0};
  // in: x0, u, w_0 .. w_{L-1}, b_0 .. b_{L-1}, grad_y
  std::vector<int64_t> x0_base;
  const std::vector<T> x0_full = convert<T>(in[0]);
  const std::vector<T> x0 =
      read_x0(x0_full, pr.x0_members() * hd.B * hd.f, pr.lags, hd.delay, hd.T, x0_base);
  std::vector<T> u = convert<T>(in[1]), grad_y = convert<T>(in[2 + 2 * L]);
  std::vector<std::vector<T>> w(L), b(L);
  std::vector<const void*> w_ptr(L), b_ptr(L);
  for (int l = 0; l < L; ++l) {
    w[l] = convert<T>(in[2 + l]);
    b[l] = convert<T>(in[2 + L + l]);
    w_ptr[l] = w[l].data();
    b_ptr[l] = pr.has_bias[l] ? b[l].data() : nullptr;
  }
  std::vector<T> y(hd.T * E * hd.B * pr.O(), T(NAN));

  const bool tc = hd.tensor_cores != 0;
  const fc::Plan pf = fc::plan_rollout(d, false, act, static_cast<int>(hd.num_sms), hd.smem_limit, tc);
  const fc::Plan pb = fc::plan_rollout(d, true, act, static_cast<int>(hd.num_sms), hd.smem_limit, tc);
  if (!pf.fused || !pb.fused) {
    std::fprintf(stderr, "plan does not fit: forward %d backward %d\n", pf.fused, pb.fused);
    return 3;
  }
  print_plan("forward", pf);
  print_plan("backward", pb);
  if (!aligned(pf.lay, L) || !aligned(pb.lay, L)) {
    std::fprintf(stderr, "shared-memory layout not 16-byte aligned\n");
    return 3;
  }

  fc::RolloutParams fp{};
  fc::set_rollout_params(fp, d, pf, dtype, param, x0.data(), x0_base.data(), hd.has_u ? u.data() : nullptr, shared,
                         w_ptr.data(), b_ptr.data(), y.data());
  if (!fbfast::emulation::launch(fc::forward_kernel(fp.act, fp.rows_per_item), fp.blocks, E, fp.threads,
                                 fp.lay.total, smem(), fc::kSmemCapacity, fp))
    return 4;
  append(out, y);

  // Outputs that the host allocates with at::empty start as NaN here, so a missed element shows;
  // grad_x0 is zero-filled for version 1's feedback, whose kernel writes only the rows it reads.
  // x0's and u's gradients are every member's own, (steps, E, B, .), summed below when shared.
  const bool want_x0 = pr.mask[0], want_u = pr.mask[1] && hd.has_u;
  std::vector<T> gx0(hd.delay * E * hd.B * hd.f, T(d.plain() ? 0.f : NAN)), gu(hd.T * E * hd.B * hd.du, T(NAN));
  std::vector<std::vector<T>> gw(L), gb(L);
  std::vector<void*> gw_ptr(L), gb_ptr(L);
  bool any_weight = false;
  for (int l = 0; l < L; ++l) {
    gw[l].assign(w[l].size(), T(NAN));
    gb[l].assign(E * pr.widths[l], T(NAN));
    gw_ptr[l] = pr.mask[2 + l] ? gw[l].data() : nullptr;
    gb_ptr[l] = pr.mask[2 + L + l] && pr.has_bias[l] ? gb[l].data() : nullptr;
    any_weight = any_weight || gw_ptr[l] || gb_ptr[l];
  }
  std::vector<float> workspace;
  if (fc::uses_workspace(pb) && any_weight) workspace.assign(E * pb.blocks * fc::grad_elements(d), NAN);
  fc::BackwardParams bp{};
  fc::set_backward_params(bp, d, pb, dtype, param, x0.data(), x0_base.data(), hd.has_u ? u.data() : nullptr, shared,
                          w_ptr.data(), b_ptr.data(), y.data(), grad_y.data(), want_x0 ? gx0.data() : nullptr,
                          want_u ? gu.data() : nullptr, gw_ptr.data(), gb_ptr.data(),
                          workspace.empty() ? nullptr : workspace.data());
  if (!fbfast::emulation::launch(fc::backward_kernel(bp.act, bp.rows_per_item), bp.blocks, E, bp.threads,
                                 bp.lay.total, smem(), fc::kSmemCapacity, bp))
    return 4;
  if (bp.workspace) {
    // A small grid, so that each thread reduces several elements (the grid-stride loop).
    if (!fbfast::emulation::launch(fc::reduce_gradients_kernel, 2, E, 32, 0, smem(), fc::kSmemCapacity, bp)) return 4;
  }
  if (want_x0) append(out, pr.x0_members() == E ? gx0 : sum_members(gx0, hd.delay, E));
  if (want_u) append(out, pr.u_members() == E ? gu : sum_members(gu, hd.T, E));
  for (int l = 0; l < L; ++l)
    if (gw_ptr[l]) append(out, gw[l]);
  for (int l = 0; l < L; ++l)
    if (gb_ptr[l]) append(out, gb[l]);
  return 0;
}

template <typename V>
bool read(FILE* f, V* data, size_t n) {
  return n == 0 || std::fread(data, sizeof(V), n, f) == n;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s IN OUT\n", argv[0]);
    return 2;
  }
  FILE* f = std::fopen(argv[1], "rb");
  if (!f) return 2;
  Problem pr{};
  if (!read(f, &pr.hd, 1) || !read(f, &pr.act_param, 1)) return 2;
  const int64_t L = pr.hd.layers, m = pr.hd.m;
  if (L < 1 || L > fc::kMaxLayers) {
    std::fprintf(stderr, "layers must be 1 .. %d, got %lld\n", fc::kMaxLayers, static_cast<long long>(L));
    return 2;
  }
  if (m < 1 || m > fc::kMaxLags) {
    std::fprintf(stderr, "lags must be 1 .. %d, got %lld\n", fc::kMaxLags, static_cast<long long>(m));
    return 2;
  }
  pr.widths.resize(L);
  pr.has_bias.resize(L);
  pr.mask.resize(2 + 2 * L);
  pr.lags.resize(m);
  if (!read(f, pr.widths.data(), L) || !read(f, pr.has_bias.data(), L) || !read(f, pr.mask.data(), 2 + 2 * L) ||
      !read(f, pr.lags.data(), m))
    return 2;
  const Header& hd = pr.hd;
  const int64_t E = pr.members();
  // x0, u, w_0 .. w_{L-1}, b_0 .. b_{L-1}, grad_y; absent ones empty.
  std::vector<int64_t> sizes{hd.delay * pr.x0_members() * hd.B * hd.f,
                             hd.has_u ? hd.T * pr.u_members() * hd.B * hd.du : 0};
  for (int64_t l = 0; l < L; ++l) sizes.push_back(E * pr.widths[l] * pr.in(l));
  for (int64_t l = 0; l < L; ++l) sizes.push_back(pr.has_bias[l] ? E * pr.widths[l] : 0);
  sizes.push_back(hd.T * E * hd.B * pr.O());
  std::vector<std::vector<float>> in(sizes.size());
  for (size_t i = 0; i < sizes.size(); ++i) {
    in[i].resize(sizes[i]);
    if (!read(f, in[i].data(), sizes[i])) return 2;
  }
  std::fclose(f);
  std::vector<float> out;
  int rc = 2;
  if (hd.dtype == 0) rc = run<float>(pr, in, out);
  if (hd.dtype == 1) rc = run<c10::Half>(pr, in, out);
  if (hd.dtype == 2) rc = run<c10::BFloat16>(pr, in, out);
  if (rc) return rc;
  FILE* g = std::fopen(argv[2], "wb");
  if (!g || std::fwrite(out.data(), sizeof(float), out.size(), g) != out.size()) return 2;
  std::fclose(g);
  return 0;
}
