"""Multi-direction selective scans over 2-D token grids (docs/spec.md §4), for VMamba / LaMamba-style blocks.

A *direction* is an order in which a scan visits the ``H*W`` tokens of a grid stored row-major
(token ``y*W + x``). ``K`` directions run as ONE :func:`~ditkernels.selective_scan` call through its
group dimension: the ``K`` orderings of ``u (batch, dim, H, W)`` are stacked into
``(batch, K*dim, L)`` channels (direction ``k`` owns channels ``k*dim : (k+1)*dim``), the per-direction
``B``/``C`` become the ``(batch, K, N, L)`` groups (channel ``c`` uses group ``c // dim == k``), and
``A``, ``D``, ``delta_bias`` are ``(K*dim, ...)``. The ``K`` outputs are then put back in grid order
and summed (or returned per direction).

Directions (:data:`DIRECTIONS`), on a grid (H, W), with ``rev`` the same path walked backwards:

- ``raster`` / ``raster_rev``: row by row, left to right (the row-major order itself).
- ``transpose`` / ``transpose_rev``: column by column, top to bottom (column-major).
- ``snake`` / ``snake_rev``: boustrophedon rows: even rows left to right, odd rows right to left.
- ``snake_transpose`` / ``snake_transpose_rev``: boustrophedon columns: even columns top to bottom,
  odd columns bottom to top.

Cost of the reordering. Every direction is a permutation of the L tokens, described by an int64
index ``order (K, L)`` and its inverse, built once and cached per ``(H, W, directions, device)``
(K*L*16 bytes; :func:`scan_orders`). Then

- :func:`split_directions` (grid -> K sequences) is ONE ``torch.gather`` that reads the input
  through a stride-0 view over K and writes the ``(batch, K, C, L)`` result contiguously, i.e. it is
  already the ``(batch, K*C, L)`` layout the scan wants: one pass, ``K * batch*C*L`` elements written,
  no index tensor larger than ``(K, L)`` (the gather index is a stride-0 view as well).
- :func:`merge_directions` (K sequences -> grid) is ONE ``torch.gather`` with the inverse orders,
  followed for ``merge="sum"`` by a sum over K (a ``K * batch*C*L`` temporary).
- The two are each other's adjoints, and their backwards are written that way: the gradient of a
  split is a merge-sum and the gradient of a merge is a split (gathers only; no zero-fill and no
  scatter-add, so no atomics and deterministic on every device). Reversed directions are
  permutations like the others, so one call can mix forward and reversed directions.

:func:`multi_direction_scan` takes every input in grid order and does: one split per grid-order
input (u, delta, z, variable B/C), one selective scan, one merge. A module that computes delta/B/C
from the reordered ``u`` itself (as :class:`ditkernels.nn.SS2D` does, like VMamba) needs only the
split of ``u``: use :func:`split_directions`, :func:`~ditkernels.selective_scan` and
:func:`merge_directions` directly.

The gathers are separate torch ops, not fused into the scan kernels (which would read ``u`` through
the order index directly and save the split's write and the merge's temporary). Under
``torch.compile`` the index tensors are built inside the graph (constants after compilation) and
the whole function traces without graph breaks.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from .._validate import check_grid_hw
from .selective_scan import selective_scan

DIRECTIONS = ("raster", "raster_rev", "transpose", "transpose_rev",
              "snake", "snake_rev", "snake_transpose", "snake_transpose_rev")
# VMamba's cross-scan order (SS2D with K=4): row-major, column-major, then both reversed.
VMAMBA_DIRECTIONS = ("raster", "transpose", "raster_rev", "transpose_rev")
MERGES = ("sum", "stack")


# --------------------------------------------------------------------------------------------------
# Validation.

def check_directions(directions: object) -> tuple[str, ...]:
    """``directions`` (one name or a non-empty sequence of names from :data:`DIRECTIONS`) as a tuple."""
    if isinstance(directions, str):
        directions = (directions,)
    if not isinstance(directions, Sequence) or len(directions) == 0:
        raise TypeError(f"directions: expected a non-empty sequence of names from {DIRECTIONS}, got {directions!r}")
    for d in directions:
        if d not in DIRECTIONS:
            raise ValueError(f"directions: unknown direction {d!r}; expected names from {DIRECTIONS}")
    return tuple(directions)


def _check_merge(merge: object) -> str:
    if merge not in MERGES:
        raise ValueError(f"merge: expected one of {MERGES}, got {merge!r}")
    return merge


# --------------------------------------------------------------------------------------------------
# Orders (cached index tensors).

def _order(H: int, W: int, direction: str) -> torch.Tensor:
    grid = torch.arange(H * W).view(H, W)
    base = direction.removesuffix("_rev")
    if base in ("transpose", "snake_transpose"):
        grid = grid.t()
    if base.startswith("snake"):
        grid = grid.clone()
        grid[1::2] = grid[1::2].flip(-1)
    order = grid.reshape(-1)
    return order.flip(0) if direction.endswith("_rev") else order


def _build_orders(H: int, W: int, directions: tuple[str, ...],
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(order, inverse), both (K, L) int64 on ``device``: ``inverse[k, order[k, t]] == t``."""
    order = torch.stack([_order(H, W, d) for d in directions])
    inverse = torch.empty_like(order).scatter_(1, order, torch.arange(H * W).expand_as(order).contiguous())
    return order.to(device), inverse.to(device)


