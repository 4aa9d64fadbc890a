"""ditkernels.nn.BlockTopKAttention / TopKAttention: timm's Attention layout, outputs, gradients, compile."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import ditkernels
from ditkernels.nn import BlockTopKAttention, BlockTopKAttnFn, GridAttention, TopKAttention, TopKAttnFn
from ditkernels.ops.sparse import block_topk_mask
from ditkernels.reference.attention import attention_ref

from numerics import assert_matches

DIM, HEADS = 64, 4


class TimmAttention(nn.Module):
    """timm.models.vision_transformer.Attention (no qk_norm), written out: the layout to match."""

    def __init__(self, dim, num_heads=8, qkv_bias=False):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = nn.Identity()
        self.k_norm = nn.Identity()
        self.attn_drop = nn.Dropout(0.0)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(0.0)

    def qkv_heads(self, x):
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        return qkv.unbind(0)

    def forward(self, x):
        b, n, c = x.shape
        out = torch.nn.functional.scaled_dot_product_attention(*self.qkv_heads(x))
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


def _x(n, seed=0, dtype=torch.float32):
    return torch.randn(2, n, DIM, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("cls", [BlockTopKAttention, TopKAttention], ids=lambda c: c.__name__)
def test_timm_state_dict_loads_unchanged(cls):
    timm_like = TimmAttention(DIM, HEADS, qkv_bias=True)
    kwargs = {"topk": 2} if cls is BlockTopKAttention else {}
    mod = cls(DIM, HEADS, qkv_bias=True, **kwargs)
    sd = timm_like.state_dict()
    missing, unexpected = mod.load_state_dict(sd, strict=False)
    assert not unexpected
    assert set(missing) <= {"attn_fn.mix_weight"}
    assert mod.qkv.weight.shape == (3 * DIM, DIM) and mod.proj.weight.shape == (DIM, DIM)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_block_sparse_module_matches_reference(backend):
    torch.manual_seed(0)
    mod = BlockTopKAttention(DIM, HEADS, qkv_bias=True, density=0.5, block_size=(32, 32), num_prefix=3,
                               backend=backend)
    x = _x(150).requires_grad_(True)
    y = mod(x)
    tl = TimmAttention(DIM, HEADS, qkv_bias=True)
    tl.load_state_dict(mod.state_dict())
    q, k, v = tl.double().qkv_heads(x.detach().double())
    mask = block_topk_mask(q, k, density=0.5, block_size=(32, 32), num_prefix=3)
    vis = mask.repeat_interleave(32, 2).repeat_interleave(32, 3)[:, :, :150, :150]
    o, _ = attention_ref(q, k, v, tl.scale, vis)
    ref = tl.proj(o.transpose(1, 2).reshape(2, 150, DIM))
    assert_matches("y", y.detach(), ref)
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert mod.qkv.weight.grad is not None


def test_block_sparse_module_with_block_mask():
    mod = BlockTopKAttention(DIM, HEADS, block_size=(16, 16), backend="cpu")
    x = _x(64)
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    dense = ditkernels.nn.BlockTopKAttention(DIM, HEADS, topk=4, block_size=(16, 16), backend="cpu")
    dense.load_state_dict(mod.state_dict())
    torch.testing.assert_close(mod(x, block_mask=mask), dense(x), rtol=1e-5, atol=1e-6)


def _drs_reference(mod, x):
    """DRSformer's mixture written with dense scores: sum_i w_i softmax(top-k_i masked scores) v."""
    b, n, c = x.shape
    qkv = mod.qkv(x).reshape(b, n, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4).double()
    q, k, v = qkv.unbind(0)
    s = q @ k.transpose(-1, -2) * mod.scale
    out = 0
    for w, r in zip(mod.mix_weight, mod.ratios):
        kk = max(1, int(n * r))
        top = torch.topk(s, kk + 1, -1).values  # the documented rule: near-ties (1e-5 * max|s|) are kept
        t_k, t_k1, tol = top[..., kk - 1], top[..., kk], 1e-5 * s.abs().amax(-1)
        keep = s >= torch.where(t_k - t_k1 >= 2 * tol, (t_k + t_k1) / 2, t_k - tol)[..., None]
        out = out + w.double() * (torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ v)
    return mod.proj.double()(out.transpose(1, 2).reshape(b, n, c))


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_topk_module_drsformer_mixture(backend):
    torch.manual_seed(1)
    mod = TopKAttention(DIM, HEADS, qkv_bias=True, backend=backend)
    assert mod.ratios == (1 / 2, 2 / 3, 3 / 4, 4 / 5)
    assert torch.equal(mod.mix_weight.detach(), torch.full((4,), 0.2))
    x = _x(97, seed=2).requires_grad_(True)
    y = mod(x)
    with torch.no_grad():
        ref = _drs_reference(mod, x.detach())
    mod.proj.float()
    assert_matches("y", y.detach(), ref.float())
    y.square().sum().backward()
    assert mod.mix_weight.grad is not None and mod.mix_weight.grad.abs().sum() > 0
    assert torch.isfinite(x.grad).all()


