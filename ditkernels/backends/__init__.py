"""Backend registry and dispatch (SPEC §6).

Each backend is a module with ``available() -> (ok, reason)``, ``block_sizes(head_dim, dtype)``,
``flash_fwd(...)`` and ``flash_bwd(...)`` (see ``ditkernels/backends/reference.py`` for the
signatures). Modules are imported lazily, so a missing compiler or library never breaks
``import ditkernels``; it is explained by :func:`report` and by the error of a call that needs it.
"""

from __future__ import annotations

import importlib
import os
import warnings
from types import ModuleType

import torch

NAMES = ("reference", "cpu", "triton", "cuda")
ENV = "DITKERNELS_BACKEND"

# dtypes each backend computes in (before any op-specific restriction).
_DTYPES = {
    "reference": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "cpu": (torch.float16, torch.bfloat16, torch.float32, torch.float64),
    "triton": (torch.float16, torch.bfloat16, torch.float32),
    "cuda": (torch.float16, torch.bfloat16, torch.float32),
}
_warned: set[str] = set()


def get(name: str) -> ModuleType:
    """The backend module ``name`` (imported on first use)."""
    if name not in NAMES:
        raise ValueError(f"backend: expected one of {NAMES}, got {name!r}")
    return importlib.import_module(f"{__name__}.{name}")


def availability(name: str) -> tuple[bool, str]:
    """(ok, reason and fix) for backend ``name`` in this process."""
    try:
        return get(name).available()
    except Exception as exc:  # a broken backend must be explained, not crash dispatch
        return False, f"importing ditkernels.backends.{name} failed: {type(exc).__name__}: {exc}"


def _device_reason(name: str, device: torch.device) -> str | None:
    """Why backend ``name`` cannot take tensors on ``device`` (None when it can)."""
    if name == "cpu" and device.type != "cpu":
        return f"the cpu backend takes CPU tensors, got {device.type} tensors"
    if name == "cuda" and device.type != "cuda":
        return f"the cuda backend takes CUDA tensors, got {device.type} tensors"
    if name == "triton" and device.type != "cuda":
        if not (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
            return (f"the triton backend takes CUDA tensors, got {device.type} tensors "
                    "(set TRITON_INTERPRET=1 before importing triton to run it on the CPU for tests)")
    return None


def why_not(name: str, op: str, supported: tuple[str, ...], device: torch.device, dtype: torch.dtype) -> str | None:
    """The reason backend ``name`` cannot run this call of ``op``, or None if it can."""
    if name not in supported:
        return f"{op} has no {name} backend (it has: {', '.join(supported)})"
    reason = _device_reason(name, device)
    if reason:
        return reason
    if dtype not in _DTYPES[name]:
        return f"the {name} backend does not compute in {dtype} (it takes {', '.join(map(str, _DTYPES[name]))})"
    ok, why = availability(name)
    return None if ok else why


def resolve(op: str, supported: tuple[str, ...], device: torch.device, dtype: torch.dtype,
            requested: str | None = None) -> ModuleType:
    """Pick the backend module for one call of ``op``.

    ``requested`` (the ``backend=`` argument) wins, then ``DITKERNELS_BACKEND``; a requested backend
    that cannot run raises with the reason. Otherwise CUDA tensors try cuda then triton, CPU tensors
    try cpu, and ``reference`` is the last resort (with a one-time warning saying why).
    """
    requested = requested or os.environ.get(ENV) or None
    if requested is not None:
        if requested not in NAMES:
            src = "backend" if requested != os.environ.get(ENV) else ENV
            raise ValueError(f"{src}: expected one of {NAMES}, got {requested!r}")
        reason = why_not(requested, op, supported, device, dtype)
        if reason:
            raise RuntimeError(f"{op}: backend {requested!r} cannot run this call: {reason}")
        return get(requested)
    order = ("cuda", "triton") if device.type == "cuda" else ("cpu",)
    reasons = []
    for name in order:
        reason = why_not(name, op, supported, device, dtype)
        if reason is None:
            return get(name)
        reasons.append(f"{name}: {reason}")
    reason = why_not("reference", op, supported, device, dtype)
    if reason is not None:
        raise RuntimeError(f"{op}: no backend can run this call: " + "; ".join(reasons + [f"reference: {reason}"]))
    key = f"{op}/{device.type}/{dtype}"
    if key not in _warned and order:
        _warned.add(key)
        warnings.warn(f"ditkernels.{op}: falling back to the slow reference backend ({'; '.join(reasons)})",
                      RuntimeWarning, stacklevel=3)
    return get("reference")


def report() -> list[tuple[str, bool, str]]:
    """(name, available, reason) for every backend."""
    return [(name, *availability(name)) for name in NAMES]
