"""Selective-scan launcher of the ``cuda`` backend: ``csrc/kernels/selective_scan.cuh`` in ``ditkernels._cuda``.

Same launcher contract as :mod:`ditkernels.backends.cpu_scan` (``scan_fwd`` / ``scan_bwd`` /
``saved_shape``), on CUDA tensors; the backend's availability is :mod:`ditkernels.backends.cuda`.
The kernels are torch-independent: this module allocates outputs and passes device addresses and element strides (any strides; ``reverse`` becomes
negative L strides with the address moved to the last step, so nothing is flipped or copied).

:func:`emu_scan_fwd` / :func:`emu_scan_bwd` run the very same argument preparation on CPU tensors
through ``ditkernels._emu`` (the same device code run by the SIMT emulation), so the tests exercise
this launcher as well as the kernels.

Dtypes: u, delta, z (and variable B / C) float32, float16 or bfloat16; math in float32. A variable
B / C in float32 with 16-bit u runs the float32 kernel on upcast u / delta / z (lossless). A constant
B / C, A, D, delta_bias and initial_state are used as float32. ``saved`` is the (batch, dim,
nchunks + 1, N) float32 chunk-boundary states of the forward (the chunk depends only on L).

Determinism: no atomics. dA, dD, d delta_bias and constant dB / dC are per-(batch, channel) partials
summed over the batch here; a variable dB / dC is accumulated by each block over ``cpb`` channels of a
group into a (batch, dim / cpb, N, L) float32 workspace summed over the channel blocks here.
"""

from __future__ import annotations

import importlib
import math
from types import ModuleType

import torch

from .. import _alloc, _ext

_DTYPE_CODES = {t: c for t, c in _ext.DTYPE_CODES.items() if t is not torch.float64}  # no float64 kernels
# Workspace cap for variable dB / dC partials (bytes), unless 8x the gradient itself is larger.
_WORKSPACE_CAP = 64 << 20


# --------------------------------------------------------------------------------------------------
# Configuration (mirrors selective_scan_default_config in csrc/kernels/selective_scan_args.cuh; a test
# checks both agree).

def default_config(seqlen: int) -> tuple[int, int]:
    """(threads per block, time steps per thread) the kernels use for sequence length ``seqlen``."""
    if seqlen <= 128:
        return 32, 4
    if seqlen <= 256:
        return 32, 8
    if seqlen <= 512:
        return 64, 8
    return 128, 8


def _nchunks(seqlen: int, config: tuple[int, int]) -> int:
    chunk = config[0] * config[1]
    return (seqlen + chunk - 1) // chunk


def saved_shape(batch: int, dim: int, seqlen: int, dstate: int, config: tuple[int, int] | None = None
                ) -> tuple[int, ...]:
    return (batch, dim, _nchunks(seqlen, config or default_config(seqlen)) + 1, dstate)


# --------------------------------------------------------------------------------------------------
# Extensions.

def _cuda_ext() -> ModuleType:
    from .cuda import extension

    try:
        return extension()
    except ImportError as exc:
        raise RuntimeError(str(exc)) from exc


def _emu_ext() -> ModuleType:
    mod = _ext.emu()
    if not hasattr(mod, "selective_scan_fwd"):
        raise RuntimeError(f"ditkernels._emu has no selective_scan_fwd (stale build): {_ext.EMU_FIX}")
    return mod


class _Runner:
    """How to launch: the real module on the current CUDA stream, or the emulation (synchronous)."""

    def __init__(self, ext: ModuleType, emulated: bool, target_blocks: int, **emu_kw):
        self.ext, self.emulated, self.target_blocks, self.emu_kw = ext, emulated, target_blocks, emu_kw

    def __call__(self, which: str, args: dict, device: torch.device) -> None:
        fn = getattr(self.ext, f"selective_scan_{which}")
        if self.emulated:
            fn(args, **self.emu_kw)
        else:
            with torch.cuda.device(device):  # launches go to the current device
                fn(args, torch.cuda.current_stream(device).cuda_stream)


def _cuda_runner(device: torch.device) -> _Runner:
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return _Runner(_cuda_ext(), False, target_blocks=4 * sms)


