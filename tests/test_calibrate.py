"""The calibration runner, the fidelity report, normswap.calibrate / evaluate: exact start kept, fits that
match hand computations, state restored on error."""

from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import normswap
from normswap.calibration.report import measure
from normswap.calibration.runner import execution_order, run_calibration
from normswap.variants import strengths_of
from normswap.data import open_data
from normswap.errors import NormswapError, OptionError, UsageError
from normswap.core.probe import ProbeInput
from normswap.variants.patchnorm import fit_gain

from conftest import randomize_bn


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(32, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 5)))


def batches(n: int = 4, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 3, 10, 10, generator=g) * 2 + 0.5 for _ in range(n)]


def no_hooks(model: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_patchnorm_network_order_first_layer_is_the_plain_least_squares_fit():
    model = cnn()
    r = normswap.convert(model, to="patchnorm", strength=1.0)
    data = batches()
    log = run_calibration(r.model, r.plan, data, reference=r.original, layerwise=True)
    first = copy.deepcopy(normswap.convert(cnn(), to="patchnorm", strength=1.0).model[0])
    targets = [model[1](model[0](x)) for x in data]
    with torch.no_grad():
        fit_gain(first, data, targets)
    torch.testing.assert_close(r.model[0].gain, first.gain, rtol=1e-6, atol=1e-6)
    assert log.sites["0"]["method"].startswith("network order (layer by layer) against the original model")
    assert no_hooks(r.model) and no_hooks(r.original)


def test_streaming_network_order_matches_layerwise_closely_and_keeps_the_exact_start():
    data = batches(6)
    a = normswap.convert(cnn(), to="patchnorm", strength=1.0)
    b = normswap.convert(cnn(), to="patchnorm", strength=1.0)
    run_calibration(a.model, a.plan, data, reference=a.original, layerwise=True)
    run_calibration(b.model, b.plan, data, reference=b.original)
    for s in a.plan.converted:
        ga, gb = a.model.get_submodule(s.name).gain.detach(), b.model.get_submodule(s.name).gain.detach()
        assert float((ga - gb).abs().max() / ga.abs().max()) < 0.05, s.name
    assert set(strengths_of(b.model).values()) == {1.0}  # restored
    x = torch.randn(4, 3, 10, 10)
    for m in strengths_of(b.model):
        m.set_strength(0.0)
    torch.testing.assert_close(b.model(x), b.original(x), rtol=1e-5, atol=1e-5)


def test_calibration_raises_patchnorm_fidelity_at_full_strength():
    r = normswap.convert(cnn(), to="patchnorm", strength=1.0)
    before = copy.deepcopy(r.model)
    run_calibration(r.model, r.plan, batches(6), reference=r.original)
    ev = [(x, None) for x in batches(3, seed=7)]
    rows, per_site, _, n = measure(r.original, {"before": before, "after": r.model}, r.plan, ev, [0.0, 1.0], 1.0)
    row = {(x.model, x.strength): x for x in rows}
    assert n == 18
    assert row[("before", 0.0)].rel_error < 1e-6 and row[("after", 0.0)].rel_error < 1e-6
    assert row[("after", 1.0)].rel_error < row[("before", 1.0)].rel_error
    assert all(per_site["after"][s] < per_site["before"][s] for s in per_site["after"])


def test_without_reference_the_model_at_strength_zero_is_the_target():
    r = normswap.convert(cnn(), to="patchnorm", strength=1.0)
    other = normswap.convert(cnn(), to="patchnorm", strength=1.0)
    data = batches()
    run_calibration(r.model, r.plan, data, reference=r.original)
    log = run_calibration(other.model, other.plan, data)
    assert "against this model at strength 0" in log.sites["0"]["method"]
    torch.testing.assert_close(other.model[0].gain, r.model[0].gain)


@pytest.mark.parametrize("layerwise", [True, False], ids=["layerwise", "streaming"])
@pytest.mark.parametrize("where", ["bad batch", "second layer"])
def test_error_midway_restores_everything(monkeypatch, layerwise, where):
    """A bad batch (the first layer's forward fails), or an error in the second layer's fit after the first layer
    was solved: every gain, strength, mode and hook is as before."""
    r = normswap.convert(cnn(), to="patchnorm", strength=1.0)
    r.model.train()
    gains = {s.name: r.model.get_submodule(s.name).gain.clone() for s in r.plan.converted}
    data = batches(3)
    if where == "bad batch":
        data[2] = torch.randn(2, 5, 10, 10)  # wrong channel count: the forward fails
    else:
        def fails(*args, **kwargs):
            raise RuntimeError("the second layer's fit failed")

        monkeypatch.setattr(r.model.get_submodule(r.plan.converted[1].name), "observe", fails)
    with pytest.raises(RuntimeError):
        run_calibration(r.model, r.plan, data, reference=r.original, layerwise=layerwise)
    assert all(m.training for m in r.model.modules())
    assert no_hooks(r.model) and no_hooks(r.original)
    for s in r.plan.converted:
        module = r.model.get_submodule(s.name)
        assert module._calib is None and module.current_strength() == 1.0
        assert torch.equal(module.gain, gains[s.name]), s.name  # not left half-calibrated


def test_anact_statistics_from_data_and_exact_start_kept():
    r = normswap.convert(cnn(), to="anact")
    data = batches()
    pre = []
    h = r.original[9].register_forward_hook(lambda _m, _a, out: pre.append(out.detach().clone()))
    with torch.no_grad():
        for x in data:
            r.original(x)
    h.remove()
    x = torch.cat(pre).reshape(-1).double()
    f = x.clamp_min(0)
    run_calibration(r.model, r.plan, data)
    site = r.model[10]
    torch.testing.assert_close(site.running_mean.double(), f.mean(), rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(site.running_rho.double(), f.square().mean() / x.var(unbiased=False), rtol=1e-5, atol=0)
    probe = torch.randn(5, 3, 10, 10)
    torch.testing.assert_close(r.model(probe), r.original(probe), rtol=1e-5, atol=1e-5)


def test_batchnorm_reestimation_is_a_cumulative_average():
    r = normswap.convert(cnn(), to="anact")  # the BatchNorms stay
    data = batches(3)
    log = run_calibration(r.model, r.plan, data, reestimate_bn=True)
    bn = r.model[1]
    conv = r.model[0]
    means = [conv(x).mean((0, 2, 3)) for x in data]
    vars_ = [conv(x).transpose(0, 1).reshape(8, -1).var(1, unbiased=True) for x in data]
    torch.testing.assert_close(bn.running_mean, torch.stack(means).mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, torch.stack(vars_).mean(0), rtol=1e-5, atol=1e-6)
    assert bn.momentum == 0.1 and not bn.training
    assert log.bn_reestimated == ["1", "4", "9"]


def test_execution_order_follows_the_forward_not_the_names():
    class Swapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.b = nn.Linear(4, 4)
            self.a = nn.Linear(4, 4)

        def forward(self, x):
            return self.a(self.b(x))

    assert execution_order(Swapped(), ["a", "b"], ProbeInput((torch.randn(2, 4),))) == ["b", "a"]


def test_measure_metrics_against_hand_computation():
    ref = nn.Linear(4, 3)
    other = copy.deepcopy(ref)
    with torch.no_grad():
        other.bias.add_(torch.tensor([0.5, -0.5, 0.0]))
    x = torch.randn(10, 4)
    y = torch.randint(0, 3, (10,))
    plan = normswap.Plan(variant="uan")
    rows, _, acc, n = measure(ref, {"m": other}, plan, [(x, y)], [0.0], None)
    a, b = ref(x).detach().double(), other(x).detach().double()
    row = rows[0]
    assert n == 10
    assert row.agreement == pytest.approx(float((a.argmax(1) == b.argmax(1)).double().mean()))
    assert row.cosine == pytest.approx(float(torch.cosine_similarity(a, b, dim=1).mean()))
    kl = (a.softmax(1) * (a.log_softmax(1) - b.log_softmax(1))).sum(1).mean()
    assert row.kl == pytest.approx(float(kl))
    assert row.rel_error == pytest.approx(float((b - a).norm() / a.norm()))
    assert row.accuracy == pytest.approx(float((b.argmax(1) == y).double().mean()))
    assert acc == pytest.approx(float((a.argmax(1) == y).double().mean()))


@pytest.fixture
def tensor_file(tmp_path):
    g = torch.Generator().manual_seed(3)
    path = tmp_path / "data.safetensors"
    save_file({"inputs": torch.randn(40, 3, 10, 10, generator=g), "labels": torch.randint(0, 5, (40,), generator=g)},
              str(path))
    return str(path)


def test_calibrate_api_reports_both_ends_and_keeps_the_start(tensor_file):
    r = normswap.convert(cnn(), to="patchnorm", strength=1.0)
    out = normswap.calibrate(r, tensor_file, calib_samples=24, eval_samples=16, batch_size=8)
    rep = out.report
    assert [(x.model, x.strength) for x in rep.rows] == [
        ("before calibration", 0.0), ("before calibration", 1.0), ("after calibration", 0.0), ("after calibration", 1.0)]
    assert rep.row("after calibration", 0.0).agreement == 1.0
    assert rep.row("after calibration", 0.0).rel_error < 1e-6
    assert rep.row("after calibration", 1.0).rel_error < rep.row("before calibration", 1.0).rel_error
    assert rep.original_accuracy is not None and rep.samples == 16
    assert rep.calibration["samples"] == 24 and rep.calibration["strength"] == 1.0
    assert rep.reference == "the original model"
    text = rep.render()
    assert "end to end on 16 held-out samples" in text and "after calibration" in text
    with pytest.raises(KeyError, match="no row for 'after calibration' at strength 0.5"):
        rep.row("after calibration", 0.5)


def test_calibrate_and_evaluate_a_saved_file(tmp_path, tensor_file):
    r = normswap.convert(cnn(), to="uan")
    path = r.save(tmp_path / "m.safetensors")
    model = normswap.load(path, model=cnn())
    out = normswap.calibrate(model, tensor_file, calib_samples=24, eval_samples=16, strengths=[0.0])
    assert out.report.reference.startswith("this model at strength 0")
    assert all(s.info["ll_gain"] > 0 for s in out.report.sites)  # EM wrote a mixture that fits better than one
    spread = {s.name: float((m.mix_mean.max(0).values - m.mix_mean.min(0).values).max())
              for s in r.plan.converted for m in [out.model.get_submodule(s.name)]}
    assert spread["1"] > 0.1 and spread["4"] > 0.01, spread  # measured 0.46, 0.030 (and 8e-5 at '9', a BatchNorm1d
    # fitted on 24 values per channel: nearly one Gaussian)
    rep = normswap.evaluate(out.model, tensor_file, original=cnn(), eval_samples=16, strengths=[0.0, 0.5])
    assert [x.model for x in rep.rows] == ["converted", "converted"] and rep.reference == "the original model"
    start, half = rep.row("converted", 0.0), rep.row("converted", 0.5)
    assert start.agreement == 1.0 and start.rel_error == 0.0  # the original's function, bit for bit, after EM
    assert half.rel_error > 1e-3  # ... and what EM wrote is in use as soon as strength > 0


def test_calibrate_errors(tensor_file):
    r = normswap.convert(cnn(), to="patchnorm", strength=1.0)
    with pytest.raises(OptionError, match="^em_init must be one of quantile, kmeans\\+\\+; got 'random'$"):
        normswap.calibrate(r, tensor_file, em_init="random")
    with pytest.raises(OptionError, match="strength must be in \\[0, 1\\]; got 2.0"):
        normswap.calibrate(r, tensor_file, strength=2.0)
    with pytest.raises(NormswapError, match="^this model carries no normswap plan"):
        normswap.calibrate(cnn(), tensor_file)
    with pytest.raises(UsageError, match="no default calibration data for this model"):
        normswap.calibrate(normswap.convert(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)), to="uan"))
    with pytest.raises(NormswapError, match="calibration needs at least one batch of data"):
        run_calibration(r.model, r.plan, [])


