"""The skip-based reservoir (normswap/variants/uan/reservoir.py, Algorithm L): deterministic for a seed whatever
the blocks' widths, every kept column a column of the stream at the position it reports, and uniform: each
column of the stream is kept with probability capacity / count (a chi-square test over many seeds that a biased
sampler fails)."""

from __future__ import annotations

import pytest
import torch

from normswap.variants.uan import reservoir as res
from normswap.variants.uan.reservoir import Reservoir
from test_native import require_library


def _fill(stream: torch.Tensor, widths: list[int], capacity: int, seed: int, channel_dim: int = 1) -> Reservoir:
    """Offer ``stream`` (C, M) as blocks of the given widths (cycled), each reshaped to an (N, C, W) activation
    (``channel_dim=1``) or kept (C, W) (``channel_dim=0``)."""
    r = Reservoir(capacity, torch.Generator().manual_seed(seed))
    i, j = 0, 0
    while i < stream.shape[1]:
        w = widths[j % len(widths)]
        b = stream[:, i:i + w]
        if channel_dim == 1:  # the same columns as an (N, C, 1) activation: row-major over (N, 1)
            b = b.t().unsqueeze(-1)
        r.add(b, channel_dim=channel_dim)
        i, j = i + w, j + 1
    return r


@pytest.mark.parametrize("capacity, count", [(64, 5000), (500, 20000), (7, 300), (40, 40), (100, 60)])
def test_the_same_columns_whatever_the_block_widths(capacity, count, kernels):
    stream = torch.randn(3, count)
    whole = _fill(stream, [count], capacity, seed=5, channel_dim=0)
    for widths, dim in (([1], 1), ([7, 130, 1], 1), ([capacity - 1, 3], 0), ([999], 1)):
        if widths == [1] and count > 5000:
            continue
        other = _fill(stream, widths, capacity, seed=5, channel_dim=dim)
        assert torch.equal(other.values(), whole.values()), widths
        assert torch.equal(other.positions(), whole.positions()), widths
    assert len(whole) == min(capacity, count) and whole.count == count
    assert torch.equal(whole.values(), stream[:, whole.positions()])  # each kept column is the stream's, in order
    assert not torch.equal(_fill(stream, [count], capacity, seed=6, channel_dim=0).positions(), whole.positions()) \
        or count <= capacity
    if count <= capacity:
        assert torch.equal(whole.positions(), torch.arange(count))  # nothing is dropped before the reservoir is full


def test_blocks_of_activations_keep_whole_columns(kernels):
    x = torch.randn(4, 3, 5, 6)
    r = Reservoir(50, torch.Generator().manual_seed(0))
    r.add(x, channel_dim=1)
    columns = x.transpose(0, 1).reshape(3, -1)
    assert torch.equal(r.values(), columns[:, r.positions()])
    slots = r.values(ordered=False)
    assert slots.data_ptr() == r._vals.data_ptr()  # a view: no copy
    assert torch.equal(slots.sort(1).values, r.values().sort(1).values)
    strided = torch.randn(6, 5, 4, 3).permute(0, 3, 1, 2)  # (6, 3, 5, 4), not contiguous
    a, b = Reservoir(30, torch.Generator().manual_seed(1)), Reservoir(30, torch.Generator().manual_seed(1))
    a.add(strided, channel_dim=1)
    b.add(strided.contiguous(), channel_dim=1)
    assert torch.equal(a.values(), b.values())


@pytest.mark.parametrize("shape, channel_dim, dtype", [((4, 6, 9, 11), 1, torch.float32), ((7, 5, 3), 2, torch.float64),
                                                     ((6, 2000), 0, torch.float32), ((3, 4, 5, 6), 1, torch.float16)])
