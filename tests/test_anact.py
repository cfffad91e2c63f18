"""ANAct (docs/methods.md section 2): exact derivatives, statistics (EMA, rejection, calibration), compensation,
export."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normswap.errors import NormswapError, OptionError
from normswap.core.graph import build_graph
from normswap.variants.anact import activations as A
from normswap.variants.anact.fold import folds
from normswap.variants.anact import (
    ANAct, ANActConfig, UnsupportedActivationError, activation_kind, compensation_status, export_fold,
    fold_into_consumer,
)

SUPPORTED = ", ".join(A.KINDS)
CASES = [(k, dict(A.DEFAULTS.get(k, {}))) for k in A.KINDS] + [
    ("leaky_relu", {"negative_slope": 0.2}), ("elu", {"alpha": 0.5}), ("celu", {"alpha": 2.0}),
    ("softplus", {"beta": 2.0, "threshold": 5.0}),
]


def _stats(x: torch.Tensor, kind: str, params: dict) -> tuple[torch.Tensor, ...]:
    """Reference rho, rho', mu (and E f^2) over dim -1, in float64."""
    x = x.double()
    f, fp = A.apply_activation(kind, params, x), A.derivative(kind, params, x)
    var = x.var(-1, unbiased=False)
    return f.square().mean(-1) / var, fp.square().mean(-1), f.mean(-1), f.square().mean(-1)


def _set_stats(m: ANAct, rho, rho_p, mu, alpha=0.0) -> ANAct:
    with torch.no_grad():
        m.running_rho.copy_(torch.as_tensor(rho))
        m.running_rho_prime.copy_(torch.as_tensor(rho_p))
        m.running_mean.copy_(torch.as_tensor(mu))
        m.alpha.fill_(alpha)
    return m


# ---- reference values (docs/methods.md section 2.1.2) ---------------------------------------------------
@pytest.mark.parametrize("module, ref", [
    (nn.ReLU(), 1.4142), (nn.GELU(), 1.5076), (nn.SiLU(), 1.6501), (nn.Tanh(), 1.5313), (nn.Sigmoid(), 3.5855),
    (nn.ELU(), 1.2344), (nn.SELU(), 0.9832), (nn.Mish(), 1.4660), (nn.Softplus(), 1.4990),
])
def test_lambda_reference_values(module, ref):
    x = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0))
    m = ANAct(module).train()
    m(x)  # the first training batch is taken as is
    assert abs(float(m.scale().detach()) - ref) < 3e-3


# ---- exact derivatives ------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind, params", CASES)
def test_derivative_equals_autograd(kind, params, dtype):
    kinks = [0.0, -0.0, -3.0, 3.0, 6.0, 2.5, 20.0, -1e-7, 1e-7, 2.5 + 1e-6, 20.0 + 1e-5, 19.99999]
    grid = torch.cat([torch.linspace(-25, 30, 5501, dtype=dtype), torch.tensor(kinks, dtype=dtype)])
    x = grid.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(A.apply_activation(kind, params, x).sum(), x)
    closed = A.derivative(kind, params, grid)
    tol = dict(atol=2e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-8, rtol=1e-10)
    torch.testing.assert_close(closed, auto, **tol)
    n = len(kinks)  # at the kinks exactly: torch's subgradient convention
    assert torch.allclose(closed[-n:], auto[-n:], atol=1e-6, rtol=0), (closed[-n:], auto[-n:])


def test_activation_kinds_of_modules_and_functions():
    assert activation_kind(nn.ReLU(inplace=True)) == ("relu", {})
    assert activation_kind(nn.GELU(approximate="tanh")) == ("gelu_tanh", {})
    assert activation_kind(nn.LeakyReLU(0.3)) == ("leaky_relu", {"negative_slope": 0.3})
    assert activation_kind(nn.Softplus(2, 10)) == ("softplus", {"beta": 2.0, "threshold": 10.0})
    for fn in (F.relu, F.relu_, torch.relu, torch.relu_):
        assert activation_kind(fn) == ("relu", {})
    assert activation_kind(torch.sigmoid) == ("sigmoid", {}) and activation_kind(torch.tanh) == ("tanh", {})
    assert activation_kind(F.silu) == ("silu", {}) and activation_kind(F.gelu) == ("gelu", {})
    assert activation_kind(F.gelu, (None,), {"approximate": "tanh"}) == ("gelu_tanh", {})
    assert activation_kind(F.leaky_relu, (None, 0.2)) == ("leaky_relu", {"negative_slope": 0.2})
    assert activation_kind(F.softplus, (None,), {"beta": 3}) == ("softplus", {"beta": 3.0, "threshold": 20.0})
    assert activation_kind(F.leaky_relu, (None, object())) is None  # a traced value: undecidable
    assert activation_kind("sigmoid_") == ("sigmoid", {})
    assert activation_kind(nn.Hardtanh()) is None and activation_kind(F.hardtanh) is None
    for kind, params in CASES:
        m = A.make_activation(kind, params)
        assert activation_kind(m) == (kind, params)


