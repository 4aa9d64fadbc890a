// ditkernels._emu: the selective-scan CUDA device code (csrc/kernels/selective_scan.cuh) run on the CPU
// through the SIMT emulation. Same source and same host launchers as the nvcc build (csrc/cuda/selective_scan.cu);
// the Python side (ditkernels/backends/cuda_scan.py) fills the same argument dict for both.
#include <pybind11/pybind11.h>

#include "kernels/selective_scan.cuh"
#include "kernels/selective_scan_binding.h"

namespace py = pybind11;

namespace {

// args dict -> SelectiveScanArgs, then the launcher (synchronous here) with the GIL released.
template <void (*Launch)(const dk::sscan::SelectiveScanArgs&, dk::stream_t)>
void run_emulated(const py::dict& args, int concurrent_blocks, double timeout_s) {
  const auto a = dk::sscan::args_from_dict(args);
  py::gil_scoped_release nogil;
  dk::emu::ScopedConfig cfg({concurrent_blocks, timeout_s});
  Launch(a, nullptr);
}

}  // namespace

void register_selective_scan_emu(py::module_& m) {
  m.def("selective_scan_fwd", &run_emulated<dk::sscan::selective_scan_fwd_launch>, py::arg("args"),
        py::arg("concurrent_blocks") = 0, py::arg("timeout_s") = 0.0,
        "Emulated selective-scan forward; args: dict of SelectiveScanArgs fields (host addresses, element strides).");
  m.def("selective_scan_bwd", &run_emulated<dk::sscan::selective_scan_bwd_launch>, py::arg("args"),
        py::arg("concurrent_blocks") = 0, py::arg("timeout_s") = 0.0,
        "Emulated selective-scan backward from the forward's chunk-boundary states hs.");
  dk::sscan::def_selective_scan_info(m);
}
