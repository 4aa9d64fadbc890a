"""Flash-attention core in Triton: forward, backward, and the table of shipped configurations.

One kernel family serves every attention op of ditkernels. Three compile-time plug-ins select
what a launch computes, so no op copies the kernel:

- ``SCHEDULE``: 0 dense (every KV tile), 1 CSR (the tiles of a :class:`ditkernels.schedule.BlockSchedule`),
  2 CSR over token tables (a :class:`ditkernels.schedule.TiledSchedule`: 2-D/3-D tiles of a grid);
- ``MASK``: the element-mask id evaluated on *partial* CSR visits only (:func:`_element_mask`);
- ``EPILOGUE``: 0 none, 1 ``out = row_scale * out + residual`` before the store (forward only).

Kernels (names follow the layers: kernel -> launcher):

- ``_flash_fwd_kernel``: FlashAttention-2 online softmax, exp2 with ``scale * log2(e)`` folded,
  fp32 accumulation; writes ``out`` (input dtype) and ``lse`` (fp32, natural log).
- ``_flash_bwd_preprocess_kernel``: ``delta = rowsum(do * out)`` and the log2-domain lse.
- ``_flash_bwd_dkdv_kernel``: one program per (KV tile, batch*head), looping over the query tiles
  that visit it (dense: all; CSR: ``schedule.transposed()``).
- ``_flash_bwd_dq_kernel``: one program per (query tile, batch*head) over its KV tiles.

No atomics anywhere: every output element is written by exactly one program, so results are
deterministic. The launchers honour a schedule's ``block_m``/``block_n``; a kernel whose own tile
is smaller walks each schedule tile in sub-tiles (``SCHED_BM // BLOCK_M`` per tile), which keeps the
backward kernels within their register budget for any forward tile size.

Token indices of a tile come from :func:`_q_tokens` / :func:`_kv_tokens`: contiguous ranges, or with
``SCHEDULE=2`` the rows of the schedule's ``q_tokens`` / ``kv_tokens`` tables (int32, padded with the
sequence length, so every load and store is masked by ``token < seq``). A kernel sub-tile ``c`` of
schedule tile ``t`` is entry ``t * (SCHED_BM // BLOCK_M) + c`` of the table read as rows of BLOCK_M,
the same index arithmetic as contiguous tiles.

``COUNT`` (tests only): each visit of the CSR adds 1 to ``Count[q_tile, kv_tile]`` and its ``partial``
flag to ``Count[plane + ...]`` (atomics, one program per schedule tile and batch*head), so a test can
check that a kernel visits exactly the schedule's tiles.

``BLOCK_DK`` (``Config.block_dk``; fp32 configs only) is the head-dim chunk of the products that
contract over the head dim (S = Q K^T, dP = dO V^T, and K Q^T, V dO^T in the dK/dV kernel): with
BLOCK_DK < BLOCK_D they are accumulated chunk by chunk from operands re-read from memory
(:func:`_dot_head_dim`), so no CUDA-core FMA dot holds a whole head dim in registers. fp16/bf16 run
BLOCK_DK == BLOCK_D (one tensor-core dot per product).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from ditkernels import _alloc

from . import _interpreter, archs

# Element-mask and epilogue ids: the same values as ditkernels.schedule.
MASK_NONE = 0
MASK_BAND = 2
MASK_THRESHOLD = 3  # keep scores >= a per-row threshold (exact top-k); MaskParams is then fp32 (B*H*Sq)
EPILOGUE_NONE = 0
EPILOGUE_SCALE_RESIDUAL = 1
SCHEDULE_DENSE = 0
SCHEDULE_CSR = 1
SCHEDULE_TILED = 2
MASK_LOCAL = 1

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

BLOCK_D_BUCKETS = (16, 32, 64, 128, 256)
KERNELS = ("fwd", "bwd_preprocess", "bwd_dkdv", "bwd_dq")


# --------------------------------------------------------------------------------------------
# Plug-in hooks
# --------------------------------------------------------------------------------------------

@triton.jit
def _q_tokens(tile, q_tok, BLOCK_M: tl.constexpr, SCHEDULE: tl.constexpr):
    """Query token indices of query tile ``tile`` (tiles of BLOCK_M rows): contiguous, or with
    SCHEDULE=2 row ``tile`` of the token table ``q_tok`` read as rows of BLOCK_M."""
    offs = tile * BLOCK_M + tl.arange(0, BLOCK_M)
    if SCHEDULE == 2:
        offs = tl.load(q_tok + offs)
    return offs


@triton.jit
def _kv_tokens(tile, kv_tok, BLOCK_N: tl.constexpr, SCHEDULE: tl.constexpr):
    """Key token indices of KV tile ``tile`` (tiles of BLOCK_N keys); see :func:`_q_tokens`."""
    offs = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    if SCHEDULE == 2:
        offs = tl.load(kv_tok + offs)
    return offs


@triton.jit
def _local_range(p, n, r, t, shape, border):
    """[lo, hi] of the key coordinates visible from query coordinate ``p`` along one grid dimension
    of size ``n``, radius ``r``, STA tile ``t`` (the bounding box of a circle: ``|d| < r``).
    Radii are clamped to the dimension so nothing overflows int32."""
    rr = tl.minimum(r, n)
    lo = p - rr  # square, clip
    hi = p + rr
    lo = tl.where(shape == 0, p - rr + 1, lo)  # circle box; r = 0: empty
    hi = tl.where(shape == 0, p + rr - 1, hi)
    tp = p // t
    lo = tl.where(shape == 2, (tp - rr) * t, lo)  # tile: |tile(p) - tile(q)| <= r
    hi = tl.where(shape == 2, (tp + rr + 1) * t - 1, hi)
    k = 2 * rr + 1  # square, shift (NATTEN): [s, s + k) with s = clamp(p - r, 0, n - k); whole dim if n < k
    s = tl.minimum(tl.maximum(p - rr, 0), n - k)
    shift = (shape == 1) & (border == 1)
    lo = tl.where(shift, tl.where(n >= k, s, 0), lo)
    hi = tl.where(shift, tl.where(n >= k, s + k - 1, n - 1), hi)
    return lo, hi


@triton.jit
def _local_mask(offs_m, offs_n, params):
    """docs/spec.md §1 visibility of (query, key) token pairs from ``LocalSpec.mask_params()``
    ``[ndim, P, S, M, shape, border, n0, n1, n2, r0, r1, r2, t0, t1, t2, G, q0, nq, k0, nk]`` (the
    rule of ``csrc/cpu/local_mask.h`` and ``reference/local.py``): global queries see every non-extra
    key; grid queries see global and extra keys and the grid keys of their window (circle: the box
    test per dimension, then ``sum_a d_a^2 prod_{b!=a} r_b^2 < prod r^2`` in int64). Keys are
    ``[P][grid tokens k0..k0+nk][S][M]``, queries ``[P][grid tokens q0..q0+nq][S]`` (G = 1) or the
    grid tokens alone (G = 0), in the coordinates of the whole grid."""
    P = tl.load(params + 1)
    S = tl.load(params + 2)
    shape = tl.load(params + 4)
    border = tl.load(params + 5)
    n0 = tl.load(params + 6)
    n1 = tl.load(params + 7)
    n2 = tl.load(params + 8)
    r0 = tl.load(params + 9)
    r1 = tl.load(params + 10)
    r2 = tl.load(params + 11)
    qP = tl.load(params + 15) * P
    q0 = tl.load(params + 16)
    nq = tl.load(params + 17)
    k0 = tl.load(params + 18)
    nk = tl.load(params + 19)
    # Row-major grid coordinates (garbage for non-grid tokens, which the class test discards).
    gq = offs_m - qP + q0
    gk = offs_n - P + k0
    qx = gq % n2
    qy = (gq // n2) % n1
    qt = gq // (n1 * n2)
    kx = gk % n2
    ky = (gk // n2) % n1
    kt = gk // (n1 * n2)
    lo, hi = _local_range(qt, n0, r0, tl.load(params + 12), shape, border)
    win = (kt >= lo) & (kt <= hi)
    lo, hi = _local_range(qy, n1, r1, tl.load(params + 13), shape, border)
    win = win & (ky >= lo) & (ky <= hi)
    lo, hi = _local_range(qx, n2, r2, tl.load(params + 14), shape, border)
    win = win & (kx >= lo) & (kx <= hi)
    if shape == 0:
        # |d_a| < r_a already holds where win is set; clamping keeps every term below prod r^2 < 2^60.
        a0 = r0.to(tl.int64) * r0
        a1 = r1.to(tl.int64) * r1
        a2 = r2.to(tl.int64) * r2
        dt = tl.minimum(tl.abs(qt - kt), r0).to(tl.int64)
        dy = tl.minimum(tl.abs(qy - ky), r1).to(tl.int64)
        dx = tl.minimum(tl.abs(qx - kx), r2).to(tl.int64)
        acc = dt * dt * (a1 * a2) + dy * dy * (a0 * a2) + dx * dx * (a0 * a1)
        win = win & (acc < a0 * a1 * a2)
    q_grid = (offs_m >= qP) & (offs_m < qP + nq)
    k_grid = (offs_n >= P) & (offs_n < P + nk)
    return tl.where(q_grid, tl.where(k_grid, win, True), offs_n < P + nk + S)


@triton.jit
def _element_mask(offs_m, offs_n, mask_params_ptr, MASK: tl.constexpr):
    """Visibility of (query, key) pairs on a partial tile.

    offs_m, offs_n: query / key token indices, already broadcastable to the tile's 2-D shape
    (``offs_m[:, None], offs_n[None, :]`` in the forward, transposed in the dK/dV kernel).
    mask_params_ptr: int32 parameters of the rule (``ElementMask.params``).
    New mask kinds add a ``MASK == id`` branch here; kernels only call this on partial visits.
    """
    # MASK_NONE (and MASK_THRESHOLD, which tests scores: _row_threshold): every pair is visible.
    vis = (offs_m >= 0) & (offs_n >= 0)
    if MASK == 1:
        vis = _local_mask(offs_m, offs_n, mask_params_ptr)
    elif MASK == 2:
        vis = _band_mask(offs_m, offs_n, mask_params_ptr)
    return vis


@triton.jit
def _band_mask(offs_m, offs_n, mask_params_ptr):
    """MASK_BAND (Re-ttention): params (half, lo, hi, frame); tokens outside [lo, hi) are global;
    grid tokens see each other iff |f(i) - f(j)| <= half, f(i) = i - lo (or (i - lo) % frame)."""
    half = tl.load(mask_params_ptr)
    lo = tl.load(mask_params_ptr + 1)
    hi = tl.load(mask_params_ptr + 2)
    frame = tl.load(mask_params_ptr + 3)
    period = tl.where(frame > 0, frame, 1 << 30)  # no frames: a period longer than any sequence
    glob = (offs_m < lo) | (offs_m >= hi) | (offs_n < lo) | (offs_n >= hi)
    d = (offs_m - lo) % period - (offs_n - lo) % period
    return glob | ((d <= half) & (d >= -half))


@triton.jit
def _row_threshold(thr_ptr, offs_m, seq_q):
    """MASK_THRESHOLD: per-row thresholds (log2-scaled score units) of query rows ``offs_m`` of this
    batch*head (``thr_ptr`` already offset); rows past seq_q get +inf (nothing visible). The forward
    and dQ kernels load their rows' thresholds once and pass them as ``mask_params``; the dK/dV kernel
    loads them per query tile."""
    return tl.load(thr_ptr + offs_m, mask=offs_m < seq_q, other=float("inf"))


# --------------------------------------------------------------------------------------------
# Shared helpers
# --------------------------------------------------------------------------------------------

@triton.jit
def _program(H):
    """Grid (tiles, batch*heads): this program's tile, batch*head, batch and head (int64)."""
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    return pid, pid_bh, b, h