def test_unsupported_activation_message():
    with pytest.raises(UnsupportedActivationError) as err:
        ANAct(nn.Hardtanh())
    assert str(err.value) == (
        "anact does not support activation torch.nn.modules.activation.Hardtanh; supported: " + SUPPORTED
    )
    assert isinstance(err.value, NormswapError)
    with pytest.raises(UnsupportedActivationError, match=r"^anact does not support activation 'swish'; supported: "):
        ANAct("swish")


# ---- training statistics: EMA and rejection -----------------------------------------------------------------
def test_ema_first_batch_and_rejection_end_to_end():
    g = torch.Generator().manual_seed(1)
    m = ANAct(nn.ReLU()).train()
    b1, b2 = torch.randn(4, 50_000, generator=g), torch.randn(4, 50_000, generator=g)
    m(b1)
    r1 = _stats(b1.reshape(-1), "relu", {})[:3]
    got = (m.running_rho, m.running_rho_prime, m.running_mean)
    for a, b in zip(got, r1):
        assert torch.allclose(a.double(), b, rtol=1e-5)
    m(b2)  # a similar batch: accepted, EMA 0.9 old + 0.1 new
    r2 = _stats(b2.reshape(-1), "relu", {})[:3]
    for a, old, new in zip(got, r1, r2):
        assert torch.allclose(a.double(), 0.9 * old + 0.1 * new, rtol=1e-5)
    before = [t.clone() for t in got]
    m(b2 + 2.0)  # rho x10, rho' x2, mean x5: every statistic rejected
    assert all(torch.equal(a, b) for a, b in zip(got, before))
    assert int(m.num_batches_tracked) == 3


def test_rejection_band_per_statistic():
    m = ANAct(nn.ReLU()).train()
    t = torch.tensor
    m._update_running(t(0.5), t(0.5), t(0.4), t(0.5))  # first batch taken as is, whatever it is
    assert (float(m.running_rho), float(m.running_rho_prime), float(m.running_mean)) == pytest.approx((0.5, 0.5, 0.4))
    # rho at 1.5x: rejected; rho' at 1.1x: accepted; mean at 1.1x: accepted (the others still update)
    m._update_running(t(0.75), t(0.55), t(0.44), t(0.5))
    assert float(m.running_rho) == pytest.approx(0.5)
    assert float(m.running_rho_prime) == pytest.approx(0.9 * 0.5 + 0.1 * 0.55)
    assert float(m.running_mean) == pytest.approx(0.9 * 0.4 + 0.1 * 0.44)
    # rho at 1.1x accepted, rho' at 1.5x rejected, mean at 1.5x rejected (|0.2| > 0.2 * sqrt(0.5))
    rp, mu = float(m.running_rho_prime), float(m.running_mean)
    m._update_running(t(0.55), t(1.5 * rp), t(1.5 * mu), t(0.5))
    assert float(m.running_rho) == pytest.approx(0.9 * 0.5 + 0.1 * 0.55)
    assert (float(m.running_rho_prime), float(m.running_mean)) == pytest.approx((rp, mu))
    m._update_running(t(float("inf")), t(rp), t(mu), t(0.5))  # non-finite: rejected
    assert math.isfinite(float(m.running_rho)) and int(m.num_batches_tracked) == 4


def test_train_updates_eval_frozen():
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(2)) * 2 + 0.5
    m = ANAct(nn.SiLU(), strength=1.0).eval()  # the paper's layer
    assert torch.equal(m(x), F.silu(x))  # no statistics yet: c = 1, mu = 0, the plain activation
    m.train()
    y_train = m(x)
    state = {k: v.clone() for k, v in m.state_dict().items()}
    m.eval()
    y_eval = m(x)
    assert all(torch.equal(v, m.state_dict()[k]) for k, v in state.items())  # eval: frozen
    torch.testing.assert_close(y_eval, y_train)  # both use the running values after the update
    torch.testing.assert_close(y_eval, m.scale() * (F.silu(x) - m.running_mean))
    m.train()
    m(x * 1.05)
    assert int(m.num_batches_tracked) == 2 and not torch.equal(m.running_mean, state["running_mean"])


