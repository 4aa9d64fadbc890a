"""The ``cpu`` backend: the flash-attention core as C++ (std::thread pool + SIMD) in ``ditkernels._cpu_<isa>``
(loaded by ``ditkernels/_ext.py``).

The extension is torch-independent: this launcher validates, allocates outputs, and passes raw
pointers (``data_ptr()``), sizes and strides in elements. Inputs whose last dimension is not
contiguous are copied; every other stride is used as it is. The kernels live in
``csrc/cpu/attention.cpp``; importing this module never needs the extension. Its selective scan is
:mod:`ditkernels.backends.cpu_scan`.
"""

from __future__ import annotations

from types import ModuleType

import torch

from . import ATTENTION, FWD_COUNTERS, LOCAL_TILING, SELECTIVE_SCAN, TOPK_THRESHOLDS, device_only
from . import no_limits as limits  # noqa: F401 (the contract's limits: none)
from .. import _alloc, _ext, _validate
from .cpu_scan import saved_shape, scan_bwd, scan_fwd  # noqa: F401 (SELECTIVE_SCAN)
from ..schedule import (EPILOGUE_NONE, EPILOGUE_SCALE_RESIDUAL, MASK_BAND, MASK_LOCAL, MASK_NONE,
                        MASK_THRESHOLD, BlockSchedule, ElementMask, Epilogue, TiledSchedule)

NAME = "cpu"
DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
CAPABILITIES = frozenset({ATTENTION, SELECTIVE_SCAN, LOCAL_TILING, TOPK_THRESHOLDS, FWD_COUNTERS})
_DTYPE_CODES = _ext.DTYPE_CODES  # storage dtype -> code of attention_fwd / attention_bwd
# Element-mask kinds the C++ mask function implements (csrc/cpu/attention.cpp, ElementMask<KIND>).
_MASK_KINDS = (MASK_NONE, MASK_LOCAL, MASK_BAND, MASK_THRESHOLD)


def _extension() -> ModuleType | None:
    """The CPU kernels module (``ditkernels._ext.cpu()``) if it loads and has the attention kernels, else None."""
    if _ext.cpu_error() is not None or not hasattr(_ext.cpu(), "attention_fwd"):
        return None
    return _ext.cpu()


def available() -> tuple[bool, str]:
    why = _ext.cpu_error()
    if why is None and not hasattr(_ext.cpu(), "attention_fwd"):
        why = f"{_ext.cpu().__name__} has no attention_fwd (stale build). {_ext.FIX}"
    return why is None, why or ""


def device_reason(device: torch.device) -> str | None:
    return device_only(NAME, "cpu", device)


def _require() -> ModuleType:
    ext = _extension()
    if ext is None:
        raise RuntimeError(available()[1])
    return ext


