"""Exact per-query top-k attention (docs/spec.md §2; DRSformer's top-k operator along tokens) on the flash core.
Its reference (the selection rule in float64) is :mod:`ditkernels.reference.topk`.

Two passes with workspace bounded by a query chunk, never the whole ``seq_q x seq_k`` score matrix:

1. **Selection** (:func:`topk_thresholds`, no grad): per batch*head and chunk of query rows, the
   chunk's scores ``scale * q.k`` (float32; float64 for float64 inputs), the ``topk``-th and
   ``topk+1``-th largest score of every row, and from them a per-row *threshold* (below). The same
   pass records which (query tile, key tile) pairs of the kernels' tiling hold a selected pair, and
   which hold only selected pairs. Two implementations of one rule: plain torch per query chunk
   (``torch.topk``; the triton and reference backends), and on the cpu backend one C++ parallel
   region (``csrc/cpu/topk_select.cpp``) that computes the scores with the forward kernel's own
   arithmetic (the same float bits the ``MASK_THRESHOLD`` kernel compares) and selects the two
   scores of each row by a bucket select instead of a sort.
2. **Attention**: the flash core with that tile schedule and the ``MASK_THRESHOLD`` element mask
   (a pair is visible iff its score is >= its row's threshold) on the tiles that are not fully
   selected. The backward runs the same schedule and thresholds, so it differentiates exactly the
   selection the forward made.

Threshold and ties. With ``t_k`` the k-th and ``t_k1`` the (k+1)-th largest score of a row and
``tol = 1e-5 * max_j |s_ij|`` (the scale of the rounding differences between the selection pass and
the kernels, which accumulate the dot products in another order): if ``t_k - t_k1 >= 2*tol`` the
threshold is the midpoint ``(t_k + t_k1) / 2`` and exactly the ``topk`` largest keys are kept, robust
to rounding; otherwise (a tie or near-tie at the k-th score) it is ``t_k - tol``: every key whose
score is within ``tol`` of the k-th largest is kept, so a row keeps ``topk`` keys plus the keys tied
with its k-th. ``topk >= seq_k`` is dense attention. A row with a NaN score gets a NaN threshold
(``max_j |s_ij|`` is then NaN) in both implementations of pass 1.

Workspace of pass 1: torch, about ``chunk * seq_k * 13`` bytes plus ``chunk * (topk+1) * 12`` for
``torch.topk``, with ``chunk`` chosen to keep it near :data:`WORKSPACE_BYTES`; C++, one panel of
``rows x seq_k`` scores per thread (``rows <= 64``), all panels together near 64 MB.
"""

from __future__ import annotations
from typing import List  # custom_op signatures: torch 2.6 infers no schema from list[int]

import torch

from .. import _validate, backends
from ..backends import TOPK_THRESHOLDS, has, resolve_for
from ..reference.topk import TIE_TOL
from ..schedule import MASK_THRESHOLD, BlockSchedule, ElementMask

WORKSPACE_BYTES = 64 << 20

# Tile-visit codes of the selection pass (int8 (B*H, num_q_tiles, num_kv_tiles)).
_SKIP, _FULL, _PARTIAL = 0, 1, 2


def _backend(q: torch.Tensor, backend: str):
    return resolve_for("topk_attention", q, backend, head_dim=q.shape[-1])


