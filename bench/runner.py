"""The benchmark runner: case registry, timing, table, JSON record, plot and CLI.

An op module registers a *case generator* for a family::

    @register("attention.dense")
    def cases(cfg: SweepConfig) -> Iterable[Case]:
        yield Case(name="B1-H8-S4096-D64-fp32", params={...}, useful_flops=4 * B * H * S * S * D,
                   make_inputs=lambda requires_grad: {"q": ..., "k": ..., "v": ...},
                   impls={"ditkernels": build_dk, "sdpa": build_sdpa}, reference="sdpa",
                   grad_inputs=("q", "k", "v"))

``make_inputs(requires_grad)`` creates the inputs once per case and mode, outside timing.
Each implementation is a *setup function* ``build(inputs) -> fn``, where ``fn`` is a zero-arg
callable returning the output tensor; ``build`` raises :class:`SkipImpl` with the reason when the
implementation cannot run here. The first call of ``fn`` (compilation, autotuning) is not timed.
Import optional peers (NATTEN, mamba-ssm, ...) inside the setup function, not at module level, so
a missing peer is a ``skipped`` row with its reason; any other exception of a setup or first call
is a ``failed`` row (``--strict`` turns those into exit status 1). Never a crash of the sweep.

FLOP convention (flash-attention's ``benchmark_flash_attention.py``): ``useful_flops`` is the
forward count of *visible* query-key pairs only (dense attention: ``4 * B * H * Sq * Sk * D``);
the backward is ``2.5x`` the forward, so ``fwdbwd`` rows count ``3.5x`` ``useful_flops``
(a case can change the backward factor with ``bwd_flops_factor``).

Timing: on CUDA ``triton.testing.do_bench`` (median, with 20 %/80 % quantiles; CUDA events when
triton is absent); on CPU the median wall time (``time.perf_counter``) of ``--reps`` runs after
``--warmup`` runs, the implementations of a case timed round-robin.

Output in ``--out`` (default ``bench_results/``): ``<tag>.json`` (device, versions, git commit,
timestamp, threads, config and one row per case x mode x impl), ``<tag>.png`` (speed-up bars, one
panel per family) and ``history.jsonl`` (every row of every run, each with device, versions, commit and
timestamp, like Liger's benchmark records), plus the table on stdout.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import importlib
import json
import math
import os
import pkgutil
import platform
import shutil
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["Case", "SkipImpl", "SweepConfig", "register", "registered_families", "main", "SCHEMA"]

SCHEMA = "ditkernels.bench/1"
MODES = ("fwd", "fwdbwd")
FLOPS_CONVENTION = (
    "useful FLOPs count only visible query-key pairs; dense attention forward = 4*B*H*Sq*Sk*D; "
    "backward = 2.5x forward, so fwd+bwd = 3.5x forward (flash-attention's benchmark convention)"
)

# Deprecation chatter of libraries (torch.compile emits some) is not worth a row's note.
_NOISE_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, FutureWarning)
_DTYPES = {"fp64": torch.float64, "fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float32`` -> ``"fp32"`` (the short names used in case names and ``--dtype``)."""
    for name, dt in _DTYPES.items():
        if dt == dtype:
            return name
    return str(dtype).replace("torch.", "")


class SkipImpl(Exception):
    """Raised by an implementation's setup function when it cannot run here; the message says why."""


@dataclass
class SweepConfig:
    """What the op modules build their cases for.

    device: where inputs live. dtype: the dtype to benchmark (default fp32 on CPU, bf16 on CUDA).
    quick: a short sweep (a couple of minutes on 2 CPU cores). sizes: overrides the sequence
    lengths (or the family's main size) of every family.
    """

    device: torch.device
    dtype: torch.dtype
    quick: bool = False
    sizes: list[int] | None = None
    models: list[str] | None = None  # --model: presets of the ``model`` family (bench/models.py)
    scale: str | None = None  # --scale of the model presets (None: auto on CPU, none on CUDA)

    @property
    def is_cuda(self) -> bool:
        return self.device.type == "cuda"


Builder = Callable[[dict[str, torch.Tensor]], Callable[[], Any]]


