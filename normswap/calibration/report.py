"""The fidelity report: how close a converted model is to the original, per site and end to end.

End to end, on held-out batches, for each model state (before / after calibration, or the converted
model) at each strength (docs/methods.md section 0.1: the exact start and full strength, so a user sees what annealing
will have to recover): top-1 agreement with the original, mean cosine of the logits, mean
KL(original || converted) of the softmax, relative output error ``||out - ref|| / ||ref||``, the overlap of
the original's top-5 classes with the model's, top-1 agreement on the samples the original classifies
confidently (max probability > 0.5; agreement on ambiguous images is noise) with their count and, when
the data has labels, accuracy (the original's too). A sample whose output (the model's or the reference's)
holds NaN or inf is left out of every figure and counted (``nonfinite``), and the report says so: NaN
outputs never read as a perfect match. Per site: the relative output error at the site's
compare points (``Variant.compare_points``) inside the converted network against the original network's
output at the same point, at one strength (errors of earlier layers included: it is what the next
layer sees), plus the variant's own calibration figures (UAN: the log-likelihood gain over K = 1).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from normswap.calibration.identity import same_function
from normswap.core.plan import Plan
from normswap.calibration.site_errors import add_reference_norms, has_module, site_hooks
from normswap.surgery.verify import output_tensors, record_outputs
from normswap.variants.strength import set_strengths, strengths_of
from normswap.variants import registry

__all__ = ["EndToEnd", "FidelityReport", "SiteFidelity", "measure"]


@dataclass
class EndToEnd:
    """One row of the end-to-end table (``None``: not defined for this output, e.g. top-1 of a non-classifier,
    or no sample with finite outputs). ``top5_overlap``: mean share of the original's top-5 classes among the
    model's top 5; ``confident_agreement``: top-1 agreement on the ``confident`` samples whose original max
    probability is > 0.5; ``nonfinite``: samples whose output from this model holds NaN or inf (left out)."""

    model: str
    strength: float
    agreement: float | None
    cosine: float | None
    kl: float | None
    rel_error: float | None
    accuracy: float | None = None
    top5_overlap: float | None = None
    confident_agreement: float | None = None
    confident: int | None = None
    nonfinite: int = 0


@dataclass
class SiteFidelity:
    """One converted site: relative output error before / after calibration (``None``: not measured)."""

    name: str
    variant: str
    before: float | None = None
    after: float | None = None
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class FidelityReport:
    """What ``normswap calibrate`` / ``normswap eval`` print (``render``) or emit as JSON (``to_dict``)."""

    data: dict[str, Any]
    reference: str
    samples: int
    site_strength: float
    rows: list[EndToEnd] = field(default_factory=list)
    sites: list[SiteFidelity] = field(default_factory=list)
    original_accuracy: float | None = None
    calibration: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def row(self, model: str, strength: float) -> EndToEnd:
        """The end-to-end row of ``model`` (e.g. ``"after calibration"``) at ``strength``."""
        for r in self.rows:
            if r.model == model and abs(r.strength - strength) < 1e-6:  # float32 strength buffers
                return r
        raise KeyError(f"no row for {model!r} at strength {strength:g}")

    def render(self) -> str:
        pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
        num = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
        lines = []
        if self.calibration:
            c = self.calibration
            lines.append(f"calibration: {c['samples']} samples in {c['batches']} batches, {c['seconds']:.1f} s; "
                         f"statistics fitted for strength {c['strength']:g}")
            if c.get("bn_reestimated"):
                lines.append(f"  re-estimated the running statistics of {len(c['bn_reestimated'])} BatchNorm(s)")
        lines.append(f"data: {self.data.get('description', '?')}")
        lines.append(f"  split: {self.data.get('split', '?')}")
        lines.append(f"reference: {self.reference}")
        lines += [f"note: {n}" for n in self.notes]
        bad = any(r.nonfinite for r in self.rows)
        head = ("model", "strength", "top-1 agree", f"top-{TOP_K} overlap", f"agree p>{CONFIDENT:g}", "logit cos", "KL",
                "rel. error", "accuracy", *(("non-finite",) if bad else ()))
        table = [head]
        if self.original_accuracy is not None:
            table.append(("original", "-", "-", "-", "-", "-", "-", "-", pct(self.original_accuracy), *(("-",) if bad else ())))
        for r in self.rows:
            sure = "-" if r.confident is None else f"{pct(r.confident_agreement)} ({r.confident})"
            table.append((r.model, f"{r.strength:g}", pct(r.agreement), pct(r.top5_overlap), sure,
                          num(r.cosine, ".4f"), num(r.kl, ".4f"), num(r.rel_error, ".4f"), pct(r.accuracy),
                          *((str(r.nonfinite),) if bad else ())))
        lines.append(f"\nend to end on {self.samples} held-out samples (against the reference):")
        lines += _table(table)
        if any(r.top5_overlap is not None for r in self.rows):
            lines.append(f"  top-{TOP_K} overlap: share of the reference's top-{TOP_K} classes among the model's; "
                         f"agree p>{CONFIDENT:g}: top-1 agreement on the samples (count) the reference classifies "
                         f"with max probability > {CONFIDENT:g}")
        if self.sites:
            keys = ["ll_gain"] if any("ll_gain" in s.info for s in self.sites) else []
            head2 = ("site", "variant", "before", "after", *("log-lik gain" for _ in keys))
            rows2 = [head2] + [(s.name, s.variant, num(s.before, ".4f"), num(s.after, ".4f"),
                                *(num(s.info.get(k), ".3f") for k in keys)) for s in self.sites]
            lines.append(f"\nper site: relative output error against the reference inside the network, at strength "
                         f"{self.site_strength:g}" + (" (log-lik gain: mean per value over K = 1)" if keys else ""))
            lines += _table(rows2)
        return "\n".join(lines)


def _table(rows: list[tuple]) -> list[str]:
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    out = ["  " + "  ".join(str(c).rjust(w) if i > 1 or c in ("-",) else str(c).ljust(w)
                            for i, (c, w) in enumerate(zip(row, widths))).rstrip() for row in rows]
    out.insert(1, "  " + "  ".join("-" * w for w in widths))
    return out


def _first_tensor(out: Any) -> torch.Tensor | None:
    """A model's main output: ``out.logits`` when it has one, else its first tensor."""
    logits = getattr(out, "logits", None)
    return logits if torch.is_tensor(logits) else next(iter(output_tensors(out)), None)


