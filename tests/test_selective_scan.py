"""ditkernels.selective_scan (docs/spec.md §4): every backend against the float64 reference, gradcheck,
torch.compile, determinism and argument errors."""

from __future__ import annotations

import pytest
import torch

from ditkernels.ops.selective_scan import selective_scan, selective_scan_fn
from ditkernels.reference.selective_scan import selective_scan_ref

from numerics import MODULE_BACKENDS, assert_matches

BACKENDS = MODULE_BACKENDS  # the ``backend`` fixture (conftest.py); the triton scan: test_selective_scan_triton.py

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


class Case:
    """One problem: sizes, the B/C kind and which optional inputs are present."""

    def __init__(self, batch, dim, seqlen, dstate, bc="var", *, D=True, z=True, bias=True, softplus=True,
                 init=True, reverse=False):
        self.batch, self.dim, self.seqlen, self.dstate, self.bc = batch, dim, seqlen, dstate, bc
        self.D, self.z, self.bias, self.softplus, self.init, self.reverse = D, z, bias, softplus, init, reverse

    def __repr__(self):
        flags = "".join(k for k, on in (("D", self.D), ("z", self.z), ("b", self.bias), ("sp", self.softplus),
                                        ("h0", self.init), ("rev", self.reverse)) if on) or "plain"
        return f"{self.bc}-B{self.batch}-D{self.dim}-L{self.seqlen}-N{self.dstate}-{flags}"


CASES = [
    Case(2, 4, 100, 5),
    Case(2, 4, 100, 5, reverse=True),
    Case(1, 3, 257, 16, "const"),
    Case(2, 4, 7, 20, "group2", reverse=True),
    Case(2, 6, 1, 3, "group2", D=False, z=False, bias=False, softplus=False, init=False),
    Case(1, 2, 257, 40, "var", z=False, softplus=False),
    Case(1, 2, 64, 16, "const", D=False, bias=False, init=False, reverse=True),
    # whole vectors of steps and a partial channel block: the cpu kernel's in-place (streamed) output rows
    Case(2, 20, 96, 16),
]


def make_inputs(case: Case, dtype: torch.dtype, seed: int = 0) -> dict:
    """Inputs of ``case``: u, delta, z and variable B/C in ``dtype``; weights, constant B/C and the
    initial state in float32 (float64 when ``dtype`` is float64). Never zeros or all-equal values."""
    g = torch.Generator().manual_seed(seed)
    b, d, L, n = case.batch, case.dim, case.seqlen, case.dstate
    wt = torch.float64 if dtype == torch.float64 else torch.float32

    def randn(*shape, dt=dtype, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(dt)

    def rand(*shape, dt=dtype, lo=0.0, hi=1.0):
        return (lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=torch.float64)).to(dt)

    if case.bc == "const":
        bshape, bdt = (d, n), wt
    elif case.bc == "var":
        bshape, bdt = (b, n, L), dtype
    else:
        bshape, bdt = (b, 2, n, L), dtype
    # Without softplus delta may be negative (it is used as it is), so keep it small either way.
    delta_lo = 0.0 if case.softplus else -0.05
    return {
        "u": randn(b, d, L),
        "delta": rand(b, d, L, lo=delta_lo, hi=0.5),
        "A": rand(d, n, dt=wt, lo=-1.5, hi=-0.05),
        "B": randn(*bshape, dt=bdt),
        "C": randn(*bshape, dt=bdt),
        "D": randn(d, dt=wt) if case.D else None,
        "z": randn(b, d, L) if case.z else None,
        "delta_bias": rand(d, dt=wt, lo=-0.5, hi=0.5) if case.bias else None,
        "initial_state": randn(b, d, n, dt=wt) if case.init else None,
    }


