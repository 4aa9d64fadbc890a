"""Backend registry, the backend contract and dispatch (docs/spec.md §6).

The contract. A backend is a module ``ditkernels.backends.<NAME>`` (imported on first use, so a
missing compiler or library never breaks ``import ditkernels``) that defines the members of
:class:`Backend`:

- ``NAME`` (its name in :data:`NAMES`), ``DTYPES`` (the dtypes it computes in) and
  ``CAPABILITIES`` (a frozenset of the capability names below);
- ``available() -> (ok, reason)``: whether it runs in this process, and the fix when it does not;
- ``device_reason(device) -> str | None``: why it cannot take tensors on ``device``;
- ``limits(op, call) -> list[str]``: every reason of its own (shapes, sizes) why it cannot run one
  call of ``op`` described by a :class:`Call` (empty when it can);
- for every capability it declares, the functions :data:`CAPABILITY_FUNCTIONS` lists for it.

Ops never import a backend by name nor test a backend's name: they :func:`resolve` the backend of
a call (which is checked by :func:`why_not`) and ask :func:`has` for an optional capability.
Attention and the selective scan dispatch the same way (the op's required capability is in
:data:`OPS`). ``tests/test_backends.py`` checks that every backend module implements what it
declares, and nothing of a capability it does not declare.
"""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass
from types import ModuleType
from typing import Protocol

import torch

NAMES = ("reference", "cpu", "triton", "cuda")
ENV = "DITKERNELS_BACKEND"

# ---- capabilities -----------------------------------------------------------------------------
# The flash-attention core: ``block_sizes(head_dim, dtype) -> (block_m, block_n)``,
# ``flash_fwd(q, k, v, *, scale, schedule, mask, epilogue) -> (out, lse)`` and
# ``flash_bwd(do, q, k, v, out, lse, *, scale, schedule, mask) -> (dq, dk, dv)``
# (signatures: ditkernels/backends/reference.py).
ATTENTION = "attention"
# Mamba's selective scan: ``saved_shape(batch, dim, seqlen, dstate)``, ``scan_fwd(...)`` and
# ``scan_bwd(...)`` (the launcher contract: ditkernels/backends/cpu_scan.py).
SELECTIVE_SCAN = "selective_scan"
# The backend evaluates every attention op on its dense ``(seq_q, seq_k)`` visibility with the op
# family's reference (``ditkernels/reference/<family>.py``) instead of running the kernel plan: the
# ground truth the plans are tested against. No functions.
DENSE_REFERENCE = "dense_reference"
# Local-attention plans of its own: ``local_block_sizes(head_dim, dtype) -> (block_m, block_n)``,
# ``local_tiles(grid) -> (q box | None, kv box | None)`` and ``local_fwd_block_n`` (block_n choices
# of the forward plan, () for none). Without it a backend runs ditkernels.ops.local's default plan.
LOCAL_TILING = "local_tiling"
# Block-sparse tiles must be powers of two >= 16 of at most ``block_sizes()``: the ops re-tile the
# user's blocks for it (ditkernels.ops.sparse.block_sparse_schedule). No functions.
POW2_TILES = "pow2_tiles"
# Block top-k selection on the device: ``block_topk_supported(num_key_blocks) -> bool`` and
# ``block_topk_mask(q, k, topk, block_q, block_k, num_prefix, num_suffix, scale) -> bool mask``.
BLOCK_TOPK_SELECT = "block_topk_select"
# Exact top-k pass 1 in the backend: ``topk_thresholds(q, k, topks, scale, tiles, tie_tol)``
# (ditkernels.ops.topk.topk_thresholds has the torch version every other backend uses).
TOPK_THRESHOLDS = "topk_thresholds"
# Kernel-side counters of the last forward launch: ``last_fwd_visits()``, ``last_fwd_pairs()``.
FWD_COUNTERS = "fwd_counters"

CAPABILITY_FUNCTIONS: dict[str, tuple[str, ...]] = {
    ATTENTION: ("block_sizes", "flash_fwd", "flash_bwd"),
    SELECTIVE_SCAN: ("saved_shape", "scan_fwd", "scan_bwd"),
    DENSE_REFERENCE: (),
    LOCAL_TILING: ("local_block_sizes", "local_tiles", "local_fwd_block_n"),
    POW2_TILES: (),
    BLOCK_TOPK_SELECT: ("block_topk_supported", "block_topk_mask"),
    TOPK_THRESHOLDS: ("topk_thresholds",),
    FWD_COUNTERS: ("last_fwd_visits", "last_fwd_pairs"),
}

# The capability each op needs of a backend.
OPS: dict[str, str] = {
    "attention": ATTENTION,
    "local_attention": ATTENTION,
    "block_sparse_attention": ATTENTION,
    "topk_attention": ATTENTION,
    "rettention": ATTENTION,
    "selective_scan": SELECTIVE_SCAN,
}


@dataclass(frozen=True)
class Call:
    """What dispatch knows of one call: the inputs' device and dtype, and the sizes a backend may limit
    (``head_dim`` of attention, ``block_size`` of block-sparse attention); None when not relevant."""

    device: torch.device
    dtype: torch.dtype
    head_dim: int | None = None
    block_size: tuple[int, int] | None = None


