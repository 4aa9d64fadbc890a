"""Selective-scan launcher of the ``reference`` backend: plain PyTorch, any device, float64-capable.

Same contract as :mod:`ditkernels.backends.cpu_scan` (``scan_fwd`` / ``scan_bwd`` / ``saved_shape``).
The backward is the hand-written :func:`selective_scan_ref_backward` (autograd is off inside ops).
"""

from __future__ import annotations

from ..reference.selective_scan import compute_dtype, selective_scan_ref, selective_scan_ref_backward


def saved_shape(batch: int, dim: int, seqlen: int, dstate: int) -> tuple[int, ...]:
    """The reference saves nothing between forward and backward (it recomputes)."""
    return (0,)


def scan_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus: bool, reverse: bool):
    """(out (batch, dim, L) in u.dtype, last_state (batch, dim, N), saved) in the compute dtype."""
    out, last = selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, True,
                                   initial_state=initial_state, reverse=reverse)
    saved = u.new_empty(saved_shape(*u.shape, A.shape[1]), dtype=compute_dtype(u.dtype))
    return out.contiguous(), last.contiguous(), saved


def scan_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, initial_state, saved, delta_softplus: bool,
             reverse: bool):
    """(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state) in the inputs' dtypes (None if absent)."""
    grads = selective_scan_ref_backward(dout, dlast, u, delta, A, B, C, D, z, delta_bias, delta_softplus,
                                        initial_state, reverse)
    like = (u, delta, A, B, C, D, z, delta_bias, initial_state)
    return tuple(None if g is None else g.to(x.dtype).contiguous() for g, x in zip(grads, like))
