"""ditkernels.local_attention (docs/spec.md §1) and its plan: numerics against the float64 reference on the
reference, cpu and triton backends (docs/verify.md §4; triton under TRITON_INTERPRET=1 on CPU tensors,
see conftest.py), float64 gradcheck, the block schedule (efficiency bars, element visibility, the
tiles the kernels visit), parity with FlexAttention (CLEAR's mask_mod) and NATTEN, errors and
torch.compile."""

from __future__ import annotations

import pytest
import torch

import ditkernels
from ditkernels import backends
from ditkernels.backends import cpu
from ditkernels.ops.local import kernel_plan
from ditkernels.reference.attention import attention_ref
from ditkernels.reference.local import LocalSpec, local_visible

from builders import check_plan_visits
from numerics import ATTENTION_BACKENDS, assert_matches, attention_lowp, rel_err


# id -> (options of local_attention with grid/window, number of extra keys, head_dim)
CASES = {
    "2d-7x13-circle-r3-P3-S2-D40": (dict(grid=(7, 13), window=3, num_prefix=3, num_suffix=2), 0, 40),
    "2d-6x20-circle-r(2,5)-D16": (dict(grid=(6, 20), window=(2, 5)), 0, 16),
    "2d-7x13-square-shift-r(2,4)-D40": (dict(grid=(7, 13), window=(2, 4), shape="square", border="shift"), 0, 40),
    "2d-5x9-square-clip-r2-S70-D8": (dict(grid=(5, 9), window=2, shape="square", num_suffix=70), 0, 8),
    "2d-8x12-tile4-r1-D32": (dict(grid=(8, 12), window=1, shape="tile", tile=4), 0, 32),
    "2d-7x13-tile(3,5)-r(1,0)-P1": (dict(grid=(7, 13), window=(1, 0), shape="tile", tile=(3, 5), num_prefix=1), 0, 24),
    "1d-97-circle-r5-P3-M5-D40": (dict(grid=(97,), window=5, num_prefix=3), 5, 40),
    "3d-5x6x7-circle-r(1,2,3)-D16": (dict(grid=(5, 6, 7), window=(1, 2, 3)), 0, 16),
    "3d-4x5x6-square-shift-r1-S3-M4": (dict(grid=(4, 5, 6), window=1, shape="square", border="shift",
                                            num_suffix=3), 4, 16),
    "2d-9x11-circle-r4-P5-S2-M7-D64": (dict(grid=(9, 11), window=4, num_prefix=5, num_suffix=2), 7, 64),
    "2d-7x13-r0-P2": (dict(grid=(7, 13), window=0, num_prefix=2), 0, 16),
    "2d-7x13-r0-alone": (dict(grid=(7, 13), window=0), 0, 16),
}
LOWP_CASES = ("2d-7x13-circle-r3-P3-S2-D40", "1d-97-circle-r5-P3-M5-D40", "3d-4x5x6-square-shift-r1-S3-M4")
# The Triton interpreter runs these kernels at 30-130 s per case with batch*heads = 4: triton takes one
# case per feature (prefix/suffix with strides, 1-D with extra keys, 3-D, square/shift, tile, r=0, many
# suffix tokens) at batch*heads = 1; the in-kernel visit-count tests cover several heads and larger grids.
TRITON_CASES = ("2d-7x13-circle-r3-P3-S2-D40", "1d-97-circle-r5-P3-M5-D40", "3d-5x6x7-circle-r(1,2,3)-D16",
                "2d-7x13-square-shift-r(2,4)-D40", "2d-7x13-tile(3,5)-r(1,0)-P1", "2d-7x13-r0-alone",
                "2d-5x9-square-clip-r2-S70-D8")


def _bh(backend: str) -> dict:
    return dict(b=1, h=1) if backend == "triton" else {}


def _spec(opts: dict, m: int) -> LocalSpec:
    o = dict(opts)
    return LocalSpec.make(o.pop("grid"), o.pop("window"), num_extra=m, **o)


