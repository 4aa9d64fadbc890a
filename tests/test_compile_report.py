"""`python -m ditkernels compile-report --quick`: Triton kernels compile for sm_80 / sm_90 without a GPU,
without spills, within shared memory, and with warpgroup MMA (HGMMA) on sm_90."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


@pytest.mark.slow  # compiles the shipped Triton kernels for sm_80 and sm_90
def test_compile_report_quick(tmp_path):
    out_json = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "ditkernels", "compile-report", "--arch", "80,90", "--quick",
                           "--json", str(out_json)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out_json.read_text())
    rows = report["triton"]
    assert {r["arch"] for r in rows} == {80, 90}
    assert all(r["status"] == "ok" and r["spill_bytes"] == 0 and r["stack"] == 0 for r in rows)
    sm90_f16 = [r for r in rows if r["arch"] == 90 and r["dtype"] in ("fp16", "bf16")
                and r["kernel"].startswith(("fwd", "bwd_dkdv", "bwd_dq"))]
    assert sm90_f16 and all(r["mma"] == "HGMMA" for r in sm90_f16)
    assert any(r["mma"] == "HMMA" for r in rows if r["arch"] == 80)
    assert "HGMMA" in proc.stdout
    assert {"select_pool", "select_blocks", "scan_fwd", "scan_bwd"} <= {r["kernel"] for r in rows}
    if importlib.util.find_spec("ditkernels._cuda") is not None:  # built with nvcc: its cubins are listed
        assert {r["arch"] for r in report["cuda"]} == {"sm_80", "sm_90a"}
        assert all(r["status"] == "ok" for r in report["cuda"])


class _Recorder:
    """Stands in for a Triton kernel: ``kernel[grid](*args, **kwargs)`` records the keyword arguments."""

    def __init__(self, name: str, log: list):
        self.name, self.log = name, log

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.log.append((self.name, kwargs))


def _launch_inputs(job, flash, seq: int = 256):
    """(q, schedule, mask, epilogue) of the launch that compile-report's ``job`` stands for."""
    import torch

    from ditkernels import compile_report as cr
    from ditkernels.schedule import BlockSchedule, ElementMask, Epilogue, TiledSchedule

    dtype = flash.DTYPES[job.dtype]
    head_dim = job.block_d * 5 // 8 if job.variant == "odd_d" else job.block_d
    q = torch.randn(1, 1, seq, head_dim, dtype=dtype)
    sched_kind, mask_kind = flash.VARIANTS[cr._config_variant(job)]
    schedule = None
    if sched_kind == flash.SCHEDULE_CSR:  # an op's schedule: the forward config's tiles (block_sizes)
        fwd = flash.config_for("fwd", job.arch, dtype, job.block_d)
        tiles = torch.ones(1, -(-seq // fwd.block_m), -(-seq // fwd.block_n), dtype=torch.bool)
        schedule = BlockSchedule.from_tile_mask(tiles, fwd.block_m, fwd.block_n, seq, seq, tiles)
    elif sched_kind == flash.SCHEDULE_TILED:  # local attention's plans: 64-token tiles, 64/32/16 keys
        bn = int(job.variant[len("local_n"):]) if job.variant.startswith("local_n") else 64
        qt, kt = (torch.arange(seq).reshape(-1, b) for b in (64, bn))
        qi, ki = (x.reshape(-1) for x in torch.meshgrid(torch.arange(qt.shape[0]), torch.arange(kt.shape[0]),
                                                         indexing="ij"))
        schedule = TiledSchedule.from_visits(qt, kt, seq, seq, qi, ki, torch.ones_like(qi))
    mask = None if mask_kind == flash.MASK_NONE else ElementMask(
        mask_kind, (8, 0, seq, 0) if mask_kind == flash.MASK_BAND else (),
        rows=torch.zeros(1, 1, seq) if mask_kind == flash.MASK_THRESHOLD else None)
    epi = Epilogue(torch.ones(1, 1, seq), q) if job.variant in cr.EPILOGUE_VARIANTS else None
    return q, schedule, mask, epi


def test_report_compiles_what_the_launchers_launch(monkeypatch):
    # Every attention job of the full report: the constexprs and compile options compile-report compiles
    # are the ones flash_fwd / flash_bwd pass to the kernel for that launch on that arch (kernels recorded,
    # not run).
    from ditkernels import compile_report as cr
    from ditkernels.triton_kernels import flash

    log: list = []
    names = {"fwd": "_flash_fwd_kernel", "bwd_preprocess": "_flash_bwd_preprocess_kernel",
             "bwd_dkdv": "_flash_bwd_dkdv_kernel", "bwd_dq": "_flash_bwd_dq_kernel"}
    for name in names.values():
        monkeypatch.setattr(flash, name, _Recorder(name, log))
    arch = [None]
    monkeypatch.setattr(flash, "device_arch", lambda device: arch[0])
    jobs = [j for j in cr.jobs_for([80, 90], quick=False) if isinstance(j, cr.Job)]
    assert {cr._config_variant(j) for j in jobs} == set(flash.VARIANTS)
    for job in jobs:
        arch[0] = job.arch
        q, schedule, mask, epi = _launch_inputs(job, flash)
        log.clear()
        if job.kernel == "fwd":
            flash.flash_fwd(q, q, q, scale=0.1, schedule=schedule, mask=mask, epilogue=epi)
        else:
            flash.flash_bwd(q, q, q, q, q, q[..., 0].float(), scale=0.1, schedule=schedule, mask=mask)
        launches = [kw for name, kw in log if name == names[job.kernel]
                    and (not job.part or kw["OUT_DK"] == (job.part == "dk"))]
        assert len(launches) == 1, job
        cfg = cr._config(job)
        vals = cr._example_args(job, cfg, q.shape[-1])
        opts = {k: v for k, v in launches[0].items() if k in ("num_warps", "num_stages", "maxnreg")}
        assert opts == flash.launch_options(cfg), job
        got = {k: v for k, v in launches[0].items() if k not in opts}
        assert got == {k: vals[k] for k in got}, job