# ---- calibration -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("per_channel", [False, True])
def test_calibration_gives_exact_full_data_statistics(per_channel, kernels):
    g = torch.Generator().manual_seed(3)
    shapes = ((1, 0), (3, 2), (0.2, -1))
    batches = [torch.randn(5, 3, 4, 4, generator=g, dtype=torch.float64) * s + o for s, o in shapes]
    m = ANAct(nn.GELU(), per_channel=per_channel, channels=3).double().train()
    m.calibration_begin()
    for b in batches:
        m(b)
    assert int(m.num_batches_tracked) == 0  # no EMA while calibrating
    m.calibration_end()
    x = torch.cat(batches)
    x = x.transpose(0, 1).reshape(3, -1) if per_channel else x.reshape(-1)
    rho, rho_p, mu, _ = _stats(x, "gelu", {})
    torch.testing.assert_close(m.running_rho, rho, rtol=1e-10, atol=0)
    torch.testing.assert_close(m.running_rho_prime, rho_p, rtol=1e-10, atol=0)
    torch.testing.assert_close(m.running_mean, mu, rtol=1e-10, atol=1e-12)
    assert int(m.num_batches_tracked) == 3 and not m._calibrating
    m.calibration_begin()
    m.calibration_end()  # no data: buffers unchanged
    torch.testing.assert_close(m.running_rho, rho, rtol=1e-10, atol=0)


# ---- gradients, shapes ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("module, per_channel",
                         [(nn.GELU(), False), (nn.ELU(0.7), True), (nn.Softplus(2.0, 3.0), False)])
def test_gradcheck_through_anact_and_alpha(module, per_channel):
    m = ANAct(module, per_channel=per_channel, channels=3, folded=True).double().eval()
    _set_stats(m, torch.tensor([0.4, 0.6, 0.8]) if per_channel else 0.45, 0.7, 0.2)
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    fn = lambda x, a: torch.func.functional_call(m, {"alpha": a}, (x,))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, alpha))


