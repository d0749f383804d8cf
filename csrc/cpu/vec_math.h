// The activations of csrc/common/activation.h on whole vectors, for the tile kernels
// (tile_kernels.h), which include no library header (so not <math.h> or ATen's vectorised
// math): exp from a range reduction and a polynomial, the other functions from exp, following
// ATen's formulas for each value and derivative (the same sides of the kinks, NaN and
// infinities passing as in torch).
//
// Accuracy, relative to the correctly rounded result: exp and expm1 within a few ulp in float32
// and float64, tanh (from expm1) and sigmoid likewise; the exact GELU in float32 through an erfc
// approximation with a relative error below 1.2e-7 (W. H. Press et al., Numerical Recipes, §6.2,
// "erfcc"), in float64 through the C library's erfc, lane by lane. tests/test_networks.py
// compares each activation's values and derivatives with torch's on every instruction set
// (tiny, large, NaN and infinite arguments included); tests/test_reliability.py runs NaN and
// infinities through whole rollouts.
//
// Included by tile_kernels.h inside namespace FBFAST_ISA, after Vec, load and store.
#pragma once

// Integer vectors of the same width, for the exponent arithmetic of exp.
template <typename T>
struct VecBits;
template <>
struct VecBits<float> {
  typedef int32_t type __attribute__((vector_size(FBFAST_VEC_BYTES)));
  static constexpr int kMantissa = 23, kBias = 127;
};
template <>
struct VecBits<double> {
  typedef int64_t type __attribute__((vector_size(FBFAST_VEC_BYTES)));
  static constexpr int kMantissa = 52, kBias = 1023;
};

// exp's range: above kHi the result is +inf, below kLo it is 0. ln 2 = kLn2Hi + kLn2Lo with
// kLn2Hi exact in few bits, so n * kLn2Hi is exact for every n in range (Cody and Waite).
template <typename T>
struct ExpConst;
template <>
struct ExpConst<float> {
  static constexpr float kHi = 88.72283935546875f, kLo = -103.972084f;
  static constexpr float kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
  static constexpr float kRound = 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
};
template <>
struct ExpConst<double> {
  static constexpr double kHi = 709.782712893384, kLo = -745.1332191019412;
  static constexpr double kLn2Hi = 6.93145751953125e-1, kLn2Lo = 1.42860682030941723212e-6;
  static constexpr double kRound = 6755399441055744.0;  // 1.5 * 2^52
};

template <typename T>
inline typename Vec<T>::type splat(T x) {
  return typename Vec<T>::type{} + x;
}

// 2^n for integral n in [-2 kBias, 2 kBias], as two normal factors (so that results near the
// overflow and underflow ends need no special case).
template <typename T>
inline typename Vec<T>::type pow2_halves(typename Vec<T>::type n, typename Vec<T>::type* second) {
  using VI = typename VecBits<T>::type;
  const VI ni = __builtin_convertvector(n, VI);
  const VI n1 = ni >> 1, n2 = ni - n1;
  *second = (typename Vec<T>::type)((n2 + VecBits<T>::kBias) << VecBits<T>::kMantissa);
  return (typename Vec<T>::type)((n1 + VecBits<T>::kBias) << VecBits<T>::kMantissa);
}

// The Taylor series of exp(r) - 1 = r + r^2/2 + ... for |r| <= ln(2) / 2: degree 7 leaves 3e-9
// (float), degree 13 leaves 4e-18 (double), relative to exp(r).
template <typename T>
inline typename Vec<T>::type expm1_taylor(typename Vec<T>::type r) {
  using V = typename Vec<T>::type;
  V q;
  if constexpr (sizeof(T) == 4) {
    q = splat<T>(T(1.0 / 5040));
    const T c[] = {T(1.0 / 720), T(1.0 / 120), T(1.0 / 24), T(1.0 / 6), T(0.5), T(1)};
    for (const T ci : c) q = q * r + ci;
  } else {
    q = splat<T>(T(1.0 / 6227020800.0));
    const T c[] = {T(1.0 / 479001600.0), T(1.0 / 39916800.0), T(1.0 / 3628800.0), T(1.0 / 362880.0),
                   T(1.0 / 40320.0),     T(1.0 / 5040.0),     T(1.0 / 720.0),     T(1.0 / 120.0),
                   T(1.0 / 24.0),        T(1.0 / 6.0),        T(0.5),             T(1)};
    for (const T ci : c) q = q * r + ci;
  }
  return q * r;
}

