// CPU flash attention: forward and backward of the ditkernels core (schedule + element mask +
// epilogue), torch-independent. Python passes raw pointers (tensor.data_ptr()), sizes and strides
// in elements; the launcher is ditkernels/backends/cpu.py.
//
// Layout of the work. Every matrix product is cast into the one GEMM of gemm.h, whose vector
// dimension is the "tile" side of the problem, so that softmax statistics are vectors too:
//  - forward / dQ: work item = (batch*head, query tile, group of <= kRowGroup query rows). The query
//    rows are packed once, transposed and pre-scaled (Qt: D x rows). For each visited chunk of keys:
//      St = K_chunk * Qt                  (keys x rows: K rows are read in place as the A operand)
//      online softmax down the key axis (running max / sum are vectors over the query rows)
//      Ot += V_chunk^T * Pt               (D x rows: V read in place, transposed through strides)
//    and Ot is transposed back once when the item stores its rows.
//  - dK/dV: work item = (batch*head, KV tile, group of key rows), visiting the query tiles of the
//    transposed schedule: S = Q * Kt, P = exp(S - lse), dVt += dO^T P, dP = dO * Vt,
//    dS = P (dP - delta), dKt += Q^T dS. Deterministic: every output row is owned by one item.
// Scores are scaled natural-log units (q or k is pre-scaled by `scale`); exp(x - m) is computed as
// exp2((x - m) * log2(e)) after the subtraction, so a large logit (~1e3) costs no extra rounding.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cpu/buffer.h"
#include "cpu/gemm.h"
#include "cpu/local_mask.h"
#include "cpu/simd.h"
#include "cpu/thread_pool.h"

namespace py = pybind11;