CONFIDENT = 0.5  # the original's max probability above which a sample counts as confidently classified
TOP_K = 5


def top_k_overlap(ref: torch.Tensor, out: torch.Tensor, k: int = TOP_K) -> torch.Tensor:
    """Per row of (N, C) logits, the share of ``ref``'s top-k classes among ``out``'s top k (k <= C)."""
    k = min(k, ref.shape[1])
    a, b = ref.topk(k, dim=1).indices, out.topk(k, dim=1).indices
    return (a.unsqueeze(2) == b.unsqueeze(1)).any(2).sum(1).double() / k


class _Acc:
    """Running sums of the end-to-end metrics of one (model, strength)."""

    def __init__(self) -> None:
        self.n = self.agree = self.cos = self.kl = self.correct = self.labelled = 0.0
        self.err2 = self.ref2 = self.top5 = self.sure_agree = 0.0
        self.sure = self.nonfinite = 0
        self.classifier = True

    def add(self, ref: torch.Tensor, out: torch.Tensor, labels: torch.Tensor | None) -> None:
        r, o = ref.detach().double().reshape(ref.shape[0], -1), out.detach().double().reshape(out.shape[0], -1)
        self.classifier = self.classifier and ref.dim() == 2 and ref.shape[1] > 1
        finite_out = torch.isfinite(o).all(1)
        self.nonfinite += int((~finite_out).sum())
        keep = finite_out & torch.isfinite(r).all(1)  # a NaN sample is no evidence of agreement: left out
        if not bool(keep.all()):
            r, o = r[keep], o[keep]
            labels = labels[keep] if labels is not None else None
        self.n += r.shape[0]
        self.err2 += float((o - r).square().sum())
        self.ref2 += float(r.square().sum())
        self.cos += float(F.cosine_similarity(o, r, dim=1, eps=1e-12).sum())
        if self.classifier and r.shape[0]:
            same = o.argmax(1) == r.argmax(1)
            self.agree += float(same.sum())
            lr, lo = F.log_softmax(r, dim=1), F.log_softmax(o, dim=1)
            self.kl += float((lr.exp() * (lr - lo)).sum())
            self.top5 += float(top_k_overlap(r, o).sum())
            sure = lr.amax(1).exp() > CONFIDENT
            self.sure += int(sure.sum())
            self.sure_agree += float((same & sure).sum())
            if labels is not None:
                self.correct += float((o.argmax(1) == labels).sum())
                self.labelled += labels.numel()

    def row(self, model: str, strength: float) -> EndToEnd:
        if not self.n:  # no sample with finite outputs: nothing is defined
            return EndToEnd(model, strength, None, None, None, None, nonfinite=self.nonfinite)
        n, cls = self.n, self.classifier
        return EndToEnd(model, strength, self.agree / n if cls else None, self.cos / n, self.kl / n if cls else None,
                        (self.err2 / self.ref2) ** 0.5 if self.ref2 > 0 else float(self.err2 > 0),
                        self.correct / self.labelled if cls and self.labelled else None,
                        self.top5 / n if cls else None, self.sure_agree / self.sure if cls and self.sure else None,
                        self.sure if cls else None, self.nonfinite)


