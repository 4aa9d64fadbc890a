"""Drop-in attention modules with timm's ``Attention`` layout, around any attention callable (docs/spec.md §5).

:class:`GridAttention` owns the projections of ``timm.models.vision_transformer.Attention`` (the
attention of the DiT reference code), with the same names and shapes, so a timm / DiT state dict loads
unchanged:

================  ==============================  ===============================================
name              shape                           present
================  ==============================  ===============================================
qkv               Linear(dim, 3 * attn_dim)       always (bias with ``qkv_bias``); rows [q | k | v]
q_norm, k_norm    norm_layer(head_dim)            with ``qk_norm`` (else Identity, no parameters)
norm              norm_layer(attn_dim)            with ``scale_norm`` (else Identity)
gate              Linear(dim, attn_dim)           with ``gated`` (bias with ``qkv_bias``)
proj              Linear(attn_dim, dim_out)       always (bias with ``proj_bias``)
================  ==============================  ===============================================

(``attn_dim = num_heads * head_dim``.) The forward is timm's, except that the attention call is
``attn_fn``, an *attention callable*::

    out = attn_fn(q, k, v, *, grid, num_prefix, num_suffix, scale)

with ``q, k, v, out: (batch, heads, seq, head_dim)``, the sequence laid out
``[num_prefix global][prod(grid) grid tokens, row-major][num_suffix global]`` (docs/spec.md §0) and ``grid``
a tuple, or None when neither the module nor the call gave one (callables that need it raise). Any
callable with that signature plugs in: :class:`ditkernels.nn.LocalAttnFn` (local windows, optional
CLEAR pooled keys), :class:`DenseAttnFn` (plain attention), :class:`ditkernels.nn.BlockTopKAttnFn` /
:class:`ditkernels.nn.TopKAttnFn` (sparse), :class:`ditkernels.ReStepper` (Re-ttention, one per layer); a
callable that holds parameters or state should be an ``nn.Module`` (then it is a submodule,
``attn_fn``, and its parameters appear as ``attn_fn.*`` in the state dict).

:func:`swap_attention` replaces the timm-style attention modules of a model in place by such modules,
moving (not copying) their projection layers.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Protocol

import torch
import torch.nn as nn

from .._validate import check_token_grid
from ..ops.attention import attention

# The children of timm's Attention (all versions up to 1.0.x) that a swap moves over.
_TIMM_CHILDREN = ("qkv", "q_norm", "k_norm", "attn_drop", "norm", "gate", "proj", "proj_drop")
# Arguments of a timm-style forward that the swapped module understands.
_FORWARD_ARGS = {"self", "x", "attn_mask", "is_causal"}


class AttnFn(Protocol):
    """An attention callable: ``(batch, heads, seq, head_dim)`` q, k, v -> output of q's shape."""

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid: tuple[int, ...] | None,
                 num_prefix: int, num_suffix: int, scale: float) -> torch.Tensor: ...


class DenseAttnFn(nn.Module):
    """Plain softmax attention over every key (:func:`ditkernels.attention`); ignores the layout.

    backend: as :func:`ditkernels.attention` (default: by device)."""

    def __init__(self, backend: str | None = None) -> None:
        super().__init__()
        self.backend = backend

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, grid: tuple[int, ...] | None = None,
                num_prefix: int = 0, num_suffix: int = 0, scale: float | None = None) -> torch.Tensor:
        return attention(q, k, v, scale=scale, backend=self.backend)

    def extra_repr(self) -> str:
        return f"backend={self.backend!r}"


def _count(name: str, x: object) -> int:
    if isinstance(x, bool) or not isinstance(x, int) or x < 0:
        raise ValueError(f"{name}: expected an int >= 0, got {x!r}")
    return x


