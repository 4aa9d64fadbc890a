"""The CUDA device code of csrc/kernels, run on the CPU through the SIMT emulation (csrc/simt/emu.h).

The same source that nvcc compiles (tests/test_nvcc_gate.py) runs here, one OS thread per CUDA thread,
against a float64 reference; the emulation primitives (barrier, warp shuffles, shared memory, atomics,
error reporting) are tested on small kernels of csrc/emu/simt_selftest.cpp.
"""

import os

import numpy as np
import pytest
import torch

from numerics import rel_err

# Every barrier wait of a correct launch here lasts milliseconds; a broken barrier (one that deadlocks
# in a way the exact deadlock detector misses) fails after this many seconds instead of 60 (read per launch).
os.environ.setdefault("DITKERNELS_EMU_TIMEOUT", "20")

from ditkernels import _ext  # noqa: E402

emu = _ext.emu()  # test-only extension: fails collection with the fix when it is not built

LENGTHS = [1, 31, 33, 100, 1000, 4097]


def scan_ref(a, b, h0=None):
    """float64 sequential recurrence h_t = a_t h_{t-1} + b_t over the last axis."""
    a64, b64 = a.double().numpy(), b.double().numpy()
    out = np.empty_like(a64)
    h = np.zeros(a64.shape[0]) if h0 is None else h0.double().numpy().copy()
    for t in range(a64.shape[1]):
        h = a64[:, t] * h + b64[:, t]
        out[:, t] = h
    return torch.from_numpy(out)


def make_inputs(rows, L, seed):
    g = torch.Generator().manual_seed(seed)
    # |a| in [0.8, 1): long memory, both signs; b ~ N(0, 1)
    sign = torch.where(torch.rand(rows, L, generator=g) < 0.2, -1.0, 1.0)
    a = sign * (0.8 + 0.2 * torch.rand(rows, L, generator=g))
    b = torch.randn(rows, L, generator=g)
    h0 = 3.0 * torch.randn(rows, generator=g)
    return a.float(), b.float(), h0.float()


def run_emu(a, b, h0=None, out=None, h0_stride=1, **kw):
    rows, L = a.shape
    if out is None:
        out = torch.full((rows, L), float("nan"))
    emu.scan_pairs(a.data_ptr(), b.data_ptr(), out.data_ptr(), 0 if h0 is None else h0.data_ptr(), rows, L,
                   a.stride(), b.stride(), out.stride(), h0_stride, **kw)
    return out


@pytest.mark.parametrize("with_h0", [False, True], ids=["h0=0", "h0"])
@pytest.mark.parametrize("L", LENGTHS, ids=lambda L: f"L{L}")
def test_scan_pairs_default_config(L, with_h0):
    rows = 5
    a, b, h0 = make_inputs(rows, L, seed=L)
    out = run_emu(a, b, h0 if with_h0 else None)
    ref = scan_ref(a, b, h0 if with_h0 else None)
    assert torch.isfinite(out).all()
    assert rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("cfg", [tuple(c) for c in emu.scan_pairs_configs()], ids=lambda c: f"T{c[0]}xI{c[1]}")
def test_scan_pairs_every_config_multi_chunk(cfg):
    threads, items = cfg
    chunk = threads * items
    for L in (chunk - 1, 2 * chunk + 5):  # one partial chunk; two full chunks (float4 path) and a tail
        a, b, h0 = make_inputs(3, L, seed=chunk + L)
        out = run_emu(a, b, h0, threads=threads, items=items)
        assert rel_err(out, scan_ref(a, b, h0)) <= 1e-5, L


