"""Sparse attention modules in timm's ``Attention`` layout (SPEC §5).

Both modules take ``x: (batch, tokens, dim)`` and own ``qkv = Linear(dim, 3*dim)`` and
``proj = Linear(dim, dim)`` (plus ``q_norm`` / ``k_norm``, LayerNorm over head_dim when
``qk_norm``, else Identity), named and shaped like ``timm.models.vision_transformer.Attention``,
so a DiT / ViT checkpoint's attention weights load unchanged. Attention dropout is not supported
(``attn_drop`` must be 0, as in DiT).

- :class:`BlockSparseAttention`: block top-k attention (:func:`ditkernels.block_topk_attention`),
  or block-sparse attention over a given ``block_mask``.
- :class:`TopKAttention`: exact per-query top-k attention (:func:`ditkernels.topk_attention`),
  with DRSformer's mixture: ``sum_i w_i * attention_topk(k_i = int(tokens * r_i))`` over the ratios
  1/2, 2/3, 3/4, 4/5 with learnable weights ``mix_weight`` initialised to 0.2, all four selections
  made from one shared score pass.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from .. import _validate
from ..ops.sparse import block_sparse_attention, block_topk_attention
from ..ops.topk import topk_attention_fwd

DRS_RATIOS = (1 / 2, 2 / 3, 3 / 4, 4 / 5)


class _TimmAttention(nn.Module):
    """timm ``Attention``'s parameters: qkv, q_norm, k_norm, proj (and proj_drop)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, qk_norm: bool, proj_bias: bool, attn_drop: float,
                 proj_drop: float, norm_layer: type[nn.Module] = nn.LayerNorm):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim: expected a positive int, got {dim!r}")
        if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1 or dim % num_heads:
            raise ValueError(f"num_heads: expected a positive divisor of dim={dim}, got {num_heads!r}")
        if attn_drop != 0:
            raise ValueError(f"attn_drop: attention dropout is not supported by the sparse kernels, got {attn_drop}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)

    def _qkv(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise ValueError(f"x: expected a (batch, tokens, dim) tensor, got {getattr(x, 'shape', type(x).__name__)}")
        b, n, c = x.shape
        if c != self.num_heads * self.head_dim:
            raise ValueError(f"x: expected dim {self.num_heads * self.head_dim}, got shape {tuple(x.shape)}")
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        return self.q_norm(q), self.k_norm(k), v

    def _out(self, o: torch.Tensor) -> torch.Tensor:
        b, h, n, d = o.shape
        return self.proj_drop(self.proj(o.transpose(1, 2).reshape(b, n, h * d)))


class BlockSparseAttention(_TimmAttention):
    """Block top-k (or given block-mask) attention in timm's ``Attention`` layout.

    dim, num_heads, qkv_bias, qk_norm, proj_bias, attn_drop (must be 0), proj_drop, norm_layer: as timm.
    topk / density, block_size, num_prefix, num_suffix, grid: the selection of
    :func:`ditkernels.block_topk_attention` (exactly one of topk / density unless every call passes a
    ``block_mask``). backend: ``backend=`` of the ops.

    forward(x: (batch, tokens, dim), block_mask=None) -> (batch, tokens, dim). With ``block_mask``
    (bool (batch or 1, heads or 1, nq, nk)), block-sparse attention over it instead of the selection.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_norm: bool = False,
                 proj_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 norm_layer: type[nn.Module] = nn.LayerNorm, *, topk: int | None = None,
                 density: float | None = None, block_size: tuple[int, int] = (64, 64), num_prefix: int = 0,
                 num_suffix: int = 0, grid: tuple[int, ...] | None = None, backend: str | None = None):
        super().__init__(dim, num_heads, qkv_bias, qk_norm, proj_bias, attn_drop, proj_drop, norm_layer)
        self.topk, self.density, self.block_size = topk, density, tuple(block_size)
        self.num_prefix, self.num_suffix, self.grid = num_prefix, num_suffix, grid
        self.backend = _validate.check_backend(backend) or None

    def forward(self, x: torch.Tensor, block_mask: torch.Tensor | None = None) -> torch.Tensor:
        q, k, v = self._qkv(x)
        if block_mask is not None:
            o = block_sparse_attention(q, k, v, block_mask, block_size=self.block_size, scale=self.scale,
                                       backend=self.backend)
        else:
            o = block_topk_attention(q, k, v, topk=self.topk, density=self.density, block_size=self.block_size,
                                     num_prefix=self.num_prefix, num_suffix=self.num_suffix, grid=self.grid,
                                     scale=self.scale, backend=self.backend)
        return self._out(o)

    def extra_repr(self) -> str:
        sel = f"topk={self.topk}" if self.topk is not None else f"density={self.density}"
        return f"heads={self.num_heads}, {sel}, block_size={self.block_size}, grid={self.grid}"


class TopKAttention(_TimmAttention):
    """Exact per-query top-k attention in timm's ``Attention`` layout, optionally DRSformer's mixture.

    dim, num_heads, qkv_bias, qk_norm, proj_bias, attn_drop (must be 0), proj_drop, norm_layer: as timm.
    topk: keys per query (one top-k attention); or ratios (default, when topk is None: DRSformer's
    1/2, 2/3, 3/4, 4/5): ``k_i = max(1, int(tokens * r_i))`` and the output is
    ``sum_i mix_weight[i] * attention_topk(k_i)`` with learnable ``mix_weight`` (init 0.2 each); the
    selections of all ratios come from one shared score pass. backend: ``backend=`` of the op.

    forward(x: (batch, tokens, dim)) -> (batch, tokens, dim).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_norm: bool = False,
                 proj_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 norm_layer: type[nn.Module] = nn.LayerNorm, *, topk: int | None = None,
                 ratios: tuple[float, ...] | None = None, backend: str | None = None):
        super().__init__(dim, num_heads, qkv_bias, qk_norm, proj_bias, attn_drop, proj_drop, norm_layer)
        if topk is not None and ratios is not None:
            raise ValueError(f"topk, ratios: give at most one, got topk={topk!r}, ratios={ratios!r}")
        if topk is not None and (isinstance(topk, bool) or not isinstance(topk, int) or topk < 1):
            raise ValueError(f"topk: expected a positive int, got {topk!r}")
        if topk is None:
            ratios = tuple(DRS_RATIOS if ratios is None else ratios)
            if not ratios or any(not isinstance(r, (int, float)) or not 0 < r <= 1 for r in ratios):
                raise ValueError(f"ratios: expected floats in (0, 1], got {ratios!r}")
            self.mix_weight = nn.Parameter(torch.full((len(ratios),), 0.2))
        self.topk, self.ratios = topk, ratios
        self.backend = _validate.check_backend(backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self._qkv(x)
        n = q.shape[2]
        topks = [min(self.topk, n)] if self.topk is not None else [max(1, min(n, int(n * r))) for r in self.ratios]
        _validate.check_qkv(q, k, v)
        outs, _, _, _ = topk_attention_fwd(q, k, v, topks, self.scale, self.backend)  # (T, B, H, N, D)
        if self.topk is not None:
            o = outs[0]
        else:
            o = (outs * self.mix_weight.to(outs.dtype)[:, None, None, None, None]).sum(0)
        return self._out(o)

    def extra_repr(self) -> str:
        sel = f"topk={self.topk}" if self.topk is not None else f"ratios={tuple(round(r, 4) for r in self.ratios)}"
        return f"heads={self.num_heads}, {sel}"
