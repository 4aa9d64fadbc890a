"""Re-ttention: re-normalised sparse attention for diffusion sampling (docs/spec.md §3), on the flash core.

For a sparse key set ``S_i`` (a mask object: :class:`Band`, :class:`LocalWindow`, :class:`BlockTopK`),
``rho_i = sum_{j in S_i} exp(s_ij) / sum_j exp(s_ij) = exp(lse_S - lse_full)``.

- ``mode="full"``: dense attention (the first steps of a schedule); the cache is not touched.
- ``mode="refresh"``: ``out = full attention``; caches ``rho`` (float32) and ``R = out_full - rho * out_S``.
  Two passes of the core, neither with a ``seq x seq`` buffer: a dense pass (``out_full``, ``lse_full``)
  and a sparse pass over the mask's schedule (``out_S``, ``lse_S``); rho and R are element-wise.
- ``mode="sparse"``: ``out = rho_hat * out_S + R``, ``rho_hat = rho + drift * n`` (n: sparse steps since
  the refresh), clamped to at most 1 unless ``clamp=False`` (the released code does not clamp).
  ONE pass of the core: the sparse schedule + element mask, with the epilogue
  ``out = row_scale * out + residual`` fused into the store (``EPILOGUE_SCALE_RESIDUAL``).

Layers: mask objects -> (schedule, element mask) of the core -> backend ``flash_fwd`` ->
registered ops ``ditkernels::rettention_refresh`` / ``ditkernels::rettention_sparse`` (fake impls;
inference-only: their backward raises) -> :func:`rettention` with a :class:`ReCache` ->
:class:`ReStepper` (step counting over a :class:`ReSchedule`) -> ``ditkernels.nn.ReAttention``.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field, replace

import torch

from .. import _validate
from ..backends import DENSE_REFERENCE, has, resolve_for
from ..reference.rettention import (band_visible, rettention_refresh_ref, rettention_sparse_ref, rho_from_lse,
                                    rho_hat as _rho_hat)
from ..schedule import MASK_BAND, BlockSchedule, ElementMask, Epilogue

MODES = ("full", "refresh", "sparse")
DEFAULT_DRIFT = 0.04


# ================================================================================================
# Masks (the sparse set S)
# ================================================================================================
def _pos_int(name: str, x: object, minimum: int = 1) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < minimum:
        raise ValueError(f"{name}: expected an int >= {minimum}, got {x!r}")
    return x


@dataclass(frozen=True)
class Band:
    """Re-ttention's band mask: ``|i - j| <= width // 2`` over the raster sequence, edges not clamped.

    width: band width in tokens; default ``int(n / 32)`` (3.1 % density) with ``n`` the grid tokens
    of one frame (the whole sequence without globals and frames, as in the released PixArt code).
    frames: > 1 gives the per-frame band of the released CogVideoX code: grid token ``i`` at position
    ``f(i) = (i - num_prefix) % (n_grid / frames)`` of its frame sees key ``j`` iff
    ``|f(i) - f(j)| <= width // 2``, in every frame.
    num_prefix / num_suffix: global tokens (text) that see and are seen by every token.
    """

    width: int | None = None
    frames: int = 1
    num_prefix: int = 0
    num_suffix: int = 0

    def __post_init__(self):
        if self.width is not None:
            _pos_int("Band.width", self.width, 0)
        _pos_int("Band.frames", self.frames)
        _pos_int("Band.num_prefix", self.num_prefix, 0)
        _pos_int("Band.num_suffix", self.num_suffix, 0)
        _encode(self)

    def params(self, seq: int) -> tuple[int, int, int, int]:
        """(half, lo, hi, frame): the ``MASK_BAND`` parameters for a sequence of ``seq`` tokens."""
        lo, hi = self.num_prefix, seq - self.num_suffix
        n_grid = hi - lo
        if n_grid < 0:
            raise ValueError(f"Band: num_prefix + num_suffix = {self.num_prefix + self.num_suffix} exceeds seq={seq}")
        if n_grid % self.frames:
            raise ValueError(f"Band.frames: the {n_grid} grid tokens do not split into {self.frames} equal frames")
        frame_len = n_grid // self.frames
        width = int(frame_len / 32) if self.width is None else self.width
        return width // 2, lo, hi, frame_len if self.frames > 1 else 0


@dataclass(frozen=True)
class LocalWindow:
    """A 2-D/3-D local window (docs/spec.md §1) as the sparse set: ``LocalWindow(grid, window, **kwargs)`` with
    the options of :func:`ditkernels.local_attention` (``shape``, ``border``, ``tile``, ``num_prefix``,
    ``num_suffix``). Runs on the backends that run ``local_attention``."""

    grid: tuple[int, ...]
    window: int | tuple[int, ...]
    shape: str = "circle"
    border: str = "clip"
    tile: int | tuple[int, ...] | None = None
    num_prefix: int = 0
    num_suffix: int = 0

    def __post_init__(self):
        object.__setattr__(self, "grid", tuple(self.grid) if isinstance(self.grid, (list, tuple)) else self.grid)
        if isinstance(self.window, list):
            object.__setattr__(self, "window", tuple(self.window))
        if isinstance(self.tile, list):
            object.__setattr__(self, "tile", tuple(self.tile))
        self.spec()  # validates
        _encode(self)

    def spec(self):
        from ..reference.local import LocalSpec

        return LocalSpec.make(self.grid, self.window, shape=self.shape, border=self.border, tile=self.tile,
                              num_prefix=self.num_prefix, num_suffix=self.num_suffix)


@dataclass(frozen=True)
class BlockTopK:
    """Block top-k (docs/spec.md §2) as the sparse set, selected from the q, k of each step: each query block
    keeps its ``topk`` best key blocks (``ceil(density * num_key_blocks)``), its diagonal block and the
    blocks of global tokens."""

    topk: int | None = None
    density: float | None = None
    block_size: tuple[int, int] = (64, 64)
    num_prefix: int = 0
    num_suffix: int = 0

    def __post_init__(self):
        object.__setattr__(self, "block_size", tuple(self.block_size))
        if (self.topk is None) == (self.density is None):
            raise ValueError(f"BlockTopK: give exactly one of topk / density, got topk={self.topk!r}, "
                             f"density={self.density!r}")
        if self.topk is not None:
            _pos_int("BlockTopK.topk", self.topk)
        if self.density is not None and not (isinstance(self.density, (int, float)) and 0 < self.density <= 1):
            raise ValueError(f"BlockTopK.density: expected a float in (0, 1], got {self.density!r}")
        if len(self.block_size) != 2:
            raise ValueError(f"BlockTopK.block_size: expected (block_q, block_k), got {self.block_size!r}")
        for b in self.block_size:
            _pos_int("BlockTopK.block_size", b)
        _encode(self)


Mask = Band | LocalWindow | BlockTopK
_MASK_TYPES = {"band": Band, "local": LocalWindow, "topk": BlockTopK}


def _encode(mask: Mask) -> str:
    """The mask as a string argument of the registered ops (torch.library takes no Python objects).
    Computed once per mask object (a constant attribute, so torch.compile reads it without tracing)."""
    code = getattr(mask, "_code", None)
    if code is None:
        kind = next((kind for kind, cls in _MASK_TYPES.items() if type(mask) is cls), None)
        if kind is None:
            raise TypeError(f"mask: expected ditkernels.Band, LocalWindow or BlockTopK, got {type(mask).__name__}")
        code = json.dumps({"kind": kind, **asdict(mask)}, sort_keys=True)
        object.__setattr__(mask, "_code", code)
    return code


@functools.lru_cache(maxsize=64)
def _decode(text: str) -> Mask:
    d = json.loads(text)
    cls = _MASK_TYPES[d.pop("kind")]
    return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


_DEFAULT_BAND = Band()


def _intervals(seq: int, block: int, lo: int, hi: int, frame: int):
    """Per tile of ``block`` tokens: (has_global, has_grid, [(lo, hi, ok)] * 2) -- the band coordinates
    ``f`` of its grid tokens as at most two intervals (a tile that wraps around a frame has two)."""
    t0 = torch.arange(0, seq, block, dtype=torch.int64)
    t1 = torch.clamp(t0 + block, max=seq) - 1
    has_global = (t0 < lo) | (t1 >= hi)
    g0, g1 = torch.clamp(t0, min=lo), torch.clamp(t1, max=hi - 1)
    has_grid = g0 <= g1
    f0, f1 = g0 - lo, g1 - lo
    if frame > 0:
        whole = (g1 - g0 + 1) >= frame
        s, e = f0 % frame, f1 % frame
        wrap = ~whole & (s > e)
        a = (torch.where(whole, 0, s), torch.where(whole | wrap, frame - 1, e), has_grid)
        b = (torch.zeros_like(s), e, has_grid & wrap)
    else:
        a = (f0, f1, has_grid)
        b = (f0, f1, torch.zeros_like(has_grid))
    return has_global, has_grid, (a, b)


@functools.lru_cache(maxsize=32)
def _band_schedule_cpu(seq: int, block_m: int, block_n: int, half: int, lo: int, hi: int,
                       frame: int) -> BlockSchedule:
    qg, qgrid, qi = _intervals(seq, block_m, lo, hi, frame)
    kg, kgrid, ki = _intervals(seq, block_n, lo, hi, frame)
    exists = torch.zeros(qg.numel(), kg.numel(), dtype=torch.bool)
    full = (qgrid[:, None] & kgrid[None, :])
    for a_lo, a_hi, a_ok in qi:
        for b_lo, b_hi, b_ok in ki:
            a_lo_, a_hi_, b_lo_, b_hi_ = a_lo[:, None], a_hi[:, None], b_lo[None, :], b_hi[None, :]
            both = a_ok[:, None] & b_ok[None, :]
            dmin = torch.clamp(torch.maximum(b_lo_ - a_hi_, a_lo_ - b_hi_), min=0)
            dmax = torch.maximum(b_hi_ - a_lo_, a_hi_ - b_lo_)
            exists |= both & (dmin <= half)
            full &= ~both | (dmax <= half)
    visited = qg[:, None] | kg[None, :] | exists
    full = full | ~qgrid[:, None] | ~kgrid[None, :]  # a tile of global queries (keys) only sees everything
    return BlockSchedule.from_tile_mask(visited, block_m, block_n, seq, seq, visited & ~full)


def band_schedule(seq: int, block_m: int, block_n: int, half: int, lo: int = 0, hi: int | None = None,
                  frame: int = 0, device: torch.device | str = "cpu") -> BlockSchedule:
    """The :class:`BlockSchedule` of a band mask (``MASK_BAND`` params ``(half, lo, hi, frame)``):
    contiguous tiles of ``block_m`` queries x ``block_n`` keys, the tiles that hold a visible pair,
    *partial* where some in-bounds pair of the tile is not visible (the band's edges). Shared by every
    batch*head. Its element mask is ``ElementMask(MASK_BAND, (half, lo, hi, frame))``."""
    hi = seq if hi is None else hi
    return _band_schedule_cpu(seq, block_m, block_n, half, lo, hi, frame).on(device)


def _check_self(q: torch.Tensor, k: torch.Tensor, what: str) -> None:
    if q.shape[2] != k.shape[2]:
        raise ValueError(f"mask: {what} is defined for self-attention (seq_q == seq_k), got seq_q={q.shape[2]}, "
                         f"seq_k={k.shape[2]}")


def _block_topk(mask: BlockTopK, q: torch.Tensor, k: torch.Tensor, scale: float, backend: str) -> BlockSchedule:
    from .sparse import block_topk_schedule

    return block_topk_schedule(q, k, topk=mask.topk, density=mask.density, block_size=mask.block_size,
                               num_prefix=mask.num_prefix, num_suffix=mask.num_suffix, scale=scale,
                               backend=backend)


def sparse_plan(mask: Mask, q: torch.Tensor, k: torch.Tensor, scale: float,
                mod) -> tuple[BlockSchedule, ElementMask | None]:
    """(schedule, element mask) of the sparse set ``mask`` for backend module ``mod`` and inputs q, k."""
    if isinstance(mask, Band):
        _check_self(q, k, "the band")
        half, lo, hi, frame = mask.params(q.shape[2])
        bm, bn = mod.block_sizes(q.shape[-1], q.dtype)
        sched = band_schedule(q.shape[2], bm, bn, half, lo, hi, frame, q.device)
        return sched, ElementMask(MASK_BAND, (half, lo, hi, frame))
    if isinstance(mask, LocalWindow):
        from .local import kernel_plan

        spec = mask.spec()
        _check_local_seq(spec, q, k)
        plan = kernel_plan(spec, mod, q.shape[-1], q.dtype)
        return plan.on(q.device), plan.mask
    return _block_topk(mask, q, k, scale, mod.NAME), None  # the selection runs on the same backend


def dense_visible(mask: Mask, q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """The sparse set as a bool matrix broadcastable to (batch, heads, seq_q, seq_k) (reference only)."""
    if isinstance(mask, Band):
        _check_self(q, k, "the band")
        return band_visible(q.shape[2], k.shape[2], *mask.params(q.shape[2]), device=q.device)
    if isinstance(mask, LocalWindow):
        from ..reference.local import local_visible

        spec = mask.spec()
        _check_local_seq(spec, q, k)
        return local_visible(spec, q.device)
    sched = _block_topk(mask, q, k, scale, "reference")
    vis = sched.element_mask().to(q.device)
    return vis.reshape(q.shape[0], q.shape[1], *vis.shape[1:]) if vis.shape[0] != 1 else vis[0]


def _check_local_seq(spec, q: torch.Tensor, k: torch.Tensor) -> None:
    for name, t in (("q", q), ("k", k)):
        if t.shape[2] != spec.seq:
            raise ValueError(f"{name}: LocalWindow expects seq = num_prefix + prod(grid) + num_suffix = {spec.seq}, "
                             f"got shape {tuple(t.shape)}")


# ================================================================================================
# Registered ops
# ================================================================================================
def _backend(q: torch.Tensor, backend: str):
    return resolve_for("rettention", q, backend, head_dim=q.shape[-1])


@torch.library.custom_op("ditkernels::rettention_refresh", mutates_args=())
def rettention_refresh(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: str, scale: float,
                       backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out_full (B, H, Sq, D) q.dtype, rho (B, H, Sq) float32, residual (B, H, Sq, D) q.dtype)."""
    m = _decode(mask)
    mod = _backend(q, backend)
    if has(mod, DENSE_REFERENCE):
        return rettention_refresh_ref(q, k, v, dense_visible(m, q, k, scale), scale)
    sched, emask = sparse_plan(m, q, k, scale, mod)
    out, lse_full = mod.flash_fwd(q, k, v, scale=scale)
    out_s, lse_s = mod.flash_fwd(q, k, v, scale=scale, schedule=sched, mask=emask)
    rho = rho_from_lse(lse_s, lse_full)
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    residual = (out.to(acc) - rho.to(acc)[..., None] * out_s.to(acc)).to(q.dtype)
    return out, rho, residual


@rettention_refresh.register_fake
def _(q, k, v, mask, scale, backend):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32), q.new_empty(q.shape)


