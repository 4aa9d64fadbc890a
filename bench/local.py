"""Local-window attention: ``ditkernels.local_attention`` vs SDPA (dense), FlexAttention with the
mask_mod of CLEAR's released code (``torch.compile``d), and NATTEN (square windows).

Shapes: q, k, v (B=1, H=8, S, D=64) with S = text + prod(grid). CPU (fp32): a 64x64 grid with a
radius-8 circle (the issue's bar), the same with 256 text tokens, and NATTEN's square/shift window
of the same radius. CUDA (bf16): 128x128 and 256x256 grids, radius 16. ``--sizes N``: an N x N grid.
Useful FLOPs: 4 * B * H * D * (visible query-key pairs). Each case records the computed / useful
pairs of the ditkernels plan and of FlexAttention's block mask (``params``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from .attention import _make_inputs, _qkv, build_sdpa, flex_call
from .runner import Case, SkipImpl, SweepConfig, dtype_name, register

BATCH, HEADS, HEAD_DIM = 1, 8, 64
# (grid side, radius, shape, border, text tokens)
CPU_CASES = ((64, 8, "circle", "clip", 0), (64, 8, "circle", "clip", 256), (64, 8, "square", "shift", 0))
CPU_QUICK = ((64, 8, "circle", "clip", 0), (64, 8, "square", "shift", 0))
CUDA_CASES = ((64, 8, "circle", "clip", 0), (128, 16, "circle", "clip", 0), (256, 16, "circle", "clip", 0),
              (128, 16, "circle", "clip", 512), (128, 8, "square", "shift", 0))
CUDA_QUICK = ((128, 16, "circle", "clip", 0), (128, 8, "square", "shift", 0))


def _clear_mask_mod(width: int, text: int, r: int):
    """CLEAR's mask_mod: text tokens first, then the raster image; circle ``dy^2 + dx^2 < r^2``."""

    def mask_mod(b, h, q_idx, kv_idx):
        qy, qx = (q_idx - text) // width, (q_idx - text) % width
        ky, kx = (kv_idx - text) // width, (kv_idx - text) % width
        return (q_idx < text) | (kv_idx < text) | ((qy - ky) ** 2 + (qx - kx) ** 2 < r * r)

    return mask_mod


def _natten_mask_mod(height: int, width: int, text: int, r: int):
    """NATTEN's shifted square window as a mask_mod (same tokens as ``na2d(kernel_size=2r+1)``)."""
    k = 2 * r + 1

    def start(p, n):
        return (p - r).clamp(0, n - k) if n >= k else p * 0

    def mask_mod(b, h, q_idx, kv_idx):
        qy, qx = (q_idx - text) // width, (q_idx - text) % width
        ky, kx = (kv_idx - text) // width, (kv_idx - text) % width
        sy, sx = start(qy, height), start(qx, width)
        ky_ok = (ky >= sy) & (ky < sy + k) if height >= k else ky >= 0
        kx_ok = (kx >= sx) & (kx < sx + k) if width >= k else kx >= 0
        return (q_idx < text) | (kv_idx < text) | (ky_ok & kx_ok)

    return mask_mod


