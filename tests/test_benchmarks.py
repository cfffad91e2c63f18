"""The benchmark harness (python -m benchmarks) on tiny sizes: its JSON, its generated page, its contamination check."""

from __future__ import annotations

import itertools
import json
import math
import random
import time
from pathlib import Path

import pytest
import torch

import normswap  # noqa: F401  (before torchvision: the import guard)
from benchmarks import __main__ as harness
from benchmarks import report, targets, timing
from benchmarks.claims import verdict
from conftest import fashion_mnist_available

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    if not fashion_mnist_available():
        pytest.skip("Fashion-MNIST not installed (run scripts/setup.sh: Debian dataset-fashion-mnist)")
    out = tmp_path_factory.mktemp("bench")
    threads = torch.get_num_threads()
    try:
        res = harness.run("tiny", list(harness.SECTIONS), out, 1, torch.device("cpu"), log=lambda s: None)
    finally:
        torch.set_num_threads(threads)
    return res, out


def _speed_rows(res: dict) -> list[dict]:
    return [r for s in res["sections"].values() if s["kind"] == "speed" for r in s["rows"]]


def test_json_schema(tiny: tuple[dict, Path]) -> None:
    res, out = tiny
    saved = json.loads((out / "benchmarks.json").read_text())
    assert saved == json.loads(json.dumps(res))
    assert set(saved) >= {"profile", "machine", "method", "command", "sections", "targets", "seconds", "load_note"}
    assert saved["profile"] == "tiny"
    assert list(saved["sections"]) == ["layers", "models", "tool", "accuracy", "claims"]
    assert {"torch", "threads", "omp_wait_policy", "cpu", "device"} <= set(saved["machine"])
    for sec in saved["sections"].values():
        assert {"title", "how", "kind", "rows", "seconds"} <= set(sec) and sec["rows"], sec["title"]
    keys = {"group", "what", "baseline", "candidate", "ratio", "q1", "q3", "min", "max", "spread", "drift",
            "base_ms", "new_ms", "repeats", "flags", "others_cpu", "self_ratio"}
    speed = [r for r in _speed_rows(saved) if "skipped" not in r]
    assert len(speed) > 40
    for r in speed:
        assert keys <= set(r), r
    groups = {(r["group"], r["candidate"]) for r in speed}
    for expected in [("eval", "floor"), ("eval", "unfold"), ("train", "uan"), ("inference", "folded"),
                     ("inference", "anact exported"), ("inference vs folded", "uan"), ("training step", "patchnorm"),
                     ("conversion", "convert + save (uan)"), ("conversion", "convert (anact)"), ("calibration", "calibrate (uan)"),
                     ("evaluation", "evaluate (uan)")]:
        assert expected in groups, expected
    assert len(saved["targets"]) == len(targets.TARGETS) + 1
    assert saved["targets"][-1]["today"].startswith("not measured: this profile shortens the recipe")
    acc = saved["sections"]["accuracy"]["rows"]
    assert [r["variant"] for r in acc] == ["patchnorm", "uan", "anact"]
    assert acc[1]["control"] == acc[0]["control"] and acc[1]["control_shared"] and "control=false" in acc[2]["overrides"]
    assert all(0 <= r["fine_tuned"]["agreement"] <= 1 for r in acc)
    assert {c["agrees"] for c in saved["sections"]["claims"]["claims"]} <= {True, False, None}


def test_ratios_positive_finite(tiny: tuple[dict, Path]) -> None:
    for r in _speed_rows(tiny[0]):
        if "skipped" in r:
            continue
        for k in ("ratio", "q1", "q3", "min", "max", "drift", "base_ms", "new_ms", "self_ratio"):
            assert math.isfinite(r[k]) and r[k] > 0, (r["what"], k, r[k])
        assert r["min"] <= r["q1"] <= r["ratio"] <= r["q3"] <= r["max"]


def test_markdown_regenerates_from_json(tiny: tuple[dict, Path]) -> None:
    _, out = tiny
    md = (out / "benchmarks.md").read_text()
    assert md == report.render(json.loads((out / "benchmarks.json").read_text()))
    assert "GENERATED from docs/benchmarks.json" in md and "python -m benchmarks --profile tiny" in md
    assert "Measured under load" in md and "## Targets (issues 13 and 14)" in md
    for title in ("1. Layer speed", "2. Whole models", "3. The tool itself", "4. Accuracy retention",
                  "5. The papers' claims at small scale"):
        assert f"## {title}" in md and md.count("How: ") == 5
    assert (out / "benchmarks-layers.png").stat().st_size > 1000
    assert (out / "benchmarks-mlp-batch.png").stat().st_size > 1000
    (out / "benchmarks.md").unlink()
    assert harness.main(["--render", "--out", str(out)]) == 0
    assert (out / "benchmarks.md").read_text() == md


def test_committed_page_is_generated_from_committed_json() -> None:
    page, data = ROOT / "docs" / "benchmarks.md", ROOT / "docs" / "benchmarks.json"
    assert page.read_text() == report.render(json.loads(data.read_text()))


def _work() -> None:
    sum(range(200))


