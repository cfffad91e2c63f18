"""Figures of a diagnosis: one PNG per measure against depth (every model on the same axes), and the cosine
matrix of the last geometry site of each model. matplotlib with the Agg backend (no display needed).

:data:`MEASURES` is the one table of what is plotted and reported: a key, the site family it reads, a title,
the y label, log scale or not, which direction is worse (for the report's worst-layers table) and a short
explanation (the HTML report shows it under the figure)."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass
from typing import Any, Sequence

__all__ = ["MEASURES", "Measure", "cosine_png", "measure_png", "series"]


@dataclass(frozen=True)
class Measure:
    key: str
    family: str
    field: str
    title: str
    ylabel: str
    log: bool = False
    worse: str | None = None  # "high" / "low": which end the worst-layers table lists
    explain: str = ""


MEASURES: tuple[Measure, ...] = (
    Measure("divergence_cv", "effective", "cv", "Affine divergence: coefficient of variation", "CV of the factor",
            worse="high", explain="One SGD step on an affine layer moves each sample's output by its own factor "
            "||x||^2 + 1 (convolutions: the patch's squared norm + 1). Its coefficient of variation over samples and "
            "locations says how unevenly the layer's samples learn; a PatchNorm layer's correction leaves the "
            "effective factor, which is constant (CV 0) at strength 1 (docs/methods.md section 1.1)."),
    Measure("divergence_ratio", "effective", "ratio", "Affine divergence: max/min ratio", "max / min of the factor",
            log=True, worse="high", explain="Largest over smallest effective divergence factor seen: how many "
            "times further the most-moved sample travels than the least-moved one in one step."),
    Measure("divergence_mean", "effective", "mean", "Affine divergence: mean factor", "mean factor", log=True,
            explain="The mean effective factor: the overall step-size multiplier of the layer's activations."),
    Measure("forward_var", "forward_var", "var", "Forward activation variance", "Var[output]", log=True,
            worse="high", explain="Variance of each layer's output over the batch: a signal exploding or vanishing "
            "through depth shows as a slope here."),
    Measure("grad_var", "grad_var", "var", "Backward gradient variance", "Var[dL/d output]", log=True,
            worse="low", explain="Variance of the loss gradient at each layer's output (cross-entropy against the "
            "labels, or against the first model's top-1 predictions when the data has none): vanishing gradients "
            "show as small values at the bottom of the network."),
    Measure("rho", "gains", "rho", "Activation forward gain rho", "rho = E[f(X)^2] / Var[X]",
            explain="Forward gain of each activation on its actual input (docs/methods.md section 2.1)."),
    Measure("rho_prime", "gains", "rho_prime", "Activation backward gain rho'", "rho' = E[f'(X)^2]",
            explain="Backward gain of each activation: below 1, gradients shrink through it."),
    Measure("lam", "gains", "lam", "Activation normalising factor lam", "lam = sqrt((rho + rho') / (2 rho rho'))",
            explain="The factor ANAct multiplies the activation by to balance forward and backward gains; far from "
            "1 means the activation distorts the signal's scale."),
    Measure("tightness", "geometry", "tightness", "Batch geometry: cluster tightness", "mean cosine, odd sample out",
            worse="high", explain="Mean cosine between the batch's samples, leaving out the odd sample: near 1 the "
            "batch has collapsed into one direction (Batch Normalization Decomposed, docs/methods.md section 4)."),
    Measure("odd_orthogonality", "geometry", "odd_orthogonality", "Batch geometry: odd-sample orthogonality",
            "max |cos(odd, other)|", explain="Largest |cosine| between the odd sample and the others: near 0 the odd "
            "sample sits in its own orthogonal direction (the recentering + ReLU picture)."),
    Measure("norm_ratio", "geometry", "norm_ratio", "Batch geometry: norm ratio", "||h_odd|| / median ||h||",
            log=True, worse="high", explain="Norm of the odd sample over the median norm: about n - 1 when one "
            "sample balances a tight cluster of the others."),
    Measure("effective_rank", "geometry", "effective_rank", "Batch geometry: effective rank", "(sum l)^2 / sum l^2",
            worse="low", explain="Effective rank of the centred Gram matrix: how many directions the batch still "
            "spans around its mean; small means the representation has collapsed."),
    Measure("orthogonality_gap", "geometry", "orthogonality_gap", "Batch geometry: orthogonality gap",
            "|| G / tr G - I / n ||_F", worse="high", explain="Distance of the normalised Gram matrix from that of "
            "orthogonal samples of equal norm: 0 is an ideal, well-spread batch."),
    Measure("uan_ll_gain", "uan", "ll_gain", "UAN: log-likelihood gain over K = 1", "nats per value",
            explain="How much better each UAN site's Gaussian mixture fits its inputs than the best single Gaussian "
            "(0 at the exact start, before calibration separates the components; docs/methods.md section 3.3)."),
    Measure("uan_separation", "uan", "separation", "UAN: component separation", "(max mu - min mu) / sd",
            explain="Spread of the mixture's component means in units of the channel's standard deviation (median "
            "over channels)."),
    Measure("uan_top_weight", "uan", "top_weight", "UAN: largest component weight", "prior of the largest component",
            explain="Mean over channels of the largest prior: 1/K for uniform components, near 1 when one "
            "component takes everything."),
)


_STYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "x", "d")


def _value(site: dict[str, Any], m: Measure) -> float | None:
    fam = site.get(m.family)
    if not isinstance(fam, dict):
        return None
    v = fam.get("weights", [None])[0] if m.field == "top_weight" else fam.get(m.field)
    if v is None or not isinstance(v, (int, float)) or not math.isfinite(v) or (m.log and v <= 0):
        return None
    return float(v)


def series(models: Sequence[dict[str, Any]], m: Measure) -> tuple[list[str], list[tuple[str, list[int], list[float]]]]:
    """Site names in depth order (the first model's order, then names only later models have) and, per model,
    its ``(label, x positions, values)`` for measure ``m``."""
    order: dict[str, int] = {}
    for model in models:
        for s in model["sites"]:
            if _value(s, m) is not None and s["name"] not in order:
                order[s["name"]] = len(order)
    out = []
    for model in models:
        pts = sorted((order[s["name"]], v) for s in model["sites"] for v in [_value(s, m)] if v is not None)
        if pts:
            out.append((model["label"], [p[0] for p in pts], [p[1] for p in pts]))
    return list(order), out


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    _pyplot().close(fig)
    return buf.getvalue()


def measure_png(models: Sequence[dict[str, Any]], m: Measure) -> bytes | None:
    """The figure of measure ``m`` for every model that has it (None when none does)."""
    names, lines = series(models, m)
    if not lines:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(min(max(6.0, 0.1 * len(names) + 3), 12), 4.2))
    for i, (label, xs, ys) in enumerate(lines):  # styles differ, so that a model equal to another still shows
        ax.plot(xs, ys, linestyle=_STYLES[i % len(_STYLES)], marker=_MARKERS[i % len(_MARKERS)] if len(xs) <= 60 else None,
                markersize=4 + (len(lines) - i), markerfacecolor="none", linewidth=1.2 + 0.6 * (len(lines) - 1 - i),
                label=label)
    if m.log:
        ax.set_yscale("log")
    step = max(1, math.ceil(len(names) / 30))
    ticks = list(range(0, len(names), step))
    ax.set_xticks(ticks)
    ax.set_xticklabels([names[i] for i in ticks], rotation=90, fontsize=7)
    ax.set_xlabel(f"layer (execution order; {len(names)} sites" + (f", one in {step} named)" if step > 1 else ")"))
    ax.set_ylabel(m.ylabel)
    ax.set_title(m.title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def cosine_png(models: Sequence[dict[str, Any]]) -> bytes | None:
    """The last batch's cosine matrix at the deepest geometry site, one panel per model."""
    mats = [(mdl["label"], site, mat) for mdl in models for site, mat in (mdl.get("cosine") or {}).items()]
    if not mats:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(mats), figsize=(4.2 * len(mats) + 1.0, 3.8), squeeze=False)
    image = None
    for ax, (label, site, mat) in zip(axes[0], mats):
        image = ax.imshow(mat, vmin=-1, vmax=1, cmap="RdBu_r")
        ax.set_title(f"{label}\n{site}", fontsize=8)
        ax.set_xlabel("sample")
        ax.set_ylabel("sample")
    fig.colorbar(image, ax=list(axes[0]), shrink=0.8, label="cosine")
    fig.suptitle("Cosine matrix of the batch at the deepest geometry site", fontsize=10)
    return _png(fig)
