"""The calibration protocol a variant follows (the runner in ``normswap.calibration`` drives it).

Every variant has the :class:`CalibrationHooks`; the defaults collect nothing. In a calibration pass the
runner calls ``calibration_begin(settings)`` on each converted module, runs batches through the model
(the module observes its inputs in ``forward``), then ``calibration_end()`` (or ``calibration_end_many``
for all modules of one variant together), which writes the fitted statistics into registered buffers so
they land in the state_dict; ``calibration_abort()`` discards what was collected when an error interrupts.

A variant whose statistics are fitted against the *original* network's activations sets
``needs_targets = True`` and implements :class:`ObservesTargets`: the runner then visits its sites in
network order, feeds each module ``observe(x, y)`` (its input in the converted network and the original
network's output at the site's first compare point) and calls ``calibration_update()`` just before the
module runs in streaming mode, so later sites see the already-refitted earlier ones.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol, runtime_checkable

import torch

__all__ = ["CalibrationHooks", "CalibrationSettings", "ObservesTargets"]


@dataclass
class CalibrationSettings:
    """What the calibration runner passes to :meth:`Variant.calibration_begin`.

    ``strength``: the homotopy value the statistics are fitted for (PatchNorm's gains: the layer at
    ``lam = strength``); ``seed``: every random choice (subsampling, k-means++) derives from it;
    ``em_*``: UAN's EM (docs/methods.md section 3.3): values kept per channel, initialisation (``quantile`` or
    ``kmeans++``), log-likelihood tolerance per value, iteration cap; ``reduce``: sums a tensor over
    the workers of a torch.distributed job in place-free style (returns the sum; ``None`` = one
    process), ``broadcast``: returns rank 0's copy of a tensor (``None`` = one process). Variants apply
    them to their accumulated statistics in ``calibration_end`` so every rank writes the same values."""

    strength: float = 1.0
    seed: int = 0
    em_samples: int = 4096
    em_init: str = "quantile"
    em_tol: float = 1e-4
    em_max_iter: int = 100  # beyond ~100 steps EM gains < 0.002 nats/value, under the noise of 4096 values
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    broadcast: Callable[[torch.Tensor], torch.Tensor] | None = None

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the workers (``t`` itself in one process)."""
        return t if self.reduce is None else self.reduce(t)

    def from_rank0(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's value of ``t`` (``t`` itself in one process)."""
        return t if self.broadcast is None else self.broadcast(t)


class CalibrationHooks:
    """The calibration hooks every variant has (see the module docstring); the defaults collect nothing."""

    def calibration_begin(self, settings: CalibrationSettings | None = None) -> None:
        """Start collecting statistics in forward (``settings``: defaults when None)."""

    def calibration_end(self) -> None:
        """Stop collecting and write the fitted statistics into registered buffers."""

    @classmethod
    def calibration_end_many(cls, modules: list) -> None:
        """:meth:`calibration_end` for several layers of this variant, which a variant may fit together
        (UAN batches its EM); by default one at a time."""
        for module in modules:
            module.calibration_end()

    def calibration_abort(self) -> None:
        """Stop collecting and discard what was collected (an error interrupted calibration)."""

    def calibrated_state(self) -> list[str] | None:
        """The state_dict keys calibration may write, which the runner copies up front and restores if
        calibration fails; ``None`` (the default): the whole state_dict (PatchNorm names its gains, so its conv
        weights are not copied on every call)."""
        return None

    def calibration_info(self) -> dict[str, float]:
        """Figures about the last calibration for the fidelity report (UAN: ``ll_gain``, the mean
        per-value log-likelihood gain of the K-component fit over K = 1); empty by default."""
        return {}


@runtime_checkable
class ObservesTargets(Protocol):
    """What a ``needs_targets`` variant adds to :class:`CalibrationHooks` (module docstring)."""

    def collecting(self) -> bool:
        """True between ``calibration_begin`` and ``calibration_end``/``calibration_abort``."""

    def observe(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        """Accumulate the module's input ``x`` against the original network's output ``y`` at the site."""

    def calibration_update(self) -> None:
        """Solve from what has been observed so far and keep collecting."""
