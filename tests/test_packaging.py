"""Packaging promises: torch-independent binaries, Triton sources inside the ditkernels namespace."""

from __future__ import annotations

import importlib
import importlib.metadata
import shutil
import subprocess

import pytest


def _linked_libraries(module_name: str) -> str:
    mod = importlib.import_module(module_name)
    return subprocess.run(["ldd", mod.__file__], capture_output=True, text=True, check=True).stdout


@pytest.mark.skipif(shutil.which("ldd") is None, reason="ldd is not installed")
def test_cpu_extension_does_not_link_torch():
    libs = _linked_libraries("ditkernels._C")
    for torch_lib in ("libtorch", "libc10"):
        assert torch_lib not in libs, f"ditkernels._C links {torch_lib}: the build must stay torch-independent"


def test_triton_sources_ship_inside_the_namespace():
    importlib.import_module("ditkernels.triton_kernels")
    importlib.import_module("ditkernels.bench")
    files = importlib.metadata.files("ditkernels") or []
    top_levels = {f.parts[0] for f in files if not f.parts[0].endswith((".dist-info", ".pth"))}
    assert "triton_kernels" not in top_levels and "bench" not in top_levels, sorted(top_levels)
