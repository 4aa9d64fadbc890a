"""Log-sum-exp merge of two partial attention results (docs/spec.md §7)."""

from __future__ import annotations

import torch


def merge_attention(out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor,
                    lse_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention over the union of two disjoint key sets from the attention over each.

    out_a, out_b: (batch, heads, seq_q, head_dim); lse_a, lse_b: (batch, heads, seq_q), the natural-log
    log-sum-exp of the scaled scores of each part (``return_lse=True`` of the ops). A row whose part saw no
    key has ``lse = -inf`` (and any output): the merge then returns the other part exactly; rows where both
    are empty give zeros and ``-inf``. Never NaN.

    ``out = out_a - sigmoid(lse_b - lse_a) * (out_a - out_b)``,
    ``lse = max(lse_a, lse_b) + log1p(exp(-|lse_a - lse_b|))``, computed in float32 (float64 for float64
    inputs). Returns (out in out_a's dtype, lse in the dtype of lse_a).
    """
    for name, t in (("out_a", out_a), ("lse_a", lse_a), ("out_b", out_b), ("lse_b", lse_b)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if out_a.shape != out_b.shape or out_a.dim() != 4:
        raise ValueError(f"out_a, out_b: expected two (batch, heads, seq_q, head_dim) tensors of one shape, got "
                         f"{tuple(out_a.shape)} and {tuple(out_b.shape)}")
    for name, t in (("lse_a", lse_a), ("lse_b", lse_b)):
        if t.shape != out_a.shape[:3]:
            raise ValueError(f"{name}: expected shape {tuple(out_a.shape[:3])} (batch, heads, seq_q of the outputs), "
                             f"got {tuple(t.shape)}")
    wide = torch.float64 if torch.float64 in (out_a.dtype, out_b.dtype, lse_a.dtype, lse_b.dtype) else torch.float32
    la, lb = lse_a.to(wide), lse_b.to(wide)
    oa, ob = out_a.to(wide), out_b.to(wide)
    empty_a, empty_b = la == float("-inf"), lb == float("-inf")
    # where a part is empty its lse is replaced by a finite stand-in so no inf - inf ever happens
    la_f = torch.where(empty_a, torch.zeros_like(la), la)
    lb_f = torch.where(empty_b, torch.zeros_like(lb), lb)
    w_b = torch.sigmoid(lb_f - la_f)
    w_b = torch.where(empty_a, torch.ones_like(w_b), torch.where(empty_b, torch.zeros_like(w_b), w_b))
    oa = torch.where(empty_a[..., None], torch.zeros_like(oa), oa)
    ob = torch.where(empty_b[..., None], torch.zeros_like(ob), ob)
    out = oa - w_b[..., None] * (oa - ob)
    hi = torch.maximum(la_f, lb_f)
    lse = hi + torch.log1p(torch.exp(-(la_f - lb_f).abs()))
    lse = torch.where(empty_a, lb, torch.where(empty_b, la, lse))
    return out.to(out_a.dtype), lse.to(lse_a.dtype)
