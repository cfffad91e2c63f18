"""Calibration and evaluation data: a spec string -> a :class:`DataSplit` for one model.

Specs (``describe_specs()`` is the help text): ``stamps[:CATEGORY,...]`` (Tux Paint's object photographs
composited onto backgrounds, the default for 3-channel image classifiers when installed), ``photos`` (real
scikit-image photos as seeded random crops), ``fashion-mnist[:test]``, an image directory, a
``.safetensors`` file of ``inputs`` [+ ``labels``], ``synthetic[:SHAPE]`` (random noise, warned about).
Every :class:`DataSplit` has calibration, evaluation and (with ``train_samples``) training parts; evaluation
never shares a source image with the others. Images are preprocessed as the model's own weights say
(torchvision transforms, timm ``pretrained_cfg``) unless ``image_size`` / ``mean`` / ``std`` are given.
Nothing is downloaded and nothing is unpickled.

    >>> from normswap.data import open_data
    >>> data = open_data("photos", calib_samples=8, eval_samples=4, train_samples=16)
    >>> data.description
    'photos: 14 scikit-image photos, random resized crops 224px, normalised with ImageNet mean/std (seed 0)'
    >>> x, y = next(data.batches("calibration", batch_size=4))
    >>> tuple(x.shape), y
    ((4, 3, 224, 224), None)
    >>> data.images["evaluation"]
    ['hubble_deep_field', 'immunohistochemistry', 'coins', 'clock']
"""

from __future__ import annotations

import math
import os
import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import torch
from torch import nn

from normswap.data.base import (PARTS, DataSplit, LazyDataset, RandomDataWarning, item_generator, seeded_split,
                                 split_indices)
from normswap.data.preprocess import (Preprocess, fit_channels, in_channels, is_imagenet_style, model_preprocess)
from normswap.errors import OptionError, UsageError
from normswap.sources.inputs import example_input

if TYPE_CHECKING:
    from normswap.sources import SourceSpec

__all__ = ["DEFAULT_IMAGE_DATA", "FALLBACK_IMAGE_DATA", "PARTS", "DataSplit", "LazyDataset", "RandomDataWarning",
           "default_data_spec", "describe_specs", "open_data", "seeded_split", "split_indices"]

DEFAULT_IMAGE_DATA = "stamps"
FALLBACK_IMAGE_DATA = "photos"
FMNIST_ALIASES = ("fashion-mnist", "fashionmnist", "fmnist")
SYNTHETIC_MESSAGE = ("synthetic random inputs: calibration statistics fitted on noise are for smoke tests only, "
                     "not for real use")
_SPECS = (
    ("stamps[:CAT,...]", "about 440 object photographs from Debian's tuxpaint-stamps-default composited onto seeded "
                         "backgrounds, split by image, no labels; the default for 3-channel image classifiers"),
    ("photos", "14 real photos from scikit-image (offline): seeded random resized crops, split by photo, no labels; "
               "the default when the stamps are not installed"),
    ("fashion-mnist", "Fashion-MNIST (aliases fashionmnist, fmnist): calibration and training from the train split, "
                      "evaluation from the test split, labels 0-9"),
    ("fashion-mnist:test", "all parts from the test split, disjoint"),
    ("DIR", "a directory of images, DIR/CLASS/IMAGE (ImageFolder) or DIR/IMAGE, or DIR/train/ + DIR/val/; labels "
            "when the class folders are integers or the weights' category names"),
    ("FILE.safetensors", "tensors 'inputs' (N, ...) and optional integer 'labels' (N,), used as they are"),
    ("synthetic[:CxHxW]", "seeded standard-normal noise shaped like the model's input: smoke tests only (warns)"),
)


def describe_specs() -> str:
    """Help text: one line per accepted data spec.

    >>> print(describe_specs().splitlines()[3])
    fashion-mnist:test  all parts from the test split, disjoint
    """
    return "\n".join(f"{spec:<19} {text}" for spec, text in _SPECS)


def _accepted() -> str:
    return ("stamps, stamps:CATEGORY,..., photos, fashion-mnist, fashion-mnist:test (aliases fashionmnist, fmnist), "
            "synthetic, synthetic:CxHxW, a directory of images, or a .safetensors file")


