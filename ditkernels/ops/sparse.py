"""Block-sparse and block top-k attention (docs/spec.md §2) on the flash core.

Layers: the block schedule (:func:`block_sparse_schedule` = ``BlockSchedule.from_tile_mask`` of the
user's block mask, re-tiled for the backend; :func:`block_topk_schedule` = pooled block scores and a
top-k selection) -> backend kernels (``flash_fwd/flash_bwd`` with that CSR schedule, no element mask)
-> registered ops ``ditkernels::block_sparse_attention_fwd`` / ``_bwd`` (fake impls + autograd) ->
:func:`block_sparse_attention` and :func:`block_topk_attention`.

Blocks and kernel tiles. The user's ``block_size = (bq, bk)`` fixes the meaning of ``block_mask``:
query block ``m`` holds queries ``[m*bq, (m+1)*bq)``, key block ``n`` keys ``[n*bk, (n+1)*bk)``
(the last ones may be shorter). The reference and cpu backends run these blocks as they are (any
positive size). Triton tiles are powers of two >= 16, at most the shipped forward config's tile for
the head_dim / dtype: a block is cut into ``bq / t`` tiles of ``t = min(g, config tile)``, ``g``
being the block size itself when it is a power of two, else the largest power of two dividing it
(multiples of 16); any other block size is refused with a ValueError.

Spatial blocks (``grid=``, block top-k only). With ``grid=(H, W)`` (or ``(T, H, W)``), the grid
tokens are regrouped into boxes of ``tile`` tokens (2-D/3-D image tiles, chosen as square as the
block allows) before the blocks are formed: the sequence is permuted to
``[prefix][full boxes, row-major box order][left-over grid tokens, row-major][suffix]`` and cut into
blocks of ``bq`` tokens there, so every full box is exactly one block. The attention runs on the
permuted q, k, v (a gather) and the output is scattered back; the selection is therefore made
between image tiles, not between row segments.
"""

from __future__ import annotations

import functools
import math
from typing import List  # custom_op signatures: torch 2.6 infers no schema from list[int]

import torch

from .. import _validate, backends
from ..backends import BLOCK_TOPK_SELECT, POW2_TILES, has, resolve_for
from ..schedule import BlockSchedule, TiledSchedule

DEFAULT_BLOCK = (64, 64)
# Backends with the POW2_TILES capability (a constant, so torch.compile traces the check without a break).
_POW2_TILES_BACKENDS = frozenset(name for name in backends.NAMES if has(backends.get(name), POW2_TILES))


# ================================================================================================
# Validation helpers
# ================================================================================================
def _check_block_size(block_size: object) -> tuple[int, int]:
    if isinstance(block_size, int) and not isinstance(block_size, bool):
        block_size = (block_size, block_size)
    if not (isinstance(block_size, (tuple, list)) and len(block_size) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block_size)):
        raise ValueError(f"block_size: expected (block_q, block_k) positive ints, got {block_size!r}")
    return int(block_size[0]), int(block_size[1])


