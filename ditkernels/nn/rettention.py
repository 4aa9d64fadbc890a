"""``ReAttention``: timm's ``Attention`` layout with Re-ttention inside (docs/spec.md §3, §5).

The attention callable is :class:`ditkernels.ops.rettention.ReStepper` (one per layer: it caches the
layer's rho and R); :class:`ReAttention` is a :class:`~ditkernels.nn.GridAttention` around one.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

from torch import nn

from ..ops.rettention import Band, BlockTopK, LocalWindow, ReSchedule, ReStepper
from .attention import GridAttention


class ReAttention(GridAttention):
    """Multi-head self-attention over ``(batch, tokens, dim)`` with Re-ttention's step schedule.

    Parameters are timm's ``Attention`` (see :class:`~ditkernels.nn.GridAttention`), so a DiT
    checkpoint's attention weights load unchanged (the state dict has no other keys). Each forward call
    is one denoising step of ``schedule`` (a :class:`ReSchedule` or a preset name: ``"pixart"``,
    ``"hunyuan-dit"``, ``"cogvideox"``): full attention for the first steps, then refresh / sparse steps
    over ``mask`` (:class:`~ditkernels.Band` by default). A batch that carries both halves of
    classifier-free guidance is one call. The step counter restarts (a new generation) on :meth:`reset`,
    after ``schedule.num_steps`` calls, and when the input shape, dtype or device changes.

    grid / num_prefix / num_suffix: the token layout; by default the mask's (its ``num_prefix`` /
    ``num_suffix``, and a :class:`~ditkernels.LocalWindow`'s grid). The layout of a call
    (``forward(x, grid=...)``) goes into the mask. The stepper is ``attn_fn`` (also ``stepper``).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_norm: bool = False,
                 proj_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 norm_layer: Callable[..., nn.Module] | None = None, *, mask: Band | LocalWindow | BlockTopK | None = None,
                 schedule: ReSchedule | str = "pixart", drift: float = 0.04, clamp: bool = True,
                 backend: str | None = None, grid: Sequence[int] | None = None, num_prefix: int | None = None,
                 num_suffix: int | None = None, **kwargs) -> None:
        stepper = ReStepper(schedule, mask, drift=drift, clamp=clamp, backend=backend)
        m = stepper.mask
        if grid is None and isinstance(m, LocalWindow):
            grid = m.grid
        super().__init__(dim, num_heads, attn_fn=stepper, grid=grid,
                         num_prefix=m.num_prefix if num_prefix is None else num_prefix,
                         num_suffix=m.num_suffix if num_suffix is None else num_suffix, qkv_bias=qkv_bias,
                         qk_norm=qk_norm, proj_bias=proj_bias, attn_drop=attn_drop, proj_drop=proj_drop,
                         norm_layer=norm_layer, **kwargs)

    @classmethod
    def from_module(cls, module: nn.Module, **kwargs) -> "ReAttention":
        """A :class:`ReAttention` reusing ``module``'s projections (see :meth:`GridAttention.from_module`);
        ``kwargs``: mask, schedule, drift, clamp, backend, grid, num_prefix, num_suffix, scale."""
        if "attn_fn" in kwargs:
            raise TypeError("attn_fn: ReAttention builds its own ReStepper; use GridAttention.from_module(module, "
                            "attn_fn=ReStepper(...))")
        return super().from_module(module, **kwargs)

    @classmethod
    def from_timm(cls, attn: nn.Module, **kwargs) -> "ReAttention":
        """A ReAttention holding a copy of the weights of a timm ``Attention`` (or DiT's) module ``attn``
        (:meth:`from_module` on a copy: ``attn`` keeps its own)."""
        return cls.from_module(copy.deepcopy(attn), **kwargs)

    @property
    def stepper(self) -> ReStepper:
        return self.attn_fn

    @property
    def step(self) -> int:
        """Denoising steps run in the current generation."""
        return self.attn_fn.step

    def reset(self) -> None:
        """Start a new generation (step 0, empty Re-ttention cache)."""
        self.attn_fn.reset()

    def extra_repr(self) -> str:
        s = self.attn_fn
        return (f"{super().extra_repr()}, mask={s.mask}, schedule={s.schedule}, drift={s.drift}, "
                f"clamp={s.clamp}")
