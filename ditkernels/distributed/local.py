"""Sequence-parallel local-window attention by halo exchange (docs/spec.md §7, §1).

The grid is split into contiguous bands along its first axis (rows of a 2-D grid, frames of a 3-D
one, tokens of a 1-D one). A rank holds ``(batch, heads, num_prefix + its band's tokens + num_suffix,
head_dim)``: the global (text) tokens replicated, then its band in row-major order. Each rank:

1. posts the halo exchange: it receives from its two neighbours exactly the key/value rows its
   queries can see (:func:`key_rows`: ``r-1`` rows for CLEAR's strict circle, ``r`` for a square,
   NATTEN's shifted window up to ``2r`` from the inner neighbour at the grid's edge, whole tiles for
   ``shape="tile"``) and sends its neighbours theirs;
2. while those are in flight computes what needs no halo: the text queries' partial attention over
   its own band's keys (plus the text keys, on rank 0 only, so that they count once) and the
   *interior* band rows (those whose windows stay in the band), then merges the text partials over
   the ranks by log-sum-exp (on gloo also while the halo travels; on NCCL that collective queues
   behind the halo);
3. waits, then computes the band's edge rows against band + halo keys.

Only the band's own queries are computed (never the halo's): the local op runs a sub-problem
(``LocalSpec.q_rows`` / ``k_rows``) whose mask is evaluated in the coordinates of the whole grid on
every backend, so clipping and NATTEN's shift happen at the grid's edge, not the band's.

Backward: the edge rows' key/value gradients of halo rows go back to the rank that owns those rows
(posted first; the interior rows and the text queries are computed while they travel) and are added
there. The text queries' upstream gradient is summed over ranks (a replicated output enters the loss
once, whatever rank it is used on) and each rank's text partial is differentiated with the merged
output and log-sum-exp, so its gradients are exact parts of the single-process gradient.
``extra_kv`` is sharded: each rank passes its own extra keys, all-gathered once in rank order (the
keys every grid query sees); their gradients are summed over ranks and each rank gets its part back.

Replicated inputs (the text tokens' q, k, v): each rank returns the gradient of its own copy; the
total gradient is their sum over ranks (docs/spec.md §7).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from .. import _validate
from ..ops.local import _check_extra_pair, spec_backward, spec_forward
from ..reference.local import LocalSpec
from . import _comm
from ._check import agree
from ._layout import check_bands

__all__ = ["local_attention", "key_rows", "HaloLayout", "halo_layout", "halo_bytes"]


# ================================================================================================
# Geometry (pure functions of the arguments: identical on every rank)
# ================================================================================================
def key_rows(spec: LocalSpec, q0: int, q1: int) -> tuple[int, int]:
    """Rows ``[k0, k1)`` of the grid's first axis holding every key that grid queries of rows
    ``[q0, q1)`` can see (the smallest such range; ``(q0, q1)`` when they see no grid key)."""
    n, r = spec.grid[0], spec.window[0]
    if spec.shape == "circle":
        if math.prod(spec.window) == 0:  # a zero radius admits no grid key
            return q0, q1
        k0, k1 = q0 - (r - 1), q1 + (r - 1)  # strict: |d| <= r - 1
    elif spec.shape == "tile":
        t = spec.tile[0]
        k0, k1 = (q0 // t - r) * t, ((q1 - 1) // t + r + 1) * t
    elif spec.border == "clip":
        k0, k1 = q0 - r, q1 + r
    elif n < 2 * r + 1:  # NATTEN: the whole dimension
        k0, k1 = 0, n
    else:  # NATTEN's start clamp(p - r, 0, n - k) is monotone in p
        k0 = min(max(q0 - r, 0), n - 2 * r - 1)
        k1 = min(max(q1 - 1 - r, 0), n - 2 * r - 1) + 2 * r + 1
    return max(k0, 0), min(k1, n)


@dataclass(frozen=True)
class HaloLayout:
    """The halo exchange of one rank (all rows along the grid's first axis, global coordinates).

    band: its rows ``[b0, b1)``; need: the key rows its queries see; recv_lo / recv_hi: rows received
    from the previous / next rank (``need[0]..b0`` and ``b1..need[1]``); send_lo / send_hi: rows of its
    band sent to the previous / next rank (``b0..`` and ``..b1``); interior: the band rows whose keys
    all lie in the band (``(a, a)`` when none).
    """

    rank: int
    band: tuple[int, int]
    need: tuple[int, int]
    recv_lo: int
    recv_hi: int
    send_lo: int
    send_hi: int
    interior: tuple[int, int]


def _starts(bands: tuple[int, ...]) -> list[int]:
    out = [0]
    for b in bands:
        out.append(out[-1] + b)
    return out


@functools.lru_cache(maxsize=64)
def halo_layout(spec: LocalSpec, bands: tuple[int, ...]) -> tuple[HaloLayout, ...]:
    """The halo exchange of every rank for bands of ``bands[i]`` rows (summing to ``grid[0]``).

    Raises ValueError (the same on every rank, before any communication) when a rank's queries see
    rows beyond its two neighbours' bands: a band thinner than the halo."""
    st = _starts(bands)
    p = len(bands)
    need = [key_rows(spec, st[i], st[i + 1]) for i in range(p)]
    for i in range(p):
        lo_ok = i == 0 and need[i][0] == 0 or i > 0 and need[i][0] >= st[i - 1]
        hi_ok = i == p - 1 and need[i][1] == st[p] or i < p - 1 and need[i][1] <= st[i + 2]
        if not (lo_ok and hi_ok):
            raise ValueError(
                f"bands: rank {i}'s band (rows {st[i]}..{st[i + 1]} of grid[0] = {spec.grid[0]}) sees key rows "
                f"{need[i][0]}..{need[i][1]}, beyond its neighbours' bands "
                f"(rows {st[max(i - 1, 0)]}..{st[min(i + 2, p)]}): "
                f"a band is thinner than the halo of window={spec.window} ({spec.shape}, {spec.border}); "
                f"use fewer ranks or wider bands (bands={list(bands)})")
    out = []
    for i in range(p):
        b0, b1 = st[i], st[i + 1]
        rows = [r for r in range(b0, b1) if st[i] <= key_rows(spec, r, r + 1)[0]
                and key_rows(spec, r, r + 1)[1] <= st[i + 1]]
        interior = (rows[0], rows[-1] + 1) if rows else (b0, b0)
        out.append(HaloLayout(
            rank=i, band=(b0, b1), need=need[i], recv_lo=b0 - need[i][0], recv_hi=need[i][1] - b1,
            send_lo=need[i - 1][1] - b0 if i > 0 else 0, send_hi=b1 - need[i + 1][0] if i < p - 1 else 0,
            interior=interior))
    return tuple(out)


def halo_bytes(grid: tuple[int, ...], window: int | tuple[int, ...], *, world_size: int, heads: int, head_dim: int,
               batch: int = 1, itemsize: int = 2, bands: tuple[int, ...] | None = None, shape: str = "circle",
               border: str = "clip", tile: int | tuple[int, ...] | None = None, num_prefix: int = 0,
               num_suffix: int = 0, num_extra: tuple[int, ...] | None = None) -> list[int]:
    """Bytes each rank sends in one forward of :func:`local_attention` (list indexed by rank).

    Halo keys and values: ``2 * rows * prod(grid[1:]) * batch * heads * head_dim * itemsize`` for the rows
    sent to both neighbours. With ``T = num_prefix + num_suffix`` text queries, the merge of their
    partials: an all-gather of their lse, ``(P - 1) * batch * heads * T * 4``, and an all-reduce of the
    weighted outputs, ``2 (P - 1) / P * batch * heads * T * head_dim * 4`` (8 instead of 4 for float64);
    with ``num_extra`` (extra keys per rank) their keys and values all-gathered, padded to the longest shard:
    ``(P - 1) * 2 * batch * heads * max(num_extra) * head_dim * itemsize``.
    The backward sends the gradients of the halo rows a rank received back to their owners (the same
    bytes for symmetric windows; NATTEN's shift at the grid's edge is not symmetric), and all-reduces the
    text queries' output gradient and the extra keys' gradients."""
    spec = LocalSpec.make(grid, window, shape=shape, border=border, tile=tile, num_prefix=num_prefix,
                          num_suffix=num_suffix)
    bands = check_bands(bands, spec.grid[0], world_size)
    row = spec.row_tokens * batch * heads * head_dim * itemsize
    t = spec.num_global
    out = []
    for lay in halo_layout(spec, bands):
        b = 2 * (lay.send_lo + lay.send_hi) * row
        if t:
            acc = max(itemsize, 4)
            b += (world_size - 1) * batch * heads * t * acc  # the lse all-gather
            b += batch * heads * t * head_dim * acc * 2 * (world_size - 1) // world_size  # the output all-reduce
        if num_extra:  # padded to the longest shard
            b += (world_size - 1) * 2 * batch * heads * max(num_extra) * head_dim * itemsize
        out.append(b)
    return out


def _dense_fwd(q, k, v, scale, backend):
    """(out, lse) of dense attention (a text-query partial); the reference keeps a float64 lse for
    float64 inputs (the kernels' lse is float32)."""
    from ..backends import DENSE_REFERENCE, has
    from ..ops.attention import _backend
    from ..reference.attention import attention_ref

    mod = _backend(q, backend)
    if has(mod, DENSE_REFERENCE):
        return attention_ref(q, k, v, scale)
    return mod.flash_fwd(q, k, v, scale=scale)


def _dense_bwd(do, q, k, v, out, lse, scale, backend):
    """(dq, dk, dv) of a partial of a larger softmax whose merged ``out`` and ``lse`` are given:
    ``p = exp(s - lse)``, ``ds = p (do vᵀ - rowsum(do ∘ out))`` (the flash backward)."""
    from ..backends import DENSE_REFERENCE, has
    from ..ops.attention import _backend

    mod = _backend(q, backend)
    if not has(mod, DENSE_REFERENCE):
        return mod.flash_bwd(do.contiguous(), q, k, v, out, lse, scale=scale)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    p = torch.exp(s - lse.to(acc)[..., None])
    do_ = do.to(acc)
    dv = torch.matmul(p.transpose(-1, -2), do_)
    dp = torch.matmul(do_, v.to(acc).transpose(-1, -2))
    ds = p * (dp - (do_ * out.to(acc)).sum(-1, keepdim=True))
    return ((torch.matmul(ds, k.to(acc)) * scale).to(q.dtype), (torch.matmul(ds.transpose(-1, -2), q.to(acc)) * scale)
            .to(k.dtype), dv.to(v.dtype))


def _merge(cfg, out: torch.Tensor, lse: torch.Tensor, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-sum-exp merge over the ranks of this rank's partial (out, lse) of the text queries: the
    partial lses all-gathered (small), then ``sum_r exp(lse_r - lse) out_r`` all-reduced (4x fewer bytes
    than all-gathering the outputs at P = 8). In ``acc`` (float32, float64 for float64)."""
    lse = lse.to(acc).contiguous()
    every = torch.empty((cfg.world * lse.shape[0],) + tuple(lse.shape[1:]), dtype=acc, device=lse.device)
    _comm.all_gather(every, lse, cfg.group)
    total = torch.logsumexp(every.view((cfg.world,) + tuple(lse.shape)), 0)
    w = torch.exp(lse - torch.where(torch.isfinite(total), total, torch.zeros_like(total)))
    w = torch.where(torch.isfinite(lse), w, torch.zeros_like(w))  # a partial that saw no key, never NaN
    merged = (out.to(acc) * w[..., None]).contiguous()
    _comm.all_reduce(merged, cfg.group)
    return merged, total


@dataclass(frozen=True)
class _Config:
    spec: LocalSpec  # the whole problem (num_extra: every rank's extra keys together)
    layouts: tuple[HaloLayout, ...]
    extra: tuple[int, ...]  # extra keys per rank
    rank: int
    group: object
    scale: float
    backend: str

    @property
    def lay(self) -> HaloLayout:
        return self.layouts[self.rank]

    @property
    def world(self) -> int:
        return len(self.layouts)

    def piece(self, q_rows: tuple[int, int], k_rows: tuple[int, int]) -> LocalSpec:
        s = self.spec
        return LocalSpec.make(s.grid, s.window, shape=s.shape, border=s.border, tile=s.tile, num_prefix=s.num_prefix,
                              num_suffix=s.num_suffix, num_extra=s.num_extra, q_rows=q_rows, k_rows=k_rows)

    def pieces(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """(top edge, interior, bottom edge) query rows; the edges need the halo."""
        (b0, b1), (a, c) = self.lay.band, self.lay.interior
        if a == c:
            return (b0, b0), (b0, b0), (b0, b1)
        return (b0, a), (a, c), (c, b1)


def _split(cfg: _Config, x: torch.Tensor):
    """(prefix, band, suffix) views of a rank's (B, H, P + band + S, D) tensor."""
    p, w = cfg.spec.num_prefix, cfg.spec.row_tokens
    nb = (cfg.lay.band[1] - cfg.lay.band[0]) * w
    return x[:, :, :p], x[:, :, p:p + nb], x[:, :, p + nb:]


def _rows(cfg: _Config, x: torch.Tensor, rows: tuple[int, int]) -> torch.Tensor:
    """Band rows ``rows`` (global) of a rank's (B, H, P + band + S, ...) tensor."""
    p, w, b0 = cfg.spec.num_prefix, cfg.spec.row_tokens, cfg.lay.band[0]
    return x[:, :, p + (rows[0] - b0) * w:p + (rows[1] - b0) * w]


def _halo_recv_buffers(cfg: _Config, k: torch.Tensor):
    b, h, _, d = k.shape
    w = cfg.spec.row_tokens
    return (torch.empty(2, b, h, cfg.lay.recv_lo * w, d, dtype=k.dtype, device=k.device),
            torch.empty(2, b, h, cfg.lay.recv_hi * w, d, dtype=k.dtype, device=k.device))


def _post_halo(cfg: _Config, k: torch.Tensor, v: torch.Tensor):
    """Posts the key/value halo exchange: returns (pending, rows from the previous rank, rows from the
    next rank), each (2, B, H, rows * prod(grid[1:]), D) holding k then v."""
    lay, w = cfg.lay, cfg.spec.row_tokens
    _, kb, _ = _split(cfg, k)
    _, vb, _ = _split(cfg, v)
    nb = kb.shape[2]
    sends = []
    if lay.send_lo:
        sends.append((torch.stack([kb[:, :, :lay.send_lo * w], vb[:, :, :lay.send_lo * w]]), cfg.rank - 1))
    if lay.send_hi:
        lo = nb - lay.send_hi * w
        sends.append((torch.stack([kb[:, :, lo:], vb[:, :, lo:]]), cfg.rank + 1))
    from_prev, from_next = _halo_recv_buffers(cfg, k)
    pending = _comm.exchange(sends, [(from_prev, cfg.rank - 1), (from_next, cfg.rank + 1)], cfg.group, wait=False)
    return pending, from_prev, from_next


def _extended(cfg: _Config, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, extra: torch.Tensor | None):
    """Keys ``[prefix][halo from prev][band][halo from next][suffix][extra]`` (the layout of k_rows = need)."""
    pre, band, suf = _split(cfg, x)
    parts = [pre, lo, band, hi, suf] + ([extra] if extra is not None else [])
    return torch.cat(parts, 2)


def _with_extra(x: torch.Tensor, extra: torch.Tensor | None) -> torch.Tensor:
    return x if extra is None else torch.cat([x, extra], 2)


def _text(cfg: _Config, x: torch.Tensor) -> torch.Tensor:
    pre, _, suf = _split(cfg, x)
    return torch.cat([pre, suf], 2)


def _text_keys(cfg: _Config, x: torch.Tensor) -> torch.Tensor:
    """Keys of this rank's text-query partial: its band, plus the text keys on rank 0 only."""
    return x if cfg.rank == 0 else _split(cfg, x)[1]


class _HaloLocalAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, ke, ve, cfg: _Config):
        spec, lay = cfg.spec, cfg.lay
        t = spec.num_global
        # extra keys: gathered once (padded to the longest shard), in rank order, before the halo is posted
        # (on NCCL a collective queued behind the halo would wait for it)
        ke_all = ve_all = None
        if spec.num_extra:
            ke_all, ve_all = _gather_extra(cfg, ke, ve)
        # 1. the halo exchange
        pending, lo, hi = _post_halo(cfg, k, v)
        acc = torch.promote_types(q.dtype, torch.float32)  # float32 partials (float64 for float64)
        out = _alloc_empty(q)
        lse = _alloc_empty(q, q.shape[:3], acc)
        # 2a. text queries: partial over this rank's band (+ text keys on rank 0)
        if t:
            o_t, l_t = _dense_fwd(_text(cfg, q), _text_keys(cfg, k), _text_keys(cfg, v), cfg.scale, cfg.backend)
        # 2b. the interior rows: keys of the band only
        top, mid, bot = cfg.pieces()
        if mid[0] < mid[1]:
            o, l = spec_forward(cfg.piece(mid, lay.band), _rows(cfg, q, mid), _with_extra(k, ke_all),
                                _with_extra(v, ve_all), cfg.scale, cfg.backend)
            _rows(cfg, out, mid).copy_(o)
            _rows(cfg, lse, mid).copy_(l)
        # 2c. the text partials merged over the ranks
        if t:
            o_t, l_t = _merge(cfg, o_t, l_t, acc)
            p = spec.num_prefix
            pre_o, _, suf_o = _split(cfg, out)
            pre_o.copy_(o_t[:, :, :p]), suf_o.copy_(o_t[:, :, p:])
            pre_l, _, suf_l = _split(cfg, lse)
            pre_l.copy_(l_t[:, :, :p]), suf_l.copy_(l_t[:, :, p:])
        # 3. the edge rows: band + halo keys
        pending.wait()
        kx = _extended(cfg, k, lo[0], hi[0], ke_all)
        vx = _extended(cfg, v, lo[1], hi[1], ve_all)
        for rows in (top, bot):
            if rows[0] < rows[1]:
                o, l = spec_forward(cfg.piece(rows, lay.need), _rows(cfg, q, rows), kx, vx, cfg.scale, cfg.backend)
                _rows(cfg, out, rows).copy_(o)
                _rows(cfg, lse, rows).copy_(l)
        del kx, vx
        ctx.cfg = cfg
        ctx.has_extra = ke is not None
        ctx.save_for_backward(q, k, v, lo, hi, ke_all, ve_all, out, lse)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, d_out, d_lse):
        cfg = ctx.cfg
        spec, lay = cfg.spec, cfg.lay
        q, k, v, lo, hi, ke_all, ve_all, out, lse = ctx.saved_tensors
        t, p, w = spec.num_global, spec.num_prefix, spec.row_tokens
        acc = torch.promote_types(k.dtype, torch.float32)
        # the text queries' upstream gradient, summed over ranks
        do_t = None
        if t:
            do_t = _text(cfg, d_out).contiguous()
            _comm.all_reduce(do_t, cfg.group)
        dq = _alloc_empty(q)
        # edge rows: gradients of band + halo keys
        top, mid, bot = cfg.pieces()
        kx = _extended(cfg, k, lo[0], hi[0], ke_all)
        vx = _extended(cfg, v, lo[1], hi[1], ve_all)
        dkx = torch.zeros(kx.shape, dtype=acc, device=k.device)
        dvx = torch.zeros(vx.shape, dtype=acc, device=k.device)
        for rows in (top, bot):
            if rows[0] < rows[1]:
                dq_, dk_, dv_ = spec_backward(cfg.piece(rows, lay.need), _rows(cfg, d_out, rows), _rows(cfg, q, rows),
                                              kx, vx, _rows(cfg, out, rows), _rows(cfg, lse, rows), cfg.scale,
                                              cfg.backend)
                _rows(cfg, dq, rows).copy_(dq_)
                dkx += dk_
                dvx += dv_
        del kx, vx
        # halo gradients go back to their owners
        nlo, nhi = lay.recv_lo * w, lay.recv_hi * w
        nb = (lay.band[1] - lay.band[0]) * w
        back_prev = torch.stack([dkx[:, :, p:p + nlo], dvx[:, :, p:p + nlo]]).to(k.dtype)
        back_next = torch.stack([dkx[:, :, p + nlo + nb:p + nlo + nb + nhi],
                                 dvx[:, :, p + nlo + nb:p + nlo + nb + nhi]]).to(k.dtype)
        b, h, _, d = k.shape
        got_prev = torch.empty(2, b, h, lay.send_lo * w, d, dtype=k.dtype, device=k.device)
        got_next = torch.empty(2, b, h, lay.send_hi * w, d, dtype=k.dtype, device=k.device)
        pending = _comm.exchange([(back_prev, cfg.rank - 1), (back_next, cfg.rank + 1)],
                                 [(got_prev, cfg.rank - 1), (got_next, cfg.rank + 1)], cfg.group, wait=False)
        # this rank's keys [prefix][band][suffix] and the gathered extra keys
        dk = torch.cat([dkx[:, :, :p], dkx[:, :, p + nlo:p + nlo + nb], dkx[:, :, p + nlo + nb + nhi:]], 2)
        dv = torch.cat([dvx[:, :, :p], dvx[:, :, p + nlo:p + nlo + nb], dvx[:, :, p + nlo + nb + nhi:]], 2)
        del dkx, dvx
        # interior rows (while the halo gradients travel)
        if mid[0] < mid[1]:
            dq_, dk_, dv_ = spec_backward(cfg.piece(mid, lay.band), _rows(cfg, d_out, mid), _rows(cfg, q, mid),
                                          _with_extra(k, ke_all), _with_extra(v, ve_all), _rows(cfg, out, mid),
                                          _rows(cfg, lse, mid), cfg.scale, cfg.backend)
            _rows(cfg, dq, mid).copy_(dq_)
            dk += dk_
            dv += dv_
        dk_extra = dv_extra = None
        if ke_all is not None:
            n = k.shape[2]
            dk_extra, dv_extra = dk[:, :, n:], dv[:, :, n:]
            dk, dv = dk[:, :, :n], dv[:, :, :n]
        # text queries: this rank's partial, differentiated with the merged output and lse
        if t:
            # a partial of a softmax spread over ranks needs delta = rowsum(do * merged out); the cpu kernels'
            # fp16 / bf16 backward computes delta from the keys it is given (right for a whole softmax only),
            # so the text partial runs in float32 (as ring_attention does for its blocks)
            up = (lambda x: x.to(acc)) if q.dtype in (torch.float16, torch.bfloat16) else (lambda x: x)
            dq_t, dk_t, dv_t = _dense_bwd(up(do_t), up(_text(cfg, q)), up(_text_keys(cfg, k)), up(_text_keys(cfg, v)),
                                          up(_text(cfg, out)), _text(cfg, lse), cfg.scale, cfg.backend)
            pre, _, suf = _split(cfg, dq)
            pre.copy_(dq_t[:, :, :p]), suf.copy_(dq_t[:, :, p:])
            _text_keys(cfg, dk).add_(dk_t)
            _text_keys(cfg, dv).add_(dv_t)
        # the halo gradients of this rank's rows, computed by its neighbours
        pending.wait()
        _, dkb, _ = _split(cfg, dk)
        _, dvb, _ = _split(cfg, dv)
        if lay.send_lo:
            dkb[:, :, :lay.send_lo * w] += got_prev[0]
            dvb[:, :, :lay.send_lo * w] += got_prev[1]
        if lay.send_hi:
            dkb[:, :, nb - lay.send_hi * w:] += got_next[0]
            dvb[:, :, nb - lay.send_hi * w:] += got_next[1]
        dke = dve = None
        if ctx.has_extra:
            dke, dve = _scatter_extra(cfg, dk_extra, dv_extra)
            dke, dve = dke.to(k.dtype), dve.to(v.dtype)
        return dq, dk.to(k.dtype), dv.to(v.dtype), dke, dve, None