def test_scan_pairs_strided_and_unaligned():
    rows, L = 4, 1000
    a, b, h0 = make_inputs(rows, L, seed=7)
    ref = scan_ref(a, b, h0[::1])
    # a with t-stride = rows (a transposed (L, rows) tensor), out with padded rows, h0 with stride 2
    a_t = a.t().contiguous().t()
    out_big = torch.full((rows, L + 3), float("nan"))
    out = out_big[:, :L]
    h0_strided = torch.stack([h0, torch.full_like(h0, float("nan"))], 1).reshape(-1)
    run_emu(a_t, b, h0_strided, out=out, h0_stride=2)
    assert rel_err(out, ref) <= 1e-5
    assert torch.isnan(out_big[:, L:]).all()  # nothing written past the rows
    # contiguous but misaligned by one element: the kernel must not take the float4 path
    a_buf, b_buf = torch.empty(rows * L + 1), torch.empty(rows * L + 1)
    a_buf[1:] = a.reshape(-1)
    b_buf[1:] = b.reshape(-1)
    out_buf = torch.full((rows * L + 1,), float("nan"))
    run_emu(a_buf[1:].view(rows, L), b_buf[1:].view(rows, L), h0, out=out_buf[1:].view(rows, L))
    assert rel_err(out_buf[1:].view(rows, L), ref) <= 1e-5


def test_scan_pairs_concurrency_is_deterministic():
    rows, L = 7, 600
    a, b, h0 = make_inputs(rows, L, seed=11)
    outs = [run_emu(a, b, h0, threads=64, items=4, concurrent_blocks=c) for c in (1, 2, 7)]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert rel_err(outs[0], scan_ref(a, b, h0)) <= 1e-5


def test_scan_pairs_empty_and_bad_config():
    a = torch.rand(2, 5)
    out = torch.full((2, 5), float("nan"))
    emu.scan_pairs(a.data_ptr(), a.data_ptr(), out.data_ptr(), 0, 0, 5, a.stride(), a.stride(), out.stride())
    emu.scan_pairs(a.data_ptr(), a.data_ptr(), out.data_ptr(), 0, 2, 0, a.stride(), a.stride(), out.stride())
    assert torch.isnan(out).all()
    with pytest.raises(ValueError, match="no compiled configuration"):
        run_emu(a, a, threads=48, items=4)
    assert emu.scan_pairs_default_config(4097) in [tuple(c) for c in emu.scan_pairs_configs()]


# ----------------------------------------------------------------------------- emulation primitives


def test_barrier_and_shared_memory_per_block():
    gx, gy, n, rounds = 3, 2, 96, 5
    out = torch.full((gx * gy, n), -1, dtype=torch.int64)
    emu.selftest_barrier(out.data_ptr(), gx, gy, n, rounds, concurrent_blocks=2)
    blk = torch.arange(gx * gy)[:, None]
    t = torch.arange(n)[None, :]
    expect = sum((r + 1) * 1000 + blk * 7 + (t + r + 1) % n for r in range(rounds))
    assert torch.equal(out, expect)


def shuffle_expected(n, width):
    v = lambda t: 3 * t + 1  # noqa: E731
    ops = []
    rows = [[0] * n for _ in range(emu.selftest_shuffle_nops)]
    for t in range(n):
        lane, wb = t % 32, t - t % 32
        seg = lane & ~(width - 1)
        inseg = lane & (width - 1)

        def up(d):
            return v(t - d) if inseg >= d else v(t)

        def down(d):
            return v(t + d) if inseg + d < width else v(t)

        def xor(m):
            src = lane ^ m
            return v(t) if src >= seg + width else v(wb + src)

        ballot = sum(1 << l for l in range(32) if (wb + l) % 3 == 0)
        ops = [
            v(wb + seg + (((lane * 5 + 3) % 32) & (width - 1))),
            up(1), up(3), up(16), down(1), down(5), xor(1), xor(6), xor(16),
            ballot,
            1 if wb <= 7 < wb + 32 else 0,
            1,
            0,
            int((down(2) + 0.25) * 4.0),
            int((up(2) + 0.5) * 2.0),
            v(wb + (lane + 2) % 32) if lane % 2 == 0 else -1,
        ]
        for k, x in enumerate(ops):
            rows[k][t] = x
    return torch.tensor(rows, dtype=torch.int64)


