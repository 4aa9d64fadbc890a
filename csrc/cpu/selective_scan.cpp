// Selective scan (Mamba, SPEC §4) on the CPU: forward and backward.
//
//   delta'_t = softplus(delta_t + delta_bias) (or delta_t + delta_bias)
//   h_t = exp(delta'_t * A) * h_{t-1} + delta'_t * B_t * u_t,   y_t = <h_t, C_t> + D * u_t,
//   out_t = y_t * silu(z_t) when z is given.
//
// Torch-independent: tensors arrive as raw pointers (integers), dtype codes and element strides, so
// reverse scans are just negative L strides. Work is split over rows (batch, channel) between
// std::threads; the state dimension is processed in blocks of 16 lanes (one AVX-512 or two AVX2
// registers) that gcc vectorises. Math is float32 for every storage dtype (float64 for float64).
//
// The forward runs over L in chunks and saves the state at every chunk boundary, hs (B, D, nc+1, N).
// The backward walks the chunks in reverse: it recomputes the chunk's states from the saved boundary
// state, then runs the reverse recurrence for dh. Nothing of size (B, D, L, N) is ever allocated.
// Rows sharing a B/C group ("segment") share one transposed [t][n] tile of B and C per chunk, and
// their dB/dC contributions are summed into that tile before being added to a per-thread partial
// buffer; partial buffers are reduced in thread order at the end, so results are deterministic.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <thread>
#include <vector>

namespace py = pybind11;

namespace {

enum DType : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3 };
constexpr int W = 16;  // lanes of one state block

// ---------------------------------------------------------------------------------------------
// 16-bit float conversions (bit manipulation, round-to-nearest-even).

