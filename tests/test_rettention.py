"""Re-ttention (docs/spec.md §3): reference vs the released algorithm, every backend vs the float64 reference,
the band mask's schedule, ReCache / ReSchedule / ReStepper, nn.ReAttention."""

from __future__ import annotations

import math

import pytest
import torch

import ditkernels
from ditkernels import backends
from ditkernels import Band, BlockTopK, LocalWindow, ReCache, ReSchedule, ReStepper, rettention
from ditkernels.ops.rettention import band_schedule, dense_visible
from ditkernels.reference.attention import attention_ref
from ditkernels.reference.rettention import band_visible
from ditkernels.schedule import MASK_BAND, ElementMask
from numerics import ATTENTION_BACKENDS, assert_matches, attention_lowp, rel_err



def _backend_dtypes(backend: str):
    return (torch.float32, torch.float16, torch.bfloat16) if backend == "triton" else \
        (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def structured(b: int, h: int, s: int, d: int, *, locality: float = 1.5, seed: int = 0, steps: int = 1,
               drift: float = 0.05, dtype: torch.dtype = torch.float64):
    """q, k, v for ``steps`` denoising steps: a shared positional code (so attention is local-ish, as in
    a DiT) plus smooth random fields that drift between steps. Returns a list of (q, k, v)."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.arange(s, dtype=torch.float64)[:, None]
    freqs = torch.exp(-torch.linspace(0, 4, d // 2, dtype=torch.float64))[None, :] * 0.7
    code = torch.cat([torch.cos(pos * freqs), torch.sin(pos * freqs)], 1)
    code = torch.nn.functional.pad(code, (0, d - code.shape[1])) * locality

    def field():
        return torch.randn(b, h, s, d, generator=g, dtype=torch.float64)

    base = [field() for _ in range(3)]
    vel = [field() for _ in range(3)]
    out = []
    for t in range(steps):
        q, k, v = (base[i] + drift * t * vel[i] for i in range(3))
        out.append(((q + code).to(dtype), (k + code).to(dtype), v.to(dtype)))
    return out


# ------------------------------------------------------------------------------------------------
# The released algorithm (PixArt processor of cccrrrccc/Re-ttention), transcribed in float64 with
# dense masks: full steps 0-4 cache the ratio, steps 5, 10, 15 cache the residual full - window, the
# other steps add it to the ratio-scaled window attention and then grow the ratio by 0.04.
# ------------------------------------------------------------------------------------------------
def _released_probs(q, k, scale, mask=None, ratio=None):
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        s = s + (1.0 - mask.to(s.dtype)) * -1e5
    e = torch.exp(s - s.max(-1, keepdim=True).values)
    den = e.sum(-1, keepdim=True)
    return e / (den if ratio is None else den / ratio)


def released_pixart(steps, mask, *, drift=0.04, clamp=False):
    """Outputs of the released PixArt schedule (attention space; the output projection is linear, so
    caching the residual before or after it is the same). ``clamp``: the clamped variant of docs/spec.md §3."""
    outs, cached_ratio, cached_residual = [], None, None
    for stepi, (q, k, v) in enumerate(steps):
        q, k, v = q.double(), k.double(), v.double()
        scale = q.shape[-1] ** -0.5
        s = torch.matmul(q, k.transpose(-1, -2)) * scale
        e = torch.exp(s - s.max(-1, keepdim=True).values)
        full = torch.matmul(e / e.sum(-1, keepdim=True), v)
        ratio = (e * mask).sum(-1, keepdim=True) / e.sum(-1, keepdim=True)
        if stepi < 5:
            out, cached_ratio = full, ratio
        elif stepi in (5, 10, 15):
            cached_ratio = ratio.float().double()  # ditkernels caches rho in float32 (docs/spec.md §3)
            w = torch.matmul(_released_probs(q, k, scale, mask, cached_ratio), v)
            out, cached_residual = full, full - w
        else:
            r = cached_ratio.clamp(max=1.0) if clamp else cached_ratio
            out = torch.matmul(_released_probs(q, k, scale, mask, r), v) + cached_residual
            cached_ratio = cached_ratio + drift
        outs.append(out)
    return outs


@pytest.mark.parametrize("clamp", [False, True], ids=["released-noclamp", "clamped"])
@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
def test_equals_released_algorithm_pixart(backend, clamp):
    dtype = torch.float32 if backend == "triton" else torch.float64
    # the interpreter is slow: a smaller problem for triton
    b, h, s, d = (1, 2, 130, 32) if backend == "triton" else (2, 2, 200, 32)
    steps = structured(b, h, s, d, steps=20, locality=2.0, seed=1)
    band = Band()  # w = int(s / 32): half-width 3 (s=200) or 2 (s=130)
    visible = band_visible(s, s, int(s / 32) // 2, 0, s).double()
    expected = released_pixart(steps, visible, clamp=clamp)
    stepper = ReStepper("pixart", band, clamp=clamp, backend=backend)
    saw_clamp = False
    for t, (q, k, v) in enumerate(steps):
        if stepper.next_mode() == "sparse":
            saw_clamp |= bool((stepper.cache.rho + 0.04 * stepper.cache.n > 1).any())
        out = stepper(q.to(dtype), k.to(dtype), v.to(dtype))
        err = rel_err(out, expected[t])
        # rho and rho_hat are float32 (docs/spec.md §3), so float64 inputs agree to ~1e-7, not to 1e-15
        assert err <= (2e-5 if dtype == torch.float32 else 1e-6), f"step {t}: relative error {err:.3e}"
    assert saw_clamp, "the inputs never pushed rho + drift * n over 1: the clamp was not exercised"
    assert stepper.step == 20


def _masks(backend: str):
    masks = [pytest.param(Band(width=24), 0, id="band24"),
             pytest.param(Band(width=6, frames=5, num_prefix=7, num_suffix=3), 10, id="band-frames5-p7-s3"),
             pytest.param(Band(width=0), 0, id="band-diag"),
             pytest.param(Band(width=21, num_prefix=70, num_suffix=5), 75, id="band21-p70-s5"),
             pytest.param(BlockTopK(topk=2, block_size=(32, 32)), 0, id="topk2-b32"),
             pytest.param(BlockTopK(density=0.3, block_size=(16, 32), num_prefix=3), 0, id="topk-d0.3-b16x32-p3")]
    if backend in backends.supporting("local_attention"):
        masks.append(pytest.param(LocalWindow((7, 13), 3, num_prefix=2), 2, id="local7x13-r3-p2"))
        masks.append(pytest.param(LocalWindow((7, 13), (2, 4), shape="square", num_suffix=5), 5,
                                  id="local7x13-sq-s5"))
    return masks


def _cases():
    for backend in ATTENTION_BACKENDS:
        for dtype in _backend_dtypes(backend):
            for mask in _masks(backend):
                yield pytest.param(backend, dtype, *mask.values, id=f"{backend}-{str(dtype)[6:]}-{mask.id}")


def _seq(mask, extra: int) -> int:
    if isinstance(mask, LocalWindow):
        return math.prod(mask.grid) + extra
    return 19 * mask.frames + extra if getattr(mask, "frames", 1) > 1 else 97 + extra  # frames of 19 tokens


def _lowp_steps(steps, visible, scale, drift, clamp):
    """The reference run in the inputs' low dtype (docs/verify.md §4): plain attention in that dtype."""
    outs, rho, res = [], None, None
    for i, (q, k, v) in enumerate(steps):
        if i == 0:
            full = attention_lowp(q, k, v, scale)
            s = torch.matmul(q, k.transpose(-1, -2)).float() * scale
            rho = (torch.logsumexp(s.masked_fill(~visible, float("-inf")), -1) - torch.logsumexp(s, -1)).exp()
            res = (full.float() - rho[..., None] * attention_lowp(q, k, v, scale, visible).float()).to(q.dtype)
            outs.append(full)
        else:
            r = rho + drift * (i - 1)
            r = r.clamp(max=1.0) if clamp else r
            outs.append((r[..., None] * attention_lowp(q, k, v, scale, visible).float() + res.float()).to(q.dtype))
    return outs


@pytest.mark.parametrize("backend,dtype,mask,extra", list(_cases()))
def test_backend_matches_reference(backend, dtype, mask, extra):
    """A refresh then three sparse steps on drifting inputs (head_dim 40, odd sequence lengths)."""
    s = _seq(mask, extra)
    steps = structured(2, 3, s, 40, steps=4, seed=2)
    state, state64 = ReCache(), ReCache()
    outs, refs = [], []
    for i, (q, k, v) in enumerate(steps):
        mode = "refresh" if i == 0 else "sparse"
        outs.append(rettention(q.to(dtype), k.to(dtype), v.to(dtype), state, mode, mask=mask, backend=backend))
        refs.append(rettention(q, k, v, state64, mode, mask=mask, backend="reference"))
        if i == 0:
            assert state.rho.dtype == torch.float32 and state.rho.shape == (2, 3, s)
            assert state.residual.dtype == dtype and state.residual.shape == (2, 3, s, 40)
            assert_matches("rho", state.rho, state64.rho, fp32_tol=1e-6) if dtype in (torch.float32, torch.float64) \
                else None
    lowp = None
    if dtype in (torch.float16, torch.bfloat16):
        vis = dense_visible(mask, steps[0][0], steps[0][1], 40 ** -0.5)
        lowp = _lowp_steps([tuple(t.to(dtype) for t in st) for st in steps], vis, 40 ** -0.5, 0.04, True)
    for i, (o, r) in enumerate(zip(outs, refs)):
        assert_matches(f"step {i}", o, r, lowp[i] if lowp else None, fp32_tol=1e-5)
    assert state.n == 3


@pytest.mark.parametrize("backend", ATTENTION_BACKENDS)
@pytest.mark.parametrize("mask,extra", [pytest.param(Band(), 0, id="band-default"),
                                        pytest.param(Band(width=10, frames=3, num_prefix=4), 7, id="band-frames"),
                                        pytest.param(BlockTopK(density=0.1, block_size=(32, 16)), 0, id="topk")])
def test_sparse_right_after_refresh_is_full_attention(backend, mask, extra):
    dtype = torch.float32 if backend == "triton" else torch.float64
    seq = 257 + extra - (257 + extra - 4) % 3 if getattr(mask, "frames", 1) > 1 else 257
    q, k, v = structured(1, 2, seq, 64, seed=3, dtype=dtype)[0]
    state = ReCache()
    full = rettention(q, k, v, state, "refresh", mask=mask, backend=backend)
    again = rettention(q, k, v, state, "sparse", backend=backend)
    dense, _ = attention_ref(q.double(), k.double(), v.double(), 64 ** -0.5)
    tol = 2e-6 if dtype == torch.float32 else 1e-12
    assert rel_err(full, dense) <= tol and rel_err(again, dense) <= tol
    assert 0 < float(state.rho.min()) and float(state.rho.max()) <= 1 + 1e-6


@pytest.mark.parametrize("backend", ("reference", "cpu"))
def test_sparse_right_after_refresh_local_window(backend):
    mask = LocalWindow((9, 11), 2, num_suffix=3)
    q, k, v = structured(2, 2, 102, 40, seed=4)[0]
    state = ReCache()
    rettention(q, k, v, state, "refresh", mask=mask, backend=backend)
    again = rettention(q, k, v, state, "sparse", backend=backend)
    dense, _ = attention_ref(q, k, v, 40 ** -0.5)
    assert rel_err(again, dense) <= 1e-12


# ------------------------------------------------------------------------------------------------
# The band mask and its schedule
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seq,bm,bn,half,lo,hi,frame", [
    (200, 64, 64, 3, 0, 200, 0), (257, 32, 16, 10, 5, 250, 0), (97, 16, 32, 2, 3, 93, 18),
    (300, 64, 64, 40, 10, 290, 28), (64, 16, 16, 0, 0, 64, 0), (130, 64, 32, 200, 0, 130, 0),
    (91, 16, 16, 1, 1, 91, 9)], ids=lambda x: str(x))
