"""Dense attention through the flash-attention core.

Layers: backend kernels (``ditkernels.backends.*.flash_fwd/flash_bwd``) -> registered ops
``ditkernels::attention_fwd`` / ``ditkernels::attention_bwd`` (fake impls + autograd) ->
:func:`attention`.
"""

from __future__ import annotations

import torch

from .. import _validate
from ..backends import resolve_for


def _backend(q: torch.Tensor, backend: str):
    return resolve_for("attention", q, backend, head_dim=q.shape[-1])


@torch.library.custom_op("ditkernels::attention_fwd", mutates_args=())
def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                  backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, H, Sq, D) in q.dtype and lse (B, H, Sq) float32 of dense softmax attention."""
    return _backend(q, backend).flash_fwd(q, k, v, scale=scale)


@attention_fwd.register_fake
def _(q, k, v, scale, backend):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("ditkernels::attention_bwd", mutates_args=())
def attention_bwd(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
                  lse: torch.Tensor, scale: float, backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (dq, dk, dv) of dense attention given the gradient ``do`` of its output."""
    return _backend(q, backend).flash_bwd(do.contiguous(), q, k, v, out, lse, scale=scale)


@attention_bwd.register_fake
def _(do, q, k, v, out, lse, scale, backend):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    q, k, v, scale, backend = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale
    ctx.backend = backend


def _backward(ctx, d_out, d_lse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = attention_bwd(d_out, q, k, v, out, lse, ctx.scale, ctx.backend)
    return dq, dk, dv, None, None


attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None,
              return_lse: bool = False, backend: str | None = None):
    """Dense softmax attention, ``softmax(q kᵀ · scale) v``, through the flash-attention core.

    q: (batch, heads, seq_q, head_dim); k, v: (batch, heads, seq_k, head_dim); any strides;
    float16 / bfloat16 / float32 (float64 on the reference and cpu backends); head_dim 1..256.
    scale: defaults to ``head_dim ** -0.5``.
    return_lse: also return the natural-log log-sum-exp of the scaled scores, float32
    (batch, heads, seq_q). It is not differentiable (it is returned detached).
    backend: ``"reference"``, ``"cpu"`` or ``"triton"``; default: by device, or ``DITKERNELS_BACKEND``.

    Returns out (batch, heads, seq_q, head_dim) in q.dtype, or (out, lse) with ``return_lse``.
    Differentiable with respect to q, k and v.
    """
    _validate.check_qkv(q, k, v)
    scale = _validate.check_scale(scale, q.shape[-1])
    backend = _validate.check_backend(backend)
    out, lse = attention_fwd(q, k, v, scale, backend)
    return (out, lse.detach()) if return_lse else out
