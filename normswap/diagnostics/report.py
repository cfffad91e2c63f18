"""A diagnosis as data (:class:`DiagnoseReport`), text, JSON, PNG figures and one self-contained HTML page.

``save(out_dir)`` writes ``diagnose.json``, one ``<measure>.png`` per figure and ``diagnose.html``, which embeds
the same PNGs as ``data:`` URIs (the page needs no other file and no script), each written atomically.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from normswap.diagnostics.plots import MEASURES, Measure, _value, cosine_png, measure_png
from normswap.diagnostics.run import ModelDiagnosis
from normswap.errors import OutputError
from normswap.io import atomic_write, check_output

__all__ = ["DiagnoseReport", "check_out_dir"]

JSON_NAME, HTML_NAME = "diagnose.json", "diagnose.html"


def _num(v: Any) -> Any:
    """JSON-safe numbers: NaN and infinities become None."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _num(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_num(x) for x in v]
    return v


def _fmt(v: float) -> str:
    return f"{v:.4g}"


def check_out_dir(out_dir: str | os.PathLike, force: bool = False) -> Path:
    """Fail early (before any work) when ``out_dir`` is a file, cannot be created, or already holds a report
    (without ``force``)."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise OutputError(f"cannot write the report into {out}: it is a file")
    if not out.exists() and not out.parent.is_dir():
        raise OutputError(f"cannot create {out}: directory {out.parent} does not exist")
    if out.is_dir():
        for name in (JSON_NAME, HTML_NAME):
            check_output(out / name, force=force)
    return out


@dataclass
class DiagnoseReport:
    """What :func:`normswap.diagnose` returns: one :class:`ModelDiagnosis` per model (the model first, then
    each comparison, then the fresh initialisations with ``at_init``), and how they were run."""

    models: list[ModelDiagnosis]
    data: str
    loss: str
    strength: float | None
    seconds: float
    notes: list[str] = field(default_factory=list)
    figures: dict[str, bytes] = field(default_factory=dict, repr=False)
    output: Path | None = None

    def to_dict(self) -> dict[str, Any]:
        return _num({"data": self.data, "loss": self.loss, "strength": self.strength, "seconds": self.seconds,
                     "notes": list(self.notes), "models": [m.to_dict() for m in self.models],
                     "worst": [dict(zip(("measure", "model", "site", "value"), r)) for r in self.worst()],
                     "output": str(self.output) if self.output else None})

    def model(self, label: str) -> ModelDiagnosis:
        """The diagnosis of the model labelled ``label``."""
        for m in self.models:
            if m.label == label:
                return m
        raise KeyError(f"no model labelled {label!r}; labels: {', '.join(m.label for m in self.models)}")

    def values(self, label: str, key: str) -> dict[str, float]:
        """Site name -> value of measure ``key`` (a :data:`~normswap.diagnostics.plots.MEASURES` key) for one model."""
        m = next(x for x in MEASURES if x.key == key)
        return {s.name: v for s in self.model(label).sites for v in [_value(s.to_dict(), m)] if v is not None}

    def worst(self, per_model: int = 3) -> list[tuple[str, str, str, float]]:
        """``(measure title, model, site, value)``: the ``per_model`` worst sites of each model for each measure
        that has a worse direction."""
        rows = []
        for m in (x for x in MEASURES if x.worse):
            for model in self.models:
                vals = self.values(model.label, m.key)
                ranked = sorted(vals.items(), key=lambda kv: kv[1], reverse=m.worse == "high")[:per_model]
                rows += [(m.title, model.label, name, value) for name, value in ranked]
        return rows

    def render(self) -> str:
        lines = [f"diagnose: {len(self.models)} model(s) on {self.data}", f"  loss: {self.loss}"]
        if self.strength is not None:
            lines.append(f"  variant modules at strength {self.strength:g}")
        for m in self.models:
            counts = {k: sum(s.kind == k for s in m.sites) for k in ("affine", "norm", "activation")}
            lines.append(f"  {m.label}: {len(m.sites)} sites ({counts['affine']} affine, {counts['norm']} norm, "
                         f"{counts['activation']} activation), {m.samples} samples in {m.batches} batch(es)"
                         + (", batch statistics" if m.batch_stats else ""))
        lines.append("summary (median over sites; geometry: deepest site):")
        keys = ("divergence_cv", "forward_var", "grad_var", "lam", "tightness", "odd_orthogonality", "norm_ratio",
                "effective_rank")
        head = ["model", *keys]
        table = [head]
        for m in self.models:
            row = [m.label]
            for key in keys:
                vals = list(self.values(m.label, key).values())
                if not vals:
                    row.append("-")
                elif key in ("tightness", "odd_orthogonality", "norm_ratio", "effective_rank"):
                    row.append(_fmt(vals[-1]))
                else:
                    row.append(_fmt(sorted(vals)[len(vals) // 2]))
            table.append(row)
        widths = [max(len(r[i]) for r in table) for i in range(len(head))]
        lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in table]
        worst: dict[str, tuple[str, str, float]] = {}
        for m in (x for x in MEASURES if x.worse):
            for t, label, site, v in self.worst(per_model=1):
                if t == m.title and (t not in worst or (v > worst[t][2]) == (m.worse == "high")):
                    worst[t] = (label, site, v)
        if worst:
            lines.append("worst layer per measure (all models):")
            lines += [f"  {t}: {label} {site} = {_fmt(v)}" for t, (label, site, v) in worst.items()]
        lines += [f"note: {n}" for n in self.notes]
        if self.output is not None:
            lines.append(f"report written to {self.output / HTML_NAME}")
        return "\n".join(lines)

    # ---- files -------------------------------------------------------------------------------------
    def make_figures(self) -> dict[str, bytes]:
        """Render every figure (PNG bytes by name), once."""
        if not self.figures:
            models = [m.to_dict() for m in self.models]
            for m in MEASURES:
                png = measure_png(models, m)
                if png is not None:
                    self.figures[m.key] = png
            png = cosine_png(models)
            if png is not None:
                self.figures["cosine"] = png
        return self.figures

    def save(self, out_dir: str | os.PathLike, force: bool = False) -> Path:
        """Write the JSON, the PNGs and the HTML report into ``out_dir`` (created if its parent exists)."""
        out = check_out_dir(out_dir, force)
        out.mkdir(exist_ok=True)
        figures = self.make_figures()
        paths = [out / JSON_NAME, out / HTML_NAME, *(out / f"{k}.png" for k in figures)]
        for p in paths:
            check_output(p, force=force)
        self.output = out
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        atomic_write(paths[0], lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        for key, png in figures.items():
            atomic_write(out / f"{key}.png", lambda tmp, png=png: Path(tmp).write_bytes(png))
        page = self.html()
        atomic_write(paths[1], lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))
        return out

    def html(self) -> str:
        """The self-contained HTML report (figures as data URIs, no script)."""
        e = html.escape
        figures = self.make_figures()
        parts = [_HEAD, f"<h1>normswap diagnose</h1><p>{len(self.models)} model(s) on {e(self.data)}.<br>"
                 f"Loss for the gradients: {e(self.loss)}."
                 + (f"<br>Variant modules at strength {self.strength:g}." if self.strength is not None else "")
                 + f"<br>{self.seconds:.1f} s.</p>"]
        parts.append("<table><tr><th>model</th><th>sites</th><th>samples</th><th>batch statistics</th></tr>" + "".join(
            f"<tr><td>{e(m.label)}</td><td>{len(m.sites)}</td><td>{m.samples}</td><td>{'yes' if m.batch_stats else 'no'}"
            "</td></tr>" for m in self.models) + "</table>")
        parts += [f"<p class='note'>{e(n)}</p>" for n in self.notes]
        parts.append("<p>Figures: one per measure against depth (execution order), every model on the same axes; "
                     "<a href='#worst'>the worst layers</a> are listed at the end.</p>")
        for m in [*MEASURES, Measure("cosine", "geometry", "", "Cosine matrix of the batch", "", explain=(
                "The batch's cosine matrix at the deepest geometry site (last batch): one tight block plus one "
                "orthogonal row and column is the collapsed picture; a pale, mixed matrix is a well-spread batch."))]:
            if m.key in figures:
                uri = "data:image/png;base64," + base64.b64encode(figures[m.key]).decode("ascii")
                parts.append(f"<section id='{e(m.key)}'><h2>{e(m.title)}</h2><p>{e(m.explain)}</p>"
                             f"<img src='{uri}' alt='{e(m.title)}'></section>")
        worst = self.worst()
        if worst:
            worse = {m.title: m.worse for m in MEASURES}
            parts.append("<h2 id='worst'>Worst layers</h2><p>The three worst layers of each model for each measure "
                         "with a worse end.</p><table><tr><th>measure</th><th>worse when</th><th>model</th>"
                         "<th>layer</th><th>value</th></tr>" + "".join(
                             f"<tr><td>{e(t)}</td><td>{worse[t]}er</td><td>{e(lab)}</td><td><code>{e(s)}</code></td>"
                             f"<td>{_fmt(v)}</td></tr>" for t, lab, s, v in worst) + "</table>")
        parts.append("</body></html>")
        return "\n".join(parts)


_HEAD = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>normswap diagnose</title>
<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
img{max-width:100%;border:1px solid #ddd}table{border-collapse:collapse;margin:1em 0;font-size:0.9em}
td,th{border:1px solid #ccc;padding:0.25em 0.6em;text-align:left}th{background:#f2f2f2}
section{margin:2em 0}.note{color:#8a5a00}code{font-size:0.9em}</style></head><body>"""
