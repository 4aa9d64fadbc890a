"""The benchmark runner (``python -m ditkernels bench``): registry, rows, table, JSON record, plot.

Tiny sizes only; no timing assertions (timings never go into tests).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ditkernels.bench import runner
from ditkernels.bench.runner import Case, SkipImpl, main, register

ROW_KEYS = {"case", "family", "name", "params", "mode", "impl", "status", "reason", "detail", "warnings",
            "useful_flops", "reference", "speedup_vs_ref"}
OK_KEYS = {"time_ms", "time_ms_p20", "time_ms_p80", "reps", "timer", "useful_flop_per_s", "setup_s", "rel_err_vs_ref"}


def _run(tmp_path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict, str]:
    rc = main(["--device", "cpu", "--out", str(tmp_path), "--tag", "t", "--no-progress", "--reps", "3",
               "--warmup", "0", *args])
    out = capsys.readouterr().out
    record = json.loads((tmp_path / "t.json").read_text()) if (tmp_path / "t.json").exists() else {}
    return rc, record, out


def test_dense_attention_record_table_and_plot(tmp_path, capsys):
    rc, record, out = _run(tmp_path, capsys, "--sizes", "64", "--impl", "sdpa,ditkernels", "--mode", "both",
                           "--filter", "attention.dense")
    assert rc == 0
    assert record["schema"] == runner.SCHEMA
    assert {"timestamp", "command", "device", "versions", "git", "config", "flops_convention", "rows"} <= set(record)
    assert record["device"]["type"] == "cpu" and record["device"]["name"]
    assert record["device"]["threads"] == torch.get_num_threads()
    assert {"python", "torch", "triton", "ditkernels"} <= set(record["versions"])
    assert record["config"]["sizes"] == [64]

    rows = record["rows"]
    assert [(r["mode"], r["impl"]) for r in rows] == [("fwd", "ditkernels"), ("fwd", "sdpa"),
                                                      ("fwdbwd", "ditkernels"), ("fwdbwd", "sdpa")]
    fwd_flops = 4.0 * 1 * 8 * 64 * 64 * 64
    for r in rows:
        assert ROW_KEYS <= set(r), r
        assert r["case"] == "attention.dense/B1-H8-S64-D64-fp32"
        assert r["reference"] == "sdpa"
        assert r["useful_flops"] == (fwd_flops if r["mode"] == "fwd" else 3.5 * fwd_flops)
        assert r["status"] in ("ok", "skipped", "failed")
        if r["status"] == "ok":
            assert OK_KEYS <= set(r), r
            assert r["time_ms"] > 0 and r["reps"] == 3
        else:
            assert r["reason"]
    sdpa = [r for r in rows if r["impl"] == "sdpa"]
    assert all(r["status"] == "ok" and r["speedup_vs_ref"] == 1.0 for r in sdpa)
    # ditkernels.attention runs on any CPU install (the reference backend at worst) and matches SDPA.
    for r in rows:
        if r["impl"] == "ditkernels":
            assert r["status"] == "ok", r["reason"]
            assert r["rel_err_vs_ref"] < 1e-5
            if r["mode"] == "fwdbwd":
                assert set(r["rel_err_grads_vs_ref"]) == {"q", "k", "v"}
                assert max(r["rel_err_grads_vs_ref"].values()) < 1e-5

    history = [json.loads(line) for line in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert len(history) == len(rows)
    assert all(h["timestamp"] == record["timestamp"] and h["device_name"] and h["torch_version"] for h in history)

    png = tmp_path / "t.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "case" in out and "GFLOP/s" in out and "speed-up" in out
    assert "attention.dense/B1-H8-S64-D64-fp32" in out
    assert f"wrote {tmp_path / 't.json'}" in out


def test_scan_family_rows(tmp_path, capsys):
    """The scan family at a tiny L: ditkernels against mamba-ssm's reference loop (and mambapy)."""
    rc, record, out = _run(tmp_path, capsys, "--sizes", "32", "--filter", "scan/", "--no-plot", "--mode", "both")
    assert rc == 0
    rows = {(r["mode"], r["impl"]): r for r in record["rows"]}
    assert set(rows) == {(m, i) for m in ("fwd", "fwdbwd") for i in ("ditkernels", "mamba-ref", "mambapy")}
    fwd_flops = 7.0 * 2 * 1536 * 32 * 16
    for (mode, impl), r in rows.items():
        assert r["case"] == "scan/B2-D1536-L32-N16-fp32"
        assert r["reference"] == "mamba-ref"
        assert r["useful_flops"] == (fwd_flops if mode == "fwd" else 3.0 * fwd_flops)
        assert r["status"] == "ok" or (impl == "mambapy" and r["status"] == "skipped"), (mode, impl, r["reason"])
    assert rows[("fwd", "mamba-ref")]["speedup_vs_ref"] == 1.0
    for mode in ("fwd", "fwdbwd"):
        r = rows[(mode, "ditkernels")]
        assert r["detail"] == "backend=cpu"
        assert r["rel_err_vs_ref"] < 1e-5
        assert r["speedup_vs_ref"] > 0
    grads = rows[("fwdbwd", "ditkernels")]["rel_err_grads_vs_ref"]
    assert set(grads) == {"u", "delta", "A", "B", "C", "D", "z", "delta_bias"}
    assert max(grads.values()) < 1e-4
    assert main(["--device", "cpu", "--list", "--quick", "--filter", "scan/"]) == 0
    assert capsys.readouterr().out.split()[0] == "scan/B2-D1536-L1024-N16-fp32"  # --quick: the issue's case


