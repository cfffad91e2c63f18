"""``normswap.calibrate`` and ``normswap.evaluate``: data in, calibrated model and fidelity report out.

Orchestration only: the data comes from :mod:`normswap.data`, the fitting from
:mod:`normswap.calibration.runner`, the figures from :mod:`normswap.calibration.report`.
"""

from __future__ import annotations

import copy
import itertools
import os
import warnings
from collections import Counter
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from torch import nn

from normswap.api.conversion import META_ATTR, ConvertResult, load, save
from normswap.calibration.datacheck import check_batches, check_fits, class_mismatch, warn_mismatch
from normswap.calibration.report import FidelityReport, SiteFidelity, measure
from normswap.calibration.runner import CalibrationLog, run_calibration
from normswap.core import dist
from normswap.core.plan import Plan
from normswap.errors import NormswapError, OptionError, UsageError, WeightsError
from normswap.sources import SourceSpec, cached_weights, load_model
from normswap.surgery.verify import nonfinite_message, nonfinite_tensors
from normswap.variants.calibration import CalibrationSettings
from normswap.variants.strength import check_strength, set_strengths, strengths_of

__all__ = ["CalibrationConfig", "CalibrationResult", "calibrate", "check_data", "evaluate"]

EM_INITS = ("quantile", "kmeans++")


@dataclass(frozen=True)
class CalibrationConfig:
    """How :func:`calibrate` fits and reports; the defaults are the command line's.

    Attributes:
        calib_samples, eval_samples, batch_size, seed: the seeded calibration / held-out split.
        strength: the strength the statistics are fitted for (PatchNorm's gains); None = the model's
            strength, or 1 when it is at 0.
        strengths: strengths to report end to end (None = 0, the model's and 1).
        reestimate_bn: re-estimate the running statistics of the BatchNorms that were not converted.
        em_init, em_samples, em_tol: UAN's EM initialisation (``quantile`` or ``kmeans++``), values kept per
            channel, and stopping tolerance (mean log-likelihood gain per value and step, in nats).
        layerwise: PatchNorm's network order one layer at a time (exact, one pass per layer) instead of streaming.
    """

    calib_samples: int = 256
    eval_samples: int = 256
    batch_size: int = 32
    seed: int = 0
    strength: float | None = None
    strengths: tuple[float, ...] | None = None
    reestimate_bn: bool = False
    em_init: str = "quantile"
    em_samples: int = 4096
    em_tol: float = 1e-4
    layerwise: bool = False

    @classmethod
    def build(cls, base: "CalibrationConfig | None" = None, **changes: Any) -> "CalibrationConfig":
        """``base`` (default: the defaults) with ``changes``; an unknown name is an OptionError listing the known."""
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(changes) - set(names))
        if unknown:
            raise OptionError(f"unknown calibration setting {unknown[0]!r}; valid settings: {', '.join(names)}")
        if changes.get("strengths") is not None:
            changes["strengths"] = tuple(changes["strengths"])
        config = dataclasses.replace(base or cls(), **changes)
        config.validate()
        return config

    def validate(self) -> None:
        """Range checks, as one-line OptionErrors."""
        if self.em_init not in EM_INITS:
            raise OptionError(f"em_init must be one of {', '.join(EM_INITS)}; got {self.em_init!r}")
        if self.calib_samples < 1 or self.batch_size < 1 or self.em_samples < 2 or not self.em_tol > 0:
            raise OptionError("calib_samples and batch_size must be >= 1, em_samples >= 2 and em_tol > 0")


@dataclass
class CalibrationResult:
    """What :func:`calibrate` returns: the calibrated model (the one given, changed in place, or the loaded
    file's), its Plan and source, what the runner did, and the fidelity report (``None`` without evaluation)."""

    model: nn.Module
    plan: Plan
    log: CalibrationLog
    report: FidelityReport | None
    source: SourceSpec | None = None

    def save(self, path: str | os.PathLike, force: bool = False) -> Path:
        """Save the calibrated model as a self-describing ``.safetensors`` file (see ``normswap.save``)."""
        return save(self.model, path, plan=self.plan, source=self.source, force=force)


def _resolve(model: Any, base_model: nn.Module | None, trust_source: bool
             ) -> tuple[nn.Module, Plan, SourceSpec | None, nn.Module | None]:
    """``(converted model, plan, source, original if known)`` from a ConvertResult, a module or a file."""
    if isinstance(model, ConvertResult):
        return model.model, model.plan, model.source, model.original
    if isinstance(model, (str, os.PathLike)):
        model = load(model, base_model, trust_source=trust_source)
    if not isinstance(model, nn.Module):
        raise NormswapError(f"expected a converted model or a file path, got {type(model).__name__}")
    meta = getattr(model, META_ATTR, None) or {}
    if meta.get("plan") is None:
        raise NormswapError("this model carries no normswap plan: pass the result of normswap.convert or a saved file")
    return model, meta["plan"], meta.get("source"), None


