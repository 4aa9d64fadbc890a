"""ditkernels.nn.Mamba (mamba-ssm's Mamba v1 drop-in) and ditkernels.nn.SS2D (VMamba's 2-D mixer):
parameter tables, initialisation, state dicts, and forward/backward against plain-PyTorch float64
re-implementations (mamba-ssm's slow path; an explicit loop over scan directions)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import ditkernels
from ditkernels.nn import SS2D, Mamba
from ditkernels.reference.selective_scan import selective_scan_ref

from numerics import MODULE_BACKENDS, assert_matches, rel_err
from scan_helpers import explicit_order


# --------------------------------------------------------------------------------------------------
# Mamba: parameter names and shapes, from mamba_ssm/modules/mamba_simple.py's definition
# (d_inner = int(expand * d_model), dt_rank "auto" = ceil(d_model / 16)), in state-dict order.

MAMBA_CONFIGS = {
    "d16-defaults": (dict(d_model=16), [
        ("A_log", (32, 16)), ("D", (32,)), ("in_proj.weight", (64, 16)), ("conv1d.weight", (32, 1, 4)),
        ("conv1d.bias", (32,)), ("x_proj.weight", (33, 32)), ("dt_proj.weight", (32, 1)), ("dt_proj.bias", (32,)),
        ("out_proj.weight", (16, 32))]),
    "d40-N8-conv3-x1.5-r5-bias-noconvbias": (
        dict(d_model=40, d_state=8, d_conv=3, expand=1.5, dt_rank=5, conv_bias=False, bias=True), [
            ("A_log", (60, 8)), ("D", (60,)), ("in_proj.weight", (120, 40)), ("in_proj.bias", (120,)),
            ("conv1d.weight", (60, 1, 3)), ("x_proj.weight", (21, 60)), ("dt_proj.weight", (60, 5)),
            ("dt_proj.bias", (60,)), ("out_proj.weight", (40, 60)), ("out_proj.bias", (40,))]),
    "d33-x3-auto-rank3": (dict(d_model=33, expand=3), [
        ("A_log", (99, 16)), ("D", (99,)), ("in_proj.weight", (198, 33)), ("conv1d.weight", (99, 1, 4)),
        ("conv1d.bias", (99,)), ("x_proj.weight", (35, 99)), ("dt_proj.weight", (99, 3)), ("dt_proj.bias", (99,)),
        ("out_proj.weight", (33, 99))]),
}


@pytest.mark.parametrize("name", list(MAMBA_CONFIGS))
def test_mamba_parameter_table(name):
    kwargs, table = MAMBA_CONFIGS[name]
    m = Mamba(**kwargs)
    assert [(k, tuple(v.shape)) for k, v in m.state_dict().items()] == table
    # a state dict with mamba-ssm's keys and shapes loads strictly, unchanged
    g = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(shape, generator=g) for k, shape in table}
    m.load_state_dict(sd, strict=True)
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, sd[k], rtol=0, atol=0)


def test_mamba_init_matches_mamba_ssm_rng_stream():
    """Same seed, same draws in the same order as mamba-ssm's constructor -> identical parameters."""
    d_model, d_state, d_conv, expand, dt_min, dt_max, floor = 24, 6, 4, 2, 0.002, 0.2, 1e-3
    torch.manual_seed(123)
    m = Mamba(d_model, d_state, d_conv, expand, dt_min=dt_min, dt_max=dt_max, dt_init_floor=floor)

    torch.manual_seed(123)
    d_inner, rank = expand * d_model, math.ceil(d_model / 16)
    in_proj = torch.nn.Linear(d_model, 2 * d_inner, bias=False)
    conv1d = torch.nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1)
    x_proj = torch.nn.Linear(d_inner, rank + 2 * d_state, bias=False)
    dt_proj = torch.nn.Linear(rank, d_inner)
    std = rank ** -0.5
    torch.nn.init.uniform_(dt_proj.weight, -std, std)
    dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    out_proj = torch.nn.Linear(d_inner, d_model, bias=False)
    expect = {
        "A_log": torch.log(torch.arange(1, d_state + 1, dtype=torch.float32)).expand(d_inner, d_state),
        "D": torch.ones(d_inner), "in_proj.weight": in_proj.weight, "conv1d.weight": conv1d.weight,
        "conv1d.bias": conv1d.bias, "x_proj.weight": x_proj.weight, "dt_proj.weight": dt_proj.weight,
        "dt_proj.bias": dt + torch.log(-torch.expm1(-dt)), "out_proj.weight": out_proj.weight,
    }
    for k, v in m.state_dict().items():
        torch.testing.assert_close(v, expect[k].detach(), msg=k)
    sp = F.softplus(m.dt_proj.bias.double())
    assert sp.min() >= min(dt_min, floor) * (1 - 1e-5) and sp.max() <= dt_max * (1 + 1e-5)
    assert m.A_log._no_weight_decay and m.D._no_weight_decay and m.dt_proj.bias._no_reinit


