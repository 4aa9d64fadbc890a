"""The CPU flash-attention core (csrc/cpu/attention.cpp via ditkernels/backends/cpu.py) against the
float64 reference, following docs/verify.md §4: fp32 within 1e-5, fp64 at float64 accuracy, fp16/bf16
within twice the error of the reference run in the same low dtype (+1e-6), outputs and gradients."""

from __future__ import annotations

import importlib

import pytest
import torch

from ditkernels.backends import cpu
from ditkernels.backends import reference as ref_backend
from ditkernels.reference.attention import attention_ref
from ditkernels.schedule import BlockSchedule, Epilogue, TiledSchedule

from numerics import make_qkv, rel_err

pytestmark = pytest.mark.skipif(not cpu.available()[0], reason=cpu.available()[1])

DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "fp16": torch.float16, "bf16": torch.bfloat16}
# (batch, heads, seq_q, seq_k, head_dim)
SHAPES = {
    "B1-H1-Sq1-Sk1-D1": (1, 1, 1, 1, 1),
    "B2-H3-Sq97-Sk200-D40": (2, 3, 97, 200, 40),
    "B1-H2-Sq200-Sk97-D16": (1, 2, 200, 97, 16),
    "B1-H1-Sq1-Sk97-D128": (1, 1, 1, 97, 128),
    "B1-H1-Sq97-Sk33-D256": (1, 1, 97, 33, 256),
}
# name -> None (dense) or (block_m, block_n, shared by all heads)
SCHEDULES = {"dense": None, "sched64": (64, 64, True), "sched80x48-perhead": (80, 48, False)}