namespace dk {
namespace {

// Ids shared with ditkernels/schedule.py.
constexpr int MASK_NONE = 0;
constexpr int MASK_LOCAL = 1;  // local windows: csrc/cpu/local_mask.h
constexpr int MASK_BAND = 2;   // Re-ttention's band: ElementMask<MASK_BAND>
constexpr int MASK_THRESHOLD = 3;  // exact top-k: score >= a per-row threshold (mask_rows, float32 B*H*Sq)
constexpr int EPILOGUE_NONE = 0;
constexpr int EPILOGUE_SCALE_RESIDUAL = 1;

#ifndef DK_ROW_GROUP
#define DK_ROW_GROUP 64
#endif
#ifndef DK_CHUNK
#define DK_CHUNK 64
#endif
// Tuning knobs (-DDK_ROW_GROUP=..., -DDK_CHUNK=...): any positive values are correct.
constexpr int kRowGroup = DK_ROW_GROUP;  // rows of the vector side per work item
constexpr int kChunk = DK_CHUNK;         // rows of the streamed side per inner step
constexpr double kLog2e = 1.4426950408889634;

// ---- element masks: the one place where new mask kinds plug in ---------------------------------
// visible(params, query_index, key_index) is evaluated on partial tile visits only; bounds are
// handled separately and always. A new kind adds a specialisation and a case in dispatch_mask.
template <int KIND>
struct ElementMask;

template <>
struct ElementMask<MASK_NONE> {
  static constexpr bool kTrivial = true;  // every in-bounds pair is visible: nothing to evaluate
  static bool visible(const int32_t*, int64_t, int64_t) { return true; }
};

// MASK_LOCAL is applied row-wise through a LocalTable (local_mask.h), not element by element.
template <>
struct ElementMask<MASK_LOCAL> {
  static constexpr bool kTrivial = false;
};

// Band over the raster sequence (or within frames): params (half, lo, hi, frame). Tokens outside
// [lo, hi) are global (they see and are seen by every token); grid tokens i, j are visible iff
// |f(i) - f(j)| <= half with f(i) = i - lo, or (i - lo) % frame when frame > 0 (per-frame band).
template <>
struct ElementMask<MASK_BAND> {
  static constexpr bool kTrivial = false;
  static bool visible(const int32_t* p, int64_t i, int64_t j) {
    const int64_t half = p[0], lo = p[1], hi = p[2], frame = p[3];
    if (i < lo || i >= hi || j < lo || j >= hi) return true;
    const int64_t d = frame > 0 ? (i - lo) % frame - (j - lo) % frame : i - j;
    return d <= half && -d <= half;
  }
};

// MASK_BAND on a chunk of forward scores St (key rows kk < n_keys, query lanes r < n_lanes holding the
// contiguous tokens q0 + r): on each partial key row the lanes of invisible pairs become -inf, filled as
// two lane ranges instead of a test per pair (per-frame bands test pairs).
template <typename T, typename RI>
inline void band_rows(T* St, int64_t ld, int64_t n_keys, int64_t q0, int64_t n_lanes, const RI& ri,
                      const int32_t* p) {
  const int64_t half = p[0], lo = p[1], hi = p[2], frame = p[3];
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const int64_t g0 = std::clamp<int64_t>(lo - q0, 0, n_lanes), g1 = std::clamp<int64_t>(hi - q0, g0, n_lanes);
  for (int64_t kk = 0; kk < n_keys; ++kk) {
    if (!ri.is_partial(kk)) continue;
    const int64_t j = ri.token(kk);
    if (j < lo || j >= hi) continue;  // a global key: every query sees it
    T* s = St + kk * ld;
    if (frame > 0) {
      for (int64_t r = g0; r < g1; ++r)
        if (!ElementMask<MASK_BAND>::visible(p, q0 + r, j)) s[r] = neg_inf;
      continue;
    }
    // grid lanes see key j iff |q0 + r - j| <= half
    const int64_t v0 = std::clamp<int64_t>(j - half - q0, g0, g1);
    const int64_t v1 = std::clamp<int64_t>(j + half + 1 - q0, v0, g1);
    std::fill(s + g0, s + v0, neg_inf);
    std::fill(s + v1, s + g1, neg_inf);
  }
}

// MASK_THRESHOLD depends on the score, not the indices: applied where the scores are (threshold_rows).
template <>
struct ElementMask<MASK_THRESHOLD> {
  static constexpr bool kTrivial = false;
};

// MASK_THRESHOLD on one chunk of scores S (rows i < n_rows of the streamed side, lanes j < n_lanes, row
// stride ld): the pairs of partial rows whose score is below the query's threshold become -inf. `lane_q`:
// lanes are queries (forward, dQ: threshold per lane) or keys (dK/dV: threshold per row).
template <typename T, typename RI, typename LaneTok>
inline void threshold_rows(T* S, int64_t ld, int64_t n_rows, int64_t n_lanes, const RI& ri, bool lane_q,
                           const float* thr, LaneTok&& lane_token) {
  const T neg_inf = -std::numeric_limits<T>::infinity();
  for (int64_t i = 0; i < n_rows; ++i) {
    if (!ri.is_partial(i)) continue;
    T* s = S + i * ld;
    if (lane_q) {
      for (int64_t j = 0; j < n_lanes; ++j)
        if (s[j] < static_cast<T>(thr[lane_token(j)])) s[j] = neg_inf;
    } else {
      const T t = static_cast<T>(thr[ri.token(i)]);
      for (int64_t j = 0; j < n_lanes; ++j)
        if (s[j] < t) s[j] = neg_inf;
    }
  }
}

template <typename F>
void dispatch_mask(int kind, F&& f) {
  switch (kind) {
    case MASK_NONE: f(std::integral_constant<int, MASK_NONE>{}); return;
    case MASK_LOCAL: f(std::integral_constant<int, MASK_LOCAL>{}); return;
    case MASK_BAND: f(std::integral_constant<int, MASK_BAND>{}); return;
    case MASK_THRESHOLD: f(std::integral_constant<int, MASK_THRESHOLD>{}); return;
    default: throw std::invalid_argument("cpu attention: unsupported element mask kind " + std::to_string(kind));
  }
}

template <typename F>
void dispatch_dtype(int dtype, F&& f) {
  switch (dtype) {
    case kFloat32: f(float{}); return;
    case kFloat64: f(double{}); return;
    case kFloat16: f(fp16_t{}); return;
    case kBFloat16: f(bf16_t{}); return;
    default: throw std::invalid_argument("cpu attention: unknown dtype code " + std::to_string(dtype));
  }
}

// ---- small helpers -----------------------------------------------------------------------------
using Strides4 = std::array<int64_t, 4>;

struct Tensor4 {
  uintptr_t ptr = 0;
  Strides4 st{};
  template <typename S>
  const S* row(int64_t b, int64_t h, int64_t i) const {
    return reinterpret_cast<const S*>(ptr) + b * st[0] + h * st[1] + i * st[2];
  }
  template <typename S>
  S* mrow(int64_t b, int64_t h, int64_t i) const {
    return reinterpret_cast<S*>(ptr) + b * st[0] + h * st[1] + i * st[2];
  }
};

// CSR over tiles (kv_ptr / kv_idx / partial); ptr == nullptr means dense.
struct Sched {
  const int32_t* ptr = nullptr;
  const int32_t* idx = nullptr;
  const int32_t* partial = nullptr;
  int64_t ptr_stride = 0;  // per head slice; 0 when one slice is shared by every batch*head
  int64_t idx_stride = 0;
};

// Calls fn(start, len, partial) for the chunks (<= chunk long) of the index ranges that `tile`
// visits: every index of [0, seq) when dense, else the listed tiles of `block` indices, clipped to seq.
template <typename F>
inline void for_each_chunk(const Sched& s, int64_t bh, int64_t tile, int64_t block, int64_t seq, int64_t chunk,
                           F&& fn) {
  if (s.ptr == nullptr) {
    for (int64_t a = 0; a < seq; a += chunk) fn(a, std::min(chunk, seq - a), false);
    return;
  }
  const int32_t* ptr = s.ptr + bh * s.ptr_stride;
  const int32_t* idx = s.idx + bh * s.idx_stride;
  const int32_t* par = s.partial + bh * s.idx_stride;
  for (int32_t e = ptr[tile]; e < ptr[tile + 1]; ++e) {
    int64_t a0 = static_cast<int64_t>(idx[e]) * block, a1 = std::min(a0 + block, seq);
    bool partial = par[e] != 0;
    for (int64_t a = a0; a < a1; a += chunk) fn(a, std::min(chunk, a1 - a), partial);
  }
}

// Rows [i0, i0+n) of a (.., D) tensor as a compute-type A operand: in place when the storage is
// the compute type, else converted into buf. Returns the pointer and sets the row stride.
template <typename S, typename T>
inline const T* rows_operand(const S* src, int64_t rs, int64_t n, int64_t D, Buf<T>& buf, ptrdiff_t& row_stride) {
  if constexpr (std::is_same<S, T>::value) {
    row_stride = rs;
    return src;
  } else {
    T* dst = buf.get(n * D);
    for (int64_t i = 0; i < n; ++i) convert_row(src + i * rs, dst + i * D, D);
    row_stride = D;
    return dst;
  }
}

// dst (D x ld) = transpose of the rows tok[r] (tok == nullptr: first + r), r < n, of a (.., D) tensor whose
// row i starts at base + i * rs, times mult; zero beyond n.
template <typename S, typename T>
inline void pack_transposed(const S* base, int64_t rs, const int32_t* tok, int64_t first, int64_t n, int64_t D,
                            T mult, T* dst, int64_t ld) {
  const auto row = [&](int64_t r) { return base + (tok ? static_cast<int64_t>(tok[r]) : first + r) * rs; };
  for (int64_t d = 0; d < D; ++d)
    for (int64_t r = n; r < ld; ++r) dst[d * ld + r] = T(0);
  int64_t r0 = 0;
  if constexpr (std::is_same<S, T>::value) {
    // W x W blocks transposed in registers; the rest of the rows and columns below, element by element
    constexpr int W = kLanes<T>;
    const vec_t<T> m = splat(mult);
    for (; r0 + W <= n; r0 += W) {
      const T* src[W];
      for (int i = 0; i < W; ++i) src[i] = row(r0 + i);
      int64_t d = 0;
      for (; d + W <= D; d += W) {
        vec_t<T> b[W];
        for (int i = 0; i < W; ++i) b[i] = loadu(src[i] + d) * m;
        transpose<T>(b);
        for (int i = 0; i < W; ++i) storeu(dst + (d + i) * ld + r0, b[i]);
      }
      for (; d < D; ++d)
        for (int i = 0; i < W; ++i) dst[d * ld + r0 + i] = src[i][d] * mult;
    }
  }
  for (int64_t r = r0; r < n; ++r) {
    const S* s = row(r);
    for (int64_t d = 0; d < D; ++d) dst[d * ld + r] = to_compute(s[d]) * mult;
  }
}

// The inverse of pack_transposed: row r < n (tok[r], or first + r) of a (.., D) tensor = column r of
// src (D x ld) times mult[r].
template <typename S, typename T>
inline void unpack_transposed(const T* src, int64_t ld, const T* mult, S* base, int64_t rs, const int32_t* tok,
                              int64_t first, int64_t n, int64_t D) {
  const auto row = [&](int64_t r) { return base + (tok ? static_cast<int64_t>(tok[r]) : first + r) * rs; };
  int64_t r0 = 0;
  if constexpr (std::is_same<S, T>::value) {
    constexpr int W = kLanes<T>;
    for (; r0 + W <= n; r0 += W) {
      T* dst[W];
      for (int i = 0; i < W; ++i) dst[i] = row(r0 + i);
      int64_t d = 0;
      for (; d + W <= D; d += W) {
        vec_t<T> b[W];
        for (int i = 0; i < W; ++i) b[i] = loadu(src + (d + i) * ld + r0);
        transpose<T>(b);
        for (int i = 0; i < W; ++i) storeu(dst[i] + d, b[i] * splat(mult[r0 + i]));
      }
      for (; d < D; ++d)
        for (int i = 0; i < W; ++i) dst[i][d] = src[d * ld + r0 + i] * mult[r0 + i];
    }
  }
  for (int64_t r = r0; r < n; ++r) {
    S* o = row(r);
    for (int64_t d = 0; d < D; ++d) o[d] = from_compute<S>(src[d * ld + r] * mult[r]);
  }
}

int resolve_threads(int requested, int64_t items);

// ---- token-mapped tiles (ditkernels.schedule.TiledSchedule) -----------------------------------
// A tile is a list of token indices (valid first, then the sentinel `seq`). Rows of such a tile are
// gathered into packed compute-type buffers (the conversion fp16/bf16 -> fp32 does the same work).
template <typename S, typename T>
inline void load_row(const S* src, T* dst, int64_t D) {
  if constexpr (std::is_same<S, T>::value)
    std::memcpy(dst, src, static_cast<size_t>(D) * sizeof(T));
  else
    convert_row(src, dst, D);
}

// Number of valid tokens at the start of a token list of at most cap entries.
inline int64_t count_tokens(const int32_t* tok, int64_t cap, int64_t seq) {
  int64_t n = 0;
  while (n < cap && tok[n] < seq) ++n;
  return n;
}

// The rows of one chunk of visited tiles: contiguous rows row0 + [0, n) (one partial flag), or
// gathered rows with their tokens and per-row partial flags.
struct RowInfo {
  int64_t row0 = 0;
  const int32_t* tok = nullptr;
  const uint8_t* par = nullptr;
  bool partial = false;
  bool any_partial = false;
  int64_t visit = -1;   // a chunk of one partial visit (token-mapped local kernels): its CSR entry,
  int64_t row_off = 0;  // and the chunk's first row within the visited tile
  int64_t token(int64_t i) const { return tok ? tok[i] : row0 + i; }
  bool is_partial(int64_t i) const { return par ? par[i] != 0 : partial; }
};

template <typename T>
struct ChunkBufs {
  Buf<T> x, y;
  Buf<int32_t> tok;
  Buf<uint8_t> par;
};

// Calls fn(X, xrs, Y, yrs, n, RowInfo) for chunks of <= kChunk rows of the contiguous tiles (of
// `block` rows) that lane tile `tile` visits, X and Y being the same rows of two (.., D) tensors as
// compute-type A operands (in place when the storage is the compute type). Returns the tiles visited.
template <typename S, typename T, typename F>
inline int64_t for_each_rows(const Sched& s, int64_t bh, int64_t tile, int64_t block, int64_t seq, const S* xbase,
                             int64_t xst, const S* ybase, int64_t yst, int64_t D, ChunkBufs<T>& cb, F&& fn) {
  for_each_chunk(s, bh, tile, block, seq, kChunk, [&](int64_t a, int64_t n, bool partial) {
    ptrdiff_t xrs, yrs;
    const T* X = rows_operand<S, T>(xbase + a * xst, xst, n, D, cb.x, xrs);
    const T* Y = rows_operand<S, T>(ybase + a * yst, yst, n, D, cb.y, yrs);
    RowInfo ri;
    ri.row0 = a, ri.partial = ri.any_partial = partial;
    fn(X, xrs, Y, yrs, n, ri);
  });
  if (s.ptr == nullptr) return (seq + block - 1) / block;
  const int32_t* ptr = s.ptr + bh * s.ptr_stride;
  return ptr[tile + 1] - ptr[tile];
}

// Two (B, H, seq, D) tensors copied once per call into tile order, in the compute type: the rows of
// token-mapped tile u of head bh are rows [u * block, u * block + cnt[u]) of that head's panel.
// Visiting a tile then reads contiguous rows, as for contiguous tiles (and fp16/bf16 rows are
// converted once, not once per visit). Tiles that are runs of consecutive tokens already are: no copy.
// The panels' memory stays with the calling thread between calls (fresh pages cost more than the
// copy), up to kPanelKeepBytes per buffer.
constexpr size_t kPanelKeepBytes = size_t(256) << 20;

template <typename T>
Buf<T>& panel_buffer(int slot) {
  static thread_local Buf<T> bufs[2];
  return bufs[slot];
}

template <typename T>
struct TilePanels {
  Buf<T>& x = panel_buffer<T>(0);
  Buf<T>& y = panel_buffer<T>(1);
  std::vector<int32_t> cnt;
  int64_t ntiles = 0, block = 0, D = 0;
  // Every tile a run of consecutive tokens and the storage the compute type (e.g. KV tiles that are
  // grid row segments, fp32): no copy, rows are read in place (tx / ty, row stride rs).
  bool in_place = false;
  Tensor4 tx, ty;
  int64_t H = 1;
  // Row stride, and the address of panel row a (token tokmap[a]) of head bh, of x and y.
  ptrdiff_t xrs() const { return in_place ? tx.st[2] : D; }
  ptrdiff_t yrs() const { return in_place ? ty.st[2] : D; }
  const T* xrow(int64_t bh, const int32_t* tokmap, int64_t a) const {
    return in_place ? tx.row<T>(bh / H, bh % H, tokmap[a]) : x.p + (bh * ntiles * block + a) * D;
  }
  const T* yrow(int64_t bh, const int32_t* tokmap, int64_t a) const {
    return in_place ? ty.row<T>(bh / H, bh % H, tokmap[a]) : y.p + (bh * ntiles * block + a) * D;
  }
  TilePanels() = default;
  TilePanels(const TilePanels&) = delete;
  ~TilePanels() {
    for (Buf<T>* b : {&x, &y})
      if (b->n * sizeof(T) > kPanelKeepBytes) {
        std::free(b->p);
        b->p = nullptr, b->n = 0;
      }
  }

