// scan_pairs.cuh - chunked block scan of the linear recurrence h_t = a_t * h_{t-1} + b_t (fp32).
//
// Written once against simt/simt.h: compiled by nvcc (csrc/cuda/scan_pairs.cu) and by g++ against
// the SIMT emulation (csrc/emu/scan_pairs_emu.cpp). The selective scan reuses the building blocks
// (compose, warp_scan_pairs, the block-scan-with-carry step).
//
// The recurrence is an inclusive scan over pairs p_t = (a_t, b_t) (the affine map h -> a_t h + b_t)
// with the associative operator "apply p then q":  (a1, b1) o (a2, b2) = (a1 * a2, a2 * b1 + b2).
//
// Layout: `rows` independent sequences of length L; element t of row r of array x lives at
// x[r * x_row_stride + t * x_t_stride]. One thread block scans one row (blocks stride over rows when
// rows > gridDim.x), chunk by chunk (chunk = kThreads * kItems elements), carrying h across chunks:
//   1. each thread loads kItems consecutive elements (float4 loads when the row is contiguous and
//      16-byte aligned: a warp reads 512 contiguous bytes per instruction) and composes them
//      sequentially into one pair;
//   2. warp inclusive scan of the thread pairs with __shfl_up_sync (log2(32) steps, 2 shuffles each);
//   3. the last lane of each warp publishes the warp pair in shared memory; after __syncthreads,
//      warp 0 scans the warp pairs (shuffles again), applies them to the carried h (kept in warp 0's
//      registers) and publishes each warp's incoming h; its last warp's h becomes the new carry;
//   4. after __syncthreads each thread gets its incoming h from its warp's incoming h and the
//      previous lane's inclusive pair (one more shuffle), replays its kItems elements and stores.
// Two __syncthreads per chunk, no shared-memory bank conflicts (only broadcast reads).
#pragma once

#include "simt/simt.h"

