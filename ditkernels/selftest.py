"""``python -m ditkernels selftest``: every op on every fast backend of this machine against the float64
reference, then ``bench --quick`` on a GPU; one report file.

With a CUDA GPU it checks the GPU backends (triton, cuda) on CUDA tensors; without one, the cpu
backend on CPU tensors (``--backends triton`` with ``TRITON_INTERPRET=1`` runs the GPU path's Triton
kernels on CPU tensors, slowly: for tests). Each check is one op on small odd shapes (seq 97, grid
7x13, 3-D grids, head_dim 40) in fp32, fp16 and bf16, forward and backward, with each op's masks and
global tokens. The rule is ``docs/verify.md §4``: ``err = ||x - ref64|| / ||ref64||`` against the
op's own reference backend run in float64; fp32 passes at ``err <= 1e-5`` (attention) / ``1e-4``
(the scan's gradients sum over the sequence); fp16 / bf16 pass at ``err <= 2 * err(plain PyTorch
in the same dtype) + 1e-6``, for the output and every gradient.

Needs nothing but the installed package (and torch); ``--no-bench`` skips the benchmark. Exit
status 0 when every check passed, 1 otherwise. ``run`` is the function behind the command.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import io
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from contextlib import redirect_stdout
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
FP32_TOL = 1e-5
SCAN_FP32_TOL = 1e-4


@dataclass
class Result:
    """One check: an op's case on a backend in a dtype. errs: {tensor: [err, bound]}."""

    op: str
    case: str
    backend: str
    dtype: str
    status: str = "pass"  # pass, fail, error, skip
    errs: dict[str, list[float]] = field(default_factory=dict)
    reason: str | None = None
    seconds: float = 0.0


# ------------------------------------------------------------------------------------------------
# Numerics


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``||x - ref|| / ||ref||`` in float64 on the CPU (``||x - ref||`` when ref is zero)."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    den = ref.norm().item()
    num = (x - ref).norm().item()
    return num if den == 0 else num / den


def lowp_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   visible: torch.Tensor | None) -> torch.Tensor:
    """Plain PyTorch attention in the inputs' dtype (``docs/verify.md §4``'s "reference run in the same
    low dtype"): scores in the low dtype, softmax in float32 rounded back, ``p @ v`` in the low dtype."""
    s = (torch.matmul(q, k.transpose(-1, -2)) * scale).float()
    if visible is not None:
        s = s.masked_fill(~visible.to(s.device), float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0).to(q.dtype)
    return torch.matmul(p, v)


def _outputs(fn: Callable[..., torch.Tensor], inputs: Sequence[torch.Tensor], grad: bool,
             seed: int = 7) -> list[torch.Tensor]:
    """[out] or [out, d/d inputs...] of ``fn(*inputs)`` with a fixed random output gradient."""
    xs = [t.detach().clone().requires_grad_(grad) for t in inputs]
    out = fn(*xs)
    if not grad:
        return [out.detach()]
    g = torch.Generator().manual_seed(seed)
    do = torch.randn(out.shape, generator=g, dtype=torch.float64).to(device=out.device, dtype=out.dtype)
    return [out.detach(), *torch.autograd.grad(out, xs, do)]


@dataclass
class Case:
    """A check: ``make(seed) -> [float64 CPU inputs]``; ``call(backend, *inputs)`` runs the op; ``grad``:
    differentiate every input; ``visible(*inputs64) -> bool mask`` for the low-precision attention bound
    (None: the op's reference backend run in the low dtype is the bound, e.g. for the scan)."""

    op: str
    name: str
    make: Callable[[int], list[torch.Tensor]]
    call: Callable[..., torch.Tensor]
    grad: bool = True
    visible: Callable[..., torch.Tensor] | None = None
    attention: bool = True
    fp32_tol: float = FP32_TOL
    dtypes: tuple[str, ...] = ("fp32", "fp16", "bf16")
    low_inputs: tuple[int, ...] | None = None  # inputs cast to the checked dtype (default: all)


