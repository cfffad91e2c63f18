"""Data checked against the model before and while calibration and evaluation use it.

Inputs the model cannot take, NaN or infinite inputs and labels outside the model's classes are one
:class:`~normswap.errors.DataError` line naming the data (exit 1), found before any work where a single
sample shows it; a labelled data set whose classes are not the model's (Fashion-MNIST's 10 on a
1000-class ImageNet head) is warned about and its accuracy left out, instead of a meaningless "0.0 %".
"""

from __future__ import annotations

import warnings
from typing import Any, Iterable, Iterator

import torch
from torch import nn

from normswap.calibration.report import _first_tensor
from normswap.errors import DataError
from normswap.sources.weights import first_line

__all__ = ["check_batches", "check_finite", "check_fits", "class_mismatch", "warn_mismatch"]

Batch = tuple[torch.Tensor, "torch.Tensor | None"]


def _output_width(out: Any) -> int | None:
    logits = _first_tensor(out)
    return int(logits.shape[1]) if torch.is_tensor(logits) and logits.dim() == 2 else None


def check_finite(x: torch.Tensor, name: str, part: str, index: int = 0) -> None:
    """A DataError when the float tensor ``x`` (batch ``index`` of ``part``) holds NaN or infinite values."""
    if torch.is_tensor(x) and x.is_floating_point():
        bad = int((~torch.isfinite(x)).sum())
        if bad:
            raise DataError(f"data '{name}': {bad} NaN or infinite input value(s) in {part} batch {index + 1} "
                            "(calibration and evaluation need finite inputs)")


def check_fits(model: nn.Module, split: Any, part: str) -> int | None:
    """One sample of ``part`` through ``model`` (eval mode, no grad) before any work: a DataError naming the data
    when the model cannot take it. Returns the width of a 2-D output (the number of classes), else None."""
    x, _ = next(split.batches(part, 1), (None, None))
    if x is None:
        return None
    check_finite(x, split.name, part)
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.no_grad():
            out = model(x)
    except (RuntimeError, ValueError, TypeError, IndexError) as exc:
        raise DataError(f"data '{split.name}' does not fit the model: it fails on {part} inputs shaped "
                        f"{tuple(x.shape[1:])} per sample ({first_line(exc)})") from None
    finally:
        for m, mode in modes.items():
            m.training = mode
    return _output_width(out)


def class_mismatch(split: Any, classes: int | None) -> str | None:
    """Why the data's labels are not the model's classes (then accuracy is meaningless), or None."""
    if not getattr(split, "has_labels", False) or classes is None or split.classes is None:
        return None
    if split.classes != classes:
        return (f"accuracy not computed: the labels of '{split.name}' are {split.classes} classes, the model has "
                f"{classes} outputs (agreement with the original is still measured)")
    return None


def check_batches(batches: Iterable[Batch], name: str, part: str, classes: int | None = None,
                  drop_labels: bool = False) -> Iterator[Batch]:
    """``batches`` as they are, checked as they pass: finite inputs, labels in ``[0, classes)`` (a DataError
    otherwise); ``drop_labels`` yields no labels (a data set whose classes are not the model's)."""
    for i, (x, y) in enumerate(batches):
        check_finite(x, name, part, i)
        if y is not None and classes is not None and not drop_labels:
            out = y[(y < 0) | (y >= classes)]
            if out.numel():
                shown = ", ".join(str(v) for v in sorted(set(out.tolist()))[:5])
                raise DataError(f"data '{name}': label(s) {shown} lie outside the model's {classes} classes "
                                f"(0..{classes - 1}); the labels must index the model's outputs")
        yield x, (None if drop_labels else y)


def warn_mismatch(reason: str | None) -> None:
    """The class mismatch as a warning (the CLI shows one ``warning:`` line)."""
    if reason:
        warnings.warn(reason, UserWarning, stacklevel=3)