@dataclass
class Case:
    """One benchmark problem and the implementations that solve it.

    name: readable id inside the family, e.g. ``"B1-H8-S4096-D64-fp32"``.
    params: the problem's parameters (recorded in the JSON rows).
    useful_flops: forward FLOPs of useful (visible) work only.
    make_inputs: ``requires_grad -> {name: tensor}``; called once per case and mode.
    impls: ``{impl name: setup function}`` (see the module docstring).
    reference: the impl name speed-ups and errors are relative to (e.g. ``"sdpa"``).
    grad_inputs: input names that get gradients in ``fwdbwd`` mode; empty = forward-only case.
    bwd_flops_factor: backward FLOPs as a multiple of the forward's.
    """

    name: str
    params: dict[str, Any]
    useful_flops: float
    make_inputs: Callable[[bool], dict[str, torch.Tensor]]
    impls: dict[str, Builder]
    reference: str | None = None
    grad_inputs: tuple[str, ...] = ()
    bwd_flops_factor: float = 2.5
    family: str = ""

    @property
    def id(self) -> str:
        return f"{self.family}/{self.name}"

    def flops(self, mode: str) -> float:
        return self.useful_flops * (1.0 + self.bwd_flops_factor if mode == "fwdbwd" else 1.0)


_GENERATORS: dict[str, Callable[[SweepConfig], Iterable[Case]]] = {}
_LOAD_ERRORS: dict[str, str] = {}
_OPT_IN: set[str] = set()


def register(family: str, *, opt_in: bool = False) -> Callable[[Callable[[SweepConfig], Iterable[Case]]], Callable[[SweepConfig], Iterable[Case]]]:
    """Decorator: register ``fn(cfg) -> Iterable[Case]`` as the case generator of ``family``.

    opt_in: the family runs only when a ``--filter`` names it (``e2e``: whole models, minutes on CPU),
    never in a default or ``--quick`` sweep. Registering a family again replaces its generator.
    """

    def deco(fn: Callable[[SweepConfig], Iterable[Case]]) -> Callable[[SweepConfig], Iterable[Case]]:
        _GENERATORS[family] = fn
        if opt_in:
            _OPT_IN.add(family)
        else:
            _OPT_IN.discard(family)
        return fn

    return deco


def unregister(family: str) -> None:
    """Remove a family's generator (used by tests that register throw-away families)."""
    _GENERATORS.pop(family, None)


def registered_families() -> list[str]:
    return sorted(_GENERATORS)


def discover() -> dict[str, str]:
    """Import every op module of this package so its cases register; returns {module: error}.

    A module that fails to import is reported (stderr and the JSON record), never silently dropped.
    """
    pkg_name = __name__.rpartition(".")[0]
    pkg = sys.modules.get(pkg_name)
    if pkg is None or not hasattr(pkg, "__path__"):
        return dict(_LOAD_ERRORS)
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name.startswith("_") or info.name == "runner":
            continue
        full = f"{pkg_name}.{info.name}"
        if full in sys.modules or full in _LOAD_ERRORS:
            continue
        try:
            importlib.import_module(full)
        except Exception as e:  # noqa: BLE001 - reported below and in the record
            _LOAD_ERRORS[full] = _reason(e)
            print(f"ditkernels bench: could not load {full}: {_LOAD_ERRORS[full]}", file=sys.stderr)
    return dict(_LOAD_ERRORS)


def _families(filters: Sequence[str]) -> list[str]:
    """The families whose cases the filters can select. A filter that starts a family name (``sparse``,
    ``sparse.topk``, ``scan/``, ``rettention.speed/band``) selects within those families only, so the
    others do not build their cases (another family's ``--sizes`` can mean a huge problem); any other
    filter (``S4096``, ``topk``) is matched against the case ids of every family. Opt-in families
    (``register(..., opt_in=True)``) are selected only by a filter that starts their name."""
    fams = registered_families()
    default = [fam for fam in fams if fam not in _OPT_IN]
    if not filters:
        return default
    wanted: set[str] = set()
    for f in filters:
        head = f.split("/")[0]
        named = [fam for fam in fams if fam.startswith(head) and ("/" not in f or fam == head)]
        wanted.update(named or default)
    return [fam for fam in fams if fam in wanted]


def build_cases(cfg: SweepConfig, filters: Sequence[str] = ()) -> list[Case]:
    """All registered cases for ``cfg`` whose id contains one of ``filters`` (all when empty)."""
    cases: list[Case] = []
    for family in _families(filters):
        for case in _GENERATORS[family](cfg):
            if not case.family:
                case.family = family
            if not filters or any(f in case.id for f in filters):
                cases.append(case)
    return cases


# ----------------------------------------------------------------------------------------------
# Timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _primary(out: Any) -> torch.Tensor:
    """The tensor that is compared and differentiated: ``out`` or the first element of a tuple."""
    return out[0] if isinstance(out, (tuple, list)) else out


