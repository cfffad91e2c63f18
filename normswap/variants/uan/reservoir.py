"""A seeded, uniform random subsample of the columns of a stream of (C, M) blocks, in bounded memory:
what UAN's calibration keeps of each layer's inputs for EM (:mod:`normswap.variants.uan.em`).

The sampler is Li's Algorithm L (K.-H. Li, "Reservoir-sampling algorithms of time complexity
O(n(1 + log(N/n)))", ACM TOMS 20(4), 1994): the first ``capacity`` columns fill the reservoir; after that the
stream is skipped by geometric jumps, and only a column that enters costs random draws (three: its skip, the
slot it evicts, the next jump's scale). Over a stream of N columns about ``capacity * ln(N / capacity)`` enter,
so a block costs one gather of its entering columns, and nothing for the columns skipped.
"""

from __future__ import annotations

import math

import torch

from normswap.core.threads import serial
from normswap.native import ops as native_ops

__all__ = ["Reservoir"]

_F64 = torch.float64
EVENTS = 1024  # entering columns drawn per chunk: fixed, so the draws never depend on the blocks' widths
DRAW_CHUNKS = 16  # most chunks drawn in one batch (the same values as one at a time: Reservoir._draw)
_MAX_SKIP = float(1 << 52)  # a skip beyond any stream (keeps float64 positions exact integers)


