// ditkernels._emu: CUDA device code of csrc/kernels run on the CPU through the SIMT emulation
// (csrc/simt/emu.h). Same source as the nvcc build; launches are synchronous and release the GIL.
#include <pybind11/pybind11.h>

#include "kernels/scan_pairs.cuh"

namespace py = pybind11;

void register_emu_selftest(py::module_& m);  // csrc/emu/simt_selftest.cpp
void register_selective_scan_emu(py::module_& m);  // csrc/emu/selective_scan_emu.cpp

namespace {

dk::emu::Config make_config(int concurrent_blocks, double timeout_s) {
  dk::emu::Config c;
  c.concurrent_blocks = concurrent_blocks;
  c.timeout_s = timeout_s;
  return c;
}

template <class T>
T* ptr(uintptr_t p) {
  return reinterpret_cast<T*>(p);
}

}  // namespace

void register_emu(py::module_& m) {
  m.def(
      "scan_pairs",
      [](uintptr_t a, uintptr_t b, uintptr_t out, uintptr_t h0, int64_t rows, int64_t L, py::tuple a_strides,
         py::tuple b_strides, py::tuple out_strides, int64_t h0_stride, int threads, int items,
         int concurrent_blocks, double timeout_s) {
        dk::scan::ScanPairsArgs x{ptr<const float>(a), ptr<const float>(b), ptr<float>(out), ptr<const float>(h0),
                                  rows, L,
                                  a_strides[0].cast<int64_t>(), a_strides[1].cast<int64_t>(),
                                  b_strides[0].cast<int64_t>(), b_strides[1].cast<int64_t>(),
                                  out_strides[0].cast<int64_t>(), out_strides[1].cast<int64_t>(), h0_stride};
        py::gil_scoped_release nogil;
        dk::emu::ScopedConfig cfg(make_config(concurrent_blocks, timeout_s));
        dk::scan::scan_pairs_launch(x, threads, items, nullptr);
      },
      py::arg("a"), py::arg("b"), py::arg("out"), py::arg("h0"), py::arg("rows"), py::arg("L"),
      py::arg("a_strides"), py::arg("b_strides"), py::arg("out_strides"), py::arg("h0_stride") = 1,
      py::arg("threads") = 0, py::arg("items") = 0, py::arg("concurrent_blocks") = 0, py::arg("timeout_s") = 0.0,
      "h[r, t] = a[r, t] * h[r, t-1] + b[r, t] (fp32), h[r, -1] = h0[r * h0_stride] (0 if h0 == 0).\n"
      "a, b, out, h0: data pointers (int); *_strides: (row stride, t stride) in elements.\n"
      "threads = items = 0 picks the configuration from L; see scan_pairs_configs().");
  m.def("scan_pairs_configs", [] {
    py::list l;
#define DK_X(T, I) l.append(py::make_tuple(T, I));
    DK_SCAN_PAIRS_CONFIGS(DK_X)
#undef DK_X
    return l;
  });
  m.def("scan_pairs_default_config", [](int64_t L) {
    int t = 0, i = 0;
    dk::scan::scan_pairs_default_config(L, t, i);
    return py::make_tuple(t, i);
  });
  register_emu_selftest(m);
  register_selective_scan_emu(m);
}