def _quantile(sorted_vals: list[float], q: float) -> float:
    pos = q * (len(sorted_vals) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def _summary(times_ms: list[float]) -> dict[str, Any]:
    s = sorted(times_ms)
    return {"time_ms": _quantile(s, 0.5), "time_ms_p20": _quantile(s, 0.2), "time_ms_p80": _quantile(s, 0.8),
            "time_ms_min": s[0], "reps": len(s)}


def time_cpu(steps: dict[str, Callable[[], Any]], *, warmup: int, reps: int, budget_s: float) -> dict[str, dict[str, Any]]:
    """Median wall time (ms) of each step over ``reps`` runs, after ``warmup`` untimed runs each.

    The steps are timed round-robin (run i of every step, then run i + 1, ...), so a change in the
    machine's load during the sweep hits every implementation alike. Stops early once ``budget_s``
    seconds were spent timing, after at least 3 rounds. Returns {name: summary}.
    """
    for step in steps.values():
        for _ in range(warmup):
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    start = time.perf_counter()
    for i in range(reps):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - t0) * 1e3)
        if i + 1 >= 3 and time.perf_counter() - start > budget_s:
            break
    return {name: dict(_summary(t), timer="time.perf_counter median, round-robin") for name, t in times.items()}


class BusyProcesses:
    """``n`` processes that each keep one core busy (a Python spin loop) while the block runs."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> "BusyProcesses":
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL,
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL) for _ in range(self.n)]
        time.sleep(0.2)  # let them start spinning before the first timed run
        return self

    def __exit__(self, *exc: object) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()


def time_cpu_loaded(steps: dict[str, Callable[[], Any]], timed: dict[str, dict[str, Any]], *, load: int, reps: int,
                    budget_s: float) -> None:
    """Times ``steps`` again, round-robin, beside ``load`` busy processes (``--load``); adds to each
    summary in ``timed`` the loaded median (``time_ms_loaded``) and its ratio to the quiet median
    (``load_slowdown``)."""
    with BusyProcesses(load):
        loaded = time_cpu(steps, warmup=0, reps=reps, budget_s=budget_s)
    for name, summary in loaded.items():
        timed[name].update(time_ms_loaded=summary["time_ms"], load_processes=load,
                           load_slowdown=summary["time_ms"] / timed[name]["time_ms"])


def time_cuda(step: Callable[[], Any], *, quick: bool) -> dict[str, Any]:
    """Median (ms) with 20 %/80 % quantiles: ``triton.testing.do_bench``, or CUDA events without triton."""
    warmup, rep = (10, 40) if quick else (25, 100)
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        p50, p20, p80 = do_bench(step, warmup=warmup, rep=rep, quantiles=[0.5, 0.2, 0.8])
        return {"time_ms": p50, "time_ms_p20": p20, "time_ms_p80": p80, "time_ms_min": None, "reps": None,
                "timer": f"triton.testing.do_bench(warmup={warmup}, rep={rep}) median"}
    return dict(_summary(_cuda_event_times(step, warmup_ms=warmup, rep_ms=rep)),
                timer=f"torch.cuda.Event median (warmup={warmup} ms, rep={rep} ms; triton not installed)")


def _cuda_event_times(step: Callable[[], Any], *, warmup_ms: float, rep_ms: float) -> list[float]:
    """do_bench's method without triton: estimate, warm up for ``warmup_ms``, time runs for ``rep_ms``."""
    step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        step()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / estimate))):
        step()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(max(3, int(rep_ms / estimate)))]
    for a, b in events:
        a.record()
        step()
        b.record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in events]