def test_per_channel_shapes_and_statistics():
    m = ANAct(nn.ReLU(), per_channel=True, channels=5, strength=1.0).train()
    for key in ("running_rho", "running_rho_prime", "running_mean"):
        assert getattr(m, key).shape == (5,)
    assert m.alpha.shape == () and m.scale().shape == (5,)
    x = torch.randn(8, 5, 6, 6) * torch.arange(1, 6).view(1, 5, 1, 1) + torch.linspace(-1, 1, 5).view(1, 5, 1, 1)
    y = m(x)
    assert y.shape == x.shape
    rho, rho_p, mu, _ = _stats(x.transpose(0, 1).reshape(5, -1), "relu", {})
    torch.testing.assert_close(m.running_mean.double(), mu, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(m.running_rho_prime.double(), rho_p, rtol=1e-5, atol=1e-6)
    expected = m.scale().view(1, 5, 1, 1) * (F.relu(x) - m.running_mean.view(1, 5, 1, 1))
    torch.testing.assert_close(y, expected)
    assert m(torch.randn(4, 5)).shape == (4, 5)
    message = r"^ANAct per_channel expects 5 channels in dim 1; got input of shape \(4, 3\)$"
    with pytest.raises(NormswapError, match=message):
        m(torch.randn(4, 3))
    with pytest.raises(NormswapError, match="positive channel count"):
        ANAct(nn.ReLU(), per_channel=True)


def test_inplace_activation_statistics_use_the_input():
    x = torch.randn(1000, generator=torch.Generator().manual_seed(4))
    a, b = ANAct(nn.ReLU(inplace=True)).train(), ANAct(nn.ReLU()).train()
    a(x.clone()), b(x.clone())
    assert torch.equal(a.running_rho, b.running_rho) and torch.equal(a.running_mean, b.running_mean)


# ---- compensation --------------------------------------------------------------------------------------------
def _check_fold(consumer: nn.Module, x: torch.Tensor, per_channel: bool = False, atol: float = 1e-5) -> float:
    """Fold a non-trivial ANAct into ``consumer``; return max |diff| to the original; check the inverse."""
    torch.manual_seed(5)
    c_in = x.shape[1]
    act = ANAct(nn.GELU(), per_channel=per_channel, channels=c_in, folded=True).eval()
    rho = torch.rand(c_in) * 0.5 + 0.3 if per_channel else 0.37
    mu = torch.randn(c_in) * 0.5 if per_channel else 0.6
    _set_stats(act, rho, 0.55, mu, alpha=0.3)
    original = {k: v.clone() for k, v in consumer.state_dict().items()}
    with torch.no_grad():
        ref = consumer(F.gelu(x))
        fold_into_consumer(consumer, act.scale(), act.shift())
        out = consumer(act(x))
    diff = float((out - ref).abs().max())
    fold_into_consumer(consumer, act.scale().detach(), act.shift(), inverse=True)
    for k, v in original.items():
        torch.testing.assert_close(consumer.state_dict()[k], v, atol=1e-6, rtol=1e-6)
    if "bias" not in original:
        assert torch.allclose(consumer.bias, torch.zeros_like(consumer.bias), atol=1e-6)
    return diff


@pytest.mark.parametrize("per_channel", [False, True])
def test_fold_exact_for_linear_and_unpadded_convs(per_channel):
    x2 = torch.randn(16, 12)
    x4 = torch.randn(2, 6, 9, 9)
    assert _check_fold(nn.Linear(12, 7), x2, per_channel) < 1e-5
    assert _check_fold(nn.Linear(12, 7, bias=False), x2, per_channel) < 1e-5
    assert _check_fold(nn.Conv2d(6, 4, 1), x4, per_channel) < 1e-5
    assert _check_fold(nn.Conv2d(6, 4, 3, stride=2, dilation=2, groups=2), x4, per_channel) < 1e-5
    assert _check_fold(nn.Conv2d(6, 4, 3, padding=1, padding_mode="reflect", bias=False), x4, per_channel) < 1e-5
    assert _check_fold(nn.Conv1d(6, 4, 3), x4[..., 0], per_channel) < 1e-5


def test_fold_through_flatten_per_channel():
    act = _set_stats(ANAct(nn.ReLU(), per_channel=True, channels=3, folded=True).eval(),
                     torch.tensor([0.3, 0.5, 0.7]), 0.5, torch.tensor([0.1, 0.2, 0.3]))
    fc, x = nn.Linear(3 * 4, 5), torch.randn(2, 3, 2, 2)
    with torch.no_grad():
        ref = fc(F.relu(x).flatten(1))
        fold_into_consumer(fc, act.scale(), act.shift())
        torch.testing.assert_close(fc(act(x).flatten(1)), ref, atol=1e-5, rtol=1e-5)


def test_fold_zero_padded_conv_is_approximate():
    conv = nn.Conv2d(6, 4, 3, padding=1)
    assert compensation_status(conv, [])[0] == "approximate"
    diff = _check_fold(conv, torch.randn(2, 6, 9, 9))
    assert diff > 1e-3  # the border differs: pad 0 in the new domain is mu in the old one


def test_compensation_status():
    assert compensation_status(nn.Linear(4, 4), []) == ("exact", "")
    assert compensation_status(nn.Linear(4, 4), ["Dropout", ".view()", "flatten"]) == ("exact", "")
    assert compensation_status(nn.Conv2d(4, 4, 1), ["adaptive_avg_pool2d"]) == ("exact", "")
    assert compensation_status(nn.Conv2d(4, 4, 3, padding=1, padding_mode="circular"), []) == ("exact", "")
    assert compensation_status(nn.Conv2d(4, 4, 3, padding="valid"), [])[0] == "exact"
    assert compensation_status(nn.Conv2d(4, 4, 3, padding=1), []) == (
        "approximate", "zero padding: the pad value 0 in the new domain is mu in the old one")
    assert compensation_status(nn.Conv2d(4, 4, 3, padding="same"), [])[0] == "approximate"
    assert compensation_status(nn.Linear(4, 4), ["AvgPool2d"])[0] == "absent"  # may zero-pad
    assert compensation_status(nn.Linear(4, 4), ["add"]) == (
        "absent", "'add' between the activation and its consumer does not commute with c * (f - mu)")
    assert compensation_status(nn.Linear(4, 4), ["permute"], per_channel=True)[0] == "absent"
    assert compensation_status(nn.BatchNorm2d(4), []) == (
        "absent", "the consumer is torch.nn.modules.batchnorm.BatchNorm2d, not a Linear or convolution")
    assert compensation_status(None, [])[0] == "absent"
    assert compensation_status(nn.ConvTranspose2d(4, 4, 3), [])[0] == "absent"
    with pytest.raises(NormswapError, match="^cannot fold ANAct into torch.nn.modules.conv.ConvTranspose2d"):
        fold_into_consumer(nn.ConvTranspose2d(4, 4, 3), 1.0, 0.0)
    with pytest.raises(NormswapError, match="scale must be positive"):
        fold_into_consumer(nn.Linear(4, 4), -1.0, 0.0)


@pytest.mark.parametrize("compensate", [True, False])
def test_export_fold_mlp(compensate):
    torch.manual_seed(6)
    original = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3)).eval()
    x = torch.randn(32, 8)
    model = nn.Sequential(original[0], ANAct(original[1], folded=True), nn.Linear(16, 16),
                          ANAct(original[3], folded=True), nn.Linear(16, 3))
    model[2].load_state_dict(original[2].state_dict())
    model[4].load_state_dict(original[4].state_dict())
    model.train()
    for _ in range(3):
        model(x + 0.1 * torch.randn_like(x))
    model.eval()
    if compensate:
        for i in (1, 3):
            fold_into_consumer(model[i + 1], model[i].scale().detach(), model[i].shift())
            model[i].compensated = True
            assert model[i].claims_exact()
    with torch.no_grad():
        before = model(x)
        if compensate:
            torch.testing.assert_close(before, original(x), atol=1e-5, rtol=1e-5)
    exported = export_fold(model, {"1": ["2"], "3": ["4"]})
    assert not any(isinstance(m, ANAct) for m in exported.modules())
    assert any(isinstance(m, ANAct) for m in model.modules())  # a copy by default
    assert isinstance(exported[1], nn.Tanh) and isinstance(exported[3], nn.ReLU)
    with torch.no_grad():
        torch.testing.assert_close(exported(x), before, atol=1e-5, rtol=1e-5)
    if compensate:  # the consumers are the original ones again
        torch.testing.assert_close(exported[2].weight, original[2].weight, atol=1e-6, rtol=1e-6)
    with pytest.raises(NormswapError, match=r"^export_fold: '0' is torch.nn.modules.linear.Linear, not an ANAct$"):
        export_fold(model, {"0": ["2"]})
    padded = nn.Sequential(nn.Conv2d(2, 3, 1), ANAct(nn.ReLU()), nn.Conv2d(3, 3, 3, padding=1))
    with pytest.raises(NormswapError, match=r"^export_fold: cannot fold '1' into '2' exactly \(zero padding"):
        export_fold(padded, {"1": ["2"]})


