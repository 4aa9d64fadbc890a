// selective_scan.cuh - Mamba's selective scan (docs/spec.md §4), forward and backward, as CUDA device code.
//
// Written once against simt/simt.h: compiled by nvcc (csrc/cuda/selective_scan.cu) and by g++ against the
// SIMT emulation (csrc/emu/selective_scan_emu.cpp), where the tests run it against the float64 reference.
//
//   delta'_t = softplus(delta_t + bias) or delta_t + bias,   a_t = exp(delta'_t A_n),  b_t = delta'_t B_t u_t
//   h_t = a_t h_{t-1} + b_t,   y_t = sum_n C_t h_t + D u_t,   out_t = y_t * silu(z_t)
//
// ---------------------------------------------------------------------------------------------- design
// As mamba-ssm: one block per (batch, channel) row; the row is processed in chunks of kThreads * kItems
// time steps, thread i holding the kItems consecutive steps [i * kItems, (i + 1) * kItems) of the chunk
// in registers (u, delta', the output accumulator). For every state n (a runtime loop: N <= 256 costs no
// registers) the block builds its pairs (a_t, b_t), composes them per thread, and runs the hand-written
// block scan with carry of block_scan.cuh (warp shuffles + one shared-memory pass over the warps, two
// __syncthreads; the backward also runs it in reverse thread order). The carry of state n
// across chunks is the chunk-boundary state itself: warp 0 reads hs[c][n] and writes hs[c + 1][n], so the
// forward saves the (batch, dim, nchunks + 1, N) boundary states the backward needs for free.
//
// Backward: one block per (batch, cpb consecutive channels), chunks in reverse order. Per chunk and state n
// it (1) recomputes h_t from hs[c][n] with the same forward block scan, (2) runs the reverse block scan of
// the pairs (a_t, a_t * dy_t C_t) whose value s_t = dL/dh_{t-1} (through h_t) gives r_t = dL/dh_t =
// dy_t C_t + s_{t+1}, carried across chunks in dinit[n] (which ends as the gradient of h0), and (3) forms
// du, ddelta (registers, summed over n), dA (warp reduction, per-warp shared accumulators), dB / dC.
// Nothing of size (batch, dim, L, N) exists.
//
// Determinism: no atomics. Per-row results (dA, dD, d bias, constant dB / dC) go to (batch, dim, ...)
// buffers that the launcher sums over the batch in a fixed order. Variable dB / dC, shared by the channels
// of a group, are accumulated by the block over its cpb channels with plain read-modify-write (the same
// thread owns the same time steps for every channel), into a (batch, dim / cpb, N, L) buffer the launcher
// sums over the channel blocks of each group. cpb trades that workspace against the number of blocks.
//
// Launch bounds (kThreads, 1): without the minimum-blocks hint ptxas caps these kernels at 128 registers
// on sm_90a and spills; with it they take up to ~170 registers (3 blocks of 128 threads per SM).
//
// Loads are scalar with any strides (a warp's accesses cover 32 * kItems consecutive elements: coalesced
// through L1, though not one 128-byte transaction per instruction as mamba-ssm's BlockLoad).
#pragma once

#include <math.h>

#include <stdexcept>
#include <string>

#include "kernels/block_scan.cuh"
#include "kernels/selective_scan_args.cuh"
#include "simt/simt.h"

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

