"""`python -m ditkernels compile-report --quick`: Triton kernels compile for every shipped arch (sm_80, sm_86,
sm_89, sm_90, sm_100, sm_120) without a GPU, without spills, within that arch's shared memory per block, and
with its tensor-core instruction (HMMA, HGMMA on sm_90, tcgen05's UTCHMMA on sm_100); `device_arch` maps
each compute capability to its row."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import warnings

import pytest

pytest.importorskip("triton")


@pytest.mark.slow  # compiles a subset of the shipped Triton kernels for each of the six shipped archs
def test_compile_report_quick(tmp_path):
    from ditkernels.triton_kernels.archs import ARCHS

    out_json = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-m", "ditkernels", "compile-report", "--arch", ",".join(map(str, ARCHS)),
                           "--quick", "--json", str(out_json)], capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads(out_json.read_text())
    rows = report["triton"]
    assert {r["arch"] for r in rows} == set(ARCHS)
    assert all(r["status"] == "ok" and r["spill_bytes"] == 0 and r["stack"] == 0 for r in rows)
    for arch, spec in ARCHS.items():
        mine = [r for r in rows if r["arch"] == arch]
        assert {"fwd", "bwd_dkdv", "bwd_dq", "select_blocks", "scan_bwd"} <= {r["kernel"] for r in mine}, arch
        assert {"dense", "local", "csr"} <= {r["variant"] for r in mine}, arch
        assert all(0 < r["shared"] <= spec.shared_per_block for r in mine), arch
        f16 = [r for r in mine if r["dtype"] in ("fp16", "bf16") and r["kernel"].startswith(("fwd", "bwd_d"))]
        assert f16 and all(r["mma"] == spec.mma for r in f16), (arch, [r["mma"] for r in f16])
        assert all(r["mma"] == "none" for r in mine if r["dtype"] == "fp32"), arch  # IEEE fp32: CUDA cores
        assert f"sm_{arch} (" in proc.stdout, arch  # the per-arch summary line
    assert {"HMMA", "HGMMA", "UTCHMMA"} <= {r["mma"] for r in rows}
    if importlib.util.find_spec("ditkernels._cuda") is not None:  # built with nvcc: its cubins are listed
        assert report["cuda"] and all(r["status"] == "ok" for r in report["cuda"])


def test_mma_instruction_names():
    from ditkernels.compile_report import mma_instruction

    assert mma_instruction("  HMMA.16816.F32.BF16 R4, R8, R12, R4 ;") == "HMMA"
    assert mma_instruction("HMMA.16816.F32 R0 ;\n HGMMA.64x64x16.F32 gdesc[UR4] ;") == "HGMMA"
    assert mma_instruction("UTCHMMA gdesc[UR4], gdesc[UR6], tmem[UR8] ;\n HMMA.16816.F32 R0 ;") == "UTCHMMA"
    assert mma_instruction("UTCQMMA gdesc[UR4] ;\n UTCHMMA.2CTA tmem[UR8] ;") == "UTCHMMA+UTCQMMA"
    assert mma_instruction("FFMA R1, R2, R3, R4 ;\n SHMMAX R0 ;") == "none"


def test_target_problem_names_an_untargetable_arch():
    from ditkernels.compile_report import target_problem
    from ditkernels.triton_kernels.archs import ARCHS

    assert {a: target_problem(a) for a in ARCHS} == {a: None for a in ARCHS}
    why = target_problem(999)  # no ptxas knows sm_999a
    assert why is not None and "cannot target sm_999a" in why


def test_device_arch_per_capability(monkeypatch):
    import torch

    from ditkernels.triton_kernels import archs, flash

    cap = [(8, 0)]
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cap[0])
    monkeypatch.setattr(archs, "_warned", set())
    cuda = torch.device("cuda")
    expect = {(8, 0): 80, (8, 6): 86, (8, 7): 86, (8, 9): 89, (9, 0): 90, (10, 0): 100, (10, 3): 100,
              (12, 0): 120, (12, 1): 120}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a known capability warns nothing
        for c, row in expect.items():
            cap[0] = c
            assert flash.device_arch(cuda) == row, c
            assert flash.block_sizes(64, torch.float16, cuda) == tuple(
                getattr(flash.config_for("fwd", row, torch.float16, 64), n) for n in ("block_m", "block_n"))
    assert flash.device_arch(torch.device("cpu")) is None
    for c in ((11, 0), (13, 0), (8, 8)):  # unknown: the conservative row, one warning per capability
        cap[0] = c
        with pytest.warns(RuntimeWarning, match=rf"compute capability {c[0]}\.{c[1]}.*sm_{archs.CONSERVATIVE}"):
            assert flash.device_arch(cuda) == archs.CONSERVATIVE
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert flash.device_arch(cuda) == archs.CONSERVATIVE
    conservative = archs.ARCHS[archs.CONSERVATIVE]
    assert conservative.shared_per_block == min(a.shared_per_block for a in archs.ARCHS.values())
    assert conservative.mma == "HMMA"
    cap[0] = (7, 5)
    with pytest.raises(RuntimeError, match=r"compute capability 8\.0 or newer.*got 7\.5"):
        flash.device_arch(cuda)


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
    sched_kind, mask_kind, epi_kind = cr._plugins(job)
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
    epi = Epilogue(torch.ones(1, 1, seq), q) if epi_kind == flash.EPILOGUE_SCALE_RESIDUAL else None
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
        launch = cr._launch(job)
        vals = cr._example_args(job, launch)
        opts = {k: v for k, v in launches[0].items() if k in ("num_warps", "num_stages", "maxnreg")}
        assert opts == launch.options == flash.launch_options(launch.config), job
        got = {k: v for k, v in launches[0].items() if k not in opts}
        assert got == {k: vals[k] for k in got} and set(got) == set(launch.constexprs), job
