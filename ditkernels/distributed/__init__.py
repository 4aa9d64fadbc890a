"""Sequence parallelism over ``torch.distributed`` (docs/spec.md §7).

Layout shared by every function: rank ``r`` of the group holds ``(batch, heads, num_prefix + its grid
tokens + num_suffix, head_dim)``: the global (text) tokens replicated on every rank, then its band of the
grid (``bands[r]`` rows, or frames, of the grid's first axis, row-major; default an even split). A plain
sequence is a 1-D grid. :func:`shard` / :func:`gather` convert between the full sequence and a rank's part.

- :func:`ulysses_attention`: two all-to-alls around any ditkernels attention op (heads split over ranks).
- :func:`ring_attention`: dense attention with key/value bands passed around the ring, partial results
  merged by log-sum-exp (:func:`merge_attention`), with backward.
- :func:`local_attention`: local-window attention by halo exchange.

Gradients of replicated inputs (the text tokens): each rank returns the gradient of its own copy, and the
total gradient is their sum over ranks (``dist.all_reduce`` it if every rank needs it). Replicated outputs
enter the loss once: the upstream gradients of a replicated output are summed over ranks.

Every function validates its arguments on every rank and agrees on the result before moving any data, so
a bad call raises the same error everywhere (``ditkernels/distributed/_check.py``). Collectives go through
``ditkernels/distributed/_comm.py``, which counts the bytes each rank sends (``_comm.count()``).

Importing this module imports ``torch.distributed``; ``import ditkernels`` does not.
"""

from __future__ import annotations

from ._layout import gather, shard
from .local import local_attention
from .merge import merge_attention
from .ring import ring_attention
from .ulysses import ulysses_attention

__all__ = ["shard", "gather", "merge_attention", "ulysses_attention", "ring_attention", "local_attention"]
