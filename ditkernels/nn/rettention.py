"""``ReAttention``: timm's ``Attention`` layout with Re-ttention inside (SPEC §3, §5)."""

from __future__ import annotations

import torch
from torch import nn

from ..ops.rettention import Band, BlockTopK, LocalWindow, ReSchedule, ReStepper


class ReAttention(nn.Module):
    """Multi-head self-attention over ``(batch, tokens, dim)`` with Re-ttention's step schedule.

    Parameters are named and shaped like timm's ``Attention`` (``qkv``: Linear(dim, 3 * dim),
    ``proj``: Linear(dim, dim), ``q_norm`` / ``k_norm``), so a DiT checkpoint's attention weights load
    unchanged. Each forward call is one denoising step of ``schedule`` (a :class:`ReSchedule` or a
    preset name: ``"pixart"``, ``"hunyuan-dit"``, ``"cogvideox"``): full attention for the first
    steps, then refresh / sparse steps over ``mask`` (:class:`~ditkernels.Band` by default). A batch
    that carries both halves of classifier-free guidance is one call. The step counter restarts (a
    new generation) on :meth:`reset`, after ``schedule.num_steps`` calls, and when the input shape,
    dtype or device changes. ``attn_drop`` is kept for the layout; attention dropout is not applied
    (Re-ttention is a sampling-time method).
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False, qk_norm: bool = False,
                 proj_bias: bool = True, attn_drop: float = 0.0, proj_drop: float = 0.0,
                 norm_layer: type[nn.Module] = nn.LayerNorm, *, mask: Band | LocalWindow | BlockTopK | None = None,
                 schedule: ReSchedule | str = "pixart", drift: float = 0.04, clamp: bool = True,
                 backend: str | None = None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim: expected a multiple of num_heads={num_heads}, got {dim}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = norm_layer(self.head_dim) if qk_norm else nn.Identity()
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)
        self.proj_drop = nn.Dropout(proj_drop)
        self.stepper = ReStepper(schedule, mask, drift=drift, clamp=clamp, scale=self.scale, backend=backend)

    @classmethod
    def from_timm(cls, attn: nn.Module, **kwargs) -> "ReAttention":
        """A ReAttention holding the weights of a timm ``Attention`` (or DiT's) module ``attn``."""
        dim = attn.qkv.in_features
        qk_norm = not isinstance(getattr(attn, "q_norm", nn.Identity()), nn.Identity)
        new = cls(dim, attn.num_heads, qkv_bias=attn.qkv.bias is not None, qk_norm=qk_norm,
                  proj_bias=attn.proj.bias is not None, **kwargs)
        new.load_state_dict(attn.state_dict())
        return new.to(device=attn.qkv.weight.device, dtype=attn.qkv.weight.dtype)

    @property
    def step(self) -> int:
        """Denoising steps run in the current generation."""
        return self.stepper.step

    def reset(self) -> None:
        """Start a new generation (step 0, empty Re-ttention cache)."""
        self.stepper.reset()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch, tokens, dim) -> (batch, tokens, dim)."""
        if x.dim() != 3 or x.shape[-1] != self.qkv.in_features:
            raise ValueError(f"x: expected (batch, tokens, {self.qkv.in_features}), got shape {tuple(x.shape)}")
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        out = self.stepper(q, k, v)
        out = out.transpose(1, 2).reshape(b, n, c)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        s = self.stepper
        return f"heads={self.num_heads}, mask={s.mask}, schedule={s.schedule}, drift={s.drift}, clamp={s.clamp}"
