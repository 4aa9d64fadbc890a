// The local-window element mask (MASK_LOCAL) of the CPU attention kernels: docs/spec.md §1 visibility
// (circle / square / tile windows, clip / shift borders, global tokens, extra keys) evaluated
// exactly in integers, applied to a score tile as two vector compares per row.
//
// Geometry. Parameters (int32, ditkernels.reference.local.LocalSpec.mask_params()):
//   [ndim, P, S, M, shape, border, n0, n1, n2, r0, r1, r2, t0, t1, t2, G, q0, nq, k0, nk]
// with the grid padded in front to 3-D (size 1, radius 1, tile 1 change no rule). Keys are
// [P global][grid tokens k0 .. k0+nk, row-major][S global][M extra keys]; queries are
// [P global][grid tokens q0 .. q0+nq][S global] when G = 1, the grid tokens alone when G = 0 (a
// sub-problem: rows of a band, ditkernels.distributed.local). Coordinates are those of the whole grid.
//
// Tables. A score tile of the kernels has "lanes" (the vector side: the queries of a query tile in
// the forward and dQ passes, the keys of a KV tile in the dK/dV pass) and "rows" (the tokens it is
// compared with). For every lane and every grid row (t, y) the lanes' windows can reach, the set of
// visible row tokens is an interval of x: [lo, hi]. LocalTable holds these intervals (one vector
// of lanes per row, plus three special rows: grid rows out of reach, global tokens, extra keys),
// so masking a row of scores is `x >= lo & x <= hi` on whole vectors. A circle's interval comes
// from a half-width table hw[|dt|][|dy|] (the largest |dx| with an integer-exact inside test).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/simd.h"

namespace dk {

enum TokenClass : int32_t { kGridTok = 0, kGlobalTok = 1, kExtraTok = 2 };
enum LocalShape : int64_t { kCircle = 0, kSquare = 1, kTile = 2 };
enum LocalBorder : int64_t { kClip = 0, kShift = 1 };

struct TokCoord {
  int32_t t, y, x, cls;
};

struct LocalGeom {
  int64_t nd = 0, P = 0, S = 0, M = 0, shape = 0, border = 0;
  int64_t n[3] = {1, 1, 1}, r[3] = {1, 1, 1}, tl[3] = {1, 1, 1};
  int64_t N = 0;
  int64_t ht = 0, hy = 0;         // circle: |dt| < ht and |dy| < hy can see anything
  std::vector<int32_t> hw;        // circle: hw[dt * hy + dy] = largest visible |dx|, -1: none
  std::vector<TokCoord> qcoords;  // every query token of [0, Sq)
  std::vector<TokCoord> kcoords;  // every key token of [0, Sk)

  TokCoord grid_coord(int64_t g) const {
    return TokCoord{static_cast<int32_t>(g / (n[1] * n[2])), static_cast<int32_t>((g / n[2]) % n[1]),
                    static_cast<int32_t>(g % n[2]), kGridTok};
  }

  void init(const int32_t* params, int64_t Sq, int64_t Sk) {
    nd = params[0], P = params[1], S = params[2], M = params[3], shape = params[4], border = params[5];
    for (int a = 0; a < 3; ++a) n[a] = params[6 + a], r[a] = params[9 + a], tl[a] = params[12 + a];
    const int64_t G = params[15], q0 = params[16], nq = params[17], k0 = params[18], nk = params[19];
    if (nd < 1 || nd > 3 || P < 0 || S < 0 || M < 0 || shape < 0 || shape > 2 || border < 0 || border > 1 ||
        G < 0 || G > 1)
      throw std::invalid_argument("cpu attention: bad local mask parameters");
    for (int a = 0; a < 3; ++a)
      if (n[a] < 1 || r[a] < 0 || tl[a] < 1) throw std::invalid_argument("cpu attention: bad local mask grid");
    N = n[0] * n[1] * n[2];
    if (q0 < 0 || nq < 0 || q0 + nq > N || k0 < 0 || nk < 0 || k0 + nk > N)
      throw std::invalid_argument("cpu attention: bad local mask sub-grid");
    const int64_t qP = G ? P : 0, seq_q = qP + nq + (G ? S : 0), seq_k = P + nk + S + M;
    if (Sq != seq_q || Sk != seq_k)
      throw std::invalid_argument("cpu attention: local mask built for seq_q=" + std::to_string(seq_q) +
                                  ", seq_k=" + std::to_string(seq_k) + ", got " + std::to_string(Sq) + ", " +
                                  std::to_string(Sk));
    if (shape == kCircle) build_circle();
    qcoords.resize(static_cast<size_t>(Sq));
    for (int64_t i = 0; i < Sq; ++i)
      qcoords[static_cast<size_t>(i)] =
          i >= qP && i < qP + nq ? grid_coord(q0 + i - qP) : TokCoord{0, 0, 0, kGlobalTok};
    kcoords.resize(static_cast<size_t>(Sk));
    for (int64_t j = 0; j < Sk; ++j) {
      TokCoord c{0, 0, 0, kGlobalTok};
      if (j >= P + nk + S) {
        c.cls = kExtraTok;
      } else if (j >= P && j < P + nk) {
        c = grid_coord(k0 + j - P);
      }
      kcoords[static_cast<size_t>(j)] = c;
    }
  }