def test_compensated_flag_cleared_by_statistics_updates():
    m = ANAct(nn.ReLU(), folded=True)
    m.compensated = True
    m.train()(torch.randn(100))
    assert not m.compensated and not m.claims_exact()
    m.compensated = True
    m.calibration_begin()
    m(torch.randn(100))
    m.calibration_end()
    assert not m.compensated


# ---- config, plan, registry --------------------------------------------------------------------------------------
@pytest.mark.parametrize("options, strength, message", [
    ({"momentum": 1.0}, 0.0, "option 'momentum' of variant 'anact' must be in [0, 1); got 1.0"),
    ({"momentum": -0.1}, 0.0, "option 'momentum' of variant 'anact' must be in [0, 1); got -0.1"),
    ({"reject": 0}, 0.0, "option 'reject' of variant 'anact' must be > 0; got 0.0"),
    ({"per_channel": "maybe"}, 0.0, "option 'per_channel' of variant 'anact' expects bool, got 'maybe'"),
    ({"lam": 1}, 0.0,
     "unknown option 'lam' for variant 'anact'; valid options: per_channel, momentum, reject, allow_inexact"),
    ({}, 1.5, "strength must be in [0, 1]; got 1.5"),
])
def test_config_errors(options, strength, message):
    with pytest.raises(OptionError) as err:
        ANActConfig.from_options(options, strength, "anact")
    assert str(err.value) == message


def test_config_parses_cli_strings():
    cfg = ANActConfig.from_options({"per_channel": "true", "momentum": "0.8", "allow_inexact": "yes"}, 0.5, "anact")
    assert (cfg.per_channel, cfg.momentum, cfg.reject, cfg.allow_inexact, cfg.strength) == (True, 0.8, 0.2, True, 0.5)


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act1 = nn.Linear(4, 6), nn.LeakyReLU(0.2)
        self.fc2, self.act2 = nn.Linear(6, 6), nn.Hardtanh()
        self.fc3 = nn.Linear(6, 2)

    def forward(self, x):
        return self.fc3(self.act2(self.fc2(self.act1(self.fc1(x)))))