def run(fn, inputs: dict, case: Case, dout: torch.Tensor, dlast: torch.Tensor, **kw):
    """(out, last_state, grads by name) of ``fn`` on fresh leaves; loss = <out, dout> + <last, dlast>."""
    leaves = {k: None if v is None else v.detach().clone().requires_grad_(True) for k, v in inputs.items()}
    out, last = fn(leaves["u"], leaves["delta"], leaves["A"], leaves["B"], leaves["C"], leaves["D"], leaves["z"],
                   leaves["delta_bias"], case.softplus, True, initial_state=leaves["initial_state"],
                   reverse=case.reverse, **kw)
    torch.autograd.backward((out, last), (dout.to(out.dtype), dlast.to(last.dtype)))
    return out, last, {k: v.grad for k, v in leaves.items() if v is not None}


def _upcast(inputs: dict) -> dict:
    return {k: None if v is None else v.double() for k, v in inputs.items()}


def _douts(case: Case, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    dout = torch.randn(case.batch, case.dim, case.seqlen, generator=g, dtype=torch.float64)
    dlast = torch.randn(case.batch, case.dim, case.dstate, generator=g, dtype=torch.float64)
    return dout, dlast


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=repr)
def test_matches_float64_reference(backend, case, dtype):
    inputs = make_inputs(case, dtype, seed=case.seqlen * 7 + case.dstate)
    dout, dlast = _douts(case)
    # dout in the output dtype: the reference and the backend see the same rounded values.
    dout = dout.to(dtype).double()
    out64, last64, g64 = run(selective_scan_ref, _upcast(inputs), case, dout, dlast)
    if dtype == torch.float32:
        low = (None, None, {})
    else:
        low = run(selective_scan_ref, inputs, case, dout, dlast)
    out, last, grads = run(selective_scan, inputs, case, dout, dlast, backend=backend)
    assert out.dtype == dtype and out.shape == (case.batch, case.dim, case.seqlen)
    assert last.dtype == torch.float32 and last.shape == (case.batch, case.dim, case.dstate)
    assert_matches("out", out, out64, low[0])
    assert_matches("last_state", last, last64, low[1])
    assert set(grads) == set(g64)
    for name in grads:
        assert grads[name].dtype == inputs[name].dtype, name
        assert_matches(f"d{name}", grads[name], g64[name], low[2].get(name))


@pytest.mark.parametrize("case", CASES[:4], ids=repr)
def test_float64_matches_reference_exactly(backend, case):
    inputs = make_inputs(case, torch.float64, seed=3)
    dout, dlast = _douts(case)
    out64, last64, g64 = run(selective_scan_ref, inputs, case, dout, dlast)
    out, last, grads = run(selective_scan, inputs, case, dout, dlast, backend=backend)
    assert last.dtype == torch.float64
    assert_matches("out", out, out64, fp32_tol=1e-12)
    assert_matches("last_state", last, last64, fp32_tol=1e-12)
    for name in grads:
        assert_matches(f"d{name}", grads[name], g64[name], fp32_tol=1e-12)


