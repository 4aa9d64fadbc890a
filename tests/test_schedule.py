"""BlockSchedule: CSR construction, transposition and the element visibility it implies."""

from __future__ import annotations

import pytest
import torch

from ditkernels.schedule import BlockSchedule, TiledSchedule


def _random_tiles(hs, nq, nk, seed):
    g = torch.Generator().manual_seed(seed)
    visited = torch.rand(hs, nq, nk, generator=g) < 0.5
    visited[:, 0] = False  # a query tile that visits nothing
    partial = visited & (torch.rand(hs, nq, nk, generator=g) < 0.5)
    return visited, partial


@pytest.mark.parametrize("hs", [1, 3])
def test_roundtrip_and_counts(hs):
    seq_q, seq_k, bm, bn = 97, 70, 16, 32
    visited, partial = _random_tiles(hs, 7, 3, seed=hs)
    s = BlockSchedule.from_tile_mask(visited, bm, bn, seq_q, seq_k, partial)
    v2, p2 = s.tile_mask()
    assert torch.equal(v2, visited) and torch.equal(p2, partial)
    assert s.visited_tiles == int(visited.sum()) and s.partial_tiles == int(partial.sum())
    for h in range(hs):  # KV tiles ascend within each query tile
        for m in range(s.num_q_tiles):
            idx = s.kv_idx[h, s.kv_ptr[h, m]:s.kv_ptr[h, m + 1]]
            assert torch.all(idx[1:] > idx[:-1])


def test_transposed_is_the_same_visits():
    visited, partial = _random_tiles(2, 5, 4, seed=9)
    s = BlockSchedule.from_tile_mask(visited, 16, 16, 80, 60, partial)
    t = s.transposed()
    tv, tp = t.tile_mask()
    assert torch.equal(tv, visited.transpose(1, 2)) and torch.equal(tp, partial.transpose(1, 2))
    assert (t.block_m, t.block_n, t.seq_q, t.seq_k) == (16, 16, 60, 80)


def test_element_mask_expands_tiles_and_clips_bounds():
    visited = torch.tensor([[[True, False], [False, True]]])
    s = BlockSchedule.from_tile_mask(visited, 4, 3, 6, 5)
    vis = s.element_mask()[0]
    assert vis.shape == (6, 5)
    assert vis[:4, :3].all() and not vis[:4, 3:].any()
    assert vis[4:, 3:].all() and not vis[4:, :3].any()


def test_bad_tile_mask_shape_names_it():
    with pytest.raises(ValueError, match=r"tile_mask: expected \(H, 7, 3\) tiles"):
        BlockSchedule.from_tile_mask(torch.ones(7, 4, dtype=torch.bool), 16, 32, 97, 70)


def test_on_device_copies_once():
    visited, partial = _random_tiles(2, 7, 3, seed=4)
    s = BlockSchedule.from_tile_mask(visited, 16, 32, 97, 70, partial)
    assert s.on("cpu") is s
    meta = s.on("meta")
    assert meta is s.on(torch.device("meta")) and meta.kv_idx.device.type == "meta"
    assert (meta.block_m, meta.block_n, meta.seq_q, meta.seq_k) == (16, 32, 97, 70)


def test_validate_names_the_field_and_runs_once():
    visited, partial = _random_tiles(2, 7, 3, seed=5)
    s = BlockSchedule.from_tile_mask(visited, 16, 32, 97, 70, partial)
    with pytest.raises(ValueError, match="schedule: built for seq_q=97, seq_k=70; the inputs have seq_q=96"):
        s.validate(96, 70, 2)
    with pytest.raises(ValueError, match="expected 1 or batch\\*heads=4 head slices, got 2"):
        s.validate(97, 70, 4)
    bad = BlockSchedule.from_tile_mask(visited, 16, 32, 97, 70, partial)
    bad.kv_idx[1, 0] = 3  # KV tiles are 0..2
    with pytest.raises(ValueError, match=r"schedule.kv_idx: expected KV tile indices in \[0, 3\), got \[0, 3\]"):
        bad.validate(97, 70, 2)
    bad = BlockSchedule.from_tile_mask(visited, 16, 32, 97, 70, partial)
    bad.kv_ptr[0, 3] = bad.kv_ptr[0, 2] - 1
    with pytest.raises(ValueError, match="schedule.kv_ptr: expected non-decreasing offsets"):
        bad.validate(97, 70, 2)
    bad = BlockSchedule.from_tile_mask(visited, 16, 32, 97, 70, partial)
    bad.partial = bad.partial.long()
    with pytest.raises(ValueError, match="schedule.partial: expected a contiguous int32 tensor"):
        bad.validate(97, 70, 2)
    s.validate(97, 70, 2)
    s.kv_idx[0, 0] = 99  # not checked again: the structure is validated once per schedule object
    s.validate(97, 70, 2)


def test_validate_token_tables():
    qt = torch.arange(20).reshape(2, 10)
    kt = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18, 20]])  # 19 missing
    s = TiledSchedule.from_visits(qt, kt, 20, 20, torch.tensor([0]), torch.tensor([1]), torch.tensor([True]))
    with pytest.raises(ValueError, match=r"schedule.kv_tokens: .*every token of \[0, 20\) exactly once"):
        s.validate(20, 20, 1)
    kt[1, -1] = 19
    kt[1, :2] = torch.tensor([20, 10])  # padding before a token
    s = TiledSchedule.from_visits(qt, kt, 20, 20, torch.tensor([0]), torch.tensor([1]), torch.tensor([True]))
    with pytest.raises(ValueError, match="schedule.kv_tokens: expected each row to list its tokens first"):
        s.validate(20, 20, 1)
    kt[1, :2] = torch.tensor([10, 11])
    TiledSchedule.from_visits(qt, kt, 20, 20, torch.tensor([0]), torch.tensor([1]), torch.tensor([True])).validate(
        20, 20, 3)
    with pytest.raises(ValueError, match="schedule.kv_ptr: expected tensors on meta"):
        s.validate(20, 20, 1, torch.device("meta"))


@pytest.mark.parametrize("name", ["cpu", "triton"])
def test_every_kernel_backend_rejects_an_out_of_range_index(name):
    """The kernels trust kv_idx with raw pointers: every backend runs BlockSchedule.validate first."""
    from ditkernels import backends

    q = torch.randn(1, 1, 32, 16)
    s = BlockSchedule.from_tile_mask(torch.ones(2, 2, dtype=torch.bool), 16, 16, 32, 32)
    s.kv_idx[0, 1] = 2
    with pytest.raises(ValueError, match="schedule.kv_idx"):
        backends.get(name).flash_fwd(q, q, q, scale=1.0, schedule=s)
