// nvcc instantiation and host launchers of csrc/kernels/selective_scan.cuh (every configuration x dtype), and
// the list of the archs compiled (only nvcc knows it).
#include <string>
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

// The build may pass the exact gencode list as -DDK_CUDA_ARCHS=80_90a ('_'-separated: nvcc splits
// -D values at commas). Without it, nvcc's __CUDA_ARCH_LIST__ (e.g. 800,900) gives the archs without
// the arch-specific 'a' suffix, which the host pass cannot see.
std::vector<std::string> compiled_archs() {
  std::vector<std::string> out;
#if defined(DK_CUDA_ARCHS)
  std::string s = DK_STRINGIFY(DK_CUDA_ARCHS), cur;
  for (char c : s) {
    if (c == '_' || c == ',' || c == ';' || c == ' ') {
      if (!cur.empty()) out.push_back(cur);
      cur.clear();
    } else {
      cur += c;
    }
  }
  if (!cur.empty()) out.push_back(cur);
#elif defined(__CUDA_ARCH_LIST__)
  for (int a : {__CUDA_ARCH_LIST__}) out.push_back(std::to_string(a / 10));
#endif
  return out;
}

}  // namespace cuda
}  // namespace dk
