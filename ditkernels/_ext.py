"""The one loader of the compiled CPU kernels (``ditkernels._cpu_<isa>``) and of the test-only ``ditkernels._emu``.

setup.py compiles ``csrc/cpu`` once per instruction set into separate modules: ``_cpu_generic``
(baseline: SSE2 on x86-64, the compiler's default elsewhere), ``_cpu_avx2`` (x86-64-v3: AVX2 + FMA +
F16C) and ``_cpu_avx512`` (x86-64-v4), plus ``_cpu_native`` when built with ``DITKERNELS_CPU_ARCH``.
The first call of :func:`cpu` picks one, once per process: ``DITKERNELS_CPU_ISA`` when set (an
error if that ISA is not built or the CPU lacks it), else ``native`` when built, else the best ISA
that is built and that the CPU supports. The CPU check runs in ``_cpu_generic``, the only module
that is safe to import on every CPU of its architecture.

Importing this module never needs an extension.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

import torch

ENV = "DITKERNELS_CPU_ISA"
ISAS = ("generic", "avx2", "avx512", "native")  # worst to best; ``native``: opt-in -march build
FIX = "Rebuild with: pip install --no-build-isolation -e . (or pip install .)"
EMU_FIX = "build the test-only extension with: DITKERNELS_TEST_EXT=1 pip install --no-build-isolation -e ."
# Storage dtype -> code understood by the kernels (csrc/cpu/simd.h, enum DType; the CUDA scan uses the same).
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}

_cpu: ModuleType | None = None
_cpu_error: str | None = None


def built_isas() -> list[str]:
    """ISAs whose ``_cpu_<isa>`` module is installed (found, not imported), worst to best."""
    return [isa for isa in ISAS if importlib.util.find_spec(f"ditkernels._cpu_{isa}") is not None]


def cpu_isas() -> list[str]:
    """ISAs this CPU (and OS) can run, from the generic module's check (``native`` is never listed:
    it is whatever the build machine had)."""
    return list(importlib.import_module("ditkernels._cpu_generic").cpu_isas())


def _choose() -> str:
    built = built_isas()
    if "generic" not in built:
        raise ImportError(f"ditkernels._cpu_generic is not built (installed CPU modules: {built or 'none'})")
    supported = cpu_isas()
    forced = os.environ.get(ENV, "").strip()
    if forced:
        if forced not in ISAS:
            raise ValueError(f"{ENV}={forced}: expected one of {', '.join(ISAS)}")
        if forced not in built:
            raise ValueError(f"{ENV}={forced}: ditkernels._cpu_{forced} is not built (built: {', '.join(built)})")
        if forced != "native" and forced not in supported:
            raise ValueError(f"{ENV}={forced}: this CPU lacks {forced} (it runs: {', '.join(supported)})")
        return forced
    if "native" in built:
        return "native"
    return [isa for isa in ISAS if isa in built and isa in supported][-1]


def cpu() -> ModuleType:
    """The CPU kernels module chosen for this process; raises RuntimeError with the reason and the fix."""
    global _cpu, _cpu_error
    if _cpu is None and _cpu_error is None:
        try:
            _cpu = importlib.import_module(f"ditkernels._cpu_{_choose()}")
        except ValueError as exc:  # a DITKERNELS_CPU_ISA that cannot be honoured: no rebuild fixes it
            _cpu_error = str(exc)
        except Exception as exc:  # ImportError, or OSError from the dynamic loader
            _cpu_error = f"the CPU kernels failed to import: {type(exc).__name__}: {exc}. {FIX}"
    if _cpu is None:
        raise RuntimeError(_cpu_error)
    return _cpu


def cpu_error() -> str | None:
    """Why :func:`cpu` fails (None when it works); loads the module on first call."""
    try:
        cpu()
    except RuntimeError as exc:
        return str(exc)
    return None


def isa() -> str | None:
    """The ISA of the CPU kernels in use (None when they do not load)."""
    return None if cpu_error() else cpu().isa


def emu() -> ModuleType:
    """The test-only ``ditkernels._emu`` (CUDA device code under the SIMT emulation); RuntimeError if absent."""
    try:
        return importlib.import_module("ditkernels._emu")
    except ImportError as exc:
        raise RuntimeError(f"ditkernels._emu is not built ({exc}): {EMU_FIX}") from exc
