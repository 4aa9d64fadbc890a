"""``SS2D``: VMamba's 2-D selective-scan mixer (as in LaMamba-Diff / DiM blocks) for DiT token grids.

Parameter layout (VMamba's names; ``d_inner = int(expand * d_model)``, ``R = dt_rank``
(``ceil(d_model / 16)`` for ``"auto"``), ``N = d_state``, ``K`` directions):

================  ==========================  =======================================================
name              shape                       role / init
================  ==========================  =======================================================
in_proj           Linear(d_model, 2*d_inner)  x and gate z (bias only with ``bias=True``)
conv2d            Conv2d depthwise            d_conv x d_conv, padding (d_conv - 1) // 2, bias with conv_bias
x_proj_weight     (K, R + 2*N, d_inner)       per-direction x_proj (rows [dt | B | C]), nn.Linear default
dt_projs_weight   (K, d_inner, R)             per-direction dt_proj weight, as mamba's dt_proj
dt_projs_bias     (K, d_inner)                per-direction dt bias, softplus^-1 of log-uniform dt
A_logs            (K*d_inner, N) float32      log(1..N) per row; rows k*d_inner:(k+1)*d_inner: direction k
Ds                (K*d_inner,) float32        ones
out_norm          LayerNorm(d_inner)
out_proj          Linear(d_inner, d_model)
================  ==========================  =======================================================

With ``directions=4`` the directions are VMamba's cross-scan order (raster, transpose, raster_rev,
transpose_rev), so a VMamba "v0" SS2D state dict (``ssm_ratio=expand``, ``d_conv=3``) loads unchanged.

Forward (VMamba v0): ``in_proj -> (x, z)``; ``x -> conv2d -> silu -> K direction orders`` (one gather);
per-direction ``x_proj``/``dt_proj`` on the reordered sequences; ONE selective scan over the K*d_inner
channels with B/C as K groups (delta softplus, D skip); one gather back to grid order summing the
K directions; ``out_norm``; times ``silu(z)``; ``out_proj``; dropout.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn

from .._validate import check_grid_hw
from ..ops.scan2d import VMAMBA_DIRECTIONS, check_directions, merge_directions, split_directions
from ..ops.selective_scan import selective_scan
from .mamba import a_log_init, compute_dtype, dt_bias_init, dt_weight_init_, resolve_dt_rank

# ``directions=<int>`` presets.
PRESETS = {
    1: ("raster",),
    2: ("raster", "raster_rev"),
    4: VMAMBA_DIRECTIONS,
    8: VMAMBA_DIRECTIONS + ("snake", "snake_transpose", "snake_rev", "snake_transpose_rev"),
}


def _directions(directions: int | str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(directions, int) and not isinstance(directions, bool):
        if directions not in PRESETS:
            raise ValueError(f"directions: expected one of {sorted(PRESETS)} or a sequence of direction names, "
                             f"got {directions}")
        return PRESETS[directions]
    return check_directions(directions)


class SS2D(nn.Module):
    """2-D selective-scan mixer: (batch, H, W, d_model), or (batch, H*W, d_model) with ``grid=(H, W)``.

    directions: 1, 2, 4 (VMamba) or 8 (VMamba's four and the four snakes), or a sequence of names
    from :data:`ditkernels.ops.scan2d.DIRECTIONS`. d_conv must be odd (same-size depthwise conv).
    Other arguments as :class:`ditkernels.nn.Mamba`. The output has the layout of the input.
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 3, expand: float = 2,
                 directions: int | Sequence[str] = 4, dt_rank: int | str = "auto", dt_min: float = 0.001,
                 dt_max: float = 0.1, dt_init: str = "random", dt_scale: float = 1.0, dt_init_floor: float = 1e-4,
                 conv_bias: bool = True, bias: bool = False, dropout: float = 0.0, device=None, dtype=None, *,
                 backend: str | None = None):
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        if isinstance(d_conv, bool) or not isinstance(d_conv, int) or d_conv < 1 or d_conv % 2 == 0:
            raise ValueError(f"d_conv: expected a positive odd int (same-size 2-D conv), got {d_conv!r}")
        self.directions = _directions(directions)
        K = len(self.directions)
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = d_inner = int(expand * d_model)
        self.dt_rank = R = resolve_dt_rank(dt_rank, d_model)
        self.backend = backend

        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=bias, **factory)
        self.conv2d = nn.Conv2d(d_inner, d_inner, kernel_size=d_conv, groups=d_inner, padding=(d_conv - 1) // 2,
                                bias=conv_bias, **factory)
        self.act = nn.SiLU()
        x_proj = torch.empty(K, R + 2 * d_state, d_inner, **factory)
        for k in range(K):  # nn.Linear's default init, per direction
            nn.init.kaiming_uniform_(x_proj[k], a=5 ** 0.5)
        dt_w = torch.empty(K, d_inner, R, **factory)
        dt_weight_init_(dt_w, R, dt_scale, dt_init)
        dt_b = torch.stack([dt_bias_init(d_inner, dt_min, dt_max, dt_init_floor, **factory) for _ in range(K)])
        # Registered in VMamba's order, so state dict keys come out in the same order.
        self.x_proj_weight = nn.Parameter(x_proj)
        self.A_logs = nn.Parameter(a_log_init(d_state, K * d_inner, device))  # float32 whatever dtype
        self.A_logs._no_weight_decay = True
        self.Ds = nn.Parameter(torch.ones(K * d_inner, device=device))  # float32
        self.Ds._no_weight_decay = True
        self.dt_projs_weight = nn.Parameter(dt_w)
        self.dt_projs_bias = nn.Parameter(dt_b)
        self.out_norm = nn.LayerNorm(d_inner, **factory)
        self.out_proj = nn.Linear(d_inner, d_model, bias=bias, **factory)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _grid(self, x: torch.Tensor, grid: tuple[int, int] | None) -> tuple[int, int]:
        if not isinstance(x, torch.Tensor) or x.dim() not in (3, 4) or x.shape[-1] != self.d_model:
            raise ValueError(f"x: expected (batch, H, W, d_model={self.d_model}) or (batch, H*W, d_model), got "
                             f"{tuple(getattr(x, 'shape', ()))}")
        if x.dim() == 4:
            if grid is not None and check_grid_hw(grid) != tuple(x.shape[1:3]):
                raise ValueError(f"grid: {tuple(grid)} does not match x of shape {tuple(x.shape)}")
            return x.shape[1], x.shape[2]
        if grid is None:
            raise ValueError(f"grid: required for a (batch, H*W, d_model) input, got x of shape {tuple(x.shape)}")
        H, W = check_grid_hw(grid)
        if x.shape[1] != H * W:
            raise ValueError(f"x: expected H*W = {H * W} tokens for grid {(H, W)}, got shape {tuple(x.shape)}")
        return H, W

    def forward(self, x: torch.Tensor, grid: tuple[int, int] | None = None) -> torch.Tensor:
        """x: (batch, H, W, d_model), or (batch, H*W, d_model) with grid=(H, W); output of the same shape."""
        H, W = self._grid(x, grid)
        batch, L, K, d = x.shape[0], H * W, len(self.directions), self.d_inner
        xz = self.in_proj(x)
        xi, z = xz.chunk(2, dim=-1)
        xi = xi.reshape(batch, H, W, d).permute(0, 3, 1, 2)  # (batch, d_inner, H, W)
        xi = self.act(self.conv2d(xi))
        xs = split_directions(xi, directions=self.directions)  # (batch, K*d_inner, L), direction order
        x_dbl = torch.einsum("bkdl,kcd->bkcl", xs.view(batch, K, d, L), self.x_proj_weight)
        dts, Bs, Cs = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=2)
        dts = torch.einsum("bkrl,kdr->bkdl", dts, self.dt_projs_weight).reshape(batch, K * d, L)
        ct = compute_dtype(xs)
        y = selective_scan(xs, dts, -torch.exp(self.A_logs.to(ct)), Bs.contiguous(), Cs.contiguous(),
                           self.Ds.to(ct), delta_bias=self.dt_projs_bias.reshape(-1).to(ct), delta_softplus=True,
                           backend=self.backend)
        y = merge_directions(y, (H, W), self.directions, "sum").transpose(1, 2)  # (batch, L, d_inner)
        y = self.out_norm(y) * self.act(z.reshape(batch, L, d))
        return self.dropout(self.out_proj(y)).reshape(x.shape[:-1] + (self.d_model,))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, d_conv={self.d_conv}, "
                f"dt_rank={self.dt_rank}, directions={self.directions}")
