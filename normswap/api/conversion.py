"""The Python API: plan, convert, save, load, inspect. Orchestration only; the work lives elsewhere."""

from __future__ import annotations

import copy
from contextlib import nullcontext
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from normswap.version import __version__
from normswap.calibration.runner import run_calibration
from normswap.errors import FileFormatError, NormswapError, UsageError, VerificationError, WeightsError, one_line
from normswap.io import check_output, read_file, state_tensors, write_file
from normswap.api.metadata import plan_from_file, replay, source_from_file
from normswap.api.skipinit import build_uninitialised
from normswap.sources import SourceSpec, load_model, rebuild
from normswap.surgery.apply import apply_checked
from normswap.surgery.copying import copy_model
from normswap.surgery.find import find, find_graph
from normswap.surgery.probes import is_small, smaller_probe
from normswap.core.graph import ModelGraph, build_graph
from normswap.core.kinds import is_activation, is_norm
from normswap.core.plan import FOLDED, Plan
from normswap.sources.inputs import example_input
from normswap.core.probe import ProbeInput
from normswap.core.threads import serial
from normswap.surgery.local import Recording, record
from normswap.surgery.verify import (DEFAULT_RTOL, VerifyReport, compare_names, nonfinite_message, nonfinite_tensors,
                                     run_recording, verify)
from normswap.variants import registry

META_ATTR = "_normswap_meta"


@dataclass
class ConvertResult:
    """What :func:`convert` returns: the converted model, its Plan, the verification report."""

    model: nn.Module
    plan: Plan
    report: VerifyReport
    source: SourceSpec | None = None
    original: nn.Module | None = field(default=None, repr=False)  # the unconverted model, when it was kept

    def save(self, path: str | os.PathLike, force: bool = False) -> Path:
        """Save the converted model (see :func:`save`)."""
        return save(self.model, path, plan=self.plan, source=self.source, force=force)

    @property
    def graph_module(self) -> bool:
        """True when functional calls became modules, so ``model`` is a new ``torch.fx.GraphModule`` (not the
        original class); the sites say which (``facts["graph_rewrite"]``), and ``load`` replays the rewrite."""
        return any(s.facts.get("graph_rewrite") for s in self.plan.converted)


def _probe(example_inputs: Any) -> ProbeInput | None:
    if example_inputs is None:
        return None
    if isinstance(example_inputs, ProbeInput):
        return example_inputs
    if isinstance(example_inputs, dict):
        return ProbeInput((), dict(example_inputs))
    if isinstance(example_inputs, (tuple, list)):
        return ProbeInput(tuple(example_inputs), {})
    return ProbeInput((example_inputs,), {})


def _resolve(model: nn.Module | str, weights: str | None, trust_source: bool = False
             ) -> tuple[nn.Module, SourceSpec | None]:
    if isinstance(model, str):
        return load_model(model, weights, allow_code=trust_source)
    if not isinstance(model, nn.Module):
        raise NormswapError(f"expected an nn.Module or a model name, got {type(model).__name__}")
    meta = getattr(model, META_ATTR, None)
    return model, (meta or {}).get("source")


def plan(model: nn.Module | str, to: str, targets: Iterable[str] | None = None,
         exclude: Iterable[str] | None = None, strength: float = 0.0,
         options: Mapping[str, Any] | None = None, *, weights: str | None = "none",
         strict_trace: bool = False, trust_source: bool = False) -> Plan:
    """Plan a conversion without changing anything (see :func:`normswap.surgery.find.find`)."""
    module, _ = _resolve(model, weights, trust_source)
    return find(module, to, targets, exclude, strength, options, strict_trace=strict_trace)