def _inputs(spec: LocalSpec, d: int, dtype: torch.dtype, seed: int, b: int = 2, h: int = 2, strided: bool = False):
    g = torch.Generator().manual_seed(seed)

    def rnd(s):
        if strided:  # (B, S, H, D) transposed, like a model's projections
            return torch.randn(b, s, h, d, generator=g, dtype=torch.float64).transpose(1, 2).to(dtype)
        return torch.randn(b, h, s, d, generator=g, dtype=torch.float64).to(dtype)

    q, k, v = rnd(spec.seq), rnd(spec.seq), rnd(spec.seq)
    ke = rnd(spec.num_extra) if spec.num_extra else None
    ve = rnd(spec.num_extra) if spec.num_extra else None
    do = rnd(spec.seq)
    return q, k, v, ke, ve, do


def _truth(q, k, v, ke, ve, do, spec: LocalSpec, scale: float, lowp: bool = False):
    """(out, lse, grads...) of plain PyTorch attention with the reference mask (autograd)."""
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, ke, ve) if t is not None]
    qq, kk, vv = leaves[:3]
    kall = torch.cat([kk, leaves[3]], 2) if ke is not None else kk
    vall = torch.cat([vv, leaves[4]], 2) if ve is not None else vv
    vis = local_visible(spec)
    if lowp:
        out, lse = attention_lowp(qq, kall, vall, scale, vis), None
    else:
        out, lse = attention_ref(qq, kall, vall, scale, vis)
    grads = torch.autograd.grad(out, leaves, do.to(out.dtype))
    return (out, lse) + tuple(grads)


def _run(q, k, v, ke, ve, do, opts, backend):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v, ke, ve) if t is not None]
    extra = (leaves[3], leaves[4]) if ke is not None else None
    out, lse = ditkernels.local_attention(*leaves[:3], **opts, extra_kv=extra, return_lse=True, backend=backend)
    out.backward(do)
    return (out, lse) + tuple(t.grad for t in leaves)


NAMES = ("out", "lse", "dq", "dk", "dv", "dk_extra", "dv_extra")


@pytest.mark.parametrize("backend,case", [pytest.param(b, c, id=f"{b}-{c}") for b in ATTENTION_BACKENDS for c in CASES
                                          if b != "triton" or c in TRITON_CASES], indirect=["backend"])
def test_fp32_matches_float64(backend, case):
    """float32 inputs vs the float64 reference: ~1e-6 relative (<= 1e-5) on every backend, triton
    included (its fp32 products are IEEE fp32, not TF32)."""
    opts, m, d = CASES[case]
    spec = _spec(opts, m)
    q, k, v, ke, ve, do = _inputs(spec, d, torch.float32, seed=len(case), strided=case.startswith("2d-7x13-c"),
                                  **_bh(backend))
    scale = d ** -0.5
    ref = _truth(*(t.double() if t is not None else None for t in (q, k, v, ke, ve, do)), spec, scale)
    got = _run(q, k, v, ke, ve, do, opts, backend)
    assert got[0].dtype == torch.float32 and got[1].dtype == torch.float32
    assert torch.equal(torch.isinf(got[1]), torch.isinf(ref[1])), "lse: -inf rows differ"
    fin = torch.isfinite(ref[1])
    assert (got[1][fin] - ref[1][fin]).abs().max() <= 1e-5 if fin.any() else True
    for name, x, r in zip(NAMES, got, ref):
        if name == "lse":
            continue
        assert_matches(f"{case}/{name}", x, r)
    if not fin.all():  # queries that see nothing: zero output, finite gradients
        assert got[0][~fin].abs().max() == 0


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("case", LOWP_CASES)
def test_low_precision_within_twice_plain_pytorch(backend, case, dtype):
    opts, m, d = CASES[case]
    spec = _spec(opts, m)
    q, k, v, ke, ve, do = _inputs(spec, d, dtype, seed=3, **_bh(backend))
    scale = d ** -0.5
    ref = _truth(*(t.double() if t is not None else None for t in (q, k, v, ke, ve, do)), spec, scale)
    low = _truth(q, k, v, ke, ve, do, spec, scale, lowp=True)
    got = _run(q, k, v, ke, ve, do, opts, backend)
    assert got[0].dtype == dtype
    for name, x, r, lo in zip(NAMES, got, ref, low):
        if name != "lse":
            assert_matches(f"{case}/{name}/{dtype}", x, r, lo)


