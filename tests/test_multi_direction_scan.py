"""Multi-direction 2-D scans (docs/spec.md §4): orders, the split/merge gathers, and multi_direction_scan against an
explicit loop of float64 reference scans, one per direction (forward and every gradient)."""

from __future__ import annotations

import pytest
import torch

import ditkernels
from ditkernels.ops.scan2d import DIRECTIONS, VMAMBA_DIRECTIONS
from ditkernels.reference.selective_scan import selective_scan_ref

from numerics import assert_matches
from scan_helpers import explicit_order





def test_orders_3x4():
    assert ditkernels.scan_orders((3, 4), "snake").tolist() == [[0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11]]
    assert ditkernels.scan_orders((3, 4), "snake_transpose_rev").tolist() == [[3, 7, 11, 10, 6, 2, 1, 5, 9, 8, 4, 0]]
    assert ditkernels.scan_orders((2, 3), "transpose").tolist() == [[0, 3, 1, 4, 2, 5]]


@pytest.mark.parametrize("grid", [(5, 7), (1, 6), (4, 1), (3, 3)], ids=lambda g: f"{g[0]}x{g[1]}")
def test_orders_are_the_explicit_permutations(grid):
    H, W = grid
    orders = ditkernels.scan_orders(grid, DIRECTIONS)
    assert orders.shape == (len(DIRECTIONS), H * W) and orders.dtype == torch.int64
    for k, name in enumerate(DIRECTIONS):
        assert orders[k].tolist() == explicit_order(H, W, name), name
        assert sorted(orders[k].tolist()) == list(range(H * W))


@pytest.mark.parametrize("directions", [DIRECTIONS, ("snake",), ("transpose_rev", "raster")], ids=len)
def test_split_merge_are_adjoint_and_inverse(directions):
    g = torch.Generator().manual_seed(0)
    b, c, H, W, K = 2, 3, 5, 7, len(directions)
    x = torch.randn(b, c, H, W, generator=g, dtype=torch.float64)
    y = torch.randn(b, K * c, H * W, generator=g, dtype=torch.float64)
    xs = ditkernels.split_directions(x, directions=directions)
    assert xs.shape == (b, K * c, H * W) and xs.is_contiguous()
    for k, name in enumerate(directions):  # channels k*c:(k+1)*c hold x in direction k's order
        torch.testing.assert_close(xs[:, k * c:(k + 1) * c], x.reshape(b, c, -1)[:, :, explicit_order(H, W, name)])
    # the flattened (b, c, L) input with grid= gives the same
    torch.testing.assert_close(ditkernels.split_directions(x.reshape(b, c, -1), (H, W), directions), xs)
    stacked = ditkernels.merge_directions(xs, (H, W), directions, merge="stack")
    torch.testing.assert_close(stacked, x.reshape(b, 1, c, -1).expand(b, K, c, -1))
    # <split(x), y> == <x, merge_sum(y)>
    lhs = (xs * y).sum()
    rhs = (x.reshape(b, c, -1) * ditkernels.merge_directions(y, (H, W), directions)).sum()
    torch.testing.assert_close(lhs, rhs)


def test_split_merge_gradcheck():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randn(1, 3, 2, 12, generator=g, dtype=torch.float64, requires_grad=True)
    dirs = ("snake", "raster_rev", "transpose")
    assert torch.autograd.gradcheck(lambda t: ditkernels.split_directions(t, directions=dirs), (x,))
    assert torch.autograd.gradgradcheck(lambda t: ditkernels.split_directions(t, directions=dirs), (x,))
    for merge in ("sum", "stack"):
        assert torch.autograd.gradcheck(lambda t: ditkernels.merge_directions(t, (3, 4), dirs, merge), (y,))


# --------------------------------------------------------------------------------------------------
# multi_direction_scan vs a loop of reference scans.

class Case:
    def __init__(self, grid, directions, *, per_dir=True, bc="var", z=True, flat=False, merge="sum", batch=2,
                 dim=3, dstate=4):
        self.grid, self.directions, self.per_dir, self.bc, self.z = grid, tuple(directions), per_dir, bc, z
        self.flat, self.merge, self.batch, self.dim, self.dstate = flat, merge, batch, dim, dstate

    def __repr__(self):
        dirs = "+".join(d.replace("transpose", "t").replace("snake", "s") for d in self.directions)
        return (f"{self.grid[0]}x{self.grid[1]}-K{len(self.directions)}[{dirs}]-{'perdir' if self.per_dir else 'shared'}"
                f"-{self.bc}{'-z' if self.z else ''}{'-flat' if self.flat else ''}-{self.merge}")


