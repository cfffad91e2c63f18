"""EM for UAN calibration (normswap/variants/uan/em.py) and UAN's calibration hooks (variants/uan/calib.py)."""

from __future__ import annotations

import math
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from torch import nn  # noqa: E402

from normswap.compat import import_torchvision  # noqa: E402

import_torchvision()

from timm.layers import BatchNormAct2d  # noqa: E402
from torchvision.ops.misc import FrozenBatchNorm2d  # noqa: E402

from normswap.variants.uan.em import Reservoir, fit_gmm, mixture_loglik, single_gaussian  # noqa: E402
from normswap.core.plan import Site  # noqa: E402
from normswap.core.kinds import qualname  # noqa: E402
from normswap.variants import CalibrationSettings  # noqa: E402
from normswap.variants.uan import UAN, UANChannel, UANConfig, UANSample  # noqa: E402

# three channels, two components each: (means, standard deviations, prior of component 0)
MEANS = torch.tensor([[-2.0, 1.0], [0.0, 4.0], [5.0, 6.5]])
SDS = torch.tensor([[0.5, 1.0], [1.0, 0.7], [0.3, 0.4]])
PRIOR0 = torch.tensor([0.3, 0.5, 0.7])


def mixture_sample(n: int, seed: int = 0, c_rows: slice = slice(None)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    means, sds, prior0 = MEANS[c_rows], SDS[c_rows], PRIOR0[c_rows]
    comp = (torch.rand(means.shape[0], n, generator=g) >= prior0[:, None]).long()
    return torch.gather(means, 1, comp) + torch.gather(sds, 1, comp) * torch.randn(means.shape[0], n, generator=g)


def build(module: nn.Module, kind: str, **cfg) -> UAN:
    config = {**UANConfig(**cfg).to_dict(), "source_kind": kind}
    site = Site(name="layer", source_type=qualname(module), variant="uan", config=config)
    return UAN.from_site(site, module, [])


# ---- fit_gmm ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["quantile", "kmeans++"])
def test_em_recovers_a_known_two_gaussian_mixture(init):
    fit = fit_gmm(mixture_sample(20000), 2, init=init, seed=3)
    assert fit.mean.shape == fit.var.shape == fit.log_pi.shape == (2, 3)
    assert fit.converged and fit.n == 20000
    assert torch.all(fit.mean[0] <= fit.mean[1])  # sorted by mean
    assert torch.all((fit.mean - MEANS.t()).abs() <= 0.05 * SDS.t())
    assert torch.all((fit.var / SDS.t().square() - 1).abs() <= 0.10)
    priors = fit.log_pi.exp()
    torch.testing.assert_close(priors.sum(0), torch.ones(3, dtype=torch.float64))
    assert torch.all((priors[0] - PRIOR0).abs() <= 0.03)
    assert torch.all(fit.gain > 0.05)
    torch.testing.assert_close(mixture_loglik(mixture_sample(20000), fit.mean, fit.var, fit.log_pi), fit.loglik)


def test_em_is_deterministic_and_kmeanspp_seeds_reach_the_same_mixture():
    x = mixture_sample(4000, seed=1)
    for init in ("quantile", "kmeans++"):
        a, b = fit_gmm(x, 2, init=init, seed=7), fit_gmm(x, 2, init=init, seed=7)
        for key in ("mean", "var", "log_pi", "loglik", "history"):
            assert torch.equal(getattr(a, key), getattr(b, key)), (init, key)
        assert a.iterations == b.iterations
    a, b = fit_gmm(x, 2, init="kmeans++", seed=0), fit_gmm(x, 2, init="kmeans++", seed=12345)
    torch.testing.assert_close(a.mean, b.mean, atol=2e-3, rtol=0)
    torch.testing.assert_close(a.loglik, b.loglik, atol=1e-5, rtol=0)


@pytest.mark.parametrize("warm_group", [16, 0])
def test_log_likelihood_never_decreases_and_gain_is_not_negative(warm_group):
    x = torch.cat([mixture_sample(4096, seed=2), torch.randn(2, 4096, generator=torch.Generator().manual_seed(4))])
    fit = fit_gmm(x, 3, warm_group=warm_group, tol=1e-7, max_iter=200)
    assert fit.history.shape[1] == 5 and fit.history.shape[0] >= 2
    assert torch.all(fit.history.diff(dim=0) >= -1e-12)
    torch.testing.assert_close(fit.history[-1], fit.loglik)
    assert torch.all(fit.gain >= 0)
    assert torch.all(fit.gain[3:] < 2e-3)  # a single Gaussian: three components gain (almost) nothing
    assert torch.all(fit.gain[:3] > 0.05)
    # the K = 1 baseline is the ML Gaussian
    mean, var, loglik, n = single_gaussian(x)
    torch.testing.assert_close(fit.loglik_k1, loglik)
    torch.testing.assert_close(mean, x.double().mean(1))
    torch.testing.assert_close(var, x.double().var(1, unbiased=False))
    one = fit_gmm(x, 1)
    torch.testing.assert_close(one.loglik, loglik, atol=1e-9, rtol=0)
    torch.testing.assert_close(one.gain, torch.zeros(5, dtype=torch.float64), atol=1e-9, rtol=0)


def test_variance_floor_and_degenerate_channels():
    g = torch.Generator().manual_seed(0)
    spike = torch.where(torch.rand(4096, generator=g) < 0.5, torch.zeros(4096), torch.randn(4096, generator=g) + 3)
    x = torch.stack([spike, torch.full((4096,), 1.25), torch.randn(4096, generator=g)])
    fit = fit_gmm(x, 3, var_floor=1e-3)
    for t in (fit.mean, fit.var, fit.log_pi, fit.loglik, fit.gain):
        assert torch.isfinite(t).all()
    assert torch.all(fit.var >= 1e-3)
    assert fit.var[:, 0].min() == 1e-3  # the spike at 0 sits on the floor
    torch.testing.assert_close(fit.mean[:, 1], torch.full((3,), 1.25, dtype=torch.float64))
    assert torch.all(fit.var[:, 1] == 1e-3)
    torch.testing.assert_close(fit.log_pi.exp().sum(0), torch.ones(3, dtype=torch.float64))
    assert abs(float(fit.gain[1])) < 1e-13  # a constant channel: no gain over K = 1 (float64 rounding of the sums)
    # a dead component (no responsibility left) keeps finite parameters and a floored prior
    dead = fit_gmm(torch.cat([torch.zeros(1, 2000), torch.ones(1, 2000)], 1), 3, var_floor=1e-4)
    assert torch.isfinite(dead.mean).all() and torch.isfinite(dead.log_pi).all()
    assert dead.log_pi.min() < math.log(1e-7) and torch.all(dead.var >= 1e-4)  # switched off, not NaN


def test_bad_arguments():
    with pytest.raises(ValueError, match="initialisation"):
        fit_gmm(torch.randn(2, 10), 2, init="random")
    with pytest.raises(ValueError, match="no values"):
        fit_gmm(torch.empty(2, 0), 2)
    with pytest.raises(ValueError, match="k must be"):
        fit_gmm(torch.randn(2, 10), 0)
    x = torch.randn(2, 100)
    x[1, 5] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        fit_gmm(x, 2)


# ---- Reservoir ----------------------------------------------------------------------------------------
def test_reservoir_is_seeded_bounded_and_uniform():
    def fill(seed: int) -> Reservoir:
        r = Reservoir(500, torch.Generator().manual_seed(seed))
        for i in range(40):
            r.add(torch.full((3, 100), float(i)) + torch.arange(3.0)[:, None])
        return r

    a, b = fill(0), fill(0)
    assert torch.equal(a.values(), b.values())
    assert not torch.equal(a.values(), fill(1).values())
    assert a.count == 4000 and len(a) == 500 and a.values().shape == (3, 500)
    means = torch.stack([fill(s).values()[0].mean() for s in range(30)])
    assert abs(float(means.mean()) - 19.5) < 0.5  # the stream's mean is 19.5
    per_block = torch.bincount(a.values()[0].long(), minlength=40)
    assert per_block.min() > 0  # columns of every part of the stream are kept
    assert torch.equal(a.values()[1] - a.values()[0], torch.ones(500))  # same columns in every channel


def test_reservoir_takes_channel_dim_views_without_changing_them():
    x = torch.randn(4, 3, 5, 6)
    r = Reservoir(50, torch.Generator().manual_seed(0))
    r.add(x, channel_dim=1)
    columns = x.transpose(0, 1).reshape(3, -1)
    kept = r.values()
    assert kept.shape == (3, 50) and r.count == 120
    for j in range(kept.shape[1]):  # every kept column is a column of x
        assert (columns == kept[:, j : j + 1]).all(0).any()
    small = Reservoir(1000)
    small.add(x, channel_dim=1)
    assert torch.equal(small.values().sort(1).values, columns.sort(1).values)  # all kept
    with pytest.raises(ValueError, match="channels"):
        r.add(torch.randn(4, 2), channel_dim=1)


# ---- UAN hooks ----------------------------------------------------------------------------------------
def _bn(cls=nn.BatchNorm2d, c: int = 4) -> nn.Module:
    bn = cls(c)
    with torch.no_grad():
        bn.running_mean.copy_(torch.linspace(-1.0, 2.0, c))
        bn.running_var.copy_(torch.linspace(0.5, 3.0, c))
        bn.weight.copy_(torch.linspace(0.5, 1.5, c))
        bn.bias.copy_(torch.linspace(-0.2, 0.3, c))
    return bn.eval()


def _bimodal_batches(bn: nn.Module, count: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    c = bn.running_mean.numel()
    m, s = bn.running_mean.view(1, c, 1, 1), bn.running_var.sqrt().view(1, c, 1, 1)
    for _ in range(count):
        side = (torch.rand(8, c, 6, 6, generator=g) < 0.4).float() * 2 - 1
        yield m + side * 1.2 * s + 0.3 * s * torch.randn(8, c, 6, 6, generator=g)


def _calibrate(module: UAN, batches, **settings) -> None:
    module.calibration_begin(CalibrationSettings(**settings))
    with torch.no_grad():
        for x in batches:
            module(x)
    module.calibration_end()


@pytest.mark.parametrize("kind", ["bn", "bn_act", "frozen_bn"])
def test_uan_channel_calibration_separates_components_and_keeps_the_exact_start(kind):
    source = {"bn": lambda: _bn(), "bn_act": lambda: _bn(BatchNormAct2d),
              "frozen_bn": lambda: _bn(FrozenBatchNorm2d)}[kind]()
    module = build(source, kind, k=2).eval()
    assert isinstance(module, UANChannel) and module.calibration_info() == {}
    batches = list(_bimodal_batches(source, 6))
    module.calibration_begin(CalibrationSettings(seed=1, em_samples=1024))
    with torch.no_grad():
        for x in batches:  # collecting does not change the output
            assert torch.equal(module(x), source(x))
    module.calibration_end()
    info = module.calibration_info()
    assert set(info) >= {"ll_gain", "ll_gain_min", "iterations", "values_per_channel", "separation"}
    assert info["values_per_channel"] == 1024 and info["ll_gain_min"] > 0.1
    assert 2.0 < info["separation"] < 2.8  # components at m -/+ 1.2 sqrt(running_var)
    sd = (source.running_var + source.eps).sqrt()
    torch.testing.assert_close(module.mix_mean.detach(), source.running_mean + 1.2 * torch.stack([-sd, sd]),
                               atol=0.1, rtol=0)
    torch.testing.assert_close(module.mix_logit.detach().softmax(0)[0], torch.full((4,), 0.6), atol=0.06, rtol=0)
    assert module.mix_mean.dtype == torch.float32
    x = next(_bimodal_batches(source, 1, seed=9))
    with torch.no_grad():
        assert module.claims_exact() and torch.equal(module(x), source(x))  # rho = 0: the source, bit for bit
        module.set_strength(1.0)
        assert not module.claims_exact()
        assert (module(x) - source(x)).abs().max() > 0.1


def test_uan_sample_calibration_from_a_layernorm():
    ln = nn.LayerNorm(16).eval()
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
    module = build(ln, "ln", k=2).eval()
    assert isinstance(module, UANSample)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(4):
        x = torch.randn(4, 8, 16, generator=g)
        x[..., :2] *= 12.0  # two "massive activation" features per token
        batches.append(x)
    module.calibration_begin(CalibrationSettings())
    with torch.no_grad():
        for x in batches:
            assert torch.equal(module(x), ln(x))
    module.calibration_end()
    var = module.mix_var.detach()
    assert var.shape == (2,) and var.max() / var.min() > 20  # a narrow bulk and a wide tail component
    assert module.calibration_info()["values_per_channel"] == 4 * 4 * 8 * 16
    with torch.no_grad():
        assert torch.equal(module(batches[0]), ln(batches[0]))
        module.set_strength(1.0)
        assert not module.claims_exact()
        assert (module(batches[0]) - ln(batches[0])).abs().max() > 1e-2


def test_uan_calibration_without_data_or_aborted_changes_nothing():
    module = build(_bn(), "bn", k=3)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    module.calibration_begin()
    module.calibration_end()  # nothing seen
    module.calibration_begin()
    module(next(_bimodal_batches(_bn(), 1)))
    module.calibration_abort()
    module.calibration_end()  # no calibration running
    for key, value in module.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert module.claims_exact() and module._calib is None


def test_uan_calibration_is_deterministic():
    runs = []
    for _ in range(2):
        module = build(_bn(), "bn", k=3)
        _calibrate(module, _bimodal_batches(_bn(), 4), seed=5, em_samples=256, em_init="kmeans++")
        runs.append(module.state_dict())
    for key in runs[0]:
        assert torch.equal(runs[0][key], runs[1][key]), key


# ---- two processes (gloo) -------------------------------------------------------------------------------
def _all_sum(t: torch.Tensor) -> torch.Tensor:
    out = t.detach().clone().contiguous()
    dist.all_reduce(out)
    return out


def _from_rank0(t: torch.Tensor) -> torch.Tensor:
    out = t.detach().clone().contiguous()
    dist.broadcast(out, src=0)
    return out


def _dist_worker(rank: int, store: str, outdir: str) -> None:
    sys.path.insert(0, os.path.dirname(__file__))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
    try:
        x = mixture_sample(6000, seed=10 + rank)  # different data on each rank
        fit = fit_gmm(x, 2, reduce=_all_sum, broadcast=_from_rank0)
        module = build(_bn(), "bn", k=2)
        _calibrate(module, _bimodal_batches(_bn(), 3, seed=rank), seed=2, em_samples=512,
                   reduce=_all_sum, broadcast=_from_rank0)
        torch.save({"mean": fit.mean, "var": fit.var, "log_pi": fit.log_pi, "loglik": fit.loglik,
                    "iterations": fit.iterations, "n": fit.n, "module": module.state_dict(),
                    "info": module.calibration_info()}, os.path.join(outdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
    from workers import leave

    leave()


def test_two_processes_fit_identically_and_like_one_process(tmp_path):
    mp.spawn(_dist_worker, args=(str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for key in ("mean", "var", "log_pi", "loglik"):
        assert torch.equal(a[key], b[key]), key
    assert a["iterations"] == b["iterations"] and a["n"] == b["n"] == 12000
    for key in a["module"]:
        assert torch.equal(a["module"][key], b["module"][key]), key
    assert a["info"] == b["info"] and a["info"]["values_per_channel"] == 1024
    single = fit_gmm(torch.cat([mixture_sample(6000, seed=10), mixture_sample(6000, seed=11)], 1), 2)
    torch.testing.assert_close(a["mean"], single.mean, atol=1e-3, rtol=0)
    torch.testing.assert_close(a["var"], single.var, atol=1e-3, rtol=1e-3)
    torch.testing.assert_close(a["loglik"], single.loglik, atol=1e-6, rtol=0)
    assert math.isfinite(float(a["loglik"].sum()))


def test_uan_layers_fitted_together_get_exactly_their_own_fits():
    """calibration_end_many: one EM call over the channels of several layers gives each layer the
    parameters, figures and iteration counts it gets alone (quantile start, one process)."""
    sources = [_bn(), nn.BatchNorm2d(6).eval(), _bn()]
    with torch.no_grad():
        sources[1].running_var.uniform_(0.5, 2.0)
    alone, together = [build(s, "bn", k=3) for s in sources], [build(s, "bn", k=3) for s in sources]
    settings = CalibrationSettings(seed=3, em_samples=300)
    plain = [2 * torch.randn(8, 6, 6, 6, generator=torch.Generator().manual_seed(1))]
    for modules in (alone, together):
        for i, (module, source) in enumerate(zip(modules, sources)):
            module.calibration_begin(settings)
            with torch.no_grad():
                for x in _bimodal_batches(source, 2, seed=i) if i != 1 else plain:
                    module(x)
    for module in alone:
        module.calibration_end()
    UAN.calibration_end_many(together)
    for a, b in zip(alone, together):
        assert b._calib is None and a.calibration_info() == b.calibration_info()
        for key, value in a.state_dict().items():
            assert torch.equal(value, b.state_dict()[key]), key
    assert len({m.calibration_info()["iterations"] for m in together}) > 1  # per-layer counts, not the max