def _check(case: Case, backend: str, dtype: torch.dtype, device: torch.device) -> Result:
    name = next(k for k, v in DTYPES.items() if v == dtype)
    res = Result(case.op, case.name, backend, name)
    t0 = time.perf_counter()
    try:
        xs64 = case.make(0)
        low_idx = range(len(xs64)) if case.low_inputs is None else case.low_inputs
        xs = [x.to(device=device, dtype=dtype) if i in low_idx else x.to(device=device, dtype=torch.float32)
              for i, x in enumerate(xs64)]
        # the reference sees the low-precision inputs' values, in float64
        ref_in = [x.detach().cpu().double() for x in xs]
        got = _outputs(lambda *a: case.call(backend, *a), xs, case.grad)
        ref = _outputs(lambda *a: case.call("reference", *a), ref_in, case.grad)
        low = None
        if dtype != torch.float32:
            if case.attention:
                q, k, v = xs[:3]
                vis = case.visible(*ref_in) if case.visible is not None else None
                scale = q.shape[-1] ** -0.5
                low = _outputs(lambda a, b, c: lowp_attention(a, b, c, scale, vis), [q, k, v], case.grad)
            else:
                low = _outputs(lambda *a: case.call("reference", *a), xs, case.grad)
        names = ["out"] + ([f"d{i}" for i in range(len(xs))] if case.grad else [])
        for i, (nm, x, r) in enumerate(zip(names, got, ref)):
            if low is not None and i >= len(low):
                continue  # a gradient the low-precision attention bound does not have (not q, k, v)
            if x is None or r is None:
                continue
            if x.shape != r.shape:
                raise AssertionError(f"{nm}: shape {tuple(x.shape)}, reference {tuple(r.shape)}")
            err = rel_err(x, r) if torch.isfinite(x).all() else float("nan")
            bound = case.fp32_tol if low is None else 2 * rel_err(low[i], r) + 1e-6
            res.errs[nm] = [err, bound]
            if not err <= bound:
                res.status = "fail"
    except Exception as e:  # noqa: BLE001 - a crash of one check is a row of the report
        res.status, res.reason = "error", f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
        res.errs["traceback"] = traceback.format_exc(limit=4)  # type: ignore[assignment]
    res.seconds = round(time.perf_counter() - t0, 3)
    return res


# ------------------------------------------------------------------------------------------------
# Cases


