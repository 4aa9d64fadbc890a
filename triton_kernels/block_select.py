"""Block top-k selection in Triton: pooled block means, block scores and the top-k choice, fused.

What :func:`ditkernels.ops.sparse.block_topk_mask` computes in torch (the reference of these
kernels), in two launches with no score matrix in memory:

- ``_pool_keys_kernel``: one program per (key block, batch*head) writes the mean of the block's keys
  (float32) to ``KP[bh, d, n]`` (head dim first, so a head-dim row of every key block is one
  contiguous load for the selection).
- ``_select_blocks_kernel``: one program per (query block, batch*head) pools its query block, scores
  it against every pooled key block (``mean(q) . mean(k) * scale``, float32), and picks the blocks:
  the forced ones (global-token blocks and the diagonal) plus the ``topk - forced`` best of the rest,
  ties at the cut going to the lowest block index (the torch path's rule). The ``r``-th largest score
  is found exactly by a radix select over the scores' order-preserving uint32 keys (32 counting
  passes over the row, in registers), then the row of the bool mask is stored.

Rows of up to :data:`MAX_KEY_BLOCKS` key blocks are held in registers (``NK_PAD``, the power of two
>= the number of key blocks); the launcher sends longer rows to the torch path (same result).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ditkernels import _alloc

from . import _interpreter
from .flash import block_d_for

# Rows of 8192 blocks needed all 255 registers plus 64 B of stack on sm_120 (compile-report, full set;
# neither 16 warps nor a smaller head-dim chunk removed it); rows of 4096 compile without stack on all six
# archs (sm_80 to sm_120, with launch_options' register cap).
MAX_KEY_BLOCKS = 4096
POOL_ROWS = 32  # query / key rows per load of the pooling loops
POOL_WARPS = 4  # warps of a key-pooling program


@triton.jit
def _order_key(s):
    """uint32 keys with the order of the float32 scores ``s`` (-0.0 counted as +0.0)."""
    bits = tl.where(s == 0.0, 0.0, s).to(tl.int32, bitcast=True)
    # non-negative floats: set the sign bit; negative ones: flip every bit (larger magnitude, smaller key)
    key = tl.where(bits >= 0, bits ^ -2147483648, ~bits)
    return key.to(tl.uint32, bitcast=True)


@triton.jit
def _row_sum(base, start, end, offs_d, head_dim, stride_s, stride_d, ROWS: tl.constexpr):
    """float32 sum of rows [start, end) of a (seq, head_dim) matrix over the columns ``offs_d``."""
    acc = tl.zeros(offs_d.shape, dtype=tl.float32)
    for r0 in range(start, end, ROWS):
        rows = r0 + tl.arange(0, ROWS)
        x = tl.load(base + rows[:, None] * stride_s + offs_d[None, :] * stride_d,
                    mask=(rows[:, None] < end) & (offs_d[None, :] < head_dim), other=0.0)
        acc += tl.sum(x.to(tl.float32), 0)
    return acc


@triton.jit
def _pool_keys_kernel(K, KP, seq_k, head_dim, block_k, n_blocks, heads,
                      stride_kb, stride_kh, stride_ks, stride_kd,
                      ROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    n = tl.program_id(0)
    bh = tl.program_id(1)
    base = K + (bh // heads) * stride_kb + (bh % heads) * stride_kh
    offs_d = tl.arange(0, BLOCK_D)
    start = n * block_k
    end = tl.minimum(start + block_k, seq_k)
    mean = _row_sum(base, start, end, offs_d, head_dim, stride_ks, stride_kd, ROWS) / (end - start).to(tl.float32)
    tl.store(KP + bh * BLOCK_D * n_blocks + offs_d * n_blocks + n, mean)


@triton.jit
def _select_blocks_kernel(Q, KP, Mask, seq_q, seq_k, head_dim, block_q, block_k, nq, nk, heads, topk,
                          num_prefix, num_suffix, scale,
                          stride_qb, stride_qh, stride_qs, stride_qd,
                          ROWS: tl.constexpr, BLOCK_D: tl.constexpr, CHUNK_D: tl.constexpr,
                          NK_PAD: tl.constexpr):
    m = tl.program_id(0)
    bh = tl.program_id(1)
    q_base = Q + (bh // heads) * stride_qb + (bh % heads) * stride_qh
    kp_base = KP + bh * BLOCK_D * nk
    offs_n = tl.arange(0, NK_PAD)
    valid = offs_n < nk
    start = m * block_q
    end = tl.minimum(start + block_q, seq_q)
    count = (end - start).to(tl.float32)

    # scores of this query block against every key block, CHUNK_D head dims at a time
    s = tl.zeros([NK_PAD], dtype=tl.float32)
    for d0 in range(0, BLOCK_D, CHUNK_D):
        offs_d = d0 + tl.arange(0, CHUNK_D)
        qsum = _row_sum(q_base, start, end, offs_d, head_dim, stride_qs, stride_qd, ROWS)
        kp = tl.load(kp_base + offs_d[:, None] * nk + offs_n[None, :], mask=valid[None, :], other=0.0)
        s += tl.sum((qsum / count)[:, None] * kp, 0)
    s = s * scale

    # forced blocks: the diagonal (key blocks overlapping [start, end)) and the global-token blocks
    lo = tl.minimum(start // block_k, nk - 1)
    hi = tl.minimum((end - 1) // block_k, nk - 1)
    forced = (offs_n >= lo) & (offs_n <= hi)
    forced |= offs_n < (tl.minimum(num_prefix, seq_k) + block_k - 1) // block_k
    forced |= (num_suffix > 0) & (offs_n >= tl.maximum(seq_k - num_suffix, 0) // block_k)
    forced &= valid
    need = topk - tl.sum(forced.to(tl.int32), 0)

    # radix select: the largest key t with #{key >= t} >= need is the need-th largest (0: excluded)
    key = tl.where(valid & ~forced, _order_key(s), 0)
    t = tl.zeros([], dtype=tl.uint32)
    for bit in tl.static_range(31, -1, -1):
        cand = t | (1 << bit)
        t = tl.where(tl.sum((key >= cand).to(tl.int32), 0) >= need, cand, t)
    above = key > t
    tied = (key == t) & (key != 0)
    rank = tl.cumsum(tied.to(tl.int32), 0)
    keep = forced | above | (tied & (rank <= need - tl.sum(above.to(tl.int32), 0)))
    tl.store(Mask + (bh * nq + m) * nk + offs_n, keep.to(tl.int8), mask=valid)


if _interpreter.interpreting():
    _interpreter.patch()


def supports(nk: int) -> bool:
    """Whether a row of ``nk`` key blocks fits the selection kernel's registers."""
    return nk <= MAX_KEY_BLOCKS


