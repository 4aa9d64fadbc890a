"""The Triton selective-scan kernels (triton_kernels/selective_scan.py) under TRITON_INTERPRET=1.

Forward and backward through the triton launcher (and through the registered op with autograd)
against the float64 reference on the same (rounded) inputs, with the rule of docs/verify.md §4: fp32
err <= 1e-5; fp16/bf16 err <= 2 * err(reference in that dtype) + 1e-6 for the output, last_state
and every gradient. Outputs start as NaN (conftest sets DITKERNELS_POISON=1). The kernels run with
the shipped configs (chunks of BLOCK_L steps, BLOCK_D channels per forward / backward program):
N = 16: 64 steps, 2 / 1 channels; N = 4: 64 steps, 8 / 4; N = 40 (BLOCK_N 64): 32 steps; N = 256: 8
steps. So L = 97 and 200 run several chunks and a tail.
"""

from __future__ import annotations

import pytest
import torch

from numerics import assert_matches
import scan_helpers
from scan_helpers import ORDER, args_of, make_case, run_ref64

pytest.importorskip("triton")

from ditkernels import backends  # noqa: E402
from ditkernels.backends import triton_scan  # noqa: E402
from ditkernels.ops.selective_scan import selective_scan  # noqa: E402
from ditkernels.triton_kernels import selective_scan as kernels  # noqa: E402

LOW = (torch.float16, torch.bfloat16)




def run_triton(x, gr, softplus, reverse, n_sub=None):
    out, last, saved = triton_scan.scan_fwd(*args_of(x), softplus, reverse)
    grads = kernels.scan_bwd(gr["dout"], gr["dlast"], *args_of(x), saved, softplus, reverse, n_sub=n_sub)
    return out, last, grads


def check(x, gr, softplus, reverse, n_sub=None):
    return scan_helpers.check_against_reference(run_triton(x, gr, softplus, reverse, n_sub), x, gr, softplus, reverse)


# ------------------------------------------------------------------------------------------------ fp32
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("L", [1, 97, 200], ids=lambda L: f"L{L}")
def test_all_options(L, reverse):
    """Every option at once: grouped B (G=2), variable C, D, z, bias + softplus, initial state, d last_state;
    6 channels in 2 units of 3: per unit two forward blocks of 2 (one lane masked), three backward blocks."""
    x, gr = make_case(dim=6, L=L, seed=L)
    check(x, gr, softplus=True, reverse=reverse)


OPTION_CASES = {**scan_helpers.OPTION_CASES, "group4_B_group3_C": dict(b_kind="group4", c_kind="group3")}


@pytest.mark.parametrize("softplus", [False, True], ids=["linear", "softplus"])
@pytest.mark.parametrize("case", list(OPTION_CASES), ids=str)
def test_options(case, softplus):
    x, gr = make_case(batch=1, L=97, N=4, seed=len(case), **OPTION_CASES[case])
    reverse = case in ("const_BC", "group4_B_group3_C", "plain")
    check(x, gr, softplus=softplus, reverse=reverse)


@pytest.mark.parametrize("N,L", [(1, 70), (40, 70), (256, 37)], ids=lambda v: str(v))
def test_state_sizes(N, L):
    """N = 1, N = 40 (BLOCK_N 64, masked states) and N = 256 (one channel per program); G = dim for N=40."""
    kind = "group3" if N == 40 else "var"
    x, gr = make_case(batch=1, dim=3, L=L, N=N, b_kind=kind, c_kind=kind, seed=N)
    check(x, gr, softplus=N != 40, reverse=N == 256)


@pytest.mark.parametrize("n_sub", [1, 2, 3])
def test_channel_blocks_per_backward_program(n_sub):
    """dB / dC partials summed over 1, 2 or 3 backward channel blocks (of 1) per program: 12 channels in 2
    units of 6, so 6, 3 or 2 programs per unit (and three forward blocks of 2 per unit)."""
    x, gr = make_case(batch=1, L=70, b_kind="var", c_kind="group2", seed=11)
    check(x, gr, softplus=True, reverse=False, n_sub=n_sub)


def test_backward_is_deterministic():
    scan_helpers.assert_deterministic(run_triton, *make_case(batch=1, dim=6, L=70, seed=3))


