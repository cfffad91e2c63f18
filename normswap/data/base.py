"""The pieces every data source shares: :class:`DataSplit`, lazy datasets, seeded splits and per-item seeds."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Literal

import torch
from torch.utils.data import Dataset

from normswap.errors import UsageError

__all__ = ["DataSplit", "LazyDataset", "RandomDataWarning", "item_generator", "seeded_split"]

Item = tuple[torch.Tensor, int]


class RandomDataWarning(UserWarning):
    """Issued whenever synthetic (random) data stands in for real data: statistics fitted on it mean nothing."""


class LazyDataset(Dataset):
    """``n`` items computed on demand by ``get(i) -> (x, y)``; the same index always gives the same item.

    ``indices``: for data drawn from a fixed collection (a file, a dataset split), the collection index of each
    item, so that a report can say which samples were used; ``None`` for generated data (crops, noise).
    """

    def __init__(self, n: int, get: Callable[[int], Item], indices: list[int] | None = None) -> None:
        self._n, self._get, self.indices = int(n), get, indices

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, i: int) -> Item:
        if not -self._n <= i < self._n:
            raise IndexError(f"index {i} out of range for {self._n} items")
        return self._get(i % self._n)


def item_generator(seed: int, stream: str, index: int) -> torch.Generator:
    """A generator for item ``index`` of ``stream`` (``"calibration"`` / ``"evaluation"``): independent draws
    per (seed, stream, index), so calibration and evaluation never share a crop or a noise sample."""
    digest = hashlib.blake2b(f"normswap/{seed}/{stream}/{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def seeded_split(n: int, calib: int, evals: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """Disjoint calibration / evaluation indices from a seeded permutation of ``range(n)``, and how it was made.

    With fewer than ``calib + evals`` items both parts shrink in proportion (each keeps at least one item
    when asked for one and ``n`` allows it).

    >>> c, e, how = seeded_split(10, 4, 4, seed=0)
    >>> len(c), len(e), set(c.tolist()) & set(e.tolist())
    (4, 4, set())
    >>> seeded_split(6, 8, 4, seed=0)[2]
    'seeded permutation: 4 calibration, 2 evaluation (seed 0; only 6 items, split 8:4 in proportion)'
    """
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    note = ""
    if calib + evals > n:
        c = max(1, round(n * calib / (calib + evals))) if calib else 0
        if evals and n >= 2:
            c = min(c, n - 1)
        c, e = min(c, n), min(n - min(c, n), evals)
        note = f"; only {n} items, split {calib}:{evals} in proportion"
        calib, evals = c, e
    how = f"seeded permutation: {calib} calibration, {evals} evaluation (seed {seed}{note})"
    return perm[:calib], perm[calib:calib + evals], how


@dataclass
class DataSplit:
    """Calibration and evaluation data for one model, with what it is and how it was split.

    Items of both datasets are ``(x, y)``: ``x`` a float32 CPU tensor (one sample, no batch dimension), ``y``
    an int label in the model's class index space, or -1 when there is none (``has_labels`` False).

    >>> import torch
    >>> from normswap.data import DataSplit, LazyDataset
    >>> ds = LazyDataset(5, lambda i: (torch.full((2,), float(i)), i))
    >>> split = DataSplit("demo", False, True, ds, LazyDataset(0, None), seed=0, split="by hand")
    >>> [y.tolist() for _, y in split.batches("calibration", 2)]
    [[0, 1], [2, 3], [4]]
    >>> [x[:, 0].tolist() for x, _ in split.batches("calibration", 8, rank=1, world_size=2)]
    [[1.0, 3.0]]
    """

    description: str
    synthetic: bool
    has_labels: bool
    calibration: Dataset
    evaluation: Dataset
    seed: int
    split: str

    def batches(self, which: Literal["calibration", "evaluation"], batch_size: int = 32, *, rank: int = 0,
                world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Batches ``(x, labels)`` of ``which`` in index order; ``labels`` a long tensor, or None without labels.

        With ``world_size > 1`` rank ``r`` gets the items ``i`` with ``i % world_size == r``: the ranks'
        shards are disjoint and together cover the dataset.
        """
        if which not in ("calibration", "evaluation"):
            raise UsageError(f"unknown data part '{which}': expected 'calibration' or 'evaluation'")
        if batch_size < 1:
            raise UsageError(f"batch size must be at least 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise UsageError(f"rank {rank} is not in 0..{world_size - 1} (world size {world_size})")
        data = getattr(self, which)
        indices = range(rank, len(data), world_size)
        for start in range(0, len(indices), batch_size):
            items = [data[i] for i in indices[start:start + batch_size]]
            x = torch.stack([item[0] for item in items])
            y = torch.tensor([int(item[1]) for item in items], dtype=torch.long) if self.has_labels else None
            yield x, y

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able summary (for reports and file metadata)."""
        return {"description": self.description, "synthetic": self.synthetic, "has_labels": self.has_labels,
                "sizes": {"calibration": len(self.calibration), "evaluation": len(self.evaluation)},
                "seed": self.seed, "split": self.split}
