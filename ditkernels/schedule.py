"""Block schedules, element masks and epilogues of the flash-attention core.

Every attention op of ditkernels is the same flash-attention core driven by three plug-ins:

- a :class:`BlockSchedule`: which key/value tiles each query tile visits (CSR over query tiles),
  and which of those visits are *partial* (need an element mask); ``None`` means dense;
- an :class:`ElementMask`: the per-element visibility rule evaluated on partial tiles
  (a kernel-side ``MASK`` id plus a few int32 parameters);
- an :class:`Epilogue`: what happens to the normalised output rows before the store
  (``out = row_scale * out + residual`` for Re-ttention).

Backends (reference, cpu, triton) receive exactly these objects, so the schedule that a plan
reports is the schedule a kernel executes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Element-mask kinds understood by every backend. New masks add an id here, a case in each
# backend's mask function, and a torch version in :func:`ElementMask.dense`.
MASK_NONE = 0

# Epilogue kinds.
EPILOGUE_NONE = 0
EPILOGUE_SCALE_RESIDUAL = 1


@dataclass(frozen=True)
class ElementMask:
    """Per-element visibility rule applied on partial tiles.

    kind: one of the ``MASK_*`` ids. params: small int parameters of the rule (passed to kernels
    as an int32 vector).
    """

    kind: int = MASK_NONE
    params: tuple[int, ...] = ()

    def dense(self, seq_q: int, seq_k: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The rule as a bool tensor ``(seq_q, seq_k)`` (reference backend and tests only)."""
        if self.kind == MASK_NONE:
            return torch.ones(seq_q, seq_k, dtype=torch.bool, device=device)
        raise NotImplementedError(f"element mask kind {self.kind} has no dense form")


@dataclass
class Epilogue:
    """``out = row_scale[..., None] * out + residual`` applied to the normalised rows.

    row_scale: (batch, heads, seq_q) float32. residual: (batch, heads, seq_q, head_dim), any float dtype.
    """

    row_scale: torch.Tensor
    residual: torch.Tensor
    kind: int = EPILOGUE_SCALE_RESIDUAL

    def apply(self, out: torch.Tensor) -> torch.Tensor:
        """Reference application in the dtype of ``out``."""
        return self.row_scale[..., None].to(out.dtype) * out + self.residual.to(out.dtype)


