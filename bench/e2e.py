"""End to end: one denoising step of a real diffusers transformer with the stock attention processors
and with ours, family ``e2e``.

The transformer is the real diffusers class at the model's real width, heads and head_dim (numbers of
its ``transformer/config.json``, see ``bench/models.py``) with a few layers and random weights, run
for one step at the chosen resolution (``--sizes`` in pixels; default 1024), batch 1, forward only:

- ``pixart-sigma``: ``PixArtTransformer2DModel``, 2 of 28 layers, 300 T5 tokens (cross-attention);
- ``sd35-large``: ``SD3Transformer2DModel``, 1 of 38 layers, 333 text tokens (joint attention);
- ``flux-dev``: ``FluxTransformer2DModel``, 1 of 19 double-stream blocks and none of the 38
  single-stream ones, 512 text tokens (joint attention).

Implementations: ``stock`` (diffusers' own processors: SDPA), ``local-r16`` (CLEAR's circle of
radius 16, the middle of its radii at 1024 px, text tokens global), ``block-topk-10%`` (64-token
blocks that are 8x8 image tiles) and ``re-sparse`` (Re-ttention's sparse step, band mask at 3.1 %, drift 0: its refresh step
ran on the previous step's inputs, i.e. the latents with 5 % fresh noise and the timestep 1/50 of the
schedule later). Ours go through :class:`ditkernels.integrations.diffusers.GridAttnProcessor`.

Each row's note gives, from one instrumented step run while setting up the implementation (after a
warm-up step on CUDA): the share of the step spent in the self / joint attention calls (PixArt's
cross-attention to the text counts as the rest of the step), and the peak memory of the step beyond
what was allocated before it (CUDA: ``max_memory_allocated``; CPU: the process's peak RSS, reset
through ``/proc/self/clear_refs``). rel.err is the deviation of the step's output from the stock
step's. The Amdahl bound of a whole model is ``1 / (1 - share)`` of the stock row.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from .runner import Case, SkipImpl, SweepConfig, dtype_name, register

CPU_PX, CUDA_PX = (1024,), (1024, 2048)
_LIVE: list[dict[str, Any]] = []  # the state of the case whose model is in memory
WINDOW, DENSITY, BLOCK = 16, 0.1, 64


@dataclass(frozen=True)
class E2EModel:
    name: str
    cls: str
    config: str
    heads: int
    head_dim: int
    layers: str
    text: int

    def build(self, px: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, dict[str, Any],
                                                                                 tuple[int, int]]:
        """(model with random weights, forward kwargs of one step at ``px`` pixels, image-token grid)."""
        import diffusers

        g = torch.Generator().manual_seed(0)
        rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
        torch.manual_seed(0)
        side = px // 8
        if self.name == "pixart-sigma":
            # PixArt-alpha/PixArt-Sigma-XL-2-1024-MS transformer/config.json (num_layers 28 there)
            model = diffusers.PixArtTransformer2DModel(
                num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=2,
                sample_size=side, patch_size=2, cross_attention_dim=1152, caption_channels=4096,
                norm_type="ada_norm_single", use_additional_conditions=False)
            kw = dict(hidden_states=rnd(1, 4, side, side), encoder_hidden_states=rnd(1, self.text, 4096),
                      timestep=torch.tensor([500], device=device), added_cond_kwargs={"resolution": None,
                                                                                       "aspect_ratio": None})
            grid = (side // 2, side // 2)
        elif self.name == "sd35-large":
            # stabilityai/stable-diffusion-3.5-large transformer/config.json (num_layers 38 there)
            model = diffusers.SD3Transformer2DModel(
                sample_size=128, patch_size=2, in_channels=16, num_layers=1, attention_head_dim=64,
                num_attention_heads=38, joint_attention_dim=4096, caption_projection_dim=2432,
                pooled_projection_dim=2048, out_channels=16, pos_embed_max_size=192, qk_norm="rms_norm")
            kw = dict(hidden_states=rnd(1, 16, side, side), encoder_hidden_states=rnd(1, self.text, 4096),
                      pooled_projections=rnd(1, 2048), timestep=torch.tensor([500], device=device))
            grid = (side // 2, side // 2)
        else:
            # black-forest-labs/FLUX.1-dev transformer/config.json (19 double + 38 single blocks there)
            model = diffusers.FluxTransformer2DModel(
                patch_size=1, in_channels=64, num_layers=1, num_single_layers=0, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
            h = w = side // 2
            ids = torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(h).float(), torch.arange(w).float(), indexing="ij"), -1)
            kw = dict(hidden_states=rnd(1, h * w, 64), encoder_hidden_states=rnd(1, self.text, 4096),
                      pooled_projections=rnd(1, 768), timestep=torch.tensor([0.5], device=device),
                      guidance=torch.tensor([3.5], device=device), img_ids=ids.reshape(-1, 3).to(device),
                      txt_ids=torch.zeros(self.text, 3, device=device))
            grid = (h, w)
        model = model.to(device)
        if dtype != torch.float32:
            model = model.to(dtype)
        return model.eval(), kw, grid


E2E_MODELS = {m.name: m for m in [
    E2EModel("pixart-sigma", "PixArtTransformer2DModel", "PixArt-alpha/PixArt-Sigma-XL-2-1024-MS", 16, 72,
             "2 of 28", 300),
    E2EModel("sd35-large", "SD3Transformer2DModel", "stabilityai/stable-diffusion-3.5-large", 38, 64, "1 of 38",
             77 + 256),
    E2EModel("flux-dev", "FluxTransformer2DModel", "black-forest-labs/FLUX.1-dev", 24, 128,
             "1 of 19 double + 0 of 38 single", 512),
]}


class _Clock:
    """Sums the time spent inside the wrapped attention calls while ``on``."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.on, self.total = device, False, 0.0

    def now(self) -> float:
        if self.on and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


