"""Probe inputs: a small, seeded batch to run a model on for verification and shape reports.

Image models take their input size from the weights' transforms (torchvision), ``pretrained_cfg``
(timm) or ``model.image_size``; Hugging Face models get token ids or pixel values from their config;
anything else is inferred from its first Conv / Linear / Embedding layer.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from normswap.compat import import_torchvision as _tv
from normswap.core.probe import ProbeInput

if TYPE_CHECKING:
    from normswap.sources import SourceSpec

__all__ = ["example_input", "image_size", "model_float"]


def image_size(model: nn.Module, source: SourceSpec | None) -> int | None:
    cfg = getattr(model, "pretrained_cfg", None)  # timm
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return int(cfg["input_size"][-1])
    size = getattr(model, "image_size", None)  # torchvision VisionTransformer
    if isinstance(size, int):
        return size
    if source is not None and source.kind == "torchvision":
        if "image_size" in source.kwargs:
            return int(source.kwargs["image_size"])
        enum = _tv().models.get_model_weights(source.name)
        w = enum[source.weights] if source.weights in enum.__members__ else enum.DEFAULT
        crop = getattr(w.transforms(), "crop_size", None)
        return int(crop[0]) if crop else 224
    return None


def model_float(model: nn.Module) -> tuple[torch.dtype, torch.device]:
    """The floating dtype and the device of ``model``'s first floating parameter or buffer (float32 on the CPU
    for a model with none): probes, statistics and tolerances follow them."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.dtype, t.device
    return torch.float32, torch.device("cpu")


def _like(value: object, dtype: torch.dtype, device: torch.device) -> object:
    if torch.is_tensor(value):
        return value.to(device=device, dtype=dtype if value.is_floating_point() else value.dtype)
    if isinstance(value, list):
        return [_like(v, dtype, device) for v in value]
    return value


def example_input(model: nn.Module, source: SourceSpec | None = None) -> ProbeInput | None:
    """A probe batch in ``model``'s floating dtype and on its device (:func:`model_float`); see :func:`_probe`."""
    probe = _probe(model, source)
    if probe is None:
        return None
    dtype, device = model_float(model)
    return ProbeInput(tuple(_like(a, dtype, device) for a in probe.args),
                      {k: _like(v, dtype, device) for k, v in probe.kwargs.items()})


def _probe(model: nn.Module, source: SourceSpec | None = None) -> ProbeInput | None:
    """A small, seeded probe batch (a :class:`ProbeInput`: ``args`` tuple, ``kwargs`` dict), or ``None``.

    Image models (torchvision, timm, ``model.image_size``): ``args=(x,)``, x (2, 3, S, S), S from the weights'
    crop size / timm ``pretrained_cfg`` / 224 (video (2, 3, 8, S, S); detection a list of two (3, S, S)).
    Hugging Face: ``kwargs`` ``input_ids`` (2, 16) + ``attention_mask``, or ``pixel_values``. Otherwise the
    first Conv1d/2d/3d, Linear or Embedding in ``model.modules()`` order decides: (2, C, 32[, 32[, 32]]),
    (2, in_features), or (2, 16) token ids.
    """
    g = torch.Generator().manual_seed(0)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_dict") and (source is None or source.kind == "hf"):
        if getattr(config, "vocab_size", None):
            ids = torch.randint(0, min(int(config.vocab_size), 1000), (2, 16), generator=g)
            kw = {"input_ids": ids, "attention_mask": torch.ones(2, 16, dtype=torch.long)}
            if getattr(config, "is_encoder_decoder", False):
                kw["decoder_input_ids"] = ids[:, :8].clone()
            return ProbeInput((), kw)
        if getattr(config, "image_size", None) and getattr(config, "num_channels", None):
            size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
            return ProbeInput((), {"pixel_values": torch.randn(2, config.num_channels, size, size, generator=g)})
    size = image_size(model, source)
    if size is not None:
        tv_source = source is not None and source.kind == "torchvision"
        group = _tv().models.get_model_builder(source.name).__module__ if tv_source else ""  # type: ignore[union-attr]
        if ".detection." in group:
            return ProbeInput(([torch.rand(3, size, size, generator=g) for _ in range(2)],))
        if ".video." in group:
            return ProbeInput((torch.randn(2, 3, 8, size, size, generator=g),))
        return ProbeInput((torch.randn(2, 3, size, size, generator=g),))
    for m in model.modules():
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return ProbeInput((torch.randn(2, m.in_channels, *([32] * len(m.kernel_size)), generator=g),))
        if isinstance(m, nn.Linear):
            return ProbeInput((torch.randn(2, m.in_features, generator=g),))
        if isinstance(m, nn.Embedding):
            return ProbeInput((torch.randint(0, min(m.num_embeddings, 1000), (2, 16), generator=g),))
    return None