def test_band_schedule_is_the_mask(seq, bm, bn, half, lo, hi, frame):
    sched = band_schedule(seq, bm, bn, half, lo, hi, frame)
    dense = band_visible(seq, seq, half, lo, hi, frame)
    assert torch.equal(sched.element_mask(ElementMask(MASK_BAND, (half, lo, hi, frame)))[0], dense)
    visited, partial = sched.tile_mask()
    # Tiles that hold no visible pair are not visited; non-partial visits are fully visible.
    nq, nk = sched.num_q_tiles, sched.num_kv_tiles
    pad = torch.zeros(nq * bm, nk * bn, dtype=torch.bool)
    pad[:seq, :seq] = dense
    inb = torch.zeros_like(pad)
    inb[:seq, :seq] = True
    tiles_any = pad.reshape(nq, bm, nk, bn).any(3).any(1)
    tiles_all = (pad | ~inb).reshape(nq, bm, nk, bn).all(3).all(1)
    assert torch.equal(visited[0], tiles_any)
    assert torch.equal(partial[0], tiles_any & ~tiles_all)


def test_band_defaults_follow_released_code():
    assert Band().params(4096) == (64, 0, 4096, 0)  # w = int(4096 / 32) = 128
    assert Band(width=7).params(100) == (3, 0, 100, 0)
    # video: 226 text tokens first, 13 frames of 1350 tokens: the band runs within each frame
    assert Band(frames=13, num_prefix=226).params(226 + 13 * 1350) == (21, 226, 226 + 13 * 1350, 1350)
    d = band_visible(10, 10, 1, 0, 10)
    assert d[0, 1] and not d[0, 2] and d[9, 8] and int(d.sum()) == 28


