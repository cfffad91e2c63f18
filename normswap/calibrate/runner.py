"""The calibration runner: drive every converted module's calibration hooks over data batches.

For each converted site: ``calibration_begin()``, forward passes in eval mode under ``no_grad``,
``calibration_end()`` (statistics land in registered buffers), then the variant's
``after_calibration`` hook (ANAct refolds its compensation). On an error the hooks are aborted and
the model is left in the mode it was in: no half-collected statistics are written.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from normswap.surgery.plan import Plan
from normswap.surgery.verify import ProbeInput
from normswap.variants import registry
from normswap.variants.base import Variant


def calibrate(model: nn.Module, plan: Plan, batches: Iterable[ProbeInput], *, only_required: bool = False,
              progress: bool = False) -> int:
    """Calibrate ``model`` (converted by ``plan``) on ``batches``; returns the number of batches seen.

    Args:
        only_required: calibrate only the variants that need statistics for an exact start
            (``Variant.needs_calibration``), as ``convert`` does on its probe batch.
        progress: show a progress bar.
    """
    sites = []
    for site in plan.converted:
        cls = registry.get(site.variant)
        module = model.get_submodule(site.name)
        if isinstance(module, Variant) and (cls.needs_calibration or not only_required):
            sites.append((cls, site, module))
    if not sites:
        return 0
    modes = {m: m.training for m in model.modules()}
    seen = 0
    try:
        model.eval()
        for _, _, module in sites:
            module.calibration_begin()
        with torch.no_grad():
            for batch in tqdm(batches, desc="calibrating", unit="batch", disable=not progress):
                model(*batch.args, **batch.kwargs)
                seen += 1
    except BaseException:
        for _, _, module in sites:
            module.calibration_abort()
        raise
    finally:
        for m, mode in modes.items():
            m.training = mode
    for cls, site, module in sites:
        module.calibration_end()
        cls.after_calibration(model, site, module)
    return seen
