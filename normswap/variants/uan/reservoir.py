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
    C * capacity values, and a block is never copied whole once the reservoir is full."""

    def __init__(self, capacity: int, generator: torch.Generator | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"reservoir capacity must be >= 1; got {capacity}")
        self.capacity = int(capacity)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(0)
        self.count = 0  # columns (values per channel) seen
        self._keys: torch.Tensor | None = None  # (n,) float64, CPU, descending
        self._vals: torch.Tensor | None = None  # (C, n)

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
        full = self._keys is not None and self._keys.numel() >= self.capacity
        idx = torch.nonzero(keys > self._keys[-1]).squeeze(1) if full else None  # only these can enter
        if idx is not None and idx.numel() == 0:
            return
        if idx is not None:
            keys = keys[idx]
        if keys.numel() > self.capacity:
            keys, top = keys.topk(self.capacity)
            idx = top if idx is None else idx[top]
        if idx is None:
            vals = view.reshape(m, c).t()
        else:  # the chosen columns' positions in the non-channel dims
            pos, flat = [], idx.to(block.device)
            for size in reversed(view.shape[:-1]):
                pos.append(flat % size)
                flat = flat // size
            vals = view[tuple(reversed(pos))].t()
        dtype = self._vals.dtype if self._vals is not None else torch.promote_types(block.dtype, torch.float32)
        vals = vals.to(dtype)
        if self._keys is not None:
            keys, vals = torch.cat([self._keys, keys]), torch.cat([self._vals, vals.to(self._vals.device)], dim=1)
        keys, order = keys.sort(descending=True)
        keys, order = keys[: self.capacity], order[: self.capacity]
        self._keys, self._vals = keys, vals[:, order.to(vals.device)].contiguous()

    def values(self) -> torch.Tensor:
        """The kept columns, (C, n) with ``n = min(count, capacity)``; (0, 0) before any block."""
        return self._vals if self._vals is not None else torch.empty(0, 0)

    def __len__(self) -> int:
        return 0 if self._keys is None else self._keys.numel()
