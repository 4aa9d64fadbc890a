// Pass 1 of exact per-query top-k attention (ditkernels/ops/topk.py, docs/spec.md §2) on the CPU, in one
// parallel region: per (batch*head, query tile) work item and group of its query rows,
//   S = (scale * Q_rows) K^T      (rows x keys, the forward kernel's products in its order: the same
//                                  float bits as the scores the MASK_THRESHOLD kernel compares)
// then per row: the k-th and (k+1)-th largest score (a bucket select, below), the threshold by the
// module's tie rule, and the count of kept scores in every key tile, which gives the tile-visit code
// of each (query tile, key tile): 0 nothing kept, 1 every in-bounds pair kept, 2 some.
// Workspace per thread: a (rows x keys) score panel and, when it fits, K^T of one head; rows chosen
// to keep all of it near 64 MB.
//
// Bucket select of the values at descending ranks r-1 and r of x[0, n) (no NaN): a histogram of
// kBuckets buckets spread linearly over [min, max] (the bucket index is monotone in x), the buckets
// that hold ranks r-1 and r located by a count from the top, their elements gathered (those above
// are counted, not moved), and the same again on the gathered values while that shrinks them;
// std::nth_element finishes on a few dozen values. About 1 ns per score here against ~8 for a
// whole-row nth_element (measured on random rows of 1k-32k scores).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "cpu/buffer.h"
#include "cpu/gemm.h"
#include "cpu/simd.h"
#include "cpu/thread_pool.h"

namespace py = pybind11;

