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
