"""Verify: where a variant claims an exact start, check it on a probe batch, per site and end to end.

Both models run in eval mode (their modes are restored afterwards) under ``torch.no_grad``. A site's
output is compared with the output of the last original module it replaces (a folded Conv->BN pair
is compared at the BN). A claim fails when ``max |diff| > rtol * max(1, max |reference|)``, where ``rtol`` is
at least :data:`DTYPE_ULPS` machine epsilons of the compared tensors' dtype (float32 and float64 keep the
given ``rtol``; bfloat16 and float16 models are checked to what their precision can hold).

Two methods (``VerifyReport.method``). ``site-local`` (:mod:`normswap.surgery.local`, when its conditions hold:
the caller passes the fx graph and a :class:`~normswap.surgery.copying.Snapshot` of the copy): one recorded
forward of the original, each replacement run on its site's recorded inputs; when every site is bit-identical
the end-to-end difference is 0 by induction over the forward, and the converted model is not run end to end
(``end_to_end_derived``); otherwise it is. ``forward`` (everything else): both models run on the probe, each
site compared at its variant's compare points inside the converted network, and end to end.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from normswap.core.graph import ModelGraph
from normswap.core.plan import Plan
from normswap.core.probe import ProbeInput
from normswap.core.threads import serial
from normswap.surgery import local
from normswap.surgery.local import output_tensors
from normswap.surgery.copying import Snapshot
from normswap.surgery.probes import is_small
from normswap.variants import registry
from normswap.variants.base import Variant

DEFAULT_RTOL = 1e-4
DTYPE_ULPS = 8  # a rewrite reorders a handful of roundings: allow that many ulps of the reference's dtype


@dataclass
class SiteCheck:
    name: str
    variant: str
    claims_exact: bool
    max_abs_diff: float | None
    tolerance: float | None
    ok: bool


@dataclass
class VerifyReport:
    """Outcome of the probe comparison. ``ok`` is False only when an exact claim is broken.

    ``method``: ``"site-local"`` (each site on its recorded inputs; ``end_to_end_derived`` when the end-to-end 0
    is proven rather than measured) or ``"forward"`` (both models run; ``local_skipped`` says why, when the
    site-local method was considered). See the module docstring."""

    probe: str
    strength: float
    sites: list[SiteCheck]
    end_to_end: float | None
    end_to_end_tolerance: float | None
    end_to_end_claimed: bool
    ok: bool
    note: str = ""
    method: str = "forward"  # "site-local" or "forward" (module docstring)
    local_skipped: str = ""  # why the site-local method was not used, when it was tried
    end_to_end_derived: bool = False  # end_to_end (0) follows from bit-identical sites; the forward was not run
    shrunk_from: str = ""  # the inferred probe this report's smaller one stands for (normswap.surgery.probes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def failures(self) -> list[SiteCheck]:
        return [s for s in self.sites if not s.ok]

    def render(self) -> str:
        """A human-readable table."""
        if not self.sites and self.end_to_end is None:
            return f"verification skipped: {self.note}"
        width = max([len(s.name) for s in self.sites] + [4])
        how = "; each site run on its inputs recorded in one forward of the original" if self.method == "site-local" else ""
        smaller = f", a smaller batch than the inferred {self.shrunk_from}" if self.shrunk_from else ""
        lines = [f"verification on probe {self.probe}{smaller} (strength {self.strength:g}{how})",
                 f"  {'site'.ljust(width)}  {'exact claim':<11}  {'max |diff|':>10}  status"]
        for s in self.sites:
            diff = "n/a" if s.max_abs_diff is None else f"{s.max_abs_diff:.3e}"
            status = ("ok" if s.ok else "FAILED") if s.claims_exact else "-"
            lines.append(f"  {s.name.ljust(width)}  {'yes' if s.claims_exact else 'no':<11}  {diff:>10}  {status}")
        if self.end_to_end_derived:
            lines.append("  end to end: max |output diff| 0, proven without running the converted model: every "
                         "site is bit-identical on its recorded inputs and every other module is the unchanged copy: ok")
        elif self.end_to_end is not None:
            claim = "exact claimed" if self.end_to_end_claimed else "no exact claim"
            verdict = ("ok" if self.ok else "FAILED") if self.end_to_end_claimed else "-"
            lines.append(f"  end to end: max |output diff| {self.end_to_end:.3e} ({claim}, tolerance "
                         f"{self.end_to_end_tolerance:.1e}): {verdict}")
        if self.note:
            lines.append(f"  note: {self.note}")
        return "\n".join(lines)


def dtype_rtol(out: Any, rtol: float) -> float:
    """``rtol``, raised to :data:`DTYPE_ULPS` epsilons of the coarsest floating dtype among ``out``'s tensors."""
    eps = max((torch.finfo(t.dtype).eps for t in output_tensors(out) if t.is_floating_point()), default=0.0)
    return max(rtol, DTYPE_ULPS * eps)


