// Portable SIMD building blocks of the CPU kernels: GCC/Clang vector extensions sized to the widest
// vector unit the build targets (-march=native), a vectorised exp2, and the storage dtypes
// (fp16 / bf16 load and store through fp32, round-to-nearest-even).
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <utility>

#if defined(__AVX512F__) || defined(__AVX2__) || defined(__FMA__)
#include <immintrin.h>
#endif

namespace dk {

#if defined(__AVX512F__)
constexpr int kVecBytes = 64;
#elif defined(__AVX__)
constexpr int kVecBytes = 32;
#else
constexpr int kVecBytes = 16;
#endif

template <typename T>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(kVecBytes)));
  typedef int32_t itype __attribute__((vector_size(kVecBytes)));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(kVecBytes)));
  typedef int64_t itype __attribute__((vector_size(kVecBytes)));
};
template <typename T>
using vec_t = typename VecOf<T>::type;
template <typename T>
constexpr int kLanes = kVecBytes / static_cast<int>(sizeof(T));

template <typename T>
inline vec_t<T> splat(T s) {
  return s - vec_t<T>{};  // s - 0 == s for every s (unlike 0 + s for s = -0): folds to a broadcast
}
template <typename T>
inline vec_t<T> loadu(const T* p) {
  vec_t<T> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T>
inline void storeu(T* p, vec_t<T> v) {
  std::memcpy(p, &v, sizeof(v));
}
template <typename V>
inline V vmax(V a, V b) {
  return a > b ? a : b;
}

// Bit l set iff lane l of the compare result m is set (all ones).
template <typename VI>
inline uint32_t lane_bits(VI m) {
#if defined(__AVX512F__)
  if constexpr (sizeof(m[0]) == 4 && sizeof(VI) == 64) return _mm512_test_epi32_mask((__m512i)m, (__m512i)m);
  if constexpr (sizeof(m[0]) == 8 && sizeof(VI) == 64) return _mm512_test_epi64_mask((__m512i)m, (__m512i)m);
#elif defined(__AVX__)
  // compare results are all-ones or all-zero lanes: their sign bits are the lane bits
  if constexpr (sizeof(m[0]) == 4 && sizeof(VI) == 32) return static_cast<uint32_t>(_mm256_movemask_ps((__m256)m));
  if constexpr (sizeof(m[0]) == 8 && sizeof(VI) == 32) return static_cast<uint32_t>(_mm256_movemask_pd((__m256d)m));
#endif
  uint32_t b = 0;
  for (size_t l = 0; l < sizeof(VI) / sizeof(m[0]); ++l) b |= (m[l] != 0 ? 1u : 0u) << l;
  return b;
}

// a * b + c as one fused instruction. GCC contracts a*b+c where it sees one (-ffp-contract=fast is
// its default in ISO C++ mode too), but only where the FMA ISA is enabled and the expression survives
// optimisation intact: the micro-kernels spell the FMA out so their rounding never depends on that.
#if defined(__AVX512F__)
#define DK_FMADD(sfx, a, b, c) _mm512_fmadd_##sfx(a, b, c)
#elif defined(__AVX__) && defined(__FMA__)
#define DK_FMADD(sfx, a, b, c) _mm256_fmadd_##sfx(a, b, c)
#else
#define DK_FMADD(sfx, a, b, c) a * b + c
#endif
inline vec_t<float> fmadd(vec_t<float> a, vec_t<float> b, vec_t<float> c) { return DK_FMADD(ps, a, b, c); }
inline vec_t<double> fmadd(vec_t<double> a, vec_t<double> b, vec_t<double> c) { return DK_FMADD(pd, a, b, c); }
#undef DK_FMADD

// 2^f for f in [-0.5, 0.5]: Cephes' exp2f polynomial, ~2e-7 relative.
inline vec_t<float> exp2_poly(vec_t<float> f) {
  vec_t<float> p = splat(1.535336188319500e-4f);
  p = fmadd(p, f, splat(1.339887440266574e-3f));
  p = fmadd(p, f, splat(9.618437357674640e-3f));
  p = fmadd(p, f, splat(5.550332471162809e-2f));
  p = fmadd(p, f, splat(2.402264791363012e-1f));
  p = fmadd(p, f, splat(6.931472028550421e-1f));
  return fmadd(p, f, splat(1.0f));
}

// 2^x lane-wise. Exactly 0 for x < -126 (and x = -inf); x <= 127 expected (softmax arguments are <= ~0).
// exp2_poly of x minus x rounded to the nearest integer, scaled by 2^round(x).
inline vec_t<float> exp2v(vec_t<float> x) {
#if defined(__AVX512F__)
  // AVX-512: round with vrndscaleps, scale with vscalefps, zero x < -126 (and -inf, NaN) by the mask.
  const __m512 xv = (__m512)x;
  // (the masked form with src = xv: GCC 12 warns about the undefined src of the plain one)
  const __m512 k = _mm512_mask_roundscale_ps(xv, (__mmask16)0xffff, xv, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(xv, k);
  const __m512 p = (__m512)exp2_poly((vec_t<float>)f);
  const __mmask16 keep = _mm512_cmp_ps_mask(xv, _mm512_set1_ps(-126.0f), _CMP_GE_OQ);
  return (vec_t<float>)_mm512_maskz_scalef_ps(keep, p, k);
#elif defined(__AVX2__) && defined(__FMA__)
  // AVX2: clamp with vmaxps / vminps (the selects of the portable code compile to compare + blend);
  // 2^k is y << 23 (the magic's bits shift out); x < -126 (and -inf, NaN) become 0 as on AVX-512.
  const __m256 xv = (__m256)x, lo = _mm256_set1_ps(-126.0f), magic = _mm256_set1_ps(12582912.0f);
  const __m256 xc = _mm256_min_ps(_mm256_max_ps(xv, lo), _mm256_set1_ps(127.0f));
  const __m256 y = _mm256_add_ps(xc, magic);  // 1.5 * 2^23 + round(xc)
  const __m256 f = _mm256_sub_ps(xc, _mm256_sub_ps(y, magic));
  const __m256 p = (__m256)exp2_poly((vec_t<float>)f);
  const __m256i scaled = _mm256_add_epi32(_mm256_castps_si256(p), _mm256_slli_epi32(_mm256_castps_si256(y), 23));
  return (vec_t<float>)_mm256_and_ps(_mm256_castsi256_ps(scaled), _mm256_cmp_ps(xv, lo, _CMP_GE_OQ));
#else
  using V = vec_t<float>;
  using VI = VecOf<float>::itype;
  const V lo = splat(-126.0f), hi = splat(127.0f);
  V xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const V magic = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
  V y = xc + magic;
  V k = y - magic;
  V f = xc - k;
  const V p = exp2_poly(f);
  VI ki = (VI)y - 0x4B400000;
  V r = (V)((VI)p + (ki << 23));
  return x < lo ? V{} : r;
#endif
}
// The float64 kernels are for accuracy, not speed: the libm exp2 lane by lane.
inline vec_t<double> exp2v(vec_t<double> x) {
  vec_t<double> r;
  for (int i = 0; i < kLanes<double>; ++i) r[i] = std::exp2(x[i]);
  return r;
}

// ---- in-register transpose --------------------------------------------------------------------
// Lanes [0, W/2) (lo) or [W/2, W) (hi) of a and b, interleaved: a0 b0 a1 b1 ...
template <typename V, size_t... I>
inline V zip_half(V a, V b, bool hi, std::index_sequence<I...>) {
  constexpr int W = sizeof(V) / sizeof(a[0]);
  return hi ? __builtin_shufflevector(a, b, ((I & 1) * W + W / 2 + I / 2)...)
            : __builtin_shufflevector(a, b, ((I & 1) * W + I / 2)...);
}

// r[0..W) (W vectors of W lanes) transposed in place: log2(W) rounds of interleaving row i with
// row i + W/2 (after the last round, lane j of row i holds what lane i of row j held). With AVX, 8 x 8
// floats by in-lane unpacks and shuffles and one 128-bit swap per row (24 instructions; the
// interleaving rounds cross 128-bit lanes in every round).
template <typename T>
inline void transpose(vec_t<T>* r) {
#if defined(__AVX__) && !defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value) {
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2)
      t[i] = _mm256_unpacklo_ps((__m256)r[i], (__m256)r[i + 1]), t[i + 1] = _mm256_unpackhi_ps((__m256)r[i], (__m256)r[i + 1]);
    for (int i = 0; i < 8; i += 4) {
      u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
      u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
      u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
      u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
    }
    for (int i = 0; i < 4; ++i) {
      r[i] = (vec_t<float>)_mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
      r[i + 4] = (vec_t<float>)_mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
    return;
  }
#endif
  constexpr int W = kLanes<T>;
  using Idx = std::make_index_sequence<W>;
  for (int step = 1; step < W; step *= 2) {
    vec_t<T> t[W];
    for (int i = 0; i < W / 2; ++i) {
      t[2 * i] = zip_half(r[i], r[i + W / 2], false, Idx{});
      t[2 * i + 1] = zip_half(r[i], r[i + W / 2], true, Idx{});
    }
    for (int i = 0; i < W; ++i) r[i] = t[i];
  }
}

// ---- storage dtypes -------------------------------------------------------------------------
struct bf16_t {
  uint16_t bits;
};
struct fp16_t {
  uint16_t bits;
};

enum DType : int { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

inline float half_to_float_portable(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1f, mant = h & 0x3ffu;
  if (exp == 0x1f) return bits_to_float(sign | 0x7f800000u | (mant << 13));
  if (exp == 0) {
    float v = std::ldexp((float)mant, -24);
    return sign ? -v : v;
  }
  return bits_to_float(sign | ((exp + 112) << 23) | (mant << 13));
}
inline uint16_t float_to_half_portable(float f) {
  uint32_t u = float_to_bits(f);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7fffffffu;
  if (a >= 0x7f800000u) return (uint16_t)(sign | 0x7c00u | (a > 0x7f800000u ? 0x200u : 0u));
  if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (a < 0x38800000u) {                                      // subnormal half (or zero)
    float v = std::fabs(f) * 16777216.0f;                      // in units of 2^-24
    return (uint16_t)(sign | (uint32_t)std::nearbyint(v));
  }
  uint32_t r = a + 0xfffu + ((a >> 13) & 1u);  // round to nearest even on the 13 dropped bits
  return (uint16_t)(sign | ((r - 0x38000000u) >> 13));
}

inline float to_compute(float x) { return x; }
inline double to_compute(double x) { return x; }
inline float to_compute(bf16_t x) { return bits_to_float((uint32_t)x.bits << 16); }
inline float to_compute(fp16_t x) {
#if defined(__FLT16_MAX__) && defined(__F16C__)
  _Float16 h;
  std::memcpy(&h, &x.bits, 2);
  return (float)h;
#else
  return half_to_float_portable(x.bits);
#endif
}

template <typename S>
inline S from_compute(float x);
template <typename S>
inline S from_compute(double x);
template <>
inline float from_compute<float>(float x) { return x; }
template <>
inline double from_compute<double>(double x) { return x; }
template <>
inline bf16_t from_compute<bf16_t>(float x) {
  uint32_t u = float_to_bits(x);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{(uint16_t)((u >> 16) | 0x40u)};  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16_t{(uint16_t)(u >> 16)};
}
template <>
inline fp16_t from_compute<fp16_t>(float x) {
#if defined(__FLT16_MAX__) && defined(__F16C__)
  _Float16 h = (_Float16)x;
  fp16_t r;
  std::memcpy(&r.bits, &h, 2);
  return r;
#else
  return fp16_t{float_to_half_portable(x)};
#endif
}

// dst[0, n) = src[0, n) in the compute type (the hot conversion of K/V/Q/dO rows for fp16/bf16).
template <typename S, typename T>
inline void convert_row(const S* __restrict src, T* __restrict dst, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = to_compute(src[j]);
}
inline void convert_row(const bf16_t* __restrict src, float* __restrict dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
#pragma GCC ivdep
  for (int64_t j = 0; j < n; ++j) dst[j] = bits_to_float((uint32_t)s[j] << 16);
}
inline void convert_row(const fp16_t* __restrict src, float* __restrict dst, int64_t n) {
  int64_t j = 0;
#if defined(__AVX512F__)
  for (; j + 16 <= n; j += 16)
    _mm512_storeu_ps(dst + j, _mm512_mask_cvtph_ps(_mm512_setzero_ps(), (__mmask16)0xffff,  // (GCC 12 -Wmaybe-uninitialized)
                                                   _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + j))));
#elif defined(__F16C__) && defined(__AVX__)
  for (; j + 8 <= n; j += 8)
    _mm256_storeu_ps(dst + j, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src + j))));
#endif
  for (; j < n; ++j) dst[j] = to_compute(src[j]);
}

// The compute type of each storage type: float64 stays float64, everything else computes in fp32.
template <typename S>
struct ComputeOf {
  using type = float;
};
template <>
struct ComputeOf<double> {
  using type = double;
};

}  // namespace dk
