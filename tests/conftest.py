"""Test-suite setup: environment flags, the ``slow`` marker, and the ``backend`` fixture.

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

from numerics import ATTENTION_BACKENDS  # noqa: E402


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
