// ditkernels._emu: the selective-scan CUDA device code (csrc/kernels/selective_scan.cuh) run on the CPU
// through the SIMT emulation. Same source and same host launchers as the nvcc build (csrc/cuda/selective_scan.cu);
// the Python side (ditkernels/backends/cuda_scan.py) fills the same argument dict for both.
#include <pybind11/pybind11.h>

#include <string>

#include "kernels/selective_scan.cuh"

namespace py = pybind11;

namespace {

dk::sscan::SelectiveScanArgs ss_args(const py::dict& d) {
  dk::sscan::SelectiveScanArgs a;
  for (auto item : d) {
    const std::string key = item.first.cast<std::string>();
    const int64_t v = item.second.cast<int64_t>();
    bool found = false;
#define DK_SS_SET(name) \
  if (key == #name) a.name = v, found = true;
    DK_SELECTIVE_SCAN_FIELDS(DK_SS_SET)
#undef DK_SS_SET
    if (!found) throw py::key_error("selective_scan: unknown argument '" + key + "'");
  }
  return a;
}

dk::emu::Config ss_config(int concurrent_blocks, double timeout_s) {
  dk::emu::Config c;
  c.concurrent_blocks = concurrent_blocks;
  c.timeout_s = timeout_s;
  return c;
}

}  // namespace

void register_selective_scan_emu(py::module_& m) {
  m.def(
      "selective_scan_fwd",
      [](py::dict args, int concurrent_blocks, double timeout_s) {
        auto a = ss_args(args);
        py::gil_scoped_release nogil;
        dk::emu::ScopedConfig cfg(ss_config(concurrent_blocks, timeout_s));
        dk::sscan::selective_scan_fwd_launch(a, nullptr);
      },
      py::arg("args"), py::arg("concurrent_blocks") = 0, py::arg("timeout_s") = 0.0,
      "Emulated selective-scan forward; args: dict of SelectiveScanArgs fields (host addresses, element strides).");
  m.def(
      "selective_scan_bwd",
      [](py::dict args, int concurrent_blocks, double timeout_s) {
        auto a = ss_args(args);
        py::gil_scoped_release nogil;
        dk::emu::ScopedConfig cfg(ss_config(concurrent_blocks, timeout_s));
        dk::sscan::selective_scan_bwd_launch(a, nullptr);
      },
      py::arg("args"), py::arg("concurrent_blocks") = 0, py::arg("timeout_s") = 0.0,
      "Emulated selective-scan backward from the forward's chunk-boundary states hs.");
  m.def("selective_scan_configs", [] {
    py::list l;
#define DK_X(T, I) l.append(py::make_tuple(T, I));
    DK_SELECTIVE_SCAN_CONFIGS(DK_X)
#undef DK_X
    return l;
  });
  m.def("selective_scan_default_config", [](int64_t L) {
    int t = 0, i = 0;
    dk::sscan::selective_scan_default_config(L, t, i);
    return py::make_tuple(t, i);
  });
  m.def("selective_scan_field_names", [] {
    py::list l;
#define DK_X(name) l.append(#name);
    DK_SELECTIVE_SCAN_FIELDS(DK_X)
#undef DK_X
    return l;
  });
}
