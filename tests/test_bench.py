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
    assert runner._families(["S4096"]) == runner._families(["topk"]) == runner.registered_families()
