"""Selective scan (Mamba, docs/spec.md §4): the plain sequential recurrence, readable and float64-capable.

``selective_scan_ref`` is mamba-ssm's ``selective_scan_ref`` (a loop over L with einsums) extended with
``initial_state``, ``reverse`` and a differentiable ``last_state``; it is built from differentiable torch
ops, so autograd through it gives the ground-truth gradients. ``selective_scan_ref_backward`` writes the
same gradients out by hand (the reference backend runs it inside a registered op, where autograd is off).

Shapes: u, delta, z: (batch, dim, L); A: (dim, N); B, C: (dim, N) constant or (batch, N, L) /
(batch, G, N, L) variable (channel d uses group d // (dim // G)); D, delta_bias: (dim,);
initial_state: (batch, dim, N).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the scan computes in: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _per_channel(X: torch.Tensor, dim: int, ct: torch.dtype) -> torch.Tensor:
    """B or C as (batch or 1, dim, N, L or 1) in the compute dtype."""
    X = X.to(ct)
    if X.dim() == 2:  # constant (dim, N)
        return X[None, :, :, None]
    if X.dim() == 3:  # (batch, N, L): one group
        X = X[:, None]
    return X.repeat_interleave(dim // X.shape[1], dim=1)


def _delta(delta: torch.Tensor, delta_bias: torch.Tensor | None, delta_softplus: bool, ct: torch.dtype):
    x = delta.to(ct)
    if delta_bias is not None:
        x = x + delta_bias.to(ct)[:, None]
    return F.softplus(x) if delta_softplus else x, x


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, initial_state=None, reverse=False):
    """out (batch, dim, L) in u.dtype, and last_state (batch, dim, N) in the compute dtype when asked.

    Computes in float32 (float64 for float64 u), like mamba-ssm's reference.
    """
    if A.is_complex():
        raise TypeError(f"A: complex A is not supported, got dtype {A.dtype}")
    ct = compute_dtype(u.dtype)
    L = u.shape[-1]
    dim = A.shape[0]
    uu = u.to(ct)
    dt, _ = _delta(delta, delta_bias, delta_softplus, ct)
    Bd, Cd = _per_channel(B, dim, ct), _per_channel(C, dim, ct)
    A = A.to(ct)
    h = u.new_zeros(u.shape[0], dim, A.shape[1], dtype=ct) if initial_state is None else initial_state.to(ct)
    # unbind once (not x[..., t] per step): its backward is one stack, not L scatters of a full tensor.
    dts, us = dt.unbind(-1), uu.unbind(-1)
    Bs, Cs = Bd.unbind(-1), Cd.unbind(-1)
    ys = [None] * L
    for t in (range(L - 1, -1, -1) if reverse else range(L)):
        dA = torch.exp(torch.einsum("bd,dn->bdn", dts[t], A))
        Bt = Bs[t if len(Bs) > 1 else 0]
        Ct = Cs[t if len(Cs) > 1 else 0]
        h = dA * h + (dts[t] * us[t])[..., None] * Bt
        ys[t] = (h * Ct).sum(-1)
    y = torch.stack(ys, dim=2)
    out = y if D is None else y + uu * D.to(ct)[:, None]
    if z is not None:
        out = out * F.silu(z.to(ct))
    out = out.to(u.dtype)
    return (out, h) if return_last_state else out


def selective_scan_ref_backward(dout, dlast, u, delta, A, B, C, D=None, z=None, delta_bias=None,
                                delta_softplus=False, initial_state=None, reverse=False):
    """Gradients of :func:`selective_scan_ref` written out, in the compute dtype.

    dout: (batch, dim, L) gradient of out; dlast: (batch, dim, N) gradient of last_state or None.
    Returns (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state) with the shapes of the
    inputs (None for absent optional inputs), in the compute dtype.
    """
    ct = compute_dtype(u.dtype)
    batch, dim, L = u.shape
    N = A.shape[1]
    uu, Ac = u.to(ct), A.to(ct)
    dt, x = _delta(delta, delta_bias, delta_softplus, ct)
    Bd, Cd = _per_channel(B, dim, ct), _per_channel(C, dim, ct)
    g_out = dout.to(ct)
    if z is not None:
        zc = z.to(ct)
        sig = torch.sigmoid(zc)
        dy = g_out * zc * sig
    else:
        dy = g_out
    order = list(range(L - 1, -1, -1)) if reverse else list(range(L))

    def at(X, t):
        return X[..., t if X.shape[-1] > 1 else 0]

    # Forward states, kept per step (this is the reference: memory is not a concern here).
    h = torch.zeros(batch, dim, N, dtype=ct, device=u.device) if initial_state is None else initial_state.to(ct)
    h_prev, decay, ys = {}, {}, torch.zeros(batch, dim, L, dtype=ct, device=u.device)
    for t in order:
        h_prev[t] = h
        decay[t] = torch.exp(dt[:, :, t, None] * Ac)
        h = decay[t] * h + (dt[:, :, t] * uu[:, :, t])[..., None] * at(Bd, t)
        ys[:, :, t] = (h * at(Cd, t)).sum(-1)

    g = torch.zeros(batch, dim, N, dtype=ct, device=u.device) if dlast is None else dlast.to(ct)
    du = torch.zeros_like(uu)
    ddt = torch.zeros_like(uu)
    dA = torch.zeros_like(Ac)
    dBd = torch.zeros(batch, dim, N, L, dtype=ct, device=u.device)
    dCd = torch.zeros(batch, dim, N, L, dtype=ct, device=u.device)
    for t in reversed(order):
        h_t = decay[t] * h_prev[t] + (dt[:, :, t] * uu[:, :, t])[..., None] * at(Bd, t)
        g = g + dy[:, :, t, None] * at(Cd, t)                       # dL/dh_t
        dCd[..., t] = dy[:, :, t, None] * h_t
        dBd[..., t] = g * (dt[:, :, t] * uu[:, :, t])[..., None]
        du[:, :, t] = dt[:, :, t] * (g * at(Bd, t)).sum(-1)
        w = g * decay[t] * h_prev[t]
        dA += (dt[:, :, t, None] * w).sum(0)
        ddt[:, :, t] = (w * Ac).sum(-1) + uu[:, :, t] * (g * at(Bd, t)).sum(-1)
        g = decay[t] * g                                             # dL/dh_{t-1}
    dinit = g if initial_state is not None else None

    def fold(dXd, X):
        """Sum per-channel gradients (batch, dim, N, L) back to the shape of B or C."""
        if X.dim() == 2:
            return dXd.sum(dim=(0, 3))
        groups = 1 if X.dim() == 3 else X.shape[1]
        folded = dXd.reshape(batch, groups, dim // groups, N, L).sum(2)
        return folded[:, 0] if X.dim() == 3 else folded

    y = ys if D is None else ys + uu * D.to(ct)[:, None]
    dz = g_out * y * sig * (1 + zc * (1 - sig)) if z is not None else None
    if D is not None:
        du = du + dy * D.to(ct)[:, None]
    dD = (dy * uu).sum(dim=(0, 2)) if D is not None else None
    ddelta = ddt * torch.where(x > 20, torch.ones_like(x), torch.sigmoid(x)) if delta_softplus else ddt
    ddelta_bias = ddelta.sum(dim=(0, 2)) if delta_bias is not None else None
    return du, ddelta, dA, fold(dBd, B), fold(dCd, C), dD, dz, ddelta_bias, dinit