def test_mamba_init_options_and_dtypes():
    m = Mamba(20, dt_rank=4, dt_init="constant", dt_scale=2.0, dtype=torch.bfloat16)
    assert torch.all(m.dt_proj.weight == torch.tensor(4 ** -0.5 * 2.0, dtype=torch.bfloat16))
    assert m.in_proj.weight.dtype == torch.bfloat16 and m.dt_proj.bias.dtype == torch.bfloat16
    assert m.A_log.dtype == torch.float32 and m.D.dtype == torch.float32  # mamba-ssm keeps these in fp32
    with pytest.raises(ValueError, match="dt_init"):
        Mamba(16, dt_init="uniform")
    with pytest.raises(ValueError, match="dt_rank"):
        Mamba(16, dt_rank=0)


def mamba_slow_path(p: dict, hidden: torch.Tensor, d_state: int, d_conv: int) -> torch.Tensor:
    """mamba-ssm's Mamba.forward without causal_conv1d / fused kernels, on a dict of parameters."""
    L = hidden.shape[1]
    rank = p["dt_proj.weight"].shape[1]
    xz = F.linear(hidden, p["in_proj.weight"], p.get("in_proj.bias")).transpose(1, 2)
    x, z = xz.chunk(2, dim=1)
    x = F.silu(F.conv1d(x, p["conv1d.weight"], p.get("conv1d.bias"), padding=d_conv - 1, groups=x.shape[1])[..., :L])
    x_dbl = F.linear(x.transpose(1, 2), p["x_proj.weight"])
    dt, B, C = torch.split(x_dbl, [rank, d_state, d_state], dim=-1)
    dt = (p["dt_proj.weight"] @ dt.transpose(1, 2))
    A = -torch.exp(p["A_log"].to(torch.float64 if x.dtype == torch.float64 else torch.float32))
    y = selective_scan_ref(x, dt, A, B.transpose(1, 2), C.transpose(1, 2), p["D"].to(A.dtype), z=z,
                           delta_bias=p["dt_proj.bias"].to(A.dtype), delta_softplus=True)
    return F.linear(y.transpose(1, 2), p["out_proj.weight"], p.get("out_proj.bias"))


def randomized(m: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Perturb every parameter (D away from ones, A_log away from the S4D grid) so each one matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64).to(p.dtype))
    return m


MAMBA_FWD = [("d16-L19", dict(d_model=16), 2, 19), ("d40-L9-bias", MAMBA_CONFIGS["d40-N8-conv3-x1.5-r5-bias-noconvbias"][0],
                                                      1, 9), ("d33-L2", dict(d_model=33, expand=3), 3, 2)]


@pytest.mark.parametrize("backend", MODULE_BACKENDS)
@pytest.mark.parametrize("cfg", MAMBA_FWD, ids=lambda c: c[0])
def test_mamba_forward_backward_float64(cfg, backend):
    _, kwargs, batch, L = cfg
    torch.manual_seed(0)
    m = randomized(Mamba(**kwargs, dtype=torch.float64, backend=backend))
    x = torch.randn(batch, L, m.d_model, dtype=torch.float64, requires_grad=True)
    out = m(x)
    params = dict(m.named_parameters())
    ref_params = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    x_ref = x.detach().clone().requires_grad_()
    ref = mamba_slow_path(ref_params, x_ref, m.d_state, m.d_conv)
    assert out.shape == (batch, L, m.d_model) and out.dtype == torch.float64
    assert_matches("out", out, ref.detach(), fp32_tol=1e-10)
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out.backward(g)
    ref.backward(g)
    assert_matches("dx", x.grad, x_ref.grad, fp32_tol=1e-10)
    for k, p in params.items():
        assert_matches(f"d{k}", p.grad, ref_params[k].grad, fp32_tol=1e-10)


