"""Selective-scan launcher of the ``triton`` backend: ``ditkernels.triton_kernels.selective_scan``.

Same contract as :mod:`ditkernels.backends.cpu_scan` (``saved_shape`` / ``scan_fwd`` / ``scan_bwd``);
the backend's availability and device rule are :mod:`ditkernels.backends.triton`'s.
Runs on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was
imported (the test suite does). triton is imported on first use, so this module always imports.
Math is fp32 for fp32 / fp16 / bf16 inputs; ``saved`` holds the states at chunk boundaries,
(batch, dim, ceil(L / chunk) + 1, N) fp32, with the chunk length set by N (see the kernel module).
"""

from __future__ import annotations

import importlib
from types import ModuleType

import torch

from . import triton as _triton_backend


def _kernels() -> ModuleType:
    _triton_backend.require()
    return importlib.import_module("ditkernels.triton_kernels.selective_scan")


def saved_shape(batch: int, dim: int, seqlen: int, dstate: int) -> tuple[int, ...]:
    return _kernels().saved_shape(batch, dim, seqlen, dstate)


def _check(u: torch.Tensor) -> None:
    _triton_backend._check_device(u)
    if u.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"u: the triton backend takes float32, float16 or bfloat16, got {u.dtype}")


def scan_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus: bool, reverse: bool):
    """(out (batch, dim, L) in u.dtype, last_state (batch, dim, N) float32, saved float32)."""
    _check(u)
    return _kernels().scan_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, reverse)


def scan_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, initial_state, saved, delta_softplus: bool,
             reverse: bool):
    """(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state) in the inputs' dtypes (None if absent)."""
    _check(u)
    return _kernels().scan_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, initial_state, saved,
                               delta_softplus, reverse)
