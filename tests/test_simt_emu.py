"""The SIMT emulation (csrc/simt/emu.h) and the device-code building blocks of csrc/kernels run through it.

The same source that nvcc compiles (tests/test_nvcc_gate.py) runs here, one OS thread per CUDA thread: the
selective scan's block scan (csrc/kernels/block_scan.cuh) against a float64 recurrence, the emulation
primitives (barrier, warp shuffles, shared memory, atomics, error reporting) on small kernels of
csrc/emu/simt_selftest.cpp, and the selective scan under ThreadSanitizer. The selective scan's own tests
are tests/test_selective_scan_cuda.py.
"""

import os

import pytest
import torch

from numerics import rel_err

# Every barrier wait of a correct launch here lasts milliseconds; a broken barrier (one that deadlocks
# in a way the exact deadlock detector misses) fails after this many seconds instead of 60 (read per launch).
os.environ.setdefault("DITKERNELS_EMU_TIMEOUT", "20")

from ditkernels import _ext  # noqa: E402

emu = _ext.emu()  # test-only extension: fails collection with the fix when it is not built


def scan_ref(a, b, h0, reverse=False):
    """float64 sequential recurrence h_t = a_t h_{t-1} + b_t (reverse: h_t = a_t h_{t+1} + b_t) from h0."""
    a64, b64 = a.double().tolist(), b.double().tolist()
    out, h = [0.0] * len(a64), float(h0)
    for t in (reversed(range(len(a64))) if reverse else range(len(a64))):
        h = a64[t] * h + b64[t]
        out[t] = h
    return torch.tensor(out, dtype=torch.float64)


def make_inputs(L, seed):
    g = torch.Generator().manual_seed(seed)
    # |a| in [0.8, 1): long memory, both signs; b ~ N(0, 1)
    sign = torch.where(torch.rand(L, generator=g) < 0.2, -1.0, 1.0)
    a = sign * (0.8 + 0.2 * torch.rand(L, generator=g))
    return a.float(), torch.randn(L, generator=g).float(), 3.0 * torch.randn((), generator=g).item()


@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("warps", emu.block_scan_warps(), ids=lambda w: f"W{w}")
def test_block_scan_carry(warps, reverse):
    """The selective scan's block scan (csrc/kernels/block_scan.cuh) alone, for warp counts the selective scan
    does not compile (3, 8, 32): one partial chunk, one full chunk, two full chunks and a tail (the carry)."""
    chunk = 32 * warps
    for L in (1, chunk - 1, chunk, 2 * chunk + 5):
        a, b, h0 = make_inputs(L, seed=chunk + L)
        out = torch.full((L,), float("nan"))
        emu.block_scan(a.data_ptr(), b.data_ptr(), out.data_ptr(), L, h0, warps, reverse)
        assert rel_err(out, scan_ref(a, b, h0, reverse)) <= 1e-5, L


def test_block_scan_unknown_warp_count():
    a = torch.ones(4)
    with pytest.raises(ValueError, match="warps=5"):
        emu.block_scan(a.data_ptr(), a.data_ptr(), a.data_ptr(), 4, 0.0, 5, False)


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


def test_selective_scan_has_no_data_race_under_thread_sanitizer(tmp_path):
    """Builds the emulated selective scan (forward and backward, every configuration) with -fsanitize=thread:
    the emulation's barriers are std::mutex / condition_variable, so TSan sees exactly the happens-before
    edges of __syncthreads and the warp intrinsics, and reports any shared-memory access that a missing
    barrier leaves unordered (tests/csrc/tsan_selective_scan.cpp)."""
    import shutil
    import subprocess
    from pathlib import Path

    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler on PATH")
    root = Path(__file__).resolve().parents[1]
    exe = tmp_path / "tsan_selective_scan"
    build = subprocess.run([cxx, "-O1", "-g", "-std=c++17", "-pthread", "-fsanitize=thread", f"-I{root / 'csrc'}",
                            str(root / "tests" / "csrc" / "tsan_selective_scan.cpp"), "-o", str(exe)],
                           capture_output=True, text=True)
    if build.returncode != 0 and "tsan" in build.stderr.lower() and "cannot find" in build.stderr.lower():
        pytest.skip(f"ThreadSanitizer runtime not installed: {build.stderr.strip()[-200:]}")
    assert build.returncode == 0, build.stderr[-4000:]
    env = dict(os.environ, TSAN_OPTIONS="halt_on_error=1 exitcode=66")
    run = subprocess.run([str(exe)], capture_output=True, text=True, env=env, timeout=300)
    assert "ThreadSanitizer" not in run.stderr, run.stderr[-6000:]
    assert run.returncode == 0 and run.stdout.strip().endswith("OK"), run.stdout + run.stderr[-3000:]