  template <typename S>
  void pack(const Tensor4& tx_, const Tensor4& ty_, int64_t B, int64_t H_, const int32_t* tokmap, int64_t ntiles_,
            int64_t block_, int64_t seq, int64_t D_, int num_threads) {
    ntiles = ntiles_, block = block_, D = D_, tx = tx_, ty = ty_, H = H_;
    cnt.resize(static_cast<size_t>(ntiles));
    in_place = std::is_same<S, T>::value;
    for (int64_t u = 0; u < ntiles; ++u) {
      const int32_t* tok = tokmap + u * block;
      cnt[u] = static_cast<int32_t>(count_tokens(tok, block, seq));
      for (int64_t i = 1; i < cnt[u] && in_place; ++i) in_place = tok[i] == tok[0] + i;
    }
    if (in_place) return;
    const int64_t BH = B * H, n = std::max<int64_t>(BH * ntiles * block * D, 1);
    T* px = x.get(static_cast<size_t>(n));
    T* py = y.get(static_cast<size_t>(n));
    const int64_t total = BH * ntiles;
    std::atomic<int64_t> next{0};
    auto body = [&](int) {
      for (;;) {
        const int64_t it = next.fetch_add(1, std::memory_order_relaxed);
        if (it >= total) break;
        const int64_t bh = it / ntiles, u = it % ntiles, b = bh / H, h = bh % H;
        const int32_t* tok = tokmap + u * block;
        T* dx = px + it * block * D;
        T* dy = py + it * block * D;
        for (int64_t i = 0; i < cnt[u]; ++i) {
          load_row(tx.row<S>(b, h, tok[i]), dx + i * D, D);
          load_row(ty.row<S>(b, h, tok[i]), dy + i * D, D);
        }
      }
    };
    ThreadPool::instance().run(resolve_threads(num_threads, total), body);
  }
};

// for_each_rows over token-mapped tiles packed in TilePanels: rows of consecutive visited tiles that
// are consecutive in the panel (full tiles u, u + 1, ...), and in the tensor when read in place, are
// merged into chunks of <= kChunk rows.
// merge_partial == false: a partial tile is a chunk of its own (its work is trimmed to its extent).
template <bool merge_partial, typename T, typename F>
inline int64_t for_each_rows_packed(const Sched& s, const int32_t* tokmap, const TilePanels<T>& tp, int64_t bh,
                                    int64_t tile, ChunkBufs<T>& cb, F&& fn) {
  const int64_t block = tp.block;
  uint8_t* pr = cb.par.get(kChunk);
  const int32_t* ptr = s.ptr + bh * s.ptr_stride;
  const int32_t* idx = s.idx + bh * s.idx_stride;
  const int32_t* par = s.partial + bh * s.idx_stride;
  int64_t a = 0, n = 0;  // current chunk: panel rows [a, a + n)
  int64_t visit = -1, off = 0;
  bool anyp = false, mixed = false, first_p = false;
  auto flush = [&] {
    if (n == 0) return;
    RowInfo ri;
    ri.tok = tokmap + a;
    ri.any_partial = anyp;
    if (!merge_partial && anyp) ri.visit = visit, ri.row_off = off;
    if (mixed)
      ri.par = pr;
    else
      ri.partial = first_p;
    fn(tp.xrow(bh, tokmap, a), tp.xrs(), tp.yrow(bh, tokmap, a), tp.yrs(), n, ri);
    n = 0, anyp = mixed = false;
  };
  for (int32_t e = ptr[tile]; e < ptr[tile + 1]; ++e) {
    const int64_t u = idx[e], c = tp.cnt[u];
    const bool p = par[e] != 0;
    int64_t r0 = u * block;
    if (!merge_partial && n > 0 && (p || anyp)) flush();
    for (int64_t done = 0; done < c;) {
      if (n > 0 && (a + n != r0 + done || n == kChunk || (tp.in_place && tokmap[a + n - 1] + 1 != tokmap[r0 + done])))
        flush();
      const int64_t take = std::min(c - done, kChunk - n);
      if (n == 0) a = r0 + done, first_p = p, visit = e, off = done;
      if (p != first_p && !mixed) {
        std::fill(pr, pr + n, static_cast<uint8_t>(first_p));
        mixed = true;
      }
      if (mixed) std::fill(pr + n, pr + n + take, static_cast<uint8_t>(p));
      anyp |= p;
      n += take, done += take;
    }
  }
  flush();
  return ptr[tile + 1] - ptr[tile];
}

constexpr size_t kVisitMaskBytes = size_t(256) << 20;  // VisitMasks beyond this: masks per chunk instead

// Rows [r0, r1) x lane vectors [j0, j1) of a chunk that can hold a visible pair: the work of a
// partial visit is trimmed to it (a query tile's corner lanes see little of a diagonal KV tile).
struct Extent {
  int64_t r0 = 0, r1 = 0;
  int j0 = 0, j1 = 0;
  bool empty() const { return r1 <= r0 || j1 <= j0; }
};

template <typename VI>
inline bool any_lane(VI m) {
#if defined(__AVX512F__)
  if constexpr (sizeof(VI) == 64) return _mm512_test_epi32_mask((__m512i)m, (__m512i)m) != 0;
#elif defined(__AVX__)
  if constexpr (sizeof(VI) == 32) return !_mm256_testz_si256((__m256i)m, (__m256i)m);
#endif
  bool any = false;
  for (size_t i = 0; i < sizeof(VI) / sizeof(m[0]); ++i) any |= m[i] != 0;
  return any;
}

// The extent of the visible pairs of a chunk of n rows against the table's nv lane vectors.
template <typename T>
inline Extent local_extent(const LocalTable<T>& tab, const LocalGeom& g, int nv, int64_t n, const RowInfo& ri) {
  Extent e;
  e.r0 = n;
  uint64_t vecs = 0;
  const uint64_t all = nv >= 64 ? ~uint64_t(0) : (uint64_t(1) << nv) - 1;
  for (int64_t i = 0; i < n; ++i) {
    bool act = false;
    if (!ri.is_partial(i)) {
      vecs = all, act = true;
    } else {
      const typename LocalTable<T>::Row r = tab.row(g, ri.token(i));
      for (int j = 0; j < nv; ++j)
        if (any_lane(r.visible(j))) vecs |= uint64_t(1) << j, act = true;
    }
    if (act) e.r0 = std::min(e.r0, i), e.r1 = i + 1;
  }
  if (vecs != 0) e.j0 = __builtin_ctzll(vecs), e.j1 = 64 - __builtin_clzll(vecs);
  return e;
}

// Masks the partial rows of the score tile S (rows: RowInfo tokens, row stride ld; lanes: the
// table's) inside extent e.
template <typename T>
inline void apply_local(const LocalTable<T>& tab, const LocalGeom& g, T* Sc, int64_t ld, const Extent& e,
                        const RowInfo& ri) {
  using V = vec_t<T>;
  constexpr int W = kLanes<T>;
  const V ninf = splat(-std::numeric_limits<T>::infinity());
  for (int64_t i = e.r0; i < e.r1; ++i) {
    if (!ri.is_partial(i)) continue;
    const typename LocalTable<T>::Row r = tab.row(g, ri.token(i));
    T* sr = Sc + i * ld;
    for (int j = e.j0; j < e.j1; ++j) storeu(sr + j * W, r.visible(j) ? loadu(sr + j * W) : ninf);
  }
}

// s where bit l of `bits` is set, else -inf (lane l of the vector).
template <typename T>
inline vec_t<T> select_bits(vec_t<T> s, uint32_t bits, vec_t<T> ninf) {
#if defined(__AVX512F__)
  if constexpr (std::is_same<T, float>::value)
    return (vec_t<T>)_mm512_mask_mov_ps((__m512)ninf, static_cast<__mmask16>(bits), (__m512)s);
  if constexpr (std::is_same<T, double>::value)
    return (vec_t<T>)_mm512_mask_mov_pd((__m512d)ninf, static_cast<__mmask8>(bits), (__m512d)s);
#endif
  using VI = typename VecOf<T>::itype;
  constexpr int W = kLanes<T>;
  VI lane{};
  for (int l = 0; l < W; ++l) lane[l] = static_cast<typename std::remove_reference<decltype(lane[0])>::type>(1) << l;
  VI b = static_cast<typename std::remove_reference<decltype(lane[0])>::type>(bits) - VI{};
  return (b & lane) != 0 ? s : ninf;
}


// The local mask of every partial visit of a token-mapped schedule, evaluated once per call and
// shared by every batch*head: per CSR entry its Extent, per (entry, tile row, lane vector) the
// visibility bits of the lanes. Lane tiles must fit one row group (block <= kRowGroup).
template <typename T>
struct VisitMasks {
  std::vector<Extent> ext;
  std::vector<uint32_t> bits;
  int64_t rblock = 0, nvmax = 0;