@pytest.fixture
def tiny_family():
    """A throw-away family with an ok, a skipped and a failing impl, and a forward-only case."""

    def ok(inputs):
        x = inputs["x"]
        return lambda: x * 2

    def skip(inputs):
        raise SkipImpl("needs hardware that is not here")

    def boom(inputs):
        def fn():
            raise RuntimeError("kernel exploded\nsecond line")

        return fn

    @register("test.tiny")
    def cases(cfg):
        for n in cfg.sizes or (8,):
            yield Case(name=f"N{n}", params={"N": n}, useful_flops=float(n),
                       make_inputs=lambda rg, n=n: {"x": torch.ones(n, requires_grad=rg)},
                       impls={"ok": ok, "skip": skip, "boom": boom}, reference="ok", grad_inputs=("x",))
        yield Case(name="fwd-only", params={}, useful_flops=1.0, make_inputs=lambda rg: {"x": torch.ones(4)},
                   impls={"ok": ok}, reference="ok")

    yield "test.tiny"
    runner.unregister("test.tiny")


def test_skips_and_failures_are_rows_not_crashes(tmp_path, capsys, tiny_family):
    rc, record, out = _run(tmp_path, capsys, "--filter", "test.tiny/", "--no-plot", "--mode", "both")
    assert rc == 0
    status = {(r["name"], r["mode"], r["impl"]): (r["status"], r["reason"]) for r in record["rows"]}
    assert status[("N8", "fwd", "ok")] == ("ok", None)
    assert status[("N8", "fwd", "skip")] == ("skipped", "needs hardware that is not here")
    assert status[("N8", "fwd", "boom")] == ("failed", "RuntimeError: kernel exploded")
    assert status[("N8", "fwdbwd", "ok")] == ("ok", None)
    assert status[("fwd-only", "fwdbwd", "ok")] == ("skipped", "forward-only case")
    fwdbwd = next(r for r in record["rows"] if (r["name"], r["mode"], r["impl"]) == ("N8", "fwdbwd", "ok"))
    assert fwdbwd["useful_flops"] == 8 * 3.5
    assert "skipped: needs hardware that is not here" in out
    assert "failed: RuntimeError: kernel exploded" in out
    assert not (tmp_path / "t.png").exists()

    rc, _, _ = _run(tmp_path, capsys, "--filter", "test.tiny/N", "--no-plot", "--mode", "fwd", "--strict")
    assert rc == 1


