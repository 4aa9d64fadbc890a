"""ditkernels.nn.LocalAttention / GridAttention / KVPool and ditkernels.swap_attention (docs/spec.md §5): timm's
parameter layout (state dicts load unchanged), equality with timm / DiT attention when the window covers
the grid, the float64 masked reference with a real window (forward and every gradient), CLEAR's pooled
keys, swapping a model's attention in place, errors and torch.compile."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import ditkernels
from ditkernels.nn import DenseAttnFn, GridAttention, KVPool, LocalAttention, LocalAttnFn, swap_attention
from ditkernels.reference.attention import attention_ref
from ditkernels.reference.local import LocalSpec, kv_pool_ref, local_visible

from numerics import MODULE_BACKENDS, assert_matches, attention_lowp, rel_err



class DiTAttention(nn.Module):
    """The attention of the DiT reference code: timm 0.x's ``vision_transformer.Attention`` (before q/k
    norms), written out so this file runs without timm (see test_real_timm_* for timm itself)."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, attn_drop: float = 0.0,
                 proj_drop: float = 0.0) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q @ k.transpose(-2, -1)) * self.scale).softmax(dim=-1)
        x = (self.attn_drop(attn) @ v).transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(x))


class DiTBlock(nn.Module):
    """adaLN-free DiT block: enough structure for swap_attention (attention inside a block, an MLP)."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = DiTAttention(dim, heads, qkv_bias=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    """Random parameters everywhere (norm weights too, so a missed norm shows)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * (0.3 if p.dim() > 1 else 0.5) + (
                1.0 if p.dim() == 1 and p.shape[0] < 64 else 0.0))
    return module