@torch.library.custom_op("ditkernels::rettention_sparse", mutates_args=())
def rettention_sparse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, row_scale: torch.Tensor,
                      residual: torch.Tensor, mask: str, scale: float, backend: str) -> torch.Tensor:
    """``row_scale * out_S + residual`` (B, H, Sq, D) in q.dtype: one sparse pass with the epilogue."""
    m = _decode(mask)
    mod = _backend(q, backend)
    if has(mod, DENSE_REFERENCE):
        return rettention_sparse_ref(q, k, v, dense_visible(m, q, k, scale), scale, row_scale, residual)
    sched, emask = sparse_plan(m, q, k, scale, mod)
    out, _ = mod.flash_fwd(q, k, v, scale=scale, schedule=sched, mask=emask,
                           epilogue=Epilogue(row_scale.to(torch.float32), residual))
    return out


@rettention_sparse.register_fake
def _(q, k, v, row_scale, residual, mask, scale, backend):
    return q.new_empty(q.shape)


def _no_backward(ctx, *grads):
    raise NotImplementedError(
        "ditkernels.rettention: the refresh and sparse steps of Re-ttention are inference-only and have no "
        "backward; run the sampler under torch.no_grad() / torch.inference_mode(), or use mode='full' "
        "(dense attention, differentiable) where gradients are needed")


