"""Dense attention: ``ditkernels.attention`` vs SDPA vs FlexAttention (``torch.compile``d).

Shapes: q, k, v (B=1, H=8, S, D=64); S in {1024, 2048, 4096} on CPU (fp32) and up to 16384 on
CUDA (bf16). ``--quick``: S in {1024, 4096} on CPU, {4096, 16384} on CUDA. Useful FLOPs of the
forward: 4 * B * H * Sq * Sk * D (every pair is visible); fwd+bwd counts 3.5x that.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F

from .runner import Case, SkipImpl, SweepConfig, dtype_name, register

BATCH, HEADS, HEAD_DIM = 1, 8, 64
CPU_SEQS, CPU_QUICK_SEQS = (1024, 2048, 4096), (1024, 4096)
CUDA_SEQS, CUDA_QUICK_SEQS = (1024, 2048, 4096, 8192, 16384), (4096, 16384)

_flex_compiled: Callable[..., torch.Tensor] | None = None


def _qkv(inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return inputs["q"], inputs["k"], inputs["v"]


def build_ditkernels(inputs: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    try:
        import ditkernels

        attention = ditkernels.attention
    except (ImportError, AttributeError) as e:
        raise SkipImpl(f"ditkernels.attention is not available ({type(e).__name__}: {e}); "
                       "pip install --no-build-isolation -e .") from None
    q, k, v = _qkv(inputs)
    fn = lambda: attention(q, k, v)  # noqa: E731
    fn.detail = _ditkernels_backend(q)
    return fn


def _ditkernels_backend(q: torch.Tensor) -> str | None:
    """Which backend ``ditkernels.attention`` dispatches ``q`` to (recorded with the row)."""
    try:
        from ditkernels.backends import resolve_for

        return "backend=" + resolve_for("attention", q, head_dim=q.shape[-1]).NAME
    except Exception as e:  # noqa: BLE001 - the call itself will report a real failure
        return f"backend=? ({type(e).__name__})"


def build_sdpa(inputs: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    q, k, v = _qkv(inputs)
    return lambda: F.scaled_dot_product_attention(q, k, v)


def _flex() -> Callable[..., torch.Tensor]:
    global _flex_compiled
    if _flex_compiled is None:
        try:
            from torch.nn.attention.flex_attention import flex_attention
        except ImportError as e:
            raise SkipImpl(f"torch {torch.__version__} has no FlexAttention ({e})") from None
        # One static-shape graph per sequence length: allow more than dynamo's default 8 recompiles.
        cfg = torch._dynamo.config
        cfg.recompile_limit = max(getattr(cfg, "recompile_limit", 8), 64)
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    return _flex_compiled


def flex_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              block_mask: Callable[[], Any] | None = None) -> Callable[[], torch.Tensor]:
    """The compiled FlexAttention bound to q, k, v and the BlockMask ``block_mask()`` builds (kept as
    ``fn.block_mask``, built outside the timing). Compiles here with a first call, so a missing backward
    on CPU or a compiler failure is a skip with its reason."""
    if q.device.type == "cpu" and q.requires_grad:
        raise SkipImpl(f"FlexAttention has no backward on CPU (torch {torch.__version__})")
    flex = _flex()
    bm = None if block_mask is None else block_mask()
    kw = {} if bm is None else {"block_mask": bm}
    try:
        out = flex(q, k, v, **kw)
    except Exception as e:  # noqa: BLE001 - reported as the skip reason
        first = next((line for line in str(e).splitlines() if line.strip()), "")
        raise SkipImpl(f"torch.compile(flex_attention) failed: {type(e).__name__}: {first}") from None
    _check_flex(out, q, k, v, bm)
    fn = lambda: flex(q, k, v, **kw)  # noqa: E731
    fn.block_mask = bm
    return fn


FLEX_CHECK_ROWS = 64


def _check_flex(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: Any) -> None:
    """Skips a compiled FlexAttention whose output is wrong: its first FLEX_CHECK_ROWS query rows against
    float64 SDPA under the same mask (``create_mask`` of the BlockMask's mask_mod). Compiled Flex has been
    measured wrong on CPU: torch 2.13.0+cpu under ``ATEN_CPU_CAPABILITY=avx2`` (``--emulate-isa avx2``) on an
    AVX-512 Xeon gave a relative error of 0.89 on local attention, and ran 1.6x faster than with AVX-512."""
    n = min(q.shape[2], FLEX_CHECK_ROWS)
    mask = None
    if block_mask is not None:
        from torch.nn.attention.flex_attention import create_mask

        mask = create_mask(block_mask.mask_mod, q.shape[0], q.shape[1], n, k.shape[2], device=q.device)
    with torch.no_grad():
        ref = F.scaled_dot_product_attention(q[:, :, :n].double(), k.double(), v.double(), attn_mask=mask)
        ref = ref.nan_to_num()  # a row without a visible key: Flex gives 0, SDPA NaN
        err = ((out[:, :, :n].double() - ref).norm() / ref.norm().clamp_min(1e-30)).item()
    tol = 1e-4 if q.dtype == torch.float32 else 3e-2
    if not err <= tol:
        raise SkipImpl(f"compiled FlexAttention is wrong here: rel. err {err:.2g} on its first {n} query rows vs "
                       f"SDPA with the same mask (torch {torch.__version__}, CPU capability "
                       f"{torch.backends.cpu.get_cpu_capability()}); not timed")


def build_flex(inputs: dict[str, torch.Tensor]) -> Callable[[], torch.Tensor]:
    fn = flex_call(*_qkv(inputs))
    fn.detail = "torch.compile(dynamic=False)"
    return fn


def _make_inputs(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Callable[[bool], dict[str, torch.Tensor]]:
    def make(requires_grad: bool) -> dict[str, torch.Tensor]:
        return {n: torch.randn(shape, dtype=dtype, device=device).requires_grad_(requires_grad) for n in "qkv"}

    return make


@register("attention.dense")
def dense_cases(cfg: SweepConfig) -> Iterator[Case]:
    if cfg.sizes is not None:
        seqs: tuple[int, ...] = tuple(cfg.sizes)
    elif cfg.is_cuda:
        seqs = CUDA_QUICK_SEQS if cfg.quick else CUDA_SEQS
    else:
        seqs = CPU_QUICK_SEQS if cfg.quick else CPU_SEQS
    for s in seqs:
        params: dict[str, Any] = {"B": BATCH, "H": HEADS, "Sq": s, "Sk": s, "D": HEAD_DIM, "dtype": dtype_name(cfg.dtype)}
        yield Case(
            name=f"B{BATCH}-H{HEADS}-S{s}-D{HEAD_DIM}-{dtype_name(cfg.dtype)}",
            params=params,
            useful_flops=4.0 * BATCH * HEADS * s * s * HEAD_DIM,
            make_inputs=_make_inputs((BATCH, HEADS, s, HEAD_DIM), cfg.dtype, cfg.device),
            impls={"ditkernels": build_ditkernels, "sdpa": build_sdpa, "flex": build_flex},
            reference="sdpa",
            grad_inputs=("q", "k", "v"),
        )
