"""Block-sparse and block top-k attention (docs/spec.md §2) on every backend, FlexAttention parity, errors, compile."""

from __future__ import annotations

import math

import pytest
import torch

import ditkernels
from ditkernels.ops.sparse import block_sparse_schedule, block_topk_mask, grid_permutation
from ditkernels.reference.attention import attention_ref
from ditkernels.reference.sparse import block_sparse_visible, block_topk_mask_ref
from ditkernels.schedule import BlockSchedule, TiledSchedule

from numerics import assert_matches, attention_lowp, make_qkv

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SEQS = (97, 200, 257)
BLOCKS = (16, 32, 64, 128)


def _random_block_mask(b, h, nq, nk, density=0.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(b, h, nq, nk, generator=g) < density
    m[..., 0, :] = False  # one query block sees no key: zeros, lse = -inf
    if nq > 1:
        m[..., 1, -1] = True  # the ragged last key block
    return m


def _grads(fn, q, k, v, do):
    qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(qq, kk, vv)
    dq, dk, dv = torch.autograd.grad(out, (qq, kk, vv), do.to(out.dtype))
    return out.detach(), dq, dk, dv


def _check(fn, q, k, v, visible, scale, do):
    """fn's output and gradients against the float64 reference (docs/verify.md §4)."""
    ref64 = _grads(lambda a, b_, c: attention_ref(a, b_, c, scale, visible)[0], q.double(), k.double(), v.double(),
                   do.double())
    ref_low = _grads(lambda a, b_, c: attention_lowp(a, b_, c, scale, visible), q, k, v, do) \
        if q.dtype in (torch.float16, torch.bfloat16) else (None,) * 4
    got = _grads(fn, q, k, v, do)
    for name, x, r64, rl in zip(("out", "dq", "dk", "dv"), got, ref64, ref_low):
        assert x.dtype == q.dtype
        assert_matches(name, x, r64, rl)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: f"blk{b}")