# ------------------------------------------------------------------------------------------------
# Schedules, state, errors
# ------------------------------------------------------------------------------------------------
def test_released_schedules():
    pixart = ReSchedule.preset("pixart").modes()
    assert pixart[:5] == ["full"] * 5
    assert [i for i, m in enumerate(pixart) if m == "refresh"] == [5, 10, 15] and len(pixart) == 20
    hun = ReSchedule.preset("hunyuan-dit").modes()
    assert hun[:10] == ["full"] * 10 and len(hun) == 50
    assert [i for i, m in enumerate(hun) if m == "refresh"] == [i for i in range(10, 50) if i % 5 == 0]
    cog = ReSchedule.preset("cogvideox").modes()
    assert cog[:15] == ["full"] * 15 and [i for i, m in enumerate(cog) if m == "refresh"] == list(range(15, 50, 5))
    assert ReSchedule(2, 3).mode(7) == "sparse" and ReSchedule(2, 3).mode(8) == "refresh"


def test_errors():
    q, k, v = structured(1, 2, 64, 16, dtype=torch.float32)[0]
    state = ReCache()
    with pytest.raises(RuntimeError, match="needs a refresh first"):
        rettention(q, k, v, state, "sparse", mask=Band())
    with pytest.raises(ValueError, match="mode"):
        rettention(q, k, v, state, "dense")
    with pytest.raises(TypeError, match="state"):
        rettention(q, k, v, {}, "refresh")
    with pytest.raises(TypeError, match="mask"):
        rettention(q, k, v, state, "refresh", mask="band")
    rettention(q, k, v, state, "refresh", mask=Band(width=8))
    with pytest.raises(ValueError, match="mask of the last refresh"):
        rettention(q, k, v, state, "sparse", mask=Band(width=4))
    with pytest.raises(ValueError, match="state"):
        rettention(q[:, :1], k[:, :1], v[:, :1], state, "sparse")
    with pytest.raises(ValueError, match="frames"):
        rettention(q, k, v, ReCache(), "refresh", mask=Band(frames=5))
    with pytest.raises(ValueError, match="exactly one"):
        BlockTopK(topk=2, density=0.1)
    with pytest.raises(ValueError, match="Band.width"):
        Band(width=-1)
    with pytest.raises(ValueError, match="seq"):
        rettention(q, k, v, ReCache(), "refresh", mask=LocalWindow((7, 7), 2))
    with pytest.raises(ValueError, match="full_steps"):
        ReSchedule(-1, 5)
    with pytest.raises(ValueError, match="name"):
        ReSchedule.preset("sdxl")