_cached_orders = functools.lru_cache(maxsize=256)(_build_orders)


def _orders(H: int, W: int, directions: tuple[str, ...], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if torch.compiler.is_compiling():
        # Traced into the graph, where the compiler turns them into constants; a cache lookup there
        # would only be ignored by Dynamo (with a warning).
        return _build_orders(H, W, directions, device)
    return _cached_orders(H, W, directions, device)


def scan_orders(grid: tuple[int, int], directions: Sequence[str] | str = VMAMBA_DIRECTIONS,
                device: torch.device | str | None = None) -> torch.Tensor:
    """The visiting orders: ``orders[k, t]`` is the row-major grid token visited at step t of direction k.

    Returns a cached (K, H*W) int64 tensor on ``device`` (default CPU); treat it as read-only.
    """
    H, W = check_grid_hw(grid)
    return _orders(H, W, check_directions(directions), torch.device(device or "cpu"))[0]


# --------------------------------------------------------------------------------------------------
# The reordering: one gather each way; split and merge are each other's adjoints.

class _DirectionGather(torch.autograd.Function):
    """``out[b, k, c, t] = x[b, k, c, index[k, t]]`` for x (batch, K, C, L), K possibly a stride-0 view.

    ``index`` is a permutation per k and ``inverse`` its inverse, so the gradient is the same gather
    with the two swapped (autograd then sums it over K where x was expanded).
    """

    @staticmethod
    def forward(x: torch.Tensor, index: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
        return torch.gather(x, 3, index[None, :, None, :].expand(x.shape))

    @staticmethod
    def setup_context(ctx, inputs, output):
        _, index, inverse = inputs
        ctx.save_for_backward(index, inverse)

    @staticmethod
    def backward(ctx, grad):
        index, inverse = ctx.saved_tensors
        return _DirectionGather.apply(grad, inverse, index), None, None


def _spatial(name: str, x: torch.Tensor, grid: tuple[int, int] | None, lead: int) -> tuple[int, int]:
    """The grid of x (``lead`` leading dims, then (H, W) or (L,)); checks it against ``grid``."""
    spatial = tuple(x.shape[lead:])
    if len(spatial) == 2:
        hw = spatial
        if grid is not None and check_grid_hw(grid) != hw:
            raise ValueError(f"grid: {tuple(grid)} does not match the (H, W) = {hw} of {name} (shape {tuple(x.shape)})")
        return hw
    if grid is None:
        raise ValueError(f"grid: required when {name} is flattened over the grid (shape {tuple(x.shape)})")
    H, W = check_grid_hw(grid)
    if spatial[0] != H * W:
        raise ValueError(f"{name}: expected L = H*W = {H * W} tokens for grid {(H, W)}, got shape {tuple(x.shape)}")
    return H, W


def _split(x: torch.Tensor, K: int, order: torch.Tensor, inverse: torch.Tensor) -> torch.Tensor:
    """x (batch, C, L) shared or (batch, K, C, L) per direction, grid order -> (batch, K, C, L) direction order."""
    if x.dim() == 3:
        x = x.unsqueeze(1).expand(-1, K, -1, -1)
    return _DirectionGather.apply(x, order, inverse)


def split_directions(x: torch.Tensor, grid: tuple[int, int] | None = None,
                     directions: Sequence[str] | str = VMAMBA_DIRECTIONS) -> torch.Tensor:
    """Grid -> K scan sequences, stacked along channels as :func:`~ditkernels.selective_scan` wants them.

    x: (batch, C, H, W), or (batch, C, L) with ``grid=(H, W)``, L = H*W row-major.
    Returns (batch, K*C, L): channels ``k*C : (k+1)*C`` hold x in the order of ``directions[k]``.
    One gather (see the module docstring for the cost); differentiable.
    """
    if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4):
        raise ValueError(f"x: expected a (batch, C, H, W) or (batch, C, L) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
    H, W = _spatial("x", x, grid, 2)
    directions = check_directions(directions)
    order, inverse = _orders(H, W, directions, x.device)
    K = len(directions)
    b, c = x.shape[:2]
    return _split(x.reshape(b, c, H * W), K, order, inverse).view(b, K * c, H * W)


def merge_directions(y: torch.Tensor, grid: tuple[int, int],
                     directions: Sequence[str] | str = VMAMBA_DIRECTIONS, merge: str = "sum") -> torch.Tensor:
    """K scan sequences -> grid order: the inverse of :func:`split_directions`.

    y: (batch, K*C, L) (channels ``k*C : (k+1)*C`` in the order of ``directions[k]``) or (batch, K, C, L).
    Returns (batch, C, L) summed over directions for ``merge="sum"``, (batch, K, C, L) per direction for
    ``merge="stack"``; row-major over ``grid``. One gather (+ the sum); differentiable.
    """
    H, W = check_grid_hw(grid)
    directions = check_directions(directions)
    merge = _check_merge(merge)
    K, L = len(directions), H * W
    if not isinstance(y, torch.Tensor) or y.dim() not in (3, 4) or y.shape[-1] != L or (
            y.dim() == 3 and y.shape[1] % K) or (y.dim() == 4 and y.shape[1] != K):
        raise ValueError(f"y: expected (batch, K*C, L) or (batch, K, C, L) with K={K}, L={L}, got "
                         f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
    order, inverse = _orders(H, W, directions, y.device)
    if y.dim() == 3:
        y = y.reshape(y.shape[0], K, y.shape[1] // K, L)
    out = _DirectionGather.apply(y, inverse, order)
    return out.sum(1) if merge == "sum" else out


# --------------------------------------------------------------------------------------------------
# The multi-direction scan.

def _check_tensor(name: str, t: object, ndims: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() not in ndims:
        want = " or ".join(f"{n}-D" for n in ndims)
        raise ValueError(f"{name}: expected a {want} tensor, got shape {tuple(t.shape)}")
    if t.device != like.device:
        raise ValueError(f"{name}: expected device {like.device} (the device of u), got {t.device}")
    return t


def multi_direction_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                         D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                         delta_bias: torch.Tensor | None = None, delta_softplus: bool = False, *,
                         grid: tuple[int, int] | None = None,
                         directions: Sequence[str] | str = VMAMBA_DIRECTIONS, merge: str = "sum",
                         backend: str | None = None) -> torch.Tensor:
    """Selective scans of a token grid in K directions, run as one :func:`~ditkernels.selective_scan` call.

    Every tensor is in grid order. ``S`` below is ``(H, W)``, or ``(L,)`` with ``grid=(H, W)`` and
    L = H*W row-major; ``K = len(directions)``. A tensor marked "shared or per direction" is either
    shared by all directions or carries a direction axis K after the batch:

    u: (batch, dim, *S).
    delta, z: shared (batch, dim, *S) or per direction (batch, K, dim, *S); u's dtype.
    A: (dim, N) shared or (K*dim, N) per direction (rows ``k*dim : (k+1)*dim`` for ``directions[k]``,
    VMamba's ``A_logs`` layout). D, delta_bias: (dim,) or (K*dim,), likewise.
    B, C: variable, shared (batch, N, *S) or per direction (batch, K, N, *S); or constant (dim, N) /
    (K*dim, N).
    directions: names from :data:`DIRECTIONS` (default VMamba's four, :data:`VMAMBA_DIRECTIONS`).
    merge: ``"sum"`` returns (batch, dim, *S), the sum of the K scans back in grid order;
    ``"stack"`` returns (batch, K, dim, *S), each direction's output in grid order.
    backend, delta_softplus: as :func:`~ditkernels.selective_scan`; dtypes follow its rules.

    Direction k computes ``selective_scan`` over the tokens in the order of ``directions[k]`` with its
    own parameters; the result equals a loop of K separate scans (tested), at the cost of one gather
    per grid-order input and one gather for the output (module docstring).
    """
    _check_tensor("u", u, (3, 4), u)
    directions = check_directions(directions)
    merge = _check_merge(merge)
    K = len(directions)
    H, W = _spatial("u", u, grid, 2)
    L = H * W
    batch, dim = u.shape[:2]
    S = tuple(u.shape[2:])
    order, inverse = _orders(H, W, directions, u.device)

    def sequences(name: str, t: torch.Tensor | None, channels: int, what: str,
                  optional: bool = False) -> torch.Tensor | None:
        """Shared (batch, c, *S) / per direction (batch, K, c, *S) -> (batch, K, c, L), direction order."""
        if t is None and optional:
            return None
        _check_tensor(name, t, (u.dim(), u.dim() + 1), u)
        shared, per = (batch, channels, *S), (batch, K, channels, *S)
        if tuple(t.shape) not in (shared, per):
            raise ValueError(f"{name}: expected shape {shared} (shared) or {per} (per direction, K={K}) "
                             f"with {what}, got {tuple(t.shape)}")
        lead = t.shape[:-len(S)]
        return _split(t.reshape(*lead, L), K, order, inverse)

    def channels(name: str, t: torch.Tensor | None, ndim: int, optional: bool = False) -> torch.Tensor | None:
        """(dim, ...) shared or (K*dim, ...) per direction -> (K*dim, ...)."""
        if t is None and optional:
            return None
        _check_tensor(name, t, (ndim,), u)
        if t.shape[0] == K * dim:
            return t
        if t.shape[0] == dim:
            return t.repeat(K, *([1] * (ndim - 1)))
        want = f"(dim={dim}, N) or (K*dim={K * dim}, N)" if ndim == 2 else f"(dim={dim},) or (K*dim={K * dim},)"
        raise ValueError(f"{name}: expected shape {want} with K={K} directions, got {tuple(t.shape)}")

    us = sequences("u", u, dim, f"dim={dim}").reshape(batch, K * dim, L)
    deltas = sequences("delta", delta, dim, f"dim={dim}")
    zs = sequences("z", z, dim, f"dim={dim}", optional=True)
    As = channels("A", A, 2)
    N = As.shape[1]
    Bs, Cs = [], []
    for name, X, out in (("B", B, Bs), ("C", C, Cs)):
        if isinstance(X, torch.Tensor) and X.dim() == 2:
            out.append(channels(name, X, 2))
            if out[0].shape[1] != N:
                raise ValueError(f"{name}: a constant {name} must have N={N} columns (as A), got {tuple(X.shape)}")
        else:
            out.append(sequences(name, X, N, f"N={N} (the state size of A)"))
    scanned = selective_scan(us, deltas.reshape(batch, K * dim, L), As, Bs[0], Cs[0],
                             channels("D", D, 1, optional=True), None if zs is None else zs.reshape(batch, K * dim, L),
                             channels("delta_bias", delta_bias, 1, optional=True), delta_softplus, backend=backend)
    out = merge_directions(scanned, (H, W), directions, merge)
    return out.reshape(batch, dim, *S) if merge == "sum" else out.reshape(batch, K, dim, *S)


__all__ = ["DIRECTIONS", "VMAMBA_DIRECTIONS", "multi_direction_scan", "split_directions", "merge_directions",
           "scan_orders"]
