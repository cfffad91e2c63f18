"""UAN (normswap/variants/uan/variant.py): exact start, the formulas of docs/methods.md sections 3.1 and 3.4,
precision, state, tracing."""

from __future__ import annotations

import math
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from normswap.compat import import_torchvision  # noqa: E402

import_torchvision()

from timm.layers import BatchNormAct2d  # noqa: E402
from timm.layers import LayerNorm as TimmLayerNorm  # noqa: E402
from timm.layers import LayerNorm2d  # noqa: E402
from torchvision.ops.misc import FrozenBatchNorm2d  # noqa: E402

from normswap.errors import NormswapError, OptionError  # noqa: E402
from normswap.core.plan import Site  # noqa: E402
from normswap.variants import registry  # noqa: E402
from normswap.core.kinds import qualname  # noqa: E402
from normswap.variants.uan import UAN, UANChannel, UANConfig, UANSample  # noqa: E402


def build(module: nn.Module, kind: str, **cfg) -> UAN:
    config = {**UANConfig(**cfg).to_dict(), "source_kind": kind}
    site = Site(name="layer", source_type=qualname(module), variant="uan", config=config)
    return UAN.from_site(site, module, [])


def randomize(module: nn.Module, seed: int = 0) -> nn.Module:
    """Random running statistics and affine parameters (BN kinds) or affine parameters (LN kinds)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in list(module.named_parameters()) + list(module.named_buffers()):
            if name in ("running_mean", "bias"):
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)
            elif name in ("running_var", "weight"):
                t.copy_(torch.rand(t.shape, generator=g) * 1.5 + 0.5)
    return module.eval()


def separate(module: UAN, seed: int = 1) -> UAN:
    """Random, well separated components and non-uniform priors (what EM would write)."""
    g = torch.Generator().manual_seed(seed)
    k = module.mix_mean.shape[0]
    spread = torch.linspace(-1.5, 1.5, k).view(k, *([1] * (module.mix_mean.dim() - 1)))
    with torch.no_grad():
        module.mix_mean.add_(spread + 0.1 * torch.randn(module.mix_mean.shape, generator=g))
        module.mix_var.mul_(torch.rand(module.mix_var.shape, generator=g) * 1.5 + 0.3)
        module.mix_logit.copy_(torch.randn(module.mix_logit.shape, generator=g))
    return module


# (factory, kind, input shape): every channel-mode source kind, every input rank
CHANNEL_SOURCES = {
    "bn1d-nc": (lambda a: nn.BatchNorm1d(6, affine=a), "bn", (8, 6)),
    "bn1d-ncl": (lambda a: nn.BatchNorm1d(6, affine=a), "bn", (4, 6, 5)),
    "bn2d": (lambda a: nn.BatchNorm2d(6, affine=a), "bn", (2, 6, 4, 5)),
    "bn3d": (lambda a: nn.BatchNorm3d(6, affine=a), "bn", (2, 6, 3, 4, 2)),
    "bn_act": (lambda a: BatchNormAct2d(6, affine=a), "bn_act", (2, 6, 4, 5)),
    "frozen_bn": (lambda a: FrozenBatchNorm2d(6), "frozen_bn", (2, 6, 4, 5)),
}
SAMPLE_SOURCES = {
    "ln-last": (lambda: nn.LayerNorm(16), "ln", (2, 5, 16)),
    "ln-2dim": (lambda: nn.LayerNorm((4, 6)), "ln", (3, 4, 6)),
    "ln-noaffine": (lambda: nn.LayerNorm(16, elementwise_affine=False), "ln", (2, 5, 16)),
    "ln-nobias": (lambda: nn.LayerNorm(16, bias=False), "ln", (2, 5, 16)),
    "timm-ln": (lambda: TimmLayerNorm(16), "ln", (2, 5, 16)),
    "ln2d": (lambda: LayerNorm2d(6), "ln2d", (2, 6, 4, 5)),
}


def channel_source(key: str, affine: bool = True):
    factory, kind, shape = CHANNEL_SOURCES[key]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7)) * 2.0
    return randomize(factory(affine)), kind, x


def sample_source(key: str):
    factory, kind, shape = SAMPLE_SOURCES[key]
    x = torch.randn(shape, generator=torch.Generator().manual_seed(7)) * 2.0 + 0.5
    return randomize(factory()), kind, x


# ---- exact start (docs/methods.md section 3.2) -------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("key", list(CHANNEL_SOURCES))
def test_channel_exact_start(key, affine, k):
    source, kind, x = channel_source(key, affine)
    expected = source(x)
    module = build(source, kind, k=k)
    assert isinstance(module, UANChannel) and module.claims_exact()
    assert torch.equal(module(x), expected)  # rho == 0: bit-identical
    for rho in (0.5, 1.0):
        module.set_strength(rho)
        assert module.claims_exact()
        torch.testing.assert_close(module(x), expected, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("key", list(SAMPLE_SOURCES))
def test_sample_exact_start(key, k):
    source, kind, x = sample_source(key)
    expected = source(x)
    module = build(source, kind, k=k)
    assert isinstance(module, UANSample) and module.claims_exact()
    assert torch.equal(module(x), expected)
    for rho in (0.5, 1.0):
        module.set_strength(rho)
        assert module.claims_exact()
        torch.testing.assert_close(module(x), expected, atol=1e-6, rtol=1e-6)


def test_claims_exact_false_once_components_separate():
    source, kind, x = channel_source("bn2d")
    module = separate(build(source, kind, strength=0.5))
    assert not module.claims_exact()
    assert (module(x) - source(x)).abs().max() > 1e-2
    module.set_strength(0.0)
    assert module.claims_exact() and torch.equal(module(x), source(x))
    sample = separate(build(*sample_source("ln-last")[:2], strength=0.5))
    assert not sample.claims_exact()


# ---- the formulas, against a naive float64 reference -------------------------------------------------
def reference_channel(x, module: UANChannel, act=None):
    """docs/methods.md section 3.1 written out in float64: densities, responsibilities, x_mix, blend, affine."""
    x = x.double()
    c, k = x.shape[1], module.k
    view = (k, 1, c) + (1,) * (x.dim() - 2)
    mu, var = module.mix_mean.double().view(view), module.mix_var.double().view(view)
    pi = torch.softmax(module.mix_logit.double(), dim=0).view(view)
    xs = x.unsqueeze(0)
    dens = pi / torch.sqrt(2 * math.pi * var) * torch.exp(-((xs - mu) ** 2) / (2 * var))
    tau = dens / dens.sum(0)
    x_mix = (tau / torch.sqrt(pi) * (xs - mu) / torch.sqrt(var)).sum(0) / math.sqrt(k)
    cview = (1, c) + (1,) * (x.dim() - 2)
    m, s2 = module.running_mean.double().view(cview), module.running_var.double().view(cview) + module.eps
    x_one = (x - m) / torch.sqrt(s2)
    rho = float(module.rho)
    y = (1 - rho) * x_one + rho * x_mix
    if module.weight is not None:
        y = module.weight.double().view(cview) * y + module.bias.double().view(cview)
    return act(y) if act is not None else y


def reference_sample(x, module: UANSample):
    """docs/methods.md section 3.4 with explicit loops over the samples."""
    x = x.double()
    if module.kind == "ln2d":
        x = x.permute(0, 2, 3, 1)
    d = math.prod(module.normalized_shape)
    rows = x.reshape(-1, d)
    k = module.k
    mu, var = module.mix_mean.double(), module.mix_var.double()
    pi = torch.softmax(module.mix_logit.double(), dim=0)
    out = torch.empty_like(rows)
    for r, xi in enumerate(rows):
        mean, v = xi.mean(), ((xi - xi.mean()) ** 2).mean()
        x_one = (xi - mean) / torch.sqrt(v + module.eps)
        z = x_one[:, None]
        dens = pi / torch.sqrt(2 * math.pi * var) * torch.exp(-((z - mu) ** 2) / (2 * var))  # (d, K)
        tau = dens / dens.sum(1, keepdim=True)
        e = (tau * xi[:, None]).sum(0) / tau.sum(0)
        vk = (tau * (xi[:, None] - e) ** 2).sum(0) / tau.sum(0) + module.eps
        x_mix = (tau / torch.sqrt(pi) * (xi[:, None] - e) / torch.sqrt(vk)).sum(1) / math.sqrt(k)
        out[r] = (1 - float(module.rho)) * x_one + float(module.rho) * x_mix
    y = out.reshape(x.shape)
    if module.weight is not None:
        y = y * module.weight.double()
    if module.bias is not None:
        y = y + module.bias.double()
    return y.permute(0, 3, 1, 2) if module.kind == "ln2d" else y


@pytest.mark.parametrize("key", ["bn1d-nc", "bn2d", "bn3d", "bn_act", "frozen_bn"])
def test_channel_matches_reference(key):
    source, kind, x = channel_source(key)
    module = separate(build(source, kind, k=3, strength=0.7))
    act = torch.relu if kind == "bn_act" else None
    expected = reference_channel(x, module, act)
    assert (expected - reference_channel(x, build(source, kind), act)).abs().max() > 1e-2  # mixture matters
    torch.testing.assert_close(module(x).double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("key", ["ln-last", "ln-2dim", "ln-nobias", "ln2d"])
def test_sample_matches_reference(key):
    source, kind, x = sample_source(key)
    module = separate(build(source, kind, k=3, strength=0.7))
    expected = reference_sample(x, module)
    assert (expected - source(x).double()).abs().max() > 1e-2
    torch.testing.assert_close(module(x).double(), expected, atol=1e-5, rtol=1e-5)


def test_tails_stay_finite_in_log_space():
    module = build(randomize(nn.BatchNorm1d(3)), "bn", k=3, strength=1.0)
    with torch.no_grad():
        module.mix_mean.copy_(torch.tensor([-1.0, 0.0, 1.0])[:, None].expand(3, 3))
        module.mix_var.fill_(1e-2)
    x = torch.tensor([[1e3, -1e3, 2e3], [-1.5e3, 5e2, 1e3]])
    y = module(x)
    assert torch.isfinite(y).all() and (y.abs() > 1.0).all()
    sample = build(nn.LayerNorm(64), "ln", k=3, strength=1.0)
    with torch.no_grad():
        sample.mix_mean.copy_(torch.tensor([-1.0, 0.0, 1.0]))
        sample.mix_var.fill_(1e-2)
    x = torch.randn(2, 64) * 1e-2
    x[:, 5] = 1e3  # one massive value: z ~ 8, far in every component's tail
    y = sample(x)
    assert torch.isfinite(y).all() and y.abs().max() > 1.0


def test_train_mode_uses_learned_statistics():
    source, kind, x = channel_source("bn2d")
    module = separate(build(source, kind, strength=0.5))
    before = {k: v.clone() for k, v in module.state_dict().items()}
    eval_out = module(x)
    module.train()
    assert torch.equal(module(x), eval_out)
    assert all(torch.equal(v, before[k]) for k, v in module.state_dict().items())


# ---- precision ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_input_computes_in_float32(dtype):
    for module, x in (
        (separate(build(*channel_source("bn2d")[:2], strength=0.7)), channel_source("bn2d")[2]),
        (separate(build(*sample_source("ln-last")[:2], strength=0.7)), sample_source("ln-last")[2]),
    ):
        xr = x.to(dtype)
        y = module(xr)
        assert y.dtype == dtype
        assert torch.equal(y, module(xr.float()).to(dtype))  # float32 statistics, one cast at the end
        torch.testing.assert_close(y.float(), module(x), atol=5e-2, rtol=5e-2)
        half = build(*channel_source("bn2d")[:2], strength=0.7).to(dtype)  # a reduced-precision model
        separate(half)
        out = half(channel_source("bn2d")[2].to(dtype))
        assert out.dtype == dtype and half.mix_mean.dtype == dtype and torch.isfinite(out).all()


# ---- state ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("key,affine", [("bn2d", True), ("bn2d", False), ("bn1d-nc", True), ("bn_act", True),
                                        ("frozen_bn", True)])
def test_channel_state_dict_keeps_source_keys(key, affine):
    source, kind, _ = channel_source(key, affine)
    sd_src, sd = source.state_dict(), build(source, kind, k=4).state_dict()
    assert set(sd) - set(sd_src) == {"mix_mean", "mix_var", "mix_logit", "rho"}
    for name, value in sd_src.items():
        assert torch.equal(sd[name], value), name
    assert sd["mix_mean"].shape == (4, 6) and sd["rho"].dtype == torch.float32
    if kind == "frozen_bn":
        assert dict(build(source, kind).named_parameters()).keys() == {"mix_mean", "mix_var", "mix_logit"}


def test_sample_state_dict_keys():
    source, kind, _ = sample_source("ln-nobias")
    assert set(build(source, kind, k=2).state_dict()) == {"weight", "mix_mean", "mix_var", "mix_logit", "rho"}
    assert build(source, kind, k=2).mix_mean.shape == (2,)


@pytest.mark.parametrize("key", ["bn2d", "ln-last"])
def test_strength_survives_state_dict_round_trip(key):
    source, kind, x = channel_source(key) if key in CHANNEL_SOURCES else sample_source(key)
    trained = separate(build(source, kind))
    trained.set_strength(0.6)
    fresh = nn.Sequential(build(source, kind))  # nested: the mirror must follow a parent's load too
    assert fresh[0].current_strength() == 0.0
    fresh.load_state_dict({f"0.{k}": v for k, v in trained.state_dict().items()})
    assert float(fresh[0].rho) == float(trained.rho) and fresh[0].current_strength() == float(trained.rho)
    assert torch.equal(fresh(x), trained(x))
    back = build(source, kind, strength=0.9)
    back.load_state_dict(build(source, kind).state_dict())
    assert back.current_strength() == 0.0 and torch.equal(back(x), source(x))


def test_set_strength_range():
    module = build(*channel_source("bn2d")[:2])
    with pytest.raises(OptionError, match=r"strength must be in \[0, 1\]; got 1.5"):
        module.set_strength(1.5)


# ---- tracing and gradients ---------------------------------------------------------------------------
class BufferProxyTracer(torch.fx.Tracer):
    proxy_buffer_attributes = True  # buffers become proxies too: forward may not read a tensor's value


@pytest.mark.parametrize("key", ["bn2d", "bn_act", "frozen_bn", "ln-last", "ln2d"])
def test_fx_symbolic_trace(key):
    source, kind, x = channel_source(key) if key in CHANNEL_SOURCES else sample_source(key)
    module = separate(build(source, kind))
    model = nn.Sequential(nn.Identity(), module, nn.Tanh())
    outs = []
    for rho in (0.0, 1.0):
        module.set_strength(rho)
        traced = torch.fx.symbolic_trace(model)
        # strength 0 traces to the source's own op (bit for bit); above it the channel mode traces to the
        # fused pointwise expression (normswap/variants/uan/fused.py): the same formula, rounded in another order
        same = torch.equal if rho == 0.0 else lambda a, b: torch.allclose(a, b, atol=1e-6, rtol=1e-6)
        assert same(traced(x), model(x))
        strict = torch.fx.GraphModule(model, BufferProxyTracer().trace(model))
        assert same(strict(x), model(x))
        outs.append(traced(x))
    assert not torch.allclose(outs[0], outs[1], atol=1e-3)


@pytest.mark.parametrize("key", ["bn2d", "ln-last"])
def test_torch_compile_fullgraph_ramp_compiles_twice(key):
    torch._dynamo.reset()
    source, kind, x = channel_source(key) if key in CHANNEL_SOURCES else sample_source(key)
    module = separate(build(source, kind))
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(module, backend=backend, fullgraph=True)
    for rho in (0.0, 0.25, 0.5, 0.75, 1.0):  # a fine-tuning ramp: one graph for rho == 0, one for the rest
        module.set_strength(rho)
        if rho == 0.0:
            assert torch.equal(compiled(x), module(x))
        else:  # the traced channel mode is the fused pointwise expression: same formula, other rounding
            torch.testing.assert_close(compiled(x), module(x), atol=1e-6, rtol=1e-6)
    assert len(graphs) == 2


def test_variance_floor():
    source, kind, x = channel_source("bn2d")
    module = separate(build(source, kind, strength=1.0, var_floor=1e-3))
    with torch.no_grad():
        module.mix_var[0].fill_(-1.0)  # what an unconstrained gradient step can do
    y = module(x)
    with torch.no_grad():
        module.mix_var[0].fill_(1e-3)
    assert torch.isfinite(y).all() and torch.equal(y, module(x))


@pytest.mark.parametrize("key", ["bn2d", "ln-2dim"])
def test_gradcheck(key):
    source, kind, x = channel_source(key) if key in CHANNEL_SOURCES else sample_source(key)
    module = separate(build(source, kind, k=3, strength=0.6)).double()
    names = ["mix_mean", "mix_var", "mix_logit", "weight", "bias"]
    params = [getattr(module, n).detach().clone().requires_grad_() for n in names]
    x = x[:2].double().requires_grad_()

    def f(x, *ps):
        return torch.func.functional_call(module, dict(zip(names, ps)), (x,))

    assert torch.autograd.gradcheck(f, (x, *params), eps=1e-6, atol=1e-5)


# ---- options, classification, construction -------------------------------------------------------------
def test_config_options():
    config = UANConfig.from_options({"k": "5"}, 0.5, "uan")
    assert (config.k, config.var_floor, config.strength) == (5, 1e-5, 0.5)
    cases = [
        ({"kk": 2}, "unknown option 'kk' for variant 'uan'; valid options: k, var_floor"),
        ({"k": 0}, "option 'k' of variant 'uan' must be between 1 and 64; got 0"),
        ({"k": "65"}, "option 'k' of variant 'uan' must be between 1 and 64; got 65"),
        ({"var_floor": "-1e-3"}, "option 'var_floor' of variant 'uan' must be a finite number > 0; got -0.001"),
    ]
    for options, message in cases:
        with pytest.raises(OptionError) as info:
            UANConfig.from_options(options, 0.0, "uan")
        assert str(info.value) == message


def test_classify():
    class MyBN(nn.BatchNorm2d):
        pass

    kind, reason = UAN.classify(MyBN(4))
    assert kind is None and qualname(MyBN) in reason and "unknown subclass" in reason
    for module in (nn.BatchNorm2d(4, track_running_stats=False), BatchNormAct2d(4, track_running_stats=False)):
        kind, reason = UAN.classify(module)
        assert kind is None and "track_running_stats=False" in reason and "no fixed statistics" in reason
    accepted = [(nn.BatchNorm1d(3), "bn"), (nn.BatchNorm3d(3), "bn"), (BatchNormAct2d(3), "bn_act"),
                (FrozenBatchNorm2d(3), "frozen_bn"), (nn.LayerNorm(3), "ln"), (TimmLayerNorm(3), "ln"),
                (LayerNorm2d(3), "ln2d")]
    for module, expected in accepted:
        assert UAN.classify(module) == (expected, "")
    assert UAN.classify(nn.Conv2d(3, 3, 1)) == (None, "")


def test_registry_and_from_site_checks():
    assert registry.get("uan") is UAN
    assert isinstance(build(nn.BatchNorm2d(3), "bn"), UAN) and isinstance(build(nn.LayerNorm(3), "ln"), UAN)
    with pytest.raises(NormswapError, match="the plan says source kind 'ln'"):
        build(nn.BatchNorm2d(3), "ln")
    with pytest.raises(OptionError):
        build(nn.BatchNorm2d(3), "bn", k=0)
    with pytest.raises(NormswapError, match="absorbs no modules"):
        UAN.from_site(Site(name="a", source_type="", variant="uan", config={"source_kind": "bn"}),
                      nn.BatchNorm2d(3), [nn.ReLU()])


def test_bn_act_keeps_activation_and_drop():
    source = BatchNormAct2d(4, act_layer=nn.GELU, drop_layer=nn.Dropout)
    module = build(randomize(source), "bn_act")
    assert isinstance(module.act, nn.GELU) and isinstance(module.drop, nn.Dropout)
    assert module.act is not source.act
    x = torch.randn(2, 4, 3, 3)
    assert torch.equal(module(x), source(x))


def test_examples_are_eval_models_with_sources_and_stay_exact():
    kinds = set()
    for model, x in UAN.examples():
        assert not model.training
        expected = model(x)
        for name, child in list(model.named_children()):
            kind, _ = UAN.classify(child)
            if kind:
                kinds.add(kind)
                if isinstance(child, nn.modules.batchnorm._BatchNorm):
                    assert not torch.equal(child.running_var, torch.ones_like(child.running_var))
                setattr(model, name, build(child, kind, strength=1.0))
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=1e-5)
    assert kinds == {"bn", "bn_act", "frozen_bn", "ln", "ln2d"}