@pytest.mark.parametrize("mode", ["refresh", "sparse"])
def test_backward_raises(mode):
    q, k, v = structured(1, 1, 64, 16, dtype=torch.float32)[0]
    state = ReCache()
    rettention(q, k, v, state, "refresh")
    q = q.clone().requires_grad_(True)
    out = rettention(q, k, v, state, mode)
    with pytest.raises(NotImplementedError, match="inference-only"):
        out.sum().backward()
    # the full step is dense attention, differentiable
    full = rettention(q, k, v, state, "full")
    full.sum().backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()


def test_compile_fullgraph():
    """torch.compile(fullgraph=True) traces the functional API (refresh, then sparse steps)."""
    steps = structured(1, 2, 97, 32, steps=3, dtype=torch.float32)
    band = Band(width=10)
    state, eager = ReCache(), ReCache()

    def step(q, k, v, mode):
        return rettention(q, k, v, state, mode, mask=band, backend="cpu")

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for i, (q, k, v) in enumerate(steps):
        mode = "refresh" if i == 0 else "sparse"
        out = compiled(q, k, v, mode)
        ref = rettention(q, k, v, eager, mode, mask=band, backend="cpu")
        assert rel_err(out, ref) < 1e-6
    assert state.n == 2 and torch.equal(state.rho, eager.rho)


