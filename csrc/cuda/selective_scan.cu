// nvcc instantiation and host launchers of csrc/kernels/selective_scan.cuh (every configuration x dtype).
#include <string>
#include <utility>
#include <vector>

#include "cuda/launchers.h"
#include "kernels/selective_scan.cuh"

namespace dk {
namespace cuda {

void selective_scan_fwd(const dk::sscan::SelectiveScanArgs& args, uintptr_t stream) {
  dk::sscan::selective_scan_fwd_launch(args, reinterpret_cast<cudaStream_t>(stream));
}

void selective_scan_bwd(const dk::sscan::SelectiveScanArgs& args, uintptr_t stream) {
  dk::sscan::selective_scan_bwd_launch(args, reinterpret_cast<cudaStream_t>(stream));
}

std::vector<std::pair<int, int>> selective_scan_configs() {
  std::vector<std::pair<int, int>> v;
#define DK_X(T, I) v.emplace_back(T, I);
  DK_SELECTIVE_SCAN_CONFIGS(DK_X)
#undef DK_X
  return v;
}

}  // namespace cuda
}  // namespace dk
