"""The CUDA selective-scan kernels (csrc/kernels/selective_scan.cuh) run on the CPU through the SIMT emulation.

The device code nvcc compiles (tests/test_nvcc_gate.py) runs here one OS thread per CUDA thread, driven by
the cuda backend's own launcher (``ditkernels.backends.cuda_scan.emu_scan_fwd / emu_scan_bwd``: the same
argument preparation as on a GPU), against the float64 reference on the same (rounded) inputs, with the
rule of docs/verify.md §4: fp32 err <= 1e-5; fp16/bf16 err <= 2 * err(reference in that dtype) + 1e-6, for the
output, last_state and every gradient. Outputs start as NaN (conftest sets DITKERNELS_POISON=1).
"""

from __future__ import annotations

import os

import pytest
import torch

import scan_helpers
from scan_helpers import args_of

os.environ.setdefault("DITKERNELS_EMU_TIMEOUT", "20")

from ditkernels import _ext  # noqa: E402

emu = _ext.emu()  # test-only extension: fails collection with the fix when it is not built
from ditkernels.backends import cuda_scan  # noqa: E402



def make_case(batch=2, dim=4, L=100, N=4, **kw):
    """scan_helpers.make_case at sizes the emulation runs quickly."""
    return scan_helpers.make_case(batch, dim, L, N, **kw)




def run_emu(x, gr, softplus, reverse, config=None, cpb=None):
    out, last, saved = cuda_scan.emu_scan_fwd(*args_of(x), softplus, reverse, config=config)
    grads = cuda_scan.emu_scan_bwd(gr["dout"], gr["dlast"], *args_of(x), saved, softplus, reverse, config=config,
                                   channels_per_block=cpb)
    return out, last, grads


def check(x, gr, softplus, reverse, config=None, cpb=None):
    result = run_emu(x, gr, softplus, reverse, config, cpb)
    return scan_helpers.check_against_reference(result, x, gr, softplus, reverse)


# ------------------------------------------------------------------------------------------------ fp32
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("L", [1, 7, 100, 257, 1000], ids=lambda L: f"L{L}")
def test_all_options_default_config(L, reverse):
    """Every option at once (grouped B, variable C, D, z, bias + softplus, initial state, d last_state)."""
    x, gr = make_case(L=L, seed=L)
    check(x, gr, softplus=True, reverse=reverse)


OPTION_CASES = {**scan_helpers.OPTION_CASES, "group4_B_group2_C": dict(b_kind="group4", c_kind="group2")}


@pytest.mark.parametrize("softplus", [False, True], ids=["linear", "softplus"])
@pytest.mark.parametrize("case", list(OPTION_CASES), ids=str)
def test_options_multi_chunk(case, softplus):
    """257 steps in chunks of 128 (three chunks, the last of one step): carries across chunks, both ways."""
    x, gr = make_case(L=257, seed=len(case), **OPTION_CASES[case])
    reverse = case in ("const_BC", "group4_B_group2_C", "plain")
    check(x, gr, softplus=softplus, reverse=reverse, config=(32, 4))


@pytest.mark.parametrize("cfg", [tuple(c) for c in emu.selective_scan_configs()], ids=lambda c: f"T{c[0]}xI{c[1]}")
def test_every_config_two_chunks_and_tail(cfg):
    chunk = cfg[0] * cfg[1]
    x, gr = make_case(batch=1, dim=2, N=3, L=2 * chunk + 5, seed=chunk)
    check(x, gr, softplus=True, reverse=chunk == 256, config=cfg)


def test_large_state_and_one_channel_per_group():
    """N = 40 (more states than threads of a warp's share), G = dim (every channel its own group)."""
    x, gr = make_case(batch=1, dim=3, L=70, N=40, b_kind="group3", c_kind="group3", seed=5)
    check(x, gr, softplus=False, reverse=False)


@pytest.mark.parametrize("cpb", [1, 2, 4])
def test_channels_per_block(cpb):
    """dB / dC partials over 1, 2 or 4 channels per backward block (one group of 4 channels)."""
    x, gr = make_case(batch=2, dim=4, L=100, b_kind="var", c_kind="var", seed=11)
    check(x, gr, softplus=True, reverse=False, cpb=cpb)


def test_backward_is_deterministic():
    scan_helpers.assert_deterministic(run_emu, *make_case(L=150, seed=3))


def test_strided_inputs():
    """u, delta, z, dout as transposes of (batch, L, dim) buffers; B as a slice of a wider buffer."""
    check(*scan_helpers.strided_case(N=4), softplus=True, reverse=True)


# --------------------------------------------------------------------------------------- fp16 / bf16
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("L", [7, 257], ids=lambda L: f"L{L}")
def test_low_precision(dtype, L, reverse):
    x, gr = make_case(L=L, dtype=dtype, seed=L + 1)
    check(x, gr, softplus=True, reverse=reverse, config=(32, 4))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_low_precision_constant_and_mixed_BC(dtype):
    """Constant float32 B with 16-bit u, and a variable float32 C with 16-bit u (runs the fp32 kernel)."""
    x, gr = make_case(L=100, dtype=dtype, b_kind="const", c_kind="var32", seed=21)
    check(x, gr, softplus=False, reverse=False)


# --------------------------------------------------------------------------------------------- launcher
def test_default_config_matches_the_kernels():
    for L in (1, 100, 128, 129, 256, 257, 512, 513, 1000, 5000):
        assert cuda_scan.default_config(L) == tuple(emu.selective_scan_default_config(L)), L
    assert set(cuda_scan.default_config(L) for L in (1, 200, 400, 4000)) <= {
        tuple(c) for c in emu.selective_scan_configs()}


def test_saved_shape_and_bad_saved():
    x, gr = make_case(L=300, seed=2)
    out, last, saved = cuda_scan.emu_scan_fwd(*args_of(x), True, False)
    assert tuple(saved.shape) == cuda_scan.saved_shape(2, 4, 300, 4) == (2, 4, 2, 4)
    assert torch.equal(saved[:, :, -1], last)
    assert torch.equal(saved[:, :, 0], x["initial_state"])
    with pytest.raises(ValueError, match="saved"):
        cuda_scan.emu_scan_bwd(gr["dout"], None, *args_of(x), saved[:, :, :1].contiguous(), True, False)


def test_kernel_argument_errors():
    with pytest.raises(KeyError, match="unknown argument"):
        emu.selective_scan_fwd({"no_such_field": 1})
    with pytest.raises(ValueError, match="dstate"):
        emu.selective_scan_fwd({"batch": 1, "dim": 1, "seqlen": 1, "dstate": 300})
    fields = emu.selective_scan_field_names()
    assert len(fields) == len(set(fields)) and "hs" in fields


def test_float64_is_refused():
    x, _ = make_case(L=5, dtype=torch.float64, seed=1)
    with pytest.raises(TypeError, match="u:"):
        cuda_scan.emu_scan_fwd(*args_of(x), False, False)


def test_cuda_module_has_the_same_configs():
    try:
        import ditkernels._cuda as cu
    except ImportError as e:
        pytest.skip(f"ditkernels._cuda not built ({e})")
    assert [tuple(c) for c in cu.selective_scan_configs()] == [tuple(c) for c in emu.selective_scan_configs()]
    from ditkernels.backends import cuda

    ok, why = cuda.available()
    assert ok == torch.cuda.is_available() and (ok or why)