CASES = [
    Case((5, 7), DIRECTIONS),
    Case((5, 7), VMAMBA_DIRECTIONS, per_dir=False, merge="stack"),
    Case((7, 5), ("snake", "snake_rev"), bc="const", flat=True),
    Case((3, 4), ("snake", "transpose_rev", "raster"), per_dir=False, bc="const", z=False, merge="stack"),
    Case((1, 6), ("raster", "transpose", "snake_transpose"), batch=1, flat=True),
    Case((4, 1), ("raster_rev",), per_dir=False, z=False, dim=2, dstate=3),
]


def make_inputs(case: Case, dtype: torch.dtype, seed: int = 0) -> dict:
    """Grid-order inputs: shared or per-direction (K axis after the batch) delta/z/B/C, per-direction weights."""
    g = torch.Generator().manual_seed(seed)
    b, d, n, K = case.batch, case.dim, case.dstate, len(case.directions)
    H, W = case.grid
    S = (H * W,) if case.flat else (H, W)
    wt = torch.float64 if dtype == torch.float64 else torch.float32

    def randn(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dt)

    kd = (b, K) if case.per_dir else (b,)
    inputs = {
        "u": randn(b, d, *S),
        "delta": randn(*kd, d, *S, scale=0.5),
        "A": -torch.rand(K * d if case.per_dir else d, n, generator=g, dtype=torch.float64).add(0.2).to(wt),
        "D": randn(K * d if case.per_dir else d, dt=wt),
        "delta_bias": randn(K * d if case.per_dir else d, dt=wt, scale=0.3),
    }
    if case.bc == "var":
        inputs["B"], inputs["C"] = randn(*kd, n, *S), randn(*kd, n, *S)
    else:
        inputs["B"], inputs["C"] = randn(K * d if case.per_dir else d, n, dt=wt), randn(d, n, dt=wt)
    inputs["z"] = randn(*kd, d, *S) if case.z else None
    return inputs


def loop_reference(case: Case, inputs: dict) -> torch.Tensor:
    """K separate float64 reference scans over explicitly gathered sequences, scattered back and merged."""
    H, W = case.grid
    L, K, d = H * W, len(case.directions), case.dim
    x = {k: (None if v is None else v.double()) for k, v in inputs.items()}
    b = x["u"].shape[0]

    def seq(t, k, order):  # grid-order tensor (shared or per direction) -> direction k's (b, c, L)
        per = t.dim() == x["u"].dim() + 1
        t = t[:, k] if per else t
        return t.reshape(b, t.shape[1], L)[:, :, order]

    def weight(t, k):  # (d, ...) shared or (K*d, ...) per direction
        return t if t.shape[0] == d else t[k * d:(k + 1) * d]

    outs = []
    for k, name in enumerate(case.directions):
        order = torch.tensor(explicit_order(H, W, name))
        BC = [weight(X, k) if X.dim() == 2 else seq(X, k, order) for X in (x["B"], x["C"])]
        yk = selective_scan_ref(seq(x["u"], k, order), seq(x["delta"], k, order), weight(x["A"], k), *BC,
                                weight(x["D"], k), None if x["z"] is None else seq(x["z"], k, order),
                                weight(x["delta_bias"], k), delta_softplus=True)
        outs.append(yk[:, :, torch.argsort(order)])  # back to grid order
    y = torch.stack(outs, 1)
    S = tuple(inputs["u"].shape[2:])
    return y.sum(1).reshape(b, d, *S) if case.merge == "sum" else y.reshape(b, K, d, *S)


def run(case: Case, inputs: dict, backend: str, grad: torch.Tensor | None = None):
    """Output and gradients (same order as ``inputs``' tensors) of multi_direction_scan."""
    leaves = {k: (None if v is None else v.clone().requires_grad_()) for k, v in inputs.items()}
    out = ditkernels.multi_direction_scan(**leaves, delta_softplus=True, grid=case.grid if case.flat else None,
                                          directions=case.directions, merge=case.merge, backend=backend)
    if grad is None:
        return out, {}
    out.backward(grad.to(out.dtype))
    return out, {k: v.grad for k, v in leaves.items() if v is not None}


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_multi_direction_scan_matches_loop_float64(case, backend):
    inputs = make_inputs(case, torch.float64)
    leaves = {k: (None if v is None else v.clone().requires_grad_()) for k, v in inputs.items()}
    ref = loop_reference(case, leaves)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    ref.backward(g)
    out, grads = run(case, inputs, backend, g)
    assert out.shape == ref.shape and out.dtype == torch.float64
    assert_matches("out", out, ref.detach(), fp32_tol=1e-10)
    for name, gr in grads.items():
        assert gr.shape == inputs[name].shape, name
        assert_matches(f"d{name}", gr, leaves[name].grad, fp32_tol=1e-10)