def test_mamba_float32_cpu_vs_float64_slow_path():
    torch.manual_seed(0)
    m = randomized(Mamba(24, d_state=8, backend="cpu"))
    x = torch.randn(2, 70, 24)
    x_ref = x.double().requires_grad_()
    ref_params = {k: v.detach().double().requires_grad_() for k, v in m.named_parameters()}
    ref = mamba_slow_path(ref_params, x_ref, m.d_state, m.d_conv)
    x.requires_grad_()
    out = m(x)
    assert out.dtype == torch.float32
    assert_matches("out", out, ref.detach())
    out.sum().backward()
    ref.sum().backward()
    assert_matches("dx", x.grad, x_ref.grad)
    for k, p in m.named_parameters():
        assert_matches(f"d{k}", p.grad, ref_params[k].grad)


def test_mamba_bfloat16_vs_slow_path_in_bfloat16():
    """docs/verify.md §4: err(module in bf16) <= 2 * err(mamba-ssm's slow path run in bf16) + 1e-6."""
    torch.manual_seed(0)
    m = randomized(Mamba(32, d_state=8, dtype=torch.bfloat16, backend="cpu"))
    x = torch.randn(2, 40, 32).to(torch.bfloat16)
    params = dict(m.named_parameters())
    with torch.no_grad():
        out = m(x)
        ref64 = mamba_slow_path({k: v.double() for k, v in params.items()}, x.double(), m.d_state, m.d_conv)
        ref_low = mamba_slow_path(params, x, m.d_state, m.d_conv)
    assert out.dtype == torch.bfloat16
    assert_matches("out", out, ref64, ref_low)


def test_mamba_state_dict_round_trip():
    torch.manual_seed(0)
    a = randomized(Mamba(16, d_state=4, bias=True, backend="cpu"))
    b = Mamba(16, d_state=4, bias=True, backend="reference")
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(2, 11, 16)
    torch.testing.assert_close(b(x), a(x))


def test_mamba_matches_mambapy():
    """Independent cross-check: mambapy's MambaBlock has mamba-ssm's parameter names, so the state dict loads."""
    mambapy = pytest.importorskip("mambapy.mamba")
    torch.manual_seed(0)
    m = randomized(Mamba(16, d_state=8, backend="cpu"))
    block = mambapy.MambaBlock(mambapy.MambaConfig(d_model=16, n_layers=1, d_state=8, pscan=False))
    block.load_state_dict(m.state_dict(), strict=True)
    x = torch.randn(2, 21, 16)
    with torch.no_grad():
        ref = block.double()(x.double())
        assert_matches("out", m(x), ref)


def test_mamba_errors():
    m = Mamba(16)
    with pytest.raises(ValueError, match="hidden_states: expected"):
        m(torch.randn(2, 5, 15))
    with pytest.raises(NotImplementedError, match="inference_params"):
        m(torch.randn(2, 5, 16), inference_params=object())


# --------------------------------------------------------------------------------------------------
# SS2D: VMamba's (v0) parameter names and shapes, in state-dict order.

SS2D_TABLE = [  # SS2D(d_model=16, directions=4): d_inner 32, dt_rank 1, N 16, d_conv 3
    ("x_proj_weight", (4, 33, 32)), ("A_logs", (128, 16)), ("Ds", (128,)), ("dt_projs_weight", (4, 32, 1)),
    ("dt_projs_bias", (4, 32)), ("in_proj.weight", (64, 16)), ("conv2d.weight", (32, 1, 3, 3)), ("conv2d.bias", (32,)),
    ("out_norm.weight", (32,)), ("out_norm.bias", (32,)), ("out_proj.weight", (16, 32))]