def kernel_tiles(mod, head_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    """(block_m, block_n) of the tiling the backend module runs (the selection pass records visits in it)."""
    return tuple(mod.block_sizes(head_dim, dtype))


def _chunk_rows(seq_k: int, kk: int, block_m: int) -> int:
    per_row = seq_k * 13 + (kk + 1) * 12
    rows = max(block_m, (WORKSPACE_BYTES // per_row) // block_m * block_m)
    return rows


def topk_thresholds(q: torch.Tensor, k: torch.Tensor, topks: List[int], scale: float,
                    tiles: tuple[int, int] = (64, 64), *, impl: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1: per-row thresholds and the tile visits of exact top-k attention, for several ``topk``
    values from one score pass (DRSformer's mixture shares it).

    q: (batch, heads, seq_q, head_dim); k: (batch, heads, seq_k, head_dim); topks: values in
    [1, seq_k]. Returns thresholds float32 (len(topks), batch, heads, seq_q) in scaled natural score
    units (``-inf`` for ``topk == seq_k``: dense) and int8 visits (len(topks), batch*heads,
    ceil(seq_q/bm), ceil(seq_k/bn)): 0 no selected pair, 1 every pair selected, 2 some (the element
    mask runs there). See the module docstring for the threshold rule. impl: ``"torch"`` (plain torch
    per query chunk, any device) or the name of a backend with the ``TOPK_THRESHOLDS`` capability
    (``"cpu"``: its C++ pass, CPU tensors).
    """
    own = [name for name in backends.NAMES if has(backends.get(name), TOPK_THRESHOLDS)]
    if impl != "torch" and impl not in own:
        raise ValueError(f"impl: expected 'torch' or one of {own}, got {impl!r}")
    b, h, sq, _ = q.shape
    sk = k.shape[2]
    bm, bn = tiles
    nq, nk = -(-sq // bm), -(-sk // bn)
    nt = len(topks)
    thr = torch.empty(nt, b, h, sq, dtype=torch.float32, device=q.device)
    visits = torch.empty(nt, b * h, nq, nk, dtype=torch.int8, device=q.device)
    sparse = [i for i, t in enumerate(topks) if t < sk]
    for i, t in enumerate(topks):
        if t >= sk:
            thr[i].fill_(float("-inf"))
            visits[i].fill_(_FULL)
    if not sparse:
        return thr, visits
    if impl != "torch":
        t_s, v_s = backends.get(impl).topk_thresholds(q.detach(), k.detach(), [topks[i] for i in sparse], scale,
                                                      tiles, TIE_TOL)
        if len(sparse) == nt:
            return t_s, v_s
        for j, i in enumerate(sparse):
            thr[i], visits[i] = t_s[j], v_s[j]
        return thr, visits
    kmax = max(topks[i] for i in sparse)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    rows = min(_chunk_rows(sk, kmax, bm), -(-sq // bm) * bm)
    # short sequences: several batch*head slices per step (one batched matmul instead of a loop)
    per_head = min(rows, sq) * (sk * 13 + (kmax + 1) * 12)
    hstep = max(1, min(b * h, WORKSPACE_BYTES // max(per_head, 1))) if rows >= sq else 1
    qf, kf = q.reshape(b * h, sq, -1), k.reshape(b * h, sk, -1)
    thr_f = thr.view(nt, b * h, sq)
    with torch.no_grad():
        for h0 in range(0, b * h, hstep):
            h1 = min(h0 + hstep, b * h)
            kt = kf[h0:h1].to(acc).transpose(1, 2)
            for r0 in range(0, sq, rows):
                r1 = min(r0 + rows, sq)
                s = torch.matmul(qf[h0:h1, r0:r1].to(acc), kt)  # (hs, rows, sk)
                s.mul_(scale)
                top = torch.topk(s, kmax + 1, dim=-1, sorted=True).values
                tol = TIE_TOL * s.abs().amax(-1)
                full = _full_counts(r0, r1 - r0, bm, bn, sq, sk, nk, q.device)
                for i in sparse:
                    t_k, t_k1 = top[..., topks[i] - 1], top[..., topks[i]]
                    t = torch.where(t_k - t_k1 >= 2 * tol, 0.5 * (t_k + t_k1), t_k - tol).to(torch.float32)
                    thr_f[i, h0:h1, r0:r1] = t
                    # the kernels compare with the float32 threshold: decide the tiles with it too
                    keep = s >= t.to(acc)[..., None]
                    pad_r, pad_c = -(r1 - r0) % bm, nk * bn - sk
                    if pad_r or pad_c:
                        keep = torch.nn.functional.pad(keep, (0, pad_c, 0, pad_r))
                    cnt = keep.view(h1 - h0, -1, bm, nk, bn).sum((2, 4), dtype=torch.int32)  # (hs, tiles, nk)
                    del keep
                    code = torch.where(cnt == 0, _SKIP, torch.where(cnt == full, _FULL, _PARTIAL))
                    visits[i, h0:h1, r0 // bm: r0 // bm + code.shape[1]] = code.to(torch.int8)
                del s, top
    return thr, visits


def _full_counts(r0: int, n_r: int, bm: int, bn: int, sq: int, sk: int, nk: int, device) -> torch.Tensor:
    """In-bounds pairs of each (query tile, key tile) of a chunk: (tiles, nk) int32."""
    nt = -(-n_r // bm)
    rows = torch.clamp(torch.clamp(r0 + (torch.arange(nt, device=device) + 1) * bm, max=sq)
                       - (r0 + torch.arange(nt, device=device) * bm), min=0)
    cols = torch.clamp(sk - torch.arange(nk, device=device) * bn, max=bn)
    return (rows[:, None] * cols[None, :]).to(torch.int32)


def _schedule(visits: torch.Tensor, tiles: tuple[int, int], sq: int, sk: int) -> BlockSchedule:
    return BlockSchedule.from_tile_mask(visits != _SKIP, tiles[0], tiles[1], sq, sk, visits == _PARTIAL)


# ================================================================================================
# The registered ops
# ================================================================================================
@torch.library.custom_op("ditkernels::topk_attention_fwd", mutates_args=())
def topk_attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topks: List[int], scale: float,
                       backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact top-k attention for each ``topk`` in ``topks`` (one selection pass): out (T, B, H, Sq, D),
    lse (T, B, H, Sq) float32, thresholds (T, B, H, Sq) float32, visits int8 (T, B*H, nq, nk)."""
    mod = _backend(q, backend)
    tiles = kernel_tiles(mod, q.shape[-1], q.dtype)
    impl = mod.NAME if has(mod, TOPK_THRESHOLDS) else "torch"
    thr, visits = topk_thresholds(q, k, list(topks), scale, tiles, impl=impl)
    outs, lses = [], []
    for i in range(len(topks)):
        o, l_ = mod.flash_fwd(q, k, v, scale=scale, schedule=_schedule(visits[i], tiles, q.shape[2], k.shape[2]),
                              mask=ElementMask(MASK_THRESHOLD, rows=thr[i]))
        outs.append(o)
        lses.append(l_)
    if len(outs) == 1:  # no copy (a stack of one 4-D output costs a few ms on the CPU)
        return outs[0].unsqueeze(0), lses[0].unsqueeze(0), thr, visits
    return torch.stack(outs), torch.stack(lses), thr, visits


@topk_attention_fwd.register_fake
def _(q, k, v, topks, scale, backend):
    b, h, sq, d = q.shape
    bm, bn = kernel_tiles(_backend(q, backend), d, q.dtype)
    nq, nk = -(-sq // bm), -(-k.shape[2] // bn)
    t = len(topks)
    return (q.new_empty(t, *q.shape), q.new_empty(t, *q.shape[:3], dtype=torch.float32),
            q.new_empty(t, *q.shape[:3], dtype=torch.float32), q.new_empty(t, b * h, nq, nk, dtype=torch.int8))


@torch.library.custom_op("ditkernels::topk_attention_bwd", mutates_args=())
def topk_attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                       lse: torch.Tensor, thresholds: torch.Tensor, visits: torch.Tensor, scale: float,
                       backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dq, dk, dv) of the T top-k attentions summed, over the forward's selections (thresholds, visits).
    do, out: (T, B, H, Sq, D); lse, thresholds: (T, B, H, Sq); visits: (T, B*H, nq, nk)."""
    mod = _backend(q, backend)
    tiles = kernel_tiles(mod, q.shape[-1], q.dtype)
    dq = dk = dv = None
    for i in range(do.shape[0]):
        g = mod.flash_bwd(do[i].contiguous(), q, k, v, out[i], lse[i], scale=scale,
                          schedule=_schedule(visits[i], tiles, q.shape[2], k.shape[2]),
                          mask=ElementMask(MASK_THRESHOLD, rows=thresholds[i]))
        dq, dk, dv = g if dq is None else (dq + g[0], dk + g[1], dv + g[2])
    return dq, dk, dv


@topk_attention_bwd.register_fake
def _(do, q, k, v, out, lse, thresholds, visits, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, topks, scale, backend = inputs
    out, lse, thr, visits = output
    ctx.save_for_backward(q, k, v, out, lse, thr, visits)
    ctx.scale, ctx.backend = scale, backend
    ctx.mark_non_differentiable(thr, visits)


def _backward(ctx, d_out, d_lse, d_thr, d_visits):
    q, k, v, out, lse, thr, visits = ctx.saved_tensors
    dq, dk, dv = topk_attention_bwd(d_out, q, k, v, out, lse, thr, visits, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None, None


topk_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ================================================================================================
# The functional API
# ================================================================================================
def topk_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, topk: int, *, scale: float | None = None,
                   return_lse: bool = False, backend: str | None = None):
    """Exact per-query top-k attention (docs/spec.md §2): query ``i`` softmaxes over its ``topk`` best keys only.

    q: (batch, heads, seq_q, head_dim); k, v: (batch, heads, seq_k, head_dim); any strides; float16 /
    bfloat16 / float32 (float64 on the reference and cpu backends); head_dim 1..256.
    topk: keys kept per query (>= 1); ``topk >= seq_k`` is dense attention. Ties at the k-th score
    keep every tied key (see the module docstring for the exact rule). scale: defaults to
    ``head_dim ** -0.5``. return_lse: also return the log-sum-exp over the kept keys, float32
    (batch, heads, seq_q), detached. backend: ``"reference"``, ``"cpu"`` or ``"triton"``.

    Workspace: one query chunk of scores (about 64 MB), never the whole score matrix (except on the
    reference backend, which materialises it by design). Returns out (batch, heads, seq_q, head_dim)
    in q.dtype, or (out, lse). Differentiable in q, k, v (the selection is piecewise constant).
    """
    _validate.check_qkv(q, k, v)
    if isinstance(topk, bool) or not isinstance(topk, int) or topk < 1:
        raise ValueError(f"topk: expected a positive int (keys per query), got {topk!r}")
    scale = _validate.check_scale(scale, q.shape[-1])
    backend = _validate.check_backend(backend)
    if not isinstance(return_lse, bool):
        raise TypeError(f"return_lse: expected a bool, got {type(return_lse).__name__}")
    out, lse, _, _ = topk_attention_fwd(q, k, v, [min(topk, k.shape[2])], scale, backend)
    return (out[0], lse[0].detach()) if return_lse else out[0]