namespace dk {
namespace scan {

// (A, B) := (A, B) o (a, b), i.e. first (A, B) then (a, b).
DK_HOST_DEVICE void compose(float& A, float& B, float a, float b) {
  B = a * B + b;
  A = A * a;
}

// Inclusive scan of the pairs (A, B) over the 32 lanes of a full warp.
DK_DEVICE void warp_scan_pairs(float& A, float& B, int lane) {
  DK_UNROLL
  for (int off = 1; off < 32; off <<= 1) {
    float pa = __shfl_up_sync(0xffffffffu, A, off);
    float pb = __shfl_up_sync(0xffffffffu, B, off);
    if (lane >= off) {  // (pa, pb) o (A, B)
      B = A * pb + B;
      A = pa * A;
    }
  }
}

struct ScanPairsParams {
  const float* a;
  const float* b;
  float* out;
  const float* h0;  // nullptr: h_{-1} = 0
  int64_t rows, L;
  int64_t a_row, a_t, b_row, b_t, o_row, o_t, h0_stride;
};

// kVec: a, b, out have unit t-stride, 16-byte aligned rows (checked on the host): full chunks use
// float4 loads/stores, the tail chunk scalar ones. Otherwise any strides, scalar accesses.
// Launch bounds ask for 1024 resident threads per SM (<= 64 registers per thread).
template <int kThreads, int kItems, bool kVec>
DK_GLOBAL DK_LAUNCH_BOUNDS(kThreads, 1024 / kThreads) scan_pairs_kernel(ScanPairsParams p) {
  static_assert(kThreads % 32 == 0 && kThreads >= 32 && kThreads <= 1024, "kThreads: whole warps");
  static_assert(kItems >= 1, "kItems >= 1");
  static_assert(!kVec || kItems % 4 == 0, "float4 path needs kItems % 4 == 0");
  constexpr int kWarps = kThreads / 32;
  constexpr int kChunk = kThreads * kItems;
  DK_SHARED_ARRAY(float, warp_a, kWarps);    // inclusive pair of each warp
  DK_SHARED_ARRAY(float, warp_b, kWarps);
  DK_SHARED_ARRAY(float, warp_hin, kWarps);  // h entering each warp

  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int64_t a_t = kVec ? 1 : p.a_t, b_t = kVec ? 1 : p.b_t, o_t = kVec ? 1 : p.o_t;

  for (int64_t row = blockIdx.x; row < p.rows; row += gridDim.x) {
    const float* __restrict__ a = p.a + row * p.a_row;
    const float* __restrict__ b = p.b + row * p.b_row;
    float* __restrict__ out = p.out + row * p.o_row;
    float carry = p.h0 ? p.h0[row * p.h0_stride] : 0.f;  // meaningful in warp 0 only

    for (int64_t base = 0; base < p.L; base += kChunk) {
      const int64_t t0 = base + int64_t(tid) * kItems;
      const bool full = base + kChunk <= p.L;  // block-uniform
      float ra[kItems], rb[kItems];
      if (kVec && full) {
        DK_UNROLL
        for (int q = 0; q < kItems / 4; ++q) {
          const float4 va = *reinterpret_cast<const float4*>(a + t0 + 4 * q);
          const float4 vb = *reinterpret_cast<const float4*>(b + t0 + 4 * q);
          ra[4 * q + 0] = va.x, ra[4 * q + 1] = va.y, ra[4 * q + 2] = va.z, ra[4 * q + 3] = va.w;
          rb[4 * q + 0] = vb.x, rb[4 * q + 1] = vb.y, rb[4 * q + 2] = vb.z, rb[4 * q + 3] = vb.w;
        }
      } else {
        DK_UNROLL
        for (int j = 0; j < kItems; ++j) {
          const int64_t t = t0 + j;
          const bool in = t < p.L;
          ra[j] = in ? a[t * a_t] : 1.f;  // identity pair past the end
          rb[j] = in ? b[t * b_t] : 0.f;
        }
      }

      // 1. thread pair
      float A = ra[0], B = rb[0];
      DK_UNROLL
      for (int j = 1; j < kItems; ++j) compose(A, B, ra[j], rb[j]);

      // 2. warp scan, 3. block scan of the warp pairs with the carry
      warp_scan_pairs(A, B, lane);
      if (lane == 31) {
        warp_a[warp] = A;
        warp_b[warp] = B;
      }
      __syncthreads();
      if (warp == 0) {
        float wa = lane < kWarps ? warp_a[lane] : 1.f;
        float wb = lane < kWarps ? warp_b[lane] : 0.f;
        DK_UNROLL
        for (int off = 1; off < kWarps; off <<= 1) {
          float pa = __shfl_up_sync(0xffffffffu, wa, off);
          float pb = __shfl_up_sync(0xffffffffu, wb, off);
          if (lane >= off) {
            wb = wa * pb + wb;
            wa = pa * wa;
          }
        }
        const float h_incl = wa * carry + wb;  // h after warp `lane`
        float h_excl = __shfl_up_sync(0xffffffffu, h_incl, 1);
        if (lane == 0) h_excl = carry;
        if (lane < kWarps) warp_hin[lane] = h_excl;
        carry = __shfl_sync(0xffffffffu, h_incl, kWarps - 1);
      }
      __syncthreads();

      // 4. replay the thread's items from its incoming h
      const float hw = warp_hin[warp];
      float h = __shfl_up_sync(0xffffffffu, A * hw + B, 1);
      if (lane == 0) h = hw;
      DK_UNROLL
      for (int j = 0; j < kItems; ++j) {
        h = ra[j] * h + rb[j];
        ra[j] = h;
      }
      if (kVec && full) {
        DK_UNROLL
        for (int q = 0; q < kItems / 4; ++q)
          *reinterpret_cast<float4*>(out + t0 + 4 * q) =
              make_float4(ra[4 * q + 0], ra[4 * q + 1], ra[4 * q + 2], ra[4 * q + 3]);
      } else {
        DK_UNROLL
        for (int j = 0; j < kItems; ++j)
          if (t0 + j < p.L) out[(t0 + j) * o_t] = ra[j];
      }
    }
  }
}

// ------------------------------------------------------------------------------------ host side
// The configurations compiled (threads per block, items per thread). (96, 3) is not a fast
// configuration: it exists so tests cover a warp count that is not a power of two and the scalar
// (non-float4) path on full chunks.
#define DK_SCAN_PAIRS_CONFIGS(X) X(32, 4) X(64, 4) X(128, 4) X(128, 8) X(256, 8) X(96, 3)

struct ScanPairsArgs {
  const float* a;
  const float* b;
  float* out;
  const float* h0;
  int64_t rows, L;
  int64_t a_row, a_t, b_row, b_t, o_row, o_t, h0_stride;
};

// Default configuration for a row length: the smallest chunk that covers L, 256 x 8 for long rows.
inline void scan_pairs_default_config(int64_t L, int& threads, int& items) {
  if (L <= 128) threads = 32, items = 4;
  else if (L <= 256) threads = 64, items = 4;
  else if (L <= 512) threads = 128, items = 4;
  else if (L <= 1024) threads = 128, items = 8;
  else threads = 256, items = 8;
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// Validates, picks the configuration (threads = items = 0: automatic) and launches. Throws
// std::invalid_argument for bad arguments, std::runtime_error for launch / emulation errors.
inline void scan_pairs_launch(const ScanPairsArgs& x, int threads, int items, dk::stream_t stream) {
  if (x.rows < 0 || x.L < 0) throw std::invalid_argument("scan_pairs: rows and L must be >= 0");
  if (x.rows == 0 || x.L == 0) return;
  if (!x.a || !x.b || !x.out) throw std::invalid_argument("scan_pairs: a, b and out must not be null");
  if (threads == 0 && items == 0) scan_pairs_default_config(x.L, threads, items);
  ScanPairsParams p{x.a, x.b, x.out, x.h0, x.rows, x.L, x.a_row, x.a_t, x.b_row, x.b_t, x.o_row, x.o_t, x.h0_stride};
  const bool vec = x.a_t == 1 && x.b_t == 1 && x.o_t == 1 && x.a_row % 4 == 0 && x.b_row % 4 == 0 &&
                   x.o_row % 4 == 0 && aligned16(x.a) && aligned16(x.b) && aligned16(x.out);
  const unsigned grid = unsigned(x.rows < 2147483647 ? x.rows : 2147483647);
#define DK_SCAN_PAIRS_DISPATCH(T, I)                                                      \
  if (threads == T && items == I) {                                                       \
    if (vec && (I) % 4 == 0)                                                              \
      dk::launch(dim3(grid), dim3(T), 0, stream, &scan_pairs_kernel<T, I, (I) % 4 == 0>, p); \
    else                                                                                  \
      dk::launch(dim3(grid), dim3(T), 0, stream, &scan_pairs_kernel<T, I, false>, p);     \
    return;                                                                               \
  }
  DK_SCAN_PAIRS_CONFIGS(DK_SCAN_PAIRS_DISPATCH)
#undef DK_SCAN_PAIRS_DISPATCH
  throw std::invalid_argument("scan_pairs: no compiled configuration threads=" + std::to_string(threads) +
                              ", items=" + std::to_string(items));
}

}  // namespace scan
}  // namespace dk
