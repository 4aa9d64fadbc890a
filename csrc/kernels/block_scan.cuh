// block_scan.cuh - the linear recurrence h_t = a_t * h_{t-1} + b_t scanned across a thread block (fp32): the
// building block of the selective scan (selective_scan.cuh), written against simt/simt.h.
//
// The recurrence is an inclusive scan over pairs p_t = (a_t, b_t) (the affine map h -> a_t h + b_t) with the
// associative operator "apply p then q":  (a1, b1) o (a2, b2) = (a1 * a2, a2 * b1 + b2). Each thread holds
// one pair (the composition of its own time steps); block_scan_carry
//   1. scans the pairs of each warp with shuffles (log2(32) steps, 2 shuffles each);
//   2. has the last lane of each warp publish the warp's pair in shared memory; after __syncthreads, warp 0
//      scans the warp pairs (shuffles again), applies them to the carried value (kept in warp 0's registers)
//      and publishes the value entering each warp; the value after the last warp becomes the new carry;
//   3. after __syncthreads, gives each thread the value entering it: its warp's incoming value through the
//      previous lane's inclusive pair (one more shuffle).
// Two __syncthreads per call, no shared-memory bank conflicts (only broadcast reads). kRev = true runs the
// same scan in reverse thread order (the reverse-time recurrence of the selective scan's backward).
#pragma once

#include "simt/simt.h"

namespace dk {
namespace scan {

// (A, B) := (A, B) o (a, b), i.e. first (A, B) then (a, b).
DK_HOST_DEVICE void compose(float& A, float& B, float a, float b) {
  B = a * B + b;
  A = A * a;
}

// Inclusive scan of the pairs (A, B) over the 32 lanes of a full warp, in lane order (kRev = false) or in
// reverse lane order (kRev = true).
template <bool kRev>
DK_DEVICE void warp_scan(float& A, float& B, int lane) {
  DK_UNROLL
  for (int off = 1; off < 32; off <<= 1) {
    const float pa = kRev ? __shfl_down_sync(0xffffffffu, A, off) : __shfl_up_sync(0xffffffffu, A, off);
    const float pb = kRev ? __shfl_down_sync(0xffffffffu, B, off) : __shfl_up_sync(0xffffffffu, B, off);
    if (kRev ? lane + off < 32 : lane >= off) {  // (pa, pb) (the earlier pair, applied first) then (A, B)
      B = A * pb + B;
      A = pa * A;
    }
  }
}

// Block scan with carry of the affine maps h -> A h + B held one per thread, in thread order (kRev = false)
// or in reverse thread order (kRev = true). `carry` (read and updated in warp 0 only) is the value entering
// the block; the result is the value entering the calling thread (from its left, or from its right when
// kRev). Two __syncthreads; the three shared arrays of kWarps floats may be reused by the next call (the
// barriers order the reuse). Every thread of the block (kWarps full warps) must call it.
template <int kWarps, bool kRev>
DK_DEVICE float block_scan_carry(float A, float B, float& carry, float* s_a, float* s_b, float* s_in, int lane,
                                 int warp) {
  static_assert(kWarps >= 1 && kWarps <= 32, "1 to 32 warps");
  warp_scan<kRev>(A, B, lane);
  if (lane == (kRev ? 0 : 31)) {
    s_a[warp] = A;
    s_b[warp] = B;
  }
  __syncthreads();
  if (warp == 0) {
    float wa = lane < kWarps ? s_a[lane] : 1.f;
    float wb = lane < kWarps ? s_b[lane] : 0.f;
    // warp_scan over the first kWarps lanes, written out: as a call, nvcc schedules the selective-scan
    // kernels differently (up to 39 more registers)
    DK_UNROLL
    for (int off = 1; off < kWarps; off <<= 1) {
      const float pa = kRev ? __shfl_down_sync(0xffffffffu, wa, off) : __shfl_up_sync(0xffffffffu, wa, off);
      const float pb = kRev ? __shfl_down_sync(0xffffffffu, wb, off) : __shfl_up_sync(0xffffffffu, wb, off);
      if (kRev ? lane + off < 32 : lane >= off) {
        wb = wa * pb + wb;
        wa = pa * wa;
      }
    }
    const float incl = wa * carry + wb;  // value after warp `lane` (lanes >= kWarps: identity, = carry)
    float excl = kRev ? __shfl_down_sync(0xffffffffu, incl, 1) : __shfl_up_sync(0xffffffffu, incl, 1);
    if (lane == (kRev ? kWarps - 1 : 0)) excl = carry;
    if (lane < kWarps) s_in[lane] = excl;
    carry = __shfl_sync(0xffffffffu, incl, kRev ? 0 : kWarps - 1);
  }
  __syncthreads();
  const float hw = s_in[warp];
  const float v = A * hw + B;
  float h = kRev ? __shfl_down_sync(0xffffffffu, v, 1) : __shfl_up_sync(0xffffffffu, v, 1);
  if (lane == (kRev ? 31 : 0)) h = hw;
  return h;
}

}  // namespace scan
}  // namespace dk