def test_propose_and_from_site():
    graph = build_graph(_Model())
    sites = {s.name: s for s in ANAct.propose(graph.infos, ANActConfig(per_channel=True))}
    assert set(sites) == {"act1", "act2"}
    s1, s2 = sites["act1"], sites["act2"]
    assert s1.converted and s1.config["source_kind"] == "leaky_relu" and s1.config["negative_slope"] == 0.2
    assert s1.config["channels"] == 6 and s1.config["per_channel"] is True
    if "downstream" in s1.facts:  # the finder's consumer facts
        assert s1.facts["compensation"] == {"status": "exact", "reason": "", "consumers": ["fc2"]} and not s1.reason
    else:
        assert "compensation not established" in s1.reason
    assert not s2.converted
    assert s2.reason == ("anact does not support activation torch.nn.modules.activation.Hardtanh; supported: "
                         + SUPPORTED)
    m = ANAct.from_site(s1, graph.info("act1").module, [])
    assert m.kind == "leaky_relu" and m.running_mean.shape == (6,) and m.claims_exact()
    with pytest.raises(NormswapError, match="the plan says activation kind 'leaky_relu' absorbing 0 module"):
        ANAct.from_site(s1, nn.ReLU(), [])


class _Info:
    def __init__(self, module, facts, name="a", calls=1):
        self.name, self.module, self.path, self._facts = name, module, "fx", facts
        self.producer, self.calls = None, calls

    def facts(self):
        return dict(self._facts)

    def pattern(self, kind=None):
        return kind or "act"


@pytest.mark.parametrize("allow", [False, True])
def test_propose_uses_compensation_facts(allow):
    facts = {"compensation": {"status": "approximate", "reason": "zero padding", "consumers": ["c"]}}
    inexact = _Info(nn.ReLU(), facts)
    exact = _Info(nn.GELU(approximate="tanh"), {"compensation": {"status": "exact", "consumers": ["c"]}})
    (s1,) = ANAct.propose([inexact], ANActConfig(allow_inexact=allow))
    (s2,) = ANAct.propose([exact], ANActConfig())
    assert s1.converted  # every supported site converts; allow_inexact decides whether it is folded
    if allow:
        assert s1.reason == "compensation is approximate: zero padding; folded approximately (allow_inexact)"
        assert s1.facts["exact_at"] == "no strength" and folds(s1)
    else:
        assert s1.reason == ("compensation is approximate: zero padding; not folded, so exact at strength 0 only "
                             "(allow_inexact=true folds it approximately)")
        assert s1.facts["exact_at"] == "strength 0" and not folds(s1)
    assert s2.converted and s2.reason == "" and s2.config["source_kind"] == "gelu_tanh"
    assert s2.facts["exact_at"] == "every strength" and folds(s2)
    (s3,) = ANAct.propose([_Info(nn.ReLU(), {})], ANActConfig(per_channel=True))
    assert not s3.converted and s3.reason.startswith("per_channel needs the channel count")
    (s4,) = ANAct.propose([_Info(nn.ReLU(), {})], ANActConfig())  # no consumer facts (module walk)
    assert s4.converted and s4.facts["exact_at"] == "strength 0" and s4.reason == (
        "no consumer facts: compensation not established; not folded, so exact at strength 0 only")


def test_examples_start_exact():
    for model, x in ANAct.examples():
        assert not model.training
        with torch.no_grad():
            ref = model(x)
            for name, child in list(model.named_children()):
                if activation_kind(child):
                    setattr(model, name, ANAct(child, folded=True).eval())  # c = 1, mu = 0: no statistics yet
            assert torch.equal(model(x), ref)


