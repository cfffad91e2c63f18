"""Data from the user's own files: an image directory (``ImageFolder``) or a ``.safetensors`` file of tensors."""

from __future__ import annotations

import inspect
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from normswap.compat import import_torchvision
from normswap.data.base import DataSplit, LazyDataset, split_indices, train_test_indices
from normswap.data.preprocess import Preprocess, tv_weights
from normswap.errors import NormswapError

if TYPE_CHECKING:
    from normswap.sources import SourceSpec

TENSOR_KEYS = ("inputs", "labels")
PICKLE_SUFFIXES = (".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".bin")


# ----------------------------------------------------------------------------------------- image folders
def _norm(name: str) -> str:
    return name.strip().lower().replace("_", " ")


def _num_classes(model: nn.Module | None) -> int | None:
    if isinstance(getattr(model, "num_classes", None), int):
        return model.num_classes  # type: ignore[union-attr]
    last = [m for m in model.modules() if isinstance(m, nn.Linear)] if model is not None else []
    return last[-1].out_features if last else None


def folder_labels(classes: list[str], model: nn.Module | None, source: SourceSpec | None
                  ) -> tuple[dict[str, int] | None, str]:
    """Class folder name -> label in the model's class index space, and a note; ``None`` with the reason
    when the names cannot be mapped (the labels are then ignored).

    >>> folder_labels(["0", "7"], None, None)
    ({'0': 0, '7': 7}, 'labels from integer class folder names')
    """
    if all(re.fullmatch(r"\d+", c) for c in classes):
        return {c: int(c) for c in classes}, "labels from integer class folder names"
    if source is not None and source.kind == "torchvision":
        w = tv_weights(source)
        categories = w.meta.get("categories") or []
        index: dict[str, int] = {}
        for i, cat in enumerate(categories):
            index.setdefault(_norm(cat), i)
        if all(_norm(c) in index for c in classes):
            return {c: index[_norm(c)] for c in classes}, f"labels from the category names of {w.name}"
    if all(re.fullmatch(r"n\d{8}", c) for c in classes) and _num_classes(model) == 1000:
        try:
            import_torchvision()
            from timm.data import ImageNetInfo
            wnids = {w: i for i, w in enumerate(ImageNetInfo().label_names())}
        except ImportError:
            wnids = {}
        if wnids and all(c in wnids for c in classes):
            return {c: wnids[c] for c in classes}, "labels from ImageNet-1k synset folder names"
    shown = ", ".join(repr(c) for c in classes[:3]) + (", ..." if len(classes) > 3 else "")
    return None, (f"labels ignored: class folders ({shown}) are neither integers nor the model's category names")


def _scan_flat(root: Path) -> list[tuple[str, int]]:
    from torchvision.datasets.folder import IMG_EXTENSIONS
    return [(str(p), -1) for p in sorted(root.iterdir()) if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS]


def _load_image(path: str, pre: Preprocess) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError
    tf = import_torchvision().transforms.functional
    try:
        with Image.open(path) as img:
            img = img.convert("L" if pre.channels == 1 else "RGB")
    except (OSError, UnidentifiedImageError) as exc:
        raise NormswapError(f"cannot read image {path}: {exc}") from None
    mode = tf.InterpolationMode(pre.interpolation)
    img = tf.center_crop(tf.resize(img, pre.resize, interpolation=mode), list(pre.size))
    x = torch.from_numpy(np.array(img, dtype=np.float32, copy=True))
    x = x[None] if x.dim() == 2 else x.permute(2, 0, 1)
    return pre.normalize(x, max_value=255.0)


def _scan_classes(root: Path) -> tuple[list[tuple[str, str | None]], bool]:
    """Images under ``root`` as (path, class folder name or None), and whether there are class folders."""
    tv = import_torchvision()
    if not any(p.is_dir() and not p.name.startswith(".") for p in root.iterdir()):
        return [(p, None) for p, _ in _scan_flat(root)], False
    kwargs = {"allow_empty": True} if "allow_empty" in inspect.signature(tv.datasets.ImageFolder).parameters else {}
    try:
        folder = tv.datasets.ImageFolder(str(root), **kwargs)
    except FileNotFoundError as exc:
        raise NormswapError(f"image folder {root}: {exc}") from None
    return [(p, folder.classes[t]) for p, t in folder.samples], True


def _labelled(root: Path, model: nn.Module | None, source: SourceSpec | None
              ) -> tuple[dict[str, list[tuple[str, int]]], dict[str, int] | None, str]:
    """``{"train": samples, "val": samples}`` for ``DIR/train`` + ``DIR/val``, else ``{"all": samples}``; samples
    are (path, label or -1); with the class mapping (None: no labels) and a note on the labels."""
    subsets = {"train": root / "train", "val": root / "val"}
    if not all(d.is_dir() for d in subsets.values()):
        subsets = {"all": root}
    scanned = {k: _scan_classes(d) for k, d in subsets.items()}
    mapping, note = None, "no labels: images directly in the folder, no class folders"
    if all(has for _, has in scanned.values()):
        used = sorted({c for items, _ in scanned.values() for _, c in items if c is not None})
        mapping, note = folder_labels(used, model, source)
    samples = {k: [(p, mapping[c] if mapping and c is not None else -1) for p, c in items]
               for k, (items, _) in scanned.items()}
    return samples, mapping, note


def open_folder(root: Path, pre: Preprocess, model: nn.Module | None, source: SourceSpec | None, calib: int,
                evals: int, train: int, seed: int) -> DataSplit:
    """A directory of images: ``DIR/CLASS/IMAGE`` (``ImageFolder``) or a flat ``DIR/IMAGE`` (no labels), split by
    image (:func:`split_indices`); or ``DIR/train/`` + ``DIR/val/`` (each either layout): calibration and training
    from ``train/``, evaluation from ``val/`` (:func:`train_test_indices`)."""
    samples, mapping, note = _labelled(root, model, source)
    for key, items in samples.items():
        if not items:
            where = root if key == "all" else root / key
            raise NormswapError(f"image folder {where} holds no images (expected DIR/CLASS/IMAGE or DIR/IMAGE files "
                                "ending in .jpg, .jpeg, .png, .bmp, .webp, ...)")
    if "all" in samples:
        c_src = t_src = e_src = samples["all"]
        c_idx, e_idx, t_idx, how = split_indices(len(c_src), calib, evals, train, seed)
        count = f"{len(c_src)} images"
    else:
        c_src = t_src = samples["train"]
        e_src = samples["val"]
        c_idx, t_idx, e_idx, how = train_test_indices(len(c_src), len(e_src), calib, train, evals, seed)
        how = how.replace("train/test files", "train/ and val/ folders").replace("from train", "from train/")
        how = how.replace("from test", "from val/")
        count = f"{len(c_src)} images in train/, {len(e_src)} in val/"
    h, w = pre.size
    desc = (f"{root}: {count}, resize {pre.resize} + centre crop {h}x{w}, normalised with {pre.origin}; {note} "
            f"(seed {seed})")

    def part(src: list[tuple[str, int]], idx: torch.Tensor) -> LazyDataset:
        chosen = [src[i] for i in idx.tolist()]
        return LazyDataset(len(chosen), lambda i: (_load_image(chosen[i][0], pre), chosen[i][1]), idx.tolist())

    def names(src: list[tuple[str, int]], idx: torch.Tensor) -> list[str]:
        return [Path(src[i][0]).relative_to(root).as_posix() for i in idx.tolist()]

    return DataSplit(desc, False, mapping is not None, part(c_src, c_idx), part(e_src, e_idx), seed, how,
                     training=part(t_src, t_idx),
                     images={"calibration": names(c_src, c_idx), "training": names(t_src, t_idx),
                             "evaluation": names(e_src, e_idx)})


# ----------------------------------------------------------------------------------------- tensor files
def refuse_pickle(path: Path) -> NormswapError:
    """The error for a pickled data file (never unpickled)."""
    return NormswapError(f"data file {path} is a pickle: normswap never unpickles data; convert it to .safetensors "
                         "with tensors 'inputs' (N, ...) and optional 'labels' (N,) "
                         "(safetensors.torch.save_file({'inputs': x, 'labels': y}, 'data.safetensors'))")


def open_tensors(path: Path, calib: int, evals: int, train: int, seed: int) -> DataSplit:
    """A ``.safetensors`` file with ``inputs`` (N, ...) and optional integer ``labels`` (N,), used as they are;
    calibration, evaluation and training are disjoint slices of one seeded permutation (:func:`split_indices`)."""
    from safetensors.torch import load_file
    try:
        data = load_file(str(path), device="cpu")
    except Exception as exc:  # noqa: BLE001 - SafetensorError, OSError: not a safetensors file
        raise NormswapError(f"data file {path} is not a readable safetensors file ({str(exc).strip()[:120]})") from None
    extra = sorted(set(data) - set(TENSOR_KEYS))
    if extra:
        raise NormswapError(f"data file {path} has unexpected tensors {', '.join(extra)}: expected 'inputs' "
                            "(N, ...) and optionally 'labels' (N,)")
    if "inputs" not in data:
        raise NormswapError(f"data file {path} has no 'inputs' tensor: expected 'inputs' (N, ...) and optionally "
                            "'labels' (N,)")
    inputs, labels = data["inputs"], data.get("labels")
    if inputs.dim() < 1 or len(inputs) < 1:
        raise NormswapError(f"data file {path}: 'inputs' must be (N, ...) with N >= 1, got {tuple(inputs.shape)}")
    if labels is not None and (labels.dim() != 1 or len(labels) != len(inputs) or labels.is_floating_point()
                               or labels.is_complex() or labels.dtype == torch.bool):
        raise NormswapError(f"data file {path}: 'labels' must be integers shaped ({len(inputs)},), got "
                            f"{str(labels.dtype).replace('torch.', '')} {tuple(labels.shape)}")
    if inputs.is_floating_point():
        inputs = inputs.float()
    c_idx, e_idx, t_idx, how = split_indices(len(inputs), calib, evals, train, seed)
    shape = "x".join(map(str, inputs.shape[1:])) or "scalar"
    desc = (f"{path.name}: {len(inputs)} samples of {shape} {str(inputs.dtype).replace('torch.', '')} "
            f"(used as they are), {'labels' if labels is not None else 'no labels'} (seed {seed})")

    def part(idx: torch.Tensor) -> LazyDataset:
        order = idx.tolist()
        return LazyDataset(len(order), lambda i: (inputs[order[i]], -1 if labels is None else int(labels[order[i]])),
                           order)

    return DataSplit(desc, False, labels is not None, part(c_idx), part(e_idx), seed, how, training=part(t_idx))