def _no_context(ctx, inputs, output):
    pass


rettention_refresh.register_autograd(_no_backward, setup_context=_no_context)
rettention_sparse.register_autograd(_no_backward, setup_context=_no_context)


# ================================================================================================
# The cache and the functional API
# ================================================================================================
@dataclass
class ReCache:
    """State of one attention layer between denoising steps.

    rho: (batch, heads, seq) float32 (None before the first refresh); residual: (batch, heads, seq,
    head_dim) in the input dtype; n: sparse steps since the refresh; mask: the encoded sparse set of
    the refresh (a sparse step must use the same one).
    """

    rho: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    n: int = 0
    mask: str | None = field(default=None, repr=False)

    def reset(self) -> None:
        """Forget the refresh (a new generation starts)."""
        self.rho = self.residual = self.mask = None
        self.n = 0

    @property
    def ready(self) -> bool:
        """Whether a refresh has been cached (a sparse step can run)."""
        return self.rho is not None


def rettention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, state: ReCache, mode: str, *,
               mask: Mask | None = None, drift: float = DEFAULT_DRIFT, clamp: bool = True,
               scale: float | None = None, backend: str | None = None) -> torch.Tensor:
    """One attention call of a Re-ttention sampler (docs/spec.md §3).

    q, k, v: (batch, heads, seq, head_dim), any strides; float16 / bfloat16 / float32 (float64 on the
    reference and cpu backends).
    state: the layer's :class:`ReCache` (updated in place by ``"refresh"`` and ``"sparse"``).
    mode: ``"full"`` (dense attention), ``"refresh"`` (dense attention; caches rho and R) or
    ``"sparse"`` (``rho_hat * out_S + R``; ``state.n`` then advances).
    mask: the sparse set: :class:`Band` (default for refresh), :class:`LocalWindow` or
    :class:`BlockTopK`. A sparse step uses the refresh's mask when ``mask`` is None and refuses another.
    drift: ``rho_hat = rho + drift * n``. clamp: clamp ``rho_hat`` to at most 1 (the released code does
    not: ``clamp=False`` reproduces it). scale: defaults to ``head_dim ** -0.5``.
    backend: ``"reference"``, ``"cpu"`` or ``"triton"``; default by device, or ``DITKERNELS_BACKEND``.

    Returns out (batch, heads, seq, head_dim) in q.dtype. ``"full"`` is differentiable; ``"refresh"``
    and ``"sparse"`` are inference-only (their backward raises NotImplementedError).
    """
    from .attention import attention

    _validate.check_qkv(q, k, v)
    if not isinstance(state, ReCache):
        raise TypeError(f"state: expected a ditkernels.ReCache, got {type(state).__name__}")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if isinstance(drift, bool) or not isinstance(drift, (int, float)) or not math.isfinite(drift):
        raise TypeError(f"drift: expected a finite float, got {drift!r}")
    if not isinstance(clamp, bool):
        raise TypeError(f"clamp: expected a bool, got {type(clamp).__name__}")
    scale = _validate.check_scale(scale, q.shape[-1])
    backend = _validate.check_backend(backend)
    if mode == "full":
        return attention(q, k, v, scale=scale, backend=backend or None)
    if mode == "refresh":
        code = _encode(_DEFAULT_BAND if mask is None else mask)
        out, rho, residual = rettention_refresh(q, k, v, code, scale, backend)
        state.rho, state.residual, state.n, state.mask = rho.detach(), residual.detach(), 0, code
        return out
    if not state.ready:
        raise RuntimeError("rettention: mode='sparse' needs a refresh first (state holds no rho / residual); "
                           "run mode='refresh' on this ReCache, or reset() it between generations")
    code = state.mask if mask is None else _encode(mask)
    if code != state.mask:
        raise ValueError(f"mask: a sparse step must use the mask of the last refresh ({_decode(state.mask)}), "
                         f"got {_decode(code)}")
    b, h, s, d = q.shape
    if tuple(state.rho.shape) != (b, h, s) or tuple(state.residual.shape) != (b, h, s, d) \
            or state.residual.dtype != q.dtype or state.rho.device != q.device:
        raise ValueError(f"state: the refresh cached rho {tuple(state.rho.shape)} and residual "
                         f"{tuple(state.residual.shape)} {state.residual.dtype} on {state.rho.device}; this step has "
                         f"q {tuple(q.shape)} {q.dtype} on {q.device} (reset() the cache for a new problem)")
    row_scale = _rho_hat(state.rho, state.n, float(drift), clamp)
    out = rettention_sparse(q, k, v, row_scale, state.residual, code, scale, backend)
    state.n += 1
    return out


