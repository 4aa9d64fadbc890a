"""Selective-scan launcher of the ``cpu`` backend: ``csrc/cpu/selective_scan.cpp`` in ``ditkernels._cpu_<isa>``
(loaded by ``ditkernels/_ext.py``).

The extension is torch-independent: this launcher allocates outputs and passes raw pointers, dtype
codes and strides in elements (any strides; ``reverse`` becomes negative L strides, so nothing is
flipped or copied). A, D, delta_bias and initial_state are small and are converted to the compute
dtype here. Importing this module never needs the extension.

Launcher contract (every selective-scan backend implements it):

``scan_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, reverse)``
    -> (out (batch, dim, L) in u.dtype, last_state (batch, dim, N), saved), last_state and saved in
    the compute dtype (float64 for float64 u, else float32); ``saved`` has ``saved_shape(...)``.
``scan_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, initial_state, saved, delta_softplus, reverse)``
    -> (du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dinitial_state) in the inputs' dtypes, None for
    absent inputs. ``dlast`` (batch, dim, N) may be None.
"""

from __future__ import annotations

from types import ModuleType

import torch

from .. import _alloc, _ext
from ..reference.selective_scan import compute_dtype

NAME = "cpu"
CHUNK = 64  # time steps between saved states
LANES = 16  # channels per block of the kernel (its vector lanes)
STATE_BLOCK = 8  # the state dimension is padded to a multiple of this
_DTYPE_CODES = _ext.DTYPE_CODES


def _extension() -> ModuleType | None:
    """The CPU kernels module (``ditkernels._ext.cpu()``) if it loads and has this scan, else None."""
    return _ext.cpu() if available()[0] else None


def available() -> tuple[bool, str]:
    why = _ext.cpu_error()
    if why is None:
        mod = _ext.cpu()
        layout = tuple(getattr(mod, "selective_scan_saved_layout", ()))
        if not hasattr(mod, "selective_scan_fwd"):
            why = f"{mod.__name__} has no selective_scan_fwd (stale build). {_ext.FIX}"
        elif layout != (LANES, STATE_BLOCK):
            why = (f"{mod.__name__}: its saved-state layout {layout} is not (LANES, STATE_BLOCK) = "
                   f"{(LANES, STATE_BLOCK)} (stale build). {_ext.FIX}")
    return why is None, why or ""


def _require() -> ModuleType:
    ext = _extension()
    if ext is None:
        raise RuntimeError(available()[1])
    return ext


