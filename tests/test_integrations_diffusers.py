"""ditkernels.integrations.diffusers (docs/spec.md §5): the processors on real diffusers models (DiT, PixArt, FLUX,
SD3) with tiny random configs. A window covering the whole grid reproduces the stock processors; a real
window equals the same processor math with an independent masked-SDPA attention (docs/spec.md §1's mask), with
CLEAR's pooled keys too; the token layouts (FLUX text first, SD3 context last) are checked directly."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import diffusers
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel

from ditkernels import Band, ReSchedule, ReStepper
from ditkernels.integrations.diffusers import GridAttnProcessor, LocalAttnProcessor, set_grid, set_processors
from ditkernels.nn import BlockTopKAttnFn
from ditkernels.reference.local import LocalSpec, kv_pool_ref, local_visible

from builders import tiny_flux
from numerics import MODULE_BACKENDS, rel_err

LATENT = (8, 12)  # latent height, width: a 4x6 token grid with patch 2 (FLUX: packed 2x2 -> 4x6)
GRID = (4, 6)
COVER = 8  # circle radius covering every offset of a 4x6 grid (max d^2 = 9 + 25 < 64)


class Recorder:
    """Wraps an attention callable and records the layout of every call."""

    def __init__(self, fn):
        self.fn, self.calls = fn, []

    def __call__(self, q, k, v, *, grid, num_prefix, num_suffix, scale):
        self.calls.append((tuple(grid), num_prefix, num_suffix, q.shape[2]))
        return self.fn(q, k, v, grid=grid, num_prefix=num_prefix, num_suffix=num_suffix, scale=scale)


class MaskedSDPA:
    """Independent reference: PyTorch SDPA with the boolean mask of ditkernels.reference.local (and CLEAR's
    pooled keys from a given weight, appended as the extra keys)."""

    def __init__(self, window, pool_weight=None, **opts):
        self.window, self.pool_weight, self.opts = window, pool_weight, opts

    def __call__(self, q, k, v, *, grid, num_prefix, num_suffix, scale):
        m = 0
        if self.pool_weight is not None:
            ke = kv_pool_ref(k, grid, num_prefix, self.pool_weight)
            ve = kv_pool_ref(v, grid, num_prefix, self.pool_weight)
            m = ke.shape[2]
            k, v = torch.cat([k, ke], 2), torch.cat([v, ve], 2)
        spec = LocalSpec.make(grid, self.window, num_prefix=num_prefix, num_suffix=num_suffix, num_extra=m, **self.opts)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=local_visible(spec, q.device), scale=scale)


# ---- tiny models and their inputs -------------------------------------------------------------------------
def _gen(seed):
    return torch.Generator().manual_seed(seed)


def make_dit():
    torch.manual_seed(0)
    # DiT's unpatchify assumes a square latent: 10x10 -> a 5x5 grid
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=20, in_channels=4, out_channels=8,
                                  num_layers=2, sample_size=10, patch_size=2, num_embeds_ada_norm=10,
                                  norm_num_groups=1)
    g = _gen(1)
    inputs = dict(hidden_states=torch.randn(2, 4, 10, 10, generator=g), timestep=torch.tensor([3, 700]),
                  class_labels=torch.tensor([1, 7]))
    return model, inputs


def make_pixart():
    torch.manual_seed(0)
    model = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=20, in_channels=4, out_channels=8,
                                     num_layers=2, sample_size=LATENT[0], patch_size=2, cross_attention_dim=40,
                                     caption_channels=24, norm_num_groups=1)
    g = _gen(2)
    inputs = dict(hidden_states=torch.randn(2, 4, *LATENT, generator=g),
                  encoder_hidden_states=torch.randn(2, 7, 24, generator=g), timestep=torch.tensor([3, 700]),
                  added_cond_kwargs={"resolution": None, "aspect_ratio": None})
    return model, inputs


def make_flux():
    return tiny_flux(heads=2, grid=GRID)


def make_sd3():
    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=LATENT[0], patch_size=2, in_channels=4, num_layers=2,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
                                  caption_projection_dim=32, pooled_projection_dim=24, out_channels=4,
                                  pos_embed_max_size=16, dual_attention_layers=(0,), qk_norm="rms_norm")
    g = _gen(4)
    inputs = dict(hidden_states=torch.randn(2, 4, *LATENT, generator=g),
                  encoder_hidden_states=torch.randn(2, 6, 24, generator=g),
                  pooled_projections=torch.randn(2, 24, generator=g), timestep=torch.tensor([3, 700]))
    return model, inputs


MODELS = {"dit": make_dit, "pixart": make_pixart, "flux": make_flux, "sd3": make_sd3}
GRIDS = {"dit": (5, 5), "pixart": GRID, "flux": GRID, "sd3": GRID}
# the layouts (grid, num_prefix, num_suffix, seq) each model's attention calls must hand to attn_fn
N = math.prod(GRID)
LAYOUTS = {
    "dit": {((5, 5), 0, 0, 25)},
    "pixart": {(GRID, 0, 0, N)},  # attn1 only: cross-attention (attn2) stays with the stock processor
    "flux": {(GRID, 5, 0, N + 5)},  # joint and single blocks: the 5 text tokens first
    "sd3": {(GRID, 0, 6, N + 6), (GRID, 0, 0, N)},  # joint: context appended; SD3.5 dual attn2: image only
}


def _run(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def _stock_output(name):
    model, inputs = MODELS[name]()
    model.eval()  # DiT's class-label dropout is random in training mode
    return model, inputs, _run(model, inputs)


# ---- the tests -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", MODULE_BACKENDS)
@pytest.mark.parametrize("name", list(MODELS))
def test_full_window_reproduces_the_stock_processor(name, backend):
    model, inputs, stock = _stock_output(name)
    grid = GRIDS[name]
    rec = Recorder(LocalAttnProcessor(grid, window=COVER, backend=backend).attn_fn)
    proc = GridAttnProcessor(rec, grid)
    names = set_processors(model, proc)
    assert names and all(model.get_submodule(n).processor is proc for n in names)
    out = _run(model, inputs)
    assert {c for c in rec.calls} == LAYOUTS[name]
    assert rel_err(out, stock) <= 1e-5


@pytest.mark.parametrize("name", list(MODELS))
def test_real_window_matches_masked_reference(name):
    model, inputs, stock = _stock_output(name)
    opts, grid = dict(window=2), GRIDS[name]
    set_processors(model, LocalAttnProcessor(grid, backend="cpu", **opts))
    got = _run(model, inputs)
    set_processors(model, GridAttnProcessor(MaskedSDPA(**opts), grid))
    want = _run(model, inputs)
    set_processors(model, LocalAttnProcessor(grid, backend="reference", **opts))
    ref_backend = _run(model, inputs)
    assert rel_err(got, stock) > 1e-3
    assert rel_err(got, want) <= 1e-5
    assert rel_err(ref_backend, want) <= 1e-5


@pytest.mark.parametrize("name", ["flux", "sd3"])
def test_set_attn_processor_and_gradients(name):
    """The diffusers entry point itself, and the backward through the whole model."""
    model, inputs, _ = _stock_output(name)
    x = inputs["hidden_states"].clone().requires_grad_(True)
    inputs = dict(inputs, hidden_states=x)
    model.set_attn_processor(LocalAttnProcessor(GRID, window=(1, 2), shape="square", backend="cpu"))
    assert all(isinstance(p, LocalAttnProcessor) for p in model.attn_processors.values())
    out = model(**inputs, return_dict=False)[0]
    (gx,) = torch.autograd.grad(out.square().sum(), [x])
    model.set_attn_processor(GridAttnProcessor(MaskedSDPA(window=(1, 2), shape="square"), GRID))
    want = model(**inputs, return_dict=False)[0]
    (wx,) = torch.autograd.grad(want.square().sum(), [x])
    assert rel_err(out, want) <= 1e-5 and rel_err(gx, wx) <= 1e-5


@pytest.mark.parametrize("name", ["flux", "sd3", "pixart"])
def test_clear_pooled_keys_per_layer(name):
    model, inputs, _ = _stock_output(name)
    names = set_processors(model, lambda n, attn: LocalAttnProcessor(GRID, window=1, pool=2, backend="cpu"))
    procs = [model.get_submodule(n).processor for n in names]
    assert len({id(p) for p in procs}) == len(procs)
    g = _gen(5)
    with torch.no_grad():
        for p in procs:  # distinct learned weights per layer
            p.attn_fn.pool.weight.copy_(torch.rand(2, 2, generator=g))
    keys = [k for k in model.state_dict() if k.endswith("processor.attn_fn.pool.weight")]
    assert len(keys) == len(procs)
    got = _run(model, inputs)
    for n, p in zip(names, procs):
        model.get_submodule(n).set_processor(GridAttnProcessor(MaskedSDPA(window=1, pool_weight=p.attn_fn.pool.weight),
                                                               GRID))
    want = _run(model, inputs)
    assert rel_err(got, want) <= 1e-5


@pytest.mark.parametrize("name", list(MODELS))
def test_block_topk_all_blocks_reproduces_the_stock_processor(name):
    """Block top-k with density 1 (every key block; the grid makes them image tiles) is dense attention."""
    model, inputs, stock = _stock_output(name)
    rec = Recorder(BlockTopKAttnFn(density=1.0, block_size=(16, 16), backend="cpu"))
    set_processors(model, GridAttnProcessor(rec, GRIDS[name]))
    out = _run(model, inputs)
    assert {c for c in rec.calls} == LAYOUTS[name]
    assert rel_err(out, stock) <= 1e-5


@pytest.mark.parametrize("name", ["dit", "pixart", "flux"])
def test_rettention_steppers_per_layer(name):
    """One ReStepper per layer (each caches its own rho and R): the full steps and the refresh reproduce the
    stock processor; the sparse step after them (on a new input) only approximates it."""
    model, inputs, stock = _stock_output(name)
    moved = dict(inputs, hidden_states=inputs["hidden_states"] + torch.randn(
        inputs["hidden_states"].shape, generator=_gen(6)))  # the next step's input
    stock_moved = _run(model, moved)
    names = set_processors(model, lambda n, attn: GridAttnProcessor(
        ReStepper(ReSchedule(2, 2), Band(width=6), backend="cpu"), GRIDS[name]))
    procs = [model.get_submodule(n).processor for n in names]
    for step in range(3):  # full, full, refresh
        assert rel_err(_run(model, inputs), stock) <= 1e-5, step
    assert rel_err(_run(model, moved), stock_moved) > 1e-5
    self_attn = [p for n, p in zip(names, procs) if not n.endswith("attn2")]
    assert self_attn and all(p.attn_fn.step == 4 for p in self_attn)
    assert len({id(p.attn_fn) for p in procs}) == len(procs)


def test_set_grid_and_errors():
    model, inputs, stock = _stock_output("dit")
    set_processors(model, LocalAttnProcessor((3, 8), window=COVER))
    with pytest.raises(ValueError, match="grid: expected num_prefix \\+ prod\\(grid\\) \\+ num_suffix"):
        _run(model, inputs)
    assert set_grid(model, (5, 5)) == 2
    assert rel_err(_run(model, inputs), stock) <= 1e-5
    set_processors(model, LocalAttnProcessor(None, window=COVER))
    with pytest.raises(ValueError, match="grid: the processor needs the image-token grid"):
        _run(model, inputs)
    with pytest.raises(ValueError, match="has no diffusers attention module"):
        set_processors(torch.nn.Linear(2, 2), LocalAttnProcessor(GRID, window=1))
    with pytest.raises(ValueError, match="match: selected none"):
        set_processors(model, LocalAttnProcessor(GRID, window=1), match=lambda n, m: False)
    with pytest.raises(TypeError, match="attn_fn: expected an attention callable"):
        GridAttnProcessor(3, GRID)


def test_processor_restricted_by_match_leaves_cross_attention_stock():
    model, inputs, stock = _stock_output("pixart")
    names = set_processors(model, LocalAttnProcessor(GRID, window=COVER), match=lambda n, m: n.endswith("attn1"))
    assert names == ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
    assert rel_err(_run(model, inputs), stock) <= 1e-5


def test_import_ditkernels_does_not_import_diffusers_or_timm():
    code = "import sys, ditkernels, ditkernels.nn, ditkernels.integrations; print(sorted(m for m in ('diffusers', 'timm') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]" and diffusers.__version__
