"""ditkernels.attention: the public dense op on every backend, dispatch, errors and torch.compile."""

from __future__ import annotations

import pytest
import torch

import ditkernels
from ditkernels import backends
from ditkernels.reference.attention import attention_ref

from numerics import assert_matches, attention_lowp, make_qkv

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
SHAPES = [  # (batch, heads, seq_q, seq_k, head_dim)
    (1, 2, 97, 97, 16),
    (2, 1, 1, 200, 40),
    (1, 2, 200, 97, 128),
    (1, 1, 63, 33, 1),
]


def _ids(shape):
    return "B{}-H{}-Sq{}-Sk{}-D{}".format(*shape)


def _reference(q, k, v, scale, do, lowp=False):
    """(out, lse, dq, dk, dv) of the reference on these exact tensors (autograd for gradients);
    ``lowp``: plain PyTorch attention in the inputs' low dtype (docs/verify.md §4's low-precision yardstick)."""
    qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    if lowp:
        out, lse = attention_lowp(qq, kk, vv, scale), None
    else:
        out, lse = attention_ref(qq, kk, vv, scale)
    dq, dk, dv = torch.autograd.grad(out, (qq, kk, vv), do.to(out.dtype))
    return out, lse, dq, dk, dv


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=_ids)
@pytest.mark.parametrize("strided", [False, True], ids=["contig", "strided"])
def test_forward_backward_matches_float64(backend, shape, dtype, strided):
    b, h, sq, sk, d = shape
    q, k, v = make_qkv(b, h, sq, sk, d, dtype, strided=strided, seed=sq * 1000 + d)
    scale = d ** -0.5
    do = torch.randn(b, h, sq, d, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(dtype)
    ref64 = _reference(q.double(), k.double(), v.double(), scale, do.double())
    ref_low = _reference(q, k, v, scale, do, lowp=True) if dtype != torch.float32 else (None,) * 5

    qq, kk, vv = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out, lse = ditkernels.attention(qq, kk, vv, return_lse=True, backend=backend)
    out.backward(do)
    assert out.dtype == dtype and lse.dtype == torch.float32 and lse.shape == (b, h, sq)
    for name, x, r64, rlow in zip(("out", "lse", "dq", "dk", "dv"), (out, lse, qq.grad, kk.grad, vv.grad),
                                  ref64, ref_low):
        if name == "lse":  # lse is float32 on every backend: compare at float32 accuracy
            assert_matches(name, x, r64, fp32_tol=1e-6)
        else:
            assert_matches(name, x, r64, rlow)


def test_large_logits_no_nan(backend):
    # scores around +-1e3: the online softmax must not overflow.
    q, k, v = make_qkv(1, 2, 97, 130, 40, torch.float32, logit_scale=12.0, seed=3)
    q.requires_grad_(True)
    scale = 40 ** -0.5
    out, lse = ditkernels.attention(q, k, v, return_lse=True, backend=backend)
    s = (q.double() @ k.double().transpose(-1, -2)) * scale
    assert s.abs().max() > 500, "the test must exercise large logits"
    ref_out, ref_lse = attention_ref(q.detach().double(), k.double(), v.double(), scale)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert_matches("out", out.detach(), ref_out)
    assert_matches("lse", lse, ref_lse)
    out.sum().backward()
    assert torch.isfinite(q.grad).all()


@pytest.mark.parametrize("backend_name", ["reference", "cpu"])
def test_gradcheck_float64(backend_name):
    q, k, v = make_qkv(1, 2, 13, 17, 8, torch.float64, seed=11)
    inputs = tuple(t.requires_grad_(True) for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: ditkernels.attention(a, b, c, backend=backend_name), inputs)


def test_default_scale_and_explicit_scale():
    q, k, v = make_qkv(1, 1, 20, 20, 16, torch.float64, seed=5)
    assert torch.allclose(ditkernels.attention(q, k, v), ditkernels.attention(q, k, v, scale=0.25))
    out = ditkernels.attention(q, k, v, scale=0.1)
    assert torch.allclose(out, attention_ref(q, k, v, 0.1)[0])


@pytest.mark.slow  # inductor compiles C++ for the graph around the op
def test_torch_compile_fullgraph():
    q, k, v = make_qkv(1, 2, 50, 50, 32, torch.float32, seed=2)

    def f(a, b, c):
        return ditkernels.attention(a * 2, b, c).sum(-1)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(q, k, v), f(q, k, v), atol=1e-6)
    compiled_inductor = torch.compile(f, fullgraph=True)
    assert torch.allclose(compiled_inductor(q, k, v), f(q, k, v), atol=1e-5)
    # backward through the compiled graph
    qg = q.clone().requires_grad_(True)
    compiled(qg, k, v).sum().backward()
    qe = q.clone().requires_grad_(True)
    f(qe, k, v).sum().backward()
    assert torch.allclose(qg.grad, qe.grad, atol=1e-5)


