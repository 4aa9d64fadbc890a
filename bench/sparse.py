"""Sparse attention: ``ditkernels.block_topk_attention`` / ``block_sparse_attention`` / ``topk_attention``
vs SDPA (dense) and FlexAttention with the same BlockMask (``torch.compile``d).

Family ``sparse.block_topk``: q, k, v (B=1, H=8, S, D=64), 64x64 blocks, top-k key blocks per query
block at ``density`` (5-50 %). Impls: ``ditkernels`` (selection + attention, what a user calls),
``ditkernels_mask`` (block-sparse attention over the precomputed mask: the kernel alone), ``sdpa``
(dense), ``flex`` (FlexAttention compiled, with the BlockMask of the same selection, built outside the
timing). Useful FLOPs: 4 * B * H * D * (pairs in selected blocks). CPU: S = 4096 at 5/10/20/50 %
(``--quick``: 10 % only, the issue's bar: forward including selection vs SDPA dense); CUDA (bf16):
S in 4096, 8192, 16384. ``--sizes``: the sequence lengths.

Family ``sparse.topk``: exact per-query top-k (``topk = S / 16``), ditkernels vs SDPA (dense) and a
plain PyTorch top-k (scores, ``torch.topk``, scatter mask, softmax: DRSformer's formulation, which
holds the whole score matrix). CPU: S = 2048 (``--quick``: 1024); CUDA: 4096, 16384.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .attention import _make_inputs, _qkv, build_sdpa, flex_call
from .runner import Case, SweepConfig, dtype_name, register

BATCH, HEADS, HEAD_DIM, BLOCK = 1, 8, 64, 64
CPU_SEQS, CPU_DENSITIES, CPU_QUICK_DENSITIES = (4096,), (0.05, 0.1, 0.2, 0.5), (0.1,)
CUDA_SEQS, CUDA_QUICK_SEQS = (4096, 8192, 16384), (16384,)
CUDA_DENSITIES, CUDA_QUICK_DENSITIES = (0.05, 0.1, 0.2, 0.5), (0.1,)


def _mask(q: torch.Tensor, k: torch.Tensor, density: float) -> torch.Tensor:
    from ditkernels.ops.sparse import block_topk_mask

    return block_topk_mask(q.detach(), k.detach(), density=density, block_size=(BLOCK, BLOCK))


def _block_topk_builders(density: float) -> dict[str, Callable]:
    def build_ditkernels(inputs):
        import ditkernels

        q, k, v = _qkv(inputs)
        fn = lambda: ditkernels.block_topk_attention(q, k, v, density=density, block_size=(BLOCK, BLOCK))  # noqa: E731
        fn.detail = _backend(q) + ", selection included"
        return fn

    def build_mask(inputs):
        import ditkernels

        q, k, v = _qkv(inputs)
        mask = _mask(q, k, density)
        fn = lambda: ditkernels.block_sparse_attention(q, k, v, mask, block_size=(BLOCK, BLOCK))  # noqa: E731
        fn.detail = _backend(q) + ", precomputed mask"
        return fn

    def build_flex(inputs):
        q, k, v = _qkv(inputs)

        def block_mask():
            from torch.nn.attention.flex_attention import create_block_mask

            mask = _mask(q, k, density)

            def mask_mod(b, h, q_idx, kv_idx):
                return mask[b, h, q_idx // BLOCK, kv_idx // BLOCK]

            seq = q.shape[2]
            return create_block_mask(mask_mod, q.shape[0], q.shape[1], seq, seq, device=q.device,
                                     BLOCK_SIZE=(BLOCK, BLOCK))

        fn = flex_call(q, k, v, block_mask)
        fn.detail = "torch.compile, BlockMask of the same selection (built outside the timing)"
        return fn

    return {"ditkernels": build_ditkernels, "ditkernels_mask": build_mask, "sdpa": build_sdpa, "flex": build_flex}


def _backend(q: torch.Tensor) -> str:
    try:
        from ditkernels.backends import resolve_for

        return "backend=" + resolve_for("block_sparse_attention", q, head_dim=q.shape[-1]).NAME
    except Exception as e:  # noqa: BLE001 - the call itself will report a real failure
        return f"backend=? ({type(e).__name__})"


@register("sparse.block_topk")
def block_topk_cases(cfg: SweepConfig) -> Iterator[Case]:
    if cfg.is_cuda:
        seqs = CUDA_QUICK_SEQS if cfg.quick else CUDA_SEQS
        densities = CUDA_QUICK_DENSITIES if cfg.quick else CUDA_DENSITIES
    else:
        seqs, densities = CPU_SEQS, CPU_QUICK_DENSITIES if cfg.quick else CPU_DENSITIES
    if cfg.sizes is not None:
        seqs = tuple(cfg.sizes)
    for s in seqs:
        nb = -(-s // BLOCK)
        for density in densities:
            kk = max(1, min(nb, math.ceil(density * nb)))  # blocks per query block (the diagonal is one of them)
            pairs = BATCH * HEADS * nb * kk * BLOCK * BLOCK
            params: dict[str, Any] = {"B": BATCH, "H": HEADS, "S": s, "D": HEAD_DIM, "block": BLOCK,
                                      "density": density, "topk_blocks": kk, "dtype": dtype_name(cfg.dtype)}
            yield Case(
                name=f"B{BATCH}-H{HEADS}-S{s}-D{HEAD_DIM}-blk{BLOCK}-d{int(density * 100)}-{dtype_name(cfg.dtype)}",
                params=params,
                useful_flops=4.0 * HEAD_DIM * min(pairs, BATCH * HEADS * s * s),
                make_inputs=_make_inputs((BATCH, HEADS, s, HEAD_DIM), cfg.dtype, cfg.device),
                impls=_block_topk_builders(density),
                reference="sdpa",
                grad_inputs=("q", "k", "v"),
            )


def _topk_builders(topk: int) -> dict[str, Callable]:
    def build_ditkernels(inputs):
        import ditkernels

        q, k, v = _qkv(inputs)
        fn = lambda: ditkernels.topk_attention(q, k, v, topk)  # noqa: E731
        fn.detail = f"topk={topk}, two passes, query-chunk workspace"
        return fn

    def build_torch(inputs):
        q, k, v = _qkv(inputs)

        def fn():
            s = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
            idx = torch.topk(s, topk, dim=-1).indices
            keep = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, idx, True)
            return torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ v

        fn.detail = "scores + torch.topk + scatter mask (whole score matrix)"
        return fn

    return {"ditkernels": build_ditkernels, "sdpa": build_sdpa, "torch_topk": build_torch}


@register("sparse.topk")
def topk_cases(cfg: SweepConfig) -> Iterator[Case]:
    if cfg.sizes is not None:
        seqs: tuple[int, ...] = tuple(cfg.sizes)
    elif cfg.is_cuda:
        seqs = (16384,) if cfg.quick else (4096, 16384)
    else:
        seqs = (1024,) if cfg.quick else (2048,)
    for s in seqs:
        topk = max(1, s // 16)
        yield Case(
            name=f"B{BATCH}-H{HEADS}-S{s}-D{HEAD_DIM}-k{topk}-{dtype_name(cfg.dtype)}",
            params={"B": BATCH, "H": HEADS, "S": s, "D": HEAD_DIM, "topk": topk, "dtype": dtype_name(cfg.dtype)},
            useful_flops=4.0 * BATCH * HEADS * s * topk * HEAD_DIM,
            make_inputs=_make_inputs((BATCH, HEADS, s, HEAD_DIM), cfg.dtype, cfg.device),
            impls=_topk_builders(topk),
            reference="torch_topk",
            grad_inputs=("q", "k", "v"),
        )