class _Timed:
    """An attention callable that adds its own time to a :class:`_Clock`."""

    def __init__(self, fn: Callable[..., torch.Tensor], clock: _Clock) -> None:
        self.fn, self.clock = fn, clock

    def __call__(self, q, k, v, **kw):
        if not self.clock.on:
            return self.fn(q, k, v, **kw)
        t0 = self.clock.now()
        out = self.fn(q, k, v, **kw)
        self.clock.total += self.clock.now() - t0
        return out


def _sdpa(q, k, v, *, grid=None, num_prefix=0, num_suffix=0, scale=None):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


class _PeakMemory:
    """Peak memory of a block beyond what was in use before it (bytes; None where it cannot be read)."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.extra = device, None

    @staticmethod
    def _rss(field: str) -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            try:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
                self.base = self._rss("VmRSS")
            except OSError:
                self.base = None
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.extra = torch.cuda.max_memory_allocated(self.device) - self.base
        elif self.base is not None:
            peak = self._rss("VmHWM")
            self.extra = None if peak is None else peak - self.base
        return False


def _attention_modules(model: torch.nn.Module) -> dict[str, torch.nn.Module]:
    return {n: m for n, m in model.named_modules() if hasattr(m, "set_processor") and hasattr(m, "processor")}


def _builders(spec: E2EModel, state: dict[str, Any]) -> dict[str, Callable]:
    """``state``: the case's model, step inputs, grid and device, made once by ``make_inputs``."""

    def impl(kind: str):
        def build(inputs):
            if state.get("missing"):
                raise SkipImpl(state["missing"])
            from ditkernels.integrations.diffusers import GridAttnProcessor

            import ditkernels
            from ditkernels.nn import BlockTopKAttnFn, LocalAttnFn

            model, kw, grid, device = state["model"], state["kw"], state["grid"], state["device"]
            clock = _Clock(device)
            mods = _attention_modules(model)
            if kind == "stock":
                procs = dict(state["stock"])
                measure = {n: GridAttnProcessor(_Timed(_sdpa, clock), grid) for n in mods}
            else:
                def attn_fn():
                    if kind == "local":
                        return LocalAttnFn(WINDOW)
                    if kind == "topk":
                        return BlockTopKAttnFn(density=DENSITY, block_size=(BLOCK, BLOCK))
                    return ditkernels.ReStepper(ditkernels.ReSchedule(0, 10**9), ditkernels.Band(), drift=0.0)

                procs = {n: GridAttnProcessor(_Timed(attn_fn(), clock), grid) for n in mods}
                measure = procs

            def apply(p):
                for n, m in mods.items():
                    m.set_processor(p[n])

            def step(step_kw=kw):
                apply(procs)
                with torch.no_grad():
                    return model(**step_kw, return_dict=False)[0]

            if kind == "re-sparse":  # the refresh step: dense + cache, on the previous step's inputs
                prev = dict(kw)
                noise = torch.randn(kw["hidden_states"].shape, generator=torch.Generator().manual_seed(5))
                prev["hidden_states"] = kw["hidden_states"] + 0.05 * noise.to(kw["hidden_states"])
                prev["timestep"] = kw["timestep"] + (20 if kw["timestep"].dtype != torch.float32 else 0.02)
                step(prev)
            elif device.type == "cuda":
                step()  # compile / autotune before the measured step
            apply(measure)
            clock.on, clock.total = True, 0.0
            with _PeakMemory(device) as mem, torch.no_grad():
                t0 = clock.now()
                model(**kw, return_dict=False)
                total = clock.now() - t0
            clock.on = False
            share = clock.total / total
            fn = step
            fn.detail = (f"attention {100 * share:.0f}% of the step ({1e3 * clock.total:.0f} of {1e3 * total:.0f} ms)"
                         + (f", peak +{mem.extra / 2**20:.0f} MB" if mem.extra is not None else "")
                         + ("" if kind == "stock" else f"; {_name(kind)}"))
            return fn

        return build

    return {"stock": impl("stock"), f"local-r{WINDOW}": impl("local"),
            f"block-topk-{int(DENSITY * 100)}%": impl("topk"), "re-sparse": impl("re-sparse")}