def test_cpu_float64_gradcheck():
    opts = dict(grid=(3, 5), window=2, num_prefix=1, num_suffix=1)
    spec = _spec(opts, 2)
    q, k, v, ke, ve, _ = _inputs(spec, 4, torch.float64, seed=11, b=1, h=1)
    leaves = [t.requires_grad_(True) for t in (q, k, v, ke, ve)]

    def f(q, k, v, ke, ve):
        return ditkernels.local_attention(q, k, v, **opts, extra_kv=(ke, ve), backend="cpu")

    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("name", ["cpu"])
def test_backends_agree_on_a_larger_grid(name):
    """cpu vs reference on a 24x24 grid (several 2-D tiles in each direction) with text tokens. (triton:
    test_triton_kernels_visit_exactly_the_plan runs 13x20 / 16x20 grids against float64; this grid took
    190 s in the interpreter.)"""
    opts = dict(grid=(24, 24), window=6, num_prefix=7)
    spec = _spec(opts, 0)
    q, k, v, _, _, do = _inputs(spec, 32, torch.float32, seed=5, b=1, h=2)
    a = _run(q, k, v, None, None, do, opts, name)
    ref = _truth(q.double(), k.double(), v.double(), None, None, do.double(), spec, 32 ** -0.5)
    for name, x, r in zip(NAMES, a, ref):
        if name != "lse":
            assert_matches(f"24x24/{name}", x, r)


# ---- the plan -------------------------------------------------------------------------------
PLAN_CASES = {
    "2d-7x13-circle-r3-P3-S2": (dict(grid=(7, 13), window=3, num_prefix=3, num_suffix=2), 0, (64, 64)),
    "2d-7x13-square-shift-r(2,4)": (dict(grid=(7, 13), window=(2, 4), shape="square", border="shift"), 0, (16, 32)),
    "2d-10x10-square-shift-r6": (dict(grid=(10, 10), window=6, shape="square", border="shift"), 0, (16, 16)),
    "2d-8x12-tile(4,4)-r1": (dict(grid=(8, 12), window=1, shape="tile", tile=4), 0, (16, 16)),
    "2d-7x13-tile(3,5)-r1-S5": (dict(grid=(7, 13), window=1, shape="tile", tile=(3, 5), num_suffix=5), 3, (64, 32)),
    "1d-97-circle-r5-P3-M5": (dict(grid=(97,), window=5, num_prefix=3), 5, (16, 16)),
    "3d-5x6x7-circle-r(1,2,3)": (dict(grid=(5, 6, 7), window=(1, 2, 3)), 0, (16, 32)),
    "3d-4x8x8-square-clip-r(0,1,2)": (dict(grid=(4, 8, 8), window=(0, 1, 2), shape="square"), 0, (64, 64)),
    "2d-20x20-circle-r(3,7)": (dict(grid=(20, 20), window=(3, 7)), 0, (64, 64)),
    "2d-7x13-r0": (dict(grid=(7, 13), window=0, num_prefix=2), 0, (64, 64)),
}


def _plan(opts, m, block):
    o = dict(opts)
    return ditkernels.local_attention_plan(o.pop("grid"), o.pop("window"), num_extra=m, block=block, **o)


@pytest.mark.parametrize("name", list(PLAN_CASES))
def test_plan_visibility_equals_reference(name):
    """The plan's tiles + element mask imply exactly the reference visibility; its visited tiles pass
    builders.check_plan_visits; the transposed CSR lists the same visits."""
    opts, m, block = PLAN_CASES[name]
    plan = _plan(opts, m, block)
    ref = local_visible(plan.spec)
    assert torch.equal(plan.element_mask(plan.mask)[0], ref)
    qt, kt, par = check_plan_visits(plan, ref)
    # the transposed CSR lists the same visits
    tq, tk, tp = plan.transposed().visits()
    a = sorted(zip(qt.tolist(), kt.tolist(), par.tolist()))
    b = sorted(zip(tk.tolist(), tq.tolist(), tp.tolist()))
    assert a == b


@pytest.mark.parametrize("grid,window,bar", [((64, 64), 8, 3.0), ((128, 128), 16, 2.0), ((256, 256), 16, 2.0)],
                         ids=["64x64-r8", "128x128-r16", "256x256-r16"])
