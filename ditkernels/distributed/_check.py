"""Same-on-every-rank validation (docs/spec.md §7): a call that cannot run raises the same error on every
rank before any communication of data, instead of one rank raising while the others wait forever in a
collective.

Every distributed function validates its local arguments, catching its own ``ValueError`` / ``TypeError``,
then calls :func:`agree` (one small ``all_gather_object``), which every rank reaches:

- if any rank found an error, every rank raises it (the lowest failing rank's error, its type and message,
  naming that rank);
- else, if a value that must be equal on every rank (``same``: shapes, dtypes, options) differs, every
  rank raises a ``ValueError`` listing each rank's value;
- else it returns the per-rank values of ``each`` (e.g. local sequence lengths), in rank order.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch.distributed as dist


def agree(fn: str, err: BaseException | None, group: dist.ProcessGroup | None, *,
          same: Mapping[str, object] | None = None, each: object = None) -> list:
    size = dist.get_world_size(group)
    mine = (None if err is None else (type(err).__name__, str(err)), dict(same or {}), each)
    if size == 1:
        everyone = [mine]
    else:
        everyone = [None] * size
        dist.all_gather_object(everyone, mine, group=group)
    failed = [(r, e) for r, (e, _, _) in enumerate(everyone) if e is not None]
    if failed:
        r, (kind, msg) = failed[0]
        cls = TypeError if kind == "TypeError" else ValueError
        where = f"rank {r}" if size > 1 else ""
        more = f" (and {len(failed) - 1} other rank(s))" if len(failed) > 1 else ""
        raise cls(f"{fn}: {where}{more}{': ' if where else ''}{msg}")
    for key in mine[1]:
        vals = [s.get(key) for _, s, _ in everyone]
        if any(v != vals[0] for v in vals):
            listed = ", ".join(f"rank {r}: {v}" for r, v in enumerate(vals))
            raise ValueError(f"{fn}: {key} must be the same on every rank, got {listed}")
    return [e for _, _, e in everyone]