  // sum_a d_a^2 prod_{b!=a} r_b^2 < prod_b r_b^2, solved for the largest |dx| per (|dt|, |dy|).
  void build_circle() {
    const __int128 r0 = r[0] * r[0], r1 = r[1] * r[1], r2 = r[2] * r[2];
    const __int128 big = r0 * r1 * r2;
    if (big >= (static_cast<__int128>(1) << 60))
      throw std::invalid_argument("cpu attention: circle radii too large for the exact integer test");
    ht = r[0] >= 1 ? std::min(r[0], n[0]) : 0;
    hy = r[1] >= 1 ? std::min(r[1], n[1]) : 0;
    if (r[2] < 1) ht = hy = 0;
    hw.assign(static_cast<size_t>(std::max<int64_t>(ht * hy, 1)), -1);
    for (int64_t dt = 0; dt < ht; ++dt)
      for (int64_t dy = 0; dy < hy; ++dy) {
        const __int128 rem = big - dt * dt * r1 * r2 - dy * dy * r0 * r2;
        if (rem <= 0) continue;
        const int64_t q = static_cast<int64_t>((rem - 1) / (r0 * r1));  // dx^2 <= q
        int64_t m = static_cast<int64_t>(std::sqrt(static_cast<double>(q)));
        while (m > 0 && m * m > q) --m;
        while ((m + 1) * (m + 1) <= q) ++m;
        hw[static_cast<size_t>(dt * hy + dy)] = static_cast<int32_t>(std::min<int64_t>(m, n[2]));
      }
  }

  // [lo, hi] along dimension a: fwd: key coordinates visible to query coordinate p (necessary for a
  // circle, exact for the separable shapes); !fwd: query coordinates that see key coordinate p.
  void range(int a, int64_t p, bool fwd, int64_t& lo, int64_t& hi) const {
    const int64_t nn = n[a], rr = r[a];
    if (shape == kCircle) {
      if (rr == 0) {
        lo = 1, hi = 0;
        return;
      }
      lo = p - (rr - 1), hi = p + (rr - 1);
    } else if (shape == kTile) {
      const int64_t t = tl[a], tp = p / t;
      lo = (tp - rr) * t, hi = (tp + rr + 1) * t - 1;
    } else if (border == kClip) {
      lo = p - rr, hi = p + rr;
    } else {
      const int64_t k = 2 * rr + 1;
      if (nn < k) {
        lo = 0, hi = nn - 1;
      } else if (fwd) {
        lo = std::min(std::max<int64_t>(p - rr, 0), nn - k), hi = lo + k - 1;
      } else {  // the queries whose shifted window [s(q), s(q) + k) holds p
        lo = p < k ? 0 : p - rr;
        hi = p >= nn - k ? nn - 1 : p + rr;
      }
    }
    lo = std::max<int64_t>(lo, 0), hi = std::min(hi, nn - 1);
  }

  // Interval of x (of the row token) visible with a lane token at c, for the row token's (t, y).
  bool x_interval(const TokCoord& c, int64_t t, int64_t y, bool fwd, int64_t& lo, int64_t& hi) const {
    if (shape == kCircle) {  // symmetric
      const int64_t dt = t > c.t ? t - c.t : c.t - t, dy = y > c.y ? y - c.y : c.y - y;
      if (dt >= ht || dy >= hy) return false;
      const int64_t m = hw[static_cast<size_t>(dt * hy + dy)];
      if (m < 0) return false;
      lo = std::max<int64_t>(c.x - m, 0), hi = std::min(c.x + m, n[2] - 1);
      return true;
    }
    int64_t a, b;
    range(0, c.t, fwd, a, b);
    if (t < a || t > b) return false;
    range(1, c.y, fwd, a, b);
    if (y < a || y > b) return false;
    range(2, c.x, fwd, lo, hi);
    return lo <= hi;
  }
};

// Row intervals of one lane tile (see the file comment). T: the compute type of the scores.
template <typename T>
struct LocalTable {
  int64_t lo0 = 0, lo1 = 0, n0r = 0, n1r = 0, nrows = 0, ld = 0;
  int64_t cached = -1;  // id of the lane tile the table was built for
  bool lanes_q = true;  // lanes are queries (rows keys), else keys (rows queries)
  T* lo = nullptr;
  T* hi = nullptr;
  std::vector<T> store;

