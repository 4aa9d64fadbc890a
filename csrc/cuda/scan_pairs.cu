// nvcc instantiation and host launcher of csrc/kernels/scan_pairs.cuh.
#include <string>
#include <vector>

#include "cuda/launchers.h"
#include "kernels/scan_pairs.cuh"

namespace dk {
namespace cuda {

void scan_pairs(const float* a, const float* b, float* out, const float* h0, int64_t rows, int64_t L,
                int64_t a_row, int64_t a_t, int64_t b_row, int64_t b_t, int64_t o_row, int64_t o_t,
                int64_t h0_stride, int threads, int items, uintptr_t stream) {
  dk::scan::ScanPairsArgs x{a, b, out, h0, rows, L, a_row, a_t, b_row, b_t, o_row, o_t, h0_stride};
  dk::scan::scan_pairs_launch(x, threads, items, reinterpret_cast<cudaStream_t>(stream));
}

std::vector<std::pair<int, int>> scan_pairs_configs() {
  std::vector<std::pair<int, int>> v;
#define DK_X(T, I) v.emplace_back(T, I);
  DK_SCAN_PAIRS_CONFIGS(DK_X)
#undef DK_X
  return v;
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
