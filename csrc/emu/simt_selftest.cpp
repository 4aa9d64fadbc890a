// Small kernels that test the SIMT emulation itself (barrier, warp intrinsics, shared memory,
// atomics, and that misuse is reported as an error instead of hanging). Written in portable
// simt.h style; registered into ditkernels._emu as selftest_* (used by tests/test_simt_emu.py).
#include <pybind11/pybind11.h>

#include <chrono>
#include <stdexcept>
#include <string>
#include <thread>

#include "simt/simt.h"

namespace py = pybind11;

namespace {

// out[block, tid] = sum_r s[(tid + r + 1) % n] where s[t] = (r + 1) * 1000 + block * 7 + t in round r.
// Two barriers per round: a missing or leaky barrier mixes rounds; shared memory mixed between
// concurrent blocks mixes the block term.
DK_GLOBAL barrier_kernel(int64_t* out, int rounds) {
  DK_SHARED_ARRAY(int64_t, s, 1024);
  const int n = blockDim.x, t = threadIdx.x;
  const int64_t blk = blockIdx.x + int64_t(gridDim.x) * blockIdx.y;
  int64_t acc = 0;
  for (int r = 0; r < rounds; ++r) {
    s[t] = (r + 1) * 1000 + blk * 7 + t;
    __syncthreads();
    acc += s[(t + r + 1) % n];
    __syncthreads();
  }
  out[blk * n + t] = acc;
}

constexpr int kShflOps = 16;

// out[op, tid] for the ops listed in shuffle_op_names (Python computes CUDA's semantics).
DK_GLOBAL shuffle_kernel(int64_t* out, int width) {
  const int n = blockDim.x, t = threadIdx.x, lane = t & 31;
  const unsigned full = 0xffffffffu;
  const int v = t * 3 + 1;
  int k = 0;
  auto put = [&](int64_t x) { out[int64_t(k++) * n + t] = x; };
  put(__shfl_sync(full, v, (lane * 5 + 3) % 32, width));
  put(__shfl_up_sync(full, v, 1, width));
  put(__shfl_up_sync(full, v, 3, width));
  put(__shfl_up_sync(full, v, 16, width));
  put(__shfl_down_sync(full, v, 1, width));
  put(__shfl_down_sync(full, v, 5, width));
  put(__shfl_xor_sync(full, v, 1, width));
  put(__shfl_xor_sync(full, v, 6, width));
  put(__shfl_xor_sync(full, v, 16, width));
  put(int64_t(__ballot_sync(full, t % 3 == 0)));
  put(__any_sync(full, t == 7) ? 1 : 0);
  put(__all_sync(full, t < 1000) ? 1 : 0);
  put(__all_sync(full, lane != 9) ? 1 : 0);
  put(int64_t(__shfl_down_sync(full, double(v) + 0.25, 2, width) * 4.0));     // 8-byte type
  put(int64_t(__shfl_up_sync(full, float(v) + 0.5f, 2, width) * 2.0f));       // float
  // partial mask: only even lanes take part (all of them call it, with the same mask)
  __syncwarp();
  int64_t r = -1;
  if (lane % 2 == 0) r = __shfl_sync(0x55555555u, v, (lane + 2) % 32);
  put(r);
}

DK_GLOBAL dynamic_shared_kernel(float* out) {
  DK_DYNAMIC_SHARED(float, s);
  const int n = blockDim.x, t = threadIdx.x;
  s[t] = 2.0f * t + blockIdx.x;
  __syncthreads();
  out[blockIdx.x * n + t] = s[n - 1 - t];
}

// Reads shared memory that nobody wrote: must see the 0xFF poison (NaN) in every block.
DK_GLOBAL poison_kernel(float* out) {
  DK_SHARED_ARRAY(float, s, 64);
  const int t = threadIdx.x;
  out[blockIdx.x * blockDim.x + t] = s[t];
  __syncthreads();
  s[t] = 1.0f;  // the next block run by the same slot must not see this
}

DK_GLOBAL atomics_kernel(float* fsum, int* isum, int* imax, double* dsum) {
  const int t = threadIdx.x + blockIdx.x * blockDim.x;
  atomicAdd(fsum, 1.0f);
  atomicAdd(isum, t);
  atomicMax(imax, t);
  atomicAdd(dsum, 0.5);
}

// Misuse, each must be reported as an error by the emulation.
DK_GLOBAL misuse_kernel(int kind, float* sink) {
  const int t = threadIdx.x, lane = t & 31;
  float v = float(t);
  switch (kind) {
    case 0:  // divergent __syncthreads: thread 0 returns early
      if (t == 0) return;
      __syncthreads();
      break;
    case 1:  // deadlock: half the warp in a shuffle, the other half at __syncthreads
      if (lane < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
      else __syncthreads();
      break;
    case 2:  // __syncthreads at two different sites
      if (t % 2) {
        __syncthreads();
      } else {
        __syncthreads();
      }
      break;
    case 3:  // lanes disagree on the mask (every lane is in its own mask, so this is the only misuse;
             // with 0x0000ffff lanes 16-31 were also outside their mask and either error could win the race)
      v = __shfl_down_sync(lane < 8 ? 0xffffffffu : 0xfffffffeu, v, 1);
      break;
    case 4:  // calling lane not in the mask
      v = __shfl_sync(0x1u, v, 0);
      break;
    case 5:  // a lane returns while the warp waits for it in a shuffle
      if (lane == 31) return;
      v = __shfl_up_sync(0xffffffffu, v, 1);
      break;
    case 6:  // a thread loops (here: sleeps) while the others wait: timeout
      if (t == 0) std::this_thread::sleep_for(std::chrono::milliseconds(1500));
      __syncthreads();
      break;
    case 7:  // device code throws
      if (t == 3) throw std::runtime_error("boom from device code");
      break;
    case 8: {  // static shared memory over 48 KB
      DK_SHARED_ARRAY(float, big, 20000);
      big[t] = v;
      v = big[0];
      break;
    }
    case 9:  // reading a lane outside the mask
      if (lane < 4) v = __shfl_sync(0xfu, v, 5);
      break;
    default:
      break;
  }
  sink[t] = v;
}

}  // namespace

void register_emu_selftest(py::module_& m) {
  m.def(
      "selftest_barrier",
      [](uintptr_t out, int grid_x, int grid_y, int threads, int rounds, int concurrent_blocks) {
        py::gil_scoped_release nogil;
        dk::emu::Config c;
        c.concurrent_blocks = concurrent_blocks;
        dk::emu::ScopedConfig sc(c);
        dk::launch(dim3(grid_x, grid_y), dim3(threads), 0, nullptr, &barrier_kernel,
                   reinterpret_cast<int64_t*>(out), rounds);
      },
      py::arg("out"), py::arg("grid_x"), py::arg("grid_y"), py::arg("threads"), py::arg("rounds"),
      py::arg("concurrent_blocks") = 0);
  m.attr("selftest_shuffle_nops") = kShflOps;
  m.def(
      "selftest_shuffles",
      [](uintptr_t out, int threads, int width) {
        py::gil_scoped_release nogil;
        dk::launch(dim3(1), dim3(threads), 0, nullptr, &shuffle_kernel, reinterpret_cast<int64_t*>(out), width);
      },
      py::arg("out"), py::arg("threads"), py::arg("width"));
  m.def(
      "selftest_dynamic_shared",
      [](uintptr_t out, int blocks, int threads) {
        py::gil_scoped_release nogil;
        dk::launch(dim3(blocks), dim3(threads), sizeof(float) * threads, nullptr, &dynamic_shared_kernel,
                   reinterpret_cast<float*>(out));
      },
      py::arg("out"), py::arg("blocks"), py::arg("threads"));
  m.def(
      "selftest_poison",
      [](uintptr_t out, int blocks, int concurrent_blocks) {
        py::gil_scoped_release nogil;
        dk::emu::Config c;
        c.concurrent_blocks = concurrent_blocks;
        dk::emu::ScopedConfig sc(c);
        dk::launch(dim3(blocks), dim3(64), 0, nullptr, &poison_kernel, reinterpret_cast<float*>(out));
      },
      py::arg("out"), py::arg("blocks"), py::arg("concurrent_blocks") = 0);
  m.def(
      "selftest_atomics",
      [](uintptr_t fsum, uintptr_t isum, uintptr_t imax, uintptr_t dsum, int blocks, int threads) {
        py::gil_scoped_release nogil;
        dk::launch(dim3(blocks), dim3(threads), 0, nullptr, &atomics_kernel, reinterpret_cast<float*>(fsum),
                   reinterpret_cast<int*>(isum), reinterpret_cast<int*>(imax), reinterpret_cast<double*>(dsum));
      });
  m.def(
      "selftest_misuse",
      [](int kind, uintptr_t sink, int threads, double timeout_s) {
        py::gil_scoped_release nogil;
        dk::emu::Config c;
        c.timeout_s = timeout_s;
        dk::emu::ScopedConfig sc(c);
        dk::launch(dim3(2), dim3(threads), 0, nullptr, &misuse_kernel, kind, reinterpret_cast<float*>(sink));
      },
      py::arg("kind"), py::arg("sink"), py::arg("threads") = 64, py::arg("timeout_s") = 0.0);
  m.def(
      "selftest_launch",
      [](int bx, int by, int bz, size_t smem) {
        py::gil_scoped_release nogil;
        dk::launch(dim3(1), dim3(bx, by, bz), smem, nullptr, &dynamic_shared_kernel, static_cast<float*>(nullptr));
      });
}