def _randn(*shape: int, seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


def _qkv(b: int, h: int, sq: int, sk: int, d: int, seed: int) -> list[torch.Tensor]:
    # (B, S, H, D) buffers seen as (B, H, S, D): the strides of a real model's projections
    return [_randn(b, s, h, d, seed=seed + i).transpose(1, 2) for i, s in enumerate((sq, sk, sk))]


def cases() -> list[Case]:
    """Every check, smallest shapes that still cross tile borders."""
    import ditkernels
    from ditkernels.ops.rettention import dense_visible

    out: list[Case] = []
    out.append(Case("attention", "B2-H3-Sq97-Sk83-D40", lambda s: _qkv(2, 3, 97, 83, 40, s),
                    lambda be, q, k, v: ditkernels.attention(q, k, v, backend=be)))

    for name, grid, win, kw in (
            ("grid7x13-circle-r3-P5-S2", (7, 13), 3, {"num_prefix": 5, "num_suffix": 2}),
            ("grid7x13-square-shift-r2", (7, 13), 2, {"shape": "square", "border": "shift"}),
            ("grid3x5x7-circle-r1,2,3-P4", (3, 5, 7), (1, 2, 3), {"num_prefix": 4}),
    ):
        seq = kw.get("num_prefix", 0) + kw.get("num_suffix", 0) + int(torch.tensor(grid).prod())
        mask = ditkernels.LocalWindow(grid, win, **kw)

        def vis(q, k, v, mask=mask):
            return dense_visible(mask, q, k, q.shape[-1] ** -0.5)

        out.append(Case("local_attention", name, lambda s, seq=seq: _qkv(1, 2, seq, seq, 40, s),
                        lambda be, q, k, v, grid=grid, win=win, kw=kw: ditkernels.local_attention(
                            q, k, v, grid, win, backend=be, **kw), visible=vis))

    bm = torch.rand(1, 2, 7, 7, generator=torch.Generator().manual_seed(3)) < 0.4
    bm |= torch.eye(7, dtype=torch.bool)

    def bs_vis(q, k, v):
        return bm.repeat_interleave(16, 2).repeat_interleave(16, 3)[:, :, :q.shape[2], :k.shape[2]]

    out.append(Case("block_sparse_attention", "B1-H2-S97-blk16-d40", lambda s: _qkv(1, 2, 97, 97, 40, s),
                    lambda be, q, k, v: ditkernels.block_sparse_attention(q, k, v, bm.to(q.device),
                                                                         block_size=(16, 16), backend=be),
                    visible=bs_vis))

    topk_mask = ditkernels.BlockTopK(density=0.3, block_size=(16, 16), num_prefix=5, num_suffix=3)
    out.append(Case("block_topk_attention", "S97-P5-S3-blk16-d30", lambda s: _qkv(1, 2, 97, 97, 40, s),
                    lambda be, q, k, v: ditkernels.block_topk_attention(
                        q, k, v, density=0.3, block_size=(16, 16), num_prefix=5, num_suffix=3, backend=be),
                    visible=lambda q, k, v: dense_visible(topk_mask, q, k, q.shape[-1] ** -0.5)))
    out.append(Case("block_topk_attention", "grid7x13-P3-blk16-d30", lambda s: _qkv(1, 2, 94, 94, 40, s),
                    lambda be, q, k, v: ditkernels.block_topk_attention(
                        q, k, v, density=0.3, block_size=(16, 16), num_prefix=3, grid=(7, 13), backend=be),
                    dtypes=("fp32",)))

    def topk_vis(q, k, v, topk=13):
        s = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
        top = torch.topk(s, topk + 1, dim=-1).values
        t_k, t_k1 = top[..., topk - 1], top[..., topk]
        tol = 1e-5 * s.abs().amax(-1)
        return s >= torch.where(t_k - t_k1 >= 2 * tol, (t_k + t_k1) / 2, t_k - tol)[..., None]

    out.append(Case("topk_attention", "B1-H2-Sq97-Sk89-D40-k13", lambda s: _qkv(1, 2, 97, 89, 40, s),
                    lambda be, q, k, v: ditkernels.topk_attention(q, k, v, 13, backend=be), visible=topk_vis))

    for name, mask in (("band-P3", ditkernels.Band(width=9, num_prefix=3)),
                       ("local7x13-r3-P3", ditkernels.LocalWindow((7, 13), 3, num_prefix=3)),
                       ("blocktopk-d30-P3", ditkernels.BlockTopK(density=0.3, block_size=(16, 16), num_prefix=3))):
        def step(be, q, k, v, mask=mask):
            """refresh then sparse (drift 0) on the same inputs: the sparse step's output is full attention"""
            state = ditkernels.ReCache()
            ditkernels.rettention(q, k, v, state, "refresh", mask=mask, backend=be)
            return ditkernels.rettention(q, k, v, state, "sparse", drift=0.0, backend=be)

        out.append(Case("rettention", f"refresh+sparse-{name}", lambda s: _qkv(1, 2, 94, 94, 40, s), step,
                        grad=False))

    def scan_inputs(s: int) -> list[torch.Tensor]:
        b, d, n, length = 2, 5, 6, 37
        return [_randn(b, d, length, seed=s), _randn(b, d, length, seed=s + 1, scale=0.5),
                -torch.rand(d, n, generator=torch.Generator().manual_seed(s + 2), dtype=torch.float64) - 0.5,
                _randn(b, n, length, seed=s + 3), _randn(b, n, length, seed=s + 4), _randn(d, seed=s + 5),
                _randn(b, d, length, seed=s + 6), _randn(d, seed=s + 7, scale=0.1)]

    out.append(Case("selective_scan", "B2-D5-L37-N6-varBC-D-z-softplus", scan_inputs,
                    lambda be, u, dt, A, B, C, D, z, db: ditkernels.selective_scan(
                        u, dt, A, B, C, D, z, db, delta_softplus=True, backend=be),
                    attention=False, fp32_tol=SCAN_FP32_TOL, low_inputs=(0, 1, 3, 4, 6)))
    return out


# ------------------------------------------------------------------------------------------------
# Driver


def _targets(device: torch.device, backends: Sequence[str] | None) -> list[str]:
    if backends:
        return list(backends)
    return ["triton", "cuda"] if device.type == "cuda" else ["cpu"]


def run_checks(device: torch.device, backends: Sequence[str] | None = None, dtypes: Sequence[str] = tuple(DTYPES),
               ops: Sequence[str] | None = None, progress: Callable[[Result], None] | None = None,
               only: Callable[[Case, str], bool] | None = None) -> list[Result]:
    """Every case of :func:`cases` (``ops``: only those ops; ``only(case, dtype)``: only where it is true) on
    each backend that the op has, in each dtype."""
    from ditkernels import backends as registry

    results = []
    for case in cases():
        if ops and case.op not in ops:
            continue
        supported = _supported(case.op)
        for be in _targets(device, backends):
            for dt in dtypes:
                if dt not in case.dtypes or (only is not None and not only(case, dt)):
                    continue
                if be not in supported:
                    continue  # e.g. cuda has only the scan: not a finding
                why = registry.why_not(be, _dispatch_op(case.op), registry.Call(device, DTYPES[dt]))
                if why:
                    r = Result(case.op, case.name, be, dt, status="skip", reason=why)
                else:
                    r = _check(case, be, DTYPES[dt], device)
                results.append(r)
                if progress:
                    progress(r)
    return results


def _dispatch_op(op: str) -> str:
    """The op name dispatch knows (``ditkernels.backends.OPS``): block top-k runs block-sparse attention."""
    return "block_sparse_attention" if op == "block_topk_attention" else op


def _supported(op: str) -> tuple[str, ...]:
    from ditkernels import backends as registry

    return registry.supporting(_dispatch_op(op))


def _environment(device: torch.device) -> list[str]:
    import ditkernels
    from ditkernels import backends as registry

    lines = [f"ditkernels {ditkernels.__version__} ({os.path.dirname(ditkernels.__file__)})",
             f"python {platform.python_version()}, torch {torch.__version__}, CUDA {torch.version.cuda or 'none'}",
             f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else platform.processor() or 'cpu'}"
             f" ({device.type}), TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')}",
             "backends: " + "; ".join(f"{n} {'ok' if ok else 'unavailable'}{'' if ok else f' ({why})'}"
                                       for n, ok, why in registry.report())]
    try:
        from ditkernels.backends import cuda

        lines.append(f"compiled CUDA archs: {', '.join(cuda.compiled_archs()) or 'none'}")
    except Exception as e:  # noqa: BLE001 - reported, not fatal
        lines.append(f"compiled CUDA archs: ? ({type(e).__name__})")
    return lines