@pytest.mark.parametrize("width", [32, 16, 8])
def test_warp_shuffles_ballot_vote(width):
    n = 64
    out = torch.full((emu.selftest_shuffle_nops, n), -7, dtype=torch.int64)
    emu.selftest_shuffles(out.data_ptr(), n, width)
    assert torch.equal(out, shuffle_expected(n, width))


def test_dynamic_shared_memory():
    blocks, n = 3, 64
    out = torch.full((blocks, n), float("nan"))
    emu.selftest_dynamic_shared(out.data_ptr(), blocks, n)
    t = torch.arange(n, dtype=torch.float32)
    assert torch.equal(out, (2.0 * (n - 1 - t))[None, :] + torch.arange(blocks, dtype=torch.float32)[:, None])


@pytest.mark.parametrize("concurrent", [1, 2])
def test_shared_memory_is_poisoned_every_block(concurrent):
    out = torch.zeros(5, 64)
    emu.selftest_poison(out.data_ptr(), 5, concurrent_blocks=concurrent)
    assert torch.isnan(out).all()


def test_atomics():
    fsum, isum, imax, dsum = (torch.zeros(1), torch.zeros(1, dtype=torch.int32),
                              torch.full((1,), -1, dtype=torch.int32), torch.zeros(1, dtype=torch.float64))
    emu.selftest_atomics(fsum.data_ptr(), isum.data_ptr(), imax.data_ptr(), dsum.data_ptr(), 4, 64)
    assert fsum.item() == 256.0 and isum.item() == sum(range(256)) and imax.item() == 255 and dsum.item() == 128.0


MISUSE = [
    (0, "divergent __syncthreads"),
    (1, "deadlock"),
    (2, "different __syncthreads"),
    (3, "different warp intrinsics"),
    (4, "is not in mask"),
    (5, "returned from the kernel while its warp waits"),
    (6, "timeout"),
    (7, "boom from device code"),
    (8, "shared memory overflow"),
    (9, "outside mask"),
]


@pytest.mark.parametrize("kind,message", MISUSE, ids=[m for _, m in MISUSE])
def test_misuse_is_an_error_not_a_hang(kind, message):
    sink = torch.zeros(64)
    # a short timeout: only kind 6 may need it; a bug in the barrier logic fails here within seconds
    with pytest.raises(RuntimeError, match=message):
        emu.selftest_misuse(kind, sink.data_ptr(), 64, timeout_s=0.3 if kind == 6 else 5.0)


def test_invalid_launch_configurations():
    with pytest.raises(RuntimeError, match="invalid launch"):
        emu.selftest_launch(2048, 1, 1, 0)
    with pytest.raises(RuntimeError, match="invalid launch"):
        emu.selftest_launch(8, 8, 128, 0)
    with pytest.raises(RuntimeError, match="dynamic shared memory"):
        emu.selftest_launch(32, 1, 1, 100_000)


def test_scan_pairs_has_no_data_race_under_thread_sanitizer(tmp_path):
    """Builds the emulated scan with -fsanitize=thread: the emulation's barriers are std::mutex /
    condition_variable, so TSan sees exactly the happens-before edges of __syncthreads and the warp
    intrinsics, and reports any shared-memory access that a missing barrier leaves unordered."""
    import shutil
    import subprocess
    from pathlib import Path

    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    root = Path(__file__).resolve().parents[1]
    exe = tmp_path / "tsan_scan_pairs"
    build = subprocess.run([cxx, "-O1", "-g", "-std=c++17", "-pthread", "-fsanitize=thread", f"-I{root / 'csrc'}",
                            str(root / "tests" / "csrc" / "tsan_scan_pairs.cpp"), "-o", str(exe)],
                           capture_output=True, text=True)
    if build.returncode != 0 and "tsan" in build.stderr.lower() and "cannot find" in build.stderr.lower():
        pytest.skip(f"ThreadSanitizer runtime not installed: {build.stderr.strip()[-200:]}")
    assert build.returncode == 0, build.stderr[-4000:]
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1 exitcode=66")
    run = subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=300)
    assert "ThreadSanitizer" not in run.stderr, run.stderr[-6000:]
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), run.stdout + run.stderr[-3000:]