class Backend(Protocol):
    """The members every backend module defines (see the module docstring)."""

    NAME: str
    DTYPES: tuple[torch.dtype, ...]
    CAPABILITIES: frozenset[str]

    def available(self) -> tuple[bool, str]: ...

    def device_reason(self, device: torch.device) -> str | None: ...

    def limits(self, op: str, call: Call) -> list[str]: ...


def device_only(name: str, device_type: str, device: torch.device) -> str | None:
    """``device_reason`` of backend ``name`` that takes ``device_type`` tensors only."""
    if device.type != device_type:
        return f"the {name} backend takes {device_type.upper()} tensors, got {device.type} tensors"
    return None


def no_limits(op: str, call: Call) -> list[str]:
    """``limits`` of a backend that takes every size its capabilities name."""
    return []


_warned: set[str] = set()


def get(name: str) -> ModuleType:
    """The backend module ``name`` (imported on first use)."""
    if name not in NAMES:
        raise ValueError(f"backend: expected one of {NAMES}, got {name!r}")
    return importlib.import_module(f"{__name__}.{name}")


def has(mod: ModuleType, capability: str) -> bool:
    """Whether backend module ``mod`` declares ``capability``."""
    if capability not in CAPABILITY_FUNCTIONS:
        raise ValueError(f"capability: expected one of {tuple(CAPABILITY_FUNCTIONS)}, got {capability!r}")
    return capability in mod.CAPABILITIES


def supporting(op: str) -> tuple[str, ...]:
    """The backends that implement ``op`` (whether or not they run in this process)."""
    return tuple(name for name in NAMES if OPS[op] in get(name).CAPABILITIES)


def availability(name: str) -> tuple[bool, str]:
    """(ok, reason and fix) for backend ``name`` in this process."""
    try:
        return get(name).available()
    except Exception as exc:  # a broken backend must be explained, not crash dispatch
        return False, f"importing ditkernels.backends.{name} failed: {type(exc).__name__}: {exc}"


def why_not(name: str, op: str, call: Call) -> str | None:
    """Every reason backend ``name`` cannot run this call of ``op`` ('; '-joined), or None if it can:
    a missing capability, the device, the dtype, the backend's own limits, a missing library."""
    if op not in OPS:
        raise ValueError(f"op: expected one of {tuple(OPS)}, got {op!r}")
    mod = get(name)
    reasons = []
    if OPS[op] not in mod.CAPABILITIES:
        reasons.append(f"{op} has no {name} backend (it has: {', '.join(supporting(op))})")
    device = mod.device_reason(call.device)
    if device:
        reasons.append(device)
    if call.dtype not in mod.DTYPES:
        reasons.append(f"the {name} backend does not compute in {call.dtype} "
                       f"(it takes {', '.join(map(str, mod.DTYPES))})")
    reasons += mod.limits(op, call)
    ok, why = availability(name)
    if not ok:
        reasons.append(why)
    return "; ".join(reasons) if reasons else None


def resolve(op: str, call: Call, requested: str | None = None) -> ModuleType:
    """Pick the backend module for one call of ``op``.

    ``requested`` (the ``backend=`` argument) wins, then ``DITKERNELS_BACKEND``; a requested backend
    that cannot run raises with the reasons. Otherwise CUDA tensors try cuda then triton, CPU tensors
    try cpu, and ``reference`` is the last resort (with a one-time warning saying why).
    """
    requested = requested or os.environ.get(ENV) or None
    if requested is not None:
        if requested not in NAMES:
            src = "backend" if requested != os.environ.get(ENV) else ENV
            raise ValueError(f"{src}: expected one of {NAMES}, got {requested!r}")
        reason = why_not(requested, op, call)
        if reason:
            raise RuntimeError(f"{op}: backend {requested!r} cannot run this call: {reason}")
        return get(requested)
    order = ("cuda", "triton") if call.device.type == "cuda" else ("cpu",)
    reasons = []
    for name in order:
        reason = why_not(name, op, call)
        if reason is None:
            return get(name)
        reasons.append(f"{name}: {reason}")
    reason = why_not("reference", op, call)
    if reason is not None:
        raise RuntimeError(f"{op}: no backend can run this call: " + "; ".join(reasons + [f"reference: {reason}"]))
    key = f"{op}/{call.device.type}/{call.dtype}"
    if key not in _warned:
        _warned.add(key)
        warnings.warn(f"ditkernels.{op}: falling back to the slow reference backend ({'; '.join(reasons)})",
                      RuntimeWarning, stacklevel=3)
    return get("reference")


def resolve_for(op: str, x: torch.Tensor, requested: str | None = None, **sizes) -> ModuleType:
    """:func:`resolve` for a call whose inputs have the device and dtype of ``x``."""
    return resolve(op, Call(x.device, x.dtype, **sizes), requested or None)


def report() -> list[tuple[str, bool, str]]:
    """(name, available, reason) for every backend."""
    return [(name, *availability(name)) for name in NAMES]