def _image_default() -> str:
    """``stamps`` when installed, else ``photos`` with a one-line warning saying how to get the stamps."""
    from normswap.data.stamps import INSTALL_HINT, PACKAGE, available, stamps_dir
    if available():
        return DEFAULT_IMAGE_DATA
    warnings.warn(f"{PACKAGE} is not installed ({stamps_dir()} not found): using the 14 built-in photos instead "
                  f"of the stamps; {INSTALL_HINT}", UserWarning, stacklevel=3)
    return FALLBACK_IMAGE_DATA


def default_data_spec(model: nn.Module, source: SourceSpec | None = None) -> str | None:
    """``"stamps"`` for 3-channel image classifiers (``"photos"``, with a warning, when the stamps are not
    installed), else ``None`` (no built-in data fits; ask the user).

    Image classifiers: torchvision classification models (not detection, segmentation, video or optical
    flow), timm models taking 3 channels, or a model whose first convolution is a Conv2d on 3 channels.

    >>> default_data_spec(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()))
    'stamps'
    >>> default_data_spec(nn.Linear(4, 2)) is None
    True
    """
    if source is not None and source.kind == "torchvision":
        from normswap.compat import import_torchvision
        group = import_torchvision().models.get_model_builder(source.name).__module__
        if any(f".{g}." in group + "." for g in ("detection", "segmentation", "video", "optical_flow")):
            return None
        return _image_default()
    first = next((m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear,
                                                                   nn.Embedding))), None)
    if in_channels(model) == 3 and (isinstance(first, nn.Conv2d) or (source is not None and source.kind == "timm")):
        return _image_default()
    return None