def test_topk_module_single_k_and_errors():
    mod = TopKAttention(DIM, HEADS, topk=5, backend="cpu")
    assert not hasattr(mod, "mix_weight")
    assert mod(_x(40)).shape == (2, 40, DIM)
    with pytest.raises(ValueError, match="num_heads"):
        TopKAttention(DIM, 5)
    with pytest.raises(ValueError, match="attn_drop"):  # accepted for checkpoints, not run in training
        BlockTopKAttention(DIM, HEADS, attn_drop=0.1, topk=1).train()(_x(16))
    with pytest.raises(ValueError, match="topk, ratios"):
        TopKAttention(DIM, HEADS, topk=3, ratios=(0.5,))
    with pytest.raises(ValueError, match="x: expected"):
        mod(torch.randn(2, 10, DIM + 1))


def test_modules_compile_fullgraph():
    x = _x(64)
    for mod in (TopKAttention(DIM, HEADS, backend="cpu"), BlockTopKAttention(DIM, HEADS, topk=2, block_size=(16, 16),
                                                                              backend="cpu")):
        got = torch.compile(mod, fullgraph=True, backend="eager")(x)
        torch.testing.assert_close(got, mod(x))


def test_topk_module_loads_a_top_level_mix_weight():
    """Checkpoints of the first TopKAttention had ``mix_weight`` at the top level; now ``attn_fn.mix_weight``."""
    mod = TopKAttention(DIM, HEADS, backend="cpu")
    sd = {("mix_weight" if k == "attn_fn.mix_weight" else k): v for k, v in mod.state_dict().items()}
    sd["mix_weight"] = torch.tensor([0.1, 0.2, 0.3, 0.4])
    mod.load_state_dict(sd)
    assert torch.equal(mod.attn_fn.mix_weight.detach(), torch.tensor([0.1, 0.2, 0.3, 0.4]))
    assert mod.mix_weight is mod.attn_fn.mix_weight


def _two_layers():
    torch.manual_seed(3)
    return nn.Sequential(TimmAttention(DIM, HEADS, qkv_bias=True), TimmAttention(DIM, HEADS, qkv_bias=True))


@pytest.mark.parametrize("how", ["make_attn_fn", "module_cls"])
def test_swap_attention_sparse_callables(how):
    """All key blocks (density 1) and topk >= tokens are dense attention: a swapped model keeps its output
    and its parameter objects; TopKAttention's mixture weights are created (0.2) on the model's device."""
    model = _two_layers()
    x = _x(7 * 9, seed=4)
    with torch.no_grad():
        dense = model(x)
    params = dict(model.named_parameters())
    if how == "make_attn_fn":
        names = ditkernels.swap_attention(model, grid=(7, 9), make_attn_fn=lambda name, old: BlockTopKAttnFn(
            density=1.0, block_size=(16, 16), backend="cpu"))
        assert type(model[0]) is GridAttention and model[0].attn_fn is not model[1].attn_fn
    else:
        names = ditkernels.swap_attention(model, grid=(7, 9), module_cls=BlockTopKAttention, density=1.0,
                                          block_size=(16, 16), backend="cpu")
        assert isinstance(model[1], BlockTopKAttention) and model[1].grid == (7, 9)
    assert names == ["0", "1"] and dict(model.named_parameters()) == params
    with torch.no_grad():
        torch.testing.assert_close(model(x), dense, rtol=1e-5, atol=1e-6)
    model = _two_layers()
    ditkernels.swap_attention(model, module_cls=TopKAttention, backend="cpu")  # DRSformer's mixture
    w = model[0].mix_weight
    assert not w.is_meta and torch.equal(w.detach(), torch.full((4,), 0.2)) and "0.attn_fn.mix_weight" in \
        model.state_dict()
    if how == "make_attn_fn":
        model = _two_layers()
        ditkernels.swap_attention(model, make_attn_fn=lambda name, old: TopKAttnFn(topk=10 ** 6, backend="cpu"))
        with torch.no_grad():
            torch.testing.assert_close(model(x), dense, rtol=1e-5, atol=1e-6)


def test_block_sparse_attention_is_a_deprecated_alias():
    with pytest.warns(DeprecationWarning, match="BlockTopKAttention"):
        old = ditkernels.nn.BlockSparseAttention(DIM, HEADS, topk=2, block_size=(16, 16), backend="cpu")
    assert isinstance(old, BlockTopKAttention)
    new = BlockTopKAttention(DIM, HEADS, topk=2, block_size=(16, 16), backend="cpu")
    new.load_state_dict(old.state_dict())
    x = _x(40)
    assert torch.equal(old(x), new(x))