namespace dk {
namespace sscan {

// 16-bit storage types with torch's layout (the emulation has no __half).
struct f16 {
  uint16_t bits;
};
struct bf16 {
  uint16_t bits;
};

#if !defined(__CUDACC__)
inline float half_bits_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0) {
    const float v = float(man) * 5.9604644775390625e-8f;  // man * 2^-24, exact
    return sign ? -v : v;
  }
  if (exp == 31) return __int_as_float(int(sign | 0x7f800000u | (man << 13)));
  return __int_as_float(int(sign | ((exp + 112u) << 23) | (man << 13)));
}
inline uint16_t float_to_half_bits(float f) {  // round to nearest even
  uint32_t u = uint32_t(__float_as_int(f));
  const uint16_t sign = uint16_t((u >> 16) & 0x8000u);
  u &= 0x7fffffffu;
  if (u > 0x7f800000u) return uint16_t(sign | 0x7e00u);    // NaN
  if (u >= 0x47800000u) return uint16_t(sign | 0x7c00u);   // >= 65536: inf
  if (u < 0x38800000u) {                                   // below 2^-14: subnormal half (or 0)
    const float r = nearbyintf(fabsf(f) * 16777216.0f);   // |f| * 2^24, exact; rounds to nearest even
    return uint16_t(sign | uint16_t(r));
  }
  uint32_t h = (((u >> 23) - 112u) << 10) | ((u & 0x7fffffu) >> 13);
  const uint32_t rem = u & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;  // may carry into the exponent (up to inf)
  return uint16_t(sign | h);
}
#endif

DK_DEVICE float to_float(float x) { return x; }
DK_DEVICE float to_float(f16 x) {
#if defined(__CUDACC__)
  return __half2float(__ushort_as_half(x.bits));
#else
  return half_bits_to_float(x.bits);
#endif
}
DK_DEVICE float to_float(bf16 x) { return __int_as_float(int(uint32_t(x.bits) << 16)); }