class GridAttention(nn.Module):
    """timm's multi-head self-attention (module docstring) with the attention call replaced by ``attn_fn``.

    x: (batch, tokens, dim) -> (batch, tokens, dim_out), tokens = num_prefix + prod(grid) + num_suffix.

    dim, num_heads, attn_head_dim, dim_out, qkv_bias, qk_norm, scale_norm, proj_bias, gated, attn_drop,
    proj_drop, norm_layer, device, dtype: as ``timm.layers.Attention`` (``norm_layer`` defaults to
    ``nn.LayerNorm``). Attention dropout is not supported by the kernels: ``attn_drop > 0`` is accepted
    (for checkpoints trained with it) but a forward in training mode then raises.
    attn_fn: the attention callable (module docstring). grid, num_prefix, num_suffix: the token layout,
    used when the forward is not given them. scale: the softmax scale (default ``head_dim ** -0.5``).
    """

    def __init__(self, dim: int, num_heads: int = 8, *, attn_fn: AttnFn, grid: Sequence[int] | None = None,
                 num_prefix: int = 0, num_suffix: int = 0, attn_head_dim: int | None = None,
                 dim_out: int | None = None, qkv_bias: bool = False, qk_norm: bool = False, scale_norm: bool = False,
                 proj_bias: bool = True, gated: bool = False, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 norm_layer: Callable[..., nn.Module] | None = None, scale: float | None = None,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        for name, val in (("dim", dim), ("num_heads", num_heads)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name}: expected a positive int, got {val!r}")
        if attn_head_dim is None:
            if dim % num_heads:
                raise ValueError(f"num_heads: expected a divisor of dim = {dim} (or give attn_head_dim), got {num_heads}")
            attn_head_dim = dim // num_heads
        if not callable(attn_fn):
            raise TypeError(f"attn_fn: expected an attention callable, got {type(attn_fn).__name__}")
        dd = {"device": device, "dtype": dtype}
        norm_layer = norm_layer or nn.LayerNorm
        dim_out = dim_out or dim
        self.num_heads = num_heads
        self.head_dim = attn_head_dim
        self.attn_dim = num_heads * attn_head_dim
        self.scale = attn_head_dim ** -0.5 if scale is None else float(scale)
        self.grid = check_token_grid(grid)
        self.num_prefix = _count("num_prefix", num_prefix)
        self.num_suffix = _count("num_suffix", num_suffix)

        self.qkv = nn.Linear(dim, 3 * self.attn_dim, bias=qkv_bias, **dd)
        self.q_norm = norm_layer(attn_head_dim, **dd) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(attn_head_dim, **dd) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.norm = norm_layer(self.attn_dim, **dd) if scale_norm else nn.Identity()
        self.gate = nn.Linear(dim, self.attn_dim, bias=qkv_bias, **dd) if gated else None
        self.proj = nn.Linear(self.attn_dim, dim_out, bias=proj_bias, **dd)
        self.proj_drop = nn.Dropout(proj_drop)
        self.attn_fn = attn_fn

    def extra_repr(self) -> str:
        return (f"num_heads={self.num_heads}, head_dim={self.head_dim}, grid={self.grid}, "
                f"num_prefix={self.num_prefix}, num_suffix={self.num_suffix}")

    def layout(self, tokens: int, grid: Sequence[int] | None = None, num_prefix: int | None = None,
               num_suffix: int | None = None) -> tuple[tuple[int, ...] | None, int, int]:
        """(grid, num_prefix, num_suffix) of a call: the arguments, else the module's; checked against
        the token count when a grid is known."""
        g = check_token_grid(grid) if grid is not None else self.grid
        p = self.num_prefix if num_prefix is None else _count("num_prefix", num_prefix)
        s = self.num_suffix if num_suffix is None else _count("num_suffix", num_suffix)
        if g is not None and p + math.prod(g) + s != tokens:
            raise ValueError(f"x: expected num_prefix + prod(grid) + num_suffix = {p} + {math.prod(g)} + {s} = "
                             f"{p + math.prod(g) + s} tokens (grid {g}), got {tokens}")
        return g, p, s

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False, *,
                grid: Sequence[int] | None = None, num_prefix: int | None = None,
                num_suffix: int | None = None, **attn_kwargs) -> torch.Tensor:
        """x: (batch, tokens, dim) -> (batch, tokens, dim_out). ``attn_mask`` / ``is_causal`` (timm's
        arguments) must be left unset; grid / num_prefix / num_suffix override the module's layout.
        ``attn_kwargs``: extra per-call keywords passed on to ``attn_fn`` (e.g. ``block_mask=`` of
        :class:`ditkernels.nn.BlockTopKAttnFn`)."""
        if attn_mask is not None or is_causal:
            raise ValueError("attn_mask / is_causal: not supported by GridAttention (its attention pattern is "
                             f"attn_fn's), got attn_mask={'a tensor' if attn_mask is not None else None}, "
                             f"is_causal={is_causal}")
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.qkv.in_features:
            raise ValueError(f"x: expected a (batch, tokens, {self.qkv.in_features}) tensor, got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if self.training and self.attn_drop.p > 0:
            raise ValueError(f"attn_drop: attention dropout is not supported by the kernels, got p={self.attn_drop.p} "
                             "in training mode (set attn_drop.p = 0 or call .eval())")
        b, n, _ = x.shape
        g, p, s = self.layout(n, grid, num_prefix, num_suffix)
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        o = self.attn_fn(q, k, v, grid=g, num_prefix=p, num_suffix=s, scale=self.scale, **attn_kwargs)
        o = o.transpose(1, 2).reshape(b, n, self.attn_dim)
        o = self.norm(o)
        if gate is not None:
            o = o * gate
        return self.proj_drop(self.proj(o))

    # ---- construction from an existing module ---------------------------------------------------
    @classmethod
    def from_module(cls, module: nn.Module, **kwargs) -> "GridAttention":
        """A module of this class that *reuses* ``module``'s projection layers (timm's ``Attention``, a
        copy of it such as DiT's, or another :class:`GridAttention`): same parameters, device and dtype.
        ``kwargs`` are this class's other arguments (``attn_fn``, ``grid``, ``window``...); a
        :class:`GridAttention` source also passes on its layout unless ``kwargs`` give one.
        Raises ValueError if ``module`` has children or parameters a timm ``Attention`` does not have."""
        why = _not_timm_like(module)
        if why:
            raise ValueError(f"module: cannot take the weights of {type(module).__name__}: {why}")
        qkv, proj = module.qkv, module.proj
        attn_dim = qkv.out_features // 3
        num_heads = int(module.num_heads)
        if attn_dim % num_heads:
            raise ValueError(f"module: qkv gives attn_dim {attn_dim}, not a multiple of num_heads = {num_heads}")
        head_dim = attn_dim // num_heads
        if isinstance(module, GridAttention):
            for key in ("grid", "num_prefix", "num_suffix"):
                kwargs.setdefault(key, getattr(module, key))
        scale = getattr(module, "scale", None)
        if isinstance(scale, (int, float)) and not math.isclose(scale, head_dim ** -0.5, rel_tol=1e-12):
            kwargs.setdefault("scale", float(scale))
        w = qkv.weight
        new = cls(qkv.in_features, num_heads, attn_head_dim=head_dim, dim_out=proj.out_features,
                  qkv_bias=qkv.bias is not None, proj_bias=proj.bias is not None, device="meta", **kwargs)
        new.qkv, new.proj = qkv, proj
        for name in ("q_norm", "k_norm", "norm"):  # absent in old timm versions (and DiT's copy)
            child = getattr(module, name, None)
            setattr(new, name, child if isinstance(child, nn.Module) else nn.Identity())
        gate = getattr(module, "gate", None)
        new.gate = gate if isinstance(gate, nn.Module) else None
        for name in ("attn_drop", "proj_drop"):
            child = getattr(module, name, None)
            setattr(new, name, child if isinstance(child, nn.Module) else nn.Dropout(0.0))
        # whatever this class created itself (e.g. a pooling weight) is still on meta: materialise it
        for sub in new.modules():
            if any(t.is_meta for t in sub.parameters(recurse=False)) or any(t.is_meta for t in sub.buffers(recurse=False)):
                sub.to_empty(device=w.device, recurse=False)
                sub.to(dtype=w.dtype)
                if not hasattr(sub, "reset_parameters"):
                    raise ValueError(f"module: {type(sub).__name__} was created on the meta device and has no "
                                     "reset_parameters() to initialise it")
                sub.reset_parameters()
        new.train(module.training)
        return new


def _not_timm_like(module: nn.Module) -> str:
    """Why ``module`` is not a timm-style attention whose weights a GridAttention can take ('' if it is)."""
    qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
    if not isinstance(qkv, nn.Linear) or not isinstance(proj, nn.Linear):
        return "it has no qkv and proj nn.Linear layers"
    if qkv.out_features % 3:
        return f"qkv has {qkv.out_features} outputs, not 3 * attn_dim"
    heads = getattr(module, "num_heads", None)
    if isinstance(heads, bool) or not isinstance(heads, int):
        return "it has no int attribute num_heads"
    allowed = set(_TIMM_CHILDREN) | ({"attn_fn"} if isinstance(module, GridAttention) else set())
    extra = sorted(n for n, _ in module.named_children() if n not in allowed)
    extra += sorted(n for n, _ in module.named_parameters(recurse=False))
    extra += sorted(n for n, _ in module.named_buffers(recurse=False))
    if extra:
        return f"it has children / parameters that timm's Attention does not have: {extra}"
    if not isinstance(module, GridAttention):
        args = set(inspect.signature(type(module).forward).parameters)
        if not args <= _FORWARD_ARGS:
            return f"its forward takes {sorted(args - _FORWARD_ARGS)} (e.g. rotary embeddings), which would be lost"
    return ""


def is_timm_attention(module: nn.Module) -> bool:
    """True for timm's ``Attention``, copies of it with the same children and forward arguments (DiT's),
    and :class:`GridAttention` modules."""
    return isinstance(module, GridAttention) or not _not_timm_like(module)


def _looks_like_attention(module: nn.Module) -> bool:
    return isinstance(getattr(module, "qkv", None), nn.Linear) or "attention" in type(module).__name__.lower()


def swap_attention(model: nn.Module, *, grid: Sequence[int] | None = None, window: int | Sequence[int] | None = None,
                   attn_fn: AttnFn | None = None, make_attn_fn: Callable[[str, nn.Module], AttnFn] | None = None,
                   module_cls: type[GridAttention] | None = None,
                   match: Callable[[str, nn.Module], bool] | None = None, **options) -> list[str]:
    """Replace, in place, every timm-style attention module of ``model`` (timm's ``Attention`` as used by
    DiT, copies of it, and our :class:`GridAttention` modules) by a :class:`GridAttention` that keeps
    its weights (the projection layers are moved over, not copied).

    What replaces them:

    - default: :class:`ditkernels.nn.LocalAttention` with ``grid``, ``window`` and ``options``
      (``shape``, ``border``, ``tile``, ``pool``, ``num_prefix``, ``num_suffix``, ``backend``);
    - ``attn_fn=f``: ``GridAttention(attn_fn=f)`` (the same callable in every layer: fine for stateless
      functions);
    - ``make_attn_fn=lambda name, old: ...``: one callable per layer (for callables with parameters or
      state, e.g. Re-ttention caches);
    - ``module_cls``: that :class:`GridAttention` subclass (its ``from_module`` gets ``options``).

    grid: the token grid (also settable later through each module's ``grid`` attribute, or per call).
    match: ``match(name, module) -> bool`` restricts the swap to some of the matching modules.

    Returns the names (``model.named_modules()``) of the replaced modules, in model order. Raises
    ValueError when nothing matched (naming the attention-like modules it saw), or when a matching
    module has parameters the replacement could not keep.
    """
    if attn_fn is not None and make_attn_fn is not None:
        raise ValueError("attn_fn / make_attn_fn: give at most one of them")
    if module_cls is None:
        if attn_fn is None and make_attn_fn is None:
            from .local import LocalAttention

            module_cls = LocalAttention
        else:
            module_cls = GridAttention
    if not (isinstance(module_cls, type) and issubclass(module_cls, GridAttention)):
        raise TypeError(f"module_cls: expected a subclass of ditkernels.nn.GridAttention, got {module_cls!r}")
    if window is not None:
        options["window"] = window
    if grid is not None:
        options["grid"] = grid
    if attn_fn is not None:
        options["attn_fn"] = attn_fn
    if is_timm_attention(model):
        raise ValueError("model: is itself an attention module; call swap_attention on its parent, or build "
                         f"the replacement with {module_cls.__name__}.from_module(model, ...)")
    targets, seen = [], []
    for name, mod in model.named_modules():
        if not name:
            continue
        if _looks_like_attention(mod):
            seen.append(f"{name} ({type(mod).__name__})")
        if (isinstance(mod, GridAttention) or isinstance(getattr(mod, "qkv", None), nn.Linear)) and (
                match is None or match(name, mod)):
            if any(name.startswith(t + ".") for t in targets):
                continue
            why = _not_timm_like(mod)
            if why and isinstance(mod, GridAttention):
                raise ValueError(f"model: cannot swap {name}: {why}")
            if not why:
                targets.append(name)
    if not targets:
        shown = ", ".join(seen[:12]) + (f" ... ({len(seen)} in all)" if len(seen) > 12 else "")
        raise ValueError(f"model: no timm-style attention module (qkv and proj Linear layers, num_heads, forward(x)) "
                         f"matched in {type(model).__name__}; attention-like modules seen: {shown or 'none'}")
    for name in targets:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        old = getattr(parent, child)
        kw = dict(options)
        if make_attn_fn is not None:
            kw["attn_fn"] = make_attn_fn(name, old)
        setattr(parent, child, module_cls.from_module(old, **kw))
    return targets

