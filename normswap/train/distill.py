"""Distillation from the unconverted original: KL on logits, the label loss, and feature matching.

    loss = kl_weight * T^2 * KL(softmax(t / T) || softmax(s / T))      # t: the original's logits, s: the student's
         + label_weight * CE(s, labels)
         + feature_weight * mean over sites of ||f_s - f_t||^2 / (||f_t||^2 + eps)

The ``T^2`` factor keeps the KL gradient's scale independent of the temperature (Hinton et al., 2015). The
feature term compares each converted site's output with the original's at the same point (the site's compare
point, where its exact start is checked), normalised by the original's energy so every site counts alike.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from normswap.errors import NormswapError

__all__ = ["FeatureTap", "distill_loss", "feature_points", "logits_of"]


def logits_of(output: Any) -> torch.Tensor:
    """The logits tensor of a model output: a tensor, the first tensor of a tuple, or ``.logits``."""
    if torch.is_tensor(output):
        return output
    if hasattr(output, "logits") and torch.is_tensor(output.logits):
        return output.logits
    if isinstance(output, (tuple, list)) and output and torch.is_tensor(output[0]):
        return output[0]
    if isinstance(output, dict) and torch.is_tensor(output.get("logits")):
        return output["logits"]
    raise NormswapError(f"cannot find logits in the model's output ({type(output).__name__}): distillation needs "
                        "a tensor, a tuple starting with one, or an object with .logits")


def distill_loss(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor | None, cfg: Any,
                 features: list[tuple[torch.Tensor, torch.Tensor]] = ()) -> tuple[torch.Tensor, dict[str, float]]:
    """The weighted loss (a ``DistillSection``'s weights) and its parts as floats for the log."""
    s, t = student.float().flatten(0, -2), teacher.detach().float().flatten(0, -2)
    temp = float(cfg.temperature)
    total = s.new_zeros(())
    parts: dict[str, float] = {}
    if cfg.kl_weight > 0:
        kl = F.kl_div(F.log_softmax(s / temp, -1), F.log_softmax(t / temp, -1), reduction="batchmean",
                      log_target=True) * temp * temp
        total = total + cfg.kl_weight * kl
        parts["kl"] = float(kl.detach())
    if cfg.label_weight > 0:
        if labels is None:
            raise NormswapError("distill.label_weight > 0 needs labelled data, but this data has no labels: set "
                                "distill.label_weight: 0 or use labelled data")
        ce = F.cross_entropy(s, labels.to(s.device))
        total = total + cfg.label_weight * ce
        parts["ce"] = float(ce.detach())
    if cfg.feature_weight > 0 and features:
        terms = [(fs.float() - ft.detach().float()).square().mean() / (ft.detach().float().square().mean() + 1e-8)
                 for fs, ft in features]
        feat = torch.stack(terms).mean()
        total = total + cfg.feature_weight * feat
        parts["feature"] = float(feat.detach())
    parts["loss"] = float(total.detach())
    return total, parts


def feature_points(plan: Any) -> list[tuple[str, str]]:
    """``(original module, converted module)`` pairs to match: each converted site's compare points."""
    from normswap.variants import registry

    points: list[tuple[str, str]] = []
    for site in plan.converted:
        for pair in registry.get(site.variant).compare_points(site):
            if pair not in points:
                points.append(pair)
    return points


class FeatureTap:
    """Records the outputs of named modules of two models during one forward each (the pairs' order)."""

    def __init__(self, student: nn.Module, teacher: nn.Module, points: list[tuple[str, str]]) -> None:
        self.points = points
        self._student, self._teacher = student, teacher
        self.student_out: dict[str, torch.Tensor] = {}
        self.teacher_out: dict[str, torch.Tensor] = {}

    @contextmanager
    def recording(self) -> Iterator["FeatureTap"]:
        handles = []

        def keep(store: dict, name: str):
            def hook(_m: nn.Module, _a: Any, out: Any) -> None:
                if torch.is_tensor(out) and name not in store:
                    store[name] = out.clone()  # an in-place activation may follow the module
            return hook

        self.student_out, self.teacher_out = {}, {}
        try:
            for orig, conv in self.points:
                handles.append(self._teacher.get_submodule(orig).register_forward_hook(keep(self.teacher_out, orig)))
                handles.append(self._student.get_submodule(conv).register_forward_hook(keep(self.student_out, conv)))
            yield self
        finally:
            for h in handles:
                h.remove()

    def pairs(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(student, teacher)`` outputs recorded for every point both models reached, with equal shapes."""
        out = []
        for orig, conv in self.points:
            s, t = self.student_out.get(conv), self.teacher_out.get(orig)
            if s is not None and t is not None and s.shape == t.shape:
                out.append((s, t))
        return out
