"""ditkernels.distributed.diffusers: real diffusers transformers (DiT, PixArt, SD3, FLUX; tiny random configs)
run sequence-parallel over P = 2 and 3 gloo ranks (Ulysses and ring) reproduce the single-process stock output
in float32 (err <= 1e-5) on every rank; tokens sharded after patch embedding, gathered before un-patching.
The grids have 5 and 4 rows, so the bands are unequal for P = 2 or 3."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from ditkernels.distributed import _comm

from builders import tiny_flux
from distributed_helpers import rank_fixture
from numerics import rel_err

HEADS = 6  # divisible by 2 and 3 (Ulysses splits the heads)
LATENT = (8, 12)
GRID = (4, 6)


def make_dit():
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(0)
    model = DiTTransformer2DModel(num_attention_heads=HEADS, attention_head_dim=8, in_channels=4, out_channels=8,
                                  num_layers=2, sample_size=10, patch_size=2, num_embeds_ada_norm=10,
                                  norm_num_groups=1)
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(2, 4, 10, 10, generator=g), timestep=torch.tensor([3, 700]),
                  class_labels=torch.tensor([1, 7]))
    return model, inputs, (5, 5)


def make_pixart():
    from diffusers import PixArtTransformer2DModel

    torch.manual_seed(0)
    model = PixArtTransformer2DModel(num_attention_heads=HEADS, attention_head_dim=8, in_channels=4, out_channels=8,
                                     num_layers=2, sample_size=LATENT[0], patch_size=2, cross_attention_dim=48,
                                     caption_channels=24, norm_num_groups=1)
    g = torch.Generator().manual_seed(2)
    inputs = dict(hidden_states=torch.randn(2, 4, *LATENT, generator=g),
                  encoder_hidden_states=torch.randn(2, 7, 24, generator=g), timestep=torch.tensor([3, 700]),
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    return model, inputs, GRID


def make_sd3():
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=LATENT[0], patch_size=2, in_channels=4, num_layers=2,
                                  attention_head_dim=8, num_attention_heads=HEADS, joint_attention_dim=24,
                                  caption_projection_dim=48, pooled_projection_dim=24, out_channels=4,
                                  pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
    g = torch.Generator().manual_seed(4)
    inputs = dict(hidden_states=torch.randn(2, 4, *LATENT, generator=g),
                  encoder_hidden_states=torch.randn(2, 6, 24, generator=g),
                  pooled_projections=torch.randn(2, 24, generator=g), timestep=torch.tensor([3, 700]))
    return model, inputs, GRID


def make_flux():
    return (*tiny_flux(heads=HEADS, grid=GRID), GRID)


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def _check_model(make):
    from ditkernels.distributed.diffusers import parallelize

    rank, p = dist.get_rank(), dist.get_world_size()
    for attention in ("ulysses", "ring"):
        model, inputs, grid = make()
        model.eval()
        want = _run(model, inputs)  # the stock processors, one process
        handle = parallelize(model, grid, attention=attention)
        with _comm.count() as sent:
            got = _run(model, inputs)
        assert (sent.sent > 0) == (p > 1), "the attention did not communicate"
        err = rel_err(got, want)
        assert err <= 1e-5, f"{attention}: relative error {err:.3e} against the single-process stock output"
        handle.remove()
        # without the hooks the processors see the whole grid as this rank's band: a clear error, not a wrong result
        if p > 1:
            with pytest.raises(ValueError, match="grid"):
                _run(model, inputs)


def case_dit():
    _check_model(make_dit)


def case_pixart():
    _check_model(make_pixart)


def case_sd3():
    _check_model(make_sd3)


def case_flux():
    _check_model(make_flux)


CASES = [case_dit, case_pixart, case_sd3, case_flux]
ranks = rank_fixture(CASES, worlds=(2, 3), timeout=60)


@pytest.mark.parametrize("case", [c.__name__ for c in CASES], ids=[c.__name__[5:] for c in CASES])
def test_case(ranks, case):
    ranks.check(case)