  // lanes: tokens tok[0, nl) (tok == nullptr: tok0 + i), padded to ld. fwd: lanes are queries.
  void build(const LocalGeom& g, bool fwd, const int32_t* tok, int64_t tok0, int64_t nl, int64_t ld_) {
    ld = ld_;
    lanes_q = fwd;
    const std::vector<TokCoord>& lc = fwd ? g.qcoords : g.kcoords;
    auto lane = [&](int64_t i) -> const TokCoord& { return lc[static_cast<size_t>(tok ? tok[i] : tok0 + i)]; };
    int64_t l0 = std::numeric_limits<int64_t>::max(), h0 = -1, l1 = l0, h1 = -1;
    for (int64_t i = 0; i < nl; ++i) {
      const TokCoord& c = lane(i);
      if (c.cls != kGridTok) continue;
      int64_t a, b;
      g.range(0, c.t, fwd, a, b);
      l0 = std::min(l0, a), h0 = std::max(h0, b);
      g.range(1, c.y, fwd, a, b);
      l1 = std::min(l1, a), h1 = std::max(h1, b);
    }
    if (h0 < l0 || h1 < l1) {
      n0r = n1r = nrows = 0, lo0 = lo1 = 0;
    } else {
      lo0 = l0, lo1 = l1, n0r = h0 - l0 + 1, n1r = h1 - l1 + 1, nrows = n0r * n1r;
    }
    store.resize(static_cast<size_t>(2 * (nrows + 3) * ld));
    lo = store.data(), hi = lo + (nrows + 3) * ld;
    const T big = static_cast<T>(1e30);
    auto set = [&](int64_t row, int64_t i, bool vis) {
      lo[row * ld + i] = vis ? -big : big;
      hi[row * ld + i] = vis ? big : -big;
    };
    for (int64_t row = 0; row < nrows; ++row) {
      const int64_t t = lo0 + row / n1r, y = lo1 + row % n1r;
      for (int64_t i = 0; i < ld; ++i) {
        if (i >= nl) {
          set(row, i, false);
          continue;
        }
        const TokCoord& c = lane(i);
        int64_t a, b;
        if (c.cls != kGridTok) {
          // fwd: a global query sees every grid key; dK/dV: every grid query sees a global / extra key
          set(row, i, true);
        } else if (g.x_interval(c, t, y, fwd, a, b)) {
          lo[row * ld + i] = static_cast<T>(a), hi[row * ld + i] = static_cast<T>(b);
        } else {
          set(row, i, false);
        }
      }
    }
    for (int64_t i = 0; i < ld; ++i) {
      const int32_t cls = i < nl ? lane(i).cls : -1;
      set(nrows, i, cls == kGlobalTok || cls == kExtraTok);              // grid rows out of reach
      set(nrows + 1, i, fwd ? cls >= 0 : cls == kGridTok || cls == kGlobalTok);  // global row tokens
      set(nrows + 2, i, fwd && cls == kGridTok);                            // extra keys (rows of the forward only)
    }
  }

  // The intervals of one row token against the lanes: row(g, j).visible(v) is the compare mask of the
  // lanes of vector v (of kLanes<T> lanes) that see row token j.
  struct Row {
    const T* lo;
    const T* hi;
    vec_t<T> x;
    typename VecOf<T>::itype visible(int v) const {
      return (x >= loadu(lo + v * kLanes<T>)) & (x <= loadu(hi + v * kLanes<T>));
    }
  };
  Row row(const LocalGeom& g, int64_t j) const {
    int64_t r;
    T x;
    row_of(g, j, r, x);
    return Row{lo + r * ld, hi + r * ld, splat(x)};
  }

  // Row of the table and x coordinate of row token j.
  void row_of(const LocalGeom& g, int64_t j, int64_t& row, T& x) const {
    const TokCoord& c = (lanes_q ? g.kcoords : g.qcoords)[static_cast<size_t>(j)];
    x = T(0);
    if (c.cls == kGlobalTok) {
      row = nrows + 1;
    } else if (c.cls == kExtraTok) {
      row = nrows + 2;
    } else {
      const int64_t i0 = c.t - lo0, i1 = c.y - lo1;
      row = (i0 >= 0 && i0 < n0r && i1 >= 0 && i1 < n1r) ? i0 * n1r + i1 : nrows;
      x = static_cast<T>(c.x);
    }
  }
};

}  // namespace dk
