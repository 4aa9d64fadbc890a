// ditkernels._emu: block_scan_carry (csrc/kernels/block_scan.cuh), the block scan of the selective scan, on
// its own for several warp counts and both directions (the selective scan compiles only some of them).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "kernels/block_scan.cuh"

namespace py = pybind11;

namespace {

// The warp counts tested: one warp, a count that is not a power of two, powers of two, and the full 32 warps
// (warp 0 then scans a pair in every lane).
#define DK_BLOCK_SCAN_TEST_WARPS 1, 2, 3, 4, 8, 32

// out[t] = h_t with h_t = a[t] h_{t-1} + b[t] and h_{-1} = h0 (reverse: h_t = a[t] h_{t+1} + b[t], h_L = h0),
// one time step per thread, the row in chunks of 32 * kWarps steps carried by block_scan_carry. In reverse
// the first chunk holds the last steps and thread i the step before thread i + 1's.
template <int kWarps, bool kRev>
DK_GLOBAL block_scan_kernel(const float* a, const float* b, float* out, int64_t L, float h0) {
  constexpr int kThreads = 32 * kWarps;
  DK_SHARED_ARRAY(float, s_a, kWarps);
  DK_SHARED_ARRAY(float, s_b, kWarps);
  DK_SHARED_ARRAY(float, s_in, kWarps);
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  float carry = h0;  // meaningful in warp 0 only
  for (int64_t base = 0; base < L; base += kThreads) {
    const int64_t t = kRev ? L - base - kThreads + tid : base + tid;
    const bool in = t >= 0 && t < L;
    const float at = in ? a[t] : 1.f, bt = in ? b[t] : 0.f;  // the identity pair outside the row
    const float h = dk::scan::block_scan_carry<kWarps, kRev>(at, bt, carry, s_a, s_b, s_in, lane, warp);
    if (in) out[t] = at * h + bt;
  }
}

template <int kWarps, int... kMore>
void launch_block_scan(int warps, bool reverse, const float* a, const float* b, float* out, int64_t L, float h0) {
  if (warps == kWarps) {
    auto kernel = reverse ? &block_scan_kernel<kWarps, true> : &block_scan_kernel<kWarps, false>;
    dk::launch(dim3(1), dim3(32 * kWarps), 0, nullptr, kernel, a, b, out, L, h0);
  } else if constexpr (sizeof...(kMore) > 0) {
    launch_block_scan<kMore...>(warps, reverse, a, b, out, L, h0);
  } else {
    throw std::invalid_argument("block_scan: no test kernel for warps=" + std::to_string(warps));
  }
}

}  // namespace

void register_block_scan_emu(py::module_& m) {
  m.def(
      "block_scan",
      [](uintptr_t a, uintptr_t b, uintptr_t out, int64_t L, float h0, int warps, bool reverse) {
        py::gil_scoped_release nogil;
        launch_block_scan<DK_BLOCK_SCAN_TEST_WARPS>(warps, reverse, reinterpret_cast<const float*>(a),
                                                    reinterpret_cast<const float*>(b), reinterpret_cast<float*>(out),
                                                    L, h0);
      },
      py::arg("a"), py::arg("b"), py::arg("out"), py::arg("L"), py::arg("h0"), py::arg("warps"), py::arg("reverse"),
      "out[t] = a[t] * out[t -/+ 1] + b[t] over L contiguous fp32 values (data pointers), starting from h0, by one\n"
      "block of `warps` warps (one of block_scan_warps()) scanning chunks of 32 * warps steps, forward or reverse.");
  m.def("block_scan_warps", [] { return std::vector<int>{DK_BLOCK_SCAN_TEST_WARPS}; });
}
