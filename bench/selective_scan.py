"""Selective scan (Mamba): ``ditkernels.selective_scan`` vs mamba-ssm's reference loop and mambapy.

The problem is the scan as mamba's ``Mamba`` block calls it: u, delta, z (B, D, L); A (D, N) from
``A_log`` (S4D-real init, ``A = -exp(A_log)``); B, C (B, N, L) variable; D (D,) ones;
``delta_softplus=True`` with ``delta_bias`` from mamba's ``dt_proj`` init; out = y * silu(z).

Implementations:

- ``ditkernels``: ``ditkernels.selective_scan`` with its default backend (``cpu`` on CPU tensors; on
  CUDA the fastest available), plus ``ditkernels[cuda]`` / ``ditkernels[triton]`` on CUDA machines.
- ``mamba-ref``: mamba-ssm's ``selective_scan_ref`` (mamba_ssm/ops/selective_scan_interface.py), the
  math every mamba-ssm user without the CUDA kernel runs: ``deltaA`` / ``deltaB_u`` as (B, D, L, N)
  einsums, then a Python loop over L. Written out below (mamba-ssm's package needs CUDA to import).
  The reference of the speed-up column. Its fwd+bwd row is a skip beyond small sizes: autograd
  through the loop is quadratic in L (see ``MAMBA_REF_BWD_MAX_FILL_BYTES``).
- ``mambapy``: mambapy's ``MambaBlock.selective_scan`` (``pscan``, a Blelloch parallel scan in
  PyTorch), including its (B, L, D, N) ``deltaA`` / ``BX`` and the y * silu(z) gating, fed the same
  tensors through transposed views (its layout is (B, L, D)).
- ``mamba-ssm`` (CUDA only): mamba-ssm's fused CUDA kernel, when installed.

Cases (fp32 on CPU, bf16 u/delta/z/B/C on CUDA): the issue's B=2, D=1536, L=1024, N=16 (``--quick``),
plus L 256 and 4096, N 64, D 768. ``--sizes L,L``: those sequence lengths at B=2, D=1536, N=16.

Useful FLOPs: 7 * B * D * L * N for the forward (delta*A, exp, B*(delta*u), a*h + b, y += h*C per
state element); the backward counts 2x that. ``params`` records the bytes a fused kernel must move
(fwd: u, delta, z, B, C read and out written; fwd+bwd adds dout read and du, ddelta, dz, dB, dC
written and the forward's inputs read again). The speed-up column is relative to ``mamba-ref``;
the ratio to mambapy is the quotient of the two rows' speed-ups.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from .runner import Case, SkipImpl, SweepConfig, dtype_name, register

# (B, D, L, N)
ISSUE_CASE = (2, 1536, 1024, 16)
CPU_CASES = (ISSUE_CASE, (2, 1536, 256, 16), (2, 1536, 4096, 16), (2, 1536, 1024, 64), (2, 768, 1024, 16))
CUDA_CASES = (ISSUE_CASE, (2, 1536, 4096, 16), (2, 1536, 1024, 64), (8, 1536, 2048, 16), (2, 768, 1024, 16))
GRAD_INPUTS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
FWD_FLOPS_PER_ELEMENT = 7.0  # per (batch, channel, step, state)


# ----------------------------------------------------------------------------------------------
# Peers


def mamba_selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                             return_last_state=False):
    """mamba-ssm's ``selective_scan_ref`` for real A (mamba_ssm/ops/selective_scan_interface.py).

    u, delta, z: (B, D, L); A: (D, N); B, C: (D, N) or (B, N, L) or (B, G, N, L); D, delta_bias: (D,).
    """
    dtype_in = u.dtype
    u = u.float()
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias[..., None].float()
    if delta_softplus:
        delta = F.softplus(delta)
    batch, dim, dstate = u.shape[0], A.shape[0], A.shape[1]
    is_variable_B = B.dim() >= 3
    is_variable_C = C.dim() >= 3
    B = B.float()
    C = C.float()
    x = A.new_zeros((batch, dim, dstate))
    ys = []
    deltaA = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))
    if not is_variable_B:
        deltaB_u = torch.einsum("bdl,dn,bdl->bdln", delta, B, u)
    elif B.dim() == 3:
        deltaB_u = torch.einsum("bdl,bnl,bdl->bdln", delta, B, u)
    else:
        B = B.repeat_interleave(dim // B.shape[1], dim=1)  # repeat "B G N L -> B (G H) N L"
        deltaB_u = torch.einsum("bdl,bdnl,bdl->bdln", delta, B, u)
    if is_variable_C and C.dim() == 4:
        C = C.repeat_interleave(dim // C.shape[1], dim=1)
    last_state = None
    for i in range(u.shape[2]):
        x = deltaA[:, :, i] * x + deltaB_u[:, :, i]
        if not is_variable_C:
            y = torch.einsum("bdn,dn->bd", x, C)
        elif C.dim() == 3:
            y = torch.einsum("bdn,bn->bd", x, C[:, :, i])
        else:
            y = torch.einsum("bdn,bdn->bd", x, C[:, :, :, i])
        if i == u.shape[2] - 1:
            last_state = x
        ys.append(y)
    y = torch.stack(ys, dim=2)  # (batch, dim, L)
    out = y if D is None else y + u * D[:, None]
    if z is not None:
        out = out * F.silu(z)
    out = out.to(dtype=dtype_in)
    return out if not return_last_state else (out, last_state)


def mambapy_selective_scan(u, delta, A, B, C, D, z, delta_bias):
    """mambapy's ``MambaBlock.ssm`` (non-CUDA path, ``pscan``) and its y * silu(z), on (B, D, L) views.

    Returns out as a (B, D, L) view of mambapy's (B, L, D) result.
    """
    from mambapy.pscan import pscan

    x = u.transpose(1, 2)  # (B, L, ED): the layout mambapy's block holds
    delta = F.softplus(delta.transpose(1, 2) + delta_bias)
    Bt, Ct = B.transpose(1, 2), C.transpose(1, 2)  # (B, L, N)
    deltaA = torch.exp(delta.unsqueeze(-1) * A)  # (B, L, ED, N)
    deltaB = delta.unsqueeze(-1) * Bt.unsqueeze(2)  # (B, L, ED, N)
    BX = deltaB * (x.unsqueeze(-1))  # (B, L, ED, N)
    hs = pscan(deltaA, BX)
    y = (hs @ Ct.unsqueeze(-1)).squeeze(3)  # (B, L, ED, N) @ (B, L, N, 1) -> (B, L, ED)
    y = y + D * x
    out = y * F.silu(z.transpose(1, 2))
    return out.transpose(1, 2)


# ----------------------------------------------------------------------------------------------
# Setup functions


def _args(inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    return tuple(inputs[n] for n in GRAD_INPUTS)


def _ditkernels_builder(backend: str | None) -> Callable[[dict[str, torch.Tensor]], Callable[[], torch.Tensor]]:
    def build(inputs: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
        try:
            from ditkernels import backends
            from ditkernels.ops.selective_scan import selective_scan
        except (ImportError, AttributeError) as e:
            raise SkipImpl(f"ditkernels.selective_scan is not available ({type(e).__name__}: {e}); "
                           "pip install --no-build-isolation -e .") from None
        u = inputs["u"]
        if backend is not None:
            why = backends.why_not(backend, "selective_scan", backends.Call(u.device, u.dtype))
            if why:
                raise SkipImpl(why)
        u, delta, A, B, C, D, z, bias = _args(inputs)
        fn = lambda: selective_scan(u, delta, A, B, C, D, z, bias, delta_softplus=True,  # noqa: E731
                                    backend=backend)
        name = backend or backends.resolve_for("selective_scan", u).NAME
        fn.detail = f"backend={name}"
        return fn

    return build


# Autograd through selective_scan_ref is quadratic in L: the gradient of each step's slice
# deltaA[:, :, i] (and deltaB_u[:, :, i]) is a zero-filled (B, D, L, N) tensor. Its backward is timed
# only while those fills stay below this many bytes (seconds, not minutes).
MAMBA_REF_BWD_MAX_FILL_BYTES = 2 * 2**30


def build_mamba_ref(inputs: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    u, delta, A, B, C, D, z, bias = _args(inputs)
    if u.requires_grad:
        b, d, L = u.shape
        fill = 2 * L * b * d * L * A.shape[1] * 4
        if fill > MAMBA_REF_BWD_MAX_FILL_BYTES:
            raise SkipImpl(f"backward not timed: autograd through the loop zero-fills a (B, D, L, N) gradient "
                           f"per step and tensor, {fill / 2**30:.0f} GiB here (quadratic in L)")
    fn = lambda: mamba_selective_scan_ref(u, delta, A, B, C, D, z, bias, delta_softplus=True)  # noqa: E731
    fn.detail = "Python loop over L, einsums (mamba-ssm selective_scan_ref)"
    return fn


def build_mambapy(inputs: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    try:
        import mambapy.pscan  # binds mambapy; mambapy_selective_scan needs its pscan
    except ImportError as e:
        raise SkipImpl(f"mambapy is not installed ({e}); pip install mambapy") from None
    u, delta, A, B, C, D, z, bias = _args(inputs)
    fn = lambda: mambapy_selective_scan(u, delta, A, B, C, D, z, bias)  # noqa: E731
    fn.detail = f"pscan, mambapy {getattr(mambapy, '__version__', '') or _dist_version('mambapy')}".rstrip()
    return fn


def build_mamba_ssm(inputs: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    u = inputs["u"]
    if u.device.type != "cuda":
        raise SkipImpl("mamba-ssm's selective-scan kernel is CUDA-only")
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception as e:  # noqa: BLE001 - ImportError, or its CUDA extension failing to load
        raise SkipImpl(f"mamba_ssm is not importable ({type(e).__name__}: {e}); pip install mamba-ssm") from None
    u, delta, A, B, C, D, z, bias = _args(inputs)
    fn = lambda: selective_scan_fn(u, delta, A, B, C, D, z, bias, delta_softplus=True)  # noqa: E731
    fn.detail = f"mamba_ssm {_dist_version('mamba_ssm')}"
    return fn


def _dist_version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001 - only a label
        return "?"


# ----------------------------------------------------------------------------------------------
# Cases


def _make_inputs(b: int, d: int, L: int, n: int, dtype: torch.dtype, device: torch.device):
    """Inputs as mamba's ``Mamba`` block feeds the scan (its parameter inits, random activations)."""

    def make(requires_grad: bool) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(0)

        def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
            return torch.randn(*shape, generator=g) * scale

        A_log = torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(d, 1)  # S4D real
        dt = torch.exp(torch.rand(d, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        dt = dt.clamp(min=1e-4)
        x = {
            "u": rand(b, d, L).to(dtype),
            "delta": rand(b, d, L, scale=0.5).to(dtype),  # dt_proj(x) before its bias
            "A": -torch.exp(A_log),
            "B": rand(b, n, L).to(dtype),
            "C": rand(b, n, L).to(dtype),
            "D": torch.ones(d),
            "z": rand(b, d, L).to(dtype),
            "delta_bias": dt + torch.log(-torch.expm1(-dt)),  # inverse softplus, as mamba's dt_proj.bias
        }
        return {k: v.to(device).requires_grad_(requires_grad) for k, v in x.items()}

    return make


def _bytes(b: int, d: int, L: int, n: int, itemsize: int) -> dict[str, float]:
    seq, bc = b * d * L * itemsize, b * n * L * itemsize
    fwd = 4 * seq + 2 * bc  # u, delta, z, B, C in; out
    bwd = 7 * seq + 4 * bc  # u, delta, z, dout, B, C in; du, ddelta, dz, dB, dC out
    return {"bytes_fwd": fwd, "bytes_fwdbwd": fwd + bwd}


@register("scan")
def scan_cases(cfg: SweepConfig) -> Iterator[Case]:
    if cfg.sizes is not None:
        shapes: tuple[tuple[int, int, int, int], ...] = tuple((2, 1536, L, 16) for L in cfg.sizes)
    elif cfg.quick:
        shapes = (ISSUE_CASE,)
    else:
        shapes = CUDA_CASES if cfg.is_cuda else CPU_CASES
    impls: dict[str, Any] = {"ditkernels": _ditkernels_builder(None)}
    if cfg.is_cuda:
        impls.update({"ditkernels[cuda]": _ditkernels_builder("cuda"),
                      "ditkernels[triton]": _ditkernels_builder("triton"), "mamba-ssm": build_mamba_ssm})
    impls.update({"mamba-ref": build_mamba_ref, "mambapy": build_mambapy})
    itemsize = torch.empty(0, dtype=cfg.dtype).element_size()
    for b, d, L, n in shapes:
        params: dict[str, Any] = {"B": b, "D": d, "L": L, "N": n, "dtype": dtype_name(cfg.dtype), "B_C": "variable",
                                  "D_skip": True, "z": True, "delta_bias": True, "delta_softplus": True,
                                  **_bytes(b, d, L, n, itemsize)}
        yield Case(
            name=f"B{b}-D{d}-L{L}-N{n}-{dtype_name(cfg.dtype)}",
            params=params,
            useful_flops=FWD_FLOPS_PER_ELEMENT * b * d * L * n,
            make_inputs=_make_inputs(b, d, L, n, cfg.dtype, cfg.device),
            impls=dict(impls),
            reference="mamba-ref",
            grad_inputs=GRAD_INPUTS,
            bwd_flops_factor=2.0,
        )
