"""Calibration fidelity on real material: the tables of docs/calibration.md.

    .venv/bin/python benchmarks/bench_calibration.py [--quick] [--out benchmarks/results/calibration.json]

1. Pretrained MobileNetV2 (IMAGENET1K_V1, offline) on the built-in real photos (seeded random resized crops,
   disjoint calibration / evaluation draws): UAN (K = 3) at strength 0; PatchNorm converted and calibrated
   at strengths 0.01, 0.1 and 1; ANAct. Each: top-1 agreement with the original, logit cosine, KL, before and
   after calibration, at the model's strength and at 1.
2. The Fashion-MNIST CNN of examples/fmnist_cnn.py (trained once, cached) on the real test split: test accuracy
   of the original and the converted model, for each variant.
Every figure comes from ``normswap.calibrate``'s own report, in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "examples"))

import normswap  # noqa: E402


def _rows(report, strength: float) -> dict:
    out = {}
    for state in ("before calibration", "after calibration"):
        for s in sorted({0.0, strength, 1.0}):
            r = report.row(state, s)
            out[f"{state} @ {s:g}"] = {"agreement": r.agreement, "cosine": r.cosine, "kl": r.kl,
                                       "rel_error": r.rel_error, "accuracy": r.accuracy,
                                       "top5_overlap": r.top5_overlap, "confident_agreement": r.confident_agreement,
                                       "confident": r.confident}
    return out


def run_case(spec: str, weights: str, variant: str, strength: float, data: str, n_cal: int, n_eval: int,
             options: dict | None = None) -> dict:
    t0 = time.perf_counter()
    r = normswap.convert(spec, to=variant, weights=weights, strength=strength, options=options)
    c = normswap.calibrate(r, data, calib_samples=n_cal, eval_samples=n_eval, batch_size=32)
    rep = c.report
    gains = [s.info["ll_gain"] for s in rep.sites if "ll_gain" in s.info]
    after = [s.after for s in rep.sites if s.after is not None]
    before = [s.before for s in rep.sites if s.before is not None]
    med = lambda v: float(torch.tensor(v).median()) if v else None  # noqa: E731
    return {"model": spec, "variant": variant, "strength": strength, "data": rep.data["description"],
            "sites": len(r.plan.converted), "calibration_seconds": c.log.seconds,
            "total_seconds": time.perf_counter() - t0, "original_accuracy": rep.original_accuracy,
            "rows": _rows(rep, strength), "site_error_median_before": med(before),
            "site_error_median_after": med(after), "ll_gain_median": med(gains),
            "images": {k: len(v) for k, v in rep.data.get("images", {}).items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="64 calibration / 64 evaluation samples")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "calibration.json"))
    ap.add_argument("--table", metavar="JSON", help="only print the table of an earlier run's results file")
    ap.add_argument("--data", default="photos", help="MobileNetV2's data (stamps: held out by image)")
    ap.add_argument("--samples", type=int, default=None, help="calibration and evaluation samples for MobileNetV2")
    ap.add_argument("--mnv2-variants", action="store_true",
                    help="only MobileNetV2, one row per variant (uan 0, patchnorm 1, anact 0), with the "
                         "confidence columns")
    args = ap.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())))
        return
    n = args.samples or (64 if args.quick else 256)
    results = {"machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                          f"{torch.get_num_threads()} threads", "samples": n, "cases": []}
    mnv2 = ("mobilenet_v2", "IMAGENET1K_V1")
    cases = [(*mnv2, "uan", 0.0, {"k": 3}), (*mnv2, "patchnorm", 0.01, None), (*mnv2, "patchnorm", 0.1, None),
             (*mnv2, "patchnorm", 1.0, None), (*mnv2, "anact", 0.0, None)]
    if args.mnv2_variants:
        cases = [cases[0], cases[3], cases[4]]
    results["data"] = args.data
    for spec, w, variant, s, opts in cases:
        results["cases"].append(run_case(spec, w, variant, s, args.data, n, n, opts))
        print(f"done {spec} {variant} {s}", file=sys.stderr)
    if args.mnv2_variants:
        _write(args.out, results)
        print(confidence_table(results))
        return
    from fmnist_cnn import train

    weights = str(train(verbose=False))
    fm = str(ROOT / "examples" / "fmnist_cnn.py") + ":build"
    for variant, s in (("uan", 0.0), ("patchnorm", 1.0), ("anact", 0.0)):
        results["cases"].append(run_case(fm, weights, variant, s, "fashion-mnist", 1024, 2000))
        print(f"done fmnist {variant} {s}", file=sys.stderr)
    _write(args.out, results)
    print(table(results))


def _write(out: str, results: dict) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(out).with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(out)


def confidence_table(results: dict) -> str:
    """The held-out table of docs/calibration.md: agreement, top-5 overlap and agreement where the original is
    confident (p > 0.5, count in parentheses), at strengths 0 and 1, before -> after calibration."""
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    lines = ["| variant (fit for) | strength | top-1 agree before -> after | top-5 overlap before -> after | "
             "agree p>0.5 before -> after (n) | logit cos before -> after |", "|---|---|---|---|---|---|"]
    for c in results["cases"]:
        fit = c["strength"] if c["strength"] > 0 else 1.0
        for s in (0.0, 1.0):
            b, a = c["rows"][f"before calibration @ {s:g}"], c["rows"][f"after calibration @ {s:g}"]
            lines.append(f"| {c['variant']} ({fit:g}) | {s:g} | {pct(b['agreement'])} -> {pct(a['agreement'])} | "
                         f"{pct(b['top5_overlap'])} -> {pct(a['top5_overlap'])} | {pct(b['confident_agreement'])} -> "
                         f"{pct(a['confident_agreement'])} ({a['confident']}) | {b['cosine']:.3f} -> {a['cosine']:.3f} |")
    return "\n".join(lines)


def table(results: dict) -> str:
    """The markdown table of docs/calibration.md."""
    pct = lambda v: "-" if v is None else f"{100 * v:.1f}%"  # noqa: E731
    lines = ["| model, variant | strength S | top-1 agree @0 (after) | top-1 agree @S before -> after | "
             "top-1 agree @1 before -> after | logit cos @1 before -> after | accuracy: original / @S / @1 (after) | "
             "median site error at the fit strength before -> after | calibration s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for c in results["cases"]:
        r, s = c["rows"], c["strength"]
        b1, a1, a0 = r["before calibration @ 1"], r["after calibration @ 1"], r["after calibration @ 0"]
        bs, as_ = r[f"before calibration @ {s:g}"], r[f"after calibration @ {s:g}"]
        name = "MobileNetV2" if c["model"] == "mobilenet_v2" else "Fashion-MNIST CNN"
        lines.append(
            f"| {name}, {c['variant']} | {s:g} | {pct(a0['agreement'])} | {pct(bs['agreement'])} -> "
            f"{pct(as_['agreement'])} | {pct(b1['agreement'])} -> {pct(a1['agreement'])} | "
            f"{b1['cosine']:.3f} -> {a1['cosine']:.3f} | "
            f"{pct(c['original_accuracy'])} / {pct(as_['accuracy'])} / {pct(a1['accuracy'])} | "
            f"{c['site_error_median_before'] or 0:.3f} -> {c['site_error_median_after'] or 0:.3f} | "
            f"{c['calibration_seconds']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
