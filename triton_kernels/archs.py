"""NVIDIA architectures the Triton kernels ship configurations for (imports neither torch nor triton).

One row per config table of ``flash`` / ``block_select`` / ``selective_scan``: the compile target
``python -m ditkernels compile-report`` builds for, the shared memory a block may use on it, and the
tensor-core instruction its fp16/bf16 attention dots compile to. :func:`arch_for_capability` maps a
device's compute capability to its row.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass


@dataclass(frozen=True)
class Arch:
    sm: int  # compile target: triton's GPUTarget("cuda", sm, 32) (sm_90 / sm_100 / sm_120 build as sm_XXa)
    gpus: str
    shared_per_block: int  # bytes: the opt-in maximum of dynamic shared memory per block
    mma: str  # SASS tensor-core instruction of the fp16/bf16 attention dots
    mma_kind: str  # what that instruction is


ARCHS: dict[int, Arch] = {a.sm: a for a in (
    Arch(80, "A100, A30", 163 * 1024, "HMMA", "mma.sync"),
    Arch(86, "RTX 3090, A10, A40, RTX A6000 (and sm_87: Jetson Orin)", 99 * 1024, "HMMA", "mma.sync"),
    Arch(89, "RTX 4090, L4, L40S, RTX 6000 Ada", 99 * 1024, "HMMA", "mma.sync"),
    Arch(90, "H100, H200, GH200", 227 * 1024, "HGMMA", "wgmma (warpgroup MMA)"),
    Arch(100, "B200, GB200 (and sm_103: B300)", 227 * 1024, "UTCHMMA", "tcgen05.mma (tensor memory)"),
    Arch(120, "RTX 5090, RTX PRO 6000 Blackwell (and sm_121: DGX Spark)", 99 * 1024, "HMMA",
         "mma.sync (no wgmma / tcgen05 on consumer Blackwell)"),
)}

# The row a GPU of an unknown (future) architecture runs: the smallest shared memory of the table and
# mma.sync, the instruction every NVIDIA tensor-core GPU since sm_80 has.
CONSERVATIVE = 86

_warned: set[tuple[int, int]] = set()


def arch_for_capability(major: int, minor: int) -> int:
    """The ``ARCHS`` row of a GPU of compute capability ``major.minor``: 8.0 -> 80, 8.6 / 8.7 -> 86, 8.9 -> 89,
    9.0 -> 90, 10.x -> 100, 12.x -> 120; any other capability from 8.0 on -> :data:`CONSERVATIVE`, with a
    one-time warning. Below 8.0 (no bf16 tensor cores, 64 KB of shared memory per block) raises."""
    if major < 8:
        raise RuntimeError(f"the triton backend needs an NVIDIA GPU of compute capability 8.0 or newer "
                           f"(A100, RTX 30xx and later), got {major}.{minor}")
    row = {(8, 0): 80, (8, 6): 86, (8, 7): 86, (8, 9): 89, (9, 0): 90}.get((major, minor))
    if row is None:
        row = {10: 100, 12: 120}.get(major)
    if row is None:
        row = CONSERVATIVE
        if (major, minor) not in _warned:
            _warned.add((major, minor))
            warnings.warn(f"ditkernels: no Triton configs were checked for compute capability {major}.{minor}; "
                          f"using the sm_{CONSERVATIVE} ones ({ARCHS[CONSERVATIVE].shared_per_block} bytes of "
                          "shared memory per block, mma.sync)", RuntimeWarning, stacklevel=3)
    return row
