"""Local-window attention (docs/spec.md §1: CLEAR circles, NATTEN squares, sliding tiles) on the flash core.

Layers: the plan (:func:`local_attention_plan`, a :class:`LocalPlan` = the block schedule the kernels
execute) -> backend kernels (``flash_fwd/flash_bwd`` with that schedule and the ``MASK_LOCAL``
element mask) -> registered ops ``ditkernels::local_attention_fwd`` / ``_bwd`` (fake impls +
autograd) -> :func:`local_attention`.

Tiling. Query tiles are 1-D/2-D/3-D boxes of the grid in row-major tile order (e.g. 8x8 = 64
tokens), KV tiles likewise boxes of grid keys; a query tile visits exactly the KV tiles that hold at
least one visible pair, and a visit is *partial* (element mask applied) unless every pair of the two
boxes is visible. Global tokens (prefix + suffix) form a dense tail: global query tiles visit every
non-extra KV tile, and every grid query tile visits every global KV tile and every extra KV tile,
none of them partial. The token sets of the tiles are ``plan.q_tokens`` / ``plan.kv_tokens``
(:class:`ditkernels.schedule.TiledSchedule`); the tile shapes are chosen per problem among a few
candidates to minimise the computed pairs.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, field
from typing import List  # custom_op signatures: torch 2.6 infers no schema from list[int]

import torch

from .. import _validate
from ..backends import DENSE_REFERENCE, LOCAL_TILING, has, resolve_for
from ..reference.attention import attention_ref, attention_ref_backward
from ..reference.local import LocalSpec, local_visible, shift_start
from ..schedule import MASK_LOCAL, ElementMask, TiledSchedule

DEFAULT_BLOCK = (64, 64)


# ================================================================================================
# The plan
# ================================================================================================
@dataclass
class LocalPlan(TiledSchedule):
    """The block schedule of one local-attention problem, as the kernels execute it.

    Besides the :class:`~ditkernels.schedule.TiledSchedule` fields: ``spec`` (the problem),
    ``q_tile`` / ``kv_tile`` (the grid box shapes of the tiles, 3-D padded in front with 1),
    ``num_grid_q_tiles`` / ``num_grid_kv_tiles`` (grid tiles come first, in row-major tile order;
    then the global tiles; then, for keys, the extra-key tiles), ``useful_pairs`` (visible
    query-key pairs, counted exactly) and ``mask`` (the element mask of the partial visits).

    How a kernel runs it (the CPU kernels do exactly this; a Triton kernel follows the same steps):

    - program ``m`` (a query tile) takes its tokens ``q_tokens[m]`` (block_m int32: valid tokens
      first, padded with ``seq_q``) -- ``_q_tokens(m)`` becomes a load of that row, and every
      load/store of Q, O and lse is masked by ``token < seq_q`` (tiles at the grid edge and the last
      global tile are not full);
    - it visits ``kv_idx[0, kv_ptr[0, m]:kv_ptr[0, m+1]]``; KV tile ``u`` holds ``kv_tokens[u]``
      (padded with ``seq_k``), so K/V loads are masked by ``token < seq_k`` on every visit;
    - on a visit with ``partial == 1`` it applies ``mask`` (``MASK_LOCAL``, 15 int32 parameters:
      ``LocalSpec.mask_params``) to the (query token, key token) pairs: decode each token into
      (class, t, y, x) once per tile (global / grid / extra from the prefix, grid and suffix counts),
      then the rule of docs/spec.md §1 in int64 (circle: ``sum_a d_a^2 prod_{b!=a} r_b^2 < prod r^2``);
      non-partial visits need no mask at all;
    - the dK/dV pass runs ``plan.transposed()`` (CSR over KV tiles, ``q_tokens``/``kv_tokens``
      swapped) the same way. K and V may be gathered per visit or permuted once into tile order.
    """

    spec: LocalSpec | None = None
    q_tile: tuple[int, int, int] = (1, 1, 1)
    kv_tile: tuple[int, int, int] = (1, 1, 1)
    num_grid_q_tiles: int = 0
    num_grid_kv_tiles: int = 0
    useful_pairs: int = 0
    mask: ElementMask = field(default_factory=ElementMask)

    @property
    def efficiency(self) -> float:
        """useful / computed pairs (1.0: no wasted work)."""
        return self.useful_pairs / max(self.computed_pairs, 1)

    def summary(self) -> dict:
        return {"grid": self.spec.grid, "window": self.spec.window, "shape": self.spec.shape,
                "q_tile": self.q_tile[3 - self.spec.ndim:], "kv_tile": self.kv_tile[3 - self.spec.ndim:],
                "useful_pairs": self.useful_pairs, "computed_pairs": self.computed_pairs,
                "slot_pairs": self.slot_pairs, "visited_tiles": self.visited_tiles,
                "partial_tiles": self.partial_tiles,
                "computed_over_useful": self.computed_pairs / max(self.useful_pairs, 1)}


def _intervals(lo: int, hi: int, t: int) -> tuple[torch.Tensor, torch.Tensor]:
    """[first, last] coordinates of the tiles of t along [lo, hi)."""
    a = torch.arange(lo, hi, t, dtype=torch.int64)
    return a, torch.clamp(a + t, max=hi) - 1


def _ranges3(spec: LocalSpec) -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]:
    """Per padded dimension, the [lo, hi) coordinates of the query and of the key grid tokens
    (the whole grid but along the first axis of a q_rows / k_rows sub-problem)."""
    grid = spec.padded()[0]
    ax = 3 - spec.ndim
    q, k = [(0, n) for n in grid], [(0, n) for n in grid]
    if spec.q_rows is not None:
        q[ax] = spec.q_rows
    if spec.k_rows is not None:
        k[ax] = spec.k_rows
    return tuple(q), tuple(k)


def _spec3(spec: LocalSpec):
    grid, window, tile = spec.padded()
    return (grid, window, tile, spec.shape, spec.border, *_ranges3(spec))


def _dim_relation(spec3, a: int, tq: int, tk: int):
    """Per-dimension relation between the query intervals (tiles of tq) and key intervals (tiles of
    tk) of dimension ``a`` of the padded grid. Returns (exists, full, dmin2, dmax2): (na, nb) tensors;
    for separable shapes ``exists``/``full`` are final along this dimension; for the circle, the
    squared min / max offsets feed the joint test."""
    (grid, window, tile, shape, border, qr, kr) = spec3
    n, r = grid[a], window[a]
    alo, ahi = (x[:, None] for x in _intervals(*qr[a], tq))
    blo, bhi = (x[None, :] for x in _intervals(*kr[a], tk))
    if shape == "tile":
        t = tile[a]
        alo, ahi, blo, bhi = alo // t, ahi // t, blo // t, bhi // t
    zero = torch.zeros((), dtype=torch.int64)
    dmin = torch.maximum(torch.maximum(blo - ahi, alo - bhi), zero)
    dmax = torch.maximum(bhi - alo, ahi - blo)
    if shape == "square" and border == "shift" and n >= 2 * r + 1:
        k = 2 * r + 1
        s_lo, s_hi = shift_start(alo, n, r), shift_start(ahi, n, r)  # window starts are monotone in p
        exists = (blo <= s_hi + k - 1) & (bhi >= s_lo)
        full = (blo >= s_hi) & (bhi <= s_lo + k - 1)
    elif shape == "square" and border == "shift":
        exists = full = torch.ones(dmin.shape, dtype=torch.bool)
    else:
        exists, full = dmin <= r, dmax <= r
    return exists, full, dmin * dmin, dmax * dmax


def _grid_visits(spec: LocalSpec, q_tile, kv_tile):
    """Visits between grid tiles: (q_id, kv_id, partial), ids in row-major tile order."""
    spec3 = _spec3(spec)
    window, qr, kr = spec3[1], spec3[5], spec3[6]
    rels = [_dim_relation(spec3, a, q_tile[a], kv_tile[a]) for a in range(3)]
    if spec.shape == "circle":
        r2 = [r * r for r in window]
        big = math.prod(r2)
        coef = [math.prod(r2[b] for b in range(3) if b != a) for a in range(3)]
        # per-dimension necessary condition: dmin_a^2 * coef_a < big
        pairs = [torch.nonzero((rel[2] * coef[a] < big) & rel[0]) for a, rel in enumerate(rels)]
    else:
        pairs = [torch.nonzero(rel[0]) for rel in rels]
    if any(p.shape[0] == 0 for p in pairs):
        e = torch.zeros(0, dtype=torch.int64)
        return e, e, torch.zeros(0, dtype=torch.bool)
    idx = torch.cartesian_prod(*(torch.arange(p.shape[0]) for p in pairs))  # (C, 3)
    qa = [pairs[a][idx[:, a], 0] for a in range(3)]
    kb = [pairs[a][idx[:, a], 1] for a in range(3)]
    if spec.shape == "circle":
        smin = sum(rels[a][2][qa[a], kb[a]] * coef[a] for a in range(3))
        smax = sum(rels[a][3][qa[a], kb[a]] * coef[a] for a in range(3))
        keep = smin < big
        full = smax < big
    else:
        keep = torch.ones(idx.shape[0], dtype=torch.bool)
        full = rels[0][1][qa[0], kb[0]] & rels[1][1][qa[1], kb[1]] & rels[2][1][qa[2], kb[2]]
    na = [-(-(qr[a][1] - qr[a][0]) // q_tile[a]) for a in range(3)]
    nb = [-(-(kr[a][1] - kr[a][0]) // kv_tile[a]) for a in range(3)]
    q_id = (qa[0] * na[1] + qa[1]) * na[2] + qa[2]
    kv_id = (kb[0] * nb[1] + kb[1]) * nb[2] + kb[2]
    return q_id[keep], kv_id[keep], ~full[keep]


def _grid_tile_tokens(spec: LocalSpec, shape3, rng3, base: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens ``(num_tiles, prod(shape3))`` of the tiles of the grid region ``rng3`` (per dimension
    [lo, hi), the whole grid but along the first axis; its tokens are numbered row-major from ``base``),
    valid first, sentinel -1, and their counts."""
    grid, _, _ = spec.padded()
    lo, hi = torch.tensor([r[0] for r in rng3]), torch.tensor([r[1] for r in rng3])
    nt = [-(-(rng3[a][1] - rng3[a][0]) // shape3[a]) for a in range(3)]
    tiles = torch.cartesian_prod(*(torch.arange(n) for n in nt)).reshape(-1, 3)  # row-major tile order
    offs = torch.cartesian_prod(*(torch.arange(s) for s in shape3)).reshape(-1, 3)
    c = lo + tiles[:, None, :] * torch.tensor(shape3) + offs[None, :, :]  # (T, B, 3)
    valid = (c < hi).all(-1)
    first = (rng3[0][0] * grid[1] + rng3[1][0]) * grid[2] + rng3[2][0]
    tok = base - first + (c[..., 0] * grid[1] + c[..., 1]) * grid[2] + c[..., 2]
    tok = torch.where(valid, tok, torch.full_like(tok, -1))
    order = torch.sort((~valid).to(torch.int8), dim=1, stable=True).indices  # valid tokens first
    return torch.gather(tok, 1, order), valid.sum(1)


def _chunks(tokens: torch.Tensor, block: int, sentinel: int) -> torch.Tensor:
    n = tokens.numel()
    nt = -(-n // block)
    out = torch.full((nt * block,), sentinel, dtype=torch.int64)
    out[:n] = tokens
    return out.reshape(nt, block)


def _useful_pairs(spec: LocalSpec) -> int:
    """Exact number of visible (query, key) pairs, without enumerating them."""
    grid, window, tile = spec.padded()
    qr, kr = _ranges3(spec)
    g, nq, nk = spec.num_global, spec.q_grid_range()[1], spec.k_grid_range()[1]
    pairs = spec.num_global_q * (g + nk) + nq * (g + spec.num_extra)

    def overlap(a: int, d: int) -> int:  # query coordinates p of dimension a with a key at p + d
        return max(0, min(qr[a][1], kr[a][1] - d) - max(qr[a][0], kr[a][0] - d))

    if spec.shape == "circle":
        r2 = [r * r for r in window]
        big = math.prod(r2)
        if big == 0:
            return pairs
        cx = r2[0] * r2[1]
        px = torch.arange(*qr[2])
        for dt in range(-min(window[0] - 1, grid[0] - 1), min(window[0] - 1, grid[0] - 1) + 1):
            for dy in range(-min(window[1] - 1, grid[1] - 1), min(window[1] - 1, grid[1] - 1) + 1):
                rem = big - dt * dt * r2[1] * r2[2] - dy * dy * r2[0] * r2[2]
                if rem <= 0:
                    continue
                hw = math.isqrt((rem - 1) // cx)  # largest |dx| with dx^2 * cx < rem
                rows = overlap(0, dt) * overlap(1, dy)
                cnt = (torch.clamp(px + hw, max=kr[2][1] - 1) - torch.clamp(px - hw, min=kr[2][0]) + 1)
                cnt = cnt.clamp(min=0).sum()
                pairs += rows * int(cnt)
        return pairs
    per_dim = []
    for a in range(3):  # separable: a product of per-dimension counts
        nn, r = grid[a], window[a]
        p = torch.arange(*qr[a])
        if spec.shape == "tile":
            t = tile[a]
            tp, ntile = p // t, -(-nn // t)
            lo = torch.clamp(tp - r, min=0) * t
            hi = torch.clamp((torch.clamp(tp + r, max=ntile - 1) + 1) * t, max=nn) - 1
        elif spec.border == "shift" and nn >= 2 * r + 1:
            lo = shift_start(p, nn, r)
            hi = lo + 2 * r
        elif spec.border == "shift":
            lo, hi = torch.zeros_like(p), torch.full_like(p, nn - 1)
        else:
            lo, hi = torch.clamp(p - r, min=0), torch.clamp(p + r, max=nn - 1)
        lo, hi = lo.clamp(min=kr[a][0]), hi.clamp(max=kr[a][1] - 1)
        per_dim.append(int((hi - lo + 1).clamp(min=0).sum()))
    return pairs + math.prod(per_dim)


def _count_grid_visits(spec: LocalSpec, q_tile, kv_tile) -> tuple[int, int]:
    """(visits, partial visits) between grid tiles, as :func:`_grid_visits` would list them, counted
    from per-dimension histograms (fast enough to score many candidate tile shapes)."""
    spec3 = _spec3(spec)
    window = spec3[1]
    rels = [_dim_relation(spec3, a, q_tile[a], kv_tile[a]) for a in range(3)]
    if spec.shape != "circle":
        visits = math.prod(int(rel[0].sum()) for rel in rels)
        full = math.prod(int((rel[0] & rel[1]).sum()) for rel in rels)
        return visits, visits - full
    r2 = [r * r for r in window]
    big = math.prod(r2)
    coef = [math.prod(r2[b] for b in range(3) if b != a) for a in range(3)]
    hists = []
    for a, rel in enumerate(rels):
        ok = (rel[2] * coef[a] < big) & rel[0]
        vals = torch.stack([rel[2][ok] * coef[a], rel[3][ok] * coef[a]], 1)
        if vals.shape[0] == 0:
            return 0, 0
        uniq, cnt = torch.unique(vals, dim=0, return_counts=True)
        hists.append((uniq, cnt))
    idx = torch.cartesian_prod(*(torch.arange(h[0].shape[0]) for h in hists)).reshape(-1, 3)
    smin = sum(hists[a][0][idx[:, a], 0] for a in range(3))
    smax = sum(hists[a][0][idx[:, a], 1] for a in range(3))
    mult = hists[0][1][idx[:, 0]] * hists[1][1][idx[:, 1]] * hists[2][1][idx[:, 2]]
    keep = smin < big
    return int(mult[keep].sum()), int(mult[keep & (smax >= big)].sum())


def _candidate_shapes(grid3: tuple[int, int, int], ndim: int, block: int) -> list[tuple[int, int, int]]:
    """Box shapes of ``block`` tokens (powers of two) that fit the grid's dimensions reasonably."""
    if block & (block - 1):
        # not a power of two: 1-D boxes along the last dimension only
        return [(1, 1, block)]
    pows = [1 << i for i in range(block.bit_length())]
    out = []
    for s in itertools.product(pows, repeat=ndim):
        if math.prod(s) != block:
            continue
        s3 = (1,) * (3 - ndim) + tuple(s)
        # a box much taller than the grid only pads
        if any(s3[a] > 1 and s3[a] >= 2 * grid3[a] for a in range(3)):
            continue
        out.append(s3)
    if not out:  # tiny grid: everything along the last dimension
        out = [(1,) * (3 - ndim) + (1,) * (ndim - 1) + (block,)]
    return out


def _choose_tiles(spec: LocalSpec, block_m: int, block_n: int):
    """The (q_tile, kv_tile) box shapes minimising the padded pairs a kernel computes on grid tiles."""
    grid3 = spec.padded()[0]
    best = None
    qs = _candidate_shapes(grid3, spec.ndim, block_m)
    ks = _candidate_shapes(grid3, spec.ndim, block_n)
    for qt in qs:
        for kt in ks:
            cost = _count_grid_visits(spec, qt, kt)
            if best is None or cost < best[0]:
                best = (cost, qt, kt)
    return best[1], best[2]


@functools.lru_cache(maxsize=64)
def _plan(spec: LocalSpec, block_m: int, block_n: int, q_tile: tuple[int, int, int] | None,
          kv_tile: tuple[int, int, int] | None) -> LocalPlan:
    if q_tile is None or kv_tile is None:
        cq, ck = _choose_tiles(spec, block_m, block_n)
        q_tile = q_tile or cq
        kv_tile = kv_tile or ck
    p, s, seq_q, seq_k = spec.num_prefix, spec.num_suffix, spec.seq_q, spec.seq_k
    nq, nk = spec.q_grid_range()[1], spec.k_grid_range()[1]
    qr, kr = _ranges3(spec)
    # query tiles: grid boxes, then the global tail (none with q_rows)
    qp = p if spec.q_rows is None else 0
    q_grid, _ = _grid_tile_tokens(spec, q_tile, qr, qp)
    q_glob = _chunks(torch.cat([torch.arange(qp), torch.arange(qp + nq, seq_q)]), block_m, -1)
    q_tok = torch.cat([q_grid, q_glob])
    # KV tiles: grid boxes, then the global tail, then the extra keys
    k_grid, _ = _grid_tile_tokens(spec, kv_tile, kr, p)
    k_glob = _chunks(torch.cat([torch.arange(p), torch.arange(p + nk, p + nk + s)]), block_n, -1)
    k_extra = _chunks(torch.arange(p + nk + s, seq_k), block_n, -1)
    kv_tok = torch.cat([k_grid, k_glob, k_extra])
    nqg, nkg, nkgl, nke = q_grid.shape[0], k_grid.shape[0], k_glob.shape[0], k_extra.shape[0]
    nqgl = q_glob.shape[0]

    q_id, kv_id, partial = _grid_visits(spec, q_tile, kv_tile)
    parts_q, parts_k, parts_p = [q_id], [kv_id], [partial]
    # grid queries x (global + extra keys): dense, never partial
    tail = torch.arange(nkg, nkg + nkgl + nke)
    if tail.numel():
        gq = torch.arange(nqg).repeat_interleave(tail.numel())
        parts_q.append(gq)
        parts_k.append(tail.repeat(nqg))
        parts_p.append(torch.zeros(gq.numel(), dtype=torch.bool))
    # global queries x (grid + global keys): dense, never partial
    if nqgl:
        keys = torch.arange(nkg + nkgl)
        gq = torch.arange(nqg, nqg + nqgl).repeat_interleave(keys.numel())
        parts_q.append(gq)
        parts_k.append(keys.repeat(nqgl))
        parts_p.append(torch.zeros(gq.numel(), dtype=torch.bool))
    q_tok = torch.where(q_tok < 0, torch.full_like(q_tok, seq_q), q_tok)
    kv_tok = torch.where(kv_tok < 0, torch.full_like(kv_tok, seq_k), kv_tok)
    return LocalPlan.from_visits(
        q_tok, kv_tok, seq_q, seq_k, torch.cat(parts_q), torch.cat(parts_k), torch.cat(parts_p),
        spec=spec, q_tile=tuple(q_tile), kv_tile=tuple(kv_tile), num_grid_q_tiles=nqg, num_grid_kv_tiles=nkg,
        useful_pairs=_useful_pairs(spec), mask=ElementMask(MASK_LOCAL, spec.mask_params()))


def _tile3(name: str, t: object, spec: LocalSpec) -> tuple[int, int, int] | None:
    if t is None:
        return None
    if not isinstance(t, (tuple, list)) or len(t) != spec.ndim or any(
            isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in t):
        raise ValueError(f"{name}: expected {spec.ndim} positive ints (a box of the grid), got {t!r}")
    return (1,) * (3 - spec.ndim) + tuple(t)


def local_attention_plan(grid: tuple[int, ...], window: int | tuple[int, ...], *, shape: str = "circle",
                         border: str = "clip", tile: int | tuple[int, ...] | None = None, num_prefix: int = 0,
                         num_suffix: int = 0, extra_kv: tuple[torch.Tensor, torch.Tensor] | None = None,
                         num_extra: int = 0, block: tuple[int, int] = DEFAULT_BLOCK,
                         q_tile: tuple[int, ...] | None = None, kv_tile: tuple[int, ...] | None = None,
                         backend: str | None = None, head_dim: int = 64,
                         dtype: torch.dtype = torch.float32) -> LocalPlan:
    """The block schedule that the kernels execute for this local-attention problem.

    grid, window, shape, border, tile, num_prefix, num_suffix: as :func:`local_attention`.
    extra_kv (or num_extra): the extra keys, as a tensor pair or their count.
    block: (block_m, block_n), tokens per query / KV tile. q_tile / kv_tile: force the box shapes
    (``prod`` must equal the block); by default they are chosen to minimise the computed pairs.
    The default is the GPU schedule (tiles of 64 x 64 tokens). backend: instead return the plan that
    this backend's kernels execute for inputs of ``head_dim`` / ``dtype`` (e.g. ``"cpu"``: its own
    block sizes and tile shapes; ``"triton"``: its forward plan, whose KV tiles shrink to 32 or 16
    keys for small windows); block, q_tile and kv_tile must then be left at their defaults.

    Returns a :class:`LocalPlan` with ``useful_pairs``, ``computed_pairs`` (token pairs in visited
    tiles), ``slot_pairs`` (block_m * block_n per visit), ``visited_tiles`` and ``partial_tiles``.
    """
    if extra_kv is not None:
        num_extra = _check_extra_pair(extra_kv)[0].shape[2]
    spec = LocalSpec.make(grid, window, shape=shape, border=border, tile=tile, num_prefix=num_prefix,
                          num_suffix=num_suffix, num_extra=num_extra)
    if not (isinstance(block, (tuple, list)) and len(block) == 2
            and all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block)):
        raise ValueError(f"block: expected (block_m, block_n) positive ints, got {block!r}")
    if backend is not None:
        from ..backends import get

        if q_tile is not None or kv_tile is not None or tuple(block) != DEFAULT_BLOCK:
            raise ValueError("backend: give either backend= or block/q_tile/kv_tile, not both")
        return kernel_plan(spec, get(_validate.check_backend(backend)), head_dim, dtype)
    qt, kt = _tile3("q_tile", q_tile, spec), _tile3("kv_tile", kv_tile, spec)
    if qt is not None and math.prod(qt) != block[0]:
        raise ValueError(f"q_tile: expected {block[0]} tokens (block_m), got {q_tile} = {math.prod(qt)}")
    if kt is not None and math.prod(kt) != block[1]:
        raise ValueError(f"kv_tile: expected {block[1]} tokens (block_n), got {kv_tile} = {math.prod(kt)}")
    return _plan(spec, int(block[0]), int(block[1]), qt, kt)


def _check_extra_pair(extra_kv: object) -> tuple[torch.Tensor, torch.Tensor]:
    if not isinstance(extra_kv, (tuple, list)) or len(extra_kv) != 2:
        raise TypeError(f"extra_kv: expected a pair (k_extra, v_extra) of tensors, got {type(extra_kv).__name__}")
    ke, ve = extra_kv
    for name, t in (("extra_kv[0]", ke), ("extra_kv[1]", ve)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected 4 dims (batch, heads, M, head_dim), got shape {tuple(t.shape)}")
    if ve.shape != ke.shape:
        raise ValueError(f"extra_kv[1]: expected shape {tuple(ke.shape)} (that of extra_kv[0]), got {tuple(ve.shape)}")
    return ke, ve


# ================================================================================================
# The registered ops
# ================================================================================================
def _backend(q: torch.Tensor, backend: str):
    return resolve_for("local_attention", q, backend, head_dim=q.shape[-1])


def _spec(grid: List[int], window: List[int], shape: str, border: str, tile: List[int], num_prefix: int,
          num_suffix: int, num_extra: int) -> LocalSpec:
    return LocalSpec(tuple(grid), tuple(window), shape, border, tuple(tile) if tile else None, num_prefix,
                     num_suffix, num_extra)


# Per-visit overhead of a GPU kernel in key columns of a block_m x block_n visit (index and token
# loads, the online-softmax rescale of the accumulator, the mask decode): the cost model of
# :func:`_fwd_block_n`.
VISIT_OVERHEAD_KEYS = 16


@functools.lru_cache(maxsize=64)
def _fwd_block_n(spec: LocalSpec, block_m: int, choices: tuple[int, ...]) -> int:
    """The KV tile size among ``choices`` (largest first) minimising
    ``grid visits * block_m * (block_n + VISIT_OVERHEAD_KEYS)``: a window small next to a 64-key tile
    wastes most of each visit, shorter KV tiles follow its outline (ties keep the larger tile)."""
    best = None
    for bn in sorted(choices, reverse=True):
        visits, _ = _count_grid_visits(spec, *_choose_tiles(spec, block_m, bn))
        cost = visits * block_m * (bn + VISIT_OVERHEAD_KEYS)
        if best is None or cost < best[0]:
            best = (cost, bn)
    return best[1]


def kernel_plan(spec: LocalSpec, mod, head_dim: int, dtype: torch.dtype, backward: bool = False) -> LocalPlan:
    """The plan a backend module executes. With the ``LOCAL_TILING`` capability: its
    ``local_block_sizes`` and ``local_tiles`` preference (None: the tile shapes that minimise the
    computed pairs); with ``local_fwd_block_n`` choices of block_n its forward runs on the best of
    them (:func:`_fwd_block_n`) and its backward (``backward=True``) on ``local_block_sizes``.
    Without it: :data:`DEFAULT_BLOCK` and the tile shapes that minimise the computed pairs."""
    bm, bn = DEFAULT_BLOCK
    qt = kt = None
    if has(mod, LOCAL_TILING):
        bm, bn = mod.local_block_sizes(head_dim, dtype)
        if mod.local_fwd_block_n and not backward:
            bn = _fwd_block_n(spec, bm, tuple(mod.local_fwd_block_n))
        qt, kt = mod.local_tiles(spec.grid)
    pad = (1,) * (3 - spec.ndim)
    return _plan(spec, bm, bn, pad + tuple(qt) if qt else None, pad + tuple(kt) if kt else None)


def _keys(k, v, k_extra, v_extra):
    if k_extra is None:
        return k, v
    return torch.cat([k, k_extra], 2), torch.cat([v, v_extra], 2)


def spec_forward(spec: LocalSpec, q: torch.Tensor, kk: torch.Tensor, vv: torch.Tensor, scale: float,
                 backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The kernels of one problem, including q_rows / k_rows sub-problems (no validation): q
    (B, H, spec.seq_q, D), kk / vv (B, H, spec.seq_k, D) with the extra keys appended. Returns out and
    lse (float32). The registered op and ``ditkernels.distributed.local`` run this."""
    mod = _backend(q, backend)
    if has(mod, DENSE_REFERENCE):
        out, lse = attention_ref(q, kk, vv, scale, local_visible(spec, q.device))
        return out.contiguous(), lse.to(torch.float32)
    plan = kernel_plan(spec, mod, q.shape[-1], q.dtype).on(q.device)
    return mod.flash_fwd(q, kk, vv, scale=scale, schedule=plan, mask=plan.mask)


def spec_backward(spec: LocalSpec, do: torch.Tensor, q: torch.Tensor, kk: torch.Tensor, vv: torch.Tensor,
                  out: torch.Tensor, lse: torch.Tensor, scale: float,
                  backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dkk, dvv) of :func:`spec_forward` given ``do``, its ``out`` and ``lse`` (which may be those
    of a larger softmax that this problem is a part of, e.g. merged across ranks)."""
    mod = _backend(q, backend)
    do = do.contiguous()
    if has(mod, DENSE_REFERENCE):
        return attention_ref_backward(do, q, kk, vv, scale, local_visible(spec, q.device))
    plan = kernel_plan(spec, mod, q.shape[-1], q.dtype, backward=True).on(q.device)
    return mod.flash_bwd(do, q, kk, vv, out, lse, scale=scale, schedule=plan, mask=plan.mask)


@torch.library.custom_op("ditkernels::local_attention_fwd", mutates_args=())
def local_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_extra: torch.Tensor | None,
                        v_extra: torch.Tensor | None, grid: List[int], window: List[int], shape: str, border: str,
                        tile: List[int], num_prefix: int, num_suffix: int, scale: float,
                        backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, H, S, D) in q.dtype and lse (B, H, S) float32 of local-window attention."""
    m = 0 if k_extra is None else k_extra.shape[2]
    spec = _spec(grid, window, shape, border, tile, num_prefix, num_suffix, m)
    kk, vv = _keys(k, v, k_extra, v_extra)
    return spec_forward(spec, q, kk, vv, scale, backend)


@local_attention_fwd.register_fake
def _(q, k, v, k_extra, v_extra, grid, window, shape, border, tile, num_prefix, num_suffix, scale, backend):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("ditkernels::local_attention_bwd", mutates_args=())
def local_attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        k_extra: torch.Tensor | None, v_extra: torch.Tensor | None, out: torch.Tensor,
                        lse: torch.Tensor, grid: List[int], window: List[int], shape: str, border: str,
                        tile: List[int], num_prefix: int, num_suffix: int, scale: float,
                        backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv, dk_extra, dv_extra) given ``do``; the extra gradients are (B, H, 0, D) without extra_kv."""
    m = 0 if k_extra is None else k_extra.shape[2]
    spec = _spec(grid, window, shape, border, tile, num_prefix, num_suffix, m)
    kk, vv = _keys(k, v, k_extra, v_extra)
    dq, dk, dv = spec_backward(spec, do, q, kk, vv, out, lse, scale, backend)
    if k_extra is None:
        b, h, _, d = k.shape
        return dq, dk, dv, k.new_zeros(b, h, 0, d), v.new_zeros(b, h, 0, d)
    s = spec.seq_k - spec.num_extra
    return dq, dk[:, :, :s].clone(), dv[:, :, :s].clone(), dk[:, :, s:].clone(), dv[:, :, s:].clone()


@local_attention_bwd.register_fake
def _(do, q, k, v, k_extra, v_extra, out, lse, grid, window, shape, border, tile, num_prefix, num_suffix, scale,
      backend):
    b, h, _, d = k.shape
    m = 0 if k_extra is None else k_extra.shape[2]
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), k.new_empty(b, h, m, d),
            v.new_empty(b, h, m, d))


_OPTIONS = ("grid", "window", "shape", "border", "tile", "num_prefix", "num_suffix", "scale", "backend")


def _setup_context(ctx, inputs, output):
    q, k, v, k_extra, v_extra, *opts = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, k_extra, v_extra, out, lse)
    ctx.opts = dict(zip(_OPTIONS, opts))
    ctx.has_extra = k_extra is not None


def _backward(ctx, d_out, d_lse):
    q, k, v, k_extra, v_extra, out, lse = ctx.saved_tensors
    o = ctx.opts
    dq, dk, dv, dke, dve = local_attention_bwd(d_out, q, k, v, k_extra, v_extra, out, lse, o["grid"], o["window"],
                                               o["shape"], o["border"], o["tile"], o["num_prefix"],
                                               o["num_suffix"], o["scale"], o["backend"])
    if not ctx.has_extra:
        dke = dve = None
    return (dq, dk, dv, dke, dve) + (None,) * len(_OPTIONS)


local_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ================================================================================================
# The functional API
# ================================================================================================
def local_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, ...],
                    window: int | tuple[int, ...], *, shape: str = "circle", border: str = "clip",
                    tile: int | tuple[int, ...] | None = None, num_prefix: int = 0, num_suffix: int = 0,
                    extra_kv: tuple[torch.Tensor, torch.Tensor] | None = None, scale: float | None = None,
                    return_lse: bool = False, backend: str | None = None):
    """Local-window attention over image / video tokens (docs/spec.md §1): CLEAR circles, NATTEN squares,
    sliding tiles, with global (text) tokens and extra keys.

    q, k, v: (batch, heads, seq, head_dim) with seq = num_prefix + prod(grid) + num_suffix, tokens laid
    out ``[prefix][grid, row-major][suffix]``; any strides; float16 / bfloat16 / float32 (float64 on
    the reference and cpu backends); head_dim 1..256.
    grid: (L,), (H, W) or (T, H, W). window: radius, an int or one per dimension.
    shape: ``"circle"`` (``sum (d/r)^2 < 1``, exact in integers), ``"square"`` (``|d| <= r``) or
    ``"tile"`` (tiles of ``tile`` tokens, radius in tiles). border: ``"clip"`` or ``"shift"``
    (NATTEN's shifted window, square only).
    num_prefix / num_suffix: global tokens (they see every key; every grid query sees them).
    extra_kv: (k_extra, v_extra), each (batch, heads, M, head_dim): keys seen by grid queries only.
    scale: defaults to ``head_dim ** -0.5``. return_lse: also return the natural-log log-sum-exp over
    the visible keys, float32 (batch, heads, seq), detached. backend: ``"reference"``, ``"cpu"`` or ``"triton"``
    (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``); default by device (CUDA: triton, CPU: cpu),
    or ``DITKERNELS_BACKEND``.

    Returns out (batch, heads, seq, head_dim) in q.dtype, or (out, lse). Differentiable with respect
    to q, k, v and extra_kv. A query that sees no key gets zeros (lse = -inf).
    """
    _validate.check_qkv(q, k, v)
    m = 0
    k_extra = v_extra = None
    if extra_kv is not None:
        k_extra, v_extra = _check_extra_pair(extra_kv)
        b, h, _, d = q.shape
        for name, t in (("extra_kv[0]", k_extra), ("extra_kv[1]", v_extra)):
            if t.dtype != q.dtype:
                raise TypeError(f"{name}: expected dtype {q.dtype} (that of q), got {t.dtype}")
            if t.device != q.device:
                raise ValueError(f"{name}: expected device {q.device} (that of q), got {t.device}")
            if t.shape[:2] != (b, h) or t.shape[3] != d:
                raise ValueError(f"{name}: expected shape ({b}, {h}, M, {d}), got {tuple(t.shape)}")
        m = k_extra.shape[2]
    spec = LocalSpec.make(grid, window, shape=shape, border=border, tile=tile, num_prefix=num_prefix,
                          num_suffix=num_suffix, num_extra=m)
    for name, t in (("q", q), ("k", k)):
        if t.shape[2] != spec.seq:
            raise ValueError(f"{name}: expected seq = num_prefix + prod(grid) + num_suffix = {spec.num_prefix} + "
                             f"{spec.num_grid} + {spec.num_suffix} = {spec.seq}, got shape {tuple(t.shape)}")
    scale = _validate.check_scale(scale, q.shape[-1])
    backend = _validate.check_backend(backend)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse: expected a bool, got {type(return_lse).__name__}")
    out, lse = local_attention_fwd(q, k, v, k_extra, v_extra, list(spec.grid), list(spec.window), spec.shape,
                                   spec.border, list(spec.tile or ()), spec.num_prefix, spec.num_suffix, scale,
                                   backend)
    return (out, lse.detach()) if return_lse else out
