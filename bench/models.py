"""Model presets: the attention call of real DiTs, ``python -m ditkernels bench --model NAME``.

Each preset is one self-attention (or joint text + image attention) call of a published model at a
published resolution: batch, heads, head_dim, the image / video token grid after the VAE and the
patch embedding, and the text tokens that join the call (FLUX, SD3, CogVideoX, HunyuanVideo put
them in the same sequence; DiT, PixArt and Wan attend text in a separate cross-attention, so their
self-attention has none). The numbers are those of each model's ``transformer/config.json`` (cited
per preset; copied by hand: this machine cannot download them) and of its pipeline defaults.

One case per preset, family ``model``, with every implementation on the same q, k, v:
``sdpa`` (dense, the reference), ``ditkernels`` (dense, our flash core), ``local-r{8,16,32}``
(CLEAR's circles; its paper uses r = 8, 16, 32 on FLUX at 1024 px, a 64x64 token grid; a radius
whose window covers the whole grid is left out), ``local-sq-r8`` with ``natten-r8`` (NATTEN's
shifted square window, no global tokens), ``flex-local-r16`` (compiled FlexAttention with CLEAR's
mask_mod, at the middle radius), ``block-topk-10%`` (blocks of 64 tokens that are image tiles, 8x8 on a 2-D grid; top 10 % of
the key blocks) and ``re-sparse`` (Re-ttention's sparse step with the band mask of its released code at
3.1 % density; inference only). Text tokens are global tokens of every sparse op. Video grids use
the same radii in space and ``max(1, r // 4)`` latent frames in time (our choice: CLEAR has no video
setting).

``--scale`` (default ``auto`` on CPU, ``none`` on CUDA) shrinks the call so that a dense forward is
at most ``CPU_DENSE_FLOPS`` (a preset then runs in about a minute on 2 CPU cores): first the batch
(to 1), then the heads (to one per thread: at one head SDPA's CPU backward is 30-40x its forward), then
the latent frames of a video (to 2), then the rows of the token grid
(the last resort, for FLUX / PixArt at 2048-4096 px: the window of a local op keeps its size but
the dense cost shrinks with the grid, so speed-ups are lower than at the full grid). ``--scale
heads=2,frames=3`` sets them by hand. The table's header and the ``sdpa`` row say what was scaled.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch

from .attention import _make_inputs, _qkv, build_sdpa, flex_call
from .runner import Case, SkipImpl, SweepConfig, dtype_name, register

CLEAR_RADII = (8, 16, 32)
CPU_DENSE_FLOPS = 24e9  # dense forward FLOPs of one scaled preset call on CPU (about 0.2 s on 2 cores)
TOPK_DENSITY = 0.1
BLOCK = 64


@dataclass(frozen=True)
class Preset:
    """One attention call of a model. grid: image (H, W) or video (T, H, W) tokens after patching.
    text: text tokens in the same call, before (``text_first``) or after the grid."""

    name: str
    model: str
    config: str
    resolution: str
    batch: int
    heads: int
    head_dim: int
    grid: tuple[int, ...]
    text: int = 0
    text_first: bool = True
    layers: str = ""
    why: str = ""  # how the grid and text follow from the config

    @property
    def seq(self) -> int:
        return self.text + math.prod(self.grid)

    @property
    def num_prefix(self) -> int:
        return self.text if self.text_first else 0

    @property
    def num_suffix(self) -> int:
        return 0 if self.text_first else self.text

    def dense_flops(self) -> float:
        return 4.0 * self.batch * self.heads * self.seq * self.seq * self.head_dim

    def shape(self) -> str:
        g = "x".join(map(str, self.grid))
        t = "" if not self.text else (f"{self.text}+{g}" if self.text_first else f"{g}+{self.text}")
        return f"B{self.batch} H{self.heads} S{self.seq} ({t or g}) D{self.head_dim}"


def _image(name, model, config, px, heads, head_dim, *, vae=8, patch=2, text=0, text_first=True, batch=2,
           layers="", why=""):
    side = px // vae // patch
    return Preset(name, model, config, f"{px}x{px} px", batch, heads, head_dim, (side, side), text, text_first,
                  layers, why or f"{px} px / VAE {vae} / patch {patch} = {side}x{side} tokens")


# Batch 2 = classifier-free guidance's two halves in one call; 1 for the guidance-distilled FLUX.1-dev
# and HunyuanVideo (guidance is an embedding there).
PRESETS: dict[str, Preset] = {p.name: p for p in [
    # facebook/DiT-XL-2-256 and DiT-XL-2-512 transformer/config.json: num_attention_heads 16,
    # attention_head_dim 72, num_layers 28, patch_size 2, sample_size 32 / 64 (VAE 8x); class-conditional,
    # no text tokens.
    _image("dit-xl-256", "DiT-XL/2", "facebook/DiT-XL-2-256 transformer/config.json", 256, 16, 72, layers="28"),
    _image("dit-xl-512", "DiT-XL/2", "facebook/DiT-XL-2-512 transformer/config.json", 512, 16, 72, layers="28"),
    # PixArt-alpha/PixArt-Sigma-XL-2-1024-MS and PixArt-Sigma-XL-2-2K-MS transformer/config.json:
    # num_attention_heads 16, attention_head_dim 72, num_layers 28, patch_size 2, sample_size 128 / 256;
    # text (300 T5 tokens) is a separate cross-attention.
    _image("pixart-sigma-1024", "PixArt-Sigma", "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS transformer/config.json",
           1024, 16, 72, layers="28"),
    _image("pixart-sigma-2048", "PixArt-Sigma", "PixArt-alpha/PixArt-Sigma-XL-2-2K-MS transformer/config.json",
           2048, 16, 72, layers="28"),
    # stabilityai/stable-diffusion-3.5-large transformer/config.json: num_attention_heads 38,
    # attention_head_dim 64, num_layers 38, patch_size 2, sample_size 128; joint attention with
    # 77 CLIP + 256 T5 tokens (pipeline max_sequence_length 256) appended after the image tokens.
    _image("sd35-large", "SD3.5-large", "stabilityai/stable-diffusion-3.5-large transformer/config.json", 1024,
           38, 64, text=77 + 256, text_first=False, layers="38"),
    # black-forest-labs/FLUX.1-dev transformer/config.json: num_attention_heads 24, attention_head_dim 128,
    # num_layers 19 + num_single_layers 38; 16-channel latents packed 2x2 (16 px per token); 512 T5 tokens
    # (pipeline max_sequence_length 512) before the image tokens.
    *[_image(f"flux-dev-{px}", "FLUX.1-dev", "black-forest-labs/FLUX.1-dev transformer/config.json", px, 24, 128,
             text=512, batch=1, layers="19 double + 38 single") for px in (1024, 2048, 4096)],
    # THUDM/CogVideoX-5b transformer/config.json: num_attention_heads 48, attention_head_dim 64,
    # num_layers 42, patch_size 2, sample_frames 49, sample_height 60, sample_width 90 (720x480 px),
    # temporal_compression_ratio 4, max_text_seq_length 226 (text before the video tokens).
    Preset("cogvideox-5b", "CogVideoX-5B", "THUDM/CogVideoX-5b transformer/config.json", "720x480 px, 49 frames",
           2, 48, 64, (13, 30, 45), 226, True, "42",
           "49 frames / 4 -> 13 latent frames; 480x720 px / VAE 8 / patch 2 = 30x45"),
    # hunyuanvideo-community/HunyuanVideo transformer/config.json: num_attention_heads 24, attention_head_dim
    # 128, num_layers 20 + num_single_layers 40, patch_size 2, patch_size_t 1; VAE 4x time, 8x space;
    # 256 LLaMA text tokens appended after the video tokens.
    Preset("hunyuanvideo-720p", "HunyuanVideo", "hunyuanvideo-community/HunyuanVideo transformer/config.json",
           "1280x720 px, 129 frames", 1, 24, 128, (33, 45, 80), 256, False, "20 double + 40 single",
           "(129 - 1) / 4 + 1 = 33 latent frames; 720x1280 px / VAE 8 / patch 2 = 45x80"),
    # Wan-AI/Wan2.1-T2V-14B-Diffusers transformer/config.json: num_attention_heads 40, attention_head_dim 128,
    # num_layers 40, patch_size [1, 2, 2]; VAE 4x time, 8x space; text (512 umT5 tokens) is a cross-attention.
    Preset("wan2.1-14b-720p", "Wan2.1-14B", "Wan-AI/Wan2.1-T2V-14B-Diffusers transformer/config.json",
           "1280x720 px, 81 frames", 2, 40, 128, (21, 45, 80), 0, True, "40",
           "(81 - 1) / 4 + 1 = 21 latent frames; 720x1280 px / VAE 8 / patch 2 = 45x80"),
]}


# ----------------------------------------------------------------------------------------------
# Scaling


def parse_scale(text: str | None) -> str | dict[str, int]:
    """``"auto"``, ``"none"`` or ``{"batch"|"heads"|"frames"|"rows": n}`` from ``"heads=2,frames=3"``."""
    if text is None or text in ("auto", "none"):
        return text or "auto"
    out: dict[str, int] = {}
    for part in text.split(","):
        key, sep, val = part.partition("=")
        key = key.strip()
        if not sep or key not in ("batch", "heads", "frames", "rows") or not val.strip().isdigit() or int(val) < 1:
            raise ValueError(f"--scale: expected auto, none or KEY=N[,KEY=N] with KEY in batch, heads, frames, rows "
                             f"and N >= 1, got {text!r}")
        out[key] = int(val)
    return out


def scaled(p: Preset, scale: str | dict[str, int], budget: float = CPU_DENSE_FLOPS) -> tuple[Preset, list[str]]:
    """The preset shrunk by ``scale`` (see the module docstring) and what was changed, e.g. ``["heads 24->1"]``."""
    if scale == "none":
        return p, []
    video = len(p.grid) == 3

    def with_(q: Preset, key: str, n: int) -> Preset:
        if key == "batch":
            return replace(q, batch=min(n, q.batch))
        if key == "heads":
            return replace(q, heads=min(n, q.heads))
        if key == "frames":
            return replace(q, grid=(min(n, q.grid[0]), *q.grid[1:])) if video else q
        return replace(q, grid=(*q.grid[:-2], min(n, q.grid[-2]), q.grid[-1]))

    q = p
    if isinstance(scale, dict):
        for key, n in scale.items():
            q = with_(q, key, n)
    else:
        q = with_(q, "batch", 1)
        # keep a head per thread: at one head, SDPA's CPU fwd+bwd took 30-40x its forward here (2 threads;
        # 3-6x with a head per thread), which would inflate every fwd+bwd speed-up
        heads_floor = min(q.heads, max(1, torch.get_num_threads()))
        for key, floor in (("heads", heads_floor), ("frames", 2), ("rows", 1)):
            if key == "frames" and not video:
                continue
            dim = {"heads": q.heads, "frames": q.grid[0], "rows": q.grid[-2]}[key]
            while dim > floor and q.dense_flops() > budget:
                dim -= 1
                q = with_(q, key, dim)
    changes = []
    if q.batch != p.batch:
        changes.append(f"batch {p.batch}->{q.batch}")
    if q.heads != p.heads:
        changes.append(f"heads {p.heads}->{q.heads}")
    if video and q.grid[0] != p.grid[0]:
        changes.append(f"frames {p.grid[0]}->{q.grid[0]}")
    if q.grid[-2] != p.grid[-2]:
        changes.append(f"grid rows {p.grid[-2]}->{q.grid[-2]}")
    return q, changes


def describe(p: Preset, changes: list[str], scale_arg: str) -> str:
    """Two lines for the table header: the model's call (full size) and what was run (scaled)."""
    full = PRESETS[p.name]
    line = (f"{p.name}: {p.model} at {p.resolution}, {p.layers} layers ({p.config}); one attention call "
            f"{full.shape()}")
    if not changes:
        return line + "\n  run at full size"
    return line + f"\n  run scaled (--scale {scale_arg}): {', '.join(changes)} -> {p.shape()}"