def _recording(original: nn.Module, the_plan: Plan, probe: ProbeInput) -> Recording | None:
    """One recorded forward of ``original`` on the probe that serves calibration and verification alike (every
    call's inputs at the sites, the outputs at the sites and compare points): the data pass of a variant calibrated
    on the probe (ANAct) sees the values the original's sites see, which are what the converted model at strength
    0 gives them, so it needs no forward of its own. ``None`` where a site is no module of the original (a
    functional call the conversion turned into one): then calibration runs the converted model."""
    sites = [s.name for s in the_plan.converted]
    modules = dict(original.named_modules(remove_duplicate=False))
    if any(name not in modules for name in sites):
        return None
    return record(original, probe, sorted(set(sites) | set(compare_names(the_plan))))


def require_sites(the_plan: Plan, module: nn.Module) -> None:
    """The one-line error of a plan that converts nothing (``convert`` and ``convert --dry-run`` alike)."""
    if not the_plan.converted:
        reasons = sorted({s.reason for s in the_plan.skipped if s.reason})
        detail = f" ({len(the_plan.skipped)} skipped: {'; '.join(reasons[:3])})" if the_plan.skipped else ""
        raise NormswapError(f"nothing to convert: {type(module).__name__} has no site for variant "
                            f"'{the_plan.variant}'{detail}")


def convert(model: nn.Module | str, to: str, targets: Iterable[str] | None = None,
            exclude: Iterable[str] | None = None, strength: float = 0.0,
            options: Mapping[str, Any] | None = None, *, weights: str | None = None,
            example_inputs: Any = None, inplace: bool = False, strict_trace: bool = False,
            check: bool = True, rtol: float = DEFAULT_RTOL, trust_source: bool = False) -> ConvertResult:
    """Convert ``model`` to variant ``to`` and verify every exact-start claim on a probe batch.

    Args:
        model: an ``nn.Module`` / ``fx.GraphModule``, or a source spec (``"mobilenet_v2"``,
            ``"timm:efficientnet_b0"``, ``"hf:PATH"``, ``"pkg.mod:factory"``, ``"file.py:factory"``).
        to: variant name (``normswap.variants.names()``).
        targets, exclude: site patterns: a type (``BatchNorm2d``), an exact name, ``.suffix``, ``re:REGEX``.
        strength: 0 = exact copy of the original function (default), 1 = the paper's layer.
        options: variant settings, e.g. ``{"k": 5}`` for UAN.
        weights: for a spec: a torchvision weights name, ``"none"`` or a file (see ``normswap.sources``).
        example_inputs: a tensor, tuple of args, or dict of kwargs for the probe; inferred if omitted.
        inplace: convert the given module itself instead of a copy.
        check: verify exact claims; a broken claim raises :class:`VerificationError`.
        trust_source: let an ``hf:DIR`` that ships its own code (``auto_map``, ``*.py``) run it.

    Example:
        >>> result = normswap.convert(torchvision.models.resnet18(), to="uan")
        >>> result.report.ok, len(result.plan.converted)
        (True, 20)
    """
    module, source = _resolve(model, weights, trust_source)
    the_plan, graph = find_graph(module, to, targets, exclude, strength, options, strict_trace=strict_trace)
    require_sites(the_plan, module)
    reference = copy_model(module) if (inplace and check) else module
    converted, snapshot = apply_checked(module, the_plan, inplace=inplace, graph=graph.graph)  # one trace for all
    given = _probe(example_inputs)
    probe = given or example_input(reference, source)
    calibrates = any(registry.get(s.variant).needs_calibration for s in the_plan.converted)
    with serial() if is_small(probe) else nullcontext():  # a tiny batch: one thread is faster (verify says why)
        recording = _recording(reference, the_plan, probe) if probe is not None and calibrates and check else None
        if probe is not None and calibrates:  # variants whose exact start needs statistics (ANAct) fit them on the probe
            run_calibration(converted, the_plan, [probe], only_required=True, site_inputs=None if recording is None
                            else recording.calls(s.name for s in the_plan.converted))
    if check:  # an inferred probe is first tried smaller (normswap.surgery.probes; not where it was calibrated on)
        smaller = None if given is not None or calibrates else smaller_probe(probe)
        report = verify(reference, converted, the_plan, probe, rtol=rtol, graph=graph, snapshot=snapshot,
                        smaller=smaller, recording=recording)
    else:
        report = VerifyReport("none", the_plan.strength, [], None, None, False, True, note="verification disabled")
    if not report.ok and nonfinite_tensors(reference):  # the original is broken, not the conversion
        raise WeightsError(nonfinite_message(nonfinite_tensors(reference)) + "; its outputs are not finite, so no "
                           "conversion of it can be verified: fix or reload its weights")
    if not report.ok:
        bad = report.failures
        where = f"{len(bad)} site(s), first {bad[0].name}: max |diff| {bad[0].max_abs_diff:.3e}" if bad else \
            f"end to end: max |diff| {report.end_to_end:.3e}"
        raise VerificationError(f"the converted model does not reproduce the original at the exact start ({where})", report)
    setattr(converted, META_ATTR, {"plan": the_plan, "source": source})
    kept = None if inplace and reference is module else reference  # converted in place: the original is gone
    result = ConvertResult(converted, the_plan, report, source, original=kept)
    if result.graph_module:
        note = (f"the result is a torch.fx.GraphModule: {sum(bool(s.facts.get('graph_rewrite')) for s in the_plan.converted)}"
                " functional call(s) became anact_fn_* modules")
        report.note = f"{report.note}; {note}" if report.note else note
    return result


