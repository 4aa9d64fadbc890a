"""Output allocation for kernel launchers.

With ``DITKERNELS_POISON=1`` (the test suite sets it) every output buffer starts as NaN (integer
buffers as -1), so an element a kernel forgets to write shows up as NaN in the comparison with the reference instead
of passing by luck with whatever the allocator returned.
"""

from __future__ import annotations

import os

import torch


def poisoning() -> bool:
    return os.environ.get("DITKERNELS_POISON", "0") == "1"


def empty(*shape: int, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``torch.empty`` for kernel outputs; NaN-filled (integers: -1) when poisoning is on."""
    out = torch.empty(*shape, dtype=dtype, device=device)
    if poisoning():
        out.fill_(float("nan") if out.is_floating_point() else -1)
    return out


def empty_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    return empty(*t.shape, dtype=dtype or t.dtype, device=t.device)