def test_plan_efficiency_circle(grid, window, bar):
    plan = ditkernels.local_attention_plan(grid, window)  # the default (GPU) tiles of 64 x 64 tokens
    assert plan.block_m == 64 and plan.block_n == 64
    assert plan.computed_pairs / plan.useful_pairs <= bar
    assert plan.slot_pairs == plan.computed_pairs  # grid multiple of the tiles: no padding slots
    assert 0 < plan.partial_tiles <= plan.visited_tiles


@pytest.mark.parametrize("grid,tile,window", [((32, 48), (8, 8), 1), ((8, 16, 16), (4, 4, 4), (1, 1, 2)),
                                              ((256,), 64, 2), ((16, 32), (4, 16), (2, 1))],
                         ids=["2d-32x48-t8", "3d-8x16x16-t4", "1d-256-t64", "2d-16x32-t(4,16)"])
def test_plan_tile_shape_is_exact(grid, tile, window):
    plan = ditkernels.local_attention_plan(grid, window, shape="tile", tile=tile)
    assert plan.computed_pairs == plan.useful_pairs == plan.slot_pairs
    assert plan.partial_tiles == 0


def test_plan_useful_pairs_closed_form_matches_count():
    """useful_pairs is counted in closed form; check it against brute force on a circle with text."""
    plan = ditkernels.local_attention_plan((31, 17), (5, 3), num_prefix=4, num_suffix=1, num_extra=2)
    assert plan.useful_pairs == int(local_visible(plan.spec).sum())


@pytest.mark.parametrize("opts,m", [(dict(grid=(24, 24), window=6, num_prefix=7), 0),
                                    (dict(grid=(5, 6, 7), window=(1, 2, 3), num_suffix=2), 3)], ids=["2d", "3d"])
def test_cpu_kernel_visits_exactly_the_plan(opts, m):
    spec = _spec(opts, m)
    q, k, v, ke, ve, _ = _inputs(spec, 16, torch.float32, seed=1, b=2, h=3)
    extra = (ke, ve) if m else None
    ditkernels.local_attention(q, k, v, **opts, extra_kv=extra, backend="cpu")
    plan = kernel_plan(spec, cpu, 16, torch.float32)
    assert cpu.last_fwd_visits() == plan.visited_tiles * 2 * 3
    o = dict(opts)
    public = ditkernels.local_attention_plan(o.pop("grid"), o.pop("window"), num_extra=m, backend="cpu",
                                             head_dim=16, **o)
    assert public is plan  # the public plan is the cached object the kernel ran
    # the kernel trims partial visits: it computes every visible pair once, within the plan's tiles
    assert plan.useful_pairs * 6 <= cpu.last_fwd_pairs() <= plan.slot_pairs * 6
    assert (plan.block_m, plan.block_n) == cpu.local_block_sizes(16, torch.float32)


def test_cpu_plan_tiles_fp32_matches_float64():
    """The CPU plans' 16 x 4 query tiles (partial ones at the bottom) and 32-key row segments
    (ditkernels.backends.cpu.local_tiles), strided inputs, head_dim 40: with prefix tokens only, every
    KV tile is a run of tokens (the kernels read K and V in place); prefix + suffix tokens make one KV
    tile of two runs (K and V copied into tile panels)."""
    for opts in (dict(grid=(18, 36), window=(4, 6), num_prefix=3), dict(grid=(18, 36), window=5, num_prefix=2,
                                                                         num_suffix=2)):
        spec = _spec(opts, 0)
        plan = kernel_plan(spec, cpu, 40, torch.float32)
        assert plan.q_tile[1:] == (16, 4) and plan.kv_tile[1:] == (1, 32)
        q, k, v, _, _, do = _inputs(spec, 40, torch.float32, seed=7, b=1, h=2, strided=True)
        ref = _truth(q.double(), k.double(), v.double(), None, None, do.double(), spec, 40 ** -0.5)
        got = _run(q, k, v, None, None, do, opts, "cpu")
        for name, x, r in zip(NAMES, got, ref):
            assert_matches(f"{opts}/{name}", x, r)


