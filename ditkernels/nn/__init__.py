"""Drop-in ``torch.nn`` modules over ditkernels' ops (SPEC §5). Imports only torch.

- :class:`Mamba`: mamba-ssm's ``Mamba`` (v1) mixer; its state dicts load unchanged.
- :class:`SS2D`: VMamba's 2-D multi-direction selective-scan mixer for token grids.
- :class:`ReAttention`: timm's ``Attention`` layout running Re-ttention over a denoising schedule.
- :class:`BlockSparseAttention`, :class:`TopKAttention`: block top-k / exact top-k attention in
  timm's ``Attention`` layout (``qkv`` and ``proj`` Linear layers).
"""

from __future__ import annotations

from .mamba import Mamba
from .rettention import ReAttention
from .sparse import BlockSparseAttention, TopKAttention
from .ss2d import SS2D

__all__ = ["Mamba", "SS2D", "BlockSparseAttention", "TopKAttention", "ReAttention"]