def test_reverse_is_the_flipped_forward(backend):
    case = Case(2, 4, 37, 8, "group2")
    inputs = make_inputs(case, torch.float64, seed=5)
    flipped = {k: (v.flip(-1) if v is not None and k in ("u", "delta", "z", "B", "C") else v)
               for k, v in inputs.items()}
    args = lambda x: (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"])
    out_r, last_r = selective_scan(*args(inputs), True, True, initial_state=inputs["initial_state"],
                                   reverse=True, backend=backend)
    out_f, last_f = selective_scan(*args(flipped), True, True, initial_state=inputs["initial_state"],
                                   backend=backend)
    torch.testing.assert_close(out_r, out_f.flip(-1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(last_r, last_f, rtol=1e-12, atol=1e-12)


def test_strided_inputs(backend):
    """u and z as views of a (batch, L, 2*dim) projection, B/C as transposes, like mamba's block."""
    b, d, L, n = 2, 6, 50, 4
    g = torch.Generator().manual_seed(11)
    xz = torch.randn(b, L, 2 * d, generator=g).transpose(1, 2)  # (b, 2d, L), L-stride 2d
    u, z = xz.chunk(2, dim=1)
    delta = torch.rand(b, L, d, generator=g).transpose(1, 2)
    A = -torch.rand(d, n, generator=g) - 0.1
    Bm = torch.randn(b, L, n, generator=g).transpose(1, 2)
    Cm = torch.randn(b, L, n, generator=g).transpose(1, 2)
    Dv = torch.randn(d, generator=g)
    got = selective_scan(u, delta, A, Bm, Cm, Dv, z, delta_softplus=True, backend=backend)
    want = selective_scan_ref(*(t.contiguous().double() for t in (u, delta, A, Bm, Cm, Dv, z)), delta_softplus=True)
    assert_matches("out", got, want)


@pytest.mark.parametrize("case", [Case(1, 2, 5, 3), Case(2, 2, 4, 2, "group2", reverse=True),
                                  Case(1, 2, 6, 3, "const", z=False)], ids=repr)
def test_gradcheck_float64_cpu(case):
    inputs = make_inputs(case, torch.float64, seed=2)
    names = [k for k, v in inputs.items() if v is not None]

    def f(*tensors):
        x = dict(inputs, **dict(zip(names, tensors)))
        return selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"],
                              case.softplus, True, initial_state=x["initial_state"], reverse=case.reverse,
                              backend="cpu")

    leaves = [inputs[k].clone().requires_grad_(True) for k in names]
    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_cpu_backward_is_deterministic():
    case = Case(2, 8, 130, 16, "group2")
    inputs = make_inputs(case, torch.float32, seed=9)
    dout, dlast = _douts(case)
    first = run(selective_scan, inputs, case, dout, dlast, backend="cpu")[2]
    second = run(selective_scan, inputs, case, dout, dlast, backend="cpu")[2]
    for name in first:
        assert torch.equal(first[name], second[name]), name


def test_cpu_decays_beyond_the_exponent_range():
    """The cpu kernels skip the decays' clamps in a chunk (64 steps) whose |delta' A| stays small: here the
    middle chunk has delta' A down to ~-300 (exp underflows), the chunks around it do not."""
    case = Case(1, 20, 200, 8)
    inputs = make_inputs(case, torch.float32, seed=5)
    inputs["delta"][..., 64:128] *= 400
    dout, dlast = _douts(case)
    out64, last64, g64 = run(selective_scan_ref, _upcast(inputs), case, dout, dlast)
    out, last, grads = run(selective_scan, inputs, case, dout, dlast, backend="cpu")
    assert_matches("out", out, out64)
    assert_matches("last_state", last, last64)
    for name in grads:
        assert_matches(f"d{name}", grads[name], g64[name])


def test_torch_compile_fullgraph_cpu():
    case = Case(2, 4, 33, 8)
    inputs = make_inputs(case, torch.float32, seed=4)

    def f(u, delta, A, B, C, D, z, bias, h0):
        out, last = selective_scan(u, delta, A, B, C, D, z, bias, True, True, initial_state=h0, backend="cpu")
        return out.sum() + (last * last).sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    eager_leaves = [v.clone().requires_grad_(True) for v in inputs.values()]
    comp_leaves = [v.clone().requires_grad_(True) for v in inputs.values()]
    want = f(*eager_leaves)
    got = compiled(*comp_leaves)
    torch.testing.assert_close(got, want)
    want.backward()
    got.backward()
    for a, b in zip(comp_leaves, eager_leaves):
        torch.testing.assert_close(a.grad, b.grad)


def test_selective_scan_fn_is_mamba_positional():
    case = Case(1, 2, 9, 4, init=False)
    x = make_inputs(case, torch.float32, seed=6)
    args = (x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True, True)
    out, last = selective_scan_fn(*args)
    out_ref, last_ref = selective_scan(*args)
    assert torch.equal(out, out_ref) and torch.equal(last, last_ref)
    assert isinstance(selective_scan_fn(*args[:8]), torch.Tensor)


def _bad(**changes):
    def make():
        case = Case(2, 4, 10, 3, "var")
        x = make_inputs(case, torch.float32)
        x.update({k: (v(x) if callable(v) else v) for k, v in changes.items()})
        return x
    return make


BAD = [
    ("u-2d", _bad(u=lambda x: x["u"][0]), ValueError, "u:"),
    ("delta-shape", _bad(delta=lambda x: x["delta"][:, :, :5]), ValueError, "delta:"),
    ("delta-dtype", _bad(delta=lambda x: x["delta"].double()), TypeError, "delta:"),
    ("A-complex", _bad(A=lambda x: torch.complex(x["A"], x["A"])), TypeError, "A:"),
    ("A-dim", _bad(A=lambda x: x["A"][:3]), ValueError, "A:"),
    ("A-N-too-large", _bad(A=lambda x: -torch.rand(4, 257), B=lambda x: torch.randn(2, 257, 10),
                           C=lambda x: torch.randn(2, 257, 10)), ValueError, "A:"),
    ("A-fp16", _bad(A=lambda x: x["A"].half()), TypeError, "A:"),
    ("B-bad-L", _bad(B=lambda x: x["B"][..., :9]), ValueError, "B:"),
    ("C-groups-not-dividing", _bad(C=lambda x: torch.randn(2, 3, 3, 10)), ValueError, "C:"),
    ("C-const-shape", _bad(C=lambda x: torch.randn(4, 2)), ValueError, "C:"),
    ("B-int", _bad(B=lambda x: torch.ones(2, 3, 10, dtype=torch.int64)), TypeError, "B:"),
    ("D-shape", _bad(D=lambda x: torch.randn(5)), ValueError, "D:"),
    ("z-shape", _bad(z=lambda x: x["z"][:1]), ValueError, "z:"),
    ("delta_bias-dtype", _bad(delta_bias=lambda x: x["delta_bias"].double()), TypeError, "delta_bias:"),
    ("initial_state-shape", _bad(initial_state=lambda x: x["initial_state"][:, :, :2]), ValueError,
     "initial_state:"),
    ("u-meta-device", _bad(u=lambda x: x["u"].to("meta")), ValueError, "delta:"),
]


@pytest.mark.parametrize("make,exc,match", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_inputs_name_the_argument(make, exc, match):
    x = make()
    with pytest.raises(exc, match=match):
        selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], x["D"], x["z"], x["delta_bias"], True,
                       initial_state=x["initial_state"], backend="cpu")


def test_bad_flags_and_backend():
    x = make_inputs(Case(1, 2, 4, 2), torch.float32)
    with pytest.raises(TypeError, match="delta_softplus"):
        selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], delta_softplus="yes")
    with pytest.raises(ValueError, match="backend"):
        selective_scan(x["u"], x["delta"], x["A"], x["B"], x["C"], backend="gpu")