def test_opcheck():
    q, k, v = make_qkv(1, 2, 9, 11, 8, torch.float32, seed=4)
    torch.library.opcheck(torch.ops.ditkernels.attention_fwd.default, (q, k, v, 0.3, "cpu"))


@pytest.mark.parametrize("bad, match", [
    (dict(q=torch.zeros(2, 3, 4)), "q: expected a 4-D tensor"),
    (dict(k=torch.zeros(1, 2, 5, 8, dtype=torch.float64)), "k: expected dtype torch.float32"),
    (dict(v=torch.zeros(1, 2, 6, 8)), "v: expected seq_k = 5"),
    (dict(k=torch.zeros(1, 3, 5, 8)), r"k: expected \(batch, heads\) = \(1, 2\)"),
    (dict(k=torch.zeros(1, 2, 5, 4)), "k: expected head_dim 8"),
    (dict(q=torch.zeros(1, 2, 5, 8, dtype=torch.int32)), "q: expected dtype float16"),
    (dict(scale=float("nan")), "scale: expected a finite number"),
    (dict(scale="big"), "scale: expected a float"),
    (dict(backend="gpu"), "backend: expected one of"),
])
def test_bad_input_names_the_argument(bad, match):
    args = dict(q=torch.randn(1, 2, 5, 8), k=torch.randn(1, 2, 5, 8), v=torch.randn(1, 2, 5, 8))
    args.update({k: v for k, v in bad.items() if k in "qkv"})
    kw = {k: v for k, v in bad.items() if k not in "qkv"}
    with pytest.raises((ValueError, TypeError), match=match):
        ditkernels.attention(args["q"], args["k"], args["v"], **kw)


def test_head_dim_limit():
    q = torch.randn(1, 1, 4, 257)
    with pytest.raises(ValueError, match=r"q: head_dim must be in \[1, 256\], got 257"):
        ditkernels.attention(q, q, q)


def test_requested_backend_that_cannot_run_says_why(monkeypatch):
    q, k, v = make_qkv(1, 1, 8, 8, 8, torch.float64, seed=1)
    with pytest.raises(RuntimeError, match="backend 'triton' cannot run this call: .*float64"):
        ditkernels.attention(q, k, v, backend="triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="takes CUDA tensors.*TRITON_INTERPRET=1"):
        ditkernels.attention(q.float(), k.float(), v.float(), backend="triton")


def test_env_override(monkeypatch):
    q, k, v = make_qkv(1, 1, 8, 8, 8, torch.float32, seed=1)
    monkeypatch.setenv("DITKERNELS_BACKEND", "reference")
    assert backends.resolve_for("attention", q).NAME == "reference"
    monkeypatch.setenv("DITKERNELS_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="attention has no cuda backend"):
        ditkernels.attention(q, k, v)
    monkeypatch.setenv("DITKERNELS_BACKEND", "fast")
    with pytest.raises(ValueError, match="DITKERNELS_BACKEND: expected one of"):
        ditkernels.attention(q, k, v)


def test_cpu_tensors_default_to_cpu_backend(monkeypatch):
    monkeypatch.delenv("DITKERNELS_BACKEND", raising=False)
    assert backends.resolve("attention", backends.Call(torch.device("cpu"), torch.float32)).NAME == "cpu"
