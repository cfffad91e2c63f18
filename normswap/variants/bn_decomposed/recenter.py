"""``recenter``: BatchNorm's recentering alone (Nachum et al., arXiv 2412.02843; docs/methods.md section 4).

Per channel, with ``m``, ``v`` the batch statistics in training mode and the running ones in eval mode, and
``s`` the strength::

    y = gamma * (x - m) * ((1 - s) / sqrt(v + eps) + s) + beta

``s = 0`` is the source BatchNorm (the forward then calls ``F.batch_norm``, bit-identical), ``s = 1`` is
recentering only, ``gamma (x - m) + beta``; in between the output is the straight line between the two.
"""

from __future__ import annotations

import torch
from torch import nn

from normswap.variants.bn_decomposed.base import BNPart
from normswap.variants.registry import register

__all__ = ["Recenter"]


@register
class Recenter(BNPart):
    """BatchNorm's recentering only, blended in from an exact copy of the BatchNorm (see the module docstring)."""

    name = "recenter"
    description = "BatchNorm's recentering only, no rescaling (Nachum et al. 2412.02843), from an exact BN copy"

    def _normalise(self, x: torch.Tensor, m: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return (x - m) * (torch.rsqrt(v + self.eps) * (1 - s) + s)

    @classmethod
    def examples(cls) -> list[tuple[nn.Module, torch.Tensor]]:
        from normswap.variants.bn_decomposed.examples import examples

        return examples()