// exp(x) = 2^n (1 + q) with q = expm1(r), r = x - n ln 2, |r| <= ln(2) / 2 (Cody and Waite's range
// reduction); n and q of clamped x, shared by vexp and vexpm1.
template <typename T>
inline void exp_parts(typename Vec<T>::type x, typename Vec<T>::type* n, typename Vec<T>::type* q) {
  using C = ExpConst<T>;
  typename Vec<T>::type xc = x > C::kHi ? splat<T>(C::kHi) : x;  // comparisons with NaN are false: NaN stays
  xc = xc < C::kLo ? splat<T>(C::kLo) : xc;
  *n = (xc * T(1.4426950408889634) + C::kRound) - C::kRound;
  typename Vec<T>::type r = xc - *n * C::kLn2Hi;
  r = r - *n * C::kLn2Lo;
  *q = expm1_taylor<T>(r);
}

// exp(x), or with kMinusOne exp(x) - 1 without the cancellation of exp(x) - 1 near 0: the series
// itself where no range reduction happens (n = 0, |x| <= ln(2) / 2), 2^n (1 + q) - 1 beyond
// (where it loses no digits).
//
// Inlined or not, the same in every caller: the compiler may fuse a multiply inside an inlined
// copy with an add around it (1 + e^-z) into one FMA, and the tile backward's recomputed act(z)
// must be the forward's bits, whichever function computes it (activation_forward,
// activation_keep_rows, vact_value_slope). So exp, which GCC inlined in some callers and not
// in others, is never inlined, and expm1 (tanh's, on the NARX rollouts' critical path) always is.
#if defined(__GNUC__)
#define FBFAST_ALWAYS_INLINE inline __attribute__((always_inline))
#define FBFAST_NEVER_INLINE __attribute__((noinline))
#else
#define FBFAST_ALWAYS_INLINE inline
#define FBFAST_NEVER_INLINE inline
#endif
template <typename T, bool kMinusOne>
FBFAST_ALWAYS_INLINE typename Vec<T>::type vexp_impl(typename Vec<T>::type x) {
  using V = typename Vec<T>::type;
  using C = ExpConst<T>;
  V n, q, second;
  exp_parts<T>(x, &n, &q);
  const V first = pow2_halves<T>(n, &second);
  V result = (q + T(1)) * first * second;
  if constexpr (kMinusOne) result = n == T(0) ? q : result - T(1);
  result = x > C::kHi ? splat<T>(__builtin_inf()) : result;
  return x < C::kLo ? splat<T>(kMinusOne ? T(-1) : T(0)) : result;
}

template <typename T>
FBFAST_NEVER_INLINE typename Vec<T>::type vexp(typename Vec<T>::type x) {
  return vexp_impl<T, false>(x);
}

template <typename T>
FBFAST_ALWAYS_INLINE typename Vec<T>::type vexpm1(typename Vec<T>::type x) {
  return vexp_impl<T, true>(x);
}