@pytest.mark.parametrize("case", [CASES[0], CASES[2]], ids=repr)
def test_multi_direction_scan_float32_cpu(case):
    inputs = make_inputs(case, torch.float32, seed=3)
    leaves = {k: (None if v is None else v.double().requires_grad_()) for k, v in inputs.items()}
    ref = loop_reference(case, leaves)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    ref.backward(g)
    out, grads = run(case, inputs, "cpu", g)
    assert out.dtype == torch.float32
    assert_matches("out", out, ref.detach())
    for name, gr in grads.items():
        assert_matches(f"d{name}", gr, leaves[name].grad)


def test_multi_direction_scan_gradcheck():
    case = Case((2, 3), ("snake", "transpose_rev"), batch=1, dim=2, dstate=2)
    inputs = {k: v.requires_grad_() for k, v in make_inputs(case, torch.float64).items()}
    names = list(inputs)

    def f(*ts):
        return ditkernels.multi_direction_scan(**dict(zip(names, ts)), delta_softplus=True,
                                               directions=case.directions, backend="reference")

    assert torch.autograd.gradcheck(f, tuple(inputs.values()))


def test_multi_direction_scan_compiles_fullgraph():
    case = Case((3, 4), ("raster", "snake_rev"), batch=1)
    inputs = make_inputs(case, torch.float32)
    leaves = {k: v.clone().requires_grad_() for k, v in inputs.items()}
    f = torch.compile(lambda **kw: ditkernels.multi_direction_scan(**kw, delta_softplus=True,
                                                                   directions=case.directions, backend="cpu"),
                      fullgraph=True, backend="aot_eager")
    out = f(**leaves)
    out.sum().backward()
    eager, grads = run(case, inputs, "cpu", torch.ones_like(out))
    torch.testing.assert_close(out, eager)
    for name, gr in grads.items():
        torch.testing.assert_close(leaves[name].grad, gr)


# --------------------------------------------------------------------------------------------------
# Argument errors name the argument.

def _args(**over):
    g = torch.Generator().manual_seed(0)
    args = dict(u=torch.randn(1, 2, 3, 4, generator=g), delta=torch.randn(1, 2, 3, 4, generator=g),
                A=-torch.rand(2, 5, generator=g), B=torch.randn(1, 5, 3, 4, generator=g),
                C=torch.randn(1, 5, 3, 4, generator=g), directions=("raster", "snake"))
    args.update(over)
    return args


@pytest.mark.parametrize("over,exc,match", [
    (dict(directions=("raster", "diagonal")), ValueError, "directions: unknown direction 'diagonal'"),
    (dict(directions=()), TypeError, "directions: expected a non-empty"),
    (dict(merge="mean"), ValueError, "merge: expected one of"),
    (dict(grid=(4, 3)), ValueError, "grid: .* does not match"),
    (dict(u=torch.randn(1, 2, 12)), ValueError, "grid: required"),
    (dict(u=torch.randn(1, 2, 11), grid=(3, 4)), ValueError, "u: expected L = H\\*W = 12"),
    (dict(grid=(3, 4.0), u=torch.randn(1, 2, 12)), TypeError, "grid: expected a tuple of two ints"),
    (dict(delta=torch.randn(1, 3, 2, 3, 4)), ValueError, "delta: expected shape .*K=2"),
    (dict(delta=None), TypeError, "delta: expected a torch.Tensor"),
    (dict(A=-torch.rand(3, 5)), ValueError, "A: expected shape \\(dim=2, N\\) or \\(K\\*dim=4, N\\)"),
    (dict(B=torch.randn(1, 4, 3, 4)), ValueError, "B: expected shape .*N=5"),
    (dict(C=torch.randn(2, 6)), ValueError, "C: a constant C must have N=5"),
    (dict(z=torch.randn(1, 2, 4, 3)), ValueError, "z: expected shape"),
    (dict(D=torch.ones(3)), ValueError, "D: expected shape"),
    (dict(delta=torch.randn(1, 2, 3, 4, dtype=torch.float64)), TypeError, "delta: expected dtype"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_errors_name_the_argument(over, exc, match):
    with pytest.raises(exc, match=match):
        ditkernels.multi_direction_scan(**_args(**over), backend="reference")


def test_split_merge_errors():
    with pytest.raises(ValueError, match="grid: required"):
        ditkernels.split_directions(torch.randn(1, 2, 12))
    with pytest.raises(ValueError, match="y: expected"):
        ditkernels.merge_directions(torch.randn(1, 5, 12), (3, 4), ("raster", "snake"))
    with pytest.raises(ValueError, match="grid: expected positive"):
        ditkernels.scan_orders((0, 4))
