"""`import ditkernels` never fails, and `python -m ditkernels info` explains every backend."""

from __future__ import annotations

import subprocess
import sys


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_info_lists_backends():
    r = subprocess.run([sys.executable, "-m", "ditkernels", "info"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    for name in ("reference", "cpu", "triton"):
        assert any(l.split()[:2] in ([name, "available"], [name, "available:"]) for l in lines), r.stdout
    assert any(l.startswith("  cuda ") for l in lines), r.stdout
    assert "compiled CUDA archs:" in r.stdout


def test_import_without_compiled_extensions_explains_the_fix():
    # Simulate an install whose compiled extensions are missing: import and info must still work,
    # and a call that needs the cpu backend must say why it cannot run and how to fix it.
    r = _run(
        "import sys\n"
        "for isa in ('generic', 'avx2', 'avx512', 'native'): sys.modules['ditkernels._cpu_' + isa] = None\n"
        "sys.modules['ditkernels._cuda'] = None\n"
        "import torch, ditkernels\n"
        "from ditkernels.__main__ import info\n"
        "info([])\n"
        "q = torch.randn(1, 1, 4, 8)\n"
        "try:\n"
        "    ditkernels.attention(q, q, q, backend='cpu')\n"
        "except RuntimeError as e:\n"
        "    print('ERROR:', e)\n"
    )
    assert r.returncode == 0, r.stderr
    assert "cpu        unavailable" in r.stdout
    assert "ERROR: attention: backend 'cpu' cannot run this call" in r.stdout
    assert "pip install" in r.stdout


def test_usage_on_unknown_command():
    r = subprocess.run([sys.executable, "-m", "ditkernels", "frobnicate"], capture_output=True, text=True)
    assert r.returncode == 2 and "usage:" in r.stderr
