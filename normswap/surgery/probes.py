"""A smaller probe batch for verification: same batch, fewer pixels, where that checks the same claims.

Verification runs the original network once on the probe (and the converted one where the site-local proof does
not hold), so the probe's size sets most of the cost of ``convert``: a ResNet-50 forward on the inferred
(2, 3, 224, 224) probe is about 7x one on (2, 3, 32, 32) here (docs/speed.md, "Fourth pass"). Every exactness
claim checked is a claim about each site's function (a BatchNorm replaced by UAN at strength 0 is the same
per-channel map on any input), so a smaller input of the same kind checks the same claims, on fewer values.

When: only for a probe normswap inferred itself (never one the caller passed), one 4-D or 5-D floating image
tensor (``(N, C, H, W)`` or video ``(N, C, T, H, W)``) larger than :data:`SMALL` pixels on a side, and never for a
variant that calibrates on the probe (ANAct: the probe is its calibration batch, so its size is part of the
result). The batch stays as inferred (2: batch statistics are defined), the models run in eval mode as always.
The smaller probe is only a first try (:func:`normswap.surgery.verify.verify`): a model that does not run at that
size (a fixed input size, as ViTs have, or a stem that needs more pixels) or a site it does not reach sends the
check back to the full probe; a claim broken on the smaller probe is broken, and is reported as such. A site that
claims no exact start (strength above 0 without a proof) also sends the check to the full probe: the difference
it reports is a figure of the model's behaviour, which depends on the input's size.
"""

from __future__ import annotations

import torch

from normswap.core.probe import ProbeInput

__all__ = ["SMALL", "SMALL_VALUES", "is_small", "smaller_probe"]

SMALL = 32  # pixels on a side: what normswap already infers for a conv net of unknown input size
SMALL_VALUES = 2 * 4 * SMALL * SMALL  # the most values of a probe verification runs on one thread (is_small)


def _image(probe: ProbeInput | None) -> torch.Tensor | None:
    """The probe's one floating ``(N, C, H, W)`` or ``(N, C, T, H, W)`` image tensor, or None."""
    if probe is None or probe.kwargs or len(probe.args) != 1:
        return None
    x = probe.args[0]
    return x if torch.is_tensor(x) and x.is_floating_point() and x.dim() in (4, 5) else None


def is_small(probe: ProbeInput | None) -> bool:
    """Whether ``probe`` is an image batch of at most 2 samples and :data:`SMALL_VALUES` values (what normswap
    infers for a conv net, 2 x 3 x 32 x 32, or :func:`smaller_probe` makes): a forward on it is made of operations
    on a few thousand values each, which one torch thread runs faster than several (:mod:`normswap.core.threads`;
    docs/speed.md, "Seventh pass")."""
    x = _image(probe)
    return x is not None and x.shape[0] <= 2 and x.numel() <= SMALL_VALUES


def smaller_probe(probe: ProbeInput | None) -> ProbeInput | None:
    """``probe`` with its image's height and width cut to :data:`SMALL` (a new seeded batch of the same batch size,
    channels, dtype and device), or None where that does not apply (see the module docstring)."""
    x = _image(probe)
    if x is None or min(x.shape[-2:]) <= SMALL:
        return None
    shape = (*x.shape[:-2], SMALL, SMALL)
    small = torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device=x.device, dtype=x.dtype)
    return ProbeInput((small,), {})
