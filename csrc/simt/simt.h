// simt.h - write CUDA device code once, compile it with nvcc (real GPU) or with g++ (SIMT emulation).
//
// Device code includes only this header and uses:
//   DK_GLOBAL            kernel entry point           (__global__ void / void)
//   DK_DEVICE            device function              (__device__ __forceinline__ / inline)
//   DK_HOST_DEVICE       host+device function         (__host__ __device__ __forceinline__ / inline)
//   DK_LAUNCH_BOUNDS(...) __launch_bounds__(...)       (nothing under emulation)
//   DK_SHARED(T, name)   one block-shared object `T name` (T may be an array type through an alias:
//                        `using Buf = float[2][33]; DK_SHARED(Buf, buf);`)
//   DK_SHARED_ARRAY(T, name, n)  block-shared `T name[n]`
//   DK_DYNAMIC_SHARED(T, name)   `T* name` = the launch's dynamic shared memory
//   DK_UNROLL / DK_UNROLL_N(n)   loop unrolling pragmas
//   the CUDA built-ins threadIdx, blockIdx, blockDim, gridDim, warpSize and the intrinsics
//   __syncthreads, __syncwarp, __shfl_sync, __shfl_up_sync, __shfl_down_sync, __shfl_xor_sync,
//   __ballot_sync, __any_sync, __all_sync, __ldg, atomicAdd/atomicExch/atomicCAS/atomicMax/atomicMin,
//   __threadfence, __expf, __logf, __fdividef, dim3, uint3, float2, float4 (and make_*).
//
// Host code launches kernels with `dk::launch(grid, block, smem_bytes, stream, kernel, args...)`
// (stream: cudaStream_t under nvcc, ignored by the emulation). It throws std::runtime_error on a
// launch error (CUDA) or on any error found while emulating (deadlock, divergent barrier, ...).
//
// Forbidden in device code (the emulation cannot run it, see emu.h for the full list): inline PTX,
// CUB/cooperative_groups block primitives, textures, tensor-core intrinsics, grid-wide sync,
// warp-synchronous programming without __syncwarp (threads of a warp do not run in lock step here).
#pragma once

#include <cstddef>
#include <cstdint>

#define DK_STRINGIFY_(...) #__VA_ARGS__
#define DK_STRINGIFY(...) DK_STRINGIFY_(__VA_ARGS__)

#if defined(__CUDACC__)  // ------------------------------------------------------------ real CUDA
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#define DK_SIMT_EMULATED 0
#define DK_GLOBAL __global__ void
#define DK_DEVICE __device__ __forceinline__
#define DK_HOST_DEVICE __host__ __device__ __forceinline__
#define DK_LAUNCH_BOUNDS(...) __launch_bounds__(__VA_ARGS__)
#define DK_SHARED(T, name) __shared__ T name
#define DK_SHARED_ARRAY(T, name, n) __shared__ T name[n]
#define DK_DYNAMIC_SHARED(T, name)                          \
  extern __shared__ __align__(16) unsigned char dk_dynamic_smem_[]; \
  T* name = reinterpret_cast<T*>(dk_dynamic_smem_)
#define DK_UNROLL _Pragma("unroll")
#define DK_UNROLL_N(n) _Pragma(DK_STRINGIFY(unroll n))

namespace dk {
using stream_t = cudaStream_t;

// Launch `kernel` (a pointer to a __global__ function) and check the launch itself.
template <class... KArgs, class... Args>
inline void launch(dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream, void (*kernel)(KArgs...),
                   Args&&... args) {
  kernel<<<grid, block, smem_bytes, stream>>>(static_cast<KArgs>(args)...);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess)
    throw std::runtime_error(std::string("ditkernels: CUDA kernel launch failed: ") + cudaGetErrorString(err));
}
}  // namespace dk

#else  // ------------------------------------------------------------------------------- emulation
#include "simt/emu.h"

#define DK_SIMT_EMULATED 1
#define DK_GLOBAL void
#define DK_DEVICE inline
#define DK_HOST_DEVICE inline
#define DK_LAUNCH_BOUNDS(...)
#define DK_SHARED_CAT_(a, b) a##b
#define DK_SHARED_CAT(a, b) DK_SHARED_CAT_(a, b)
// One static tag per declaration site (and per template instantiation) names the shared object;
// every thread of a block gets a reference to the same bytes of that block's shared arena.
#define DK_SHARED(T, name)                                                                        \
  static char DK_SHARED_CAT(dk_shared_tag_, name);                                                \
  T& name = *reinterpret_cast<T*>(::dk::emu::shared_slot(&DK_SHARED_CAT(dk_shared_tag_, name), sizeof(T), \
                                                          alignof(T), #name))
#define DK_SHARED_ARRAY(T, name, n)                                                               \
  static char DK_SHARED_CAT(dk_shared_tag_, name);                                                \
  T(&name)[n] = *reinterpret_cast<T(*)[n]>(                                                       \
      ::dk::emu::shared_slot(&DK_SHARED_CAT(dk_shared_tag_, name), sizeof(T[n]), alignof(T), #name))
#define DK_DYNAMIC_SHARED(T, name) T* name = reinterpret_cast<T*>(::dk::emu::dynamic_shared())
#define DK_UNROLL _Pragma("GCC unroll 16")
#define DK_UNROLL_N(n) _Pragma(DK_STRINGIFY(GCC unroll n))
#endif
