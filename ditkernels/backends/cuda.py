"""The ``cuda`` backend: CUDA C++ kernels from the ``ditkernels._cuda`` extension.

The extension is built only where ``nvcc`` was found at install time. It holds the selective-scan
kernels; attention on CUDA tensors runs through the triton backend.
"""

from __future__ import annotations

import importlib

import torch

NAME = "cuda"
_FIX = "reinstall on a machine with the CUDA toolkit (nvcc on PATH or CUDA_HOME set): pip install --no-build-isolation ."


def extension():
    """The compiled ``ditkernels._cuda`` module, or raise ImportError with the reason and the fix."""
    try:
        return importlib.import_module("ditkernels._cuda")
    except ImportError as exc:
        raise ImportError(f"ditkernels._cuda is not built ({exc}); {_FIX}") from exc


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
        n = ext.device_count() if hasattr(ext, "device_count") else 0
        return False, (f"built for {', '.join(ext.archs())} but torch sees no CUDA device "
                       f"(torch {torch.__version__}, cudaGetDeviceCount: {n})")
    return True, ""


def block_sizes(head_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    raise NotImplementedError("the cuda backend has no attention kernels; attention uses the triton backend on CUDA")