@triton.jit
def _sched_row(pid, pid_bh, KvPtr, KvIdx, Partial, stride_sched_ptr, stride_sched_idx, sched_head_stride,
               PER: tl.constexpr):
    """SCHEDULE != 0: the CSR row of schedule tile ``st = pid // PER`` (``PER`` program tiles per
    schedule tile) of this batch*head; entries ``[start, end)`` of ``idx_base`` (the visited tiles)
    and ``part_base`` (their partial flags). Returns (st, start, end, idx_base, part_base)."""
    srow = pid_bh * sched_head_stride
    ptr_base = KvPtr + srow * stride_sched_ptr
    idx_base = KvIdx + srow * stride_sched_idx
    part_base = Partial + srow * stride_sched_idx
    st = pid // PER
    start = tl.load(ptr_base + st)
    end = tl.load(ptr_base + st + 1)
    return st, start, end, idx_base, part_base


@triton.jit
def _sched_entry(e, idx_base, part_base, pid, st, Count, count_stride, count_plane, PER: tl.constexpr,
                 COUNT: tl.constexpr, TRANSPOSED: tl.constexpr):
    """CSR entry ``e`` of :func:`_sched_row`: (tile, partial). With COUNT the first program of the
    schedule tile counts the visit (``Count[q_tile, kv_tile]``; TRANSPOSED: ``st`` is the KV tile)."""
    tile = tl.load(idx_base + e)
    part = tl.load(part_base + e)
    if COUNT:
        if pid % PER == 0:
            if TRANSPOSED:
                tl.atomic_add(Count + tile * count_stride + st, 1)
                tl.atomic_add(Count + count_plane + tile * count_stride + st, part)
            else:
                tl.atomic_add(Count + st * count_stride + tile, 1)
                tl.atomic_add(Count + count_plane + st * count_stride + tile, part)
    return tile, part


@triton.jit
def _query_tile(pid_m, pid_bh, q_tok, mask_params, seq_q, BLOCK_M: tl.constexpr, SCHEDULE: tl.constexpr,
                MASK: tl.constexpr):
    """A program that owns a query tile (forward, dQ): its query token indices and mask parameters,
    with MASK_THRESHOLD its rows' thresholds (:func:`_row_threshold`, loaded once)."""
    offs_m = _q_tokens(pid_m, q_tok, BLOCK_M, SCHEDULE)
    if MASK == 3:
        mask_params = _row_threshold(mask_params + pid_bh.to(tl.int64) * seq_q, offs_m, seq_q)
    return offs_m, mask_params


@triton.jit
def _load_rows(base, offs_r, offs_d, stride_r, stride_d, n_rows, head_dim,
               CHECK_ROWS: tl.constexpr, EVEN_D: tl.constexpr):
    """Load a (rows, BLOCK_D) tile; out-of-range rows / padded head dims read as 0."""
    ptrs = base + offs_r[:, None] * stride_r + offs_d[None, :] * stride_d
    if CHECK_ROWS:
        if EVEN_D:
            x = tl.load(ptrs, mask=offs_r[:, None] < n_rows, other=0.0)
        else:
            x = tl.load(ptrs, mask=(offs_r[:, None] < n_rows) & (offs_d[None, :] < head_dim), other=0.0)
    else:
        if EVEN_D:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=offs_d[None, :] < head_dim, other=0.0)
    return x


@triton.jit
def _resident_rows(base, offs_r, offs_d, stride_r, stride_d, n_rows, head_dim, BLOCK_D: tl.constexpr,
                   BLOCK_DK: tl.constexpr, EVEN_D: tl.constexpr):
    """The tile a program keeps in registers for its whole walk (:func:`_load_rows`, rows checked),
    or 0.0 with a chunked head dim (BLOCK_DK < BLOCK_D): its chunks are re-read per tile (L1/L2)."""
    if BLOCK_DK < BLOCK_D:
        x = 0.0
    else:
        x = _load_rows(base, offs_r, offs_d, stride_r, stride_d, n_rows, head_dim, True, EVEN_D)
    return x


@triton.jit
def _store_rows(base, x, offs_r, offs_d, stride_r, stride_d, n_rows, head_dim, EVEN_D: tl.constexpr):
    ptrs = base + offs_r[:, None] * stride_r + offs_d[None, :] * stride_d
    if EVEN_D:
        tl.store(ptrs, x, mask=offs_r[:, None] < n_rows)
    else:
        tl.store(ptrs, x, mask=(offs_r[:, None] < n_rows) & (offs_d[None, :] < head_dim))


@triton.jit
def _dot_head_dim(a_base, offs_a, stride_ar, stride_ad, n_a, b_base, offs_b, stride_br, stride_bd, n_b, head_dim,
                  ROWS_A: tl.constexpr, ROWS_B: tl.constexpr, CHECK_A: tl.constexpr, CHECK_B: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_DK: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """``A[offs_a, :] @ B[offs_b, :]^T`` -> (ROWS_A, ROWS_B) fp32, contracted over the head dim in chunks
    of BLOCK_DK columns that are loaded from memory per chunk (the fp32 path, see ``_fill``).

    A FMA (CUDA-core) ``tl.dot`` holds a thread's rows of both operands over the whole contraction
    in registers; chunking bounds that to BLOCK_DK columns whatever the head dim. The re-reads hit
    L1/L2. Chunks past ``head_dim`` are skipped; the accumulation stays IEEE fp32.
    """
    acc = tl.zeros([ROWS_A, ROWS_B], tl.float32)
    if EVEN_D:
        n_chunks = BLOCK_D // BLOCK_DK
    else:
        n_chunks = tl.cdiv(head_dim, BLOCK_DK)
    for c in range(0, n_chunks):
        offs_d = c * BLOCK_DK + tl.arange(0, BLOCK_DK)
        a = _load_rows(a_base, offs_a, offs_d, stride_ar, stride_ad, n_a, head_dim, CHECK_A, EVEN_D)
        b = _load_rows(b_base, offs_b, offs_d, stride_br, stride_bd, n_b, head_dim, CHECK_B, EVEN_D)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=DOT_PREC)
    return acc


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------