template <class T>
DK_DEVICE T from_float(float x);
template <>
DK_DEVICE float from_float<float>(float x) {
  return x;
}
template <>
DK_DEVICE f16 from_float<f16>(float x) {
#if defined(__CUDACC__)
  return f16{__half_as_ushort(__float2half_rn(x))};
#else
  return f16{float_to_half_bits(x)};
#endif
}
template <>
DK_DEVICE bf16 from_float<bf16>(float x) {  // round to nearest even, NaN stays NaN
  uint32_t u = uint32_t(__float_as_int(x));
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16{uint16_t((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16{uint16_t(u >> 16)};
}

template <class T>
DK_DEVICE float ld(int64_t base, int64_t idx) {
  return to_float(reinterpret_cast<const T*>(base)[idx]);
}
template <class T>
DK_DEVICE void st(int64_t base, int64_t idx, float v) {
  reinterpret_cast<T*>(base)[idx] = from_float<T>(v);
}

DK_DEVICE float softplus(float x) { return x <= 20.f ? log1pf(expf(x)) : x; }
DK_DEVICE float sigmoid(float x) { return 1.f / (1.f + expf(-x)); }

DK_DEVICE float warp_sum(float v) {
  DK_UNROLL
  for (int off = 16; off >= 1; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// u_t and delta'_t = softplus(delta_t + bias) (or delta_t + bias) at step t of a row, both 0 past the end
// (then a = 1, b = 0: the identity pair). The backward recomputes the forward's values with it.
template <class T>
DK_DEVICE void load_u_delta(const SelectiveScanArgs& p, int64_t u_base, int64_t dl_base, float bias, bool softplus_on,
                            int64_t t, int64_t L, float& u, float& dt) {
  const bool in = t < L;
  u = in ? ld<T>(u_base, t * p.u_sl) : 0.f;
  const float x = in ? ld<T>(dl_base, t * p.delta_sl) + bias : 0.f;
  dt = in ? (softplus_on ? softplus(x) : x) : 0.f;
}

// Row-invariant addressing of B or C for (batch b, channel d).
struct BCView {
  int64_t base, sn, sl;
  bool var;
};
template <class T>
DK_DEVICE float bc_load(const BCView& v, int64_t n, int64_t t) {
  return v.var ? ld<T>(v.base, n * v.sn + t * v.sl) : ld<float>(v.base, n * v.sn);
}
DK_DEVICE BCView bc_view(const SelectiveScanArgs& p, bool c_operand, int64_t b, int64_t d, int64_t elem) {
  const bool var = c_operand ? p.c_var != 0 : p.b_var != 0;
  const int64_t ptr = c_operand ? p.Cm : p.Bm, span = c_operand ? p.c_span : p.b_span;
  const int64_t sb = c_operand ? p.C_sb : p.B_sb, sg = c_operand ? p.C_sg : p.B_sg;
  const int64_t esize = var ? elem : 4;
  return BCView{ptr + (b * sb + (d / span) * sg) * esize, c_operand ? p.C_sn : p.B_sn, c_operand ? p.C_sl : p.B_sl,
                var};
}

// A variable dB / dC partial at one (state, step): the block's first channel writes it, the others add (the
// thread owns the same steps for every channel of the block, so no other thread touches it).
DK_DEVICE void add_partial(float* q, bool first, float g) { *q = first ? g : *q + g; }

// ------------------------------------------------------------------------------------------------ forward
template <int kThreads, int kItems, class T>
DK_GLOBAL DK_LAUNCH_BOUNDS(kThreads, 1) selective_scan_fwd_kernel(SelectiveScanArgs p) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "whole warps");
  constexpr int kWarps = kThreads / 32;
  constexpr int kChunk = kThreads * kItems;
  DK_SHARED_ARRAY(float, s_a, kWarps);
  DK_SHARED_ARRAY(float, s_b, kWarps);
  DK_SHARED_ARRAY(float, s_in, kWarps);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t d = blockIdx.x, b = blockIdx.y;
  const int64_t L = p.seqlen, N = p.dstate, row = b * p.dim + d;
  const int64_t nc = (L + kChunk - 1) / kChunk;
  const int64_t es = int64_t(sizeof(T));
  const int64_t u_base = p.u + (b * p.u_sb + d * p.u_sd) * es;
  const int64_t dl_base = p.delta + (b * p.delta_sb + d * p.delta_sd) * es;
  const int64_t z_base = p.z ? p.z + (b * p.z_sb + d * p.z_sd) * es : 0;
  const int64_t o_base = p.out + (b * p.out_sb + d * p.out_sd) * es;
  const int64_t A_base = p.A + d * p.A_sd * 4;
  const BCView Bv = bc_view(p, false, b, d, es), Cv = bc_view(p, true, b, d, es);
  const float bias = p.delta_bias ? ld<float>(p.delta_bias, d) : 0.f;
  const float Dd = p.Dv ? ld<float>(p.Dv, d) : 0.f;
  float* hs = reinterpret_cast<float*>(p.hs) + row * (nc + 1) * N;
  const bool softplus_on = p.softplus != 0;

  for (int64_t c = 0; c < nc; ++c) {
    const int64_t t0 = c * kChunk + int64_t(tid) * kItems;
    float uv[kItems], dt[kItems], y[kItems];
    DK_UNROLL
    for (int j = 0; j < kItems; ++j) {
      load_u_delta<T>(p, u_base, dl_base, bias, softplus_on, t0 + j, L, uv[j], dt[j]);
      y[j] = 0.f;
    }
    for (int64_t n = 0; n < N; ++n) {
      const float An = ld<float>(A_base, n * p.A_sn);
      float a[kItems], bb[kItems];
      DK_UNROLL
      for (int j = 0; j < kItems; ++j) {
        const int64_t t = t0 + j;
        const float Bt = t < L ? bc_load<T>(Bv, n, t) : 0.f;
        a[j] = expf(dt[j] * An);
        bb[j] = dt[j] * uv[j] * Bt;
      }
      float PA = a[0], PB = bb[0];
      DK_UNROLL
      for (int j = 1; j < kItems; ++j) dk::scan::compose(PA, PB, a[j], bb[j]);
      float carry = 0.f;
      if (warp == 0) {
        if (c == 0) {
          carry = p.h0 ? ld<float>(p.h0, row * N + n) : 0.f;
          if (lane == 0) hs[n] = carry;
        } else {
          carry = hs[c * N + n];
        }
      }
      float h = dk::scan::block_scan_carry<kWarps, false>(PA, PB, carry, s_a, s_b, s_in, lane, warp);
      if (warp == 0 && lane == 0) {
        hs[(c + 1) * N + n] = carry;
        if (c == nc - 1 && p.last) reinterpret_cast<float*>(p.last)[row * N + n] = carry;
      }
      DK_UNROLL
      for (int j = 0; j < kItems; ++j) {
        const int64_t t = t0 + j;
        const float Ct = t < L ? bc_load<T>(Cv, n, t) : 0.f;
        h = a[j] * h + bb[j];
        y[j] += h * Ct;
      }
    }
    DK_UNROLL
    for (int j = 0; j < kItems; ++j) {
      const int64_t t = t0 + j;
      if (t < L) {
        float o = y[j] + Dd * uv[j];
        if (z_base) {
          const float zt = ld<T>(z_base, t * p.z_sl);
          o *= zt * sigmoid(zt);
        }
        st<T>(o_base, t * p.out_sl, o);
      }
    }
  }
}

// ----------------------------------------------------------------------------------------------- backward
constexpr int kMaxDstate = 256;

template <int kThreads, int kItems, class T>
DK_GLOBAL DK_LAUNCH_BOUNDS(kThreads, 1) selective_scan_bwd_kernel(SelectiveScanArgs p) {
  static_assert(kThreads % 32 == 0 && kThreads <= 1024, "whole warps");
  constexpr int kWarps = kThreads / 32;
  constexpr int kChunk = kThreads * kItems;
  DK_SHARED_ARRAY(float, s_a, kWarps);  // forward scan
  DK_SHARED_ARRAY(float, s_b, kWarps);
  DK_SHARED_ARRAY(float, s_in, kWarps);
  DK_SHARED_ARRAY(float, r_a, kWarps);  // reverse scan
  DK_SHARED_ARRAY(float, r_b, kWarps);
  DK_SHARED_ARRAY(float, r_in, kWarps);
  DK_SHARED_ARRAY(float, s_red, 2 * kWarps);  // dD / d bias block reduction
  // Per-warp partial sums over the row's time steps, [n][warp]: dA, constant dB, constant dC.
  DK_SHARED_ARRAY(float, acc_dA, kMaxDstate * kWarps);
  DK_SHARED_ARRAY(float, acc_dB, kMaxDstate * kWarps);
  DK_SHARED_ARRAY(float, acc_dC, kMaxDstate * kWarps);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t b = blockIdx.y, k = blockIdx.x;
  const int64_t L = p.seqlen, N = p.dstate;
  const int64_t nc = (L + kChunk - 1) / kChunk;
  const int64_t es = int64_t(sizeof(T));
  const bool softplus_on = p.softplus != 0, has_z = p.z != 0;
  const bool b_var = p.b_var != 0, c_var = p.c_var != 0;
  float* dinit_all = reinterpret_cast<float*>(p.dinit);
  float* dB = reinterpret_cast<float*>(p.dB);
  float* dC = reinterpret_cast<float*>(p.dC);

  for (int64_t ci = 0; ci < p.cpb; ++ci) {
    const int64_t d = k * p.cpb + ci, row = b * p.dim + d;
    const int64_t u_base = p.u + (b * p.u_sb + d * p.u_sd) * es;
    const int64_t dl_base = p.delta + (b * p.delta_sb + d * p.delta_sd) * es;
    const int64_t z_base = has_z ? p.z + (b * p.z_sb + d * p.z_sd) * es : 0;
    const int64_t do_base = p.dout + (b * p.dout_sb + d * p.dout_sd) * es;
    const int64_t du_base = p.du + (b * p.du_sb + d * p.du_sd) * es;
    const int64_t dd_base = p.ddelta + (b * p.ddelta_sb + d * p.ddelta_sd) * es;
    const int64_t dz_base = has_z ? p.dz + (b * p.dz_sb + d * p.dz_sd) * es : 0;
    const int64_t A_base = p.A + d * p.A_sd * 4;
    const BCView Bv = bc_view(p, false, b, d, es), Cv = bc_view(p, true, b, d, es);
    const float bias = p.delta_bias ? ld<float>(p.delta_bias, d) : 0.f;
    const float Dd = p.Dv ? ld<float>(p.Dv, d) : 0.f;
    const float* hs = reinterpret_cast<const float*>(p.hs) + row * (nc + 1) * N;
    float* dinit = dinit_all + row * N;  // reverse-scan carry: dL/dh at the chunk boundary
    // variable dB / dC: this block's partial at (b, k); the first channel writes, the others add
    float* dBk = b_var ? dB + b * p.dB_sb + k * p.dB_sk : nullptr;
    float* dCk = c_var ? dC + b * p.dC_sb + k * p.dC_sk : nullptr;
    const bool first = ci == 0;

    __syncthreads();  // the previous row's final reads of the accumulators are done
    for (int64_t i = tid; i < N; i += kThreads) {
      dinit[i] = p.dlast ? ld<float>(p.dlast, row * N + i) : 0.f;
      DK_UNROLL
      for (int w = 0; w < kWarps; ++w) acc_dA[i * kWarps + w] = acc_dB[i * kWarps + w] = acc_dC[i * kWarps + w] = 0.f;
    }
    __syncthreads();

    float dD_part = 0.f, dbias_part = 0.f;
    for (int64_t c = nc - 1; c >= 0; --c) {
      const int64_t t0 = c * kChunk + int64_t(tid) * kItems;
      float uv[kItems], dt[kItems], dy[kItems], du[kItems], ddt[kItems], y[kItems];
      DK_UNROLL
      for (int j = 0; j < kItems; ++j) {
        const int64_t t = t0 + j;
        const bool in = t < L;
        load_u_delta<T>(p, u_base, dl_base, bias, softplus_on, t, L, uv[j], dt[j]);
        float g = in ? ld<T>(do_base, t * p.dout_sl) : 0.f;
        if (has_z && in) {
          const float zt = ld<T>(z_base, t * p.z_sl);
          g *= zt * sigmoid(zt);
        }
        dy[j] = g;  // dL/dy_t; 0 past the end
        du[j] = ddt[j] = y[j] = 0.f;
      }
      for (int64_t n = 0; n < N; ++n) {
        const float An = ld<float>(A_base, n * p.A_sn);
        float a[kItems], hp[kItems], Bt[kItems], Ct[kItems];
        DK_UNROLL
        for (int j = 0; j < kItems; ++j) {
          const int64_t t = t0 + j;
          const bool in = t < L;
          Bt[j] = in ? bc_load<T>(Bv, n, t) : 0.f;
          Ct[j] = in ? bc_load<T>(Cv, n, t) : 0.f;
          a[j] = expf(dt[j] * An);
        }
        // (1) recompute h_t from the saved boundary state
        float PA = a[0], PB = dt[0] * uv[0] * Bt[0];
        DK_UNROLL
        for (int j = 1; j < kItems; ++j) dk::scan::compose(PA, PB, a[j], dt[j] * uv[j] * Bt[j]);
        float carry = warp == 0 ? hs[c * N + n] : 0.f;
        float h = dk::scan::block_scan_carry<kWarps, false>(PA, PB, carry, s_a, s_b, s_in, lane, warp);
        float dC_sum = 0.f;
        DK_UNROLL
        for (int j = 0; j < kItems; ++j) {
          hp[j] = h;  // h_{t-1}
          h = a[j] * h + dt[j] * uv[j] * Bt[j];
          y[j] += h * Ct[j];
          const float g = dy[j] * h;  // dL/dC_t
          if (!c_var) dC_sum += g;
          else if (t0 + j < L) add_partial(dCk + n * p.dC_sn + (t0 + j) * p.dC_sl, first, g);
        }
        // (2) reverse scan of (a_t, a_t dy_t C_t): s_t = dL/dh_{t-1} through h_t
        PA = a[kItems - 1];
        PB = a[kItems - 1] * dy[kItems - 1] * Ct[kItems - 1];
        DK_UNROLL
        for (int j = kItems - 2; j >= 0; --j) dk::scan::compose(PA, PB, a[j], a[j] * dy[j] * Ct[j]);
        float rcarry = warp == 0 ? dinit[n] : 0.f;
        float s = dk::scan::block_scan_carry<kWarps, true>(PA, PB, rcarry, r_a, r_b, r_in, lane, warp);
        if (warp == 0 && lane == 0) dinit[n] = rcarry;
        // (3) gradients
        float dA_sum = 0.f, dB_sum = 0.f;
        DK_UNROLL
        for (int j = kItems - 1; j >= 0; --j) {
          const float r = dy[j] * Ct[j] + s;  // dL/dh_t
          const float w = r * a[j] * hp[j];   // dL/d(delta'_t A_n)
          dA_sum += w * dt[j];
          ddt[j] += w * An + r * Bt[j] * uv[j];
          du[j] += r * dt[j] * Bt[j];
          const float g = r * dt[j] * uv[j];  // dL/dB_t
          if (!b_var) dB_sum += g;
          else if (t0 + j < L) add_partial(dBk + n * p.dB_sn + (t0 + j) * p.dB_sl, first, g);
          s = a[j] * r;
        }
        dA_sum = warp_sum(dA_sum);
        if (!b_var) dB_sum = warp_sum(dB_sum);
        if (!c_var) dC_sum = warp_sum(dC_sum);
        if (lane == 0) {  // only lane 0 of warp `warp` touches column `warp`: no race
          acc_dA[n * kWarps + warp] += dA_sum;
          if (!b_var) acc_dB[n * kWarps + warp] += dB_sum;
          if (!c_var) acc_dC[n * kWarps + warp] += dC_sum;
        }
      }
      // per-step outputs of the chunk
      DK_UNROLL
      for (int j = 0; j < kItems; ++j) {
        const int64_t t = t0 + j;
        if (t < L) {
          dD_part += dy[j] * uv[j];
          st<T>(du_base, t * p.du_sl, du[j] + Dd * dy[j]);
          float gd = ddt[j];
          if (softplus_on) {
            const float x = ld<T>(dl_base, t * p.delta_sl) + bias;
            if (x <= 20.f) gd *= sigmoid(x);
          }
          dbias_part += gd;
          st<T>(dd_base, t * p.ddelta_sl, gd);
          if (has_z) {
            const float zt = ld<T>(z_base, t * p.z_sl), g = ld<T>(do_base, t * p.dout_sl);
            const float sg = sigmoid(zt);
            st<T>(dz_base, t * p.dz_sl, g * (y[j] + Dd * uv[j]) * sg * (1.f + zt * (1.f - sg)));
          }
        }
      }
    }
    // row results: per-row partials, summed over the batch by the launcher
    dD_part = warp_sum(dD_part);
    dbias_part = warp_sum(dbias_part);
    if (lane == 0) {
      s_red[warp] = dD_part;
      s_red[kWarps + warp] = dbias_part;
    }
    __syncthreads();
    if (tid == 0) {
      float sD = 0.f, sb = 0.f;
      for (int w = 0; w < kWarps; ++w) sD += s_red[w], sb += s_red[kWarps + w];
      if (p.dD_rows) reinterpret_cast<float*>(p.dD_rows)[row] = sD;
      if (p.dbias_rows) reinterpret_cast<float*>(p.dbias_rows)[row] = sb;
    }
    for (int64_t i = tid; i < N; i += kThreads) {
      float sA = 0.f, sB = 0.f, sC = 0.f;
      DK_UNROLL
      for (int w = 0; w < kWarps; ++w) {
        sA += acc_dA[i * kWarps + w];
        sB += acc_dB[i * kWarps + w];
        sC += acc_dC[i * kWarps + w];
      }
      reinterpret_cast<float*>(p.dA_rows)[row * N + i] = sA;
      if (!b_var) dB[b * p.dB_sb + d * p.dB_sk + i * p.dB_sn] = sB;
      if (!c_var) dC[b * p.dC_sb + d * p.dC_sk + i * p.dC_sn] = sC;
    }
  }
}

// ------------------------------------------------------------------------------------------- host side
inline void ss_require(bool ok, const std::string& msg) {
  if (!ok) throw std::invalid_argument("selective_scan: " + msg);
}

inline void ss_check_common(const SelectiveScanArgs& p) {
  ss_require(p.batch >= 1 && p.dim >= 1 && p.seqlen >= 1, "batch, dim and seqlen must be >= 1");
  ss_require(p.dstate >= 1 && p.dstate <= kMaxDstate, "dstate must be in [1, 256]");
  ss_require(p.batch <= 65535, "batch must be <= 65535 (grid y)");
  ss_require(p.dtype == kF32 || p.dtype == kF16 || p.dtype == kBF16, "dtype code must be 0 (f32), 2 (f16), 3 (bf16)");
  ss_require(p.u && p.delta && p.A && p.Bm && p.Cm && p.hs, "u, delta, A, B, C and hs are required");
  ss_require(p.b_span >= 1 && p.dim % p.b_span == 0 && p.c_span >= 1 && p.dim % p.c_span == 0,
             "b_span / c_span (channels per group) must divide dim");
  ss_require(p.b_var || p.b_span == 1, "a constant B has b_span 1");
  ss_require(p.c_var || p.c_span == 1, "a constant C has c_span 1");
}

inline void ss_config(const SelectiveScanArgs& p, int& threads, int& items) {
  threads = int(p.threads);
  items = int(p.items);
  if (threads == 0 && items == 0) selective_scan_default_config(p.seqlen, threads, items);
}

// Dispatch (threads, items, dtype) to `fn.template operator()<kThreads, kItems, T>()`.
template <class F>
inline void ss_dispatch(int threads, int items, int64_t dtype, const F& fn) {
#define DK_SS_DISPATCH(TT, II)                                 \
  if (threads == TT && items == II) {                          \
    if (dtype == kF32) fn.template operator()<TT, II, float>(); \
    else if (dtype == kF16) fn.template operator()<TT, II, f16>(); \
    else fn.template operator()<TT, II, bf16>();               \
    return;                                                    \
  }
  DK_SELECTIVE_SCAN_CONFIGS(DK_SS_DISPATCH)
#undef DK_SS_DISPATCH
  throw std::invalid_argument("selective_scan: no compiled configuration threads=" + std::to_string(threads) +
                              ", items=" + std::to_string(items));
}

struct FwdLauncher {
  const SelectiveScanArgs& p;
  dk::stream_t stream;
  template <int TT, int II, class T>
  void operator()() const {
    dk::launch(dim3(unsigned(p.dim), unsigned(p.batch)), dim3(TT), 0, stream, &selective_scan_fwd_kernel<TT, II, T>,
               p);
  }
};
struct BwdLauncher {
  const SelectiveScanArgs& p;
  dk::stream_t stream;
  template <int TT, int II, class T>
  void operator()() const {
    dk::launch(dim3(unsigned(p.dim / p.cpb), unsigned(p.batch)), dim3(TT), 0, stream,
               &selective_scan_bwd_kernel<TT, II, T>, p);
  }
};

// Forward: writes out, hs and (if given) last. Throws std::invalid_argument / std::runtime_error.
inline void selective_scan_fwd_launch(const SelectiveScanArgs& p, dk::stream_t stream) {
  ss_check_common(p);
  ss_require(p.out != 0, "out is required");
  ss_require(p.dim <= 2147483647, "dim too large");
  int threads, items;
  ss_config(p, threads, items);
  ss_dispatch(threads, items, p.dtype, FwdLauncher{p, stream});
}

// Backward from the forward's hs (same configuration). Writes du, ddelta, dz (when z), dinit, dA_rows,
// dD_rows / dbias_rows (when given), dB / dC partials.
inline void selective_scan_bwd_launch(const SelectiveScanArgs& p, dk::stream_t stream) {
  ss_check_common(p);
  ss_require(p.dout && p.du && p.ddelta && p.dinit && p.dA_rows && p.dB && p.dC, "missing a gradient buffer");
  ss_require(!p.z || p.dz, "dz is required with z");
  ss_require(p.cpb >= 1 && p.dim % p.cpb == 0, "cpb must divide dim");
  ss_require(!p.b_var || p.b_span % p.cpb == 0, "cpb must divide b_span for a variable B");
  ss_require(!p.c_var || p.c_span % p.cpb == 0, "cpb must divide c_span for a variable C");
  int threads, items;
  ss_config(p, threads, items);
  ss_dispatch(threads, items, p.dtype, BwdLauncher{p, stream});
}

}  // namespace sscan
}  // namespace dk