def test_the_native_copy_keeps_the_same_values(shape, channel_dim, dtype):
    """The native kernel (csrc/calib_reservoir.cpp) writes the entering columns the eager gather writes, bit for
    bit (float16 blocks go to a float32 reservoir on the eager path)."""
    from normswap import native

    outs = []
    for on in (False, True):
        if on:
            require_library()
        native.set_enabled(on)
        try:
            r = Reservoir(300, torch.Generator().manual_seed(2))
            g = torch.Generator().manual_seed(0)
            for _ in range(5):
                r.add(torch.randn(shape, generator=g).to(dtype), channel_dim=channel_dim)
            outs.append((r.values(), r.values(ordered=False), r.positions()))
        finally:
            native.set_enabled(None)
    for a, b in zip(*outs):
        assert a.dtype == b.dtype and torch.equal(a, b)


def _chi_square(count: int, capacity: int, trials: int, widths: list[int]) -> float:
    """Pearson's statistic of how often each stream position was kept over ``trials`` seeds, against the
    uniform expectation ``trials * capacity / count`` (``count - 1`` degrees of freedom)."""
    stream = torch.arange(float(count))[None, :]
    hits = torch.zeros(count)
    for seed in range(trials):
        r = _fill(stream, widths, capacity, seed, channel_dim=0)
        hits[r.positions()] += 1
    assert float(hits.sum()) == trials * capacity
    expected = trials * capacity / count
    return float(((hits - expected) ** 2 / expected).sum())


# chi-square with 59 degrees of freedom: P(statistic > 98.3) = 0.001
CRITICAL_59 = 98.3


def test_every_column_is_kept_with_probability_capacity_over_count():
    assert _chi_square(60, 6, 2000, [7, 1, 13]) < CRITICAL_59


def test_the_uniformity_test_fails_a_biased_reservoir(monkeypatch):
    """Algorithm L without its W update (skips drawn with the first W throughout: too short, so late columns
    enter too often) is what a subtle bug looks like; the same test must reject it."""
    real = res.Reservoir._draw

    def frozen_w(self, chunks=1):
        w = self._log_w
        out = real(self, chunks)
        self._log_w = w if w is not None else self._log_w
        return out

    monkeypatch.setattr(res, "EVENTS", 1)
    monkeypatch.setattr(res, "DRAW_CHUNKS", 1)  # W frozen before every event
    monkeypatch.setattr(res.Reservoir, "_draw", frozen_w)
    assert _chi_square(60, 6, 400, [7, 1, 13]) > 3 * CRITICAL_59


def test_one_event_per_chunk_is_uniform_too(monkeypatch):
    """The chunk size of the draws changes which sample a seed gives (the draws are consumed in another order),
    not the sampler's law."""
    monkeypatch.setattr(res, "EVENTS", 1)
    assert _chi_square(60, 6, 1000, [60]) < CRITICAL_59


@pytest.mark.parametrize("capacity, events", [(64, 1024), (500, 7), (4096, 1024)])
def test_chunks_drawn_in_one_batch_are_the_chunks_drawn_one_at_a_time(monkeypatch, capacity, events):
    """Reservoir._draw batches up to DRAW_CHUNKS chunks: the same events (positions and slots) bit for bit, so the
    same columns are kept, as when each chunk is drawn alone."""
    monkeypatch.setattr(res, "EVENTS", events)
    stream = torch.randn(2, 60 * capacity)
    kept = {}
    for chunks in (1, 16):
        monkeypatch.setattr(res, "DRAW_CHUNKS", chunks)
        r = _fill(stream, [capacity // 3 + 1, 5 * capacity], capacity, seed=11, channel_dim=0)
        a = Reservoir(capacity, torch.Generator().manual_seed(3))
        drawn = [a._draw(1) for _ in range(7)] if chunks == 1 else [a._draw(1), a._draw(6)]  # 7 chunks either way
        kept[chunks] = (r.positions(), torch.cat([p for p, _ in drawn]), torch.cat([s for _, s in drawn]), a._last,
                        a._log_w)
    for x, y in zip(kept[1], kept[16]):
        assert torch.equal(x, y) if torch.is_tensor(x) else x == y

