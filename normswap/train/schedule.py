"""Schedules as pure functions of the step: the strength ramp and the learning rate.

Both are recomputed from the step alone, so a resumed run needs no scheduler state: the checkpoint's step
is the whole position (docs/finetune.md).

Strength (docs/methods.md section 0): ``from`` before ``start``, ``to`` from ``start + span`` on, and in between

- ``linear``: ``from + (to - from) p`` with ``p`` the ramp's progress in [0, 1);
- ``cosine``: ``from + (to - from) (1 - cos(pi p)) / 2``;
- ``log``: log-spaced from ``max(from, log_min)`` to ``to`` (the strength at the ramp's first step is
  ``max(from, log_min)``): small strengths already change a pretrained network a lot (PatchNorm at 0.001
  moves a fifth of MobileNetV2's answers), so a log ramp spends as many steps in each decade;
- ``step``: a staircase, ``levels`` (or ``stages`` equal stairs ending at ``to``), each held for
  ``span / len(levels)`` steps.
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["lr_at", "stage_starts", "strength_at"]


def _levels(section: Any) -> list[float]:
    if section.levels:
        return [float(v) for v in section.levels]
    lo, hi, n = float(section.from_), float(section.to), int(section.stages)
    return [lo + (hi - lo) * (i + 1) / n for i in range(n)]


def strength_at(section: Any, step: int, total_steps: int) -> float:
    """The strength at optimizer step ``step`` (0-based) of a ``total_steps`` run (a :class:`StrengthSection`).

    >>> from normswap.recipe.schema import StrengthSection
    >>> s = StrengthSection(shape="linear", start=10, span=100)
    >>> strength_at(s, 0, 200), strength_at(s, 60, 200), strength_at(s, 110, 200)
    (0.0, 0.5, 1.0)
    >>> round(strength_at(StrengthSection(shape="log", span=3, log_min=0.01), 1, 10), 6)
    0.046416
    """
    lo, hi = float(section.from_), float(section.to)
    start, span = int(section.start), section.resolved_span(total_steps)
    if step < start:
        return lo
    if step >= start + span:
        return hi
    p = (step - start) / span
    if section.shape == "linear":
        return lo + (hi - lo) * p
    if section.shape == "cosine":
        return lo + (hi - lo) * (1 - math.cos(math.pi * p)) / 2
    if section.shape == "log":
        first = max(lo, float(section.log_min))
        if first >= hi:
            return hi
        return math.exp(math.log(first) + (math.log(hi) - math.log(first)) * p)
    levels = _levels(section)
    return levels[min(int(p * len(levels)), len(levels) - 1)]


def stage_starts(section: Any, total_steps: int) -> list[int]:
    """The steps where a ``step`` schedule enters a new stair (where ``calibrate.refit: stages`` refits);
    for the continuous shapes, the ramp's start and ``stages`` equally spaced points along it."""
    start, span = int(section.start), section.resolved_span(total_steps)
    n = len(_levels(section)) if section.shape == "step" else int(section.stages)
    points = [start + math.ceil(span * i / n) for i in range(n)]
    return sorted({p for p in points if p < total_steps})


def lr_at(section: Any, base_lr: float, step: int, total_steps: int) -> float:
    """The learning rate at ``step``: linear warm-up from 0 over ``warmup_steps``, then ``constant``,
    ``linear`` or ``cosine`` decay from ``base_lr`` to ``min_lr`` at the last step (a :class:`LrScheduleSection`).

    >>> from normswap.recipe.schema import LrScheduleSection
    >>> s = LrScheduleSection(shape="cosine", warmup_steps=10, min_lr=0.0)
    >>> lr_at(s, 1.0, 4, 110), lr_at(s, 1.0, 10, 110), round(lr_at(s, 1.0, 60, 110), 6)
    (0.5, 1.0, 0.5)
    """
    warm = int(section.warmup_steps)
    if step < warm:
        return base_lr * (step + 1) / warm
    floor = min(float(section.min_lr), base_lr)
    if section.shape == "constant":
        return base_lr
    rest = max(total_steps - warm, 1)
    p = min((step - warm) / rest, 1.0)
    if section.shape == "linear":
        return base_lr + (floor - base_lr) * p
    return floor + (base_lr - floor) * (1 + math.cos(math.pi * p)) / 2
