"""Drop-in ``torch.nn`` modules over ditkernels' ops (docs/spec.md §5). Imports only torch.

- :class:`Mamba`: mamba-ssm's ``Mamba`` (v1) mixer; its state dicts load unchanged.
- :class:`SS2D`: VMamba's 2-D multi-direction selective-scan mixer for token grids.
- :class:`GridAttention`: timm's ``Attention`` (DiT's) parameters around any attention callable;
  :class:`LocalAttention`: the same with local-window attention (CLEAR's pooled keys with ``pool=``);
  :func:`swap_attention`: replace a model's timm-style attention modules in place.
- :class:`ReAttention`: a GridAttention running Re-ttention (``ReStepper``) over a denoising schedule.
- :class:`BlockTopKAttention`, :class:`TopKAttention`: GridAttentions with block top-k / exact
  top-k attention (callables :class:`BlockTopKAttnFn`, :class:`TopKAttnFn`); ``BlockSparseAttention``
  is the deprecated old name of ``BlockTopKAttention``.
"""

from __future__ import annotations

from .attention import AttnFn, DenseAttnFn, GridAttention, is_timm_attention, swap_attention
from .local import KVPool, LocalAttention, LocalAttnFn
from .mamba import Mamba
from .rettention import ReAttention
from .sparse import BlockSparseAttention, BlockTopKAttention, BlockTopKAttnFn, TopKAttention, TopKAttnFn
from .ss2d import SS2D

__all__ = ["Mamba", "SS2D", "GridAttention", "LocalAttention", "LocalAttnFn", "DenseAttnFn", "KVPool", "AttnFn",
           "swap_attention", "is_timm_attention", "BlockTopKAttention", "BlockSparseAttention", "TopKAttention",
           "ReAttention",
           "BlockTopKAttnFn", "TopKAttnFn"]