def test_load_times_again_beside_busy_processes(tmp_path, capsys, tiny_family, monkeypatch):
    started = []
    real = runner.BusyProcesses.__enter__

    def enter(self):
        started.append(self.n)
        out = real(self)
        assert all(p.poll() is None for p in self.procs)  # spinning while the loaded runs are timed
        started.append(self.procs)
        return out

    monkeypatch.setattr(runner.BusyProcesses, "__enter__", enter)
    rc, record, out = _run(tmp_path, capsys, "--filter", "test.tiny/N", "--no-plot", "--mode", "fwd", "--load", "2")
    assert rc == 0 and started[0] == 2 and all(p.poll() is not None for p in started[1])  # stopped afterwards
    row = next(r for r in record["rows"] if r["impl"] == "ok")
    assert row["load_processes"] == 2 and row["time_ms_loaded"] > 0
    assert row["load_slowdown"] == pytest.approx(row["time_ms_loaded"] / row["time_ms"])
    assert record["config"]["load"] == 2
    header = out.splitlines()[next(i for i, l in enumerate(out.splitlines()) if l.startswith("case"))]
    assert "loaded ms" in header and "slowdown" in header
    assert main(["--device", "cpu", "--filter", "test.tiny/", "--load", "-1", "--out", str(tmp_path)]) == 2


def test_list_and_usage_errors(tmp_path, capsys, tiny_family):
    assert main(["--device", "cpu", "--list", "--filter", "test.tiny/", "--sizes", "3,5"]) == 0
    listed = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listed] == ["test.tiny/N3", "test.tiny/N5", "test.tiny/fwd-only"]
    assert main(["--device", "cpu", "--list", "--quick", "--filter", "attention.dense/"]) == 0
    assert "B1-H8-S4096-D64-fp32" in capsys.readouterr().out  # --quick keeps seq 4096, 8 heads, head_dim 64
    assert main(["--device", "cpu", "--filter", "no-such-case", "--out", str(tmp_path)]) == 2
    assert main(["--device", "cpu", "--filter", "test.tiny/", "--impl", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown --impl" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--sizes", "a,b"])


def test_table_formatting_aligns_columns():
    rows = [dict(case="f/a", mode="fwd", impl="x", status="ok", time_ms=1.5, useful_flop_per_s=2e9,
                 speedup_vs_ref=1.0, reference="x", rel_err_vs_ref=None, detail=None, warnings=[], reason=None),
            dict(case="f/bbbbbb", mode="fwdbwd", impl="yy", status="skipped", reason="why", reference="x",
                 speedup_vs_ref=None, detail=None, warnings=[])]
    lines = runner.format_table(rows, torch.device("cpu")).splitlines()
    assert len(lines) == 4
    assert lines[0].index("mode") == lines[2].index("fwd") == lines[3].index("fwdbwd")
    assert "1.00x (ref)" in lines[2] and "skipped: why" in lines[3]


def test_sparse_families_rows(tmp_path, capsys):
    """The sparse families at a tiny sequence: block top-k (with and without selection) and exact top-k."""
    rc, record, out = _run(tmp_path, capsys, "--sizes", "256", "--quick", "--filter", "sparse.",
                           "--impl", "ditkernels,ditkernels_mask,sdpa,torch_topk", "--no-plot", "--mode", "both")
    assert rc == 0
    rows = {(r["case"], r["mode"], r["impl"]): r for r in record["rows"]}
    blk = "sparse.block_topk/B1-H8-S256-D64-blk64-d10-fp32"
    tk = "sparse.topk/B1-H8-S256-D64-k16-fp32"
    for mode in ("fwd", "fwdbwd"):
        for impl in ("ditkernels", "ditkernels_mask", "sdpa"):
            assert rows[blk, mode, impl]["status"] == "ok", rows[blk, mode, impl]["reason"]
        for impl in ("ditkernels", "torch_topk"):
            assert rows[tk, mode, impl]["status"] == "ok", rows[tk, mode, impl]["reason"]
        # the selection-included call and the precomputed-mask call compute the same attention
        assert rows[blk, mode, "ditkernels"]["rel_err_vs_ref"] == pytest.approx(
            rows[blk, mode, "ditkernels_mask"]["rel_err_vs_ref"], rel=1e-4)
        # same selection as torch.topk except the rows with a near-tie at the k-th score (kept: see ops/topk.py)
        assert rows[tk, mode, "ditkernels"]["rel_err_vs_ref"] < 2e-2
    assert rows[blk, "fwd", "ditkernels"]["params"]["topk_blocks"] == 1


