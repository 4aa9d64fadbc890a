// Runs the selective scan's forward and backward (float32, every configuration) through the SIMT emulation;
// built with -fsanitize=thread by tests/test_simt_emu.py so that a missing barrier in the device code (a
// shared-memory data race) is reported even when it happens not to change the result. The forward is also
// checked against a float64 recurrence, the backward for writing every gradient (the values are checked by
// tests/test_selective_scan_cuda.py). Variable grouped B (the dB partials two channels of a backward
// block share) and constant C (the per-warp shared accumulators).
#include <cmath>
#include <cstdio>
#include <vector>

#include "kernels/selective_scan.cuh"

namespace {

constexpr int64_t kDim = 2, kN = 3, kCpb = 2;

bool all_finite(const std::vector<float>& v) {
  for (float x : v)
    if (!std::isfinite(x)) return false;
  return true;
}

int64_t addr(const std::vector<float>& v) { return int64_t(reinterpret_cast<uintptr_t>(v.data())); }

// 0 when the run is clean, else 1 (after printing what went wrong). The float32 kernels only (launched as the
// launchers do, without their argument checks): the other dtypes share every shared-memory access.
template <int threads, int items>
int run() {
  const int64_t L = threads * items + 5, nc = (L + threads * items - 1) / (threads * items);
  const float nan = NAN;
  std::vector<float> u(kDim * L), delta(kDim * L), z(kDim * L), dout(kDim * L), B(kN * L), C(kDim * kN),
      A(kDim * kN), D(kDim), bias(kDim), h0(kDim * kN), dlast(kDim * kN);
  for (int64_t i = 0; i < kDim * L; ++i) {
    u[i] = std::sin(0.37f * i), delta[i] = 0.02f + 0.5f * float(i % 11) / 11.f;
    z[i] = std::cos(0.13f * i), dout[i] = std::sin(0.71f * i + 1.f);
  }
  for (int64_t i = 0; i < kN * L; ++i) B[i] = std::cos(0.11f * i);
  for (int64_t i = 0; i < kDim * kN; ++i) {
    A[i] = -(0.5f + 0.2f * float(i % 5)), C[i] = 0.5f + 0.1f * float(i % 4);
    h0[i] = 0.3f * float(i % 3) - 0.2f, dlast[i] = 0.1f * float(i % 4);
  }
  for (int64_t d = 0; d < kDim; ++d) D[d] = 0.5f - 0.25f * d, bias[d] = 0.05f * d;
  std::vector<float> out(kDim * L, nan), last(kDim * kN, nan), hs(kDim * (nc + 1) * kN, nan);
  std::vector<float> du(kDim * L, nan), ddelta(kDim * L, nan), dz(kDim * L, nan), dinit(kDim * kN, nan),
      dA(kDim * kN, nan), dD(kDim, nan), dbias(kDim, nan), dB(kDim / kCpb * kN * L, nan), dC(kDim * kN, nan);

  dk::sscan::SelectiveScanArgs p;  // batch 1; (dim, L) operands contiguous
  p.batch = 1, p.dim = kDim, p.seqlen = L, p.dstate = kN, p.dtype = dk::sscan::kF32;
  p.threads = threads, p.items = items, p.cpb = kCpb, p.softplus = 1;
  auto seq = [&](int64_t& ptr, int64_t& sb, int64_t& sd, int64_t& sl, const std::vector<float>& v) {
    ptr = addr(v), sb = kDim * L, sd = L, sl = 1;
  };
  seq(p.u, p.u_sb, p.u_sd, p.u_sl, u);
  seq(p.delta, p.delta_sb, p.delta_sd, p.delta_sl, delta);
  seq(p.z, p.z_sb, p.z_sd, p.z_sl, z);
  seq(p.out, p.out_sb, p.out_sd, p.out_sl, out);
  seq(p.dout, p.dout_sb, p.dout_sd, p.dout_sl, dout);
  seq(p.du, p.du_sb, p.du_sd, p.du_sl, du);
  seq(p.ddelta, p.ddelta_sb, p.ddelta_sd, p.ddelta_sl, ddelta);
  seq(p.dz, p.dz_sb, p.dz_sd, p.dz_sl, dz);
  p.A = addr(A), p.A_sd = kN, p.A_sn = 1;
  p.b_var = 1, p.Bm = addr(B), p.B_sb = p.B_sg = kN * L, p.B_sn = L, p.B_sl = 1, p.b_span = kDim;  // one group
  p.c_var = 0, p.Cm = addr(C), p.C_sg = kN, p.C_sn = 1, p.c_span = 1;                              // (dim, N)
  p.Dv = addr(D), p.delta_bias = addr(bias), p.h0 = addr(h0), p.last = addr(last), p.hs = addr(hs);
  p.dlast = addr(dlast), p.dinit = addr(dinit), p.dA_rows = addr(dA), p.dD_rows = addr(dD);
  p.dbias_rows = addr(dbias);
  p.dB = addr(dB), p.dB_sb = kDim / kCpb * kN * L, p.dB_sk = kN * L, p.dB_sn = L, p.dB_sl = 1;
  p.dC = addr(dC), p.dC_sb = kDim * kN, p.dC_sk = kN, p.dC_sn = 1;
  dk::sscan::FwdLauncher{p, nullptr}.operator()<threads, items, float>();
  dk::sscan::BwdLauncher{p, nullptr}.operator()<threads, items, float>();

  double num = 0, den = 0;
  for (int64_t d = 0; d < kDim; ++d) {
    std::vector<double> h(h0.begin() + d * kN, h0.begin() + (d + 1) * kN);
    for (int64_t t = 0; t < L; ++t) {
      const double x = double(delta[d * L + t]) + bias[d], dt = x <= 20 ? std::log1p(std::exp(x)) : x;
      const double ut = u[d * L + t], zt = z[d * L + t];
      double y = D[d] * ut;
      for (int64_t n = 0; n < kN; ++n) {
        h[n] = std::exp(dt * A[d * kN + n]) * h[n] + dt * B[n * L + t] * ut;
        y += C[d * kN + n] * h[n];
      }
      const double o = y * zt / (1 + std::exp(-zt)), e = out[d * L + t] - o;
      num += e * e, den += o * o;
    }
    for (int64_t n = 0; n < kN; ++n) {
      const double e = last[d * kN + n] - h[n];
      num += e * e, den += h[n] * h[n];
    }
  }
  const bool fwd_ok = std::sqrt(num / den) <= 1e-5;
  const bool bwd_ok = all_finite(du) && all_finite(ddelta) && all_finite(dz) && all_finite(dinit) &&
                      all_finite(dA) && all_finite(dD) && all_finite(dbias) && all_finite(dB) && all_finite(dC);
  if (!fwd_ok) std::printf("config %d x %d: wrong forward\n", threads, items);
  if (!bwd_ok) std::printf("config %d x %d: the backward left a gradient unwritten\n", threads, items);
  return fwd_ok && bwd_ok ? 0 : 1;
}

}  // namespace

int main() {
  int failures = 0;
#define DK_RUN(T, I) failures += run<T, I>();
  DK_SELECTIVE_SCAN_CONFIGS(DK_RUN)
#undef DK_RUN
  std::printf("%s\n", failures ? "FAILED" : "OK");
  return failures ? 1 : 0;
}
