"""Re-ttention reference (docs/spec.md §3): re-normalised sparse attention with dense masks, in plain PyTorch.

For a sparse key set ``S_i`` (a bool ``visible`` matrix):

- refresh: ``out = full attention``; ``rho_i = sum_{j in S_i} exp(s_ij) / sum_j exp(s_ij) =
  exp(lse_S - lse_full)`` and the residual ``R = out_full - rho * out_S`` are cached;
- sparse step ``n`` after the refresh: ``out = rho_hat * out_S + R``, ``rho_hat = rho + drift * n``,
  clamped to at most 1 unless ``clamp=False``.

Everything materialises the ``(seq_q, seq_k)`` scores: tests and the ``reference`` backend only.
Scores and softmax are computed in float32 (float64 for float64 inputs), like every backend.
"""

from __future__ import annotations

import torch

from .attention import attention_ref


def band_visible(seq_q: int, seq_k: int, half: int, lo: int, hi: int, frame: int = 0,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Re-ttention's band as a bool ``(seq_q, seq_k)`` matrix.

    Tokens outside ``[lo, hi)`` are global (they see every key and every query sees them). Grid
    tokens ``i, j`` are visible iff ``|f(i) - f(j)| <= half`` with ``f(i) = i - lo`` (the band over
    the raster sequence, edges not clamped) or, with ``frame > 0``, ``f(i) = (i - lo) % frame``
    (the per-frame band of the video model: the same band in every frame, across frames).
    """
    i = torch.arange(seq_q, device=device)[:, None]
    j = torch.arange(seq_k, device=device)[None, :]
    glob = (i < lo) | (i >= hi) | (j < lo) | (j >= hi)
    fi, fj = i - lo, j - lo
    if frame > 0:
        fi, fj = fi % frame, fj % frame
    return glob | ((fi - fj).abs() <= half)


def rho_from_lse(lse_s: torch.Tensor, lse_full: torch.Tensor) -> torch.Tensor:
    """``rho = exp(lse_S - lse_full)``; 0 where the sparse set is empty (``lse_S = -inf``)."""
    finite = torch.isfinite(lse_s) & torch.isfinite(lse_full)
    diff = torch.where(finite, lse_s - torch.where(finite, lse_full, torch.zeros_like(lse_full)),
                       torch.full_like(lse_s, float("-inf")))
    return torch.exp(diff)


def rettention_refresh_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor,
                           scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Refresh step.

    q: (batch, heads, seq_q, head_dim); k, v: (batch, heads, seq_k, head_dim); visible: bool,
    broadcastable to (batch, heads, seq_q, seq_k), the sparse set S.
    Returns ``out_full`` (q.dtype), ``rho`` (batch, heads, seq_q) float32 and the residual
    ``R = out_full - rho * out_S`` (q.dtype; computed from the float32/float64 outputs).
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qa, ka, va = q.to(acc), k.to(acc), v.to(acc)
    out_full, lse_full = attention_ref(qa, ka, va, scale)
    out_s, lse_s = attention_ref(qa, ka, va, scale, visible)
    rho = rho_from_lse(lse_s, lse_full).to(torch.float32)  # the cached rho is float32: R must use it
    residual = out_full - rho.to(acc)[..., None] * out_s
    return out_full.to(q.dtype), rho, residual.to(q.dtype)


def rettention_sparse_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor, scale: float,
                          row_scale: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """Sparse step: ``out = row_scale * out_S + R`` with ``row_scale = rho_hat`` (batch, heads, seq_q).

    Computed in float32 (float64 for float64 inputs) and returned in q.dtype.
    """
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    out_s, _ = attention_ref(q.to(acc), k.to(acc), v.to(acc), scale, visible)
    return (row_scale.to(acc)[..., None] * out_s + residual.to(acc)).to(q.dtype)


def rho_hat(rho: torch.Tensor, n: int, drift: float, clamp: bool) -> torch.Tensor:
    """``rho + drift * n``, clamped to at most 1 when ``clamp`` (float32)."""
    r = rho + drift * n
    return r.clamp(max=1.0) if clamp else r
