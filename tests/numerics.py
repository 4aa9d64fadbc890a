"""What the test files share: the backends they run, the comparison rule of docs/verify.md §4, inputs."""

from __future__ import annotations

import torch

# The backends the suite runs on CPU tensors (triton under TRITON_INTERPRET=1; the cuda backend's device
# code runs under the SIMT emulation in test_selective_scan_cuda.py).
ATTENTION_BACKENDS = ("reference", "cpu", "triton")
# Modules, integrations and the scan's own tests: reference and cpu (the triton scan is
# test_selective_scan_triton.py; the interpreter is too slow for whole modules).
MODULE_BACKENDS = ("reference", "cpu")


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    """||x - ref|| / ||ref|| in float64 (0 when both are all-zero)."""
    x, ref = x.double(), ref.double()
    den = ref.norm().item()
    num = (x - ref).norm().item()
    return num if den == 0 else num / den


def assert_matches(name: str, x: torch.Tensor, ref64: torch.Tensor, ref_low: torch.Tensor | None = None,
                   fp32_tol: float = 1e-5) -> None:
    """fp32/fp64: err <= fp32_tol; fp16/bf16: err <= 2 * err(reference in the same dtype) + 1e-6."""
    assert x.shape == ref64.shape, f"{name}: shape {tuple(x.shape)} != {tuple(ref64.shape)}"
    assert not torch.isnan(x).any(), f"{name}: NaN in output"
    err = rel_err(x, ref64)
    if x.dtype in (torch.float16, torch.bfloat16):
        assert ref_low is not None, f"{name}: low-precision comparison needs the low-precision reference"
        bound = 2 * rel_err(ref_low, ref64) + 1e-6
    else:
        bound = fp32_tol
    assert err <= bound, f"{name}: relative error {err:.3e} > {bound:.3e}"


def attention_lowp(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                   visible: torch.Tensor | None = None) -> torch.Tensor:
    """"The reference run in the same low dtype" of docs/verify.md §4 for attention: plain PyTorch attention
    evaluated in the inputs' dtype, as a model without a fused kernel computes it (flash-attention's
    tests call this ``attention_ref(upcast=False)``): scores ``q @ kᵀ`` in the low dtype, softmax in
    float32 rounded back to the low dtype, ``p @ v`` in the low dtype. Differentiable (autograd runs in
    the same dtypes), so the same function bounds the gradients."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    s = s.float()
    if visible is not None:
        s = s.masked_fill(~visible, float("-inf"))
    p = torch.softmax(s, -1).nan_to_num(0.0).to(q.dtype)
    return torch.matmul(p, v)


def make_qkv(b: int, h: int, sq: int, sk: int, d: int, dtype: torch.dtype, *, strided: bool = False,
             logit_scale: float = 1.0, seed: int = 0, device: str = "cpu"):
    """Random q, k, v; ``strided`` makes them transposes of (B, S, H, D) buffers like a real model's."""
    g = torch.Generator().manual_seed(seed)

    def one(s: int, mult: float = 1.0) -> torch.Tensor:
        if strided:
            t = torch.randn(b, s, h, d, generator=g, dtype=torch.float64).transpose(1, 2)
        else:
            t = torch.randn(b, h, s, d, generator=g, dtype=torch.float64)
        return (t * mult).to(device=device, dtype=dtype)

    q = one(sq, logit_scale)
    return q, one(sk, logit_scale), one(sk)
