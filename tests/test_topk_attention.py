"""Exact per-query top-k attention (SPEC §2) on every backend: numerics, selection, ties, memory, compile."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import ditkernels
from ditkernels import backends
from ditkernels.ops import topk as topk_mod
from ditkernels.reference.attention import attention_ref

from numerics import assert_matches, attention_lowp, make_qkv

BACKENDS = ("reference", "cpu", "triton")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@pytest.fixture(params=BACKENDS)
def backend(request):
    ok, why = backends.availability(request.param)
    assert ok, f"backend {request.param} must be available in the test environment: {why}"
    return request.param


def _topk_visible(q, k, topk, scale):
    """float64 selection by the documented rule (ditkernels.ops.topk): the ``topk`` largest scores of
    each row, plus the keys within ``tol = 1e-5 * max|s|`` of the k-th when the k-th and (k+1)-th are
    that close (ties)."""
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    if topk >= s.shape[-1]:
        return torch.ones(s.shape, dtype=torch.bool)
    top = torch.topk(s, topk + 1, dim=-1).values
    t_k, t_k1 = top[..., topk - 1], top[..., topk]
    tol = 1e-5 * s.abs().amax(-1)
    thr = torch.where(t_k - t_k1 >= 2 * tol, (t_k + t_k1) / 2, t_k - tol)
    return s >= thr[..., None]


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
    vis = _topk_visible(q, k, topk, scale)
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
    ref_out, ref_lse = attention_ref(q.double(), k.double(), v.double(), scale, _topk_visible(q, k, 7, scale))
    assert_matches("out", out, ref_out)
    assert_matches("lse", lse, ref_lse, fp32_tol=1e-6)


def test_topk_at_least_seq_is_dense(backend):
    q, k, v = make_qkv(1, 2, 97, 60, 16, torch.float32, seed=1)
    out = ditkernels.topk_attention(q, k, v, 60, backend=backend)
    out2 = ditkernels.topk_attention(q, k, v, 1000, backend=backend)
    ref, _ = attention_ref(q.double(), k.double(), v.double(), 0.25)
    assert_matches("out", out, ref)
    assert_matches("out", out2, ref)


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


def test_thresholds_are_midpoints_and_tiles_skip():
    # Block-structured scores: rows of the first query tile only like the first key tile.
    q, k, _ = make_qkv(1, 1, 128, 256, 16, torch.float32, seed=9)
    thr, visits = topk_mod.topk_thresholds(q, k, [3], 0.25, (64, 64))
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
    _, visits2 = topk_mod.topk_thresholds(q2, k2, [3], 0.25, (64, 64))
    assert (visits2[0, 0, :, 0] != 0).all() and (visits2[0, 0, :, 1:] == 0).all()


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
