// The ditkernels._cuda module: CUDA C++ kernels over raw pointers (no torch headers). Compiled by the
// host compiler against the CUDA runtime headers; the kernels and launchers are in csrc/cuda/*.cu.
// Importing it never needs a GPU: device_count() reports 0 and cuda_status() says why.
#include <cuda_runtime.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "cuda/launchers.h"
#include "kernels/selective_scan_binding.h"

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

// args dict -> SelectiveScanArgs, then the launcher (asynchronous on `stream`) with the GIL released.
template <void (*Launch)(const dk::sscan::SelectiveScanArgs&, uintptr_t)>
void run(const py::dict& args, uintptr_t stream) {
  const auto a = dk::sscan::args_from_dict(args);
  py::gil_scoped_release nogil;
  Launch(a, stream);
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
  m.def("selective_scan_fwd", &run<dk::cuda::selective_scan_fwd>, py::arg("args"), py::arg("stream") = 0,
        "Selective-scan forward (csrc/kernels/selective_scan.cuh); args: dict of SelectiveScanArgs fields\n"
        "(device addresses and element strides as ints). Asynchronous on `stream`.");
  m.def("selective_scan_bwd", &run<dk::cuda::selective_scan_bwd>, py::arg("args"), py::arg("stream") = 0,
        "Selective-scan backward from the forward's chunk-boundary states hs.");
  dk::sscan::def_selective_scan_info(m);
}
