"""``normswap.diagnose``: models and data in, a :class:`~normswap.diagnostics.report.DiagnoseReport` out.

Orchestration only: models come from :mod:`normswap.sources` / :func:`normswap.load`, data from
:mod:`normswap.data`, the run from :mod:`normswap.diagnostics.run`, figures and files from
:mod:`normswap.diagnostics.report`.
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from normswap.diagnostics.report import DiagnoseReport, check_out_dir
from normswap.diagnostics.run import run_model
from normswap.errors import NormswapError, UsageError
from normswap.variants import Variant, check_strength

__all__ = ["diagnose"]

ModelLike = Any  # nn.Module | ConvertResult | str (a source spec or a .safetensors file)


def _resolve(model: ModelLike, weights: str | None, trust_source: bool) -> tuple[nn.Module, Any, str, Any]:
    """``(module, source, label, original)`` of a module, ConvertResult, saved file or source spec."""
    from normswap.api.conversion import META_ATTR, ConvertResult, load
    from normswap.sources import load_model

    if isinstance(model, ConvertResult):
        to = model.plan.variant
        return model.model, model.source, f"{model.source.spec if model.source else 'model'} -> {to}", model.original
    if isinstance(model, nn.Module):
        meta = getattr(model, META_ATTR, None) or {}
        return model, meta.get("source"), type(model).__name__, None
    if isinstance(model, (str, os.PathLike)):
        text = str(model)
        if text.endswith(".safetensors") and Path(text).is_file():
            module = load(text, trust_source=trust_source)
            return module, getattr(module, META_ATTR)["source"], Path(text).stem, None
        if text.endswith(".safetensors"):
            raise UsageError(f"no such file: {text}")
        module, source = load_model(text, weights)
        return module, source, text, None
    raise NormswapError(f"expected an nn.Module, a ConvertResult, a model name or a .safetensors file; "
                        f"got {type(model).__name__}")


def _batches(data: Any, model: nn.Module, source: Any, samples: int, batch_size: int, seed: int,
             data_options: dict[str, Any] | None) -> tuple[list[tuple[torch.Tensor, Any]], str, bool, list[str]]:
    """The batches (kept: every model sees the same ones), their description, whether they have labels, notes."""
    from normswap.data import DataSplit, RandomDataWarning, default_data_spec, open_data

    if torch.is_tensor(data):
        data = data[:samples]
        return [(data[i:i + batch_size], None) for i in range(0, len(data), batch_size)], \
            f"a tensor of {tuple(data.shape)}", False, []
    notes: list[str] = []
    if not isinstance(data, DataSplit):
        spec = data or default_data_spec(model, source)
        if spec is None:
            spec = "synthetic"
            notes.append("no default data for this model: synthetic standard-normal inputs shaped like its probe "
                         "(pass --data for real data)")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", RandomDataWarning)
            data = open_data(spec, model, source, calib_samples=samples, eval_samples=0, seed=seed,
                             **(data_options or {}))
        notes += [str(w.message) for w in caught if issubclass(w.category, RandomDataWarning)]
    batches = list(data.batches("calibration", batch_size))
    return batches, data.description, data.has_labels, notes


def _fresh(model: nn.Module, original: nn.Module | None, seed: int, trust_source: bool) -> nn.Module | None:
    """The same architecture freshly initialised (seeded), or None when a converted model cannot be rebuilt."""
    from normswap.api.conversion import META_ATTR
    from normswap.sources import rebuild
    from normswap.surgery.apply import apply_plan

    meta = getattr(model, META_ATTR, None) or {}
    converted = any(isinstance(m, Variant) for m in model.modules())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if not converted:
            fresh = copy.deepcopy(model)
            for m in fresh.modules():
                if callable(getattr(m, "reset_parameters", None)):
                    m.reset_parameters()
            return fresh
        plan = meta.get("plan")
        if plan is None:
            return None
        base = None
        if original is not None:
            base = _fresh(original, None, seed, trust_source)
        elif meta.get("source") is not None:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    base = rebuild(meta["source"], allow_code=trust_source)  # random weights, seeded above
            except NormswapError:
                return None
        return apply_plan(base, plan, inplace=True) if base is not None else None


def _unique(labels: list[str]) -> list[str]:
    out: list[str] = []
    for label in labels:
        new, i = label, 2
        while new in out:
            new, i = f"{label} ({i})", i + 1
        out.append(new)
    return out


def diagnose(model: ModelLike, data: Any = None, *, compare: Sequence[ModelLike] = (), compare_to: Sequence[str] = (),
             weights: str | None = None, at_init: bool = False, batch_stats: bool = False,
             strength: float | None = None, samples: int = 16, batch_size: int = 16, seed: int = 0,
             labels: Sequence[str] | None = None, data_options: dict[str, Any] | None = None,
             trust_source: bool = False, progress: bool = False, out: str | os.PathLike | None = None,
             force: bool = False) -> DiagnoseReport:
    """Measure, layer by layer, what a network's normalisation does (docs/diagnose.md): affine divergence,
    forward/backward variance and activation gains, batch geometry, UAN mixtures.

    Args:
        model: an ``nn.Module``, a :class:`normswap.ConvertResult`, a saved ``.safetensors`` file or a source
            spec (``"resnet18"``, with ``weights``).
        data: a data spec (as ``normswap calibrate --data``; its calibration part is used), a
            :class:`normswap.data.DataSplit`, or a tensor of inputs; default: the model's default data, else
            synthetic inputs shaped like its probe (said in the report's notes).
        compare: more models diagnosed on the same batches (same kinds as ``model``).
        compare_to: variant names: ``model`` converted to each (verified exact start) is compared too.
        at_init: also measure the batch geometry of a fresh initialisation of every model (with batch statistics).
        batch_stats: BatchNorm-like layers use batch statistics (running statistics restored afterwards).
        strength: run every variant module at this strength (restored afterwards).
        samples, batch_size, seed: how much data, in batches of what size, drawn with which seed.
        labels: names of the models in the report (default: the spec, file stem or class name).
        out, force: write the JSON, PNGs and HTML report into this directory.

    Example:
        >>> r = normswap.diagnose("mobilenet_v2", weights="IMAGENET1K_V1", compare_to=["patchnorm"], strength=1.0,
        ...                       samples=8, data_options={"image_size": 112})
        >>> max(r.values("mobilenet_v2 -> patchnorm", "divergence_cv").values()) < 1e-3
        True
    """
    start = time.perf_counter()
    if samples < 1 or batch_size < 1:
        raise UsageError(f"samples and batch_size must be >= 1; got {samples} and {batch_size}")
    strength = check_strength(strength) if strength is not None else None
    if out is not None:
        check_out_dir(out, force)
    main, source, label, original = _resolve(model, weights, trust_source)
    batches, description, has_labels, notes = _batches(data, main, source, samples, batch_size, seed, data_options)
    entries = [(main, label, original)]
    for other in compare:
        mod, _, lab, orig = _resolve(other, weights, trust_source)
        entries.append((mod, lab, orig))
    if compare_to:
        from normswap.api.conversion import convert

        for name in compare_to:
            r = convert(original if original is not None else main, to=name, example_inputs=batches[0][0])
            entries.append((r.model, f"{label} -> {name}", r.original))
    names = _unique(list(labels) if labels else [lab for _, lab, _ in entries])
    if labels and len(labels) != len(entries):
        raise UsageError(f"{len(labels)} label(s) for {len(entries)} model(s)")
    labels_of = {i: y for i, (_, y) in enumerate(batches)} if has_labels else {}
    predicted: dict[int, Any] = {}
    loss = "cross-entropy against the data's labels" if has_labels else (
        f"cross-entropy against {names[0]}'s top-1 predictions (the data has no labels; a KL to the original has "
        "no gradient at the exact start)")

    def target(i: int, output: torch.Tensor) -> Any:
        if has_labels:
            return labels_of[i]
        if i not in predicted:  # the first model's own predictions, shared by every later model
            predicted[i] = output.argmax(dim=-1) if output.dim() == 2 else None
        return predicted[i]

    runs = [(m, n, False) for (m, _, _), n in zip(entries, names)]
    if at_init:
        for (m, _, orig), n in zip(entries, names):
            fresh = _fresh(m, orig, seed, trust_source)
            if fresh is None:
                notes.append(f"{n}: no fresh initialisation (a converted model without its source or original)")
            else:
                runs.append((fresh, f"{n} at init", True))
    bar = tqdm(total=len(runs) * len(batches), desc="diagnosing", unit="batch", disable=not progress, leave=False)
    results = []
    try:
        for m, n, init in runs:
            results.append(run_model(m, (x for x, _ in batches), label=n, target=target,
                                     batch_stats=batch_stats or init, strength=strength, geometry_only=init,
                                     step=bar.update))
            results[-1].at_init = init
    finally:
        bar.close()
    report = DiagnoseReport(results, description, loss, strength, time.perf_counter() - start, notes)
    if out is not None:
        report.save(out, force=force)
    return report