def _diff(a: Any, b: Any) -> tuple[float, float]:
    """(max |a - b|, max |a|) over matching tensor leaves."""
    ta, tb = output_tensors(a), output_tensors(b)
    if len(ta) != len(tb) or any(x.shape != y.shape for x, y in zip(ta, tb)):
        return math.inf, 0.0
    diff = max((float((x.double() - y.double()).abs().max()) for x, y in zip(ta, tb) if x.numel()), default=0.0)
    ref = max((float(x.double().abs().max()) for x in ta if x.numel() and x.is_floating_point()), default=0.0)
    return diff, ref


def record_outputs(model: nn.Module, names: list[str]) -> tuple[dict[str, Any], list[Any]]:
    """Forward hooks that keep each named module's output (a clone: an in-place op may follow) in a dict;
    returns ``(dict, handles)``: remove the handles when done."""
    store: dict[str, Any] = {}
    handles = []
    for name in names:
        def hook(_m: nn.Module, _i: Any, out: Any, name: str = name) -> None:
            store[name] = out.clone() if torch.is_tensor(out) else out  # an in-place activation may follow
        handles.append(model.get_submodule(name).register_forward_hook(hook))
    return store, handles


def run_recording(model: nn.Module, probe: ProbeInput, names: list[str]) -> tuple[Any, dict[str, Any]]:
    """Run ``model`` on ``probe`` in eval mode under no_grad (modes restored after); return its output
    and the output of each named module (its last call)."""
    modes = {m: m.training for m in model.modules()}
    store, handles = record_outputs(model, names)
    try:
        model.eval()
        with torch.no_grad():
            out = model(*probe.args, **probe.kwargs)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return out, store


def _site_check(site: Any, module: nn.Module, found: list[tuple[Any, Any]], rtol: float) -> SiteCheck:
    """One site's verdict from its ``(original, converted)`` output pairs (none: the probe never reached it)."""
    claims = isinstance(module, Variant) and module.claims_exact()
    if not found:
        return SiteCheck(site.name, site.variant, claims, None, None, True)
    diffs = [_diff(x, y) for x, y in found]
    diff, ref = max(d for d, _ in diffs), max(r for _, r in diffs)
    tol = max(dtype_rtol(x, rtol) for x, _ in found) * max(1.0, ref)
    return SiteCheck(site.name, site.variant, claims, diff, tol, (diff <= tol) or not claims)


def _report(probe: ProbeInput, plan: Plan, checks: list[SiteCheck], out_a: Any, out_b: Any, rtol: float,
            method: str) -> VerifyReport:
    diff, ref = _diff(out_a, out_b)
    tol = dtype_rtol(out_a, rtol) * max(1.0, ref)
    all_claim = bool(checks) and all(c.claims_exact for c in checks)
    ok = all(c.ok for c in checks) and (diff <= tol or not all_claim)
    return VerifyReport(probe.describe(), plan.strength, checks, diff, tol, all_claim, ok, method=method)


def _forward_compare(original: nn.Module, converted: nn.Module, plan: Plan, probe: ProbeInput, rtol: float,
                     recorded: tuple[Any, dict[str, Any]] | None = None, why: str = "") -> VerifyReport:
    """The ``forward`` method (``recorded``: the original's output and compare-point outputs, if already run)."""
    sites = plan.converted
    points = [registry.get(s.variant).compare_points(s) for s in sites]
    out_a, acts_a = recorded if recorded is not None else run_recording(original, probe, compare_names(plan))
    out_b, acts_b = run_recording(converted, probe, sorted({b for pts in points for _, b in pts}))
    checks = [_site_check(site, converted.get_submodule(site.name),
                          [(acts_a[a], acts_b[b]) for a, b in pts if a in acts_a and b in acts_b], rtol)
              for site, pts in zip(sites, points)]
    report = _report(probe, plan, checks, out_a, out_b, rtol, "forward")
    report.local_skipped = why
    return report


def _repeatable(out: Any) -> bool:
    """Whether a second forward on the same values gives the same bits: not with ``cudnn.benchmark`` on a GPU
    (it may pick another convolution algorithm per run), so there the converted model runs end to end."""
    return not (torch.backends.cudnn.benchmark and any(t.is_cuda for t in output_tensors(out)))


def _finite(out: Any) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in output_tensors(out) if t.is_floating_point())