def _reference(model: nn.Module, source: SourceSpec | None, original: nn.Module | None,
               trust_source: bool) -> tuple[nn.Module, str]:
    """The model to compare against: the original if known or reloadable, else this model at strength 0."""
    if original is not None:
        return original.eval(), "the original model"
    why = "no original weights recorded"
    if source is not None and source.kind == "torchvision" and not os.path.isabs(str(source.weights)) and \
            source.weights not in (None, "none", *cached_weights(source.name)):  # a file never makes normswap download
        why = f"the original's {source.weights} weights are not in torch's hub cache, and normswap does not download them"
    elif source is not None and source.weights not in (None, "none") and \
            (source.kind not in ("python", "file") or trust_source):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ref, _ = load_model(source, source.weights, allow_code=trust_source)
            return ref, f"the original model ({source.spec}, weights {os.path.basename(str(source.weights))})"
        except (WeightsError, NormswapError) as exc:
            why = f"could not reload the original: {exc}"
    elif source is not None and source.kind in ("python", "file") and source.weights not in (None, "none"):
        why = "the original comes from custom code (--trust-source reloads it)"
    ref = copy.deepcopy(model)
    set_strengths(ref, 0.0)
    return ref.eval(), f"this model at strength 0, i.e. the function it started from ({why})"


def _open(data: Any, model: nn.Module, source: SourceSpec | None, calib: int, evals: int, seed: int,
          data_options: dict[str, Any] | None) -> Any:
    from normswap.data import DataSplit, default_data_spec, open_data

    if isinstance(data, DataSplit):
        return data
    spec = data or default_data_spec(model, source)
    if spec is None:
        raise UsageError("no default calibration data for this model (the built-in photos are for 3-channel image "
                         "classifiers): pass --data (an image folder, fashion-mnist, a .safetensors file, ...)")
    return open_data(spec, model, source, calib_samples=calib, eval_samples=evals, seed=seed, **(data_options or {}))


def _strengths(model: nn.Module, given: Sequence[float] | None) -> tuple[float, list[float]]:
    """``(model strength, strengths to report)``: both ends (docs/methods.md section 0.1) and the model's own,
    unless given."""
    values = set(strengths_of(model).values())
    now = float(f"{max(values):.7g}") if values else 0.0  # float32 buffers: 0.1 reads back as 0.10000000149
    report = [check_strength(s) for s in given] if given else [0.0, now, 1.0]
    return now, sorted(set(report))


def calibrate(model: Any, data: Any = None, config: CalibrationConfig | None = None, *,
              original: nn.Module | None = None, evaluate: bool = True, progress: bool = False,
              trust_source: bool = False, base_model: nn.Module | None = None,
              data_options: dict[str, Any] | None = None, **settings: Any) -> CalibrationResult:
    """Calibrate a converted model on data and report its fidelity to the original.

    Args:
        model: a :class:`normswap.ConvertResult`, a converted module (changed in place), or a saved file.
        data: a data spec (``"photos"``, ``"fashion-mnist"``, an image folder, a ``.safetensors`` file;
            see :mod:`normswap.data`) or a :class:`normswap.data.DataSplit`; default: the built-in photos
            for image classifiers.
        original: the unconverted model to compare with and to fit PatchNorm's gains against (default: the
            ConvertResult's, else reloaded from the file's source, else this model at strength 0).
        config: a :class:`CalibrationConfig` (samples, batch size, seed, fitting strength, EM settings, ...).
        evaluate: also measure the fidelity report (before and after calibration) on the held-out part.
        data_options: ``image_size``, ``mean``, ``std``, ``root`` for :func:`normswap.data.open_data`.
        **settings: fields of :class:`CalibrationConfig` given one by one (``calib_samples=64``); they
            override ``config``.

    Example:
        >>> r = normswap.convert("mobilenet_v2", to="uan", weights="IMAGENET1K_V1")
        >>> c = normswap.calibrate(r, "photos", calib_samples=64, eval_samples=64)
        >>> c.report.row("after calibration", 0.0).agreement
        1.0
    """
    cfg = CalibrationConfig.build(config, **settings)
    module, the_plan, source, known = _resolve(model, base_model, trust_source)
    reference, ref_label = _reference(module, source, original if original is not None else known, trust_source)
    split = _open(data, reference, source, cfg.calib_samples, cfg.eval_samples if evaluate else 0, cfg.seed,
                  data_options)
    check_fits(reference, split, "calibration")  # inputs the model cannot take: one line before any work
    now, report_strengths = _strengths(module, cfg.strengths)
    fit = check_strength(cfg.strength) if cfg.strength is not None else (now if now > 0 else 1.0)
    if fit == 0:
        raise OptionError("the calibration strength must be > 0 (at 0 every variant is the original already)")
    fitting = CalibrationSettings(strength=fit, seed=cfg.seed, em_samples=cfg.em_samples, em_init=cfg.em_init,
                                  em_tol=cfg.em_tol)
    before = copy.deepcopy(module) if evaluate else None
    world = dist.world()
    batches = check_batches(split.batches("calibration", cfg.batch_size, rank=world.rank, world_size=world.size),
                            split.name, "calibration")
    log = run_calibration(module, the_plan, batches, reference=reference, settings=fitting,
                          reestimate_bn=cfg.reestimate_bn, layerwise=cfg.layerwise, progress=progress)
    report = None
    if evaluate and before is not None:
        models = {"before calibration": before, "after calibration": module}
        report = _report(reference, ref_label, models, the_plan, split, cfg.batch_size, report_strengths, fit, log,
                         progress)
    return CalibrationResult(module, the_plan, log, report, source)


