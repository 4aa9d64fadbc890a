"""ditkernels.distributed.local_attention (docs/spec.md §7): halo-exchange local attention on P = 1, 2, 3, 4
gloo ranks (tests/distributed_helpers.py: one spawn per world size, every case looped inside the ranks), and
single-process tests of what it is built on: the q_rows / k_rows sub-problems of the local op on every
backend, the halo sizes and the byte formula.

Exactness rule (as tests/test_distributed.py): each rank's shard of the output and of every gradient equals
the single-process op on the full sequence (float64 on the reference backend: err <= 1e-12; float32 on the
cpu backend: err <= 1e-5 against the float64 single-process op), with unequal bands, batch 2, r = 1, 1-D,
2-D and 3-D grids, prefix and suffix text, extra_kv, every shape and border. Replicated text tokens: the
upstream gradient of the text output is split over the ranks with weights summing to 1, and the ranks' text
input gradients summed equal the single-process ones.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist

import ditkernels
from ditkernels.distributed import _comm, shard
from ditkernels.distributed._layout import check_bands
from ditkernels.distributed import local as dlocal
from ditkernels.distributed.local import halo_bytes, halo_layout, key_rows
from ditkernels.distributed.ulysses import ulysses_bytes
from ditkernels.ops.local import spec_backward, spec_forward
from ditkernels.reference.attention import attention_ref
from ditkernels.reference.local import LocalSpec, local_visible

from builders import check_plan_visits
from distributed_helpers import raises_everywhere, rank_fixture
from numerics import rel_err

B, H, D = 2, 2, 8
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}

# id -> options of local_attention (grid, window, ...), extra keys per rank (None: no extra_kv)
CASES = {
    "2d-9x5-circle-r2-P2-S1-extra": (dict(grid=(9, 5), window=2, num_prefix=2, num_suffix=1), 2),
    "2d-9x5-circle-r1": (dict(grid=(9, 5), window=1), None),
    "2d-13x4-square-shift-r2-P1": (dict(grid=(13, 4), window=2, shape="square", border="shift", num_prefix=1), None),
    "2d-9x5-square-clip-r(2,1)-S2": (dict(grid=(9, 5), window=(2, 1), shape="square", num_suffix=2), None),
    "2d-12x3-tile(2,2)-r1-S2-extra": (dict(grid=(12, 3), window=1, shape="tile", tile=(2, 2), num_suffix=2), 1),
    "1d-23-circle-r3-P1": (dict(grid=(23,), window=3, num_prefix=1), None),
    "3d-6x3x4-circle-r(1,1,2)-P1-S1-extra": (dict(grid=(6, 3, 4), window=(1, 1, 2), num_prefix=1, num_suffix=1), 3),
    "3d-8x2x3-square-shift-r1": (dict(grid=(8, 2, 3), window=1, shape="square", border="shift"), None),
}


def _rank():
    return dist.get_rank(), dist.get_world_size()


def _bands(rows: int, p: int, case: int) -> tuple[int, ...] | None:
    """Unequal bands: the even split for even cases, else rank 0 one row more and the last one less."""
    if p == 1 or case % 2 == 0 or rows // p < 3:
        return None
    b = [rows // p] * p
    b[0] += 1
    b[-1] += rows - sum(b)
    return tuple(b)


def _compare(name, got, want, tol):
    assert not torch.isnan(got).any(), f"{name}: NaN"
    err = rel_err(got, want)
    assert err <= tol, f"{name}: relative error {err:.3e} > {tol:.1e}"


def _check_case(name: str, i: int) -> None:
    """One case: float64 on the reference backend (1e-12) and float32 on the cpu backend (1e-5) against one
    float64 single-process reference."""
    rank, p = _rank()
    opts, extra = CASES[name]
    grid, pre, suf = opts["grid"], opts.get("num_prefix", 0), opts.get("num_suffix", 0)
    bands = _bands(grid[0], p, i)
    lay = dict(bands=bands, num_prefix=pre, num_suffix=suf)
    seq = pre + math.prod(grid) + suf
    g = torch.Generator().manual_seed(i)
    q, k, v, up = (torch.randn(B, H, seq, D, generator=g, dtype=torch.float64) for _ in range(4))
    ms = [extra + r % 2 for r in range(p)] if extra is not None else None  # unequal shards
    kes = [torch.randn(B, H, m, D, generator=g, dtype=torch.float64) for m in ms] if ms else None
    ves = [torch.randn(B, H, m, D, generator=g, dtype=torch.float64) for m in ms] if ms else None
    # the single-process op, float64 on the reference backend
    full = [t.clone().requires_grad_(True) for t in (q, k, v)]
    ex = (torch.cat(kes, 2).requires_grad_(True), torch.cat(ves, 2).requires_grad_(True)) if ms else None
    ref, ref_lse = ditkernels.local_attention(*full, **opts, extra_kv=ex, backend="reference", return_lse=True)
    ref.backward(up)
    for dtype, backend in ((torch.float64, "reference"), (torch.float32, "cpu")):
        _check_rank(name, rank, p, opts, lay, dtype, backend, (q, k, v, up), full, ms, kes, ves, ex, ref, ref_lse)
    if i == 0:  # bfloat16 on the cpu backend: err <= 2 x the single-process op's bfloat16 err + 1e-6
        lo = [t.detach().to(torch.bfloat16).requires_grad_(True) for t in (q, k, v)]
        lex = tuple(t.detach().to(torch.bfloat16).requires_grad_(True) for t in ex) if ex else None
        out = ditkernels.local_attention(*lo, **opts, extra_kv=lex, backend="cpu")
        out.backward(up.to(torch.bfloat16))
        low = (out.detach(), [t.grad for t in lo], [t.grad for t in lex] if lex else None)
        _check_rank(name, rank, p, opts, lay, torch.bfloat16, "cpu", (q, k, v, up), full, ms, kes, ves, ex, ref,
                    ref_lse, low)


def _check_rank(name, rank, p, opts, lay, dtype, backend, inputs, full, ms, kes, ves, ex, ref, ref_lse, low=None):
    """This rank's part of the case against the single-process reference (low: the single-process op's
    (out, [dq, dk, dv], extra grads) in the same low precision, which sets the tolerance)."""
    q, k, v, up = inputs
    grid, pre, suf, bands = opts["grid"], lay["num_prefix"], lay["num_suffix"], lay["bands"]
    seq = q.shape[2]
    name = f"{name} {backend} {dtype}"
    loc = [shard(t, grid, **lay).to(dtype).requires_grad_(True) for t in (q, k, v)]
    lex = tuple(t[rank].detach().to(dtype).requires_grad_(True) for t in (kes, ves)) if ms else None
    out, lse = dlocal.local_attention(*loc, **opts, bands=bands, extra_kv=lex, backend=backend, return_lse=True)

    def tol(want, sel):  # sel: the same slice of a single-process tensor
        return TOL[dtype] if low is None else 2 * rel_err(sel, want) + 1e-6

    want = shard(ref.detach(), grid, **lay)
    _compare(f"{name}: out", out, want, tol(want, low and shard(low[0], grid, **lay)))
    want_lse = shard(ref_lse[..., None], grid, **lay)[..., 0]
    assert lse.dtype == torch.float32 and (lse - want_lse).abs().max() <= (1e-5 if low is None else 1e-2), \
        f"{name}: lse"
    gl = shard(up, grid, **lay).clone()
    w = (rank + 1) / (p * (p + 1) / 2)  # the text output enters the loss once: weights summing to 1
    gl[:, :, :pre] *= w
    gl[:, :, gl.shape[2] - suf:] *= w
    out.backward(gl.to(dtype))
    for j, (x, x_ref, nm) in enumerate(zip(loc, full, "qkv")):
        mine = shard(x_ref.grad, grid, **lay)
        n = mine.shape[2] - pre - suf
        sel = low and shard(low[1][j], grid, **lay)[:, :, pre:pre + n]
        _compare(f"{name}: d{nm} (grid rows)", x.grad[:, :, pre:pre + n], mine[:, :, pre:pre + n],
                 tol(mine[:, :, pre:pre + n], sel))
        text = torch.cat([x.grad[:, :, :pre], x.grad[:, :, pre + n:]], 2).double()
        dist.all_reduce(text)
        if text.numel():
            want = torch.cat([x_ref.grad[:, :, :pre], x_ref.grad[:, :, seq - suf:]], 2)
            sel = low and torch.cat([low[1][j][:, :, :pre], low[1][j][:, :, seq - suf:]], 2)
            _compare(f"{name}: d{nm} (text, summed over ranks)", text, want, tol(want, sel))
    if ms:
        off = sum(ms[:rank])
        for j, (t, t_ref, nm) in enumerate(zip(lex, ex, ("k", "v"))):
            want = t_ref.grad[:, :, off:off + ms[rank]]
            _compare(f"{name}: d{nm}_extra", t.grad, want, tol(want, low and low[2][j][:, :, off:off + ms[rank]]))


# ---- cases (run inside every rank) ---------------------------------------------------------------------------
def case_matches_single_process():
    """Every case, float64 on the reference backend (exact to 1e-12) and float32 on the cpu backend (the C++
    kernels with the sub-grid mask, within 1e-5 of the float64 single-process op)."""
    for i, name in enumerate(CASES):
        _check_case(name, i)


def case_keys_held_are_band_plus_halo():
    """No rank hands a kernel more keys than the text, its band plus halo and the extra keys; the edge rows
    get band + halo, the interior rows the band alone."""
    rank, p = _rank()
    opts = dict(grid=(16, 5), window=3, num_prefix=2)
    seen = []
    real = dlocal.spec_forward

    def spy(spec, q, kk, vv, scale, backend):
        seen.append((spec.q_rows, spec.k_rows or (0, spec.grid[0]), kk.shape[2]))
        return real(spec, q, kk, vv, scale, backend)

    dlocal.spec_forward = spy
    try:
        q, k, v = (torch.randn(1, 2, 2 + 80, 8).float() for _ in range(3))
        loc = [shard(t, opts["grid"], num_prefix=2) for t in (q, k, v)]
        dlocal.local_attention(*loc, **opts)
    finally:
        dlocal.spec_forward = real
    lay = halo_layout(LocalSpec.make((16, 5), 3, num_prefix=2), check_bands(None, 16, p))[rank]
    assert seen, "no kernel call"
    for q_rows, k_rows, n_keys in seen:
        assert lay.need[0] <= k_rows[0] and k_rows[1] <= lay.need[1]
        assert n_keys == 2 + (k_rows[1] - k_rows[0]) * 5
        assert lay.band[0] <= q_rows[0] and q_rows[1] <= lay.band[1]
    assert sum(r[1] - r[0] for r, _, _ in seen) == lay.band[1] - lay.band[0]  # each band row computed once
    assert lay.need == (max(0, lay.band[0] - 2), min(16, lay.band[1] + 2))  # circle r=3: 2 rows each side


def case_bytes_match_formula():
    """The bytes each rank hands to the collectives in a forward equal halo_bytes (bf16 and fp32, text,
    unequal extra keys); the backward sends the halo gradients back (for a circle the same bytes as the halo)
    plus the text and extra-key all-reduces."""
    rank, p = _rank()
    grid, r, pre, suf = (12, 4), 2, 3, 2
    ms = [1 + r_ % 3 for r_ in range(p)]
    for dtype in (torch.bfloat16, torch.float32):
        q, k, v = (torch.randn(B, H, pre + 48 + suf, D).to(dtype) for _ in range(3))
        loc = [shard(t, grid, num_prefix=pre, num_suffix=suf).requires_grad_(True) for t in (q, k, v)]
        ex = tuple(torch.randn(B, H, ms[rank], D).to(dtype).requires_grad_(True) for _ in range(2))
        with _comm.count() as c:
            out = dlocal.local_attention(*loc, grid, r, num_prefix=pre, num_suffix=suf, extra_kv=ex)
        es = torch.empty(0, dtype=dtype).element_size()
        want = halo_bytes(grid, r, world_size=p, heads=H, head_dim=D, batch=B, itemsize=es, num_prefix=pre,
                          num_suffix=suf, num_extra=tuple(ms))
        assert c.sent == want[rank], (c.calls, want)
        halo = [x.sent for x in c.calls if x.kind == "exchange"]
        with _comm.count() as c:
            out.backward(torch.ones_like(out))
        assert [x.sent for x in c.calls if x.kind == "exchange"] == halo, c.calls


def case_errors_raise_on_every_rank():
    rank, p = _rank()
    grid = (10, 4)
    q, k, v = (torch.randn(1, 2, 40, 8) for _ in range(3))
    loc = [shard(t, grid) for t in (q, k, v)]
    if p >= 3:
        # rank 1's band of 1 row: rank 0's circle of radius 4 reaches 3 rows past it, into rank 2's band
        bands = (1, 1, 8) if p == 3 else (1, 1, 1, 7)
        thin = [shard(t, grid, bands=bands) for t in (q, k, v)]
        raises_everywhere(lambda: dlocal.local_attention(*thin, grid, 4, bands=bands), ValueError,
                           "rank 0's band .* thinner than the halo")
        # NATTEN's shift at the grid edge needs 2r rows from the inner neighbour
        raises_everywhere(lambda: dlocal.local_attention(*thin, grid, 1, bands=bands, shape="square",
                                                          border="shift"), ValueError, "thinner than the halo")
    bad = p - 1
    short = [t[:, :, :-1] if rank == bad else t for t in loc]
    raises_everywhere(lambda: dlocal.local_attention(*short, grid, 2), ValueError,
                       f"expected seq = num_prefix \\+ bands\\[{bad}\\]")
    raises_everywhere(lambda: dlocal.local_attention(*loc, grid, 2, bands=(1,) * p), ValueError, "add up to")
    if p > 1:
        ex = (torch.randn(1, 2, 3, 8),) * 2 if rank == 0 else None
        raises_everywhere(lambda: dlocal.local_attention(*loc, grid, 2, extra_kv=ex), ValueError,
                           "extra_kv must be the same on every rank")
        raises_everywhere(lambda: dlocal.local_attention(*loc, grid, 2 + (rank == bad)), ValueError,
                           "window must be the same on every rank")


DIST_CASES = [case_matches_single_process, case_keys_held_are_band_plus_halo, case_bytes_match_formula,
              case_errors_raise_on_every_rank]

ranks = rank_fixture(DIST_CASES, timeout=60)


@pytest.mark.parametrize("case", [c.__name__ for c in DIST_CASES], ids=[c.__name__[5:] for c in DIST_CASES])
def test_case(ranks, case):
    ranks.check(case)


# ---- single process --------------------------------------------------------------------------------------------
SUB_CASES = [  # (options, q_rows, k_rows, extra keys)
    (dict(grid=(9, 5), window=2, num_prefix=2, num_suffix=1), (3, 6), (2, 7), 2),
    (dict(grid=(13, 4), window=2, shape="square", border="shift", num_prefix=1), (0, 2), (0, 5), 0),
    (dict(grid=(13, 4), window=2, shape="square", border="shift"), (11, 13), (8, 13), 0),
    (dict(grid=(12, 3), window=1, shape="tile", tile=(3, 2), num_suffix=2), (3, 5), (0, 9), 1),
    (dict(grid=(23,), window=3, num_prefix=1), (9, 15), (7, 17), 0),
    (dict(grid=(6, 3, 4), window=(1, 1, 2), num_prefix=1, num_suffix=1), (2, 4), (1, 6), 3),
    (dict(grid=(8, 5), window=1), (3, 5), (3, 5), 0),
]


def _sub_truth(opts, q_rows, k_rows, m, seed):
    """Inputs of a sub-problem cut from a full one, and the full problem's float64 reference answer at the
    sub-problem's queries: (spec, q, kk, vv, do, out, lse, dq, dkk, dvv)."""
    spec_full = LocalSpec.make(**opts, num_extra=m)
    spec = LocalSpec.make(**opts, num_extra=m, q_rows=q_rows, k_rows=k_rows)
    g = torch.Generator().manual_seed(seed)
    b, h, d = 1, 2, 8
    q, kk, vv = (torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
                 for n in (spec_full.seq, spec_full.seq_k, spec_full.seq_k))
    qi, ki = spec.q_index(), spec.k_index()
    do = torch.randn(b, h, qi.numel(), d, generator=g, dtype=torch.float64)
    leaves = [t.clone().requires_grad_(True) for t in (q, kk, vv)]
    out, lse = attention_ref(*leaves, d ** -0.5, local_visible(spec_full))
    out[:, :, qi].backward(do)
    # the sub-problem's keys hold every key its queries see, so its answer is the full one at those queries
    return (spec, q[:, :, qi], kk[:, :, ki], vv[:, :, ki], do, out[:, :, qi].detach(), lse[:, :, qi],
            leaves[0].grad[:, :, qi], leaves[1].grad[:, :, ki], leaves[2].grad[:, :, ki])


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
def test_subproblem_kernels_match_full_problem(backend):
    """The q_rows / k_rows sub-problems (the pieces of a band) on every backend, float32, forward and
    backward: the mask is evaluated in the whole grid's coordinates (shift and tiles at the grid's edge)."""
    for i, (opts, q_rows, k_rows, m) in enumerate(SUB_CASES):
        if backend == "triton" and i not in (0, 2, 3):  # the interpreter is slow: text + extra, shift, tile
            continue
        spec, q, kk, vv, do, out, lse, dq, dkk, dvv = _sub_truth(opts, q_rows, k_rows, m, seed=i)
        assert torch.equal(local_visible(spec), local_visible(LocalSpec.make(**opts, num_extra=m))
                           [spec.q_index()][:, spec.k_index()])
        args = [t.float() for t in (q, kk, vv)]
        o, l = spec_forward(spec, *args, 8 ** -0.5, backend)
        assert rel_err(o, out) <= 1e-5, (i, rel_err(o, out))
        assert (l.double() - lse).abs().max() <= 1e-5
        grads = spec_backward(spec, do.float(), *args, o, l.float(), 8 ** -0.5, backend)
        for nm, got, want in zip(("dq", "dk", "dv"), grads, (dq, dkk, dvv)):
            assert rel_err(got, want) <= 1e-5, (i, nm, rel_err(got, want))


