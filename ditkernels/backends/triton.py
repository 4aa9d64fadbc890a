"""The ``triton`` backend: the flash-attention core of ``ditkernels.triton_kernels.flash``.

Runs on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was
imported (the test suite does). triton is imported on first use, so this module always imports.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

import torch

from ..schedule import BlockSchedule, ElementMask, Epilogue

NAME = "triton"


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _flash() -> ModuleType:
    ok, why = available()
    if not ok:
        raise RuntimeError(f"the triton backend is not available: {why}")
    return importlib.import_module("ditkernels.triton_kernels.flash")


def available() -> tuple[bool, str]:
    """(ok, reason and fix when not ok)."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed: pip install triton"
    if _interpret():
        return True, "TRITON_INTERPRET=1: kernels run on CPU tensors through the interpreter"
    if not torch.cuda.is_available():
        # Installed and usable: compile-report builds every kernel for sm_80/sm_90 from here, and CPU
        # tensors run under TRITON_INTERPRET=1. Calls with CPU tensors are refused per call (dispatch).
        return True, ("no CUDA device: compiles for GPUs (python -m ditkernels compile-report); "
                      "runs CPU tensors only under TRITON_INTERPRET=1")
    return True, ""


def _check_device(t: torch.Tensor) -> None:
    if t.device.type == "cuda":
        return
    if t.device.type == "cpu" and _interpret():
        return
    raise RuntimeError(f"the triton backend takes CUDA tensors, got {t.device.type} tensors "
                       "(set TRITON_INTERPRET=1 before importing triton to run it on the CPU for tests)")


def block_sizes(head_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    """(block_m, block_n) of the forward tiles for this head_dim / dtype on the current device."""
    return _flash().block_sizes(head_dim, dtype)


def local_block_sizes(head_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    """(block_m, block_n) of the local-attention plans the Triton kernels run: 64-token 2-D/3-D tiles
    (the default GPU plan); each kernel walks them in sub-tiles of its own config. The backward keeps
    64-key tiles (a dK/dV program owns one: 64 rows for sm_90's warpgroup MMA)."""
    return 64, 64


# block_n choices of the forward plan (ditkernels.ops.local.kernel_plan picks one per problem).
local_fwd_block_n = (64, 32, 16)


def flash_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
              schedule: BlockSchedule | None = None, mask: ElementMask | None = None,
              epilogue: Epilogue | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q: (batch, heads, seq_q, head_dim); k, v: (batch, heads, seq_k, head_dim) -> out, lse (fp32)."""
    _check_device(q)
    return _flash().flash_fwd(q, k, v, scale=scale, schedule=schedule, mask=mask, epilogue=epilogue)


def _block_select() -> ModuleType:
    _flash()  # availability check and the interpreter patch
    return importlib.import_module("ditkernels.triton_kernels.block_select")


def block_topk_supported(num_key_blocks: int) -> bool:
    """Whether :func:`block_topk_mask` takes rows of ``num_key_blocks`` key blocks (else the ops select in torch)."""
    return _block_select().supports(num_key_blocks)


def block_topk_mask(q: torch.Tensor, k: torch.Tensor, topk: int, block_q: int, block_k: int, num_prefix: int,
                    num_suffix: int, scale: float) -> torch.Tensor:
    """Block top-k selection (pooling, scores and top-k fused, ``triton_kernels/block_select.py``):
    q: (batch, heads, seq_q, head_dim), k: (batch, heads, seq_k, head_dim) -> bool (batch, heads, nq, nk)."""
    _check_device(q)
    return _block_select().block_topk_mask(q, k, topk, block_q, block_k, num_prefix, num_suffix, scale)


def flash_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              lse: torch.Tensor, *, scale: float, schedule: BlockSchedule | None = None,
              mask: ElementMask | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients dq, dk, dv of the core attention (no epilogue) given do and the forward's out, lse."""
    _check_device(q)
    return _flash().flash_bwd(do, q, k, v, out, lse, scale=scale, schedule=schedule, mask=mask)
