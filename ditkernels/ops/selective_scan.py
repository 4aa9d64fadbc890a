"""Selective scan (Mamba, docs/spec.md §4).

Layers: kernels (``csrc/cpu/selective_scan.cpp``, ...) -> launchers (``ditkernels.backends.<name>_scan``,
the ``SELECTIVE_SCAN`` capability of each backend: ``scan_fwd`` / ``scan_bwd``) -> registered ops ``ditkernels::selective_scan_fwd`` /
``ditkernels::selective_scan_bwd`` (fake impls + autograd) -> :func:`selective_scan` and mamba-ssm's
positional alias :func:`selective_scan_fn`.
"""

from __future__ import annotations

from types import ModuleType

import torch

from .. import _validate
from ..backends import resolve_for
from ..reference.selective_scan import compute_dtype

MAX_DSTATE = 256

_SAVED = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state", "saved")


def _launcher(u: torch.Tensor, backend: str) -> ModuleType:
    return resolve_for("selective_scan", u, backend)


@torch.library.custom_op("ditkernels::selective_scan_fwd", mutates_args=())
def selective_scan_fwd(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                       D: torch.Tensor | None, z: torch.Tensor | None, delta_bias: torch.Tensor | None,
                       initial_state: torch.Tensor | None, delta_softplus: bool, reverse: bool,
                       backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out (batch, dim, L) in u.dtype, last_state (batch, dim, N), saved) of the selective scan.

    last_state and saved (the backend's state for the backward) are in the compute dtype.
    """
    return _launcher(u, backend).scan_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus,
                                          reverse)


@selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, reverse, backend):
    batch, dim, seqlen = u.shape
    ct = compute_dtype(u.dtype)
    saved = _launcher(u, backend).saved_shape(batch, dim, seqlen, A.shape[1])
    return u.new_empty(u.shape), u.new_empty(batch, dim, A.shape[1], dtype=ct), u.new_empty(saved, dtype=ct)


@torch.library.custom_op("ditkernels::selective_scan_bwd", mutates_args=())
def selective_scan_bwd(dout: torch.Tensor, dlast: torch.Tensor | None, u: torch.Tensor, delta: torch.Tensor,
                       A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor | None,
                       z: torch.Tensor | None, delta_bias: torch.Tensor | None, initial_state: torch.Tensor | None,
                       saved: torch.Tensor, delta_softplus: bool, reverse: bool, backend: str,
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                  torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state); an absent input's gradient is empty (0,)."""
    grads = _launcher(u, backend).scan_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, initial_state, saved,
                                           delta_softplus, reverse)
    return tuple(u.new_empty(0) if g is None else g for g in grads)


@selective_scan_bwd.register_fake
def _(dout, dlast, u, delta, A, B, C, D, z, delta_bias, initial_state, saved, delta_softplus, reverse, backend):
    return tuple(u.new_empty(0) if x is None else x.new_empty(x.shape)
                 for x in (u, delta, A, B, C, D, z, delta_bias, initial_state))


def _setup_context(ctx, inputs, output):
    u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, reverse, backend = inputs
    _, _, saved = output
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, saved)
    ctx.delta_softplus, ctx.reverse, ctx.backend = delta_softplus, reverse, backend


def _backward(ctx, d_out, d_last, d_saved):
    u, delta, A, B, C, D, z, delta_bias, initial_state, saved = ctx.saved_tensors
    grads = selective_scan_bwd(d_out, d_last, u, delta, A, B, C, D, z, delta_bias, initial_state, saved,
                               ctx.delta_softplus, ctx.reverse, ctx.backend)
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinit = (
        None if x is None else g for g, x in zip(grads, (u, delta, A, B, C, D, z, delta_bias, initial_state)))
    return du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinit, None, None, None


selective_scan_fwd.register_autograd(_backward, setup_context=_setup_context)


# --------------------------------------------------------------------------------------------------
# Validation (docs/spec.md §0: raise before any kernel runs, naming the argument).

def _tensor(name: str, t: object, ndims: tuple[int, ...]) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.is_complex():
        raise TypeError(f"{name}: complex tensors are not supported (real float32 expected), got {t.dtype}")
    if t.dim() not in ndims:
        want = " or ".join(f"{n}-D" for n in ndims)
        raise ValueError(f"{name}: expected a {want} tensor, got shape {tuple(t.shape)}")
    if t.dtype not in _validate.FLOAT_DTYPES:
        raise TypeError(f"{name}: expected dtype float16, bfloat16, float32 or float64, got {t.dtype}")
    return t


def _same_device(name: str, t: torch.Tensor, u: torch.Tensor) -> None:
    if t.device != u.device:
        raise ValueError(f"{name}: expected device {u.device} (the device of u), got {t.device}")


def _check_dtype(name: str, t: torch.Tensor, allowed: tuple[torch.dtype, ...], why: str) -> None:
    if t.dtype not in allowed:
        names = " or ".join(dict.fromkeys(str(d) for d in allowed))
        raise TypeError(f"{name}: expected dtype {names} ({why}), got {t.dtype}")


def _check_bool(name: str, v: object) -> bool:
    if not isinstance(v, bool):
        raise TypeError(f"{name}: expected a bool, got {type(v).__name__}")
    return v


