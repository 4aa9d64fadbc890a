"""Exact per-query top-k attention (docs/spec.md §2) on every backend: numerics, selection, ties, memory, compile."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import ditkernels
from ditkernels.ops import topk as topk_mod
from ditkernels.reference.attention import attention_ref
from ditkernels.reference.topk import topk_visible

from numerics import assert_matches, attention_lowp, make_qkv

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _grads(fn, q, k, v, do):
    qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(qq, kk, vv)
    return (out.detach(), *torch.autograd.grad(out, (qq, kk, vv), do.to(out.dtype)))


CASES = [(1, 2, 97, 97, 40, 5), (1, 1, 200, 257, 64, 33), (2, 1, 257, 200, 16, 100), (1, 2, 63, 70, 8, 2)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}-H{}-Sq{}-Sk{}-D{}-k{}".format(*c))
def test_topk_matches_float64(backend, case, dtype):
    b, h, sq, sk, d, topk = case
    q, k, v = make_qkv(b, h, sq, sk, d, dtype, strided=True, seed=sq + topk)
    scale = d ** -0.5
    vis = topk_visible(q, k, topk, scale)
    do = torch.randn(b, h, sq, d, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
    ref64 = _grads(lambda a, b_, c: attention_ref(a, b_, c, scale, vis)[0], q.double(), k.double(), v.double(),
                   do.double())
    ref_low = _grads(lambda a, b_, c: attention_lowp(a, b_, c, scale, vis), q, k, v, do) \
        if dtype != torch.float32 else (None,) * 4
    got = _grads(lambda a, b_, c: ditkernels.topk_attention(a, b_, c, topk, backend=backend), q, k, v, do)
    for name, x, r64, rl in zip(("out", "dq", "dk", "dv"), got, ref64, ref_low):
        assert_matches(name, x, r64, rl)


def test_topk_selection_and_lse(backend):
    q, k, v = make_qkv(1, 2, 130, 150, 32, torch.float32, seed=4)
    scale = 32 ** -0.5
    out, lse = ditkernels.topk_attention(q, k, v, 7, return_lse=True, backend=backend)
    ref_out, ref_lse = attention_ref(q.double(), k.double(), v.double(), scale, topk_visible(q, k, 7, scale))
    assert_matches("out", out, ref_out)
    assert_matches("lse", lse, ref_lse, fp32_tol=1e-6)


def test_topk_at_least_seq_is_dense(backend):
    q, k, v = make_qkv(1, 2, 97, 60, 16, torch.float32, seed=1)
    out = ditkernels.topk_attention(q, k, v, 60, backend=backend)
    out2 = ditkernels.topk_attention(q, k, v, 1000, backend=backend)
    ref, _ = attention_ref(q.double(), k.double(), v.double(), 0.25)
    assert_matches("out", out, ref)
    assert_matches("out", out2, ref)


@pytest.mark.slow  # thousands of op calls (the numerical Jacobian)
@pytest.mark.parametrize("backend_name", ["reference", "cpu"])
def test_topk_gradcheck_float64(backend_name):
    q, k, v = make_qkv(1, 2, 21, 26, 8, torch.float64, seed=2)
    q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b_, c: ditkernels.topk_attention(a, b_, c, 6, backend=backend_name),
                                    (q, k, v))


def test_ties_keep_every_tied_key(backend):
    # Keys 0..3 are identical: with topk = 2 and those four tied for the best score, all four are kept.
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 1, 5, 16, generator=g).abs()
    k = torch.randn(1, 1, 40, 16, generator=g) * 0.1
    k[0, 0, :4] = 2.0
    v = torch.randn(1, 1, 40, 16, generator=g)
    out = ditkernels.topk_attention(q, k, v, 2, backend=backend)
    want = v[0, 0, :4].mean(0).expand(5, 16)
    torch.testing.assert_close(out[0, 0], want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", ["torch", "cpu"])
def test_thresholds_are_midpoints_and_tiles_skip(impl):
    # Block-structured scores: rows of the first query tile only like the first key tile.
    q, k, _ = make_qkv(1, 1, 128, 256, 16, torch.float32, seed=9)
    thr, visits = topk_mod.topk_thresholds(q, k, [3], 0.25, (64, 64), impl=impl)
    thr, visits = thr[0], visits[0]
    s = (q.double() @ k.double().transpose(-1, -2))[0, 0] * 0.25
    top = torch.topk(s, 4, -1).values
    torch.testing.assert_close(thr[0, 0].double(), (top[:, 2] + top[:, 3]) / 2, rtol=1e-6, atol=1e-6)
    kept = s >= thr[0, 0].double()[:, None]
    assert (kept.sum(-1) == 3).all()
    tiles = kept.reshape(2, 64, 4, 64).any(3).any(1)
    assert torch.equal(visits[0] != 0, tiles)
    # structured: every query prefers the keys of key tile 0 -> the other key tiles are skipped
    q2 = q + 3.0
    k2 = k.clone()
    k2[..., :64, :] += 3.0
    _, visits2 = topk_mod.topk_thresholds(q2, k2, [3], 0.25, (64, 64), impl=impl)
    assert (visits2[0, 0, :, 0] != 0).all() and (visits2[0, 0, :, 1:] == 0).all()


# ---- the cpu backend's C++ selection pass (csrc/cpu/topk_select.cpp) against the torch pass -------------
def _scores64(q, k, scale):
    return (q.double() @ k.double().transpose(-1, -2)) * scale


def _assert_same_selection(q, k, topks, tiles, scale):
    """The C++ and torch passes give the same thresholds (up to the rounding of the scores: relative to
    each row's largest sum_i |q_i k_i| * scale, the magnitude a dot product's rounding error scales with;
    max |score| alone is too small a yardstick where the terms cancel) and the same tile visits."""
    t_torch, v_torch = topk_mod.topk_thresholds(q, k, topks, scale, tiles, impl="torch")
    t_cpu, v_cpu = topk_mod.topk_thresholds(q, k, topks, scale, tiles, impl="cpu")
    assert t_cpu.shape == t_torch.shape and t_cpu.dtype == torch.float32
    assert v_cpu.shape == v_torch.shape and v_cpu.dtype == torch.int8
    amax = _scores64(q.abs(), k.abs(), scale).amax(-1)  # NaN rows: compared by the isnan check below
    tol = 1e-6 if q.dtype != torch.float64 else 1e-12
    assert torch.equal(t_cpu.isnan(), t_torch.isnan())
    same = (t_cpu == t_torch) | t_cpu.isnan()  # equal, both NaN, or both -inf (topk >= seq_k: dense)
    err = ((t_cpu.double() - t_torch.double()).abs() / amax.clamp_min(1e-30)).masked_fill(same, 0)
    assert float(err.max()) <= tol, f"threshold mismatch: {float(err.max()):.3g} of max|s|"
    assert torch.equal(v_cpu, v_torch), f"{int((v_cpu != v_torch).sum())} tile visits differ"
    return t_cpu, v_cpu


SELECT_CASES = [  # b, h, sq, sk, d, topks, tiles
    (1, 2, 97, 97, 40, [5], (64, 64)),
    (1, 1, 200, 257, 64, [33, 1, 256], (64, 64)),
    (2, 1, 257, 200, 16, [100, 7], (32, 48)),
    (1, 3, 63, 70, 8, [2, 69, 1000], (16, 64)),
    (1, 1, 130, 2049, 24, [128, 1500], (64, 16)),
    (1, 2, 300, 90, 64, [9], (128, 32)),  # query tiles of several 64-row score panels
]


@pytest.mark.parametrize("dtype", DTYPES + (torch.float64,), ids=str)
@pytest.mark.parametrize("case", SELECT_CASES, ids=lambda c: "B{}-H{}-Sq{}-Sk{}-D{}-k{}-t{}x{}".format(
    *c[:5], "_".join(map(str, c[5])), *c[6]))
def test_cpu_selection_matches_torch(case, dtype):
    b, h, sq, sk, d, topks, tiles = case
    q, k, _ = make_qkv(b, h, sq, sk, d, dtype, strided=True, seed=sq + sk)
    _assert_same_selection(q, k, topks, tiles, d ** -0.5)


@pytest.mark.parametrize("workspace", [1, 200_000], ids=["one-row-panels", "no-packed-head"])
def test_cpu_selection_small_workspace(workspace):
    # a small workspace: score panels of fewer rows, keys packed chunk by chunk; same selection
    from ditkernels.backends import cpu

    q, k, _ = make_qkv(1, 2, 150, 700, 40, torch.float32, strided=True, seed=6)
    want = topk_mod.topk_thresholds(q, k, [30, 5], 40 ** -0.5, (64, 64), impl="cpu")
    got = cpu.topk_thresholds(q, k, [30, 5], 40 ** -0.5, (64, 64), topk_mod.TIE_TOL, workspace_bytes=workspace)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_cpu_selection_float64_follows_the_rule():
    # float64: the thresholds are the documented rule on the exact scores (to float64 rounding)
    q, k, _ = make_qkv(1, 2, 150, 300, 32, torch.float64, seed=5)
    thr, _ = topk_mod.topk_thresholds(q, k, [40], 32 ** -0.5, (64, 64), impl="cpu")
    s = _scores64(q, k, 32 ** -0.5)
    top = torch.topk(s, 41, -1).values
    t_k, t_k1 = top[..., 39], top[..., 40]
    tol = 1e-5 * s.abs().amax(-1)
    want = torch.where(t_k - t_k1 >= 2 * tol, (t_k + t_k1) / 2, t_k - tol)
    torch.testing.assert_close(thr[0].double(), want.float().double(), rtol=0, atol=1e-6 * float(s.abs().max()))


@pytest.mark.parametrize("kind", ["tied_keys", "constant_rows", "outlier_key", "geometric", "few_values", "nan_row"])
def test_cpu_selection_hard_rows(kind):
    """Rows that defeat a bucket select (ties, one value, one huge score, exponentially spread scores, a
    handful of distinct values) and a NaN score: the C++ pass still agrees with torch.topk's selection."""
    g = torch.Generator().manual_seed(11)
    q = torch.randn(1, 2, 70, 16, generator=g)
    k = torch.randn(1, 2, 300, 16, generator=g)
    if kind == "tied_keys":
        k[:, :, 10:30] = k[:, :, 5:6]  # 21 copies of one key
    elif kind == "constant_rows":
        q[:, :, :20] = 0.0  # every score 0
        k[:, 1] = k[:, 1, :1]  # head 1: every key the same
    elif kind == "outlier_key":
        k[:, :, 7] *= 1e4  # one score far from the others: the others crowd one bucket
    elif kind == "geometric":  # scores 1.3^j: each histogram level peels off only the largest few
        q = q.abs() + 1.0
        k = torch.zeros(1, 2, 300, 16)
        k[..., 0] = 1.3 ** torch.arange(300.0)[torch.randperm(300, generator=g)]
    elif kind == "few_values":
        k = torch.randint(-2, 3, (1, 2, 300, 16), generator=g).float()
        q = torch.randint(-2, 3, (1, 2, 70, 16), generator=g).float()
    elif kind == "nan_row":
        q[0, 0, 3, 2] = float("nan")
    thr, visits = _assert_same_selection(q, k, [1, 6, 20, 150, 299], (64, 64), 0.25)
    kept = _scores64(q, k, 0.25) >= thr[..., None].double()  # (topks, 1, 2, 70, 300)
    counts = kept.sum(-1)
    if kind == "nan_row":
        assert thr[:, 0, 0, 3].isnan().all() and (counts[:, 0, 0, 3] == 0).all()
        counts[:, 0, 0, 3] = 300
    assert (counts >= torch.tensor([1, 6, 20, 150, 299])[:, None, None, None]).all()
    if kind == "tied_keys":  # rows whose 20 best include the tied key keep its 21 copies
        assert (counts[2] > 20).any()