def test_ss2d_parameter_table_and_init():
    m = SS2D(16)
    assert [(k, tuple(v.shape)) for k, v in m.state_dict().items()] == SS2D_TABLE
    assert m.directions == ditkernels.ops.scan2d.VMAMBA_DIRECTIONS
    torch.testing.assert_close(m.A_logs, torch.log(torch.arange(1, 17.0)).expand(128, 16))
    assert torch.all(m.Ds == 1) and m.A_logs.dtype == m.Ds.dtype == torch.float32
    sp = F.softplus(m.dt_projs_bias.double())
    assert sp.min() >= 1e-4 * (1 - 1e-5) and sp.max() <= 0.1 * (1 + 1e-5)
    m8 = SS2D(20, d_state=4, d_conv=5, expand=1.5, directions=8, dt_rank=3)
    shapes = {k: tuple(v.shape) for k, v in m8.state_dict().items()}
    assert shapes["x_proj_weight"] == (8, 11, 30) and shapes["A_logs"] == (240, 4)
    assert shapes["dt_projs_weight"] == (8, 30, 3) and shapes["conv2d.weight"] == (30, 1, 5, 5)





def ss2d_loop(p: dict, x: torch.Tensor, directions, d_state: int, d_conv: int) -> torch.Tensor:
    """SS2D written as a loop over directions: one reference scan per direction, x (batch, H, W, C)."""
    b, H, W, _ = x.shape
    d = p["A_logs"].shape[0] // len(directions)
    xi, z = F.linear(x, p["in_proj.weight"], p.get("in_proj.bias")).chunk(2, dim=-1)
    xi = F.silu(F.conv2d(xi.permute(0, 3, 1, 2), p["conv2d.weight"], p.get("conv2d.bias"),
                         padding=(d_conv - 1) // 2, groups=d)).reshape(b, d, H * W)
    rank = p["dt_projs_weight"].shape[2]
    y = 0
    for k, name in enumerate(directions):
        order = torch.tensor(explicit_order(H, W, name))
        xk = xi[:, :, order]
        dt, Bk, Ck = torch.split(torch.einsum("bdl,cd->bcl", xk, p["x_proj_weight"][k]), [rank, d_state, d_state], 1)
        dt = torch.einsum("brl,dr->bdl", dt, p["dt_projs_weight"][k])
        rows = slice(k * d, (k + 1) * d)
        yk = selective_scan_ref(xk, dt, -torch.exp(p["A_logs"][rows].to(xk.dtype)), Bk, Ck, p["Ds"][rows],
                                delta_bias=p["dt_projs_bias"][k], delta_softplus=True)
        y = y + yk[:, :, torch.argsort(order)]
    y = F.layer_norm(y.transpose(1, 2), (d,), p["out_norm.weight"], p["out_norm.bias"]) * F.silu(z.reshape(b, -1, d))
    return F.linear(y, p["out_proj.weight"], p.get("out_proj.bias")).reshape(b, H, W, -1)


SS2D_CASES = [
    ("5x7-K4", dict(d_model=8, d_state=4), (5, 7), False),
    ("3x5-K8-flat", dict(d_model=6, d_state=3, directions=8, bias=True), (3, 5), True),
    ("4x3-snake-conv1", dict(d_model=8, d_state=2, d_conv=1, directions=("snake", "snake_transpose_rev")), (4, 3),
     False),
]


@pytest.mark.parametrize("backend", MODULE_BACKENDS)
@pytest.mark.parametrize("case", SS2D_CASES, ids=lambda c: c[0])
def test_ss2d_matches_direction_loop_float64(case, backend):
    _, kwargs, (H, W), flat = case
    torch.manual_seed(0)
    m = randomized(SS2D(**kwargs, dtype=torch.float64, backend=backend))
    x = torch.randn(2, H, W, m.d_model, dtype=torch.float64)
    params = dict(m.named_parameters())
    ref_params = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
    x_ref = x.clone().requires_grad_()
    ref = ss2d_loop(ref_params, x_ref, m.directions, m.d_state, m.d_conv)
    x_in = (x.reshape(2, H * W, -1) if flat else x).requires_grad_()
    out = m(x_in, grid=(H, W)) if flat else m(x_in)
    assert out.shape == x_in.shape
    out = out.reshape(ref.shape)
    assert_matches("out", out, ref.detach(), fp32_tol=1e-10)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    out.backward(g)
    ref.backward(g)
    assert_matches("dx", x_in.grad.reshape(x_ref.shape), x_ref.grad, fp32_tol=1e-10)
    for k, p in params.items():
        assert_matches(f"d{k}", p.grad, ref_params[k].grad, fp32_tol=1e-10)


def test_ss2d_vmamba_cross_scan():
    """directions=4 is VMamba's cross-scan: [x, x^T, flip(x), flip(x^T)], merged back with flips/transposes."""
    torch.manual_seed(0)
    H, W, d = 5, 7, 3
    x = torch.randn(2, d, H, W, dtype=torch.float64)
    xs = ditkernels.split_directions(x).view(2, 4, d, H * W)
    hw = torch.stack([x.flatten(2), x.transpose(2, 3).flatten(2)], 1)
    torch.testing.assert_close(xs, torch.cat([hw, hw.flip(-1)], 1), rtol=0, atol=0)
    y = torch.randn(2, 4, d, H * W, dtype=torch.float64)
    inv = y[:, 2:4].flip(-1)
    vm = (y[:, 0] + inv[:, 0] + y[:, 1].view(2, d, W, H).transpose(2, 3).flatten(2)
          + inv[:, 1].view(2, d, W, H).transpose(2, 3).flatten(2))
    torch.testing.assert_close(ditkernels.merge_directions(y, (H, W)), vm)


def test_ss2d_equals_multi_direction_scan_in_grid_order():
    """The module (projections on reordered sequences) == projections in grid order + multi_direction_scan."""
    torch.manual_seed(0)
    m = randomized(SS2D(8, d_state=4, directions=("raster", "snake", "transpose_rev"), dtype=torch.float64,
                        backend="cpu"))
    H, W, d = 3, 5, m.d_inner
    x = torch.randn(2, H, W, 8, dtype=torch.float64)
    xi, z = m.in_proj(x).chunk(2, -1)
    xi = F.silu(m.conv2d(xi.permute(0, 3, 1, 2)))  # (b, d, H, W)
    dbl = torch.einsum("bdhw,kcd->bkchw", xi, m.x_proj_weight)
    dt, B, C = torch.split(dbl, [m.dt_rank, m.d_state, m.d_state], 2)
    dt = torch.einsum("bkrhw,kdr->bkdhw", dt, m.dt_projs_weight)
    y = ditkernels.multi_direction_scan(xi, dt, -torch.exp(m.A_logs), B, C, m.Ds, delta_bias=m.dt_projs_bias.flatten(),
                                        delta_softplus=True, directions=m.directions, backend="cpu")
    y = m.out_norm(y.flatten(2).transpose(1, 2)) * F.silu(z.reshape(2, -1, d))
    expect = m.out_proj(y).reshape(2, H, W, 8)
    torch.testing.assert_close(m(x), expect)


def test_ss2d_float32_and_state_dict_round_trip():
    torch.manual_seed(0)
    a = randomized(SS2D(12, d_state=4, backend="cpu"))
    b = SS2D(12, d_state=4, backend="reference")
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(2, 6, 5, 12)
    out = a(x)
    torch.testing.assert_close(b(x), out)
    ref = ss2d_loop({k: v.detach().double() for k, v in a.named_parameters()}, x.double(), a.directions, 4, 3)
    assert out.dtype == torch.float32 and rel_err(out, ref) <= 1e-5


def test_ss2d_errors():
    m = SS2D(8, d_state=2)
    with pytest.raises(ValueError, match="grid: required"):
        m(torch.randn(1, 12, 8))
    with pytest.raises(ValueError, match="x: expected H\\*W = 12"):
        m(torch.randn(1, 10, 8), grid=(3, 4))
    with pytest.raises(ValueError, match="grid: .* does not match"):
        m(torch.randn(1, 3, 4, 8), grid=(4, 3))
    with pytest.raises(ValueError, match="x: expected"):
        m(torch.randn(1, 3, 4, 7))
    with pytest.raises(ValueError, match="d_conv"):
        SS2D(8, d_conv=4)
    with pytest.raises(ValueError, match="directions"):
        SS2D(8, directions=3)
    with pytest.raises(ValueError, match="directions: unknown direction"):
        SS2D(8, directions=("raster", "zigzag"))