# (options, extra keys, block, q_tile, kv_tile): 3-D tiles, 1-D tiles, tails, square / tile / circle
COUNT_CASES = {
    "2d-13x20-circle-r4-P7": (dict(grid=(13, 20), window=4, num_prefix=7), 0, (64, 64), None, None),
    "3d-5x6x7-circle-r(1,2,3)-S2-M3": (dict(grid=(5, 6, 7), window=(1, 2, 3), num_suffix=2), 3, (64, 32),
                                       (2, 4, 8), (1, 4, 8)),
    "1d-200-square-shift-r9-P3": (dict(grid=(200,), window=9, shape="square", border="shift", num_prefix=3), 0,
                                  (32, 64), None, None),
    "2d-16x20-tile(4,5)-r1-M5": (dict(grid=(16, 20), window=1, shape="tile", tile=(4, 5)), 5, (16, 32),
                                 (4, 4), (4, 8)),
}


@pytest.mark.parametrize("case", list(COUNT_CASES))
def test_triton_kernels_visit_exactly_the_plan(case):
    """Counters incremented inside the kernels (COUNT=1, one atomic per visit): forward, dK/dV (over
    the transposed CSR) and dQ each visit exactly the plan's (query tile, KV tile) pairs, once per
    batch*head, with the plan's partial flags; and their results match the reference on that plan."""
    from ditkernels.reference.attention import attention_ref_backward
    from ditkernels.triton_kernels import flash

    opts, m, block, qt, kt = COUNT_CASES[case]
    o = dict(opts)
    plan = ditkernels.local_attention_plan(o.pop("grid"), o.pop("window"), num_extra=m, block=block, q_tile=qt,
                                           kv_tile=kt, **o)
    b, h, d = 1, 2, 16
    g = torch.Generator().manual_seed(7)
    q = torch.randn(b, h, plan.seq_q, d, generator=g)
    k, v = (torch.randn(b, h, plan.seq_k, d, generator=g) for _ in range(2))
    do = torch.randn_like(q)
    counts = {name: torch.zeros(2, plan.num_q_tiles, plan.num_kv_tiles, dtype=torch.int32)
              for name in ("fwd", "bwd_dkdv", "bwd_dq")}
    out, lse = flash.flash_fwd(q, k, v, scale=0.25, schedule=plan, mask=plan.mask, visit_counts=counts)
    grads = flash.flash_bwd(do, q, k, v, out, lse, scale=0.25, schedule=plan, mask=plan.mask, visit_counts=counts)
    visited, partial = plan.tile_mask()
    for name, c in counts.items():
        assert torch.equal(c[0], visited[0].to(torch.int32) * b * h), f"{name}: visited tiles differ from the plan"
        assert torch.equal(c[1], partial[0].to(torch.int32) * b * h), f"{name}: partial flags differ from the plan"
        assert int(c[0].sum()) == plan.visited_tiles * b * h and int(c[1].sum()) == plan.partial_tiles * b * h
    vis = local_visible(plan.spec)
    ref, _ = attention_ref(q.double(), k.double(), v.double(), 0.25, vis)
    ref_grads = attention_ref_backward(do.double(), q.double(), k.double(), v.double(), 0.25, vis)
    assert rel_err(out, ref) <= 1e-5
    for name, a, r in zip(("dq", "dk", "dv"), grads, ref_grads):
        assert rel_err(a, r) <= 1e-5, name