def test_data_split_object_is_accepted(tensor_file):
    r = normswap.convert(cnn(), to="anact")
    split = open_data(tensor_file, calib_samples=8, eval_samples=8)
    out = normswap.calibrate(r, split, batch_size=4)
    assert out.log.batches == 2 and out.log.samples == 8


def test_layernorm_sites_calibrate_in_sample_mode(tiny_vit, tmp_path):
    g = torch.Generator().manual_seed(4)
    path = str(tmp_path / "img.safetensors")
    save_file({"inputs": torch.randn(24, 3, 32, 32, generator=g)}, path)
    r = normswap.convert(tiny_vit, to="uan")
    out = normswap.calibrate(r, path, calib_samples=16, eval_samples=8, batch_size=8)
    assert out.report.row("after calibration", 0.0).rel_error < 1e-6
    assert all(s.info["ll_gain"] >= 0 and s.info["values_per_channel"] > 0 for s in out.report.sites)
    lns = [out.model.get_submodule(s.name) for s in r.plan.converted]
    assert any(float(m.mix_mean.max() - m.mix_mean.min()) > 0.1 for m in lns)  # pooled z values separated


def test_synthetic_data_is_said_loudly(recwarn):
    from normswap.data import RandomDataWarning

    r = normswap.convert(cnn(), to="uan")
    out = normswap.calibrate(r, "synthetic:3x10x10", calib_samples=8, eval_samples=8)
    assert any(issubclass(w.category, RandomDataWarning) for w in recwarn.list)
    assert "synthetic random inputs: these figures say nothing about real data" in out.report.render()


def test_calibration_config_and_keywords_are_one_set_of_settings():
    """``normswap.calibrate`` takes a typed CalibrationConfig; keywords override it; an unknown one is one line."""
    from normswap.api.calibration import CalibrationConfig

    base = CalibrationConfig(calib_samples=64, em_init="kmeans++")
    merged = CalibrationConfig.build(base, seed=3, strengths=[0, 1])
    assert (merged.calib_samples, merged.em_init, merged.seed, merged.strengths) == (64, "kmeans++", 3, (0, 1))
    with pytest.raises(OptionError) as err:
        CalibrationConfig.build(base, calib_sample=3)
    assert str(err.value) == ("unknown calibration setting 'calib_sample'; valid settings: calib_samples, eval_samples, "
                              "batch_size, seed, strength, strengths, reestimate_bn, em_init, em_samples, em_tol, "
                              "layerwise")
    with pytest.raises(OptionError, match=r"^em_init must be one of quantile, kmeans\+\+; got 'random'$"):
        CalibrationConfig.build(None, em_init="random")
    with pytest.raises(OptionError, match="^unknown calibration setting 'calib_sample'"):
        normswap.calibrate(nn.Sequential(nn.Linear(2, 2)), None, calib_sample=3)