def test_calibrate_then_refold_stays_exact():
    """The flow the apply/calibrate steps follow: fold at conversion, calibrate, undo the old fold, fold anew."""
    torch.manual_seed(7)
    original = nn.Sequential(nn.Linear(5, 9), nn.Mish(), nn.Conv1d(9, 4, 1, bias=False)).eval()
    x = torch.randn(6, 5)
    run = lambda m, x: m[2](m[1](m[0](x)).unsqueeze(-1))  # noqa: E731
    model = nn.Sequential(original[0], ANAct(original[1], per_channel=True, channels=9, folded=True),
                          nn.Conv1d(9, 4, 1, bias=False))
    model[2].weight.data.copy_(original[2].weight)
    model.eval()
    act, consumer = model[1], model[2]
    old = act.scale().detach(), act.shift().clone()
    fold_into_consumer(consumer, *old)
    act.compensated = True
    assert "bias" in consumer.state_dict()
    act.calibration_begin()
    with torch.no_grad():
        for _ in range(3):
            run(model, torch.randn(16, 5))
    act.calibration_end()
    assert not act.claims_exact()
    fold_into_consumer(consumer, *old, inverse=True)
    fold_into_consumer(consumer, act.scale().detach(), act.shift())
    act.compensated = True
    with torch.no_grad():
        assert not torch.allclose(act(model[0](x)), F.mish(model[0](x)), atol=1e-3)
        torch.testing.assert_close(run(model, x), run(original, x), atol=1e-5, rtol=1e-5)


def test_propose_derives_compensation_from_downstream_facts():
    def site(down, *others, per_channel=False):
        infos = [_Info(nn.ReLU(), {"downstream": down}), *others]
        (s,) = [s for s in ANAct.propose(infos, ANActConfig(per_channel=per_channel)) if s.name == "a"]
        return s.facts["compensation"]

    fc, conv3 = _Info(nn.Linear(4, 4), {}, "fc"), _Info(nn.Conv2d(4, 4, 3, padding=1), {}, "conv")
    assert site([{"consumer": "fc", "module": True, "via": ["Flatten", ".view()"]}], fc) == {
        "status": "exact", "reason": "", "consumers": ["fc"]}
    mixed = [{"consumer": "fc", "module": True, "via": []}, {"consumer": "conv", "module": True, "via": []}]
    assert site(mixed, fc, conv3) == {
        "status": "approximate", "reason": "conv: zero padding: the pad value 0 in the new domain is mu in the old one",
        "consumers": ["fc", "conv"]}
    mixed.append({"consumer": "add", "module": False, "via": []})
    assert site(mixed, fc, conv3)["reason"] == "its output feeds add, not a Linear or convolution"
    twice = _Info(nn.Linear(4, 4), {}, "fc", calls=2)
    assert site([{"consumer": "fc", "module": True, "via": []}], twice)["reason"] == "consumer fc is called 2 times"
    assert site([])["reason"] == "the output has no user"
    (shared,) = ANAct.propose([_Info(nn.ReLU(), {}, calls=2)], ANActConfig())
    assert shared.converted and shared.facts["exact_at"] == "strength 0" and shared.reason == (
        "compensation is absent: the activation is called 2 times; not folded, so exact at strength 0 only")
    permuted = [{"consumer": "fc", "module": True, "via": ["permute"]}]
    assert site(permuted, fc)["status"] == "exact"


# ---- strength: the blend at unfolded sites ---------------------------------------------------------------------
def _trained(act: nn.Module, per_channel: bool = False, **kw) -> ANAct:
    """An ANAct with non-trivial statistics (c far from 1, mu far from 0) and alpha."""
    m = ANAct(act, per_channel=per_channel, channels=3, **kw).eval()
    rho = torch.tensor([0.3, 0.5, 0.9]) if per_channel else 0.37
    mu = torch.tensor([0.4, -0.2, 0.7]) if per_channel else 0.6
    return _set_stats(m, rho, 0.55, mu, alpha=0.3)


@pytest.mark.parametrize("act", [nn.ReLU(), nn.GELU(), nn.Hardswish(), nn.LeakyReLU(0.2)])
def test_strength_zero_is_the_activation_bit_for_bit(act):
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(8)) * 3
    m = _trained(act)
    assert abs(float(m.scale().detach()) - 1) > 0.1 and m.current_strength() == 0.0 and m.claims_exact()
    with torch.no_grad():
        assert torch.equal(m(x), act(x))
        assert torch.equal(m.train()(x), act(x))  # training updates the statistics, the output stays f
    assert int(m.num_batches_tracked) == 1
    gm = torch.fx.symbolic_trace(m.eval())  # the strength-0 branch reads no buffer: none in the graph
    assert [n.op for n in gm.graph.nodes if n.op == "get_attr"] == []
    assert torch.equal(gm(x), act(x))


