"""ANAct's statistics: training EMA with rejection, and exact full-data calibration (docs/methods.md section 2).

A mixin of :class:`normswap.variants.anact.ANAct`, split from ``anact.py`` to keep files small. It reads
the module's ``kind``, ``act_params``, ``per_channel``, ``channels``, ``momentum``, ``reject`` and the
buffers ``running_rho``, ``running_rho_prime``, ``running_mean``, ``num_batches_tracked``, and calls its
``scale()`` / ``shift()``. The statistics never depend on the strength: they describe ``f`` and its
input, so calibrating or training at strength 0 prepares the layer for strength 1.

Statistics (no gradient; computed in float32, or float64 for float64 inputs, stored in the buffers' dtype, the
model's) are one scalar per site, or per channel
(``per_channel``: dim 1, BN layout; buffers of shape (C,)).

- Training: the first batch (``num_batches_tracked == 0``) is taken as is, later ones by EMA
  ``new = momentum * old + (1 - momentum) * batch``; the output uses the updated values. Each statistic
  (and channel) is tested on its own: a rejected one keeps its running value, the others still update,
  and ``num_batches_tracked`` counts every batch. rho, rho' are rejected outside ``[1 - reject,
  1 + reject] x`` the running value (the paper's [0.8, 1.2]). The mean is signed and often near 0
  (tanh), where a ratio band would freeze it, so it is rejected when ``|batch - running| > reject *
  sqrt(E_batch[f^2])``, the same band on the scale of ``f`` (normswap design). Non-finite estimates (a
  constant input: Var = 0) are always rejected.
- Eval: frozen. Calibration: ``calibration_begin`` resets float64 accumulators, each forward adds to
  them, and ``calibration_end`` writes the exact full-data statistics (no EMA, no rejection).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from normswap.errors import NormswapError
from normswap.native import ops as native_ops
from normswap.variants.anact.activations import apply_activation, derivative, sum_over_ranks
from normswap.variants.calibration import CalibrationSettings


class ANActStatistics(nn.Module):
    """rho, rho', mu of one site: EMA in training, exact sums in calibration (module docstring)."""

    kind: str
    act_params: dict[str, Any]
    per_channel: bool
    channels: int | None
    momentum: float
    reject: float
    compensated: bool
    _calibrating: bool
    _acc: dict[str, Any] | None
    _settings: CalibrationSettings | None
    _folded: tuple[torch.Tensor, torch.Tensor] | None

    def _check_channels(self, x: torch.Tensor) -> None:
        """The one-line error for an input without :attr:`channels` channels in dim 1 (``per_channel`` only)."""
        if self.per_channel and (x.dim() < 2 or x.shape[1] != self.channels):
            raise NormswapError(f"ANAct per_channel expects {self.channels} channels in dim 1; "
                                f"got input of shape {tuple(x.shape)}")

    # ---- training ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def _update(self, x: torch.Tensor) -> None:
        """The batch's estimates from :func:`block_sums` (the calibration's sums: in cache-sized blocks, no
        full-size copy, transpose or squared tensor), then the EMA."""
        self._check_channels(x)
        _, sums, n = block_sums(self.kind, self.act_params, x.detach(), self.channels if self.per_channel else None,
                                None)
        sum_d, sum_d2, sum_f, sum_f2, sum_fp2 = (sums / n).unbind(0)
        var, f2 = sum_d2 - sum_d.square(), sum_f2
        self._update_running(f2 / var, sum_fp2, sum_f, f2)
        self.compensated = False

    @torch.no_grad()
    def _update_running(self, rho: torch.Tensor, rho_p: torch.Tensor, mean: torch.Tensor, f2: torch.Tensor) -> None:
        """EMA with per-statistic rejection (module docstring); ``f2 = E_batch[f^2]`` scales the mean's band."""
        first = self.num_batches_tracked == 0
        m, r = self.momentum, self.reject
        for buf, est in ((self.running_rho, rho), (self.running_rho_prime, rho_p), (self.running_mean, mean)):
            est = est.to(buf.dtype)
            if buf is self.running_mean:
                ok = (est - buf).abs() <= r * f2.to(buf.dtype).sqrt()
            else:
                ok = (est >= (1 - r) * buf) & (est <= (1 + r) * buf)
            ok = (ok | first) & torch.isfinite(est)
            new = torch.where(first, est, m * buf + (1 - m) * est)
            buf.copy_(torch.where(ok, new, buf))
        self.num_batches_tracked.add_(1)

    # ---- calibration ----------------------------------------------------------------------------------
    def calibration_begin(self, settings: CalibrationSettings | None = None) -> None:
        """Reset the accumulators; every forward until :meth:`calibration_end` adds to them. The current
        ``(c, mu)`` -- what folded consumers hold -- is kept for ``ANAct.after_calibration``.
        ``settings.reduce`` (torch.distributed) makes every rank write the statistics of all ranks' data."""
        with torch.no_grad():
            self._folded = (self.scale().detach().clone(), self.shift().detach().clone())
        self._calibrating, self._acc = True, None
        self._settings = settings or CalibrationSettings()

    def calibration_abort(self) -> None:
        self._calibrating, self._acc, self._folded = False, None, None

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        self._check_channels(x)
        xs = x.detach()
        acc = self._acc
        if acc is None:
            acc = self._acc = {"shift": None, "count": 0, "batches": 0}
        acc["shift"], sums, count = block_sums(self.kind, self.act_params, xs, self.channels if self.per_channel
                                               else None, acc["shift"])
        acc["sums"] = sums if "sums" not in acc else acc["sums"] + sums
        acc["count"] += count
        acc["batches"] += 1

    @torch.no_grad()
    def calibration_end(self) -> None:
        """Write rho, rho', mu from all calibration data (non-finite values keep the running ones)."""
        acc, self._calibrating, self._acc = self._acc, False, None
        if acc is not None and "sums" in acc:
            acc.update(zip(SUM_KEYS, acc.pop("sums")))
        if self._settings is not None and self._settings.reduce is not None:
            acc = sum_over_ranks(acc, self._settings, self.running_mean)
        if acc is None or acc["count"] == 0:
            return
        n = acc["count"]
        var = acc["sum_x2"] / n - (acc["sum_x"] / n).square()
        stats = (acc["sum_f2"] / n / var, acc["sum_fp2"] / n, acc["sum_f"] / n)
        for buf, est in zip((self.running_rho, self.running_rho_prime, self.running_mean), stats):
            buf.copy_(torch.where(torch.isfinite(est), est.to(buf), buf))
        self.num_batches_tracked.add_(acc["batches"])
        self.compensated = False


