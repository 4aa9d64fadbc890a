"""diffusers attention processors that swap only the attention call (docs/spec.md §5).

Requires ``diffusers`` (``pip install diffusers``); ``import ditkernels`` never imports this module.

:class:`GridAttnProcessor` follows the stock processors of diffusers line by line -- projections, q/k
norms, rotary embeddings, text/image concatenation, output projections -- and replaces only the
``scaled_dot_product_attention`` call by an attention callable
``attn_fn(q, k, v, *, grid, num_prefix, num_suffix, scale)`` (see :mod:`ditkernels.nn.attention`),
with the image tokens as the grid and the text tokens as global tokens:

=====================================  ==========================  ==================================
attention module                       stock processor             token layout given to attn_fn
=====================================  ==========================  ==================================
``Attention``, self-attention          ``AttnProcessor2_0``        ``[P][grid][S]`` (P, S: processor's
(DiT, PixArt attn1, SD3.5 attn2)                                   num_prefix / num_suffix, default 0)
``Attention``, cross-attention         ``AttnProcessor2_0``        not local: run by the stock processor
(PixArt attn2)
``Attention`` with ``add_q_proj``      ``JointAttnProcessor2_0``   ``[grid][context]``: suffix
(SD3 joint blocks)
``FluxAttention``, joint blocks        ``FluxAttnProcessor``       ``[text][grid]``: prefix
``FluxAttention``, single blocks       ``FluxAttnProcessor``       ``[text][grid]``: the tokens before
                                                                   the grid's are the prefix
=====================================  ==========================  ==================================

The grid is the processor's ``grid`` (image tokens after patching, e.g. ``(H // 16, W // 16)`` for
FLUX, ``(H // 8 // patch, W // 8 // patch)`` for DiT / PixArt / SD3); a 4-D ``(B, C, H, W)`` input
gives its own. Change it for a new resolution with :func:`set_grid`. The softmax scale is the stock
one, ``head_dim ** -0.5``.

Use: ``model.set_attn_processor(LocalAttnProcessor(grid=(32, 32), window=8))`` (one processor for every
layer), or :func:`set_processors` with a factory (one processor per layer: needed with ``pool=``,
whose weights are per layer; also works on models without ``set_attn_processor``, such as
``DiTTransformer2DModel``).
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.embeddings import apply_rotary_emb

from .._validate import check_token_grid
from ..nn.attention import AttnFn
from ..nn.local import LocalAttnFn

try:  # diffusers >= 0.35: FLUX has its own attention class
    from diffusers.models.transformers.transformer_flux import FluxAttention
except ImportError:  # pragma: no cover - older diffusers
    FluxAttention = None



def _heads_qkv(attn: Attention, hidden_states: torch.Tensor, batch_size: int):
    """The stock processors' projections: (query, key, value) as (batch, heads, tokens, head_dim) after
    the q/k norms, and head_dim."""
    query = attn.to_q(hidden_states)
    key = attn.to_k(hidden_states)
    value = attn.to_v(hidden_states)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value, head_dim

class GridAttnProcessor(nn.Module):
    """An attention processor for diffusers' ``Attention`` / ``FluxAttention`` modules that computes the
    stock processors' math with ``attn_fn`` as the attention (module docstring).

    attn_fn: the attention callable; an ``nn.Module`` callable is a submodule (its parameters, e.g.
    CLEAR's pooling weights, are saved with the model as ``...processor.attn_fn.*``).
    grid: image-token grid (see :func:`set_grid`). num_prefix / num_suffix: global tokens around the
    grid in plain self-attention calls (ignored in joint text-image calls, where the text is global).
    """

    def __init__(self, attn_fn: AttnFn, grid: Sequence[int] | None = None, *, num_prefix: int = 0,
                 num_suffix: int = 0) -> None:
        super().__init__()
        if not callable(attn_fn):
            raise TypeError(f"attn_fn: expected an attention callable, got {type(attn_fn).__name__}")
        self.attn_fn = attn_fn
        self.grid = check_token_grid(grid)
        for name, val in (("num_prefix", num_prefix), ("num_suffix", num_suffix)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 0:
                raise ValueError(f"{name}: expected an int >= 0, got {val!r}")
        self.num_prefix, self.num_suffix = num_prefix, num_suffix
        self._stock = AttnProcessor2_0()

    def extra_repr(self) -> str:
        return f"grid={self.grid}, num_prefix={self.num_prefix}, num_suffix={self.num_suffix}"

    # ---- the one swapped call ---------------------------------------------------------------------
    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, ...] | None,
                num_prefix: int, num_suffix: int) -> torch.Tensor:
        """q, k, v: (batch, heads, seq, head_dim) -> (batch, heads, seq, head_dim)."""
        grid = grid if grid is not None else self.grid
        if grid is None:
            raise ValueError("grid: the processor needs the image-token grid: GridAttnProcessor(..., grid=(H, W)) "
                             "or ditkernels.integrations.diffusers.set_grid(model, (H, W))")
        seq = q.shape[2]
        if num_prefix + math.prod(grid) + num_suffix != seq:
            raise ValueError(f"grid: expected num_prefix + prod(grid) + num_suffix = {num_prefix} + {math.prod(grid)} + "
                             f"{num_suffix} to equal the {seq} tokens of the attention call (grid {grid}); "
                             "set the grid of this resolution with set_grid(model, grid)")
        return self.attn_fn(q, k, v, grid=tuple(grid), num_prefix=num_prefix, num_suffix=num_suffix,
                            scale=q.shape[-1] ** -0.5)

    # ---- dispatch on the attention module ------------------------------------------------------------
    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, image_rotary_emb: torch.Tensor | None = None,
                 temb: torch.Tensor | None = None, *args, **kwargs) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if FluxAttention is not None and isinstance(attn, FluxAttention):
            return self._flux(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        if not isinstance(attn, Attention):
            raise TypeError(f"attn: GridAttnProcessor supports diffusers' Attention and FluxAttention modules, "
                            f"got {type(attn).__name__}")
        if image_rotary_emb is not None:
            raise ValueError("image_rotary_emb: not used by the AttnProcessor2_0 / JointAttnProcessor2_0 math")
        if getattr(attn, "add_q_proj", None) is not None and encoder_hidden_states is not None:
            return self._joint(attn, hidden_states, encoder_hidden_states, attention_mask)
        if encoder_hidden_states is not None:  # cross-attention: no grid on the keys, stock processor
            return self._stock(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        return self._self(attn, hidden_states, attention_mask, temb)

    @staticmethod
    def _no_mask(attention_mask: torch.Tensor | None) -> None:
        if attention_mask is not None:
            raise ValueError("attention_mask: not supported by local / sparse attention processors (got a tensor of "
                             f"shape {tuple(attention_mask.shape)}); use the stock processor for masked attention")

    def _self(self, attn, hidden_states, attention_mask, temb):
        """AttnProcessor2_0 without encoder_hidden_states."""
        self._no_mask(attention_mask)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        grid = None
        if input_ndim == 4:
            batch_size, channel, height, width = hidden_states.shape
            hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
            grid = (height, width)
        batch_size, _, _ = hidden_states.shape
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query, key, value, head_dim = _heads_qkv(attn, hidden_states, batch_size)

        hidden_states = self._attend(query, key, value, grid, self.num_prefix, self.num_suffix)

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        if input_ndim == 4:
            hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor

    def _joint(self, attn, hidden_states, encoder_hidden_states, attention_mask):
        """JointAttnProcessor2_0 (SD3): image tokens first, context tokens appended (the suffix)."""
        # the stock joint processor ignores attention_mask; so do we
        residual = hidden_states
        batch_size = hidden_states.shape[0]
        query, key, value, head_dim = _heads_qkv(attn, hidden_states, batch_size)

        ctx_q = attn.add_q_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        ctx_k = attn.add_k_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        ctx_v = attn.add_v_proj(encoder_hidden_states).view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)
        if attn.norm_added_q is not None:
            ctx_q = attn.norm_added_q(ctx_q)
        if attn.norm_added_k is not None:
            ctx_k = attn.norm_added_k(ctx_k)
        query = torch.cat([query, ctx_q], dim=2)
        key = torch.cat([key, ctx_k], dim=2)
        value = torch.cat([value, ctx_v], dim=2)

        hidden_states = self._attend(query, key, value, None, 0, encoder_hidden_states.shape[1])

        hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
        hidden_states = hidden_states.to(query.dtype)
        hidden_states, encoder_hidden_states = (hidden_states[:, : residual.shape[1]],
                                                hidden_states[:, residual.shape[1]:])
        if not attn.context_pre_only:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states, encoder_hidden_states

    def _flux(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb):
        """FluxAttnProcessor: text tokens first (the prefix), rotary embeddings on the joint sequence."""
        self._no_mask(attention_mask)
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = query.unflatten(-1, (-1, attn.head_dim))
        key = key.unflatten(-1, (-1, attn.head_dim))
        value = value.unflatten(-1, (-1, attn.head_dim))
        query = attn.norm_q(query)
        key = attn.norm_k(key)

        joint = encoder_hidden_states is not None and attn.added_kv_proj_dim is not None
        if joint:
            if getattr(attn, "fused_projections", False):
                eq, ek, ev = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
            else:
                eq = attn.add_q_proj(encoder_hidden_states)
                ek = attn.add_k_proj(encoder_hidden_states)
                ev = attn.add_v_proj(encoder_hidden_states)
            eq = attn.norm_added_q(eq.unflatten(-1, (-1, attn.head_dim)))
            ek = attn.norm_added_k(ek.unflatten(-1, (-1, attn.head_dim)))
            ev = ev.unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([eq, query], dim=1)
            key = torch.cat([ek, key], dim=1)
            value = torch.cat([ev, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        # (B, S, H, D) -> (B, H, S, D); single-stream blocks carry the text tokens in front of the image
        q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
        grid = self.grid
        text = encoder_hidden_states.shape[1] if joint else q.shape[2] - (math.prod(grid) if grid else 0)
        if text < 0:
            raise ValueError(f"grid: {grid} has more tokens ({math.prod(grid)}) than the attention call ({q.shape[2]})")
        hidden_states = self._attend(q, k, v, None, text, 0).transpose(1, 2)

        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)
        if encoder_hidden_states is not None:
            encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
                [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1)
            hidden_states = attn.to_out[0](hidden_states.contiguous())
            hidden_states = attn.to_out[1](hidden_states)
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
            return hidden_states, encoder_hidden_states
        return hidden_states


class LocalAttnProcessor(GridAttnProcessor):
    """:class:`GridAttnProcessor` with local-window attention (:class:`ditkernels.nn.LocalAttnFn`).

    grid: image-token grid. window, shape, border, tile, backend: as :func:`ditkernels.local_attention`.
    pool: CLEAR's down-sampled keys (an int or one factor per grid dimension); its weights are this
    processor's parameters, so give each layer its own processor (:func:`set_processors`).
    num_prefix / num_suffix: see :class:`GridAttnProcessor`.
    """

    def __init__(self, grid: Sequence[int] | None = None, *, window: int | Sequence[int], shape: str = "circle",
                 border: str = "clip", tile: int | Sequence[int] | None = None,
                 pool: int | Sequence[int] | None = None, num_prefix: int = 0, num_suffix: int = 0,
                 backend: str | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        g = check_token_grid(grid)
        fn = LocalAttnFn(window, shape=shape, border=border, tile=tile, pool=pool,
                         pool_ndim=len(g) if g is not None else 2, backend=backend, device=device, dtype=dtype)
        super().__init__(fn, g, num_prefix=num_prefix, num_suffix=num_suffix)


def _attention_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if hasattr(m, "set_processor") and hasattr(m, "processor")]


def set_processors(model: nn.Module, processor: GridAttnProcessor | Callable[[str, nn.Module], object], *,
                   match: Callable[[str, nn.Module], bool] | None = None) -> list[str]:
    """Give the attention modules of a diffusers model a processor; works on every model (also those
    without ``set_attn_processor``, e.g. ``DiTTransformer2DModel``).

    processor: one processor for every module, or a factory function ``processor(name, attn_module)``
    called per module (e.g. ``lambda name, attn: LocalAttnProcessor(grid, window=8, pool=4)``); a factory may
    return None to leave a module's processor as it is. match: ``match(name, attn_module) -> bool``
    restricts the modules (e.g. ``lambda name, _: name.endswith("attn1")``).

    Returns the names of the modules whose processor was set. Raises ValueError if the model has no
    attention module (or none matched)."""
    mods = _attention_modules(model)
    if not mods:
        raise ValueError(f"model: {type(model).__name__} has no diffusers attention module (with set_processor)")
    factory = inspect.isfunction(processor) or inspect.ismethod(processor) or isinstance(processor, functools.partial)
    done = []
    for name, mod in mods:
        if match is not None and not match(name, mod):
            continue
        proc = processor(name, mod) if factory else processor
        if proc is None:
            continue
        mod.set_processor(proc)
        done.append(name)
    if not done:
        raise ValueError(f"match: selected none of the {len(mods)} attention modules of {type(model).__name__} "
                         f"(e.g. {[n for n, _ in mods[:4]]})")
    return done


def set_grid(model: nn.Module, grid: Sequence[int]) -> int:
    """Set the image-token grid of every :class:`GridAttnProcessor` of ``model`` (for a new resolution).
    Returns how many processors were updated."""
    g = check_token_grid(grid)
    count = 0
    for _, mod in _attention_modules(model):
        if isinstance(mod.processor, GridAttnProcessor):
            mod.processor.grid = g
            count += 1
    return count
