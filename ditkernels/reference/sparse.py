"""Block-sparse and block top-k references (docs/spec.md §2), in plain PyTorch and plain loops.

The ground truth of ``ditkernels.block_sparse_attention`` / ``block_topk_attention`` in the tests:
a block mask as element visibility (:func:`block_sparse_visible`), the attention over it
(:func:`block_sparse_attention_ref`), and the block top-k selection written as the rule reads
(:func:`block_topk_mask_ref`: a loop per query block, float64 block means). The ops' vectorised
selection is ``ditkernels.ops.sparse.block_topk_mask`` (torch) and ``triton_kernels/block_select.py``.
"""

from __future__ import annotations

import torch

from .attention import attention_ref


def block_sparse_visible(block_mask: torch.Tensor, block_size: tuple[int, int], seq_q: int,
                         seq_k: int) -> torch.Tensor:
    """Element visibility ``(batch or 1, heads or 1, seq_q, seq_k)`` of a bool block mask
    ``(batch or 1, heads or 1, ceil(seq_q/bq), ceil(seq_k/bk))``: query ``i`` sees key ``j`` iff
    ``block_mask[.., i // bq, j // bk]``."""
    bq, bk = block_size
    return block_mask.repeat_interleave(bq, -2).repeat_interleave(bk, -1)[..., :seq_q, :seq_k]


def block_sparse_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor,
                               block_size: tuple[int, int], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of softmax attention over the selected key blocks (:func:`attention_ref`'s dtypes)."""
    return attention_ref(q, k, v, scale, block_sparse_visible(block_mask, block_size, q.shape[2], k.shape[2]))


def block_topk_mask_ref(q: torch.Tensor, k: torch.Tensor, topk: int, block_size: tuple[int, int],
                        num_prefix: int, num_suffix: int, scale: float) -> torch.Tensor:
    """The block top-k selection by its rule, one query block at a time: block scores
    ``mean(q blk) . mean(k blk) * scale`` (float64), forced blocks (the diagonal blocks of the query
    block's tokens and the blocks of the global keys), then the best others up to ``topk`` blocks in
    all, equal scores going to the lowest block index. Returns bool (batch, heads, nq, nk)."""
    bq, bk = block_size
    b, h, sq, _ = q.shape
    sk = k.shape[2]
    nq, nk = -(-sq // bq), -(-sk // bk)
    out = torch.zeros(b, h, nq, nk, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            qm = torch.stack([q[bi, hi, m * bq:(m + 1) * bq].double().mean(0) for m in range(nq)])
            km = torch.stack([k[bi, hi, n * bk:(n + 1) * bk].double().mean(0) for n in range(nk)])
            s = qm @ km.T * scale
            for m in range(nq):
                forced = {min(tok // bk, nk - 1) for tok in range(m * bq, min((m + 1) * bq, sq))}
                forced |= {t // bk for t in range(min(num_prefix, sk))}
                forced |= {t // bk for t in range(sk - num_suffix, sk)}
                order = sorted(range(nk), key=lambda n: (-float(s[m, n]), n))  # ties: lowest index first
                rest = [n for n in order if n not in forced]
                keep = forced | set(rest[:max(topk - len(forced), 0)])
                out[bi, hi, m, sorted(keep)] = True
    return out
