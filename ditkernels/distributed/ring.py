"""Ring attention: dense attention with the key/value bands passed around the ring (docs/spec.md §7).

Rank r first attends its queries (text and band) to its own keys (text and band), then, for s = 1 .. P-1,
to the band of rank (r - s) mod P, received from rank r - 1 while the previous block was being computed
(``batch_isend_irecv`` posted before the compute, waited after it). The text keys are on every rank and
never travel. Partial results are merged with the kernels' log-sum-exp (:func:`merge_attention`'s formula,
accumulated in float32, float64 for float64 inputs).

Backward: the flash backward of each block needs only (do, q, k_blk, v_blk, out, lse) with the *global*
merged out and lse, so the same rotation runs again: dq accumulates locally, and each band's dk/dv
accumulator travels with it around the ring and arrives, after P transfers, at the band's owner.

Bytes one rank sends per call (K/V band of rank j: ``2·B·H·n_j·D`` elements): forward, every band but the
one of rank r + 1, i.e. ``2·B·H·D·(N − n_{r+1})`` elements; backward, that again plus the dk/dv
accumulators, ``2·B·H·D·N`` float32 elements (:func:`ring_bytes`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist

from .. import _validate
from ..ops.attention import attention_bwd, attention_fwd
from . import _comm
from ._check import agree
from ._layout import Layout, check_globals, check_local_tokens
from .merge import merge_attention

__all__ = ["ring_attention", "ring_bytes"]


def ring_bytes(tokens: Sequence[int], rank: int, *, batch: int, heads: int, head_dim: int, element_size: int = 2,
               backward: bool = False) -> int:
    """Bytes rank ``rank`` sends in one :func:`ring_attention` forward (or, with ``backward``, one backward):
    ``tokens[j]`` grid tokens on rank j; the backward's dk/dv accumulators travel in float32 (float64 for
    float64 inputs)."""
    p = len(tokens)
    nxt = tokens[(rank + 1) % p]
    kv = 2 * batch * heads * head_dim * (sum(tokens) - nxt) * element_size if p > 1 else 0
    if not backward:
        return kv
    acc = 2 * batch * heads * head_dim * sum(tokens) * max(element_size, 4) if p > 1 else 0
    return kv + acc


def _wide(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ref_scores(q, k, scale):
    return torch.matmul(q.to(torch.float64), k.to(torch.float64).transpose(-1, -2)) * scale


def _block_fwd(q, k, v, scale: float, backend: str):
    """(out in q.dtype, lse) of q against one key block; lse float64 for float64 inputs (the merge and the
    float64 backward need it), else float32."""
    if backend == "reference":
        s = _ref_scores(q, k, scale)
        lse = torch.logsumexp(s, -1)
        out = torch.matmul(torch.exp(s - lse[..., None]), v.to(torch.float64)).to(q.dtype)
        return out, lse.to(_wide(q.dtype))
    out, lse = attention_fwd(q, k, v, scale, backend)
    if q.dtype == torch.float64:
        if q.device.type != "cpu":
            raise TypeError("q: float64 ring attention runs on the cpu and reference backends only")
        from ..backends import cpu

        lse = cpu._lse64(q, k, v, scale, None, 0, 0, {})
    return out, lse


def _block_bwd(do, q, k, v, out, lse, scale: float, backend: str):
    """(dq, dk, dv) of one key block, given the global out and lse (all rows see keys in other blocks too)."""
    if backend == "reference":
        f64 = torch.float64
        s = _ref_scores(q, k, scale)
        p = torch.exp(s - lse.to(f64)[..., None])
        do64 = do.to(f64)
        dv = torch.matmul(p.transpose(-1, -2), do64)
        dp = torch.matmul(do64, v.to(f64).transpose(-1, -2))
        ds = p * (dp - (do64 * out.to(f64)).sum(-1, keepdim=True)) * scale
        return (torch.matmul(ds, k.to(f64)).to(q.dtype), torch.matmul(ds.transpose(-1, -2), q.to(f64)).to(k.dtype),
                dv.to(v.dtype))
    return attention_bwd(do, q, k, v, out, lse, scale, backend)


def _upcast_bwd(dtype: torch.dtype, backend: str) -> bool:
    return backend == "cpu" and dtype in (torch.float16, torch.bfloat16)


class _Ring(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, lay: Layout, scale: float, backend: str, group):
        rank, size = _comm.world(group)
        nxt, prv = (rank + 1) % size, (rank - 1) % size
        b, h, _, d = q.shape
        band = torch.stack([lay.split(k, 2)[1], lay.split(v, 2)[1]]).contiguous()   # (2, B, H, n_r, D)

        def post(blk, s):  # send the block we hold, receive the one of rank (r - s) mod P
            buf = blk.new_empty(2, b, h, lay.tokens[(rank - s) % size], d)
            return buf, _comm.exchange([(blk, nxt)], [(buf, prv)], group, wait=False)

        pending = post(band, 1) if size > 1 else None
        out, lse = _block_fwd(q, k, v, scale, backend)
        out = out.to(_wide(q.dtype))
        for s in range(1, size):
            buf, work = pending
            work.wait()
            pending = post(buf, s + 1) if s + 1 < size else None
            o, l = _block_fwd(q, buf[0], buf[1], scale, backend)
            out, lse = merge_attention(out, lse, o, l)
        # The cpu kernels' fp16/bf16 backward takes delta = rowsum(P dP) over the keys it is given (exact for
        # one call, wrong for one block of many): ring runs their blocks' backward in float32 instead, with
        # delta from the unrounded float32 output.
        keep = out if _upcast_bwd(q.dtype, backend) else out.to(q.dtype)
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, keep, lse)
        ctx.lay, ctx.scale, ctx.backend, ctx.group = lay, scale, backend, group
        return out, lse.float()

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, out, lse = ctx.saved_tensors
        lay, scale, backend, group = ctx.lay, ctx.scale, ctx.backend, ctx.group
        rank, size = _comm.world(group)
        nxt, prv = (rank + 1) % size, (rank - 1) % size
        b, h, _, d = q.shape
        wide = _wide(q.dtype)
        do = do.contiguous()
        band = torch.stack([lay.split(k, 2)[1], lay.split(v, 2)[1]]).contiguous()
        up = _upcast_bwd(q.dtype, backend)
        cq, cdo = (q.float(), do.float()) if up else (q, do)

        def block_bwd(kb, vb):
            return _block_bwd(cdo, cq, kb.float() if up else kb, vb.float() if up else vb, out, lse, scale, backend)

        def post(blk, s):
            buf = blk.new_empty(2, b, h, lay.tokens[(rank - s) % size], d)
            return buf, _comm.exchange([(blk, nxt)], [(buf, prv)], group, wait=False)

        pending = post(band, 1) if size > 1 else None
        dq, dk, dv = block_bwd(k, v)
        dq = dq.to(wide)
        acc = torch.stack([lay.split(dk, 2)[1], lay.split(dv, 2)[1]]).to(wide)   # dk/dv of the band we hold
        for s in range(1, size):
            buf, work = pending
            work.wait()
            # pass the accumulator of the band we held on, receive the one of the band we now hold
            acc_in = acc.new_empty(buf.shape)
            acc_work = _comm.exchange([(acc.contiguous(), nxt)], [(acc_in, prv)], group, wait=False)
            pending = post(buf, s + 1) if s + 1 < size else None
            dqb, dkb, dvb = block_bwd(buf[0], buf[1])
            dq += dqb
            acc_work.wait()
            acc = acc_in + torch.stack([dkb, dvb])
        if size > 1:  # the accumulator of rank r + 1's band goes home; ours arrives from r - 1
            mine = acc.new_empty(2, b, h, lay.tokens[rank], d)
            _comm.exchange([(acc.contiguous(), nxt)], [(mine, prv)], group)
            acc = mine
        p, n = lay.num_prefix, lay.tokens[rank]
        dk[:, :, p:p + n] = acc[0]
        dv[:, :, p:p + n] = acc[1]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None


def ring_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid: Sequence[int] | int | None = None,
                   bands: Sequence[int] | None = None, num_prefix: int = 0, num_suffix: int = 0,
                   scale: float | None = None, return_lse: bool = False, backend: str | None = None,
                   group: dist.ProcessGroup | None = None):
    """Dense softmax attention over the full sequence from each rank's part, keys and values passed around
    the ring.

    q, k, v: (batch, heads, num_prefix + this rank's grid tokens + num_suffix, head_dim), one shape on every
    rank but the sequence. grid / bands / num_prefix / num_suffix: the layout (grid None: a plain sequence,
    each rank's tokens being whatever it holds). scale: default ``head_dim ** -0.5``.
    backend: ``"cpu"``, ``"triton"`` or ``"reference"`` (default: by device, as :func:`ditkernels.attention`).

    Returns this rank's rows of the output (and their float32 lse with ``return_lse``). Differentiable in q,
    k, v; replicated text tokens: each rank's gradient covers its copy, their sum over ranks is the
    single-process gradient (docs/spec.md §7).
    """
    from ..ops.attention import _backend

    rank, size = _comm.world(group)
    err, local_tokens, lay = None, 0, None
    try:
        _validate.check_qkv(q, k, v)
        if k.shape != q.shape or v.shape != q.shape:
            raise ValueError(f"q, k, v: ring attention needs one sequence for queries and keys, got shapes "
                             f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
        check_globals(num_prefix, num_suffix)
        scale = _validate.check_scale(scale, q.shape[-1])
        backend = _validate.check_backend(backend)
        backend = _backend(q, backend).__name__.rsplit(".", 1)[-1]   # the concrete name: "cpu", "triton", ...
        local_tokens, lay = check_local_tokens(q, grid, bands, size, rank, num_prefix, num_suffix)
    except (TypeError, ValueError, RuntimeError) as e:
        err = e
    same = {"(batch, heads, head_dim)": (tuple(q.shape[:2]) + tuple(q.shape[3:])) if isinstance(q, torch.Tensor) else None,
            "dtype": str(getattr(q, "dtype", None)), "grid": tuple(grid) if isinstance(grid, (tuple, list)) else grid,
            "bands": None if bands is None else tuple(bands), "num_prefix": num_prefix, "num_suffix": num_suffix,
            "scale": scale, "backend": backend}
    counts = agree("ring_attention", err, group, same=same, each=local_tokens)
    if lay is None:
        lay = Layout.make((sum(counts),), bands if bands is not None else tuple(counts), size, num_prefix, num_suffix)
        if tuple(counts) != lay.tokens:
            raise ValueError(f"ring_attention: bands {lay.bands} do not match the tokens each rank holds {tuple(counts)}")
    out, lse = _Ring.apply(q, k, v, lay, scale, backend, group)
    return (out, lse.detach()) if return_lse else out
