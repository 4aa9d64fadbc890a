// Selective scan (Mamba, docs/spec.md §4) on the CPU: forward and backward.
//
//   delta'_t = softplus(delta_t + delta_bias) (or delta_t + delta_bias)
//   h_t = exp(delta'_t * A) * h_{t-1} + delta'_t * B_t * u_t,   y_t = <h_t, C_t> + D * u_t,
//   out_t = y_t * silu(z_t) when z is given.
//
// Torch-independent: tensors arrive as raw pointers (integers), dtype codes and element strides, so
// reverse scans are just negative L strides. Math is float32 for every storage dtype (float64 for
// float64).
//
// Layout of the work: the vector lanes are 16 *channels* of one batch ("a block"), not the state.
// The per-(channel, time) work (softplus, delta * u, the D and z epilogue) is then one vector op for
// 16 channels, the state recurrence needs no reduction over the state for y (each state's h * C is
// accumulated lane-wise), and B_t / C_t, shared by every channel of a group, are scalar broadcasts.
// The hot loop is ~9 FMA-unit ops per state update of 16 channels (exp2 by a degree-5 polynomial).
// A block's (channel, time) work runs a span of S steps at a time: its 16 rows of each (B, D, L)
// operand are read as sequential streams, computed on as rows and transposed to [t][lane] tiles for
// the state loop (and back for the outputs). Blocks are handed to threads dynamically.
//
// The forward saves the state at every chunk boundary (T steps), hs (batch, blocks, nc + 1, NP, 16).
// The backward walks the chunks in reverse: it recomputes the chunk's states and decays from the
// saved boundary state (one exp per element, as in the forward), then runs the reverse recurrence
// for dL/dh. Nothing of size (B, D, L, N) is allocated. dB and dC sum over the channels of a group:
// per block, the 16 lanes of each (t, n) are folded by a transposing shuffle tree into the partial
// sums of its unit (a range of blocks); units are added in unit order at the end, so results do not
// depend on the thread that ran a unit. The backward's span work is mostly memory traffic (4 rows read,
// 3 written per channel): its row loops prefetch the next row, and whole aligned output rows are
// written with streaming stores (AVX-512; with AVX2 they measured no faster).
//
// The per-(channel, t) row loops, like the state loops, work one register of lanes at a time with AVX2
// and AVX-512 (RowVec): with AVX2 a 16-lane vector is two registers that GCC passes through the stack
// between the helpers, and the reloads stall on store forwarding (that cost the AVX2 forward a quarter
// of its time).
//
// Threads: torch's OpenMP workers when the process has that runtime, std::threads otherwise.
#include <pybind11/pybind11.h>

#include "cpu/simd.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <limits>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
#if defined(__unix__) || defined(__APPLE__)
#include <dlfcn.h>
#endif

namespace py = pybind11;

// 16-lane vectors are passed by value between the helpers; without AVX-512 GCC notes that their ABI
// differs, which does not matter inside this file.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace {

enum DType : int { kF32 = dk::kFloat32, kF64 = dk::kFloat64, kF16 = dk::kFloat16, kBF16 = dk::kBFloat16 };
constexpr int W = 16;    // lanes: channels per block
#if defined(__AVX512F__)
constexpr int NJF = 16;  // states per register block in the forward (16 zmm of 32; 8 ymm of 16 for AVX2)
#else
constexpr int NJF = 8;
#endif
constexpr int NJB = 8;   // ... in the backward (its reverse loop carries two vectors per state)

// dst[i * dst_stride] = src[i * stride] converted to Acc, for i < n (storage types: csrc/cpu/simd.h).
template <class S, class Acc>
void load_as(const S* p, int64_t stride, int64_t n, Acc* dst, int64_t dst_stride) {
  for (int64_t i = 0; i < n; ++i) dst[i * dst_stride] = Acc(dk::to_compute(p[i * stride]));
}
template <class Acc>
void load(int64_t addr, int dtype, int64_t stride, int64_t n, Acc* dst, int64_t dst_stride = 1) {
  switch (dtype) {
    case kF32: return load_as(reinterpret_cast<const float*>(addr), stride, n, dst, dst_stride);
    case kF64: return load_as(reinterpret_cast<const double*>(addr), stride, n, dst, dst_stride);
    case kF16: return load_as(reinterpret_cast<const dk::fp16_t*>(addr), stride, n, dst, dst_stride);
    case kBF16: return load_as(reinterpret_cast<const dk::bf16_t*>(addr), stride, n, dst, dst_stride);
  }
}

// dst[i * stride] = src[i * src_stride] converted to dtype, for i < n (rounded to nearest even).
template <class S, class Acc>
void store_as(S* p, int64_t stride, int64_t n, const Acc* src, int64_t src_stride) {
  using C = typename dk::ComputeOf<S>::type;
  for (int64_t i = 0; i < n; ++i) p[i * stride] = dk::from_compute<S>(C(src[i * src_stride]));
}
template <class Acc>
void store(int64_t addr, int dtype, int64_t stride, int64_t n, const Acc* src, int64_t src_stride = 1) {
  switch (dtype) {
    case kF32: return store_as(reinterpret_cast<float*>(addr), stride, n, src, src_stride);
    case kF64: return store_as(reinterpret_cast<double*>(addr), stride, n, src, src_stride);
    case kF16: return store_as(reinterpret_cast<dk::fp16_t*>(addr), stride, n, src, src_stride);
    case kBF16: return store_as(reinterpret_cast<dk::bf16_t*>(addr), stride, n, src, src_stride);
  }
}

int64_t itemsize(int dtype) { return dtype == kF64 ? 8 : dtype == kF32 ? 4 : 2; }

// ---------------------------------------------------------------------------------------------
// 16-lane vectors (GCC vector extensions: one zmm with AVX-512, two ymm with AVX2, four xmm
// elsewhere). Float math uses Cephes-style polynomials (~1 ulp); the float64 path calls libm per
// lane (it is there for exactness, not speed). GCC contracts a * b + c into an FMA where it sees one
// (its default -ffp-contract=fast holds in ISO C++ mode too); the hot loops still spell their FMAs
// out with vfma, so as not to depend on that.
//
// The float math below is written once for a vector of any width and runs at the register width
// (kRegBytes): a wider vector is split into halves first. GCC lowers plain arithmetic on a vector
// wider than a register to one instruction per register, but a lane select (a < b ? c : d) on one
// to a scalar loop: without the split, AVX2 builds ran the decays' clamps lane by lane.

template <class Acc>
struct VecOf;
template <>
struct VecOf<float> {
  typedef float type __attribute__((vector_size(W * sizeof(float))));
  typedef int32_t itype __attribute__((vector_size(W * sizeof(float))));
};
template <>
struct VecOf<double> {
  typedef double type __attribute__((vector_size(W * sizeof(double))));
  typedef int64_t itype __attribute__((vector_size(W * sizeof(double))));
};
template <class Acc>
using Vec = typename VecOf<Acc>::type;

constexpr int kRegBytes = dk::kVecBytes;  // one register of the build's ISA (csrc/cpu/simd.h)
constexpr int kRegLanes = kRegBytes / int(sizeof(float));  // float lanes of one register

// Float vectors of n lanes (n: a power of two up to W) and their same-width int32 vectors.
template <int N>
struct FVec {
  typedef float type __attribute__((vector_size(N * sizeof(float))));
  typedef int32_t itype __attribute__((vector_size(N * sizeof(float))));
};
template <class V>
constexpr int lanes_of() {
  return int(sizeof(V) / sizeof(float));
}
template <class V>
using IVecOf = typename FVec<lanes_of<V>()>::itype;
template <class V>
using HalfOf = typename FVec<lanes_of<V>() / 2>::type;
// A float vector wider than a register: the math splits it (see above).
template <class V>
constexpr bool kWide = sizeof(V) > size_t(kRegBytes);

template <class V, class T>
inline V vsplat(T x) {
  return x - V{};  // x - 0 == x for every x (unlike 0 + x for x = -0)
}
template <class V>
inline void split(V v, HalfOf<V>& lo, HalfOf<V>& hi) {
  std::memcpy(&lo, &v, sizeof lo), std::memcpy(&hi, reinterpret_cast<char*>(&v) + sizeof lo, sizeof hi);
}
template <class V>
inline V join(HalfOf<V> lo, HalfOf<V> hi) {
  V v;
  std::memcpy(&v, &lo, sizeof lo), std::memcpy(reinterpret_cast<char*>(&v) + sizeof lo, &hi, sizeof hi);
  return v;
}
// f applied to each half of x (f: the caller itself, so that a wide vector is split down to registers).
template <class V, class F>
inline V halves(V x, F f) {
  HalfOf<V> lo, hi;
  split(x, lo, hi);
  return join<V>(f(lo), f(hi));
}

// x < c ? c : x and x > c ? c : x lane-wise (NaN stays NaN): one vmaxps / vminps at register width.
template <class V>
inline V vmax_of(V c, V x) {
#if defined(__AVX__)
  if constexpr (sizeof(V) == 32) return (V)_mm256_max_ps((__m256)c, (__m256)x);  // c > x ? c : x
#endif
  return x < c ? c : x;
}
template <class V>
inline V vmin_of(V c, V x) {
#if defined(__AVX__)
  if constexpr (sizeof(V) == 32) return (V)_mm256_min_ps((__m256)c, (__m256)x);  // c < x ? c : x
#endif
  return x > c ? c : x;
}

template <class Acc>
inline Vec<Acc> vload(const Acc* p) {
  Vec<Acc> v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <class Acc>
inline void vstore(Acc* p, Vec<Acc> v) {
  std::memcpy(p, &v, sizeof v);
}

// a * b + c, fused where the target has FMA.
template <class V>
inline V vfma(V a, V b, V c) {
  if constexpr (kWide<V>) {
    HalfOf<V> a0, a1, b0, b1, c0, c1;
    split(a, a0, a1), split(b, b0, b1), split(c, c0, c1);
    return join<V>(vfma(a0, b0, c0), vfma(a1, b1, c1));
  } else {
#if defined(__AVX512F__)
    if constexpr (sizeof(V) == 64) return (V)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)c);
#endif
#if defined(__FMA__)
    if constexpr (sizeof(V) == 32) return (V)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)c);
    if constexpr (sizeof(V) == 16) return (V)_mm_fmadd_ps((__m128)a, (__m128)b, (__m128)c);
