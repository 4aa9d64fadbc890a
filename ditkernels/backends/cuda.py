"""The ``cuda`` backend: CUDA C++ kernels from the ``ditkernels._cuda`` extension.

The extension is built only where ``nvcc`` was found at install time. It holds the selective-scan
kernels (launcher: :mod:`ditkernels.backends.cuda_scan`); attention on CUDA tensors runs through
the triton backend.
"""

from __future__ import annotations

import importlib

import torch

from . import SELECTIVE_SCAN, device_only
from . import no_limits as limits  # noqa: F401 (the contract's limits: none)
from .cuda_scan import saved_shape, scan_bwd, scan_fwd  # noqa: F401 (SELECTIVE_SCAN)

NAME = "cuda"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CAPABILITIES = frozenset({SELECTIVE_SCAN})
_FIX = "reinstall on a machine with the CUDA toolkit (nvcc on PATH or CUDA_HOME set): pip install --no-build-isolation ."


def extension():
    """The compiled ``ditkernels._cuda`` module, or raise ImportError with the reason and the fix."""
    try:
        mod = importlib.import_module("ditkernels._cuda")
    except ImportError as exc:
        raise ImportError(f"ditkernels._cuda is not built ({exc}); {_FIX}") from exc
    if not hasattr(mod, "selective_scan_fwd"):
        raise ImportError(f"ditkernels._cuda has no selective_scan_fwd (stale build); {_FIX}")
    return mod


def compiled_archs() -> list[str]:
    try:
        return list(extension().archs())
    except ImportError:
        return []


def available() -> tuple[bool, str]:
    try:
        ext = extension()
    except ImportError as exc:
        return False, str(exc)
    if not torch.cuda.is_available():
        return False, (f"built for {', '.join(ext.archs())} but torch sees no CUDA device "
                       f"(torch {torch.__version__}, cudaGetDeviceCount: {ext.device_count()})")
    return True, ""


def device_reason(device: torch.device) -> str | None:
    return device_only(NAME, "cuda", device)
