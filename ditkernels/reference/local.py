"""Local-window visibility (docs/spec.md §1): the geometry of a local-attention problem and its exact
dense visibility mask, in plain PyTorch integers.

This is the ground truth of the local-attention tests and of the ``reference`` backend. The block
schedule of the kernels (``ditkernels.ops.local.local_attention_plan``) and the CPU kernel's mask
are written independently of it and are tested against it.

Sequence layout: ``[num_prefix global][grid tokens, row-major][num_suffix global]`` for queries
and keys, then (keys only) ``num_extra`` extra keys from ``extra_kv``.

Sub-problems (sequence parallelism, ``ditkernels.distributed.local``): ``q_rows=(a, b)`` makes the
queries the grid tokens of rows ``[a, b)`` of the grid's first axis only (no global queries);
``k_rows=(a, b)`` makes the keys ``[num_prefix][grid rows a..b][num_suffix][extra]``. Visibility is
always that of the whole grid (windows, clipping, NATTEN's shift and tiles in global coordinates).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass

import torch

SHAPES = ("circle", "square", "tile")
BORDERS = ("clip", "shift")
# Codes in the int32 parameters of the MASK_LOCAL element mask (shared with csrc/cpu/attention.cpp).
SHAPE_CODES = {"circle": 0, "square": 1, "tile": 2}
BORDER_CODES = {"clip": 0, "shift": 1}
# The circle test sum_a d_a^2 prod_{b!=a} r_b^2 < prod_b r_b^2 runs in int64 (the kernels too):
# the product of the squared radii must stay below this bound.
MAX_RADII_PRODUCT = 1 << 60


def _int(name: str, x: object, lo: int) -> int:
    if isinstance(x, bool) or not (isinstance(x, int) or hasattr(type(x), "__index__")):
        raise TypeError(f"{name}: expected an int, got {type(x).__name__} ({x!r})")
    x = operator.index(x)
    if x < lo:
        raise ValueError(f"{name}: expected an int >= {lo}, got {x}")
    return int(x)


def _per_dim(name: str, x: object, ndim: int, lo: int) -> tuple[int, ...]:
    """An int (same for every dimension) or a tuple of ``ndim`` ints, each >= lo."""
    if isinstance(x, (tuple, list, torch.Size)):
        if len(x) != ndim:
            raise ValueError(f"{name}: expected an int or {ndim} values (one per grid dimension), got {tuple(x)}")
        return tuple([_int(f"{name}[{i}]", v, lo) for i, v in enumerate(x)])
    return (_int(name, x, lo),) * ndim


@dataclass(frozen=True)
class LocalSpec:
    """The normalised geometry of a local-attention problem (hashable: plans are cached by it).

    grid: 1-3 positive sizes; window: radius per dimension; shape: circle / square / tile;
    border: clip / shift; tile: STA tile per dimension (shape="tile" only, else None);
    num_prefix / num_suffix: global tokens before / after the grid; num_extra: extra keys.
    q_rows / k_rows: None (the whole sequence), or ``(start, stop)`` rows of the grid's first axis:
    queries = those rows' grid tokens only, keys = global tokens + those rows + extra keys.
    """

    grid: tuple[int, ...]
    window: tuple[int, ...]
    shape: str = "circle"
    border: str = "clip"
    tile: tuple[int, ...] | None = None
    num_prefix: int = 0
    num_suffix: int = 0
    num_extra: int = 0
    q_rows: tuple[int, int] | None = None
    k_rows: tuple[int, int] | None = None

    @classmethod
    def make(cls, grid: object, window: object, *, shape: object = "circle", border: object = "clip",
             tile: object = None, num_prefix: object = 0, num_suffix: object = 0,
             num_extra: object = 0, q_rows: object = None, k_rows: object = None) -> "LocalSpec":
        """Validate the user's arguments (errors name the argument) and normalise them."""
        if isinstance(grid, (tuple, list, torch.Size)):
            if not 1 <= len(grid) <= 3:
                raise ValueError(f"grid: expected 1, 2 or 3 sizes, got {tuple(grid)}")
            g = tuple([_int(f"grid[{i}]", v, 1) for i, v in enumerate(grid)])
        else:
            raise TypeError(f"grid: expected a tuple of 1, 2 or 3 positive ints, got {type(grid).__name__} ({grid!r})")
        nd = len(g)
        w = _per_dim("window", window, nd, 0)
        if not isinstance(shape, str) or shape not in SHAPES:
            raise ValueError(f"shape: expected one of {SHAPES}, got {shape!r}")
        if not isinstance(border, str) or border not in BORDERS:
            raise ValueError(f"border: expected one of {BORDERS}, got {border!r}")
        if border == "shift" and shape != "square":
            raise ValueError(f"border: 'shift' (NATTEN's window) is defined for shape='square' only, "
                             f"got shape={shape!r}")
        if shape == "tile":
            if tile is None:
                raise ValueError("tile: shape='tile' needs the tile size (an int or one size per grid dimension)")
            t = _per_dim("tile", tile, nd, 1)
        else:
            if tile is not None:
                raise ValueError(f"tile: only used with shape='tile', got tile={tile!r} with shape={shape!r}")
            t = None
        if shape == "circle" and math.prod([r * r for r in w]) >= MAX_RADII_PRODUCT:
            raise ValueError(f"window: the exact integer circle test needs prod(r^2) < 2^60, got radii {w}; "
                             "use shape='square' for windows that cover the whole grid")
        rows = []
        for name, r in (("q_rows", q_rows), ("k_rows", k_rows)):
            if r is not None:
                if not isinstance(r, (tuple, list)) or len(r) != 2:
                    raise TypeError(f"{name}: expected (start, stop) rows of the grid's first axis, got {r!r}")
                r = (_int(f"{name}[0]", r[0], 0), _int(f"{name}[1]", r[1], 0))
                if not r[0] < r[1] <= g[0]:
                    raise ValueError(f"{name}: expected 0 <= start < stop <= grid[0] = {g[0]}, got {r}")
            rows.append(r)
        if rows[1] == (0, g[0]):
            rows[1] = None  # every key row: the plain layout
        return cls(g, w, shape, border, t, _int("num_prefix", num_prefix, 0), _int("num_suffix", num_suffix, 0),
                   _int("num_extra", num_extra, 0), rows[0], rows[1])

    @property
    def ndim(self) -> int:
        return len(self.grid)

    @property
    def num_grid(self) -> int:
        return math.prod(self.grid)

    @property
    def num_global(self) -> int:
        return self.num_prefix + self.num_suffix

    @property
    def seq(self) -> int:
        """Length of the whole sequence (queries and keys without the extra keys, without q_rows / k_rows)."""
        return self.num_prefix + self.num_grid + self.num_suffix

    @property
    def row_tokens(self) -> int:
        """Tokens per row of the grid's first axis (``prod(grid[1:])``)."""
        return math.prod(self.grid[1:])

    def q_grid_range(self) -> tuple[int, int]:
        """(first, count) of the grid tokens that are queries (row-major grid indices)."""
        a, b = self.q_rows or (0, self.grid[0])
        return a * self.row_tokens, (b - a) * self.row_tokens

    def k_grid_range(self) -> tuple[int, int]:
        """(first, count) of the grid tokens that are keys."""
        a, b = self.k_rows or (0, self.grid[0])
        return a * self.row_tokens, (b - a) * self.row_tokens

    @property
    def num_global_q(self) -> int:
        """Global queries (none with q_rows)."""
        return 0 if self.q_rows is not None else self.num_global

    @property
    def seq_q(self) -> int:
        return self.q_grid_range()[1] + self.num_global_q

    @property
    def seq_k(self) -> int:
        return self.num_global + self.k_grid_range()[1] + self.num_extra

    def q_index(self) -> torch.Tensor:
        """Positions of the queries in the whole sequence ``[prefix][grid][suffix]`` (int64)."""
        p, (a, n) = self.num_prefix, self.q_grid_range()
        if self.q_rows is not None:
            return torch.arange(p + a, p + a + n)
        return torch.arange(self.seq)

    def k_index(self) -> torch.Tensor:
        """Positions of the keys in the whole key sequence ``[prefix][grid][suffix][extra]`` (int64)."""
        p, (a, n) = self.num_prefix, self.k_grid_range()
        return torch.cat([torch.arange(p), torch.arange(p + a, p + a + n),
                          torch.arange(p + self.num_grid, self.seq + self.num_extra)])

    def padded(self) -> tuple[tuple[int, int, int], tuple[int, int, int], tuple[int, int, int]]:
        """(grid, window, tile) padded in front to 3 dimensions with size 1, radius 1, tile 1
        (which changes no rule: the padded offsets are always 0)."""
        pad = 3 - self.ndim
        t = self.tile if self.tile is not None else (1,) * self.ndim
        return ((1,) * pad + self.grid, (1,) * pad + self.window, (1,) * pad + t)

    def mask_params(self) -> tuple[int, ...]:
        """int32 parameters of the ``MASK_LOCAL`` element mask:
        ``[ndim, P, S, M, shape, border, n0, n1, n2, r0, r1, r2, t0, t1, t2, G, q0, nq, k0, nk]``
        (3-D padded). Queries are ``[P global][grid tokens q0 .. q0+nq][S global]`` when G = 1, the grid
        tokens alone when G = 0 (q_rows); keys ``[P global][grid tokens k0 .. k0+nk][S global][M extra]``."""
        g, w, t = self.padded()
        q0, nq = self.q_grid_range()
        k0, nk = self.k_grid_range()
        return (self.ndim, self.num_prefix, self.num_suffix, self.num_extra, SHAPE_CODES[self.shape],
                BORDER_CODES[self.border], *g, *w, *t, int(self.q_rows is None), q0, nq, k0, nk)

    @classmethod
    def from_mask_params(cls, params: tuple[int, ...]) -> "LocalSpec":
        nd, p, s, m, sh, bo = params[:6]
        g, w, t = params[6:9], params[9:12], params[12:15]
        q_global, q0, nq, k0, nk = params[15:20]
        shape = {v: k for k, v in SHAPE_CODES.items()}[sh]
        border = {v: k for k, v in BORDER_CODES.items()}[bo]
        grid = tuple(g[3 - nd:])
        stride = math.prod(grid[1:])
        q_rows = None if q_global else (q0 // stride, (q0 + nq) // stride)
        k_rows = None if nk == math.prod(grid) else (k0 // stride, (k0 + nk) // stride)
        return cls(grid, tuple(w[3 - nd:]), shape, border, tuple(t[3 - nd:]) if shape == "tile" else None,
                   p, s, m, q_rows, k_rows)


def grid_coords(grid: tuple[int, ...], device: torch.device | str = "cpu") -> torch.Tensor:
    """Coordinates ``(prod(grid), ndim)`` int64 of the grid tokens in row-major order."""
    axes = [torch.arange(n, device=device, dtype=torch.int64) for n in grid]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, len(grid))


def shift_start(p: torch.Tensor, n: int, r: int) -> torch.Tensor:
    """NATTEN's window start ``clamp(p - r, 0, n - (2r+1))`` (for ``n >= 2r+1``)."""
    return (p - r).clamp(0, n - (2 * r + 1))


def grid_visible(spec: LocalSpec, device: torch.device | str = "cpu") -> torch.Tensor:
    """Visibility among grid tokens, bool ``(N, N)``: ``[i, j]`` = grid key j visible to grid query i."""
    c = grid_coords(spec.grid, device)
    d = c[:, None, :] - c[None, :, :]  # (N, N, ndim): p_i - p_j
    if spec.shape == "circle":
        r2 = [r * r for r in spec.window]
        prod = math.prod(r2)
        # |d_a| >= r_a alone makes the sum >= 1: filtering first keeps every term below prod (no overflow).
        vis = torch.ones(d.shape[:2], dtype=torch.bool, device=device)
        acc = torch.zeros(d.shape[:2], dtype=torch.int64, device=device)
        for a in range(spec.ndim):
            da = d[..., a]
            vis &= da.abs() < spec.window[a]
            others = math.prod(r2[b] for b in range(spec.ndim) if b != a)
            acc += torch.where(vis, da * da * others, torch.zeros_like(da))
        return vis & (acc < prod)
    if spec.shape == "tile":
        tc = torch.div(c, torch.tensor(spec.tile, device=device), rounding_mode="floor")
        dt = tc[:, None, :] - tc[None, :, :]
        return (dt.abs() <= torch.tensor(spec.window, device=device)).all(-1)
    if spec.border == "clip":
        return (d.abs() <= torch.tensor(spec.window, device=device)).all(-1)
    vis = torch.ones(d.shape[:2], dtype=torch.bool, device=device)  # square, shift
    for a, (n, r) in enumerate(zip(spec.grid, spec.window)):
        k = 2 * r + 1
        if n < k:
            continue  # the whole dimension
        s = shift_start(c[:, a], n, r)[:, None]
        pj = c[None, :, a]
        vis &= (pj >= s) & (pj < s + k)
    return vis


def local_visible(spec: LocalSpec, device: torch.device | str = "cpu") -> torch.Tensor:
    """The full visibility mask, bool ``(seq_q, seq_k)`` (``(seq, seq + num_extra)`` without q_rows /
    k_rows): rows are queries, columns keys.

    Global queries see every key except the extra keys; grid queries see every global key, every
    extra key, and the grid keys of their window.
    """
    p, n, s, m = spec.num_prefix, spec.num_grid, spec.num_suffix, spec.num_extra
    seq = p + n + s
    vis = torch.zeros(seq, seq + m, dtype=torch.bool, device=device)
    vis[:p, :seq] = True  # global queries: every key but the extra ones
    vis[p + n:, :seq] = True
    vis[p:p + n, :p] = True  # grid queries: global and extra keys
    vis[p:p + n, p + n:] = True
    vis[p:p + n, p:p + n] = grid_visible(spec, device)
    if spec.q_rows is None and spec.k_rows is None:
        return vis
    return vis[spec.q_index().to(device)][:, spec.k_index().to(device)]


def kv_pool_ref(x: torch.Tensor, grid: tuple[int, ...], num_prefix: int, weight: torch.Tensor) -> torch.Tensor:
    """CLEAR's down-sampled keys (``ditkernels.nn.KVPool``) written as a sum of strided slices.

    x: (batch, heads, seq, head_dim) with the grid tokens at ``[num_prefix, num_prefix + prod(grid))``;
    weight: the pooling factors' weights, one dimension per grid dimension (shape = the factors).
    Returns (batch, heads, prod(grid // factors), head_dim) in x.dtype."""
    b, h, _, d = x.shape
    xg = x[:, :, num_prefix:num_prefix + math.prod(grid)].reshape(b, h, *grid, d)
    out = 0
    for idx in torch.cartesian_prod(*(torch.arange(f) for f in weight.shape)).reshape(-1, weight.dim()).tolist():
        sl = tuple(slice(i, None, f) for i, f in zip(idx, weight.shape))
        out = out + weight[tuple(idx)].to(x.dtype) * xg[(slice(None), slice(None)) + sl]
    return out.reshape(b, h, -1, d)
