// The ditkernels._emu module (test-only; setup.py builds it with DITKERNELS_TEST_EXT=1): the CUDA
// device code of csrc/kernels run on the CPU through the SIMT emulation layer, and its self-test.
#include <pybind11/pybind11.h>

namespace py = pybind11;

void register_block_scan_emu(py::module_& m);      // csrc/emu/block_scan_emu.cpp
void register_selective_scan_emu(py::module_& m);  // csrc/emu/selective_scan_emu.cpp
void register_emu_selftest(py::module_& m);        // csrc/emu/simt_selftest.cpp

PYBIND11_MODULE(_emu, m) {
  m.doc() = "CUDA device code run on the CPU through the SIMT emulation layer (test-only)";
  register_block_scan_emu(m);
  register_selective_scan_emu(m);
  register_emu_selftest(m);
}