def test_strided_inputs():
    """u, delta, z, dout as transposes of (batch, L, dim) buffers; B as a slice of a wider buffer."""
    check(*scan_helpers.strided_case(N=8), softplus=True, reverse=True)


# --------------------------------------------------------------------------------------- fp16 / bf16
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
def test_low_precision(dtype, reverse):
    x, gr = make_case(dim=6, L=97, dtype=dtype, seed=5)
    check(x, gr, softplus=True, reverse=reverse)


@pytest.mark.parametrize("dtype", LOW, ids=["fp16", "bf16"])
def test_low_precision_constant_and_mixed_BC(dtype):
    """Constant float32 B with 16-bit u, and a variable float32 C with 16-bit u."""
    x, gr = make_case(batch=1, dim=4, L=100, N=8, dtype=dtype, b_kind="const", c_kind="var32", seed=21)
    check(x, gr, softplus=False, reverse=False)


# ---------------------------------------------------------------------------- the op, autograd, launcher
def test_op_autograd_matches_reference():
    """ditkernels.selective_scan(backend="triton"): gradients through the registered op, incl. last_state."""
    x, gr = make_case(batch=2, dim=6, L=75, N=8, seed=9)
    leaves = {k: None if v is None else v.clone().requires_grad_(True) for k, v in x.items()}
    out, last = selective_scan(*args_of(leaves)[:8], True, True, initial_state=leaves["initial_state"],
                               reverse=True, backend="triton")
    torch.autograd.backward((out, last), (gr["dout"], gr["dlast"]))
    r_out, r_last, r_grads = run_ref64(x, gr, True, True)
    assert_matches("out", out.detach(), r_out)
    assert_matches("last_state", last.detach(), r_last)
    for key, r in zip(ORDER, r_grads):
        assert_matches(f"d{key}", leaves[key].grad, r)


def test_saved_shape_and_bad_saved():
    x, gr = make_case(batch=2, dim=4, L=150, N=16, seed=2)
    out, last, saved = triton_scan.scan_fwd(*args_of(x), True, False)
    assert tuple(saved.shape) == triton_scan.saved_shape(2, 4, 150, 16) == (2, 4, 4, 16)  # chunks of 64
    assert torch.equal(saved[:, :, -1], last)
    assert torch.equal(saved[:, :, 0], x["initial_state"])
    assert triton_scan.saved_shape(1, 1, 100, 256) == (1, 1, 14, 256)  # chunks of 8
    with pytest.raises(ValueError, match="saved"):
        triton_scan.scan_bwd(gr["dout"], None, *args_of(x), saved[:, :, :1].contiguous(), True, False)


def test_backend_is_registered_and_refuses_float64():
    ok, why = backends.availability("triton")
    assert ok, why
    x, _ = make_case(batch=1, dim=2, L=5, N=2, dtype=torch.float64, seed=1)
    with pytest.raises(RuntimeError, match="float64"):
        selective_scan(*args_of(x)[:8], backend="triton")


def test_bwd_blocks_caps_the_workspace():
    MiB = 1 << 20
    # (batch * units, blocks per unit, partial bytes per program, gradient bytes, target programs)
    assert kernels.bwd_blocks(8, 4, 0, 0, 1) == 1  # no variable B / C: every block its own program
    assert kernels.bwd_blocks(2, 4, MiB, MiB, 4) == 2  # the most blocks per program giving 4 programs
    assert kernels.bwd_blocks(1, 4, MiB, MiB, 4) == 1
    assert kernels.bwd_blocks(1, 4, MiB, MiB, 1) == 4
    # Mamba at batch 8, dim 1536 (N 16: 1536 blocks of one channel), L 4096, variable B and C, 528 programs
    # wanted: 23 blocks per program (8 * 67 programs) need 8 * 67 * 512 KiB > 256 MiB; 24 blocks fit.
    partial = 2 * 16 * 4096 * 4
    assert kernels.bwd_blocks(8, 1536, partial, 8 * partial, 528) == 24
    # L = 65536: 8 MiB of partials per program, cap 8x the 64 MiB gradients: 64 programs of 192 blocks.
    assert kernels.bwd_blocks(8, 1536, 16 * partial, 8 * 16 * partial, 528) == 192