def verify(original: nn.Module, converted: nn.Module, plan: Plan, probe: ProbeInput | None,
           rtol: float = DEFAULT_RTOL, *, graph: ModelGraph | None = None, snapshot: Snapshot | None = None,
           smaller: ProbeInput | None = None, recording: local.Recording | None = None) -> VerifyReport:
    """Compare ``converted`` with ``original`` on ``probe`` at every converted site and end to end.

    ``graph`` (the finder's fx graph of ``original``) and ``snapshot`` (of ``converted`` when it was a fresh copy
    of ``original``, before any site was replaced) allow the site-local method (module docstring); without
    them, or where its conditions fail, both models run end to end. ``smaller`` (:mod:`normswap.surgery.probes`):
    tried first; its report stands when it shows a broken claim, or when every site was reached on it and claims
    an exact start (a claim holds or fails whatever the input's size; the differences a site that claims nothing
    reports are figures of the model's behaviour, which the full probe measures: MobileNetV2's logits move 2.5 at
    32 pixels and 7.6 at 224 under PatchNorm at strength 1); where the original does not run on it, or it leaves a
    site unreached, ``probe`` decides (a replacement that raises on
    an input the original runs on raises here, as on the full probe). ``recording``: :func:`~.local.record` of
    ``original`` on ``probe`` already made (every converted site and every original compare point recorded), which
    stands for the original's forward (``convert`` calibrates ANAct from the same recording); not with ``smaller``."""
    if probe is None:
        return VerifyReport("none", plan.strength, [], None, None, False, True,
                            note="no probe input could be inferred for this model; pass example inputs to verify")
    if smaller is not None and recording is None:
        try:
            with serial():  # a few thousand values per activation: one thread is faster (normswap.core.threads)
                report = _verify(original, converted, plan, smaller, rtol, graph, snapshot)
        except Exception:  # noqa: BLE001  (a model that does not run at that size: the full probe decides)
            with serial():
                runs = _runs(original, smaller)
            if runs:  # the original does: a replacement failed on its input, which is no size issue
                raise
            report = None
        if report is not None and (not report.ok or all(c.max_abs_diff is not None and c.claims_exact
                                                        for c in report.sites)):
            report.shrunk_from = probe.describe()
            return report
    with serial() if is_small(probe) else nullcontext():
        return _verify(original, converted, plan, probe, rtol, graph, snapshot, recording)


def compare_names(plan: Plan) -> list[str]:
    """The original modules whose outputs verification compares (each site's variant's compare points)."""
    return sorted({a for s in plan.converted for a, _ in registry.get(s.variant).compare_points(s)})


def _runs(model: nn.Module, probe: ProbeInput) -> bool:
    """Whether ``model`` runs on ``probe`` without raising (eval mode, no_grad)."""
    try:
        run_recording(model, probe, [])
    except Exception:  # noqa: BLE001
        return False
    return True


def _verify(original: nn.Module, converted: nn.Module, plan: Plan, probe: ProbeInput, rtol: float,
            graph: ModelGraph | None, snapshot: Snapshot | None, recording: local.Recording | None = None
            ) -> VerifyReport:
    names = local.sites(plan, original, converted, graph, snapshot)
    if isinstance(names, str):
        recorded = None if recording is None else (recording.output, recording.last_outputs())
        return _forward_compare(original, converted, plan, probe, rtol, recorded,
                                why=names if snapshot is not None else "")
    rec = recording if recording is not None else local.record(original, probe, names)
    pairs = local.check_sites(converted, names, rec)
    if isinstance(pairs, str):
        return _forward_compare(original, converted, plan, probe, rtol, (rec.output, rec.last_outputs()), pairs)
    checks = [_site_check(site, converted.get_submodule(site.name), pairs[site.name], rtol) for site in plan.converted]
    identical = all(c.max_abs_diff == 0.0 for c in checks if c.max_abs_diff is not None)
    if identical and all(c.ok for c in checks) and _finite(rec.output) and _repeatable(rec.output):
        tol = dtype_rtol(rec.output, rtol) * max(1.0, _diff(rec.output, rec.output)[1])
        return VerifyReport(probe.describe(), plan.strength, checks, 0.0, tol, bool(checks), True,
                            method="site-local", end_to_end_derived=True)
    out_b, _ = run_recording(converted, probe, [])
    return _report(probe, plan, checks, rec.output, out_b, rtol, "site-local")


def nonfinite_tensors(model: nn.Module) -> dict[str, int]:
    """Parameters and buffers of ``model`` holding NaN or infinite values: ``{name: how many}``."""
    named = list(model.named_parameters(remove_duplicate=True)) + list(model.named_buffers(remove_duplicate=True))
    return {name: n for name, t in named
            if t.is_floating_point() and (n := int((~torch.isfinite(t.detach())).sum()))}


def nonfinite_message(bad: dict[str, int], whose: str = "the original model's") -> str:
    """``WHOSE weights hold NaN or infinite values (name: N values; ...)``, the first three of ``bad``."""
    shown = "; ".join(f"{name}: {n} value{'s' if n > 1 else ''}" for name, n in list(bad.items())[:3])
    more = f"; and {len(bad) - 3} more tensor(s)" if len(bad) > 3 else ""
    return f"{whose} weights hold NaN or infinite values ({shown}{more})"