def test_a_family_filter_builds_only_that_family(monkeypatch):
    # --sizes means an N x N grid to rettention.speed: a filter naming another family must not build it
    runner.discover()
    built = []
    for fam in runner.registered_families():
        gen = runner._GENERATORS[fam]
        monkeypatch.setitem(runner._GENERATORS, fam, lambda cfg, fam=fam, gen=gen: (built.append(fam), gen(cfg))[1])
    cfg = runner.SweepConfig(device=torch.device("cpu"), dtype=torch.float32, quick=True, sizes=[1024])
    cases = runner.build_cases(cfg, ["sparse.topk"])
    assert built == ["sparse.topk"] and cases and all(c.id.startswith("sparse.topk/") for c in cases)
    assert runner._families(["scan/"]) == ["scan"]
    assert runner._families(["rettention.speed/band"]) == ["rettention.speed"]
    default = [f for f in runner.registered_families() if f not in ("e2e", "model")]
    assert runner._families(["S4096"]) == runner._families(["topk"]) == runner._families([]) == default
    # whole-model families run only when named
    assert runner._families(["e2e"]) == ["e2e"] and runner._families(["model/"]) == ["model"]


# ----------------------------------------------------------------------------------------------
# Model presets (bench/models.py), the end-to-end family (bench/e2e.py) and the plot


def test_model_presets_list_and_auto_scale(capsys):
    from ditkernels.bench import models

    assert main(["--device", "cpu", "--list-models"]) == 0
    listed = capsys.readouterr().out
    for name in ("dit-xl-256", "dit-xl-512", "pixart-sigma-1024", "pixart-sigma-2048", "sd35-large", "flux-dev-1024",
                 "flux-dev-2048", "flux-dev-4096", "cogvideox-5b", "hunyuanvideo-720p", "wan2.1-14b-720p"):
        assert name in listed and name in models.PRESETS
    assert "transformer/config.json" in listed
    # the published shapes the issue names: joint text + image at head_dim 128, 75k-120k video tokens
    flux = models.PRESETS["flux-dev-4096"]
    assert (flux.heads, flux.head_dim, flux.grid, flux.text, flux.seq) == (24, 128, (256, 256), 512, 66048)
    assert models.PRESETS["pixart-sigma-1024"].head_dim == 72
    assert models.PRESETS["hunyuanvideo-720p"].seq == 33 * 45 * 80 + 256
    assert models.PRESETS["wan2.1-14b-720p"].seq == 21 * 45 * 80
    for name, full in models.PRESETS.items():
        p, changes = models.scaled(full, "auto")
        assert p.dense_flops() <= models.CPU_DENSE_FLOPS, name
        assert (p.head_dim, p.text, p.grid[-1]) == (full.head_dim, full.text, full.grid[-1]), name  # never shrunk
        assert bool(changes) == (p != full), name
        assert p.heads >= min(full.heads, torch.get_num_threads()), name  # a head per thread at least
        if len(full.grid) == 3:
            assert p.grid[0] >= 2, name  # a video keeps 2 frames at least
    p, changes = models.scaled(models.PRESETS["cogvideox-5b"], models.parse_scale("heads=2,frames=3"))
    assert (p.heads, p.grid, changes) == (2, (3, 30, 45), ["heads 48->2", "frames 13->3"])
    assert models.scaled(flux, "none") == (flux, [])


def test_model_usage_errors(capsys):
    assert main(["--device", "cpu", "--model", "no-such-model", "--list"]) == 2
    assert "unknown preset 'no-such-model'" in capsys.readouterr().err
    assert main(["--device", "cpu", "--model", "dit-xl-256", "--scale", "heads=0", "--list"]) == 2
    assert "--scale" in capsys.readouterr().err


