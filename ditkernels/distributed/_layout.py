"""The token layout shared by every function of ``ditkernels.distributed`` (docs/spec.md §7).

The full sequence is ``[num_prefix global tokens][grid tokens, row-major][num_suffix global tokens]``.
Rank ``r`` of ``P`` holds ``[the prefix][grid rows (frames) bands[r] of the grid's first axis][the suffix]``:
the global (text) tokens replicated on every rank, then its band of the grid. ``bands`` counts rows of
the grid's first axis per rank (default: an even split, the first ``rows % P`` ranks one row more); a
plain sequence is a 1-D grid, so there ``bands`` counts tokens.

:func:`shard` cuts the full sequence into this rank's part (no communication); :func:`gather` puts the
full sequence back on every rank (one all-gather; differentiable: its backward hands each rank the
gradient of its own part).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import torch
import torch.distributed as dist

from . import _comm


def check_grid(grid: object) -> tuple[int, ...]:
    if isinstance(grid, int) and not isinstance(grid, bool):
        grid = (grid,)
    if not isinstance(grid, (tuple, list)) or not 1 <= len(grid) <= 3 or \
            any(isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grid):
        raise ValueError(f"grid: expected 1 to 3 positive ints (a plain sequence is a 1-D grid), got {grid!r}")
    return tuple(grid)


def check_bands(bands: object, rows: int, world: int) -> tuple[int, ...]:
    """Grid rows per rank: ``bands`` validated, or the even split of ``rows`` over ``world`` ranks."""
    if bands is None:
        if rows < world:
            raise ValueError(f"bands: the grid's first axis has {rows} rows (frames), fewer than the {world} ranks; "
                             "every rank needs at least one row")
        return tuple(rows // world + (1 if r < rows % world else 0) for r in range(world))
    if not isinstance(bands, (tuple, list)) or any(isinstance(b, bool) or not isinstance(b, int) for b in bands):
        raise TypeError(f"bands: expected a sequence of ints (grid rows per rank), got {bands!r}")
    bands = tuple(bands)
    if len(bands) != world:
        raise ValueError(f"bands: expected one entry per rank ({world}), got {len(bands)}: {bands}")
    if any(b < 1 for b in bands):
        raise ValueError(f"bands: every rank needs at least one grid row, got {bands}")
    if sum(bands) != rows:
        raise ValueError(f"bands: expected the rows per rank to add up to the grid's first axis ({rows}), "
                         f"got {bands} (sum {sum(bands)})")
    return bands


def check_globals(num_prefix: object, num_suffix: object) -> tuple[int, int]:
    for name, val in (("num_prefix", num_prefix), ("num_suffix", num_suffix)):
        if isinstance(val, bool) or not isinstance(val, int) or val < 0:
            raise ValueError(f"{name}: expected an int >= 0, got {val!r}")
    return num_prefix, num_suffix


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where the tokens of every rank are. ``tokens[r]``: grid tokens of rank r; ``starts[r]``: index of its
    first grid token in the full grid (row-major)."""

    grid: tuple[int, ...]
    bands: tuple[int, ...]
    num_prefix: int
    num_suffix: int

    @staticmethod
    def make(grid: object, bands: object, world: int, num_prefix: object = 0, num_suffix: object = 0) -> "Layout":
        g = check_grid(grid)
        p, s = check_globals(num_prefix, num_suffix)
        return Layout(g, check_bands(bands, g[0], world), p, s)

    @property
    def row(self) -> int:
        """Tokens in one row (frame) of the grid's first axis."""
        return math.prod(self.grid[1:])

    @property
    def tokens(self) -> tuple[int, ...]:
        return tuple(b * self.row for b in self.bands)

    @property
    def starts(self) -> tuple[int, ...]:
        out, acc = [], 0
        for n in self.tokens:
            out.append(acc)
            acc += n
        return tuple(out)

    @property
    def num_global(self) -> int:
        return self.num_prefix + self.num_suffix

    def local_len(self, rank: int) -> int:
        return self.num_prefix + self.tokens[rank] + self.num_suffix

    @property
    def full_len(self) -> int:
        return self.num_prefix + math.prod(self.grid) + self.num_suffix

    def split(self, x: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A rank's part -> (prefix, its grid tokens, suffix) along ``dim`` (views)."""
        n = x.shape[dim] - self.num_global
        return x.narrow(dim, 0, self.num_prefix), x.narrow(dim, self.num_prefix, n), \
            x.narrow(dim, self.num_prefix + n, self.num_suffix)


def check_local_tokens(q: torch.Tensor, grid: object, bands: object, world: int, rank: int, num_prefix: int,
                       num_suffix: int) -> tuple[int, "Layout | None"]:
    """Rank ``rank``'s q holds grid tokens, and, with a ``grid``, exactly its band's (ValueError naming q).
    Returns (its number of grid tokens, the Layout of ``grid`` or None)."""
    local_tokens = q.shape[2] - num_prefix - num_suffix
    if local_tokens < 1:
        raise ValueError(f"q: rank {rank} holds {q.shape[2]} tokens, not more than num_prefix + num_suffix = "
                         f"{num_prefix + num_suffix}: every rank needs grid tokens")
    if grid is not None:
        lay = Layout.make(grid, bands, world, num_prefix, num_suffix)
        if q.shape[2] != lay.local_len(rank):
            raise ValueError(f"q: rank {rank} expected num_prefix + {lay.bands[rank]} grid rows x {lay.row} + "
                             f"num_suffix = {lay.local_len(rank)} tokens, got shape {tuple(q.shape)}")
        return local_tokens, lay
    return local_tokens, None


def _dim(x: torch.Tensor, dim: int) -> int:
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"dim: {dim} is out of range for a tensor of shape {tuple(x.shape)}")
    return dim % x.dim()


