// selective_scan_args.cuh - the arguments of the CUDA selective-scan launchers (plain C++, no device code).
//
// Included by the kernels (selective_scan.cuh), by csrc/cuda/launchers.h and by selective_scan_binding.h,
// which fills it in both pybind11 modules (_cuda, _emu). Every field is an int64_t: pointers are device
// addresses as integers (0: absent), strides are in elements. The Python launcher
// (ditkernels/backends/cuda_scan.py) fills the fields by name from a dict (DK_SELECTIVE_SCAN_FIELDS).
//
// Reverse scans are expressed by the caller as negative L strides with the pointer moved to the last time
// step, so the kernels only ever run forward in "logical" time.
#pragma once

#include <cstdint>

// X(name) for every field, in declaration order.
#define DK_SELECTIVE_SCAN_FIELDS(X)                                                                       \
  /* sizes and configuration */                                                                           \
  X(batch) X(dim) X(seqlen) X(dstate)                                                                     \
  X(dtype)     /* storage dtype of u, delta, z, out, dout, du, ddelta, dz, variable B/C: 0 f32, 2 f16, 3 bf16 */ \
  X(threads) X(items) /* block configuration (0, 0: the default for seqlen) */                            \
  X(cpb)       /* backward: channels per block (divides b_span / c_span of a variable B / C) */           \
  X(softplus)                                                                                             \
  /* (batch, dim, L) operands: pointer, batch / channel / time strides */                                 \
  X(u) X(u_sb) X(u_sd) X(u_sl)                                                                            \
  X(delta) X(delta_sb) X(delta_sd) X(delta_sl)                                                            \
  X(z) X(z_sb) X(z_sd) X(z_sl)                                                                            \
  X(out) X(out_sb) X(out_sd) X(out_sl)                                                                    \
  X(dout) X(dout_sb) X(dout_sd) X(dout_sl)                                                                \
  X(du) X(du_sb) X(du_sd) X(du_sl)                                                                        \
  X(ddelta) X(ddelta_sb) X(ddelta_sd) X(ddelta_sl)                                                        \
  X(dz) X(dz_sb) X(dz_sd) X(dz_sl)                                                                        \
  /* A (dim, N) float32 */                                                                                \
  X(A) X(A_sd) X(A_sn)                                                                                    \
  /* B, C: variable (storage dtype) with batch / group / state / time strides and `span` channels per */  \
  /* group, or constant (dim, N) float32 with b_var = 0, span 1, sb = sl = 0 */                           \
  X(b_var) X(Bm) X(B_sb) X(B_sg) X(B_sn) X(B_sl) X(b_span)                                                \
  X(c_var) X(Cm) X(C_sb) X(C_sg) X(C_sn) X(C_sl) X(c_span)                                                \
  /* float32 contiguous vectors / states */                                                               \
  X(Dv) X(delta_bias)     /* (dim,) */                                                                    \
  X(h0)                   /* (batch, dim, N) initial state */                                             \
  X(last)                 /* (batch, dim, N) last state (forward output) */                               \
  X(hs)                   /* (batch, dim, nchunks + 1, N) chunk-boundary states (forward writes) */       \
  X(dlast)                /* (batch, dim, N) gradient of last_state */                                    \
  X(dinit)                /* (batch, dim, N) gradient of h0; required by the backward (its carry) */      \
  X(dA_rows)              /* (batch, dim, N) per-row dA */                                                \
  X(dD_rows) X(dbias_rows) /* (batch, dim) per-row dD, d delta_bias */                                   \
  /* dB, dC float32: variable -> (batch, dim / cpb, N, L) per channel-block partials (k = d / cpb); */    \
  /* constant -> (batch, dim, N) per-row partials (k = d); strides batch / k / state / time */            \
  X(dB) X(dB_sb) X(dB_sk) X(dB_sn) X(dB_sl)                                                               \
  X(dC) X(dC_sb) X(dC_sk) X(dC_sn) X(dC_sl)

namespace dk {
namespace sscan {

enum DType : int64_t { kF32 = 0, kF16 = 2, kBF16 = 3 };

struct SelectiveScanArgs {
#define DK_SS_DECL(name) int64_t name = 0;
  DK_SELECTIVE_SCAN_FIELDS(DK_SS_DECL)
#undef DK_SS_DECL
};

// The compiled block configurations (threads per block, time steps per thread); chunk = threads * items.
#define DK_SELECTIVE_SCAN_CONFIGS(X) X(32, 4) X(32, 8) X(64, 8) X(128, 8)

// Default configuration for a sequence length (the smallest chunk covering L, up to 1024 steps per chunk).
inline void selective_scan_default_config(int64_t L, int& threads, int& items) {
  if (L <= 128) threads = 32, items = 4;
  else if (L <= 256) threads = 32, items = 8;
  else if (L <= 512) threads = 64, items = 8;
  else threads = 128, items = 8;
}

}  // namespace sscan
}  // namespace dk