def check_selective_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state) -> None:
    """Shapes, dtypes and devices of docs/spec.md §4; raises ValueError / TypeError naming the argument."""
    _tensor("u", u, (3,))
    batch, dim, seqlen = u.shape
    if batch < 1 or dim < 1 or seqlen < 1:
        raise ValueError(f"u: expected (batch, dim, L) with every size >= 1, got shape {tuple(u.shape)}")
    if isinstance(A, torch.Tensor) and A.is_complex():
        raise TypeError(f"A: complex A is not supported (real float32 (dim, N) expected), got {A.dtype}")
    weight_dtypes = (torch.float32, torch.float64) if u.dtype == torch.float64 else (torch.float32,)
    weight_why = "float64 also allowed with float64 u" if u.dtype == torch.float64 else "weights are float32"
    _tensor("delta", delta, (3,))
    _tensor("A", A, (2,))
    for name, t in (("delta", delta), ("A", A)):
        _same_device(name, t, u)
    if delta.shape != u.shape:
        raise ValueError(f"delta: expected shape {tuple(u.shape)} (the shape of u), got {tuple(delta.shape)}")
    _check_dtype("delta", delta, (u.dtype,), "the dtype of u")
    if A.shape[0] != dim:
        raise ValueError(f"A: expected shape (dim={dim}, N), got {tuple(A.shape)}")
    dstate = A.shape[1]
    if not 1 <= dstate <= MAX_DSTATE:
        raise ValueError(f"A: the state size N must be in [1, {MAX_DSTATE}], got N={dstate} (shape {tuple(A.shape)})")
    _check_dtype("A", A, weight_dtypes, weight_why)
    for name, X in (("B", B), ("C", C)):
        _tensor(name, X, (2, 3, 4))
        _same_device(name, X, u)
        if X.dim() == 2 and X.shape != (dim, dstate):
            raise ValueError(f"{name}: a constant {name} must have shape (dim, N) = {(dim, dstate)}, "
                             f"got {tuple(X.shape)}")
        if X.dim() == 3 and X.shape != (batch, dstate, seqlen):
            raise ValueError(f"{name}: a variable {name} must have shape (batch, N, L) = {(batch, dstate, seqlen)}, "
                             f"got {tuple(X.shape)}")
        if X.dim() == 4:
            groups = X.shape[1]
            if (X.shape[0], X.shape[2], X.shape[3]) != (batch, dstate, seqlen) or groups < 1 or dim % groups:
                raise ValueError(f"{name}: a grouped {name} must have shape (batch, G, N, L) = "
                                 f"({batch}, G, {dstate}, {seqlen}) with G dividing dim={dim}, got {tuple(X.shape)}")
        _check_dtype(name, X, (u.dtype, torch.float32), "the dtype of u, or float32")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is None:
            continue
        _tensor(name, t, (1,))
        _same_device(name, t, u)
        if t.shape != (dim,):
            raise ValueError(f"{name}: expected shape (dim,) = ({dim},), got {tuple(t.shape)}")
        _check_dtype(name, t, weight_dtypes, weight_why)
    if z is not None:
        _tensor("z", z, (3,))
        _same_device("z", z, u)
        if z.shape != u.shape:
            raise ValueError(f"z: expected shape {tuple(u.shape)} (the shape of u), got {tuple(z.shape)}")
        _check_dtype("z", z, (u.dtype,), "the dtype of u")
    if initial_state is not None:
        _tensor("initial_state", initial_state, (3,))
        _same_device("initial_state", initial_state, u)
        if initial_state.shape != (batch, dim, dstate):
            raise ValueError(f"initial_state: expected shape (batch, dim, N) = {(batch, dim, dstate)}, "
                             f"got {tuple(initial_state.shape)}")
        _check_dtype("initial_state", initial_state, (torch.float32, compute_dtype(u.dtype)), "the state dtype")


# --------------------------------------------------------------------------------------------------
# Public functions.

def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                   D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                   delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                   return_last_state: bool = False, *, initial_state: torch.Tensor | None = None,
                   reverse: bool = False, backend: str | None = None):
    """Mamba's selective scan: ``h_t = exp(delta'_t A) h_{t-1} + delta'_t B_t u_t``, ``y_t = <h_t, C_t> + D u_t``.

    u, delta, z: (batch, dim, L), one dtype (float16 / bfloat16 / float32; float64 on reference and cpu).
    A: (dim, N) real float32, N <= 256. B, C: (dim, N) constant, or (batch, N, L) / (batch, G, N, L)
    variable with G dividing dim (channel d uses group d // (dim // G)); u's dtype or float32.
    D, delta_bias: (dim,) float32. initial_state: (batch, dim, N) float32 (h before the first step).
    delta_softplus: ``delta' = softplus(delta + delta_bias)`` instead of ``delta + delta_bias``.
    reverse: run t from L-1 down to 0 (the same as flipping every L-axis input and the output).
    backend: ``"reference"``, ``"cpu"``, ``"triton"`` or ``"cuda"``; default: by device, or ``DITKERNELS_BACKEND``.

    Math is float32 (float64 for float64 u). Returns out (batch, dim, L) in u.dtype (times silu(z) when
    z is given), and with ``return_last_state`` also last_state (batch, dim, N) float32 (float64 for
    float64 u). Differentiable in every tensor argument, including through last_state and into
    initial_state.
    """
    check_selective_scan_args(u, delta, A, B, C, D, z, delta_bias, initial_state)
    delta_softplus = _check_bool("delta_softplus", delta_softplus)
    return_last_state = _check_bool("return_last_state", return_last_state)
    reverse = _check_bool("reverse", reverse)
    backend = _validate.check_backend(backend)
    out, last_state, _ = selective_scan_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus,
                                            reverse, backend)
    return (out, last_state) if return_last_state else out


def selective_scan_fn(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                      D: torch.Tensor | None = None, z: torch.Tensor | None = None,
                      delta_bias: torch.Tensor | None = None, delta_softplus: bool = False,
                      return_last_state: bool = False):
    """mamba-ssm's ``selective_scan_fn`` signature over :func:`selective_scan` (default backend)."""
    return selective_scan(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


__all__ = ["selective_scan", "selective_scan_fn", "check_selective_scan_args"]
