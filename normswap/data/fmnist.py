"""``fashion-mnist``: the real Fashion-MNIST images (60k train, 10k test, 28x28 gray, labels 0-9), offline.

Lookup order for the files: the ``root`` argument, ``$NORMSWAP_DATA``, ``.cache/datasets`` under the current
directory and under the checkout that holds the package; in each, torchvision's layout
(``ROOT/FashionMNIST/raw/*-ubyte``, read by ``torchvision.datasets.FashionMNIST(download=False)``) or the
idx files themselves (plain or ``.gz``). Last, the Debian package's ``/usr/share/datasets/fashion-mnist/*.gz``.
Nothing is ever downloaded.
"""

from __future__ import annotations

import functools
import gzip
import os
from pathlib import Path

import numpy as np
import torch

from normswap.compat import import_torchvision
from normswap.data.base import DataSplit, LazyDataset, split_indices, train_test_indices
from normswap.data.preprocess import Preprocess, resize, to_channels
from normswap.errors import NormswapError

MEAN, STD = 0.2860, 0.3530
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
INSTALL_HINT = "install it with `bash scripts/setup.sh` or `apt-get install dataset-fashion-mnist`"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An idx file (MNIST format, plain or gzipped) as a uint8 array."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise NormswapError(f"{path} is not an idx file of unsigned bytes (corrupt or wrong file)")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * k:8 + 4 * k], "big") for k in range(ndim))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise NormswapError(f"{path} is truncated: {body.size} bytes for shape {shape}")
    return body.reshape(shape)


def _candidates(root: str | os.PathLike | None) -> list[Path]:
    dirs = [Path(root).expanduser()] if root is not None else []
    if os.environ.get("NORMSWAP_DATA"):
        dirs.append(Path(os.environ["NORMSWAP_DATA"]).expanduser())
    dirs += [Path.cwd() / ".cache" / "datasets", Path(__file__).resolve().parents[2] / ".cache" / "datasets"]
    return list(dict.fromkeys(dirs))


def _files_in(d: Path, part: str) -> tuple[Path, Path] | None:
    for suffix in ("", ".gz"):
        images, labels = (d / (name + suffix) for name in FILES[part])
        if images.is_file() and labels.is_file():
            return images, labels
    return None


def locate(part: str, root: str | os.PathLike | None = None) -> tuple[str, ...]:
    """Where ``part`` ("train" / "test") is: ``("torchvision", ROOT)`` or ``("idx", IMAGES, LABELS)``."""
    tried = []
    for d in _candidates(root):
        if all((d / "FashionMNIST" / "raw" / name).is_file() for name in FILES[part]):
            return "torchvision", str(d)
        for sub in (d, d / "FashionMNIST" / "raw"):
            found = _files_in(sub, part)
            if found:
                return "idx", str(found[0]), str(found[1])
        tried.append(str(d))
    found = _files_in(SYSTEM_DIR, part)
    if found:
        return "idx", str(found[0]), str(found[1])
    tried.append(str(SYSTEM_DIR))
    raise NormswapError(f"Fashion-MNIST not found (looked in {', '.join(tried)}): {INSTALL_HINT}")


@functools.lru_cache(maxsize=4)
def _read(part: str, where: tuple[str, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    if where[0] == "torchvision":
        ds = import_torchvision().datasets.FashionMNIST(where[1], train=part == "train", download=False)
        return ds.data, ds.targets.long()
    return torch.from_numpy(read_idx(where[1]).copy()), torch.from_numpy(read_idx(where[2]).astype(np.int64))


def load_fmnist(part: str, root: str | os.PathLike | None = None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """(images uint8 (N, 28, 28), labels long (N,), the folder read) for ``part`` "train" / "test"."""
    where = locate(part, root)
    images, labels = _read(part, where)
    if images.dim() != 3 or labels.shape != images.shape[:1]:
        raise NormswapError(f"Fashion-MNIST {part} files in {where[1]} do not fit together "
                            f"(images {tuple(images.shape)}, labels {tuple(labels.shape)})")
    folder = os.path.join(where[1], "FashionMNIST") if where[0] == "torchvision" else os.path.dirname(where[1])
    return images, labels, folder


def _fmt(values: tuple[float, ...]) -> str:
    return f"{values[0]:.4g}" if len(set(values)) == 1 else "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


def _item(images: torch.Tensor, labels: torch.Tensor, index: int, pre: Preprocess, size: tuple[int, int] | None
          ) -> tuple[torch.Tensor, int]:
    x = images[index][None].float()
    if size is not None:
        x = resize(x, size, pre.interpolation)
    return pre.normalize(to_channels(x, pre.channels), max_value=255.0), int(labels[index])


def open_fmnist(pre: Preprocess, size: tuple[int, int] | None, test_only: bool, calib: int, evals: int, train: int,
                seed: int, root: str | os.PathLike | None) -> DataSplit:
    """The ``fashion-mnist[:test]`` :class:`DataSplit`: ``pre`` gives mean/std/channels, ``size`` a resize (or None).

    ``fashion-mnist``: calibration and training from the train split (seeded permutations; they may overlap,
    both are seen data), evaluation from the test split. ``fashion-mnist:test``: all three from the test
    split, disjoint (:func:`split_indices`). ``train`` caps the training part."""
    test_x, test_y, where = load_fmnist("test", root)
    if test_only:
        c_idx, e_idx, t_idx, how = split_indices(len(test_x), calib, evals, train, seed)
        c_src = t_src = (test_x, test_y)
        split = f"test split only, {how}"
    else:
        train_x, train_y, _ = load_fmnist("train", root)
        c_src = t_src = (train_x, train_y)
        c_idx, t_idx, e_idx, split = train_test_indices(len(train_x), len(test_x), calib, train, evals, seed)
    h, w = size or (28, 28)
    shape = f"{pre.channels}x{h}x{w}" + (" (gray repeated)" if pre.channels == 3 else "")
    desc = (f"fashion-mnist{':test' if test_only else ''}: Fashion-MNIST from {where}, {shape}, "
            f"mean {_fmt(pre.mean)} std {_fmt(pre.std)}, labels 0-9 (seed {seed})")

    def part(src: tuple[torch.Tensor, torch.Tensor], idx: torch.Tensor) -> LazyDataset:
        order = idx.tolist()
        return LazyDataset(len(order), lambda i: _item(src[0], src[1], order[i], pre, size), order)

    return DataSplit(desc, False, True, part(c_src, c_idx), part((test_x, test_y), e_idx), seed, split,
                     training=part(t_src, t_idx), classes=10)