# The cpu kernel runs its threads on torch's OpenMP workers when the process has that runtime and on
# std::threads otherwise. This script drives the CPU kernels module (ditkernels._cpu_<isa>) in a process
# without torch (so without an OpenMP runtime) through raw buffers: forward and backward of one problem
# with 2 threads.
_NO_OPENMP_SCRIPT = r"""
import array, importlib.util, json, math, sys
spec = importlib.util.spec_from_file_location(sys.argv[2], sys.argv[1])
ext = importlib.util.module_from_spec(spec)
spec.loader.exec_module(ext)
b, d, L, n, chunk, hs_numel = (int(v) for v in sys.argv[3:9])

def buf(values):
    a = array.array("f", values)
    return a, a.buffer_info()[0]

def wave(k, m, scale=1.0, shift=0.0):
    return [scale * math.sin(0.37 * i + k) + shift for i in range(m)]

def seq(ptr):
    op = ext.SelectiveScanOperand()
    op.ptr, op.dtype, op.sb, op.sd, op.sn, op.sl = ptr, 0, d * L, L, 0, 1
    return op

keep = {}
def new(name, values):
    keep[name] = buf(values)
    return keep[name][1]

p = ext.SelectiveScanParams()
p.batch, p.dim, p.seqlen, p.dstate, p.chunk, p.nthreads, p.softplus, p.acc = b, d, L, n, chunk, 2, True, 0
p.u, p.delta, p.z = (seq(new(k, wave(i, b * d * L, 0.5 if k == "delta" else 1.0))) for i, k in enumerate(("u", "delta", "z")))
for name, k in (("Bm", 3), ("Cm", 4)):
    op = ext.SelectiveScanOperand()
    op.ptr, op.dtype, op.sb, op.sd, op.sn, op.sl = new(name, wave(k, b * n * L)), 0, n * L, 0, L, 1
    setattr(p, name, op)
p.b_groups = p.c_groups = 1
p.A = new("A", wave(5, d * n, 0.5, -1.0))
p.Dvec, p.delta_bias = new("D", wave(6, d)), new("bias", wave(7, d, 0.2))
p.out, p.last, p.hs = seq(new("out", [0.0] * (b * d * L))), new("last", [0.0] * (b * d * n)), new("hs", [0.0] * hs_numel)
ext.selective_scan_fwd(p)
p.dout = seq(new("dout", wave(8, b * d * L)))
p.du, p.ddelta, p.dz = (seq(new(k, [0.0] * (b * d * L))) for k in ("du", "ddelta", "dz"))
p.dA_rows, p.dD_rows, p.dbias_rows = new("dA", [0.0] * (b * d * n)), new("dD", [0.0] * (b * d)), new("db", [0.0] * (b * d))
for name in ("dB", "dC"):
    op = ext.SelectiveScanOperand()
    op.ptr, op.dtype, op.sb, op.sd, op.sn, op.sl = new(name, [0.0] * (b * n * L)), 0, n * L, 0, L, 1
    setattr(p, name, op)
ext.selective_scan_bwd(p)
assert "torch" not in sys.modules and "libgomp" not in open("/proc/self/maps").read()
print(json.dumps({k: list(keep[k][0]) for k in ("out", "last", "du", "ddelta", "dz", "dA", "dB", "dC")}))
"""