  // Evaluates the masks when they fit kVisitMaskBytes and the lane tiles one row group: returns this,
  // else nullptr (the kernels then evaluate them per chunk).
  const VisitMasks* build(const LocalGeom& g, bool fwd, const Sched& s, int64_t n_lane_tiles,
                          const int32_t* lane_map, int64_t lane_block, int64_t lane_seq, const int32_t* row_map,
                          int64_t row_block, int64_t row_seq, int num_threads) {
    const int64_t nv_max = (lane_block + kLanes<T> - 1) / kLanes<T>;
    if (lane_block > kRowGroup ||
        static_cast<size_t>(s.ptr[n_lane_tiles]) * (row_block * nv_max * 4 + sizeof(Extent)) > kVisitMaskBytes)
      return nullptr;
    constexpr int W = kLanes<T>;
    rblock = row_block, nvmax = (lane_block + W - 1) / W;
    const int64_t nnz = s.ptr[n_lane_tiles];
    ext.assign(static_cast<size_t>(std::max<int64_t>(nnz, 1)), Extent{});
    bits.assign(static_cast<size_t>(std::max<int64_t>(nnz * rblock * nvmax, 1)), 0u);
    std::atomic<int64_t> next{0};
    auto body = [&](int) {
      LocalTable<T> tab;
      for (;;) {
        const int64_t m = next.fetch_add(1, std::memory_order_relaxed);
        if (m >= n_lane_tiles) break;
        if (s.ptr[m] == s.ptr[m + 1]) continue;
        const int32_t* lt = lane_map + m * lane_block;
        const int64_t nl = count_tokens(lt, lane_block, lane_seq);
        if (nl == 0) continue;
        const int nv = static_cast<int>((nl + W - 1) / W);
        tab.build(g, fwd, lt, 0, nl, static_cast<int64_t>(nv) * W);
        for (int32_t e = s.ptr[m]; e < s.ptr[m + 1]; ++e) {
          const int64_t u = s.idx[e];
          const int32_t* rt = row_map + u * row_block;
          const int64_t nr = count_tokens(rt, row_block, row_seq);
          Extent x{0, nr, 0, nv};
          if (s.partial[e] != 0) {
            x = Extent{nr, 0, 0, 0};
            uint32_t vecs = 0;
            uint32_t* b = bits.data() + e * rblock * nvmax;
            for (int64_t i = 0; i < nr; ++i) {
              const typename LocalTable<T>::Row r = tab.row(g, rt[i]);
              bool act = false;
              for (int j = 0; j < nv; ++j) {
                const uint32_t m_ = lane_bits(r.visible(j));
                b[i * nvmax + j] = m_;
                if (m_) vecs |= 1u << j, act = true;
              }
              if (act) x.r0 = std::min(x.r0, i), x.r1 = i + 1;
            }
            if (vecs) x.j0 = __builtin_ctz(vecs), x.j1 = 32 - __builtin_clz(vecs);
          }
          ext[e] = x;
        }
      }
    };
    ThreadPool::instance().run(resolve_threads(num_threads, n_lane_tiles), body);
    return this;
  }

  // Extent of the chunk of rows [row_off, row_off + n) of visit e.
  Extent extent(int64_t e, int64_t row_off, int64_t n) const {
    Extent x = ext[e];
    x.r0 = std::max<int64_t>(x.r0 - row_off, 0), x.r1 = std::min<int64_t>(x.r1 - row_off, n);
    return x;
  }

  // -inf on the invisible pairs of the chunk's extent (rows of S with stride ld).
  void apply(T* Sc, int64_t ld, const Extent& x, const RowInfo& ri) const {
    using V = vec_t<T>;
    constexpr int W = kLanes<T>;
    const V ninf = splat(-std::numeric_limits<T>::infinity());
    const uint32_t* b = bits.data() + (ri.visit * rblock + ri.row_off) * nvmax;
    for (int64_t i = x.r0; i < x.r1; ++i) {
      T* sr = Sc + i * ld;
      for (int j = x.j0; j < x.j1; ++j) storeu(sr + j * W, select_bits<T>(loadu(sr + j * W), b[i * nvmax + j], ninf));
    }
  }
};

constexpr double kLazyMax = 8.0;

// Every lane's running max grew by at most s (or not at all, which covers lanes still at -inf).
template <typename V>
inline bool grew_at_most(V mnew, V mold, typename std::remove_reference<decltype(mnew[0])>::type s) {
  return !any_lane((mnew != mold) & ~(mnew - mold <= s));
}

template <typename V>
inline bool all_equal(V a, typename std::remove_reference<decltype(a[0])>::type s) {
  return !any_lane(a != s);
}

int resolve_threads(int requested, int64_t items) {
  int n = requested > 0 ? requested : 1;
  if (items < n) n = static_cast<int>(std::max<int64_t>(items, 1));
  return n;
}

// Per-thread scratch cut into consecutive arrays: *part.first = part.second elements (64-byte aligned).
template <typename T>
void carve(Buf<T>& buf, std::initializer_list<std::pair<T**, int64_t>> parts) {
  const auto padded = [](int64_t n) { return (n * static_cast<int64_t>(sizeof(T)) + 63) / 64 * 64 / sizeof(T); };
  int64_t total = 0;
  for (const auto& part : parts) total += padded(part.second);
  T* at = buf.get(static_cast<size_t>(total));
  for (const auto& part : parts) *part.first = at, at += padded(part.second);
}

// ---- the two sides of a pass -------------------------------------------------------------------
// Every pass (forward, dQ, dK/dV) runs work items over the tiles of its lane side (queries, or keys
// for dK/dV) and, per item, streams the row chunks of the tiles that its schedule lists.

// One work item: (batch*head, lane tile, group of <= kRowGroup lanes). Lanes: the tokens tok[0, n), or
// first + [0, n) when tok == nullptr. lt: the (tile, group) id, which keys a thread's LocalTable.
struct LaneItem {
  int64_t bh = 0, b = 0, h = 0, tile = 0, lt = 0, first = 0, n = 0;
  const int32_t* tok = nullptr;
  int64_t token(int64_t r) const { return tok ? tok[r] : first + r; }
};

// The lane side: ntiles tiles of `block` lanes, token-mapped when tokens != nullptr.
struct LaneTiles {
  int64_t BH, H, ntiles, block, seq;
  const int32_t* tokens;
  bool local;  // local masks order the items batch*head fastest: a thread reuses its lane table across heads
  int64_t groups() const { return (block + kRowGroup - 1) / kRowGroup; }
  int64_t total() const { return BH * ntiles * groups(); }
  // ld of the widest group, in lanes of a vector width w
  int64_t ldmax(int w) const { return (std::min<int64_t>(kRowGroup, block) + w - 1) / w * w; }
  LaneItem item(int64_t it) const {
    const int64_t ng = groups(), per_head = ng * ntiles;
    LaneItem x;
    x.bh = local ? it % BH : it / per_head;
    x.lt = local ? it / BH : it % per_head;
    x.b = x.bh / H, x.h = x.bh % H, x.tile = x.lt / ng;
    const int64_t g = x.lt % ng;
    if (tokens) {
      x.tok = tokens + x.tile * block + g * kRowGroup;
      x.n = count_tokens(x.tok, std::min<int64_t>(kRowGroup, block - g * kRowGroup), seq);
    } else {
      x.first = x.tile * block + g * kRowGroup;
      x.n = std::min<int64_t>(kRowGroup, std::min((x.tile + 1) * block, seq) - x.first);
    }
    return x;
  }
  // thread_body(for_each_item) on num_threads threads; for_each_item(fn) calls fn(item, nv, ld) for the
  // thread's share of the non-empty items (nv vectors of w lanes, ld = nv * w).
  template <typename F>
  void run(int num_threads, int w, F&& thread_body) const {
    const int64_t n = total();
    std::atomic<int64_t> next{0};
    auto body = [&](int) {
      thread_body([&](auto&& fn) {
        for (int64_t it; (it = next.fetch_add(1, std::memory_order_relaxed)) < n;) {
          const LaneItem x = item(it);
          if (x.n <= 0) continue;
          const int nv = static_cast<int>((x.n + w - 1) / w);
          fn(x, nv, static_cast<int64_t>(nv) * w);
        }
      });
    };
    if (n > 0) ThreadPool::instance().run(resolve_threads(num_threads, n), body);
  }
  // The item's lanes of tensor t, transposed and times mult, into dst (D x ld).
  template <typename S, typename T>
  void pack(const Tensor4& t, const LaneItem& x, int64_t D, T mult, T* dst, int64_t ld) const {
    pack_transposed(t.row<S>(x.b, x.h, 0), t.st[2], x.tok, x.first, x.n, D, mult, dst, ld);
  }
  // The inverse: the item's rows of tensor t = the columns of src (D x ld), column r times mult[r].
  template <typename S, typename T>
  void unpack(const Tensor4& t, const LaneItem& x, int64_t D, const T* src, int64_t ld, const T* mult) const {
    unpack_transposed(src, ld, mult, t.mrow<S>(x.b, x.h, 0), t.st[2], x.tok, x.first, x.n, D);
  }
};

// The row side: the same rows of two (B, H, seq, D) tensors (K and V, or Q and dO) in tiles of `block`,
// token-mapped when MAP (copied once per call into TilePanels).
template <typename S, typename T, bool MAP>
struct RowTiles {
  Tensor4 x, y;
  int64_t block, seq, D;
  const int32_t* tokens;
  TilePanels<T> panels;
  RowTiles(const Tensor4& x_, const Tensor4& y_, int64_t B, int64_t H, const int32_t* tokens_, int64_t ntiles,
           int64_t block_, int64_t seq_, int64_t D_, int num_threads)
      : x(x_), y(y_), block(block_), seq(seq_), D(D_), tokens(tokens_) {
    if constexpr (MAP) panels.template pack<S>(x, y, B, H, tokens, ntiles, block, seq, D, num_threads);
  }
  // fn(X, xrs, Y, yrs, n, RowInfo) over the chunks of the tiles that s lists for the item's tile; returns
  // the tiles visited. Token-mapped partial tiles are chunks of their own unless merge_partial.
  template <bool merge_partial, typename F>
  int64_t visit(const Sched& s, const LaneItem& it, ChunkBufs<T>& cb, F&& fn) const {
    if constexpr (MAP)
      return for_each_rows_packed<merge_partial>(s, tokens, panels, it.bh, it.tile, cb, fn);
    else
      return for_each_rows<S, T>(s, it.bh, it.tile, block, seq, x.row<S>(it.b, it.h, 0), x.st[2],
                                 y.row<S>(it.b, it.h, 0), y.st[2], D, cb, fn);
  }
};

// The element mask of a pass's score chunks (rows: RowInfo tokens; lanes: the item's), one per thread.
// Local masks come from the VisitMasks evaluated once per call (vm) when there are some, else from a
// LocalTable of the item's lanes.
template <typename T, int MASK, bool MAP>
struct ChunkMask {
  bool lane_q;  // lanes are queries (forward, dQ), else keys (dK/dV)
  const LocalGeom* geom;
  const VisitMasks<T>* vm;
  const int32_t* params;
  const float* thr_all;  // MASK_THRESHOLD: (B*H*Sq) thresholds
  int64_t Sq;
  LocalTable<T> table;
  const LaneItem* x = nullptr;