def _emu_runner(concurrent_blocks: int = 0, timeout_s: float = 0.0) -> _Runner:
    return _Runner(_emu_ext(), True, target_blocks=4, concurrent_blocks=concurrent_blocks, timeout_s=timeout_s)


# --------------------------------------------------------------------------------------------------
# Argument preparation (shared by the CUDA and the emulated launch).

def _work_dtype(u: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> torch.dtype:
    """Storage dtype of the kernel: u's, or float32 when a variable B / C is float32 and u is 16-bit."""
    if u.dtype not in _DTYPE_CODES:
        raise TypeError(f"u: the cuda backend takes float32, float16 or bfloat16, got {u.dtype}")
    if u.dtype != torch.float32 and any(X.dim() > 2 and X.dtype == torch.float32 for X in (B, C)):
        return torch.float32
    return u.dtype


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach().to(torch.float32).contiguous()


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _seq(args: dict, name: str, t: torch.Tensor | None, reverse: bool) -> None:
    """Fields of a (batch, dim, L) operand; reverse: address of the last step, negated L stride."""
    if t is None:
        args[name] = 0
        return
    sb, sd, sl = t.stride()
    ptr = t.data_ptr()
    if reverse:
        ptr += (t.shape[2] - 1) * sl * t.element_size()
        sl = -sl
    args.update({name: ptr, f"{name}_sb": sb, f"{name}_sd": sd, f"{name}_sl": sl})


def _bc(args: dict, which: str, X: torch.Tensor, dim: int, seqlen: int, reverse: bool) -> None:
    """Fields of B or C: constant (dim, N) float32, or variable (batch, N, L) / (batch, G, N, L)."""
    lo = which.lower()
    s = X.stride()
    if X.dim() == 2:
        var, sb, sg, sn, sl, span = 0, 0, s[0], s[1], 0, 1
    elif X.dim() == 3:
        var, sb, sg, sn, sl, span = 1, s[0], 0, s[1], s[2], dim
    else:
        var, sb, sg, sn, sl, span = 1, s[0], s[1], s[2], s[3], dim // X.shape[1]
    ptr = X.data_ptr()
    if var and reverse:
        ptr += (seqlen - 1) * sl * X.element_size()
        sl = -sl
    args.update({f"{lo}_var": var, f"{which}m": ptr, f"{which}_sb": sb, f"{which}_sg": sg, f"{which}_sn": sn,
                 f"{which}_sl": sl, f"{lo}_span": span})


class _Prepared:
    """Converted operands (kept alive for the launch) and the argument dict shared by fwd and bwd."""

    def __init__(self, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, reverse, config):
        if A.is_complex():
            raise TypeError(f"A: complex A is not supported, got dtype {A.dtype}")
        self.batch, self.dim, self.seqlen = u.shape
        self.dstate = A.shape[1]
        self.wt = wt = _work_dtype(u, B, C)
        self.reverse = reverse
        self.config = tuple(config) if config is not None else default_config(self.seqlen)
        self.u, self.delta = u.to(wt), delta.to(wt)
        self.z = None if z is None else z.to(wt)
        self.B = B.to(wt) if B.dim() > 2 else _f32(B)
        self.C = C.to(wt) if C.dim() > 2 else _f32(C)
        self.A, self.D, self.bias, self.init = _f32(A), _f32(D), _f32(delta_bias), _f32(initial_state)
        a = {"batch": self.batch, "dim": self.dim, "seqlen": self.seqlen, "dstate": self.dstate,
             "dtype": _DTYPE_CODES[wt], "threads": self.config[0], "items": self.config[1],
             "softplus": int(bool(delta_softplus)), "cpb": 1}
        _seq(a, "u", self.u, reverse)
        _seq(a, "delta", self.delta, reverse)
        _seq(a, "z", self.z, reverse)
        a.update({"A": self.A.data_ptr(), "A_sd": self.A.stride(0), "A_sn": self.A.stride(1)})
        _bc(a, "B", self.B, self.dim, self.seqlen, reverse)
        _bc(a, "C", self.C, self.dim, self.seqlen, reverse)
        a.update({"Dv": _ptr(self.D), "delta_bias": _ptr(self.bias), "h0": _ptr(self.init)})
        self.args = a

    def saved_shape(self) -> tuple[int, ...]:
        return saved_shape(self.batch, self.dim, self.seqlen, self.dstate, self.config)


def _fwd(run: _Runner, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, reverse, config=None):
    p = _Prepared(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, reverse, config)
    dev = u.device
    out = _alloc.empty(p.batch, p.dim, p.seqlen, dtype=p.wt, device=dev)
    last = _alloc.empty(p.batch, p.dim, p.dstate, dtype=torch.float32, device=dev)
    hs = _alloc.empty(*p.saved_shape(), dtype=torch.float32, device=dev)
    args = dict(p.args)
    _seq(args, "out", out, reverse)
    args.update({"last": last.data_ptr(), "hs": hs.data_ptr()})
    run("fwd", args, dev)
    return out.to(u.dtype), last, hs


def channels_per_block(batch: int, dim: int, seqlen: int, dstate: int, spans: list[int], target_blocks: int) -> int:
    """Channels one backward block handles (a divisor of every variable B / C group's channel count).

    The largest divisor that still gives ``target_blocks`` blocks (fewest partials to sum), raised
    while the (batch, dim / cpb, N, L) float32 workspace of one variable operand exceeds its cap.
    """
    if not spans:
        return 1
    g = 0
    for s in spans:
        g = math.gcd(g, s)
    divisors = [c for c in range(1, g + 1) if g % c == 0]
    ok = [c for c in divisors if batch * dim // c >= target_blocks]
    cpb = ok[-1] if ok else 1
    grad_bytes = batch * (dim // min(spans)) * dstate * seqlen * 4
    cap = max(_WORKSPACE_CAP, 8 * grad_bytes)
    for c in divisors:
        if c >= cpb and batch * (dim // c) * dstate * seqlen * 4 <= cap:
            return c
    return g


def _grad_ws(args: dict, which: str, X: torch.Tensor, p: _Prepared, cpb: int, dev) -> torch.Tensor:
    """float32 buffer of dB / dC partials and its fields: variable (batch, dim/cpb, N, L), constant (batch, dim, N)."""
    if X.dim() == 2:
        buf = _alloc.empty(p.batch, p.dim, p.dstate, dtype=torch.float32, device=dev)
        sb, sk, sn, sl, ptr = buf.stride(0), buf.stride(1), buf.stride(2), 0, buf.data_ptr()
    else:
        buf = _alloc.empty(p.batch, p.dim // cpb, p.dstate, p.seqlen, dtype=torch.float32, device=dev)
        sb, sk, sn, sl = buf.stride()
        ptr = buf.data_ptr()
        if p.reverse:
            ptr += (p.seqlen - 1) * sl * 4
            sl = -sl
    args.update({f"d{which}": ptr, f"d{which}_sb": sb, f"d{which}_sk": sk, f"d{which}_sn": sn,
                 f"d{which}_sl": sl})
    return buf


def _fold_bc(buf: torch.Tensor, X: torch.Tensor, p: _Prepared, cpb: int) -> torch.Tensor:
    """Partials -> the gradient of B / C in X's shape and dtype (sums in a fixed order)."""
    if X.dim() == 2:
        return buf.sum(0).to(X.dtype)
    groups = 1 if X.dim() == 3 else X.shape[1]
    nsplit = (p.dim // groups) // cpb
    g = buf.view(p.batch, groups, nsplit, p.dstate, p.seqlen)
    g = g[:, :, 0] if nsplit == 1 else g.sum(2)
    return (g[:, 0] if X.dim() == 3 else g).to(X.dtype)


def _bwd(run: _Runner, dout, dlast, u, delta, A, B, C, D, z, delta_bias, initial_state, saved, delta_softplus,
         reverse, config=None, cpb=None):
    p = _Prepared(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, reverse, config)
    dev = u.device
    if tuple(saved.shape) != p.saved_shape() or saved.dtype != torch.float32 or not saved.is_contiguous():
        raise ValueError(f"saved: expected the cuda forward's states {p.saved_shape()} float32 (contiguous), "
                         f"got {tuple(saved.shape)} {saved.dtype}")
    spans = [p.args[f"{w}_span"] for w in ("b", "c") if p.args[f"{w}_var"]]
    if cpb is None:
        cpb = channels_per_block(p.batch, p.dim, p.seqlen, p.dstate, spans, run.target_blocks)
    if any(s % cpb for s in spans) or p.dim % cpb:
        raise ValueError(f"channels_per_block={cpb} must divide the channels per group {spans} and dim={p.dim}")
    args = dict(p.args)
    args["cpb"] = cpb
    dout_ = dout.to(p.wt)
    dlast_ = _f32(dlast)
    du = _alloc.empty(p.batch, p.dim, p.seqlen, dtype=p.wt, device=dev)
    ddelta = _alloc.empty(p.batch, p.dim, p.seqlen, dtype=p.wt, device=dev)
    dz = None if z is None else _alloc.empty(p.batch, p.dim, p.seqlen, dtype=p.wt, device=dev)
    dinit = _alloc.empty(p.batch, p.dim, p.dstate, dtype=torch.float32, device=dev)
    dA_rows = _alloc.empty(p.batch, p.dim, p.dstate, dtype=torch.float32, device=dev)
    dD_rows = None if D is None else _alloc.empty(p.batch, p.dim, dtype=torch.float32, device=dev)
    dbias_rows = None if delta_bias is None else _alloc.empty(p.batch, p.dim, dtype=torch.float32, device=dev)
    for name, t in (("dout", dout_), ("du", du), ("ddelta", ddelta), ("dz", dz)):
        _seq(args, name, t, reverse)
    dB_buf = _grad_ws(args, "B", B, p, cpb, dev)
    dC_buf = _grad_ws(args, "C", C, p, cpb, dev)
    args.update({"hs": saved.data_ptr(), "dlast": _ptr(dlast_), "dinit": dinit.data_ptr(),
                 "dA_rows": dA_rows.data_ptr(), "dD_rows": _ptr(dD_rows), "dbias_rows": _ptr(dbias_rows)})
    run("bwd", args, dev)

    def fold(rows, like):
        return None if rows is None else rows.sum(0).to(like.dtype)

    return (du.to(u.dtype), ddelta.to(delta.dtype), fold(dA_rows, A), _fold_bc(dB_buf, B, p, cpb),
            _fold_bc(dC_buf, C, p, cpb), fold(dD_rows, D), None if dz is None else dz.to(z.dtype),
            fold(dbias_rows, delta_bias), None if initial_state is None else dinit.to(initial_state.dtype))


# --------------------------------------------------------------------------------------------------
# The launcher contract (CUDA tensors).

def scan_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus: bool, reverse: bool):
    """(out (batch, dim, L) in u.dtype, last_state (batch, dim, N) float32, saved) on CUDA tensors."""
    return _fwd(_cuda_runner(u.device), u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, reverse)


def scan_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, initial_state, saved, delta_softplus: bool,
             reverse: bool):
    """(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state) in the inputs' dtypes (None if absent)."""
    return _bwd(_cuda_runner(u.device), dout, dlast, u, delta, A, B, C, D, z, delta_bias, initial_state, saved,
                delta_softplus, reverse)


# --------------------------------------------------------------------------------------------------
# The same launcher on CPU tensors through the SIMT emulation (tests).

def emu_scan_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus: bool, reverse: bool, *,
                 config: tuple[int, int] | None = None, concurrent_blocks: int = 0, timeout_s: float = 0.0,
                 ext: ModuleType | None = None):
    """:func:`scan_fwd` on CPU tensors, the kernels run by ``ditkernels._emu``; ``config``: (threads, items)."""
    run = _emu_runner(concurrent_blocks, timeout_s) if ext is None else _Runner(ext, True, 4)
    return _fwd(run, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, reverse, config)


def emu_scan_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, initial_state, saved, delta_softplus: bool,
                 reverse: bool, *, config: tuple[int, int] | None = None, channels_per_block: int | None = None,
                 concurrent_blocks: int = 0, timeout_s: float = 0.0, ext: ModuleType | None = None):
    """:func:`scan_bwd` on CPU tensors through the emulation; same ``config`` as the forward that made ``saved``."""
    run = _emu_runner(concurrent_blocks, timeout_s) if ext is None else _Runner(ext, True, 4)
    return _bwd(run, dout, dlast, u, delta, A, B, C, D, z, delta_bias, initial_state, saved, delta_softplus,
                reverse, config, channels_per_block)