def block_sizes(head_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    """(block_m, block_n) of the CPU kernels: 64 query rows (the vector side) x 64 keys."""
    return 64, 64


def local_block_sizes(head_dim: int, dtype: torch.dtype) -> tuple[int, int]:
    """(block_m, block_n) of the local-attention plans the CPU kernels run (2-D/3-D token tiles).

    64 queries fill the kernels' vector side. The kernels trim each partial visit to the key rows and
    the lane vectors that hold a visible pair, so KV tiles of one grid row (32 keys) fit a window's
    outline row by row."""
    return 64, 32


def local_tiles(grid: tuple[int, ...]) -> tuple[tuple[int, ...] | None, tuple[int, ...] | None]:
    """(query tile, KV tile) box shapes for the CPU plans (None: the plan chooses).

    Query tiles of 16 x 4 tokens (2-D/3-D grids): a vector of 8 (AVX2) or 16 (AVX-512) lanes is then a
    2 x 4 or 4 x 4 block of queries, whose visible keys are close to a window's own, so trimmed
    visits compute fewer invisible pairs than with 8 x 8 tiles (whose vectors are rows of 8): on a
    64 x 64 grid, radius-8 circle, 1.43x the visible pairs instead of 1.62x (AVX2; AVX-512: 1.59x
    instead of 1.71x). KV tiles are row segments of 32 keys."""
    q = (1,) * (len(grid) - 2) + (16, 4) if len(grid) >= 2 and grid[-2] >= 16 and grid[-1] >= 4 else None
    kv = (1,) * (len(grid) - 1) + (32,) if grid[-1] >= 32 else None
    return q, kv


# One forward block_n (local_block_sizes'): the kernels trim each visit to its visible rows instead.
local_fwd_block_n: tuple[int, ...] = ()


def last_fwd_visits() -> int:
    """Tiles visited by the last forward launch, summed over batch*head (a kernel-side counter)."""
    return int(_require().attention_fwd_visits())


def last_fwd_pairs() -> int:
    """Query-key score slots the last forward launch computed, summed over batch*head: the work after
    the kernels trimmed partial visits (query lanes counted in whole vectors; a kernel-side counter)."""
    return int(_require().attention_fwd_pairs())


# ---- validation -------------------------------------------------------------------------------
def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    _validate.check_qkv(q, k, v)
    if q.device.type != "cpu":
        raise ValueError(f"q: the cpu backend takes CPU tensors, got device {q.device}")


def _check_like(name: str, t: torch.Tensor, like: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.shape != like.shape:
        raise ValueError(f"{name}: expected shape {tuple(like.shape)}, got {tuple(t.shape)}")
    if t.dtype != (dtype or like.dtype):
        raise TypeError(f"{name}: expected dtype {dtype or like.dtype}, got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name}: expected device {like.device}, got {t.device}")


def _unit_last(t: torch.Tensor) -> torch.Tensor:
    """t with stride 1 on its last dimension (the kernels' only layout requirement)."""
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


def _csr(schedule: BlockSchedule | None) -> tuple[int, int, int, int, int]:
    """(kv_ptr, kv_idx, partial, ptr_stride, idx_stride) pointers/strides of a validated schedule; zeros
    for dense."""
    if schedule is None:
        return 0, 0, 0, 0, 0
    shared = schedule.num_heads_sched == 1
    return (schedule.kv_ptr.data_ptr(), schedule.kv_idx.data_ptr(), schedule.partial.data_ptr(),
            0 if shared else schedule.kv_ptr.stride(0), 0 if shared else schedule.kv_idx.stride(0))


def _tokens(schedule: BlockSchedule | None) -> dict:
    """Token-map arguments of the kernels: q_tokens / kv_tokens pointers and tile counts (0: none)."""
    if not isinstance(schedule, TiledSchedule):
        return {}
    return {"q_tokens": schedule.q_tokens.data_ptr(), "kv_tokens": schedule.kv_tokens.data_ptr(),
            "n_q_tiles": schedule.num_q_tiles, "n_kv_tiles": schedule.num_kv_tiles}


def _check_schedule(schedule: BlockSchedule | None, q: torch.Tensor, sk: int) -> None:
    if schedule is None:
        return
    if not isinstance(schedule, BlockSchedule):
        raise TypeError(f"schedule: expected a BlockSchedule or None, got {type(schedule).__name__}")
    schedule.validate(q.shape[2], sk, q.shape[0] * q.shape[1], q.device)


def _mask_args(mask: ElementMask | None) -> tuple[int, int, torch.Tensor | None]:
    if mask is None or mask.kind == MASK_NONE:
        return MASK_NONE, 0, None
    if mask.kind not in _MASK_KINDS:
        raise ValueError(f"mask: the cpu backend implements element mask kinds {_MASK_KINDS}, got {mask.kind}")
    params = torch.tensor(list(mask.params) or [0], dtype=torch.int32)
    return mask.kind, params.data_ptr(), params


def _mask_rows(mask: ElementMask | None, b: int, h: int, sq: int) -> tuple[dict, torch.Tensor | None]:
    """``mask_rows=`` pointer argument of score-dependent masks (MASK_THRESHOLD: float32 (B, H, Sq))."""
    if mask is None or mask.kind != MASK_THRESHOLD:
        return {}, None
    rows = mask.rows
    if not isinstance(rows, torch.Tensor) or tuple(rows.shape) != (b, h, sq):
        raise ValueError(f"mask.rows: expected a float32 tensor of shape {(b, h, sq)}, got "
                         f"{tuple(getattr(rows, 'shape', ()))}")
    rows = rows.to(device="cpu", dtype=torch.float32).contiguous()
    return {"mask_rows": rows.data_ptr()}, rows


def _blocks(schedule: BlockSchedule | None, d: int, dtype: torch.dtype) -> tuple[int, int]:
    return (schedule.block_m, schedule.block_n) if schedule is not None else block_sizes(d, dtype)


# ---- launchers --------------------------------------------------------------------------------
def flash_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float,
              schedule: BlockSchedule | None = None, mask: ElementMask | None = None,
              epilogue: Epilogue | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash-attention forward.

    q: (batch, heads, seq_q, head_dim); k, v: (batch, heads, seq_k, head_dim), one dtype of
    float32/float64/float16/bfloat16, any strides. Returns out (batch, heads, seq_q, head_dim) in
    q.dtype (with the epilogue applied) and lse (batch, heads, seq_q) float32, natural log.
    """
    ext = _require()
    _check_qkv(q, k, v)
    b, h, sq, d = q.shape
    sk = k.shape[2]
    _check_schedule(schedule, q, sk)
    q, k, v = _unit_last(q), _unit_last(k), _unit_last(v)
    out = _alloc.empty(b, h, sq, d, dtype=q.dtype, device=q.device)
    lse = _alloc.empty(b, h, sq, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    ep_kind, row_scale, residual = EPILOGUE_NONE, None, None
    if epilogue is not None:
        if not isinstance(epilogue, Epilogue):
            raise TypeError(f"epilogue: expected an Epilogue or None, got {type(epilogue).__name__}")
        if epilogue.kind != EPILOGUE_SCALE_RESIDUAL:
            raise ValueError(f"epilogue: the cpu backend implements kind {EPILOGUE_SCALE_RESIDUAL}, got {epilogue.kind}")
        if tuple(epilogue.row_scale.shape) != (b, h, sq):
            raise ValueError(f"epilogue.row_scale: expected shape {(b, h, sq)}, got {tuple(epilogue.row_scale.shape)}")
        if tuple(epilogue.residual.shape) != (b, h, sq, d):
            raise ValueError(f"epilogue.residual: expected shape {(b, h, sq, d)}, got {tuple(epilogue.residual.shape)}")
        ep_kind = EPILOGUE_SCALE_RESIDUAL
        row_scale = epilogue.row_scale.to(device=q.device, dtype=torch.float32)
        # The reference applies the epilogue in the output dtype: take the residual in it too.
        residual = _unit_last(epilogue.residual.to(device=q.device, dtype=q.dtype))
    mask_kind, mask_ptr, _keep = _mask_args(mask)
    rows_arg, _keep_rows = _mask_rows(mask, b, h, sq)
    bm, bn = _blocks(schedule, d, q.dtype)
    kv_ptr, kv_idx, partial, ps, is_ = _csr(schedule)
    ext.attention_fwd(
        _DTYPE_CODES[q.dtype], b, h, sq, sk, d, float(scale),
        q.data_ptr(), q.stride(), k.data_ptr(), k.stride(), v.data_ptr(), v.stride(),
        out.data_ptr(), out.stride(), lse.data_ptr(), False, bm, bn,
        kv_ptr, kv_idx, partial, ps, is_, mask_kind, mask_ptr, ep_kind,
        row_scale.data_ptr() if row_scale is not None else 0,
        row_scale.stride() if row_scale is not None else (0, 0, 0),
        residual.data_ptr() if residual is not None else 0,
        residual.stride() if residual is not None else (0, 0, 0, 1),
        torch.get_num_threads(), **_tokens(schedule), **rows_arg)
    return out, lse


def topk_thresholds(q: torch.Tensor, k: torch.Tensor, topks: list[int], scale: float, tiles: tuple[int, int],
                    tie_tol: float, workspace_bytes: int = 64 << 20) -> tuple[torch.Tensor, torch.Tensor]:
    """Pass 1 of exact top-k attention (``ditkernels.ops.topk``) in C++: one parallel region that
    computes each query row's scores with the forward kernel's arithmetic, selects its ``topk``-th and
    ``topk+1``-th largest score and records the tile visits.

    q: (batch, heads, seq_q, head_dim); k: (batch, heads, seq_k, head_dim), one dtype, any strides;
    topks: ints in [1, seq_k); tiles: (block_m, block_n). Returns thresholds float32
    (len(topks), batch, heads, seq_q) and int8 visits (len(topks), batch*heads, ceil(seq_q/block_m),
    ceil(seq_k/block_n)) with the codes and the threshold rule of ``ditkernels.ops.topk``.
    workspace_bytes: score panels (``rows x seq_k`` per thread, rows <= 64, at least 1) and, when half
    of it holds one per thread, a packed copy of a head's keys; about this many bytes in all.
    """
    ext = _require()
    if not hasattr(ext, "topk_select"):
        raise RuntimeError(f"{ext.__name__} has no topk_select (stale build). {_ext.FIX}")
    _check_qkv(q, k, k)
    b, h, sq, d = q.shape
    sk = k.shape[2]
    topks = [int(t) for t in topks]
    for t in topks:
        if not 1 <= t < sk:
            raise ValueError(f"topks: expected values in [1, seq_k={sk}), got {t}")
    bm, bn = (int(x) for x in tiles)
    if bm < 1 or bn < 1:
        raise ValueError(f"tiles: expected positive (block_m, block_n), got {tuple(tiles)}")
    q, k = _unit_last(q), _unit_last(k)
    nq, nk = -(-sq // bm), -(-sk // bn)
    thr = _alloc.empty(len(topks), b, h, sq, dtype=torch.float32, device=q.device)
    visits = _alloc.empty(len(topks), b * h, nq, nk, dtype=torch.int8, device=q.device)  # poison -1: not a code
    if thr.numel() == 0 or visits.numel() == 0:
        return thr, visits
    ext.topk_select(_DTYPE_CODES[q.dtype], b, h, sq, sk, d, float(scale), q.data_ptr(), q.stride(), k.data_ptr(),
                    k.stride(), topks, float(tie_tol), bm, bn, thr.data_ptr(), visits.data_ptr(),
                    torch.get_num_threads(), int(workspace_bytes))
    return thr, visits


def _lse64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, schedule: BlockSchedule | None,
           mask_kind: int, mask_ptr: int, rows_arg: dict) -> torch.Tensor:
    """lse recomputed in float64 (statistics-only forward): float64 gradients need more than fp32 lse."""
    ext = _require()
    b, h, sq, d = q.shape
    lse = _alloc.empty(b, h, sq, dtype=torch.float64, device=q.device)
    bm, bn = _blocks(schedule, d, q.dtype)
    kv_ptr, kv_idx, partial, ps, is_ = _csr(schedule)
    ext.attention_fwd(
        _DTYPE_CODES[q.dtype], b, h, sq, k.shape[2], d, float(scale),
        q.data_ptr(), q.stride(), k.data_ptr(), k.stride(), v.data_ptr(), v.stride(),
        0, (0, 0, 0, 1), lse.data_ptr(), True, bm, bn,
        kv_ptr, kv_idx, partial, ps, is_, mask_kind, mask_ptr, EPILOGUE_NONE, 0, (0, 0, 0), 0, (0, 0, 0, 1),
        torch.get_num_threads(), **_tokens(schedule), **rows_arg)
    return lse


def flash_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
              lse: torch.Tensor, *, scale: float, schedule: BlockSchedule | None = None,
              mask: ElementMask | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Flash-attention backward (FA2, deterministic: no atomics).

    do, out: (batch, heads, seq_q, head_dim), out being the core output before any epilogue;
    lse: (batch, heads, seq_q) float32 from :func:`flash_fwd`. Returns dq, dk, dv like q, k, v.
    """
    ext = _require()
    _check_qkv(q, k, v)
    _check_like("do", do, q)
    _check_like("out", out, q)
    b, h, sq, d = q.shape
    sk = k.shape[2]
    if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != (b, h, sq) or \
            lse.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"lse: expected a float32 tensor of shape {(b, h, sq)}, got "
                         f"{getattr(lse, 'dtype', type(lse).__name__)} {tuple(getattr(lse, 'shape', ()))}")
    _check_schedule(schedule, q, sk)
    do, q, k, v, out = (_unit_last(t) for t in (do, q, k, v, out))
    mask_kind, mask_ptr, _keep = _mask_args(mask)
    rows_arg, _keep_rows = _mask_rows(mask, b, h, sq)
    if q.dtype == torch.float64 and lse.dtype != torch.float64 and q.numel() > 0 and k.numel() > 0:
        lse = _lse64(q, k, v, scale, schedule, mask_kind, mask_ptr, rows_arg)
    lse = lse.contiguous()
    dq = _alloc.empty(*q.shape, dtype=q.dtype, device=q.device)
    dk = _alloc.empty(*k.shape, dtype=k.dtype, device=k.device)
    dv = _alloc.empty(*v.shape, dtype=v.dtype, device=v.device)
    if dq.numel() == 0 or dk.numel() == 0:  # nothing to compute; no key at all: every gradient is 0
        return dq.zero_(), dk.zero_(), dv.zero_()
    bm, bn = _blocks(schedule, d, q.dtype)
    kv_ptr, kv_idx, partial, ps, is_ = _csr(schedule)
    t_ptr, t_idx, t_partial, tps, tis = _csr(schedule.transposed() if schedule is not None else None)
    ext.attention_bwd(
        _DTYPE_CODES[q.dtype], b, h, sq, sk, d, float(scale),
        do.data_ptr(), do.stride(), q.data_ptr(), q.stride(), k.data_ptr(), k.stride(), v.data_ptr(), v.stride(),
        out.data_ptr(), out.stride(), lse.data_ptr(), lse.dtype == torch.float64,
        dq.data_ptr(), dq.stride(), dk.data_ptr(), dk.stride(), dv.data_ptr(), dv.stride(), bm, bn,
        kv_ptr, kv_idx, partial, ps, is_, t_ptr, t_idx, t_partial, tps, tis, mask_kind, mask_ptr,
        torch.get_num_threads(), **_tokens(schedule), **rows_arg)
    return dq, dk, dv
