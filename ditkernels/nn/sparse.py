"""Sparse attention in timm's ``Attention`` layout (docs/spec.md §5): attention callables and their modules.

- :class:`BlockTopKAttnFn`: the attention callable (see :mod:`ditkernels.nn.attention`) over
  :func:`ditkernels.block_topk_attention`, or :func:`ditkernels.block_sparse_attention` when a call
  passes a ``block_mask``.
- :class:`TopKAttnFn`: the attention callable over exact per-query top-k attention
  (:func:`ditkernels.topk_attention`), optionally DRSformer's mixture:
  ``sum_i w_i * attention_topk(k_i = int(tokens * r_i))`` over the ratios 1/2, 2/3, 3/4, 4/5 with
  learnable weights ``mix_weight`` initialised to 0.2, all selections made from one shared score pass.
- :class:`BlockTopKAttention`, :class:`TopKAttention`: :class:`~ditkernels.nn.GridAttention`
  (timm's ``Attention`` parameters, so a DiT / ViT attention state dict loads unchanged) with those
  callables (``BlockSparseAttention`` is the deprecated old name of ``BlockTopKAttention``). The mixture weights are ``attn_fn.mix_weight`` in the state dict (an old checkpoint's
  top-level ``mix_weight`` still loads).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from .. import _validate
from ..ops.sparse import block_sparse_attention, block_topk_attention
from ..ops.topk import topk_attention_fwd
from .attention import GridAttention

DRS_RATIOS = (1 / 2, 2 / 3, 3 / 4, 4 / 5)


class BlockTopKAttnFn(nn.Module):
    """Attention callable ``fn(q, k, v, *, grid, num_prefix, num_suffix, scale, block_mask=None)`` over
    :func:`ditkernels.block_topk_attention`.

    topk / density, block_size, backend: as :func:`ditkernels.block_topk_attention` (exactly one of
    topk / density unless every call passes a ``block_mask``). The call's layout is the op's: global
    tokens are always selected, and a ``grid`` makes the blocks image tiles. With ``block_mask``
    (bool (batch or 1, heads or 1, nq, nk)), block-sparse attention over it instead of the selection.
    """

    def __init__(self, *, topk: int | None = None, density: float | None = None,
                 block_size: int | Sequence[int] = (64, 64), backend: str | None = None) -> None:
        super().__init__()
        self.topk, self.density = topk, density
        self.block_size = tuple(block_size) if isinstance(block_size, (tuple, list)) else (block_size, block_size)
        self.backend = _validate.check_backend(backend) or None

    def extra_repr(self) -> str:
        sel = f"topk={self.topk}" if self.topk is not None else f"density={self.density}"
        return f"{sel}, block_size={self.block_size}, backend={self.backend!r}"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid: Sequence[int] | None = None,
                num_prefix: int = 0, num_suffix: int = 0, scale: float | None = None,
                block_mask: torch.Tensor | None = None) -> torch.Tensor:
        """q, k, v: (batch, heads, seq, head_dim) -> out of q's shape."""
        if block_mask is not None:
            return block_sparse_attention(q, k, v, block_mask, block_size=self.block_size, scale=scale,
                                          backend=self.backend)
        return block_topk_attention(q, k, v, topk=self.topk, density=self.density, block_size=self.block_size,
                                    num_prefix=num_prefix, num_suffix=num_suffix,
                                    grid=tuple(grid) if grid is not None else None, scale=scale, backend=self.backend)