def _check_counts(calib_samples: int, eval_samples: int, train_samples: int, seed: int) -> None:
    for name, value, least in (("calib_samples", calib_samples, 1), ("eval_samples", eval_samples, 0),
                               ("train_samples", train_samples, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise UsageError(f"{name} must be an integer >= {least}, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UsageError(f"seed must be an integer, got {seed!r}")


def _check_normalisation(mean: Sequence[float] | None, std: Sequence[float] | None) -> None:
    """Finite means and finite stds > 0 (a zero std divides by zero; NaN poisons every input)."""
    for name, values in (("mean", mean), ("std", std)):
        if values is None:
            continue
        try:
            vals = [float(v) for v in values]
        except (TypeError, ValueError):
            raise OptionError(f"{name} (--{name}) must be numbers; got {values!r}") from None
        bad = [v for v in vals if not math.isfinite(v) or (name == "std" and v <= 0)]
        if not vals or bad:
            need = "finite numbers > 0" if name == "std" else "finite numbers"
            raise OptionError(f"{name} (--{name}) must be {need}; got {', '.join(f'{v:g}' for v in vals) or 'nothing'}")


def _image_channels(spec: str, model: nn.Module | None) -> int:
    channels = in_channels(model) or 3
    if channels not in (1, 3):
        raise UsageError(f"data '{spec}' gives images, but the model takes {channels}-channel input: "
                         "pass a .safetensors file of inputs instead")
    return channels


def _synthetic(arg: str, model: nn.Module | None, source: SourceSpec | None, image_size: int | None,
               calib: int, evals: int, train: int, seed: int) -> DataSplit:
    if arg:
        if not re.fullmatch(r"[1-9]\d*(x[1-9]\d*)*", arg):
            raise UsageError(f"malformed synthetic shape '{arg}': expected positive sizes joined by x, "
                             "e.g. synthetic:3x224x224")
        shape = tuple(int(v) for v in arg.split("x"))
    else:
        probe = example_input(model, source) if model is not None else None
        tensors = [a for a in probe.args] + list(probe.kwargs.values()) if probe is not None else []
        if len(tensors) != 1 or not torch.is_tensor(tensors[0]) or not tensors[0].is_floating_point():
            raise UsageError("synthetic data cannot infer a float input shape for this model: give one, "
                             "e.g. synthetic:3x224x224")
        shape = tuple(tensors[0].shape[1:])
        if image_size is not None and len(shape) == 3:
            shape = (shape[0], int(image_size), int(image_size))
    warnings.warn(RandomDataWarning(SYNTHETIC_MESSAGE), stacklevel=3)
    text = "x".join(map(str, shape))

    def part(name: str, size: int) -> LazyDataset:
        return LazyDataset(size, lambda i: (torch.randn(shape, generator=item_generator(seed, name, i)), -1))

    counts = f"{calib} calibration" + (f", {train} training" if train else "") + f", {evals} evaluation"
    return DataSplit(f"synthetic: seeded standard-normal inputs {text}, no labels (random noise; seed {seed})",
                     True, False, part("calibration", calib), part("evaluation", evals), seed,
                     f"independent seeded samples: {counts} (seed {seed})", training=part("training", train))


def open_data(spec: str, model: nn.Module | None = None, source: SourceSpec | None = None, *,
              calib_samples: int = 256, eval_samples: int = 256, train_samples: int = 0, seed: int = 0,
              image_size: int | None = None,
              mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
              root: str | os.PathLike | None = None) -> DataSplit:
    """Open the data ``spec`` names (see :func:`describe_specs`), preprocessed for ``model`` / ``source``.

    Args:
        calib_samples: calibration items (>= 1); eval_samples: evaluation items (>= 0; 0 = no evaluation).
        train_samples: training items (>= 0; 0 = no training part). Generated sources (``stamps``, ``photos``,
            ``synthetic``) make exactly this many; finite collections (Fashion-MNIST, folders, tensor files)
            take at most this many (a large number takes all there is; ``split`` says how many).
        seed: seeds the split and every random crop; the same arguments always give the same items. Which
            source images or items are held out for evaluation depends on ``seed`` only, never on the counts.
        image_size, mean, std: override the model's own preprocessing (``image_size`` is the square side).
        root: where to look for Fashion-MNIST first (then ``$NORMSWAP_DATA``, ``.cache/datasets``).

    Raises :class:`~normswap.errors.UsageError` for an unknown spec or a missing path, and
    :class:`~normswap.errors.NormswapError` for data that cannot be read. ``synthetic`` issues a
    :class:`RandomDataWarning`.

    >>> import torch, warnings
    >>> from safetensors.torch import save_file
    >>> import tempfile, os
    >>> path = os.path.join(tempfile.mkdtemp(), "d.safetensors")
    >>> save_file({"inputs": torch.randn(10, 4), "labels": torch.arange(10)}, path)
    >>> data = open_data(path, calib_samples=6, eval_samples=4)
    >>> data.to_dict()["sizes"], data.has_labels
    ({'calibration': 6, 'training': 0, 'evaluation': 4}, True)
    """
    _check_counts(calib_samples, eval_samples, train_samples, seed)
    _check_normalisation(mean, std)
    text = str(spec).strip()
    name, _, arg = text.lower().partition(":")
    counts = (calib_samples, eval_samples, train_samples, seed)
    if text.lower() == "photos" or name == "stamps":
        pre = model_preprocess(model, source, image_size=image_size, mean=mean, std=std,
                               channels=_image_channels(text, model))
        if name == "stamps":
            from normswap.data.stamps import open_stamps
            return open_stamps(pre, arg, *counts)
        from normswap.data.photos import open_photos
        return open_photos(pre, *counts)
    if name in FMNIST_ALIASES and arg in ("", "test"):
        from normswap.data.fmnist import MEAN, STD, open_fmnist
        channels = 3 if in_channels(model) == 3 else 1
        size = None
        if image_size is not None or is_imagenet_style(model, source):
            size = model_preprocess(model, source, image_size=image_size).size
        origin = "given mean/std" if mean is not None and std is not None else "Fashion-MNIST mean/std"
        m = fit_channels(mean if mean is not None else (MEAN,), channels, "mean")
        s = fit_channels(std if std is not None else (STD,), channels, "std")
        pre = Preprocess(size or (28, 28), min(size or (28, 28)), m, s, channels, "bilinear", origin)
        return open_fmnist(pre, size, arg == "test", *counts, root)
    if name == "synthetic":
        return _synthetic(arg, model, source, image_size, *counts)
    path = Path(text).expanduser()
    if path.is_dir():
        from normswap.data.files import open_folder
        pre = model_preprocess(model, source, image_size=image_size, mean=mean, std=std,
                               channels=_image_channels(text, model))
        return open_folder(path, pre, model, source, *counts)
    if path.is_file():
        from normswap.data.files import PICKLE_SUFFIXES, open_tensors, refuse_pickle
        if path.suffix.lower() == ".safetensors":
            return open_tensors(path, *counts)
        if path.suffix.lower() in PICKLE_SUFFIXES:
            raise refuse_pickle(path)
        raise UsageError(f"unsupported data file {text}: expected a .safetensors file with 'inputs' [+ 'labels'] "
                         "or a directory of images")
    if "/" in text or os.sep in text or path.suffix or text.startswith(("~", ".")):
        raise UsageError(f"data path {text} not found (no such file or directory)")
    raise UsageError(f"unknown data spec '{text}': expected {_accepted()}")
