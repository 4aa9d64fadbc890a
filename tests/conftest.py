"""Test-suite setup: environment flags, torch threads under xdist, and the ``backend`` fixture.

``backend`` runs a test once per backend of :data:`numerics.ATTENTION_BACKENDS`, or of the test
module's own ``BACKENDS`` (imported from ``numerics``) when it defines one; a test that parametrizes
``backend`` itself is left alone. Each backend must be available here: a missing one fails (with the
reason and fix), it is never skipped.
"""

import os

# Set before triton is imported anywhere: run Triton kernels on the CPU through the interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Every kernel output buffer starts as NaN so unwritten elements fail the comparisons.
os.environ.setdefault("DITKERNELS_POISON", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from numerics import ATTENTION_BACKENDS  # noqa: E402

# Under pytest-xdist every worker would run one torch (and ditkernels cpu) thread per core: with -n 2 on
# two cores, four threads on two cores, and each small ATen op then pays an OpenMP fork/join against the
# other worker (measured on a loaded 2-core machine: a tiny reference attention call 18-22 ms with one
# thread, 220-310 ms with two). Share the cores instead. Thread-count behaviour is tested explicitly
# (test_attention_cpu.py::test_deterministic_across_thread_counts sets 1, 2 and 3 threads).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
if _WORKERS > 0:
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))


def _parametrizes(metafunc, name: str) -> bool:
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        if name in names:
            return True
    return False


def pytest_generate_tests(metafunc):
    if "backend" in metafunc.fixturenames and not _parametrizes(metafunc, "backend"):
        names = getattr(metafunc.module, "BACKENDS", ATTENTION_BACKENDS)
        metafunc.parametrize("backend", names, indirect=True, ids=str)


@pytest.fixture
def backend(request) -> str:
    from ditkernels import backends

    ok, why = backends.availability(request.param)
    assert ok, f"backend {request.param} must be available in the test environment: {why}"
    return request.param