def save(model: nn.Module | ConvertResult, path: str | os.PathLike, *, plan: Plan | None = None,
         source: SourceSpec | None = None, force: bool = False) -> Path:
    """Write ``model`` as one self-describing ``.safetensors`` file (atomically).

    The metadata holds the normswap version, the source spec and the Plan, so :func:`load` can rebuild
    the architecture and replay the conversion without pickle."""
    if isinstance(model, ConvertResult):
        return model.save(path, force=force)
    meta = getattr(model, META_ATTR, None) or {}
    the_plan = plan or meta.get("plan")
    if the_plan is None:
        raise NormswapError("this model carries no normswap plan: save the result of normswap.convert, or pass plan=")
    source = source or meta.get("source")
    metadata = {"normswap_version": __version__, "plan": the_plan.to_dict(),
                "source": source.to_dict() if source is not None else None}
    return write_file(path, state_tensors(model), metadata, force=force)


def load(path: str | os.PathLike, model: nn.Module | None = None, *, trust_source: bool = False) -> nn.Module:
    """Rebuild a saved model: the source architecture (no weights download), the Plan replayed, a strict load.

    Args:
        path: a file written by :func:`save` / ``normswap convert -o``.
        model: the unconverted architecture to replay the plan on (required for models built by
            custom code; a copy is converted, the argument is left untouched).
        trust_source: allow rebuilding from a ``pkg.mod:factory`` / ``file.py:factory`` named in the file, or
            from an hf directory that ships its own code. Nothing else in a file runs code: its source and
            Plan are validated first (``normswap.api.metadata``, docs/security.md), problems are FileFormatErrors.
    """
    tensors, meta = read_file(path)
    the_plan = plan_from_file(meta.get("plan"), path)
    source = source_from_file(meta.get("source"), path)
    own = model is None  # built here for this load alone: converted in place, not copied first
    rewrites = any(s.facts.get("graph_rewrite") for s in the_plan.sites)  # those make a new GraphModule anyway
    converted = None
    if model is None:
        if source is None:
            raise NormswapError(f"{path} was made from a model object, not a named source: pass model= "
                                "(the unconverted architecture) to load it")
        # without the random initialisation the file overwrites (normswap.api.skipinit); where that build could
        # differ from a normal one, or the file does not set every tensor, the normal build decides
        bare = build_uninitialised(lambda: rebuild(source, allow_code=trust_source))
        if bare is not None:
            try:
                converted = replay(path, bare, the_plan, tensors, inplace=not rewrites, complete=True)
            except FileFormatError:
                converted = None
        if converted is None:
            try:
                model = rebuild(source, allow_code=trust_source)
            except UsageError as exc:  # a bad name or builder kwarg read from the file: the file is at fault
                raise FileFormatError(one_line(f"{path}: {exc}")) from None
    if converted is None:
        converted = replay(path, model, the_plan, tensors, inplace=own and not rewrites)
    converted.eval()
    setattr(converted, META_ATTR, {"plan": the_plan, "source": source})
    return converted