# L 70: chunks of 64 and 6 steps, outputs through row buffers; L 80: whole vectors, outputs in place.
@pytest.mark.parametrize("L", [70, 80], ids=lambda L: f"L{L}")
def test_cpu_threads_without_openmp_runtime(monkeypatch, L):
    """The std::thread path (no OpenMP runtime in the process) computes what the OpenMP path does."""
    import json
    import math
    import subprocess
    import sys

    from ditkernels.backends import cpu_scan

    ext = cpu_scan._extension()
    if ext is None:
        pytest.skip(cpu_scan.available()[1])
    b, d, n = 1, 40, 5  # 3 channel blocks (the last one partial)
    hs_numel = math.prod(cpu_scan.saved_shape(b, d, L, n))
    run = subprocess.run([sys.executable, "-c", _NO_OPENMP_SCRIPT, ext.__file__, ext.__name__,
                          *map(str, (b, d, L, n, cpu_scan.CHUNK, hs_numel))],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    got = {k: torch.tensor(v) for k, v in json.loads(run.stdout).items()}

    def wave(k, m, scale=1.0, shift=0.0):
        return torch.tensor([scale * math.sin(0.37 * i + k) + shift for i in range(m)], dtype=torch.float32)

    u, delta, z = (wave(i, b * d * L, 0.5 if i == 1 else 1.0).view(b, d, L) for i in range(3))
    Bm, Cm = wave(3, b * n * L).view(b, n, L), wave(4, b * n * L).view(b, n, L)
    A, Dv, bias = wave(5, d * n, 0.5, -1.0).view(d, n), wave(6, d), wave(7, d, 0.2)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    out, last, hs = cpu_scan.scan_fwd(u, delta, A, Bm, Cm, Dv, z, bias, None, True, False)
    du, ddelta, dA, dB, dC, _, dz, _, _ = cpu_scan.scan_bwd(wave(8, b * d * L).view(b, d, L), None, u, delta, A, Bm,
                                                            Cm, Dv, z, bias, None, hs, True, False)
    for name, want in (("out", out), ("last", last), ("du", du), ("ddelta", ddelta), ("dz", dz), ("dA", dA),
                       ("dB", dB), ("dC", dC)):
        assert torch.equal(got[name].view(-1), want.reshape(-1)), name