def _name(kind: str) -> str:
    return {"local": f"CLEAR circle r={WINDOW}", "topk": f"{BLOCK}-token image tiles, {int(DENSITY * 100)}% of blocks",
            "re-sparse": "band 3.1%, refresh on the previous step"}[kind]


def _attn_flops(spec: E2EModel, grid: tuple[int, int]) -> float:
    """Dense self/joint attention FLOPs of the step (useful_flops of the case: compare times)."""
    n = math.prod(grid) + (spec.text if spec.name != "pixart-sigma" else 0)
    layers = int(spec.layers.split()[0])
    return 4.0 * spec.heads * n * n * spec.head_dim * layers


@register("e2e", opt_in=True)
def e2e_cases(cfg: SweepConfig) -> Iterator[Case]:
    pxs = tuple(cfg.sizes) if cfg.sizes is not None else (CUDA_PX if cfg.is_cuda else CPU_PX)
    for spec in E2E_MODELS.values():
        for px in pxs:
            if px % 16:
                raise ValueError(f"--sizes: the e2e family takes resolutions in pixels divisible by 16, got {px}")
            state: dict[str, Any] = {}

            def make(requires_grad: bool, spec=spec, px=px, state=state) -> dict[str, torch.Tensor]:
                if state.get("model") is None:
                    for other in _LIVE:  # one model in memory at a time
                        other.clear()
                    _LIVE[:] = [state]
                    try:
                        import diffusers  # noqa: F401
                    except ImportError as e:
                        state["missing"] = f"diffusers is not installed ({e}); pip install diffusers"
                        return {}
                    model, kw, grid = spec.build(px, cfg.device, cfg.dtype)
                    state.update(model=model, kw=kw, grid=grid, device=cfg.device,
                                 stock={n: m.processor for n, m in _attention_modules(model).items()})
                return {"hidden_states": state["kw"]["hidden_states"]}

            side = px // 16
            yield Case(
                name=f"{spec.name}-{px}px-B1-{side}x{side}+T{spec.text}-H{spec.heads}-D{spec.head_dim}-"
                     f"{spec.layers.split()[0]}L-{dtype_name(cfg.dtype)}",
                params={"model": spec.config, "class": spec.cls, "px": px, "layers": spec.layers,
                        "heads": spec.heads, "head_dim": spec.head_dim, "grid": [side, side], "text": spec.text,
                        "dtype": dtype_name(cfg.dtype), "flops": "dense attention FLOPs of the step only"},
                useful_flops=_attn_flops(spec, (side, side)),
                make_inputs=make,
                impls=_builders(spec, state),
                reference="stock",
            )
