// The ditkernels._C module: CPU kernels and the SIMT emulation of the CUDA device code.
// No torch headers: every function takes raw pointers (as integers), sizes and strides.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_attention_cpu(py::module_& m);  // csrc/cpu/attention.cpp
void register_emu(py::module_& m);            // csrc/emu/*.cpp
void register_selective_scan_cpu(py::module_& m);  // csrc/cpu/selective_scan.cpp

PYBIND11_MODULE(_C, m) {
  m.doc() = "ditkernels CPU kernels (torch-independent)";
  register_attention_cpu(m);
  register_selective_scan_cpu(m);
  py::module_ emu = m.def_submodule("emu", "CUDA device code run on the CPU through the SIMT emulation layer");
  register_emu(emu);
}