def shard(x: torch.Tensor, grid: Sequence[int] | int, *, bands: Sequence[int] | None = None,
          group: dist.ProcessGroup | None = None, num_prefix: int = 0, num_suffix: int = 0,
          dim: int = -2) -> torch.Tensor:
    """This rank's part of a full sequence (a view; no communication).

    x: the full sequence along ``dim`` (default -2: ``(batch, heads, seq, head_dim)`` or ``(batch, seq,
    channels)``), ``seq = num_prefix + prod(grid) + num_suffix``. Returns
    ``[prefix][this rank's band of the grid][suffix]`` along ``dim``.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    rank, size = _comm.world(group)
    lay = Layout.make(grid, bands, size, num_prefix, num_suffix)
    d = _dim(x, dim)
    if x.shape[d] != lay.full_len:
        raise ValueError(f"x: expected num_prefix + prod(grid) + num_suffix = {lay.full_len} tokens along dim {dim}, "
                         f"got shape {tuple(x.shape)}")
    pre = x.narrow(d, 0, lay.num_prefix)
    mine = x.narrow(d, lay.num_prefix + lay.starts[rank], lay.tokens[rank])
    suf = x.narrow(d, lay.full_len - lay.num_suffix, lay.num_suffix)
    return torch.cat([pre, mine, suf], d) if lay.num_global else mine


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, lay: Layout, d: int, group) -> torch.Tensor:
        rank, size = _comm.world(group)
        ctx.lay, ctx.d, ctx.rank = lay, d, rank
        pre, mine, suf = lay.split(x, d)
        longest = max(lay.tokens)
        # all_gather_into_tensor needs equal sizes: pad each band to the longest, moved to dim 0
        send = mine.movedim(d, 0)
        if send.shape[0] < longest:
            send = torch.cat([send, send.new_zeros((longest - send.shape[0],) + send.shape[1:])], 0)
        send = send.contiguous()
        recv = send.new_empty((size * longest,) + send.shape[1:])
        _comm.all_gather(recv, send, group)
        parts = [recv[r * longest: r * longest + n] for r, n in enumerate(lay.tokens)]
        full = torch.cat([pre.movedim(d, 0), *parts, suf.movedim(d, 0)], 0)
        return full.movedim(0, d).contiguous()

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        lay, d = ctx.lay, ctx.d
        pre = g.narrow(d, 0, lay.num_prefix)
        mine = g.narrow(d, lay.num_prefix + lay.starts[ctx.rank], lay.tokens[ctx.rank])
        suf = g.narrow(d, lay.full_len - lay.num_suffix, lay.num_suffix)
        return torch.cat([pre, mine, suf], d), None, None, None


def gather(x_local: torch.Tensor, grid: Sequence[int] | int, *, bands: Sequence[int] | None = None,
           group: dist.ProcessGroup | None = None, num_prefix: int = 0, num_suffix: int = 0,
           dim: int = -2) -> torch.Tensor:
    """The full sequence on every rank from every rank's part (one all-gather of the grid bands; the global
    tokens are taken from this rank's copy). Differentiable: the gradient of this rank's part is the
    gradient of the full sequence at its tokens (prefix and suffix included)."""
    from ._check import agree

    if not isinstance(x_local, torch.Tensor):
        raise TypeError(f"x_local: expected a torch.Tensor, got {type(x_local).__name__}")
    rank, size = _comm.world(group)
    err, lay, d = None, None, None
    try:
        lay = Layout.make(grid, bands, size, num_prefix, num_suffix)
        d = _dim(x_local, dim)
        if x_local.shape[d] != lay.local_len(rank):
            raise ValueError(f"x_local: rank {rank} expected num_prefix + its {lay.bands[rank]} grid rows * "
                             f"{lay.row} + num_suffix = {lay.local_len(rank)} tokens along dim {dim}, "
                             f"got shape {tuple(x_local.shape)}")
    except (TypeError, ValueError) as e:
        err = e
    shape = list(x_local.shape)
    if d is not None:
        shape[d] = -1  # the sequence length differs between ranks
    agree("gather", err, group, same={"shape": shape, "dtype": str(x_local.dtype)})
    return _Gather.apply(x_local, lay, d, group)
