"""The figures the README and docs quote, re-measured with tolerance bands (slow: ``pytest -m slow``).

A regression in exactness, calibration fidelity or fine-tuning shows up here as a figure leaving its band. Each
case runs the same settings as the figure it pins (benchmarks/bench_calibration.py for docs/calibration.md, the
README's demo recipe for its table). The bands allow for another torch build or thread count, not for a change
of method: agreement on 256 crops is +-4 points (10 crops), on 2000 Fashion-MNIST images +-2 points; cosines
+-0.03; an exact claim is exact. docs/testing.md lists what is pinned and how long it takes."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

import normswap

from conftest import needs_fmnist, needs_mobilenet

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
FMNIST = str(ROOT / "examples" / "fmnist_cnn.py") + ":build"


def near(value: float | None, expected: float, band: float, what: str) -> None:
    assert value is not None and abs(value - expected) <= band, f"{what}: {value} is outside {expected} +- {band}"


def calibrated(spec: str, weights: str, variant: str, strength: float, data: str, n_cal: int, n_eval: int,
               options: dict | None = None) -> normswap.FidelityReport:
    """As benchmarks/bench_calibration.py's run_case: convert, calibrate, the report."""
    r = normswap.convert(spec, to=variant, weights=weights, strength=strength, options=options)
    return normswap.calibrate(r, data, calib_samples=n_cal, eval_samples=n_eval, batch_size=32).report


def exact_start(report: normswap.FidelityReport, strengths: tuple[float, ...] = (0.0,)) -> None:
    for state in ("before calibration", "after calibration"):
        for s in strengths:
            row = report.row(state, s)
            assert row.agreement == 1.0 and row.rel_error < 1e-5, (state, s, row)  # PatchNorm's folded BN: ~1e-6


# ------------------------------------------------------------------------------------------ README: exact start
@needs_mobilenet
def test_mobilenet_v2_exact_start_figures():
    """README: pretrained MobileNetV2 to uan max |logit diff| 0 (52 sites), to patchnorm about 1e-5 (52 pairs), to
    anact 1.2e-5 (35 sites: 18 folded, 17 unfolded); PatchNorm at strength 1 moves the logits by up to about 7.6."""
    uan = normswap.convert("mobilenet_v2", to="uan", weights="IMAGENET1K_V1")
    assert len(uan.plan.converted) == 52 and uan.report.end_to_end == 0.0
    pn = normswap.convert("mobilenet_v2", to="patchnorm", weights="IMAGENET1K_V1")
    assert len(pn.plan.converted) == 52 and 1e-6 <= pn.report.end_to_end <= 1e-4
    an = normswap.convert("mobilenet_v2", to="anact", weights="IMAGENET1K_V1")
    folded = sum(s.facts["exact_at"] == "every strength" for s in an.plan.converted)
    assert (len(an.plan.converted), folded) == (35, 18) and 3e-6 <= an.report.end_to_end <= 5e-5
    full = normswap.convert("mobilenet_v2", to="patchnorm", weights="IMAGENET1K_V1", strength=1.0)
    near(full.report.end_to_end, 7.6, 1.5, "max |logit diff| at strength 1")


