"""The pieces every data source shares: :class:`DataSplit`, lazy datasets, seeded splits and per-item seeds."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal, Sequence

import torch
from torch.utils.data import Dataset

from normswap.errors import UsageError

__all__ = ["PARTS", "DataSplit", "LazyDataset", "RandomDataWarning", "item_generator", "seeded_split", "split_indices",
           "train_test_indices"]

Item = tuple[torch.Tensor, int]
Part = Literal["calibration", "training", "evaluation"]
PARTS: tuple[str, ...] = ("calibration", "training", "evaluation")
IMAGES_SHOWN = 500  # names per part in to_dict(); DataSplit.images keeps them all


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
    """A generator for item ``index`` of ``stream`` (``"calibration"`` / ``"training"`` / ``"evaluation"``, or any
    other name): independent draws per (seed, stream, index), so the parts never share a crop or a noise sample."""
    digest = hashlib.blake2b(f"normswap/{seed}/{stream}/{index}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest, "little") >> 1)


def split_indices(n: int, calib: int, evals: int, train: int, seed: int
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """Disjoint calibration / evaluation / training indices from one seeded permutation of ``range(n)``.

    Calibration takes the first ``calib`` items of the permutation, evaluation the next ``evals``, training
    up to ``train`` of the rest, so calibration and evaluation do not depend on ``train``. With fewer than
    ``calib + evals`` items those two parts shrink in proportion (each keeps at least one item when asked for
    one and ``n`` allows it) and training gets nothing.

    >>> c, e, t, how = split_indices(10, 4, 2, 100, seed=0)
    >>> len(c), len(e), len(t), set(c.tolist()) & set(e.tolist()) & set(t.tolist())
    (4, 2, 4, set())
    >>> how
    'seeded permutation: 4 calibration, 2 evaluation, 4 training (seed 0; training: the 4 items left of 100 asked)'
    """
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    notes = []
    if calib + evals > n:
        c = max(1, round(n * calib / (calib + evals))) if calib else 0
        if evals and n >= 2:
            c = min(c, n - 1)
        c, e = min(c, n), min(n - min(c, n), evals)
        notes.append(f"only {n} items, split {calib}:{evals} in proportion")
        calib, evals = c, e
    left = n - calib - evals
    if train > left:
        notes.append(f"training: the {left} items left of {train} asked")
        train = left
    counts = f"{calib} calibration, {evals} evaluation" + (f", {train} training" if train else "")
    how = f"seeded permutation: {counts} (seed {seed}{''.join('; ' + n for n in notes)})"
    return perm[:calib], perm[calib:calib + evals], perm[calib + evals:calib + evals + train], how


def seeded_split(n: int, calib: int, evals: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, str]:
    """:func:`split_indices` without a training part: disjoint calibration / evaluation indices, and how.

    >>> c, e, how = seeded_split(10, 4, 4, seed=0)
    >>> len(c), len(e), set(c.tolist()) & set(e.tolist())
    (4, 4, set())
    >>> seeded_split(6, 8, 4, seed=0)[2]
    'seeded permutation: 4 calibration, 2 evaluation (seed 0; only 6 items, split 8:4 in proportion)'
    """
    c, e, _, how = split_indices(n, calib, evals, 0, seed)
    return c, e, how


def train_test_indices(n_train: int, n_test: int, calib: int, train: int, evals: int, seed: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, str]:
    """Calibration, training and evaluation indices for data that comes as a train and a test (val) set:
    calibration and training from seeded permutations of the train set (they may overlap: both are seen
    data), evaluation from one of the test set. ``train`` is a cap.

    >>> c, t, e, how = train_test_indices(100, 20, 8, 1000, 30, seed=0)
    >>> len(c), len(t), len(e), how.split(": ")[1]
    (8, 100, 20, '8 calibration and 100 training from train, 20 evaluation from test (seeded permutations, seed 0)')
    """
    c_idx = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed))[:calib]
    e_idx = torch.randperm(n_test, generator=torch.Generator().manual_seed(seed + 1))[:evals]
    t_idx = torch.randperm(n_train, generator=torch.Generator().manual_seed(seed + 2))[:train]
    trained = f" and {len(t_idx)} training" if train else ""
    how = (f"train/test files: {len(c_idx)} calibration{trained} from train, {len(e_idx)} evaluation from test "
           f"(seeded permutations, seed {seed})")
    return c_idx, t_idx, e_idx, how


def _check_shard(batch_size: int, rank: int, world_size: int) -> None:
    if batch_size < 1:
        raise UsageError(f"batch size must be at least 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise UsageError(f"rank {rank} is not in 0..{world_size - 1} (world size {world_size})")


def _empty() -> LazyDataset:
    return LazyDataset(0, lambda i: (torch.empty(0), -1))


@dataclass
class DataSplit:
    """Calibration, evaluation and training data for one model, with what it is and how it was split.

    Items of every part are ``(x, y)``: ``x`` a float32 CPU tensor (one sample, no batch dimension), ``y`` an
    int label in the model's class index space, or -1 when there is none (``has_labels`` False).
    ``training`` is empty unless ``open_data(..., train_samples=N)`` asked for one; ``images`` names the
    source images each part is drawn from (image sources only: photo names, file paths, stamp paths).
    ``classes`` is the number of classes the labels come from when the data set fixes it (Fashion-MNIST's 10),
    so a report can tell labels that do not belong to the model's head.

    >>> import torch
    >>> from normswap.data import DataSplit, LazyDataset
    >>> ds = LazyDataset(5, lambda i: (torch.full((2,), float(i)), i))
    >>> split = DataSplit("demo", False, True, ds, LazyDataset(0, None), seed=0, split="by hand", training=ds)
    >>> [y.tolist() for _, y in split.batches("calibration", 2)]
    [[0, 1], [2, 3], [4]]
    >>> [x[:, 0].tolist() for x, _ in split.batches("calibration", 8, rank=1, world_size=2)]
    [[1.0, 3.0]]
    >>> [y.tolist() for _, y in split.train_batches(2, epoch=0)]
    [[4, 2], [0, 3]]
    """

    description: str
    synthetic: bool
    has_labels: bool
    calibration: Dataset
    evaluation: Dataset
    seed: int
    split: str
    training: Dataset = field(default_factory=_empty)
    images: dict[str, list[str]] = field(default_factory=dict)
    classes: int | None = None  # how many classes the labels come from, when the data set says (Fashion-MNIST: 10)

    @property
    def name(self) -> str:
        """The data's short name, as messages show it (``fashion-mnist``, ``x.safetensors``, ``stamps``)."""
        return self.description.split(": ", 1)[0]

    def _collate(self, data: Dataset, indices: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        items = [data[i] for i in indices]
        x = torch.stack([item[0] for item in items])
        y = torch.tensor([int(item[1]) for item in items], dtype=torch.long) if self.has_labels else None
        return x, y

    def batches(self, which: Part, batch_size: int = 32, *, rank: int = 0,
                world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Batches ``(x, labels)`` of ``which`` in index order; ``labels`` a long tensor, or None without labels.

        With ``world_size > 1`` rank ``r`` gets the items ``i`` with ``i % world_size == r``: the ranks'
        shards are disjoint and together cover the dataset.
        """
        if which not in PARTS:
            raise UsageError(f"unknown data part '{which}': expected 'calibration', 'training' or 'evaluation'")
        _check_shard(batch_size, rank, world_size)
        data = getattr(self, which)
        indices = range(rank, len(data), world_size)
        for start in range(0, len(indices), batch_size):
            yield self._collate(data, indices[start:start + batch_size])

    def train_steps(self, batch_size: int, world_size: int = 1) -> int:
        """Global batches per epoch of :meth:`train_batches`: ``len(training) // (batch_size * world_size)``."""
        return len(self.training) // max(1, batch_size * world_size)

    def train_batches(self, batch_size: int, *, epoch: int, rank: int = 0, world_size: int = 1,
                      start: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """One epoch of the training part, shuffled the same way on every rank, ``(x, labels)`` per step.

        The order is a permutation seeded by ``(seed, epoch)``. Global batch ``k`` is
        ``perm[k*B*W:(k+1)*B*W]`` (``B = batch_size`` per rank, ``W = world_size``) and rank ``r`` gets its
        slice ``[r*B:(r+1)*B]``, so W ranks with batch B see, step by step, what 1 rank with batch W*B sees.
        An incomplete last global batch is dropped. ``start`` skips the first ``start`` global batches
        without computing them (resuming mid-epoch). Raises :class:`UsageError` when the training part is
        empty or smaller than one global batch.
        """
        _check_shard(batch_size, rank, world_size)
        n, per_step = len(self.training), batch_size * world_size
        name = self.name
        if n == 0:
            raise UsageError(f"data '{name}' has no training part: pass train_samples >= {per_step} "
                             "(open_data(..., train_samples=N))")
        if n < per_step:
            raise UsageError(f"the training part of '{name}' has {n} items, fewer than one global batch of "
                             f"{per_step} ({batch_size} per rank x {world_size} rank(s))")
        if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
            raise UsageError(f"epoch must be an integer >= 0, got {epoch!r}")
        perm = torch.randperm(n, generator=item_generator(self.seed, "epoch", epoch)).tolist()
        for k in range(max(0, start), n // per_step):
            first = k * per_step + rank * batch_size
            yield self._collate(self.training, perm[first:first + batch_size])

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able summary (for reports and file metadata); ``images`` lists at most 500 names per part."""
        images = {part: names[:IMAGES_SHOWN] + ([f"... and {len(names) - IMAGES_SHOWN} more"]
                                                if len(names) > IMAGES_SHOWN else [])
                  for part, names in self.images.items()}
        return {"description": self.description, "synthetic": self.synthetic, "has_labels": self.has_labels,
                "sizes": {"calibration": len(self.calibration), "training": len(self.training),
                          "evaluation": len(self.evaluation)},
                "seed": self.seed, "split": self.split, "images": images}