def test_cpu_selection_full_tiles_hold_only_kept_scores():
    """The C++ pass computes the scores with the forward kernel's arithmetic: a tile it marks fully
    kept (no element mask there) gives the same attention as the element mask over every tile."""
    from ditkernels.backends import cpu
    from ditkernels.schedule import MASK_THRESHOLD, BlockSchedule, ElementMask

    q, k, v = make_qkv(1, 2, 192, 256, 32, torch.float32, seed=8)
    k = k.clone()
    k[:, :, :64] += 2.0  # every query prefers key tile 0: with topk = 64 it is fully kept
    q = q + 2.0
    thr, visits = topk_mod.topk_thresholds(q, k, [64, 70], 32 ** -0.5, (64, 64), impl="cpu")
    assert (visits == 1).any() and (visits == 0).any()
    for i in range(2):
        sched = BlockSchedule.from_tile_mask(visits[i] != 0, 64, 64, 192, 256, visits[i] == 2)
        every = BlockSchedule.from_tile_mask(torch.ones_like(visits[i], dtype=torch.bool), 64, 64, 192, 256,
                                             torch.ones_like(visits[i], dtype=torch.bool))
        mask = ElementMask(MASK_THRESHOLD, rows=thr[i])
        out, lse = cpu.flash_fwd(q, k, v, scale=32 ** -0.5, schedule=sched, mask=mask)
        out_all, lse_all = cpu.flash_fwd(q, k, v, scale=32 ** -0.5, schedule=every, mask=mask)
        torch.testing.assert_close(out, out_all, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(lse, lse_all, rtol=1e-6, atol=1e-6)


def test_cpu_selection_errors():
    from ditkernels.backends import cpu

    q, k, _ = make_qkv(1, 1, 10, 12, 8, torch.float32)
    with pytest.raises(ValueError, match=r"topks: expected values in \[1, seq_k=12\), got 12"):
        cpu.topk_thresholds(q, k, [12], 0.3, (64, 64), 1e-5)
    with pytest.raises(ValueError, match="tiles"):
        cpu.topk_thresholds(q, k, [3], 0.3, (0, 64), 1e-5)
    with pytest.raises(TypeError, match="k: expected dtype"):
        cpu.topk_thresholds(q, k.double(), [3], 0.3, (64, 64), 1e-5)
    with pytest.raises(ValueError, match="impl"):
        topk_mod.topk_thresholds(q, k, [3], 0.3, (64, 64), impl="numpy")


def test_errors_name_the_argument():
    q, k, v = make_qkv(1, 1, 10, 10, 8, torch.float32)
    with pytest.raises(ValueError, match="topk: expected a positive int"):
        ditkernels.topk_attention(q, k, v, 0)
    with pytest.raises(TypeError, match="return_lse"):
        ditkernels.topk_attention(q, k, v, 2, return_lse=1)


def test_torch_compile_fullgraph():
    q, k, v = make_qkv(1, 2, 100, 100, 16, torch.float32, seed=3)
    f = lambda a, b_, c: ditkernels.topk_attention(a, b_, c, 9, backend="cpu")  # noqa: E731
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(q, k, v), f(q, k, v))