@pytest.mark.parametrize("seq", SEQS, ids=lambda s: f"S{s}")
def test_block_sparse_matches_float64(backend, seq, block, dtype):
    b, h, d = 1, 2, 40
    q, k, v = make_qkv(b, h, seq, seq, d, dtype, strided=True, seed=seq + block)
    nq = nk = -(-seq // block)
    mask = _random_block_mask(b, h, nq, nk, seed=block)
    scale = d ** -0.5
    do = torch.randn(b, h, seq, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    vis = block_sparse_visible(mask, (block, block), seq, seq)
    _check(lambda a, b_, c: ditkernels.block_sparse_attention(a, b_, c, mask, block_size=(block, block),
                                                              backend=backend), q, k, v, vis, scale, do)


@pytest.mark.parametrize("blocks", [(32, 16), (16, 64), (48, 80)], ids=lambda bs: "bq{}-bk{}".format(*bs))
def test_block_sparse_rectangular_and_non_pow2_blocks(backend, blocks):
    # Cross-attention (seq_q != seq_k), unequal blocks, and multiples of 16 that triton re-tiles.
    bq, bk = blocks
    b, h, sq, sk, d = 2, 1, 200, 257, 16
    q, k, v = make_qkv(b, h, sq, sk, d, torch.float32, seed=5)
    mask = _random_block_mask(1, h, -(-sq // bq), -(-sk // bk), density=0.5, seed=3)  # shared by the batch
    do = torch.randn(b, h, sq, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64).float()
    vis = block_sparse_visible(mask, (bq, bk), sq, sk)
    _check(lambda a, b_, c: ditkernels.block_sparse_attention(a, b_, c, mask, block_size=blocks, backend=backend),
           q, k, v, vis, d ** -0.5, do)


@pytest.mark.parametrize("blocks", [(16, 16), (64, 128), (100, 7)], ids=lambda bs: "bq{}-bk{}".format(*bs))
def test_block_sparse_any_block_size_cpu(blocks):
    bq, bk = blocks
    q, k, v = make_qkv(1, 2, 257, 200, 24, torch.float32, seed=11)
    mask = _random_block_mask(1, 2, -(-257 // bq), -(-200 // bk), seed=4)
    do = torch.randn(1, 2, 257, 24, generator=torch.Generator().manual_seed(3), dtype=torch.float64).float()
    _check(lambda a, b_, c: ditkernels.block_sparse_attention(a, b_, c, mask, block_size=blocks, backend="cpu"),
           q, k, v, block_sparse_visible(mask, (bq, bk), 257, 200), 24 ** -0.5, do)


@pytest.mark.slow  # thousands of op calls (the numerical Jacobian)
@pytest.mark.parametrize("backend_name", ["reference", "cpu"])
def test_block_sparse_gradcheck_float64(backend_name):
    q, k, v = make_qkv(1, 2, 37, 29, 8, torch.float64, seed=9)
    mask = _random_block_mask(1, 2, 3, 2, density=0.6, seed=1)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    assert torch.autograd.gradcheck(
        lambda a, b_, c: ditkernels.block_sparse_attention(a, b_, c, mask, block_size=(16, 16), backend=backend_name),
        (q, k, v))


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("seq,block", [(256, 64), (200, 32), (257, 128)], ids=lambda x: str(x))
def test_block_sparse_equals_flex_attention(seq, block):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    b, h, d = 1, 2, 32
    q, k, v = make_qkv(b, h, seq, seq, d, torch.float32, seed=seq)
    nb = -(-seq // block)
    mask = _random_block_mask(b, h, nb, nb, density=0.5, seed=seq)
    mask[..., 0, 0] = True  # flex gives NaN-free zeros too, but keep every row non-empty for a clean compare

    def mask_mod(bi, hi, qi, ki):
        return mask[bi, hi, qi // block, ki // block]

    bm = create_block_mask(mask_mod, b, h, seq, seq, device="cpu", BLOCK_SIZE=(block, block))
    ref = flex_attention(q, k, v, block_mask=bm)
    out = ditkernels.block_sparse_attention(q, k, v, mask, block_size=(block, block), backend="cpu")
    assert_matches("out vs flex", out, ref.to(out.dtype), fp32_tol=2e-6)


def test_schedule_from_block_mask_vectorised_matches_loop():
    g = torch.Generator().manual_seed(0)
    tm = torch.rand(6, 9, 11, generator=g) < 0.3
    pm = torch.rand(6, 9, 11, generator=g) < 0.5
    s = BlockSchedule.from_tile_mask(tm, 16, 16, 9 * 16 - 3, 11 * 16 - 5, pm)
    vis, par = s.tile_mask()
    assert torch.equal(vis, tm) and torch.equal(par, tm & pm)
    for h in range(6):  # CSR per head, sorted
        n = int(s.kv_ptr[h, -1])
        cols = [int(c) for m in range(9) for c in tm[h, m].nonzero().flatten()]
        assert s.kv_idx[h, :n].tolist() == cols
    t = s.transposed()
    assert torch.equal(t.tile_mask()[0], tm.transpose(1, 2))


def test_block_sparse_schedule_retiles_for_triton():
    mask = _random_block_mask(1, 1, 5, 4, seed=2)
    s = block_sparse_schedule(mask, (48, 96), 230, 380, "triton")
    assert (s.block_m, s.block_n) == (16, 32)
    vis = s.element_mask()[0]
    assert torch.equal(vis, block_sparse_visible(mask, (48, 96), 230, 380)[0, 0])


# ---- block top-k ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", [(97, 16, 3, 0, 0), (200, 32, 2, 5, 0), (257, 64, 1, 0, 9), (200, 16, 4, 20, 3)],
                         ids=lambda c: "S{}-blk{}-k{}-pre{}-suf{}".format(*c))
def test_block_topk_selection_matches_loop(case):
    seq, blk, topk, pre, suf = case
    q, k, _ = make_qkv(2, 2, seq, seq, 16, torch.float32, seed=seq)
    got = block_topk_mask(q, k, topk=topk, block_size=(blk, blk), num_prefix=pre, num_suffix=suf)
    want = block_topk_mask_ref(q, k, topk, (blk, blk), pre, suf, 16 ** -0.5)
    assert torch.equal(got, want)


def test_block_topk_density_counts():
    q, k, _ = make_qkv(1, 2, 1024, 1024, 16, torch.float32, seed=1)
    m = block_topk_mask(q, k, density=0.1, block_size=(64, 64))
    assert m.shape == (1, 2, 16, 16)
    assert (m.sum(-1) == math.ceil(0.1 * 16)).all()
    assert m.diagonal(dim1=-2, dim2=-1).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_block_topk_attention_matches_float64(backend, dtype):
    b, h, seq, d, blk = 1, 2, 200, 40, 32
    q, k, v = make_qkv(b, h, seq, seq, d, dtype, seed=4)
    mask = block_topk_mask(q, k, topk=2, block_size=(blk, blk), num_prefix=3)
    out, lse, got_mask = ditkernels.block_topk_attention(q, k, v, topk=2, block_size=(blk, blk), num_prefix=3,
                                                         return_lse=True, return_mask=True, backend=backend)
    assert torch.equal(got_mask, mask) and lse.shape == (b, h, seq)
    do = torch.randn(b, h, seq, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    _check(lambda a, b_, c: ditkernels.block_topk_attention(a, b_, c, topk=2, block_size=(blk, blk), num_prefix=3,
                                                            backend=backend),
           q, k, v, block_sparse_visible(mask, (blk, blk), seq, seq), d ** -0.5, do)


def test_block_topk_default_backend_dispatch():
    q, k, v = make_qkv(1, 2, 200, 200, 16, torch.float32, seed=6)
    out = ditkernels.block_topk_attention(q, k, v, topk=2, block_size=(32, 32), num_prefix=3)
    want = ditkernels.block_topk_attention(q, k, v, topk=2, block_size=(32, 32), num_prefix=3, backend="cpu")
    assert torch.equal(out, want)
    sched = ditkernels.block_topk_schedule(q, k, topk=2, block_size=(32, 32), num_prefix=3)
    mask = block_topk_mask(q, k, topk=2, block_size=(32, 32), num_prefix=3)
    assert torch.equal(sched.tile_mask()[0], mask.reshape(2, 7, 7))


@pytest.mark.parametrize("grid,block,pre,suf", [((7, 13), 16, 2, 1), ((12, 16), 64, 0, 0), ((3, 5, 6), 32, 4, 0)],
                         ids=lambda x: str(x))
def test_grid_permutation_boxes(grid, block, pre, suf):
    seq = pre + math.prod(grid) + suf
    perm = grid_permutation(seq, grid, block, pre, suf)
    assert torch.equal(torch.sort(perm).values, torch.arange(seq))
    assert torch.equal(perm[:pre], torch.arange(pre)) and torch.equal(perm[seq - suf:], torch.arange(seq - suf, seq))
    # the first block of grid tokens is one box: its coordinates span a box, not a row segment
    first = perm[pre:pre + block] - pre
    coords = torch.stack(torch.unravel_index(first, grid), -1)
    span = coords.max(0).values - coords.min(0).values + 1
    assert math.prod(span.tolist()) == block and len(grid) > 1 and span[-1] < block


def test_block_topk_grid_attention(backend):
    grid, pre, blk = (7, 13), 3, 16
    seq = pre + 91
    b, h, d = 1, 2, 16
    q, k, v = make_qkv(b, h, seq, seq, d, torch.float32, seed=8)
    out, mask = ditkernels.block_topk_attention(q, k, v, topk=2, block_size=(blk, blk), num_prefix=pre, grid=grid,
                                                return_mask=True, backend=backend)
    perm = grid_permutation(seq, grid, blk, pre, 0)
    vis_perm = block_sparse_visible(mask, (blk, blk), seq, seq)
    inv = torch.argsort(perm)
    vis = vis_perm[:, :, inv][:, :, :, inv]  # back to the original token order
    ref, _ = attention_ref(q.double(), k.double(), v.double(), d ** -0.5, vis)
    assert_matches("out", out, ref)
    sched = ditkernels.block_topk_schedule(q, k, topk=2, block_size=(blk, blk), num_prefix=pre, grid=grid)
    assert isinstance(sched, TiledSchedule) and sched.num_heads_sched == b * h
    assert torch.equal(sched.element_mask().reshape(b, h, seq, seq), vis)


def test_block_topk_schedule_public_api():
    q, k, _ = make_qkv(2, 3, 300, 300, 16, torch.float32, seed=2)
    s = ditkernels.block_topk_schedule(q, k, density=0.25, block_size=(64, 64), num_prefix=10)
    assert isinstance(s, BlockSchedule) and s.num_heads_sched == 6 and (s.block_m, s.block_n) == (64, 64)
    mask = block_topk_mask(q, k, density=0.25, block_size=(64, 64), num_prefix=10)
    assert torch.equal(s.tile_mask()[0], mask.reshape(6, 5, 5))
    assert int(s.partial.sum()) == 0


# ---- the fused triton selection (triton_kernels/block_select.py) -----------------------------------------
def _triton_select(q, k, topk, bq, bk, pre=0, suf=0):
    sched = ditkernels.block_topk_schedule(q, k, topk=topk, block_size=(bq, bk), num_prefix=pre, num_suffix=suf,
                                           backend="triton")
    return sched.tile_mask()[0].reshape(q.shape[0], q.shape[1], -(-q.shape[2] // bq), -(-k.shape[2] // bk))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", [(97, 97, 16, 16, 3, 0, 0), (200, 257, 32, 64, 2, 5, 0), (257, 200, 128, 16, 4, 0, 9),
                                  (200, 200, 48, 80, 2, 20, 3), (97, 300, 16, 32, 50, 0, 0)],
                         ids=lambda c: "Sq{}-Sk{}-bq{}-bk{}-k{}-pre{}-suf{}".format(*c))
def test_triton_selection_matches_torch(case, dtype):
    sq, sk, bq, bk, topk, pre, suf = case
    q, k, _ = make_qkv(2, 2, sq, sk, 40, dtype, strided=True, seed=sq + sk)
    want = block_topk_mask(q, k, topk=topk, block_size=(bq, bk), num_prefix=pre, num_suffix=suf)
    assert torch.equal(_triton_select(q, k, topk, bq, bk, pre, suf), want)
    assert torch.equal(want, block_topk_mask_ref(q, k, min(topk, want.shape[-1]), (bq, bk), pre, suf, 40 ** -0.5))


def test_triton_selection_ties_take_the_lowest_block():
    # equal key blocks (and -0.0 / +0.0 scores from zero queries): every path keeps the lowest indices
    q, k, _ = make_qkv(1, 2, 128, 256, 16, torch.float32, seed=5)
    k = k[:, :, :16].repeat(1, 1, 16, 1)  # 16 identical key blocks of 16 keys
    q[:, 1] = 0.0
    k[:, 1, :16] *= -1
    want = torch.zeros(1, 2, 8, 16, dtype=torch.bool)
    for m in range(8):  # diagonal block m plus the lowest others up to 3 blocks
        want[:, :, m, m] = True
        want[:, :, m, [n for n in range(16) if n != m][:2]] = True
    got_torch = block_topk_mask(q, k, topk=3, block_size=(16, 16))
    assert torch.equal(got_torch, want)
    assert torch.equal(_triton_select(q, k, 3, 16, 16), want)


@pytest.mark.slow  # interpreted selection over rows of 2100 key blocks
@pytest.mark.parametrize("sk,bk", [(600, 1), (2100, 1)], ids=["nk600", "nk2100"])
def test_triton_selection_long_rows_are_a_top_k(sk, bk):
    # rows of 1024 / 4096 padded key blocks (8 warps, head-dim chunks of 16 / 4): a valid top-k in float64
    q, k, _ = make_qkv(1, 1, 256, sk, 24, torch.float32, seed=sk)
    topk, bq, pre = 101, 64, 5
    got = _triton_select(q, k, topk, bq, bk, pre)[0, 0]
    qm = q[0, 0].double().reshape(4, bq, 24).mean(1)
    s = qm @ k[0, 0].double().T * 24 ** -0.5
    for m in range(4):
        forced = torch.zeros(sk, dtype=torch.bool)
        forced[:pre] = True
        forced[m * bq:(m + 1) * bq] = True
        assert got[m][forced].all() and int(got[m].sum()) == max(topk, int(forced.sum()))
        chosen, other = s[m][got[m] & ~forced], s[m][~got[m]]
        assert chosen.min() >= other.max() - 1e-5 * s[m].abs().max()


def test_triton_selection_falls_back_to_torch_past_its_row_limit(monkeypatch):
    from ditkernels.triton_kernels import block_select

    q, k, _ = make_qkv(1, 2, 200, 200, 16, torch.float32, seed=9)
    want = block_topk_mask(q, k, topk=3, block_size=(16, 16), num_prefix=4)
    monkeypatch.setattr(block_select, "MAX_KEY_BLOCKS", 8)
    with pytest.raises(ValueError, match="at most 8 key blocks, got 13"):
        block_select.block_topk_mask(q, k, 3, 16, 16, 4, 0, 0.25)
    assert torch.equal(_triton_select(q, k, 3, 16, 16, 4), want)


# ---- errors, compile ---------------------------------------------------------------------------------
def test_errors_name_the_argument():
    q, k, v = make_qkv(1, 2, 100, 100, 16, torch.float32)
    good = torch.ones(1, 2, 2, 2, dtype=torch.bool)
    with pytest.raises(ValueError, match="block_mask: expected shape"):
        ditkernels.block_sparse_attention(q, k, v, torch.ones(1, 2, 3, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="block_mask: expected dtype torch.bool"):
        ditkernels.block_sparse_attention(q, k, v, good.int())
    with pytest.raises(ValueError, match="block_size"):
        ditkernels.block_sparse_attention(q, k, v, good, block_size=(0, 64))
    with pytest.raises(ValueError, match="block_size\\[0\\]: the triton backend"):
        ditkernels.block_sparse_attention(q, k, v, torch.ones(1, 2, 5, 5, dtype=torch.bool), block_size=(24, 24),
                                          backend="triton")
    with pytest.raises(ValueError, match="topk, density: expected exactly one"):
        ditkernels.block_topk_attention(q, k, v, topk=2, density=0.5)
    with pytest.raises(ValueError, match="density: expected a float in"):
        ditkernels.block_topk_attention(q, k, v, density=1.5)
    with pytest.raises(ValueError, match="grid: expected num_prefix"):
        ditkernels.block_topk_attention(q, k, v, topk=1, grid=(9, 9))


def test_torch_compile_fullgraph():
    q, k, v = make_qkv(1, 2, 128, 128, 16, torch.float32, seed=3)
    mask = _random_block_mask(1, 2, 4, 4, seed=0)

    def f(q, k, v):
        a = ditkernels.block_sparse_attention(q, k, v, mask, block_size=(32, 32), backend="cpu")
        b = ditkernels.block_topk_attention(q, k, v, topk=2, block_size=(32, 32), backend="cpu")
        c = ditkernels.block_topk_attention(q, k, v, topk=2, block_size=(16, 16), num_prefix=2, grid=(9, 14),
                                            backend="cpu")
        return a + b + c

    got = torch.compile(f, fullgraph=True, backend="eager")(q, k, v)
    torch.testing.assert_close(got, f(q, k, v))
