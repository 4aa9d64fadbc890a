"""The backend contract (ditkernels/backends/__init__.py): every backend module implements the protocol
and exactly the capabilities it declares; dispatch names every reason a call cannot run."""

from __future__ import annotations

import ast
import inspect
import pathlib

import pytest
import torch

import ditkernels
from ditkernels import backends
from ditkernels.backends import CAPABILITY_FUNCTIONS, Call

# What each backend declares today; a change of the contract shows up here first.
EXPECTED = {
    "reference": {"attention", "selective_scan", "dense_reference"},
    "cpu": {"attention", "selective_scan", "local_tiling", "topk_thresholds", "fwd_counters"},
    "triton": {"attention", "selective_scan", "local_tiling", "pow2_tiles", "block_topk_select"},
    "cuda": {"selective_scan"},
}


@pytest.mark.parametrize("name", backends.NAMES)
def test_backend_implements_the_protocol(name):
    mod = backends.get(name)
    assert mod.NAME == name
    assert set(mod.CAPABILITIES) == EXPECTED[name]
    assert set(mod.CAPABILITIES) <= set(CAPABILITY_FUNCTIONS)
    assert mod.DTYPES and all(isinstance(d, torch.dtype) for d in mod.DTYPES)
    for member in ("available", "device_reason", "limits"):
        assert callable(getattr(mod, member)), f"{name}.{member}"
    ok, why = mod.available()
    assert isinstance(ok, bool) and isinstance(why, str)
    for cap, functions in CAPABILITY_FUNCTIONS.items():
        for fn in functions:
            # declared capability -> its functions exist; undeclared -> none of them (no hidden extras
            # that an op could find by probing)
            assert hasattr(mod, fn) == (cap in mod.CAPABILITIES), f"{name}.{fn} vs capability {cap}"


def test_supporting_follows_the_capabilities():
    assert backends.supporting("attention") == ("reference", "cpu", "triton")
    assert backends.supporting("selective_scan") == ("reference", "cpu", "triton", "cuda")
    with pytest.raises(ValueError, match="capability"):
        backends.has(backends.get("cpu"), "flash")


def test_why_not_names_every_reason():
    cpu64 = Call(torch.device("cpu"), torch.float64, head_dim=64, block_size=(24, 8))
    why = backends.why_not("triton", "block_sparse_attention", cpu64)
    assert "float64" in why and "block_size[0]" in why and "block_size[1]" in why
    why = backends.why_not("cuda", "selective_scan", cpu64)
    assert "CUDA tensors" in why and "float64" in why and ("not built" in why or "no CUDA device" in why)
    assert backends.why_not("cuda", "attention", cpu64).startswith("attention has no cuda backend")
    assert backends.why_not("reference", "block_sparse_attention", cpu64) is None
    with pytest.raises(ValueError, match="op: expected one of"):
        backends.why_not("cpu", "flash", cpu64)


def test_requested_backend_error_lists_the_reasons():
    q = torch.randn(1, 1, 20, 8, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="block_sparse_attention: backend 'cuda' cannot run this call: "
                                           "block_sparse_attention has no cuda backend.*CUDA tensors.*float64"):
        backends.resolve_for("block_sparse_attention", q, "cuda", head_dim=8, block_size=(24, 24))
    assert backends.resolve_for("block_sparse_attention", q, "reference", block_size=(24, 24)).NAME == "reference"


def test_ops_never_name_a_backend():
    """No op module imports a backend module by name or compares a backend's NAME."""
    root = pathlib.Path(inspect.getfile(ditkernels)).parent / "ops"
    for path in sorted(root.glob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("backends"):
                names = {a.name for a in node.names}
                assert not names & set(backends.NAMES), f"{path.name}:{node.lineno} imports {names}"
            if isinstance(node, ast.Compare):
                parts = [node.left, *node.comparators]
                attrs = [p for p in parts if isinstance(p, ast.Attribute) and p.attr == "NAME"]
                consts = [p for p in parts if isinstance(p, ast.Constant) and p.value in backends.NAMES]
                if any(isinstance(p, ast.Attribute) and p.attr == "type" for p in parts):
                    consts = []  # device.type == "cpu" / "cuda": a device, not a backend
                assert not attrs and not consts, f"{path.name}:{node.lineno} compares a backend name"
