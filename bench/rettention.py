"""Re-ttention: speed of its steps against dense attention, and its quality over a sampling schedule.

``rettention.speed`` (one run, side by side): the sparse step (one fused sparse pass + epilogue) and
the refresh step (dense pass + sparse pass) of ``ditkernels.rettention`` vs SDPA dense and the
ditkernels dense core, for the band, local-window and block top-k masks at 3.1 % density.
CPU: B=1, H=8, S=4096 (a 64x64 grid), D=64, fp32 (``--sizes N``: an N x N grid). The sparse step
runs with ``drift=0`` right after a refresh on the same inputs, so its output is full attention and
its rel.err column checks it. Useful FLOPs: the dense count for every row (the work a step
replaces), so the FLOP/s of the sparse rows are *effective* rates; compare times / speed-ups.

``rettention.quality``: 20 steps of the PixArt schedule (full 0-4, refresh 5, 10, 15) on structured
inputs: smooth random q/k/v fields on a 32x32 token grid plus a shared 2-D positional code (so
attention is local-ish, as in a DiT), drifting a little every step. Implementations: ``full`` (dense
every step, the reference), ``sparse`` (plain sparse attention from step 5 on) and ``rettention``.
Their output is the stack of steps 5-19, so rel.err is the relative error over the accelerated part
of the schedule and time is the whole 20-step run; the note gives the per-step errors. Masks: band,
local window (circle) and block top-k (32-token blocks) at 3.1 %, 6.25 % and 12.5 % density.
``python -m ditkernels.bench.rettention`` prints the quality as one table.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from .runner import Case, SkipImpl, SweepConfig, dtype_name, register

BATCH, HEADS, HEAD_DIM = 1, 8, 64
DENSITIES = (1 / 32, 1 / 16, 1 / 8)
Q_SIDE, Q_HEADS, Q_STEPS = 32, 4, 20


def _qkv(inputs: dict[str, torch.Tensor]):
    return inputs["q"], inputs["k"], inputs["v"]


def make_mask(kind: str, side: int, density: float):
    """The mask of ``kind`` ("band", "local", "topk") nearest ``density`` on a side x side grid."""
    import ditkernels

    n = side * side
    if kind == "band":
        return ditkernels.Band(width=max(int(round(density * n)) - 1, 0))
    if kind == "local":
        from ditkernels.ops.local import local_attention_plan

        best = min(range(1, side), key=lambda r: abs(local_attention_plan((side, side), r).useful_pairs / n / n
                                                     - density))
        return ditkernels.LocalWindow((side, side), best)
    block = 64 if n >= 4096 else 32
    return ditkernels.BlockTopK(density=density, block_size=(block, block))


def visible_fraction(mask, q: torch.Tensor, k: torch.Tensor) -> float:
    """Fraction of query-key pairs in the mask (evaluated densely for the first head: small problems)."""
    from ditkernels.ops.rettention import dense_visible

    vis = dense_visible(mask, q[:1, :1], k[:1, :1], q.shape[-1] ** -0.5)
    return float(vis.float().mean())


def _mask_pairs(mask, seq: int) -> float:
    """Visible pairs of the mask (without a dense matrix where possible)."""
    import ditkernels

    if isinstance(mask, ditkernels.Band):
        half = mask.params(seq)[0]
        return float(sum(min(i + half, seq - 1) - max(i - half, 0) + 1 for i in range(seq)))
    if isinstance(mask, ditkernels.LocalWindow):
        return float(ditkernels.local_attention_plan(mask.grid, mask.window, shape=mask.shape, border=mask.border,
                                                     tile=mask.tile).useful_pairs)
    return float(seq * seq * mask.density)  # block top-k: about density of the key blocks


# ================================================================================================
# Speed
# ================================================================================================
def _speed_builders(mask) -> dict[str, Any]:
    def build_sparse(inputs):
        import ditkernels

        q, k, v = _qkv(inputs)
        mod = _fast_backend(q)
        state = ditkernels.ReCache()
        ditkernels.rettention(q, k, v, state, "refresh", mask=mask, backend=mod)

        def fn():
            state.n = 0
            return ditkernels.rettention(q, k, v, state, "sparse", drift=0.0, backend=mod)

        fn.detail = f"backend={mod}, one sparse pass + epilogue, rho mean {float(state.rho.mean()):.3f}"
        return fn

    def build_refresh(inputs):
        import ditkernels

        q, k, v = _qkv(inputs)
        mod = _fast_backend(q)
        state = ditkernels.ReCache()
        fn = lambda: ditkernels.rettention(q, k, v, state, "refresh", mask=mask, backend=mod)  # noqa: E731
        fn.detail = f"backend={mod}, dense pass + sparse pass"
        return fn

    def build_plain_sparse(inputs):
        from ditkernels.backends import get
        from ditkernels.ops.rettention import sparse_plan

        q, k, v = _qkv(inputs)
        mod = get(_fast_backend(q))
        sched, emask = sparse_plan(mask, q, k, q.shape[-1] ** -0.5, mod)
        fn = lambda: mod.flash_fwd(q, k, v, scale=q.shape[-1] ** -0.5, schedule=sched, mask=emask)[0]  # noqa: E731
        fn.detail = f"out_S only ({sched.visited_tiles} tiles visited)"
        return fn

    def build_dense(inputs):
        import ditkernels

        q, k, v = _qkv(inputs)
        return lambda: ditkernels.attention(q, k, v, backend=_fast_backend(q))

    def build_sdpa(inputs):
        q, k, v = _qkv(inputs)
        return lambda: F.scaled_dot_product_attention(q, k, v)

    return {"sdpa": build_sdpa, "re-sparse": build_sparse, "re-refresh": build_refresh,
            "sparse-only": build_plain_sparse, "ditkernels-dense": build_dense}


def _fast_backend(q: torch.Tensor) -> str:
    from ditkernels.backends import DENSE_REFERENCE, has, resolve_for

    mod = resolve_for("rettention", q)
    if has(mod, DENSE_REFERENCE):
        raise SkipImpl(f"no fast ditkernels backend for {q.device.type} tensors here: the dense reference would "
                       "be measured")
    return mod.NAME


def _make_inputs(shape, dtype, device):
    def make(requires_grad: bool) -> dict[str, torch.Tensor]:
        return {n: torch.randn(shape, dtype=dtype, device=device) for n in "qkv"}

    return make


@register("rettention.speed")
def speed_cases(cfg: SweepConfig) -> Iterator[Case]:
    sides = cfg.sizes or ([64] if not cfg.is_cuda else [64, 128])
    kinds = ("band",) if cfg.quick else ("band", "local", "topk")
    for side in sides:
        seq = side * side
        for kind in kinds:
            mask = make_mask(kind, side, 1 / 32)
            pairs = _mask_pairs(mask, seq)
            params = {"B": BATCH, "H": HEADS, "D": HEAD_DIM, "seq": seq, "grid": [side, side], "mask": repr(mask),
                      "density": round(pairs / seq / seq, 5), "dtype": dtype_name(cfg.dtype)}
            yield Case(
                name=f"{kind}-d{100 * pairs / seq / seq:.1f}-B{BATCH}-H{HEADS}-S{seq}-D{HEAD_DIM}-{dtype_name(cfg.dtype)}",
                params=params,
                useful_flops=4.0 * BATCH * HEADS * HEAD_DIM * seq * seq,
                make_inputs=_make_inputs((BATCH, HEADS, seq, HEAD_DIM), cfg.dtype, cfg.device),
                impls=_speed_builders(mask),
                reference="sdpa",
            )


# ================================================================================================
# Quality over a schedule
# ================================================================================================
def structured_steps(side: int, heads: int, head_dim: int, steps: int, *, dtype=torch.float32, device="cpu",
                     seed: int = 0, locality: float = 2.0, drift: float = 0.03) -> list[tuple[torch.Tensor, ...]]:
    """q, k, v (1, heads, side*side, head_dim) per step: smooth random fields (low-pass filtered noise on
    the grid) plus a shared 2-D sinusoidal positional code on q and k, drifting along a fixed smooth
    direction every step."""
    g = torch.Generator().manual_seed(seed)
    n = side * side

    def smooth():
        x = torch.randn(heads * head_dim, 1, side, side, generator=g)
        ker = torch.exp(-torch.arange(-4, 5, dtype=torch.float32) ** 2 / 8.0)
        ker = (ker[:, None] * ker[None, :]) / ker.sum() ** 2
        x = F.conv2d(F.pad(x, (4, 4, 4, 4), mode="circular"), ker[None, None])
        x = x / x.std()
        return x.reshape(heads, head_dim, n).transpose(1, 2)[None]

    yy, xx = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32),
                            indexing="ij")
    nf = head_dim // 4
    freqs = 0.9 * torch.exp(-torch.linspace(0, 3.5, nf))
    code = torch.cat([torch.cos(yy.reshape(-1, 1) * freqs), torch.sin(yy.reshape(-1, 1) * freqs),
                      torch.cos(xx.reshape(-1, 1) * freqs), torch.sin(xx.reshape(-1, 1) * freqs)], 1)
    code = F.pad(code, (0, head_dim - code.shape[1])) * locality  # code . code / sqrt(D) <= sqrt(D) / 2
    base = [smooth() for _ in range(3)]
    vel = [smooth() for _ in range(3)]
    out = []
    for t in range(steps):
        q, k, v = (base[i] + drift * t * vel[i] for i in range(3))
        out.append(tuple(x.to(device=device, dtype=dtype) for x in (q + code, k + code, v)))
    return out


def _run_schedule(method: str, mask, steps, backend: str | None):
    """Outputs of every step of ``method`` ("full", "sparse", "rettention") over the PixArt schedule."""
    import ditkernels
    from ditkernels.backends import get
    from ditkernels.ops.rettention import sparse_plan

    stepper = ditkernels.ReStepper("pixart", mask, backend=backend)
    outs = []
    for t, (q, k, v) in enumerate(steps):
        if method == "full" or (method == "sparse" and t < 5):
            outs.append(ditkernels.attention(q, k, v, backend=backend))
        elif method == "sparse":
            mod = get(backend) if backend else get(_fast_backend(q))
            sched, emask = sparse_plan(mask, q, k, q.shape[-1] ** -0.5, mod)
            outs.append(mod.flash_fwd(q, k, v, scale=q.shape[-1] ** -0.5, schedule=sched, mask=emask)[0])
        else:
            outs.append(stepper(q, k, v))
    return outs


def _step_errs(outs, ref) -> list[float]:
    return [float((o.double() - r.double()).norm() / r.double().norm()) for o, r in zip(outs, ref)]


def _quality_builders(kind: str, density: float) -> dict[str, Any]:
    def builder(method: str):
        def build(inputs):
            steps = inputs["steps"]
            mask = make_mask(kind, Q_SIDE, density)
            backend = _fast_backend(steps[0][0])
            fn = lambda: torch.stack(_run_schedule(method, mask, steps, backend)[5:])  # noqa: E731
            if method != "full":
                ref = _run_schedule("full", mask, steps, backend)
                errs = _step_errs(_run_schedule(method, mask, steps, backend), ref)[5:]
                sparse_steps = [e for t, e in enumerate(errs, 5) if t % 5 != 0] if method == "rettention" else errs
                fn.detail = (f"density {visible_fraction(mask, *steps[0][:2]):.4f}; err/step mean "
                             f"{sum(errs) / len(errs):.2e} max {max(errs):.2e}; sparse steps mean "
                             f"{sum(sparse_steps) / len(sparse_steps):.2e}")
            return fn

        return build

    return {m: builder(m) for m in ("full", "sparse", "rettention")}


@register("rettention.quality")
def quality_cases(cfg: SweepConfig) -> Iterator[Case]:
    side = Q_SIDE
    n = side * side
    kinds = ("band",) if cfg.quick else ("band", "local", "topk")
    for kind in kinds:
        for density in (DENSITIES[:1] if cfg.quick else DENSITIES):
            def make(requires_grad: bool, dtype=cfg.dtype, device=cfg.device):
                return {"steps": structured_steps(side, Q_HEADS, HEAD_DIM, Q_STEPS, dtype=dtype, device=device)}

            yield Case(
                name=f"{kind}-d{100 * density:.2f}-{side}x{side}-H{Q_HEADS}-D{HEAD_DIM}-pixart20-{dtype_name(cfg.dtype)}",
                params={"grid": [side, side], "H": Q_HEADS, "D": HEAD_DIM, "steps": Q_STEPS, "schedule": "pixart",
                        "mask_kind": kind, "target_density": density},
                useful_flops=4.0 * Q_HEADS * HEAD_DIM * n * n * Q_STEPS,
                make_inputs=make,
                impls=_quality_builders(kind, density),
                reference="full",
            )


def quality_table(side: int = Q_SIDE, heads: int = Q_HEADS, steps: int = Q_STEPS, backend: str | None = None) -> str:
    """The quality study as one text table (mean relative error per step over steps 5-19 vs dense)."""
    import time

    data = structured_steps(side, heads, HEAD_DIM, steps)
    backend = backend or _fast_backend(data[0][0])

    def timed(method: str, mask, runs: int = 3) -> tuple[list[torch.Tensor], float]:
        """Outputs of a first run, and the time per step of the fastest of ``runs`` warm runs (the
        least disturbed by other processes on a shared machine)."""
        outs = _run_schedule(method, mask, data, backend)
        best = float("inf")
        for _ in range(runs):
            t0 = time.perf_counter()
            _run_schedule(method, mask, data, backend)
            best = min(best, time.perf_counter() - t0)
        return outs, 1e3 * best / steps

    ref, t_full = timed("full", None)
    lines = [f"{side}x{side} grid, {heads} heads, head_dim {HEAD_DIM}, PixArt schedule ({steps} steps), backend "
             f"{backend}; errors: mean over steps 5-{steps - 1} of ||out - dense|| / ||dense||; times: per step "
             "of the fastest of 3 warm 20-step runs (dense every step: " + f"{t_full:.1f} ms/step)",
             f"{'mask':<6} {'target':>7} {'density':>8} {'sparse err':>11} {'re-ttn err':>11} "
             f"{'re-ttn sparse-steps err':>24} {'ms/step re-ttn':>15} {'vs dense':>9}"]
    for kind in ("band", "local", "topk"):
        for density in DENSITIES:
            mask = make_mask(kind, side, density)
            try:
                es = _step_errs(_run_schedule("sparse", mask, data, backend), ref)[5:]
            except NotImplementedError as e:
                lines.append(f"{kind:<6} {density:>7.4f}  not available: {e}")
                continue
            outs, t_re = timed("rettention", mask)
            er = _step_errs(outs, ref)[5:]
            ers = [e for t, e in enumerate(er, 5) if t % 5 != 0]
            lines.append(f"{kind:<6} {density:>7.4f} {visible_fraction(mask, *data[0][:2]):>8.4f} "
                         f"{sum(es) / len(es):>11.3e} {sum(er) / len(er):>11.3e} {sum(ers) / len(ers):>24.3e} "
                         f"{t_re:>15.2f} {t_full / t_re:>8.2f}x")
    return "\n".join(lines)


def memory_check(seq: int = 32768, heads: int = 8, head_dim: int = 64, backend: str = "cpu") -> dict[str, float]:
    """Peak RSS growth (MB) of a refresh step and a sparse step (band mask) on CPU, beyond the inputs.

    Run it in a fresh process: ``ru_maxrss`` is the process's peak. A ``seq x seq`` float32 score
    matrix would be ``4 * seq**2`` bytes per head (4 GiB at 32768)."""
    import resource
    import time

    import ditkernels

    def peak_mb() -> float:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, seq, head_dim, generator=g) for _ in range(3))
    state = ditkernels.ReCache()
    small = [t[:, :, :256].contiguous() for t in (q, k, v)]  # load the extension and warm its workers
    ditkernels.rettention(*small, ditkernels.ReCache(), "refresh", backend=backend)
    base = peak_mb()
    t0 = time.perf_counter()
    ditkernels.rettention(q, k, v, state, "refresh", backend=backend)
    t1 = time.perf_counter()
    after_refresh = peak_mb()
    out = ditkernels.rettention(q, k, v, state, "sparse", backend=backend)
    t2 = time.perf_counter()
    after_sparse = peak_mb()
    assert out.shape == q.shape and bool(torch.isfinite(out).all())
    return {"seq": seq, "heads": heads, "head_dim": head_dim, "inputs_mb": 3 * q.numel() * 4 / 2**20,
            "baseline_peak_mb": base, "refresh_extra_mb": after_refresh - base,
            "sparse_extra_mb": after_sparse - base, "refresh_s": t1 - t0, "sparse_s": t2 - t1,
            "dense_scores_per_head_mb": 4.0 * seq * seq / 2**20}


if __name__ == "__main__":
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m ditkernels.bench.rettention",
                                 description="Re-ttention quality table, or --memory: peak RSS of a refresh and a "
                                             "sparse step on CPU")
    ap.add_argument("--memory", action="store_true")
    ap.add_argument("--seq", type=int, default=32768)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    a = ap.parse_args()
    print(json.dumps(memory_check(a.seq, a.heads, a.head_dim)) if a.memory else quality_table())