def test_triton_plan_and_dispatch():
    """The triton backward runs the default GPU plan (64 x 64 tokens); CUDA tensors dispatch to the
    triton backend by default, CPU tensors only when asked for (here under TRITON_INTERPRET=1)."""
    from ditkernels.backends import triton as tb
    plan = kernel_plan(LocalSpec.make((16, 16), 3), tb, 64, torch.float16, backward=True)
    assert (plan.block_m, plan.block_n) == (64, 64)
    cuda, cpu_ = backends.Call(torch.device("cuda"), torch.float16), backends.Call(torch.device("cpu"), torch.float32)
    assert backends.resolve("local_attention", cuda).NAME == "triton"
    assert backends.resolve("local_attention", cpu_).NAME == "cpu"
    assert backends.resolve("local_attention", cpu_, "triton").NAME == "triton"
    q = torch.randn(1, 1, 20, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float64"):
        ditkernels.local_attention(q, q, q, (4, 5), 2, backend="triton")


def test_triton_forward_plan_shrinks_kv_tiles_for_small_windows():
    """A video window of radii (1, 4, 4) is small next to 64-key tiles: the triton forward runs 16-key
    tiles (computed/useful 9.8 -> 5.3); its backward keeps 64-key tiles (a dK/dV program owns one)."""
    from ditkernels.backends import triton as tb

    spec = LocalSpec.make((16, 64, 64), (1, 4, 4))
    fwd = kernel_plan(spec, tb, 64, torch.float16)
    bwd = kernel_plan(spec, tb, 64, torch.float16, backward=True)
    assert (fwd.block_m, fwd.block_n) == (64, 16) and (bwd.block_m, bwd.block_n) == (64, 64)
    assert fwd.computed_pairs / fwd.useful_pairs < 5.3 and bwd.computed_pairs / bwd.useful_pairs > 9.8
    public = ditkernels.local_attention_plan((16, 64, 64), (1, 4, 4), backend="triton", dtype=torch.float16)
    assert public is fwd
    # a window wide next to the tiles keeps them
    assert kernel_plan(LocalSpec.make((64, 64), 8), tb, 64, torch.float16).block_n == 64


@pytest.mark.parametrize("block", [(128, 32), (32, 128), (64, 64)], ids=lambda b: f"bm{b[0]}-bn{b[1]}")
def test_cpu_kernels_run_any_plan(block):
    """The cpu kernels on plans other than their own: tiles larger than a row group (several lane
    groups, chunks split inside a tile) and the per-chunk mask path."""
    from ditkernels.reference.attention import attention_ref_backward

    plan = ditkernels.local_attention_plan((13, 21), 4, num_prefix=3, num_suffix=1, num_extra=2, block=block)
    g = torch.Generator().manual_seed(block[0])
    q = torch.randn(1, 2, plan.seq_q, 16, generator=g, dtype=torch.float64)
    k, v = (torch.randn(1, 2, plan.seq_k, 16, generator=g, dtype=torch.float64) for _ in range(2))
    do = torch.randn_like(q)
    vis = local_visible(plan.spec)
    out, lse = cpu.flash_fwd(q, k, v, scale=0.25, schedule=plan, mask=plan.mask)
    grads = cpu.flash_bwd(do, q, k, v, out, lse, scale=0.25, schedule=plan, mask=plan.mask)
    ref, _ = attention_ref(q, k, v, 0.25, vis)
    ref_grads = attention_ref_backward(do, q, k, v, 0.25, vis)
    assert rel_err(out, ref) <= 1e-12
    for a, b in zip(grads, ref_grads):
        assert rel_err(a, b) <= 1e-12


# ---- parity with the implementations users come from -------------------------------------------
def _clear_mask_mod(height: int, width: int, text_length: int, window_size: int):
    """CLEAR's FlexAttention mask_mod (text tokens first, then the raster image, circle window)."""

    def local_mask(b, h, q_idx, kv_idx):
        q_y, q_x = (q_idx - text_length) // width, (q_idx - text_length) % width
        kv_y, kv_x = (kv_idx - text_length) // width, (kv_idx - text_length) % width
        near = (q_y - kv_y) ** 2 + (q_x - kv_x) ** 2 < window_size ** 2
        return (q_idx < text_length) | (kv_idx < text_length) | near

    return local_mask


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_parity_with_flex_attention_clear_mask(backend):
    flex = pytest.importorskip("torch.nn.attention.flex_attention")
    height, width, text, r = 12, 10, 9, 4
    seq = text + height * width
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, seq, 32, generator=g) for _ in range(3))
    bm = flex.create_block_mask(_clear_mask_mod(height, width, text, r), B=None, H=None, Q_LEN=seq, KV_LEN=seq,
                                device="cpu")
    want = flex.flex_attention(q, k, v, block_mask=bm)
    got = ditkernels.local_attention(q, k, v, (height, width), r, num_prefix=text, backend=backend)
    assert rel_err(got, want) <= 1e-5


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.filterwarnings("ignore:return_lse is deprecated")
def test_parity_with_natten_na2d(backend):
    natten = pytest.importorskip("natten")
    height, width, r = 11, 14, 2
    g = torch.Generator().manual_seed(1)
    # natten layout: (batch, H, W, heads, head_dim)
    q, k, v = (torch.randn(1, height, width, 2, 16, generator=g) for _ in range(3))
    try:
        want = natten.functional.na2d(q, k, v, kernel_size=2 * r + 1)
    except Exception as e:  # noqa: BLE001 - natten decides what it can run on this machine
        pytest.skip(f"natten.functional.na2d cannot run here: {type(e).__name__}: {e}")

    def ours(t):
        return t.reshape(1, height * width, 2, 16).transpose(1, 2)

    got = ditkernels.local_attention(ours(q), ours(k), ours(v), (height, width), r, shape="square", border="shift",
                                     backend=backend)
    assert rel_err(got, ours(want)) <= 1e-5