@pytest.mark.slow  # a 32768-token selection pass in a subprocess
def test_seq_32768_within_1gb_extra_memory():
    """Exact top-k at seq 32768, 1 head, head_dim 64 on the cpu backend: peak RSS grows by < 1 GB (the
    whole score matrix alone would be 4 GB). Measured in a fresh process (peak RSS is per process)."""
    code = textwrap.dedent("""
        import torch, ditkernels
        def rss(field):
            for line in open('/proc/self/status'):
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 1, 32768, 64, generator=g) for _ in range(3))
        ditkernels.topk_attention(q[:, :, :64], k[:, :, :256], v[:, :, :256], 8, backend='cpu')  # warm up
        base = rss('VmRSS:')
        open('/proc/self/clear_refs', 'w').write('5')  # reset the peak (VmHWM) to the current RSS
        out = ditkernels.topk_attention(q, k, v, 64, backend='cpu')
        assert torch.isfinite(out).all()
        print((rss('VmHWM:') - base) / 2**20)
    """)
    env = dict(os.environ, OMP_NUM_THREADS="2")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=900)
    assert res.returncode == 0, res.stderr[-2000:]
    extra_mb = float(res.stdout.strip().splitlines()[-1])
    assert extra_mb < 1024, f"peak RSS grew by {extra_mb:.0f} MB"
