"""What every BatchNorm-replacing variant repeats: taking over the source's state, and example models whose
BatchNorms have non-trivial running statistics."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["copy_batchnorm_state", "settle_batchnorms"]


def copy_batchnorm_state(module: nn.Module, source: nn.Module, frozen: bool = False) -> None:
    """Register ``source``'s ``weight``/``bias`` (parameters, keeping ``requires_grad``; buffers when ``frozen``,
    as FrozenBatchNorm2d has them) and its ``running_mean``, ``running_var`` and ``num_batches_tracked`` (when it
    has one) on ``module``, cloned: the replacement keeps the source's state_dict keys."""
    for key in ("weight", "bias"):
        p = getattr(source, key)
        if frozen:
            module.register_buffer(key, p.detach().clone())
        else:
            module.register_parameter(
                key, None if p is None else nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
    module.register_buffer("running_mean", source.running_mean.detach().clone())
    module.register_buffer("running_var", source.running_var.detach().clone())
    nbt = getattr(source, "num_batches_tracked", None)
    if nbt is not None:
        module.register_buffer("num_batches_tracked", nbt.detach().clone())


def settle_batchnorms(model: nn.Module, x: torch.Tensor, steps: int = 4) -> nn.Module:
    """Give an example model's BatchNorms non-trivial running statistics (a few training batches of scaled and
    shifted ``x``), then eval mode: the variants' ``examples()`` use it so that exactness means something."""
    model.train()
    with torch.no_grad():
        for i in range(steps):
            model(x * (1.0 + 0.5 * i) + 0.3 * i)
    return model.eval()
