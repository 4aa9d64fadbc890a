"""Local-window attention modules (docs/spec.md §1, §5): CLEAR / NATTEN / sliding-tile windows in timm's layout.

- :class:`LocalAttnFn`: the attention callable (see :mod:`ditkernels.nn.attention`) over
  :func:`ditkernels.local_attention`, optionally with CLEAR's down-sampled keys (:class:`KVPool`).
- :class:`LocalAttention`: :class:`~ditkernels.nn.GridAttention` (timm's ``Attention`` parameters)
  with a :class:`LocalAttnFn`.

CLEAR's down-sampled variant (its ``LocalDownsampleFlexAttnProcessor``): the keys and values of the
grid tokens are pooled by non-overlapping ``f x f`` boxes with one learnable weight per box position
(shape ``(f, f)``, shared by heads and channels, initialised to ``1 / f^2``: average pooling), and the
``prod(grid / f)`` pooled tokens are added to every grid query's neighbourhood: they are
``local_attention``'s ``extra_kv``, which global (text) queries do not see. Pooling happens on the keys
the attention sees (after q/k norms and rotary embeddings), as in CLEAR.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from .._validate import check_token_grid
from ..ops.local import local_attention
from ..reference.local import BORDERS, SHAPES
from .attention import GridAttention


def _factors(pool: object, ndim: int) -> tuple[int, ...]:
    if isinstance(pool, (tuple, list)):
        f = tuple(pool)
    else:
        f = (pool,) * ndim
    if not 1 <= len(f) <= 3 or any(isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in f):
        raise ValueError(f"pool: expected a positive int or 1-3 positive ints (one per grid dimension), got {pool!r}")
    return tuple(int(x) for x in f)


class KVPool(nn.Module):
    """CLEAR's learnable down-sampling of the grid keys and values (module docstring).

    factor: pooling box, one int per grid dimension. ``weight``: (``*factor``), initialised to
    ``1 / prod(factor)``.

    forward(k, v, grid, num_prefix) with k, v: (batch, heads, seq, head_dim) ->
    (k_pooled, v_pooled), each (batch, heads, prod(grid // factor), head_dim) in k's dtype, row-major
    over the coarse grid. Every grid size must be a multiple of its factor.
    """

    def __init__(self, factor: Sequence[int], *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.factor = _factors(tuple(factor), len(factor))
        self.weight = nn.Parameter(torch.empty(self.factor, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.fill_(1.0 / math.prod(self.factor))

    def extra_repr(self) -> str:
        return f"factor={self.factor}"

    def coarse_grid(self, grid: Sequence[int]) -> tuple[int, ...]:
        if len(grid) != len(self.factor) or any(g % f for g, f in zip(grid, self.factor)):
            raise ValueError(f"grid: expected {len(self.factor)} sizes, each a multiple of the pooling factor "
                             f"{self.factor}, got {tuple(grid)}")
        return tuple(g // f for g, f in zip(grid, self.factor))

    def pool(self, x: torch.Tensor, grid: Sequence[int], num_prefix: int) -> torch.Tensor:
        """x: (batch, heads, seq, head_dim) -> (batch, heads, M, head_dim), M = prod(grid // factor)."""
        coarse = self.coarse_grid(grid)
        b, h, _, d = x.shape
        n = math.prod(grid)
        split = [s for c, f in zip(coarse, self.factor) for s in (c, f)]  # (c0, f0, c1, f1, ...)
        xg = x[:, :, num_prefix:num_prefix + n].reshape(b, h, *split, d)
        wshape = [s for f in self.factor for s in (1, f)]
        w = self.weight.to(x.dtype).reshape(*wshape, 1)
        fine = tuple(3 + 2 * a for a in range(len(self.factor)))
        return (xg * w).sum(dim=fine).reshape(b, h, math.prod(coarse), d)

    def forward(self, k: torch.Tensor, v: torch.Tensor, grid: Sequence[int],
                num_prefix: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        return self.pool(k, grid, num_prefix), self.pool(v, grid, num_prefix)


class LocalAttnFn(nn.Module):
    """Attention callable (``fn(q, k, v, *, grid, num_prefix, num_suffix, scale)``) over
    :func:`ditkernels.local_attention`.

    window, shape, border, tile, backend: as :func:`ditkernels.local_attention`.
    pool: CLEAR's down-sampled keys (:class:`KVPool`): a factor per grid dimension, or an int for
    every dimension of a ``pool_ndim``-D grid (default 2). None: plain local attention.
    """

    def __init__(self, window: int | Sequence[int], *, shape: str = "circle", border: str = "clip",
                 tile: int | Sequence[int] | None = None, pool: int | Sequence[int] | None = None,
                 pool_ndim: int = 2, backend: str | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if window is None:
            raise ValueError("window: expected the window radius (an int or one per grid dimension), got None")
        if not isinstance(shape, str) or shape not in SHAPES:
            raise ValueError(f"shape: expected one of {SHAPES}, got {shape!r}")
        if not isinstance(border, str) or border not in BORDERS:
            raise ValueError(f"border: expected one of {BORDERS}, got {border!r}")
        self.window = tuple(window) if isinstance(window, (tuple, list)) else window
        self.shape, self.border = shape, border
        self.tile = tuple(tile) if isinstance(tile, (tuple, list)) else tile
        self.backend = backend
        self.pool = None if pool is None else KVPool(_factors(pool, pool_ndim), device=device, dtype=dtype)

    def extra_repr(self) -> str:
        return f"window={self.window}, shape={self.shape!r}, border={self.border!r}, tile={self.tile}, backend={self.backend!r}"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid: Sequence[int] | None,
                num_prefix: int = 0, num_suffix: int = 0, scale: float | None = None) -> torch.Tensor:
        """q, k, v: (batch, heads, num_prefix + prod(grid) + num_suffix, head_dim) -> out of q's shape."""
        if grid is None:
            raise ValueError("grid: local attention needs the token grid (H, W) / (T, H, W): give grid= to the "
                             "module or processor, or to the call")
        extra = self.pool(k, v, grid, num_prefix) if self.pool is not None else None
        return local_attention(q, k, v, tuple(grid), self.window, shape=self.shape, border=self.border,
                               tile=self.tile, num_prefix=num_prefix, num_suffix=num_suffix, extra_kv=extra,
                               scale=scale, backend=self.backend)


class LocalAttention(GridAttention):
    """timm-compatible multi-head self-attention with local-window attention (CLEAR, NATTEN, STA).

    x: (batch, tokens, dim) -> (batch, tokens, dim_out), tokens laid out
    ``[num_prefix global][grid tokens, row-major][num_suffix global]``.

    Parameters: timm's ``Attention`` (``qkv``, ``q_norm``, ``k_norm``, ``norm``, ``gate``, ``proj``; see
    :mod:`ditkernels.nn.attention`), so a timm / DiT attention state dict loads unchanged; with ``pool``
    one more, ``attn_fn.pool.weight`` (the state dict of a module without it then loads with
    ``strict=False``, and the pooling starts as an average).

    grid: (L,), (H, W) or (T, H, W), here or per call (``forward(x, grid=...)``).
    window, shape, border, tile, backend: as :func:`ditkernels.local_attention`.
    num_prefix / num_suffix: global tokens (e.g. class or register tokens) before / after the grid.
    pool: CLEAR's down-sampled keys and values (:class:`KVPool`), an int or one factor per grid dimension.
    The other arguments are timm's (:class:`~ditkernels.nn.GridAttention`).
    """

    def __init__(self, dim: int, num_heads: int = 8, *, window: int | Sequence[int],
                 grid: Sequence[int] | None = None, shape: str = "circle", border: str = "clip",
                 tile: int | Sequence[int] | None = None, num_prefix: int = 0, num_suffix: int = 0,
                 pool: int | Sequence[int] | None = None, backend: str | None = None,
                 attn_head_dim: int | None = None, dim_out: int | None = None, qkv_bias: bool = False,
                 qk_norm: bool = False, scale_norm: bool = False, proj_bias: bool = True, gated: bool = False,
                 attn_drop: float = 0.0, proj_drop: float = 0.0, norm_layer: Callable[..., nn.Module] | None = None,
                 scale: float | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        g = check_token_grid(grid)
        fn = LocalAttnFn(window, shape=shape, border=border, tile=tile, pool=pool,
                         pool_ndim=len(g) if g is not None else 2, backend=backend, device=device, dtype=dtype)
        super().__init__(dim, num_heads, attn_fn=fn, grid=g, num_prefix=num_prefix, num_suffix=num_suffix,
                         attn_head_dim=attn_head_dim, dim_out=dim_out, qkv_bias=qkv_bias, qk_norm=qk_norm,
                         scale_norm=scale_norm, proj_bias=proj_bias, gated=gated, attn_drop=attn_drop,
                         proj_drop=proj_drop, norm_layer=norm_layer, scale=scale, device=device, dtype=dtype)

    @classmethod
    def from_module(cls, module: nn.Module, **kwargs) -> "LocalAttention":
        """A :class:`LocalAttention` reusing ``module``'s projections (see :meth:`GridAttention.from_module`);
        ``kwargs``: window, grid, shape, border, tile, num_prefix, num_suffix, pool, backend, scale."""
        if "attn_fn" in kwargs:
            raise TypeError("attn_fn: LocalAttention builds its own; use GridAttention.from_module(module, attn_fn=...)")
        return super().from_module(module, **kwargs)