RECORD_BUDGET = 256 << 20  # bytes of reference activations that one recorded slice of a batch may hold


@torch.no_grad()
def measure(reference: nn.Module, models: dict[str, nn.Module], plan: Plan,
            batches: Iterable[tuple[torch.Tensor, torch.Tensor | None]], strengths: list[float],
            site_strength: float | None, progress: bool = False, counts: dict[str, int] | None = None,
            total: int | None = None, notes: list[str] | None = None) -> tuple[list[EndToEnd], dict[str, dict[str, float]], float | None, int]:
    """Run the reference and every model on ``batches`` at every strength (strengths restored afterwards).

    Per-site errors need the reference's activations at every compare point: a batch then runs in slices
    whose recorded activations fit :data:`RECORD_BUDGET` (sized on a first slice of one sample), so memory
    is bounded whatever the batch size and the number of sites; every forward still runs once per sample.

    ``batches`` is read once, as it comes (``total``: how many, for the progress bar only). Returns the
    end-to-end rows, per model label the relative error of each site at ``site_strength``
    (``None``: no per-site figures), the reference's accuracy (``None`` without labels) and the sample count;
    ``counts["reference_nonfinite"]`` is set to the samples whose reference output holds NaN or inf; ``notes``
    gets a line for each row proven equal to the reference through its converted sites (not run)."""
    points = {s.name: registry.get(s.variant).compare_points(s) for s in plan.converted}
    ref_names = sorted({a for pts in points.values() for a, _ in pts if has_module(reference, a)})
    accs = {(label, s): _Acc() for label in models for s in strengths}
    site_sums = {label: {name: [0.0, 0.0] for name in points} for label in models}
    ref_correct = ref_labelled = 0.0
    seen = ref_bad = 0
    saved = {label: strengths_of(m) for label, m in models.items()}
    modes = {m: m.training for mod in [reference, *models.values()] for m in mod.modules()}
    try:
        reference.eval()
        for m in models.values():
            m.eval()
        at_site = None
        if site_strength is not None and ref_names:
            at_site = next((s for s in strengths if abs(s - site_strength) < 1e-12), None)
        per_sample = None  # bytes of recorded reference activations per sample, from the first slice
        alias = _aliases(reference, models, strengths, [s.name for s in plan.converted], notes)
        work: dict[str, torch.Tensor] = {}
        for x, labels in tqdm(batches, desc="evaluating", unit="batch", disable=not progress, leave=False, total=total):
            n = x.shape[0] if torch.is_tensor(x) and x.dim() > 0 else 1
            start = 0
            while start < n:  # slices of the batch whose recorded activations fit RECORD_BUDGET
                size = n if at_site is None or n == 1 else (1 if per_sample is None else
                                                            max(1, RECORD_BUDGET // max(1, per_sample)))
                xs = x if size >= n and start == 0 else x[start:start + size]
                ys = labels if labels is None or xs is x else labels[start:start + size]
                store, handles = record_outputs(reference, ref_names if at_site is not None else [])
                try:
                    ref = _first_tensor(reference(xs))
                finally:
                    for h in handles:
                        h.remove()
                if ref is None:
                    raise ValueError("the model returned no tensor to compare")
                if at_site is not None and per_sample is None:
                    held = sum(t.numel() * t.element_size() for t in store.values() if torch.is_tensor(t))
                    per_sample = max(1, held // max(1, ref.shape[0]))
                seen += ref.shape[0]
                finite = torch.isfinite(ref.reshape(ref.shape[0], -1)).all(1)
                ref_bad += int((~finite).sum())
                if ys is not None and ref.dim() == 2:
                    ref_correct += float(((ref.argmax(1) == ys) & finite).sum())
                    ref_labelled += int(finite.sum())
                ref2: dict[str, float] = {}  # squared norms of the reference's site outputs, once per slice
                for label, model in models.items():
                    for s in strengths:
                        same = alias.get((label, s))
                        if same == "reference":  # provably the reference's own output: no forward
                            accs[(label, s)].add(ref, ref, ys)
                            if s is at_site:
                                add_reference_norms(model, points, store, site_sums[label], ref2)
                            continue
                        if same is not None:
                            continue  # the row of another model in the same state: copied below
                        set_strengths(model, s)
                        handles = site_hooks(model, points, store, site_sums[label], ref2, work) \
                            if s is at_site else []
                        try:
                            out = _first_tensor(model(xs))
                        finally:
                            for h in handles:
                                h.remove()
                        accs[(label, s)].add(ref, out, ys)
                store.clear()
                start += xs.shape[0] if xs is not x else n
    finally:
        for label, m in models.items():
            set_strengths(m, saved[label])
        for m, mode in modes.items():
            m.training = mode
    for (label, s), same in alias.items():
        if isinstance(same, tuple):
            accs[(label, s)] = copy.deepcopy(accs[same])
            if s is at_site:
                site_sums[label] = copy.deepcopy(site_sums[same[0]])
    if counts is not None:
        counts["reference_nonfinite"] = ref_bad
    rows = [acc.row(label, s) for (label, s), acc in accs.items()]
    per_site = {label: {n: (e / r) ** 0.5 for n, (e, r) in sums.items() if r > 0} for label, sums in site_sums.items()}
    return rows, (per_site if site_strength is not None else {}), \
        (ref_correct / ref_labelled if ref_labelled else None), seen


def _aliases(reference: nn.Module, models: dict[str, nn.Module], strengths: list[float], sites: Sequence[str] = (),
             notes: list[str] | None = None) -> dict[tuple[str, float], Any]:
    """Rows that need no forward: ``"reference"`` where the model at that strength provably is the
    reference (:func:`same_function`: e.g. a model compared with its own copy at strength 0, or a converted
    model whose every site says it computes its source's function, ANAct's unfolded sites at 0), or the
    ``(label, strength)`` of an earlier row whose model is provably in the same state. ``notes`` gets one line
    per row proven to be the reference by its sites (the check that stands for its forward)."""
    alias: dict[tuple[str, float], Any] = {}
    labels = list(models)
    for s in strengths:
        for i, label in enumerate(labels):
            set_strengths(models[label], s)
            if same_function(models[label], reference):
                alias[(label, s)] = "reference"
                continue
            if sites and same_function(models[label], reference, sites):
                alias[(label, s)] = "reference"
                if notes is not None:
                    notes.append(f"'{label}' at strength {s:g} was not run: it provably computes the reference's "
                                 f"function (every module outside the {len(sites)} converted site(s) identical, "
                                 "and each site's variant computing its source's own function at this strength), "
                                 "so its figures are the reference's")
                continue
            for other in labels[:i]:
                set_strengths(models[other], s)
                if alias.get((other, s)) is None and same_function(models[label], models[other]):
                    alias[(label, s)] = (other, s)
                    break
    return alias