def test_clear_mask_mod_matches_the_local_reference():
    """FlexAttention's mask_mod of a preset (3-D grid, text after the grid) selects CLEAR's window exactly."""
    import ditkernels
    from ditkernels.bench import models
    from ditkernels.ops.rettention import dense_visible

    for p, win in ((models.Preset("t", "m", "c", "r", 1, 1, 8, (3, 5, 7), 4, False), (1, 2, 3)),
                   (models.Preset("t", "m", "c", "r", 1, 1, 8, (7, 13), 5, True), 3)):
        idx = torch.arange(p.seq)
        got = models._clear_mask_mod(p, win)(0, 0, idx[:, None], idx[None, :])
        q = torch.zeros(1, 1, p.seq, 8)
        want = dense_visible(ditkernels.LocalWindow(p.grid, win, num_prefix=p.num_prefix, num_suffix=p.num_suffix),
                             q, q, 1.0)
        assert torch.equal(got, want.reshape(p.seq, p.seq))


def test_model_preset_rows(tmp_path, capsys):
    """Two presets scaled to tiny calls: image-only (DiT, NATTEN runs) and joint text after the grid (SD3.5)."""
    impls = "sdpa,ditkernels,local-r8,local-sq-r8,natten-r8,block-topk-10%,re-sparse"
    rc, record, out = _run(tmp_path, capsys, "--model", "dit-xl-512", "--model", "sd35-large", "--scale",
                           "batch=1,heads=1,rows=20", "--impl", impls, "--no-plot", "--mode", "both", "--reps", "1")
    assert rc == 0
    assert "dit-xl-512: DiT-XL/2 at 512x512 px" in out and "facebook/DiT-XL-2-512 transformer/config.json" in out
    assert "run scaled (--scale batch=1,heads=1,rows=20): batch 2->1, heads 16->1, grid rows 32->20" in out
    rows = {(r["case"].split("/")[1], r["mode"], r["impl"]): r for r in record["rows"]}
    dit, sd3 = "dit-xl-512", "sd35-large"
    assert rows[dit, "fwd", "sdpa"]["case"] == "model/dit-xl-512/B1-H1-20x32-D72-fp32"
    assert rows[sd3, "fwd", "sdpa"]["params"]["seq"] == 20 * 64 + 333
    assert rows[sd3, "fwd", "sdpa"]["params"]["scaled"] == ["batch 2->1", "heads 38->1", "grid rows 64->20"]
    assert "scaled: batch 2->1" in rows[sd3, "fwd", "sdpa"]["detail"]
    for (preset, mode, impl), r in rows.items():
        if impl == "re-sparse" and mode == "fwdbwd":
            assert r["status"] == "skipped" and "inference only" in r["reason"]
        elif impl == "natten-r8":
            assert r["status"] == "skipped"
            assert ("text" if preset == sd3 else "power-of-two head_dim only, got 72") in r["reason"]
        else:
            assert r["status"] == "ok", (preset, mode, impl, r["reason"])
    for preset in (dit, sd3):
        for mode in ("fwd", "fwdbwd"):
            assert rows[preset, mode, "ditkernels"]["rel_err_vs_ref"] < 1e-5
    assert rows[dit, "fwd", "local-r8"]["detail"].startswith("backend=cpu, window 8 circle")


def test_model_natten_impl_computes_our_square_window():
    """The preset's NATTEN implementation (layout in and out) and our shifted square window agree."""
    pytest.importorskip("natten")
    from ditkernels.bench import models

    p = models.Preset("t", "m", "c", "r", 1, 2, 16, (17, 19))
    impls = models._builders(p, "")
    torch.manual_seed(0)
    inputs = {n: torch.randn(1, 2, p.seq, 16) for n in "qkv"}
    ours, theirs = impls["local-sq-r8"](inputs)(), impls["natten-r8"](inputs)()
    assert (ours - theirs).norm() / ours.norm() < 1e-5


