"""The ``reference`` backend: plain PyTorch on any device, float64-capable.

It materialises the (seq_q, seq_k) score matrix, so it is for testing and as a last resort. The
ops evaluate it on each family's dense visibility (``DENSE_REFERENCE``), not on the kernel plans.
Its selective scan is :mod:`ditkernels.backends.reference_scan`.
"""

from __future__ import annotations

import torch

from . import ATTENTION, DENSE_REFERENCE, SELECTIVE_SCAN
from . import no_limits as limits  # noqa: F401 (the contract's limits: none)
from ..reference.attention import attention_ref, attention_ref_backward
from ..schedule import MASK_THRESHOLD, BlockSchedule, ElementMask, Epilogue
from .reference_scan import saved_shape, scan_bwd, scan_fwd  # noqa: F401 (SELECTIVE_SCAN)

NAME = "reference"
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
CAPABILITIES = frozenset({ATTENTION, SELECTIVE_SCAN, DENSE_REFERENCE})


def available() -> tuple[bool, str]:
    return True, ""


def device_reason(device: torch.device) -> str | None:
    return None  # plain PyTorch: any device


def block_sizes(head_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    return 64, 64


def _visible(q: torch.Tensor, schedule: BlockSchedule | None, mask: ElementMask | None,
             k: torch.Tensor | None = None, scale: float = 1.0) -> torch.Tensor | None:
    b, h = q.shape[:2]
    if mask is not None and mask.kind == MASK_THRESHOLD:
        return _threshold_visible(q, k, scale, schedule, mask)
    if schedule is None:
        return None
    vis = schedule.element_mask(mask).to(q.device)  # (H_s, Sq, Sk)
    return vis[None] if vis.shape[0] == 1 else vis.reshape(b, h, *vis.shape[1:])


def _threshold_visible(q, k, scale, schedule, mask):
    """MASK_THRESHOLD: visited pairs that are either on a full visit or score >= the row threshold."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    ok = mask.visible(torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale)  # (B, H, Sq, Sk)
    if schedule is None:
        return ok
    b, h, sq, sk = ok.shape
    visited, partial = schedule.tile_mask()
    expand = lambda t: t.repeat_interleave(schedule.block_m, 1).repeat_interleave(schedule.block_n, 2)[:, :sq, :sk]  # noqa: E731
    vis, par = expand(visited).to(q.device), expand(partial).to(q.device)
    vis, par = (t[None] if t.shape[0] == 1 else t.reshape(b, h, sq, sk) for t in (vis, par))
    return vis & (~par | ok)


def flash_fwd(q, k, v, *, scale: float, schedule: BlockSchedule | None = None, mask: ElementMask | None = None,
              epilogue: Epilogue | None = None):
    out, lse = attention_ref(q, k, v, scale, _visible(q, schedule, mask, k, scale))
    if epilogue is not None:
        out = epilogue.apply(out)
    return out.contiguous(), lse.to(torch.float32)


def flash_bwd(do, q, k, v, out, lse, *, scale: float, schedule: BlockSchedule | None = None,
              mask: ElementMask | None = None):
    return attention_ref_backward(do, q, k, v, scale, _visible(q, schedule, mask, k, scale))
