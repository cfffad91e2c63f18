"""A seeded, uniform random subsample of the columns of a stream of (C, M) blocks, in bounded memory:
what UAN's calibration keeps of each layer's inputs for EM (:mod:`normswap.variants.uan.em`)."""

from __future__ import annotations

import torch

__all__ = ["Reservoir"]

_F64 = torch.float64


class Reservoir:
    """A uniform random subsample of up to ``capacity`` columns of a stream of (C, M) blocks.

    Every column seen gets a random key from ``generator`` (a CPU ``torch.Generator``); the columns
    with the ``capacity`` largest keys are kept, which is a uniform sample without replacement of all
    columns seen. Deterministic given the generator's seed and the sequence of block widths. Values are
    kept on the blocks' device in ``promote_types(dtype, float32)`` of the first block; memory is
    C * capacity values. A block costs its keys and one gather of the columns that enter (the kept
    columns live in fixed slots: an entering column overwrites the one it evicts, nothing else moves),
    so once the reservoir is full a block costs little more than drawing its keys."""

    def __init__(self, capacity: int, generator: torch.Generator | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"reservoir capacity must be >= 1; got {capacity}")
        self.capacity = int(capacity)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.count = 0  # columns (values per channel) seen
        self._n = 0  # slots filled
        self._keys = torch.empty(0, dtype=_F64)  # (capacity,) float64, CPU: slot j's key
        self._vals: torch.Tensor | None = None  # (C, capacity): slot j's column

    def add(self, block: torch.Tensor, channel_dim: int = 0) -> None:
        """Offer the columns of ``block``: a (C, M) matrix, or any tensor whose dim ``channel_dim`` holds
        the C channels (every position of the other dims, in row-major order, is a column: an
        (N, C, H, W) activation with ``channel_dim=1`` is offered without being copied)."""
        block = block.detach()
        if block.dim() < 1:
            raise ValueError("reservoir blocks need a channel dimension")
        view = block.movedim(channel_dim, -1)  # (..., C): a view
        c = view.shape[-1]
        if self._vals is not None and c != self._vals.shape[0]:
            raise ValueError(f"reservoir holds {self._vals.shape[0]} channels; got a block of {c}")
        m = view.numel() // c if c else 0
        if m == 0:
            return
        keys = torch.rand(m, generator=self.generator, dtype=_F64)
        self.count += m
        n, cap = self._n, self.capacity
        cand = None  # the block's columns that can enter (None: all of them)
        if n == cap:
            cand = torch.nonzero(keys > self._keys.min()).squeeze(1)
            if cand.numel() == 0:
                return
            keys = keys[cand]
        if keys.numel() > cap:  # more than the reservoir holds: only the block's largest keys can enter
            keys, top = keys.topk(cap)
            cand = top if cand is None else cand[top]
        merged = torch.cat([self._keys[:n], keys])
        if merged.numel() <= cap:
            slots, new = torch.arange(n, merged.numel()), torch.arange(keys.numel())
        else:
            win = torch.zeros(merged.numel(), dtype=torch.bool)
            win[merged.topk(cap).indices] = True
            new = torch.nonzero(win[n:]).squeeze(1)
            free = torch.arange(n, cap)  # empty slots first, then those of the evicted columns
            slots = torch.cat([free, torch.nonzero(~win[:n]).squeeze(1)])[: new.numel()]
        if new.numel() == 0:
            return
        cols = new if cand is None else cand[new]
        if self._vals is None:
            dtype = torch.promote_types(block.dtype, torch.float32)
            self._vals = torch.empty(c, cap, dtype=dtype, device=block.device)
            self._keys = torch.empty(cap, dtype=_F64)
        self._vals[:, slots.to(self._vals.device)] = _gather(block, channel_dim, cols.to(block.device)).to(self._vals)
        self._keys[slots] = keys[new]
        self._n = max(n, int(slots.max()) + 1)

    def values(self, ordered: bool = True) -> torch.Tensor:
        """The kept columns, (C, n) with ``n = min(count, capacity)``, in descending order of their keys;
        (0, 0) before any block. ``ordered=False``: in the order of their slots, as a view of the reservoir's
        own storage (no copy; for a consumer to whom the order does not matter, such as EM, which sorts)."""
        if self._vals is None:
            return torch.empty(0, 0)
        if not ordered:
            return self._vals[:, : self._n]
        order = self._keys[: self._n].argsort(descending=True, stable=True)
        return self._vals[:, order.to(self._vals.device)]

    def __len__(self) -> int:
        return self._n


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
