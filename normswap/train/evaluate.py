"""Quick fidelity figures during and after fine-tuning: agreement with the original, logit cosine, KL, accuracy.

Each process measures its shard of the evaluation part and the sums are added over the workers, so every rank
gets the figures of the whole evaluation set.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from normswap.core import dist
from normswap.train.distill import logits_of

__all__ = ["Fidelity", "fidelity"]


@dataclass
class Fidelity:
    """Figures of one model against the original on held-out data (``accuracy`` None without labels)."""

    samples: int
    agreement: float
    cosine: float
    kl: float
    accuracy: float | None
    original_accuracy: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@torch.no_grad()
def fidelity(model: nn.Module, original: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]],
             device: torch.device | str = "cpu") -> Fidelity:
    """Evaluate ``model`` against ``original`` (both in eval mode for the duration; modes restored)."""
    modes = {m: m.training for m in [*model.modules(), *original.modules()]}
    sums = torch.zeros(6, dtype=torch.float64)  # n, agree, cos, kl, correct, orig_correct
    labelled = False
    try:
        model.eval()
        original.eval()
        for x, y in batches:
            x = x.to(device)
            s, t = logits_of(model(x)).float().flatten(1), logits_of(original(x)).float().flatten(1)
            sums[0] += s.shape[0]
            sums[1] += float((s.argmax(1) == t.argmax(1)).sum())
            sums[2] += float(F.cosine_similarity(s, t, dim=1).sum())
            sums[3] += float(F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), reduction="sum", log_target=True))
            if y is not None:
                labelled = True
                y = y.to(device)
                sums[4] += float((s.argmax(1) == y).sum())
                sums[5] += float((t.argmax(1) == y).sum())
    finally:
        for m, mode in modes.items():
            m.training = mode
    if dist.world().active:
        sums = dist.collectives()[0](sums)
        flag = dist.collectives()[0](torch.tensor([float(labelled)], dtype=torch.float64))
        labelled = bool(flag.item() > 0)
    n = max(float(sums[0]), 1.0)
    acc = float(sums[4]) / n if labelled else None
    orig = float(sums[5]) / n if labelled else None
    kl = max(float(sums[3]) / n, 0.0)  # rounding can leave -0.0 for identical outputs
    return Fidelity(int(sums[0]), float(sums[1]) / n, float(sums[2]) / n, kl, acc, orig)
