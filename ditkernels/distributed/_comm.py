"""The one door to torch.distributed for ``ditkernels.distributed``: every collective of the package goes
through these functions, which count the bytes each rank hands to other ranks.

API (small on purpose; part of the package's internals, used by every distributed function and the bench):

- :func:`all_to_all` -- ``dist.all_to_all_single`` with split sizes along dim 0.
- :func:`all_gather` -- ``dist.all_gather_into_tensor`` (``all_gather_single`` on torch >= 2.13).
- :func:`all_reduce` -- ``dist.all_reduce``.
- :func:`exchange` -- point-to-point sends and receives in one ``dist.batch_isend_irecv``; peers are
  ranks *of the group* (converted to global ranks here, as ``P2POp`` needs); returns a :class:`Pending`
  whose ``wait()`` waits on every work object (gloo returns one per op).
- :func:`count` -- a context manager that records, on this rank, every call made inside it:
  ``with count() as c: ...; c.sent`` (bytes), ``c.calls`` (list of :class:`Call`).

Bytes sent, per call, counted from the tensors handed to the collective:
all-to-all: the input minus the chunk a rank keeps for itself; all-gather: the input times ``P - 1`` (every
other rank receives it); all-reduce: the input times ``2 (P - 1) / P`` (a ring all-reduce's traffic);
exchange: the sum of the send tensors. The validation exchange of ``_check`` (a few hundred bytes of
shapes and options) is not counted.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence

import torch
import torch.distributed as dist


@dataclasses.dataclass
class Call:
    kind: str        # "all_to_all", "all_gather", "all_reduce", "exchange"
    sent: int        # bytes this rank sent to other ranks in this call


@dataclasses.dataclass
class Counter:
    calls: list[Call] = dataclasses.field(default_factory=list)

    @property
    def sent(self) -> int:
        """Total bytes this rank sent inside the ``count()`` block."""
        return sum(c.sent for c in self.calls)


_counters: list[Counter] = []


@contextlib.contextmanager
def count() -> Iterator[Counter]:
    """Record the bytes this rank sends in every collective of ``ditkernels.distributed`` inside the block
    (nested blocks each see the calls made inside them)."""
    c = Counter()
    _counters.append(c)
    try:
        yield c
    finally:
        _counters.remove(c)


def _record(kind: str, sent: int) -> None:
    for c in _counters:
        c.calls.append(Call(kind, int(sent)))


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def world(group: dist.ProcessGroup | None) -> tuple[int, int]:
    """(rank in the group, group size)."""
    return dist.get_rank(group), dist.get_world_size(group)


def all_to_all(out: torch.Tensor, inp: torch.Tensor, out_splits: Sequence[int], in_splits: Sequence[int],
               group: dist.ProcessGroup | None) -> None:
    """``out``/``inp`` contiguous, split along dim 0 into one chunk per rank of the group (rank order)."""
    rank, _ = world(group)
    row = nbytes(inp) // max(inp.shape[0], 1)
    _record("all_to_all", row * (sum(in_splits) - in_splits[rank]))
    dist.all_to_all_single(out, inp, list(out_splits), list(in_splits), group=group)


def all_gather(out: torch.Tensor, inp: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    """``out``: ``P`` copies of ``inp``'s size, concatenated along dim 0 in rank order."""
    _, size = world(group)
    _record("all_gather", nbytes(inp) * (size - 1))
    # all_gather_into_tensor is named all_gather_single from torch 2.13 on (the old name warns)
    gather_fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    gather_fn(out, inp, group=group)


def all_reduce(t: torch.Tensor, group: dist.ProcessGroup | None) -> None:
    """In-place sum over the group."""
    _, size = world(group)
    _record("all_reduce", nbytes(t) * 2 * (size - 1) // size)
    dist.all_reduce(t, group=group)


class Pending:
    """The work objects of one :func:`exchange`; ``wait()`` waits on every one of them."""

    def __init__(self, works: list) -> None:
        self._works = works

    def wait(self) -> None:
        for w in self._works:
            w.wait()
        self._works = []


def exchange(sends: Sequence[tuple[torch.Tensor, int]], recvs: Sequence[tuple[torch.Tensor, int]],
             group: dist.ProcessGroup | None, *, wait: bool = True) -> Pending:
    """Post every send ``(tensor, peer)`` and receive ``(tensor, peer)`` at once (peers: ranks of ``group``).
    Empty tensors are skipped (a zero-size message is no message). With ``wait=False`` the transfers run in
    the background until ``Pending.wait()``."""
    ops = []
    for t, peer in sends:
        if t.numel():
            ops.append(dist.P2POp(dist.isend, t, _global(peer, group), group))
    for t, peer in recvs:
        if t.numel():
            ops.append(dist.P2POp(dist.irecv, t, _global(peer, group), group))
    _record("exchange", sum(nbytes(t) for t, _ in sends))
    pending = Pending(dist.batch_isend_irecv(ops) if ops else [])
    if wait:
        pending.wait()
    return pending


def _global(peer: int, group: dist.ProcessGroup | None) -> int:
    return peer if group is None else dist.get_global_rank(group, peer)
