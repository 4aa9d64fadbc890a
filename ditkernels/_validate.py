"""Input checks shared by the public ops: raise before any kernel runs, naming the argument."""

from __future__ import annotations

import math

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_HEAD_DIM = 256


def check_tensor(name: str, t: object, ndim: int) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name}: expected a {ndim}-D tensor, got shape {tuple(t.shape)}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float16, bfloat16, float32 or float64, got {t.dtype}")
    return t


def check_qkv(q: object, k: object, v: object) -> None:
    """q: (batch, heads, seq_q, head_dim); k, v: (batch, heads, seq_k, head_dim), one dtype and device."""
    check_tensor("q", q, 4)
    check_tensor("k", k, 4)
    check_tensor("v", v, 4)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} (the dtype of q), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected device {q.device} (the device of q), got {t.device}")
        if t.shape[:2] != q.shape[:2]:
            raise ValueError(f"{name}: expected (batch, heads) = {tuple(q.shape[:2])} as q, got shape {tuple(t.shape)}")
        if t.shape[3] != q.shape[3]:
            raise ValueError(f"{name}: expected head_dim {q.shape[3]} (the head_dim of q), got shape {tuple(t.shape)}")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v: expected seq_k = {k.shape[2]} (the length of k), got shape {tuple(v.shape)}")
    d = q.shape[3]
    if not 1 <= d <= MAX_HEAD_DIM:
        raise ValueError(f"q: head_dim must be in [1, {MAX_HEAD_DIM}], got {d} (shape {tuple(q.shape)})")
    if q.shape[2] == 0 or k.shape[2] == 0:
        raise ValueError(f"q, k: sequence lengths must be positive, got seq_q={q.shape[2]}, seq_k={k.shape[2]}")


def check_scale(scale: object, head_dim: int) -> float:
    """``scale`` or the default ``head_dim ** -0.5``, as a finite float."""
    if scale is None:
        return head_dim ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise TypeError(f"scale: expected a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite number, got {scale}")
    return float(scale)


def check_token_grid(grid: object, name: str = "grid") -> tuple[int, ...] | None:
    """A token grid of attention: None, or ``(L,)``, ``(H, W)`` or ``(T, H, W)`` positive ints."""
    if grid is None:
        return None
    if not isinstance(grid, (tuple, list, torch.Size)) or not 1 <= len(grid) <= 3 or any(
            isinstance(g, bool) or not isinstance(g, int) or g < 1 for g in grid):
        raise ValueError(f"{name}: expected a tuple of 1, 2 or 3 positive ints, got {grid!r}")
    return tuple(int(g) for g in grid)


def check_grid_hw(grid: object, name: str = "grid") -> tuple[int, int]:
    """The 2-D grid of a multi-direction scan: ``(H, W)``, both positive ints."""
    if (not isinstance(grid, (tuple, list, torch.Size)) or len(grid) != 2
            or not all(isinstance(g, int) and not isinstance(g, bool) for g in grid)):
        raise TypeError(f"{name}: expected a tuple of two ints (H, W), got {grid!r}")
    if grid[0] < 1 or grid[1] < 1:
        raise ValueError(f"{name}: expected positive sizes (H, W), got {tuple(grid)}")
    return int(grid[0]), int(grid[1])


def check_backend(backend: object) -> str:
    if backend is None:
        return ""
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a str or None, got {type(backend).__name__}")
    from .backends import NAMES

    if backend not in NAMES:
        raise ValueError(f"backend: expected one of {NAMES}, got {backend!r}")
    return backend