def launch_options(nk_pad: int) -> dict:
    """(CHUNK_D, num_warps, maxnreg) of a selection launch over rows of ``nk_pad`` key blocks: a head-dim chunk
    of pooled keys holds at most 16K floats (64 per thread at 8 warps). ``maxnreg``: without it ptxas capped
    the 4096-block rows at 128 registers for occupancy on sm_86 (8 B of stack; compile-report, full set)."""
    return {"CHUNK_D": max(1, min(16, 16384 // nk_pad)), "num_warps": 4 if nk_pad <= 256 else 8, "maxnreg": 255}


def block_topk_mask(q: torch.Tensor, k: torch.Tensor, topk: int, block_q: int, block_k: int, num_prefix: int,
                    num_suffix: int, scale: float) -> torch.Tensor:
    """q: (batch, heads, seq_q, head_dim); k: (batch, heads, seq_k, head_dim), any strides, fp16 / bf16 /
    fp32 -> bool (batch, heads, ceil(seq_q/block_q), ceil(seq_k/block_k)): the selection of
    :func:`ditkernels.ops.sparse.block_topk_mask` with ``topk`` key blocks per query block (already
    clipped to the number of key blocks)."""
    b, h, sq, d = q.shape
    sk = k.shape[2]
    nq, nk = -(-sq // block_q), -(-sk // block_k)
    if not supports(nk):
        raise ValueError(f"k: the triton selection holds rows of at most {MAX_KEY_BLOCKS} key blocks, got {nk}")
    block_d, nk_pad = block_d_for(d), max(16, triton.next_power_of_2(nk))
    kp = _alloc.empty(b * h, block_d, nk, dtype=torch.float32, device=q.device)
    _pool_keys_kernel[(nk, b * h)](k, kp, sk, d, block_k, nk, h, *k.stride(), ROWS=POOL_ROWS, BLOCK_D=block_d,
                                   num_warps=POOL_WARPS)
    mask = _alloc.empty(b, h, nq, nk, dtype=torch.int8, device=q.device)  # -1 when poisoned: not a bool
    opts = launch_options(nk_pad)
    _select_blocks_kernel[(nq, b * h)](q, kp, mask, sq, sk, d, block_q, block_k, nq, nk, h, topk, num_prefix,
                                       num_suffix, float(scale), *q.stride(), ROWS=POOL_ROWS, BLOCK_D=block_d,
                                       NK_PAD=nk_pad, **opts)
    return mask.view(torch.bool)