inline uint32_t bits_of(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float float_of(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline float half_to_float(uint16_t h) {
  const uint32_t w = uint32_t(h) << 16;
  const uint32_t sign = w & 0x80000000u;
  const uint32_t two_w = w + w;
  const float normalized = float_of((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float denormalized = float_of((two_w >> 17) | (126u << 23)) - 0.5f;
  const uint32_t result = sign | (two_w < (1u << 27) ? bits_of(denormalized) : bits_of(normalized));
  return float_of(result);
}

inline uint16_t float_to_half(float f) {
  float base = (std::fabs(f) * 0x1.0p+112f) * 0x1.0p-110f;
  const uint32_t w = bits_of(f);
  const uint32_t shl1_w = w + w;
  const uint32_t sign = w & 0x80000000u;
  uint32_t bias = shl1_w & 0xFF000000u;
  if (bias < 0x71000000u) bias = 0x71000000u;
  base = float_of((bias >> 1) + 0x07800000u) + base;
  const uint32_t b = bits_of(base);
  const uint32_t nonsign = ((b >> 13) & 0x00007C00u) + (b & 0x00000FFFu);
  return uint16_t((sign >> 16) | (shl1_w > 0xFF000000u ? 0x7E00u : nonsign));
}

inline float bf16_to_float(uint16_t h) { return float_of(uint32_t(h) << 16); }

inline uint16_t float_to_bf16(float f) {
  uint32_t u = bits_of(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40u);  // NaN stays NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

// dst[i * dst_stride] = src[i * stride] converted to Acc, for i < n.
template <class Acc>
void load(int64_t addr, int dtype, int64_t stride, int n, Acc* dst, int64_t dst_stride = 1) {
  switch (dtype) {
    case kF32: {
      auto p = reinterpret_cast<const float*>(addr);
      for (int i = 0; i < n; ++i) dst[i * dst_stride] = Acc(p[i * stride]);
      break;
    }
    case kF64: {
      auto p = reinterpret_cast<const double*>(addr);
      for (int i = 0; i < n; ++i) dst[i * dst_stride] = Acc(p[i * stride]);
      break;
    }
    case kF16: {
      auto p = reinterpret_cast<const uint16_t*>(addr);
      for (int i = 0; i < n; ++i) dst[i * dst_stride] = Acc(half_to_float(p[i * stride]));
      break;
    }
    case kBF16: {
      auto p = reinterpret_cast<const uint16_t*>(addr);
      for (int i = 0; i < n; ++i) dst[i * dst_stride] = Acc(bf16_to_float(p[i * stride]));
      break;
    }
  }
}

// dst[i * stride] = src[i] converted to dtype, for i < n.
template <class Acc>
void store(int64_t addr, int dtype, int64_t stride, int n, const Acc* src) {
  switch (dtype) {
    case kF32: {
      auto p = reinterpret_cast<float*>(addr);
      for (int i = 0; i < n; ++i) p[i * stride] = float(src[i]);
      break;
    }
    case kF64: {
      auto p = reinterpret_cast<double*>(addr);
      for (int i = 0; i < n; ++i) p[i * stride] = double(src[i]);
      break;
    }
    case kF16: {
      auto p = reinterpret_cast<uint16_t*>(addr);
      for (int i = 0; i < n; ++i) p[i * stride] = float_to_half(float(src[i]));
      break;
    }
    case kBF16: {
      auto p = reinterpret_cast<uint16_t*>(addr);
      for (int i = 0; i < n; ++i) p[i * stride] = float_to_bf16(float(src[i]));
      break;
    }
  }
}

int64_t itemsize(int dtype) { return dtype == kF64 ? 8 : dtype == kF32 ? 4 : 2; }

// ---------------------------------------------------------------------------------------------
// 16-lane vectors (GCC vector extensions: one zmm with AVX-512, two ymm with AVX2, plain SSE
// elsewhere; no intrinsics). Float math uses Cephes-style polynomials (~1 ulp); the float64 path
// calls libm per lane (it is there for exactness, not speed).

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
template <class Acc>
inline Vec<Acc> splat(Acc x) {
  return Vec<Acc>{} + x;
}

// 2^x: x = n + f with n = round(x), 2^f by a degree-6 polynomial on [-0.5, 0.5] (Cephes exp2f,
// ~1 ulp). Adding 1.5*2^23 + 127 rounds x and leaves n + 127 in the low mantissa bits, so the
// exponent 2^n is one shift away.
inline Vec<float> vexp2(Vec<float> x) {
  typedef VecOf<float>::itype VI;
  using V = Vec<float>;
  x = x < splat(-126.0f) ? splat(-126.0f) : x;
  x = x > splat(126.0f) ? splat(126.0f) : x;
  const V magic = splat(12582912.0f + 127.0f);
  const V v = x + magic;
  const V f = x - (v - magic);
  V p = splat(1.535336188319500e-4f);
  p = p * f + 1.339887440266574e-3f;
  p = p * f + 9.618437357674640e-3f;
  p = p * f + 5.550332471162809e-2f;
  p = p * f + 2.402264791363012e-1f;
  p = p * f + 6.931472028550421e-1f;
  p = p * f + 1.0f;
  return p * (V)((VI)v << 23);
}
inline Vec<double> vexp2(Vec<double> x) {
  for (int i = 0; i < W; ++i) x[i] = std::exp2(x[i]);
  return x;
}
inline Vec<float> vexp(Vec<float> x) { return vexp2(x * 1.44269504088896341f); }
inline Vec<double> vexp(Vec<double> x) {
  for (int i = 0; i < W; ++i) x[i] = std::exp(x[i]);
  return x;
}
// exp(x) for the decays: e^x = 2^(x log2 e); callers pre-scale A by log2(e).
constexpr double kLog2e = 1.4426950408889634074;

// log(x) for finite x >= 1 (softplus only).
inline Vec<float> vlog_ge1(Vec<float> x) {
  typedef VecOf<float>::itype VI;
  using V = Vec<float>;
  const VI b = (VI)x;
  V e = __builtin_convertvector((b >> 23) - 126, V);
  V m = (V)((b & 0x007fffff) | 0x3f000000);  // mantissa in [0.5, 1)
  const VI small = m < splat(0.707106781186547524f);
  e = small ? e - 1.0f : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const V z = m * m;
  V y = splat(7.0376836292e-2f);
  y = y * m - 1.1514610310e-1f;
  y = y * m + 1.1676998740e-1f;
  y = y * m - 1.2420140846e-1f;
  y = y * m + 1.4249322787e-1f;
  y = y * m - 1.6668057665e-1f;
  y = y * m + 2.0000714765e-1f;
  y = y * m - 2.4999993993e-1f;
  y = y * m + 3.3333331174e-1f;
  y = y * m * z;
  y = y - e * 2.12194440e-4f;
  y = y - z * 0.5f;
  return (m + y) + e * 0.693359375f;
}

// softplus with torch's threshold 20; log1p(e) = log(1+e) * e / ((1+e) - 1) keeps small e accurate.
inline Vec<float> vsoftplus(Vec<float> x) {
  using V = Vec<float>;
  const V e = vexp(x < splat(20.0f) ? x : splat(20.0f));
  const V u = e + 1.0f;
  const V d = u - 1.0f;
  const V lp = d == splat(0.0f) ? e : vlog_ge1(u) * (e / (d == splat(0.0f) ? splat(1.0f) : d));
  return x > splat(20.0f) ? x : lp;
}
inline Vec<double> vsoftplus(Vec<double> x) {
  for (int i = 0; i < W; ++i) x[i] = x[i] > 20.0 ? x[i] : std::log1p(std::exp(x[i]));
  return x;
}

template <class Acc>
inline Vec<Acc> vsigmoid(Vec<Acc> x) {
  return Acc(1) / (vexp(-x) + Acc(1));
}

// Sum of the 16 lanes as a fixed tree.
template <class Acc>
inline Acc hsum(Vec<Acc> v) {
  Acc a[8];
  for (int j = 0; j < 8; ++j) a[j] = v[j] + v[j + 8];
  return ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
}

// y[t] += sum_j Q[t * W + j] for t < tl: 16 rows at a time by a shuffle tree (a transposing
// reduction, ~3 vector ops per row instead of a horizontal sum per row).
template <class V>
inline V fold8(V a, V b) {
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23) +
         __builtin_shufflevector(a, b, 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31);
}
template <class V>
inline V fold4(V a, V b) {
  return __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27) +
         __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31);
}
template <class V>
inline V fold2(V a, V b) {
  return __builtin_shufflevector(a, b, 0, 1, 4, 5, 8, 9, 12, 13, 16, 17, 20, 21, 24, 25, 28, 29) +
         __builtin_shufflevector(a, b, 2, 3, 6, 7, 10, 11, 14, 15, 18, 19, 22, 23, 26, 27, 30, 31);
}
template <class V>
inline V fold1(V a, V b) {
  return __builtin_shufflevector(a, b, 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         __builtin_shufflevector(a, b, 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

template <class Acc>
void add_row_sums(const Acc* Q, int64_t tl, Acc* y) {
  using V = Vec<Acc>;
  int64_t t = 0;
  for (; t + W <= tl; t += W) {
    const Acc* q = Q + t * W;
    V s8[8], s4[4], s2[2];
    for (int k = 0; k < 8; ++k) s8[k] = fold8(vload(q + (2 * k) * W), vload(q + (2 * k + 1) * W));
    for (int k = 0; k < 4; ++k) s4[k] = fold4(s8[2 * k], s8[2 * k + 1]);
    for (int k = 0; k < 2; ++k) s2[k] = fold2(s4[2 * k], s4[2 * k + 1]);
    vstore(y + t, vload(y + t) + fold1(s2[0], s2[1]));
  }
  for (; t < tl; ++t) y[t] += hsum<Acc>(vload(Q + t * W));
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
  int64_t last = 0, hs = 0;                            // (B, D, N), (B, D, nc + 1, N)
  int64_t dlast = 0, dA_rows = 0, dD_rows = 0, dbias_rows = 0, dinit = 0;  // (B,D,N) (B,D,N) (B,D) (B,D) (B,D,N)
  // dB, dC: Acc, indexed (key, n, t) with key = b * G + g (variable) or g (constant), t-extent L or 1.
  Operand dB, dC;
};

template <class F>
void parallel_for(int nthreads, const F& fn) {
  if (nthreads <= 1) {
    fn(0);
    return;
  }
  std::vector<std::thread> threads;
  threads.reserve(nthreads - 1);
  for (int t = 1; t < nthreads; ++t) threads.emplace_back(fn, t);
  fn(0);
  for (auto& th : threads) th.join();
}

// Addressing of B or C for one (batch, group).
struct GroupOperand {
  const Operand* op;
  int64_t groups, span;  // span: channels per group
  bool var;
  int64_t key(int64_t b, int64_t d) const { return (var ? b * groups : 0) + d / span; }
  int64_t addr(int64_t b, int64_t d) const {
    return op->ptr + (b * op->sb + (d / span) * op->sd) * itemsize(op->dtype);
  }
};

struct Shape {
  int64_t Bsz, D, L, N, NP, NB, T, nc;
  explicit Shape(const Params& p)
      : Bsz(p.batch), D(p.dim), L(p.seqlen), N(p.dstate), NP((p.dstate + W - 1) / W * W), NB(NP / W),
        T(p.chunk), nc((p.seqlen + p.chunk - 1) / p.chunk) {}
};

// The (rows [r0, r1)) of one thread, cut into segments of rows sharing both their B and C groups.
template <class F>
void for_each_segment(const Shape& s, const GroupOperand& gb, const GroupOperand& gc, int64_t r0, int64_t r1,
                      const F& fn) {
  int64_t r = r0;
  while (r < r1) {
    const int64_t b = r / s.D, d = r % s.D;
    const int64_t end_b = b * s.D + (d / gb.span + 1) * gb.span;
    const int64_t end_c = b * s.D + (d / gc.span + 1) * gc.span;
    const int64_t e = std::min({r1, end_b, end_c});
    fn(b, d, e - r);
    r = e;
  }
}

// Transposed [t][n] tile (rows t < tl, NP columns, zero padded) of B or C at chunk offset t0.
// A constant operand gives one row (its t-step is 0).
template <class Acc>
void load_tile(const Shape& s, const GroupOperand& g, int64_t b, int64_t d, int64_t t0, int64_t tl, Acc* tile) {
  const Operand& op = *g.op;
  const int64_t rows = g.var ? tl : 1;
  std::fill(tile, tile + rows * s.NP, Acc(0));
  const int64_t base = g.addr(b, d) + (g.var ? t0 * op.sl * itemsize(op.dtype) : 0);
  for (int64_t n = 0; n < s.N; ++n)
    load<Acc>(base + n * op.sn * itemsize(op.dtype), op.dtype, op.sl, int(rows), tile + n, s.NP);
}

int64_t row_addr(const Operand& op, int64_t b, int64_t d, int64_t t0) {
  return op.ptr + (b * op.sb + d * op.sd + t0 * op.sl) * itemsize(op.dtype);
}

// One row, one chunk of the forward recurrence. A: (NP,) scaled by log2(e); h: (NP,) state in/out; y[t] = <h_t, C_t>; Q: (T, W) scratch.
template <class Acc>
void chunk_forward(const Shape& s, int64_t tl, const Acc* A, const Acc* dt, const Acc* dtu, const Acc* Bt,
                   int64_t bts, const Acc* Ct, int64_t cts, Acc* h, Acc* y, Acc* Q) {
  using V = Vec<Acc>;
  for (int64_t t = 0; t < tl; ++t) y[t] = 0;
  for (int64_t nb = 0; nb < s.NB; ++nb) {
    V hr = vload(h + nb * W);
    const V Ar = vload(A + nb * W);
    const Acc* Bb = Bt + nb * W;
    const Acc* Cb = Ct + nb * W;
    for (int64_t t = 0; t < tl; ++t) {
      hr = vexp2(Ar * dt[t]) * hr + vload(Bb + t * bts) * dtu[t];
      vstore(Q + t * W, hr * vload(Cb + t * cts));
    }
    vstore(h + nb * W, hr);
    add_row_sums(Q, tl, y);
  }
}

// Per-row chunk inputs (padded to whole vectors): u, delta + bias, delta' (after softplus), delta' * u, z.
template <class Acc>
struct RowChunk {
  int64_t TP;
  std::vector<Acc> u, x, dt, dtu, z;
  explicit RowChunk(int64_t T)
      : TP((T + W - 1) / W * W), u(TP, Acc(0)), x(TP, Acc(0)), dt(TP, Acc(0)), dtu(TP, Acc(0)), z(TP, Acc(0)) {}
  void load_inputs(const Params& p, int64_t b, int64_t d, int64_t t0, int64_t tl) {
    load<Acc>(row_addr(p.u, b, d, t0), p.u.dtype, p.u.sl, int(tl), u.data());
    load<Acc>(row_addr(p.delta, b, d, t0), p.delta.dtype, p.delta.sl, int(tl), x.data());
    if (p.z.ptr) load<Acc>(row_addr(p.z, b, d, t0), p.z.dtype, p.z.sl, int(tl), z.data());
    const Acc bias = p.delta_bias ? reinterpret_cast<const Acc*>(p.delta_bias)[d] : Acc(0);
    for (int64_t t = 0; t < tl; t += W) {
      const Vec<Acc> xv = vload(&x[t]) + bias;
      const Vec<Acc> dv = p.softplus ? vsoftplus(xv) : xv;
      vstore(&x[t], xv);
      vstore(&dt[t], dv);
      vstore(&dtu[t], dv * vload(&u[t]));
    }
  }
};

template <class Acc>
void forward(const Params& p) {
  const Shape s(p);
  const GroupOperand gb{&p.Bm, p.b_groups, s.D / p.b_groups, p.b_var};
  const GroupOperand gc{&p.Cm, p.c_groups, s.D / p.c_groups, p.c_var};
  const Acc* A = reinterpret_cast<const Acc*>(p.A);
  const Acc* Dv = reinterpret_cast<const Acc*>(p.Dvec);
  Acc* hs = reinterpret_cast<Acc*>(p.hs);
  Acc* last = reinterpret_cast<Acc*>(p.last);
  const int64_t R = s.Bsz * s.D;
  const int nt = int(std::max<int64_t>(1, std::min<int64_t>(p.nthreads, R)));

  parallel_for(nt, [&](int tid) {
    const int64_t r0 = R * tid / nt, r1 = R * (tid + 1) / nt;
    RowChunk<Acc> rc(s.T);
    std::vector<Acc> Bt(s.T * s.NP), Ct(s.T * s.NP), Apad(s.NP, Acc(0)), y(rc.TP), Q(s.T * W), h;
    const int64_t bts = gb.var ? s.NP : 0, cts = gc.var ? s.NP : 0;
    for_each_segment(s, gb, gc, r0, r1, [&](int64_t b, int64_t d0, int64_t nrows) {
      h.assign(nrows * s.NP, Acc(0));
      if (p.init) {
        const Acc* init = reinterpret_cast<const Acc*>(p.init) + (b * s.D + d0) * s.N;
        for (int64_t i = 0; i < nrows; ++i) std::copy(init + i * s.N, init + (i + 1) * s.N, &h[i * s.NP]);
      }
      for (int64_t c = 0; c < s.nc; ++c) {
        const int64_t t0 = c * s.T, tl = std::min(s.T, s.L - t0);
        load_tile(s, gb, b, d0, t0, tl, Bt.data());
        load_tile(s, gc, b, d0, t0, tl, Ct.data());
        for (int64_t i = 0; i < nrows; ++i) {
          const int64_t d = d0 + i, row = b * s.D + d;
          Acc* hr = &h[i * s.NP];
          std::copy(hr, hr + s.N, hs + (row * (s.nc + 1) + c) * s.N);
          for (int64_t n = 0; n < s.N; ++n) Apad[n] = A[d * s.N + n] * Acc(kLog2e);
          rc.load_inputs(p, b, d, t0, tl);
          chunk_forward<Acc>(s, tl, Apad.data(), rc.dt.data(), rc.dtu.data(), Bt.data(), bts, Ct.data(), cts, hr,
                             y.data(), Q.data());
          const Acc dv = Dv ? Dv[d] : Acc(0);
          for (int64_t t = 0; t < tl; t += W) {
            Vec<Acc> yv = vload(&y[t]) + vload(&rc.u[t]) * dv;
            if (p.z.ptr) {
              const Vec<Acc> zv = vload(&rc.z[t]);
              yv = yv * zv * vsigmoid<Acc>(zv);
            }
            vstore(&y[t], yv);
          }
          store<Acc>(row_addr(p.out, b, d, t0), p.out.dtype, p.out.sl, int(tl), y.data());
        }
      }
      for (int64_t i = 0; i < nrows; ++i) {
        const int64_t row = b * s.D + d0 + i;
        std::copy(&h[i * s.NP], &h[i * s.NP] + s.N, hs + (row * (s.nc + 1) + s.nc) * s.N);
        std::copy(&h[i * s.NP], &h[i * s.NP] + s.N, last + row * s.N);
      }
    });
  });
}

// Per-thread partial sums of dB or dC over the keys its rows touch, reduced in thread order at the end.
template <class Acc>
struct Partial {
  int64_t kmin = 0, nkeys = 0, lext = 1;  // keys [kmin, kmin + nkeys), t-extent lext
  std::vector<Acc> buf;                   // (nkeys, N, lext)
};

template <class Acc>
void init_partial(const Shape& s, const GroupOperand& g, int64_t r0, int64_t r1, Partial<Acc>& part) {
  part.lext = g.var ? s.L : 1;
  if (r1 <= r0) return;
  const int64_t b0 = r0 / s.D, b1 = (r1 - 1) / s.D;
  int64_t k0 = g.key(b0, r0 % s.D), k1 = g.key(b1, (r1 - 1) % s.D);
  if (!g.var && b0 != b1) k0 = 0, k1 = g.groups - 1;  // a constant operand's keys wrap with the batch
  part.kmin = k0;
  part.nkeys = k1 - k0 + 1;
  part.buf.assign(part.nkeys * s.N * part.lext, Acc(0));
}

// partial[key][n][t0 + t] += tile[t][n]
template <class Acc>
void flush_tile(const Shape& s, const GroupOperand& g, int64_t key, int64_t t0, int64_t tl, const Acc* tile,
                Partial<Acc>& part) {
  const int64_t rows = g.var ? tl : 1;
  Acc* dst = part.buf.data() + (key - part.kmin) * s.N * part.lext + (g.var ? t0 : 0);
  for (int64_t n = 0; n < s.N; ++n)
    for (int64_t t = 0; t < rows; ++t) dst[n * part.lext + t] += tile[t * s.NP + n];
}

template <class Acc>
void reduce_partials(const Shape& s, const GroupOperand& g, const Operand& out, std::vector<Partial<Acc>>& parts,
                     int nt) {
  const int64_t nkeys = g.var ? s.Bsz * g.groups : g.groups;
  const int64_t lext = g.var ? s.L : 1;
  const int ntr = int(std::max<int64_t>(1, std::min<int64_t>(nt, nkeys)));
  parallel_for(ntr, [&](int tid) {
    std::vector<Acc> acc(s.N * lext);
    for (int64_t k = nkeys * tid / ntr; k < nkeys * (tid + 1) / ntr; ++k) {
      std::fill(acc.begin(), acc.end(), Acc(0));
      for (auto& part : parts) {
        if (k < part.kmin || k >= part.kmin + part.nkeys) continue;
        const Acc* src = part.buf.data() + (k - part.kmin) * s.N * lext;
        for (int64_t i = 0; i < s.N * lext; ++i) acc[i] += src[i];
      }
      for (int64_t n = 0; n < s.N; ++n)
        store<Acc>(out.ptr + (k * out.sb + n * out.sn) * itemsize(out.dtype), out.dtype, out.sl, int(lext),
                   acc.data() + n * lext);
    }
  });
}

// One state block of one row over one chunk, in reverse: g (dL/dh after the chunk) in/out, dA in/out,
// dB/dC tiles accumulated, per-step sums <g_t, B_t> into QB rows and <A, g_t a_t h_{t-1}> into QA rows.
// H, Ab: the chunk's recomputed states and decays. A constant B or C (VB / VC false) accumulates its
// gradient in a register.
template <class Acc, bool VB, bool VC>
void reverse_block(int64_t tl, const Acc* dy, const Acc* dt, const Acc* dtu, Vec<Acc> Ar, Vec<Acc> hprev0,
                   const Acc* H, const Acc* Ab, const Acc* Bb, const Acc* Cb, Acc* dBb, Acc* dCb, Vec<Acc>& gr,
                   Vec<Acc>& dAr, Acc* QB, Acc* QA, int64_t NP) {
  using V = Vec<Acc>;
  V dBc = VB ? V{} : vload(dBb), dCc = VC ? V{} : vload(dCb);
  for (int64_t t = tl - 1; t >= 0; --t) {
    const V Ht = vload(H + t * W), At = vload(Ab + t * W);
    const V hp = t > 0 ? vload(H + (t - 1) * W) : hprev0;
    const V Cv = vload(Cb + (VC ? t * NP : 0)), Bv = vload(Bb + (VB ? t * NP : 0));
    const V gj = Cv * dy[t] + gr;  // dL/dh_t
    if (VC) vstore(dCb + t * NP, vload(dCb + t * NP) + Ht * dy[t]); else dCc += Ht * dy[t];
    if (VB) vstore(dBb + t * NP, vload(dBb + t * NP) + gj * dtu[t]); else dBc += gj * dtu[t];
    const V w = gj * At * hp;
    dAr += w * dt[t];
    vstore(QB + t * W, gj * Bv);
    vstore(QA + t * W, Ar * w);
    gr = At * gj;  // dL/dh_{t-1}
  }
  if (!VB) vstore(dBb, dBc);
  if (!VC) vstore(dCb, dCc);
}

template <class Acc>
void backward(const Params& p) {
  using V = Vec<Acc>;
  const Shape s(p);
  const GroupOperand gb{&p.Bm, p.b_groups, s.D / p.b_groups, p.b_var};
  const GroupOperand gc{&p.Cm, p.c_groups, s.D / p.c_groups, p.c_var};
  const Acc* A = reinterpret_cast<const Acc*>(p.A);
  const Acc* Dv = reinterpret_cast<const Acc*>(p.Dvec);
  const Acc* hs = reinterpret_cast<const Acc*>(p.hs);
  const int64_t R = s.Bsz * s.D;
  const int nt = int(std::max<int64_t>(1, std::min<int64_t>(p.nthreads, R)));
  std::vector<Partial<Acc>> pb(nt), pc(nt);
  auto reverse = gb.var ? (gc.var ? reverse_block<Acc, true, true> : reverse_block<Acc, true, false>)
                        : (gc.var ? reverse_block<Acc, false, true> : reverse_block<Acc, false, false>);

  parallel_for(nt, [&](int tid) {
    const int64_t r0 = R * tid / nt, r1 = R * (tid + 1) / nt;
    init_partial(s, gb, r0, r1, pb[tid]);
    init_partial(s, gc, r0, r1, pc[tid]);
    const int64_t T = s.T, NP = s.NP;
    RowChunk<Acc> rc(T);
    const int64_t TP = rc.TP;
    std::vector<Acc> Bt(T * NP), Ct(T * NP), dBt(T * NP), dCt(T * NP), Apad(NP, Acc(0)), h0(NP, Acc(0));
    std::vector<Acc> H(T * W), Ab(T * W), QB(T * W), QA(T * W), dout(TP, Acc(0)), dy(TP, Acc(0)),
        rgb(TP, Acc(0)), rga(TP, Acc(0)), y(TP, Acc(0)), tmp(TP, Acc(0));
    std::vector<Acc> g, dAacc, dDacc, dbacc;
    const int64_t bts = gb.var ? NP : 0, cts = gc.var ? NP : 0;
    const bool has_z = p.z.ptr != 0;

    for_each_segment(s, gb, gc, r0, r1, [&](int64_t b, int64_t d0, int64_t nrows) {
      g.assign(nrows * NP, Acc(0));
      dAacc.assign(nrows * NP, Acc(0));
      dDacc.assign(nrows, Acc(0));
      dbacc.assign(nrows, Acc(0));
      if (p.dlast) {
        const Acc* dl = reinterpret_cast<const Acc*>(p.dlast) + (b * s.D + d0) * s.N;
        for (int64_t i = 0; i < nrows; ++i) std::copy(dl + i * s.N, dl + (i + 1) * s.N, &g[i * NP]);
      }
      for (int64_t c = s.nc - 1; c >= 0; --c) {
        const int64_t t0 = c * T, tl = std::min(T, s.L - t0);
        load_tile(s, gb, b, d0, t0, tl, Bt.data());
        load_tile(s, gc, b, d0, t0, tl, Ct.data());
        std::fill(dBt.begin(), dBt.end(), Acc(0));
        std::fill(dCt.begin(), dCt.end(), Acc(0));
        for (int64_t i = 0; i < nrows; ++i) {
          const int64_t d = d0 + i, row = b * s.D + d;
          std::copy(A + d * s.N, A + (d + 1) * s.N, Apad.data());
          std::copy(hs + (row * (s.nc + 1) + c) * s.N, hs + (row * (s.nc + 1) + c + 1) * s.N, h0.data());
          rc.load_inputs(p, b, d, t0, tl);
          load<Acc>(row_addr(p.dout, b, d, t0), p.dout.dtype, p.dout.sl, int(tl), dout.data());
          for (int64_t t = 0; t < tl; t += W) {
            V dyv = vload(&dout[t]);
            if (has_z) {
              const V zv = vload(&rc.z[t]);
              dyv = dyv * zv * vsigmoid<Acc>(zv);
            }
            vstore(&dy[t], dyv);
            vstore(&rgb[t], V{});
            vstore(&rga[t], V{});
            vstore(&y[t], V{});
          }
          for (int64_t nb = 0; nb < s.NB; ++nb) {
            const V Ar = vload(&Apad[nb * W]), Ar2 = Ar * Acc(kLog2e), hprev0 = vload(&h0[nb * W]);
            const Acc* Bb = Bt.data() + nb * W;
            const Acc* Cb = Ct.data() + nb * W;
            // Recompute the chunk's states h_t and decays exp(delta'_t A).
            V hr = hprev0;
            for (int64_t t = 0; t < tl; ++t) {
              const V a = vexp2(Ar2 * rc.dt[t]);
              hr = a * hr + vload(Bb + t * bts) * rc.dtu[t];
              vstore(&Ab[t * W], a);
              vstore(&H[t * W], hr);
              if (has_z) vstore(&QB[t * W], hr * vload(Cb + t * cts));
            }
            if (has_z) add_row_sums(QB.data(), tl, y.data());
            V gr = vload(&g[i * NP + nb * W]), dAr = vload(&dAacc[i * NP + nb * W]);
            reverse(tl, dy.data(), rc.dt.data(), rc.dtu.data(), Ar, hprev0, H.data(), Ab.data(), Bb, Cb,
                    dBt.data() + nb * W, dCt.data() + nb * W, gr, dAr, QB.data(), QA.data(), NP);
            add_row_sums(QB.data(), tl, rgb.data());
            add_row_sums(QA.data(), tl, rga.data());
            vstore(&g[i * NP + nb * W], gr);
            vstore(&dAacc[i * NP + nb * W], dAr);
          }
          // Per-time-step gradients of this row.
          const Acc dv = Dv ? Dv[d] : Acc(0);
          Acc sD = 0, sb = 0;
          for (int64_t t = 0; t < tl; ++t) sD += dy[t] * rc.u[t];
          if (has_z) {
            for (int64_t t = 0; t < tl; t += W) {
              const V zv = vload(&rc.z[t]), sg = vsigmoid<Acc>(zv);
              const V yv = vload(&y[t]) + vload(&rc.u[t]) * dv;
              vstore(&tmp[t], vload(&dout[t]) * yv * sg * (zv * (Acc(1) - sg) + Acc(1)));
            }
            store<Acc>(row_addr(p.dz, b, d, t0), p.dz.dtype, p.dz.sl, int(tl), tmp.data());
          }
          for (int64_t t = 0; t < tl; t += W)
            vstore(&tmp[t], vload(&dy[t]) * dv + vload(&rc.dt[t]) * vload(&rgb[t]));
          store<Acc>(row_addr(p.du, b, d, t0), p.du.dtype, p.du.sl, int(tl), tmp.data());
          for (int64_t t = 0; t < tl; t += W) {
            V dd = vload(&rc.u[t]) * vload(&rgb[t]) + vload(&rga[t]);  // dL/d delta'
            if (p.softplus) {
              const V xv = vload(&rc.x[t]);
              dd = xv > Acc(20) ? dd : dd * vsigmoid<Acc>(xv);
            }
            vstore(&tmp[t], dd);
          }
          for (int64_t t = 0; t < tl; ++t) sb += tmp[t];
          store<Acc>(row_addr(p.ddelta, b, d, t0), p.ddelta.dtype, p.ddelta.sl, int(tl), tmp.data());
          dDacc[i] += sD;
          dbacc[i] += sb;
        }
        flush_tile(s, gb, gb.key(b, d0), t0, tl, dBt.data(), pb[tid]);
        flush_tile(s, gc, gc.key(b, d0), t0, tl, dCt.data(), pc[tid]);
      }
      for (int64_t i = 0; i < nrows; ++i) {
        const int64_t row = b * s.D + d0 + i;
        if (p.dinit) std::copy(&g[i * NP], &g[i * NP] + s.N, reinterpret_cast<Acc*>(p.dinit) + row * s.N);
        std::copy(&dAacc[i * NP], &dAacc[i * NP] + s.N, reinterpret_cast<Acc*>(p.dA_rows) + row * s.N);
        if (p.dD_rows) reinterpret_cast<Acc*>(p.dD_rows)[row] = dDacc[i];
        if (p.dbias_rows) reinterpret_cast<Acc*>(p.dbias_rows)[row] = dbacc[i];
      }
    });
  });
  reduce_partials(s, gb, p.dB, pb, nt);
  reduce_partials(s, gc, p.dC, pc, nt);
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
#define DITK_FIELD(name) cls.def_readwrite(#name, &Params::name)
  DITK_FIELD(batch); DITK_FIELD(dim); DITK_FIELD(seqlen); DITK_FIELD(dstate); DITK_FIELD(chunk);
  DITK_FIELD(nthreads); DITK_FIELD(softplus); DITK_FIELD(acc);
  DITK_FIELD(u); DITK_FIELD(delta); DITK_FIELD(z); DITK_FIELD(out);
  DITK_FIELD(dout); DITK_FIELD(du); DITK_FIELD(ddelta); DITK_FIELD(dz);
  DITK_FIELD(Bm); DITK_FIELD(Cm); DITK_FIELD(b_groups); DITK_FIELD(c_groups); DITK_FIELD(b_var); DITK_FIELD(c_var);
  DITK_FIELD(A); DITK_FIELD(Dvec); DITK_FIELD(delta_bias); DITK_FIELD(init); DITK_FIELD(last); DITK_FIELD(hs);
  DITK_FIELD(dlast); DITK_FIELD(dA_rows); DITK_FIELD(dD_rows); DITK_FIELD(dbias_rows); DITK_FIELD(dinit);
  DITK_FIELD(dB); DITK_FIELD(dC);
#undef DITK_FIELD
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
