"""Selective scan (Mamba, docs/spec.md §4) in Triton: chunked forward and recomputing backward.

``h_t = exp(dt_t A) h_{t-1} + dt_t u_t B_t``, ``y_t = <h_t, C_t> + D u_t``, ``out = y * silu(z)``.

Layout of the work. One program owns ``BLOCK_D`` channels of one batch row and walks the sequence
in chunks of ``BLOCK_L`` steps, carrying the ``(BLOCK_D, BLOCK_N)`` state in registers. Inside a
chunk the recurrence is one ``tl.associative_scan`` along L of the ``(BLOCK_D, BLOCK_N, BLOCK_L)``
pairs ``(a, b) = (exp(dt A), dt u B)`` with the affine-map combine :func:`_pair_combine`; the
carried state enters afterwards (``h = A_cum * h_carry + B_cum``). Masked steps (past L) are
``(1, 0)`` pairs, so the carry at the chunk's last column is the state after its last real step.

- ``_selective_scan_fwd_kernel`` writes ``out`` (input dtype), ``last_state`` and the chunk-boundary
  states ``saved (batch, dim, nchunks + 1, N)`` fp32 (``saved[:, :, c]`` = state before chunk ``c``
  in scan order). Nothing of size (batch, dim, L, N) is ever stored.
- ``_selective_scan_bwd_kernel`` walks the chunks backwards: it recomputes the chunk's states from
  ``saved[:, :, c]`` with the forward scan, then runs a reverse ``tl.associative_scan`` of the adjoint
  ``g_t = dL/dh_t = dy_t C_t + a_{t+1} g_{t+1}`` (pairs ``(a_{t+1}, dy_t C_t)``; the shifted decay is
  recomputed from ``delta`` at ``t + 1``), carrying ``dL/dh_{t0-1} = a_{t0} g_{t0}`` into the previous
  chunk. ``a_t h_{t-1}`` is taken as ``h_t - dt_t u_t B_t`` (as mamba-ssm does).

Channel blocks never straddle a B / C group: channels are split into units of ``span`` =
gcd(channels per B group, channels per C group) consecutive channels, and a program's block lies in
one unit, so a variable B_t / C_t is one ``(BLOCK_N, BLOCK_L)`` tile per program.

Determinism: no atomics. Every output element is written by exactly one program. Reductions over
channels and batch (dA, constant dB / dC, dD, d delta_bias) are written as per-(batch, channel) rows;
variable dB / dC as per-(batch, program) partials ``(batch, programs, N, L)``; the launcher sums them
with torch in a fixed order. A backward program walks ``n_sub`` consecutive channel blocks of its
unit inside each chunk, so its variable dB_t / dC_t partial is summed over all of them in registers
and written once (:func:`bwd_blocks` picks ``n_sub``: enough programs for the GPU, a capped
workspace). The per-channel rows (and the carry dL/dh, kept in the dinitial_state buffer) are
read and rewritten once per chunk by their program, with a barrier between chunks.

Reverse scans (``reverse=True``) are expressed through the operands: the launcher passes views that
start at the last time step with negated L strides, so the kernels never see the direction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ditkernels import _alloc

from . import _interpreter

LOG2E = tl.constexpr(1.4426950408889634)
MAX_DSTATE = 256


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------

@triton.jit
def _pair_combine(a1, b1, a2, b2):
    """Compose the affine maps ``x -> a1 x + b1`` (earlier) then ``x -> a2 x + b2`` (later)."""
    return a1 * a2, b1 * a2 + b2


@triton.jit
def _softplus(x):
    """log(1 + exp(x)) in fp32, accurate for small exp(x) (log1p via log(u) * e / (u - 1)), x above 20 kept."""
    e = tl.exp(tl.minimum(x, 20.0))
    u = 1.0 + e
    log1p = tl.where(u == 1.0, e, tl.log(u) * (e / (u - 1.0)))
    return tl.where(x > 20.0, x, log1p)


@triton.jit
def _selective_scan_fwd_kernel(
    U, Delta, A, Bm, Cm, Dv, Z, DeltaBias, H0, Out, Last, Saved,
    dim, seqlen, dstate, nchunks, span, cpg_b, cpg_c, nblk,
    stride_ub, stride_ud, stride_ul,
    stride_db, stride_dd, stride_dl,
    stride_zb, stride_zd, stride_zl,
    stride_ob, stride_od, stride_ol,
    stride_ad, stride_an,
    stride_bb, stride_bg, stride_bn, stride_bl,
    stride_cb, stride_cg, stride_cn, stride_cl,
    stride_hb, stride_hd, stride_hn,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
    B_VAR: tl.constexpr, C_VAR: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_H0: tl.constexpr,
):
    """Grid (units * nblk, batch). B / C: variable (batch, G, N, L) tiles with group strides
    (stride_bg is the (dim, N) row stride for a constant B); strides of L may be negative."""
    pid = tl.program_id(0)
    bat = tl.program_id(1).to(tl.int64)
    unit = pid // nblk
    d_in = (pid % nblk) * BLOCK_D + tl.arange(0, BLOCK_D)
    d = unit * span + d_in
    mask_d = d_in < span
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < dstate
    offs_l = tl.arange(0, BLOCK_L)
    mask_dn = mask_d[:, None] & mask_n[None, :]

    # log2(e) folded into A: a = exp2(dt * A2). Masked states get A = 0, i.e. a = 1.
    A2 = tl.load(A + d[:, None] * stride_ad + offs_n[None, :] * stride_an, mask=mask_dn, other=0.0) * LOG2E
    bias = tl.load(DeltaBias + d, mask=mask_d, other=0.0) if HAS_BIAS else None
    Dval = tl.load(Dv + d, mask=mask_d, other=0.0) if HAS_D else None
    if B_VAR:
        b_base = Bm + bat * stride_bb + ((unit * span) // cpg_b) * stride_bg + offs_n[:, None] * stride_bn
    else:
        Bc = tl.load(Bm + d[:, None] * stride_bg + offs_n[None, :] * stride_bn, mask=mask_dn, other=0.0)
    if C_VAR:
        c_base = Cm + bat * stride_cb + ((unit * span) // cpg_c) * stride_cg + offs_n[:, None] * stride_cn
    else:
        Cc = tl.load(Cm + d[:, None] * stride_cg + offs_n[None, :] * stride_cn, mask=mask_dn, other=0.0)

    u_base = U + bat * stride_ub + d[:, None] * stride_ud
    dl_base = Delta + bat * stride_db + d[:, None] * stride_dd
    z_base = Z + bat * stride_zb + d[:, None] * stride_zd
    o_base = Out + bat * stride_ob + d[:, None] * stride_od
    state_rows = (bat * dim + d[:, None]).to(tl.int64)
    s_base = Saved + state_rows * (nchunks + 1) * dstate + offs_n[None, :]

    if HAS_H0:
        h = tl.load(H0 + bat * stride_hb + d[:, None] * stride_hd + offs_n[None, :] * stride_hn,
                    mask=mask_dn, other=0.0)
    else:
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    tl.store(s_base, h, mask=mask_dn)

    for c in range(0, nchunks):
        t = c * BLOCK_L + offs_l
        mask_l = t < seqlen
        mask_dl = mask_d[:, None] & mask_l[None, :]
        u = tl.load(u_base + t[None, :] * stride_ul, mask=mask_dl, other=0.0).to(tl.float32)
        dt = tl.load(dl_base + t[None, :] * stride_dl, mask=mask_dl, other=0.0).to(tl.float32)
        if HAS_BIAS:
            dt += bias[:, None]
        if SOFTPLUS:
            dt = _softplus(dt)
        dt = tl.where(mask_dl, dt, 0.0)
        if B_VAR:
            Bt = tl.load(b_base + t[None, :] * stride_bl, mask=mask_n[:, None] & mask_l[None, :],
                         other=0.0).to(tl.float32)
            b = (dt * u)[:, None, :] * Bt[None, :, :]
        else:
            b = (dt * u)[:, None, :] * Bc[:, :, None]
        a = tl.exp2(dt[:, None, :] * A2[:, :, None])
        a_cum, b_cum = tl.associative_scan((a, b), 2, _pair_combine)
        hs = a_cum * h[:, :, None] + b_cum
        if C_VAR:
            Ct = tl.load(c_base + t[None, :] * stride_cl, mask=mask_n[:, None] & mask_l[None, :],
                         other=0.0).to(tl.float32)
            y = tl.sum(hs * Ct[None, :, :], axis=1)
        else:
            y = tl.sum(hs * Cc[:, :, None], axis=1)
        if HAS_D:
            y += Dval[:, None] * u
        if HAS_Z:
            zv = tl.load(z_base + t[None, :] * stride_zl, mask=mask_dl, other=0.0).to(tl.float32)
            y = y * zv * tl.sigmoid(zv)
        tl.store(o_base + t[None, :] * stride_ol, y.to(Out.dtype.element_ty), mask=mask_dl)
        # State after the chunk: the last column (masked steps past L carry it unchanged).
        h = tl.sum(tl.where(offs_l[None, None, :] == BLOCK_L - 1, hs, 0.0), axis=2)
        tl.store(s_base + (c + 1) * dstate, h, mask=mask_dn)
    tl.store(Last + state_rows * dstate + offs_n[None, :], h, mask=mask_dn)


@triton.jit
def _selective_scan_bwd_kernel(
    U, Delta, A, Bm, Cm, Dv, Z, DeltaBias, Saved, DOut, DLast,
    DU, DDelta, DZ, DArows, DBm, DCm, DDrows, DBiasRows, DH0,
    dim, seqlen, dstate, nchunks, span, cpg_b, cpg_c, nblk, n_sub,
    stride_ub, stride_ud, stride_ul,
    stride_db, stride_dd, stride_dl,
    stride_zb, stride_zd, stride_zl,
    stride_gb, stride_gd, stride_gl,
    stride_dub, stride_dud, stride_dul,
    stride_ddb, stride_ddd, stride_ddl,
    stride_dzb, stride_dzd, stride_dzl,
    stride_ad, stride_an,
    stride_bb, stride_bg, stride_bn, stride_bl,
    stride_cb, stride_cg, stride_cn, stride_cl,
    stride_dbb, stride_dbk, stride_dbn, stride_dbl,
    stride_dcb, stride_dck, stride_dcn, stride_dcl,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
    B_VAR: tl.constexpr, C_VAR: tl.constexpr, HAS_D: tl.constexpr, HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr, HAS_DLAST: tl.constexpr,
):
    """Grid (units * nblk, batch). A program owns ``n_sub`` consecutive channel blocks of BLOCK_D
    in one unit and walks the chunks from last to first, the blocks inside each chunk, so a variable
    dB_t / dC_t partial is summed over all its channels in registers and written once per chunk.

    Per channel, the carry dL/dh (DH0), dA (DArows), dD / d delta_bias (DDrows / DBiasRows) and a
    constant dB / dC (DBm / DCm rows (batch, dim, N)) live in their output rows, read and rewritten
    once per chunk by this program only (DH0 ends as dL/d initial_state). Variable DBm / DCm:
    partials (batch, units * nblk, N, L) indexed by the program. Rows are contiguous fp32.
    """
    pid = tl.program_id(0)
    bat = tl.program_id(1).to(tl.int64)
    unit = pid // nblk
    offs_n = tl.arange(0, BLOCK_N)
    mask_n = offs_n < dstate
    offs_l = tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    d_first = unit * span + (pid % nblk) * n_sub * BLOCK_D
    # Scalar bases; the tile offsets are recomputed per chunk (hoisted pointer tiles cost registers).
    if B_VAR:
        b_base = Bm + bat * stride_bb + ((unit * span) // cpg_b) * stride_bg
        db_base = DBm + bat * stride_dbb + pid.to(tl.int64) * stride_dbk
    if C_VAR:
        c_base = Cm + bat * stride_cb + ((unit * span) // cpg_c) * stride_cg
        dc_base = DCm + bat * stride_dcb + pid.to(tl.int64) * stride_dck

    for ci in range(0, nchunks):
        c = nchunks - 1 - ci
        t = c * BLOCK_L + offs_l
        mask_l = t < seqlen
        mask_nl = mask_n[:, None] & mask_l[None, :]
        t_next = t + 1
        mask_l_next = (t_next < seqlen) & (offs_l < BLOCK_L - 1)
        if B_VAR:
            Bt = tl.load(b_base + offs_n[:, None] * stride_bn + t[None, :] * stride_bl, mask=mask_nl,
                         other=0.0).to(tl.float32)
            dB_chunk = tl.zeros((BLOCK_N, BLOCK_L), dtype=tl.float32)
        if C_VAR:
            Ct = tl.load(c_base + offs_n[:, None] * stride_cn + t[None, :] * stride_cl, mask=mask_nl,
                         other=0.0).to(tl.float32)
            dC_chunk = tl.zeros((BLOCK_N, BLOCK_L), dtype=tl.float32)

        for s in range(0, n_sub):
            d_in = d_first - unit * span + s * BLOCK_D + offs_d
            d = d_first + s * BLOCK_D + offs_d
            mask_d = d_in < span
            mask_dn = mask_d[:, None] & mask_n[None, :]
            mask_dl = mask_d[:, None] & mask_l[None, :]
            rows = (bat * dim + d[:, None]).to(tl.int64) * dstate + offs_n[None, :]
            Av = tl.load(A + d[:, None] * stride_ad + offs_n[None, :] * stride_an, mask=mask_dn, other=0.0)
            A2 = Av * LOG2E
            if B_VAR:
                B3 = Bt[None, :, :]
            else:
                Bc = tl.load(Bm + d[:, None] * stride_bg + offs_n[None, :] * stride_bn, mask=mask_dn, other=0.0)
                B3 = Bc[:, :, None]
            if C_VAR:
                C3 = Ct[None, :, :]
            else:
                Cc = tl.load(Cm + d[:, None] * stride_cg + offs_n[None, :] * stride_cn, mask=mask_dn, other=0.0)
                C3 = Cc[:, :, None]

            u = tl.load(U + bat * stride_ub + d[:, None] * stride_ud + t[None, :] * stride_ul, mask=mask_dl,
                        other=0.0).to(tl.float32)
            dl_ptr = Delta + bat * stride_db + d[:, None] * stride_dd + t[None, :] * stride_dl
            x = tl.load(dl_ptr, mask=mask_dl, other=0.0).to(tl.float32)
            # delta at t + 1 for the adjoint's decay a_{t+1}; 0 (a = 1) at the chunk's last column and past L.
            mask_next = mask_d[:, None] & mask_l_next[None, :]
            dt_next = tl.load(dl_ptr + stride_dl, mask=mask_next, other=0.0).to(tl.float32)
            if HAS_BIAS:
                bias = tl.load(DeltaBias + d, mask=mask_d, other=0.0)
                x += bias[:, None]
                dt_next += bias[:, None]
            if SOFTPLUS:
                dt = _softplus(x)
                dt_next = _softplus(dt_next)
            else:
                dt = x
            dt = tl.where(mask_dl, dt, 0.0)
            dt_next = tl.where(mask_next, dt_next, 0.0)
            dout = tl.load(DOut + bat * stride_gb + d[:, None] * stride_gd + t[None, :] * stride_gl, mask=mask_dl,
                           other=0.0).to(tl.float32)
            if HAS_Z:
                zv = tl.load(Z + bat * stride_zb + d[:, None] * stride_zd + t[None, :] * stride_zl, mask=mask_dl,
                             other=0.0).to(tl.float32)
                sig_z = tl.sigmoid(zv)
                dy = dout * zv * sig_z
            else:
                dy = dout

            # p = dL/dh at the end of this chunk from the steps after it: dlast for the last chunk.
            p = tl.load(DH0 + rows, mask=mask_dn & (ci > 0), other=0.0)
            if HAS_DLAST:
                p += tl.load(DLast + rows, mask=mask_dn & (ci == 0), other=0.0)

            # Adjoint g_t = dL/dh_t = dy_t C_t + a_{t+1} g_{t+1}, the carry p entering at the last column.
            alpha = tl.exp2(dt_next[:, None, :] * A2[:, :, None])
            g_cum, g_sum = tl.associative_scan((alpha, dy[:, None, :] * C3), 2, _pair_combine, reverse=True)
            g = g_cum * p[:, :, None] + g_sum

            # Forward states of the chunk from its saved start state.
            h0 = tl.load(Saved + (bat * dim + d[:, None]).to(tl.int64) * (nchunks + 1) * dstate + c * dstate
                         + offs_n[None, :], mask=mask_dn, other=0.0)
            dtu = dt * u
            b = dtu[:, None, :] * B3
            a = tl.exp2(dt[:, None, :] * A2[:, :, None])
            a_cum, b_cum = tl.associative_scan((a, b), 2, _pair_combine)
            hs = a_cum * h0[:, :, None] + b_cum
            w = g * (hs - b)  # g_t * a_t * h_{t-1}

            if HAS_Z:
                y = tl.sum(hs * C3, axis=1)
                if HAS_D:
                    y += tl.load(Dv + d, mask=mask_d, other=0.0)[:, None] * u
                dz = dout * y * sig_z * (1.0 + zv * (1.0 - sig_z))
                tl.store(DZ + bat * stride_dzb + d[:, None] * stride_dzd + t[None, :] * stride_dzl,
                         dz.to(DZ.dtype.element_ty), mask=mask_dl)
            if C_VAR:
                dC_chunk += tl.sum(dy[:, None, :] * hs, axis=0)
            else:
                dc_ptr = DCm + bat * stride_dcb + d[:, None] * stride_dck + offs_n[None, :] * stride_dcn
                prev = tl.load(dc_ptr, mask=mask_dn & (ci > 0), other=0.0)
                tl.store(dc_ptr, prev + tl.sum(dy[:, None, :] * hs, axis=2), mask=mask_dn)
            gB = tl.sum(g * B3, axis=1)
            if B_VAR:
                dB_chunk += tl.sum(g * dtu[:, None, :], axis=0)
            else:
                db_ptr = DBm + bat * stride_dbb + d[:, None] * stride_dbk + offs_n[None, :] * stride_dbn
                prev = tl.load(db_ptr, mask=mask_dn & (ci > 0), other=0.0)
                tl.store(db_ptr, prev + tl.sum(g * dtu[:, None, :], axis=2), mask=mask_dn)
            prev = tl.load(DArows + rows, mask=mask_dn & (ci > 0), other=0.0)
            tl.store(DArows + rows, prev + tl.sum(w * dt[:, None, :], axis=2), mask=mask_dn)

            ddt = tl.sum(w * Av[:, :, None], axis=1) + u * gB
            du = dt * gB
            if HAS_D:
                du += tl.load(Dv + d, mask=mask_d, other=0.0)[:, None] * dy
                prev = tl.load(DDrows + bat * dim + d, mask=mask_d & (ci > 0), other=0.0)
                tl.store(DDrows + bat * dim + d, prev + tl.sum(dy * u, axis=1), mask=mask_d)
            if SOFTPLUS:
                ddt = ddt * tl.where(x > 20.0, 1.0, tl.sigmoid(x))
            ddt = tl.where(mask_dl, ddt, 0.0)
            if HAS_BIAS:
                prev = tl.load(DBiasRows + bat * dim + d, mask=mask_d & (ci > 0), other=0.0)
                tl.store(DBiasRows + bat * dim + d, prev + tl.sum(ddt, axis=1), mask=mask_d)
            tl.store(DU + bat * stride_dub + d[:, None] * stride_dud + t[None, :] * stride_dul,
                     du.to(DU.dtype.element_ty), mask=mask_dl)
            tl.store(DDelta + bat * stride_ddb + d[:, None] * stride_ddd + t[None, :] * stride_ddl,
                     ddt.to(DDelta.dtype.element_ty), mask=mask_dl)

            # dL/dh_{t0-1} = a_{t0} g_{t0}: the carry into the previous chunk.
            dt0 = tl.sum(tl.where(offs_l[None, :] == 0, dt, 0.0), axis=1)
            g0 = tl.sum(tl.where(offs_l[None, None, :] == 0, g, 0.0), axis=2)
            tl.store(DH0 + rows, tl.exp2(dt0[:, None] * A2) * g0, mask=mask_dn)

        if B_VAR:
            tl.store(db_base + offs_n[:, None] * stride_dbn + t[None, :] * stride_dbl, dB_chunk, mask=mask_nl)
        if C_VAR:
            tl.store(dc_base + offs_n[:, None] * stride_dcn + t[None, :] * stride_dcl, dC_chunk, mask=mask_nl)
        # The rows written in this chunk are read back (maybe by other threads) in the next one.
        tl.debug_barrier()


# --------------------------------------------------------------------------------------------
# Shipped configurations
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ScanConfig:
    """Tiles of one state-size bucket. block_l: steps per chunk (shared by forward and backward:
    it is the spacing of the saved states); block_d: channels per program."""

    block_l: int
    fwd_block_d: int
    fwd_warps: int
    bwd_block_d: int
    bwd_warps: int
    # Register cap given to ptxas (.maxnreg). Without one, ptxas caps these loop-heavy kernels for
    # occupancy on its own (e.g. 96 or 168 registers) and spills a few loop-invariant values.
    maxnreg: int = 255


# BLOCK_N (the state size rounded up to a power of two) -> config, the same on sm_80 and sm_90.
# Sized by registers (python -m ditkernels compile-report): the forward holds ~16 (a, b) pairs of
# the (BLOCK_D, BLOCK_N, BLOCK_L) chunk per thread, the backward ~8 (it keeps the states, the adjoints
# and both scans live at once, and for small N its many (BLOCK_D, BLOCK_L) rows dominate); 16 warps
# would cap registers at 128 and spill. BLOCK_L is also the spacing of the saved states, so saved
# holds N / BLOCK_L floats per (channel, step): 0.25 for N = 16, 32 for N = 256.
CONFIGS: dict[int, ScanConfig] = {
    1: ScanConfig(64, 16, 4, 4, 4),
    2: ScanConfig(64, 8, 4, 4, 4),
    4: ScanConfig(64, 8, 4, 4, 4),
    8: ScanConfig(64, 4, 4, 2, 4),
    16: ScanConfig(64, 2, 4, 1, 4),
    32: ScanConfig(64, 1, 4, 1, 8),
    64: ScanConfig(32, 1, 4, 1, 8),
    128: ScanConfig(16, 1, 4, 1, 8),
    256: ScanConfig(8, 1, 4, 1, 8),
}
BLOCK_N_BUCKETS = tuple(CONFIGS)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def block_n_for(dstate: int) -> int:
    if not 1 <= dstate <= MAX_DSTATE:
        raise ValueError(f"dstate: expected 1..{MAX_DSTATE}, got {dstate}")
    return 1 << (dstate - 1).bit_length()


def config_for(dstate: int) -> ScanConfig:
    return CONFIGS[block_n_for(dstate)]


def nchunks(seqlen: int, dstate: int) -> int:
    return triton.cdiv(seqlen, config_for(dstate).block_l)


def saved_shape(batch: int, dim: int, seqlen: int, dstate: int) -> tuple[int, ...]:
    """Shape of the chunk-boundary states the forward saves: (batch, dim, nchunks + 1, N) fp32."""
    return (batch, dim, nchunks(seqlen, dstate) + 1, dstate)


def interpreting() -> bool:
    return _interpreter.interpreting()


if interpreting():
    _interpreter.patch()


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

def _seq_view(t: torch.Tensor, reverse: bool) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """(tensor whose data pointer is time step 0 in scan order, (batch, channel, L) strides)."""
    sb, sd, sl = t.stride()
    if reverse:
        return t[:, :, t.shape[2] - 1:], (sb, sd, -sl)
    return t, (sb, sd, sl)


def _bc_view(X: torch.Tensor, dim: int, reverse: bool) -> tuple[torch.Tensor, tuple[int, int, int, int], int, bool]:
    """(tensor, (batch, group, state, L) strides, channels per group, variable) of B or C.

    Constant (dim, N): the group stride is the row stride. Variable (batch, N, L) is one group.
    """
    s = X.stride()
    if X.dim() == 2:
        return X, (0, s[0], s[1], 0), dim, False
    if X.dim() == 3:
        strides, groups = (s[0], 0, s[1], s[2]), 1
    else:
        strides, groups = s, X.shape[1]
    if reverse:
        L = X.shape[-1]
        X = X[..., L - 1:]
        strides = (*strides[:3], -strides[3])
    return X, strides, dim // groups, True


def _units(dim: int, cpg_b: int, cpg_c: int) -> tuple[int, int]:
    """(span, units): channel units that lie inside one B group and one C group."""
    span = math.gcd(cpg_b, cpg_c)
    return span, dim // span


class _Args:
    """Operands shared by the forward and backward launches."""

    def __init__(self, u, delta, A, B, C, D, z, delta_bias, initial_state, reverse):
        self.batch, self.dim, self.seqlen = u.shape
        self.dstate = A.shape[1]
        self.cfg = config_for(self.dstate)
        self.block_n = block_n_for(self.dstate)
        self.nchunks = nchunks(self.seqlen, self.dstate)
        self.reverse = reverse
        f32 = lambda t: None if t is None else t.detach().to(torch.float32)
        self.A, self.D, self.bias, self.h0 = f32(A), f32(D), f32(delta_bias), f32(initial_state)
        self.u, self.u_s = _seq_view(u, reverse)
        self.delta, self.delta_s = _seq_view(delta, reverse)
        self.z, self.z_s = _seq_view(z, reverse) if z is not None else (None, (0, 0, 0))
        B_ = B if B.dim() > 2 else f32(B)
        C_ = C if C.dim() > 2 else f32(C)
        self.B, self.B_s, self.cpg_b, self.b_var = _bc_view(B_, self.dim, reverse)
        self.C, self.C_s, self.cpg_c, self.c_var = _bc_view(C_, self.dim, reverse)
        self.span, self.units = _units(self.dim, self.cpg_b, self.cpg_c)

    def flags(self) -> dict:
        return dict(B_VAR=self.b_var, C_VAR=self.c_var, HAS_D=self.D is not None, HAS_Z=self.z is not None,
                    HAS_BIAS=self.bias is not None)


@dataclass(frozen=True)
class ScanLaunch:
    """One launch of a scan kernel, as :func:`scan_launch` derives it."""

    grid: tuple[int, int]  # (units * nblk, batch)
    nblk: int  # programs per channel unit
    n_sub: int  # channel blocks each program walks (1 in the forward)
    constexprs: dict  # BLOCK_D, BLOCK_N, BLOCK_L
    options: dict  # num_warps, maxnreg


def scan_launch(kernel: str, *, batch: int, seqlen: int, dstate: int, span: int, units: int, partial_bytes: int = 0,
                grad_bytes: int = 0, target_programs: int = 4, n_sub: int | None = None) -> ScanLaunch:
    """The launch of ``kernel`` ("fwd" / "bwd") for ``units`` channel units of ``span`` channels (each inside one
    B and one C group) of a (batch, ., seqlen) problem with ``dstate`` states. Backward: ``n_sub`` channel blocks
    per program (default: :func:`bwd_blocks` from the per-program ``partial_bytes`` of variable B / C, their
    ``grad_bytes`` and ``target_programs``). Pure: the launchers and compile-report take their launches here."""
    cfg, block_n = config_for(dstate), block_n_for(dstate)
    fwd = kernel == "fwd"
    if not fwd and kernel != "bwd":
        raise ValueError(f"kernel: expected 'fwd' or 'bwd', got {kernel!r}")
    block_d, warps = (cfg.fwd_block_d, cfg.fwd_warps) if fwd else (cfg.bwd_block_d, cfg.bwd_warps)
    per_unit = triton.cdiv(span, block_d)
    if fwd:
        n_sub = 1
    elif n_sub is None:
        n_sub = bwd_blocks(batch * units, per_unit, partial_bytes, grad_bytes, target_programs)
    if not 1 <= n_sub <= per_unit:
        raise ValueError(f"n_sub: expected 1..{per_unit} channel blocks per program, got {n_sub}")
    nblk = triton.cdiv(per_unit, n_sub)
    return ScanLaunch((units * nblk, batch), nblk, n_sub, dict(BLOCK_D=block_d, BLOCK_N=block_n, BLOCK_L=cfg.block_l),
                      dict(num_warps=warps, maxnreg=cfg.maxnreg))


def scan_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus: bool, reverse: bool):
    """Forward. u, delta, z: (batch, dim, L); returns out (u.dtype), last_state and saved (fp32)."""
    p = _Args(u, delta, A, B, C, D, z, delta_bias, initial_state, reverse)
    dev = u.device
    out_full = _alloc.empty(p.batch, p.dim, p.seqlen, dtype=u.dtype, device=dev)
    last = _alloc.empty(p.batch, p.dim, p.dstate, dtype=torch.float32, device=dev)
    saved = _alloc.empty(*saved_shape(p.batch, p.dim, p.seqlen, p.dstate), dtype=torch.float32, device=dev)
    out, out_s = _seq_view(out_full, reverse)
    launch = scan_launch("fwd", batch=p.batch, seqlen=p.seqlen, dstate=p.dstate, span=p.span, units=p.units)
    h0 = p.h0 if p.h0 is not None else last
    dummy = p.A
    _selective_scan_fwd_kernel[launch.grid](
        p.u, p.delta, p.A, p.B, p.C, dummy if p.D is None else p.D, p.u if p.z is None else p.z,
        dummy if p.bias is None else p.bias, h0, out, last, saved,
        p.dim, p.seqlen, p.dstate, p.nchunks, p.span, p.cpg_b, p.cpg_c, launch.nblk,
        *p.u_s, *p.delta_s, *p.z_s, *out_s, *p.A.stride(), *p.B_s, *p.C_s, *h0.stride(),
        SOFTPLUS=bool(delta_softplus), HAS_H0=p.h0 is not None, **launch.constexprs, **launch.options, **p.flags(),
    )
    return out_full, last, saved


def bwd_blocks(programs_per_block: int, per_unit: int, partial_bytes: int, grad_bytes: int,
               target_programs: int, workspace_cap: int = 256 << 20) -> int:
    """Channel blocks one backward program walks (``n_sub``) when B or C is variable.

    A program writes one (N, L) fp32 partial per variable operand (``partial_bytes``) covering its
    channels, so fewer, longer programs need less workspace but leave SMs idle. Take the most blocks
    per program that still launch ``target_programs`` programs, then raise it while the partials
    exceed ``workspace_cap`` or 8x the gradients (``grad_bytes``), whichever is larger.
    ``programs_per_block``: programs launched per block index (batch * units); ``per_unit``: channel
    blocks per unit.
    """
    if partial_bytes == 0:
        return 1
    options = range(1, per_unit + 1)
    ok = [k for k in options if programs_per_block * triton.cdiv(per_unit, k) >= target_programs]
    n_sub = ok[-1] if ok else 1
    cap = max(workspace_cap, 8 * grad_bytes)
    while n_sub < per_unit and programs_per_block * triton.cdiv(per_unit, n_sub) * partial_bytes > cap:
        n_sub += 1
    return triton.cdiv(per_unit, triton.cdiv(per_unit, n_sub))  # the same programs, blocks balanced


def _target_programs(device: torch.device) -> int:
    if device.type == "cuda":
        return 4 * torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def scan_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, initial_state, saved, delta_softplus: bool,
             reverse: bool, n_sub: int | None = None):
    """Backward: (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state), None for absent inputs.

    Reductions over batch / channels are summed here from per-row partials in a fixed order.
    """
    p = _Args(u, delta, A, B, C, D, z, delta_bias, initial_state, reverse)
    dev = u.device
    want = saved_shape(p.batch, p.dim, p.seqlen, p.dstate)
    if tuple(saved.shape) != want or saved.dtype != torch.float32 or not saved.is_contiguous():
        raise ValueError(f"saved: expected the triton forward's states {want} float32 (contiguous), "
                         f"got {tuple(saved.shape)} {saved.dtype}")
    var = [X for X, v in ((B, p.b_var), (C, p.c_var)) if v]
    launch = scan_launch("bwd", batch=p.batch, seqlen=p.seqlen, dstate=p.dstate, span=p.span, units=p.units,
                         partial_bytes=len(var) * p.dstate * p.seqlen * 4, grad_bytes=sum(X.numel() for X in var) * 4,
                         target_programs=_target_programs(dev), n_sub=n_sub)
    nprog = launch.grid[0]

    dout_, dout_s = _seq_view(dout, reverse)
    dlast_ = None if dlast is None else dlast.detach().to(torch.float32).contiguous()
    du_full = _alloc.empty(p.batch, p.dim, p.seqlen, dtype=u.dtype, device=dev)
    ddelta_full = _alloc.empty(p.batch, p.dim, p.seqlen, dtype=delta.dtype, device=dev)
    dz_full = None if z is None else _alloc.empty(p.batch, p.dim, p.seqlen, dtype=z.dtype, device=dev)
    du, du_s = _seq_view(du_full, reverse)
    ddelta_, ddelta_s = _seq_view(ddelta_full, reverse)
    dz, dz_s = _seq_view(dz_full, reverse) if dz_full is not None else (du, (0, 0, 0))
    dA_rows = _alloc.empty(p.batch, p.dim, p.dstate, dtype=torch.float32, device=dev)
    dD_rows = None if D is None else _alloc.empty(p.batch, p.dim, dtype=torch.float32, device=dev)
    dbias_rows = None if delta_bias is None else _alloc.empty(p.batch, p.dim, dtype=torch.float32, device=dev)
    # The backward's carry dL/dh per channel (ends as dL/d initial_state): needed with or without h0.
    dh0 = _alloc.empty(p.batch, p.dim, p.dstate, dtype=torch.float32, device=dev)

    def grad_buffer(var: bool):
        """Variable: partials (batch, programs, N, L) (L view for the scan order); constant: rows (batch, dim, N)."""
        if var:
            buf = _alloc.empty(p.batch, nprog, p.dstate, p.seqlen, dtype=torch.float32, device=dev)
            view, strides = buf, buf.stride()
            if reverse:
                view, strides = buf[..., p.seqlen - 1:], (*strides[:3], -strides[3])
            return buf, view, strides
        buf = _alloc.empty(p.batch, p.dim, p.dstate, dtype=torch.float32, device=dev)
        return buf, buf, (*buf.stride(), 0)

    dB_buf, dB_view, dB_s = grad_buffer(p.b_var)
    dC_buf, dC_view, dC_s = grad_buffer(p.c_var)
    dummy = dA_rows
    _selective_scan_bwd_kernel[launch.grid](
        p.u, p.delta, p.A, p.B, p.C, dummy if p.D is None else p.D, p.u if p.z is None else p.z,
        dummy if p.bias is None else p.bias, saved, dout_, dummy if dlast_ is None else dlast_,
        du, ddelta_, dz, dA_rows, dB_view, dC_view,
        dummy if dD_rows is None else dD_rows, dummy if dbias_rows is None else dbias_rows,
        dh0,
        p.dim, p.seqlen, p.dstate, p.nchunks, p.span, p.cpg_b, p.cpg_c, launch.nblk, launch.n_sub,
        *p.u_s, *p.delta_s, *p.z_s, *dout_s, *du_s, *ddelta_s, *dz_s, *p.A.stride(), *p.B_s, *p.C_s,
        *dB_s, *dC_s,
        SOFTPLUS=bool(delta_softplus), HAS_DLAST=dlast_ is not None, **launch.constexprs, **launch.options,
        **p.flags(),
    )

    def fold(buf: torch.Tensor, X: torch.Tensor, var: bool) -> torch.Tensor:
        if not var:
            return buf.sum(0).to(X.dtype)
        groups = 1 if X.dim() == 3 else X.shape[1]
        g = buf.view(p.batch, groups, nprog // groups, p.dstate, p.seqlen).sum(2)
        return (g[:, 0] if X.dim() == 3 else g).to(X.dtype)

    def rows(buf, like):
        return None if buf is None else buf.sum(0).to(like.dtype)

    return (du_full, ddelta_full, rows(dA_rows, A), fold(dB_buf, B, p.b_var), fold(dC_buf, C, p.c_var),
            rows(dD_rows, D), dz_full, rows(dbias_rows, delta_bias),
            None if initial_state is None else dh0.to(initial_state.dtype))
