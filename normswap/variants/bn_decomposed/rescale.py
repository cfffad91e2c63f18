"""``rescale``: BatchNorm's rescaling alone (Nachum et al., arXiv 2412.02843; docs/methods.md section 4).

Per channel, with ``m``, ``v`` the batch statistics in training mode and the running ones in eval mode, and
``s`` the strength, the layer centres at ``c = (1 - s) m`` and divides by the root mean square around it,
``E[(x - c)^2] = v + (s m)^2``::

    y = gamma * (x - (1 - s) m) / sqrt(v + (s m)^2 + eps) + beta

``s = 0`` is the source BatchNorm (the forward then calls ``F.batch_norm``, bit-identical), ``s = 1`` is
rescaling only, ``gamma x / sqrt(E[x^2] + eps) + beta``: the second moment ``v + m^2`` replaces the variance
and nothing is subtracted.
"""

from __future__ import annotations

import torch
from torch import nn

from normswap.variants.bn_decomposed.base import BNPart
from normswap.variants.registry import register

__all__ = ["Rescale"]


@register
class Rescale(BNPart):
    """BatchNorm's rescaling only, blended in from an exact copy of the BatchNorm (see the module docstring)."""

    name = "rescale"
    description = "BatchNorm's rescaling only, no recentering (Nachum et al. 2412.02843), from an exact BN copy"

    def _normalise(self, x: torch.Tensor, m: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return (x - m * (1 - s)) * torch.rsqrt(v + (m * s).square() + self.eps)

    @classmethod
    def examples(cls) -> list[tuple[nn.Module, torch.Tensor]]:
        from normswap.variants.bn_decomposed.examples import examples

        return examples()
