"""Reference attention: the full score matrix in plain PyTorch (tests and the ``reference`` backend)."""

from __future__ import annotations

import torch


def _probs(q, k, scale, visible):
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    s = torch.matmul(q.to(acc), k.to(acc).transpose(-1, -2)) * scale
    if visible is not None:
        s = s.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    # exp(s - lse) is exactly 0 on masked keys; rows with lse = -inf would give NaN, so zero them.
    finite = torch.isfinite(lse)
    p = torch.exp(s - torch.where(finite, lse, torch.zeros_like(lse))[..., None])
    p = torch.where(finite[..., None], p, torch.zeros_like(p))
    return p, lse


def attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  visible: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention with an optional visibility mask.

    q: (batch, heads, seq_q, head_dim); k, v: (batch, heads, seq_k, head_dim).
    visible: bool, broadcastable to (batch, heads, seq_q, seq_k); None means every key is visible.
    Scores and softmax are computed in float32 (float64 for float64 inputs), as every backend does.
    Returns out (batch, heads, seq_q, head_dim) in q.dtype and lse (batch, heads, seq_q) in float32
    (float64 for float64 inputs). A query that sees no key gets out = 0 and lse = -inf.
    """
    p, lse = _probs(q, k, scale, visible)
    out = torch.matmul(p, v.to(p.dtype))
    return out.to(q.dtype), lse


def attention_ref_backward(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                           visible: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of :func:`attention_ref`'s ``out`` given its gradient ``do``.

    Written out (not autograd) so it also runs inside registered ops, where autograd is off:
    ``dv = Pᵀ do``, ``dP = do vᵀ``, ``dS = P ∘ (dP - rowsum(P ∘ dP))``, ``dq = dS k · scale``,
    ``dk = dSᵀ q · scale``.
    """
    p, _ = _probs(q, k, scale, visible)
    acc = p.dtype
    do_ = do.to(acc)
    dv = torch.matmul(p.transpose(-1, -2), do_)
    dp = torch.matmul(do_, v.to(acc).transpose(-1, -2))
    ds = p * (dp - (p * dp).sum(-1, keepdim=True))
    dq = torch.matmul(ds, k.to(acc)) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q.to(acc)) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)