  void start(const LaneItem& item, int64_t ld) {
    x = &item;
    if constexpr (MASK == MASK_LOCAL) {
      if (!vm && table.cached != item.lt) {
        table.build(*geom, lane_q, item.tok, item.first, item.n, ld);
        table.cached = item.lt;
      }
    }
  }
  // The part of a chunk of n rows that can hold a visible pair (all of it but for partial local visits).
  Extent extent(int nv, int64_t n, const RowInfo& ri) const {
    if constexpr (MASK == MASK_LOCAL) {
      if (ri.any_partial)
        return vm && ri.visit >= 0 ? vm->extent(ri.visit, ri.row_off, n) : local_extent(table, *geom, nv, n, ri);
    }
    return Extent{0, n, 0, nv};
  }
  // -inf on the invisible pairs of the partial rows of S (n rows, stride ld; e from extent()).
  void apply(T* S, int64_t ld, const Extent& e, int64_t n, const RowInfo& ri) const {
    if (!ri.any_partial) return;
    const auto lane_token = [&](int64_t r) { return x->token(r); };
    if constexpr (MASK == MASK_LOCAL) {
      if (vm && ri.visit >= 0)
        vm->apply(S, ld, e, ri);
      else
        apply_local(table, *geom, S, ld, e, ri);
    } else if constexpr (MASK == MASK_THRESHOLD) {
      threshold_rows(S, ld, n, x->n, ri, lane_q, thr_all + x->bh * Sq, lane_token);
    } else if constexpr (!ElementMask<MASK>::kTrivial) {
      if (MASK == MASK_BAND && !MAP && lane_q) return band_rows(S, ld, n, x->first, x->n, ri, params);
      const T neg_inf = -std::numeric_limits<T>::infinity();
      for (int64_t i = 0; i < n; ++i)
        if (ri.is_partial(i))
          for (int64_t j = 0; j < x->n; ++j) {
            const int64_t a = ri.token(i), l = x->token(j);
            if (!ElementMask<MASK>::visible(params, lane_q ? l : a, lane_q ? a : l)) S[i * ld + j] = neg_inf;
          }
    }
  }
};

// ================================================================================================
// Forward
// ================================================================================================
// The arguments of attention_fwd and attention_bwd (common: set_common).
struct CommonParams {
  int64_t B, H, Sq, Sk, D;
  double scale;
  Tensor4 q, k, v, out;  // forward: out.ptr == 0: statistics only (lse), no output
  uintptr_t lse;         // (B, H, Sq) contiguous, float32 or float64
  bool lse_f64;
  int64_t block_m, block_n;
  Sched sched;  // over query tiles
  const int32_t* mask_params;
  const LocalGeom* geom;    // MASK_LOCAL only: &local
  const float* mask_rows;   // MASK_THRESHOLD only: (B*H*Sq) thresholds
  const int32_t* q_tokens;  // token-mapped tiles (TiledSchedule), else nullptr
  const int32_t* kv_tokens;
  int64_t n_q_tiles, n_kv_tiles;
  int num_threads;
  LocalGeom local;
};

// The two sides of one pass. lane_q: lanes are query tiles and rows the KV tiles that `sched` lists for
// them (forward, dQ; rx, ry = K, V), else lanes are KV tiles and rows query tiles (dK/dV; rx, ry = Q, dO
// and the transposed schedule). Local masks of token-mapped tiles are evaluated here, once per call.
template <typename S, typename T, int MASK, bool MAP>
struct Pass {
  const CommonParams& p;
  bool lane_q;
  LaneTiles lanes;
  int64_t ldmax;  // ld of the widest lane group
  RowTiles<S, T, MAP> rows;
  VisitMasks<T> vm;
  const VisitMasks<T>* vmp = nullptr;
  Pass(const CommonParams& p_, bool lane_q_, const Sched& sched, const Tensor4& rx, const Tensor4& ry)
      : p(p_), lane_q(lane_q_), lanes(lane_side(p_, lane_q_)), ldmax(lanes.ldmax(kLanes<T>)),
        rows(rx, ry, p.B, p.H, lane_q ? p.kv_tokens : p.q_tokens, lane_q ? p.n_kv_tiles : p.n_q_tiles,
             lane_q ? p.block_n : p.block_m, lane_q ? p.Sk : p.Sq, p.D, p.num_threads) {
    if constexpr (MAP && MASK == MASK_LOCAL)
      vmp = vm.build(*p.geom, lane_q, sched, lanes.ntiles, lanes.tokens, lanes.block, lanes.seq, rows.tokens,
                     rows.block, rows.seq, p.num_threads);
  }
  static LaneTiles lane_side(const CommonParams& p, bool lane_q) {
    const int64_t block = lane_q ? p.block_m : p.block_n, seq = lane_q ? p.Sq : p.Sk;
    const int64_t ntiles = MAP ? (lane_q ? p.n_q_tiles : p.n_kv_tiles) : (seq + block - 1) / block;
    return LaneTiles{p.B * p.H, p.H, ntiles, block, seq, lane_q ? p.q_tokens : p.kv_tokens, MASK == MASK_LOCAL};
  }
  // A thread's mask of the score chunks
  ChunkMask<T, MASK, MAP> mask() const { return {lane_q, p.geom, vmp, p.mask_params, p.mask_rows, p.Sq}; }
};

struct FwdParams : CommonParams {
  int epilogue;
  const float* row_scale;  // (B, H, Sq) with strides rs_st
  std::array<int64_t, 3> rs_st;
  Tensor4 residual;  // storage dtype of q
};

// Tiles visited by the last forward call (for tests: the kernel runs exactly the plan's tiles), and
// the query-key score slots it computed (rows x lane vectors of every chunk, after trimming).
std::atomic<int64_t> g_fwd_visits{0};
std::atomic<int64_t> g_fwd_pairs{0};

template <typename S, int MASK, bool MAP>
void fwd_kernel(const FwdParams& p) {
  using T = typename ComputeOf<S>::type;
  using V = vec_t<T>;
  constexpr int W = kLanes<T>;
  constexpr bool kLocal = MASK == MASK_LOCAL;
  const int64_t D = p.D, Sq = p.Sq;
  const Pass<S, T, MASK, MAP> pass(p, true, p.sched, p.k, p.v);
  g_fwd_visits.store(0);
  g_fwd_pairs.store(0);
  if (pass.lanes.total() == 0) return;
  const int64_t ldmax = pass.ldmax;
  const T c = static_cast<T>(p.scale);
  const T log2e = static_cast<T>(kLog2e);
  const T neg_inf = -std::numeric_limits<T>::infinity();
  const bool stats_only = p.out.ptr == 0;
  pass.lanes.run(p.num_threads, W, [&](auto&& for_each_item) {
    Buf<T> ws;
    ChunkBufs<T> cb;
    ChunkMask<T, MASK, MAP> mask = pass.mask();
    int64_t visits = 0, pairs = 0;
    T *Qt, *Ot, *St, *mrow, *lrow;
    carve<T>(ws, {{&Qt, D * ldmax}, {&Ot, D * ldmax}, {&St, kChunk * ldmax}, {&mrow, ldmax}, {&lrow, ldmax}});
    for_each_item([&](const LaneItem& x, int nv, int64_t ld) {
      const int64_t nr = x.n;
      pass.lanes.template pack<S>(p.q, x, D, c, Qt, ld);
      mask.start(x, ld);
      std::fill(Ot, Ot + D * ld, T(0));
      std::fill(mrow, mrow + ld, neg_inf);
      std::fill(lrow, lrow + ld, T(0));

      auto chunk = [&](const T* Kr, ptrdiff_t krs, const T* Vr, ptrdiff_t vrs, int64_t nk, const RowInfo& ri) {
        const Extent e = mask.extent(nv, nk, ri);
        if (e.empty()) return;
        const int64_t ne = e.r1 - e.r0;
        const int nve = e.j1 - e.j0;
        pairs += ne * nve * W;
        T* Se = St + e.r0 * ld;  // rows of the extent; lanes are indexed j * W with j in [j0, j1)
        gemm<T, false>(static_cast<int>(ne), nve, static_cast<int>(D), Kr + e.r0 * krs, krs, 1, Qt + e.j0 * W, ld,
                       Se + e.j0 * W, ld);
        mask.apply(St, ld, e, nk, ri);
        // Online softmax down the key axis, one vector of query rows at a time.
        for (int j = e.j0; j < e.j1; ++j) {
          T* sj = Se + j * W;
          V mx = loadu(sj);
          for (int64_t kk = 1; kk < ne; ++kk) mx = vmax(mx, loadu(sj + kk * ld));
          const V mold = loadu(mrow + j * W);
          V mnew = vmax(mold, mx);
          // Keep the running max unless some lane's grows by more than kLazyMax: exp(s - m) <= e^8
          // stays exact in fp32 and most chunks then skip rescaling Ot.
          if (grew_at_most(mnew, mold, T(kLazyMax))) mnew = mold;
          const V ninf = splat(neg_inf);
          const V base = mnew == ninf ? V{} : mnew;  // -inf-safe: all-masked rows stay 0
          // Lanes that saw no key yet hold 0 in Ot and lrow: alpha 1 there (no rescale of Ot for them).
          const V alpha = mold == ninf ? splat(T(1)) : exp2v((mold - base) * log2e);
          V sum{};
          for (int64_t kk = 0; kk < ne; ++kk) {
            V ex = exp2v((loadu(sj + kk * ld) - base) * log2e);
            storeu(sj + kk * ld, ex);
            sum += ex;
          }
          storeu(lrow + j * W, fmadd(loadu(lrow + j * W), alpha, sum));
          storeu(mrow + j * W, mnew);
          if (!stats_only && !all_equal(alpha, T(1))) {
            for (int64_t d = 0; d < D; ++d) storeu(Ot + d * ld + j * W, loadu(Ot + d * ld + j * W) * alpha);
          }
        }
        if (!stats_only)
          gemm<T, true>(static_cast<int>(D), nve, static_cast<int>(ne), Vr + e.r0 * vrs, 1, vrs, Se + e.j0 * W, ld,
                        Ot + e.j0 * W, ld);
      };
      visits += pass.rows.template visit<!kLocal>(p.sched, x, cb, chunk);

      // Normalise, apply the epilogue, store (transposing Ot back), write lse.
      for (int64_t r = 0; r < nr; ++r) {
        const int64_t qi = x.token(r);
        const T l = lrow[r];
        const bool empty = !(l > T(0));
        const T inv = empty ? T(0) : T(1) / l;
        const double lse = empty ? -std::numeric_limits<double>::infinity()
                                 : static_cast<double>(mrow[r]) + std::log(static_cast<double>(l));
        const int64_t li = x.bh * Sq + qi;
        if (p.lse_f64)
          reinterpret_cast<double*>(p.lse)[li] = lse;
        else
          reinterpret_cast<float*>(p.lse)[li] = static_cast<float>(lse);
        lrow[r] = inv;
        if (stats_only || p.epilogue != EPILOGUE_SCALE_RESIDUAL) continue;
        S* o = p.out.mrow<S>(x.b, x.h, qi);
        const T rsc = static_cast<T>(p.row_scale[x.b * p.rs_st[0] + x.h * p.rs_st[1] + qi * p.rs_st[2]]);
        const S* res = p.residual.row<S>(x.b, x.h, qi);
        for (int64_t d = 0; d < D; ++d) o[d] = from_compute<S>(rsc * (Ot[d * ld + r] * inv) + to_compute(res[d]));
      }
      if (!stats_only && p.epilogue == EPILOGUE_NONE)
        pass.lanes.template unpack<S>(p.out, x, D, Ot, ld, lrow);
    });
    g_fwd_visits.fetch_add(visits, std::memory_order_relaxed);
    g_fwd_pairs.fetch_add(pairs, std::memory_order_relaxed);
  });
}

// ================================================================================================
// Backward
// ================================================================================================
struct BwdParams : CommonParams {
  Tensor4 dout, dq, dk, dv;
  Sched tsched;  // over KV tiles (schedule.transposed())
};

template <typename S, int MASK, bool MAP>
void bwd_kernel(const BwdParams& p) {
  using T = typename ComputeOf<S>::type;
  using V = vec_t<T>;
  constexpr int W = kLanes<T>;
  constexpr bool kLocal = MASK == MASK_LOCAL;
  const int64_t D = p.D, H = p.H, Sq = p.Sq, BH = p.B * p.H;
  const T sc = static_cast<T>(p.scale);
  const T log2e = static_cast<T>(kLog2e);
  const T inf = std::numeric_limits<T>::infinity();
  // fp16/bf16: the stored O is rounded, and delta = rowsum(dO * O) inherits that rounding, which
  // large logits amplify in dQ/dK. Those dtypes get delta = rowsum(P * dP) from an extra scores pass.
  constexpr bool kExactDelta = !std::is_same<S, T>::value;

  // ---- 1. per-row statistics: delta = rowsum(dO * O), lse (+inf for empty rows: P = exp(s - inf) = 0) ----
  std::unique_ptr<T[]> delta(new T[std::max<int64_t>(BH * Sq, 1)]);
  std::unique_ptr<T[]> lse_row(new T[std::max<int64_t>(BH * Sq, 1)]);
  {
    const int64_t rb = 256, nrb = (Sq + rb - 1) / rb, total = BH * nrb;
    std::atomic<int64_t> next{0};
    auto body = [&](int) {
      for (;;) {
        const int64_t it = next.fetch_add(1, std::memory_order_relaxed);
        if (it >= total) break;
        const int64_t bh = it / nrb, b = bh / H, h = bh % H, i0 = (it % nrb) * rb, i1 = std::min(i0 + rb, Sq);
        for (int64_t i = i0; i < i1; ++i) {
          const S* o = p.out.row<S>(b, h, i);
          const S* g = p.dout.row<S>(b, h, i);
          T acc = 0;
          if (!kExactDelta)
            for (int64_t d = 0; d < D; ++d) acc += to_compute(o[d]) * to_compute(g[d]);
          delta[bh * Sq + i] = acc;
          const double l = p.lse_f64 ? reinterpret_cast<const double*>(p.lse)[bh * Sq + i]
                                     : static_cast<double>(reinterpret_cast<const float*>(p.lse)[bh * Sq + i]);
          lse_row[bh * Sq + i] = l == -std::numeric_limits<double>::infinity() ? inf : static_cast<T>(l);
        }
      }
    };
    if (total > 0) ThreadPool::instance().run(resolve_threads(p.num_threads, total), body);
  }

  // ---- 2. dQ: per query row group, over its KV tiles ---------------------------------------------
  {
    const Pass<S, T, MASK, MAP> pass(p, true, p.sched, p.k, p.v);
    const int64_t ldmax = pass.ldmax;
    pass.lanes.run(p.num_threads, W, [&](auto&& for_each_item) {
      Buf<T> ws;
      ChunkBufs<T> cb;
      ChunkMask<T, MASK, MAP> mask = pass.mask();
      T *Qt, *dOt, *dQt, *St, *dPt, *lrow, *drow;
      carve<T>(ws, {{&Qt, D * ldmax}, {&dOt, D * ldmax}, {&dQt, D * ldmax}, {&St, kChunk * ldmax},
                    {&dPt, kChunk * ldmax}, {&lrow, ldmax}, {&drow, ldmax}});
      for_each_item([&](const LaneItem& x, int nv, int64_t ld) {
        const int64_t nr = x.n, bh = x.bh;
        pass.lanes.template pack<S>(p.q, x, D, sc, Qt, ld);
        pass.lanes.template pack<S>(p.dout, x, D, T(1), dOt, ld);
        mask.start(x, ld);
        std::fill(dQt, dQt + D * ld, T(0));
        for (int64_t r = 0; r < ld; ++r) {
          const int64_t qi = r < nr ? x.token(r) : 0;
          lrow[r] = r < nr ? lse_row[bh * Sq + qi] : inf;
          drow[r] = r < nr ? delta[bh * Sq + qi] : T(0);
        }
        // St = scores, dPt = dP (keys x rows) of one chunk of keys, inside its extent e (returned).
        auto scores = [&](const T* Kr, ptrdiff_t krs, const T* Vr, ptrdiff_t vrs, int64_t nk, const RowInfo& ri) {
          const Extent e = mask.extent(nv, nk, ri);
          if (e.empty()) return e;
          const int ne = static_cast<int>(e.r1 - e.r0), nve = e.j1 - e.j0, iD = static_cast<int>(D);
          const int64_t off = e.r0 * ld + e.j0 * W;
          gemm<T, false>(ne, nve, iD, Kr + e.r0 * krs, krs, 1, Qt + e.j0 * W, ld, St + off, ld);
          mask.apply(St, ld, e, nk, ri);
          gemm<T, false>(ne, nve, iD, Vr + e.r0 * vrs, vrs, 1, dOt + e.j0 * W, ld, dPt + off, ld);
          return e;
        };
        if constexpr (kExactDelta) {
          // delta = sum_j P_ij dP_ij from the scores: rowsum(dO * O) would use the rounded O.
          std::fill(drow, drow + ld, T(0));
          pass.rows.template visit<!kLocal>(p.sched, x, cb, [&](const T* Kr, ptrdiff_t krs, const T* Vr, ptrdiff_t vrs,
                                                          int64_t nk, const RowInfo& ri) {
            const Extent e = scores(Kr, krs, Vr, vrs, nk, ri);
            for (int j = e.j0; j < e.j1; ++j) {
              const V lj = loadu(lrow + j * W);
              V acc{};
              for (int64_t kk = e.r0; kk < e.r1; ++kk)
                acc = fmadd(exp2v((loadu(St + kk * ld + j * W) - lj) * log2e), loadu(dPt + kk * ld + j * W), acc);
              storeu(drow + j * W, loadu(drow + j * W) + acc);
            }
          });
          for (int64_t r = 0; r < nr; ++r) delta[bh * Sq + x.token(r)] = drow[r];  // for dK/dV
        }
        pass.rows.template visit<!kLocal>(p.sched, x, cb, [&](const T* Kr, ptrdiff_t krs, const T* Vr, ptrdiff_t vrs,
                                                        int64_t nk, const RowInfo& ri) {
          const Extent e = scores(Kr, krs, Vr, vrs, nk, ri);
          if (e.empty()) return;
          for (int j = e.j0; j < e.j1; ++j) {
            const V lj = loadu(lrow + j * W), dj = loadu(drow + j * W);
            for (int64_t kk = e.r0; kk < e.r1; ++kk) {
              T* s = St + kk * ld + j * W;
              T* dp = dPt + kk * ld + j * W;
              const V pr = exp2v((loadu(s) - lj) * log2e);
              storeu(dp, pr * (loadu(dp) - dj));
            }
          }
          const int64_t off = e.r0 * ld + e.j0 * W;
          gemm<T, true>(static_cast<int>(D), e.j1 - e.j0, static_cast<int>(e.r1 - e.r0), Kr + e.r0 * krs, 1, krs,
                        dPt + off, ld, dQt + e.j0 * W, ld);
        });
        for (int64_t r = 0; r < nr; ++r) {
          S* o = p.dq.mrow<S>(x.b, x.h, x.token(r));
          for (int64_t d = 0; d < D; ++d) o[d] = from_compute<S>(dQt[d * ld + r] * sc);
        }
      });
    });
  }

  // ---- 3. dK, dV: per key row group, over the query tiles that visit its KV tile --------------------
  {
    const Pass<S, T, MASK, MAP> pass(p, false, p.tsched, p.q, p.dout);  // lanes are keys: the inverse window
    const int64_t ldmax = pass.ldmax;
    pass.lanes.run(p.num_threads, W, [&](auto&& for_each_item) {
      Buf<T> ws;
      ChunkBufs<T> cb;
      ChunkMask<T, MASK, MAP> mask = pass.mask();
      T *Kt, *Vt, *dKt, *dVt, *Sm, *dP;
      carve<T>(ws, {{&Kt, D * ldmax}, {&Vt, D * ldmax}, {&dKt, D * ldmax}, {&dVt, D * ldmax}, {&Sm, kChunk * ldmax},
                    {&dP, kChunk * ldmax}});
      for_each_item([&](const LaneItem& x, int nv, int64_t ld) {
        const int64_t nk = x.n;
        pass.lanes.template pack<S>(p.k, x, D, sc, Kt, ld);
        pass.lanes.template pack<S>(p.v, x, D, T(1), Vt, ld);
        mask.start(x, ld);
        std::fill(dKt, dKt + D * ld, T(0));
        std::fill(dVt, dVt + D * ld, T(0));
        const T* lse_bh = lse_row.get() + x.bh * Sq;
        const T* delta_bh = delta.get() + x.bh * Sq;
        auto chunk = [&](const T* Qr, ptrdiff_t qrs, const T* Gr, ptrdiff_t grs, int64_t nq, const RowInfo& ri) {
          const Extent e = mask.extent(nv, nq, ri);
          if (e.empty()) return;
          const int ne = static_cast<int>(e.r1 - e.r0), nve = e.j1 - e.j0, iD = static_cast<int>(D);
          const int64_t off = e.r0 * ld + e.j0 * W;
          const T* Qe = Qr + e.r0 * qrs;
          const T* Ge = Gr + e.r0 * grs;
          gemm<T, false>(ne, nve, iD, Qe, qrs, 1, Kt + e.j0 * W, ld, Sm + off, ld);
          mask.apply(Sm, ld, e, nq, ri);
          for (int64_t i = e.r0; i < e.r1; ++i) {
            const V li = splat(lse_bh[ri.token(i)]);
            T* s = Sm + i * ld;
            for (int j = e.j0; j < e.j1; ++j) storeu(s + j * W, exp2v((loadu(s + j * W) - li) * log2e));
          }
          gemm<T, true>(iD, nve, ne, Ge, 1, grs, Sm + off, ld, dVt + e.j0 * W, ld);
          gemm<T, false>(ne, nve, iD, Ge, grs, 1, Vt + e.j0 * W, ld, dP + off, ld);
          for (int64_t i = e.r0; i < e.r1; ++i) {
            const V di = splat(delta_bh[ri.token(i)]);
            T* s = Sm + i * ld;
            T* dp = dP + i * ld;
            for (int j = e.j0; j < e.j1; ++j) storeu(dp + j * W, loadu(s + j * W) * (loadu(dp + j * W) - di));
          }
          gemm<T, true>(iD, nve, ne, Qe, 1, qrs, dP + off, ld, dKt + e.j0 * W, ld);
        };
        pass.rows.template visit<!kLocal>(p.tsched, x, cb, chunk);
        for (int64_t j = 0; j < nk; ++j) {
          S* ok = p.dk.mrow<S>(x.b, x.h, x.token(j));
          S* ov = p.dv.mrow<S>(x.b, x.h, x.token(j));
          for (int64_t d = 0; d < D; ++d) {
            ok[d] = from_compute<S>(dKt[d * ld + j] * sc);
            ov[d] = from_compute<S>(dVt[d * ld + j]);
          }
        }
      });
    });
  }
}

// ================================================================================================
// Python bindings
// ================================================================================================
Sched make_sched(uintptr_t ptr, uintptr_t idx, uintptr_t partial, int64_t ptr_stride, int64_t idx_stride) {
  Sched s;
  if (ptr == 0) return s;
  if (idx == 0 || partial == 0) throw std::invalid_argument("cpu attention: schedule pointers must all be set");
  s.ptr = reinterpret_cast<const int32_t*>(ptr);
  s.idx = reinterpret_cast<const int32_t*>(idx);
  s.partial = reinterpret_cast<const int32_t*>(partial);
  s.ptr_stride = ptr_stride;
  s.idx_stride = idx_stride;
  return s;
}

void check_common(int64_t B, int64_t H, int64_t Sq, int64_t Sk, int64_t D, int64_t block_m, int64_t block_n,
                  const std::initializer_list<const Strides4*>& strides) {
  if (B < 0 || H < 0 || Sq < 0 || Sk < 0 || D < 1)
    throw std::invalid_argument("cpu attention: bad sizes B=" + std::to_string(B) + " H=" + std::to_string(H) +
                                " Sq=" + std::to_string(Sq) + " Sk=" + std::to_string(Sk) + " D=" + std::to_string(D));
  if (block_m < 1 || block_n < 1)
    throw std::invalid_argument("cpu attention: block sizes must be positive, got (" + std::to_string(block_m) +
                                ", " + std::to_string(block_n) + ")");
  for (const Strides4* s : strides)
    if ((*s)[3] != 1 && D > 1) throw std::invalid_argument("cpu attention: the last dimension must have stride 1");
}

// Token-mapped tiles: both maps or neither, and only with a schedule (the launcher checks their contents).
void check_tokens(uintptr_t q_tokens, uintptr_t kv_tokens, uintptr_t kv_ptr, int64_t n_q_tiles, int64_t n_kv_tiles) {
  if ((q_tokens == 0) != (kv_tokens == 0))
    throw std::invalid_argument("cpu attention: pass both token maps (q_tokens, kv_tokens) or neither");
  if (q_tokens != 0 && (kv_ptr == 0 || n_q_tiles < 0 || n_kv_tiles < 0))
    throw std::invalid_argument("cpu attention: token maps need a schedule and tile counts");
}

// Checks and sets the common arguments (and the local mask's geometry for MASK_LOCAL).
void set_common(CommonParams& p, int64_t B, int64_t H, int64_t Sq, int64_t Sk, int64_t D,
                double scale, Tensor4 q, Tensor4 k, Tensor4 v, Tensor4 out, uintptr_t lse, bool lse_f64,
                int64_t block_m, int64_t block_n, Sched sched, int mask_kind, uintptr_t mask_params,
                uintptr_t mask_rows, uintptr_t q_tokens, uintptr_t kv_tokens, int64_t n_q_tiles, int64_t n_kv_tiles,
                int num_threads) {
  if (lse == 0) throw std::invalid_argument("cpu attention: lse pointer is required");
  p.B = B, p.H = H, p.Sq = Sq, p.Sk = Sk, p.D = D, p.scale = scale;
  p.q = q, p.k = k, p.v = v, p.out = out;
  p.lse = lse, p.lse_f64 = lse_f64;
  p.block_m = block_m, p.block_n = block_n;
  p.sched = sched;
  p.mask_params = reinterpret_cast<const int32_t*>(mask_params);
  if (mask_kind == MASK_LOCAL) {
    if (mask_params == 0) throw std::invalid_argument("cpu attention: the local mask needs its parameters");
    p.local.init(p.mask_params, Sq, Sk);
  }
  p.geom = &p.local;
  if (mask_kind == MASK_THRESHOLD && mask_rows == 0)
    throw std::invalid_argument("cpu attention: the threshold mask needs mask_rows");
  p.mask_rows = reinterpret_cast<const float*>(mask_rows);
  p.q_tokens = reinterpret_cast<const int32_t*>(q_tokens);
  p.kv_tokens = reinterpret_cast<const int32_t*>(kv_tokens);
  p.n_q_tiles = n_q_tiles, p.n_kv_tiles = n_kv_tiles;
  p.num_threads = num_threads;
}

// f(S{}, mask kind, token-mapped) as compile-time values: the kernel instance of a call.
template <typename F>
void dispatch(int dtype, int mask_kind, bool token_mapped, F&& f) {
  dispatch_dtype(dtype, [&](auto s) {
    dispatch_mask(mask_kind, [&](auto kind) {
      if (token_mapped)
        f(s, kind, std::true_type{});
      else
        f(s, kind, std::false_type{});
    });
  });
}

void attention_fwd(int dtype, int64_t B, int64_t H, int64_t Sq, int64_t Sk, int64_t D, double scale, uintptr_t q,
                   Strides4 q_strides, uintptr_t k, Strides4 k_strides, uintptr_t v, Strides4 v_strides,
                   uintptr_t out, Strides4 out_strides, uintptr_t lse, bool lse_f64, int64_t block_m, int64_t block_n,
                   uintptr_t kv_ptr, uintptr_t kv_idx, uintptr_t partial, int64_t sched_ptr_stride,
                   int64_t sched_idx_stride, int mask_kind, uintptr_t mask_params, int epilogue_kind,
                   uintptr_t row_scale, std::array<int64_t, 3> row_scale_strides, uintptr_t residual,
                   Strides4 residual_strides, int num_threads, uintptr_t q_tokens, uintptr_t kv_tokens,
                   int64_t n_q_tiles, int64_t n_kv_tiles, uintptr_t mask_rows) {
  check_common(B, H, Sq, Sk, D, block_m, block_n, {&q_strides, &k_strides, &v_strides, &out_strides});
  check_tokens(q_tokens, kv_tokens, kv_ptr, n_q_tiles, n_kv_tiles);
  if (epilogue_kind != EPILOGUE_NONE && epilogue_kind != EPILOGUE_SCALE_RESIDUAL)
    throw std::invalid_argument("cpu attention: unknown epilogue kind " + std::to_string(epilogue_kind));
  if (epilogue_kind == EPILOGUE_SCALE_RESIDUAL && (row_scale == 0 || residual == 0 || (residual_strides[3] != 1 && D > 1)))
    throw std::invalid_argument("cpu attention: the epilogue needs row_scale and a residual with unit last stride");
  FwdParams p;
  set_common(p, B, H, Sq, Sk, D, scale, {q, q_strides}, {k, k_strides}, {v, v_strides}, {out, out_strides},
             lse, lse_f64, block_m, block_n, make_sched(kv_ptr, kv_idx, partial, sched_ptr_stride, sched_idx_stride),
             mask_kind, mask_params, mask_rows, q_tokens, kv_tokens, n_q_tiles, n_kv_tiles, num_threads);
  p.epilogue = epilogue_kind;
  p.row_scale = reinterpret_cast<const float*>(row_scale);
  p.rs_st = row_scale_strides;
  p.residual = {residual, residual_strides};
  py::gil_scoped_release nogil;
  dispatch(dtype, mask_kind, q_tokens != 0, [&](auto s, auto kind, auto map) {
    fwd_kernel<decltype(s), decltype(kind)::value, decltype(map)::value>(p);
  });
}

void attention_bwd(int dtype, int64_t B, int64_t H, int64_t Sq, int64_t Sk, int64_t D, double scale,
                   uintptr_t dout, Strides4 dout_strides, uintptr_t q, Strides4 q_strides, uintptr_t k,
                   Strides4 k_strides, uintptr_t v, Strides4 v_strides, uintptr_t out, Strides4 out_strides,
                   uintptr_t lse, bool lse_f64, uintptr_t dq, Strides4 dq_strides, uintptr_t dk, Strides4 dk_strides,
                   uintptr_t dv, Strides4 dv_strides, int64_t block_m, int64_t block_n, uintptr_t kv_ptr,
                   uintptr_t kv_idx, uintptr_t partial, int64_t sched_ptr_stride, int64_t sched_idx_stride,
                   uintptr_t t_kv_ptr, uintptr_t t_kv_idx, uintptr_t t_partial, int64_t t_sched_ptr_stride,
                   int64_t t_sched_idx_stride, int mask_kind, uintptr_t mask_params, int num_threads,
                   uintptr_t q_tokens, uintptr_t kv_tokens, int64_t n_q_tiles, int64_t n_kv_tiles,
                   uintptr_t mask_rows) {
  check_common(B, H, Sq, Sk, D, block_m, block_n,
               {&dout_strides, &q_strides, &k_strides, &v_strides, &out_strides, &dq_strides, &dk_strides,
                &dv_strides});
  check_tokens(q_tokens, kv_tokens, kv_ptr, n_q_tiles, n_kv_tiles);
  if ((kv_ptr == 0) != (t_kv_ptr == 0))
    throw std::invalid_argument("cpu attention: pass both the schedule and its transpose, or neither");
  BwdParams p;
  set_common(p, B, H, Sq, Sk, D, scale, {q, q_strides}, {k, k_strides}, {v, v_strides}, {out, out_strides},
             lse, lse_f64, block_m, block_n, make_sched(kv_ptr, kv_idx, partial, sched_ptr_stride, sched_idx_stride),
             mask_kind, mask_params, mask_rows, q_tokens, kv_tokens, n_q_tiles, n_kv_tiles, num_threads);
  p.dout = {dout, dout_strides}, p.dq = {dq, dq_strides}, p.dk = {dk, dk_strides}, p.dv = {dv, dv_strides};
  p.tsched = make_sched(t_kv_ptr, t_kv_idx, t_partial, t_sched_ptr_stride, t_sched_idx_stride);
  py::gil_scoped_release nogil;
  dispatch(dtype, mask_kind, q_tokens != 0, [&](auto s, auto kind, auto map) {
    bwd_kernel<decltype(s), decltype(kind)::value, decltype(map)::value>(p);
  });
}

}  // namespace
}  // namespace dk

