"""Inputs and invariants that several test files share beyond :mod:`numerics`: a tiny FLUX transformer and
the tile check of a local-attention plan."""

from __future__ import annotations

import torch


def tiny_flux(heads: int, grid: tuple[int, int] = (4, 6)):
    """(model, inputs) of a 2+2-layer FLUX transformer (head_dim 16, patch 1) on an ``h x w`` latent grid
    and 5 text tokens, batch 2, seeded."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=2,
                                   attention_head_dim=16, num_attention_heads=heads, joint_attention_dim=32,
                                   pooled_projection_dim=32, axes_dims_rope=(4, 6, 6))
    g = torch.Generator().manual_seed(3)
    h, w = grid
    img_ids = torch.stack(torch.meshgrid(torch.arange(1), torch.arange(h), torch.arange(w), indexing="ij"), -1)
    inputs = dict(hidden_states=torch.randn(2, h * w, 16, generator=g),
                  encoder_hidden_states=torch.randn(2, 5, 32, generator=g),
                  pooled_projections=torch.randn(2, 32, generator=g), timestep=torch.tensor([0.3, 0.9]),
                  img_ids=img_ids.reshape(-1, 3).float(), txt_ids=torch.zeros(5, 3))
    return model, inputs


def check_plan_visits(plan, ref: torch.Tensor):
    """A :class:`ditkernels.LocalPlan`'s visited tiles against ``ref`` (seq_q, seq_k), the reference visibility
    of its spec: ``useful_pairs`` is exact, every visited tile holds a visible pair, non-partial tiles hold only
    visible pairs, every visible pair lies in a visited tile, and ``computed_pairs`` counts the token pairs of
    the visited tiles. Returns the visits ``(q_tile, kv_tile, partial)``."""
    assert plan.useful_pairs == int(ref.sum())
    # Token tables are padded with the sequence length: row / column seq of these is the padding slot.
    padded = torch.zeros(plan.seq_q + 1, plan.seq_k + 1, dtype=torch.bool)
    padded[:-1, :-1] = ref
    valid = torch.zeros_like(padded)
    valid[:-1, :-1] = True
    qt, kt, par = plan.visits()
    rows = plan.q_tokens.long()[qt][:, :, None].expand(-1, -1, plan.kv_tokens.shape[1])
    cols = plan.kv_tokens.long()[kt][:, None, :].expand(-1, plan.q_tokens.shape[1], -1)
    vis, ok = padded[rows, cols], valid[rows, cols]
    assert vis.flatten(1).any(1).all(), "a visited tile holds no visible pair"
    assert (vis == ok)[~par].all(), "a non-partial tile holds an invisible pair"
    assert plan.computed_pairs == int(ok.sum())
    covered = torch.zeros_like(padded)
    covered[rows, cols] = True
    assert (covered | ~padded).all(), "a visible pair is in no visited tile"
    return qt, kt, par
