"""ditkernels.distributed (docs/spec.md §7): shard/gather, Ulysses over every attention op, ring attention,
merge_attention, the same-on-every-rank validation and the byte formulas, on P = 1, 2, 3, 4 gloo ranks
(tests/distributed_helpers.py: one spawn per world size, every case looped inside the ranks).

Exactness rule: each rank's shard of the output and of every gradient equals the single-process op on the
full sequence (float64: err <= 1e-12; float32: err <= 1e-5 against the float64 single-process op), with
unequal bands, batch 2 and prefix + suffix text. Replicated text tokens: the upstream gradient of the text
output is split over the ranks with weights summing to 1 (it enters the loss once), and the ranks' text
input gradients summed (all_reduce) equal the single-process ones.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

import ditkernels
from ditkernels.distributed import gather, merge_attention, ring_attention, shard, ulysses_attention
from ditkernels.distributed import _comm
from ditkernels.distributed.ring import ring_bytes
from ditkernels.distributed.ulysses import ulysses_bytes

from distributed_helpers import raises_everywhere, rank_fixture
from numerics import attention_lowp, rel_err

B, H, D = 2, 12, 12          # 12 heads: divisible by 1, 2, 3 and 4 ranks
GRID = (7, 6)                # 7 rows: the even split is unequal for P = 2, 3, 4
PRE, SUF = 3, 2
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


def _rank():
    return dist.get_rank(), dist.get_world_size()


def _uneven_bands(rows: int, p: int) -> tuple[int, ...]:
    """A deliberately lopsided split: rank 0 one row, the last rank the rest."""
    if p == 1:
        return (rows,)
    return (1,) * (p - 1) + (rows - (p - 1),)


def _full_inputs(seq: int, *, seed: int, h: int = H, d: int = D, b: int = B):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, seq, d, generator=g, dtype=torch.float64) for _ in range(4)]  # q, k, v, upstream


def _text_weight(rank: int, p: int) -> float:
    """Weights summing to 1 over the ranks: the text output enters the loss once."""
    return (rank + 1) / (p * (p + 1) / 2)


def _compare(name, got, want, tol):
    err = rel_err(got, want)
    assert not torch.isnan(got).any(), f"{name}: NaN"
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


def _check_parallel(parallel, single, *, grid=GRID, bands=None, pre=PRE, suf=SUF, dtype=torch.float64,
                    seed=0, backward=True, h=H, group=None):
    """Run ``parallel(q, k, v)`` on this rank's shards and ``single(q, k, v)`` on the full sequence (float64),
    compare the output shard and every gradient."""
    rank, p = dist.get_rank(group), dist.get_world_size(group)
    lay = dict(bands=bands, num_prefix=pre, num_suffix=suf, group=group)
    seq = pre + math.prod(grid) + suf
    q, k, v, g = _full_inputs(seq, seed=seed, h=h)
    full = [t.clone().requires_grad_(backward) for t in (q, k, v)]
    ref = single(*full)
    if backward:
        ref.backward(g)
    loc = [shard(t, grid, **lay).to(dtype).requires_grad_(backward) for t in (q, k, v)]
    out = parallel(*loc)
    tol = TOL[dtype]
    _compare("out", out, shard(ref.detach(), grid, **lay), tol)
    if not backward:
        return
    gl = shard(g, grid, **lay).clone()
    w = _text_weight(rank, p)
    gl[:, :, :pre] *= w
    gl[:, :, gl.shape[2] - suf:] *= w
    out.backward(gl.to(dtype))
    for name, x, x_ref in zip("qkv", loc, full):
        mine = shard(x_ref.grad, grid, **lay)
        n = mine.shape[2] - pre - suf
        _compare(f"d{name} (grid tokens)", x.grad[:, :, pre:pre + n], mine[:, :, pre:pre + n], tol)
        text = torch.cat([x.grad[:, :, :pre], x.grad[:, :, pre + n:]], 2).double()
        dist.all_reduce(text, group=group)
        want = torch.cat([x_ref.grad[:, :, :pre], x_ref.grad[:, :, x_ref.shape[2] - suf:]], 2)
        if text.numel():
            _compare(f"d{name} (text, summed over ranks)", text, want, tol)


# ---- cases (run inside every rank) ---------------------------------------------------------------------------
def case_shard_gather_roundtrip():
    rank, p = _rank()
    for grid, bands, pre, suf in ((GRID, None, PRE, SUF), (GRID, _uneven_bands(7, p), 0, 4), ((3, 4, 5), None, 2, 0),
                                  ((97,), None, 0, 0)):
        if grid[0] < p:
            continue
        x = torch.randn(B, 3, pre + math.prod(grid) + suf, 5, generator=torch.Generator().manual_seed(1))
        part = shard(x, grid, bands=bands, num_prefix=pre, num_suffix=suf)
        assert torch.equal(gather(part, grid, bands=bands, num_prefix=pre, num_suffix=suf), x)
        # (batch, seq, channels) layout and autograd: the gradient of a rank's part is the full gradient there
        y = x[:, 0].clone().requires_grad_()
        part = shard(y, grid, bands=bands, num_prefix=pre, num_suffix=suf)
        full = gather(part, grid, bands=bands, num_prefix=pre, num_suffix=suf)
        gy = torch.randn_like(full)
        full.backward(gy)
        assert torch.equal(shard(y.grad, grid, bands=bands, num_prefix=pre, num_suffix=suf),
                           shard(gy, grid, bands=bands, num_prefix=pre, num_suffix=suf))


def case_ulysses_roundtrip_bitexact():
    """The two all-to-alls alone (an op that returns v) give back every rank's v bit for bit, in every dtype."""
    rank, p = _rank()
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        for bands in (None, _uneven_bands(7, p)):
            _, _, v, _ = _full_inputs(PRE + 42 + SUF, seed=3)
            loc = shard(v, GRID, bands=bands, num_prefix=PRE, num_suffix=SUF).to(dtype)
            out = ulysses_attention(loc, loc * 2, loc, op=lambda q, k, v: v, grid=GRID, bands=bands,
                                    num_prefix=PRE, num_suffix=SUF)
            assert out.dtype == dtype and torch.equal(out, loc)