def _alloc_empty(like: torch.Tensor, shape=None, dtype=None) -> torch.Tensor:
    from .. import _alloc

    return _alloc.empty(*(like.shape if shape is None else shape), dtype=dtype or like.dtype, device=like.device)


def _gather_extra(cfg: _Config, ke: torch.Tensor, ve: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Every rank's extra keys / values, concatenated in rank order: (B, H, sum(extra), D) each."""
    mx = max(cfg.extra)
    b, h, m, d = ke.shape
    mine = torch.zeros(2, b, h, mx, d, dtype=ke.dtype, device=ke.device)
    mine[0, :, :, :m], mine[1, :, :, :m] = ke, ve
    out = torch.empty((cfg.world * 2,) + tuple(mine.shape[1:]), dtype=ke.dtype, device=ke.device)
    _comm.all_gather(out, mine, cfg.group)
    out = out.view((cfg.world,) + tuple(mine.shape))
    parts = [out[r, :, :, :, :cfg.extra[r]] for r in range(cfg.world)]
    kv = torch.cat(parts, 3)
    return kv[0], kv[1]


def _scatter_extra(cfg: _Config, dk: torch.Tensor, dv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradients of the gathered extra keys, summed over ranks; this rank's part."""
    both = torch.stack([dk, dv]).contiguous()
    _comm.all_reduce(both, cfg.group)
    off = sum(cfg.extra[:cfg.rank])
    m = cfg.extra[cfg.rank]
    return both[0, :, :, off:off + m], both[1, :, :, off:off + m]


# ================================================================================================
# The public function
# ================================================================================================
def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, ...],
                    window: int | tuple[int, ...], *, bands: tuple[int, ...] | None = None, group=None,
                    shape: str = "circle", border: str = "clip", tile: int | tuple[int, ...] | None = None,
                    num_prefix: int = 0, num_suffix: int = 0,
                    extra_kv: tuple[torch.Tensor, torch.Tensor] | None = None, scale: float | None = None,
                    return_lse: bool = False, backend: str | None = None):
    """Local-window attention (:func:`ditkernels.local_attention`) on a grid split into bands over the
    ranks of ``group``, by halo exchange (docs/spec.md §7).

    q, k, v: this rank's part, (batch, heads, num_prefix + bands[rank] * prod(grid[1:]) + num_suffix,
    head_dim): the global tokens (replicated, the same on every rank), then its band of the grid's
    first axis in row-major order. bands: rows (frames) per rank, in rank order, summing to grid[0];
    default an even split (the first ``grid[0] % P`` ranks one row more). extra_kv: this rank's
    extra keys (batch, heads, M_rank, head_dim) each; the keys every grid query sees are all ranks'
    extra keys in rank order. Other options: as :func:`ditkernels.local_attention`.

    Returns this rank's part of the output (and of the lse); the text rows are the same on every rank.
    Gradients: each rank gets those of its band's rows and of its extra keys; for the replicated text
    tokens each rank gets the gradient of its copy, and their sum over ranks is the single-process
    gradient (a replicated output is counted once: its upstream gradients are summed over ranks).

    Communication per forward: the halo rows of k and v to and from the two neighbours
    (:func:`halo_bytes`), the merge of the text queries' partials (an all-gather of their lse and an
    all-reduce of the weighted outputs), an all-gather of the extra keys, and one small all-gather
    of the validation outcome. No rank holds more than its band plus halo of
    keys and values. Overlap: the text partial and the interior rows run while the halo travels (the
    text merge too on gloo; on NCCL it queues behind the halo); in the backward the interior rows and the text partial run while the halo gradients
    travel back. A band thinner than the halo (a rank's window reaching beyond its neighbours) raises
    ValueError on every rank before any data moves.
    """
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("ditkernels.distributed.local_attention: torch.distributed is not initialised "
                           "(call torch.distributed.init_process_group first)")
    rank, world = _comm.world(group)
    err, layouts, spec, ke, ve, m = None, None, None, None, None, None
    try:
        spec = LocalSpec.make(grid, window, shape=shape, border=border, tile=tile, num_prefix=num_prefix,
                              num_suffix=num_suffix)
        bands = check_bands(bands, spec.grid[0], world)
        layouts = tuple(halo_layout(spec, bands))
        _validate.check_qkv(q, k, v)
        seq = spec.num_global + bands[rank] * spec.row_tokens
        for name, t in (("q", q), ("k", k)):
            if t.shape[2] != seq:
                raise ValueError(f"{name}: expected seq = num_prefix + bands[{rank}] * prod(grid[1:]) + num_suffix = "
                                 f"{spec.num_prefix} + {bands[rank]} * {spec.row_tokens} + {spec.num_suffix} = {seq} "
                                 f"on rank {rank}, got shape {tuple(t.shape)}")
        if extra_kv is not None:
            ke, ve = _check_extra_pair(extra_kv)
            b, h, _, d = q.shape
            for name, t in (("extra_kv[0]", ke), ("extra_kv[1]", ve)):
                if t.dtype != q.dtype or t.device != q.device or t.shape[:2] != (b, h) or t.shape[3] != d:
                    raise ValueError(f"{name}: expected ({b}, {h}, M, {d}) {q.dtype} on {q.device} (as q), got "
                                     f"{tuple(t.shape)} {t.dtype} on {t.device}")
            m = ke.shape[2]
        scale = _validate.check_scale(scale, q.shape[-1])
        backend = _validate.check_backend(backend)
        if not isinstance(return_lse, bool):
            raise TypeError(f"return_lse: expected a bool, got {type(return_lse).__name__}")
    except (TypeError, ValueError) as e:
        err = e
    same = {"grid": grid, "window": window, "bands": None if layouts is None else tuple(x.band for x in layouts),
            "options": (shape, border, tile, num_prefix, num_suffix, scale, return_lse, backend),
            "q": None if err else (tuple(q.shape[:2]) + tuple(q.shape[3:]), str(q.dtype)),
            "extra_kv": extra_kv is not None}
    extra = tuple(x or 0 for x in agree("local_attention", err, group, same=same, each=m))
    spec = LocalSpec.make(grid, window, shape=shape, border=border, tile=tile, num_prefix=num_prefix,
                          num_suffix=num_suffix, num_extra=sum(extra))
    cfg = _Config(spec, layouts, extra, rank, group, scale, backend)
    out, lse = _HaloLocalAttention.apply(q, k, v, ke, ve, cfg)
    return (out, lse.detach().to(torch.float32)) if return_lse else out
