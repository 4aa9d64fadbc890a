"""The ``triton`` backend: the flash-attention core of ``ditkernels.triton_kernels.flash``.

Runs on CUDA tensors, or on CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was
imported (the test suite does). triton is imported on first use, so this module always imports.
Its selective scan is :mod:`ditkernels.backends.triton_scan`.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from types import ModuleType

import torch

from . import ATTENTION, BLOCK_TOPK_SELECT, LOCAL_TILING, POW2_TILES, SELECTIVE_SCAN, Call
from ..schedule import BlockSchedule, ElementMask, Epilogue
from .triton_scan import saved_shape, scan_bwd, scan_fwd  # noqa: F401 (SELECTIVE_SCAN)

NAME = "triton"
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
CAPABILITIES = frozenset({ATTENTION, SELECTIVE_SCAN, LOCAL_TILING, POW2_TILES, BLOCK_TOPK_SELECT})


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def require() -> None:
    """Raise RuntimeError with the reason and the fix when the backend is not available."""
    ok, why = available()
    if not ok:
        raise RuntimeError(f"the triton backend is not available: {why}")


def _flash() -> ModuleType:
    require()
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


def device_reason(device: torch.device) -> str | None:
    if device.type == "cuda" or (device.type == "cpu" and _interpret()):
        return None
    return (f"the triton backend takes CUDA tensors, got {device.type} tensors "
            "(set TRITON_INTERPRET=1 before importing triton to run it on the CPU for tests)")


def limits(op: str, call: Call) -> list[str]:
    """Block-sparse blocks must cut into power-of-two tiles >= 16 (``POW2_TILES``)."""
    if op != "block_sparse_attention" or call.block_size is None:
        return []
    from ..ops.sparse import pow2_tile_reason

    return [r for r in (pow2_tile_reason(b, f"block_size[{i}]") for i, b in enumerate(call.block_size)) if r]


def _check_device(t: torch.Tensor) -> None:
    reason = device_reason(t.device)
    if reason:
        raise RuntimeError(reason)


def block_sizes(head_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    """(block_m, block_n) of the forward tiles for this head_dim / dtype on the current device."""
    return _flash().block_sizes(head_dim, dtype)


def local_block_sizes(head_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    """(block_m, block_n) of the local-attention plans the Triton kernels run: 64-token 2-D/3-D tiles
    (the default GPU plan); each kernel walks them in sub-tiles of its own config. The backward keeps
    64-key tiles (a dK/dV program owns one: 64 rows for sm_90's warpgroup MMA)."""
    return 64, 64


def local_tiles(grid: tuple[int, ...]) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None]:
    """No preferred box shapes: the plan picks those that minimise the computed pairs."""
    return None, None


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