def _x(b: int, n: int, dim: int, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, n, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def reference_forward(m: GridAttention, x: torch.Tensor, spec: LocalSpec, lowp: bool = False) -> torch.Tensor:
    """The module's math in plain PyTorch: timm's projections + attention with docs/spec.md §1's visibility mask
    (``lowp``: the attention evaluated in the inputs' low dtype, docs/verify.md §4's "reference in the same dtype")."""
    b, n, _ = x.shape
    fn = m.attn_fn
    qkv = F.linear(x, m.qkv.weight, m.qkv.bias).reshape(b, n, 3, m.num_heads, m.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = m.q_norm(q), m.k_norm(k)
    if isinstance(fn, LocalAttnFn) and fn.pool is not None:
        k = torch.cat([k, kv_pool_ref(k, spec.grid, spec.num_prefix, fn.pool.weight)], 2)
        v = torch.cat([v, kv_pool_ref(v, spec.grid, spec.num_prefix, fn.pool.weight)], 2)
    if lowp:
        out = attention_lowp(q, k, v, m.scale, local_visible(spec))
    else:
        out, _ = attention_ref(q, k, v, m.scale, local_visible(spec))
    out = m.norm(out.transpose(1, 2).reshape(b, n, m.attn_dim))
    if m.gate is not None:
        out = out * m.gate(x).sigmoid()
    return m.proj(out)


# ---- state dicts and equality with dense attention -------------------------------------------------
@pytest.mark.parametrize("backend", MODULE_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("grid,prefix,window,shape", [
    ((7, 13), 0, 14, "circle"),          # a circle of radius 14 covers every offset of a 7x13 grid
    ((5, 9), 1, (4, 8), "square"),       # ViT-style class token as a prefix
    ((97,), 3, 97, "square"),
], ids=["7x13-circle", "5x9-square-P1", "1d-97-P3"])
def test_dit_attention_state_dict_loads_and_full_window_equals_dense(backend, dtype, grid, prefix, window, shape):
    dim, heads = 80, 2  # head_dim 40
    src = _randomize(DiTAttention(dim, heads, qkv_bias=True), seed=1).to(dtype)
    m = LocalAttention(dim, heads, grid=grid, window=window, shape=shape, num_prefix=prefix, qkv_bias=True,
                       backend=backend, dtype=dtype)
    assert list(m.state_dict()) == list(src.state_dict())
    m.load_state_dict(src.state_dict(), strict=True)
    x = _x(2, prefix + math.prod(grid), dim, dtype)
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    assert rel_err(m(x), src(x)) <= tol


@pytest.mark.parametrize("backend", MODULE_BACKENDS)
@pytest.mark.parametrize("opts", [
    dict(grid=(7, 13), window=3, num_prefix=2, num_suffix=1),
    dict(grid=(6, 8), window=2, shape="square", border="shift", qk_norm=True, scale_norm=True, gated=True),
    dict(grid=(8, 12), window=3, pool=2, num_prefix=1),
    dict(grid=(4, 6, 6), window=(1, 2, 2), pool=(2, 3, 3), num_suffix=2),
    dict(grid=(8, 12), window=1, shape="tile", tile=4, attn_head_dim=24, dim_out=48),
], ids=["7x13-circle-r3-P2-S1", "6x8-shift-qknorm-scalenorm-gated", "8x12-pool2-P1", "3d-pool(2,3,3)-S2",
        "8x12-tile4-headdim24-dimout48"])
def test_forward_and_gradients_match_float64_reference(backend, opts):
    o = dict(opts)
    spec_opts = {k: o[k] for k in ("shape", "border", "tile", "num_prefix", "num_suffix") if k in o}
    m = _randomize(LocalAttention(40, 2, qkv_bias=True, backend=backend, dtype=torch.float64, **o), seed=3)
    pool = m.attn_fn.pool
    m_extra = 0 if pool is None else math.prod(pool.coarse_grid(o["grid"]))
    spec = LocalSpec.make(o["grid"], o["window"], num_extra=m_extra, **spec_opts)
    x = _x(2, spec.seq, 40).requires_grad_(True)
    dy = _x(2, spec.seq, m.proj.out_features, seed=9)
    out = m(x)
    leaves = [x] + list(m.parameters())
    grads = torch.autograd.grad(out, leaves, dy)
    want = reference_forward(m, x, spec)
    want_grads = torch.autograd.grad(want, leaves, dy)
    assert rel_err(out, want) <= 1e-12
    names = ["x"] + [n for n, _ in m.named_parameters()]
    floor = 1e-3 * max(w.norm().item() for w in want_grads)  # k_norm.bias's true gradient is 0 (softmax shift)
    for name, g, w in zip(names, grads, want_grads):
        assert (g - w).norm().item() <= 1e-10 * max(w.norm().item(), floor), name
    # fp32 module within the fp32 bar of the same float64 reference
    m32 = m.float()
    assert rel_err(m32(x.detach().float()), want) <= 1e-5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("pool", [None, 2], ids=["plain", "pool2"])
def test_low_precision_within_twice_plain_pytorch(dtype, pool):
    m64 = _randomize(LocalAttention(80, 2, grid=(8, 12), window=3, num_prefix=2, pool=pool, qkv_bias=True,
                                    qk_norm=True, backend="cpu", dtype=torch.float64), seed=12)
    spec = LocalSpec.make((8, 12), 3, num_prefix=2, num_extra=0 if pool is None else 24)
    x64 = _x(2, spec.seq, 80).requires_grad_(True)
    dy = _x(2, spec.seq, 80, seed=13)
    ref64 = reference_forward(m64, x64, spec)
    (gref64,) = torch.autograd.grad(ref64, [x64], dy)
    m = LocalAttention(80, 2, grid=(8, 12), window=3, num_prefix=2, pool=pool, qkv_bias=True, qk_norm=True,
                       backend="cpu", dtype=dtype)
    m.load_state_dict(m64.state_dict())
    x = x64.detach().to(dtype).requires_grad_(True)
    out = m(x)
    (gx,) = torch.autograd.grad(out, [x], dy.to(dtype))
    ref_low = reference_forward(m, x, spec, lowp=True)
    (gref_low,) = torch.autograd.grad(ref_low, [x], dy.to(dtype))
    assert_matches("out", out, ref64, ref_low)
    assert_matches("dx", gx, gref64, gref_low)


def test_real_window_differs_from_dense():
    src = _randomize(DiTAttention(32, 4, qkv_bias=True), seed=2).double()
    m = LocalAttention(32, 4, grid=(7, 13), window=2, qkv_bias=True, dtype=torch.float64)
    m.load_state_dict(src.state_dict())
    x = _x(1, 91, 32)
    assert rel_err(m(x), src(x)) > 1e-2


def test_grid_per_call_equals_grid_at_construction():
    a = _randomize(LocalAttention(32, 4, grid=(6, 7), window=2, num_prefix=1, dtype=torch.float64), seed=4)
    b = LocalAttention(32, 4, window=2, dtype=torch.float64)
    b.load_state_dict(a.state_dict())
    x = _x(2, 43, 32)
    assert torch.equal(a(x), b(x, grid=(6, 7), num_prefix=1))
    assert torch.equal(a(x[:, 1:], num_prefix=0), b(x[:, 1:], grid=[6, 7]))


# ---- CLEAR's pooled keys ---------------------------------------------------------------------------
@pytest.mark.parametrize("grid,factor", [((8, 12), (2, 2)), ((6, 9), (3, 3)), ((4, 6, 6), (2, 3, 2)), ((12,), (4,))],
                         ids=["8x12-f2", "6x9-f3", "3d-f(2,3,2)", "1d-12-f4"])
def test_kv_pool_starts_as_average_pooling_and_follows_its_weights(grid, factor):
    pool = KVPool(factor, dtype=torch.float64)
    assert torch.allclose(pool.weight, torch.full(factor, 1 / math.prod(factor), dtype=torch.float64))
    k = _x(2, 3 + math.prod(grid), 8, seed=5).reshape(2, 1, -1, 8).expand(2, 2, -1, 8)  # 2 heads, 3 prefix tokens
    got = pool.pool(k, grid, 3)
    avg = {1: F.avg_pool1d, 2: F.avg_pool2d, 3: F.avg_pool3d}[len(grid)]
    kg = k[:, :, 3:].reshape(4, *grid, 8).movedim(-1, 1)  # (B*H, D, *grid)
    want = avg(kg, factor).movedim(1, -1).reshape(2, 2, -1, 8)
    assert rel_err(got, want) <= 1e-14
    with torch.no_grad():
        pool.weight.copy_(torch.randn(factor, generator=torch.Generator().manual_seed(6), dtype=torch.float64))
    assert rel_err(pool.pool(k, grid, 3), kv_pool_ref(k, grid, 3, pool.weight)) <= 1e-14


def test_pool_weight_is_learnable_and_global_queries_do_not_see_pooled_keys():
    m = _randomize(LocalAttention(16, 2, grid=(4, 4), window=1, pool=2, num_prefix=2, dtype=torch.float64), seed=7)
    assert "attn_fn.pool.weight" in m.state_dict()
    x = _x(1, 18, 16)
    out = m(x)
    (g,) = torch.autograd.grad(out[:, 2:].sum(), [m.attn_fn.pool.weight])
    assert g.abs().sum() > 0
    (g,) = torch.autograd.grad(m(x)[:, :2].sum(), [m.attn_fn.pool.weight], allow_unused=True)
    assert g is None or g.abs().max() == 0  # the prefix (global) queries never see extra keys


def test_timm_state_dict_loads_into_pooled_module_non_strict():
    src = DiTAttention(32, 4, qkv_bias=True)
    m = LocalAttention(32, 4, grid=(4, 4), window=1, pool=2, qkv_bias=True)
    missing, unexpected = m.load_state_dict(src.state_dict(), strict=False)
    assert missing == ["attn_fn.pool.weight"] and unexpected == []


# ---- swap_attention --------------------------------------------------------------------------------
def _dit(depth: int = 2, dim: int = 48, heads: int = 3, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return _randomize(nn.Sequential(*(DiTBlock(dim, heads) for _ in range(depth))), seed).double()


@pytest.mark.parametrize("backend", MODULE_BACKENDS)
def test_swap_attention_keeps_weights_and_matches(backend):
    model = _dit()
    params = {n: p for n, p in model.named_parameters()}
    x = _x(2, 7 * 13, 48)
    dense = model(x)
    names = ditkernels.swap_attention(model, grid=(7, 13), window=14, backend=backend)
    assert names == ["0.attn", "1.attn"]
    assert all(isinstance(model[i].attn, LocalAttention) for i in range(2))
    # the same Parameter objects (moved, not copied), under the same names
    assert {n: p for n, p in model.named_parameters()} == params
    assert rel_err(model(x), dense) <= 1e-12
    # a real window: every block equals the masked reference
    for blk in model:
        blk.attn.attn_fn.window = 2
    y = model[0].norm1(x)
    spec = LocalSpec.make((7, 13), 2)
    assert rel_err(model[0].attn(y), reference_forward(model[0].attn, y, spec)) <= 1e-12


def test_swap_attention_with_pool_initialises_pool_weights_on_the_model_device_and_dtype():
    model = _dit()
    ditkernels.swap_attention(model, grid=(8, 12), window=2, pool=4)
    w = model[1].attn.attn_fn.pool.weight
    assert w.dtype == torch.float64 and w.device.type == "cpu" and not w.is_meta
    assert torch.equal(w, torch.full((4, 4), 1 / 16, dtype=torch.float64))
    x = _x(1, 96, 48)
    assert rel_err(model[1].attn(x), reference_forward(model[1].attn, x, LocalSpec.make((8, 12), 2, num_extra=6))) \
        <= 1e-12


def test_swap_attention_generic_callables_and_reswap():
    model = _dit()
    x = _x(2, 30, 48)
    dense = model(x)
    names = swap_attention(model, attn_fn=DenseAttnFn(backend="cpu"))
    assert names == ["0.attn", "1.attn"] and type(model[0].attn) is GridAttention
    assert rel_err(model(x), dense) <= 1e-12
    # one callable per layer
    made = []

    def make(name, old):
        made.append(name)
        return LocalAttnFn(window=1, backend="reference")

    assert swap_attention(model, grid=(5, 6), make_attn_fn=make) == ["0.attn", "1.attn"]
    assert made == ["0.attn", "1.attn"] and model[0].attn.attn_fn is not model[1].attn.attn_fn
    assert model[0].attn.grid == (5, 6)
    # and back to LocalAttention: a GridAttention is swappable too, keeping its layout
    params = dict(model.named_parameters())
    swap_attention(model, window=30, shape="square")
    assert isinstance(model[0].attn, LocalAttention) and model[0].attn.grid == (5, 6)
    assert dict(model.named_parameters()) == params
    assert rel_err(model(x), dense) <= 1e-12


def test_swap_attention_match_restricts():
    model = _dit(depth=3)
    assert swap_attention(model, grid=(2, 3), window=1, match=lambda name, _: name.startswith("1.")) == ["1.attn"]
    assert isinstance(model[0].attn, DiTAttention) and isinstance(model[1].attn, LocalAttention)


class RopeAttention(DiTAttention):
    def forward(self, x, rope=None):  # rotary embeddings come in through forward: not swappable
        return super().forward(x)


class ExtraParamAttention(DiTAttention):
    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.lambda_q = nn.Parameter(torch.zeros(4))


def test_swap_attention_errors():
    with pytest.raises(ValueError, match="no timm-style attention module.*seen: .*RopeAttention"):
        swap_attention(nn.Sequential(nn.Linear(4, 4), RopeAttention(8, 2)), grid=(2, 2), window=1)
    with pytest.raises(ValueError, match="no timm-style attention module.*seen: none"):
        swap_attention(nn.Sequential(nn.Linear(4, 4)), grid=(2, 2), window=1)
    with pytest.raises(ValueError, match="lambda_q"):
        LocalAttention.from_module(ExtraParamAttention(8, 2), window=1)
    with pytest.raises(ValueError, match="is itself an attention module"):
        swap_attention(DiTAttention(8, 2), window=1)
    with pytest.raises(ValueError, match="attn_fn / make_attn_fn"):
        swap_attention(_dit(), attn_fn=DenseAttnFn(), make_attn_fn=lambda n, m: DenseAttnFn())
    with pytest.raises(TypeError, match="module_cls"):
        swap_attention(_dit(), module_cls=nn.Linear)


# ---- errors ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("make,call,exc,words", [
    (dict(dim=30, num_heads=4, window=1), None, ValueError, "num_heads: expected a divisor of dim = 30"),
    (dict(dim=32, num_heads=4, window=1, grid=(4, 0)), None, ValueError, "grid: expected a tuple"),
    (dict(dim=32, num_heads=4, window=None), None, ValueError, "window: expected the window radius"),
    (dict(dim=32, num_heads=4, window=1, shape="disc"), None, ValueError, "shape: expected one of"),
    (dict(dim=32, num_heads=4, window=1, pool=0), None, ValueError, "pool: expected a positive int"),
    (dict(dim=32, num_heads=4, window=1), dict(n=20), ValueError, "grid: local attention needs the token grid"),
    (dict(dim=32, num_heads=4, window=1, grid=(4, 5)), dict(n=21), ValueError,
     "x: expected num_prefix \\+ prod\\(grid\\) \\+ num_suffix = 0 \\+ 20 \\+ 0 = 20 tokens"),
    (dict(dim=32, num_heads=4, window=1, grid=(4, 5)), dict(n=20, dim=16), ValueError, "x: expected a \\(batch, tokens, 32\\)"),
    (dict(dim=32, num_heads=4, window=1, grid=(5, 5), pool=2), dict(n=25), ValueError, "multiple of the pooling factor"),
    (dict(dim=32, num_heads=4, window=1, grid=(4, 5)), dict(n=20, mask=True), ValueError, "attn_mask / is_causal"),
    (dict(dim=32, num_heads=4, window=1, grid=(4, 5), attn_drop=0.1), dict(n=20, train=True), ValueError,
     "attn_drop: attention dropout is not supported"),
], ids=["heads", "grid", "window", "shape", "pool", "no-grid", "tokens", "dim", "pool-divisible", "mask", "attn-drop"])
def test_errors_name_the_argument(make, call, exc, words):
    with pytest.raises(exc, match=words):
        m = LocalAttention(**make)
        c = call or {}
        m.train(c.get("train", False))
        x = torch.randn(1, c.get("n", 20), c.get("dim", 32))
        m(x, attn_mask=torch.ones(1) if c.get("mask") else None)


def test_attn_drop_is_accepted_in_eval_mode():
    m = LocalAttention(32, 4, grid=(4, 5), window=1, attn_drop=0.1).eval()
    assert m(torch.randn(1, 20, 32)).shape == (1, 20, 32)


# ---- torch.compile -----------------------------------------------------------------------------------
@pytest.mark.slow  # traces a whole module's forward and backward through AOTAutograd
@pytest.mark.parametrize("pool", [None, 2], ids=["plain", "pool2"])
def test_compile_fullgraph_forward_and_backward(pool):
    torch.manual_seed(0)
    m = LocalAttention(32, 2, grid=(6, 8), window=2, num_prefix=1, pool=pool, qkv_bias=True, qk_norm=True,
                       backend="cpu")
    x = torch.randn(2, 49, 32, requires_grad=True)
    dy = torch.randn(2, 49, 32)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    leaves = [x] + list(m.parameters())
    grads = torch.autograd.grad(out, leaves, dy)
    want = m(x)
    want_grads = torch.autograd.grad(want, leaves, dy)
    assert rel_err(out, want) <= 1e-6
    for a, b in zip(grads, want_grads):
        assert rel_err(a, b) <= 1e-6


# ---- timm itself ---------------------------------------------------------------------------------------
def _timm():
    # timm needs torchvision; no CPU torchvision build is on the package index this project's CI uses, so
    # these run where timm imports (the DiTAttention tests above cover the same layout without it)
    return pytest.importorskip("timm", reason="timm (with a torchvision matching torch) is not installed")


@pytest.mark.parametrize("backend", MODULE_BACKENDS)
@pytest.mark.parametrize("kw", [dict(qkv_bias=True), dict(qk_norm=True, scale_norm=True, norm_layer=nn.LayerNorm)],
                         ids=["dit", "qknorm-scalenorm"])
def test_real_timm_attention_state_dict_and_outputs(backend, kw):
    _timm()
    from timm.models.vision_transformer import Attention

    src = _randomize(Attention(80, 2, **kw), seed=11).double().eval()
    m = LocalAttention(80, 2, grid=(7, 13), window=14, backend=backend, dtype=torch.float64,
                       **{k: v for k, v in kw.items()})
    m.load_state_dict(src.state_dict(), strict=True)
    x = _x(2, 91, 80)
    assert rel_err(m(x), src(x)) <= 1e-12
    swapped = LocalAttention.from_module(src, grid=(7, 13), window=3, backend=backend)
    spec = LocalSpec.make((7, 13), 3)
    assert rel_err(swapped(x), reference_forward(swapped, x, spec)) <= 1e-12


def test_real_timm_vit_swap():
    timm = _timm()
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=28, patch_size=4, embed_dim=48, depth=2, num_heads=3, num_classes=5,
                            qkv_bias=True).double().eval()
    img = torch.randn(2, 3, 28, 28, dtype=torch.float64)
    dense = vit(img)
    names = swap_attention(vit, grid=(7, 7), window=7, shape="square", num_prefix=vit.num_prefix_tokens)
    assert names == ["blocks.0.attn", "blocks.1.attn"] and timm is not None
    assert rel_err(vit(img), dense) <= 1e-12