def _table(results: list[Result]) -> list[str]:
    lines = ["| op | case | backend | dtype | status | worst err / bound | s |", "|---|---|---|---|---|---|---|"]
    for r in results:
        errs = {k: v for k, v in r.errs.items() if isinstance(v, list)}
        if errs:
            k, (e, b) = max(errs.items(), key=lambda kv: kv[1][0] / kv[1][1] if kv[1][1] else float("inf"))
            worst = f"{k}: {e:.2e} / {b:.2e}"
        else:
            worst = r.reason or "-"
        lines.append(f"| {r.op} | {r.case} | {r.backend} | {r.dtype} | {r.status} | {worst} | {r.seconds:.2f} |")
    return lines


def run(device: str | None = None, backends: Sequence[str] | None = None, dtypes: Sequence[str] = tuple(DTYPES),
        ops: Sequence[str] | None = None, bench: bool | None = None, out: str | Path = "selftest_results",
        quiet: bool = False) -> tuple[int, Path]:
    """Run the checks (and ``bench --quick`` on CUDA unless ``bench=False``; on CPU only with ``bench=True``);
    write ``<out>/selftest-<timestamp>.md``. Returns (exit status, report path)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: cuda requested but torch.cuda.is_available() is False (torch {torch.__version__})")
    started = time.perf_counter()
    now = _dt.datetime.now(_dt.timezone.utc)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"selftest-{now.strftime('%Y%m%d-%H%M%S')}.md"

    def progress(r: Result) -> None:
        if not quiet:
            print(f"  {r.status:<5} {r.op:<22} {r.case:<34} {r.backend:<7} {r.dtype}"
                  + (f"  ({r.reason})" if r.reason else ""), flush=True)

    if not quiet:
        print(f"ditkernels selftest on {dev.type}: report -> {path}", flush=True)
    results = run_checks(dev, backends, dtypes, ops, progress)
    failed = [r for r in results if r.status in ("fail", "error")]
    checked = [r for r in results if r.status != "skip"]

    bench_text, bench_rc = None, None
    if bench or (bench is None and dev.type == "cuda"):
        from ditkernels.bench.runner import main as bench_main

        buf = io.StringIO()
        with redirect_stdout(buf):
            bench_rc = bench_main(["--quick", "--device", dev.type, "--out", str(out_dir), "--no-progress",
                                   "--tag", path.stem + "-bench"])
        bench_text = buf.getvalue()
        if not quiet:
            print(bench_text, flush=True)

    lines = [f"# ditkernels selftest, {now.isoformat(timespec='seconds')}", "", *[f"- {l}" for l in _environment(dev)],
             f"- checks: {len(checked)} run, {len(checked) - len(failed)} passed, {len(failed)} failed, "
             f"{len(results) - len(checked)} skipped; {time.perf_counter() - started:.1f} s in all",
             "- rule (docs/verify.md §4): err = ||x - ref64|| / ||ref64|| against the op's reference backend in "
             f"float64; fp32 bound {FP32_TOL:g} ({SCAN_FP32_TOL:g} for the scan); fp16/bf16 bound 2 x err(plain "
             "PyTorch in the same dtype) + 1e-6; outputs and every gradient", "", "## Checks", "", *_table(results)]
    for r in failed:
        tb = r.errs.get("traceback")
        lines += ["", f"### {r.status}: {r.op} {r.case} {r.backend} {r.dtype}", "",
                  "```", json.dumps({k: v for k, v in asdict(r).items() if k != "errs"}, default=str),
                  *(json.dumps({k: v for k, v in r.errs.items() if k != "traceback"}).splitlines()),
                  *(tb.splitlines() if isinstance(tb, str) else []), "```"]
    if bench_text is not None:
        lines += ["", f"## bench --quick (exit status {bench_rc})", "", "```", bench_text.rstrip(), "```"]
    path.write_text("\n".join(lines) + "\n")
    if not quiet:
        print(f"{len(checked) - len(failed)}/{len(checked)} checks passed ({len(results) - len(checked)} skipped); "
              f"wrote {path}")
    return (1 if failed or not checked or (bench_rc not in (None, 0)) else 0), path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m ditkernels selftest", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when available")
    p.add_argument("--backends", default=None, metavar="A,B",
                   help="backends to check (default: triton,cuda on CUDA; cpu on CPU; triton on CPU tensors "
                        "needs TRITON_INTERPRET=1)")
    p.add_argument("--dtypes", default="fp32,fp16,bf16", metavar="A,B")
    p.add_argument("--ops", default=None, metavar="A,B", help="only these ops (e.g. attention,local_attention)")
    bench = p.add_mutually_exclusive_group()
    bench.add_argument("--bench", dest="bench", action="store_true", default=None,
                       help="also run bench --quick on CPU (on CUDA it runs by default)")
    bench.add_argument("--no-bench", dest="bench", action="store_false", help="skip bench --quick")
    p.add_argument("--out", default="selftest_results", metavar="DIR")
    args = p.parse_args(list(sys.argv[1:] if argv is None else argv))
    split = lambda s: [x for x in s.split(",") if x] if s else None  # noqa: E731
    dtypes = split(args.dtypes) or []
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        p.error(f"--dtypes: unknown {bad}; known: {', '.join(DTYPES)}")
    from ditkernels.backends import NAMES

    bad = [b for b in split(args.backends) or [] if b not in NAMES]
    if bad:
        p.error(f"--backends: unknown {bad}; known: {', '.join(NAMES)}")
    ops = split(args.ops)
    known_ops = {c.op for c in cases()}
    if ops and set(ops) - known_ops:
        p.error(f"--ops: unknown {sorted(set(ops) - known_ops)}; known: {', '.join(sorted(known_ops))}")
    try:
        rc, _ = run(args.device, split(args.backends), dtypes, ops, args.bench, args.out)
    except ValueError as e:
        print(f"ditkernels selftest: {e}", file=sys.stderr)
        return 2
    return rc


if __name__ == "__main__":
    sys.exit(main())
