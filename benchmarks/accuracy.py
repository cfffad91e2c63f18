"""Section 4, accuracy retention on real data: each variant's fine-tuning recipe in ``recipes/`` (the
Fashion-MNIST CNN; pretrained MobileNetV2 on held-out ``stamps`` images), before calibration, after
calibration, after fine-tuning at strength 1, against the original and the same-budget control."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import normswap

from .timing import Bench

ROOT = Path(__file__).resolve().parent.parent
HOW = ("`normswap.finetune(recipe, overrides)` on each recipe in `recipes/` (seed 0), with the overrides shown "
       "(the quick profile shortens the recipes: its figures are below what the full recipes reach; "
       "docs/finetune.md has those). Every figure is on the recipe's held-out evaluation split: top-1 "
       "agreement with the original, and accuracy where the data has labels. *Before calibration*: "
       "`normswap.convert` at strength 1 evaluated with `normswap.evaluate`; *after calibration*: the recipe's "
       "model after its calibration, before training, at strength 1; *fine-tuned*: at strength 1 after the "
       "recipe; *control*: the original fine-tuned with the same budget (Fashion-MNIST only: the MobileNetV2 "
       "recipes have no labels, so a control has nothing to learn). The recipes of one model differ only in the "
       "variant, so the control runs once, with the first recipe, and serves all three (`control=false` on the "
       "others).")
CASES = [("Fashion-MNIST CNN", "fmnist", ("patchnorm", "uan", "anact")),
         ("MobileNetV2 (stamps)", "mobilenet_v2", ("uan", "patchnorm", "anact"))]


def _figures(row: dict[str, Any] | None) -> dict[str, Any]:
    if row is None:
        return {"agreement": None, "accuracy": None}
    return {"agreement": row.get("agreement"), "accuracy": row.get("accuracy")}


def _before_calibration(recipe: Any) -> dict[str, Any]:
    """The converted model at the recipe's final strength, uncalibrated, on the recipe's evaluation split."""
    r = normswap.convert(recipe.model.source, to=recipe.convert.to, options=dict(recipe.convert.options) or None,
                         weights=recipe.model.weights, strength=recipe.strength.to)
    opts = {"image_size": recipe.data.image_size} if recipe.data.image_size else None
    rep = normswap.evaluate(r, recipe.data.spec, eval_samples=recipe.eval.samples, batch_size=recipe.eval.batch_size,
                            seed=recipe.seed, strengths=[recipe.strength.to], data_options=opts)
    row = rep.row("converted", recipe.strength.to)
    return {"agreement": row.agreement, "accuracy": row.accuracy}


def run_recipe(path: Path, overrides: list[str], out_dir: Path) -> dict[str, Any]:
    """One recipe: the row of the accuracy table."""
    recipe = normswap.load_recipe(path, overrides)
    t0 = time.perf_counter()
    before = _before_calibration(recipe)
    t1 = time.perf_counter()
    res = normswap.finetune(recipe, output=out_dir / f"{path.stem}.safetensors", force=True)
    t2 = time.perf_counter()
    s, final = res.summary, recipe.strength.to

    def get(label: str, strength: float | None = None) -> dict[str, Any] | None:
        try:
            return s.row(label, strength)
        except KeyError:
            return None
    return {"recipe": f"recipes/{path.name}", "variant": recipe.convert.to, "overrides": overrides,
            "steps": res.summary.training.get("converted", {}).get("steps"), "samples": s.rows[0]["samples"],
            "original": _figures(get("original")), "before_calibration": before,
            "after_calibration": _figures(get("converted, before fine-tuning")),
            "fine_tuned": _figures(get("converted, fine-tuned", final)),
            "control": _figures(get("control: original, fine-tuned")),
            "seconds": round(time.perf_counter() - t0, 1), "finetune_seconds": round(t2 - t1, 1)}


def run(bench: Bench) -> dict[str, Any]:
    sz = bench.sizes
    rows, notes = [], []
    with tempfile.TemporaryDirectory(prefix="normswap-bench-") as tmp:
        for label, stem, variants in CASES:
            overrides = sz["fmnist_overrides"] if stem == "fmnist" else sz["mnv2_overrides"]
            if overrides is None:
                notes.append(f"{label}: not run in this profile")
                continue
            overrides = list(overrides) + ["output.plot=false"]
            if stem == "fmnist" and sz["fmnist_source"]:
                overrides.append(f"model.source={sz['fmnist_source']}")
            control = None
            for variant in variants:
                path = ROOT / "recipes" / f"{stem}-{variant}.yaml"
                # the recipes of one model differ only in the variant: one control (the first's) serves them all
                extra = ["control=false"] if control is not None else []
                bench.log(f"recipe {path.name} {' '.join(overrides + extra)}")
                row = run_recipe(path, overrides + extra, Path(tmp))
                row["model"] = label
                if control is not None:
                    row.update(control=control, control_shared=True)
                elif row["control"]["agreement"] is not None:
                    control = row["control"]
                rows.append(row)
                bench.log(f"  before calibration {row['before_calibration']}, after {row['after_calibration']}, "
                          f"fine-tuned {row['fine_tuned']}, control {row['control']} ({row['seconds']} s)")
    return {"title": "4. Accuracy retention", "how": HOW, "kind": "accuracy", "rows": rows, "notes": notes}
