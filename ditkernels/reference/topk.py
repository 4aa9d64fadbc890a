"""Exact per-query top-k reference (docs/spec.md §2; DRSformer's top-k along tokens), in plain PyTorch.

The ground truth of ``ditkernels.topk_attention`` in the tests: the selection by the documented rule
in float64 (:func:`topk_visible`) and the attention over it (:func:`topk_attention_ref`). The op's
bounded-workspace selection is ``ditkernels.ops.topk.topk_thresholds``.
"""

from __future__ import annotations

import torch

from .attention import attention_ref

TIE_TOL = 1e-5


def topk_visible(q: torch.Tensor, k: torch.Tensor, topk: int, scale: float) -> torch.Tensor:
    """bool (batch, heads, seq_q, seq_k): the ``topk`` largest scores ``scale * q.k`` (float64) of each
    row, plus every key within ``tol = TIE_TOL * max_j |s_ij|`` of the k-th largest when the k-th and
    (k+1)-th are closer than ``2 * tol`` (ties); ``topk >= seq_k`` keeps every key."""
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    if topk >= s.shape[-1]:
        return torch.ones(s.shape, dtype=torch.bool, device=s.device)
    top = torch.topk(s, topk + 1, dim=-1).values
    t_k, t_k1 = top[..., topk - 1], top[..., topk]
    tol = TIE_TOL * s.abs().amax(-1)
    thr = torch.where(t_k - t_k1 >= 2 * tol, (t_k + t_k1) / 2, t_k - tol)
    return s >= thr[..., None]


def topk_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk: int,
                       scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, lse) of softmax attention over each query's top-k keys (:func:`attention_ref`'s dtypes)."""
    return attention_ref(q, k, v, scale, topk_visible(q, k, topk, scale))