@triton.jit
def _fwd_tile(acc, m_i, l_i, q, q_base, k_base, v_base, offs_m, offs_d, j, part, seq_q, seq_k, head_dim,
              stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, mask_params, k_tok,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DK: tl.constexpr,
              MASK: tl.constexpr, SCHEDULE: tl.constexpr, CHECK_N: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """One KV tile ``j`` (of BLOCK_N keys) of the online softmax; returns (acc, m_i, l_i).
    With BLOCK_DK < BLOCK_D, ``q`` is unused: S is contracted in head-dim chunks read from q_base."""
    offs_n = _kv_tokens(j, k_tok, BLOCK_N, SCHEDULE)
    if BLOCK_DK < BLOCK_D:
        s = _dot_head_dim(q_base, offs_m, stride_qm, stride_qd, seq_q, k_base, offs_n, stride_kn, stride_kd, seq_k,
                          head_dim, BLOCK_M, BLOCK_N, True, CHECK_N, BLOCK_D, BLOCK_DK, EVEN_D, DOT_PREC)
        v = _load_rows(v_base, offs_n, offs_d, stride_vn, stride_vd, seq_k, head_dim, CHECK_N, EVEN_D)
    else:
        k = _load_rows(k_base, offs_n, offs_d, stride_kn, stride_kd, seq_k, head_dim, CHECK_N, EVEN_D)
        v = _load_rows(v_base, offs_n, offs_d, stride_vn, stride_vd, seq_k, head_dim, CHECK_N, EVEN_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    s = s * qk_scale  # log2 domain
    if SCHEDULE == 2:
        s = tl.where(offs_n[None, :] < seq_k, s, float("-inf"))  # token tables: padded slots anywhere
    elif CHECK_N:
        if (j + 1) * BLOCK_N > seq_k:
            s = tl.where(offs_n[None, :] < seq_k, s, float("-inf"))
    if MASK != 0:
        if part != 0:
            s = tl.where(_element_mask(offs_m[:, None], offs_n[None, :], mask_params, MASK), s, float("-inf"))
    if MASK == 3:  # mask_params: this program's row thresholds (loaded once by the kernel)
        if part != 0:
            s = tl.where(s >= mask_params[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no visible key keeps m = -inf; subtract 0 instead so exp2 gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _flash_fwd_kernel(
    Q, K, V, Out, Lse,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    H, seq_q, seq_k, head_dim, qk_scale,
    KvPtr, KvIdx, Partial, stride_sched_ptr, stride_sched_idx, sched_head_stride,
    MaskParams, QTok, KTok, Count, count_stride, count_plane,
    RowScale, Residual,
    stride_sb, stride_sh, stride_sm,
    stride_rb, stride_rh, stride_rm, stride_rd,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DK: tl.constexpr,
    SCHED_BM: tl.constexpr, SCHED_BN: tl.constexpr,
    SCHEDULE: tl.constexpr, MASK: tl.constexpr, EPILOGUE: tl.constexpr,
    EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr, COUNT: tl.constexpr = False,
):
    pid_m, pid_bh, b, h = _program(H)
    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    offs_m, MaskParams = _query_tile(pid_m, pid_bh, QTok, MaskParams, seq_q, BLOCK_M, SCHEDULE, MASK)
    offs_d = tl.arange(0, BLOCK_D)
    q = _resident_rows(q_base, offs_m, offs_d, stride_qm, stride_qd, seq_q, head_dim, BLOCK_D, BLOCK_DK, EVEN_D)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    if SCHEDULE == 0:
        n_full = seq_k // BLOCK_N
        for j in range(0, n_full):
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, q_base, k_base, v_base, offs_m, offs_d, j, 0, seq_q, seq_k,
                                      head_dim, stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd,
                                      qk_scale, MaskParams, KTok, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DK, MASK, SCHEDULE, False,
                                      EVEN_D, DOT_PREC)
        if n_full * BLOCK_N < seq_k:
            acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, q_base, k_base, v_base, offs_m, offs_d, n_full, 0, seq_q, seq_k,
                                      head_dim, stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd,
                                      qk_scale, MaskParams, KTok, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DK, MASK, SCHEDULE, True,
                                      EVEN_D, DOT_PREC)
    else:
        st, start, end, idx_base, part_base = _sched_row(pid_m, pid_bh, KvPtr, KvIdx, Partial, stride_sched_ptr,
                                                         stride_sched_idx, sched_head_stride, SCHED_BM // BLOCK_M)
        for e in range(start, end):
            tile, part = _sched_entry(e, idx_base, part_base, pid_m, st, Count, count_stride, count_plane,
                                      SCHED_BM // BLOCK_M, COUNT, False)
            if SCHED_BN == BLOCK_N:
                acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, q_base, k_base, v_base, offs_m, offs_d, tile, part, seq_q,
                                          seq_k, head_dim, stride_qm, stride_qd, stride_kn, stride_kd, stride_vn,
                                          stride_vd, qk_scale, MaskParams, KTok, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DK,
                                          MASK, SCHEDULE, True, EVEN_D, DOT_PREC)
            else:
                for c in range(0, SCHED_BN // BLOCK_N):
                    acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, q, q_base, k_base, v_base, offs_m, offs_d,
                                              tile * (SCHED_BN // BLOCK_N) + c, part, seq_q, seq_k, head_dim,
                                              stride_qm, stride_qd, stride_kn, stride_kd, stride_vn, stride_vd,
                                              qk_scale, MaskParams, KTok, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DK, MASK, SCHEDULE,
                                              True, EVEN_D, DOT_PREC)

    # Rows with no visible key have l_i == 0: out = 0, lse = -inf.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    if EPILOGUE == 1:
        rs = tl.load(RowScale + b * stride_sb + h * stride_sh + offs_m * stride_sm, mask=offs_m < seq_q, other=0.0)
        res = _load_rows(Residual + b * stride_rb + h * stride_rh, offs_m, offs_d, stride_rm, stride_rd,
                         seq_q, head_dim, True, EVEN_D)
        out = out * rs[:, None] + res.to(tl.float32)
    _store_rows(Out + b * stride_ob + h * stride_oh, out.to(Out.dtype.element_ty), offs_m, offs_d,
                stride_om, stride_od, seq_q, head_dim, EVEN_D)
    tl.store(Lse + pid_bh.to(tl.int64) * seq_q + offs_m, lse, mask=offs_m < seq_q)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------

@triton.jit
def _flash_bwd_preprocess_kernel(
    Out, DO, Lse, Delta, Lse2,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_db, stride_dh, stride_dm, stride_dd,
    stride_lb, stride_lh, stride_lm,
    H, seq_q, head_dim,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, EVEN_D: tl.constexpr,
):
    """delta = rowsum(do * out) (fp32) and lse2 = lse * log2(e), with -inf rows mapped to +inf
    so that exp2(s - lse2) is 0 for rows that saw no key."""
    pid_m, pid_bh, b, h = _program(H)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_rows(Out + b * stride_ob + h * stride_oh, offs_m, offs_d, stride_om, stride_od,
                   seq_q, head_dim, True, EVEN_D).to(tl.float32)
    do = _load_rows(DO + b * stride_db + h * stride_dh, offs_m, offs_d, stride_dm, stride_dd,
                    seq_q, head_dim, True, EVEN_D).to(tl.float32)
    delta = tl.sum(o * do, 1)
    lse = tl.load(Lse + b * stride_lb + h * stride_lh + offs_m * stride_lm, mask=offs_m < seq_q, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    row = pid_bh.to(tl.int64) * seq_q + offs_m
    tl.store(Delta + row, delta, mask=offs_m < seq_q)
    tl.store(Lse2 + row, lse2, mask=offs_m < seq_q)


@triton.jit
def _dkdv_tile(dk, dv, k, v, k_base, v_base, q_base, do_base, lse2_base, delta_base, offs_n, offs_d, i, part,
               seq_q, seq_k, head_dim, stride_kn, stride_kd, stride_vn, stride_vd,
               stride_qm, stride_qd, stride_dom, stride_dod, qk_scale, mask_params, q_tok,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DK: tl.constexpr,
               MASK: tl.constexpr, SCHEDULE: tl.constexpr, CHECK_M: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr,
               OUT_DK: tl.constexpr, OUT_DV: tl.constexpr):
    """Contribution of query tile ``i`` (BLOCK_M rows) to this program's dK, dV (transposed math).
    With BLOCK_DK < BLOCK_D, ``k``/``v`` are unused: s_t and dp_t are contracted in head-dim chunks
    read from k_base/q_base and v_base/do_base, and only the full tiles a product needs are loaded."""
    offs_m = _q_tokens(i, q_tok, BLOCK_M, SCHEDULE)
    if BLOCK_DK == BLOCK_D:
        q = _load_rows(q_base, offs_m, offs_d, stride_qm, stride_qd, seq_q, head_dim, CHECK_M, EVEN_D)
        do = _load_rows(do_base, offs_m, offs_d, stride_dom, stride_dod, seq_q, head_dim, CHECK_M, EVEN_D)
    if CHECK_M:
        lse2 = tl.load(lse2_base + offs_m, mask=offs_m < seq_q, other=float("inf"))
        delta = tl.load(delta_base + offs_m, mask=offs_m < seq_q, other=0.0)
    else:
        lse2 = tl.load(lse2_base + offs_m)
        delta = tl.load(delta_base + offs_m)
    if BLOCK_DK < BLOCK_D:
        s_t = _dot_head_dim(k_base, offs_n, stride_kn, stride_kd, seq_k, q_base, offs_m, stride_qm, stride_qd, seq_q,
                            head_dim, BLOCK_N, BLOCK_M, True, CHECK_M, BLOCK_D, BLOCK_DK, EVEN_D, DOT_PREC)
    else:
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC)
    s_t = s_t * qk_scale  # (BLOCK_N, BLOCK_M)
    if MASK == 3:  # below-threshold scores -> -inf before exp2, so no second (BLOCK_N, BLOCK_M) tile stays live
        if part != 0:
            s_t = tl.where(s_t >= tl.load(mask_params + offs_m)[None, :], s_t, float("-inf"))
    p_t = tl.math.exp2(s_t - lse2[None, :])
    if MASK != 0:
        if part != 0:
            p_t = tl.where(_element_mask(offs_m[None, :], offs_n[:, None], mask_params, MASK), p_t, 0.0)
    if OUT_DV:
        if BLOCK_DK < BLOCK_D:
            do = _load_rows(do_base, offs_m, offs_d, stride_dom, stride_dod, seq_q, head_dim, CHECK_M, EVEN_D)
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=DOT_PREC)
    if OUT_DK:
        if BLOCK_DK < BLOCK_D:
            dp_t = _dot_head_dim(v_base, offs_n, stride_vn, stride_vd, seq_k, do_base, offs_m, stride_dom, stride_dod,
                                 seq_q, head_dim, BLOCK_N, BLOCK_M, True, CHECK_M, BLOCK_D, BLOCK_DK, EVEN_D, DOT_PREC)
            q = _load_rows(q_base, offs_m, offs_d, stride_qm, stride_qd, seq_q, head_dim, CHECK_M, EVEN_D)
        else:
            dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def _flash_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, Lse2, Delta,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    H, seq_q, seq_k, head_dim, qk_scale, sm_scale,
    KvPtr, KvIdx, Partial, stride_sched_ptr, stride_sched_idx, sched_head_stride,
    MaskParams, QTok, KTok, Count, count_stride, count_plane,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DK: tl.constexpr,
    SCHED_BM: tl.constexpr, SCHED_BN: tl.constexpr,
    SCHEDULE: tl.constexpr, MASK: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr,
    OUT_DK: tl.constexpr, OUT_DV: tl.constexpr, COUNT: tl.constexpr = False,
):
    """Grid (cdiv(seq_k, BLOCK_N), batch*heads). With SCHEDULE=1 the CSR is the *transposed*
    schedule (KV tiles of SCHED_BN keys -> query tiles of SCHED_BM rows). OUT_DK / OUT_DV select
    the outputs: configs short of registers (head_dim 256) run one launch for each, with one
    accumulator live instead of two."""
    pid_n, pid_bh, b, h = _program(H)
    q_base = Q + b * stride_qb + h * stride_qh
    do_base = DO + b * stride_dob + h * stride_doh
    lse2_base = Lse2 + pid_bh.to(tl.int64) * seq_q
    delta_base = Delta + pid_bh.to(tl.int64) * seq_q
    if MASK == 3:
        MaskParams += pid_bh.to(tl.int64) * seq_q

    offs_n = _kv_tokens(pid_n, KTok, BLOCK_N, SCHEDULE)
    offs_d = tl.arange(0, BLOCK_D)
    k_base = K + b * stride_kb + h * stride_kh
    k = _resident_rows(k_base, offs_n, offs_d, stride_kn, stride_kd, seq_k, head_dim, BLOCK_D, BLOCK_DK, EVEN_D)
    v_base = V + b * stride_vb + h * stride_vh
    v = _resident_rows(v_base, offs_n, offs_d, stride_vn, stride_vd, seq_k, head_dim, BLOCK_D, BLOCK_DK, EVEN_D)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    if SCHEDULE == 0:
        m_full = seq_q // BLOCK_M
        for i in range(0, m_full):
            dk, dv = _dkdv_tile(dk, dv, k, v, k_base, v_base, q_base, do_base, lse2_base, delta_base, offs_n, offs_d,
                                i, 0, seq_q, seq_k, head_dim, stride_kn, stride_kd, stride_vn, stride_vd,
                                stride_qm, stride_qd, stride_dom, stride_dod, qk_scale, MaskParams, QTok,
                                BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DK, MASK, SCHEDULE, False, EVEN_D, DOT_PREC, OUT_DK, OUT_DV)
        if m_full * BLOCK_M < seq_q:
            dk, dv = _dkdv_tile(dk, dv, k, v, k_base, v_base, q_base, do_base, lse2_base, delta_base, offs_n, offs_d,
                                m_full, 0, seq_q, seq_k, head_dim, stride_kn, stride_kd, stride_vn, stride_vd,
                                stride_qm, stride_qd, stride_dom, stride_dod, qk_scale, MaskParams, QTok,
                                BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DK, MASK, SCHEDULE, True, EVEN_D, DOT_PREC, OUT_DK, OUT_DV)
    else:
        st, start, end, idx_base, part_base = _sched_row(pid_n, pid_bh, KvPtr, KvIdx, Partial, stride_sched_ptr,
                                                         stride_sched_idx, sched_head_stride, SCHED_BN // BLOCK_N)
        for e in range(start, end):
            # Transposed CSR: st is the KV tile; a split dV launch does not count again.
            tile, part = _sched_entry(e, idx_base, part_base, pid_n, st, Count, count_stride, count_plane,
                                      SCHED_BN // BLOCK_N, COUNT and OUT_DK, True)
            if SCHED_BM == BLOCK_M:
                dk, dv = _dkdv_tile(dk, dv, k, v, k_base, v_base, q_base, do_base, lse2_base, delta_base, offs_n,
                                    offs_d, tile, part, seq_q, seq_k, head_dim, stride_kn, stride_kd, stride_vn,
                                    stride_vd, stride_qm, stride_qd, stride_dom, stride_dod, qk_scale, MaskParams, QTok,
                                    BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DK, MASK, SCHEDULE, True, EVEN_D, DOT_PREC,
                                    OUT_DK, OUT_DV)
            else:
                for c in range(0, SCHED_BM // BLOCK_M):
                    dk, dv = _dkdv_tile(dk, dv, k, v, k_base, v_base, q_base, do_base, lse2_base, delta_base, offs_n,
                                        offs_d, tile * (SCHED_BM // BLOCK_M) + c, part, seq_q, seq_k, head_dim,
                                        stride_kn, stride_kd, stride_vn, stride_vd, stride_qm, stride_qd,
                                        stride_dom, stride_dod, qk_scale, MaskParams, QTok, BLOCK_M, BLOCK_N, BLOCK_D,
                                        BLOCK_DK, MASK, SCHEDULE, True, EVEN_D, DOT_PREC, OUT_DK, OUT_DV)

    if OUT_DK:
        dk = dk * sm_scale
        _store_rows(DK + b * stride_dkb + h * stride_dkh, dk.to(DK.dtype.element_ty), offs_n, offs_d,
                    stride_dkn, stride_dkd, seq_k, head_dim, EVEN_D)
    if OUT_DV:
        _store_rows(DV + b * stride_dvb + h * stride_dvh, dv.to(DV.dtype.element_ty), offs_n, offs_d,
                    stride_dvn, stride_dvd, seq_k, head_dim, EVEN_D)


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, q_base, do_base, k_base, v_base, offs_m, offs_d, j, part, seq_q, seq_k, head_dim,
             stride_qm, stride_qd, stride_dom, stride_dod, stride_kn, stride_kd, stride_vn, stride_vd,
             qk_scale, mask_params, k_tok, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
             BLOCK_DK: tl.constexpr, MASK: tl.constexpr, SCHEDULE: tl.constexpr, CHECK_N: tl.constexpr,
             EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr):
    """Contribution of KV tile ``j`` (BLOCK_N keys) to this program's dQ.
    With BLOCK_DK < BLOCK_D, ``q``/``do`` are unused: S and dP are contracted in head-dim chunks."""
    offs_n = _kv_tokens(j, k_tok, BLOCK_N, SCHEDULE)
    if BLOCK_DK < BLOCK_D:
        s = _dot_head_dim(q_base, offs_m, stride_qm, stride_qd, seq_q, k_base, offs_n, stride_kn, stride_kd, seq_k,
                          head_dim, BLOCK_M, BLOCK_N, True, CHECK_N, BLOCK_D, BLOCK_DK, EVEN_D, DOT_PREC)
        dp = _dot_head_dim(do_base, offs_m, stride_dom, stride_dod, seq_q, v_base, offs_n, stride_vn, stride_vd,
                           seq_k, head_dim, BLOCK_M, BLOCK_N, True, CHECK_N, BLOCK_D, BLOCK_DK, EVEN_D, DOT_PREC)
        k = _load_rows(k_base, offs_n, offs_d, stride_kn, stride_kd, seq_k, head_dim, CHECK_N, EVEN_D)
    else:
        k = _load_rows(k_base, offs_n, offs_d, stride_kn, stride_kd, seq_k, head_dim, CHECK_N, EVEN_D)
        v = _load_rows(v_base, offs_n, offs_d, stride_vn, stride_vd, seq_k, head_dim, CHECK_N, EVEN_D)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
    s = s * qk_scale
    if MASK == 3:  # mask_params: this program's row thresholds (loaded once by the kernel)
        if part != 0:
            s = tl.where(s >= mask_params[:, None], s, float("-inf"))
    p = tl.math.exp2(s - lse2[:, None])
    # Keys past seq_k load as 0 but exp2(0 - lse2) need not be small: drop them explicitly.
    if SCHEDULE == 2:
        p = tl.where(offs_n[None, :] < seq_k, p, 0.0)
    elif CHECK_N:
        if (j + 1) * BLOCK_N > seq_k:
            p = tl.where(offs_n[None, :] < seq_k, p, 0.0)
    if MASK != 0:
        if part != 0:
            p = tl.where(_element_mask(offs_m[:, None], offs_n[None, :], mask_params, MASK), p, 0.0)
    if BLOCK_DK == BLOCK_D:
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PREC)
    return dq


@triton.jit
def _flash_bwd_dq_kernel(
    Q, K, V, DO, DQ, Lse2, Delta,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_dom, stride_dod,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    H, seq_q, seq_k, head_dim, qk_scale, sm_scale,
    KvPtr, KvIdx, Partial, stride_sched_ptr, stride_sched_idx, sched_head_stride,
    MaskParams, QTok, KTok, Count, count_stride, count_plane,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DK: tl.constexpr,
    SCHED_BM: tl.constexpr, SCHED_BN: tl.constexpr,
    SCHEDULE: tl.constexpr, MASK: tl.constexpr, EVEN_D: tl.constexpr, DOT_PREC: tl.constexpr,
    COUNT: tl.constexpr = False,
):
    """Grid (cdiv(seq_q, BLOCK_M), batch*heads), same schedule as the forward."""
    pid_m, pid_bh, b, h = _program(H)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    offs_m, MaskParams = _query_tile(pid_m, pid_bh, QTok, MaskParams, seq_q, BLOCK_M, SCHEDULE, MASK)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + b * stride_qb + h * stride_qh
    q = _resident_rows(q_base, offs_m, offs_d, stride_qm, stride_qd, seq_q, head_dim, BLOCK_D, BLOCK_DK, EVEN_D)
    do_base = DO + b * stride_dob + h * stride_doh
    do = _resident_rows(do_base, offs_m, offs_d, stride_dom, stride_dod, seq_q, head_dim, BLOCK_D, BLOCK_DK, EVEN_D)
    row = pid_bh.to(tl.int64) * seq_q + offs_m
    lse2 = tl.load(Lse2 + row, mask=offs_m < seq_q, other=float("inf"))
    delta = tl.load(Delta + row, mask=offs_m < seq_q, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    if SCHEDULE == 0:
        n_full = seq_k // BLOCK_N
        for j in range(0, n_full):
            dq = _dq_tile(dq, q, do, lse2, delta, q_base, do_base, k_base, v_base, offs_m, offs_d,
                          j, 0, seq_q, seq_k, head_dim, stride_qm, stride_qd, stride_dom, stride_dod,
                          stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, MaskParams, KTok,
                          BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DK, MASK, SCHEDULE, False, EVEN_D, DOT_PREC)
        if n_full * BLOCK_N < seq_k:
            dq = _dq_tile(dq, q, do, lse2, delta, q_base, do_base, k_base, v_base, offs_m, offs_d,
                          n_full, 0, seq_q, seq_k, head_dim, stride_qm, stride_qd, stride_dom, stride_dod,
                          stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, MaskParams, KTok,
                          BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DK, MASK, SCHEDULE, True, EVEN_D, DOT_PREC)
    else:
        st, start, end, idx_base, part_base = _sched_row(pid_m, pid_bh, KvPtr, KvIdx, Partial, stride_sched_ptr,
                                                         stride_sched_idx, sched_head_stride, SCHED_BM // BLOCK_M)
        for e in range(start, end):
            tile, part = _sched_entry(e, idx_base, part_base, pid_m, st, Count, count_stride, count_plane,
                                      SCHED_BM // BLOCK_M, COUNT, False)
            if SCHED_BN == BLOCK_N:
                dq = _dq_tile(dq, q, do, lse2, delta, q_base, do_base, k_base, v_base, offs_m, offs_d,
                              tile, part, seq_q, seq_k, head_dim, stride_qm, stride_qd, stride_dom, stride_dod,
                              stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, MaskParams, KTok,
                              BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DK, MASK, SCHEDULE, True, EVEN_D, DOT_PREC)
            else:
                for c in range(0, SCHED_BN // BLOCK_N):
                    dq = _dq_tile(dq, q, do, lse2, delta, q_base, do_base, k_base, v_base, offs_m, offs_d,
                                  tile * (SCHED_BN // BLOCK_N) + c, part, seq_q, seq_k, head_dim,
                                  stride_qm, stride_qd, stride_dom, stride_dod,
                                  stride_kn, stride_kd, stride_vn, stride_vd, qk_scale, MaskParams, KTok,
                                  BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DK, MASK, SCHEDULE, True, EVEN_D, DOT_PREC)

    dq = dq * sm_scale
    _store_rows(DQ + b * stride_dqb + h * stride_dqh, dq.to(DQ.dtype.element_ty), offs_m, offs_d,
                stride_dqm, stride_dqd, seq_q, head_dim, EVEN_D)


# --------------------------------------------------------------------------------------------
# Shipped configurations
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    """Launch configuration of one kernel. block_m: query rows per tile; block_n: keys per tile
    (0 for the preprocess kernel). For bwd_dkdv the program owns a KV tile of block_n keys and walks
    query tiles of block_m rows; for bwd_dq it owns block_m query rows and walks KV tiles of block_n."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int
    split: bool = False  # bwd_dkdv only: one launch for dK and one for dV
    # fwd / bwd_dkdv / bwd_dq: head-dim chunk of the products that contract over the head dim
    # (S = Q K^T, dP = dO V^T and their transposes); 0 = the whole BLOCK_D in one tl.dot.
    block_dk: int = 0
    maxnreg: int = 0  # register cap given to ptxas (.maxnreg); 0: ptxas decides


ARCHS = tuple(archs.ARCHS)  # 80, 86, 89, 90, 100, 120: one config row each (triton_kernels/archs.py)
# Rows that start from another row's configs (the same MMA family) before their own _OVERRIDES: the
# 99 KB mma.sync chips take sm_80's tiles, B200's tcgen05 sm_90's (both 227 KB).
_BASE = {86: 80, 89: 80, 120: 80, 100: 90}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# Launch variants: the plug-ins (SCHEDULE, MASK) of the launches whose config may differ from the
# dense one. local: local attention's token tables and mask (its plans' 64-token tiles); topk: exact
# top-k's score threshold; band: Re-ttention's band mask. An element mask acts only on the partial
# tiles of a schedule, so any other pair runs its schedule's variant (launch_variant).
VARIANTS = {"dense": (SCHEDULE_DENSE, MASK_NONE), "csr": (SCHEDULE_CSR, MASK_NONE),
            "local": (SCHEDULE_TILED, MASK_LOCAL), "topk": (SCHEDULE_CSR, MASK_THRESHOLD),
            "band": (SCHEDULE_CSR, MASK_BAND)}
_PARENT = {"csr": "dense", "local": "dense", "topk": "csr", "band": "csr"}  # where a variant has no entry

# (arch, variant, kernel, dtype class, block_d) -> Config; arch None: the interpreter's. "f16" covers
# fp16 and bf16. Chosen so every config compiles without spills and within the shared memory of the
# chip: python -m ditkernels compile-report compiles each variant with the config config_for gives it.
_CONFIGS: dict[tuple[int | None, str, str, str, int], Config] = {}


def _fill() -> None:
    for arch in (80, 90):
        t: dict[tuple[str, str, int], Config] = {}
        for d in BLOCK_D_BUCKETS:
            # fp16 / bf16: tensor-core MMA (HMMA on sm_80, HGMMA on sm_90; sm_90 needs 64-row MMA tiles).
            if arch == 90:
                t["fwd", "f16", d] = {256: Config(64, 64, 8, 2), 128: Config(128, 64, 8, 3)}.get(d, Config(128, 64, 4, 3))
                t["bwd_dkdv", "f16", d] = Config(16, 64, 8, 2, split=True) if d == 256 else Config(32, 64, 4, 2 if d == 128 else 3)
                t["bwd_dq", "f16", d] = Config(64, 16, 8, 2) if d == 256 else Config(64, 32, 4, 2 if d == 128 else 3)
            else:
                t["fwd", "f16", d] = Config(64, 32, 8, 2) if d == 256 else Config(64, 64, 4, 3)
                t["bwd_dkdv", "f16", d] = {256: Config(16, 16, 8, 2, split=True), 128: Config(32, 32, 8, 2)}.get(
                    d, Config(32, 64, 4, 2))
                t["bwd_dq", "f16", d] = {256: Config(32, 16, 8, 2), 128: Config(32, 32, 4, 2)}.get(d, Config(64, 32, 4, 3))
            # fp32: IEEE fp32 products on CUDA cores (TF32 loses ~1e-3). Triton lowers them to an FMA
            # dot that holds a thread's rows of both operands over the whole contraction in registers,
            # so S = Q K^T and dP = dO V^T (and K Q^T, V dO^T in bwd_dkdv) over a head dim >= 64 in one
            # tl.dot spill. From 64 on they run in chunks of block_dk = 16 head-dim columns re-read from
            # memory (_dot_head_dim: L1/L2 hits; fp32 is the precision path, not the speed path), the
            # same kernel and tile loop otherwise. The products over the tile (P V, dS K, dS^T Q, P^T dO)
            # contract over BLOCK_N (fwd, bwd_dq) or BLOCK_M (bwd_dkdv): that tile dim is the K of an FMA
            # dot too, so it stays at 16-32 while the other one is as large as compiles with zero spills
            # on sm_80 and sm_90, with head_dim == BLOCK_D and with a masked head dim alike.
            if d <= 32:
                t["fwd", "f32", d] = Config(32, 32, 8, 2)
                t["bwd_dkdv", "f32", d] = Config(16, 32, 8, 2)
                t["bwd_dq", "f32", d] = Config(16, 16, 4, 2)
            else:
                t["fwd", "f32", d] = {64: Config(128, 16, 8, 2, block_dk=16), 128: Config(128, 32, 8, 2, block_dk=16),
                                      256: Config(64, 32, 8, 2, block_dk=16)}[d]
                # One launch for dK and one for dV: two (block_n, d) fp32 accumulators do not fit beside the chunks.
                t["bwd_dkdv", "f32", d] = Config(16, 128 if d == 128 else 64, 8, 2, split=True, block_dk=16)
                t["bwd_dq", "f32", d] = {64: Config(64, 32, 8, 2, block_dk=16), 128: Config(128, 16, 8, 2, block_dk=16),
                                         256: Config(64, 32, 8, 2, block_dk=16)}[d]
            for cls in ("f16", "f32"):
                t["bwd_preprocess", cls, d] = Config(64 if d <= 128 else 32, 0, 4, 1)
        _CONFIGS.update(((arch, "dense", *key), cfg) for key, cfg in t.items())
    _CONFIGS.update(((None, "dense", kernel, cls, d), cfg) for (kernel, cls), cfg in _INTERPRET_CONFIGS.items()
                    for d in BLOCK_D_BUCKETS)
    for (arch, _, kernel, cls, d), cfg in list(_CONFIGS.items()):
        if kernel == "fwd":
            # csr: the forward runs a schedule's own tiles up to 128 (an op's schedule has the dense
            # config's tiles: block_sizes()); larger schedule tiles are walked in sub-tiles.
            _CONFIGS[arch, "csr", kernel, cls, d] = replace(cfg, block_m=128, block_n=128)
        if arch is not None and kernel != "bwd_preprocess":
            # local: token tables and the mask. ptxas otherwise caps these loop-heavy kernels for occupancy
            # on its own (64-128 registers) and keeps a few loop-invariant values on the stack; a register
            # cap (.maxnreg, as the selective-scan kernels give) lets it allocate what they need.
            _CONFIGS[arch, "local", kernel, cls, d] = replace(cfg, maxnreg=255)
    _CONFIGS.update((key, cfg) for key, cfg in _OVERRIDES.items() if key[0] not in _BASE)
    for arch, base in _BASE.items():
        _CONFIGS.update(((arch, *key[1:]), cfg) for key, cfg in list(_CONFIGS.items()) if key[0] == base)
    _CONFIGS.update((key, cfg) for key, cfg in _OVERRIDES.items() if key[0] in _BASE)


# Under TRITON_INTERPRET=1 (CPU tests): small tiles so seq 97 / 200 spans several tiles and a tail,
# and backward tiles smaller than the forward's so the sub-tile walk of schedule tiles runs.
# fp32 contracts the head dim in chunks of 16 like the GPU's fp32 configs (smaller chunks, so every
# head_dim > 16 runs the chunk loop, and head_dim 40 its masked partial chunk); fp16/bf16 do not chunk.
_INTERPRET_CONFIGS = {
    ("fwd", "f16"): Config(32, 32, 4, 1),
    ("bwd_preprocess", "f16"): Config(32, 0, 4, 1),
    ("bwd_dkdv", "f16"): Config(16, 32, 4, 1),
    ("bwd_dq", "f16"): Config(16, 32, 4, 1),
    ("fwd", "f32"): Config(32, 32, 4, 1, block_dk=16),
    ("bwd_preprocess", "f32"): Config(32, 0, 4, 1),
    ("bwd_dkdv", "f32"): Config(16, 32, 4, 1, block_dk=16),
    ("bwd_dq", "f32"): Config(16, 32, 4, 1, block_dk=16),
}

# Configs replacing the one a variant inherits, found with compile-report (0 spills, 0 stack, HGMMA on
# sm_90 fp16/bf16; --variant NAME compiles one variant).
_OVERRIDES: dict[tuple[int, str, str, str, int], Config] = {
    # local: the mask's integer work needs 8 warps where a 4-warp fp16 tile had no register headroom.
    (80, "local", "fwd", "f16", 64): Config(64, 64, 8, 1, maxnreg=255),
    (80, "local", "fwd", "f16", 128): Config(64, 64, 8, 3, maxnreg=255),
    (80, "local", "bwd_dkdv", "f16", 64): Config(32, 64, 8, 1, maxnreg=255),
    (90, "local", "bwd_dkdv", "f16", 128): Config(32, 64, 8, 2, maxnreg=255),
    (90, "local", "fwd", "f32", 64): Config(128, 16, 8, 1, block_dk=16, maxnreg=255),
    # csr, fp32 dK/dV: the dense configs' 16-row tiles under a schedule of the forward's (128-row)
    # tiles kept 8-32 B of stack.
    (80, "csr", "bwd_dkdv", "f32", 64): Config(16, 64, 8, 1, split=True, block_dk=8),
    (90, "csr", "bwd_dkdv", "f32", 64): Config(16, 64, 4, 2, split=True, block_dk=16),
    (80, "csr", "bwd_dkdv", "f32", 128): Config(16, 128, 8, 1, split=True, block_dk=16),
    (90, "csr", "bwd_dkdv", "f32", 128): Config(16, 128, 4, 2, split=True, block_dk=16),
    (90, "csr", "bwd_dkdv", "f32", 256): Config(16, 64, 4, 2, split=True, block_dk=16),
    # topk: the per-row threshold load in the dK/dV loop costs registers these fp32 configs lack (an
    # 8-48 byte stack frame at 8 warps / the csr chunk).
    (80, "topk", "bwd_dkdv", "f32", 16): Config(16, 32, 4, 2),
    (80, "topk", "bwd_dkdv", "f32", 64): Config(16, 64, 4, 1, split=True, block_dk=16),
    (90, "topk", "bwd_dkdv", "f32", 128): Config(16, 128, 4, 2, split=True, block_dk=8),
    # band (compile-report variants band / rettention): the fp32 head_dim-64 forward on sm_90 needs
    # 8-16 B of stack with the mask at 128 rows and none at 64; schedule tiles are walked in 64-row sub-tiles.
    (90, "band", "fwd", "f32", 64): Config(64, 128, 8, 2, block_dk=16),
    # sm_86 / sm_89 / sm_120 (the sm_80 row otherwise): sm_80's csr fp32 dK/dV config at head_dim 64 keeps
    # 8-16 B of stack there; sm_90's (4 warps, 16-column chunks) has none.
    **{(arch, "csr", "bwd_dkdv", "f32", 64): Config(16, 64, 4, 2, split=True, block_dk=16) for arch in (86, 89, 120)},
    # the same at head_dim 256 with exact top-k's threshold (sm_80's dense config: 8 B of stack on sm_86)
    **{(arch, "topk", "bwd_dkdv", "f32", 256): Config(16, 64, 4, 2, split=True, block_dk=16) for arch in (86, 89, 120)},
    # sm_120, top-k dK/dV at head_dim 128: ptxas capped the 8-warp kernel at 128 registers (8 B of stack);
    # .maxnreg lets it take what it needs, as for local attention.
    (120, "topk", "bwd_dkdv", "f16", 128): Config(32, 32, 8, 2, maxnreg=255),
    # sm_120, schedule forward at head_dim 256 (csr, and topk / band through it): the same cap (24 B of stack)
    (120, "csr", "fwd", "f16", 256): Config(128, 128, 8, 2, maxnreg=255),
    (120, "csr", "bwd_dkdv", "f32", 256): Config(16, 64, 4, 2, split=True, block_dk=16),  # 16 B at 8 warps
    (120, "dense", "bwd_preprocess", "f32", 256): Config(32, 0, 4, 1, maxnreg=255),  # 8 B at ptxas's 80 registers
    # sm_120, found by the full compile-report (8-24 B of stack at 255 registers): 8 warps / 1 stage.
    (120, "topk", "bwd_dkdv", "f16", 64): Config(32, 64, 8, 2, maxnreg=255),
    (120, "local", "fwd", "f32", 64): Config(128, 16, 8, 1, block_dk=16, maxnreg=255),
    # sm_100, schedule dK at head_dim 256: sm_90's 2 stages need all 255 registers and 48 B of stack under
    # tcgen05; 1 stage fits (64-key tiles: tcgen05 needs 64 MMA rows, 32 falls back to mma.sync)
    (100, "csr", "bwd_dkdv", "f16", 256): Config(16, 64, 8, 1, split=True),
    (100, "local", "bwd_dkdv", "f16", 256): Config(16, 64, 8, 1, split=True, maxnreg=255),  # 192 B of stack with 2
    (100, "csr", "bwd_dq", "f16", 256): Config(64, 16, 8, 1),  # the same for dQ: 48 B of stack with 2 stages
    (100, "local", "bwd_dq", "f16", 256): Config(64, 16, 8, 1, maxnreg=255),  # 88 B with 2
    # sm_100 at head_dim 64, found by the full compile-report: 24-56 B of stack at 255 registers with 4 warps
    # (the odd-head-dim forward, the band-masked forward, local dK/dV); 8 warps halve the rows per thread.
    (100, "dense", "fwd", "f16", 64): Config(128, 64, 8, 3),
    (100, "band", "fwd", "f16", 64): Config(128, 128, 8, 3),
    (100, "local", "bwd_dkdv", "f16", 64): Config(32, 64, 8, 2, maxnreg=255),
}
# Launches whose config compiled with 8-16 B of stack in the full compile-report because ptxas capped
# their registers for occupancy (56-128 registers): the same tiles with .maxnreg 255.
_UNCAPPED = (
    (120, "csr", "bwd_dkdv", "f32", 32), (120, "topk", "bwd_dq", "f32", 32), (120, "dense", "bwd_dq", "f16", 16),
    *((arch, "topk", "bwd_dkdv", "f32", 32) for arch in (86, 89)),
    *((arch, "dense", "fwd", "f16", 32) for arch in (86, 89)),
    *((arch, "band", "fwd", "f32", 64) for arch in (86, 89)),
    *((arch, "topk", "fwd", "f32", 32) for arch in (86, 89)),
    # sm_100 (sm_90's tiles under tcgen05): 24-32 B of stack at 72-128 registers
    (100, "dense", "fwd", "f32", 64), (100, "topk", "fwd", "f32", 64), (100, "dense", "bwd_preprocess", "f16", 128),
)


def _lookup(key: tuple[int | None, str, str, str, int]) -> Config:
    """The config of ``key`` = (arch, variant, kernel, dtype class, block_d): its own entry, else its parent variant's."""
    while key not in _CONFIGS:
        key = (key[0], _PARENT[key[1]], *key[2:])
    return _CONFIGS[key]


def _fill_uncapped() -> None:
    for key in _UNCAPPED:
        _CONFIGS[key] = replace(_lookup(key), maxnreg=255)


_fill()
_fill_uncapped()


def launch_variant(schedule_kind: int, mask_kind: int) -> str:
    """The config variant (see VARIANTS) of a launch with plug-ins SCHEDULE=``schedule_kind``, MASK=``mask_kind``."""
    for name, p in VARIANTS.items():
        if p == (schedule_kind, mask_kind):
            return name
    return ("dense", "csr", "local")[schedule_kind]


def launch_options(cfg: Config) -> dict:
    """Compile options of a launch of ``cfg`` (the ones compile-report compiles with)."""
    opts = {"num_warps": cfg.num_warps, "num_stages": cfg.num_stages}
    if cfg.maxnreg:
        opts["maxnreg"] = cfg.maxnreg
    return opts


def block_d_for(head_dim: int) -> int:
    """Padded head dim: the power of two >= max(head_dim, 16)."""
    if not 1 <= head_dim <= 256:
        raise ValueError(f"head_dim: expected 1..256, got {head_dim}")
    return max(16, 1 << (head_dim - 1).bit_length())


def _dtype_class(dtype: torch.dtype) -> str:
    if dtype in (torch.float16, torch.bfloat16):
        return "f16"
    if dtype == torch.float32:
        return "f32"
    raise TypeError(f"dtype: the triton backend takes float16, bfloat16 or float32, got {dtype}")


def config_for(kernel: str, arch: int | None, dtype: torch.dtype, block_d: int, variant: str = "dense") -> Config:
    """The shipped config of ``kernel`` for ``arch`` (None: the interpreter's) and launch ``variant``:
    its own entry, else its parent variant's. A launch with a schedule runs min(config tile, schedule
    tile) rows and keys (``_launch_blocks``)."""
    return _lookup((arch, variant, kernel, _dtype_class(dtype), block_d))


def chunk_d(cfg: Config, block_d: int) -> int:
    """BLOCK_DK of a launch: the head-dim chunk of ``cfg`` (its whole BLOCK_D when it does not chunk)."""
    return min(cfg.block_dk, block_d) if cfg.block_dk else block_d


def interpreting() -> bool:
    return _interpreter.interpreting()


def device_arch(device: torch.device) -> int | None:
    """Config row (``ARCHS``) of ``device``: its compute capability's (``archs.arch_for_capability``: an unknown
    one gets the most conservative row and a one-time warning); None for CPU tensors (the interpreter's)."""
    if device.type != "cuda":
        return None
    return archs.arch_for_capability(*torch.cuda.get_device_capability(device))


if interpreting():
    _interpreter.patch()


def block_sizes(head_dim: int, dtype: torch.dtype, device: torch.device | None = None) -> tuple[int, int]:
    """(block_m, block_n) of the forward config used for this head_dim / dtype on ``device``
    (default: the current CUDA device, or the interpreter's when there is none)."""
    if device is None:
        device = torch.device("cuda") if (torch.cuda.is_available() and not interpreting()) else torch.device("cpu")
    cfg = config_for("fwd", device_arch(device), dtype, block_d_for(head_dim))
    return cfg.block_m, cfg.block_n


# --------------------------------------------------------------------------------------------
# Launchers
# --------------------------------------------------------------------------------------------

def _dot_prec(dtype: torch.dtype) -> str:
    # fp32 inputs: IEEE products (TF32 would lose ~1e-3 relative accuracy); ignored for fp16/bf16.
    return "ieee" if dtype == torch.float32 else "tf32"


def _is_pow2(x: int) -> bool:
    return x >= 1 and (x & (x - 1)) == 0


def _check_schedule(schedule, batch: int, heads: int, seq_q: int, seq_k: int, device: torch.device) -> None:
    """The schedule's own checks (BlockSchedule.validate), plus this backend's tile rule."""
    for name in ("block_m", "block_n"):
        val = getattr(schedule, name)
        if not (_is_pow2(val) and val >= 16):
            raise ValueError(f"schedule.{name}: the triton backend needs a power of two >= 16, got {val}")
    schedule.validate(seq_q, seq_k, batch * heads, device)


def _tiled(schedule) -> bool:
    """A :class:`~ditkernels.schedule.TiledSchedule` (token tables): SCHEDULE=2."""
    return schedule is not None and getattr(schedule, "q_tokens", None) is not None


def _schedule_kind(schedule) -> int:
    if schedule is None:
        return SCHEDULE_DENSE
    return SCHEDULE_TILED if _tiled(schedule) else SCHEDULE_CSR


def _token_args(schedule, dummy: torch.Tensor) -> tuple:
    """(QTok, KTok) of the kernels: the schedule's token tables (as the forward reads them), or dummies."""
    if not _tiled(schedule):
        return dummy, dummy
    return schedule.q_tokens, schedule.kv_tokens


def _count_args(counts, kernel: str, schedule, dummy: torch.Tensor) -> tuple:
    """(Count, count_stride, count_plane, COUNT) for the visit counter of ``kernel`` (tests only):
    ``counts[kernel]`` is an int32 (2, num_q_tiles, num_kv_tiles) buffer of the forward schedule."""
    buf = None if counts is None else counts.get(kernel)
    if buf is None:
        return dummy, 0, 0, False
    shape = (2, schedule.num_q_tiles, schedule.num_kv_tiles)
    if buf.dtype != torch.int32 or tuple(buf.shape) != shape or not buf.is_contiguous():
        raise ValueError(f"visit_counts[{kernel!r}]: expected contiguous int32 {shape}, got {buf.dtype} "
                         f"{tuple(buf.shape)}")
    return buf, buf.stride(1), buf.stride(0), True


def _programs(seq: int, block: int, sched_block: int, num_tiles: int | None) -> int:
    """Programs along the tile axis: contiguous tiles of ``block``, or the sub-tiles of every token-table tile."""
    if num_tiles is None:
        return triton.cdiv(seq, block)
    return num_tiles * (sched_block // block)


def _sched_args(schedule, dummy: torch.Tensor) -> tuple:
    """(KvPtr, KvIdx, Partial, stride_ptr, stride_idx, head_stride) for a (possibly absent) CSR."""
    if schedule is None:
        return dummy, dummy, dummy, 0, 0, 0
    hs = schedule.kv_ptr.shape[0]
    return (schedule.kv_ptr, schedule.kv_idx, schedule.partial, schedule.kv_ptr.stride(0),
            schedule.kv_idx.stride(0), 0 if hs == 1 else 1)


_THRESHOLD_PAD = 256  # >= the largest query tile a schedule walk can overshoot seq_q by


def _mask_args(mask, device: torch.device) -> tuple[int, torch.Tensor]:
    if mask is None:
        return MASK_NONE, torch.zeros(1, dtype=torch.int32, device=device)
    if mask.kind == MASK_THRESHOLD:
        # per-row thresholds in natural scaled-score units -> the kernels' log2 units, padded so the dK/dV
        # kernel's unmasked per-tile load of a ragged last query tile stays in bounds (those rows have
        # lse2 = +inf, so their values do not matter)
        rows = (mask.rows.to(device=device, dtype=torch.float32) * LOG2E).reshape(-1)
        return MASK_THRESHOLD, torch.cat([rows, rows.new_zeros(_THRESHOLD_PAD)])
    params = list(mask.params) or [0]
    return int(mask.kind), torch.tensor(params, dtype=torch.int32, device=device)


@dataclass(frozen=True)
class ScheduleShape:
    """What a launch needs of a block schedule: its plug-in (SCHEDULE_CSR, or SCHEDULE_TILED for token
    tables), its tiles, and for token tables the number of query / KV tiles (the grid walks their sub-tiles)."""

    kind: int
    block_m: int
    block_n: int
    num_q_tiles: int = 0
    num_kv_tiles: int = 0

    @classmethod
    def of(cls, schedule) -> ScheduleShape | None:
        """The shape of a :class:`~ditkernels.schedule.BlockSchedule` / ``TiledSchedule`` (None: dense)."""
        if schedule is None or isinstance(schedule, ScheduleShape):
            return schedule
        if _tiled(schedule):
            return cls(SCHEDULE_TILED, schedule.block_m, schedule.block_n, schedule.num_q_tiles, schedule.num_kv_tiles)
        return cls(SCHEDULE_CSR, schedule.block_m, schedule.block_n)


@dataclass(frozen=True)
class Launch:
    """One launch of a flash kernel, as :func:`launches` derives it: ``kernel[grid](..., **constexprs, **options)``."""

    kernel: str  # one of KERNELS
    config: Config
    grid: tuple[int, int]
    constexprs: dict
    options: dict  # launch_options(config): num_warps, num_stages, maxnreg


def launches(kernel: str, *, arch: int | None, dtype: torch.dtype, head_dim: int, batch_heads: int, seq_q: int,
             seq_k: int, schedule: ScheduleShape | None = None, mask_kind: int = MASK_NONE,
             epilogue_kind: int = EPILOGUE_NONE, count: bool = False) -> tuple[Launch, ...]:
    """The launches of ``kernel`` (one; two for a split ``bwd_dkdv``: dK, then dV) for a problem on ``arch``
    (None: the interpreter's configs): config, grid and constexprs. Pure: the launchers and
    ``python -m ditkernels compile-report`` both take their launches from here. A schedule's tiles larger
    than the config's are walked in sub-tiles (BLOCK_M = min(config, schedule) rows, SCHED_BM the schedule's)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel: expected one of {KERNELS}, got {kernel!r}")
    sched_kind = SCHEDULE_DENSE if schedule is None else schedule.kind
    block_d = block_d_for(head_dim)
    cfg = config_for(kernel, arch, dtype, block_d, launch_variant(sched_kind, mask_kind))
    even_d = head_dim == block_d
    opts = launch_options(cfg)
    if kernel == "bwd_preprocess":
        return (Launch(kernel, cfg, (triton.cdiv(seq_q, cfg.block_m), batch_heads),
                       dict(BLOCK_M=cfg.block_m, BLOCK_D=block_d, EVEN_D=even_d), opts),)
    if schedule is None:
        bm, bn, sbm, sbn = cfg.block_m, cfg.block_n, cfg.block_m, cfg.block_n
    else:
        bm, bn = min(cfg.block_m, schedule.block_m), min(cfg.block_n, schedule.block_n)
        sbm, sbn = schedule.block_m, schedule.block_n
    tiled = sched_kind == SCHEDULE_TILED
    if kernel == "bwd_dkdv":
        programs = _programs(seq_k, bn, sbn, schedule.num_kv_tiles if tiled else None)
    else:
        programs = _programs(seq_q, bm, sbm, schedule.num_q_tiles if tiled else None)
    common = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, BLOCK_DK=chunk_d(cfg, block_d), SCHED_BM=sbm,
                  SCHED_BN=sbn, SCHEDULE=sched_kind, MASK=mask_kind)
    tail = dict(EVEN_D=even_d, DOT_PREC=_dot_prec(dtype))
    grid = (programs, batch_heads)
    if kernel == "fwd":
        return (Launch(kernel, cfg, grid, dict(**common, EPILOGUE=epilogue_kind, **tail, COUNT=count), opts),)
    if kernel == "bwd_dq":
        return (Launch(kernel, cfg, grid, dict(**common, **tail, COUNT=count), opts),)
    parts = ((True, False), (False, True)) if cfg.split else ((True, True),)
    return tuple(Launch(kernel, cfg, grid, dict(**common, **tail, OUT_DK=dk, OUT_DV=dv, COUNT=count), opts)
                 for dk, dv in parts)


def flash_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float, schedule=None, mask=None,
              epilogue=None, visit_counts: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q: (batch, heads, seq_q, head_dim); k, v: (batch, heads, seq_k, head_dim), any strides.

    Returns out (batch, heads, seq_q, head_dim) in q.dtype and lse (batch, heads, seq_q) fp32.
    visit_counts (tests): ``{"fwd": int32 (2, num_q_tiles, num_kv_tiles) zeros}`` to count the visits
    of a schedule in the kernel (see ``COUNT``).
    """
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    device = q.device
    block_d_for(head_dim), _dtype_class(q.dtype)  # argument errors first
    if schedule is not None:
        _check_schedule(schedule, batch, heads, seq_q, seq_k, device)
    out = _alloc.empty(batch, heads, seq_q, head_dim, dtype=q.dtype, device=device)
    lse = _alloc.empty(batch, heads, seq_q, dtype=torch.float32, device=device)
    if out.numel() == 0 and lse.numel() == 0:
        return out, lse
    dummy = torch.zeros(1, dtype=torch.int32, device=device)
    mask_kind, mask_params = _mask_args(mask, device)
    if epilogue is not None:
        rs, res = epilogue.row_scale, epilogue.residual
        if rs.shape != (batch, heads, seq_q) or res.shape != (batch, heads, seq_q, head_dim):
            raise ValueError(f"epilogue: expected row_scale {(batch, heads, seq_q)} and residual "
                             f"{(batch, heads, seq_q, head_dim)}, got {tuple(rs.shape)} and {tuple(res.shape)}")
        rs = rs.to(torch.float32)
        epi = (int(epilogue.kind), rs, res, *rs.stride(), *res.stride())
    else:
        epi = (EPILOGUE_NONE, dummy, dummy, 0, 0, 0, 0, 0, 0, 0)
    count = _count_args(visit_counts, "fwd", schedule, dummy)
    (launch,) = launches("fwd", arch=device_arch(device), dtype=q.dtype, head_dim=head_dim, batch_heads=batch * heads,
                         seq_q=seq_q, seq_k=seq_k, schedule=ScheduleShape.of(schedule), mask_kind=mask_kind,
                         epilogue_kind=epi[0], count=count[3])
    _flash_fwd_kernel[launch.grid](
        q, k, v, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        heads, seq_q, seq_k, head_dim, scale * LOG2E,
        *_sched_args(schedule, dummy),
        mask_params, *_token_args(schedule, dummy), *count[:3],
        epi[1], epi[2], *epi[3:],
        **launch.constexprs, **launch.options,
    )
    return out, lse


def flash_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              lse: torch.Tensor, *, scale: float, schedule=None, mask=None, visit_counts: dict | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the core attention. do, out: (batch, heads, seq_q, head_dim); lse: (batch, heads, seq_q).

    Returns dq, dk, dv with the shapes and dtypes of q, k, v. visit_counts (tests): buffers under the
    keys ``"bwd_dkdv"`` / ``"bwd_dq"`` as in :func:`flash_fwd` (both indexed by (query tile, KV tile)).
    """
    batch, heads, seq_q, head_dim = q.shape
    seq_k = k.shape[2]
    device = q.device
    block_d_for(head_dim)  # argument errors first
    dq = _alloc.empty(*q.shape, dtype=q.dtype, device=device)
    dk = _alloc.empty(*k.shape, dtype=k.dtype, device=device)
    dv = _alloc.empty(*v.shape, dtype=v.dtype, device=device)
    if schedule is not None:
        _check_schedule(schedule, batch, heads, seq_q, seq_k, device)
    if batch * heads == 0 or head_dim == 0:
        return dq, dk, dv
    if seq_q == 0 or seq_k == 0:
        dq.zero_(), dk.zero_(), dv.zero_()
        return dq, dk, dv

    mask_kind, mask_params = _mask_args(mask, device)
    shape = dict(arch=device_arch(device), dtype=q.dtype, head_dim=head_dim, batch_heads=batch * heads,
                 seq_q=seq_q, seq_k=seq_k, schedule=ScheduleShape.of(schedule), mask_kind=mask_kind)
    (launch,) = launches("bwd_preprocess", **shape)
    delta = _alloc.empty(batch * heads, seq_q, dtype=torch.float32, device=device)
    lse2 = _alloc.empty(batch * heads, seq_q, dtype=torch.float32, device=device)
    _flash_bwd_preprocess_kernel[launch.grid](
        out, do, lse, delta, lse2, *out.stride(), *do.stride(), *lse.stride(), heads, seq_q, head_dim,
        **launch.constexprs, **launch.options,
    )

    dummy = torch.zeros(1, dtype=torch.int32, device=device)
    tokens = _token_args(schedule, dummy)
    tsched = schedule.transposed() if schedule is not None else None
    count = _count_args(visit_counts, "bwd_dkdv", schedule, dummy)
    for launch in launches("bwd_dkdv", **shape, count=count[3]):  # a split config: dK, then dV
        _flash_bwd_dkdv_kernel[launch.grid](
            q, k, v, do, dk, dv, lse2, delta,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
            heads, seq_q, seq_k, head_dim, scale * LOG2E, scale,
            *_sched_args(tsched, dummy), mask_params, *tokens, *count[:3],
            **launch.constexprs, **launch.options,
        )

    count = _count_args(visit_counts, "bwd_dq", schedule, dummy)
    (launch,) = launches("bwd_dq", **shape, count=count[3])
    _flash_bwd_dq_kernel[launch.grid](
        q, k, v, do, dq, lse2, delta,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        heads, seq_q, seq_k, head_dim, scale * LOG2E, scale,
        *_sched_args(schedule, dummy), mask_params, *tokens, *count[:3],
        **launch.constexprs, **launch.options,
    )
    return dq, dk, dv