# ================================================================================================
# Schedules and step counting
# ================================================================================================
@dataclass(frozen=True)
class ReSchedule:
    """Which mode each denoising step runs: ``"full"`` for ``step < full_steps``, ``"refresh"`` when
    ``(step - full_steps) % refresh_every == 0``, ``"sparse"`` otherwise. ``num_steps``: steps of one
    generation (a module counting its calls starts a new generation after that many)."""

    full_steps: int
    refresh_every: int
    num_steps: int | None = None

    def __post_init__(self):
        _pos_int("full_steps", self.full_steps, 0)
        _pos_int("refresh_every", self.refresh_every)
        if self.num_steps is not None:
            _pos_int("num_steps", self.num_steps)

    def mode(self, step: int) -> str:
        _pos_int("step", step, 0)
        if step < self.full_steps:
            return "full"
        return "refresh" if (step - self.full_steps) % self.refresh_every == 0 else "sparse"

    def modes(self, num_steps: int | None = None) -> list[str]:
        n = num_steps or self.num_steps
        if n is None:
            raise ValueError("num_steps: this schedule has no num_steps; pass one")
        return [self.mode(i) for i in range(n)]

    @classmethod
    def preset(cls, name: str) -> "ReSchedule":
        """The released settings: ``"pixart"`` (20 steps: full 0-4, refresh 5, 10, 15),
        ``"hunyuan-dit"`` (50 steps: full 0-9, refresh when step % 5 == 0) and ``"cogvideox"``
        (50 steps: full 0-14, refresh 15, 20, ..., 45)."""
        if name not in PRESETS:
            raise ValueError(f"name: expected one of {tuple(PRESETS)}, got {name!r}")
        return PRESETS[name]


