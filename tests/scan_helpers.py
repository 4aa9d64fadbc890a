"""Helpers shared by the selective-scan test files: argument order, float64 and low-dtype references,
and the explicit scan orders of the multi-direction scans."""

from __future__ import annotations

import torch

from ditkernels.backends import reference_scan
from ditkernels.reference.selective_scan import selective_scan_ref, selective_scan_ref_backward

# The launchers' positional order of the scan inputs.
ORDER = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")

GRAD_NAMES = tuple(f"d{k}" for k in ORDER)

# make_case options of the per-option launcher tests (each file adds its own grouped case).
OPTION_CASES = {
    "const_BC": dict(b_kind="const", c_kind="const"),
    "constB_varC": dict(b_kind="const", c_kind="group2"),
    "varB_constC": dict(b_kind="var", c_kind="const"),
    "plain": dict(D=False, z=False, bias=False, init=False, dlast=False),
    "no_z_no_init": dict(z=False, init=False),
}


def make_case(batch=2, dim=12, L=97, N=16, *, dtype=torch.float32, b_kind="group2", c_kind="var", D=True, z=True,
              bias=True, init=True, dlast=True, seed=0):
    """Random scan inputs and output gradients (float64 master copies rounded to ``dtype``).

    B / C kinds: const (D, N), var (batch, N, L), var32 (variable float32 B / C with 16-bit u), group<G>."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0, shift=0.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift

    def bc(kind):
        if kind == "const":
            return rnd(dim, N).float()
        if kind == "var":
            return rnd(batch, N, L).to(dtype)
        if kind == "var32":  # variable float32 B / C with 16-bit u
            return rnd(batch, N, L).float()
        return rnd(batch, int(kind[5:]), N, L).to(dtype)

    x = dict(
        u=rnd(batch, dim, L).to(dtype),
        # delta' > 0 with or without softplus (a negative step makes exp(delta' A) > 1 and blows up)
        delta=(0.5 * torch.rand(batch, dim, L, generator=g, dtype=torch.float64) + 0.02).to(dtype),
        A=-(0.5 + torch.rand(dim, N, generator=g, dtype=torch.float64)).float(),
        B=bc(b_kind), C=bc(c_kind),
        D=rnd(dim).float() if D else None,
        z=rnd(batch, dim, L).to(dtype) if z else None,
        delta_bias=(0.2 * torch.rand(dim, generator=g, dtype=torch.float64) - 0.01).float() if bias else None,
        initial_state=rnd(batch, dim, N).float() if init else None,
    )
    grads = dict(dout=rnd(batch, dim, L).to(dtype), dlast=rnd(batch, dim, N).float() if dlast else None)
    return x, grads


def strided_case(N: int):
    """A make_case whose u, delta, z and dout are transposes of (batch, L, dim) buffers and whose B is a
    slice of a wider buffer (batch 2, dim 4, L 90, variable B, grouped C)."""
    x, gr = make_case(batch=2, dim=4, L=90, N=N, b_kind="var", c_kind="group2", seed=8)
    for k in ("u", "delta", "z"):
        x[k] = x[k].transpose(1, 2).contiguous().transpose(1, 2)
        assert not x[k].is_contiguous()
    wide = torch.zeros(2, N + 3, 90)
    wide[:, 1:N + 1] = x["B"]
    x["B"] = wide[:, 1:N + 1]
    gr["dout"] = gr["dout"].transpose(1, 2).contiguous().transpose(1, 2)
    return x, gr


def check_against_reference(result, x: dict, gr: dict, softplus: bool, reverse: bool):
    """Compare a launcher's ``result = (out, last_state, grads)`` for ``x, gr`` with the float64 reference
    (docs/verify.md §4: fp16/bf16 outputs and gradients against twice the reference's own error in
    that dtype; float32 ones, e.g. dA, dD or a float32 B, against the fp32 bound). Returns ``result``."""
    from numerics import assert_matches

    out, last, grads = result
    lowp = (torch.float16, torch.bfloat16)
    r_out, r_last, r_grads = run_ref64(x, gr, softplus, reverse)
    low = x["u"].dtype in lowp
    l_out, l_last, l_grads = run_ref_low(x, gr, softplus, reverse) if low else (None, None, [None] * 9)
    assert out.dtype == x["u"].dtype and last.dtype == torch.float32
    assert_matches("out", out, r_out, l_out)
    assert_matches("last_state", last, r_last, l_last)
    for name, g, r, lo, key in zip(GRAD_NAMES, grads, r_grads, l_grads, ORDER):
        if x[key] is None:
            assert g is None, name
            continue
        assert g.dtype == x[key].dtype and g.shape == x[key].shape, name
        assert_matches(name, g, r, lo if g.dtype in lowp else None)
    return result


def assert_deterministic(run, x: dict, gr: dict) -> None:
    """Two backward runs of a launcher (``run(x, gr, softplus, reverse) -> (out, last, grads)``) give
    bit-identical gradients."""
    _, _, g1 = run(x, gr, True, False)
    _, _, g2 = run(x, gr, True, False)
    for name, a, b in zip(GRAD_NAMES, g1, g2):
        assert torch.equal(a, b), name


def args_of(x: dict, to: torch.dtype | None = None) -> list:
    return [None if x[k] is None else (x[k] if to is None else x[k].to(to)) for k in ORDER]


def run_ref64(x: dict, gr: dict, softplus: bool, reverse: bool):
    """(out, last_state, grads) of the float64 reference: the ground truth."""
    a = args_of(x, torch.float64)
    out, last = selective_scan_ref(*a[:6], a[6], a[7], softplus, True, initial_state=a[8], reverse=reverse)
    dlast = None if gr["dlast"] is None else gr["dlast"].double()
    grads = selective_scan_ref_backward(gr["dout"].double(), dlast, *a[:8], delta_softplus=softplus,
                                        initial_state=a[8], reverse=reverse)
    return out, last, grads


def run_ref_low(x: dict, gr: dict, softplus: bool, reverse: bool):
    """The reference in the inputs' own dtypes (fp32 math, outputs and gradients rounded like a backend's)."""
    out, last, saved = reference_scan.scan_fwd(*args_of(x), softplus, reverse)
    grads = reference_scan.scan_bwd(gr["dout"], gr["dlast"], *args_of(x), saved, softplus, reverse)
    return out, last, grads


def explicit_order(H: int, W: int, name: str) -> list[int]:
    """The row-major token indices visited by scan direction ``name``, written out with loops."""
    rows = [[y * W + x for x in range(W)] for y in range(H)]
    cols = [[y * W + x for y in range(H)] for x in range(W)]
    base = name.removesuffix("_rev")
    lines = {"raster": rows, "transpose": cols, "snake": rows, "snake_transpose": cols}[base]
    if base.startswith("snake"):
        lines = [line if i % 2 == 0 else line[::-1] for i, line in enumerate(lines)]
    order = [t for line in lines for t in line]
    return order[::-1] if name.endswith("_rev") else order
