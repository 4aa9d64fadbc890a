"""``Mamba``: a drop-in for ``mamba_ssm.modules.mamba_simple.Mamba`` (Mamba v1) over :func:`ditkernels.selective_scan`.

Parameter names, shapes, dtypes and initialisation are mamba-ssm's, so its state dicts load unchanged
(``d_inner = int(expand * d_model)``, ``R = dt_rank = ceil(d_model / 16)`` for ``"auto"``, ``N = d_state``):

================  ==========================  =======================================================
name              shape                       init
================  ==========================  =======================================================
in_proj.weight    (2*d_inner, d_model)        nn.Linear default (+ in_proj.bias (2*d_inner,) if bias)
conv1d.weight     (d_inner, 1, d_conv)        nn.Conv1d default, depthwise, padding d_conv - 1
conv1d.bias       (d_inner,)                  nn.Conv1d default (only with conv_bias)
x_proj.weight     (R + 2*N, d_inner)          nn.Linear default, no bias; rows are [dt | B | C]
dt_proj.weight    (d_inner, R)                U(-R**-0.5 * dt_scale, +) ("random") or that constant
dt_proj.bias      (d_inner,)                  softplus^-1(dt), dt log-uniform in [dt_min, dt_max],
                                              clamped below at dt_init_floor
A_log             (d_inner, N) float32        log(1..N) in every row (S4D-real), A = -exp(A_log)
D                 (d_inner,) float32          ones
out_proj.weight   (d_model, d_inner)          nn.Linear default (+ out_proj.bias (d_model,) if bias)
================  ==========================  =======================================================

The forward is mamba-ssm's reference path: ``in_proj -> causal depthwise conv1d -> silu -> x_proj ->
dt_proj (bias inside the scan, softplus) -> selective scan with D skip and silu(z) gate -> out_proj``.
Step-by-step decoding (``inference_params``) is not implemented.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from ..ops.selective_scan import selective_scan


def dt_bias_init(d_inner: int, dt_min: float, dt_max: float, dt_init_floor: float, **factory) -> torch.Tensor:
    """softplus^-1 of ``d_inner`` step sizes drawn log-uniformly from [dt_min, dt_max] (floored)."""
    log_lo, log_hi = math.log(dt_min), math.log(dt_max)
    dt = torch.exp(torch.rand(d_inner, **factory) * (log_hi - log_lo) + log_lo).clamp(min=dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))  # softplus(x) = dt  <=>  x = dt + log(1 - exp(-dt))


def dt_weight_init_(weight: torch.Tensor, dt_rank: int, dt_scale: float, dt_init: str) -> None:
    std = dt_rank ** -0.5 * dt_scale
    if dt_init == "constant":
        nn.init.constant_(weight, std)
    elif dt_init == "random":
        nn.init.uniform_(weight, -std, std)
    else:
        raise ValueError(f"dt_init: expected 'random' or 'constant', got {dt_init!r}")


def a_log_init(d_state: int, rows: int, device=None) -> torch.Tensor:
    """S4D-real: every row is log(1, 2, ..., d_state), float32."""
    return torch.log(torch.arange(1, d_state + 1, dtype=torch.float32, device=device)).repeat(rows, 1)


def resolve_dt_rank(dt_rank: int | str, d_model: int) -> int:
    if dt_rank == "auto":
        return math.ceil(d_model / 16)
    if isinstance(dt_rank, bool) or not isinstance(dt_rank, int) or dt_rank < 1:
        raise ValueError(f"dt_rank: expected 'auto' or a positive int, got {dt_rank!r}")
    return dt_rank


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class Mamba(nn.Module):
    """Mamba (v1) mixer: (batch, L, d_model) -> (batch, L, d_model); mamba-ssm's parameters (module docstring).

    Constructor arguments are mamba-ssm's (``use_fast_path`` is accepted and ignored: there is one
    path); ``backend`` picks the selective-scan backend (default: by device, see
    :func:`ditkernels.selective_scan`).
    """

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: float = 2,
                 dt_rank: int | str = "auto", dt_min: float = 0.001, dt_max: float = 0.1, dt_init: str = "random",
                 dt_scale: float = 1.0, dt_init_floor: float = 1e-4, conv_bias: bool = True, bias: bool = False,
                 use_fast_path: bool = True, layer_idx: int | None = None, device=None, dtype=None, *,
                 backend: str | None = None):
        factory = {"device": device, "dtype": dtype}
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_conv = d_conv
        self.expand = expand
        self.d_inner = int(expand * d_model)
        self.dt_rank = resolve_dt_rank(dt_rank, d_model)
        self.use_fast_path = use_fast_path
        self.layer_idx = layer_idx
        self.backend = backend

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=bias, **factory)
        self.conv1d = nn.Conv1d(self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner,
                                padding=d_conv - 1, bias=conv_bias, **factory)
        self.activation = "silu"
        self.act = nn.SiLU()
        self.x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * d_state, bias=False, **factory)
        self.dt_proj = nn.Linear(self.dt_rank, self.d_inner, bias=True, **factory)
        # Same order of random draws as mamba-ssm (dt weight, then dt bias), so a seed gives its init.
        dt_weight_init_(self.dt_proj.weight, self.dt_rank, dt_scale, dt_init)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt_bias_init(self.d_inner, dt_min, dt_max, dt_init_floor, **factory))
        self.dt_proj.bias._no_reinit = True
        self.A_log = nn.Parameter(a_log_init(d_state, self.d_inner, device))  # float32 whatever dtype
        self.A_log._no_weight_decay = True
        self.D = nn.Parameter(torch.ones(self.d_inner, device=device))  # float32
        self.D._no_weight_decay = True
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=bias, **factory)

    def forward(self, hidden_states: torch.Tensor, inference_params=None) -> torch.Tensor:
        """hidden_states: (batch, L, d_model) -> (batch, L, d_model)."""
        if inference_params is not None:
            raise NotImplementedError("Mamba: inference_params (step-by-step decoding) is not supported; "
                                      "call forward on the whole sequence")
        if not isinstance(hidden_states, torch.Tensor) or hidden_states.dim() != 3 \
                or hidden_states.shape[-1] != self.d_model:
            raise ValueError(f"hidden_states: expected (batch, L, d_model={self.d_model}), got "
                             f"{tuple(getattr(hidden_states, 'shape', ()))}")
        batch, seqlen, _ = hidden_states.shape
        xz = self.in_proj(hidden_states).transpose(1, 2)  # (batch, 2*d_inner, L)
        x, z = xz.chunk(2, dim=1)
        x = self.act(self.conv1d(x)[..., :seqlen])  # causal: keep the first L outputs of the padded conv
        x_dbl = self.x_proj(x.transpose(1, 2))  # (batch, L, R + 2N)
        dt, B, C = torch.split(x_dbl, [self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = (dt @ self.dt_proj.weight.t()).transpose(1, 2)  # (batch, d_inner, L); bias goes to the scan
        ct = compute_dtype(x)
        y = selective_scan(x, dt.contiguous(), -torch.exp(self.A_log.to(ct)), B.transpose(1, 2), C.transpose(1, 2),
                           self.D.to(ct), z=z, delta_bias=self.dt_proj.bias.to(ct), delta_softplus=True,
                           backend=self.backend)
        return self.out_proj(y.transpose(1, 2))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_inner={self.d_inner}, d_state={self.d_state}, d_conv={self.d_conv}, "
                f"dt_rank={self.dt_rank}")