PRESETS = {
    "pixart": ReSchedule(5, 5, 20),
    "hunyuan-dit": ReSchedule(10, 5, 50),
    "cogvideox": ReSchedule(15, 5, 50),
}


class ReStepper:
    """Runs one attention layer through a :class:`ReSchedule`, counting its calls as denoising steps.

    Call it once per step with the step's q, k, v (batch, heads, seq, head_dim); classifier-free
    guidance that batches both halves in one call is one call (rho and R are per sample). A new
    generation starts (the cache is reset) on :meth:`reset`, after ``schedule.num_steps`` calls, and
    when the batch / heads / seq / head_dim / dtype / device of the inputs (or their token layout) change.
    It is also an attention callable for the diffusers processors (see :meth:`__call__`): one stepper per
    attention layer, since each layer caches its own rho and R.
    """

    def __init__(self, schedule: ReSchedule | str = "pixart", mask: Mask | None = None, *,
                 drift: float = DEFAULT_DRIFT, clamp: bool = True, scale: float | None = None,
                 backend: str | None = None):
        self.schedule = ReSchedule.preset(schedule) if isinstance(schedule, str) else schedule
        if not isinstance(self.schedule, ReSchedule):
            raise TypeError(f"schedule: expected a ReSchedule or a preset name, got {type(schedule).__name__}")
        self.mask = Band() if mask is None else mask
        _encode(self.mask)  # validates the type
        self.drift, self.clamp, self.scale, self.backend = drift, clamp, scale, backend
        self.cache = ReCache()
        self.step = 0
        self._signature: tuple | None = None
        self._layouts: dict[tuple, Mask] = {}

    def reset(self) -> None:
        """Start a new generation: step 0, empty cache."""
        self.cache.reset()
        self.step = 0
        self._signature = None

    def next_mode(self) -> str:
        """The mode the next call runs (without running it)."""
        n = self.schedule.num_steps
        return self.schedule.mode(0 if n is not None and self.step >= n else self.step)

    def _mask_for(self, grid: tuple[int, ...] | None, num_prefix: int | None, num_suffix: int | None) -> Mask:
        """The mask with the token layout of this call (an attention processor passes the image grid and
        the text tokens around it; the mask's own values are kept for what is not passed)."""
        changes = {name: val for name, val in (("num_prefix", num_prefix), ("num_suffix", num_suffix))
                   if val is not None}
        if grid is not None and isinstance(self.mask, LocalWindow):
            changes["grid"] = tuple(grid)
        if not changes:
            return self.mask
        key = tuple(sorted(changes.items()))
        if key not in self._layouts:
            self._layouts[key] = replace(self.mask, **changes)
        return self._layouts[key]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid: tuple[int, ...] | None = None,
                 num_prefix: int | None = None, num_suffix: int | None = None,
                 scale: float | None = None) -> torch.Tensor:
        """One denoising step: q, k, v (batch, heads, seq, head_dim) -> (batch, heads, seq, head_dim).

        The keywords make it an attention callable ``attn_fn(q, k, v, *, grid, num_prefix, num_suffix,
        scale)`` for the diffusers processors: the token layout of the call goes into the mask
        (global text tokens of a Band / BlockTopK, the grid of a LocalWindow); ``scale`` overrides the
        stepper's."""
        mask = self._mask_for(grid, num_prefix, num_suffix)
        sig = (tuple(q.shape), k.shape[2], q.dtype, q.device, mask)
        n = self.schedule.num_steps
        if (self._signature is not None and sig != self._signature) or (n is not None and self.step >= n):
            self.reset()
        self._signature = sig
        mode = self.schedule.mode(self.step)
        out = rettention(q, k, v, self.cache, mode, mask=mask, drift=self.drift, clamp=self.clamp,
                         scale=self.scale if scale is None else scale, backend=self.backend)
        self.step += 1
        return out