@dataclass
class InspectRow:
    name: str
    type: str
    shape: str
    pattern: str
    path: str


@dataclass
class Inspection:
    """Norm and activation sites of a model, as ``normswap inspect`` shows them."""

    model: str
    path: str
    trace_error: str | None
    rows: list[InspectRow] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)

    def render(self) -> str:
        head = ("name", "type", "shape", "pattern", "path")
        table = [head] + [(r.name, r.type, r.shape, r.pattern, r.path) for r in self.rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(head))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
        lines.insert(1, "  ".join("-" * w for w in widths))
        how = "torch.fx graph" if self.path == "fx" else f"module walk (trace failed: {self.trace_error})"
        return "\n".join([f"{self.model}: {len(self.rows)} norm/activation sites, found by {how}", *lines])


def _shapes(model: nn.Module, probe: ProbeInput | None, names: list[str]) -> dict[str, str]:
    """Output shape of each named module on ``probe`` (blank where the probe does not fit the model)."""
    if probe is None:
        return {}
    try:
        _, outputs = run_recording(model, probe, names)
    except Exception:  # shapes are a courtesy: a probe that does not fit leaves them blank
        return {}
    return {n: "x".join(str(d) for d in out.shape) for n, out in outputs.items() if torch.is_tensor(out)}


def inspect(model: nn.Module | str, *, example_inputs: Any = None, strict_trace: bool = False) -> Inspection:
    """List the norm and activation sites of ``model`` (modules and functional calls)."""
    module, source = _resolve(model, "none")
    graph: ModelGraph = build_graph(module, strict_trace=strict_trace)
    infos = [i for i in graph.infos if is_norm(i.module) or is_activation(i.module)]
    shapes = _shapes(module, _probe(example_inputs) or example_input(module, source), [i.name for i in infos])
    rows = [InspectRow(i.name, type(i.module).__name__, shapes.get(i.name, "?"), i.pattern(), i.path) for i in infos]
    rows += [InspectRow(c.node, c.function, "?", f"functional {c.kind}", "fx") for c in graph.functional]
    label = source.spec if source is not None else type(module).__name__
    return Inspection(label, graph.path, graph.trace_error, rows)


@dataclass
class ExportResult:
    """What :func:`export` returns: the inference model, its Plan (folded sites marked), what folded, what not."""

    model: nn.Module
    plan: Plan
    folded: list[str]
    kept: dict[str, str]
    max_abs_diff: float | None
    tolerance: float | None
    source: SourceSpec | None = None
    output: Path | None = None

    def save(self, path: str | os.PathLike, force: bool = False) -> Path:
        """Save the exported model (a file :func:`load` rebuilds, like any other)."""
        return save(self.model, path, plan=self.plan, source=self.source, force=force)

    def to_dict(self) -> dict[str, Any]:
        return {"folded": list(self.folded), "kept": dict(self.kept), "max_abs_diff": self.max_abs_diff,
                "tolerance": self.tolerance, "output": str(self.output) if self.output else None,
                "plan": self.plan.to_dict()}

    def render(self) -> str:
        lines = [f"export: {len(self.folded)} site(s) folded for inference, {len(self.kept)} kept as they are"]
        lines += [f"  folded  {name}" for name in self.folded]
        lines += [f"  kept    {name}: {why}" for name, why in self.kept.items()]
        if self.max_abs_diff is None:
            lines.append("  not checked: no probe input could be inferred (pass example_inputs)")
        else:
            lines.append(f"  max |output diff| vs the unfolded model: {self.max_abs_diff:.3e} "
                         f"(tolerance {self.tolerance:.1e}): ok")
        return "\n".join(lines)


