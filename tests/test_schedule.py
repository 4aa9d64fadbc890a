"""BlockSchedule: CSR construction, transposition and the element visibility it implies."""

from __future__ import annotations

import pytest
import torch

from ditkernels.schedule import BlockSchedule


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