def test_contamination_flag_trips_on_a_noisy_timer() -> None:
    rng = random.Random(0)
    fake = itertools.count()

    def noisy() -> float:  # a clock that other processes disturb: every reading is late by up to 9 ms
        return next(fake) * 1e-2 + rng.uniform(0, 9e-3)

    bench = timing.Bench({"repeats": 21, "warmup": 1}, device=torch.device("cpu"), clock=noisy, log=lambda s: None)
    (row,) = bench.compare("g", "noisy", {"a": _work, "b": _work}, "a")
    assert "noisy" in row["flags"] and row["spread"] > timing.SPREAD_LIMIT

    steps = iter(range(10**6))

    def drifting() -> float:  # a call's apparent time grows 4x over the rounds: a load that arrived mid-row
        i = next(steps)
        return i * 1e-3 * (1 + 3 * (i > 40))

    bench = timing.Bench({"repeats": 21, "warmup": 0}, device=torch.device("cpu"), clock=drifting, log=lambda s: None)
    (row,) = bench.compare("g", "drift", {"a": _work, "b": _work}, "a")
    assert "drift" in row["flags"] and row["drift"] > 1 + timing.DRIFT_LIMIT

    quiet = timing.Bench({"repeats": 21, "warmup": 1}, device=torch.device("cpu"), log=lambda s: None)
    clock = itertools.count()
    quiet.clock = lambda: float(next(clock))  # every call takes exactly one tick: ratio 1, nothing flagged
    (row,) = quiet.compare("g", "steady", {"a": _work, "b": _work}, "a")
    assert row["flags"] == [] and row["ratio"] == 1.0 and row["spread"] == 0.0 and row["self_ratio"] == 1.0


def test_ratio_stats_known_values() -> None:
    s = timing.ratio_stats({"a": [1.0, 1.0, 1.0, 1.0, 1.0], "b": [2.0, 2.0, 3.0, 2.0, 2.0]}, "a", "b")
    assert s["ratio"] == 2.0 and s["max"] == 3.0 and s["min"] == 2.0 and s["drift"] == 1.0
    assert s["base_ms"] == 1000.0 and s["new_ms"] == 2000.0 and s["repeats"] == 5


def test_verdict() -> None:
    assert verdict([0.80, 0.81, 0.82], [0.70, 0.71, 0.72]) == "better"
    assert verdict([0.70, 0.71, 0.72], [0.80, 0.81, 0.82]) == "worse"
    assert verdict([0.70, 0.80, 0.75], [0.72, 0.78, 0.74]) == "same within noise"


def test_targets_read_their_rows() -> None:
    row = {"group": "inference", "what": "resnet50 batch 4 at 160 px", "candidate": "uan", "baseline": "original",
           "ratio": 1.2, "q1": 1.1, "q3": 1.3, "flags": [], "memory_ratio": 1.6}
    calib = {"group": "calibration", "what": "mobilenet_v2", "candidate": "calibrate (anact)", "baseline": "forwards",
             "ratio": 1.25, "q1": 1.2, "q3": 1.3, "flags": []}
    out = {t["what"]: t for t in targets.evaluate({"models": {"rows": [row]}, "tool": {"rows": [calib]}})}
    uan = out["resnet50 inference, UAN K=3 at strength 1"]
    assert uan["met"] is False and "memory 1.60x" in uan["today"]  # fast enough, but over the memory target
    assert out["calibration throughput vs plain forward, ANAct"]["today"].startswith("0.80x throughput")
    assert out["calibration throughput vs plain forward, ANAct"]["met"] is True
    assert out["MobileNetV2 inference, UAN at strength 1"] == {
        "issue": "14", "what": "MobileNetV2 inference, UAN at strength 1", "target": "<= 1.5x", "today": "not measured",
        "met": None}


def test_targets_show_the_eager_fallback_beside_the_default() -> None:
    rows = [{"group": "inference", "what": "resnet50 batch 4 at 160 px", "candidate": c, "baseline": "original",
             "ratio": r, "q1": r - 0.1, "q3": r + 0.1, "flags": []} for c, r in (("uan", 1.25), ("uan eager", 4.5))]
    uan = {t["what"]: t for t in targets.evaluate({"models": {"rows": rows}})}["resnet50 inference, UAN K=3 at strength 1"]
    assert uan["met"] is True  # the default (native) decides; the eager figure is shown, never used
    assert uan["today"] == "1.25x (IQR 1.15-1.35); eager torch path (`NORMSWAP_NATIVE=0`): 4.50x (IQR 4.40-4.60)"
    calib = [{"group": "calibration", "what": "mobilenet_v2", "candidate": c, "baseline": "forwards", "ratio": r,
              "q1": r, "q3": r, "flags": []} for c, r in (("calibrate (anact)", 1.25), ("calibrate (anact) eager", 2.0))]
    anact = {t["what"]: t for t in targets.evaluate({"tool": {"rows": calib}})}[
        "calibration throughput vs plain forward, ANAct"]
    assert anact["today"] == "0.80x throughput (1.2x the time); eager torch path (`NORMSWAP_NATIVE=0`): 0.50x throughput"


def test_bad_section_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        harness.main(["--only", "layers,nope", "--out", "/nonexistent"])
    assert e.value.code == 2
    assert "unknown section(s) nope" in capsys.readouterr().err


def test_interleave_alternates_order() -> None:
    calls: list[str] = []
    timing.interleave({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3, 1, clock=time.perf_counter)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
