"""UAN calibration (docs/methods.md sections 3.3 and 3.4): collect a UAN layer's inputs, fit its mixture by EM.

:class:`UANCalibration` is a mixin of :class:`normswap.variants.uan.UAN` holding the calibration hooks:

- ``calibration_begin(settings)`` starts a :class:`normswap.variants.uan.em.Reservoir` of
  ``settings.em_samples`` values per channel, seeded from ``settings.seed`` and the layer's kind and
  shape (deterministic across runs; two layers of the same shape draw the same column positions, on
  different data).
- While calibrating, forward offers its input to the reservoir *before* normalising, and returns
  exactly what it would otherwise (the values are read, never written). Channel mode (BatchNorm
  sources, including timm BatchNormAct2d and FrozenBatchNorm2d): the values of each channel (dim 1).
  Sample mode (LayerNorm sources): the standardised values ``z = (x - mean) / sqrt(var + eps)`` over the
  normalised dims, all pooled into one row (the one set of components lives on that scale).
- ``calibration_end()`` fits ``k`` components per channel (:func:`normswap.variants.uan.em.fit_gmm`):
  initial variances ``running_var + eps`` (channel mode: "variances from the BN statistics") or 1
  (sample mode), ``var_floor``, and the settings' ``em_init`` / ``em_tol`` / ``em_max_iter`` / ``seed`` /
  ``reduce`` / ``broadcast`` (under torch.distributed every rank writes the same parameters). It writes
  ``mix_mean``, ``mix_var`` and ``mix_logit`` (the log-priors) in their dtype. No value seen on any
  rank: nothing changes.
- ``calibration_info()``: ``ll_gain`` (mean over channels of the per-value log-likelihood gain over
  K = 1, nats), ``ll_gain_min``, ``iterations`` (EM steps, warm start included), ``converged`` (1/0),
  ``values_per_channel`` (all ranks) and ``separation``: the median over channels of
  ``(max_k mu_k - min_k mu_k) / sqrt(running_var + eps)`` (channel mode) or of ``max - min`` on the z
  scale (sample mode).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any

import torch

from normswap.errors import NormswapError
from normswap.variants.calibration import CalibrationSettings
from normswap.variants.uan.em import Reservoir, fit_gmm

__all__ = ["UANCalibration"]


@dataclass
class _FitRequest:
    values: torch.Tensor  # (C, n)
    var_init: torch.Tensor | None
    options: dict
    batchable: bool


@dataclass
class _Collection:
    settings: CalibrationSettings
    reservoir: Reservoir


class UANCalibration:
    """Calibration hooks of UAN layers (see the module docstring). The host class provides ``kind``,
    ``k``, ``var_floor``, ``eps``, the ``mix_*`` parameters and, in channel mode, ``running_var``; in
    sample mode ``normalized_shape``."""

    _calib: _Collection | None = None
    _calib_info: dict[str, float] = {}  # replaced, never mutated

    def _channel_mode(self) -> bool:
        return self.mix_mean.dim() == 2  # (K, C) channel mode, (K,) sample mode

    def calibration_begin(self, settings: CalibrationSettings | None = None) -> None:
        settings = settings if settings is not None else CalibrationSettings()
        shape = self.num_features if self._channel_mode() else self.normalized_shape
        tag = zlib.crc32(f"uan:{self.kind}:{shape}:{self.k}".encode())
        gen = torch.Generator().manual_seed((int(settings.seed) * 0x9E3779B1 + tag) % (1 << 62))
        self._calib = _Collection(settings, Reservoir(int(settings.em_samples), gen))

    def _observe(self, x: torch.Tensor) -> None:
        """Offer a forward input (after ln2d's permute) to the reservoir; ``x`` itself is not touched."""
        with torch.no_grad():
            if self._channel_mode():
                self._calib.reservoir.add(x, channel_dim=1 if x.dim() > 1 else 0)
                return
            d = len(self.normalized_shape)
            dims = tuple(range(-d, 0))
            xf = x.detach().to(torch.promote_types(x.dtype, torch.float32))
            xc = xf - xf.mean(dim=dims, keepdim=True)
            z = xc * torch.rsqrt(xc.square().mean(dim=dims, keepdim=True) + self.eps)  # as _mixture's x_one
            self._calib.reservoir.add(z.reshape(1, -1))

    def calibration_abort(self) -> None:
        self._calib = None

    def calibration_end(self) -> None:
        request = self._fit_request()
        if request is not None:
            self._write_fit(_fit(request.values, self.k, request.var_init, request.options))

    @classmethod
    def calibration_end_many(cls, modules: list) -> None:
        """End several layers' calibration with one EM call per group of channel-mode layers that share
        ``k``, the options and the number of values (one process, quantile start: each channel's fit is
        then exactly the one it gets alone, :meth:`GMMFit.select`); the rest one at a time. One call
        over all channels instead of one per layer spends EM's per-step overhead once."""
        groups: dict[tuple, list] = {}
        for module in modules:
            request = module._fit_request()
            if request is None:
                continue
            key = (module.k, request.batchable, request.values.shape[1], request.values.dtype,
                   request.values.device, tuple(sorted(request.options.items())))
            groups.setdefault(key if request.batchable else (id(module),), []).append((module, request))
        for members in groups.values():
            values = torch.cat([r.values for _, r in members])
            var_init = None if members[0][1].var_init is None else torch.cat([r.var_init for _, r in members])
            fit = _fit(values, members[0][0].k, var_init, members[0][1].options)
            start = 0
            for module, request in members:
                rows = slice(start, start + request.values.shape[0])
                module._write_fit(fit.select(rows) if len(members) > 1 else fit)
                start = rows.stop

    def _fit_request(self) -> "_FitRequest | None":
        """Stop collecting; what EM needs (None: nothing seen on any rank, the layer keeps its parameters)."""
        col, self._calib = self._calib, None
        if col is None:
            return None
        s = col.settings
        channel = self._channel_mode()
        c = self.mix_mean.shape[1] if channel else 1
        values = col.reservoir.values(ordered=False)  # EM sorts each row: the order does not matter
        if values.numel() == 0:
            values = torch.empty(c, 0, device=self.mix_mean.device)
        if float(s.sum(torch.tensor([float(values.shape[1])], dtype=torch.float64, device=values.device))) == 0:
            return None
        var_init = (self.running_var.detach().double() + self.eps).sqrt().square() if channel else \
            torch.ones(1, dtype=torch.float64)
        options = {"init": s.em_init, "var_floor": self.var_floor, "tol": s.em_tol, "max_iter": s.em_max_iter,
                   "seed": s.seed, "reduce": s.reduce, "broadcast": s.broadcast}
        batchable = channel and s.reduce is None and s.broadcast is None and s.em_init == "quantile"
        return _FitRequest(values, var_init, options, batchable)

    def _write_fit(self, fit) -> None:
        """Write a fit's parameters and the figures of :meth:`calibration_info`."""
        with torch.no_grad():
            for param, value in ((self.mix_mean, fit.mean), (self.mix_var, fit.var), (self.mix_logit, fit.log_pi)):
                param.copy_(value.reshape(param.shape).to(device=param.device, dtype=param.dtype))
        spread = fit.mean.max(dim=0).values - fit.mean.min(dim=0).values
        if self._channel_mode():
            spread = spread / (self.running_var.detach().double() + self.eps).sqrt().to(spread.device)
        gain = fit.gain
        self._calib_info = {
            "ll_gain": float(gain.mean()),
            "ll_gain_min": float(gain.min()),
            "iterations": float(fit.iterations),
            "converged": 1.0 if fit.converged else 0.0,
            "values_per_channel": float(fit.n),
            "separation": float(spread.median()),
        }

    def calibration_info(self) -> dict[str, float]:
        return dict(self._calib_info)


def _fit(values: torch.Tensor, k: int, var_init: torch.Tensor | None, options: dict) -> Any:
    """:func:`fit_gmm`, with non-finite activations a one-line NormswapError instead of EM's ValueError."""
    try:
        return fit_gmm(values, k, var_init=var_init, overwrite=True, **options)  # values: the caller's own copy
    except ValueError as exc:
        if "NaN or infinite" not in str(exc):
            raise
        raise NormswapError(f"UAN calibration: {exc} at a converted layer's input (the model's activations are not "
                            "finite there: NaN or inf in its weights, or an overflow in its dtype)") from None
