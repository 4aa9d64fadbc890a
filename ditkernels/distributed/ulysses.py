"""Ulysses sequence parallelism around any ditkernels attention op (docs/spec.md §7).

Each rank holds ``(batch, heads, num_prefix + its grid tokens + num_suffix, head_dim)``. One all-to-all
moves the grid tokens of q, k and v (packed in one message) from "my tokens, all heads" to "all tokens, my
heads / P"; the global (text) tokens are already on every rank and are only sliced by head, never sent.
The op then runs on ``[prefix][full grid][suffix]`` with ``heads / P`` heads, exactly the single-process
problem for those heads, and one all-to-all moves the output back: each rank sends every other rank its
tokens' rows for its heads, plus its heads' rows of the replicated text output (which every rank needs).
Unequal bands work (split sizes per rank). Backward: autograd through the op, each all-to-all's backward
being the opposite all-to-all.

Bytes one rank r sends per call (B batch, H heads, D head_dim, n_j grid tokens of rank j, N = Σ n_j,
T = num_prefix + num_suffix, e = element size): in, ``3·B·(H/P)·n_r·D·(P−1)·e``; out,
``B·(H/P)·D·((P−1)·T + N − n_r)·e`` (:func:`ulysses_bytes`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist

from .. import _validate
from . import _comm
from ._check import agree
from ._layout import Layout, check_globals, check_local_tokens

__all__ = ["ulysses_attention", "ulysses_bytes"]


class _AllToAll(torch.autograd.Function):
    """1-D all-to-all with element split sizes; backward is the opposite all-to-all."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits))
        _comm.all_to_all(out, x.contiguous(), out_splits, in_splits, group)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        out_splits, in_splits = ctx.splits
        return _AllToAll.apply(g.contiguous(), in_splits, out_splits, ctx.group), None, None, None


def _takes(op: Callable, name: str) -> bool:
    try:
        params = inspect.signature(op).parameters
    except (TypeError, ValueError):  # builtins without a signature
        return False
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def _op_name(op: Callable) -> str:
    return getattr(op, "__qualname__", None) or type(op).__name__


def ulysses_bytes(tokens: Sequence[int], rank: int, *, batch: int, heads: int, head_dim: int,
                  num_global: int = 0, element_size: int = 2) -> int:
    """Bytes rank ``rank`` sends in one :func:`ulysses_attention` forward: ``tokens[j]`` grid tokens on rank j,
    ``num_global`` = num_prefix + num_suffix (the formula the bench reports and a test checks against the
    counted bytes)."""
    p = len(tokens)
    hl = heads // p
    n_r, n = tokens[rank], sum(tokens)
    qkv_in = 3 * batch * hl * n_r * head_dim * (p - 1)
    out = batch * hl * head_dim * ((p - 1) * num_global + n - n_r)
    return (qkv_in + out) * element_size