def _reason(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    first = next((m for m in msg if m.strip()), "")
    return f"{type(e).__name__}: {first}" if first else type(e).__name__


def _rel_err(x: torch.Tensor, ref: torch.Tensor) -> float | None:
    if x.shape != ref.shape:
        return None
    x64, r64 = x.detach().double(), ref.detach().double()
    den = torch.linalg.vector_norm(r64).item()
    num = torch.linalg.vector_norm(x64 - r64).item()
    return num / den if den > 0 else num


@dataclass
class RunOptions:
    warmup: int = 1
    reps: int = 7
    budget_s: float = 10.0
    quick: bool = False
    load: int = 0  # --load: busy processes of a second, loaded timing (CPU)


def run_case(case: Case, mode: str, impls: Sequence[str], device: torch.device, opts: RunOptions) -> list[dict[str, Any]]:
    """Time ``impls`` of ``case`` in ``mode``; returns one row per impl, in the order of ``impls``.

    Each impl is set up and called once untimed (the reference first, so the others' outputs can
    be compared with it); an impl that raises is a ``skipped`` (SkipImpl) or ``failed`` row.
    """
    base = {"case": case.id, "family": case.family, "name": case.name, "params": case.params, "mode": mode,
            "useful_flops": case.flops(mode), "reference": case.reference}
    if mode == "fwdbwd" and not case.grad_inputs:
        return [dict(base, impl=name, status="skipped", reason="forward-only case", detail=None, warnings=[],
                     speedup_vs_ref=None) for name in impls]

    torch.manual_seed(0)
    inputs = case.make_inputs(mode == "fwdbwd")
    diff = [inputs[n] for n in case.grad_inputs] if mode == "fwdbwd" else []
    grad_out: torch.Tensor | None = None
    ref_out: torch.Tensor | None = None
    ref_grads: tuple[torch.Tensor, ...] | None = None
    rows: dict[str, dict[str, Any]] = {}
    steps: dict[str, Callable[[], Any]] = {}
    for name in sorted(impls, key=lambda n: n != case.reference):
        row = rows[name] = dict(base, impl=name, status="ok", reason=None, detail=None, warnings=[])
        t0 = time.perf_counter()
        try:
            # Warnings of the setup and first call (e.g. a fallback to a slow backend) go into the row.
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                grads: tuple[torch.Tensor, ...] = ()
                fn = case.impls[name](inputs)
                row["detail"] = getattr(fn, "detail", None)
                out = _primary(fn())  # first call: compilation / autotuning, not timed
                if mode == "fwdbwd":
                    if grad_out is None:
                        gen = torch.Generator(device=out.device).manual_seed(1)
                        grad_out = torch.randn(out.shape, dtype=out.dtype, device=out.device, generator=gen)
                    grads = torch.autograd.grad(out, diff, grad_out)
                _sync(device)
            row["warnings"] = sorted({f"{w.category.__name__}: {w.message}" for w in caught
                                      if not issubclass(w.category, _NOISE_WARNINGS)})
            row["setup_s"] = time.perf_counter() - t0
            out = out.detach()
            if name == case.reference:
                ref_out, ref_grads = out, grads
            row["rel_err_vs_ref"] = _rel_err(out, ref_out) if ref_out is not None else None
            if mode == "fwdbwd" and ref_grads is not None:
                errs = [_rel_err(g, r) for g, r in zip(grads, ref_grads)]
                row["rel_err_grads_vs_ref"] = dict(zip(case.grad_inputs, errs))
            del out, grads
            if mode == "fwdbwd":

                def step(fn=fn, g=grad_out, wrt=diff) -> None:
                    torch.autograd.grad(_primary(fn()), wrt, g)

                steps[name] = step
            else:
                steps[name] = fn
            if device.type == "cuda":
                row.update(time_cuda(steps[name], quick=opts.quick))
        except SkipImpl as e:
            row.update(status="skipped", reason=str(e))
        except Exception as e:  # noqa: BLE001 - a failing impl is a row of the report, not a crash
            row.update(status="failed", reason=_reason(e))
        if row["status"] != "ok":
            steps.pop(name, None)
            if device.type == "cuda":
                torch.cuda.empty_cache()

    if device.type == "cpu" and steps:
        try:
            timed = time_cpu(steps, warmup=opts.warmup, reps=opts.reps, budget_s=opts.budget_s)
            if opts.load > 0:
                time_cpu_loaded(steps, timed, load=opts.load, reps=opts.reps, budget_s=opts.budget_s)
            for name, summary in timed.items():
                rows[name].update(summary)
        except Exception as e:  # noqa: BLE001 - an impl that worked once but fails when repeated
            for name in steps:
                rows[name].update(status="failed", reason=f"while timing: {_reason(e)}")

    ref_row = rows.get(case.reference) if case.reference else None
    ref_ok = ref_row is not None and ref_row["status"] == "ok"
    for r in rows.values():
        if r["status"] == "ok":
            r["useful_flop_per_s"] = r["useful_flops"] / (r["time_ms"] * 1e-3)
        r["speedup_vs_ref"] = ref_row["time_ms"] / r["time_ms"] if ref_ok and r["status"] == "ok" else None
    del inputs, diff, grad_out, ref_out, ref_grads, steps
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return [rows[name] for name in impls]

# ----------------------------------------------------------------------------------------------
# Environment record


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"type": device.type, "cpu": cpu_name(), "cpu_count": os.cpu_count(),
                            "threads": torch.get_num_threads(), "platform": platform.platform()}
    try:
        info["cpu_capability"] = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - older torch
        info["cpu_capability"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda)
    else:
        info["name"] = info["cpu"]
    return info


def _version(module: str) -> str | None:
    try:
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version(module)
        except PackageNotFoundError:
            pass
        mod = importlib.import_module(module)
        return getattr(mod, "__version__", "unknown")
    except Exception as e:  # noqa: BLE001 - recorded, not fatal
        return f"unavailable ({_reason(e)})"


