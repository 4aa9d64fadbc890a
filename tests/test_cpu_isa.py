"""The CPU kernels per instruction set (README, "One binary for every CPU and every torch"): setup.py
builds ``_cpu_generic``, ``_cpu_avx2`` and ``_cpu_avx512`` (x86-64), ``ditkernels/_ext.py`` picks one
per process and ``DITKERNELS_CPU_ISA`` forces one.

The rest of the suite runs the ISA picked for this machine. Here a small CPU numerics subset (attention
forward/backward against float64, the selective scan, top-k selection) runs again in a subprocess for
every other ISA this CPU supports, forced through the variable; an ISA is skipped only when this CPU
lacks it.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ditkernels import _ext

HERE = Path(__file__).resolve().parent
X86 = platform.machine().lower() in ("x86_64", "amd64")
# The subset: every CPU kernel (attention forward/backward in every dtype and schedule at odd sizes, the
# epilogue, local windows, the selective-scan forward/backward, exact top-k selection) against float64, at
# the suites' own small shapes; gradchecks and torch.compile tests are left to the main run (they test no
# ISA code).
SUBSET = ["test_attention_cpu.py", "test_selective_scan.py", "test_topk_attention.py", "test_local_attention.py",
          "test_cpu_isa.py"]
SUBSET_K = ("(test_forward_backward and Sq97-Sk200 and contig) or test_epilogue"
            " or (test_matches_float64_reference and cpu) or (test_topk_matches_float64 and cpu and Sq97)"
            " or (test_cpu_selection_matches_torch and not Sk2049) or test_isa_in_use_is_the_forced_one"
            " or (test_fp32_matches_float64 and cpu and (9x11 or 5x6x7))")


def _supported_or_skip(isa: str) -> None:
    if isa != "generic" and not X86:
        pytest.skip(f"{isa}: not an x86-64 CPU ({platform.machine()}): only the generic kernels are built")
    if isa not in _ext.cpu_isas():
        pytest.skip(f"this CPU lacks {isa} (it runs: {', '.join(_ext.cpu_isas())})")
    if isa not in _ext.built_isas():
        pytest.fail(f"ditkernels._cpu_{isa} is not built although this CPU runs it (built: {_ext.built_isas()}); "
                    f"{_ext.FIX}")


def _env(isa: str) -> dict[str, str]:
    return {**os.environ, _ext.ENV: isa}


def test_isa_in_use_is_the_forced_one():
    """In a process with DITKERNELS_CPU_ISA set (the subprocesses below), that module is the one loaded."""
    forced = os.environ.get(_ext.ENV)
    if forced:
        assert _ext.cpu_error() is None, _ext.cpu_error()
        assert _ext.isa() == forced and _ext.cpu().__name__ == f"ditkernels._cpu_{forced}"
    else:
        # Unforced: native when built, else the best ISA that is both built and supported.
        want = "native" if "native" in _ext.built_isas() else \
            [i for i in _ext.ISAS if i in _ext.built_isas() and i in _ext.cpu_isas()][-1]
        assert _ext.isa() == want


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_cpu_numerics_per_isa(isa):
    _supported_or_skip(isa)
    if isa == _ext.isa() and not os.environ.get(_ext.ENV):
        pytest.skip(f"{isa} is this process's ISA: the whole suite runs it")
    cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-k", SUBSET_K, *SUBSET]
    r = subprocess.run(cmd, cwd=HERE, env=_env(isa), capture_output=True, text=True, timeout=1200)
    tail = (r.stdout + r.stderr)[-3000:]
    assert r.returncode == 0, f"{_ext.ENV}={isa}: {' '.join(cmd)}\n{tail}"
    assert " passed" in r.stdout and " failed" not in r.stdout, tail


def test_forced_isa_errors_name_the_variable(monkeypatch):
    monkeypatch.setattr(_ext, "_cpu", None)
    monkeypatch.setattr(_ext, "_cpu_error", None)
    for value, message in (("sse9", "expected one of generic, avx2, avx512, native"),
                           ("native", "ditkernels._cpu_native is not built")):
        if value in _ext.built_isas():
            continue
        monkeypatch.setenv(_ext.ENV, value)
        with pytest.raises(RuntimeError, match=re.escape(f"{_ext.ENV}={value}: {message}")):
            _ext.cpu()
        monkeypatch.setattr(_ext, "_cpu_error", None)
    # A CPU without AVX-512 (simulated: the check answers generic + avx2) refuses a forced avx512.
    monkeypatch.setattr(_ext, "cpu_isas", lambda: ["generic", "avx2"])
    monkeypatch.setattr(_ext, "built_isas", lambda: ["generic", "avx2", "avx512"])
    monkeypatch.setenv(_ext.ENV, "avx512")
    with pytest.raises(RuntimeError, match=f"{_ext.ENV}=avx512: this CPU lacks avx512 .it runs: generic, avx2."):
        _ext.cpu()
    from ditkernels.backends import cpu

    ok, why = cpu.available()
    assert not ok and "this CPU lacks avx512" in why


def test_cli_info_shows_the_isa():
    r = subprocess.run([sys.executable, "-m", "ditkernels", "info"], env=_env("generic"), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "CPU kernels ISA: generic (ditkernels._cpu_generic)" in r.stdout, r.stdout
    assert f"built: {', '.join(_ext.built_isas())}; this CPU runs: {', '.join(_ext.cpu_isas())}" in r.stdout


@pytest.mark.skipif(shutil.which("objdump") is None, reason="objdump (binutils) is not installed")
@pytest.mark.parametrize("isa,forbidden", [("generic", ("%ymm", "%zmm")), ("avx2", ("%zmm",))])
def test_module_has_no_wider_instructions(isa, forbidden):
    """A module must not contain instructions of a wider ISA: the build must never leak -march=native
    (or a neighbour's flags) into the generic or AVX2 object code."""
    if isa != "generic" and not X86:
        pytest.skip(f"{isa}: not an x86-64 CPU")
    if not X86:
        pytest.skip("the register names checked are x86's")
    if isa not in _ext.built_isas():
        pytest.fail(f"ditkernels._cpu_{isa} is not built ({_ext.FIX})")
    import importlib.util

    path = importlib.util.find_spec(f"ditkernels._cpu_{isa}").origin
    asm = subprocess.run(["objdump", "-d", "--no-show-raw-insn", path], capture_output=True, text=True,
                         check=True).stdout
    found = {reg: asm.count(reg) for reg in forbidden if reg in asm}
    assert not found, f"{path}: {found}"
    if isa == "avx2":
        assert "vfmadd" in asm and "%ymm" in asm, f"{path}: no AVX2/FMA code at all"