# ----------------------------------------------------------------------------------------------
# Implementations


def radii(p: Preset) -> list[int]:
    """CLEAR's radii whose window does not cover the whole grid."""
    return [r for r in CLEAR_RADII if 2 * r - 1 < max(p.grid[-2:])]


def window(p: Preset, r: int) -> int | tuple[int, ...]:
    return (max(1, r // 4), r, r) if len(p.grid) == 3 else r


def _clear_mask_mod(p: Preset, win: int | tuple[int, ...]):
    """CLEAR's circle as a FlexAttention mask_mod for any grid and text placement (exact integers:
    ``sum d_i^2 * (R / r_i^2) < R`` with ``R = prod r_i^2``)."""
    rs = win if isinstance(win, tuple) else (win,) * len(p.grid)
    big = math.prod(r * r for r in rs)
    weights = [big // (r * r) for r in rs]
    start, n = p.num_prefix, math.prod(p.grid)
    strides = [math.prod(p.grid[i + 1:]) for i in range(len(p.grid))]

    def coords(idx):
        rel = idx - start
        return [(rel // s) % g for s, g in zip(strides, p.grid)]

    def mask_mod(b, h, q_idx, kv_idx):
        q_in = (q_idx >= start) & (q_idx < start + n)
        k_in = (kv_idx >= start) & (kv_idx < start + n)
        dist = 0
        for w, a, c in zip(weights, coords(q_idx), coords(kv_idx)):
            dist = dist + w * (a - c) * (a - c)
        return ~q_in | ~k_in | (dist < big)

    return mask_mod


def _builders(p: Preset, scale_note: str) -> dict[str, Callable]:
    import ditkernels

    grid = p.grid
    kw = {"num_prefix": p.num_prefix, "num_suffix": p.num_suffix}

    def sdpa(inputs):
        fn = build_sdpa(inputs)
        fn.detail = scale_note
        return fn

    def dense(inputs):
        q, k, v = _qkv(inputs)
        detail = _backend("attention", q)
        fn = lambda: ditkernels.attention(q, k, v)  # noqa: E731
        fn.detail = detail
        return fn

    def local(r: int, shape: str = "circle", border: str = "clip"):
        def build(inputs):
            q, k, v = _qkv(inputs)
            backend = _backend("local_attention", q)
            win = window(p, r)
            plan = ditkernels.local_attention_plan(grid, win, shape=shape, border=border, **kw)
            fn = lambda: ditkernels.local_attention(q, k, v, grid, win, shape=shape, border=border, **kw)  # noqa: E731
            fn.detail = f"{backend}, window {win} {shape}, density " \
                        f"{plan.useful_pairs / p.seq ** 2:.3f}"
            return fn

        return build

    def natten(r: int):
        def build(inputs):
            if p.text:
                raise SkipImpl("NATTEN has no global (text) tokens")
            try:
                import natten as nat
            except ImportError as e:
                raise SkipImpl(f"natten is not installed ({e}); pip install natten") from None
            q, k, v = _qkv(inputs)
            d = q.shape[-1]
            if q.device.type == "cpu" and d & (d - 1):
                raise SkipImpl(f"NATTEN's CPU path (FlexAttention) takes a power-of-two head_dim only, got {d}")
            win = window(p, r)
            ks = tuple(2 * w + 1 for w in win) if isinstance(win, tuple) else 2 * win + 1
            op = nat.functional.na3d if len(grid) == 3 else nat.functional.na2d

            def lay(t):  # (B, H, S, D) -> (B, *grid, H, D), NATTEN's layout, made once outside the timing
                return t.detach().transpose(1, 2).reshape(t.shape[0], *grid, t.shape[1], t.shape[3]) \
                    .contiguous().requires_grad_(t.requires_grad)

            nq, nk, nv = lay(q), lay(k), lay(v)

            def fn():
                out = op(nq, nk, nv, kernel_size=ks)
                return out.reshape(out.shape[0], p.seq, out.shape[-2], out.shape[-1]).transpose(1, 2)

            try:
                fn()
            except Exception as e:  # noqa: BLE001 - reported as the skip reason
                raise SkipImpl(f"natten {op.__name__} cannot run here: {type(e).__name__}: {e}") from None
            fn.detail = f"natten {getattr(nat, '__version__', '?')}, kernel {ks}, square shifted window"
            return fn

        return build

    def flex(r: int):
        def build(inputs):
            q, k, v = _qkv(inputs)

            def block_mask():
                from torch.nn.attention.flex_attention import create_block_mask

                return create_block_mask(_clear_mask_mod(p, window(p, r)), B=None, H=None, Q_LEN=p.seq,
                                         KV_LEN=p.seq, device=q.device)

            fn = flex_call(q, k, v, block_mask)
            fn.detail = f"torch.compile, CLEAR mask_mod, block-mask density {1 - fn.block_mask.sparsity() / 100:.3f}"
            return fn

        return build

    def block_topk(inputs):
        q, k, v = _qkv(inputs)
        backend = _backend("block_sparse_attention", q)
        fn = lambda: ditkernels.block_topk_attention(q, k, v, density=TOPK_DENSITY, block_size=(BLOCK, BLOCK),  # noqa: E731
                                                     grid=grid, **kw)
        fn.detail = f"{backend}, {BLOCK}-token image tiles, selection included"
        return fn

    def re_sparse(inputs):
        q, k, v = _qkv(inputs)
        if q.requires_grad:
            raise SkipImpl("Re-ttention's sparse step is inference only (no backward)")
        backend = _backend("rettention", q)
        frames = grid[0] if len(grid) == 3 else 1
        mask = ditkernels.Band(frames=frames, **kw)
        state = ditkernels.ReCache()
        ditkernels.rettention(q, k, v, state, "refresh", mask=mask)  # the cache a sparse step reads

        def fn():
            state.n = 0
            return ditkernels.rettention(q, k, v, state, "sparse")

        fn.detail = f"{backend}, band 3.1 %{f' per frame ({frames})' if frames > 1 else ''}, " \
                    "one sparse pass + epilogue"
        return fn

    rs = radii(p)
    impls: dict[str, Callable] = {"sdpa": sdpa, "ditkernels": dense}
    impls.update({f"local-r{r}": local(r) for r in rs})
    if rs:
        win8 = window(p, 8)
        if all(2 * w + 1 <= g for w, g in zip(win8 if isinstance(win8, tuple) else (8,) * len(p.grid), p.grid)):
            impls["local-sq-r8"] = local(8, "square", "shift")  # NATTEN's window: its kernel must fit the grid
            impls["natten-r8"] = natten(8)
        mid = rs[len(rs) // 2]
        impls[f"flex-local-r{mid}"] = flex(mid)
    impls["block-topk-10%"] = block_topk
    impls["re-sparse"] = re_sparse
    return impls


def _backend(op: str, q: torch.Tensor) -> str:
    """``"backend=NAME"`` of ``op`` for ``q``; a SkipImpl when only the reference would run (its score
    matrix at a model's sequence length is not a measurement, and may not fit in memory)."""
    from ditkernels.backends import resolve_for

    try:
        name = resolve_for(op, q, head_dim=q.shape[-1]).NAME
    except Exception as e:  # noqa: BLE001 - the reason is the skip
        raise SkipImpl(f"no ditkernels backend for {op} here: {type(e).__name__}: {e}") from None
    if name == "reference":
        raise SkipImpl(f"no fast ditkernels backend for {op} on {q.device.type} {q.dtype} here (only the dense "
                       "reference, which is not measured); see python -m ditkernels info")
    return f"backend={name}"


def resolve_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"--model: unknown preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]


def preset_for(cfg: SweepConfig, name: str) -> tuple[Preset, list[str], str]:
    """The preset as run under ``cfg`` (scaled), the changes, and the --scale value in effect."""
    arg = cfg.scale or ("none" if cfg.is_cuda else "auto")
    p, changes = scaled(resolve_preset(name), parse_scale(arg))
    return p, changes, arg


@register("model", opt_in=True)
def model_cases(cfg: SweepConfig) -> Iterator[Case]:
    """The presets named by ``--model`` (none without it: full-size presets are not a default sweep)."""
    for name in cfg.models or ():
        full = resolve_preset(name)
        p, changes, arg = preset_for(cfg, name)
        note = f"scaled: {', '.join(changes)}" if changes else "full size"
        params: dict[str, Any] = {"model": full.model, "config": full.config, "resolution": full.resolution,
                                  "B": p.batch, "H": p.heads, "D": p.head_dim, "grid": list(p.grid), "text": p.text,
                                  "text_first": p.text_first, "seq": p.seq, "dtype": dtype_name(cfg.dtype),
                                  "full_shape": full.shape(), "scale": arg, "scaled": changes}
        g = "x".join(map(str, p.grid))
        yield Case(
            name=f"{name}/B{p.batch}-H{p.heads}-{g}{f'+T{p.text}' if p.text else ''}-D{p.head_dim}-{dtype_name(cfg.dtype)}",
            params=params,
            useful_flops=p.dense_flops(),
            make_inputs=_make_inputs((p.batch, p.heads, p.seq, p.head_dim), cfg.dtype, cfg.device),
            impls=_builders(p, note),
            reference="sdpa",
            grad_inputs=("q", "k", "v"),
        )


def list_models(cfg: SweepConfig) -> str:
    """The preset table of ``--list-models``: full shape and what ``--scale`` makes of it here."""
    head = ["preset", "model", "resolution", "attention call (full)", f"as run here (--scale "
            f"{cfg.scale or ('none' if cfg.is_cuda else 'auto')})", "config"]
    rows = []
    for name, full in PRESETS.items():
        p, changes, _ = preset_for(cfg, name)
        rows.append([name, full.model, full.resolution, full.shape(), "; ".join(changes) or "full size", full.config])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), "  ".join("-" * w for w in widths), *map(fmt, rows)])