def test_random_init_exact_start_figures():
    """README: resnet18 (random init) to anact 0 (all 9 ReLUs unfolded); resnet50 (random init) to patchnorm 4e-5
    (53 pairs)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights, said on purpose
        r18 = normswap.convert("resnet18", to="anact", weights="none")
        r50 = normswap.convert("resnet50", to="patchnorm", weights="none")
    assert len(r18.plan.converted) == 9 and r18.report.end_to_end == 0.0
    assert all(s.facts["exact_at"] == "strength 0" for s in r18.plan.converted)
    assert len(r50.plan.converted) == 53 and 4e-6 <= r50.report.end_to_end <= 4e-4


# ------------------------------------------------------------------------------------------ docs/calibration.md
@needs_fmnist
def test_fmnist_cnn_calibration_figures(fmnist_weights):
    """docs/calibration.md and README (1024 calibration, 2000 test images): PatchNorm at strength 1 from 11.9 % to
    82.3 % agreement, accuracy 10.1 % -> 74.7 % (original 85.0 %); UAN after EM 30.1 % agreement, cosine 0.633,
    accuracy 30.0 % at strength 1 and exact at 0; ANAct exact at 0, at 1 from 20.4 % to 73.6 % (accuracy 70.5 %).
    The CNN is trained once per machine (examples/fmnist_cnn.py), and its training depends on the thread count
    (85.05 % here with OMP_NUM_THREADS=1, 85.5 % in the README's 2-thread demo): bands of 3 points."""
    pn = calibrated(FMNIST, fmnist_weights, "patchnorm", 1.0, "fashion-mnist", 1024, 2000)
    near(pn.original_accuracy, 0.850, 0.01, "original accuracy")
    exact_start(pn)
    before, after = pn.row("before calibration", 1.0), pn.row("after calibration", 1.0)
    near(before.agreement, 0.119, 0.03, "agreement before"), near(after.agreement, 0.823, 0.03, "agreement after")
    near(before.accuracy, 0.101, 0.03, "accuracy before"), near(after.accuracy, 0.747, 0.03, "accuracy after")
    near(before.cosine, 0.385, 0.03, "cosine before"), near(after.cosine, 0.960, 0.03, "cosine after")
    uan = calibrated(FMNIST, fmnist_weights, "uan", 0.0, "fashion-mnist", 1024, 2000)
    exact_start(uan)
    assert uan.row("before calibration", 1.0).agreement == 1.0  # coinciding components: exact at any strength
    full = uan.row("after calibration", 1.0)
    near(full.agreement, 0.301, 0.03, "UAN agreement at 1"), near(full.cosine, 0.633, 0.03, "UAN cosine at 1")
    near(full.accuracy, 0.300, 0.03, "UAN accuracy at 1")
    an = calibrated(FMNIST, fmnist_weights, "anact", 0.0, "fashion-mnist", 1024, 2000)
    exact_start(an)  # its ReLUs feed zero-padded convs: unfolded, exact at strength 0 only
    near(an.row("before calibration", 1.0).agreement, 0.204, 0.03, "ANAct agreement at 1 before")
    near(an.row("after calibration", 1.0).agreement, 0.736, 0.03, "ANAct agreement at 1 after")
    near(an.row("after calibration", 1.0).accuracy, 0.705, 0.03, "ANAct accuracy at 1 after")


@needs_mobilenet
@pytest.mark.parametrize("strength, at_s, at_1, cos_1", [
    (1.0, (0.0, 0.0), (0.0, 0.0), (0.049, 0.484)),
    (0.1, (0.0, 0.020), (0.0, 0.0), (0.049, 0.157)),
    (0.01, (0.180, 0.590), (0.0, 0.0), (0.049, 0.137)),
])
def test_mobilenet_v2_patchnorm_calibration_figures(strength, at_s, at_1, cos_1):
    """docs/calibration.md, README (256 crops of 4 photos held out from calibration): gain calibration raises
    agreement from 18 % to 59 % at strength 0.01 and from 0 % to 2 % at 0.1; at 1 it stays 0 % while the logit
    cosine rises from 0.05 to 0.48. A few minutes each."""
    rep = calibrated("mobilenet_v2", "IMAGENET1K_V1", "patchnorm", strength, "photos", 256, 256)
    exact_start(rep)
    for (state, s), want in {("before calibration", strength): at_s[0], ("after calibration", strength): at_s[1],
                             ("before calibration", 1.0): at_1[0], ("after calibration", 1.0): at_1[1]}.items():
        near(rep.row(state, s).agreement, want, 0.04, f"agreement {state} at {s}")
    near(rep.row("before calibration", 1.0).cosine, cos_1[0], 0.03, "cosine before at 1")
    near(rep.row("after calibration", 1.0).cosine, cos_1[1], 0.03, "cosine after at 1")


@needs_mobilenet
def test_mobilenet_v2_uan_and_anact_calibration_figures():
    """docs/calibration.md, README: UAN stays exact at strength 0 after EM and agrees on 0 % at strength 1 (cosine
    0.26); ANAct stays exact at strength 0, and at 1 (17 of its 35 sites unfolded) agrees on 0 % (cosine 0.22 ->
    0.29)."""
    uan = calibrated("mobilenet_v2", "IMAGENET1K_V1", "uan", 0.0, "photos", 256, 256, {"k": 3})
    exact_start(uan)
    assert uan.row("before calibration", 1.0).agreement == 1.0  # coinciding components: exact at any strength
    full = uan.row("after calibration", 1.0)
    near(full.agreement, 0.0, 0.04, "UAN agreement at 1"), near(full.cosine, 0.259, 0.03, "UAN cosine at 1")
    an = calibrated("mobilenet_v2", "IMAGENET1K_V1", "anact", 0.0, "photos", 256, 256)
    exact_start(an)
    near(an.row("after calibration", 1.0).agreement, 0.0, 0.04, "ANAct agreement at 1")
    near(an.row("before calibration", 1.0).cosine, 0.220, 0.03, "ANAct cosine at 1 before")
    near(an.row("after calibration", 1.0).cosine, 0.288, 0.03, "ANAct cosine at 1 after")


# ------------------------------------------------------------------------------------------ README: fine-tuning
@needs_fmnist
def test_readme_finetuning_table(tmp_path, fmnist_weights):
    """README's demo (recipes/fmnist-patchnorm.yaml, 2000 held-out test images): original 85.5 %; converted before
    fine-tuning at 1: 84.2 % agreement, 77.9 % accuracy; fine-tuned at 0: 86.3 %, 80.8 %; at 1: 94.1 %, 88.3 %;
    control 95.2 %, 88.3 %; the model at strength 1 within a point of the control. The CNN and the runs depend on the
    thread count (measured here with OMP_NUM_THREADS=1: 85.05 %; 82.1 %, 74.5 %; 88.4 %, 82.7 %; 93.7 %, 87.2 %;
    94.6 %, 88.1 %), so the bands are 4 points; about 3 minutes on 2 quiet cores (6.5 on busy ones)."""
    t = normswap.finetune(ROOT / "recipes" / "fmnist-patchnorm.yaml", output=tmp_path / "pn.safetensors", force=True)
    s = t.summary
    near(s.row("original")["accuracy"], 0.855, 0.02, "original accuracy")
    for label, strength, agreement, accuracy in (("converted, before fine-tuning", 1.0, 0.842, 0.779),
                                                 ("converted, fine-tuned", 0.0, 0.863, 0.808),
                                                 ("converted, fine-tuned", 1.0, 0.941, 0.883),
                                                 ("control: original, fine-tuned", None, 0.952, 0.883)):
        row = s.row(label, strength)
        near(row["agreement"], agreement, 0.04, f"{label} at {strength}: agreement")
        near(row["accuracy"], accuracy, 0.04, f"{label} at {strength}: accuracy")
    tuned, control = s.row("converted, fine-tuned", 1.0), s.row("control: original, fine-tuned")
    assert abs(tuned["accuracy"] - control["accuracy"]) <= 0.01  # README: within a point of the control
    assert tuned["agreement"] > s.row("converted, before fine-tuning", 1.0)["agreement"] + 0.05  # fine-tuning helped