def _check_dense(parallel_attention):
    """``parallel_attention`` (Ulysses or ring) on GRID with text, even and uneven bands, float64 and float32."""
    rank, p = _rank()
    for dtype in (torch.float64, torch.float32):
        for bands in (None, _uneven_bands(7, p)):
            _check_parallel(lambda q, k, v: parallel_attention(q, k, v, grid=GRID, bands=bands, num_prefix=PRE,
                                                               num_suffix=SUF),
                            lambda q, k, v: ditkernels.attention(q, k, v), bands=bands, dtype=dtype)


def case_ulysses_dense():
    _check_dense(ulysses_attention)


def case_ulysses_lse():
    """An op that returns (out, lse): the lse comes back to each rank's tokens too."""
    q, k, v, _ = _full_inputs(PRE + 42 + SUF, seed=9)
    out_ref, lse_ref = ditkernels.attention(q, k, v, return_lse=True)
    loc = [shard(t, GRID, num_prefix=PRE, num_suffix=SUF) for t in (q, k, v)]
    out, lse = ulysses_attention(*loc, grid=GRID, num_prefix=PRE, num_suffix=SUF, return_lse=True)
    _compare("out", out, shard(out_ref, GRID, num_prefix=PRE, num_suffix=SUF), 1e-12)
    _compare("lse", lse, shard(lse_ref[..., None], GRID, num_prefix=PRE, num_suffix=SUF)[..., 0], 1e-7)


def case_ulysses_plain_sequence():
    """grid=None: each rank's tokens are whatever it holds (97 tokens, unequal shards), no text."""
    rank, p = _rank()
    _check_parallel(lambda q, k, v: ulysses_attention(q, k, v),
                    lambda q, k, v: ditkernels.attention(q, k, v), grid=(97,), pre=0, suf=0, dtype=torch.float32)


def case_ulysses_local():
    rank, p = _rank()
    for kw in (dict(window=3), dict(window=2, shape="square", border="shift")):
        _check_parallel(lambda q, k, v: ulysses_attention(q, k, v, op=ditkernels.local_attention, grid=GRID,
                                                          num_prefix=PRE, num_suffix=SUF, **kw),
                        lambda q, k, v: ditkernels.local_attention(q, k, v, GRID, num_prefix=PRE, num_suffix=SUF, **kw),
                        dtype=torch.float64)