def _check_block_mask(block_mask: object, q: torch.Tensor, k: torch.Tensor, bq: int, bk: int) -> torch.Tensor:
    if not isinstance(block_mask, torch.Tensor):
        raise TypeError(f"block_mask: expected a bool torch.Tensor, got {type(block_mask).__name__}")
    if block_mask.dtype != torch.bool:
        raise TypeError(f"block_mask: expected dtype torch.bool, got {block_mask.dtype}")
    b, h, sq, _ = q.shape
    sk = k.shape[2]
    nq, nk = -(-sq // bq), -(-sk // bk)
    if block_mask.dim() != 4 or block_mask.shape[2:] != (nq, nk) or block_mask.shape[0] not in (1, b) \
            or block_mask.shape[1] not in (1, h):
        raise ValueError(f"block_mask: expected shape ({b} or 1, {h} or 1, {nq}, {nk}) = (batch, heads, "
                         f"ceil({sq}/{bq}), ceil({sk}/{bk})), got {tuple(block_mask.shape)}")
    if block_mask.device != q.device:
        raise ValueError(f"block_mask: expected device {q.device} (that of q), got {block_mask.device}")
    return block_mask


def pow2_tile_reason(b: int, name: str) -> str | None:
    """Why a backend with ``POW2_TILES`` cannot run user blocks of ``b`` tokens (None when it can)."""
    if b >= 16 and (b & (b - 1) == 0 or b % 16 == 0):
        return None
    return (f"{name}: the triton backend runs blocks that are powers of two >= 16 or multiples of 16, "
            f"got {b}; use the cpu or reference backend, or another block size")


def _pow2_tile(b: int, name: str) -> int:
    """``POW2_TILES`` tile for a user block of ``b`` tokens: ``b`` itself (power of two >= 16) or the
    largest power of two >= 16 dividing it."""
    reason = pow2_tile_reason(b, name)
    if reason:
        raise ValueError(reason)
    return b if b & (b - 1) == 0 else b & -b


# ================================================================================================
# Schedules
# ================================================================================================
def block_sparse_schedule(block_mask: torch.Tensor, block_size: tuple[int, int], seq_q: int, seq_k: int,
                          backend: str | None = None, max_tile: tuple[int, int] | None = None) -> BlockSchedule:
    """The CSR schedule a backend executes for ``block_mask``.

    block_mask: bool (batch or 1, heads or 1, ceil(seq_q/bq), ceil(seq_k/bk)). Returns a
    :class:`BlockSchedule` with one head slice when the mask has batch = heads = 1, else batch*heads
    slices; its tiles are the user's blocks, re-tiled for a backend with ``POW2_TILES`` (triton) into
    powers of two of at most ``max_tile`` (the forward config's tile, so every launch runs a shipped,
    compile-checked tile size or a smaller one).
    """
    bq, bk = block_size
    b, h, nq, nk = block_mask.shape
    tm = block_mask.reshape(b * h, nq, nk)
    if backend is not None and has(backends.get(backend), POW2_TILES):
        tq, tk = _pow2_tile(bq, "block_size[0]"), _pow2_tile(bk, "block_size[1]")
        if max_tile is not None:
            tq, tk = min(tq, max_tile[0]), min(tk, max_tile[1])
        if (tq, tk) != (bq, bk):
            nq2, nk2 = -(-seq_q // tq), -(-seq_k // tk)
            rows = torch.arange(nq2, device=tm.device) * tq // bq
            cols = torch.arange(nk2, device=tm.device) * tk // bk
            tm = tm[:, rows][:, :, cols]
        bq, bk = tq, tk
    return BlockSchedule.from_tile_mask(tm, bq, bk, seq_q, seq_k)


def _expand_heads(block_mask: torch.Tensor, b: int, h: int) -> torch.Tensor:
    if block_mask.shape[:2] == (1, 1):
        return block_mask
    return block_mask.expand(b, h, *block_mask.shape[2:])


def _topk_from_density(topk: int | None, density: float | None, nk: int) -> int:
    if (topk is None) == (density is None):
        raise ValueError(f"topk, density: expected exactly one of them, got topk={topk!r}, density={density!r}")
    if topk is not None:
        if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
            raise ValueError(f"topk: expected a positive int (key blocks per query block), got {topk!r}")
        return min(topk, nk)
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"density: expected a float in (0, 1], got {density!r}")
    return max(1, min(nk, math.ceil(density * nk)))


def _box_shape(grid: tuple[int, ...], block: int) -> tuple[int, ...]:
    """A box of ``block`` tokens over the grid dimensions, as square as divisors allow (last dims first)."""
    nd = len(grid)
    if nd == 1:
        return (block,)
    best = None
    divs = [d for d in range(1, block + 1) if block % d == 0]
    for shape in (s for s in _factorisations(block, nd, divs)):
        if any(s > g for s, g in zip(shape, grid)):
            continue
        cost = max(shape) / min(shape)
        if best is None or cost < best[0]:
            best = (cost, shape)
    return best[1] if best is not None else (1,) * (nd - 1) + (block,)


def _factorisations(n: int, parts: int, divs: List[int]):
    if parts == 1:
        yield (n,)
        return
    for d in divs:
        if n % d == 0:
            for rest in _factorisations(n // d, parts - 1, divs):
                yield (d,) + rest


def grid_permutation(seq: int, grid: tuple[int, ...], block: int, num_prefix: int = 0,
                     num_suffix: int = 0) -> torch.Tensor:
    """int64 ``(seq,)``: token order with the grid regrouped into boxes of ``block`` tokens.

    ``perm[i]`` is the original token at position ``i`` of the permuted sequence
    ``[prefix][full boxes, row-major box order][left-over grid tokens, row-major][suffix]``.
    """
    ng = math.prod(grid)
    if num_prefix + ng + num_suffix != seq:
        raise ValueError(f"grid: expected num_prefix + prod(grid) + num_suffix = {num_prefix} + {ng} + {num_suffix} "
                         f"to equal seq = {seq}, got {num_prefix + ng + num_suffix}")
    box = _box_shape(tuple(grid), block)
    full = [g // s for g, s in zip(grid, box)]
    coords = torch.stack(torch.meshgrid(*(torch.arange(g) for g in grid), indexing="ij"), -1).reshape(-1, len(grid))
    lin = torch.zeros(ng, dtype=torch.int64)
    for a in range(len(grid)):
        lin = lin * grid[a] + coords[:, a]
    inside = torch.ones(ng, dtype=torch.bool)
    for a in range(len(grid)):
        inside &= coords[:, a] < full[a] * box[a]
    # key of a token inside the full boxes: (box index in row-major box order, position in the box)
    bidx = torch.zeros(ng, dtype=torch.int64)
    pidx = torch.zeros(ng, dtype=torch.int64)
    for a in range(len(grid)):
        bidx = bidx * max(full[a], 1) + coords[:, a] // box[a]
        pidx = pidx * box[a] + coords[:, a] % box[a]
    key = torch.where(inside, bidx * block + pidx, ng * block + lin)
    order = torch.argsort(key)
    return torch.cat([torch.arange(num_prefix), num_prefix + lin[order],
                      torch.arange(num_prefix + ng, seq)]).to(torch.int64)


def _build_grid_orders(seq: int, grid: tuple[int, ...], block: int, num_prefix: int, num_suffix: int,
                       device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    perm = grid_permutation(seq, grid, block, num_prefix, num_suffix)
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(seq)
    return perm.to(device), inv.to(device)


_cached_grid_orders = functools.lru_cache(maxsize=64)(_build_grid_orders)


def _grid_orders(seq: int, grid: tuple[int, ...], block: int, num_prefix: int, num_suffix: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm, inverse) of :func:`grid_permutation` on ``device``, built once per layout and device."""
    if torch.compiler.is_compiling():  # traced into the graph as constants (Dynamo ignores caches, with a warning)
        return _build_grid_orders(seq, grid, block, num_prefix, num_suffix, device)
    return _cached_grid_orders(seq, grid, block, num_prefix, num_suffix, device)


def _grid_orders_for(grid: object, q: torch.Tensor, k: torch.Tensor, bq: int, bk: int, num_prefix: int,
                     num_suffix: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(perm, inverse) of spatial blocks for ``grid=``, after checking the grid and the inputs allow them."""
    if not (isinstance(grid, (tuple, list)) and 1 <= len(grid) <= 3
            and all(isinstance(g, int) and not isinstance(g, bool) and g >= 1 for g in grid)):
        raise ValueError(f"grid: expected a tuple of 1 to 3 positive ints, got {grid!r}")
    sq, sk = q.shape[2], k.shape[2]
    if sq != sk or bq != bk:
        raise ValueError(f"grid: spatial blocks need self-attention with square blocks, got seq_q={sq}, seq_k={sk}, "
                         f"block_size=({bq}, {bk})")
    return _grid_orders(sq, tuple(int(g) for g in grid), bq, num_prefix, num_suffix, q.device)


def _check_globals(num_prefix: object, num_suffix: object, seq: int) -> tuple[int, int]:
    for name, val in (("num_prefix", num_prefix), ("num_suffix", num_suffix)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 0:
            raise ValueError(f"{name}: expected a non-negative int, got {val!r}")
    if num_prefix + num_suffix > seq:
        raise ValueError(f"num_prefix, num_suffix: expected num_prefix + num_suffix <= seq = {seq}, "
                         f"got {num_prefix} + {num_suffix}")
    return int(num_prefix), int(num_suffix)


def _pooled(x: torch.Tensor, block: int) -> torch.Tensor:
    """Means over blocks of ``block`` rows: (B, H, S, D) -> (B, H, ceil(S/block), D) float32 (float64 kept)."""
    b, h, s, d = x.shape
    n = -(-s // block)
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xp = x.to(acc)
    if n * block != s:
        xp = torch.nn.functional.pad(xp, (0, 0, 0, n * block - s))
    sums = xp.reshape(b, h, n, block, d).sum(3)
    counts = torch.full((n,), float(block), dtype=acc, device=x.device)
    counts[-1] = s - (n - 1) * block
    return sums / counts[:, None]


def block_topk_mask(q: torch.Tensor, k: torch.Tensor, *, topk: int | None = None, density: float | None = None,
                    block_size: tuple[int, int] = DEFAULT_BLOCK, num_prefix: int = 0, num_suffix: int = 0,
                    scale: float | None = None) -> torch.Tensor:
    """The block selection of :func:`block_topk_attention` as a bool mask (batch, heads, nq, nk).

    q: (batch, heads, seq_q, head_dim); k: (batch, heads, seq_k, head_dim), already in block order
    (:func:`grid_permutation` for spatial blocks). Scores ``mean_q(block) . mean_k(block) * scale`` in
    float32; every query block keeps the key blocks holding a global token (the first ``num_prefix``
    / last ``num_suffix`` keys) and the key blocks overlapping its own token range (the diagonal),
    plus the best of the others up to ``topk`` blocks in all (``max(topk, forced)`` blocks per row);
    equal scores at the cut go to the lowest key-block index. Runs under no_grad; vectorised torch
    (no loop over blocks): the reference of the triton selection kernels
    (``ditkernels.triton_kernels.block_select``), which the ops use on the triton backend.
    """
    bq, bk = block_size
    sq, sk = q.shape[2], k.shape[2]
    nq, nk = -(-sq // bq), -(-sk // bk)
    kk = _topk_from_density(topk, density, nk)
    scale = _validate.check_scale(scale, q.shape[-1])
    with torch.no_grad():
        s = torch.matmul(_pooled(q, bq), _pooled(k, bk).transpose(-1, -2)) * scale  # (B, H, nq, nk)
        dev = q.device
        forced = torch.zeros(nq, nk, dtype=torch.bool, device=dev)
        # diagonal: key blocks overlapping [m*bq, min((m+1)*bq, sq)) (clipped to the keys)
        m = torch.arange(nq, device=dev)
        lo = torch.clamp(m * bq // bk, max=nk - 1)
        hi = torch.clamp((torch.clamp((m + 1) * bq, max=sq) - 1) // bk, max=nk - 1)
        n = torch.arange(nk, device=dev)
        forced |= (n[None, :] >= lo[:, None]) & (n[None, :] <= hi[:, None])
        if num_prefix:
            forced[:, : -(-min(num_prefix, sk) // bk)] = True
        if num_suffix:
            forced[:, max(sk - num_suffix, 0) // bk:] = True
        s = s.masked_fill(forced, float("inf"))
        s = torch.where(s == 0, 0.0, s)  # -0.0 ties with +0.0 (the triton kernel's order keys)
        # a stable descending sort: ties at the cut go to the lowest block index, as in the triton kernel
        idx = torch.sort(s, dim=-1, descending=True, stable=True).indices[..., :kk]
        mask = torch.zeros(s.shape, dtype=torch.bool, device=dev)
        mask.scatter_(-1, idx, True)
        return mask | forced


def block_topk_schedule(q: torch.Tensor, k: torch.Tensor, *, topk: int | None = None, density: float | None = None,
                        block_size: tuple[int, int] = (64, 64), num_prefix: int = 0, num_suffix: int = 0,
                        grid: tuple[int, ...] | None = None, scale: float | None = None,
                        backend: str | None = None) -> BlockSchedule:
    """The block top-k selection of :func:`block_topk_attention` as a schedule, without attention.

    q: (batch, heads, seq_q, head_dim); k: (batch, heads, seq_k, head_dim). Options as
    :func:`block_topk_attention`; ``backend`` picks the selection's path (the fused Triton kernels on
    ``"triton"``, the default for CUDA tensors; torch otherwise). Returns a CSR :class:`~ditkernels.schedule.BlockSchedule` with
    batch*heads head slices (slice ``b*heads + h``), tiles of ``block_size`` tokens, no partial
    visits (``partial`` is all 0: a selected block is attended in full; the ragged last blocks are
    cut by the kernels' bounds). With ``grid`` (self-attention, seq_q == seq_k) it is a
    :class:`~ditkernels.schedule.TiledSchedule` whose ``q_tokens`` / ``kv_tokens`` list each block's
    tokens (image tiles, padded with ``seq``): a backend that runs contiguous tiles gathers q, k, v
    by ``q_tokens[q_tokens < seq]`` (:func:`grid_permutation`) and runs the same CSR.
    """
    _validate.check_tensor("q", q, 4)
    _validate.check_tensor("k", k, 4)
    if k.shape[:2] != q.shape[:2] or k.shape[3] != q.shape[3] or k.device != q.device:
        raise ValueError(f"k: expected shape ({q.shape[0]}, {q.shape[1]}, seq_k, {q.shape[3]}) on {q.device}, "
                         f"got {tuple(k.shape)} on {k.device}")
    bq, bk = _check_block_size(block_size)
    sq, sk = q.shape[2], k.shape[2]
    num_prefix, num_suffix = _check_globals(num_prefix, num_suffix, sk)
    b, h = q.shape[:2]
    kk = _topk_from_density(topk, density, -(-sk // bk))
    scale = _validate.check_scale(scale, q.shape[-1])
    backend = _validate.check_backend(backend)
    q, k = q.detach(), k.detach()
    perm = None
    if grid is not None:
        perm, _ = _grid_orders_for(grid, q, k, bq, bk, num_prefix, num_suffix)
        q, k = q[:, :, perm], k[:, :, perm]
    mask = _select(q, k, kk, bq, bk, num_prefix, num_suffix, scale, backend)
    base = BlockSchedule.from_tile_mask(mask.reshape(b * h, *mask.shape[2:]), bq, bk, sq, sk)
    if perm is None:
        return base
    n = mask.shape[2]
    tok = torch.full((n * bq,), sq, dtype=torch.int32, device=q.device)
    tok[:sq] = perm.to(torch.int32)
    tok = tok.reshape(n, bq)
    return TiledSchedule(bq, bk, sq, sk, base.kv_ptr, base.kv_idx, base.partial, q_tokens=tok, kv_tokens=tok.clone())


# ================================================================================================
# The registered ops
# ================================================================================================
def _backend(q: torch.Tensor, backend: str, block_size: tuple[int, int] | None = None):
    return resolve_for("block_sparse_attention", q, backend, head_dim=q.shape[-1], block_size=block_size)


def _select(q: torch.Tensor, k: torch.Tensor, topk: int, bq: int, bk: int, num_prefix: int, num_suffix: int,
            scale: float, backend: str | None) -> torch.Tensor:
    """The block selection on ``backend``'s device path: the fused Triton kernels on the triton backend
    (rows of up to ``block_select.MAX_KEY_BLOCKS`` key blocks), else the torch reference."""
    mod = _backend(q, backend)
    nk = -(-k.shape[2] // bk)
    kk = min(topk, nk)
    if has(mod, BLOCK_TOPK_SELECT) and mod.block_topk_supported(nk):
        return mod.block_topk_mask(q, k, kk, bq, bk, num_prefix, num_suffix, scale)
    return block_topk_mask(q, k, topk=kk, block_size=(bq, bk), num_prefix=num_prefix, num_suffix=num_suffix,
                           scale=scale)


@torch.library.custom_op("ditkernels::block_topk_mask", mutates_args=())
def block_topk_mask_op(q: torch.Tensor, k: torch.Tensor, topk: int, block_q: int, block_k: int, num_prefix: int,
                       num_suffix: int, scale: float, backend: str) -> torch.Tensor:
    """:func:`block_topk_mask` as a registered op on ``backend`` (not differentiable: pass detached q, k)."""
    return _select(q, k, topk, block_q, block_k, num_prefix, num_suffix, scale, backend or None)


@block_topk_mask_op.register_fake
def _(q, k, topk, block_q, block_k, num_prefix, num_suffix, scale, backend):
    b, h, sq, _ = q.shape
    return q.new_empty(b, h, -(-sq // block_q), -(-k.shape[2] // block_k), dtype=torch.bool)


def _schedule(mod, block_mask: torch.Tensor, bq: int, bk: int, q: torch.Tensor, k: torch.Tensor) -> BlockSchedule:
    bm = _expand_heads(block_mask, q.shape[0], q.shape[1])
    return block_sparse_schedule(bm, (bq, bk), q.shape[2], k.shape[2], mod.NAME,
                                 tuple(mod.block_sizes(q.shape[-1], q.dtype)))


@torch.library.custom_op("ditkernels::block_sparse_attention_fwd", mutates_args=())
def block_sparse_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor,
                               block_q: int, block_k: int, scale: float,
                               backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, H, Sq, D) in q.dtype and lse (B, H, Sq) float32 over the selected key blocks."""
    mod = _backend(q, backend, (block_q, block_k))
    return mod.flash_fwd(q, k, v, scale=scale, schedule=_schedule(mod, block_mask, block_q, block_k, q, k))


@block_sparse_attention_fwd.register_fake
def _(q, k, v, block_mask, block_q, block_k, scale, backend):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("ditkernels::block_sparse_attention_bwd", mutates_args=())
def block_sparse_attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                               out: torch.Tensor, lse: torch.Tensor, block_mask: torch.Tensor, block_q: int,
                               block_k: int, scale: float,
                               backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of block-sparse attention given ``do``."""
    mod = _backend(q, backend, (block_q, block_k))
    return mod.flash_bwd(do.contiguous(), q, k, v, out, lse, scale=scale,
                         schedule=_schedule(mod, block_mask, block_q, block_k, q, k))


@block_sparse_attention_bwd.register_fake
def _(do, q, k, v, out, lse, block_mask, block_q, block_k, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, block_mask, block_q, block_k, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, block_mask)
    ctx.opts = (block_q, block_k, scale, backend)


def _backward(ctx, d_out, d_lse):
    q, k, v, out, lse, block_mask = ctx.saved_tensors
    dq, dk, dv = block_sparse_attention_bwd(d_out, q, k, v, out, lse, block_mask, *ctx.opts)
    return dq, dk, dv, None, None, None, None, None


block_sparse_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ================================================================================================
# The functional API
# ================================================================================================
def _check_flag(name: str, val: object) -> bool:
    if not isinstance(val, bool):
        raise TypeError(f"{name}: expected a bool, got {type(val).__name__}")
    return val


def block_sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: torch.Tensor, *,
                           block_size: tuple[int, int] = DEFAULT_BLOCK, scale: float | None = None,
                           return_lse: bool = False, backend: str | None = None):
    """Exact softmax attention over the union of the selected key blocks (docs/spec.md §2).

    q: (batch, heads, seq_q, head_dim); k, v: (batch, heads, seq_k, head_dim); any strides; float16 /
    bfloat16 / float32 (float64 on the reference and cpu backends); head_dim 1..256.
    block_mask: bool (batch, heads, ceil(seq_q/bq), ceil(seq_k/bk)); a batch or heads dim of 1 is
    shared by every batch / head (like FlexAttention's BlockMask). Query block ``m`` (queries
    ``[m*bq, (m+1)*bq)``) sees exactly the keys of the key blocks ``n`` with ``block_mask[.., m, n]``.
    block_size: (bq, bk), or one int for both. Any positive sizes on reference / cpu; triton takes
    powers of two >= 16 and multiples of 16. scale: defaults to ``head_dim ** -0.5``.
    return_lse: also return the log-sum-exp over the visible keys, float32 (batch, heads, seq_q),
    detached. backend: ``"reference"``, ``"cpu"`` or ``"triton"``; default by device.

    Returns out (batch, heads, seq_q, head_dim) in q.dtype, or (out, lse). A query block with no
    selected key block outputs zeros (lse = -inf). Differentiable with respect to q, k and v.
    """
    _validate.check_qkv(q, k, v)
    bq, bk = _check_block_size(block_size)
    block_mask = _check_block_mask(block_mask, q, k, bq, bk)
    scale = _validate.check_scale(scale, q.shape[-1])
    backend = _validate.check_backend(backend)
    _check_flag("return_lse", return_lse)
    if backend in _POW2_TILES_BACKENDS:  # a requested backend's block-size limit, as a ValueError
        _pow2_tile(bq, "block_size[0]"), _pow2_tile(bk, "block_size[1]")
    out, lse = block_sparse_attention_fwd(q, k, v, block_mask, bq, bk, scale, backend)
    return (out, lse.detach()) if return_lse else out


def block_topk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, topk: int | None = None,
                         density: float | None = None, block_size: tuple[int, int] = DEFAULT_BLOCK,
                         num_prefix: int = 0, num_suffix: int = 0, grid: tuple[int, ...] | None = None,
                         scale: float | None = None, return_lse: bool = False, return_mask: bool = False,
                         backend: str | None = None):
    """Block top-k attention (docs/spec.md §2): pooled block scores select key blocks, then block-sparse attention.

    q: (batch, heads, seq_q, head_dim); k, v: (batch, heads, seq_k, head_dim).
    Block scores are ``mean(q over query block) . mean(k over key block) * scale`` (float32); each
    query block keeps its ``topk`` best key blocks (or ``ceil(density * num_key_blocks)``; give
    exactly one), always including the key blocks of the global tokens (the first ``num_prefix`` and
    last ``num_suffix`` keys) and the key blocks on its own diagonal; equal scores at the cut go to the
    lowest key-block index. grid: (H, W) or (T, H, W) of the image tokens
    (``seq = num_prefix + prod(grid) + num_suffix``, self-attention, square blocks): blocks become image
    tiles (see the module docstring; the mask is then over those blocks). block_size, scale,
    return_lse, backend: as :func:`block_sparse_attention`. return_mask: also return the selected bool
    block mask (batch, heads, nq, nk).

    Returns out, then lse and the mask when asked. The selection is not differentiated; the
    attention is (with respect to q, k and v).
    """
    _validate.check_qkv(q, k, v)
    bq, bk = _check_block_size(block_size)
    num_prefix, num_suffix = _check_globals(num_prefix, num_suffix, k.shape[2])
    _check_flag("return_lse", return_lse)
    _check_flag("return_mask", return_mask)
    perm = None
    if grid is not None:
        perm, inv = _grid_orders_for(grid, q, k, bq, bk, num_prefix, num_suffix)
        q, k, v = q[:, :, perm], k[:, :, perm], v[:, :, perm]
    kk = _topk_from_density(topk, density, -(-k.shape[2] // bk))
    backend = _validate.check_backend(backend)
    mask = block_topk_mask_op(q.detach(), k.detach(), kk, bq, bk, num_prefix, num_suffix,
                              _validate.check_scale(scale, q.shape[-1]), backend)
    out, lse = block_sparse_attention(q, k, v, mask, block_size=(bq, bk), scale=scale, return_lse=True,
                                      backend=backend or None)
    if perm is not None:
        out, lse = out[:, :, inv], lse[:, :, inv]
    res = (out,)
    if return_lse:
        res += (lse,)
    if return_mask:
        res += (mask,)
    return res[0] if len(res) == 1 else res
