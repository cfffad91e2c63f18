"""PatchNorm's strength-aware scale: a running mean of the patch norm keeps each layer's output scale as
``lam`` moves (normswap design; docs/methods.md section 0.2).

The corrected layer divides by ``s = sqrt(lam * n2 + 1)``. Pretrained activations have patch norms ``n2`` in
the tens to thousands, so already at ``lam = 0.01`` every layer shrinks its output several times, long before
training can react: a plain ramp of ``lam`` collapses a pretrained network (measured on MobileNetV2: the
distillation loss rose from 0.7 to 11 by ``lam = 0.02``). The layer therefore also multiplies by

    k(lam) = sqrt(lam * m + 1)                      # corrected form
    k(lam) = 1 / ((1 - lam) + lam * r / sqrt(m + eps))   # l2 / rms normaliser forms

where ``m`` is a running mean of ``n2`` per group (``n2_mean``, shape ``(groups,)``), kept like BatchNorm's
running statistics: calibration sets it from the calibration data, training mode updates it by an
exponential moving average (momentum 0.1, the first batch taken as is), eval mode freezes it. A sample whose
patch norm is the typical ``m`` then passes unchanged at every ``lam``; the others are rescaled by their
patch norm relative to the typical one, which is what the paper's correction does, up to a constant per
group. At ``lam = 0``, ``k = 1`` and the layer is still the source layer exactly; at ``lam = 1`` the
layer is the paper's with the constant ``k(1)`` absorbed in the gain. ``n2_mean = 0`` (a layer that has seen
no data) gives ``k = 1``: the layer behaves exactly as it did before the scale existed, which is also how a
file saved without these buffers loads.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["ScaleTracking"]

MOMENTUM = 0.1


class ScaleTracking:
    """Mixin of :class:`normswap.variants.patchnorm.PatchNorm`: the ``n2_mean`` / ``n2_batches`` buffers and
    the per-output-channel scale ``k(lam)``. The layer provides ``form``, ``eps``, ``_r`` and ``gain``."""

    form: str
    eps: float
    _r: float
    n2_mean: torch.Tensor
    n2_batches: torch.Tensor
    register_buffer: Any
    training: bool

    def _init_scale(self, groups: int, like: torch.Tensor) -> None:
        dtype = torch.promote_types(like.dtype, torch.float32)  # float32 statistics for half-precision layers
        self.register_buffer("n2_mean", torch.zeros(groups, dtype=dtype, device=like.device))
        self.register_buffer("n2_batches", torch.tensor(0, dtype=torch.long, device=like.device))

    @staticmethod
    def _group_means(n2: torch.Tensor, channels_last: bool) -> tuple[torch.Tensor, int]:
        """Per-group sum of ``n2`` (float64; reduced in ``n2``'s precision, float32 at least: the values are
        positive, nothing cancels, and no float64 copy of ``n2`` is made) and the count per group:
        ``(N, G, *S)`` or ``(..., 1)``."""
        n2 = n2.detach()
        group = n2.dim() - 1 if channels_last else 1
        dims = [d for d in range(n2.dim()) if d != group]
        total = n2.to(torch.promote_types(n2.dtype, torch.float32)).sum(dims).double()
        return total, n2.numel() // max(1, n2.shape[group])

    @torch.no_grad()
    def _track(self, n2: torch.Tensor, channels_last: bool) -> None:
        """Training mode: fold this batch's mean patch norm into ``n2_mean`` (EMA; the first batch as is)."""
        total, count = self._group_means(n2, channels_last)
        batch = (total / max(count, 1)).to(self.n2_mean.dtype)
        ok = torch.isfinite(batch)
        new = batch if int(self.n2_batches) == 0 else (1 - MOMENTUM) * self.n2_mean + MOMENTUM * batch
        self.n2_mean.copy_(torch.where(ok, new, self.n2_mean))
        self.n2_batches.add_(1)

    def scale(self, lam: torch.Tensor | float) -> torch.Tensor:
        """``k(lam)`` per group, shape ``(groups,)`` (see the module docstring)."""
        m = self.n2_mean
        lam = lam.to(m.dtype) if isinstance(lam, torch.Tensor) else lam
        if self.form == "corrected":
            return torch.sqrt(m * lam + 1)
        live = m > 0  # a layer that saw no data keeps k = 1
        k = 1 / ((1 - lam) + lam * self._r * torch.rsqrt(m + self.eps))
        return torch.where(live, k, torch.ones_like(k))

    def scale_per_output(self, lam: torch.Tensor | float) -> torch.Tensor:
        """``k(lam)`` expanded to one value per output channel / feature (in the gain's dtype)."""
        k = self.scale(lam)
        out = self.gain.shape[0]
        return k.repeat_interleave(out // k.shape[0]).to(self.gain.dtype)

    # ---- calibration: the exact mean over all calibration data replaces the running value --------
    @staticmethod
    def scale_accumulate(acc: dict, n2: torch.Tensor, channels_last: bool) -> None:
        total, count = ScaleTracking._group_means(n2, channels_last)
        acc["n2_sum"] = acc["n2_sum"] + total if "n2_sum" in acc else total
        acc["n2_count"] = acc.get("n2_count", 0) + count

    @torch.no_grad()
    def scale_from_calibration(self, acc: dict) -> None:
        """Write ``n2_mean`` from the accumulated sums (no data: no change)."""
        if not acc.get("n2_count"):
            return
        self.n2_mean.copy_((acc["n2_sum"] / acc["n2_count"]).to(self.n2_mean.dtype))
        self.n2_batches.fill_(max(int(self.n2_batches), 1))

    def _scale_compat(self, state_dict: dict, prefix: str, missing_keys: list[str]) -> None:
        """A file saved before the scale existed has no ``n2_mean`` / ``n2_batches``: load it as ``k = 1``."""
        for key in ("n2_mean", "n2_batches"):
            if prefix + key not in state_dict and prefix + key in missing_keys:
                missing_keys.remove(prefix + key)
                getattr(self, key).zero_()