def export(model: nn.Module | ConvertResult | str | os.PathLike, output: str | os.PathLike | None = None, *,
           force: bool = False, base_model: nn.Module | None = None, trust_source: bool = False,
           example_inputs: Any = None, rtol: float = 1e-5) -> ExportResult:
    """Fold every exactly compensated variant layer into its neighbours for inference (ANAct: the frozen
    ``c`` and ``mu`` go into the consumers and the plain activation comes back), check on a probe batch that
    the result computes what the unfolded model computes, and optionally save it.

    Args:
        model: a converted model (``ConvertResult``, or a module from ``convert``/``load``) or a saved file.
        output: where to save the exported model (atomically; ``force`` overwrites).
        base_model, trust_source: as ``model`` and ``trust_source`` of :func:`load`, for a file input.
        example_inputs: the probe (inferred for named sources); rtol: the check's relative tolerance.

    The exported Plan marks folded sites ``action = "folded"``; :func:`load` rebuilds them (the source
    activation, consumers with their ``bias`` key) and loads strictly.

    Example:
        >>> r = normswap.export("mnv2-anact.safetensors", "mnv2-anact-export.safetensors")
        >>> len(r.folded), r.max_abs_diff < 1e-4
        (18, True)
    """
    out = check_output(output, force=force) if output is not None else None  # fail before any work
    if isinstance(model, ConvertResult):
        module, the_plan, source = model.model, model.plan, model.source
    elif isinstance(model, nn.Module):
        meta = getattr(model, META_ATTR, None) or {}
        module, the_plan, source = model, meta.get("plan"), meta.get("source")
        if the_plan is None:
            raise NormswapError("this model carries no normswap plan: export the result of normswap.convert or load")
    elif isinstance(model, (str, os.PathLike)):
        module = load(model, base_model, trust_source=trust_source)
        the_plan, source = getattr(module, META_ATTR)["plan"], getattr(module, META_ATTR)["source"]
    else:
        raise NormswapError(f"expected a converted model or a file path, got {type(model).__name__}")
    exported = copy_model(module)
    folded, kept = [], {}
    by_variant: dict[str, list] = {}
    for site in the_plan.converted:
        by_variant.setdefault(site.variant, []).append(site)
    for name, sites in by_variant.items():
        done, why = registry.get(name).fold_for_export(exported, sites)
        folded += done
        kept.update(why)
    if not folded:
        reasons = "; ".join(sorted(set(kept.values()))[:3]) or "it has no converted site"
        raise NormswapError(f"nothing to export: no site of this model folds for inference ({reasons})")
    new_plan = Plan.from_dict(copy.deepcopy(the_plan.to_dict()))
    for site in new_plan.sites:
        if site.name in folded:
            site.action = FOLDED
            site.reason = "folded for inference by normswap export: the source module is back, its neighbours " \
                          "hold the variant's frozen statistics"
    probe = _probe(example_inputs) or example_input(module, source)
    diff = tol = None
    if probe is not None:
        check = verify(module, exported, Plan(variant=new_plan.variant), probe, rtol=rtol)
        diff, tol = check.end_to_end, check.end_to_end_tolerance
        if diff is None or tol is None or not diff <= tol:
            raise VerificationError(f"the exported model does not reproduce the converted one (max |diff| {diff:.3e}, "
                                    f"tolerance {tol:.1e})", check)
    setattr(exported, META_ATTR, {"plan": new_plan, "source": source})
    result = ExportResult(exported, new_plan, folded, kept, diff, tol, source)
    if out is not None:
        result.output = result.save(out, force=force)
    return result