# ------------------------------------------------------------------------------------------------
# nn.ReAttention
# ------------------------------------------------------------------------------------------------
class TimmAttention(torch.nn.Module):
    """timm's Attention (and DiT's) layout and math, dense."""

    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = torch.nn.Linear(dim, 3 * dim, bias=True)
        self.q_norm = self.k_norm = torch.nn.Identity()
        self.attn_drop = torch.nn.Dropout(0.0)
        self.proj = torch.nn.Linear(dim, dim)
        self.proj_drop = torch.nn.Dropout(0.0)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


def _tokens(b, n, dim, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0, dx = torch.randn(b, n, dim, generator=g), torch.randn(b, n, dim, generator=g)
    return [x0 + 0.05 * t * dx for t in range(steps)]


def test_reattention_loads_timm_weights_and_counts_steps():
    torch.manual_seed(0)
    timm_attn = TimmAttention(64, 4)
    m = ReAttention = ditkernels.nn.ReAttention(64, 4, qkv_bias=True, mask=Band(width=8), schedule="pixart")
    assert set(m.state_dict()) == set(timm_attn.state_dict())
    m.load_state_dict(timm_attn.state_dict())
    m2 = ReAttention.from_timm(timm_attn, mask=Band(width=8))
    xs = _tokens(2, 70, 64, 21)
    with torch.no_grad():
        outs = [m(x) for x in xs]
        for t in range(5):  # full steps: dense attention
            assert rel_err(outs[t], timm_attn(xs[t])) < 1e-5
        assert rel_err(outs[5], timm_attn(xs[5])) < 1e-5  # refresh: full attention
        assert rel_err(outs[6], timm_attn(xs[6])) > 1e-6  # sparse: an approximation
        # call 21 starts a new generation: step 0 again, dense
        assert m.step == 1 and rel_err(outs[20], timm_attn(xs[20])) < 1e-5
        m2.reset()
        assert rel_err(m2(xs[0]), outs[0]) < 1e-6


def test_reattention_reset_and_cfg_batch():
    torch.manual_seed(1)
    mods = [ditkernels.nn.ReAttention(32, 2, mask=Band(width=6), schedule=ReSchedule(2, 3, 9)) for _ in range(3)]
    for m in mods[1:]:
        m.load_state_dict(mods[0].state_dict())
    cond, uncond = _tokens(1, 50, 32, 9, seed=1), _tokens(1, 50, 32, 9, seed=2)
    with torch.no_grad():
        for t in range(9):
            both = mods[0](torch.cat([cond[t], uncond[t]]))  # CFG: both halves in one call
            alone_c, alone_u = mods[1](cond[t]), mods[2](uncond[t])
            assert rel_err(both[:1], alone_c) < 1e-6 and rel_err(both[1:], alone_u) < 1e-6
        # explicit reset mid-generation, and a shape change, restart at step 0 (dense)
        mods[0](torch.cat([cond[0], uncond[0]]))
        mods[0].reset()
        assert mods[0].step == 0 and mods[0].stepper.next_mode() == "full"
        mods[1](cond[0])
        mods[1](cond[1])
        mods[1](cond[2])
        assert mods[1].stepper.cache.ready
        mods[1](torch.cat([cond[3], cond[3]]))  # batch changed: a new generation
        assert mods[1].step == 1 and not mods[1].stepper.cache.ready


def test_no_seq_by_seq_memory_at_32k():
    """A refresh and a sparse step at seq 32768 on the cpu backend stay within 1 GB of extra peak RSS
    (one float32 score matrix would be 4 GiB). Fresh process: ru_maxrss is a process-wide peak."""
    import json
    import subprocess
    import sys

    code = ("import json; from ditkernels.bench.rettention import memory_check; "
            "print(json.dumps(memory_check(32768, 1, 16)))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr
    m = json.loads(res.stdout.strip().splitlines()[-1])
    assert m["refresh_extra_mb"] < 1024 and m["sparse_extra_mb"] < 1024, m


def test_bench_families_run(tmp_path, capsys):
    """``ditkernels bench --filter rettention``: speed rows (sparse step right after a refresh with drift 0
    is full attention) and the quality rows (Re-ttention closer to dense than plain sparse attention)."""
    import json

    from ditkernels.bench.runner import main

    rc = main(["--device", "cpu", "--out", str(tmp_path), "--tag", "t", "--no-progress", "--reps", "1",
               "--warmup", "0", "--no-plot", "--quick", "--sizes", "16", "--mode", "fwd", "--filter", "rettention"])
    capsys.readouterr()
    assert rc == 0
    rows = {(r["family"], r["impl"]): r for r in json.loads((tmp_path / "t.json").read_text())["rows"]}
    assert all(r["status"] == "ok" for r in rows.values()), [r["reason"] for r in rows.values()]
    assert rows["rettention.speed", "re-sparse"]["rel_err_vs_ref"] < 1e-5
    assert rows["rettention.speed", "re-refresh"]["rel_err_vs_ref"] < 1e-5
    q_sparse, q_re = rows["rettention.quality", "sparse"], rows["rettention.quality", "rettention"]
    assert q_re["rel_err_vs_ref"] < q_sparse["rel_err_vs_ref"]


def test_stepper_as_attention_callable():
    """ReStepper(q, k, v, *, grid, num_prefix, num_suffix, scale): the signature of the diffusers
    processors' attention callable; the call's token layout goes into the mask."""
    steps = structured(1, 2, 4 + 81 + 2, 16, steps=7, seed=6)
    local = ReStepper(ReSchedule(1, 3), LocalWindow((1, 1), 1), backend="reference")
    band = ReStepper(ReSchedule(1, 3), Band(width=8), backend="reference")
    state_l, state_b = ReCache(), ReCache()
    for t, (q, k, v) in enumerate(steps):
        mode = ReSchedule(1, 3).mode(t)
        out_l = local(q, k, v, grid=(9, 9), num_prefix=4, num_suffix=2, scale=0.3)
        out_b = band(q, k, v, grid=(9, 9), num_prefix=4, num_suffix=2, scale=0.3)
        ref_l = rettention(q, k, v, state_l, mode, mask=LocalWindow((9, 9), 1, num_prefix=4, num_suffix=2),
                           scale=0.3, backend="reference")
        ref_b = rettention(q, k, v, state_b, mode, mask=Band(width=8, num_prefix=4, num_suffix=2), scale=0.3,
                           backend="reference")
        assert torch.equal(out_l, ref_l) and torch.equal(out_b, ref_b)
    assert local.step == 7 and local.cache.n == 2


@pytest.mark.parametrize("how", ["make_attn_fn", "module_cls"])
def test_swap_attention_rettention(how):
    """swap_attention with a ReStepper per layer (or module_cls=ReAttention): dense in the full steps,
    a separate cache per layer, Re-ttention's sparse step after the refresh."""
    torch.manual_seed(5)
    model = torch.nn.Sequential(TimmAttention(32, 2), TimmAttention(32, 2))
    xs = _tokens(2, 40, 32, 4, seed=3)
    with torch.no_grad():
        dense = [model(x) for x in xs]
    sched = ReSchedule(2, 2)
    if how == "make_attn_fn":
        names = ditkernels.swap_attention(model, make_attn_fn=lambda name, old: ReStepper(
            sched, Band(width=6), backend="cpu"))
        assert type(model[0]) is ditkernels.nn.GridAttention
    else:
        names = ditkernels.swap_attention(model, module_cls=ditkernels.nn.ReAttention, mask=Band(width=6),
                                          schedule=sched, backend="cpu")
        assert isinstance(model[0], ditkernels.nn.ReAttention) and set(model.state_dict()) == {
            f"{i}.{p}.{w}" for i in "01" for p in ("qkv", "proj") for w in ("weight", "bias")}
    assert names == ["0", "1"] and model[0].attn_fn is not model[1].attn_fn
    with torch.no_grad():
        outs = [model(x) for x in xs]
    for t in range(3):  # full, full, refresh: dense attention
        assert rel_err(outs[t], dense[t]) < 1e-5
    assert rel_err(outs[3], dense[3]) > 1e-6  # sparse: an approximation
    assert model[0].attn_fn.step == 4 and model[1].attn_fn.step == 4