_STEP = ("relu", "relu6")  # f' is 0 or 1: f'^2 = f'
SUM_KEYS = ("sum_x", "sum_x2", "sum_f", "sum_f2", "sum_fp2")
BLOCK = 1 << 17  # values per block and CPU thread: a thread's share of a block stays in its L2 (fastest of 2^15..2^20)


def _blocks(x: torch.Tensor, channels: int | None) -> tuple[torch.Tensor, list[tuple[slice, torch.Tensor]], tuple]:
    """``(first values, [(channel slice, block)], reduced dims)``: ``x`` as ``(N, C, L)`` blocks of about
    :data:`BLOCK` values per thread (one block off the CPU), or flat blocks without ``channels``; ``first values``
    (the first sample's, ``(C, L)``, or the first :data:`BLOCK` values) set the shift of a first batch."""
    limit = BLOCK * torch.get_num_threads() if x.device.type == "cpu" else max(1, x.numel())
    if channels is None:
        flat = x.reshape(-1)
        blocks = [(slice(None), flat[i:i + limit]) for i in range(0, flat.numel(), limit)]
        return flat[:BLOCK], blocks, (0,)  # the shift does not depend on the thread count
    v = x.reshape(x.shape[0], channels, -1)
    per_sample = max(1, channels * v.shape[2])
    if per_sample <= limit:
        step = limit // per_sample
        blocks = [(slice(None), v[i:i + step]) for i in range(0, v.shape[0], step)]
    else:
        cb = max(1, limit // max(1, v.shape[2]))
        blocks = [(slice(j, j + cb), v[i:i + 1, j:j + cb]) for i in range(v.shape[0]) for j in range(0, channels, cb)]
    return v[0], blocks, (0, 2)


def block_sums(kind: str, params: dict[str, Any], x: torch.Tensor, channels: int | None,
               shift: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """ANAct's calibration sums of one batch: ``(shift, sums, count)`` with ``sums`` the float64 ``(5,)`` or
    ``(5, C)`` stack of :data:`SUM_KEYS` -- ``sum(x - shift)``, ``sum((x - shift)^2)``, ``sum f``, ``sum f^2``,
    ``sum f'^2`` over everything (or per channel of dim 1) -- and ``count`` the values per channel. ``shift`` (a
    first batch: the mean of its first values, rounded to the working dtype) keeps ``Var = E[d^2] - E[d]^2`` from
    cancelling. The work is in blocks that stay in cache, in float32 (float64 for float64 inputs) with float32
    cascade sums per block added up in float64: one read of ``x``, no full-size float64 copy. With the native
    kernels (normswap/native/csrc/calib_sums.cpp) the activations :data:`NATIVE_KINDS` of a contiguous float32 or
    float64 CPU tensor take one pass, every value and product summed in float64, the same at any thread count."""
    work = torch.promote_types(x.dtype, torch.float32)
    first, blocks, dims = _blocks(x, channels)
    if shift is None:
        mean = first.to(work).mean(-1).to(torch.float64)
        shift = mean.reshape(-1, 1) if channels is not None else mean.reshape(1)  # the layout sum_over_ranks reads
    count = x.numel() // channels if channels is not None else x.numel()
    native = _native_sums(kind, params, x, channels, shift)
    if native is not None:
        return shift, native if channels is not None else native.reshape(len(SUM_KEYS)), count
    sh = shift.to(work)
    shape = (len(SUM_KEYS),) + ((channels,) if channels is not None else ())
    total = torch.zeros(shape, dtype=torch.float64, device=x.device)
    for cs, b in blocks:
        b = b.to(work)
        d = b - (sh[cs] if channels is not None else sh.reshape(()))
        f, fp = apply_activation(kind, params, b), derivative(kind, params, b)
        if channels is None:  # squares as dot products: one read each, no squared copy written
            part = torch.stack([d.sum(), torch.dot(d, d), f.sum(), torch.dot(f, f),
                                fp.sum() if kind in _STEP else torch.dot(fp, fp)])
        else:
            part = torch.stack([d.sum(dims), d.square_().sum(dims), f.sum(dims), f.square_().sum(dims),
                                (fp if kind in _STEP else fp.square_()).sum(dims)])
        if channels is None:
            total += part
        else:
            total[:, cs] += part
    return shift, total, count


NATIVE_KINDS = {"relu": None, "relu6": None, "leaky_relu": "negative_slope", "hardswish": None, "hardsigmoid": None,
                "silu": None, "gelu": None, "gelu_tanh": None, "sigmoid": None, "tanh": None}  # kind: its parameter


def _native_sums(kind: str, params: dict[str, Any], x: torch.Tensor, channels: int | None,
                 shift: torch.Tensor) -> torch.Tensor | None:
    """:func:`block_sums`' ``(5, C)`` (``(5, 1)`` flat) float64 sums from the native kernel, or None where it does
    not apply (off or unbuilt, another activation, device or dtype, a strided tensor, tracing)."""
    if kind not in NATIVE_KINDS or not isinstance(x, torch.Tensor) or x.device.type != "cpu" \
            or x.dtype not in (torch.float32, torch.float64) or not x.is_contiguous() or x.numel() == 0 \
            or torch.compiler.is_compiling():
        return None
    o = native_ops()
    if o is None:
        return None
    name = NATIVE_KINDS[kind]
    return o.anact_sums(x, shift.reshape(-1), kind, float(params[name]) if name else 0.0,
                        channels if channels is not None else 0)