# ---- API ----------------------------------------------------------------------------------------
@pytest.mark.slow  # traces forward and backward through AOTAutograd
def test_compile_fullgraph_forward_and_backward():
    opts = dict(grid=(6, 7), window=2, num_prefix=2)
    spec = _spec(opts, 3)
    q, k, v, ke, ve, do = _inputs(spec, 16, torch.float32, seed=2, b=1, h=2)
    leaves = [t.requires_grad_(True) for t in (q, k, v, ke, ve)]

    def f(q, k, v, ke, ve):
        return ditkernels.local_attention(q, k, v, **opts, extra_kv=(ke, ve), backend="cpu")

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(*leaves)
    grads = torch.autograd.grad(out, leaves, do)
    want = f(*leaves)
    want_grads = torch.autograd.grad(want, leaves, do)
    assert torch.equal(out, want)
    for a, b in zip(grads, want_grads):
        assert torch.equal(a, b)


def test_return_lse_and_default_backend():
    q, k, v = (torch.randn(1, 1, 20, 8) for _ in range(3))
    out, lse = ditkernels.local_attention(q, k, v, (4, 5), 2, return_lse=True)
    assert out.shape == q.shape and lse.shape == (1, 1, 20) and lse.dtype == torch.float32
    vis = local_visible(LocalSpec.make((4, 5), 2))
    ref, ref_lse = attention_ref(q.double(), k.double(), v.double(), 8 ** -0.5, vis)
    assert rel_err(out, ref) <= 1e-5 and rel_err(lse, ref_lse) <= 1e-6


@pytest.mark.parametrize("kwargs,exc,words", [
    (dict(grid=(4, 6), window=2, num_prefix=1), ValueError, "q: expected seq"),
    (dict(grid=(4, 5, 1, 1), window=1), ValueError, "grid"),
    (dict(grid=[4, 0], window=1), ValueError, "grid[1]"),
    (dict(grid=(4, 5), window=-1), ValueError, "window"),
    (dict(grid=(4, 5), window=(1, 2, 3)), ValueError, "window"),
    (dict(grid=(4, 5), window=1.5), TypeError, "window"),
    (dict(grid=(4, 5), window=1, shape="diamond"), ValueError, "shape"),
    (dict(grid=(4, 5), window=1, border="wrap"), ValueError, "border"),
    (dict(grid=(4, 5), window=1, border="shift"), ValueError, "border"),
    (dict(grid=(4, 5), window=1, shape="tile"), ValueError, "tile"),
    (dict(grid=(4, 5), window=1, tile=2), ValueError, "tile"),
    (dict(grid=(4, 5), window=1, num_prefix=-1), ValueError, "num_prefix"),
    (dict(grid=(4, 5), window=1, backend="cuda-please"), ValueError, "backend"),
    (dict(grid=(4, 5), window=1, extra_kv=torch.zeros(1)), TypeError, "extra_kv"),
    (dict(grid=(4, 5), window=1, extra_kv=(torch.zeros(1, 1, 3, 8), torch.zeros(1, 1, 3, 4))), ValueError,
     "extra_kv[1]"),
    (dict(grid=(4, 5), window=1, extra_kv=(torch.zeros(1, 1, 3, 8, dtype=torch.float64),) * 2), TypeError,
     "extra_kv[0]"),
    (dict(grid=(4, 5), window=(2 ** 20, 2 ** 20)), ValueError, "window"),
])
def test_errors_name_the_argument(kwargs, exc, words):
    q, k, v = (torch.randn(1, 1, 20, 8) for _ in range(3))
    with pytest.raises(exc, match=words.replace("[", r"\[").replace("]", r"\]")):
        ditkernels.local_attention(q, k, v, **kwargs)


def test_plan_errors():
    with pytest.raises(ValueError, match="q_tile"):
        ditkernels.local_attention_plan((8, 8), 2, q_tile=(4, 4))
    with pytest.raises(ValueError, match="block"):
        ditkernels.local_attention_plan((8, 8), 2, block=(0, 64))
