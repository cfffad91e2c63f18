"""Calibration on real material: the Fashion-MNIST CNN (trained once, cached) with labels, and pretrained
MobileNetV2 on the built-in real photos."""

from __future__ import annotations

import pytest
import torch

import normswap

from conftest import needs_fmnist, needs_mobilenet

FMNIST_SPEC = "examples/fmnist_cnn.py:build"


@pytest.fixture(scope="module")
def fmnist_source(fmnist_weights):
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    return str(root / FMNIST_SPEC), fmnist_weights


@needs_fmnist
@pytest.mark.parametrize("variant, strength", [("uan", 0.0), ("patchnorm", 1.0), ("anact", 0.0)])
def test_fmnist_cnn_converts_and_calibrates_with_test_accuracy(fmnist_source, variant, strength):
    spec, weights = fmnist_source
    r = normswap.convert(spec, to=variant, weights=weights, strength=strength)
    out = normswap.calibrate(r, "fashion-mnist", calib_samples=256, eval_samples=500, batch_size=64)
    rep = out.report
    assert rep.data["has_labels"] and rep.samples == 500
    assert rep.original_accuracy > 0.7  # a real trained model on the real test split
    start = rep.row("after calibration", 0.0)
    assert start.agreement == 1.0 and start.accuracy == rep.original_accuracy
    full = rep.row("after calibration", 1.0)
    assert full.accuracy is not None and "accuracy" in rep.render()
    if variant == "patchnorm":
        assert full.agreement > rep.row("before calibration", 1.0).agreement + 0.3
        assert all(s.after < s.before for s in rep.sites)
    if variant == "uan":
        assert all(s.info["ll_gain"] > 0 for s in rep.sites)
    if variant == "anact":  # folded sites are exact at every strength; unfolded ones (zero-padded consumers) at 0 only
        folded = sum(s.facts["exact_at"] == "every strength" for s in r.plan.converted)
        unfolded = len(r.plan.converted) - folded
        assert folded and unfolded and full.agreement < 1.0
        assert (f"anact sites exact at every strength: {folded}, at strength 0: {unfolded} (folded into their "
                "consumers: every strength; unfolded: strength 0 only)") in rep.notes


@needs_mobilenet
def test_mobilenet_uan_on_photos_separates_components_and_keeps_the_start():
    r = normswap.convert("mobilenet_v2", to="uan", weights="IMAGENET1K_V1", options={"k": 3})
    out = normswap.calibrate(r, "photos", calib_samples=32, eval_samples=32, batch_size=16)
    rep = out.report
    assert rep.row("after calibration", 0.0).agreement == 1.0  # every held-out crop
    assert rep.row("after calibration", 1.0).agreement is not None  # reported; not expected to be high
    separated = total = 0
    for site in r.plan.converted:
        m = out.model.get_submodule(site.name)
        spread = (m.mix_mean.max(0).values - m.mix_mean.min(0).values).detach() / (m.running_var + m.eps).sqrt()
        separated += int((spread > 0.05).sum())
        total += spread.numel()
        m.set_strength(1.0)
        assert not m.claims_exact()  # separated components: at strength 1 the layer is no longer the BN
        m.set_strength(0.0)
    # measured: 96 % of the 17k channels; a few, e.g. in the 7x7 depthwise layer features.17.conv.1.1, stay
    # one Gaussian because a mixture does not fit them better (EM falls back to K coinciding components there)
    assert separated / total > 0.9, separated / total
    assert all(s.info["ll_gain"] > 0 for s in rep.sites)
    assert "log-lik gain" in rep.render()


@needs_mobilenet
def test_mobilenet_patchnorm_gain_calibration_raises_agreement():
    r = normswap.convert("mobilenet_v2", to="patchnorm", weights="IMAGENET1K_V1", strength=1.0)
    out = normswap.calibrate(r, "photos", calib_samples=32, eval_samples=32, batch_size=16)
    rep = out.report
    assert rep.row("after calibration", 1.0).cosine > rep.row("before calibration", 1.0).cosine + 0.3
    assert rep.row("after calibration", 0.0).agreement == 1.0
    x = torch.randn(2, 3, 224, 224)
    for m in out.model.modules():
        if isinstance(m, normswap.Variant):
            m.set_strength(0.0)
    torch.testing.assert_close(out.model(x), r.original(x), rtol=1e-4, atol=1e-4)