// 1 / d for d in [1, 2] or NaN (tanh's divisor below). On AVX-512 in float32: the 14-bit
// reciprocal estimate and one Newton step, relative error below 2^-27 before rounding, instead
// of a division, whose throughput bounded the tanh loop (perf: about a third of its samples
// waited on vdivps; the NARX rollout of benchmarks/narx.py spent as long in tanh as in its
// GEMMs). Elsewhere, the division.
template <typename T>
inline typename Vec<T>::type vrecip_1_2(typename Vec<T>::type d) {
#if FBFAST_VEC_BYTES == 64 && defined(__GNUC__) && (defined(__x86_64__) || defined(_M_X64))
  if constexpr (sizeof(T) == 4) {
    using V = typename Vec<T>::type;
    const V r = __builtin_ia32_rcp14ps512_mask(d, V{}, static_cast<unsigned short>(0xffff));
    return r + r * (T(1) - d * r);
  }
#endif
  return T(1) / d;
}

template <typename T>
inline typename Vec<T>::type vtanh(typename Vec<T>::type z) {
  using V = typename Vec<T>::type;
  const V a = z < T(0) ? -z : z;
  const V em = vexpm1<T>(T(-2) * a);  // in [-1, 0]: em + 2 in [1, 2]
  const V t = -em * vrecip_1_2<T>(em + T(2));
  return z < T(0) ? -t : t;
}

template <typename T>
inline typename Vec<T>::type vsigmoid(typename Vec<T>::type z) {
  return T(1) / (T(1) + vexp<T>(-z));
}

// Phi(z) = P(N(0, 1) <= z) = erfc(-z / sqrt 2) / 2, the exact GELU's gate.
template <typename T>
inline typename Vec<T>::type vnormal_cdf(typename Vec<T>::type z) {
  using V = typename Vec<T>::type;
  constexpr T kSqrtHalf = T(0.7071067811865476);
  if constexpr (sizeof(T) == 8) {
    V out;
    for (int i = 0; i < Vec<T>::kWidth; ++i) out[i] = T(0.5) * __builtin_erfc(-z[i] * kSqrtHalf);
    return out;
  } else {
    const V a = (z < T(0) ? -z : z) * kSqrtHalf;
    const V t = T(1) / (T(1) + T(0.5) * a);
    const T c[] = {T(-0.82215223), T(1.48851587), T(-1.13520398), T(0.27886807), T(-0.18628806),
                   T(0.09678418),  T(0.37409196), T(1.00002368),  T(-1.26551223)};
    V poly = splat<T>(T(0.17087277));
    for (const T ci : c) poly = poly * t + ci;
    const V half_erfc = T(0.5) * t * vexp<T>(poly - a * a);  // erfc(a) / 2, a >= 0
    return z < T(0) ? half_erfc : T(1) - half_erfc;
  }
}

// h = act(z). The tile kernels apply ReLU in the GEMM epilogue instead; it is here for
// completeness of the table.
template <typename T>
inline typename Vec<T>::type vact_forward(int act, T param, typename Vec<T>::type z) {
  using V = typename Vec<T>::type;
  switch (static_cast<Act>(act)) {
    case Act::kRelu:
      return z <= T(0) ? V{} : z;
    case Act::kLeakyRelu:
      return z > T(0) ? z : z * param;
    case Act::kElu:
      return z > T(0) ? z : param * vexpm1<T>(z);
    case Act::kTanh:
      return vtanh<T>(z);
    case Act::kSigmoid:
      return vsigmoid<T>(z);
    case Act::kSilu:  // z sigmoid(z), as vact_value_slope computes it
      return z * vsigmoid<T>(z);
    case Act::kGelu:
      return z * vnormal_cdf<T>(z);
    case Act::kGeluTanh: {
      const V inner = T(0.7978845608028654) * (z + T(0.044715) * z * z * z);
      return T(0.5) * z * (T(1) + vtanh<T>(inner));
    }
    case Act::kMish: {
      // tanh(log(1 + e)) = n / (n + 2) with n = e (e + 2); above z = 40 it is 1 in both
      // precisions, and e^2 would overflow float32 from z = 44.
      const V e = vexp<T>(z);
      const V n = e * (e + T(2));
      const V tsp = z > T(40) ? splat<T>(T(1)) : n / (n + T(2));
      return z * tsp;
    }
  }
  return z;
}

