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
// Vectorisable elementary functions. float: Cephes-style polynomials (~1 ulp) written so that gcc
// vectorises loops calling them; double: libm (the float64 path is for exactness, not speed).

inline float vexp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  // Round x*log2(e) to the nearest integer with the 1.5*2^23 trick (no -ffast-math, so gcc keeps it).
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = std::fma(n, -0.693359375f, x);
  r = std::fma(n, 2.12194440e-4f, r);
  float p = 1.9875691500e-4f;
  p = std::fma(p, r, 1.3981999507e-3f);
  p = std::fma(p, r, 8.3334519073e-3f);
  p = std::fma(p, r, 4.1665795894e-2f);
  p = std::fma(p, r, 1.6666665459e-1f);
  p = std::fma(p, r, 5.0000001201e-1f);
  const float e = std::fma(p, r * r, r) + 1.0f;
  return e * float_of(uint32_t(int32_t(n) + 127) << 23);
}
inline double vexp(double x) { return std::exp(x); }

// log(x) for finite x >= 1 (used by softplus only).
inline float vlog_ge1(float x) {
  const uint32_t b = bits_of(x);
  float e = float(int32_t(b >> 23) - 126);
  float m = float_of((b & 0x007fffffu) | 0x3f000000u);  // mantissa in [0.5, 1)
  const bool small = m < 0.707106781186547524f;
  e = small ? e - 1.0f : e;
  m = small ? m + m - 1.0f : m - 1.0f;
  const float z = m * m;
  float y = 7.0376836292e-2f;
  y = std::fma(y, m, -1.1514610310e-1f);
  y = std::fma(y, m, 1.1676998740e-1f);
  y = std::fma(y, m, -1.2420140846e-1f);
  y = std::fma(y, m, 1.4249322787e-1f);
  y = std::fma(y, m, -1.6668057665e-1f);
  y = std::fma(y, m, 2.0000714765e-1f);
  y = std::fma(y, m, -2.4999993993e-1f);
  y = std::fma(y, m, 3.3333331174e-1f);
  y = y * m * z;
  y = std::fma(e, -2.12194440e-4f, y);
  y = std::fma(z, -0.5f, y);
  return std::fma(e, 0.693359375f, m + y);
}

// softplus with torch's threshold 20; log1p(e) = log(1+e) * e / ((1+e) - 1) keeps small e accurate.
inline float softplus(float x) {
  const float e = vexp(std::min(x, 20.0f));
  const float u = 1.0f + e;
  const float d = u - 1.0f;
  const float lp = d == 0.0f ? e : vlog_ge1(u) * (e / d);
  return x > 20.0f ? x : lp;
}
inline double softplus(double x) { return x > 20.0 ? x : std::log1p(std::exp(x)); }

template <class Acc>
inline Acc sigmoid(Acc x) {
  return Acc(1) / (Acc(1) + vexp(-x));
}

