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

import copy
from dataclasses import dataclass, field

import torch

# Element-mask kinds understood by every backend. New masks add an id here, a case in each
# backend's mask function, and a torch version in :func:`ElementMask.dense`.
MASK_NONE = 0
# Local windows (docs/spec.md §1): params = ditkernels.reference.local.LocalSpec.mask_params().
MASK_LOCAL = 1
# Re-ttention's band (docs/spec.md §3): params = (half, lo, hi, frame), see ditkernels.reference.rettention.band_visible.
MASK_BAND = 2
# Exact top-k (docs/spec.md §2, ditkernels.ops.topk): a pair is visible iff its scaled score
# ``scale * q.k`` is >= the query row's threshold ``ElementMask.rows[b, h, i]`` (float32, natural
# units). It depends on the scores, so it has no dense form without q and k (see :meth:`ElementMask.visible`).
MASK_THRESHOLD = 3

# Epilogue kinds.
EPILOGUE_NONE = 0
EPILOGUE_SCALE_RESIDUAL = 1


@dataclass(frozen=True)
class ElementMask:
    """Per-element visibility rule applied on partial tiles.

    kind: one of the ``MASK_*`` ids. params: small int parameters of the rule (passed to kernels
    as an int32 vector). rows: per-query-row data of score-dependent rules (``MASK_THRESHOLD``:
    float32 thresholds (batch, heads, seq_q)), else None.
    """

    kind: int = MASK_NONE
    params: tuple[int, ...] = ()
    rows: torch.Tensor | None = field(default=None, compare=False, repr=False)

    def visible(self, scores: torch.Tensor) -> torch.Tensor:
        """Score-dependent rules: visibility of ``scores`` (batch, heads, seq_q, seq_k), scaled natural
        units (``MASK_THRESHOLD``: ``scores >= rows[..., None]``). Other kinds: all True."""
        if self.kind == MASK_THRESHOLD:
            return scores >= self.rows.to(scores.device, scores.dtype)[..., None]
        return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)

    def dense(self, seq_q: int, seq_k: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """The rule as a bool tensor ``(seq_q, seq_k)`` (reference backend and tests only)."""
        if self.kind == MASK_NONE:
            return torch.ones(seq_q, seq_k, dtype=torch.bool, device=device)
        if self.kind == MASK_LOCAL:
            from .reference.local import LocalSpec, local_visible

            spec = LocalSpec.from_mask_params(self.params)
            if (spec.seq_q, spec.seq_k) != (seq_q, seq_k):
                raise ValueError(f"mask: local mask built for seq_q={spec.seq_q}, seq_k={spec.seq_k}, "
                                 f"asked for ({seq_q}, {seq_k})")
            return local_visible(spec, device)
        if self.kind == MASK_BAND:
            from .reference.rettention import band_visible

            return band_visible(seq_q, seq_k, *self.params, device=device)
        if self.kind == MASK_THRESHOLD:
            # score-dependent: the pattern part is "every pair"; ElementMask.visible adds the scores
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
        per_head = kv_ptr[:, -1].to(torch.int64)
        nnz_max = max(int(per_head.max()), 1)
        kv_idx = torch.zeros(hs, nnz_max, dtype=torch.int32, device=tile_mask.device)
        partial = torch.zeros(hs, nnz_max, dtype=torch.int32, device=tile_mask.device)
        # One nonzero over every head slice (row-major: sorted by (h, m, n)); a visit's slot within its
        # head is its rank minus the number of visits of the head slices before it.
        nz = tile_mask.nonzero()
        if nz.shape[0]:
            head_start = torch.cumsum(per_head, 0) - per_head
            slot = torch.arange(nz.shape[0], device=nz.device) - head_start[nz[:, 0]]
            kv_idx[nz[:, 0], slot] = nz[:, 2].to(torch.int32)
            if partial_mask is not None:
                partial[nz[:, 0], slot] = partial_mask.to(torch.bool)[nz[:, 0], nz[:, 1], nz[:, 2]].to(torch.int32)
        return cls(block_m, block_n, seq_q, seq_k, kv_ptr.contiguous(), kv_idx.contiguous(), partial.contiguous())

    def validate(self, seq_q: int, seq_k: int, batch_heads: int, device: torch.device | None = None) -> None:
        """Check this schedule for a launch on ``seq_q`` queries, ``seq_k`` keys, ``batch_heads``
        batch*head slices and (if given) tensors on ``device``; raise ValueError naming the field.

        The kernels of every backend trust the indices with raw pointers, so the checks that do not
        depend on the launch (int32 contiguous index tensors of the right shapes on one device,
        non-decreasing ``kv_ptr`` offsets within ``kv_idx``, ``kv_idx`` in ``[0, num_kv_tiles)``, and
        for token tables: each row's tokens first, the tiles together a permutation of the sequence)
        run once per schedule object, with one device synchronisation (a schedule is not modified in
        place after its first launch). The transposed schedule of the backward is derived from a
        validated one and needs no check of its own."""
        if (self.seq_q, self.seq_k) != (seq_q, seq_k):
            raise ValueError(f"schedule: built for seq_q={self.seq_q}, seq_k={self.seq_k}; "
                             f"the inputs have seq_q={seq_q}, seq_k={seq_k}")
        if self.num_heads_sched not in (1, batch_heads):
            raise ValueError(f"schedule: expected 1 or batch*heads={batch_heads} head slices, "
                             f"got {self.num_heads_sched}")
        if device is not None and self.kv_ptr.device != torch.device(device):
            raise ValueError(f"schedule.kv_ptr: expected tensors on {device} (that of q), got {self.kv_ptr.device}")
        if not self.__dict__.get("_valid"):
            self._validate_structure()
            self.__dict__["_valid"] = True

    def _index_tensors(self) -> list[tuple[str, torch.Tensor, tuple[int, int] | None]]:
        """(name, tensor, expected shape or None: any (head slices, n)) of the index tensors."""
        return [("kv_ptr", self.kv_ptr, (self.num_heads_sched, self.num_q_tiles + 1)),
                ("kv_idx", self.kv_idx, None), ("partial", self.partial, (self.num_heads_sched, self.kv_idx.shape[-1]))]

    def _validate_structure(self) -> None:
        for name in ("block_m", "block_n"):
            val = getattr(self, name)
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"schedule.{name}: expected a positive int, got {val!r}")
        dev = self.kv_ptr.device
        for name, t, shape in self._index_tensors():
            if not isinstance(t, torch.Tensor) or t.dtype != torch.int32 or not t.is_contiguous() or t.dim() != 2 \
                    or t.device != dev or tuple(t.shape) != (shape or (self.kv_ptr.shape[0], t.shape[1])):
                want = shape if shape is not None else (self.kv_ptr.shape[0], "n")
                raise ValueError(f"schedule.{name}: expected a contiguous int32 tensor {want} on {dev}, got "
                                 f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))} on "
                                 f"{getattr(t, 'device', '?')}")
        ptr, idx, nkv = self.kv_ptr, self.kv_idx, max(self.num_kv_tiles, 1)
        bad = torch.stack([(ptr[:, 0] < 0).any(), (ptr[:, -1] > idx.shape[1]).any(), (ptr[:, 1:] < ptr[:, :-1]).any(),
                           ((idx < 0) | (idx >= nkv)).any(), *self._token_flags()]).tolist()
        if any(bad[:3]):
            raise ValueError("schedule.kv_ptr: expected non-decreasing offsets within kv_idx")
        if bad[3]:
            raise ValueError(f"schedule.kv_idx: expected KV tile indices in [0, {self.num_kv_tiles}), got "
                             f"[{int(idx.min())}, {int(idx.max())}]")
        self._check_token_flags(bad[4:])

    def _token_flags(self) -> list[torch.Tensor]:
        return []

    def _check_token_flags(self, flags: list[bool]) -> None:
        pass

    def tile_mask(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(visited, partial): bool ``(H_s, num_q_tiles, num_kv_tiles)``."""
        hs, nq, nk = self.num_heads_sched, self.num_q_tiles, self.num_kv_tiles
        visited = torch.zeros(hs, nq, nk, dtype=torch.bool, device=self.kv_ptr.device)
        partial = torch.zeros_like(visited)
        ptr = self.kv_ptr.long()
        counts = ptr[:, 1:] - ptr[:, :-1]  # (H_s, nq)
        heads = torch.arange(hs, device=ptr.device).repeat_interleave(counts.sum(1))
        rows = torch.arange(nq, device=ptr.device).repeat(hs).repeat_interleave(counts.reshape(-1))
        used = torch.arange(self.kv_idx.shape[1], device=ptr.device)[None, :] < ptr[:, -1:]  # (H_s, nnz_max)
        cols = self.kv_idx[used].long()
        visited[heads, rows, cols] = True
        partial[heads, rows, cols] = self.partial[used].bool()
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

    def on(self, device: torch.device | str) -> "BlockSchedule":
        """This schedule with its tensors on ``device``: itself when they are there, else a copy made on
        the first call and kept on this object, so a cached schedule (a local plan, a band) is not copied
        host-to-device at every attention call."""
        device = torch.device(device)
        if self.kv_ptr.device == device:
            return self
        copies = self.__dict__.setdefault("_device_copies", {})
        if device not in copies:
            copies[device] = self.to(device)
        return copies[device]

    def to(self, device: torch.device | str) -> "BlockSchedule":
        return BlockSchedule(self.block_m, self.block_n, self.seq_q, self.seq_k, self.kv_ptr.to(device),
                             self.kv_idx.to(device), self.partial.to(device))


@dataclass
class TiledSchedule(BlockSchedule):
    """A :class:`BlockSchedule` whose tiles are arbitrary token sets (2-D/3-D tiles of a grid, tails).

    q_tokens: (num_q_tiles, block_m) int32, the query tokens of each query tile; kv_tokens:
    (num_kv_tiles, block_n) int32, the key tokens of each KV tile. Each row lists its valid tokens
    first and is padded with the sentinel ``seq_q`` (resp. ``seq_k``), so ``token < seq`` is the
    bounds test a kernel already does for contiguous tiles. CSR, ``partial`` and :meth:`transposed`
    mean what they mean for :class:`BlockSchedule`, over these tile ids. A plain
    :class:`BlockSchedule` is the special case ``q_tokens[m] = m*block_m + arange(block_m)``.
    """

    q_tokens: torch.Tensor | None = None
    kv_tokens: torch.Tensor | None = None

    def _index_tensors(self) -> list[tuple[str, torch.Tensor, tuple[int, int] | None]]:
        if self.num_heads_sched != 1:
            raise ValueError(f"schedule: a TiledSchedule must be shared by every batch*head (1 head slice), got "
                             f"{self.num_heads_sched} head slices")
        for name in ("q_tokens", "kv_tokens"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor) or t.dim() != 2:
                raise ValueError(f"schedule.{name}: expected a contiguous int32 tensor (tiles, block), got "
                                 f"{tuple(getattr(t, 'shape', ()))}")
        return super()._index_tensors() + [("q_tokens", self.q_tokens, (self.num_q_tiles, self.block_m)),
                                           ("kv_tokens", self.kv_tokens, (self.num_kv_tiles, self.block_n))]

    def _token_flags(self) -> list[torch.Tensor]:
        """Per table: a valid token after padding, and the valid tokens not a permutation of [0, seq).
        The kernels write each output row from the one tile that holds it."""
        flags = []
        for tok, seq in ((self.q_tokens, self.seq_q), (self.kv_tokens, self.seq_k)):
            valid = tok < seq
            counts = torch.bincount(torch.where(valid, tok, seq).clamp(min=0).reshape(-1).long(), minlength=seq + 1)
            flags += [(valid[:, 1:] & ~valid[:, :-1]).any() | (tok < 0).any() | (tok > seq).any(),
                      (counts[:seq] != 1).any()]
        return flags

    def _check_token_flags(self, flags: list[bool]) -> None:
        for i, (name, seq) in enumerate((("q_tokens", self.seq_q), ("kv_tokens", self.seq_k))):
            if flags[2 * i] or flags[2 * i + 1]:
                raise ValueError(f"schedule.{name}: expected each row to list its tokens first, padded with {seq}, "
                                 f"and the tiles to hold every token of [0, {seq}) exactly once")

    @property
    def num_q_tiles(self) -> int:
        return self.q_tokens.shape[0]

    @property
    def num_kv_tiles(self) -> int:
        return self.kv_tokens.shape[0]

    @classmethod
    def from_visits(cls, q_tokens: torch.Tensor, kv_tokens: torch.Tensor, seq_q: int, seq_k: int,
                    q_ids: torch.Tensor, kv_ids: torch.Tensor, partial: torch.Tensor, **extra) -> "TiledSchedule":
        """Build from a list of visits ``(q_ids[e], kv_ids[e], partial[e])`` (any order, no repeats),
        shared by every batch*head. ``extra``: further dataclass fields of a subclass."""
        nq, nk = q_tokens.shape[0], kv_tokens.shape[0]
        dev = q_tokens.device
        q_ids, kv_ids = q_ids.to(dev, torch.int64), kv_ids.to(dev, torch.int64)
        order = torch.argsort(q_ids * max(nk, 1) + kv_ids)
        q_ids, kv_ids, partial = q_ids[order], kv_ids[order], partial.to(dev)[order]
        counts = torch.bincount(q_ids, minlength=nq)
        kv_ptr = torch.zeros(1, nq + 1, dtype=torch.int32, device=dev)
        kv_ptr[0, 1:] = torch.cumsum(counts, 0)
        n = max(kv_ids.numel(), 1)
        kv_idx = torch.zeros(1, n, dtype=torch.int32, device=dev)
        part = torch.zeros(1, n, dtype=torch.int32, device=dev)
        kv_idx[0, :kv_ids.numel()] = kv_ids.to(torch.int32)
        part[0, :kv_ids.numel()] = partial.to(torch.int32)
        return cls(q_tokens.shape[1], kv_tokens.shape[1], seq_q, seq_k, kv_ptr, kv_idx, part,
                   q_tokens=q_tokens.to(torch.int32).contiguous(), kv_tokens=kv_tokens.to(torch.int32).contiguous(),
                   **extra)

    def visits(self, h: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q_tile, kv_tile, partial) int64/int64/bool of every visit of head slice ``h``, CSR order."""
        ptr = self.kv_ptr[h].long()
        n = int(ptr[-1])
        rows = torch.repeat_interleave(torch.arange(self.num_q_tiles, device=ptr.device), ptr[1:] - ptr[:-1])
        return rows, self.kv_idx[h, :n].long(), self.partial[h, :n].bool()

    def transposed(self) -> "TiledSchedule":
        """The same visits as CSR over KV tiles (a plain TiledSchedule with q/kv roles swapped)."""
        if self._transposed is None:
            if self.num_heads_sched != 1:
                raise NotImplementedError("TiledSchedule.transposed: one shared head slice only")
            qt, kt, par = self.visits()
            self._transposed = TiledSchedule.from_visits(self.kv_tokens, self.q_tokens, self.seq_k, self.seq_q,
                                                         kt, qt, par)
        return self._transposed

    @property
    def computed_pairs(self) -> int:
        """Query-key token pairs inside the visited tiles (padding slots not counted)."""
        qn = (self.q_tokens < self.seq_q).sum(1)
        kn = (self.kv_tokens < self.seq_k).sum(1)
        return sum(int((qn[q] * kn[k]).sum()) for q, k, _ in (self.visits(h) for h in range(self.num_heads_sched)))

    @property
    def slot_pairs(self) -> int:
        """block_m * block_n per visited tile: what a GPU kernel computes, padding included."""
        return self.visited_tiles * self.block_m * self.block_n

    def element_mask(self, mask: ElementMask | None = None) -> torch.Tensor:
        """Visibility ``(H_s, seq_q, seq_k)`` implied by the visited tiles and the element mask."""
        out = torch.zeros(self.num_heads_sched, self.seq_q + 1, self.seq_k + 1, dtype=torch.bool,
                          device=self.kv_ptr.device)
        elem = None
        if mask is not None and mask.kind != MASK_NONE:
            elem = torch.zeros(self.seq_q + 1, self.seq_k + 1, dtype=torch.bool, device=out.device)
            elem[: self.seq_q, : self.seq_k] = mask.dense(self.seq_q, self.seq_k, out.device)
        qtok, ktok = self.q_tokens.long(), self.kv_tokens.long()
        for h in range(self.num_heads_sched):
            qt, kt, par = self.visits(h)
            rows = qtok[qt][:, :, None].expand(-1, -1, self.block_n)
            cols = ktok[kt][:, None, :].expand(-1, self.block_m, -1)
            vis = torch.ones_like(rows, dtype=torch.bool)
            if elem is not None:
                vis = ~par[:, None, None] | elem[rows, cols]
            out[h][rows[vis], cols[vis]] = True
        return out[:, : self.seq_q, : self.seq_k]

    def to(self, device: torch.device | str) -> "TiledSchedule":
        new = copy.copy(self)
        for name in ("kv_ptr", "kv_idx", "partial", "q_tokens", "kv_tokens"):
            setattr(new, name, getattr(self, name).to(device))
        new._transposed = None
        return new