def _builders(side: int, r: int, shape: str, border: str, text: int) -> dict[str, Callable]:
    grid = (side, side)

    def build_ditkernels(inputs):
        import ditkernels
        from ditkernels.backends import DENSE_REFERENCE, FWD_COUNTERS, has, resolve_for
        from ditkernels.ops.local import kernel_plan
        from ditkernels.reference.local import LocalSpec

        q, k, v = _qkv(inputs)
        mod = resolve_for("local_attention", q)
        if has(mod, DENSE_REFERENCE):
            raise SkipImpl(f"no fast ditkernels backend runs {q.device.type} tensors in this process: the dense "
                           "reference would be measured")
        plan = kernel_plan(LocalSpec.make(grid, r, shape=shape, border=border, num_prefix=text), mod,
                           q.shape[-1], q.dtype)
        fn = lambda: ditkernels.local_attention(q, k, v, grid, r, shape=shape, border=border,  # noqa: E731
                                                num_prefix=text)
        fn.detail = (f"backend={mod.NAME} tiles q{plan.q_tile[1:]} kv{plan.kv_tile[1:]} "
                     f"whole-tile pairs/useful={plan.computed_pairs / plan.useful_pairs:.2f}")
        if has(mod, FWD_COUNTERS):
            fn()  # the kernel's own count of the pairs it computed after trimming partial visits
            kernel_pairs = mod.last_fwd_pairs() / (q.shape[0] * q.shape[1])
            fn.detail += f", computed (trimmed visits)/useful={kernel_pairs / plan.useful_pairs:.2f}"
        return fn

    def build_flex(inputs):
        q, k, v = _qkv(inputs)
        seq = q.shape[2]

        def block_mask():
            from torch.nn.attention.flex_attention import create_block_mask

            mm = _clear_mask_mod(side, text, r) if shape == "circle" else _natten_mask_mod(side, side, text, r)
            return create_block_mask(mm, B=None, H=None, Q_LEN=seq, KV_LEN=seq, device=q.device)

        fn = flex_call(q, k, v, block_mask)
        computed = (1.0 - fn.block_mask.sparsity() / 100.0) * seq * seq
        fn.detail = f"torch.compile, mask_mod={'CLEAR' if shape == 'circle' else 'NATTEN'} " \
                    f"block mask computed/useful={computed / _useful(side, r, shape, border, text):.2f}"
        return fn

    def build_natten(inputs):
        if shape != "square" or border != "shift" or text:
            raise SkipImpl("NATTEN computes square shifted windows without global tokens only")
        try:
            import natten
        except ImportError as e:
            raise SkipImpl(f"natten is not installed ({e}); pip install natten") from None
        q, k, v = _qkv(inputs)

        def lay(t):  # (B, H, S, D) -> (B, side, side, H, D), NATTEN's layout, made once outside the timing
            return t.detach().transpose(1, 2).reshape(t.shape[0], side, side, t.shape[1], t.shape[3]) \
                .contiguous().requires_grad_(t.requires_grad)

        nq, nk, nv = lay(q), lay(k), lay(v)

        def fn():
            out = natten.functional.na2d(nq, nk, nv, kernel_size=2 * r + 1)
            return out.reshape(out.shape[0], side * side, out.shape[3], out.shape[4]).transpose(1, 2)

        try:
            fn()
        except Exception as e:  # noqa: BLE001
            raise SkipImpl(f"natten.functional.na2d cannot run here: {type(e).__name__}: {e}") from None
        fn.detail = f"natten {getattr(natten, '__version__', '?')}"
        return fn

    return {"ditkernels": build_ditkernels, "sdpa": build_sdpa, "flex": build_flex, "natten": build_natten}


def _useful(side: int, r: int, shape: str, border: str, text: int) -> int:
    from ditkernels.ops.local import local_attention_plan

    return local_attention_plan((side, side), r, shape=shape, border=border, num_prefix=text).useful_pairs


@register("attention.local")
def local_cases(cfg: SweepConfig) -> Iterator[Case]:
    from ditkernels.ops.local import local_attention_plan

    if cfg.is_cuda:
        cases = CUDA_QUICK if cfg.quick else CUDA_CASES
    else:
        cases = CPU_QUICK if cfg.quick else CPU_CASES
    if cfg.sizes is not None:
        cases = tuple((n, r, s, b, t) for n in cfg.sizes for (_, r, s, b, t) in cases[:1])
    for side, r, shape, border, text in cases:
        seq = text + side * side
        plan = local_attention_plan((side, side), r, shape=shape, border=border, num_prefix=text)
        params: dict[str, Any] = {
            "B": BATCH, "H": HEADS, "D": HEAD_DIM, "grid": [side, side], "window": r, "shape": shape,
            "border": border, "text": text, "seq": seq, "dtype": dtype_name(cfg.dtype),
            "useful_pairs": plan.useful_pairs, "plan_computed_pairs": plan.computed_pairs,
            "plan_computed_over_useful": round(plan.computed_pairs / plan.useful_pairs, 3),
            "plan_q_tile": list(plan.q_tile[1:]), "plan_kv_tile": list(plan.kv_tile[1:]),
            "dense_over_useful": round(seq * seq / plan.useful_pairs, 3),
        }
        tag = f"{shape}-{border}" if shape == "square" else shape
        yield Case(
            name=f"B{BATCH}-H{HEADS}-{side}x{side}-r{r}-{tag}-T{text}-D{HEAD_DIM}-{dtype_name(cfg.dtype)}",
            params=params,
            useful_flops=4.0 * BATCH * HEADS * HEAD_DIM * plan.useful_pairs,
            make_inputs=_make_inputs((BATCH, HEADS, seq, HEAD_DIM), cfg.dtype, cfg.device),
            impls=_builders(side, r, shape, border, text),
            reference="sdpa",
            grad_inputs=("q", "k", "v"),
        )