void register_topk_select_cpu(py::module_& m);  // csrc/cpu/topk_select.cpp (pass 1 of exact top-k)

void register_attention_cpu(py::module_& m) {
  using namespace pybind11::literals;
  register_topk_select_cpu(m);
  m.attr("DTYPE_FLOAT32") = static_cast<int>(dk::kFloat32);
  m.attr("DTYPE_FLOAT64") = static_cast<int>(dk::kFloat64);
  m.attr("DTYPE_FLOAT16") = static_cast<int>(dk::kFloat16);
  m.attr("DTYPE_BFLOAT16") = static_cast<int>(dk::kBFloat16);
  m.attr("SIMD_BYTES") = dk::kVecBytes;
  m.def("attention_fwd", &dk::attention_fwd,
        "Flash-attention forward on the CPU. Pointers are data_ptr() integers; strides are in elements.\n"
        "q: (B, H, Sq, D); k, v: (B, H, Sk, D); out: (B, H, Sq, D) (0: compute lse only);\n"
        "lse: (B, H, Sq) contiguous float32 (float64 if lse_f64). kv_ptr == 0 means dense.\n"
        "q_tokens / kv_tokens: int32 (n_q_tiles, block_m) / (n_kv_tiles, block_n) token lists of the tiles\n"
        "(valid tokens first, padded with Sq / Sk); 0: tiles are contiguous index ranges.",
        "dtype"_a, "B"_a, "H"_a, "Sq"_a, "Sk"_a, "D"_a, "scale"_a, "q"_a, "q_strides"_a, "k"_a, "k_strides"_a,
        "v"_a, "v_strides"_a, "out"_a, "out_strides"_a, "lse"_a, "lse_f64"_a, "block_m"_a, "block_n"_a,
        "kv_ptr"_a, "kv_idx"_a, "partial"_a, "sched_ptr_stride"_a, "sched_idx_stride"_a, "mask_kind"_a,
        "mask_params"_a, "epilogue_kind"_a, "row_scale"_a, "row_scale_strides"_a, "residual"_a,
        "residual_strides"_a, "num_threads"_a, "q_tokens"_a = 0, "kv_tokens"_a = 0, "n_q_tiles"_a = 0,
        "n_kv_tiles"_a = 0, "mask_rows"_a = 0);
  m.def("attention_bwd", &dk::attention_bwd,
        "Flash-attention backward on the CPU (FA2, deterministic). do, out: (B, H, Sq, D); lse as from\n"
        "attention_fwd; writes dq, dk, dv. The t_* CSR is the transposed schedule (over KV tiles).",
        "dtype"_a, "B"_a, "H"_a, "Sq"_a, "Sk"_a, "D"_a, "scale"_a, "dout"_a, "dout_strides"_a, "q"_a,
        "q_strides"_a, "k"_a, "k_strides"_a, "v"_a, "v_strides"_a, "out"_a, "out_strides"_a, "lse"_a, "lse_f64"_a,
        "dq"_a, "dq_strides"_a, "dk"_a, "dk_strides"_a, "dv"_a, "dv_strides"_a, "block_m"_a, "block_n"_a,
        "kv_ptr"_a, "kv_idx"_a, "partial"_a, "sched_ptr_stride"_a, "sched_idx_stride"_a, "t_kv_ptr"_a,
        "t_kv_idx"_a, "t_partial"_a, "t_sched_ptr_stride"_a, "t_sched_idx_stride"_a, "mask_kind"_a,
        "mask_params"_a, "num_threads"_a, "q_tokens"_a = 0, "kv_tokens"_a = 0, "n_q_tiles"_a = 0,
        "n_kv_tiles"_a = 0, "mask_rows"_a = 0);
  m.def("attention_fwd_visits", [] { return dk::g_fwd_visits.load(); },
        "Tiles (CSR entries) visited by the last attention_fwd call, summed over batch*head and row groups.");
  m.def("attention_fwd_pairs", [] { return dk::g_fwd_pairs.load(); },
        "Score slots (key rows x query lanes, vector padding included) computed by the last attention_fwd call.");
}
