// Runs every scan_pairs configuration through the SIMT emulation; built with -fsanitize=thread by
// tests/test_simt_emu.py so that a missing barrier in the device code (a shared-memory data race)
// is reported even when it happens not to change the result.
#include <cmath>
#include <cstdio>
#include <vector>

#include "kernels/scan_pairs.cuh"

int main() {
  int failures = 0;
#define DK_RUN(T, I)                                                                                \
  {                                                                                                 \
    const int64_t rows = 2, L = 2 * T * I + 5;                                                      \
    std::vector<float> a(rows * L), b(rows * L), out(rows * L, NAN), h0{0.5f, -1.0f};               \
    for (int64_t i = 0; i < rows * L; ++i) a[i] = 0.9f + 0.05f * float(i % 3), b[i] = float(i % 7) - 3.f; \
    dk::scan::ScanPairsArgs x{a.data(), b.data(), out.data(), h0.data(), rows, L, L, 1, L, 1, L, 1, 1}; \
    dk::scan::scan_pairs_launch(x, T, I, nullptr);                                                  \
    for (int64_t r = 0; r < rows; ++r) {                                                            \
      double h = h0[r], num = 0, den = 0;                                                           \
      for (int64_t t = 0; t < L; ++t) {                                                             \
        h = double(a[r * L + t]) * h + b[r * L + t];                                                \
        num += (out[r * L + t] - h) * (out[r * L + t] - h), den += h * h;                           \
      }                                                                                             \
      if (!(std::sqrt(num / den) <= 1e-5)) ++failures, std::printf("config %d x %d: wrong result\n", T, I); \
    }                                                                                               \
  }
  DK_SCAN_PAIRS_CONFIGS(DK_RUN)
  std::printf("%s\n", failures ? "FAILED" : "OK");
  return failures ? 1 : 0;
}
