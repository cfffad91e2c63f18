"""PatchNorm's gain calibration (docs/methods.md section 1.3.3): streaming per-channel least squares, a mixin
of the variant.

The layer at strength ``t`` is ``g * k(t) * w + base + t * o`` with ``g = 1 + t (a - 1)`` (see patchnorm.py)
and ``k`` the strength-aware scale (``_patch_scale.py``, whose patch-norm mean is set from the same data), so
fitting ``target - base ~ G * w + o`` per output channel by least squares gives ``g = G / k(t)``,
``a = (g - (1 - t)) / t`` and the offset ``o / t``. Sums are float64; under torch.distributed they are added over all workers
before the solve (``CalibrationSettings.reduce``), so every rank writes the same gains.
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Iterable

import torch

from normswap.core.threads import serial
from normswap.errors import NormswapError, OptionError
from normswap.native import ops as native_ops
from normswap.variants.calibration import CalibrationSettings

__all__ = ["GainCalibration", "fit_gain", "lsq_accumulate", "lsq_solve"]


class GainCalibration:
    """The calibration protocol with targets (:class:`normswap.variants.calibration.ObservesTargets`): the hooks of :class:`normswap.variants.patchnorm.PatchNorm` (``gain``, ``offset``,
    ``_calib`` and ``_calib_terms`` come from the layer; ``_conv_layout``: channels in dim 1)."""

    _conv_layout = False
    _calib: dict[str, Any] | None

    def calibration_begin(self, settings: CalibrationSettings | float | None = None) -> None:
        """Start fitting ``gain`` (and ``offset``) for the layer at ``settings.strength`` (or a plain float;
        default 1, the paper's layer). ``settings.reduce`` sums the statistics over distributed workers."""
        cfg = settings if isinstance(settings, CalibrationSettings) else CalibrationSettings(
            strength=1.0 if settings is None else float(settings))
        t = float(cfg.strength)
        if not 0.0 < t <= 1.0:
            raise OptionError(f"calibration strength must be in (0, 1]; got {t}")
        self._calib = {"t": t, "settings": cfg}

    def collecting(self) -> bool:
        """True between ``calibration_begin`` and ``calibration_end`` / ``calibration_abort``."""
        return self._calib is not None

    def observe(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """Accumulate one batch: input ``x`` and target ``y`` (default: the source layer's output on ``x``)."""
        if self._calib is None:
            raise NormswapError("observe() needs calibration_begin() first")
        t = self._calib["t"]
        with torch.no_grad():
            w, base, source, n2 = self._calib_terms(x, t, source=y is None)
            self._calib["last"] = (x, w, base)  # the forward on this x at strength t reuses them
            self.scale_accumulate(self._calib, n2, channels_last=not self._conv_layout)
            target = source if y is None else y
            self._calib["explicit"] = self._calib.get("explicit", False) or y is not None
            if target.shape != w.shape:
                raise NormswapError(f"calibration target has shape {tuple(target.shape)}, expected {tuple(w.shape)}")
            ch = 1 if self._conv_layout else w.dim() - 1
            lsq_accumulate(self._calib, w, target, ch, base)

    def reuse_observation(self, x: torch.Tensor) -> torch.Tensor | None:
        """The layer's output on ``x`` from the terms :meth:`observe` just computed on this same tensor, when
        the layer runs at the calibration strength in eval mode (the streaming calibration's forward right after
        its observe, and a layer observing its own input): ``g k(t) w + base + t o`` (``_calib_terms``) with the
        gains as they are now, one pass over ``w`` instead of the conv and ``n2`` a second time. ``None``
        otherwise (the terms are dropped either way)."""
        last = self._calib.pop("last", None) if self._calib is not None else None
        # the terms were computed at t itself: reused only where the layer's float32 lam is exactly t (1, 0.5, ...)
        if last is None or last[0] is not x or self.training or self._s != self._calib["t"] \
                or torch.is_grad_enabled():
            return None
        _, w, base = last
        g, off = self._blend()
        gk = (g * self.scale_per_output(self.lam)).to(w.dtype)
        shape = (-1,) + (1,) * (w.dim() - 2) if self._conv_layout else (-1,)
        out = w.mul_(gk.view(shape))
        out = out if base is None else out.add_(base)
        return out if off is None else out.add_(off.to(w.dtype).view(shape))

    def calibrated_state(self) -> list[str]:
        """The state_dict keys calibration writes (the runner restores only these after a failure)."""
        return ["gain", "n2_mean", "n2_batches"] + (["offset"] if self.offset is not None else [])

    def calibration_abort(self) -> None:
        self._calib = None

    def calibration_end(self) -> None:
        """Solve the per-channel least squares and write ``gain`` (and ``offset``); no data: no change.
        Under torch.distributed the sums are added over all workers first (every rank then writes the same)."""
        acc, self._calib = self._calib, None
        if not acc:
            return
        cfg: CalibrationSettings = acc["settings"]
        if cfg.reduce is not None:  # every rank takes part, with zeros where it saw no data
            zeros = torch.zeros(self.gain.shape[0], dtype=torch.float64, device=self.gain.device)
            for key in ("ww", "wr", "w", "r"):
                acc[key] = cfg.sum(acc.get(key, zeros))
            acc["n2_sum"] = cfg.sum(acc.get("n2_sum", torch.zeros_like(self.n2_mean, dtype=torch.float64)))
            counts = torch.tensor([float(acc.get("n", 0)), float(acc.get("n2_count", 0))], dtype=torch.float64)
            acc["n"], acc["n2_count"] = (int(v) for v in cfg.sum(counts).tolist())
        self._solve(acc)

    def calibration_update(self) -> None:
        """Write the gains solved from the data observed so far (this process only) and keep collecting: the
        calibration runner's streaming network order uses it so that later layers see this one calibrated."""
        if self._calib is not None:
            self._solve(self._calib)

    def _solve(self, acc: dict[str, Any]) -> None:
        if not acc.get("n"):
            return
        with serial() if self.gain.device.type == "cpu" else nullcontext():  # per-channel (normswap.core.threads)
            g, o, live = lsq_solve(acc, self.offset is not None)  # z = g * k(t) * w + o (+ base)
            t = acc["t"]
            self.scale_from_calibration(acc)
            g = g / self.scale_per_output(t).double()
            with torch.no_grad():
                self.gain.copy_(torch.where(live, (g - (1.0 - t)) / t, self.gain.double()).to(self.gain.dtype))
                if self.offset is not None:
                    self.offset.copy_(torch.where(live, o / t, self.offset.double()).to(self.offset.dtype))



def lsq_accumulate(acc: dict, w: torch.Tensor, r: torch.Tensor, ch: int, base: torch.Tensor | None = None) -> None:
    """Add one batch to the sums for fitting ``r - base ~ g * w + o`` per channel ``ch`` (float64 sums; ``base``
    broadcasts against ``r``: a per-channel bias, or full-size).

    With the native kernels (normswap/native/csrc/calib_sums.cpp), a contiguous float32/float64 CPU batch with its
    channels in dim 1 takes one pass: every value and product summed in float64, the same at any thread count.
    Otherwise the batch is reduced per channel in the activations' precision (float32 at least), centred on its own
    channel means so that nothing cancels, and only the per-channel results go to float64 (no float64 copy
    of a whole activation): ``sum w^2 = sum (w - mean w)^2 + n mean(w)^2`` and alike, added in float64."""
    n = w.numel() // w.shape[ch]
    native = _native_lsq(w, r, ch, base)
    if native is not None:
        sw, sr, sww, swr = native.unbind(0)
        for k, v in (("ww", sww), ("wr", swr), ("w", sw), ("r", sr)):
            acc[k] = acc[k] + v if k in acc else v
        acc["n"] = acc.get("n", 0) + n
        return
    if base is not None:
        r = r - base
    dims = [d for d in range(w.dim()) if d != ch]
    cdt = torch.promote_types(w.dtype, torch.float32)
    w, r = w.to(cdt), r.to(cdt)
    mw, mr = w.mean(dims, keepdim=True), r.mean(dims, keepdim=True)
    dw, dr = w - mw, r - mr  # the only two new activation-sized tensors; the products are taken in place
    sdw, sdr = dw.sum(dims).double(), dr.sum(dims).double()  # what the float32 means missed
    cwr = dr.mul_(dw).sum(dims).double() - sdw * sdr / n  # centred on the exact mean
    cww = dw.square_().sum(dims).double() - sdw * sdw / n
    mw, mr = mw.reshape(-1).double() + sdw / n, mr.reshape(-1).double() + sdr / n
    stats = {"ww": cww + n * mw * mw, "wr": cwr + n * mw * mr, "w": n * mw, "r": n * mr}
    for k, v in stats.items():
        acc[k] = acc[k] + v if k in acc else v
    acc["n"] = acc.get("n", 0) + n


def _native_lsq(w: torch.Tensor, r: torch.Tensor, ch: int, base: torch.Tensor | None) -> torch.Tensor | None:
    """:func:`lsq_accumulate`'s ``(4, C)`` sums (w, r, w^2, w r) from the native kernel, or None where it does not
    apply (off or unbuilt, channels not in dim 1, another device or dtype, strided or mismatched tensors)."""
    if ch != 1 or w.dim() < 2 or w.device.type != "cpu" or w.dtype not in (torch.float32, torch.float64) \
            or r.dtype != w.dtype or r.shape != w.shape or not (w.is_contiguous() and r.is_contiguous()) \
            or w.numel() == 0 or torch.compiler.is_compiling():
        return None
    if base is not None:
        lead = (1,) * (w.dim() - base.dim()) + tuple(base.shape)  # as it broadcasts against w
        if base.dim() <= w.dim() and base.numel() == w.shape[1] and lead[1] == w.shape[1]:
            base = base.reshape(-1)  # a per-channel bias: (C, 1, ...) or (1, C, 1, ...)
        elif base.shape != w.shape or base.dtype != w.dtype or not base.is_contiguous():
            return None
    o = native_ops()
    return None if o is None else o.lsq_sums(w, r, base)


def lsq_solve(acc: dict, with_offset: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(g, o, live)``: least-squares slope (and intercept, else 0); ``live`` is False for channels
    whose regressor was identically 0 (nothing to fit: the caller keeps their old values)."""
    n, ww, wr, sw, sr = float(acc["n"]), acc["ww"], acc["wr"], acc["w"], acc["r"]
    live = ww > 0
    g, o = wr / torch.where(live, ww, torch.ones_like(ww)), torch.zeros_like(ww)
    if with_offset:
        det = ww * n - sw * sw
        ok = live & (det > 1e-12 * ww * n)  # a constant regressor: the slope alone
        det = torch.where(ok, det, torch.ones_like(det))
        g = torch.where(ok, (wr * n - sw * sr) / det, g)
        o = torch.where(ok, (sr - g * sw) / n, o)
    return g, o, live


def fit_gain(module: Any, inputs: Iterable[torch.Tensor], targets: Iterable[torch.Tensor] | None = None,
             *, strength: float = 1.0) -> Any:
    """Fit one layer's ``gain`` (and ``offset``) from its input batches and, optionally, target batches
    (the original layer's outputs; default: the layer's own exact-start output). Returns ``module``."""
    module.calibration_begin(strength)
    try:
        if targets is None:
            for x in inputs:
                module.observe(x)
        else:
            for x, y in zip(inputs, targets, strict=True):
                module.observe(x, y)
    except BaseException:
        module._calib = None
        raise
    module.calibration_end()
    return module