namespace dk {
namespace {

constexpr int kBuckets = 256;
constexpr int64_t kKeyChunk = 64;                   // keys per packed K^T panel (a multiple of every vector width)
constexpr int64_t kMaxRows = 64;                    // query rows per score panel
constexpr int64_t kSmall = 64;                      // nth_element below this many values
constexpr int kMaxLevels = 6;                       // histogram levels before nth_element takes over

// Bucket of x in [mn, mx] (inv = kBuckets / (mx - mn), finite and > 0): non-decreasing in x.
template <typename T>
inline int bucket_of(T x, T mn, T inv) {
  const T y = (x - mn) * inv;  // >= 0 and finite for mn <= x <= mx
  return y < static_cast<T>(kBuckets) ? static_cast<int>(y) : kBuckets - 1;
}

// Minimum and maximum of x[0, n) (n >= 1) ignoring NaNs; returns whether x holds a NaN.
template <typename T>
inline bool min_max(const T* x, int64_t n, T& mn, T& mx) {
  using V = vec_t<T>;
  using VI = typename VecOf<T>::itype;
  constexpr int W = kLanes<T>;
  int64_t i = 0;
  bool nan = false;
  mn = std::numeric_limits<T>::infinity(), mx = -mn;
  if (n >= W) {
    V a = splat(mn), b = splat(mx);
    VI bad{};
    for (; i + W <= n; i += W) {
      const V v = loadu(x + i);
      a = v < a ? v : a;
      b = v > b ? v : b;
      bad |= (v != v);
    }
    for (int l = 0; l < W; ++l) mn = std::min(mn, a[l]), mx = std::max(mx, b[l]), nan |= bad[l] != 0;
  }
  for (; i < n; ++i) mn = std::min(mn, x[i]), mx = std::max(mx, x[i]), nan |= x[i] != x[i];
  return nan;
}

// compress_store(dst, v, k): the lanes of v whose bit is set in k, in lane order, to dst[0, popcount(k));
// all W lanes of dst are written. kHasCompress<T>: whether this build has one for T.
#if defined(__AVX512F__)
template <typename T>
constexpr bool kHasCompress = true;
inline void compress_store(float* dst, vec_t<float> v, uint32_t k) {
  _mm512_storeu_ps(dst, _mm512_maskz_compress_ps(static_cast<__mmask16>(k), (__m512)v));
}
inline void compress_store(double* dst, vec_t<double> v, uint32_t k) {
  _mm512_storeu_pd(dst, _mm512_maskz_compress_pd(static_cast<__mmask8>(k), (__m512d)v));
}
#elif defined(__AVX2__)
template <typename T>
constexpr bool kHasCompress = std::is_same<T, float>::value;
// For each 8-bit lane mask, the lane indices that move its set lanes to the front.
struct CompressTable {
  uint8_t idx[256][8];
  constexpr CompressTable() : idx{} {
    for (int m = 0; m < 256; ++m)
      for (int l = 0, c = 0; l < 8; ++l)
        if ((m >> l) & 1) idx[m][c++] = static_cast<uint8_t>(l);
  }
};
constexpr CompressTable kCompressTable{};
inline void compress_store(float* dst, vec_t<float> v, uint32_t k) {
  const __m128i idx8 = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(kCompressTable.idx[k]));
  _mm256_storeu_ps(dst, _mm256_permutevar8x32_ps((__m256)v, _mm256_cvtepu8_epi32(idx8)));
}
#else
template <typename T>
constexpr bool kHasCompress = false;
#endif

// Copies the x[i] (i < n) whose bucket is in [lo, hi] to dst, in order; returns how many. dst may be x
// (the write index never passes the read index). bucket_of(x) >= lo iff y >= lo, and <= hi iff
// hi == kBuckets - 1 or y < hi + 1, with y = (x - mn) * inv: the same test in vector lanes.
template <typename T>
int64_t gather_buckets(const T* x, int64_t n, T mn, T inv, int lo, int hi, T* dst) {
  const T flo = static_cast<T>(lo), fhi = hi == kBuckets - 1 ? std::numeric_limits<T>::infinity() : T(hi + 1);
  int64_t c = 0, i = 0;
  if constexpr (kHasCompress<T>) {
    using V = vec_t<T>;
    constexpr int W = kLanes<T>;
    const V vmn = splat(mn), vinv = splat(inv), vlo = splat(flo), vhi = splat(fhi);
    for (; i + W <= n; i += W) {
      const V v = loadu(x + i), y = (v - vmn) * vinv;
      const uint32_t k = lane_bits((y >= vlo) & (y < vhi));
      compress_store(dst + c, v, k);  // W lanes written at c <= i: never past x + i + W
      c += __builtin_popcount(k);
    }
  }
  for (; i < n; ++i) {
    const T v = x[i], y = (v - mn) * inv;
    dst[c] = v;
    c += (y >= flo) & (y < fhi);
  }
  return c;
}

// The values at descending ranks r - 1 and r (0-based) of x[0, n): 1 <= r < n, no NaN in x, mn / mx
// its minimum and maximum. tmp: room for n values (x itself is not modified).
template <typename T>
void rank_pair(const T* x, int64_t n, int64_t r, T mn, T mx, T* tmp, T& at_r1, T& at_r) {
  const T* src = x;
  for (int level = 0;; ++level) {
    if (mn == mx) {
      at_r1 = at_r = mn;
      return;
    }
    const T range = mx - mn;
    const T inv = static_cast<T>(kBuckets) / range;
    // (each level shrinks the value range 256-fold; widely spread values, e.g. 2^i, take many levels)
    if (n <= kSmall || level >= kMaxLevels || !std::isfinite(range) || !std::isfinite(inv) || !(inv > T(0))) {
      if (src != tmp) std::copy(src, src + n, tmp);
      std::nth_element(tmp, tmp + r, tmp + n, std::greater<T>());
      at_r = tmp[r];
      at_r1 = *std::min_element(tmp, tmp + r);
      return;
    }
    std::array<int32_t, kBuckets> h0{}, h1{};  // two histograms: fewer store-to-load stalls
    int32_t idx[256];
    for (int64_t i0 = 0; i0 < n; i0 += 256) {
      const int m = static_cast<int>(std::min<int64_t>(256, n - i0));
      for (int i = 0; i < m; ++i) idx[i] = bucket_of(src[i0 + i], mn, inv);
      int i = 0;
      for (; i + 2 <= m; i += 2) ++h0[idx[i]], ++h1[idx[i + 1]];
      if (i < m) ++h0[idx[i]];
    }
    // buckets hi (holds rank r - 1) and lo (holds rank r), counted from the top
    int64_t above = 0;
    int hi = kBuckets - 1;
    while (above + h0[hi] + h1[hi] <= r - 1) above += h0[hi] + h1[hi], --hi;
    int64_t upto = above;
    int lo = hi;
    while (upto + h0[lo] + h1[lo] <= r) upto += h0[lo] + h1[lo], --lo;
    // gather buckets [lo, hi] (in place when src is tmp: the write index never passes the read index)
    const int64_t c = gather_buckets(src, n, mn, inv, lo, hi, tmp);
    T nmn, nmx;
    if (c == n) {  // no progress (values crowded in one bucket): finish with nth_element
      std::nth_element(tmp, tmp + r, tmp + n, std::greater<T>());
      at_r = tmp[r];
      at_r1 = *std::min_element(tmp, tmp + r);
      return;
    }
    min_max(tmp, c, nmn, nmx);
    src = tmp, n = c, r -= above, mn = nmn, mx = nmx;
  }
}

struct SelectParams {
  int64_t B, H, Sq, Sk, D;
  double scale, tie_tol;
  uintptr_t q, k;
  std::array<int64_t, 4> qs, ks;
  std::vector<int64_t> topks;  // each in [1, Sk)
  int64_t block_m, block_n;
  size_t workspace;  // bytes of score panels (and K^T) of all threads together, about
  float* thr;       // (T, B*H*Sq)
  int8_t* visits;   // (T, B*H, nq, nk)
  int num_threads;
};

template <typename S>
void select_kernel(const SelectParams& p) {
  using T = typename ComputeOf<S>::type;
  constexpr int W = kLanes<T>;
  const int64_t D = p.D, Sq = p.Sq, Sk = p.Sk, BH = p.B * p.H, NT = static_cast<int64_t>(p.topks.size());
  const int64_t nq = (Sq + p.block_m - 1) / p.block_m, nk = (Sk + p.block_n - 1) / p.block_n;
  const int64_t nchunks = (Sk + kKeyChunk - 1) / kKeyChunk;
  const int64_t ld = nchunks * kKeyChunk;  // score panel row stride
  const int64_t items = BH * nq;
  if (items == 0 || Sk == 0) return;
  int threads = std::max(1, std::min<int>(p.num_threads, static_cast<int>(std::min<int64_t>(items, 1 << 20))));
  // K^T of a whole head, packed once per thread and head (the items of a head are consecutive), when
  // half the budget holds one per thread; else packed chunk by chunk for every row group.
  const size_t head_bytes = static_cast<size_t>(D) * ld * sizeof(T);
  const bool whole_head = static_cast<size_t>(threads) * head_bytes <= p.workspace / 2;
  const size_t left = p.workspace - (whole_head ? static_cast<size_t>(threads) * head_bytes : 0);
  int64_t rows = static_cast<int64_t>(left / (static_cast<size_t>(threads) * ld * sizeof(T)));
  rows = std::max<int64_t>(1, std::min({rows, kMaxRows, p.block_m}));
  const T c = static_cast<T>(p.scale);
  const T tie = static_cast<T>(p.tie_tol);
  std::atomic<int64_t> next{0};

  auto body = [&](int) {
    Buf<T> qs_b, kt_b, s_b, tmp_b;
    Buf<uint8_t> any_b, all_b;
    T* Qs = qs_b.get(rows * D);
    T* Kt = kt_b.get(whole_head ? D * ld : D * kKeyChunk);  // chunk ch at Kt + ch * D * kKeyChunk
    T* Sp = s_b.get(rows * ld);
    T* tmp = tmp_b.get(Sk);
    uint8_t* any = any_b.get(NT * nk);
    uint8_t* all = all_b.get(NT * nk);
    int64_t packed_head = -1;
    // K^T of keys [ch * kKeyChunk, +kKeyChunk) of head (b, h) into dst (D x kKeyChunk), zero-padded
    auto pack_chunk = [&](const S* kb, int64_t ch, T* dst) {
      const int64_t j0 = ch * kKeyChunk, nj = std::min(kKeyChunk, Sk - j0);
      for (int64_t d = 0; d < D; ++d)
        for (int64_t j = nj; j < kKeyChunk; ++j) dst[d * kKeyChunk + j] = T(0);
      for (int64_t j = 0; j < nj; ++j) {
        const S* src = kb + (j0 + j) * p.ks[2];
        for (int64_t d = 0; d < D; ++d) dst[d * kKeyChunk + j] = to_compute(src[d]);
      }
    };
    for (;;) {
      const int64_t it = next.fetch_add(1, std::memory_order_relaxed);
      if (it >= items) break;
      const int64_t bh = it / nq, m = it % nq, b = bh / p.H, h = bh % p.H;
      const S* qb = reinterpret_cast<const S*>(p.q) + b * p.qs[0] + h * p.qs[1];
      const S* kb = reinterpret_cast<const S*>(p.k) + b * p.ks[0] + h * p.ks[1];
      if (whole_head && packed_head != bh) {
        for (int64_t ch = 0; ch < nchunks; ++ch) pack_chunk(kb, ch, Kt + ch * D * kKeyChunk);
        packed_head = bh;
      }
      std::fill(any, any + NT * nk, uint8_t(0));
      std::fill(all, all + NT * nk, uint8_t(1));
      const int64_t t0 = m * p.block_m, t1 = std::min(t0 + p.block_m, Sq);
      for (int64_t r0 = t0; r0 < t1; r0 += rows) {
        const int64_t nr = std::min(rows, t1 - r0);
        for (int64_t r = 0; r < nr; ++r) {  // scale * q, as the forward kernel packs it
          const S* src = qb + (r0 + r) * p.qs[2];
          for (int64_t d = 0; d < D; ++d) Qs[r * D + d] = to_compute(src[d]) * c;
        }
        for (int64_t ch = 0; ch < nchunks; ++ch) {
          const T* B = whole_head ? Kt + ch * D * kKeyChunk : Kt;
          if (!whole_head) pack_chunk(kb, ch, Kt);
          gemm<T, false>(static_cast<int>(nr), static_cast<int>(kKeyChunk / W), static_cast<int>(D), Qs, D, 1, B,
                         kKeyChunk, Sp + ch * kKeyChunk, ld);
        }
        for (int64_t r = 0; r < nr; ++r) {
          const T* s = Sp + r * ld;
          const int64_t qi = r0 + r;
          T mn, mx;
          const bool nan = min_max(s, Sk, mn, mx);
          const T amax = std::max(std::abs(mn), std::abs(mx));
          const T tol = tie * amax;
          for (int64_t t = 0; t < NT; ++t) {
            float thr = std::numeric_limits<float>::quiet_NaN();  // as torch: a NaN score makes max|s| NaN
            if (!nan) {
              T tk, tk1;
              rank_pair(s, Sk, p.topks[t], mn, mx, tmp, tk, tk1);
              const T th = (tk - tk1 >= T(2) * tol) ? T(0.5) * (tk + tk1) : tk - tol;
              thr = static_cast<float>(th);
            }
            p.thr[t * BH * Sq + bh * Sq + qi] = thr;
            // the kernels compare with the float32 threshold: decide the tiles with it too
            const T tc = static_cast<T>(thr);
            uint8_t* an = any + t * nk;
            uint8_t* al = all + t * nk;
            for (int64_t u = 0; u < nk; ++u) {
              const int64_t c0 = u * p.block_n, c1 = std::min(c0 + p.block_n, Sk);
              int32_t cnt = 0;
              for (int64_t j = c0; j < c1; ++j) cnt += s[j] >= tc;
              an[u] |= cnt > 0;
              al[u] &= cnt == c1 - c0;
            }
          }
        }
      }
      for (int64_t t = 0; t < NT; ++t) {
        int8_t* out = p.visits + ((t * BH + bh) * nq + m) * nk;
        for (int64_t u = 0; u < nk; ++u) out[u] = any[t * nk + u] ? (all[t * nk + u] ? 1 : 2) : 0;
      }
    }
  };
  ThreadPool::instance().run(threads, body);
}

void topk_select(int dtype, int64_t B, int64_t H, int64_t Sq, int64_t Sk, int64_t D, double scale, uintptr_t q,
                 std::array<int64_t, 4> q_strides, uintptr_t k, std::array<int64_t, 4> k_strides,
                 std::vector<int64_t> topks, double tie_tol, int64_t block_m, int64_t block_n, uintptr_t thr,
                 uintptr_t visits, int num_threads, int64_t workspace_bytes) {
  if (B < 0 || H < 0 || Sq < 0 || Sk < 0 || D < 1)
    throw std::invalid_argument("cpu topk_select: expected non-negative sizes and D >= 1");
  if (block_m < 1 || block_n < 1) throw std::invalid_argument("cpu topk_select: block sizes must be positive");
  if (q_strides[3] != 1 || k_strides[3] != 1)
    throw std::invalid_argument("cpu topk_select: q and k need unit stride on the last dimension");
  for (int64_t t : topks)
    if (t < 1 || t >= Sk)
      throw std::invalid_argument("cpu topk_select: every topk must be in [1, Sk), got " + std::to_string(t));
  if (q == 0 || k == 0 || thr == 0 || visits == 0) throw std::invalid_argument("cpu topk_select: null pointer");
  SelectParams p;
  p.B = B, p.H = H, p.Sq = Sq, p.Sk = Sk, p.D = D, p.scale = scale, p.tie_tol = tie_tol;
  p.q = q, p.k = k, p.qs = q_strides, p.ks = k_strides, p.topks = std::move(topks);
  p.block_m = block_m, p.block_n = block_n;
  p.workspace = static_cast<size_t>(std::max<int64_t>(workspace_bytes, 0));
  p.thr = reinterpret_cast<float*>(thr);
  p.visits = reinterpret_cast<int8_t*>(visits);
  p.num_threads = num_threads;
  if (p.topks.empty()) return;
  py::gil_scoped_release nogil;
  switch (dtype) {
    case kFloat32: select_kernel<float>(p); return;
    case kFloat64: select_kernel<double>(p); return;
    case kFloat16: select_kernel<fp16_t>(p); return;
    case kBFloat16: select_kernel<bf16_t>(p); return;
    default: throw std::invalid_argument("cpu topk_select: unknown dtype code " + std::to_string(dtype));
  }
}

}  // namespace
}  // namespace dk

void register_topk_select_cpu(py::module_& m) {
  using namespace pybind11::literals;
  m.def("topk_select", &dk::topk_select,
        "Pass 1 of exact top-k attention (ditkernels/ops/topk.py): per query row of q (B, H, Sq, D) against\n"
        "k (B, H, Sk, D), the threshold of each topk in topks (each in [1, Sk)) into thr, float32 (T, B*H*Sq)\n"
        "contiguous, and the (query tile, key tile) visit codes (0 none kept, 1 all, 2 some) into visits,\n"
        "int8 (T, B*H, ceil(Sq/block_m), ceil(Sk/block_n)) contiguous. Pointers are data_ptr() integers;\n"
        "strides are in elements (unit stride on the last dimension). workspace_bytes: the score panels (and\n"
        "packed keys) of all threads together, about (panels of at least one row).",
        "dtype"_a, "B"_a, "H"_a, "Sq"_a, "Sk"_a, "D"_a, "scale"_a, "q"_a, "q_strides"_a, "k"_a, "k_strides"_a,
        "topks"_a, "tie_tol"_a, "block_m"_a, "block_n"_a, "thr"_a, "visits"_a, "num_threads"_a,
        "workspace_bytes"_a = int64_t(64) << 20);
}
