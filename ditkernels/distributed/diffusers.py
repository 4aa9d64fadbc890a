"""Sequence-parallel diffusers transformers (DiT, PixArt, SD3, FLUX) through ditkernels' processors.

Requires ``diffusers``. :func:`parallelize` makes a model run sequence-parallel over the ranks of a group:

- the image tokens are sharded right after patch embedding (a forward hook on ``pos_embed`` of DiT /
  PixArt / SD3, on ``x_embedder`` of FLUX, whose rotary embeddings are cut to the rank's tokens as well):
  each rank keeps the grid rows ``bands[rank]`` of the token grid, and every token-wise layer (norms,
  MLPs, modulation, cross-attention queries) then works on its own tokens only;
- every self-/joint attention gets a :class:`SequenceParallelProcessor`: the stock processor's math
  (``ditkernels.integrations.diffusers.GridAttnProcessor``) with the attention call replaced by
  :func:`ulysses_attention` (any ditkernels op, default dense) or :func:`ring_attention`; text tokens are
  replicated on every rank (FLUX's and SD3's context, prefix / suffix global tokens);
- the tokens are gathered on every rank at the output projection (``proj_out_2`` of DiT, ``proj_out``
  otherwise), before the model un-patchifies, so every rank returns the full output.

Every rank must call the model with the same inputs (same latents, text, timestep), as with any
sequence-parallel sampler. diffusers' own context-parallel hooks (``enable_parallelism``) are not used:
they split the text tokens as well (FLUX's plan shards ``encoder_hidden_states``), have no plan for DiT
or PixArt, and call diffusers' attention backends instead of the model's processors.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
import torch.nn as nn

from ..integrations.diffusers import Attention, FluxAttention, GridAttnProcessor, set_processors
from . import _comm
from ._layout import Layout, gather, shard
from .ring import ring_attention
from .ulysses import ulysses_attention

__all__ = ["SequenceParallelProcessor", "parallelize"]


class _ParallelAttnFn:
    """``attn_fn(q, k, v, *, grid, num_prefix, num_suffix, scale)`` on a rank's tokens (``grid``: its band)."""

    def __init__(self, grid: tuple[int, ...], bands: tuple[int, ...], group, attention: str, op, op_kwargs) -> None:
        self.grid, self.bands, self.group = grid, bands, group
        self.attention, self.op, self.op_kwargs = attention, op, op_kwargs

    def __call__(self, q, k, v, *, grid, num_prefix, num_suffix, scale):
        lay = dict(grid=self.grid, bands=self.bands, num_prefix=num_prefix, num_suffix=num_suffix, group=self.group)
        if self.attention == "ring":
            return ring_attention(q, k, v, scale=scale, **lay, **self.op_kwargs)
        return ulysses_attention(q, k, v, op=self.op, scale=scale, **lay, **self.op_kwargs)


class SequenceParallelProcessor(GridAttnProcessor):
    """A diffusers attention processor whose attention runs over every rank's tokens.

    grid: the full image-token grid; bands: grid rows per rank (default an even split); group: the process
    group. attention: ``"ulysses"`` (heads split over ranks; ``op`` any ditkernels attention op, default
    dense, with ``op_kwargs`` as for the full sequence) or ``"ring"`` (dense; ``op_kwargs`` e.g. ``backend``).
    The processor sees this rank's tokens, i.e. the grid ``(bands[rank],) + grid[1:]``.
    """

    def __init__(self, grid: Sequence[int], *, bands: Sequence[int] | None = None, group: dist.ProcessGroup | None = None,
                 attention: str = "ulysses", op: Callable | None = None, **op_kwargs) -> None:
        if attention not in ("ulysses", "ring"):
            raise ValueError(f"attention: expected 'ulysses' or 'ring', got {attention!r}")
        if attention == "ring" and op is not None:
            raise ValueError("op: ring attention is dense; give an op only with attention='ulysses'")
        rank, size = _comm.world(group)
        lay = Layout.make(grid, bands, size)
        super().__init__(_ParallelAttnFn(lay.grid, lay.bands, group, attention, op, op_kwargs),
                         (lay.bands[rank],) + lay.grid[1:])
        self.full_grid, self.bands = lay.grid, lay.bands


class _Handle:
    def __init__(self, hooks: list) -> None:
        self.hooks = hooks

    def remove(self) -> None:
        """Remove the shard / gather hooks (the processors stay); a second call does nothing."""
        hooks, self.hooks = self.hooks, []
        for h in hooks:
            h.remove()


def parallelize(model: nn.Module, grid: Sequence[int], *, bands: Sequence[int] | None = None,
                group: dist.ProcessGroup | None = None, attention: str = "ulysses", op: Callable | None = None,
                **op_kwargs) -> _Handle:
    """Make a diffusers DiT / PixArt / SD3 / FLUX transformer run sequence-parallel (module docstring).

    grid: the image-token grid after patch embedding (e.g. ``(H // 16, W // 16)`` for FLUX at H x W pixels,
    ``(h // patch, w // patch)`` of the latent for DiT / PixArt / SD3). Returns a handle whose ``remove()``
    takes the shard / gather hooks off again.
    """
    rank, size = _comm.world(group)
    lay = Layout.make(grid, bands, size)
    opts = dict(bands=lay.bands, group=group)
    n = math.prod(lay.grid)

    def check_tokens(t: torch.Tensor, where: str) -> None:
        if t.shape[1] != n:
            raise ValueError(f"grid: {lay.grid} has {n} tokens but {where} produced {t.shape[1]} (shape "
                             f"{tuple(t.shape)}); give the grid of this resolution")

    def shard_tokens(module, args, out):
        check_tokens(out, type(module).__name__)
        return shard(out, lay.grid, dim=1, **opts)

    def gather_tokens(module, args, out):
        return gather(out, lay.grid, dim=1, **opts)

    def shard_rope(module, args, out):  # FLUX: rotary embeddings of [text ids][image ids]
        text = args[0].shape[0] - n
        return tuple(shard(t, lay.grid, dim=0, num_prefix=text, **opts) for t in out)

    hooks = []
    if hasattr(model, "x_embedder") and hasattr(model, "pos_embed"):  # FLUX
        hooks.append(model.x_embedder.register_forward_hook(shard_tokens))
        hooks.append(model.pos_embed.register_forward_hook(shard_rope))
    elif hasattr(model, "pos_embed"):  # DiT, PixArt, SD3: PatchEmbed
        hooks.append(model.pos_embed.register_forward_hook(shard_tokens))
    else:
        raise ValueError(f"model: {type(model).__name__} is not a DiT, PixArt, SD3 or FLUX transformer (no pos_embed)")
    out_proj = getattr(model, "proj_out_2", None) or getattr(model, "proj_out", None)
    if out_proj is None:
        raise ValueError(f"model: {type(model).__name__} has no proj_out / proj_out_2 to gather the tokens at")
    hooks.append(out_proj.register_forward_hook(gather_tokens))

    def processor(name, attn):
        if FluxAttention is not None and isinstance(attn, FluxAttention):
            return SequenceParallelProcessor(lay.grid, attention=attention, op=op, **opts, **op_kwargs)
        if isinstance(attn, Attention):
            # self-attention and joint attention; cross-attention (PixArt's attn2: keys are the text) is
            # token-wise in the queries and stays with the stock math inside the processor
            return SequenceParallelProcessor(lay.grid, attention=attention, op=op, **opts, **op_kwargs)
        return None

    set_processors(model, processor)
    return _Handle(hooks)
