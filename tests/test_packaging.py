"""Packaging promises: torch-independent binaries, Triton sources inside the ditkernels namespace."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import shutil
import subprocess

import pytest


@pytest.mark.skipif(shutil.which("ldd") is None, reason="ldd is not installed")
def test_cpu_extensions_do_not_link_torch():
    from ditkernels import _ext

    built = _ext.built_isas()
    assert "generic" in built, built
    for isa in built:  # ldd loads nothing: safe for modules this CPU cannot run
        path = importlib.util.find_spec(f"ditkernels._cpu_{isa}").origin
        libs = subprocess.run(["ldd", path], capture_output=True, text=True, check=True).stdout
        for torch_lib in ("libtorch", "libc10"):
            assert torch_lib not in libs, f"{path} links {torch_lib}: the build must stay torch-independent"


def test_triton_sources_ship_inside_the_namespace():
    importlib.import_module("ditkernels.triton_kernels")
    importlib.import_module("ditkernels.bench")
    files = importlib.metadata.files("ditkernels") or []
    top_levels = {f.parts[0] for f in files if not f.parts[0].endswith((".dist-info", ".pth"))}
    assert "triton_kernels" not in top_levels and "bench" not in top_levels, sorted(top_levels)
