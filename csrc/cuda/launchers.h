// Host launchers of the CUDA kernels (defined in csrc/cuda/*.cu, compiled by nvcc), called by
// bindings_cuda.cpp (compiled by the host compiler). Raw pointers, sizes, strides, a cudaStream_t
// passed as an integer. They throw std::invalid_argument / std::runtime_error.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "kernels/selective_scan_args.cuh"

namespace dk {
namespace cuda {

// The GPU architectures this module was compiled for, e.g. {"80", "90a"}.
std::vector<std::string> compiled_archs();

// Selective scan (csrc/kernels/selective_scan.cuh): forward (out, hs, last) and backward from hs.
// Raw device addresses and element strides in `args`; stream: cudaStream_t as an integer.
void selective_scan_fwd(const dk::sscan::SelectiveScanArgs& args, uintptr_t stream);
void selective_scan_bwd(const dk::sscan::SelectiveScanArgs& args, uintptr_t stream);

}  // namespace cuda
}  // namespace dk