def test_subproblem_plan_lists_exactly_the_visible_tiles():
    """The plan of a sub-problem: every visible pair is in a visited tile, every visited tile holds one, non-partial
    tiles only hold visible pairs, and useful_pairs is exact."""
    from ditkernels.ops.local import _plan

    for opts, q_rows, k_rows, m in SUB_CASES:
        spec = LocalSpec.make(**opts, num_extra=m, q_rows=q_rows, k_rows=k_rows)
        assert LocalSpec.from_mask_params(spec.mask_params()) == spec
        ref = local_visible(spec)
        for block in ((16, 16), (8, 32)):
            plan = _plan(spec, *block, None, None)
            check_plan_visits(plan, ref)


@pytest.mark.parametrize("opts", [dict(window=4), dict(window=1), dict(window=3, shape="square"),
                                  dict(window=2, shape="square", border="shift"),
                                  dict(window=5, shape="square", border="shift"),
                                  dict(window=1, shape="tile", tile=3), dict(window=0, shape="tile", tile=4),
                                  dict(window=(0, 3))],
                         ids=["circle-r4", "circle-r1", "square-r3", "shift-r2", "shift-r5-whole", "tile3-r1",
                              "tile4-r0", "circle-r0"])
def test_key_rows_is_the_smallest_halo(opts):
    """key_rows(q0, q1) is exactly the span of key rows visible from query rows [q0, q1): circle r - 1 rows,
    square r, NATTEN's shift up to 2r from the inner side at the grid's edge, whole tiles."""
    grid = (11, 3)
    spec = LocalSpec.make(grid, **opts)
    vis = local_visible(spec).reshape(11, 3, 11, 3).any(3).any(1)  # [query row, key row]
    for q0 in range(11):
        for q1 in range(q0 + 1, 12):
            rows = vis[q0:q1].any(0).nonzero().flatten()
            want = (int(rows.min()), int(rows.max()) + 1) if rows.numel() else (q0, q1)
            assert key_rows(spec, q0, q1) == want, (q0, q1)


def test_halo_bytes_quarter_of_ulysses():
    """At a 256x256 grid, r = 8, 24 heads, head_dim 128, P = 8 (bf16), every rank sends at most 1/4 of Ulysses'
    bytes (the interior ranks exactly 1/4: 2 x 7 rows of k and v); 1/8 at 512x512."""
    for grid, frac in (((256, 256), 4), ((512, 512), 8)):
        tokens = [grid[0] // 8 * grid[1]] * 8
        halo = halo_bytes(grid, 8, world_size=8, heads=24, head_dim=128, itemsize=2)
        for r in range(8):
            uly = ulysses_bytes(tokens, r, batch=1, heads=24, head_dim=128, num_global=0, element_size=2)
            assert halo[r] * frac <= uly, (grid, r, halo[r], uly)
        assert halo[3] == 2 * 2 * 7 * grid[1] * 24 * 128 * 2