def make_schedule(spec, shape, seed: int) -> BlockSchedule | None:
    """A random block schedule: random visited tiles and partial flags, the first query tile
    visiting nothing (its rows see no key) and the last KV tile visited by nobody."""
    if spec is None:
        return None
    bm, bn, shared = spec
    b, h, sq, sk, _ = shape
    nq, nk = -(-sq // bm), -(-sk // bn)
    hs = 1 if shared else b * h
    g = torch.Generator().manual_seed(seed)
    tiles = torch.rand(hs, nq, nk, generator=g) < 0.7
    if nq > 1:
        tiles[:, 0, :] = False
    if nk > 1:
        tiles[:, :, -1] = False
    partial = torch.rand(hs, nq, nk, generator=g) < 0.5
    return BlockSchedule.from_tile_mask(tiles, bm, bn, sq, sk, partial)


def visible_of(schedule: BlockSchedule | None, b: int, h: int) -> torch.Tensor | None:
    if schedule is None:
        return None
    vis = schedule.element_mask()
    return vis[None] if vis.shape[0] == 1 else vis.reshape(b, h, *vis.shape[1:])


def ref_forward_backward(q, k, v, do, scale, visible):
    """(out, lse, dq, dk, dv) of the reference, computed in the dtype of the inputs."""
    with torch.enable_grad():
        qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
        out, lse = attention_ref(qq, kk, vv, scale, visible)
        dq, dk, dv = torch.autograd.grad(out, (qq, kk, vv), do)
    return out.detach(), lse.detach(), dq, dk, dv


def assert_close_to_ref(name, got, ref64, ref_low, dtype):
    err = rel_err(got, ref64)
    if dtype == torch.float64:
        assert err <= 1e-12, f"{name}: err {err:.3e} vs float64 reference"
    elif dtype == torch.float32:
        assert err <= 1e-5, f"{name}: err {err:.3e} vs float64 reference"
    else:
        bound = 2 * rel_err(ref_low, ref64) + 1e-6
        assert err <= bound, f"{name}: err {err:.3e} > 2 x reference {dtype} error + 1e-6 = {bound:.3e}"


def assert_lse(lse, lse_ref, dtype, lse_low=None):
    assert lse.dtype == torch.float32
    empty = torch.isinf(lse_ref)
    assert torch.equal(torch.isneginf(lse), empty), "lse: -inf exactly on the rows that see no key"
    if (~empty).any():
        err = rel_err(lse[~empty], lse_ref[~empty])
        tol = 1e-6 if dtype in (torch.float32, torch.float64) else 2 * rel_err(lse_low[~empty], lse_ref[~empty]) + 1e-6
        assert err <= tol, f"lse: err {err:.3e} > {tol:.3e}"


@pytest.mark.parametrize("sched", list(SCHEDULES), ids=list(SCHEDULES))
@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_forward_backward(dtype, shape, strided, sched):
    b, h, sq, sk, d = shape
    q, k, v = make_qkv(*shape, dtype, strided=strided, seed=sq * 1000 + sk + d)
    schedule = make_schedule(SCHEDULES[sched], shape, seed=d)
    vis = visible_of(schedule, b, h)
    scale = d ** -0.5
    do = torch.randn(b, h, sq, d, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(dtype)

    out, lse = cpu.flash_fwd(q, k, v, scale=scale, schedule=schedule)
    assert out.shape == (b, h, sq, d) and out.dtype == dtype and lse.shape == (b, h, sq)
    dq, dk, dv = cpu.flash_bwd(do, q, k, v, out, lse, scale=scale, schedule=schedule)
    for t, like in ((dq, q), (dk, k), (dv, v)):
        assert t.shape == like.shape and t.dtype == like.dtype

    r64 = ref_forward_backward(q.double(), k.double(), v.double(), do.double(), scale, vis)
    low = r64 if dtype in (torch.float32, torch.float64) else ref_forward_backward(q, k, v, do, scale, vis)
    assert_close_to_ref("out", out, r64[0], low[0], dtype)
    assert_lse(lse, r64[1], dtype, low[1])
    empty_rows = torch.isinf(r64[1])
    assert (out[empty_rows] == 0).all(), "rows that see no key output exactly 0"
    for name, got, ref64, reflow in zip(("dq", "dk", "dv"), (dq, dk, dv), r64[2:], low[2:]):
        if ref64.norm() == 0:  # e.g. one key: softmax is constant, dq = dk = 0
            assert got.abs().max() <= 1e-6, f"{name}: expected zeros"
        else:
            assert_close_to_ref(name, got, ref64, reflow, dtype)


@pytest.mark.parametrize("sched", ["dense", "sched64"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_epilogue(dtype, sched):
    shape = (2, 2, 97, 130, 40)
    b, h, sq, sk, d = shape
    q, k, v = make_qkv(*shape, dtype, strided=False, seed=3)
    schedule = make_schedule(SCHEDULES[sched], shape, seed=5)
    g = torch.Generator().manual_seed(11)
    ep = Epilogue(torch.rand(b, h, sq, generator=g) + 0.5,
                  torch.randn(b, h, sq, d, generator=g, dtype=torch.float64).to(dtype))
    scale = d ** -0.5
    out, lse = cpu.flash_fwd(q, k, v, scale=scale, schedule=schedule, epilogue=ep)
    vis = visible_of(schedule, b, h)
    o64, lse64 = attention_ref(q.double(), k.double(), v.double(), scale, vis)
    ref64 = ep.row_scale.double()[..., None] * o64 + ep.residual.double()
    ref_low, _ = ref_backend.flash_fwd(q, k, v, scale=scale, schedule=schedule, epilogue=ep)
    assert_close_to_ref("out", out, ref64, ref_low, dtype)
    empty_rows = torch.isinf(lse64)
    assert torch.equal(out[empty_rows], ep.residual[empty_rows]), "a row with no key outputs the residual"
    assert_lse(lse, lse64, dtype, lse_low=ref_backend.flash_fwd(q, k, v, scale=scale, schedule=schedule)[1])


@pytest.mark.parametrize("sched", ["dense", "sched64"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
def test_large_logits(dtype, sched):
    """Scores around +-1e3: no overflow, no NaN; compared with the reference in the same dtype
    (fp32 rounding of a 1e3 score alone is a 1e-4 relative error of its exponential)."""
    shape = (1, 2, 97, 150, 16)
    b, h, sq, sk, d = shape
    q, k, v = make_qkv(*shape, dtype, strided=True, seed=21, logit_scale=11.0)
    scale = d ** -0.5
    schedule = make_schedule(SCHEDULES[sched], shape, seed=2)
    vis = visible_of(schedule, b, h)
    do = torch.randn(b, h, sq, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(dtype)
    out, lse = cpu.flash_fwd(q, k, v, scale=scale, schedule=schedule)
    grads = cpu.flash_bwd(do, q, k, v, out, lse, scale=scale, schedule=schedule)
    r64 = ref_forward_backward(q.double(), k.double(), v.double(), do.double(), scale, vis)
    assert r64[1][torch.isfinite(r64[1])].abs().max() > 300, "the case must produce large logits"
    low_dtype = torch.float32 if dtype == torch.float32 else dtype
    low = r64 if dtype == torch.float64 else ref_forward_backward(q.to(low_dtype), k.to(low_dtype),
                                                                   v.to(low_dtype), do.to(low_dtype), scale, vis)
    for t in (out, *grads):
        assert not torch.isnan(t).any()
    for name, got, ref64, reflow in zip(("out", "dq", "dk", "dv"), (out, *grads), (r64[0], *r64[2:]),
                                        (low[0], *low[2:])):
        err, bound = rel_err(got, ref64), 2 * rel_err(reflow, ref64) + 1e-6
        if dtype == torch.float64:
            bound = 1e-12
        assert err <= bound, f"{name}: err {err:.3e} > {bound:.3e}"


class _CpuAttention(torch.autograd.Function):
    """out = attention(q, k, v) through the cpu backend's flash_fwd / flash_bwd."""

    @staticmethod
    def forward(ctx, q, k, v, scale, schedule):
        out, lse = cpu.flash_fwd(q, k, v, scale=scale, schedule=schedule)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.schedule = scale, schedule
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = cpu.flash_bwd(do, q, k, v, out, lse, scale=ctx.scale, schedule=ctx.schedule)
        return dq, dk, dv, None, None


@pytest.mark.parametrize("sched", ["dense", "sched4x3"])
def test_gradcheck(sched):
    shape = (1, 2, 9, 7, 3)
    b, h, sq, sk, d = shape
    q, k, v = (t.requires_grad_(True) for t in make_qkv(*shape, torch.float64, strided=False, seed=9))
    schedule = None
    if sched == "sched4x3":
        tiles = torch.tensor([[1, 0, 1], [0, 1, 1], [1, 1, 0]], dtype=torch.bool)
        schedule = BlockSchedule.from_tile_mask(tiles, 4, 3, sq, sk, tiles.clone())
    assert torch.autograd.gradcheck(lambda a, b_, c: _CpuAttention.apply(a, b_, c, 0.6, schedule), (q, k, v))


def test_deterministic_across_thread_counts():
    shape = (1, 3, 150, 170, 40)
    q, k, v = make_qkv(*shape, torch.float32, strided=True, seed=4)
    schedule = make_schedule((64, 64, False), shape, seed=4)
    do = torch.randn(1, 3, 150, 40, generator=torch.Generator().manual_seed(4))
    before = torch.get_num_threads()
    results = []
    try:
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            out, lse = cpu.flash_fwd(q, k, v, scale=0.2, schedule=schedule)
            results.append((out, lse, *cpu.flash_bwd(do, q, k, v, out, lse, scale=0.2, schedule=schedule)))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def _random_tiled(sq, sk, bm, bn, seed):
    """A TiledSchedule over random token sets: tiles of a random permutation (last tile short),
    random visits (the first query tile visits nothing), random partial flags."""
    g = torch.Generator().manual_seed(seed)

    def tiles(n, block):
        perm = torch.randperm(n, generator=g)
        nt = -(-n // block)
        out = torch.full((nt * block,), n, dtype=torch.int64)
        out[:n] = perm
        return out.reshape(nt, block)

    qt, kt = tiles(sq, bm), tiles(sk, bn)
    vis = torch.rand(qt.shape[0], kt.shape[0], generator=g) < 0.6
    vis[0] = False
    qi, ki = vis.nonzero(as_tuple=True)
    partial = torch.rand(qi.shape[0], generator=g) < 0.5
    return TiledSchedule.from_visits(qt, kt, sq, sk, qi, ki, partial)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("blocks", [(16, 8), (64, 64), (80, 24)], ids=lambda b: f"bm{b[0]}-bn{b[1]}")
def test_token_mapped_tiles(dtype, blocks):
    """Tiles as arbitrary token sets (TiledSchedule): the kernels gather them and match the reference."""
    shape = (2, 2, 97, 130, 24)
    b, h, sq, sk, d = shape
    q, k, v = make_qkv(*shape, dtype, strided=True, seed=blocks[0])
    schedule = _random_tiled(sq, sk, *blocks, seed=blocks[1])
    vis = schedule.element_mask()[None]
    scale = d ** -0.5
    do = torch.randn(b, h, sq, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(dtype)
    out, lse = cpu.flash_fwd(q, k, v, scale=scale, schedule=schedule)
    assert cpu.last_fwd_visits() == schedule.visited_tiles * b * h
    dq, dk, dv = cpu.flash_bwd(do, q, k, v, out, lse, scale=scale, schedule=schedule)
    r64 = ref_forward_backward(q.double(), k.double(), v.double(), do.double(), scale, vis)
    low = r64 if dtype in (torch.float32, torch.float64) else ref_forward_backward(q, k, v, do, scale, vis)
    assert_close_to_ref("out", out, r64[0], low[0], dtype)
    assert_lse(lse, r64[1], dtype, low[1])
    for name, got, ref64, reflow in zip(("dq", "dk", "dv"), (dq, dk, dv), r64[2:], low[2:]):
        assert_close_to_ref(name, got, ref64, reflow, dtype)


def test_token_mapped_tiles_must_cover_every_token():
    q, k, v = make_qkv(1, 1, 20, 20, 8, torch.float32, strided=False, seed=0)
    qt = torch.arange(16).reshape(2, 8)  # tokens 16..19 in no query tile
    kt = torch.arange(20).reshape(2, 10)
    s = TiledSchedule.from_visits(qt, kt, 20, 20, torch.tensor([0]), torch.tensor([0]), torch.tensor([False]))
    with pytest.raises(ValueError, match="q_tokens"):
        cpu.flash_fwd(q, k, v, scale=1.0, schedule=s)


def test_schedule_block_sizes_are_honoured():
    """The same visible set expressed with two block sizes gives the same result."""
    shape = (1, 1, 100, 100, 16)
    q, k, v = make_qkv(*shape, torch.float64, strided=False, seed=8)
    tiles20 = torch.zeros(5, 5, dtype=torch.bool)
    tiles20[:, :2] = True  # keys [0, 40)
    s20 = BlockSchedule.from_tile_mask(tiles20, 20, 20, 100, 100)
    tiles40 = torch.zeros(3, 3, dtype=torch.bool)
    tiles40[:, 0] = True
    s40 = BlockSchedule.from_tile_mask(tiles40, 40, 40, 100, 100)
    o20, l20 = cpu.flash_fwd(q, k, v, scale=0.25, schedule=s20)
    o40, l40 = cpu.flash_fwd(q, k, v, scale=0.25, schedule=s40)
    ref, _ = attention_ref(q, k[:, :, :40], v[:, :, :40], 0.25)
    assert rel_err(o20, ref) < 1e-12 and rel_err(o40, ref) < 1e-12
    assert cpu.block_sizes(64, torch.float32) == (64, 64)


def test_validation_errors():
    q, k, v = make_qkv(1, 1, 8, 8, 4, torch.float32, strided=False, seed=0)
    with pytest.raises(TypeError, match="k: expected dtype"):
        cpu.flash_fwd(q, k.double(), v, scale=1.0)
    with pytest.raises(ValueError, match="v: expected seq_k = 8"):
        cpu.flash_fwd(q, k, v[:, :, :4], scale=1.0)
    with pytest.raises(ValueError, match="q: the cpu backend takes CPU tensors"):
        cpu.flash_fwd(q.to("meta"), k.to("meta"), v.to("meta"), scale=1.0)
    bad = BlockSchedule.from_tile_mask(torch.ones(1, 1, dtype=torch.bool), 16, 16, 16, 16)
    with pytest.raises(ValueError, match="schedule: built for"):
        cpu.flash_fwd(q, k, v, scale=1.0, schedule=bad)


def test_unavailable_extension_is_explained(monkeypatch):
    from ditkernels import _ext

    real_import = importlib.import_module

    def fake_import(name, *args):
        if name.startswith("ditkernels._cpu_") and name != "ditkernels._cpu_generic":
            raise ImportError("simulated: no such file")
        return real_import(name, *args)

    monkeypatch.setattr(_ext, "_cpu", None)
    monkeypatch.setattr(_ext, "_cpu_error", None)
    monkeypatch.setattr(_ext, "built_isas", lambda: ["generic", "avx2"])
    monkeypatch.setattr(_ext, "cpu_isas", lambda: ["generic", "avx2"])
    monkeypatch.delenv(_ext.ENV, raising=False)
    monkeypatch.setattr(importlib, "import_module", fake_import)
    ok, why = cpu.available()
    assert not ok
    assert why.startswith("the CPU kernels failed to import: ImportError: simulated: no such file.")
    assert "pip install --no-build-isolation -e ." in why
    with pytest.raises(RuntimeError, match="failed to import"):
        cpu.flash_fwd(*make_qkv(1, 1, 2, 2, 2, torch.float32, strided=False, seed=0), scale=1.0)


def test_schedule_out_of_range_index_is_rejected():
    q, k, v = make_qkv(1, 1, 8, 8, 4, torch.float32, strided=False, seed=0)
    s = BlockSchedule.from_tile_mask(torch.ones(1, 1, dtype=torch.bool), 8, 8, 8, 8)
    s.kv_idx[0, 0] = 3
    with pytest.raises(ValueError, match="schedule.kv_idx"):
        cpu.flash_fwd(q, k, v, scale=1.0, schedule=s)