def ulysses_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, op: Callable | None = None,
                      grid: Sequence[int] | int | None = None, bands: Sequence[int] | None = None,
                      num_prefix: int = 0, num_suffix: int = 0, group: dist.ProcessGroup | None = None,
                      **op_kwargs):
    """Attention over the full sequence from each rank's part, with the heads split over the ranks.

    q, k, v: (batch, heads, num_prefix + this rank's grid tokens + num_suffix, head_dim), one shape on
    every rank but the sequence; ``heads`` divisible by the group size.
    op: any ditkernels attention op ``op(q, k, v, **kwargs)`` (default :func:`ditkernels.attention`):
    ``local_attention``, ``block_sparse_attention``, ``block_topk_attention``, ``topk_attention``,
    ``rettention`` (with a per-rank ``ReCache``: each rank's cache holds its heads), or a callable with the
    same contract. It runs on the full sequence with ``heads / P`` heads; ``op_kwargs`` are passed as for
    the full sequence (a ``block_mask`` must then cover this rank's heads only).
    grid: the image grid (None: a plain sequence, each rank's grid tokens being whatever it holds);
    bands: grid rows (frames) per rank, default an even split; num_prefix / num_suffix: global tokens.
    ``grid``, ``num_prefix`` and ``num_suffix`` are also passed to ``op`` when it takes them (``grid`` only
    when given).

    Returns the op's output for this rank's tokens (and its lse, (batch, heads, local seq), when the op
    returns one). Differentiable as the op is. Replicated text tokens: each rank's gradient covers its
    copy; the sum over ranks is the single-process gradient (docs/spec.md §7).
    """
    from ..ops.attention import attention

    op = attention if op is None else op
    rank, size = _comm.world(group)
    err, local_tokens, lay = None, 0, None
    try:
        if not callable(op):
            raise TypeError(f"op: expected an attention callable, got {type(op).__name__}")
        _validate.check_qkv(q, k, v)
        if k.shape != q.shape or v.shape != q.shape:
            raise ValueError(f"q, k, v: Ulysses needs one sequence for queries and keys, got shapes {tuple(q.shape)}, "
                             f"{tuple(k.shape)}, {tuple(v.shape)}")
        check_globals(num_prefix, num_suffix)
        if q.shape[1] % size:
            raise ValueError(f"q: heads ({q.shape[1]}) must be divisible by the number of ranks ({size}) for "
                             f"Ulysses attention, got shape {tuple(q.shape)}")
        local_tokens, lay = check_local_tokens(q, grid, bands, size, rank, num_prefix, num_suffix)
    except (TypeError, ValueError) as e:
        err = e
    same = {"(batch, heads, head_dim)": (tuple(q.shape[:2]) + tuple(q.shape[3:])) if isinstance(q, torch.Tensor) else None,
            "dtype": str(getattr(q, "dtype", None)), "grid": tuple(grid) if isinstance(grid, (tuple, list)) else grid,
            "bands": None if bands is None else tuple(bands), "num_prefix": num_prefix, "num_suffix": num_suffix,
            "op": _op_name(op)}
    counts = agree("ulysses_attention", err, group, same=same, each=local_tokens)
    if lay is None:  # a plain sequence: each rank's tokens are its band
        lay = Layout.make((sum(counts),), bands if bands is not None else tuple(counts), size, num_prefix, num_suffix)
        if tuple(counts) != lay.tokens:
            raise ValueError(f"ulysses_attention: bands {lay.bands} do not match the tokens each rank holds {tuple(counts)}")

    b, h, _, d = q.shape
    hl, n = h // size, lay.tokens
    heads = slice(rank * hl, (rank + 1) * hl)

    # ---- in: grid tokens of q, k, v in one all-to-all; the text is sliced by head -------------------------
    img = torch.stack([lay.split(t, 2)[1] for t in (q, k, v)])              # (3, B, H, n_r, D)
    send = img.unflatten(2, (size, hl)).movedim(2, 0).reshape(-1)           # (P, 3, B, Hl, n_r, D)
    recv = _AllToAll.apply(send, [3 * b * hl * nj * d for nj in n], [3 * b * hl * n[rank] * d] * size, group)
    img_full = torch.cat([c.view(3, b, hl, nj, d) for c, nj in zip(recv.split([3 * b * hl * nj * d for nj in n]), n)], 3)
    full = []
    for i, t in enumerate((q, k, v)):
        pre, _, suf = lay.split(t[:, heads], 2)
        full.append(torch.cat([pre, img_full[i], suf], 2) if lay.num_global else img_full[i])

    kwargs = dict(op_kwargs)
    if grid is not None and _takes(op, "grid"):
        kwargs["grid"] = lay.grid
    for name, val in (("num_prefix", lay.num_prefix), ("num_suffix", lay.num_suffix)):
        if _takes(op, name):
            kwargs[name] = val
    res = op(*full, **kwargs)
    out, lse = (res if isinstance(res, tuple) else (res, None))
    if isinstance(res, tuple) and (len(res) != 2 or not isinstance(lse, torch.Tensor) or lse.shape != out.shape[:3]):
        # every rank got the same kind of result: all of them raise here
        raise TypeError(f"op: ulysses_attention takes an output or (output, lse) from {_op_name(op)}, got a tuple of "
                        f"{[tuple(getattr(t, 'shape', ())) for t in res]} (drop return_mask= or the like)")
    out = _back(out, lay, rank, size, group)
    if lse is None:
        return out
    return out, _back(lse.unsqueeze(-1), lay, rank, size, group).squeeze(-1)


def _back(x: torch.Tensor, lay: Layout, rank: int, size: int, group) -> torch.Tensor:
    """(B, H/P, full seq, E) for this rank's heads -> (B, H, local seq, E) for this rank's tokens: each rank
    j gets its grid tokens plus this rank's heads of the global tokens."""
    b, hl, _, e = x.shape
    n, starts, tg = lay.tokens, lay.starts, lay.num_global
    pre, img, suf = lay.split(x, 2)
    chunks = [torch.cat([pre, img[:, :, starts[j]:starts[j] + n[j]], suf], 2).reshape(-1) for j in range(size)]
    recv = _AllToAll.apply(torch.cat(chunks), [b * hl * (tg + n[rank]) * e] * size,
                           [b * hl * (tg + nj) * e for nj in n], group)
    return torch.cat([c.view(b, hl, tg + n[rank], e) for c in recv.chunk(size)], 1)