def test_e2e_pixart_step_rows(tmp_path, capsys):
    """The end-to-end family on the real PixArt class at its real width, at 64 px (4x4 tokens)."""
    rc, record, out = _run(tmp_path, capsys, "--filter", "e2e/pixart", "--sizes", "64", "--mode", "fwd", "--reps", "1",
                           "--no-plot")
    assert rc == 0
    rows = {r["impl"]: r for r in record["rows"]}
    assert set(rows) == {"stock", "local-r16", "block-topk-10%", "re-sparse"}
    for impl, r in rows.items():
        assert r["status"] == "ok", (impl, r["reason"])
        assert r["case"] == "e2e/pixart-sigma-64px-B1-4x4+T300-H16-D72-2L-fp32"
        assert "% of the step" in r["detail"] and "peak +" in r["detail"]
    # the 4x4 grid lies inside the radius-16 window: the local step is the stock step
    assert rows["local-r16"]["rel_err_vs_ref"] < 1e-5
    assert rows["re-sparse"]["rel_err_vs_ref"] < 1.0


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(head[16:20], "big"), int.from_bytes(head[20:24], "big")


def test_plot_one_panel_per_family_at_most_2000_px(tmp_path):
    rows = []
    for fam, n_cases in (("attention.local", 3), ("sparse.block_topk", 40)):
        for c in range(n_cases):
            for mode in ("fwd", "fwdbwd"):
                for impl, t in (("sdpa", 10.0), ("ditkernels", 2.0), ("flex", None)):
                    rows.append(dict(case=f"{fam}/B1-H8-S4096-D64-case{c}", family=fam, mode=mode, impl=impl,
                                     reference="sdpa", status="ok" if t else "skipped", time_ms=t,
                                     speedup_vs_ref=10.0 / t if t else None))
    panels = runner._plot_panels(rows)
    assert [p[0] for p in panels][:1] == ["attention.local"] and len({p[0] for p in panels}) == 2
    assert all(len(g) * (22 * len(i) + 30) + 200 <= runner.PLOT_MAX_PX for _, g, i in panels)
    runner.write_plot(rows, tmp_path / "p.png", "title")
    width, height = _png_size(tmp_path / "p.png")
    assert width <= 2000 and height > 360 * len(panels)


def test_emulate_isa_restricts_torch_and_ditkernels():
    """--emulate-isa avx2 sets the ISA variables before the first op (in a fresh process: this one's torch
    capability is fixed already), so torch's kernels and ours both run as on an AVX2 CPU."""
    import subprocess
    import sys

    from ditkernels import _ext

    if "avx2" not in _ext.cpu_isas():
        pytest.skip("this CPU has no AVX2")
    code = ("import torch; from ditkernels.bench.runner import main; "
            "rc = main(['--device', 'cpu', '--emulate-isa', 'avx2', '--list', '--filter', 'attention.dense/']); "
            "import ditkernels._ext as e; print(rc, torch.backends.cpu.get_cpu_capability(), e.isa())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[-3:] == ["0", "AVX2", "avx2"]


def test_flex_output_check_skips_a_wrong_flex():
    """bench's compiled-Flex guard: the right masked output passes, a perturbed one is a skip naming the error."""
    from torch.nn.attention.flex_attention import create_block_mask, create_mask

    from ditkernels.bench.attention import _check_flex

    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 96, 16) for _ in range(3))
    band = lambda b, h, q_idx, kv_idx: (q_idx - kv_idx).abs() <= 5  # noqa: E731
    bm = create_block_mask(band, B=None, H=None, Q_LEN=96, KV_LEN=96, device="cpu", BLOCK_SIZE=32)
    mask = create_mask(band, 1, 2, 96, 96, device="cpu")
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    _check_flex(out, q, k, v, bm)
    _check_flex(torch.nn.functional.scaled_dot_product_attention(q, k, v), q, k, v, None)
    with pytest.raises(SkipImpl, match="compiled FlexAttention is wrong here: rel. err"):
        _check_flex(torch.nn.functional.scaled_dot_product_attention(q, k, v), q, k, v, bm)  # mask ignored
