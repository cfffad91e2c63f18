"""BatchNorm decomposed (Nachum et al., arXiv 2412.02843): BatchNorm = recentering + rescaling.

Two ablation variants, each replacing a BatchNorm1d/2d/3d with the same strength homotopy and exact start
as every normswap variant (strength 0 = the source BatchNorm exactly, 1 = the paper's ablation layer):

- ``recenter`` (:mod:`.recenter`): BatchNorm's recentering only, ``gamma (x - m) + beta``;
- ``rescale`` (:mod:`.rescale`): BatchNorm's rescaling only, ``gamma x / sqrt(E[x^2] + eps) + beta``.

Both use batch statistics in training mode (and update the running statistics as BatchNorm does) and
the running statistics in eval mode. Their shared plumbing is :mod:`.base`, the contract-suite models :mod:`.examples`. The batch-geometry
diagnostic that motivates them is ``normswap diagnose`` (docs/diagnose.md, docs/methods.md section 4).
"""

from normswap.variants.bn_decomposed.recenter import Recenter
from normswap.variants.bn_decomposed.rescale import Rescale

__all__ = ["Recenter", "Rescale"]
