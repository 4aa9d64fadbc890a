// The ditkernels._cuda module: CUDA C++ kernels over raw pointers (no torch headers). Compiled by the
// host compiler against the CUDA runtime headers; the kernels and launchers are in csrc/cuda/*.cu.
// Importing it never needs a GPU: device_count() reports 0 and cuda_status() says why.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "cuda/launchers.h"

namespace py = pybind11;

namespace {

std::pair<int, std::string> query_devices() {
  int n = 0;
  cudaError_t err = cudaGetDeviceCount(&n);
  if (err != cudaSuccess) {
    std::string msg = std::string(cudaGetErrorName(err)) + ": " + cudaGetErrorString(err);
    cudaGetLastError();  // reset the runtime's last-error state (a missing driver is not sticky)
    return {0, msg};
  }
  return {n, ""};
}

// SelectiveScanArgs from a dict of field name -> int (unknown names raise: they are typos).
dk::sscan::SelectiveScanArgs selective_scan_args(const py::dict& d) {
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

}  // namespace

PYBIND11_MODULE(_cuda, m) {
  m.doc() = "ditkernels CUDA kernels (torch-independent, raw pointers + cudaStream_t as int)";
  m.def("archs", &dk::cuda::compiled_archs, "GPU architectures compiled into this module, e.g. ['80', '90a']");
  m.def(
      "device_count", [] { return query_devices().first; },
      "Number of visible CUDA devices; 0 when there is none or the driver is missing (never raises).");
  m.def(
      "cuda_status",
      [] {
        auto r = query_devices();
        return r.first > 0 ? std::string("ok: ") + std::to_string(r.first) + " device(s)" : r.second.empty() ? std::string("no CUDA device") : r.second;
      },
      "Human-readable reason when device_count() is 0.");
  m.def("runtime_version", [] {
    int v = 0;
    cudaRuntimeGetVersion(&v);
    return v;
  });
  m.def("driver_version", [] {
    int v = 0;
    if (cudaDriverGetVersion(&v) != cudaSuccess) v = 0;
    return v;
  });
  m.def(
      "selective_scan_fwd",
      [](py::dict args, uintptr_t stream) {
        auto a = selective_scan_args(args);
        py::gil_scoped_release nogil;
        dk::cuda::selective_scan_fwd(a, stream);
      },
      py::arg("args"), py::arg("stream") = 0,
      "Selective-scan forward (csrc/kernels/selective_scan.cuh); args: dict of SelectiveScanArgs fields\n"
      "(device addresses and element strides as ints). Asynchronous on `stream`.");
  m.def(
      "selective_scan_bwd",
      [](py::dict args, uintptr_t stream) {
        auto a = selective_scan_args(args);
        py::gil_scoped_release nogil;
        dk::cuda::selective_scan_bwd(a, stream);
      },
      py::arg("args"), py::arg("stream") = 0, "Selective-scan backward from the forward's chunk-boundary states hs.");
  m.def("selective_scan_configs", &dk::cuda::selective_scan_configs);
}