@pytest.mark.parametrize("per_channel", [False, True])
def test_blend_at_0_3_matches_float64_reference(per_channel):
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(9)) * 2
    m = _trained(nn.SiLU(), per_channel)
    m.set_strength(0.3)
    s = float(torch.tensor(0.3, dtype=torch.float32))  # the stored float32 value
    assert m.current_strength() == s and m.strength.dtype == torch.float32 and float(m.strength) == s
    rho = m.running_rho.double()
    lam = torch.sqrt((rho + 0.55) / (2 * rho * 0.55))
    c, mu = lam + 0.3 * math.tanh(0.3), m.running_mean.double()
    if per_channel:
        c, mu = c.view(1, 3, 1, 1), mu.view(1, 3, 1, 1)
    f = F.silu(x.double())
    ref = (1 - s) * f + s * c * (f - mu)
    with torch.no_grad():
        out = m(x)
        torch.testing.assert_close(out.double(), ref, rtol=1e-6, atol=1e-6)
        cs, mus = m.affine()  # the same map written as c_s (f - mu_s)
        shape = (1, 3, 1, 1) if per_channel else ()
        torch.testing.assert_close((cs.view(shape) * (F.silu(x) - mus.view(shape))), out, rtol=1e-5, atol=1e-6)
    assert not m.claims_exact()


def test_strength_one_is_the_paper_layer_and_folded_sites_ignore_strength():
    x = torch.randn(64, 3) * 2
    unfolded, folded = _trained(nn.GELU()), _trained(nn.GELU(), folded=True)
    unfolded.set_strength(1.0)
    paper = unfolded.scale() * (F.gelu(x) - unfolded.running_mean)
    with torch.no_grad():
        at_one = folded(x)  # c f - c mu in one fused op: within an ulp of c (f - mu)
        torch.testing.assert_close(unfolded(x), paper, rtol=1e-6, atol=1e-6)
        assert torch.equal(unfolded(x), at_one)
        for s in (0.0, 0.3, 1.0):
            folded.set_strength(s)
            assert torch.equal(folded(x), at_one)  # folded: c (f - mu) at every strength
            assert folded.affine()[0] is not None and torch.equal(folded.affine()[1], folded.running_mean)
    folded.compensated = True
    assert folded.claims_exact() and not unfolded.claims_exact()
    with pytest.raises(OptionError, match=r"^strength must be in \[0, 1\]; got 2.0$"):
        unfolded.set_strength(2)


@pytest.mark.parametrize("per_channel", [False, True])
def test_gradients_reach_alpha_and_the_input_at_strength(per_channel):
    m = _trained(nn.ELU(0.7), per_channel).double()
    m.set_strength(0.3)
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    alpha = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    fn = lambda x, a: torch.func.functional_call(m, {"alpha": a}, (x,))  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, alpha))
    m.alpha.grad = None
    m(x).sum().backward()
    assert m.alpha.grad is not None and float(m.alpha.grad.abs()) > 0
    m.set_strength(0.0)
    m.alpha.grad, x.grad = None, None
    m(x).sum().backward()  # strength 0: the plain activation, alpha plays no part
    (ref,) = torch.autograd.grad(F.elu(x, 0.7).sum(), x)
    assert m.alpha.grad is None and torch.equal(x.grad, ref)


def test_state_dict_strength_and_old_layout():
    m = _trained(nn.ReLU())
    m.set_strength(0.5)
    state = m.state_dict()
    assert state["strength"].dtype == torch.float32 and float(state["strength"]) == 0.5
    again = ANAct(nn.ReLU())
    again.load_state_dict(state)  # strict
    assert again.current_strength() == 0.5
    old = {k: v for k, v in state.items() if k != "strength"}  # the layout before the strength buffer
    unfolded, folded = ANAct(nn.ReLU()), ANAct(nn.ReLU(), folded=True, strength=0.25)
    assert unfolded.load_state_dict(old).missing_keys == [] and folded.load_state_dict(old).missing_keys == []
    assert unfolded.current_strength() == 1.0 and float(unfolded.strength) == 1.0  # it computed c (f - mu)
    assert folded.current_strength() == 0.25
    x = torch.randn(32)
    with torch.no_grad():
        torch.testing.assert_close(unfolded.eval()(x), m.scale() * (F.relu(x) - m.running_mean))
    with pytest.raises(RuntimeError, match="Unexpected key"):
        ANAct(nn.ReLU()).load_state_dict({**state, "bogus": torch.zeros(())})