@dataclass
class BlockSchedule:
    """Which KV tiles each query tile visits, as CSR.

    Query tile ``m`` covers query rows ``[m*block_m, (m+1)*block_m)``; KV tile ``n`` covers keys
    ``[n*block_n, (n+1)*block_n)``. For query tile ``m`` of head slice ``h`` (``h`` in
    ``[0, num_heads_sched)``, 1 when shared by every batch*head), the visited KV tiles are
    ``kv_idx[h, kv_ptr[h, m]:kv_ptr[h, m+1]]`` in increasing order; ``partial[h, same slice]`` is 1
    where the visit needs the element mask, 0 where every in-bounds pair of the tile is visible.

    The transposed CSR (query tiles per KV tile) drives the dK/dV backward pass; it is derived on
    demand by :meth:`transposed`.

    All index tensors are int32 and contiguous, on the device of the problem.
    """

    block_m: int
    block_n: int
    seq_q: int
    seq_k: int
    kv_ptr: torch.Tensor  # (H_s, num_q_tiles + 1) int32
    kv_idx: torch.Tensor  # (H_s, nnz_max) int32
    partial: torch.Tensor  # (H_s, nnz_max) int32 (0/1)
    _transposed: "BlockSchedule | None" = field(default=None, repr=False)

    @property
    def num_q_tiles(self) -> int:
        return -(-self.seq_q // self.block_m)

    @property
    def num_kv_tiles(self) -> int:
        return -(-self.seq_k // self.block_n)

    @property
    def num_heads_sched(self) -> int:
        return self.kv_ptr.shape[0]

    @classmethod
    def from_tile_mask(cls, tile_mask: torch.Tensor, block_m: int, block_n: int, seq_q: int, seq_k: int,
                       partial_mask: torch.Tensor | None = None) -> "BlockSchedule":
        """Build from a bool ``(H_s, num_q_tiles, num_kv_tiles)`` (or 2-D) tile mask.

        partial_mask: same shape, True where a visited tile needs the element mask (default: none).
        """
        if tile_mask.dim() == 2:
            tile_mask = tile_mask[None]
            if partial_mask is not None and partial_mask.dim() == 2:
                partial_mask = partial_mask[None]
        hs, nq, nk = tile_mask.shape
        if nq != -(-seq_q // block_m) or nk != -(-seq_k // block_n):
            raise ValueError(f"tile_mask: expected (H, {-(-seq_q // block_m)}, {-(-seq_k // block_n)}) tiles "
                             f"for seq_q={seq_q}, seq_k={seq_k}, blocks ({block_m}, {block_n}); got {tuple(tile_mask.shape)}")
        tile_mask = tile_mask.to(torch.bool)
        counts = tile_mask.sum(-1, dtype=torch.int32)  # (H_s, nq)
        kv_ptr = torch.zeros(hs, nq + 1, dtype=torch.int32, device=tile_mask.device)
        kv_ptr[:, 1:] = torch.cumsum(counts, -1)
        nnz_max = max(int(kv_ptr[:, -1].max()), 1)
        kv_idx = torch.zeros(hs, nnz_max, dtype=torch.int32, device=tile_mask.device)
        partial = torch.zeros(hs, nnz_max, dtype=torch.int32, device=tile_mask.device)
        pm = partial_mask.to(torch.bool) if partial_mask is not None else torch.zeros_like(tile_mask)
        for h in range(hs):
            nz = tile_mask[h].nonzero()  # row-major: sorted by (m, n)
            n_h = nz.shape[0]
            kv_idx[h, :n_h] = nz[:, 1].to(torch.int32)
            partial[h, :n_h] = pm[h][nz[:, 0], nz[:, 1]].to(torch.int32)
        return cls(block_m, block_n, seq_q, seq_k, kv_ptr.contiguous(), kv_idx.contiguous(), partial.contiguous())

    def tile_mask(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(visited, partial): bool ``(H_s, num_q_tiles, num_kv_tiles)``."""
        hs, nq, nk = self.num_heads_sched, self.num_q_tiles, self.num_kv_tiles
        visited = torch.zeros(hs, nq, nk, dtype=torch.bool, device=self.kv_ptr.device)
        partial = torch.zeros_like(visited)
        ptr = self.kv_ptr.cpu()
        for h in range(hs):
            rows = torch.repeat_interleave(torch.arange(nq), (ptr[h, 1:] - ptr[h, :-1]).long())
            n = int(ptr[h, -1])
            cols = self.kv_idx[h, :n].long().cpu()
            visited[h, rows, cols] = True
            partial[h, rows, cols] = self.partial[h, :n].cpu().bool()
        return visited, partial

    def transposed(self) -> "BlockSchedule":
        """The same visits as CSR over KV tiles (block_m/block_n and seq_q/seq_k swapped)."""
        if self._transposed is None:
            visited, partial = self.tile_mask()
            self._transposed = BlockSchedule.from_tile_mask(
                visited.transpose(1, 2), self.block_n, self.block_m, self.seq_k, self.seq_q, partial.transpose(1, 2))
        return self._transposed

    def element_mask(self, mask: ElementMask | None = None) -> torch.Tensor:
        """Visibility ``(H_s, seq_q, seq_k)`` bool implied by the visited tiles and the element mask."""
        visited, partial = self.tile_mask()
        vis = visited.repeat_interleave(self.block_m, 1).repeat_interleave(self.block_n, 2)
        par = partial.repeat_interleave(self.block_m, 1).repeat_interleave(self.block_n, 2)
        vis = vis[:, : self.seq_q, : self.seq_k]
        par = par[:, : self.seq_q, : self.seq_k]
        if mask is not None and mask.kind != MASK_NONE:
            elem = mask.dense(self.seq_q, self.seq_k, vis.device)
            vis = vis & (~par | elem)
        return vis

    @property
    def visited_tiles(self) -> int:
        return int(self.kv_ptr[:, -1].sum())

    @property
    def partial_tiles(self) -> int:
        return int(sum(int(self.partial[h, : int(self.kv_ptr[h, -1])].sum()) for h in range(self.num_heads_sched)))

    def to(self, device: torch.device | str) -> "BlockSchedule":
        return BlockSchedule(self.block_m, self.block_n, self.seq_q, self.seq_k, self.kv_ptr.to(device),
                             self.kv_idx.to(device), self.partial.to(device))