def saved_shape(batch: int, dim: int, seqlen: int, dstate: int) -> tuple[int, ...]:
    """The states at the chunk boundaries, blocked as the kernel holds them:
    (batch, ceil(dim / LANES), ceil(seqlen / CHUNK) + 1, dstate padded to STATE_BLOCK, LANES)."""
    return (batch, -(-dim // LANES), -(-seqlen // CHUNK) + 1, -(-dstate // STATE_BLOCK) * STATE_BLOCK, LANES)


def _operand(ext, t: torch.Tensor, strides: tuple[int, int, int, int], seqlen: int, reverse: bool):
    """Operand (pointer, dtype code, strides (batch, channel/group, state, length)) of ``t``.

    With ``reverse`` the pointer moves to the last time step and the length stride is negated.
    """
    op = ext.SelectiveScanOperand()
    sb, sd, sn, sl = strides
    ptr = t.data_ptr()
    if reverse and sl != 0:
        ptr += (seqlen - 1) * sl * t.element_size()
        sl = -sl
    op.ptr, op.dtype, op.sb, op.sd, op.sn, op.sl = ptr, _DTYPE_CODES[t.dtype], sb, sd, sn, sl
    return op


def _seq(ext, t: torch.Tensor | None, reverse: bool):
    """Operand of a (batch, dim, L) tensor, or an empty one for None."""
    if t is None:
        return ext.SelectiveScanOperand()
    s = t.stride()
    return _operand(ext, t, (s[0], s[1], 0, s[2]), t.shape[2], reverse)


def _grouped(ext, X: torch.Tensor, seqlen: int, reverse: bool):
    """(operand, groups, variable) of B or C: (dim, N), (batch, N, L) or (batch, G, N, L)."""
    s = X.stride()
    if X.dim() == 2:
        return _operand(ext, X, (0, s[0], s[1], 0), seqlen, reverse), X.shape[0], False
    if X.dim() == 3:
        return _operand(ext, X, (s[0], 0, s[1], s[2]), seqlen, reverse), 1, True
    return _operand(ext, X, s, seqlen, reverse), X.shape[1], True


def _acc(t: torch.Tensor | None, ct: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.detach().to(ct).contiguous()


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _params(ext, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, reverse, keep):
    """Params shared by forward and backward; ``keep`` holds converted tensors alive for the call."""
    batch, dim, seqlen = u.shape
    ct = compute_dtype(u.dtype)
    A_, D_, bias_, init_ = (_acc(t, ct) for t in (A, D, delta_bias, initial_state))
    keep += [A_, D_, bias_, init_]
    p = ext.SelectiveScanParams()
    p.batch, p.dim, p.seqlen, p.dstate, p.chunk = batch, dim, seqlen, A.shape[1], CHUNK
    p.nthreads = torch.get_num_threads()
    p.softplus = bool(delta_softplus)
    p.acc = _DTYPE_CODES[ct]
    p.u, p.delta, p.z = _seq(ext, u, reverse), _seq(ext, delta, reverse), _seq(ext, z, reverse)
    p.Bm, p.b_groups, p.b_var = _grouped(ext, B, seqlen, reverse)
    p.Cm, p.c_groups, p.c_var = _grouped(ext, C, seqlen, reverse)
    p.A, p.Dvec, p.delta_bias, p.init = _ptr(A_), _ptr(D_), _ptr(bias_), _ptr(init_)
    return p


def scan_fwd(u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus: bool, reverse: bool):
    ext = _require()
    batch, dim, seqlen = u.shape
    ct = compute_dtype(u.dtype)
    keep: list = []
    p = _params(ext, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, reverse, keep)
    out = _alloc.empty(batch, dim, seqlen, dtype=u.dtype, device=u.device)
    last = _alloc.empty(batch, dim, A.shape[1], dtype=ct, device=u.device)
    hs = _alloc.empty(*saved_shape(batch, dim, seqlen, A.shape[1]), dtype=ct, device=u.device)
    p.out = _seq(ext, out, reverse)
    p.last, p.hs = last.data_ptr(), hs.data_ptr()
    ext.selective_scan_fwd(p)
    return out, last, hs


def _grad_buffer(ext, X: torch.Tensor, batch: int, seqlen: int, ct: torch.dtype, reverse: bool):
    """Compute-dtype buffer for dB or dC, (keys, N, L or 1), and its operand (key, state, length strides)."""
    N = X.shape[-2] if X.dim() > 2 else X.shape[1]
    if X.dim() == 2:
        buf = _alloc.empty(X.shape[0], N, 1, dtype=ct, device=X.device)
    else:
        keys = batch * (X.shape[1] if X.dim() == 4 else 1)
        buf = _alloc.empty(keys, N, seqlen, dtype=ct, device=X.device)
    s = buf.stride()
    return buf, _operand(ext, buf, (s[0], 0, s[1], s[2] if X.dim() > 2 else 0), seqlen, reverse)


def scan_bwd(dout, dlast, u, delta, A, B, C, D, z, delta_bias, initial_state, saved, delta_softplus: bool,
             reverse: bool):
    ext = _require()
    batch, dim, seqlen = u.shape
    N = A.shape[1]
    ct = compute_dtype(u.dtype)
    keep: list = []
    p = _params(ext, u, delta, A, B, C, D, z, delta_bias, initial_state, delta_softplus, reverse, keep)
    if saved.shape != saved_shape(batch, dim, seqlen, N) or saved.dtype != ct or not saved.is_contiguous():
        raise ValueError(f"saved: expected the cpu forward's states {saved_shape(batch, dim, seqlen, N)} {ct}, "
                         f"got {tuple(saved.shape)} {saved.dtype}")
    dlast_ = _acc(dlast, ct)
    du = _alloc.empty(batch, dim, seqlen, dtype=u.dtype, device=u.device)
    ddelta = _alloc.empty(batch, dim, seqlen, dtype=delta.dtype, device=u.device)
    dz = _alloc.empty(batch, dim, seqlen, dtype=z.dtype, device=u.device) if z is not None else None
    dA_rows = _alloc.empty(batch, dim, N, dtype=ct, device=u.device)
    dD_rows = _alloc.empty(batch, dim, dtype=ct, device=u.device) if D is not None else None
    dbias_rows = _alloc.empty(batch, dim, dtype=ct, device=u.device) if delta_bias is not None else None
    dinit = _alloc.empty(batch, dim, N, dtype=ct, device=u.device) if initial_state is not None else None
    dB_buf, p.dB = _grad_buffer(ext, B, batch, seqlen, ct, reverse)
    dC_buf, p.dC = _grad_buffer(ext, C, batch, seqlen, ct, reverse)
    p.hs = saved.data_ptr()
    p.dout, p.du, p.ddelta, p.dz = (_seq(ext, t, reverse) for t in (dout, du, ddelta, dz))
    p.dlast, p.dA_rows, p.dD_rows = _ptr(dlast_), dA_rows.data_ptr(), _ptr(dD_rows)
    p.dbias_rows, p.dinit = _ptr(dbias_rows), _ptr(dinit)
    ext.selective_scan_bwd(p)

    def fold(rows, like):  # per-(batch, channel) partial sums -> the weight's shape, summed in a fixed order
        return None if rows is None else rows.sum(0).to(like.dtype)

    return (du, ddelta, fold(dA_rows, A), dB_buf.view(B.shape).to(B.dtype), dC_buf.view(C.shape).to(C.dtype),
            fold(dD_rows, D), dz, fold(dbias_rows, delta_bias),
            None if dinit is None else dinit.to(initial_state.dtype))