class Reservoir:
    """A uniform random subsample of up to ``capacity`` columns of a stream of (C, M) blocks.

    Algorithm L (module docstring): every subset of ``capacity`` columns of the stream is equally likely to be
    the one kept, and until ``capacity`` columns have been seen all are kept. The columns that enter after the
    first ``capacity`` -- their stream positions and the slots they overwrite -- are drawn from ``generator`` (a
    CPU ``torch.Generator``) in fixed chunks of :data:`EVENTS`, as a function of the stream position only: the
    same seed keeps the same columns of the same stream whatever the blocks' widths (one block of 1000 columns or
    ten of 100). Values are kept on the blocks' device in ``promote_types(dtype, float32)`` of the first block;
    memory is C * capacity values. The kept columns live in fixed slots (an entering column overwrites the one it
    evicts, nothing else moves), so a block costs one gather of the columns that enter it."""

    def __init__(self, capacity: int, generator: torch.Generator | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"reservoir capacity must be >= 1; got {capacity}")
        self.capacity = int(capacity)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.count = 0  # columns (values per channel) seen
        self._n = 0  # slots filled
        self._pos = torch.empty(0, dtype=torch.int64)  # (capacity,): slot j's column's stream position
        self._vals: torch.Tensor | None = None  # (C, capacity): slot j's column
        self._log_w: float | None = None  # log W of Algorithm L before the next drawn event
        self._last = float(self.capacity - 1)  # stream position of the last event drawn
        self._events = (torch.empty(0, dtype=torch.int64), torch.empty(0, dtype=torch.int64))  # (positions, slots)

    def add(self, block: torch.Tensor, channel_dim: int = 0) -> None:
        """Offer the columns of ``block``: a (C, M) matrix, or any tensor whose dim ``channel_dim`` holds
        the C channels (every position of the other dims, in row-major order, is a column: an
        (N, C, H, W) activation with ``channel_dim=1`` is offered without being copied)."""
        block = block.detach()
        if block.dim() < 1:
            raise ValueError("reservoir blocks need a channel dimension")
        c = block.shape[channel_dim]
        if self._vals is not None and c != self._vals.shape[0]:
            raise ValueError(f"reservoir holds {self._vals.shape[0]} channels; got a block of {c}")
        m = block.numel() // c if c else 0
        if m == 0:
            return
        start, cap = self.count, self.capacity
        self.count += m
        with serial():  # draws and indices: vectors of about a thousand values (normswap.core.threads)
            cols, slots = self._entering(start, cap)
        if cols.numel() == 0:
            return
        if self._vals is None:
            dtype = torch.promote_types(block.dtype, torch.float32)
            self._vals = torch.empty(c, cap, dtype=dtype, device=block.device)
            self._pos = torch.empty(cap, dtype=torch.int64)
        o = native_ops() if block.device.type == "cpu" and block.dtype == self._vals.dtype \
            and block.dtype in (torch.float32, torch.float64) else None
        if o is not None:  # one read and one write per value, no (C, P) index tensor (csrc/calib_reservoir.cpp);
            # in stream order, so of several columns entering one slot the last stays, as Algorithm L says
            o.reservoir_put(block.contiguous(), channel_dim, cols, slots, self._vals, self._pos, start)
        else:
            with serial():
                cols, slots = _last_per_slot(cols, slots, cap)
            taken = _gather(block, channel_dim, cols.to(block.device))
            self._vals[:, slots.to(self._vals.device)] = taken.to(self._vals)
            self._pos[slots] = cols + start
        self._n = min(cap, self.count)

    def _entering(self, start: int, cap: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The columns of the block that began at stream position ``start`` (``self.count`` is its end) that enter
        the reservoir, and their slots, in stream order: the empty slots first, then the drawn events."""
        fill = min(cap, self.count) - min(cap, start)  # columns that go to empty slots
        cols = torch.arange(fill) if fill else torch.empty(0, dtype=torch.int64)
        slots = torch.arange(start, start + fill) if fill else cols
        if self.count > cap:
            pos, ev_slots = self._take_events(self.count)
            if pos.numel():
                cols, slots = torch.cat([cols, pos - start]), torch.cat([slots, ev_slots])
        return cols, slots

    def _take_events(self, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The drawn events (stream positions, slots) before position ``end``, in stream order; drawing more
        chunks as needed and keeping those beyond ``end`` for later blocks."""
        pos, slots = self._events
        while self._last < end:  # about capacity * ln(end / last) events to come (Algorithm L)
            need = self.capacity * math.log(max(end, 1) / max(self._last, 1.0)) / EVENTS
            p, s = self._draw(max(1, min(DRAW_CHUNKS, math.ceil(need))))
            pos, slots = torch.cat([pos, p]), torch.cat([slots, s])
        cut = int(torch.searchsorted(pos, torch.tensor(end, dtype=torch.int64)))
        self._events = (pos[cut:], slots[cut:])
        return pos[:cut], slots[:cut]

    def _draw(self, chunks: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """``chunks`` chunks of :data:`EVENTS` entering columns of Algorithm L: ``W *= u^(1/k)`` per event, the next
        position ``+= floor(log u' / log(1 - W)) + 1``, the evicted slot uniform; ``u`` in (0, 1].

        Several chunks are drawn as one batch with the values of as many one-chunk draws, bit for bit: the
        generator's values are consumed in the same order (one (chunks, 3, EVENTS) draw), every operation is
        element-wise or a sum along one chunk, and each chunk starts from the W and the position the one before
        left, computed with the same float64 operations (tests/test_uan_reservoir.py). The first chunk is drawn
        alone: the W before the first event is drawn after its values."""
        k = self.capacity
        if self._log_w is None:
            chunks = 1
        u = 1.0 - torch.rand(chunks, 3, EVENTS, generator=self.generator, dtype=_F64)  # (0, 1]
        if self._log_w is None:  # W before the first event
            self._log_w = float(torch.log(1.0 - torch.rand(1, generator=self.generator, dtype=_F64)) / k)
        step = u[:, 0].log() / k
        cum = torch.cumsum(step, 1)
        first_w = []
        for total, last in zip(cum[:, -1].tolist(), step[:, -1].tolist()):  # log W after each chunk
            first_w.append(self._log_w)
            self._log_w = ((self._log_w + total) - last) + last
        log_w = torch.tensor(first_w, dtype=_F64)[:, None] + cum - step  # W at each event (before its own update)
        skip = torch.floor(u[:, 1].log() / torch.log1p(-log_w.exp())).clamp_(0, _MAX_SKIP)
        cum = torch.cumsum(skip + 1.0, 1)
        first_pos = []
        for total in cum[:, -1].tolist():  # the position after each chunk
            first_pos.append(self._last)
            self._last = self._last + total
        pos = torch.tensor(first_pos, dtype=_F64)[:, None] + cum
        slots = torch.floor(u[:, 2] * k).clamp_(max=k - 1).long()
        return pos.clamp_(max=float(1 << 62)).long().reshape(-1), slots.reshape(-1)

    def values(self, ordered: bool = True) -> torch.Tensor:
        """The kept columns, (C, n) with ``n = min(count, capacity)``, in stream order; (0, 0) before any block.
        ``ordered=False``: in the order of their slots, as a view of the reservoir's own storage (no copy; for a
        consumer to whom the order does not matter, such as EM, which sorts)."""
        if self._vals is None:
            return torch.empty(0, 0)
        if not ordered:
            return self._vals[:, : self._n]
        order = self._pos[: self._n].argsort()
        return self._vals[:, order.to(self._vals.device)]

    def positions(self) -> torch.Tensor:
        """The stream positions (0-based column indices over all blocks) of the kept columns, in stream order."""
        return self._pos[: self._n].sort().values

    def __len__(self) -> int:
        return self._n


def _last_per_slot(cols: torch.Tensor, slots: torch.Tensor, capacity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Of several columns of one block written to the same slot (in stream order), only the last survives."""
    if slots.numel() < 2:
        return cols, slots
    order = torch.arange(slots.numel())
    last = torch.full((capacity,), -1, dtype=torch.int64).scatter_reduce_(0, slots, order, "amax")
    keep = last[slots] == order
    return cols[keep], slots[keep]


def _gather(block: torch.Tensor, channel_dim: int, cols: torch.Tensor) -> torch.Tensor:
    """Columns ``cols`` (row-major positions over the dims other than ``channel_dim``) of ``block``, as a
    (C, P) matrix: one ``take`` at their flat indices in the contiguous block (``take`` of a strided view
    is many times slower)."""
    block = block.contiguous()
    shape, channel_dim = block.shape, channel_dim % block.dim()
    strides = [1] * block.dim()
    for d in range(block.dim() - 2, -1, -1):
        strides[d] = strides[d + 1] * shape[d + 1]
    flat, rest = torch.zeros_like(cols), cols
    for d in reversed([d for d in range(block.dim()) if d != channel_dim]):
        flat += (rest % shape[d]) * strides[d]
        rest = rest // shape[d]
    channels = torch.arange(shape[channel_dim], device=block.device) * strides[channel_dim]
    return torch.take(block, flat[None, :] + channels[:, None])