def git_info() -> dict[str, Any] | None:
    """Commit of the source tree this file lives in (None when it is not a git checkout)."""
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str | None:
        try:
            p = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return p.stdout.strip() if p.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status), "root": str(root)}


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def versions() -> dict[str, Any]:
    return {"python": platform.python_version(), "torch": torch.__version__, "triton": _version("triton"),
            "ditkernels": _version("ditkernels")}


# ----------------------------------------------------------------------------------------------
# Report: table, JSON, plot


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def format_table(rows: list[dict[str, Any]], device: torch.device) -> str:
    """Plain aligned text table of the rows."""
    unit, scale = ("TFLOP/s", 1e12) if device.type == "cuda" else ("GFLOP/s", 1e9)
    loaded = any(r.get("load_slowdown") is not None for r in rows)
    header = ["case", "mode", "impl", "time ms", unit, "speed-up", "rel.err", "note"]
    if loaded:  # --load N: the loaded median and its ratio to the quiet one
        header[6:6] = ["loaded ms", "slowdown"]
    lines = []
    for r in rows:
        ok = r["status"] == "ok"
        sp = r.get("speedup_vs_ref")
        speed = "-" if sp is None else f"{sp:.2f}x" + (" (ref)" if r["impl"] == r["reference"] else "")
        err = None
        if r["impl"] != r["reference"] and r.get("rel_err_vs_ref") is not None:
            errs = [r["rel_err_vs_ref"], *(r.get("rel_err_grads_vs_ref") or {}).values()]
            err = max(e for e in errs if e is not None)
        if ok:
            note = "; ".join(filter(None, [r.get("detail"), *r.get("warnings", [])]))
        else:
            note = f"{r['status']}: {r['reason']}"
        if len(note) > 90:
            note = note[:87] + "..."
        cells = [r["case"], r["mode"], r["impl"],
                 _fmt(r.get("time_ms") if ok else None, ".3f"),
                 _fmt(r["useful_flop_per_s"] / scale if ok else None, ".1f" if scale == 1e9 else ".2f"),
                 speed, _fmt(err, ".1e") if ok else "-", note]
        if loaded:
            sd = r.get("load_slowdown") if ok else None
            cells[6:6] = [_fmt(r.get("time_ms_loaded") if ok else None, ".3f"), "-" if sd is None else f"{sd:.2f}x"]
        lines.append(cells)
    widths = [max(len(h), *(len(l[i]) for l in lines)) if lines else len(h) for i, h in enumerate(header)]
    right = {3, 4, 5, 6, 7, 8} if loaded else {3, 4, 5, 6}

    def fmt_line(cells: list[str]) -> str:
        out = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))]
        return "  ".join(out).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([fmt_line(header), sep, *(fmt_line(l) for l in lines)])


PLOT_MAX_PX = 2000  # the plot's width limit (pixels at PLOT_DPI)
PLOT_DPI = 100


