// The one matrix-multiply shape every attention GEMM here is cast into:
//
//   C[M][N] (+)= sum_k A[i*sar + k*sak] * B[k*ldb + j]        N a multiple of the vector width
//
// A is read by broadcasting single elements through two arbitrary strides, so it can be a tensor in
// its own memory layout (K rows, or V read transposed) without packing; B and C are packed,
// vector-contiguous panels. A register-blocked micro-kernel keeps an MR x (NV vectors) tile of C in
// registers and performs MR*NV fused multiply-adds per k from NV vector loads and MR broadcasts.
#pragma once

#include "cpu/simd.h"

namespace dk {

#if defined(__AVX512F__)
constexpr int kMR = 6;  // 6 x 4 zmm accumulators + 4 B vectors + 1 broadcast of 32 registers
constexpr int kNV = 4;
#elif defined(__AVX__)
constexpr int kMR = 6;  // 6 x 2 ymm accumulators + 2 + 1 of 16 registers
constexpr int kNV = 2;
#else
constexpr int kMR = 4;
constexpr int kNV = 2;
#endif

template <typename T, int MR, int NV, bool ACC>
__attribute__((always_inline)) inline void gemm_ukernel(int K, const T* __restrict A, ptrdiff_t sar,
                                                        ptrdiff_t sak, const T* __restrict B, ptrdiff_t ldb,
                                                        T* __restrict C, ptrdiff_t ldc) {
  using V = vec_t<T>;
  constexpr int W = kLanes<T>;
  V acc[MR][NV];
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) acc[i][j] = ACC ? loadu(C + i * ldc + j * W) : V{};
  for (int k = 0; k < K; ++k) {
    V b[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) b[j] = loadu(B + k * ldb + j * W);
    const T* a = A + k * sak;
#pragma GCC unroll 8
    for (int i = 0; i < MR; ++i) {
      V ai = splat(a[i * sar]);
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) acc[i][j] = fmadd(ai, b[j], acc[i][j]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) storeu(C + i * ldc + j * W, acc[i][j]);
}

template <typename T, int NV, bool ACC>
inline void gemm_rows(int M, int K, const T* A, ptrdiff_t sar, ptrdiff_t sak, const T* B, ptrdiff_t ldb, T* C,
                      ptrdiff_t ldc) {
  int i = 0;
  for (; i + kMR <= M; i += kMR) gemm_ukernel<T, kMR, NV, ACC>(K, A + i * sar, sar, sak, B, ldb, C + i * ldc, ldc);
  const T* a = A + i * sar;
  T* c = C + i * ldc;
  switch (M - i) {
    case 0: break;
    case 1: gemm_ukernel<T, 1, NV, ACC>(K, a, sar, sak, B, ldb, c, ldc); break;
    case 2: gemm_ukernel<T, 2, NV, ACC>(K, a, sar, sak, B, ldb, c, ldc); break;
    case 3: gemm_ukernel<T, 3, NV, ACC>(K, a, sar, sak, B, ldb, c, ldc); break;
#if defined(__AVX__) || defined(__AVX512F__)
    case 4: gemm_ukernel<T, 4, NV, ACC>(K, a, sar, sak, B, ldb, c, ldc); break;
    case 5: gemm_ukernel<T, 5, NV, ACC>(K, a, sar, sak, B, ldb, c, ldc); break;
#endif
    default: break;
  }
}

// C (M x nvec*W) (+)= A (M x K, strides sar/sak) * B (K x nvec*W, row stride ldb).
template <typename T, bool ACC>
inline void gemm(int M, int nvec, int K, const T* A, ptrdiff_t sar, ptrdiff_t sak, const T* B, ptrdiff_t ldb, T* C,
                 ptrdiff_t ldc) {
  constexpr int W = kLanes<T>;
  int j = 0;
  for (; j + kNV <= nvec; j += kNV) gemm_rows<T, kNV, ACC>(M, K, A, sar, sak, B + j * W, ldb, C + j * W, ldc);
  switch (nvec - j) {
    case 0: break;
    case 1: gemm_rows<T, 1, ACC>(M, K, A, sar, sak, B + j * W, ldb, C + j * W, ldc); break;
#if defined(__AVX512F__)
    case 2: gemm_rows<T, 2, ACC>(M, K, A, sar, sak, B + j * W, ldb, C + j * W, ldc); break;
    case 3: gemm_rows<T, 3, ACC>(M, K, A, sar, sak, B + j * W, ldb, C + j * W, ldc); break;
#endif
    default: break;
  }
}

}  // namespace dk