// dL/dz from dL/dh = g, z and h (see act_needs_z for which one each reads).
template <typename T>
inline typename Vec<T>::type vact_backward(int act, T param, typename Vec<T>::type g, typename Vec<T>::type z,
                                           typename Vec<T>::type h) {
  using V = typename Vec<T>::type;
  switch (static_cast<Act>(act)) {
    case Act::kRelu:
      return h <= T(0) ? V{} : g;
    case Act::kLeakyRelu:
      return z > T(0) ? g : g * param;
    case Act::kElu:
      // As ATen's vectorised CPU kernel: a NaN z takes the exponential branch (NaN), where
      // its scalar formula (and CUDA's) would pass g.
      return z > T(0) ? g : g * param * vexp<T>(z);
    case Act::kTanh:
      return g * (T(1) - h * h);
    case Act::kSigmoid:
      return g * (T(1) - h) * h;
    case Act::kSilu: {
      const V s = vsigmoid<T>(z);
      return g * s * (T(1) + z * (T(1) - s));
    }
    case Act::kGelu: {
      const V pdf = vexp<T>(T(-0.5) * z * z) * T(0.3989422804014327);
      return g * (vnormal_cdf<T>(z) + z * pdf);
    }
    case Act::kGeluTanh: {
      constexpr T kBeta = T(0.7978845608028654), kKappa = T(0.044715);
      const V t = vtanh<T>(kBeta * (z + kKappa * z * z * z));
      const V d_right = T(0.5) * z * (T(1) - t * t) * kBeta * (T(1) + T(3) * kKappa * z * z);
      return g * (T(0.5) * (T(1) + t) + d_right);
    }
    case Act::kMish: {
      const V s = vsigmoid<T>(z);
      const V e = vexp<T>(z);
      const V n = e * (e + T(2));
      const V tsp = z > T(40) ? splat<T>(T(1)) : n / (n + T(2));
      return g * (tsp + z * s * (T(1) - tsp * tsp));
    }
  }
  return g;
}

// h = act(z), bit for bit vact_forward's, and act'(z), for the activations whose derivative
// reads z (act_needs_z): the backward's recomputation of a layer then takes one pass over z
// instead of a forward pass and a backward pass that each evaluate the activation's
// transcendental part. SiLU shares its sigmoid between the two.
template <typename T>
inline void vact_value_slope(int act, T param, typename Vec<T>::type z, typename Vec<T>::type& h,
                             typename Vec<T>::type& slope) {
  if (static_cast<Act>(act) == Act::kSilu) {
    const typename Vec<T>::type s = vsigmoid<T>(z);
    h = z * s;
    slope = s * (T(1) + z * (T(1) - s));
    return;
  }
  h = vact_forward<T>(act, param, z);
  slope = vact_backward<T>(act, param, splat<T>(T(1)), z, h);
}

// f over the n elements of a buffer, whole vectors at a time; the last partial vector reads
// into the buffer's slack (every tile buffer has one vector of it) and writes only its n
// valid elements, so no neighbouring buffer is touched.
template <typename T, typename F>
inline void for_each_vector(int64_t n, F&& f) {
  constexpr int W = Vec<T>::kWidth;
  int64_t i = 0;
  for (; i + W <= n; i += W) f(i, W);
  if (i < n) f(i, n - i);
}

template <typename T>
inline void store_first(T* p, typename Vec<T>::type v, int64_t count) {
  if (count == Vec<T>::kWidth) return store(p, v);
  for (int64_t j = 0; j < count; ++j) p[j] = v[j];
}

