"""Port of mamba-ssm's tests/ops/test_selective_scan.py (state-spaces/mamba) to ditkernels.

Same parametrisation names, input construction and tolerances (``selective_scan_fn`` against the
reference ``selective_scan_ref`` recomputed in float32 from the same inputs, outputs and gradients).
Differences: the grid is trimmed for CPU run time (every flag combination at L=128 in float32, the
extreme flag settings in float16/bfloat16, and the sequence-length sweep on one full configuration);
complex ``A`` (mamba's ``wtype=complex64``) is not supported by docs/spec.md §4 and must raise ``TypeError``.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from ditkernels.ops.selective_scan import selective_scan_fn
from ditkernels.reference.selective_scan import selective_scan_ref

# ``selective_scan_fn`` (the default-backend alias) runs on each backend. triton runs under TRITON_INTERPRET=1,
# far slower per step than a GPU, so it skips the L >= 2048 rows of the sequence-length sweep (~1.5 min of CPU;
# they pass when TRITON_MAX_SEQLEN is raised) and runs every other row.
BACKENDS = ("cpu", "triton")
TRITON_MAX_SEQLEN = 1024
FLAGS = ("is_variable_B", "is_variable_C", "varBC_groups", "has_D", "has_z", "has_delta_bias", "delta_softplus")


def _bc_kinds():
    for var_b, var_c, groups in itertools.product((False, True), (False, True), (1, 2)):
        if groups > 1 and not (var_b and var_c):
            continue  # mamba-ssm skips: groups only apply to variable B and C
        yield var_b, var_c, groups


def _cases():
    cases = []
    rest = list(itertools.product((False, True), repeat=4))  # has_D, has_z, has_delta_bias, delta_softplus
    for bc in _bc_kinds():
        for flags in rest:
            cases.append((*bc, *flags, 128, torch.float32))
        for itype in (torch.float16, torch.bfloat16):
            for flags in ((False, False, False, False), (True, True, True, True)):
                cases.append((*bc, *flags, 128, itype))
    for seqlen in (256, 512, 1024, 2048, 4096):
        cases.append((True, True, 2, True, True, True, True, seqlen, torch.float32))
    for seqlen in (1024, 4096):
        cases.append((True, True, 1, True, True, True, True, seqlen, torch.bfloat16))
    return cases


def _id(case):
    var_b, var_c, groups, has_d, has_z, has_bias, softplus, seqlen, itype = case
    on = [name for name, flag in (("D", has_d), ("z", has_z), ("bias", has_bias), ("softplus", softplus)) if flag]
    return (f"B{'var' if var_b else 'const'}-C{'var' if var_c else 'const'}-g{groups}-{'+'.join(on) or 'plain'}"
            f"-L{seqlen}-{str(itype).replace('torch.', '')}")


def _params():
    return [pytest.param(*case, backend, id=f"{_id(case)}-{backend}") for backend in BACKENDS for case in _cases()
            if backend != "triton" or case[-2] <= TRITON_MAX_SEQLEN]


@pytest.mark.parametrize(FLAGS + ("seqlen", "itype", "backend"), _params())
def test_selective_scan(is_variable_B, is_variable_C, varBC_groups, has_D, has_z, has_delta_bias, delta_softplus,
                        seqlen, itype, backend, monkeypatch):
    monkeypatch.setenv("DITKERNELS_BACKEND", backend)  # selective_scan_fn has mamba's signature: no backend=
    wtype = torch.float32
    return_last_state = True
    device = "cpu"
    rtol, atol = (6e-4, 2e-3) if itype == torch.float32 else (3e-3, 5e-3)
    if itype == torch.bfloat16:
        rtol, atol = 3e-2, 5e-2
    rtolw, atolw = (1e-3, 1e-3)
    if has_z:  # If we have z, the errors on the weights seem higher
        rtolw = max(rtolw, rtol)
        atolw = max(atolw, atol)
    torch.random.manual_seed(0)
    batch_size = 2
    dim = 4
    dstate = 8
    A = (-0.5 * torch.rand(dim, dstate, device=device, dtype=wtype)).requires_grad_()

    def bc(is_variable):
        if not is_variable:
            shape = (dim, dstate)
        elif varBC_groups == 1:
            shape = (batch_size, dstate, seqlen)
        else:
            shape = (batch_size, varBC_groups, dstate, seqlen)
        return torch.randn(*shape, device=device, dtype=itype if is_variable else wtype, requires_grad=True)

    B = bc(is_variable_B)
    C = bc(is_variable_C)
    D = torch.randn(dim, device=device, dtype=torch.float32, requires_grad=True) if has_D else None
    z = torch.randn(batch_size, dim, seqlen, device=device, dtype=itype, requires_grad=True) if has_z else None
    delta_bias = (0.5 * torch.rand(dim, device=device, dtype=torch.float32)).requires_grad_() if has_delta_bias else None
    u = torch.randn(batch_size, dim, seqlen, device=device, dtype=itype, requires_grad=True)
    delta = (0.5 * torch.rand(batch_size, dim, seqlen, device=device, dtype=itype)).requires_grad_()
    A_ref = A.detach().clone().requires_grad_()
    B_ref = B.detach().clone().requires_grad_()
    C_ref = C.detach().clone().requires_grad_()
    D_ref = D.detach().clone().requires_grad_() if D is not None else None
    z_ref = z.detach().clone().requires_grad_() if z is not None else None
    u_ref = u.detach().clone().requires_grad_()
    delta_ref = delta.detach().clone().requires_grad_()
    delta_bias_ref = delta_bias.detach().clone().requires_grad_() if delta_bias is not None else None
    out, *rest = selective_scan_fn(u, delta, A, B, C, D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                                   return_last_state=return_last_state)
    state = rest[0]
    out_ref, *rest = selective_scan_ref(u_ref, delta_ref, A_ref, B_ref, C_ref, D_ref, z=z_ref,
                                        delta_bias=delta_bias_ref, delta_softplus=delta_softplus,
                                        return_last_state=return_last_state)
    state_ref = rest[0]
    assert torch.allclose(out, out_ref, rtol=rtol, atol=atol)
    assert torch.allclose(state, state_ref, rtol=rtol, atol=atol)

    g = torch.randn_like(out)
    out_ref.backward(g)
    out.backward(g)

    assert torch.allclose(u.grad, u_ref.grad.to(dtype=itype), rtol=rtol * 2, atol=atol * 2)
    assert torch.allclose(delta.grad, delta_ref.grad.to(dtype=itype), rtol=rtol * 5, atol=atol * 10)
    assert torch.allclose(A.grad, A_ref.grad, rtol=rtolw, atol=atolw * 5)
    assert torch.allclose(B.grad, B_ref.grad, rtol=rtolw if not is_variable_B else rtol,
                          atol=atolw if not is_variable_B else atol)
    assert torch.allclose(C.grad, C_ref.grad, rtol=rtolw if not is_variable_C else rtol,
                          atol=atolw if not is_variable_C else atol)
    if has_D:
        assert torch.allclose(D.grad, D_ref.grad, rtol=rtolw, atol=atolw)
    if has_z:
        assert torch.allclose(z.grad, z_ref.grad, rtol=rtolw, atol=atolw)
    if has_delta_bias:
        assert torch.allclose(delta_bias.grad, delta_bias_ref.grad, rtol=rtolw, atol=atolw)


def test_complex_A_raises_type_error():
    """mamba-ssm's wtype=complex64 rows: docs/spec.md §4 rejects complex A with a TypeError naming A."""
    torch.random.manual_seed(0)
    A = -0.5 * torch.rand(4, 8, dtype=torch.complex64)
    B = torch.randn(2, 8, 64)
    u = torch.randn(2, 4, 64)
    with pytest.raises(TypeError, match="A"):
        selective_scan_fn(u, 0.5 * torch.rand(2, 4, 64), A, B, B)