#endif
    return a * b + c;
  }
}
inline Vec<double> vfma(Vec<double> a, Vec<double> b, Vec<double> c) { return a * b + c; }

// Store that bypasses the caches (no read of the line before it is written), for output rows written
// once and whole; p must be 64-byte aligned (see stream_ok). A plain store where that is not built.
template <class Acc, class V>
inline void vstream(Acc* p, V v) {
#if defined(__AVX512F__)
  if constexpr (std::is_same<Acc, float>::value && sizeof(V) == 64) return _mm512_stream_ps(p, (__m512)v);
#endif
  std::memcpy(p, &v, sizeof v);
}
template <class Acc>
bool stream_ok(const Acc* p) {
#if defined(__AVX512F__)
  return std::is_same<Acc, float>::value && reinterpret_cast<uintptr_t>(p) % 64 == 0;
#else
  (void)p;
  return false;
#endif
}
// Streaming stores are weakly ordered: each thread fences them before it leaves the parallel region.
inline void stream_fence() {
#if defined(__AVX512F__)
  _mm_sfence();
#endif
}


// The decays exp(delta' A) = 2^x, x = delta' A log2(e) (A pre-scaled): x = n + f with n = round(x);
// 2^f on [-0.5, 0.5] by a degree-5 polynomial with p(0) = 1, minimax for the relative error (~1.7e-7
// with FMAs; Cephes' degree 6 would cost one more FMA of the ~9 per state update). AVX-512:
// vrndscaleps, then vscalefps (exact underflow to 0, overflow to inf); -inf gives 0 and NaN stays
// NaN. Elsewhere x is clamped to [-125, 126] and n added to the exponent bits. CLAMP false: the
// caller knows |x| <= 125 (see decay_limit), and the clamps, a sixth of the work, are left out.
template <class V>
inline V exp2_poly(V f) {
  V p = vfma(vsplat<V>(1.3264727e-3f), f, vsplat<V>(9.671513e-3f));
  p = vfma(p, f, vsplat<V>(5.5507336e-2f));
  p = vfma(p, f, vsplat<V>(2.4022242e-1f));
  p = vfma(p, f, vsplat<V>(6.93147e-1f));
  return vfma(p, f, vsplat<V>(1.0f));
}
template <bool CLAMP, class V>
inline V vexp2(V x) {
  if constexpr (kWide<V>) {
    return halves(x, [](auto h) { return vexp2<CLAMP>(h); });
  } else {
#if defined(__AVX512F__)
    if constexpr (sizeof(V) == 64) {
      // max(c, NaN) = NaN (the masked forms: GCC 12 warns about the undefined source of the plain ones)
      const __m512 xv =
          CLAMP ? _mm512_mask_max_ps((__m512)x, (__mmask16)0xffff, _mm512_set1_ps(-160.0f), (__m512)x) : (__m512)x;
      const __m512 n =
          _mm512_mask_roundscale_ps(xv, (__mmask16)0xffff, xv, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const V p = exp2_poly((V)xv - (V)n);
      return (V)_mm512_mask_scalef_ps((__m512)p, (__mmask16)0xffff, (__m512)p, n);
    }
#endif
    // 2^n is added to the exponent bits of p(f) in [0.7, 1.5) (an integer add, which runs on more
    // ports than a multiply): n >= -125 keeps the result normal.
    if (CLAMP) x = vmin_of(vsplat<V>(126.0f), vmax_of(vsplat<V>(-125.0f), x));
    const V magic = vsplat<V>(12582912.0f);  // 1.5 * 2^23: rounds x, leaves n in the low bits
    const V v = x + magic;
    return (V)((IVecOf<V>)exp2_poly(x - (v - magic)) + ((IVecOf<V>)v << 23));
  }
}
template <bool CLAMP>
inline Vec<double> vexp2(Vec<double> x) {
  for (int i = 0; i < W; ++i) x[i] = std::exp2(x[i]);
  return x;
}
// exp(x) = 2^(x log2 e); the decays' callers pre-scale A by log2(e).
constexpr double kLog2e = 1.4426950408889634074;

// exp(x) for x <= 0 to ~1 ulp (softplus and sigmoid): n = round(x log2 e), r = x - n ln2 in two
// parts (Cody-Waite), e^r by Cephes expf's polynomial, then 2^n. (2^(x log2 e) would lose
// |x| * 6e-8 to the rounding of x log2 e.) x is clamped at -104 (AVX-512: e^-104 is a subnormal that
// vscalefps gets right) or at -87 (elsewhere, where 2^n is built in the exponent bits).
template <class V>
inline V vexp_neg(V x) {
  if constexpr (kWide<V>) {
    return halves(x, [](auto h) { return vexp_neg(h); });
  } else {
    constexpr bool k512 = kRegBytes == 64 && sizeof(V) == 64;
    x = vmax_of(vsplat<V>(k512 ? -104.0f : -87.0f), x);
    V n;
#if defined(__AVX512F__)
    if constexpr (k512)
      n = (V)_mm512_mask_roundscale_ps((__m512)x, (__mmask16)0xffff, (__m512)(x * float(kLog2e)),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
#endif
    if constexpr (!k512) {
      const V magic = vsplat<V>(12582912.0f);
      n = (x * float(kLog2e) + magic) - magic;
    }
    V r = vfma(n, vsplat<V>(-0.693359375f), x);
    r = vfma(n, vsplat<V>(2.12194440e-4f), r);
    V p = vfma(vsplat<V>(1.9875691500e-4f), r, vsplat<V>(1.3981999507e-3f));
    p = vfma(p, r, vsplat<V>(8.3334519073e-3f));
    p = vfma(p, r, vsplat<V>(4.1665795894e-2f));
    p = vfma(p, r, vsplat<V>(1.6666665459e-1f));
    p = vfma(p, r, vsplat<V>(5.0000001201e-1f));
    p = vfma(p, r * r, r) + 1.0f;
#if defined(__AVX512F__)
    if constexpr (k512) return (V)_mm512_mask_scalef_ps((__m512)p, (__mmask16)0xffff, (__m512)p, (__m512)n);
#endif
    return p * (V)((__builtin_convertvector(n, IVecOf<V>) + 127) << 23);
  }
}

// 1 / u for u in [1, 3]: an approximate reciprocal and one Newton step, vrcp14ps with AVX-512
// (~2^-28), vrcpps with AVX (~2.5e-7 relative; a division costs ~5x as much); a division elsewhere.
template <class V>
inline V vrcp_1to3(V u) {
#if defined(__AVX512F__)
  if constexpr (sizeof(V) == 64) {
    const V r = (V)_mm512_mask_rcp14_ps((__m512)u, (__mmask16)0xffff, (__m512)u);
    return r * vfma(-u, r, vsplat<V>(2.0f));
  }
#endif
#if defined(__AVX__)
  if constexpr (sizeof(V) == 32) {
    const V r = (V)_mm256_rcp_ps((__m256)u);
    return r * vfma(-u, r, vsplat<V>(2.0f));
  }
#endif
  return 1.0f / u;
}

// softplus(x) = max(x, 0) + log1p(e) with e = exp(-|x|) in (0, 1], and log1p(e) = 2 atanh(s) =
// 2s + s^3 Q(s^2), s = e / (2 + e) in (0, 1/3] (Q: degree-4 minimax, 1e-10; ~1.5e-7 relative in all).
// No division, no cancellation for small e; for x > ~17, softplus(x) = x as torch's threshold gives.
// sigmoid(x) = (x >= 0 ? 1 : e) / (1 + e), the derivative, goes to *sig when asked for.
template <class V>
inline V vsoftplus(V x, V* sig = nullptr) {
  if constexpr (kWide<V>) {
    HalfOf<V> lo, hi, slo, shi;
    split(x, lo, hi);
    const V r = join<V>(vsoftplus(lo, sig ? &slo : nullptr), vsoftplus(hi, sig ? &shi : nullptr));
    if (sig) *sig = join<V>(slo, shi);
    return r;
  } else {
    using VI = IVecOf<V>;
    const V e = vexp_neg((V)((VI)x | (VI)vsplat<V>(-0.0f)));  // exp(-|x|)
    const V sv = e * vrcp_1to3(e + 2.0f), w = sv * sv;
    V q = vfma(vsplat<V>(0.2430096f), w, vsplat<V>(0.21427652f));
    q = vfma(q, w, vsplat<V>(0.28616884f));
    q = vfma(q, w, vsplat<V>(0.39998877f));
    q = vfma(q, w, vsplat<V>(0.66666675f));
    if (sig) *sig = (x < vsplat<V>(0.0f) ? e : vsplat<V>(1.0f)) * vrcp_1to3(e + 1.0f);
    return (x > vsplat<V>(0.0f) ? x : vsplat<V>(0.0f)) + vfma(sv * w, q, sv + sv);
  }
}
inline Vec<double> vsoftplus(Vec<double> x, Vec<double>* sig = nullptr) {
  for (int i = 0; i < W; ++i) {
    if (sig) (*sig)[i] = 1.0 / (1.0 + std::exp(-x[i]));
    x[i] = x[i] > 20.0 ? x[i] : std::log1p(std::exp(x[i]));
  }
  return x;
}

template <class V>
inline V vsigmoid(V x) {
  if constexpr (kWide<V>) {
    return halves(x, [](auto h) { return vsigmoid(h); });
  } else {
    using VI = IVecOf<V>;
    const V e = vexp_neg((V)((VI)x | (VI)vsplat<V>(-0.0f)));  // exp(-|x|)
    return (x < vsplat<V>(0.0f) ? e : vsplat<V>(1.0f)) * vrcp_1to3(e + 1.0f);
  }
}
inline Vec<double> vsigmoid(Vec<double> x) {
  for (int i = 0; i < W; ++i) x[i] = 1.0 / (1.0 + std::exp(-x[i]));
  return x;
}

// Transposing reduction: 16 vectors q_0..q_15 -> one vector whose lane i is the sum of q_i's lanes,
// by a shuffle tree (15 two-input folds, ~3 ops per reduced vector instead of a horizontal sum each):
// fold<8> on the pairs (q_2k, q_2k+1), fold<4> on pairs of those results, then fold<2>, then fold<1>.
// fold<S>(a, b): of the 32 lanes a ++ b in blocks of S, the even blocks plus the odd ones (fold<8>:
// a[0, 8) ++ b[0, 8) + a[8, 16) ++ b[8, 16); fold<1>: pairwise sums, a's then b's).
template <int S, class V, size_t... I>
inline V fold_lanes(V a, V b, std::index_sequence<I...>) {
  return __builtin_shufflevector(a, b, int(2 * S * (I / S) + I % S)...) +
         __builtin_shufflevector(a, b, int(2 * S * (I / S) + I % S + S)...);
}
template <class V>
constexpr int kLanesOf = int(sizeof(V) / sizeof(std::declval<V>()[0]));
template <int S, class V>
inline V fold(V a, V b) {
  return fold_lanes<S>(a, b, std::make_index_sequence<kLanesOf<V>>());
}
// The even (EVEN) or odd lanes of a vector, as one of half its width.
template <bool EVEN, class V, size_t... I>
inline auto half_lanes(V r, std::index_sequence<I...>) {
  return __builtin_shufflevector(r, r, int(2 * I + !EVEN)...);
}
template <bool EVEN, class V>
inline auto half_lanes(V r) {
  return half_lanes<EVEN>(r, std::make_index_sequence<kLanesOf<V> / 2>());
}
// 16 x 16 transpose: dst[j * ds + i] = src[i * ss + j]. Four rounds of block swaps (8, 4, 2, 1 wide),
// each 16 two-input shuffles.
template <int S, class V, size_t... I>
inline void swap_blocks(V& a, V& b, std::index_sequence<I...>) {
  const V x = __builtin_shufflevector(a, b, int(I & S ? I - S + W : I)...);
  const V y = __builtin_shufflevector(a, b, int(I & S ? I + W : I + S)...);
  a = x;
  b = y;
}
template <int S, class V>
inline void swap_round(V* r) {
  for (int i = 0; i < W; ++i)
    if (!(i & S)) swap_blocks<S>(r[i], r[i + S], std::make_index_sequence<W>());
}
#if defined(__AVX__) && !defined(__AVX512F__)
// 8 x 8 floats: dst[j * ds + i] = src[i * ss + j] (dk::transpose in ymm registers).
inline void transpose8x8(const float* src, int64_t ss, float* dst, int64_t ds) {
  dk::vec_t<float> r[8];
  for (int i = 0; i < 8; ++i) r[i] = dk::loadu(src + i * ss);
  dk::transpose<float>(r);
  for (int i = 0; i < 8; ++i) dk::storeu(dst + i * ds, r[i]);
}
#endif
template <class Acc>
inline void transpose16(const Acc* src, int64_t ss, Acc* dst, int64_t ds) {
#if defined(__AVX__) && !defined(__AVX512F__)
  // Without AVX-512, GCC lowers the 16-lane shuffles below to one scalar move per element.
  if constexpr (std::is_same<Acc, float>::value) {
    for (int bi = 0; bi < W; bi += 8)
      for (int bj = 0; bj < W; bj += 8) transpose8x8(src + bi * ss + bj, ss, dst + bj * ds + bi, ds);
    return;
  }
#endif
  using V = Vec<Acc>;
  V r[W];
  for (int i = 0; i < W; ++i) r[i] = vload(src + i * ss);
  swap_round<8>(r);
  swap_round<4>(r);
  swap_round<2>(r);
  swap_round<1>(r);
  for (int i = 0; i < W; ++i) vstore(dst + i * ds, r[i]);
}

// ---------------------------------------------------------------------------------------------
// Parameters (filled from Python by name).

struct Operand {
  int64_t ptr = 0;  // 0: absent
  int dtype = kF32;
  int64_t sb = 0, sd = 0, sn = 0, sl = 0;  // strides in elements (batch, channel or group, state, length)
};

struct Params {
  int64_t batch = 0, dim = 0, seqlen = 0, dstate = 0, chunk = 64;
  int nthreads = 1;
  bool softplus = false;
  int acc = kF32;  // compute dtype: kF32 or kF64
  // (B, D, L) operands; out/du/ddelta/dz are written.
  Operand u, delta, z, out, dout, du, ddelta, dz;
  // B, C: groups G (D for a constant (D, N) operand, whose sb and sl are 0); var: depends on (b, t).
  Operand Bm, Cm;
  int64_t b_groups = 1, c_groups = 1;
  bool b_var = true, c_var = true;
  // Acc-typed contiguous buffers (0: absent).
  int64_t A = 0, Dvec = 0, delta_bias = 0, init = 0;  // (D, N), (D,), (D,), (B, D, N)
  int64_t last = 0, hs = 0;                            // (B, D, N), (B, ceil(D / 16), nc + 1, NP, 16)
  int64_t dlast = 0, dA_rows = 0, dD_rows = 0, dbias_rows = 0, dinit = 0;  // (B,D,N) (B,D,N) (B,D) (B,D) (B,D,N)
  // dB, dC: Acc, indexed (key, n, t) with key = b * G + g (variable) or g (constant), t-extent L or 1.
  Operand dB, dC;
};

// The OpenMP runtime torch brought into the process, found by symbol (nothing is linked or loaded
// here). torch's CPU ops leave its worker threads spinning for a few milliseconds after each
// parallel op; threads of our own would share the cores with them (measured: the backward 25%
// slower right after autograd's zero-fills). Running our parallel regions on the same workers
// avoids that. Without such a runtime in the process, plain std::threads.
struct OpenMPRuntime {
  void (*parallel)(void (*)(void*), void*, unsigned, unsigned) = nullptr;  // GOMP_parallel (libgomp ABI)
  int (*thread_num)() = nullptr;
  int (*num_threads)() = nullptr;
  OpenMPRuntime() {
#if defined(__unix__) || defined(__APPLE__)
    parallel = reinterpret_cast<decltype(parallel)>(dlsym(RTLD_DEFAULT, "GOMP_parallel"));
    thread_num = reinterpret_cast<decltype(thread_num)>(dlsym(RTLD_DEFAULT, "omp_get_thread_num"));
    num_threads = reinterpret_cast<decltype(num_threads)>(dlsym(RTLD_DEFAULT, "omp_get_num_threads"));
    if (!thread_num || !num_threads) parallel = nullptr;
#endif
  }
};

// fn(tid) for tid in [0, nthreads), concurrently; returns when all are done (rethrowing the first
// exception). An OpenMP team smaller than asked for runs the missing tids in turn.
template <class F>
void parallel_for(int nthreads, const F& fn) {
  if (nthreads <= 1) {
    fn(0);
    return;
  }
  static const OpenMPRuntime omp;
  if (omp.parallel) {
    struct Region {
      const F* fn;
      const OpenMPRuntime* omp;
      int n;
      std::mutex mu;
      std::exception_ptr err;
    } region{&fn, &omp, nthreads, {}, nullptr};
    omp.parallel(
        [](void* data) {
          Region& r = *static_cast<Region*>(data);
          const int team = r.omp->num_threads();
          for (int tid = r.omp->thread_num(); tid < r.n; tid += team) {
            try {
              (*r.fn)(tid);
            } catch (...) {
              std::lock_guard<std::mutex> lk(r.mu);
              if (!r.err) r.err = std::current_exception();
            }
          }
        },
        &region, unsigned(nthreads), 0);
    if (region.err) std::rethrow_exception(region.err);
    return;
  }
  std::vector<std::thread> threads;
  threads.reserve(nthreads - 1);
  for (int t = 1; t < nthreads; ++t) threads.emplace_back(fn, t);
  fn(0);
  for (auto& th : threads) th.join();
}

// Time is cut into chunks of T steps (the states are saved at their boundaries) and spans of S steps,
// a whole number of chunks: the per-(channel, t) work runs a span at a time, so that each of the 16
// rows of an operand is read as one sequential stream of S elements.
constexpr int64_t kSpanSteps = 512;

struct Shape {
  int64_t Bsz, D, L, N, NP, nblk, T, nc, S, SP;
  explicit Shape(const Params& p)
      : Bsz(p.batch), D(p.dim), L(p.seqlen), N(p.dstate), NP((p.dstate + NJB - 1) / NJB * NJB),
        nblk((p.dim + W - 1) / W), T(p.chunk), nc((p.seqlen + p.chunk - 1) / p.chunk),
        S(p.chunk * std::max<int64_t>(1, kSpanSteps / p.chunk)), SP((S + W - 1) / W * W) {}
  int64_t blocks() const { return Bsz * nblk; }
};

// One block: 16 channels [d0, d0 + nl) of batch b.
struct Block {
  int64_t k, b, d0;
  int nl;
  Block(const Shape& s, int64_t k_)
      : k(k_), b(k_ / s.nblk), d0((k_ % s.nblk) * W), nl(int(std::min<int64_t>(W, s.D - (k_ % s.nblk) * W))) {}
};

int64_t row_addr(const Operand& op, int64_t b, int64_t d, int64_t t0) {
  return op.ptr + (b * op.sb + d * op.sd + t0 * op.sl) * itemsize(op.dtype);
}

// A float32 row with unit stride and a whole number of vectors is used in place; anything else is
// converted into a buffer (zero padded to whole vectors).
template <class Acc>
bool in_place(const Operand& op, int64_t tl) {
  return std::is_same<Acc, float>::value && op.dtype == kF32 && op.sl == 1 && tl % W == 0;
}

// The steps [t0, t0 + tl) of the 16 rows (b, d0 + i) of a (B, D, L) operand, as Acc rows valid on
// [0, roundup(tl, 16)); rows past nl are zeros. Row buffers hold SP >= roundup(tl, 16) elements.
template <class Acc>
struct RowsIn {
  int64_t SP;
  std::vector<Acc> buf, zeros;
  const Acc* r[W];
  explicit RowsIn(int64_t SP_) : SP(SP_), buf(W * SP_), zeros(SP_, Acc(0)) {}
  void read(const Operand& op, const Block& blk, int64_t t0, int64_t tl) {
    const bool direct = in_place<Acc>(op, tl);
    for (int i = 0; i < W; ++i) {
      if (i >= blk.nl || !op.ptr) {
        r[i] = zeros.data();
      } else if (direct) {
        r[i] = reinterpret_cast<const Acc*>(row_addr(op, blk.b, blk.d0 + i, t0));
      } else {
        Acc* row = &buf[i * SP];
        load<Acc>(row_addr(op, blk.b, blk.d0 + i, t0), op.dtype, op.sl, tl, row);
        std::fill(row + tl, row + SP, Acc(0));
        r[i] = row;
      }
    }
  }
};

// Rows to write: in place or through a buffer that commit() converts and stores (rows < nl only).
template <class Acc>
struct RowsOut {
  int64_t SP;
  std::vector<Acc> buf;
  Acc* r[W];
  bool direct = false;
  explicit RowsOut(int64_t SP_) : SP(SP_), buf(W * SP_) {}
  void begin(const Operand& op, const Block& blk, int64_t t0, int64_t tl) {
    direct = in_place<Acc>(op, tl);
    for (int i = 0; i < W; ++i)
      r[i] = direct && i < blk.nl ? reinterpret_cast<Acc*>(row_addr(op, blk.b, blk.d0 + i, t0)) : &buf[i * SP];
  }
  void commit(const Operand& op, const Block& blk, int64_t t0, int64_t tl) {
    if (direct) return;
    for (int i = 0; i < blk.nl; ++i) store<Acc>(row_addr(op, blk.b, blk.d0 + i, t0), op.dtype, op.sl, tl, r[i]);
  }
};

// [lane][t] rows (stride SP) <-> [t][lane] tiles, te (a multiple of 16) steps.
template <class Acc>
void rows_to_tile(const Acc* rows, int64_t SP, int64_t te, Acc* tile) {
  for (int64_t t = 0; t < te; t += W) transpose16(rows + t, SP, tile + t * W, W);
}
template <class Acc>
void tile_to_rows(const Acc* tile, int64_t te, Acc* rows, int64_t SP) {
  for (int64_t t = 0; t < te; t += W) transpose16(tile + t * W, W, rows + t, SP);
}

// Per-lane (W) copies of the per-channel weights of a block, state-major: out[n][i] = w[(d0 + i) * N + n].
template <class Acc>
void lane_weights(const Shape& s, const Block& blk, const Acc* w, Acc scale, Acc* out) {
  std::fill(out, out + s.NP * W, Acc(0));
  for (int i = 0; i < blk.nl; ++i)
    for (int64_t n = 0; n < s.N; ++n) out[n * W + i] = w[(blk.d0 + i) * s.N + n] * scale;
}
template <class Acc>
Acc channel_weight(const Acc* w, const Block& blk, int i) {  // w[d0 + i], 0 for an absent w
  return w ? w[blk.d0 + i] : Acc(0);
}

// B or C as the kernels read it. Three modes:
//  kShared: variable and every lane of the block in one group: a scalar per (t, n), broadcast to the
//           lanes. Staged once per (batch, group) as a [t][NP] table of the whole sequence.
//  kLanes:  variable, the block's lanes in several groups: a vector per (t, n), staged per chunk.
//  kConst:  constant (D, N): a vector per n, the same for every t.
enum BCMode { kShared, kLanes, kConst };

template <class Acc>
struct BCSource {
  const Shape& s;
  const Operand& op;
  int64_t groups, span;  // span: channels per group
  bool var;
  BCMode mode = kShared;
  int64_t staged_key = -1;
  std::vector<Acc> buf;
  const Block* blk = nullptr;

  BCSource(const Shape& s_, const Operand& op_, int64_t groups_, bool var_)
      : s(s_), op(op_), groups(groups_), span(s_.D / groups_), var(var_) {}

  int64_t key(int64_t b, int64_t d) const { return (var ? b * groups : 0) + d / span; }
  int64_t addr(int64_t b, int64_t g, int64_t n, int64_t t) const {
    return op.ptr + (b * op.sb + g * op.sd + n * op.sn + t * op.sl) * itemsize(op.dtype);
  }
  int64_t jstride() const { return mode == kShared ? 1 : W; }  // between states in buf

  void begin_block(const Block& b) {
    blk = &b;
    if (!var) {
      mode = kConst;
      buf.assign(s.NP * W, Acc(0));
      for (int i = 0; i < b.nl; ++i) load<Acc>(addr(0, b.d0 + i, 0, 0), op.dtype, op.sn, s.N, &buf[i], W);
      staged_key = -1;
    } else if ((b.d0 / span) == (b.d0 + b.nl - 1) / span) {
      mode = kShared;
      const int64_t k = key(b.b, b.d0);
      if (k != staged_key) {
        buf.assign(s.L * s.NP, Acc(0));
        for (int64_t n = 0; n < s.N; ++n) load<Acc>(addr(b.b, b.d0 / span, n, 0), op.dtype, op.sl, s.L, &buf[n], s.NP);
        staged_key = k;
      }
    } else {
      mode = kLanes;
      buf.assign(s.T * s.NP * W, Acc(0));
      staged_key = -1;
    }
  }
  // Pointer and t-stride of the chunk starting at t0 (the kernels' B/C arguments).
  const Acc* chunk(int64_t t0, int64_t tl, int64_t& ts) {
    if (mode == kConst) {
      ts = 0;
      return buf.data();
    }
    if (mode == kShared) {
      ts = s.NP;
      return buf.data() + t0 * s.NP;
    }
    for (int i = 0; i < blk->nl; ++i)
      for (int64_t n = 0; n < s.N; ++n)
        load<Acc>(addr(blk->b, (blk->d0 + i) / span, n, t0), op.dtype, op.sl, tl, &buf[n * W + i], s.NP * W);
    ts = s.NP * W;
    return buf.data();
  }
};

// ---------------------------------------------------------------------------------------------
// Forward

// The vector of the state loops: one register of float lanes, so a block's 16 lanes take one pass
// with AVX-512, two with AVX2 (four with SSE); float64 runs the 16-lane vector in one pass. Per lane
// the arithmetic is the same in every case.
template <class Acc>
struct LaneVec {
  using type = typename FVec<kRegLanes>::type;
};
template <>
struct LaneVec<double> {
  using type = Vec<double>;
};
// The vector of the per-(channel, t) row loops: LaneVec with AVX2 and AVX-512. Narrower targets keep
// the 16-lane Vec (with SSE's 4-lane registers GCC rebuilt the polynomials' constants in the loops).
template <class Acc>
using RowVec = std::conditional_t<(kRegBytes >= 32), typename LaneVec<Acc>::type, Vec<Acc>>;
template <class V, class Acc>
inline V vld(const Acc* p) {
  V v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
template <class V, class Acc>
inline void vst(Acc* p, V v) {
  std::memcpy(p, &v, sizeof v);
}
// Offset of (row t, state j, lanes [o, o + VL)) in the backward's per-step buffers of NJB states
// (Hb, Ab; rows: their row count): [o / VL][t][j][VL], so that each pass of lanes (one register
// wide) writes and reads whole cache lines, one pass after the other.
template <class V>
inline int64_t step_at(int64_t rows, int64_t t, int j, int o) {
  constexpr int VL = kLanesOf<V>;
  return ((o / VL * rows + t) * NJB + j) * VL;
}

// NJ states (a register block) of one block over one chunk, the forward's and the backward's
// recomputation. A2: (NJ, W) A * log2(e); DT, DTU, Y: (tl, W) delta', delta' * u and the output
// accumulator Y += <h_t, C_t> (when HY); h0: (NJ, W) the state before the chunk; Bp/Cp: B/C of the
// chunk at this register block's first state (t-stride bts/cts; a scalar per (t, n) when BL/CL is
// false, a lane vector per (t, n) when true). The forward (SAVE false) writes the state after the
// chunk to h (may be h0). The backward (SAVE true, NJ = NJB) keeps every step: Hb (tl + 1 rows) gets
// h_{t-1} at row t (row 0 = h0) and h_t at row t + 1, Ab (tl rows) the decays (layout: step_at). The
// lanes run in passes of one register (LaneVec), each over the whole chunk. CLAMP: see vexp2.
template <class Acc, int NJ, bool BL, bool CL, bool SAVE, bool HY, bool CLAMP>
void scan_states(int64_t tl, const Acc* A2, const Acc* DT, const Acc* DTU, const Acc* Bp, int64_t bts,
                 const Acc* Cp, int64_t cts, const Acc* h0, Acc* h, Acc* Hb, Acc* Ab, Acc* Y) {
  using V = typename LaneVec<Acc>::type;
  constexpr int VL = kLanesOf<V>, BJ = BL ? W : 1, CJ = CL ? W : 1;
  for (int o = 0; o < W; o += VL) {
    V hr[NJ];
    for (int j = 0; j < NJ; ++j) {
      hr[j] = vld<V>(h0 + j * W + o);
      if (SAVE) vst(Hb + step_at<V>(tl + 1, 0, j, o), hr[j]);
    }
    for (int64_t t = 0; t < tl; ++t) {
      const V dt = vld<V>(DT + t * W + o), dtu = vld<V>(DTU + t * W + o);
      const Acc* Bt = Bp + t * bts;
      const Acc* Ct = Cp + t * cts;
      V y0{}, y1{};
#pragma GCC unroll 16
      for (int j = 0; j < NJ; ++j) {
        const V a = vexp2<CLAMP>(vld<V>(A2 + j * W + o) * dt);
        const V bv = BL ? vld<V>(Bt + j * BJ + o) : Bt[j * BJ] - V{};
        hr[j] = vfma(a, hr[j], bv * dtu);
        if (SAVE) vst(Ab + step_at<V>(tl, t, j, o), a), vst(Hb + step_at<V>(tl + 1, t + 1, j, o), hr[j]);
        if (HY) {
          const V cv = CL ? vld<V>(Ct + j * CJ + o) : Ct[j * CJ] - V{};
          if (j & 1) y1 = vfma(hr[j], cv, y1); else y0 = vfma(hr[j], cv, y0);
        }
      }
      if (HY) vst(Y + t * W + o, vld<V>(Y + t * W + o) + (y0 + y1));
    }
    if (!SAVE)
      for (int j = 0; j < NJ; ++j) vst(h + j * W + o, hr[j]);
  }
}

template <class Acc, bool BL, bool CL, bool CLAMP>
void fwd_chunk(const Shape& s, int64_t tl, const Acc* A2, const Acc* DT, const Acc* DTU, const Acc* Bp, int64_t bts,
               const Acc* Cp, int64_t cts, Acc* h, Acc* Y) {
  constexpr int BJ = BL ? W : 1, CJ = CL ? W : 1;
  int64_t n = 0;
  for (; n + NJF <= s.NP; n += NJF)
    scan_states<Acc, NJF, BL, CL, false, true, CLAMP>(tl, A2 + n * W, DT, DTU, Bp + n * BJ, bts, Cp + n * CJ, cts, h + n * W,
                                               h + n * W, nullptr, nullptr, Y);
  for (; n < s.NP; n += NJB)
    scan_states<Acc, NJB, BL, CL, false, true, CLAMP>(tl, A2 + n * W, DT, DTU, Bp + n * BJ, bts, Cp + n * CJ, cts, h + n * W,
                                               h + n * W, nullptr, nullptr, Y);
}

template <class Acc>
using FwdChunkFn = void (*)(const Shape&, int64_t, const Acc*, const Acc*, const Acc*, const Acc*, int64_t,
                            const Acc*, int64_t, Acc*, Acc*);
template <class Acc, bool CLAMP>
FwdChunkFn<Acc> fwd_chunk_for(bool bl, bool cl) {
  return bl ? (cl ? fwd_chunk<Acc, true, true, CLAMP> : fwd_chunk<Acc, true, false, CLAMP>)
            : (cl ? fwd_chunk<Acc, false, true, CLAMP> : fwd_chunk<Acc, false, false, CLAMP>);
}

// The decays 2^(A2 delta') of a chunk need no clamping when every |A2 delta'| <= 125 (vexp2<false>):
// decay_limit(A2) = 125 / max |A2| over a block's states, and the chunk's |delta'| must not exceed
// it (a NaN never passes).
template <class Acc>
Acc decay_limit(const Acc* A2, int64_t n) {
  Acc m = 0;
  for (int64_t i = 0; i < n; ++i) m = std::max(m, std::fabs(A2[i]));
  return m > 0 ? Acc(125) / m : std::numeric_limits<Acc>::infinity();
}
template <class Acc>
bool decays_in_range(const Acc* DT, int64_t n, Acc limit) {  // n: a multiple of W
  using V = typename LaneVec<Acc>::type;
  using VI = decltype(V{} < V{});
  const VI magnitude = ~(VI)(Acc(-0.0) - V{});
  VI ok = ~VI{};
  for (int64_t i = 0; i < n; i += kLanesOf<V>) ok &= (V)((VI)vld<V>(DT + i) & magnitude) <= limit - V{};
  for (int l = 0; l < kLanesOf<V>; ++l)
    if (!ok[l]) return false;
  return true;
}

// The rows of a span are 16 streams of a few KB, 4 KB or more apart, each read (or written) once: the
// hardware prefetchers ramp up on each row only after its first misses. A loop on row i asks for the
// same cache line of row i + 1 of each of its operands (rw: for writing), one row ahead.
template <bool RW>
inline void prefetch_line(const void* p) {
  if (RW) __builtin_prefetch(p, 1, 3); else __builtin_prefetch(p, 0, 3);
}
// Row i + 1; row i itself for the last row (GCC 12 drops read prefetches under an `if (i + 1 < W)`).
inline int next_row(int i) { return i + 1 < W ? i + 1 : i; }

// Per-thread scratch of one block's span: the input rows and the delta' / delta' * u rows and tiles.
template <class Acc>
struct SpanInputs {
  RowsIn<Acc> u, x, z;
  std::vector<Acc> DTr, DTUr, DT, DTU;  // rows (W, SP) and tiles (SP, W)
  explicit SpanInputs(const Shape& s)
      : u(s.SP), x(s.SP), z(s.SP), DTr(W * s.SP), DTUr(W * s.SP), DT(s.SP * W), DTU(s.SP * W) {}

  // Reads u, delta, z on [t0, t0 + sl); delta' = softplus(delta + bias) and delta' * u as rows and as
  // tiles; sig (rows (W, SP)), when given, gets d delta' / d(delta + bias) (the sigmoid, or 1).
  // While on row i, it asks for the same steps of row i + 1 of u and delta (see prefetch_line).
  void load(const Params& p, const Shape& s, const Block& blk, int64_t t0, int64_t sl, Acc* sig = nullptr) {
    using V = RowVec<Acc>;
    const Acc* bias_w = reinterpret_cast<const Acc*>(p.delta_bias);
    const int64_t se = (sl + W - 1) / W * W;
    u.read(p.u, blk, t0, sl);
    x.read(p.delta, blk, t0, sl);
    z.read(p.z, blk, t0, sl);
    for (int i = 0; i < W; ++i) {
      Acc* dtr = &DTr[i * s.SP];
      Acc* dtur = &DTUr[i * s.SP];
      if (i >= blk.nl) {  // absent channels: delta' = 0, so their states stay 0
        std::fill(dtr, dtr + se, Acc(0));
        std::fill(dtur, dtur + se, Acc(0));
        if (sig) std::fill(sig + i * s.SP, sig + i * s.SP + se, Acc(0));
        continue;
      }
      const Acc bias = channel_weight(bias_w, blk, i);
      const Acc *xn = x.r[next_row(i)], *un = u.r[next_row(i)];
      for (int64_t t = 0; t < se; t += W) {
        prefetch_line<false>(xn + t), prefetch_line<false>(un + t);
        for (int64_t o = t; o < t + W; o += kLanesOf<V>) {
          const V xv = vld<V>(x.r[i] + o) + bias;
          V sg;
          const V dt = p.softplus ? vsoftplus(xv, sig ? &sg : nullptr) : xv;
          if (sig) vst(sig + i * s.SP + o, p.softplus ? sg : vsplat<V>(Acc(1)));
          vst(dtr + o, dt);
          vst(dtur + o, dt * vld<V>(u.r[i] + o));
        }
      }
    }
    rows_to_tile(DTr.data(), s.SP, se, DT.data());
    rows_to_tile(DTUr.data(), s.SP, se, DTU.data());
  }
};

template <class Acc>
void forward(const Params& p) {
  using V = RowVec<Acc>;
  const Shape s(p);
  const Acc* A = reinterpret_cast<const Acc*>(p.A);
  const Acc* Dv = reinterpret_cast<const Acc*>(p.Dvec);
  const Acc* init = reinterpret_cast<const Acc*>(p.init);
  Acc* hs = reinterpret_cast<Acc*>(p.hs);
  Acc* last = reinterpret_cast<Acc*>(p.last);
  const int64_t nb_total = s.blocks(), hstride = s.NP * W, SP = s.SP;
  const int nt = int(std::max<int64_t>(1, std::min<int64_t>(p.nthreads, nb_total)));
  std::atomic<int64_t> next{0};  // blocks are handed out one at a time (no reductions across blocks)

  parallel_for(nt, [&](int) {
    SpanInputs<Acc> in(s);
    RowsOut<Acc> out(SP);
    BCSource<Acc> bsrc(s, p.Bm, p.b_groups, p.b_var), csrc(s, p.Cm, p.c_groups, p.c_var);
    std::vector<Acc> A2(s.NP * W), h(s.NP * W), Y(SP * W), Yr(W * SP);
    for (int64_t k; (k = next.fetch_add(1)) < nb_total;) {
      const Block blk(s, k);
      lane_weights(s, blk, A, Acc(kLog2e), A2.data());
      std::fill(h.begin(), h.end(), Acc(0));
      if (init) lane_weights(s, blk, init + blk.b * s.D * s.N, Acc(1), h.data());
      bsrc.begin_block(blk);
      csrc.begin_block(blk);
      const bool bl = bsrc.mode != kShared, cl = csrc.mode != kShared;
      const FwdChunkFn<Acc> run[2] = {fwd_chunk_for<Acc, false>(bl, cl), fwd_chunk_for<Acc, true>(bl, cl)};
      const Acc limit = decay_limit(A2.data(), s.NP * W);
      Acc* hsk = hs + k * (s.nc + 1) * hstride;
      for (int64_t t0 = 0; t0 < s.L; t0 += s.S) {
        const int64_t sl = std::min(s.S, s.L - t0), se = (sl + W - 1) / W * W;
        in.load(p, s, blk, t0, sl);
        std::fill(Y.begin(), Y.begin() + se * W, Acc(0));
        for (int64_t c0 = 0; c0 < sl; c0 += s.T) {
          const int64_t tl = std::min(s.T, sl - c0);
          std::copy(h.begin(), h.end(), hsk + (t0 + c0) / s.T * hstride);
          int64_t bts, cts;
          const Acc* Bp = bsrc.chunk(t0 + c0, tl, bts);
          const Acc* Cp = csrc.chunk(t0 + c0, tl, cts);
          const bool clamp = !decays_in_range(&in.DT[c0 * W], tl * W, limit);
          run[clamp](s, tl, A2.data(), &in.DT[c0 * W], &in.DTU[c0 * W], Bp, bts, Cp, cts, h.data(), &Y[c0 * W]);
        }
        tile_to_rows(Y.data(), se, Yr.data(), SP);
        out.begin(p.out, blk, t0, sl);
        for (int i = 0; i < blk.nl; ++i) {
          const Acc dv = channel_weight(Dv, blk, i);
          const Acc* ur = in.u.r[i];
          const Acc *zr = in.z.r[i], *zn = in.z.r[next_row(i)];  // z is first read here: prefetched a row ahead
          Acc* on = out.r[next_row(i)];
          for (int64_t t = 0; t < se; t += W) {
            prefetch_line<false>(zn + t), prefetch_line<true>(on + t);
            for (int64_t o = t; o < t + W; o += kLanesOf<V>) {
              V y = vfma(vld<V>(ur + o), vsplat<V>(dv), vld<V>(&Yr[i * SP + o]));
              if (p.z.ptr) {
                const V zv = vld<V>(zr + o);
                y = y * zv * vsigmoid(zv);
              }
              vst(out.r[i] + o, y);
            }
          }
        }
        out.commit(p.out, blk, t0, sl);
      }
      std::copy(h.begin(), h.end(), hsk + s.nc * hstride);
      for (int i = 0; i < blk.nl; ++i)
        for (int64_t n = 0; n < s.N; ++n) last[(blk.b * s.D + blk.d0 + i) * s.N + n] = h[n * W + i];
    }
  });
}

// ---------------------------------------------------------------------------------------------
// Backward

// The reverse recurrence of NJB states over one chunk, t = tl-1 .. 0:
//   g_t = C_t dy_t + a_{t+1} g_{t+1}   (dL/dh_t; g: (NJB, W) carried in/out)
//   dA += g_t a_t h_{t-1} delta'_t,  RGA[t] += sum_n A g_t a_t h_{t-1},  RGB[t] += sum_n g_t B_t,
//   dC[t] += sum_lanes h_t dy_t,  dB[t] += sum_lanes g_t delta'_t u_t.
// A shared (scalar) B/C gets its lane sums by a fold tree per t and pass, added to dBp/dCp[t * dbts + j];
// a lane B/C accumulates lane-wise into dBp/dCp[t * dbts + j * W] (dbts 0 for a constant one).
template <class Acc, bool BL, bool CL>
void bwd_reverse(int64_t tl, const Acc* A1, const Acc* DT, const Acc* DTU, const Acc* DY, const Acc* Bp, int64_t bts,
                 const Acc* Cp, int64_t cts, const Acc* Hb, const Acc* Ab, Acc* g, Acc* dA, Acc* RGA, Acc* RGB,
                 Acc* dBp, int64_t dbts, Acc* dCp, int64_t dcts) {
  // Passes of one register of lanes (LaneVec) times VL / 2 states: a pass carries VL vectors (g and dA
  // of each state), few enough to stay in registers with AVX2's 16, and its 2 * NJ lane sums for a
  // shared B/C (qC_j = h_t dy for dC, qB_j = g_t delta' u for dB, in that order) fold into one vector.
  using V = typename LaneVec<Acc>::type;
  constexpr int VL = kLanesOf<V>, NJ = VL / 2, BJ = BL ? W : 1, CJ = CL ? W : 1;
  static_assert(NJ >= 2 && NJ <= 8 && NJB % NJ == 0, "the fold tree below reduces 4 to 16 vectors");
  for (int o = 0; o < W; o += VL) {
    for (int j0 = 0; j0 < NJB; j0 += NJ) {
      V gr[NJ], da[NJ];
      for (int j = 0; j < NJ; ++j) gr[j] = vld<V>(g + (j0 + j) * W + o), da[j] = vld<V>(dA + (j0 + j) * W + o);
      for (int64_t t = tl - 1; t >= 0; --t) {
        const V dt = vld<V>(DT + t * W + o), dtu = vld<V>(DTU + t * W + o), dy = vld<V>(DY + t * W + o);
        const Acc* Bt = Bp + t * bts + j0 * BJ;
        const Acc* Ct = Cp + t * cts + j0 * CJ;
        // The fold tree, level by level as the states are done (few vectors live): l1 per state, l2 per
        // two, l4 per four, r per eight; r's lane 2j is the sum of qC_j, lane 2j + 1 that of qB_j.
        V l1[NJ], l2[NJ / 2], l4[NJ / 4 + 1], r{};
        V rga{}, rgb{};
#pragma GCC unroll 8
        for (int j = 0; j < NJ; ++j) {
          const V hc = vld<V>(Hb + step_at<V>(tl + 1, t + 1, j0 + j, o));
          const V hp = vld<V>(Hb + step_at<V>(tl + 1, t, j0 + j, o));
          const V a = vld<V>(Ab + step_at<V>(tl, t, j0 + j, o));
          const V bv = BL ? vld<V>(Bt + j * BJ + o) : Bt[j * BJ] - V{};
          const V cv = CL ? vld<V>(Ct + j * CJ + o) : Ct[j * CJ] - V{};
          const V gj = vfma(cv, dy, gr[j]);
          V qc{}, qb{};
          if (CL) {
            Acc* d = dCp + t * dcts + (j0 + j) * W + o;
            vst(d, vfma(hc, dy, vld<V>(d)));
          } else {
            qc = hc * dy;
          }
          if (BL) {
            Acc* d = dBp + t * dbts + (j0 + j) * W + o;
            vst(d, vfma(gj, dtu, vld<V>(d)));
          } else {
            qb = gj * dtu;
          }
          if (!BL || !CL) {
            l1[j] = fold<VL / 2>(qc, qb);
            if (j & 1) l2[j / 2] = fold<VL / 4>(l1[j - 1], l1[j]);
            if constexpr (NJ >= 4)
              if ((j & 3) == 3) l4[j / 4] = fold<VL / 8>(l2[j / 2 - 1], l2[j / 2]);
            if constexpr (NJ >= 8)
              if (j == 7) r = fold<VL / 16>(l4[0], l4[1]);
          }
          gr[j] = a * gj;
          const V w = gr[j] * hp;  // g_t a_t h_{t-1}
          da[j] = vfma(w, dt, da[j]);
          rga = vfma(vld<V>(A1 + (j0 + j) * W + o), w, rga);
          rgb = vfma(gj, bv, rgb);
        }
        if (!BL || !CL) {
          if constexpr (NJ == 2) r = l2[0];
          if constexpr (NJ == 4) r = l4[0];
          typedef Acc H __attribute__((vector_size(NJ * sizeof(Acc))));
          H d;
          if (!CL) {
            Acc* p = dCp + t * dcts + j0;
            std::memcpy(&d, p, sizeof d), d += half_lanes<true>(r), std::memcpy(p, &d, sizeof d);
          }
          if (!BL) {
            Acc* p = dBp + t * dbts + j0;
            std::memcpy(&d, p, sizeof d), d += half_lanes<false>(r), std::memcpy(p, &d, sizeof d);
          }
        }
        vst(RGA + t * W + o, vld<V>(RGA + t * W + o) + rga);
        vst(RGB + t * W + o, vld<V>(RGB + t * W + o) + rgb);
      }
      for (int j = 0; j < NJ; ++j) vst(g + (j0 + j) * W + o, gr[j]), vst(dA + (j0 + j) * W + o, da[j]);
    }
  }
}

template <class Acc>
struct BwdKernels {
  void (*recompute[2][2])(int64_t, const Acc*, const Acc*, const Acc*, const Acc*, int64_t, const Acc*, int64_t,
                          const Acc*, Acc*, Acc*, Acc*, Acc*);  // scan_states keeping every step, [clamp][has y]
  void (*reverse)(int64_t, const Acc*, const Acc*, const Acc*, const Acc*, const Acc*, int64_t, const Acc*, int64_t,
                  const Acc*, const Acc*, Acc*, Acc*, Acc*, Acc*, Acc*, int64_t, Acc*, int64_t);
};
template <class Acc, bool BL, bool CL>
constexpr BwdKernels<Acc> bwd_kernels_of() {
  return {{{scan_states<Acc, NJB, BL, CL, true, false, false>, scan_states<Acc, NJB, BL, CL, true, true, false>},
           {scan_states<Acc, NJB, BL, CL, true, false, true>, scan_states<Acc, NJB, BL, CL, true, true, true>}},
          bwd_reverse<Acc, BL, CL>};
}
template <class Acc>
BwdKernels<Acc> bwd_kernels_for(bool bl, bool cl) {
  return bl ? (cl ? bwd_kernels_of<Acc, true, true>() : bwd_kernels_of<Acc, true, false>())
            : (cl ? bwd_kernels_of<Acc, false, true>() : bwd_kernels_of<Acc, false, false>());
}

// Partial sums of dB or dC over the keys (batch, group) that a unit of blocks touches, [key][t][NP].
// Units are contiguous block ranges, handed to threads dynamically; their partial sums are added in
// unit order at the end, so results do not depend on which thread ran which unit.
template <class Acc>
struct Partial {
  int64_t kmin = 0, nkeys = 0, lext = 1;  // keys [kmin, kmin + nkeys), t-extent lext
  std::vector<Acc> buf;                   // (nkeys, lext, NP)
  Acc* at(const Shape& s, int64_t key, int64_t t) { return buf.data() + ((key - kmin) * lext + t) * s.NP; }
};

// The gradient sink of one of B, C for the block being processed: the unit's partial sums directly
// (shared), a per-chunk [t][NP][W] lane table (lanes) or a [NP][W] lane table for the whole block
// (constant), added to the partial sums lane by lane.
template <class Acc>
struct BCGrad {
  const Shape& s;
  BCSource<Acc>& src;
  Partial<Acc>* part = nullptr;
  std::vector<Acc> tile;
  BCGrad(const Shape& s_, BCSource<Acc>& src_) : s(s_), src(src_) {}

  void begin_unit(Partial<Acc>& pt, int64_t k0, int64_t k1) {  // blocks [k0, k1)
    part = &pt;
    pt.lext = src.var ? s.L : 1;
    const Block first(s, k0), lastb(s, k1 - 1);
    int64_t key0 = src.key(first.b, first.d0), key1 = src.key(lastb.b, lastb.d0 + lastb.nl - 1);
    if (!src.var && first.b != lastb.b) key0 = 0, key1 = src.groups - 1;  // constant keys wrap with the batch
    pt.kmin = key0;
    pt.nkeys = key1 - key0 + 1;
    pt.buf.assign(pt.nkeys * pt.lext * s.NP, Acc(0));
  }
  void begin_block() {
    if (src.mode == kConst) tile.assign(s.NP * W, Acc(0));
  }
  Acc* begin_chunk(const Block& blk, int64_t t0, int64_t& ts) {
    if (src.mode == kShared) {
      ts = s.NP;
      return part->at(s, src.key(blk.b, blk.d0), t0);
    }
    if (src.mode == kConst) {
      ts = 0;
    } else {
      ts = s.NP * W;
      tile.assign(s.T * s.NP * W, Acc(0));
    }
    return tile.data();
  }
  void end_chunk(const Block& blk, int64_t t0, int64_t tl) {
    if (src.mode != kLanes) return;
    for (int i = 0; i < blk.nl; ++i) {
      Acc* dst = part->at(s, src.key(blk.b, blk.d0 + i), t0);
      for (int64_t t = 0; t < tl; ++t)
        for (int64_t n = 0; n < s.N; ++n) dst[t * s.NP + n] += tile[(t * s.NP + n) * W + i];
    }
  }
  void end_block(const Block& blk) {
    if (src.mode != kConst) return;
    for (int i = 0; i < blk.nl; ++i) {
      Acc* dst = part->at(s, src.key(blk.b, blk.d0 + i), 0);
      for (int64_t n = 0; n < s.N; ++n) dst[n] += tile[n * W + i];
    }
  }
};

// One of dB, dC: out[key, n, t] = the sum over units, in unit order, of their partial sums.
template <class Acc>
struct PartialSums {
  bool var;
  int64_t groups;
  const Operand& out;
  std::vector<Partial<Acc>>& parts;
  int64_t nkeys(const Shape& s) const { return var ? s.Bsz * groups : groups; }
  void reduce_key(const Shape& s, int64_t k, std::vector<Acc>& acc) const {
    const int64_t lext = var ? s.L : 1;
    acc.assign(lext * s.NP, Acc(0));
    for (auto& part : parts) {
      if (k < part.kmin || k >= part.kmin + part.nkeys) continue;
      const Acc* src_k = part.at(s, k, 0);
      for (int64_t i = 0; i < lext * s.NP; ++i) acc[i] += src_k[i];
    }
    for (int64_t n = 0; n < s.N; ++n)
      store<Acc>(out.ptr + (k * out.sb + n * out.sn) * itemsize(out.dtype), out.dtype, out.sl, lext, &acc[n], s.NP);
  }
};

// dB's keys, then dC's, split over the threads in one parallel region.
template <class Acc>
void reduce_partials(const Shape& s, const PartialSums<Acc>& b, const PartialSums<Acc>& c, int nt) {
  const int64_t nb = b.nkeys(s), nkeys = nb + c.nkeys(s);
  const int ntr = int(std::max<int64_t>(1, std::min<int64_t>(nt, nkeys)));
  parallel_for(ntr, [&](int tid) {
    std::vector<Acc> acc;
    for (int64_t k = nkeys * tid / ntr; k < nkeys * (tid + 1) / ntr; ++k) {
      if (k < nb) b.reduce_key(s, k, acc); else c.reduce_key(s, k - nb, acc);
    }
  });
}

template <class Acc>
void backward(const Params& p) {
  using V = RowVec<Acc>;
  constexpr int VL = kLanesOf<V>, NR = W / VL;  // a row's 16 steps are NR registers
  const Shape s(p);
  const Acc* A = reinterpret_cast<const Acc*>(p.A);
  const Acc* Dv = reinterpret_cast<const Acc*>(p.Dvec);
  const Acc* hs = reinterpret_cast<const Acc*>(p.hs);
  const Acc* dlast = reinterpret_cast<const Acc*>(p.dlast);
  const int64_t nb_total = s.blocks(), hstride = s.NP * W, SP = s.SP;
  const int nt = int(std::max<int64_t>(1, std::min<int64_t>(p.nthreads, nb_total)));
  const bool has_z = p.z.ptr != 0;
  // Units of contiguous blocks, taken dynamically (see Partial): a few per thread, then (with several
  // threads) a tail of single blocks, so that a thread that fell behind (another process had its core
  // for a while) is caught up at a one-block grain.
  const int64_t ntail = nt > 1 ? std::min<int64_t>(nb_total / 2, 4 * nt) : 0, nhead = nb_total - ntail;
  const int64_t nbig = std::min<int64_t>(nhead, 8 * nt), nunits = nbig + ntail;
  std::vector<Partial<Acc>> pb(nunits), pc(nunits);
  std::atomic<int64_t> next{0};

  parallel_for(nt, [&](int) {
    BCSource<Acc> bsrc(s, p.Bm, p.b_groups, p.b_var), csrc(s, p.Cm, p.c_groups, p.c_var);
    BCGrad<Acc> dbg(s, bsrc), dcg(s, csrc);
    SpanInputs<Acc> in(s);
    RowsIn<Acc> dout(SP);
    RowsOut<Acc> du(SP), ddelta(SP), dz(SP);
    std::vector<Acc> A1(s.NP * W), A2(s.NP * W), G(s.NP * W), dA(s.NP * W);
    // rows (W, SP): d delta' / d(delta + bias), sigmoid(z), dy, y, sum_n A g a h, sum_n g B; tiles (SP, W)
    std::vector<Acc> SPr(W * SP), SZr(W * SP), DYr(W * SP), Yr(W * SP), RGAr(W * SP), RGBr(W * SP);
    std::vector<Acc> DY(SP * W), Y(SP * W), RGA(SP * W), RGB(SP * W);
    std::vector<Acc> Hb((s.T + 1) * NJB * W), Ab(s.T * NJB * W);
    V dDacc[W][NR], dbacc[W][NR];  // per channel: lane j of register r sums steps t = r * VL + j (mod 16)
    for (int64_t u; (u = next.fetch_add(1)) < nunits;) {
      const int64_t k0 = u < nbig ? nhead * u / nbig : nhead + (u - nbig);
      const int64_t k1 = u < nbig ? nhead * (u + 1) / nbig : k0 + 1;
      dbg.begin_unit(pb[u], k0, k1);
      dcg.begin_unit(pc[u], k0, k1);
      for (int64_t k = k0; k < k1; ++k) {
        const Block blk(s, k);
        lane_weights(s, blk, A, Acc(1), A1.data());
        lane_weights(s, blk, A, Acc(kLog2e), A2.data());
        std::fill(G.begin(), G.end(), Acc(0));
        std::fill(dA.begin(), dA.end(), Acc(0));
        if (dlast) lane_weights(s, blk, dlast + blk.b * s.D * s.N, Acc(1), G.data());
        for (int i = 0; i < W; ++i)
          for (int r = 0; r < NR; ++r) dDacc[i][r] = dbacc[i][r] = V{};
        bsrc.begin_block(blk);
        csrc.begin_block(blk);
        dbg.begin_block();
        dcg.begin_block();
        const BwdKernels<Acc> kern = bwd_kernels_for<Acc>(bsrc.mode != kShared, csrc.mode != kShared);
        const Acc limit = decay_limit(A2.data(), s.NP * W);
        const Acc* hsk = hs + k * (s.nc + 1) * hstride;
        for (int64_t t0 = (s.L - 1) / s.S * s.S; t0 >= 0; t0 -= s.S) {
          const int64_t sl = std::min(s.S, s.L - t0), se = (sl + W - 1) / W * W;
          in.load(p, s, blk, t0, sl, SPr.data());
          dout.read(p.dout, blk, t0, sl);
          for (int i = 0; i < W; ++i) {
            const Acc *dor = dout.r[i], *zr = in.z.r[i], *don = dout.r[next_row(i)], *zn = in.z.r[next_row(i)];
            Acc *szr = &SZr[i * SP], *dyr = &DYr[i * SP];
            for (int64_t t = 0; t < se; t += W) {
              prefetch_line<false>(don + t), prefetch_line<false>(zn + t);
              for (int64_t o = t; o < t + W; o += VL) {
                V dy = vld<V>(dor + o);
                if (has_z) {
                  const V zv = vld<V>(zr + o), sz = vsigmoid(zv);
                  vst(szr + o, sz);
                  dy = dy * zv * sz;
                }
                vst(dyr + o, dy);
              }
            }
          }
          rows_to_tile(DYr.data(), SP, se, DY.data());
          std::fill(RGA.begin(), RGA.begin() + se * W, Acc(0));
          std::fill(RGB.begin(), RGB.begin() + se * W, Acc(0));
          std::fill(Y.begin(), Y.begin() + se * W, Acc(0));
          for (int64_t c0 = (sl - 1) / s.T * s.T; c0 >= 0; c0 -= s.T) {
            const int64_t tl = std::min(s.T, sl - c0), c = (t0 + c0) / s.T;
            int64_t bts, cts, dbts, dcts;
            const Acc* Bp = bsrc.chunk(t0 + c0, tl, bts);
            const Acc* Cp = csrc.chunk(t0 + c0, tl, cts);
            Acc* dBp = dbg.begin_chunk(blk, t0 + c0, dbts);
            Acc* dCp = dcg.begin_chunk(blk, t0 + c0, dcts);
            const int64_t bj = bsrc.jstride(), cj = csrc.jstride();
            const Acc *DT = &in.DT[c0 * W], *DTU = &in.DTU[c0 * W];
            const bool clamp = !decays_in_range(DT, tl * W, limit);
            for (int64_t n = 0; n < s.NP; n += NJB) {
              kern.recompute[clamp][has_z](tl, &A2[n * W], DT, DTU, Bp + n * bj, bts, Cp + n * cj, cts,
                                           hsk + c * hstride + n * W, nullptr, Hb.data(), Ab.data(),
                                           has_z ? &Y[c0 * W] : nullptr);
              kern.reverse(tl, &A1[n * W], DT, DTU, &DY[c0 * W], Bp + n * bj, bts, Cp + n * cj, cts, Hb.data(),
                           Ab.data(), &G[n * W], &dA[n * W], &RGA[c0 * W], &RGB[c0 * W], dBp + n * bj, dbts,
                           dCp + n * cj, dcts);
            }
            dbg.end_chunk(blk, t0 + c0, tl);
            dcg.end_chunk(blk, t0 + c0, tl);
          }
          // Per-(channel, t) gradients, in rows. Steps past sl hold zeros (dout, RGA, RGB) or are not stored.
          tile_to_rows(RGA.data(), se, RGAr.data(), SP);
          tile_to_rows(RGB.data(), se, RGBr.data(), SP);
          if (has_z) tile_to_rows(Y.data(), se, Yr.data(), SP);
          du.begin(p.du, blk, t0, sl);
          ddelta.begin(p.ddelta, blk, t0, sl);
          if (has_z) dz.begin(p.dz, blk, t0, sl);
          for (int i = 0; i < blk.nl; ++i) {
            const V dv = vsplat<V>(channel_weight(Dv, blk, i));
            const int64_t r0 = i * SP;
            const Acc *ur = in.u.r[i], *zr = in.z.r[i], *dor = dout.r[i];
            const Acc *dyr = &DYr[r0], *rgar = &RGAr[r0], *rgbr = &RGBr[r0], *dtr = &in.DTr[r0], *spr = &SPr[r0];
            const Acc *szr = &SZr[r0], *yr = &Yr[r0];
            Acc *dur = du.r[i], *ddr = ddelta.r[i], *dzr = has_z ? dz.r[i] : nullptr;
            Acc *dun = du.r[next_row(i)], *ddn = ddelta.r[next_row(i)], *dzn = has_z ? dz.r[next_row(i)] : nullptr;
            V dDi[NR] = {}, dbi[NR] = {};
            // Rows written in place go around the caches when aligned; buffered ones are read back by commit.
            auto emit = [&](auto nt) {
              constexpr bool NT = decltype(nt)::value;
              auto put = [](Acc* q, V v) { if constexpr (NT) vstream(q, v); else vst(q, v); };
              for (int64_t t = 0; t < se; t += W) {
                if (!NT) prefetch_line<true>(dun + t), prefetch_line<true>(ddn + t);
                if (has_z && !NT) prefetch_line<true>(dzn + t);
                for (int r = 0; r < NR; ++r) {
                  const int64_t o = t + r * VL;
                  const V uv = vld<V>(ur + o), dy = vld<V>(dyr + o), rgb = vld<V>(rgbr + o);
                  put(dur + o, vfma(dy, dv, vld<V>(dtr + o) * rgb));
                  const V dd = vfma(uv, rgb, vld<V>(rgar + o)) * vld<V>(spr + o);  // dL/d(delta + bias)
                  put(ddr + o, dd);
                  dDi[r] = vfma(dy, uv, dDi[r]);
                  dbi[r] += dd;
                  if (has_z) {
                    const V zv = vld<V>(zr + o), sz = vld<V>(szr + o);
                    const V y = vfma(uv, dv, vld<V>(yr + o));
                    put(dzr + o, vld<V>(dor + o) * y * sz * vfma(zv, Acc(1) - sz, vsplat<V>(Acc(1))));
                  }
                }
              }
            };
            if (du.direct && ddelta.direct && (!has_z || dz.direct) && stream_ok(dur) && stream_ok(ddr) &&
                (!has_z || stream_ok(dzr)))
              emit(std::true_type{});
            else
              emit(std::false_type{});
            for (int r = 0; r < NR; ++r) dDacc[i][r] += dDi[r], dbacc[i][r] += dbi[r];
          }
          du.commit(p.du, blk, t0, sl);
          ddelta.commit(p.ddelta, blk, t0, sl);
          if (has_z) dz.commit(p.dz, blk, t0, sl);
        }
        dbg.end_block(blk);
        dcg.end_block(blk);
        for (int i = 0; i < blk.nl; ++i) {
          const int64_t row = blk.b * s.D + blk.d0 + i;
          for (int64_t n = 0; n < s.N; ++n) {
            if (p.dinit) reinterpret_cast<Acc*>(p.dinit)[row * s.N + n] = G[n * W + i];
            reinterpret_cast<Acc*>(p.dA_rows)[row * s.N + n] = dA[n * W + i];
          }
          Acc sD = 0, sb = 0;
          for (int r = 0; r < NR; ++r)
            for (int j = 0; j < VL; ++j) sD += dDacc[i][r][j], sb += dbacc[i][r][j];
          if (p.dD_rows) reinterpret_cast<Acc*>(p.dD_rows)[row] = sD;
          if (p.dbias_rows) reinterpret_cast<Acc*>(p.dbias_rows)[row] = sb;
        }
      }
    }
    stream_fence();
  });
  reduce_partials(s, PartialSums<Acc>{p.b_var, p.b_groups, p.dB, pb}, PartialSums<Acc>{p.c_var, p.c_groups, p.dC, pc},
                  nt);
}

void check(const Params& p) {
  if (p.batch < 1 || p.dim < 1 || p.seqlen < 1 || p.dstate < 1 || p.dstate > 256)
    throw std::invalid_argument("selective_scan: bad sizes (batch, dim, seqlen >= 1; 1 <= dstate <= 256)");
  if (p.chunk < 1) throw std::invalid_argument("selective_scan: chunk must be >= 1");
  if (p.b_groups < 1 || p.dim % p.b_groups || p.c_groups < 1 || p.dim % p.c_groups)
    throw std::invalid_argument("selective_scan: groups must divide dim");
  if (p.acc != kF32 && p.acc != kF64) throw std::invalid_argument("selective_scan: acc must be float32 or float64");
  if (!p.A || !p.hs || !p.u.ptr || !p.delta.ptr || !p.Bm.ptr || !p.Cm.ptr)
    throw std::invalid_argument("selective_scan: missing a required pointer");
}

}  // namespace

void register_selective_scan_cpu(py::module_& m) {
  py::class_<Operand>(m, "SelectiveScanOperand", "pointer, dtype code (0 f32, 1 f64, 2 f16, 3 bf16), strides")
      .def(py::init<>())
      .def_readwrite("ptr", &Operand::ptr)
      .def_readwrite("dtype", &Operand::dtype)
      .def_readwrite("sb", &Operand::sb)
      .def_readwrite("sd", &Operand::sd)
      .def_readwrite("sn", &Operand::sn)
      .def_readwrite("sl", &Operand::sl);
  auto cls = py::class_<Params>(m, "SelectiveScanParams", "arguments of selective_scan_fwd / _bwd")
      .def(py::init<>());
#define DK_FIELD(name) cls.def_readwrite(#name, &Params::name)
  DK_FIELD(batch); DK_FIELD(dim); DK_FIELD(seqlen); DK_FIELD(dstate); DK_FIELD(chunk);
  DK_FIELD(nthreads); DK_FIELD(softplus); DK_FIELD(acc);
  DK_FIELD(u); DK_FIELD(delta); DK_FIELD(z); DK_FIELD(out);
  DK_FIELD(dout); DK_FIELD(du); DK_FIELD(ddelta); DK_FIELD(dz);
  DK_FIELD(Bm); DK_FIELD(Cm); DK_FIELD(b_groups); DK_FIELD(c_groups); DK_FIELD(b_var); DK_FIELD(c_var);
  DK_FIELD(A); DK_FIELD(Dvec); DK_FIELD(delta_bias); DK_FIELD(init); DK_FIELD(last); DK_FIELD(hs);
  DK_FIELD(dlast); DK_FIELD(dA_rows); DK_FIELD(dD_rows); DK_FIELD(dbias_rows); DK_FIELD(dinit);
  DK_FIELD(dB); DK_FIELD(dC);
#undef DK_FIELD
  // The layout of the saved states, hs (batch, ceil(dim / lanes), nc + 1, dstate padded to a multiple
  // of state_block, lanes): the launcher allocates it and checks these against its own.
  m.attr("selective_scan_saved_layout") = py::make_tuple(W, NJB);
  m.def(
      "selective_scan_fwd",
      [](const Params& p) {
        check(p);
        if (!p.out.ptr || !p.last) throw std::invalid_argument("selective_scan_fwd: out and last are required");
        py::gil_scoped_release nogil;
        if (p.acc == kF64) forward<double>(p); else forward<float>(p);
      },
      "Forward scan: writes out, last and the chunk-boundary states hs.");
  m.def(
      "selective_scan_bwd",
      [](const Params& p) {
        check(p);
        if (!p.dout.ptr || !p.du.ptr || !p.ddelta.ptr || !p.dA_rows || !p.dB.ptr || !p.dC.ptr ||
            (p.z.ptr && !p.dz.ptr))
          throw std::invalid_argument("selective_scan_bwd: missing a gradient pointer");
        py::gil_scoped_release nogil;
        if (p.acc == kF64) backward<double>(p); else backward<float>(p);
      },
      "Backward scan from the saved chunk-boundary states hs.");
}