class TopKAttnFn(nn.Module):
    """Attention callable ``fn(q, k, v, *, grid, num_prefix, num_suffix, scale)`` over exact per-query
    top-k attention; ignores the layout (every key is a candidate).

    topk: keys per query (one top-k attention); or ratios (default, when topk is None: DRSformer's
    1/2, 2/3, 3/4, 4/5): ``k_i = max(1, int(tokens * r_i))`` and the output is
    ``sum_i mix_weight[i] * attention_topk(k_i)`` with learnable ``mix_weight`` (init 0.2 each); the
    selections of all ratios come from one shared score pass. backend: ``backend=`` of the op.
    """

    def __init__(self, *, topk: int | None = None, ratios: Sequence[float] | None = None,
                 backend: str | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        if topk is not None and ratios is not None:
            raise ValueError(f"topk, ratios: give at most one, got topk={topk!r}, ratios={ratios!r}")
        if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
            raise ValueError(f"topk: expected a positive int, got {topk!r}")
        if topk is None:
            ratios = tuple(DRS_RATIOS if ratios is None else ratios)
            if not ratios or any(not isinstance(r, (int, float)) or not 0 < r <= 1 for r in ratios):
                raise ValueError(f"ratios: expected floats in (0, 1], got {ratios!r}")
        self.topk, self.ratios = topk, ratios
        self.backend = _validate.check_backend(backend)
        if topk is None:
            self.mix_weight = nn.Parameter(torch.empty(len(ratios), device=device, dtype=dtype))
            self.reset_parameters()

    def reset_parameters(self) -> None:
        """mix_weight (if any) back to 0.2 each."""
        if self.topk is None:
            with torch.no_grad():
                self.mix_weight.fill_(0.2)

    def extra_repr(self) -> str:
        sel = f"topk={self.topk}" if self.topk is not None else f"ratios={tuple(round(r, 4) for r in self.ratios)}"
        return f"{sel}, backend={self.backend!r}"

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid: Sequence[int] | None = None,
                num_prefix: int = 0, num_suffix: int = 0, scale: float | None = None) -> torch.Tensor:
        """q, k, v: (batch, heads, seq, head_dim) -> out of q's shape."""
        _validate.check_qkv(q, k, v)
        n = k.shape[2]
        topks = [min(self.topk, n)] if self.topk is not None else [max(1, min(n, int(n * r))) for r in self.ratios]
        scale = _validate.check_scale(scale, q.shape[-1])
        outs, _, _, _ = topk_attention_fwd(q, k, v, topks, scale, self.backend)  # (T, B, H, N, D)
        if self.topk is not None:
            return outs[0]
        return (outs * self.mix_weight.to(outs.dtype)[:, None, None, None, None]).sum(0)