// Runs f(std::integral_constant-like tag) with the activation as a compile-time constant, so
// that the per-vector switch of vact_forward / vact_backward folds away inside the loops.
template <int A>
struct ActTag {
  static constexpr int value = A;
};
template <typename F>
inline void with_act(int act, F&& f) {
  switch (static_cast<Act>(act)) {
    case Act::kRelu: return f(ActTag<static_cast<int>(Act::kRelu)>{});
    case Act::kLeakyRelu: return f(ActTag<static_cast<int>(Act::kLeakyRelu)>{});
    case Act::kElu: return f(ActTag<static_cast<int>(Act::kElu)>{});
    case Act::kTanh: return f(ActTag<static_cast<int>(Act::kTanh)>{});
    case Act::kSigmoid: return f(ActTag<static_cast<int>(Act::kSigmoid)>{});
    case Act::kSilu: return f(ActTag<static_cast<int>(Act::kSilu)>{});
    case Act::kGelu: return f(ActTag<static_cast<int>(Act::kGelu)>{});
    case Act::kGeluTanh: return f(ActTag<static_cast<int>(Act::kGeluTanh)>{});
    case Act::kMish: return f(ActTag<static_cast<int>(Act::kMish)>{});
  }
}

// h = act(z) over n elements (h may be z).
template <typename T>
void activation_forward(int act, T param, const T* z, T* h, int64_t n) {
  with_act(act, [&](auto tag) {
    for_each_vector<T>(n, [&](int64_t i, int64_t count) {
      store_first<T>(h + i, vact_forward<T>(decltype(tag)::value, param, load(z + i)), count);
    });
  });
}

// The first count elements at p (the rest zero): a partial vector read from memory that may
// end right after them, such as the last row of a kept activation tensor.
template <typename T>
inline typename Vec<T>::type load_first(const T* p, int64_t count) {
  if (count == Vec<T>::kWidth) return load(p);
  typename Vec<T>::type v{};
  for (int64_t j = 0; j < count; ++j) v[j] = p[j];
  return v;
}

// For rows of n elements: z, read from a tile buffer (rows ld apart), is copied to keep (rows n
// apart) and replaced by h = act(z); one pass where a copy and an activation pass read z twice.
template <typename T>
void activation_keep_rows(int act, T param, T* z, int64_t ld, T* keep, int64_t rows, int64_t n) {
  with_act(act, [&](auto tag) {
    for (int64_t i = 0; i < rows; ++i)
      for_each_vector<T>(n, [&](int64_t j, int64_t count) {
        const typename Vec<T>::type zv = load(z + i * ld + j);
        store_first<T>(keep + i * n + j, zv, count);
        store_first<T>(z + i * ld + j, vact_forward<T>(decltype(tag)::value, param, zv), count);
      });
  });
}

// For rows of n elements: from z (rows z_ld apart: where the forward kept it, or a tile buffer),
// h = act(z) and slope = act'(z) into tile buffers (rows ld apart) by vact_value_slope; slope may
// be z itself. z is read a partial vector at a time at the end of each row, so it may be a kept
// tensor that ends there.
template <typename T>
void activation_value_slope_rows(int act, T param, const T* z, int64_t z_ld, T* h, T* slope, int64_t ld,
                                 int64_t rows, int64_t n) {
  using V = typename Vec<T>::type;
  with_act(act, [&](auto tag) {
    for (int64_t i = 0; i < rows; ++i)
      for_each_vector<T>(n, [&](int64_t j, int64_t count) {
        V hv, sv;
        vact_value_slope<T>(decltype(tag)::value, param, load_first<T>(z + i * z_ld + j, count), hv, sv);
        store_first<T>(h + i * ld + j, hv, count);
        store_first<T>(slope + i * ld + j, sv, count);
      });
  });
}

// dz = g * act'(z) over n elements (dz may be g); z or h may be null when not read.
template <typename T>
void activation_backward(int act, T param, const T* g, const T* z, const T* h, T* dz, int64_t n) {
  using V = typename Vec<T>::type;
  with_act(act, [&](auto tag) {
    for_each_vector<T>(n, [&](int64_t i, int64_t count) {
      const V zv = z ? load(z + i) : V{}, hv = h ? load(h + i) : V{};
      store_first<T>(dz + i, vact_backward<T>(decltype(tag)::value, param, load(g + i), zv, hv), count);
    });
  });
}
