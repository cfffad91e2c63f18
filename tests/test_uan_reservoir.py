"""The reservoir's fixed-slot bookkeeping (normswap/variants/uan/reservoir.py) against a brute-force reference:
every column of the stream gets the same key, the reservoir must keep exactly the ``capacity`` columns with
the largest keys, in descending order of their keys."""

from __future__ import annotations

import pytest
import torch

from normswap.variants.uan.reservoir import Reservoir


def _reference(blocks: list[torch.Tensor], channel_dim: int, capacity: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    keys, cols = [], []
    for b in blocks:
        view = b.movedim(channel_dim, -1)
        c = view.shape[-1]
        cols.append(view.reshape(-1, c).t())
        keys.append(torch.rand(cols[-1].shape[1], generator=gen, dtype=torch.float64))
    keys, cols = torch.cat(keys), torch.cat(cols, dim=1)
    order = keys.argsort(descending=True)[:capacity]
    return cols[:, order]


@pytest.mark.parametrize("capacity, shapes, channel_dim", [
    (50, [(4, 3, 5, 6)] * 5, 1),  # blocks wider than the reservoir, then a full one
    (500, [(3, 100)] * 40, 0),  # fills over five blocks, then mostly rejects
    (7, [(2, 3, 1, 1)] * 30, 1),  # tiny blocks into a tiny reservoir
    (64, [(5, 2, 3, 3), (1, 2, 3, 3), (9, 2, 3, 3)] * 4, 1),  # uneven widths, partly full merges
    (40, [(6, 4, 7)] * 6, 2),  # channels last
])
def test_reservoir_keeps_exactly_the_largest_keys_in_order(capacity, shapes, channel_dim):
    torch.manual_seed(0)
    blocks = [torch.randn(*s) for s in shapes]
    r = Reservoir(capacity, torch.Generator().manual_seed(3))
    for b in blocks:
        r.add(b, channel_dim=channel_dim)
    expected = _reference(blocks, channel_dim, capacity, 3)
    assert torch.equal(r.values(), expected)
    assert len(r) == expected.shape[1] and r.count == sum(b.numel() // b.shape[channel_dim] for b in blocks)


def test_reservoir_gathers_from_strided_blocks():
    base = torch.randn(6, 5, 4, 3)
    strided = base.permute(0, 3, 1, 2)  # (6, 3, 5, 4), not contiguous
    a, b = Reservoir(30, torch.Generator().manual_seed(1)), Reservoir(30, torch.Generator().manual_seed(1))
    a.add(strided, channel_dim=1)
    b.add(strided.contiguous(), channel_dim=1)
    assert torch.equal(a.values(), b.values())
    assert torch.equal(a.values(), _reference([strided], 1, 30, 1))