// Sum of 16 lanes as a fixed tree (deterministic, and gcc vectorises it without -ffast-math).
template <class Acc>
inline Acc hsum(const Acc* p) {
  Acc a[8];
  for (int j = 0; j < 8; ++j) a[j] = p[j] + p[j + 8];
  Acc b[4];
  for (int j = 0; j < 4; ++j) b[j] = a[j] + a[j + 4];
  return (b[0] + b[2]) + (b[1] + b[3]);
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

// One row, one chunk of the forward recurrence. h: (NP,) state in/out; y[t] = <h_t, C_t>.
template <class Acc>
void chunk_forward(const Shape& s, int64_t tl, const Acc* A, const Acc* dt, const Acc* dtu, const Acc* Bt,
                   int64_t bts, const Acc* Ct, int64_t cts, Acc* h, Acc* y) {
  for (int64_t t = 0; t < tl; ++t) y[t] = 0;
  for (int64_t nb = 0; nb < s.NB; ++nb) {
    Acc hr[W], Ar[W];
    for (int j = 0; j < W; ++j) hr[j] = h[nb * W + j], Ar[j] = A[nb * W + j];
    const Acc* Bb = Bt + nb * W;
    const Acc* Cb = Ct + nb * W;
    for (int64_t t = 0; t < tl; ++t) {
      const Acc dtv = dt[t], dtuv = dtu[t];
      const Acc* Bp = Bb + t * bts;
      const Acc* Cp = Cb + t * cts;
      Acc p[W];
      for (int j = 0; j < W; ++j) {
        hr[j] = std::fma(vexp(dtv * Ar[j]), hr[j], dtuv * Bp[j]);
        p[j] = hr[j] * Cp[j];
      }
      y[t] += hsum(p);
    }
    for (int j = 0; j < W; ++j) h[nb * W + j] = hr[j];
  }
}

// Per-row chunk inputs: u, delta' (after bias / softplus), delta' * u, and raw z.
template <class Acc>
struct RowChunk {
  std::vector<Acc> u, x, dt, dtu, z;
  explicit RowChunk(int64_t T) : u(T), x(T), dt(T), dtu(T), z(T) {}
  void load_inputs(const Params& p, int64_t b, int64_t d, int64_t t0, int64_t tl) {
    load<Acc>(row_addr(p.u, b, d, t0), p.u.dtype, p.u.sl, int(tl), u.data());
    load<Acc>(row_addr(p.delta, b, d, t0), p.delta.dtype, p.delta.sl, int(tl), x.data());
    if (p.z.ptr) load<Acc>(row_addr(p.z, b, d, t0), p.z.dtype, p.z.sl, int(tl), z.data());
    const Acc bias = p.delta_bias ? reinterpret_cast<const Acc*>(p.delta_bias)[d] : Acc(0);
    for (int64_t t = 0; t < tl; ++t) x[t] += bias;
    if (p.softplus) {
      for (int64_t t = 0; t < tl; ++t) dt[t] = softplus(x[t]);
    } else {
      for (int64_t t = 0; t < tl; ++t) dt[t] = x[t];
    }
    for (int64_t t = 0; t < tl; ++t) dtu[t] = dt[t] * u[t];
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
    std::vector<Acc> Bt(s.T * s.NP), Ct(s.T * s.NP), Apad(s.NP, Acc(0)), y(s.T), h;
    RowChunk<Acc> rc(s.T);
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
          std::copy(A + d * s.N, A + (d + 1) * s.N, Apad.data());
          rc.load_inputs(p, b, d, t0, tl);
          chunk_forward<Acc>(s, tl, Apad.data(), rc.dt.data(), rc.dtu.data(), Bt.data(), bts, Ct.data(), cts, hr,
                             y.data());
          const Acc dv = Dv ? Dv[d] : Acc(0);
          for (int64_t t = 0; t < tl; ++t) y[t] = std::fma(dv, rc.u[t], y[t]);
          if (p.z.ptr)
            for (int64_t t = 0; t < tl; ++t) y[t] *= rc.z[t] * sigmoid(rc.z[t]);
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

template <class Acc>
void backward(const Params& p) {
  const Shape s(p);
  const GroupOperand gb{&p.Bm, p.b_groups, s.D / p.b_groups, p.b_var};
  const GroupOperand gc{&p.Cm, p.c_groups, s.D / p.c_groups, p.c_var};
  const Acc* A = reinterpret_cast<const Acc*>(p.A);
  const Acc* Dv = reinterpret_cast<const Acc*>(p.Dvec);
  const Acc* hs = reinterpret_cast<const Acc*>(p.hs);
  const int64_t R = s.Bsz * s.D;
  const int nt = int(std::max<int64_t>(1, std::min<int64_t>(p.nthreads, R)));
  std::vector<Partial<Acc>> pb(nt), pc(nt);

  parallel_for(nt, [&](int tid) {
    const int64_t r0 = R * tid / nt, r1 = R * (tid + 1) / nt;
    init_partial(s, gb, r0, r1, pb[tid]);
    init_partial(s, gc, r0, r1, pc[tid]);
    const int64_t T = s.T, NP = s.NP;
    std::vector<Acc> Bt(T * NP), Ct(T * NP), dBt(T * NP), dCt(T * NP), Apad(NP, Acc(0));
    std::vector<Acc> H(T * W), Ab(T * W), dout(T), dy(T), rgb(T), rga(T), y(T), tmp(T);
    std::vector<Acc> g, dAacc, dDacc, dbacc;
    RowChunk<Acc> rc(T);
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
          rc.load_inputs(p, b, d, t0, tl);
          load<Acc>(row_addr(p.dout, b, d, t0), p.dout.dtype, p.dout.sl, int(tl), dout.data());
          if (has_z) {
            for (int64_t t = 0; t < tl; ++t) dy[t] = dout[t] * rc.z[t] * sigmoid(rc.z[t]);
          } else {
            for (int64_t t = 0; t < tl; ++t) dy[t] = dout[t];
          }
          for (int64_t t = 0; t < tl; ++t) rgb[t] = rga[t] = y[t] = 0;
          const Acc* h0 = hs + (row * (s.nc + 1) + c) * s.N;
          for (int64_t nb = 0; nb < s.NB; ++nb) {
            Acc hr[W], hprev0[W], Ar[W], gr[W], dAr[W];
            for (int j = 0; j < W; ++j) {
              const int64_t n = nb * W + j;
              hprev0[j] = hr[j] = n < s.N ? h0[n] : Acc(0);
              Ar[j] = Apad[n];
              gr[j] = g[i * NP + n];
              dAr[j] = dAacc[i * NP + n];
            }
            const Acc* Bb = Bt.data() + nb * W;
            const Acc* Cb = Ct.data() + nb * W;
            Acc* dBb = dBt.data() + nb * W;
            Acc* dCb = dCt.data() + nb * W;
            // Recompute the chunk's states h_t and decays exp(delta'_t A).
            for (int64_t t = 0; t < tl; ++t) {
              const Acc dtv = rc.dt[t], dtuv = rc.dtu[t];
              const Acc* Bp = Bb + t * bts;
              Acc* Ht = &H[t * W];
              Acc* At = &Ab[t * W];
              for (int j = 0; j < W; ++j) {
                At[j] = vexp(dtv * Ar[j]);
                hr[j] = std::fma(At[j], hr[j], dtuv * Bp[j]);
                Ht[j] = hr[j];
              }
              if (has_z) {
                const Acc* Cp = Cb + t * cts;
                Acc q[W];
                for (int j = 0; j < W; ++j) q[j] = Ht[j] * Cp[j];
                y[t] += hsum(q);
              }
            }
            // Reverse recurrence: g_t = dy_t C_t + exp(delta'_{t+1} A) g_{t+1}.
            for (int64_t t = tl - 1; t >= 0; --t) {
              const Acc dyv = dy[t], dtv = rc.dt[t], dtuv = rc.dtu[t];
              const Acc* Bp = Bb + t * bts;
              const Acc* Cp = Cb + t * cts;
              Acc* dBp = dBb + t * bts;
              Acc* dCp = dCb + t * cts;
              const Acc* Ht = &H[t * W];
              const Acc* At = &Ab[t * W];
              const Acc* hp = t > 0 ? &H[(t - 1) * W] : hprev0;
              Acc qb[W], qa[W];
              for (int j = 0; j < W; ++j) {
                const Acc gj = std::fma(dyv, Cp[j], gr[j]);
                dCp[j] = std::fma(dyv, Ht[j], dCp[j]);
                dBp[j] = std::fma(gj, dtuv, dBp[j]);
                const Acc w = gj * At[j] * hp[j];
                dAr[j] = std::fma(dtv, w, dAr[j]);
                qb[j] = gj * Bp[j];
                qa[j] = Ar[j] * w;
                gr[j] = At[j] * gj;
              }
              rgb[t] += hsum(qb);
              rga[t] += hsum(qa);
            }
            for (int j = 0; j < W; ++j) {
              g[i * NP + nb * W + j] = gr[j];
              dAacc[i * NP + nb * W + j] = dAr[j];
            }
          }
          // Per-time-step gradients of this row.
          const Acc dv = Dv ? Dv[d] : Acc(0);
          Acc sD = 0, sb = 0;
          for (int64_t t = 0; t < tl; ++t) sD = std::fma(dy[t], rc.u[t], sD);
          if (has_z) {
            for (int64_t t = 0; t < tl; ++t) {
              const Acc zt = rc.z[t], sg = sigmoid(zt);
              const Acc yt = std::fma(dv, rc.u[t], y[t]);
              tmp[t] = dout[t] * yt * sg * (Acc(1) + zt * (Acc(1) - sg));
            }
            store<Acc>(row_addr(p.dz, b, d, t0), p.dz.dtype, p.dz.sl, int(tl), tmp.data());
          }
          for (int64_t t = 0; t < tl; ++t) tmp[t] = std::fma(dy[t], dv, rc.dt[t] * rgb[t]);
          store<Acc>(row_addr(p.du, b, d, t0), p.du.dtype, p.du.sl, int(tl), tmp.data());
          for (int64_t t = 0; t < tl; ++t) tmp[t] = std::fma(rc.u[t], rgb[t], rga[t]);
          if (p.softplus)
            for (int64_t t = 0; t < tl; ++t) tmp[t] = rc.x[t] > Acc(20) ? tmp[t] : tmp[t] * sigmoid(rc.x[t]);
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
