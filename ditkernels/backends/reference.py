"""The ``reference`` backend: plain PyTorch on any device, float64-capable.

It materialises the (seq_q, seq_k) score matrix, so it is for testing and as a last resort.
"""

from __future__ import annotations

import torch

from ..reference.attention import attention_ref, attention_ref_backward
from ..schedule import BlockSchedule, ElementMask, Epilogue

NAME = "reference"


def available() -> tuple[bool, str]:
    return True, ""


def block_sizes(head_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    return 64, 64


def _visible(q: torch.Tensor, schedule: BlockSchedule | None, mask: ElementMask | None) -> torch.Tensor | None:
    if schedule is None:
        return None
    vis = schedule.element_mask(mask).to(q.device)  # (H_s, Sq, Sk)
    b, h = q.shape[:2]
    return vis[None] if vis.shape[0] == 1 else vis.reshape(b, h, *vis.shape[1:])


def flash_fwd(q, k, v, *, scale: float, schedule: BlockSchedule | None = None, mask: ElementMask | None = None,
              epilogue: Epilogue | None = None):
    out, lse = attention_ref(q, k, v, scale, _visible(q, schedule, mask))
    if epilogue is not None:
        out = epilogue.apply(out)
    return out.contiguous(), lse.to(torch.float32)


def flash_bwd(do, q, k, v, out, lse, *, scale: float, schedule: BlockSchedule | None = None,
              mask: ElementMask | None = None):
    return attention_ref_backward(do, q, k, v, scale, _visible(q, schedule, mask))