def _plot_panels(rows: list[dict[str, Any]]) -> list[tuple[str, list[tuple[str, str]], list[str]]]:
    """(family, [(case, mode)], [impl]) per panel: one family per panel, in the rows' order; a family with
    more groups than fit in PLOT_MAX_PX (bars >= 22 px) continues on the next panel."""
    families: dict[str, tuple[list[tuple[str, str]], list[str]]] = {}
    for r in rows:
        groups, impls = families.setdefault(r["family"] or r["case"].split("/")[0], ([], []))
        if (r["case"], r["mode"]) not in groups:
            groups.append((r["case"], r["mode"]))
        if r["impl"] not in impls:
            impls.append(r["impl"])
    panels = []
    for fam, (groups, impls) in families.items():
        per_panel = max(1, (PLOT_MAX_PX - 200) // (22 * len(impls) + 30))
        for i in range(0, len(groups), per_panel):
            panels.append((fam, groups[i:i + per_panel], impls))
    return panels


def _group_label(case: str, family: str, mode: str, width: int) -> str:
    """The case name without its family, wrapped after '-' or '/' into lines of at most ``width`` characters."""
    import re

    name = case[len(family) + 1:] if case.startswith(family + "/") else case
    lines = [""]
    for part in re.findall(r"[^-/]+[-/]?", name):
        if lines[-1] and len(lines[-1]) + len(part) > width:
            lines.append("")
        lines[-1] += part
    return "\n".join(lines) + f"\n{'fwd+bwd' if mode == 'fwdbwd' else mode}"


def write_plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    """One panel per op family: for each (case, mode) a group of bars, one per implementation, the
    speed-up against the case's reference (higher is better; log scale when the range is wide), each
    bar labelled with its value; skipped / failed implementations are marked ``n/a``. At most
    ``PLOT_MAX_PX`` pixels wide, labels in 9-11 pt at ``PLOT_DPI`` (readable at 100 % zoom)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    ok = {(r["case"], r["mode"], r["impl"]): r for r in rows if r["status"] == "ok" and r.get("speedup_vs_ref")}
    panels = _plot_panels(rows)
    widest = max((len(g) * (22 * len(i) + 30) + 200 for _, g, i in panels), default=600)
    width_in = min(PLOT_MAX_PX, max(1000, widest)) / PLOT_DPI
    fig = Figure(figsize=(width_in, 1.0 + 3.6 * max(1, len(panels))), dpi=PLOT_DPI)
    FigureCanvasAgg(fig)
    fig.suptitle(title, fontsize=10)
    refs = {r["family"] or r["case"].split("/")[0]: r["reference"] for r in rows}
    for p, (fam, groups, impls) in enumerate(panels):
        ax = fig.add_subplot(len(panels) or 1, 1, p + 1)
        width = 0.8 / max(1, len(impls))
        vals = [ok[c, m, i]["speedup_vs_ref"] for c, m in groups for i in impls if (c, m, i) in ok]
        log = bool(vals) and max(vals) / min(vals) > 30
        for j, impl in enumerate(impls):
            for g, (case, mode) in enumerate(groups):
                x = g - 0.4 + width * (j + 0.5)
                r = ok.get((case, mode, impl))
                if r is None:
                    if any(q["case"] == case and q["mode"] == mode and q["impl"] == impl for q in rows):
                        ax.text(x, 0.02, "n/a", rotation=90, ha="center", va="bottom", fontsize=8, color="0.45",
                                transform=ax.get_xaxis_transform())
                    continue
                sp = r["speedup_vs_ref"]
                ax.bar(x, sp, width=width, color=f"C{j % 10}")
                ax.text(x, sp, f"{sp:.2g}x" if sp < 10 else f"{sp:.0f}x", ha="center", va="bottom", fontsize=8,
                        rotation=90 if len(impls) > 4 else 0)
        ax.legend([Patch(color=f"C{j % 10}") for j in range(len(impls))], impls, fontsize=9, loc="upper left",
                  bbox_to_anchor=(1.005, 1.0), frameon=False)
        if log:
            ax.set_yscale("log")
        ax.margins(y=0.25)
        ax.axhline(1.0, color="black", lw=0.8)
        ax.set_xticks(range(len(groups)))
        chars = max(10, int((width_in * PLOT_DPI - 260) / max(1, len(groups)) / 7))
        ax.set_xticklabels([_group_label(c, fam, m, chars) for c, m in groups], fontsize=9)
        ax.set_xlim(-0.6, len(groups) - 0.4)
        ax.grid(axis="y", alpha=0.3, which="both")
        ax.set_ylabel(f"speed-up vs {refs.get(fam)}", fontsize=10)
        ax.set_title(f"{fam}: speed-up vs {refs.get(fam)} (higher is better)", fontsize=11, loc="left")
        if not vals:
            ax.text(0.5, 0.5, "no implementation ran", ha="center", va="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path)


# ----------------------------------------------------------------------------------------------
# CLI


def _parse_sizes(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.replace(" ", "").split(",") if s]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--sizes wants comma-separated integers, got {text!r}") from None
    if not sizes or any(s <= 0 for s in sizes):
        raise argparse.ArgumentTypeError(f"--sizes wants positive integers, got {text!r}")
    return sizes


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ditkernels bench",
        description="Benchmark ditkernels against SDPA / FlexAttention / other peers: time, useful "
                    "FLOP/s and speed-up; writes a table, a JSON record and a PNG plot.",
        epilog=FLOPS_CONVENTION)
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when available, else cpu")
    p.add_argument("--mode", choices=["fwd", "fwdbwd", "both"], default="both")
    p.add_argument("--quick", action="store_true", help="a short sweep (a couple of minutes on 2 CPU cores)")
    p.add_argument("--filter", action="append", default=[], metavar="SUBSTR",
                   help="run cases whose id (family/name) contains SUBSTR; a SUBSTR that starts a family name "
                        "(sparse, attention.local, scan/) selects within those families only; repeatable")
    p.add_argument("--impl", default=None, metavar="A,B",
                   help="comma-separated implementations to run (default: all of each case)")
    p.add_argument("--sizes", type=_parse_sizes, default=None, metavar="N,N",
                   help="override the sequence lengths of every family")
    p.add_argument("--dtype", choices=sorted(_DTYPES), default=None,
                   help="default: fp32 on CPU, bf16 on CUDA")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--reps", type=int, default=None, help="CPU: timed runs per impl (default 7, --quick 3)")
    p.add_argument("--warmup", type=int, default=1, help="CPU: untimed runs after the first call (default 1)")
    p.add_argument("--load", type=int, default=0, metavar="N",
                   help="CPU: time each case again beside N busy processes and report each implementation's "
                        "slowdown (loaded median / quiet median)")
    p.add_argument("--out", default="bench_results", metavar="DIR", help="output folder (default bench_results/)")
    p.add_argument("--tag", default=None, help="file name stem of the JSON/PNG (default bench-<timestamp>)")
    p.add_argument("--list", action="store_true", help="list the selected cases and exit")
    p.add_argument("--model", action="append", default=[], metavar="NAME",
                   help="run the attention call of a real DiT (a preset of --list-models): dense SDPA and "
                        "every op that fits, at the model's shape; repeatable")
    p.add_argument("--list-models", action="store_true", help="list the model presets and exit")
    p.add_argument("--scale", default=None, metavar="auto|none|KEY=N,...",
                   help="shrink a --model preset: auto (default on CPU: batch, then heads down to one per thread, then "
                        "video frames, then grid rows, until a dense forward is <= 24 GFLOP), none (default on CUDA), or e.g. "
                        "heads=2,frames=3 (keys batch, heads, frames, rows)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG plot")
    p.add_argument("--ranks", default=None, metavar="P,P",
                   help="--filter distributed: numbers of gloo CPU ranks to start (default 2,4; --quick 2)")
    p.add_argument("--strict", action="store_true",
                   help="exit 1 when an implementation failed (an unexpected error, not a skip)")
    p.add_argument("--emulate-isa", choices=sorted(EMULATE_ISA), default=None,
                   help="CPU: run every implementation as on a CPU with only this ISA (ditkernels' module and "
                        "torch's own kernels, MKL, oneDNN and compiled Flex), for like-for-like ratios on a "
                        "machine with a wider ISA")
    return p


# --emulate-isa: the variables that restrict ditkernels, ATen's kernels (and inductor's C++ code), MKL and
# oneDNN to one ISA. Each is read once, at the first op that needs it: set before any op runs.
EMULATE_ISA = {"avx2": {"DITKERNELS_CPU_ISA": "avx2", "ATEN_CPU_CAPABILITY": "avx2",
                        "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}}


def emulate_isa(isa: str) -> None:
    """Restricts this process's CPU kernels to ``isa`` (``--emulate-isa``); raises if torch ignores it."""
    os.environ.update(EMULATE_ISA[isa])
    got = torch.backends.cpu.get_cpu_capability()
    if got.lower() != isa:
        raise RuntimeError(f"--emulate-isa {isa}: torch's CPU capability is {got} (set too late, or this torch "
                           "was built without it)")


def _progress(total: int, disable: bool):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    # shutil's width (COLUMNS, then the terminal, then 100): tqdm's own probe returns -1 on some ptys.
    ncols = max(40, min(shutil.get_terminal_size((100, 24)).columns, 140))
    return tqdm(total=total, disable=disable, unit="run", ncols=ncols, file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark CLI; returns the exit status (0 ok, 1 --strict failure, 2 usage error)."""
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    if args.emulate_isa:
        try:
            emulate_isa(args.emulate_isa)
        except RuntimeError as e:
            print(f"ditkernels bench: {e}", file=sys.stderr)
            return 2
    if any(f.startswith("distributed") for f in args.filter):  # P rank processes: its own driver
        from .distributed import run

        return run(args)

    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        print("ditkernels bench: --device cuda but torch.cuda.is_available() is False "
              f"(torch {torch.__version__}); use --device cpu", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    if args.threads is not None:
        if args.threads < 1:
            print("ditkernels bench: --threads must be >= 1", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    dtype = _DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    cfg = SweepConfig(device=device, dtype=dtype, quick=args.quick, sizes=args.sizes, models=args.model or None,
                      scale=args.scale)

    load_errors = discover()
    headers: list[str] = []
    if args.model or args.list_models or args.scale:
        from . import models

        try:
            models.parse_scale(args.scale)
            for name in args.model:
                models.resolve_preset(name)
        except ValueError as e:
            print(f"ditkernels bench: {e}", file=sys.stderr)
            return 2
        if args.list_models:
            print(models.list_models(cfg))
            return 0
        if not args.filter:
            args.filter = ["model/"]
        headers = [models.describe(*models.preset_for(cfg, name)) for name in args.model]
    cases = build_cases(cfg, args.filter)
    if not cases:
        print(f"ditkernels bench: no case matches --filter {args.filter} "
              f"(families: {', '.join(registered_families()) or 'none'})", file=sys.stderr)
        return 2
    wanted = [s for s in args.impl.split(",") if s] if args.impl else None
    if wanted is not None:
        known = {n for c in cases for n in c.impls}
        unknown = [w for w in wanted if w not in known]
        if unknown:
            print(f"ditkernels bench: unknown --impl {unknown}; known: {sorted(known)}", file=sys.stderr)
            return 2
    modes = list(MODES) if args.mode == "both" else [args.mode]

    if args.list:
        for c in cases:
            print(f"{c.id}  impls={','.join(c.impls)}  ref={c.reference}  "
                  f"fwd_GFLOP={c.useful_flops / 1e9:.3f}  bwd={'yes' if c.grad_inputs else 'no'}")
        return 0

    if args.load < 0:
        print("ditkernels bench: --load must be >= 0", file=sys.stderr)
        return 2
    opts = RunOptions(warmup=max(0, args.warmup), reps=args.reps or (3 if args.quick else 7),
                      budget_s=5.0 if args.quick else 20.0, quick=args.quick, load=args.load)
    plan = [(c, m, [n for n in c.impls if wanted is None or n in wanted]) for c in cases for m in modes]
    plan = [(c, m, names) for c, m, names in plan if names]
    bar = _progress(sum(len(n) for _, _, n in plan), disable=args.no_progress or not sys.stderr.isatty())
    rows: list[dict[str, Any]] = []
    load = _loadavg()
    started = time.perf_counter()
    try:
        for case, mode, names in plan:
            if bar is not None:
                bar.set_description(f"{case.id} {mode}")
            rows += run_case(case, mode, names, device, opts)
            if bar is not None:
                bar.update(len(names))
    finally:
        if bar is not None:
            bar.close()

    now = _dt.datetime.now(_dt.timezone.utc)
    record = {
        "schema": SCHEMA,
        "timestamp": now.isoformat(timespec="seconds"),
        "command": ["python", "-m", "ditkernels", "bench", *(sys.argv[1:] if argv is None else argv)],
        "device": device_info(device),
        "versions": versions(),
        "git": git_info(),
        "config": {"device": device.type, "dtype": dtype_name(dtype), "mode": args.mode, "quick": args.quick,
                   "filter": args.filter, "impl": wanted, "sizes": args.sizes, "model": args.model,
                   "scale": args.scale, "threads": torch.get_num_threads(),
                   "reps": opts.reps if device.type == "cpu" else None,
                   "warmup": opts.warmup if device.type == "cpu" else None,
                   "load": opts.load if device.type == "cpu" else None, "emulate_isa": args.emulate_isa},
        "flops_convention": FLOPS_CONVENTION,
        "module_load_errors": load_errors,
        "wall_s": round(time.perf_counter() - started, 2),
        "loadavg_1min_before": load,
        "rows": rows,
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = args.tag or f"bench-{now.strftime('%Y%m%d-%H%M%S')}"
    json_path = out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(record, indent=1, default=str) + "\n")
    stamp = {"timestamp": record["timestamp"], "device_name": record["device"]["name"], "device_type": device.type,
             "threads": torch.get_num_threads(), **{f"{k}_version": v for k, v in record["versions"].items()},
             "commit": (record["git"] or {}).get("commit"), "record": json_path.name}
    with open(out_dir / "history.jsonl", "a") as f:
        for r in rows:
            f.write(json.dumps({**stamp, **r}, default=str) + "\n")

    dev = record["device"]
    print(f"device: {dev['name']} ({device.type}, {torch.get_num_threads()} threads)  torch {torch.__version__}  "
          f"dtype {dtype_name(dtype)}")
    print(f"speed-up = reference time / time (reference: {', '.join(sorted({str(c.reference) for c in cases}))}); "
          "rel.err = max ||x - x_ref|| / ||x_ref|| over the output (and gradients in fwdbwd)")
    if device.type == "cpu" and load is not None and load > 0.5:
        print(f"note: the 1-minute load average was {load:.2f} before the run: other processes share the "
              "CPU, so timings are noisy (implementations were timed round-robin to share the noise)")
    for h in headers:
        print(h)
    print(format_table(rows, device))
    print(f"wrote {json_path}")
    if not args.no_plot:
        png_path = out_dir / f"{stem}.png"
        try:
            commit = (record["git"] or {}).get("commit", "")[:10] or "no git"
            write_plot(rows, png_path, f"{dev['name']} ({device.type}, {torch.get_num_threads()} threads)\n"
                                       f"torch {torch.__version__} - {commit} - {record['timestamp']}")
            print(f"wrote {png_path}")
        except ImportError as e:
            print(f"ditkernels bench: no plot ({_reason(e)}; pip install matplotlib)", file=sys.stderr)

    if args.strict and any(r["status"] == "failed" for r in rows):
        return 1
    return 0
