"""What ``recenter`` and ``rescale`` share: a BatchNorm's state, its batch/running statistics, the homotopy.

A subclass provides only :meth:`BNPart._normalise` (``x``, per-channel mean ``m`` and variance ``v`` in the
compute dtype, the strength ``s`` as a 0-d tensor -> the normalised ``x`` before the affine). At strength 0
the forward calls ``F.batch_norm`` itself (train and eval alike), so the layer is the source bit for bit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from normswap.errors import NormswapError
from normswap.core.plan import Site
from normswap.core.kinds import qualname
from normswap.variants.base import Variant
from normswap.variants.bn import copy_batchnorm_state
from normswap.variants.config import VariantConfig
from normswap.variants.strength import StrengthMirror

__all__ = ["BNPart"]

_BN_ADAPTERS = {f"torch.nn.modules.batchnorm.BatchNorm{d}d": "bn" for d in (1, 2, 3)}


class BNPart(StrengthMirror, Variant):
    """Base of the BatchNorm-decomposed ablations (not registered itself).

    State_dict keys: the source's ``weight``, ``bias`` (absent when ``affine=False``), ``running_mean``,
    ``running_var``, ``num_batches_tracked``, plus the scalar buffer ``strength``. Training mode uses batch
    statistics and updates the running ones exactly as the source BatchNorm would (momentum, or a cumulative
    average when ``momentum`` is None); eval mode uses the running statistics."""

    config_class = VariantConfig
    adapters = _BN_ADAPTERS
    families = (nn.modules.batchnorm._BatchNorm,)
    functional_kinds = ("norm",)


    @classmethod
    def classify(cls, module: nn.Module) -> tuple[str | None, str]:
        kind, reason = super().classify(module)
        if kind == "bn" and (not module.track_running_stats or module.running_mean is None):
            return None, f"{qualname(module)} has track_running_stats=False: no running statistics to start an exact copy from"
        return kind, reason

    @classmethod
    def from_site(cls, site: Site, module: nn.Module, absorbed: list[nn.Module]) -> "BNPart":
        if absorbed:
            raise NormswapError(f"site '{site.name}': variant '{cls.name}' absorbs no modules, got {len(absorbed)}")
        found, reason = cls.classify(module)
        if site.config.get("source_kind") != "bn" or found != "bn":
            why = reason or f"it is of kind {found!r}"
            raise NormswapError(f"site '{site.name}': the plan says source kind {site.config.get('source_kind')!r} "
                                f"but the module is {qualname(module)} ({why})")
        config = VariantConfig.from_dict(site.config)
        config.validate(cls.name)
        return cls(module, config.strength)

    def __init__(self, source: nn.modules.batchnorm._BatchNorm, strength: float = 0.0) -> None:
        super().__init__()
        self.num_features, self.eps, self.momentum = int(source.num_features), float(source.eps), source.momentum
        copy_batchnorm_state(self, source)
        self.init_strength(strength, like=self.running_mean)
        self.train(source.training)

    # ---- the homotopy ---------------------------------------------------------------------------
    def claims_exact(self) -> bool:
        return self._s == 0.0

    # ---- forward ----------------------------------------------------------------------------------
    def _average_factor(self) -> float:
        """BatchNorm's exponential average factor for this training step (counts the step)."""
        self.num_batches_tracked.add_(1)
        return 1.0 / float(self.num_batches_tracked) if self.momentum is None else float(self.momentum)

    def _batch_stats(self, xc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-channel mean and biased variance of ``xc`` (channels in dim 1); updates the running statistics."""
        dims = [0, *range(2, xc.dim())]
        v, m = torch.var_mean(xc, dim=dims, correction=0)
        n = xc.numel() // xc.shape[1]
        with torch.no_grad():
            factor = self._average_factor()
            unbiased = v * (n / max(n - 1, 1))
            self.running_mean.lerp_(m.to(self.running_mean.dtype), factor)
            self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)
        return m, v

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._s == 0.0:
            factor = self._average_factor() if self.training else 0.0
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, self.training,
                                factor, self.eps)
        cdt = torch.promote_types(x.dtype, torch.float32)
        xc = x.to(cdt)
        if self.training:
            m, v = self._batch_stats(xc)
        else:
            m, v = self.running_mean.to(cdt), self.running_var.to(cdt)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        y = self._normalise(xc, m.reshape(shape), v.reshape(shape), self.strength.to(cdt))
        if self.weight is not None:
            y = y * self.weight.to(cdt).reshape(shape)
        if self.bias is not None:
            y = y + self.bias.to(cdt).reshape(shape)
        return y.to(x.dtype)

    def _normalise(self, x: torch.Tensor, m: torch.Tensor, v: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, strength={self._s:g}, "
                f"affine={self.weight is not None}")