def case_ulysses_block_sparse():
    rank, p = _rank()
    seq = PRE + 42 + SUF
    nb = -(-seq // 8)
    mask = torch.rand(1, 1, nb, nb, generator=torch.Generator().manual_seed(5)) < 0.5
    mask |= torch.eye(nb, dtype=torch.bool)  # every query block sees a key
    _check_parallel(lambda q, k, v: ulysses_attention(q, k, v, op=ditkernels.block_sparse_attention, grid=GRID,
                                                      num_prefix=PRE, num_suffix=SUF, block_mask=mask, block_size=(8, 8)),
                    lambda q, k, v: ditkernels.block_sparse_attention(q, k, v, mask, block_size=(8, 8)),
                    dtype=torch.float64)


def case_ulysses_block_topk():
    """With the grid (2-D tile blocks) and as a plain sequence (no grid: the op gets only the text counts)."""
    kw = dict(density=0.4, block_size=(8, 8), num_prefix=PRE, num_suffix=SUF)
    _check_parallel(lambda q, k, v: ulysses_attention(q, k, v, op=ditkernels.block_topk_attention, grid=GRID, **kw),
                    lambda q, k, v: ditkernels.block_topk_attention(q, k, v, grid=GRID, **kw), dtype=torch.float64)
    _check_parallel(lambda q, k, v: ulysses_attention(q, k, v, op=ditkernels.block_topk_attention, **kw),
                    lambda q, k, v: ditkernels.block_topk_attention(q, k, v, **kw), dtype=torch.float64)


def case_ulysses_topk():
    _check_parallel(lambda q, k, v: ulysses_attention(q, k, v, op=ditkernels.topk_attention, grid=GRID,
                                                      num_prefix=PRE, num_suffix=SUF, topk=9),
                    lambda q, k, v: ditkernels.topk_attention(q, k, v, 9), dtype=torch.float64)


def case_ulysses_rettention():
    """Re-ttention (inference only): refresh, then two sparse steps; each rank's ReCache holds its heads."""
    rank, p = _rank()
    for mask in (ditkernels.Band(width=5, num_prefix=PRE, num_suffix=SUF),
                 ditkernels.LocalWindow(GRID, 2, num_prefix=PRE, num_suffix=SUF)):
        mine, single = ditkernels.ReCache(), ditkernels.ReCache()
        for step, mode in enumerate(("refresh", "sparse", "sparse")):
            _check_parallel(lambda q, k, v: ulysses_attention(q, k, v, op=ditkernels.rettention, grid=GRID,
                                                              num_prefix=PRE, num_suffix=SUF, state=mine, mode=mode,
                                                              mask=mask),
                            lambda q, k, v: ditkernels.rettention(q, k, v, single, mode, mask=mask),
                            dtype=torch.float64, backward=False, seed=10 + step)
        assert mine.rho.shape[1] == H // p


def case_ring_dense():
    _check_dense(ring_attention)
    # the reference backend's path, a plain sequence of 97 tokens without text, and the lse
    _check_parallel(lambda q, k, v: ring_attention(q, k, v, backend="reference"),
                    lambda q, k, v: ditkernels.attention(q, k, v), grid=(97,), pre=0, suf=0)
    # the triton kernels (interpreter): their backward must use the global out and lse it is given
    _check_parallel(lambda q, k, v: ring_attention(q, k, v, grid=(13,), num_prefix=2, backend="triton"),
                    lambda q, k, v: ditkernels.attention(q, k, v), grid=(13,), pre=2, suf=0, h=2,
                    dtype=torch.float32)
    q, k, v, _ = _full_inputs(PRE + 42 + SUF, seed=4)
    _, lse_ref = ditkernels.attention(q, k, v, return_lse=True)
    loc = [shard(t, GRID, num_prefix=PRE, num_suffix=SUF).float() for t in (q, k, v)]
    _, lse = ring_attention(*loc, grid=GRID, num_prefix=PRE, num_suffix=SUF, return_lse=True)
    _compare("lse", lse, shard(lse_ref[..., None], GRID, num_prefix=PRE, num_suffix=SUF)[..., 0], 1e-6)


def case_bytes_match_formulas():
    """The bytes each rank hands to the collectives equal ulysses_bytes / ring_bytes (bf16 and fp32)."""
    rank, p = _rank()
    bands = _uneven_bands(7, p)
    tokens = [r * 6 for r in bands]
    for dtype in (torch.bfloat16, torch.float32):
        q, k, v, _ = _full_inputs(PRE + 42 + SUF, seed=6)
        loc = [shard(t, GRID, bands=bands, num_prefix=PRE, num_suffix=SUF).to(dtype) for t in (q, k, v)]
        with _comm.count() as c:
            ulysses_attention(*loc, grid=GRID, bands=bands, num_prefix=PRE, num_suffix=SUF)
        es = torch.empty(0, dtype=dtype).element_size()
        assert c.sent == ulysses_bytes(tokens, rank, batch=B, heads=H, head_dim=D, num_global=PRE + SUF,
                                       element_size=es), c.calls
        loc = [t.requires_grad_() for t in loc]
        with _comm.count() as c:
            out = ring_attention(*loc, grid=GRID, bands=bands, num_prefix=PRE, num_suffix=SUF)
        assert c.sent == ring_bytes(tokens, rank, batch=B, heads=H, head_dim=D, element_size=es), c.calls
        with _comm.count() as c:
            out.sum().backward()
        assert c.sent == ring_bytes(tokens, rank, batch=B, heads=H, head_dim=D, element_size=es, backward=True), c.calls


def case_bfloat16():
    """bf16 (docs/verify.md §4): output and gradients within 2x the error of plain PyTorch attention in bf16."""
    rank, p = _rank()
    lay = dict(grid=GRID, num_prefix=PRE, num_suffix=SUF)
    q, k, v, g = _full_inputs(PRE + 42 + SUF, seed=12)
    full = [t.clone().requires_grad_() for t in (q, k, v)]
    ref = ditkernels.attention(*full)
    ref.backward(g)
    low = [t.to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
    ref_low = attention_lowp(*low, D ** -0.5)
    ref_low.backward(g.to(torch.bfloat16))
    for fn in (ulysses_attention, ring_attention):
        loc = [shard(t, **lay).to(torch.bfloat16).requires_grad_() for t in (q, k, v)]
        out = fn(*loc, **lay)
        assert out.dtype == torch.bfloat16
        gl = shard(g, **lay).clone()
        gl[:, :, :PRE] *= _text_weight(rank, p)
        gl[:, :, -SUF:] *= _text_weight(rank, p)
        out.backward(gl.to(torch.bfloat16))
        pairs = [("out", out, ref, ref_low)] + [(f"d{n}", x.grad, xr.grad, xl.grad) for n, x, xr, xl in zip("qkv", loc, full, low)]
        for name, got, want, lowp in pairs:
            got, want, lowp = (t.detach().double() for t in (got, want, lowp))
            if name != "out":  # grid tokens only: the text gradients are per-rank parts
                got = got[:, :, PRE:-SUF]
                want, lowp = (shard(t, **lay)[:, :, PRE:-SUF] for t in (want, lowp))
            else:
                want, lowp = shard(want, **lay), shard(lowp, **lay)
            bound = 2 * rel_err(lowp, want) + 1e-6
            err = rel_err(got, want)
            assert err <= bound, f"{fn.__name__} {name}: bf16 error {err:.3e} > 2 x PyTorch's bf16 error ({bound:.3e})"


def case_subgroup():
    """group=: ranks 1 and 2 of 3 or 4 form a group (its ranks 0 and 1; P2POp needs their global ranks)."""
    rank, p = _rank()
    if p < 3:
        return
    sub = dist.new_group([1, 2])  # every rank takes part in creating it
    if rank not in (1, 2):
        return
    for fn in (ulysses_attention, ring_attention):
        _check_parallel(lambda q, k, v: fn(q, k, v, grid=GRID, num_prefix=PRE, num_suffix=SUF, group=sub),
                        lambda q, k, v: ditkernels.attention(q, k, v), group=sub)


def case_errors_raise_on_every_rank():
    rank, p = _rank()
    q, k, v, _ = _full_inputs(PRE + 42 + SUF, seed=7)
    loc = [shard(t, GRID, num_prefix=PRE, num_suffix=SUF).float() for t in (q, k, v)]
    lay = dict(grid=GRID, num_prefix=PRE, num_suffix=SUF)
    if p > 1:  # heads not divisible by P (checked on every rank alike)
        odd = [t[:, : p + 1] for t in loc]
        raises_everywhere(lambda: ulysses_attention(*odd, **lay), ValueError, "divisible by the number of ranks")
    # one rank's shard has the wrong length for the grid: every rank raises, naming that rank
    bad = p - 1
    short = [t[:, :, :-1] if rank == bad else t for t in loc]
    for fn in (ulysses_attention, ring_attention):
        raises_everywhere(lambda: fn(*short, **lay), ValueError, f"rank {bad}.*expected num_prefix")
    # mismatched shard shapes between ranks (head_dim) without a grid: the agreement catches it
    if p > 1:
        hd = [t[..., :-1] if rank == bad else t for t in loc]
        for fn in (ulysses_attention, ring_attention):
            raises_everywhere(lambda: fn(*hd), ValueError, "must be the same on every rank")
    # an op result that is neither an output nor (output, lse): the same on every rank, so every rank raises
    raises_everywhere(lambda: ulysses_attention(*loc, op=ditkernels.block_topk_attention, density=0.5, block_size=(8, 8),
                                                 return_mask=True, **lay), TypeError, "return_mask")
    # bands that do not add up to the grid
    raises_everywhere(lambda: ring_attention(*loc, bands=(1,) * p, **lay), ValueError, "add up to")
    raises_everywhere(lambda: gather(loc[0][:, :, 1:] if rank == bad else loc[0], GRID, num_prefix=PRE,
                                      num_suffix=SUF), ValueError, f"rank {bad}")


CASES = [case_shard_gather_roundtrip, case_ulysses_roundtrip_bitexact, case_ulysses_dense, case_ulysses_lse,
         case_ulysses_plain_sequence,
         case_ulysses_local, case_ulysses_block_sparse, case_ulysses_block_topk, case_ulysses_topk,
         case_ulysses_rettention, case_ring_dense, case_bfloat16, case_subgroup, case_bytes_match_formulas,
         case_errors_raise_on_every_rank]

ranks = rank_fixture(CASES, timeout=60)


@pytest.mark.parametrize("case", [c.__name__ for c in CASES], ids=[c.__name__[5:] for c in CASES])
def test_case(ranks, case):
    ranks.check(case)


# ---- merge_attention (single process) ------------------------------------------------------------------------
def test_merge_attention_exact_and_nan_free():
    q, k, v, _ = _full_inputs(37, seed=8, h=3, d=10)
    out, lse = ditkernels.attention(q, k, v, return_lse=True)
    cut = 16
    oa, la = ditkernels.attention(q, k[:, :, :cut], v[:, :, :cut], return_lse=True)
    ob, lb = ditkernels.attention(q, k[:, :, cut:], v[:, :, cut:], return_lse=True)
    for (o1, l1, o2, l2) in ((oa, la, ob, lb), (ob, lb, oa, la)):
        m, ml = merge_attention(o1, l1, o2, l2)
        assert rel_err(m, out) <= 1e-6 and rel_err(ml, lse) <= 1e-6  # the lse is float32
    # a part that saw no key (lse = -inf, garbage output) leaves the other part exactly; both empty: 0, -inf
    lb_empty = lb.clone()
    lb_empty[:, :, ::3] = float("-inf")
    junk = torch.full_like(ob, float("nan"))
    m, ml = merge_attention(oa, la, torch.where(torch.isinf(lb_empty)[..., None], junk, ob), lb_empty)
    assert not torch.isnan(m).any() and not torch.isnan(ml).any()
    assert torch.equal(m[:, :, ::3], oa[:, :, ::3]) and torch.equal(ml[:, :, ::3], la[:, :, ::3])
    ninf = torch.full_like(la, float("-inf"))
    m, ml = merge_attention(junk, ninf, junk, ninf)
    assert torch.equal(m, torch.zeros_like(m)) and torch.equal(ml, ninf)
    m, ml = merge_attention(junk, ninf, ob, lb)
    assert torch.equal(m, ob) and torch.equal(ml, lb)
    with pytest.raises(ValueError, match="lse_b"):
        merge_attention(oa, la, ob, lb[:, :1])