def _report(reference: nn.Module, ref_label: str, models: dict[str, nn.Module], plan: Plan, split: Any,
            batch_size: int, strengths: list[float], site_strength: float, log: CalibrationLog | None,
            progress: bool = False) -> FidelityReport:
    data = split.to_dict()
    notes = []
    if getattr(split, "synthetic", False):
        notes.append("synthetic random inputs: these figures say nothing about real data")
    classes = check_fits(reference, split, "evaluation")
    mismatch = class_mismatch(split, classes)
    if mismatch:
        warn_mismatch(mismatch)
        notes.append(mismatch)
    batches = check_batches(split.batches("evaluation", batch_size), split.name, "evaluation", classes,
                            drop_labels=bool(mismatch))
    first = next(batches, None)  # streamed: one batch in memory at a time, whatever eval_samples is
    if first is None:
        raise UsageError("the evaluation split is empty: pass eval_samples >= 1 (--eval-samples)")
    counts: dict[str, int] = {}
    total = -(-len(split.evaluation) // batch_size) if hasattr(split, "evaluation") else None
    rows, per_site, orig_acc, n = measure(reference, models, plan, itertools.chain([first], batches), strengths,
                                          site_strength, progress, counts, total, notes)
    notes += nonfinite_notes(reference, rows, counts.get("reference_nonfinite", 0), n)
    labels = list(models)
    sites = []
    for s in plan.converted:
        first, last = per_site.get(labels[0], {}).get(s.name), per_site.get(labels[-1], {}).get(s.name)
        info = dict(log.sites.get(s.name, {})) if log else {}
        info.pop("variant", None)
        sites.append(SiteFidelity(s.name, s.variant, first if len(labels) > 1 else None, last, info))
    where = Counter(s.facts.get("exact_at", "not recorded") for s in plan.converted if s.variant == "anact")
    if where:
        notes.append("anact sites exact " + ", ".join(f"at {k}: {n}" if k != "not recorded" else f"{k}: {n}"
                                                     for k, n in sorted(where.items()))
                     + " (folded into their consumers: every strength; unfolded: strength 0 only)")
    return FidelityReport(data, ref_label, n, site_strength, rows, sites, orig_acc,
                          log.to_dict() if log else None, notes)


def nonfinite_notes(reference: nn.Module, rows: list, reference_bad: int, n: int) -> list[str]:
    """Report notes for NaN or infinite outputs: the reference's (naming its non-finite weights) and each row's."""
    notes = []
    if reference_bad:
        bad = nonfinite_tensors(reference)
        why = nonfinite_message(bad, "the reference's") if bad else "its weights are finite: the inputs or an " \
            "overflow in its dtype"
        notes.append(f"the reference's outputs hold NaN or inf on {reference_bad} of {n} samples, left out of every "
                     f"figure ({why})")
    for r in rows:
        if r.nonfinite:
            notes.append(f"'{r.model}' at strength {r.strength:g}: {r.nonfinite} of {n} outputs hold NaN or inf, left "
                         "out of that row's figures" + (" (no figure is defined)" if r.nonfinite >= n else ""))
    return notes


def evaluate(model: Any, data: Any = None, *, original: nn.Module | None = None, eval_samples: int = 256,
             batch_size: int = 32, seed: int = 0, strengths: Sequence[float] | None = None,
             trust_source: bool = False, base_model: nn.Module | None = None,
             data_options: dict[str, Any] | None = None, progress: bool = False) -> FidelityReport:
    """The fidelity report of a converted model on held-out data, without changing it (see :func:`calibrate`).

    Per-site errors are measured at the model's strength, or at 1 when it is at 0."""
    if eval_samples < 1:
        raise OptionError("eval_samples must be >= 1")
    module, the_plan, source, known = _resolve(model, base_model, trust_source)
    reference, ref_label = _reference(module, source, original if original is not None else known, trust_source)
    split = _open(data, reference, source, 1, eval_samples, seed, data_options)
    now, report_strengths = _strengths(module, strengths)
    return _report(reference, ref_label, {"converted": module}, the_plan, split, batch_size, report_strengths,
                   now if now > 0 else 1.0, None, progress)


def check_data(model: nn.Module, data: Any = None, *, source: SourceSpec | None = None, calib_samples: int = 256,
               eval_samples: int = 256, seed: int = 0, data_options: dict[str, Any] | None = None) -> Any:
    """Open ``data`` for ``model`` as :func:`calibrate` would and run one sample through it (what a dry run
    checks): the same one-line errors before any work. Returns the :class:`~normswap.data.DataSplit`."""
    split = _open(data, model, source, calib_samples, eval_samples, seed, data_options)
    check_fits(model, split, "calibration")
    return split
