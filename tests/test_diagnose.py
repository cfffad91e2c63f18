"""normswap diagnose: the measures against hand-computed values, the batch-geometry finding of Batch
Normalization Decomposed in a deep random MLP, PatchNorm's effective divergence, a failing run leaving the
model as it was, the CLI and its files, and the HTML report in a real headless browser (slow)."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import normswap
from normswap.cli.main import cli
from normswap.diagnostics.measures import GainStats, Moments, batch_geometry, cosine_matrix, divergence_factor, \
    effective_factor, effective_rank, odd_index, orthogonality_gap

from conftest import missing_asset, require_module

ROOT = Path(__file__).resolve().parents[1]


# ---- measures against hand-computed values ---------------------------------------------------------------
def test_geometry_of_a_collapsed_batch_by_hand():
    # three equal samples and one orthogonal odd sample three times longer: the paper's collapsed picture
    h = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [1.0, 0, 0], [0, 0, 3.0]])
    g = batch_geometry(h)
    assert g.odd == 3
    assert g.tightness == pytest.approx(1.0) and g.tightness_min == pytest.approx(1.0)
    assert g.odd_orthogonality == pytest.approx(0.0)
    assert g.norm_ratio == pytest.approx(3.0)  # 3 / median(1, 1, 1, 3)
    assert g.effective_rank == pytest.approx(1.0)  # centred rows all along (w - v)
    # G / 12 - I / 4: three diagonal -1/6, six off-diagonal 1/12 in the block, 1/2 for the odd sample
    assert g.orthogonality_gap == pytest.approx(math.sqrt(3 / 36 + 6 / 144 + 1 / 4))


def test_geometry_of_orthonormal_and_of_a_chain_by_hand():
    g = batch_geometry(torch.eye(4))
    assert (g.tightness, g.odd_orthogonality, g.norm_ratio, g.orthogonality_gap) == pytest.approx((0, 0, 1, 0))
    assert g.effective_rank == pytest.approx(3.0)  # J I J = J: eigenvalues 1, 1, 1, 0
    h = torch.tensor([[1.0, 0], [1.0, 1.0], [0, 1.0]])
    c = cosine_matrix(h)
    r = 1 / math.sqrt(2)
    assert torch.allclose(c, torch.tensor([[1, r, 0], [r, 1, r], [0, r, 1]], dtype=torch.float64))
    assert odd_index(c) == 0  # mean off-diagonal cosine: 0.354, 0.707, 0.354 (first minimum)
    g = batch_geometry(h)
    assert (g.tightness, g.odd_orthogonality, g.norm_ratio) == pytest.approx((r, r, 1.0))
    assert effective_rank(torch.ones(5, 3)) == 0.0 and math.isnan(orthogonality_gap(torch.zeros(3, 2)))
    with pytest.raises(ValueError, match="at least 3 samples"):
        batch_geometry(torch.eye(2))


def test_divergence_factor_and_moments_by_hand():
    lin = nn.Linear(2, 3)
    f = divergence_factor(lin, torch.tensor([[3.0, 4.0], [0.0, 0.0]]))
    assert f.tolist() == [26.0, 1.0]
    m = Moments()
    m.update(f[:1]), m.update(f[1:])  # streamed in two batches
    assert (m.mean, m.cv, m.ratio, m.count) == pytest.approx((13.5, 12.5 / 13.5, 26.0, 2))
    conv = nn.Conv2d(1, 2, 3, padding=1)
    f = divergence_factor(conv, torch.ones(1, 1, 3, 3))  # patch norms: corner 4, edge 6, centre 9
    assert f.squeeze().tolist() == [[5.0, 7.0, 5.0], [7.0, 10.0, 7.0], [5.0, 7.0, 5.0]]


def test_activation_gains_by_hand():
    g = GainStats("relu")
    g.update(torch.tensor([-1.0, 1.0]))
    # rho = E[relu(x)^2] / Var[x] = 0.5 / 1, rho' = E[relu'(x)^2] = 0.5, lam = sqrt(1 / (2 * 0.25)) = sqrt(2)
    assert (g.rho, g.rho_prime, g.lam) == pytest.approx((0.5, 0.5, math.sqrt(2)))


def test_patchnorm_effective_factor_is_one_at_strength_one():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5)).eval()
    x = torch.randn(7, 6) * 3
    layer = normswap.convert(model, to="patchnorm", example_inputs=x).model[0]
    assert torch.equal(effective_factor(layer, x), divergence_factor(layer, x))  # lam = 0: the source's factor
    layer.set_strength(1.0)
    assert torch.allclose(effective_factor(layer, x), torch.ones(7, dtype=torch.float32), atol=1e-6)


# ---- the paper's finding ------------------------------------------------------------------------------
def _deep_mlp(depth: int = 200, width: int = 128) -> nn.Sequential:
    torch.manual_seed(0)
    layers: list[nn.Module] = []
    for _ in range(depth):
        lin = nn.Linear(width, width, bias=False)
        nn.init.normal_(lin.weight, 0.0, math.sqrt(2 / width))  # He-Gaussian
        layers += [lin, nn.BatchNorm1d(width, affine=False), nn.ReLU()]
    return nn.Sequential(*layers).eval()


def test_recentering_collapses_a_deep_mlp_and_batchnorm_does_not():
    model = _deep_mlp()
    x = torch.randn(16, 128, generator=torch.Generator().manual_seed(0))
    rc = normswap.convert(model, to="recenter", strength=1.0, example_inputs=x).model
    report = normswap.diagnose(rc, x, compare=[model], batch_stats=True, labels=["recenter", "batchnorm"])
    last = {label: report.model(label).sites[-1].measures["geometry"] for label in ("recenter", "batchnorm")}
    # one tight cluster plus one orthogonal odd sample far away (measured: 0.89, 0.007, 18.7)
    assert last["recenter"]["tightness"] > 0.85
    assert last["recenter"]["odd_orthogonality"] < 0.02
    assert last["recenter"]["norm_ratio"] > 15
    assert last["recenter"]["effective_rank"] < 1.1
    # full BatchNorm with batch statistics: spread out, no odd sample (measured: 0.29, 0.35, 1.02)
    assert last["batchnorm"]["tightness"] < 0.4
    assert last["batchnorm"]["odd_orthogonality"] > 0.2
    assert last["batchnorm"]["norm_ratio"] < 1.5
    assert last["batchnorm"]["effective_rank"] > 10
    # batch statistics were used and the running statistics put back
    assert all(int(m.num_batches_tracked) == 0 for m in model.modules() if isinstance(m, nn.BatchNorm1d))
    assert not any(m.training for m in model.modules())


# ---- divergence of a PatchNorm conversion, failing runs ------------------------------------------------------
def _cnn() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3),
                          nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5), m.running_var.uniform_(0.5, 2)
    return model.eval()


def test_patchnorm_divergence_cv_near_zero_at_converted_sites():
    model = _cnn()
    x = torch.randn(8, 3, 12, 12)
    report = normswap.diagnose(model, x, compare_to=["patchnorm"], strength=1.0, at_init=True)
    assert [m.label for m in report.models] == ["Sequential", "Sequential -> patchnorm", "Sequential at init",
                                                "Sequential -> patchnorm at init"]
    fresh = report.model("Sequential -> patchnorm at init")
    assert fresh.batch_stats and fresh.sites[0].type == "PatchNormConv" and set(fresh.sites[0].measures) == set()
    assert report.values("Sequential -> patchnorm at init", "tightness")  # geometry only at init
    assert not report.values("Sequential at init", "divergence_cv")
    orig, pn = report.values("Sequential", "divergence_cv"), report.values("Sequential -> patchnorm", "divergence_cv")
    assert set(orig) == {"0", "3", "8"} and set(pn) == set(orig)
    for site in ("0", "3"):  # the converted conv->bn pairs
        assert pn[site] < 1e-6 < 0.05 < orig[site]
    assert report.model("Sequential -> patchnorm").sites[0].type == "PatchNormConv"
    for key in ("lam", "tightness", "grad_var", "forward_var"):
        assert report.values("Sequential", key) and report.values("Sequential -> patchnorm", key)


def test_uan_mixture_measures_channel_and_sample_mode():
    model = _cnn()
    x = torch.randn(8, 3, 12, 12)
    uan = normswap.convert(model, to="uan", example_inputs=x).model
    layer = uan[1]
    sd = (layer.running_var + layer.eps).sqrt()
    with torch.no_grad():  # components at -1, 0, +1 standard deviations, priors 1/2, 1/4, 1/4
        layer.mix_mean.copy_(layer.running_mean + sd * torch.tensor([-1.0, 0.0, 1.0])[:, None])
        layer.mix_logit.copy_(torch.log(torch.tensor([0.5, 0.25, 0.25]))[:, None].expand(3, 8))
    report = normswap.diagnose(uan, x)
    sites = {s.name: s.measures["uan"] for s in report.model("Sequential").sites if "uan" in s.measures}
    assert set(sites) == {"1", "4"}
    assert sites["1"]["separation"] == pytest.approx(2.0, rel=1e-5)
    assert sites["1"]["weights"] == pytest.approx([0.5, 0.25, 0.25])
    assert sites["4"]["separation"] == 0 and sites["4"]["ll_gain"] <= 1e-9 and sites["4"]["values"] == 8 * 10 * 10
    tokens = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 4)).eval()
    t = torch.randn(6, 5, 8)
    r = normswap.diagnose(normswap.convert(tokens, to="uan", example_inputs=t).model, t)
    (site,) = [s for s in r.model("Sequential").sites if "uan" in s.measures]
    assert site.type == "UANSample" and site.measures["uan"]["values"] == 6 * 5 * 16
    assert site.measures["uan"]["ll_gain"] <= 1e-9  # N(0, 1) on the z scale against the best Gaussian


class _Boom(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls, self.armed = 0, False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        if self.armed and self.calls == 2:
            raise RuntimeError("boom on the second batch")
        return x


def test_failing_run_removes_hooks_and_restores_the_model():
    model = _cnn()
    model.insert(6, _Boom())
    converted = normswap.convert(model, to="recenter", strength=0.25, example_inputs=torch.randn(4, 3, 12, 12)).model
    converted.train()
    converted[0].eval()
    before = {k: v.clone() for k, v in converted.state_dict().items()}
    converted[6].calls, converted[6].armed = 0, True
    with pytest.raises(RuntimeError, match="boom on the second batch"):
        normswap.diagnose(converted, torch.randn(8, 3, 12, 12), batch_size=4, batch_stats=True, strength=1.0)
    for m in converted.modules():
        assert not m._forward_hooks and not m._forward_pre_hooks
    assert converted.training and not converted[0].training and converted[1].training
    assert converted[1].current_strength() == pytest.approx(0.25)
    after = converted.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in converted.parameters())


# ---- CLI, files, real models -------------------------------------------------------------------------
def test_cli_resnet18_report_files_and_errors(tmp_path):
    out = tmp_path / "r18"
    runner = CliRunner()
    args = ["diagnose", "resnet18", "--weights", "none", "--samples", "4", "--batch-size", "4", "--image-size", "64",
            "--data", "synthetic", "--at-init", "--out", str(out)]
    res = runner.invoke(cli, args)
    assert res.exit_code == 0, res.output
    assert "note: synthetic random inputs" in res.output
    assert "resnet18 at init" in res.output and f"report written to {out / 'diagnose.html'}" in res.output
    data = json.loads((out / "diagnose.json").read_text())
    labels = [m["label"] for m in data["models"]]
    assert labels == ["resnet18", "resnet18 at init"] and data["models"][1]["batch_stats"]
    names = [s["name"] for s in data["models"][0]["sites"]]
    assert "layer1.0.relu" in names and "layer1.0.relu#2" in names  # the shared ReLU, once per call
    assert {"tightness.png", "divergence_cv.png", "grad_var.png", "cosine.png"} <= {p.name for p in out.iterdir()}
    html = (out / "diagnose.html").read_text()
    assert html.count("data:image/png;base64,") == len(list(out.glob("*.png"))) and "<script" not in html
    again = runner.invoke(cli, args)
    assert again.exit_code == 1 and again.output.strip().splitlines()[-1] == (
        f"Error: {out / 'diagnose.json'} exists; pass --force (force=True) to overwrite it")
    bad = runner.invoke(cli, ["diagnose", "resnet18", "--weights", "none", "--compare-to", "uann"])
    assert bad.exit_code == 2 and "unknown variant 'uann' (did you mean 'uan'?)" in bad.output
    assert "Traceback" not in bad.output + again.output


@pytest.fixture(scope="module")
def mnv2_report(tmp_path_factory):
    out = tmp_path_factory.mktemp("mnv2")
    report = normswap.diagnose("mobilenet_v2", weights="IMAGENET1K_V1", compare_to=["uan", "patchnorm"],
                               strength=1.0, samples=4, batch_size=4, data_options={"image_size": 112}, out=out)
    return report, out


@pytest.mark.slow
def test_mobilenet_v2_with_its_conversions(mnv2_report):
    report, out = mnv2_report
    assert [m.label for m in report.models] == ["mobilenet_v2", "mobilenet_v2 -> uan", "mobilenet_v2 -> patchnorm"]
    orig = report.values("mobilenet_v2", "divergence_cv")
    pn = report.values("mobilenet_v2 -> patchnorm", "divergence_cv")
    assert len(pn) == len(orig) == 53
    converted = [s.name for s in report.model("mobilenet_v2 -> patchnorm").sites if s.type == "PatchNormConv"]
    assert len(converted) == 52 and max(pn[n] for n in converted) < 1e-4 < 0.05 < min(orig[n] for n in converted)
    uan = [s.measures["uan"] for s in report.model("mobilenet_v2 -> uan").sites if "uan" in s.measures]
    # exact start: coinciding components, uniform priors; one Gaussian cannot beat the best one on the data
    assert len(uan) == 52 and all(u["separation"] == 0 and u["weights"] == pytest.approx([1 / 3] * 3) for u in uan)
    assert all(u["ll_gain"] <= 1e-9 for u in uan) and min(u["ll_gain"] for u in uan) < -0.01


@pytest.mark.slow
def test_html_report_in_a_headless_browser(mnv2_report):
    playwright = require_module("playwright.sync_api")
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        missing_asset("Debian's chromium", "scripts/setup.sh installs it")
    _, out = mnv2_report
    errors: list[str] = []
    shot = ROOT / "docs" / "diagnose-report.png" if os.environ.get("NORMSWAP_UPDATE_DOCS") else out / "shot.png"
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 900})
            page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto((out / "diagnose.html").as_uri())
            page.wait_for_load_state("load")
            widths = page.eval_on_selector_all("img", "imgs => imgs.map(i => i.complete ? i.naturalWidth : 0)")
            assert len(widths) >= 15 and all(w > 0 for w in widths), widths
            assert page.get_by_role("heading", name="Worst layers").count() == 1
            page.screenshot(path=str(shot), full_page=False)
        finally:
            browser.close()
    assert errors == []
    assert shot.stat().st_size > 10_000