class BlockTopKAttention(GridAttention):
    """Block top-k (or given block-mask) attention in timm's ``Attention`` layout.

    x: (batch, tokens, dim) -> (batch, tokens, dim_out).

    dim, num_heads, qkv_bias, qk_norm, proj_bias, attn_drop, proj_drop, norm_layer and the keyword-only
    timm arguments: as :class:`~ditkernels.nn.GridAttention`. topk / density, block_size, backend: the
    selection of :class:`BlockTopKAttnFn`. num_prefix, num_suffix, grid: the token layout.

    forward(x, block_mask=None): with ``block_mask`` (bool (batch or 1, heads or 1, nq, nk)),
    block-sparse attention over it instead of the selection.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_norm: bool = False,
                 proj_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 norm_layer: Callable[..., nn.Module] | None = None, *, topk: int | None = None,
                 density: float | None = None, block_size: int | Sequence[int] = (64, 64), num_prefix: int = 0,
                 num_suffix: int = 0, grid: Sequence[int] | None = None, backend: str | None = None,
                 **kwargs) -> None:
        fn = BlockTopKAttnFn(topk=topk, density=density, block_size=block_size, backend=backend)
        super().__init__(dim, num_heads, attn_fn=fn, grid=grid, num_prefix=num_prefix, num_suffix=num_suffix,
                         qkv_bias=qkv_bias, qk_norm=qk_norm, proj_bias=proj_bias, attn_drop=attn_drop,
                         proj_drop=proj_drop, norm_layer=norm_layer, **kwargs)

    @classmethod
    def from_module(cls, module: nn.Module, **kwargs) -> "BlockTopKAttention":
        """A :class:`BlockTopKAttention` reusing ``module``'s projections (see
        :meth:`GridAttention.from_module`); ``kwargs``: topk, density, block_size, grid, num_prefix,
        num_suffix, backend, scale."""
        if "attn_fn" in kwargs:
            raise TypeError(f"attn_fn: {cls.__name__} builds its own; use GridAttention.from_module(module, "
                            "attn_fn=BlockTopKAttnFn(...))")
        return super().from_module(module, **kwargs)

    def forward(self, x: torch.Tensor, block_mask: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        """x: (batch, tokens, dim) -> (batch, tokens, dim_out); ``kwargs``: as :meth:`GridAttention.forward`."""
        if block_mask is not None:
            kwargs["block_mask"] = block_mask
        return super().forward(x, **kwargs)


class BlockSparseAttention(BlockTopKAttention):
    """Deprecated name of :class:`BlockTopKAttention` (it selects blocks by top-k; the op
    ``block_sparse_attention`` takes a user's block mask). Same arguments and state dict."""

    def __init__(self, *args, **kwargs) -> None:
        warnings.warn("ditkernels.nn.BlockSparseAttention is renamed BlockTopKAttention (same arguments); the old "
                      "name will be removed", DeprecationWarning, stacklevel=2)
        super().__init__(*args, **kwargs)


class TopKAttention(GridAttention):
    """Exact per-query top-k attention in timm's ``Attention`` layout, optionally DRSformer's mixture.

    x: (batch, tokens, dim) -> (batch, tokens, dim_out).

    dim, num_heads, qkv_bias, qk_norm, proj_bias, attn_drop, proj_drop, norm_layer and the keyword-only
    timm arguments: as :class:`~ditkernels.nn.GridAttention`. topk, ratios, backend: as
    :class:`TopKAttnFn` (its learnable ``mix_weight`` is ``attn_fn.mix_weight``, also reachable as
    ``module.mix_weight``).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_norm: bool = False,
                 proj_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 norm_layer: Callable[..., nn.Module] | None = None, *, topk: int | None = None,
                 ratios: Sequence[float] | None = None, backend: str | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None, **kwargs) -> None:
        fn = TopKAttnFn(topk=topk, ratios=ratios, backend=backend, device=device, dtype=dtype)
        super().__init__(dim, num_heads, attn_fn=fn, qkv_bias=qkv_bias, qk_norm=qk_norm, proj_bias=proj_bias,
                         attn_drop=attn_drop, proj_drop=proj_drop, norm_layer=norm_layer, device=device,
                         dtype=dtype, **kwargs)

    @property
    def topk(self) -> int | None:
        return self.attn_fn.topk

    @property
    def ratios(self) -> tuple[float, ...] | None:
        return self.attn_fn.ratios

    @property
    def mix_weight(self) -> nn.Parameter:
        """DRSformer's mixture weights (``attn_fn.mix_weight``); AttributeError with ``topk``."""
        try:
            return self.attn_fn.mix_weight
        except AttributeError:
            raise AttributeError("mix_weight: TopKAttention with topk= has no mixture weights") from None

    @classmethod
    def from_module(cls, module: nn.Module, **kwargs) -> "TopKAttention":
        """A :class:`TopKAttention` reusing ``module``'s projections (see :meth:`GridAttention.from_module`);
        ``kwargs``: topk, ratios, backend, scale (``mix_weight`` starts at 0.2)."""
        if "attn_fn" in kwargs:
            raise TypeError("attn_fn: TopKAttention builds its own; use GridAttention.from_module(module, "
                            "attn_fn=TopKAttnFn(...))")
        return super().from_module(module, **kwargs)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # checkpoints of the first TopKAttention kept the mixture at the top level
        old = prefix + "mix_weight"
        if old in state_dict and prefix + "attn_fn.mix_weight" not in state_dict:
            state_dict[prefix + "attn_fn.mix_weight"] = state_dict.pop(old)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
