"""How a model wants its images: size, resize, mean/std, channels, from its weights' own metadata.

Order: explicit arguments; a torchvision source's weights transforms (``weights="none"`` reads the enum's
``DEFAULT`` entry: metadata only, nothing is downloaded); timm's ``pretrained_cfg``; a Hugging Face
directory's ``preprocessor_config.json``; else ImageNet mean/std at the probe input's size (or 224).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from normswap.compat import import_torchvision
from normswap.errors import UsageError
from normswap.sources.inputs import example_input, image_size as model_image_size

if TYPE_CHECKING:
    from normswap.sources import SourceSpec

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_CROP_PCT = 0.875


@dataclass(frozen=True)
class Preprocess:
    """Image preprocessing: ``size`` (H, W) of the output, ``resize`` the shorter side before a centre crop,
    ``mean``/``std`` per channel, ``channels`` (1 or 3), ``interpolation``, and ``origin`` (where it came from)."""

    size: tuple[int, int]
    resize: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int
    interpolation: str
    origin: str

    def normalize(self, x: torch.Tensor, max_value: float = 1.0) -> torch.Tensor:
        """``x`` (C, H, W) float in [0, ``max_value``] -> ``(x / max_value - mean) / std``, float32, contiguous."""
        mean = torch.tensor(self.mean, dtype=torch.float64).view(-1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float64).view(-1, 1, 1)
        scale, shift = (1.0 / (max_value * std)).float(), (-mean / std).float()
        return torch.addcmul(shift, x.float(), scale).contiguous()


def tv_weights(source: SourceSpec) -> Any:
    """The torchvision weights entry a torchvision source names (``DEFAULT`` when none / random / a file)."""
    enum = import_torchvision().models.get_model_weights(source.name)
    return enum[source.weights] if source.weights in enum.__members__ else enum.DEFAULT


def is_imagenet_style(model: nn.Module | None, source: SourceSpec | None) -> bool:
    """torchvision / timm image models, or a model that states its own ``image_size`` / ``pretrained_cfg``."""
    if source is not None and source.kind in ("torchvision", "timm"):
        return True
    return model is not None and (isinstance(getattr(model, "pretrained_cfg", None), dict)
                                  or isinstance(getattr(model, "image_size", None), int))


def in_channels(model: nn.Module | None) -> int | None:
    """The input channels a model takes: timm ``pretrained_cfg``, hf ``config.num_channels``, or its first conv."""
    if model is None:
        return None
    cfg = getattr(model, "pretrained_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return int(cfg["input_size"][0])
    channels = getattr(getattr(model, "config", None), "num_channels", None)
    if isinstance(channels, int):
        return channels
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return int(m.in_channels)
        if isinstance(m, (nn.Linear, nn.Embedding)):
            return None
    return None


def _probe_size(model: nn.Module, source: SourceSpec | None) -> tuple[int, int] | None:
    probe = example_input(model, source)
    tensors = [a for a in (probe.args if probe else ()) if torch.is_tensor(a)]
    tensors += [v for k, v in (probe.kwargs if probe else {}).items() if k == "pixel_values"]
    if tensors and tensors[0].dim() == 4 and tensors[0].is_floating_point():
        return int(tensors[0].shape[-2]), int(tensors[0].shape[-1])
    return None


def fit_channels(values: Sequence[float], channels: int, what: str) -> tuple[float, ...]:
    vals = tuple(float(v) for v in values)
    if len(vals) == channels:
        return vals
    if len(vals) == 1:
        return vals * channels
    if channels == 1:
        return (sum(vals) / len(vals),)
    raise UsageError(f"{what} has {len(vals)} values but the images have {channels} channels")


def model_preprocess(model: nn.Module | None, source: SourceSpec | None, *, image_size: int | None = None,
                     mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                     channels: int | None = None) -> Preprocess:
    """The :class:`Preprocess` for ``model`` (explicit ``image_size``/``mean``/``std`` win).

    >>> p = model_preprocess(None, None)
    >>> p.size, p.resize, p.mean, p.origin
    ((224, 224), 256, (0.485, 0.456, 0.406), 'ImageNet mean/std')
    """
    origin, m, s, crop_pct, interp = "ImageNet mean/std", IMAGENET_MEAN, IMAGENET_STD, DEFAULT_CROP_PCT, "bilinear"
    size: tuple[int, int] | None = None
    resize: int | None = None
    cfg = getattr(model, "pretrained_cfg", None) if model is not None else None
    if source is not None and source.kind == "torchvision":
        w = tv_weights(source)
        tf = w.transforms()
        if getattr(tf, "mean", None) is not None:
            m, s = tuple(tf.mean), tuple(tf.std)
        crop, rs = getattr(tf, "crop_size", None), getattr(tf, "resize_size", None)
        if crop:
            size = (int(crop[0]), int(crop[-1]))
        if rs:
            resize = int(rs[0])
        if "image_size" in source.kwargs:
            size, resize = (int(source.kwargs["image_size"]),) * 2, None
        interp = str(getattr(getattr(tf, "interpolation", None), "value", interp))
        origin = f"torchvision {w.name} weights"
    elif isinstance(cfg, dict) and cfg.get("input_size"):
        m, s = tuple(cfg.get("mean", m)), tuple(cfg.get("std", s))
        size = (int(cfg["input_size"][-2]), int(cfg["input_size"][-1]))
        crop_pct = float(cfg.get("crop_pct") or crop_pct)
        interp = str(cfg.get("interpolation") or interp)
        origin = "timm pretrained_cfg"
    elif source is not None and source.kind == "hf":
        path = Path(source.name) / "preprocessor_config.json"
        if path.is_file():
            conf = json.loads(path.read_text())
            if conf.get("image_mean") and conf.get("image_std"):
                m, s, origin = tuple(conf["image_mean"]), tuple(conf["image_std"]), "hf preprocessor_config.json"
    if size is None and model is not None:
        side = model_image_size(model, source)
        size = (side, side) if side else _probe_size(model, source)
    if image_size is not None:
        if int(image_size) < 1:
            raise UsageError(f"image size must be at least 1, got {image_size}")
        size, resize = (int(image_size), int(image_size)), None
    size = size or (224, 224)
    if resize is None:
        resize = int(math.floor(min(size) / crop_pct))
    if mean is not None or std is not None:
        origin = "given mean/std" if mean is not None and std is not None else origin + " (partly overridden)"
    channels = channels or 3
    if interp not in ("bilinear", "bicubic", "nearest"):
        interp = "bilinear"
    return Preprocess(size, resize, fit_channels(mean if mean is not None else m, channels, "mean"),
                      fit_channels(std if std is not None else s, channels, "std"), channels, interp, origin)


def resize(x: torch.Tensor, size: tuple[int, int], interpolation: str = "bilinear") -> torch.Tensor:
    """Resize (C, H, W) float ``x`` to ``size`` (antialiased when shrinking, values kept in range)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    kw = {"antialias": True, "align_corners": False} if interpolation != "nearest" else {}
    out = F.interpolate(x[None], size=size, mode=interpolation, **kw)[0]
    return out.clamp(float(x.min()), float(x.max())) if interpolation == "bicubic" else out


def to_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """(1 or 3, H, W) -> ``channels`` channels: gray repeated to RGB, or RGB to luminance."""
    if x.shape[0] == channels:
        return x
    if x.shape[0] == 1 and channels == 3:
        return x.expand(3, -1, -1).contiguous()
    if x.shape[0] == 3 and channels == 1:
        return (0.299 * x[0:1] + 0.587 * x[1:2] + 0.114 * x[2:3])
    raise UsageError(f"cannot turn {x.shape[0]}-channel images into the {channels} channels the model takes")
