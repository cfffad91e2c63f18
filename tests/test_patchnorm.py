"""PatchNorm family (docs/methods.md section 1): layers against an im2col reference, exact starts, the paper's SGD
property, calibration, site proposals and config errors."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.func import functional_call

from normswap.errors import NormswapError, OptionError
from normswap.core.plan import Site
from normswap.variants import registry
from normswap.variants.patchnorm import layer as _patch
from normswap.variants.patchnorm.variant import (
    LN_REASON, PatchNorm, PatchNormConfig, PatchNormConv, PatchNormLinear, fit_gain, fold_batchnorm,
)

D = torch.float64
# nn.Conv itself warns for padding="same" with an even kernel (GEOMETRIES has such convs on purpose)
pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
FORMS = ("corrected", "l2", "rms")

# (dims, in, out, kwargs): every conv option the layer must honour
GEOMETRIES = [
    (1, 4, 6, dict(kernel_size=3, padding=1)),
    (1, 4, 6, dict(kernel_size=4, padding="same", padding_mode="reflect")),
    (1, 4, 4, dict(kernel_size=3, stride=2, dilation=2, groups=2, padding="valid", padding_mode="replicate")),
    (2, 4, 6, dict(kernel_size=3, padding=1)),
    (2, 4, 6, dict(kernel_size=3, stride=2, padding=(1, 2), bias=False)),
    (2, 4, 6, dict(kernel_size=(3, 5), padding="same", dilation=(2, 1))),
    (2, 4, 6, dict(kernel_size=4, padding="same")),  # even kernel: asymmetric padding
    (2, 4, 8, dict(kernel_size=3, padding=1, groups=2, padding_mode="circular")),
    (2, 4, 8, dict(kernel_size=3, padding=1, groups=4, bias=False)),  # depthwise, multiplier 2
    (2, 4, 4, dict(kernel_size=3, stride=2, padding=2, groups=4, padding_mode="reflect")),
    (2, 4, 6, dict(kernel_size=3, padding=4)),  # padding wider than half the kernel
    (2, 4, 6, dict(kernel_size=2, stride=2, padding="valid", padding_mode="replicate")),
    (2, 4, 6, dict(kernel_size=1, stride=2)),  # 1x1 fast path
    (2, 4, 6, dict(kernel_size=1, padding=1)),  # 1x1 with zero padding
    (3, 2, 4, dict(kernel_size=3, padding=1, stride=(1, 2, 2))),
    (3, 2, 4, dict(kernel_size=(2, 3, 3), padding="same", padding_mode="circular", groups=2)),
]
CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _conv(dims, cin, cout, kw, dtype=D):
    torch.manual_seed(0)
    return CONV[dims](cin, cout, **kw).to(dtype)


def _x(dims, cin, n=2, size=9, dtype=D):
    return torch.randn(n, cin, *([size] * dims), dtype=dtype)


def _perturb(m: PatchNorm, seed: int = 1) -> PatchNorm:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.gain.copy_(torch.rand(m.gain.shape, generator=g, dtype=m.gain.dtype) + 0.5)
        if m.offset is not None:
            m.offset.copy_(torch.randn(m.offset.shape, generator=g, dtype=m.offset.dtype))
    return m


@pytest.mark.parametrize("geo", GEOMETRIES, ids=lambda g: f"{g[0]}d-{g[3]}")
def test_forward_matches_unfold_reference(geo):
    dims, cin, cout, kw = geo
    conv, x = _conv(dims, cin, cout, kw), _x(dims, cin)
    ref_n2 = _patch._reference_n2(x, _patch.ConvGeometry.from_conv(conv))
    for form in FORMS:
        for strength, offset in ((1.0, False), (0.6, True)):
            m = _perturb(PatchNormConv.from_conv(conv, form=form, offset=offset, strength=strength))
            out = m(x)
            assert out.shape == conv(x).shape and out.dtype == D
            assert (out - _patch._reference_forward(m, x)).abs().max() < 1e-10, (form, strength)
            m.eval()
            with torch.no_grad():  # inference: lam and 1 folded into the box filter, rsqrt in place
                fast = m(x)
            assert (fast - _patch._reference_forward(m, x)).abs().max() < 1e-10, (form, strength, "inference")
            assert torch.allclose(fast, m(x), rtol=1e-12, atol=1e-12)  # the autograd path, same mode
    geom = m.geom
    methods = ["auto", "conv", "direct"] + (["box"] if all(d == 1 for d in geom.dilation) else [])
    for method in methods:  # every n2 path agrees with the explicit patches
        assert (_patch.patch_sq_norm(x, geom, method) - ref_n2).abs().max() < 1e-10, method


def test_reference_patches_reproduce_the_conv():
    """The oracle itself: W . P from its patches is the conv (so its n2 uses the conv's patches)."""
    for dims, cin, cout, kw in GEOMETRIES:
        conv, x = _conv(dims, cin, cout, kw), _x(dims, cin)
        m = PatchNormConv.from_conv(conv, form="l2", strength=0.0)  # the reference at lam 0: W . P + b
        ref = _patch._reference_forward(m, x)
        assert (ref - conv(x)).abs().max() < 1e-10, kw


def test_box_filter_handles_asymmetric_and_wide_padding():
    q = torch.rand(2, 1, 7, 8, dtype=D)
    pads = ((1, 2), (3, 3))  # asymmetric, and wider than half of a 3-kernel
    out = _patch._box_sum(q, (3, 3), (1, 2), pads)
    padded = F.pad(q, [3, 3, 1, 2])
    ref = F.conv2d(padded, torch.ones(1, 1, 3, 3, dtype=D), stride=(1, 2))
    assert out.shape == ref.shape and (out - ref).abs().max() < 1e-12


@pytest.mark.parametrize("form", FORMS)
def test_gradcheck(form):
    cases = [
        (2, 4, 4, dict(kernel_size=3, stride=2, padding=1, groups=2, padding_mode="reflect")),
        (1, 2, 3, dict(kernel_size=2, padding="same")),
    ]
    for dims, cin, cout, kw in cases:
        m = _perturb(PatchNormConv.from_conv(_conv(dims, cin, cout, kw), form=form, offset=True, strength=0.7))
        m.eval().n2_mean.fill_(2.5)  # eval: the running patch-norm mean (and so the scale k) is a constant
        x = _x(dims, cin, n=2, size=5).requires_grad_(True)
        params = {k: v.detach().clone().requires_grad_(True) for k, v in m.named_parameters()}
        names = list(params)

        def f(x, *ps):
            return functional_call(m, dict(zip(names, ps)), (x,))

        assert torch.autograd.gradcheck(f, (x, *params.values()), fast_mode=True)
    lin = _perturb(PatchNormLinear(5, 3, form=form, offset=True, strength=0.7, dtype=D))
    lin.eval().n2_mean.fill_(2.5)
    x = torch.randn(2, 3, 5, dtype=D, requires_grad=True)
    params = {k: v.detach().clone().requires_grad_(True) for k, v in lin.named_parameters()}
    assert torch.autograd.gradcheck(lambda x, *ps: functional_call(lin, dict(zip(params, ps)), (x,)),
                                    (x, *params.values()), fast_mode=True)


def test_strength_zero_is_the_source_exactly():
    for dims, cin, cout, kw in GEOMETRIES:
        conv, x = _conv(dims, cin, cout, kw, torch.float32), _x(dims, cin, dtype=torch.float32)
        for form in FORMS:
            m = _perturb(PatchNormConv.from_conv(conv, form=form, offset=True))  # gain/offset don't matter at 0
            assert m.claims_exact() and torch.equal(m(x), conv(x))
    lin = nn.Linear(7, 5)
    m = _perturb(PatchNormLinear.from_linear(lin, offset=True))
    x = torch.randn(3, 4, 7)
    assert m.claims_exact() and torch.equal(m(x), lin(x))
    m.set_strength(0.5)
    assert not m.claims_exact() and not torch.allclose(m(x), lin(x))


def _bn(c, dims, affine=True, seed=0):
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dims](c, affine=affine)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) * 3 + 0.1)
        if affine:
            bn.weight.copy_(torch.randn(c, generator=g))
            bn.bias.copy_(torch.randn(c, generator=g))
    return bn.eval()


def test_folded_pair_at_strength_zero_matches_the_pair():
    torch.manual_seed(0)
    cases = [
        (nn.Conv2d(3, 8, 3, padding=1), _bn(8, 2), torch.randn(4, 3, 10, 10)),
        (nn.Conv2d(6, 6, 3, padding=1, groups=6, bias=False), _bn(6, 2, affine=False), torch.randn(2, 6, 8, 8)),
        (nn.Conv1d(4, 5, 5, padding=2, padding_mode="reflect"), _bn(5, 1), torch.randn(3, 4, 20)),
        (nn.Conv3d(2, 4, 3, padding=1, bias=False), _bn(4, 3), torch.randn(2, 2, 5, 6, 6)),
    ]
    for conv, bn, x in cases:
        ref = bn(conv(x))
        m = PatchNormConv.from_conv(conv, bn)
        assert m.bias is not None and (m(x) - ref).abs().max() <= 1e-6 * max(1.0, ref.abs().max().item())
    lin, bn, x = nn.Linear(10, 6, bias=False), _bn(6, 1), torch.randn(8, 10)
    m = PatchNormLinear.from_linear(lin, bn)
    ref = bn(lin(x))
    assert (m(x) - ref).abs().max() <= 1e-6 * max(1.0, ref.abs().max().item())
    w, b = fold_batchnorm(lin.weight.double(), None, bn)
    assert torch.allclose(F.linear(x.double(), w, b), bn.double()(lin.double()(x.double())), atol=1e-12)


def test_sgd_step_moves_each_activation_by_exactly_minus_lr_g():
    """docs/methods.md section 1.1: a step on (W, b) moves a plain affine layer's z by -lr g (|x|^2 + 1), the corrected
    layer's (lam = 1, gain fixed at 1) by -lr g, whatever the input norm. One sample per step: that is
    the sample's own term (in a batch the other samples add cross terms, docs/methods.md section 1.5)."""
    torch.manual_seed(0)
    lr = 1e-4
    base = nn.Linear(6, 4).double()
    xs = torch.randn(5, 6, dtype=D) * torch.tensor([0.01, 0.3, 1.0, 10.0, 300.0], dtype=D)[:, None]
    gs = torch.randn(5, 4, dtype=D)
    for x, g in zip(xs, gs):
        x, g = x[None], g[None]
        for layer, factor in ((copy.deepcopy(base), (x * x).sum() + 1),
                              (PatchNormLinear.from_linear(base, strength=1.0), torch.tensor(1.0, dtype=D))):
            if isinstance(layer, PatchNorm):
                layer.gain.requires_grad_(False)
                layer.eval()  # n2_mean 0: k = 1
            params = [p for p in layer.parameters() if p.requires_grad]
            z_old = layer(x)
            (z_old * g).sum().backward()  # dL/dz = g
            with torch.no_grad():
                for p in params:
                    p -= lr * p.grad
                z_new = layer(x)
            want = -lr * g * factor
            assert ((z_new - z_old.detach()) - want).abs().max() <= 1e-3 * want.abs().max()


# ---- calibration ---------------------------------------------------------------------------------
def test_fit_gain_recovers_known_gain_and_offset():
    torch.manual_seed(0)
    for strength in (1.0, 0.5):
        conv = _conv(2, 4, 6, dict(kernel_size=3, padding=1, groups=2))
        truth = _perturb(PatchNormConv.from_conv(conv, offset=True, strength=strength), seed=3)
        xs = [_x(2, 4, n=3) * s for s in (0.5, 2.0, 5.0)]
        ys = [truth(x).detach() for x in xs]
        n2 = torch.cat([_patch._reference_n2(x, truth.geom) for x in xs])  # (N, groups, ...)
        truth.eval().n2_mean.copy_(n2.transpose(0, 1).reshape(2, -1).mean(1))
        ys = [truth(x).detach() for x in xs]  # truth's scale k uses the data's mean patch norm per group
        m = PatchNormConv.from_conv(conv, offset=True, strength=0.0)
        fit_gain(m, xs, ys, strength=strength)
        assert torch.allclose(m.n2_mean, truth.n2_mean, rtol=1e-12)  # calibration sets the mean from the data
        assert torch.allclose(m.gain, truth.gain, atol=1e-9) and torch.allclose(m.offset, truth.offset, atol=1e-9)
        assert m._calib is None and m.claims_exact()  # calibrating does not move the exact start
    for form in FORMS:
        lin = nn.Linear(5, 3).double()
        truth = _perturb(PatchNormLinear.from_linear(lin, form=form, strength=1.0))
        xs = [torch.randn(16, 5, dtype=D) * 3]
        truth.eval().n2_mean.fill_(float(xs[0].square().sum(-1).mean()))
        m = fit_gain(PatchNormLinear.from_linear(lin, form=form), xs, [truth(xs[0]).detach()])
        assert torch.allclose(m.gain, truth.gain, atol=1e-9), form


def test_fit_gain_streaming_equals_least_squares_formula():
    conv = _conv(2, 3, 5, dict(kernel_size=3, padding=1))
    xs = [_x(2, 3, n=2) for _ in range(3)]
    ys = [torch.randn(2, 5, 9, 9, dtype=D) for _ in range(3)]
    m = fit_gain(PatchNormConv.from_conv(conv), xs, ys)
    probe = PatchNormConv.from_conv(conv, strength=1.0).eval()  # eval, no statistics: k = 1
    u = torch.cat([probe(x).detach() for x in xs])  # u = (W.P + b) / s with gain 1
    y = torch.cat(ys)
    want = (y * u).sum((0, 2, 3)) / (u * u).sum((0, 2, 3))
    n2 = torch.cat([_patch._reference_n2(x, m.geom) for x in xs])
    assert torch.allclose(m.n2_mean, n2.mean().reshape(1), rtol=1e-12)
    k = torch.sqrt(n2.mean() + 1)  # the fitted gain times the scale is the least-squares slope
    assert torch.allclose(m.gain * k, want, atol=1e-12)


def test_calibration_on_real_activations_in_network_order():
    model, x = PatchNorm.examples()[0]
    data = [x * s for s in (1.0, 0.5, 2.0)]
    pairs = [(0, 1), (3, 4)]
    # the original pair outputs and inputs, captured by hooks
    ins, outs = {i: [] for i, _ in pairs}, {j: [] for _, j in pairs}
    hooks = [model[i].register_forward_hook(lambda m, a, o, i=i: ins[i].append(a[0])) for i, _ in pairs]
    hooks += [model[j].register_forward_hook(lambda m, a, o, j=j: outs[j].append(o)) for _, j in pairs]
    with torch.no_grad():
        for xb in data:
            model(xb)
    for h in hooks:
        h.remove()
    converted = copy.deepcopy(model)
    for i, j in pairs:
        converted[i] = PatchNormConv.from_conv(model[i], model[j])
        converted[j] = nn.Identity()
    layers = [converted[i] for i, _ in pairs]
    for layer in layers:
        layer.calibration_begin()
    with torch.no_grad():
        for xb in data:  # strength 0: every layer sees the original network's activations
            assert torch.allclose(converted(xb), model(xb), atol=1e-5)
    for layer in layers:
        layer.calibration_end()
    for (i, j), layer in zip(pairs, layers):
        probe = PatchNormConv.from_conv(model[i], model[j], strength=1.0).eval()  # k = 1
        u = torch.cat([probe(a).detach() for a in ins[i]]).double()
        y = torch.cat(outs[j]).double()
        want = (y * u).sum((0, 2, 3)) / (u * u).sum((0, 2, 3))
        k = layer.scale_per_output(1.0).double()
        assert float(layer.n2_mean.min()) > 0
        assert torch.allclose(layer.gain.double() * k, want, rtol=1e-4)
        # at strength 1 the calibrated layer fits the pair better than the uncalibrated one
        layer.set_strength(1.0)
        err = sum(((layer(a) - b) ** 2).sum() for a, b in zip(ins[i], outs[j]))
        err0 = sum(((probe(a) - b) ** 2).sum() for a, b in zip(ins[i], outs[j]))
        assert err < err0
        layer.set_strength(0.0)
    again = copy.deepcopy(layers[0])
    fit_gain(again, ins[0])  # deterministic, and forward-observing equals observe()
    assert torch.allclose(again.gain, layers[0].gain, rtol=1e-6)


def test_calibration_errors():
    m = PatchNormLinear(3, 2)
    with pytest.raises(NormswapError, match=r"^observe\(\) needs calibration_begin\(\) first$"):
        m.observe(torch.randn(2, 3))
    with pytest.raises(OptionError, match=r"^calibration strength must be in \(0, 1\]; got 0.0$"):
        m.calibration_begin(0.0)
    m.calibration_begin()
    with pytest.raises(NormswapError, match=r"^calibration target has shape \(2, 3\), expected \(2, 2\)$"):
        m.observe(torch.randn(2, 3), torch.randn(2, 3))
    before = m.gain.detach().clone()
    m.calibration_end()
    m.calibration_begin()
    m.calibration_end()  # no data: nothing changes
    assert torch.equal(m.gain, before)


# ---- config, registry, state ---------------------------------------------------------------------
@pytest.mark.parametrize("options, strength, message", [
    ({"form": "bogus"}, 0.0, "option 'form' of variant 'patchnorm' must be one of corrected, l2, rms; got 'bogus'"),
    ({"eps": 0}, 0.0, "option 'eps' of variant 'patchnorm' must be a finite number > 0; got 0.0"),
    ({"eps": "-1e-3"}, 0.0, "option 'eps' of variant 'patchnorm' must be a finite number > 0; got -0.001"),
    ({"eps": "nan"}, 0.0, "option 'eps' of variant 'patchnorm' must be a finite number > 0; got nan"),
    ({"eps": "tiny"}, 0.0, "option 'eps' of variant 'patchnorm' expects float, got 'tiny'"),
    ({"offset": "maybe"}, 0.0, "option 'offset' of variant 'patchnorm' expects bool, got 'maybe'"),
    ({"lam": 1}, 0.0, "unknown option 'lam' for variant 'patchnorm'; valid options: form, eps, offset"),
    ({}, 1.5, "strength must be in [0, 1]; got 1.5"),
])
def test_config_errors(options, strength, message):
    with pytest.raises(OptionError) as err:
        PatchNormConfig.from_options(options, strength, "patchnorm")
    assert str(err.value) == message


def test_config_parses_cli_strings_and_registry():
    c = PatchNormConfig.from_options({"form": "rms", "eps": "1e-3", "offset": "yes"}, "0.25", "patchnorm")
    assert c.to_dict() == {"strength": 0.25, "form": "rms", "eps": 1e-3, "offset": True}
    assert registry.get("patchnorm") is PatchNorm and PatchNorm.config_class is PatchNormConfig
    with pytest.raises(OptionError, match=r"^strength must be in \[0, 1\]; got -0.1$"):
        PatchNormLinear(2, 2).set_strength(-0.1)


def test_state_dict_keys_and_strength_resync():
    conv_bn = PatchNormConv.from_conv(nn.Conv2d(3, 4, 3, bias=False), _bn(4, 2))
    assert list(conv_bn.state_dict()) == ["weight", "bias", "gain", "lam", "n2_mean", "n2_batches"]
    lin = PatchNormLinear.from_linear(nn.Linear(3, 2, bias=False), offset=True)
    assert list(lin.state_dict()) == ["weight", "gain", "offset", "lam", "n2_mean", "n2_batches"]
    assert conv_bn.lam.dtype == torch.float32 and conv_bn.lam.dim() == 0
    src = _perturb(PatchNormConv.from_conv(nn.Conv2d(3, 4, 3), strength=0.5))
    dst = PatchNormConv.from_conv(nn.Conv2d(3, 4, 3))
    assert dst.current_strength() == 0.0
    dst.load_state_dict(src.state_dict())
    x = torch.randn(2, 3, 7, 7)
    assert dst.current_strength() == 0.5 and torch.equal(dst(x), src(x))


def test_fx_trace_and_compile_and_half_precision():
    model = nn.Sequential(
        PatchNormConv(3, 4, 3, padding=1, groups=1, padding_mode="reflect", strength=0.5), nn.ReLU(),
        PatchNormConv(4, 4, 3, padding=1, groups=2, form="rms"), nn.Flatten(), PatchNormLinear(64, 3, strength=0.3),
    ).eval()
    x = torch.randn(2, 3, 4, 4)
    gm = fx.symbolic_trace(model)
    assert torch.allclose(gm(x), model(x), atol=1e-6)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    assert torch.allclose(compiled(x), model(x), atol=1e-5)
    half = copy.deepcopy(model).to(torch.bfloat16)
    out = half(x.to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and torch.allclose(out.float(), model(x), atol=0.1, rtol=0.05)


def test_eval_in_place_path_equals_autograd_path():
    m = _perturb(PatchNormConv(4, 6, 3, padding=1, groups=2, strength=1.0))
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        a = m(x)
    assert torch.equal(a, m(x).detach())


# ---- sites ---------------------------------------------------------------------------------------
@dataclass
class Info:
    name: str
    module: nn.Module
    path: str = "fx"
    producer: str | None = None
    producer_exclusive: bool | None = None
    calls: int | None = 1
    extra: dict = field(default_factory=dict)

    def pattern(self, kind: str | None = None) -> str:
        return kind or type(self.module).__name__.lower()

    def facts(self) -> dict:
        return {"producer": self.producer, **self.extra}


def test_propose_pairs_skips_and_opt_in():
    no_stats = nn.BatchNorm2d(4, track_running_stats=False)
    infos = [
        Info("c0", nn.Conv2d(3, 4, 3)), Info("b0", nn.BatchNorm2d(4), producer="c0", producer_exclusive=True),
        Info("c1", nn.Conv2d(4, 4, 3)), Info("b1", nn.BatchNorm2d(4), producer="c1", producer_exclusive=False),
        Info("b2", nn.BatchNorm2d(4)),
        Info("c3", nn.Conv2d(4, 4, 1), path="walk"),
        Info("b3", nn.BatchNorm2d(4), path="walk", producer="c3", producer_exclusive=None),
        Info("b4", no_stats, producer="c3", producer_exclusive=True),
        Info("l5", nn.Linear(4, 6)), Info("b5", nn.BatchNorm1d(6), producer="l5", producer_exclusive=True),
        Info("c6", nn.Conv1d(4, 6, 1)), Info("b6", nn.BatchNorm2d(6), producer="c6", producer_exclusive=True),
        Info("ln", nn.LayerNorm(6)),
        Info("t7", nn.ConvTranspose2d(4, 4, 3)),
        Info("act", nn.ReLU()),
        Info("b8", nn.BatchNorm2d(4), path="walk"),
    ]
    config = PatchNormConfig(strength=0.0)
    sites = PatchNorm.propose(infos, config)
    got = {s.name: s for s in sites}
    assert [s.name for s in sites] == ["c0", "c1", "b1", "b2", "c3", "b3", "b4", "l5", "c6", "b6", "ln", "t7", "b8"]
    pair = got["c0"]
    assert (pair.action, pair.absorbs, pair.pattern, pair.opt_in) == ("convert", ["b0"], "conv->bn", False)
    assert pair.config == {"strength": 0.0, "form": "corrected", "eps": 1e-5, "offset": False, "source_kind": "conv_bn"}
    assert pair.source_type == "torch.nn.modules.conv.Conv2d" and pair.facts["bn"] == "b0"
    assert got["l5"].pattern == "linear->bn" and got["l5"].config["source_kind"] == "linear_bn"
    for name, kind in (("c1", "conv"), ("c3", "conv"), ("c6", "conv")):
        assert got[name].action == "convert" and got[name].opt_in and got[name].config["source_kind"] == kind
    reasons = {n: got[n].reason for n in ("b1", "b2", "b3", "b4", "b6", "ln", "b8")}
    assert all(got[n].action == "skip" for n in reasons)
    assert reasons["b1"] == "the output of 'c1' has other users (a residual, say): folding would change them"
    assert reasons["b2"] == "no preceding Conv2d: its input is not the output of a module"
    assert reasons["b3"] == ("found by the module walk and not provably exclusive: "
                             "the output of 'c3' may have other users")
    assert reasons["b4"] == "BatchNorm without running statistics (track_running_stats=False): nothing fixed to fold"
    assert reasons["b6"] == "its input comes from 'c6' (Conv1d), not a Conv2d"
    assert reasons["b8"] == "found by the module walk: no preceding Conv2d could be proven to feed it"
    assert reasons["ln"] == LN_REASON and "\n" not in LN_REASON
    assert got["t7"].action == "skip"
    assert got["t7"].reason.startswith("unknown subclass torch.nn.modules.conv.ConvTranspose2d")


def test_from_site_builds_and_refuses():
    conv, bn = nn.Conv2d(3, 4, 3).double(), _bn(4, 2).double()
    conv.weight.requires_grad_(False)
    cfg = {"strength": 0.25, "form": "l2", "eps": 1e-4, "offset": True}
    m = PatchNorm.from_site(Site("c", "torch.nn.modules.conv.Conv2d", "patchnorm",
                                 config={**cfg, "source_kind": "conv_bn"}), conv, [bn])
    assert isinstance(m, PatchNormConv) and m.weight.dtype == D and m.gain.dtype == D
    assert not m.weight.requires_grad and not m.gain.requires_grad
    assert (m.form, m.eps, m.current_strength(), m.offset is not None) == ("l2", 1e-4, 0.25, True)
    lin = PatchNorm.from_site(Site("l", "torch.nn.modules.linear.Linear", "patchnorm",
                                   config={**cfg, "source_kind": "linear"}), nn.Linear(3, 2), [])
    assert isinstance(lin, PatchNormLinear)
    msg = r"^site 'c': the plan says source kind 'linear' but the module is torch.nn.modules.conv.Conv2d$"
    with pytest.raises(NormswapError, match=msg):
        PatchNorm.from_site(Site("c", "", "patchnorm", config={**cfg, "source_kind": "linear"}), conv, [])
    with pytest.raises(NormswapError, match=r"^site 'c': a conv_bn site absorbs one BatchNorm2d, got nothing$"):
        PatchNorm.from_site(Site("c", "", "patchnorm", config={**cfg, "source_kind": "conv_bn"}), conv, [])


def test_examples_are_eval_models_with_pairs():
    examples = PatchNorm.examples()
    assert len(examples) == 5  # the last: timm norm + activation layers and a same-padding conv
    for model, x in examples:
        assert not model.training
        with torch.no_grad():
            assert torch.isfinite(model(x)).all()
        assert any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var.std() > 0 for m in model.modules())


def test_find_and_apply_fold_the_pairs():
    from normswap.surgery.apply import apply_plan
    from normswap.surgery.find import find

    model, x = PatchNorm.examples()[0]
    plan = find(model, "patchnorm")
    assert [(s.name, s.absorbs) for s in plan.converted] == [("0", ["1"]), ("3", ["4"])]
    converted = apply_plan(model, plan)
    assert isinstance(converted[1], nn.Identity) and isinstance(converted[0], PatchNormConv)
    with torch.no_grad():
        assert torch.allclose(converted(x), model(x), atol=1e-5)


def test_strength_aware_scale_tracks_the_patch_norm_and_keeps_the_output_scale():
    """Training mode keeps a running mean of n2 per group (first batch as is, then EMA 0.1); eval freezes it; the
    scale k = sqrt(lam m + 1) keeps a sample of typical patch norm unchanged at every lam (docs/methods.md section 0.2)."""
    torch.manual_seed(0)
    conv = _conv(2, 4, 6, dict(kernel_size=3, padding=1, groups=2))
    m = PatchNormConv.from_conv(conv, strength=0.5).train()
    xs = [_x(2, 4, n=3) * s for s in (1.0, 3.0)]
    means = [_patch._reference_n2(x, m.geom).transpose(0, 1).reshape(2, -1).mean(1) for x in xs]
    m(xs[0])
    assert torch.allclose(m.n2_mean, means[0], rtol=1e-12) and int(m.n2_batches) == 1
    m(xs[1])
    assert torch.allclose(m.n2_mean, 0.9 * means[0] + 0.1 * means[1], rtol=1e-12)
    frozen = m.n2_mean.clone()
    m.eval()(xs[0] * 7)
    assert torch.equal(m.n2_mean, frozen)
    # a constant-norm input at the typical norm passes through unchanged at any lam: k * (1 / s) = 1
    lin = PatchNormLinear.from_linear(nn.Linear(4, 3).double()).eval()
    x = torch.full((5, 4), 2.0, dtype=D)  # n2 = 16 for every sample
    lin.n2_mean.fill_(16.0)
    for lam in (0.001, 0.3, 1.0):
        lin.set_strength(lam)
        assert torch.allclose(lin(x), F.linear(x, lin.weight, lin.bias), atol=1e-12), lam


def test_file_without_scale_buffers_loads_with_unit_scale():
    """A state_dict written before the scale existed (no n2_mean / n2_batches) loads strictly as k = 1."""
    src = _perturb(PatchNormConv.from_conv(nn.Conv2d(3, 4, 3), strength=0.5))
    old = {k: v for k, v in src.state_dict().items() if not k.startswith("n2_")}
    dst = PatchNormConv.from_conv(nn.Conv2d(3, 4, 3))
    dst.n2_mean.fill_(5.0)
    dst.load_state_dict(old)  # strict
    assert float(dst.n2_mean.abs().max()) == 0.0 and int(dst.n2_batches) == 0
    x = torch.randn(2, 3, 7, 7)
    assert torch.allclose(dst.eval()(x), _patch._reference_forward(dst, x), atol=1e-5)


@pytest.mark.parametrize("form,offset", [("corrected", True), ("l2", False)])
def test_forward_after_observe_reuses_its_conv_and_n2(monkeypatch, form, offset):
    """Streaming calibration: observe(x, y), re-solve, then the forward on the same x at the calibration strength
    builds its output from the observed terms (no second conv and n2) and equals the ordinary forward."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=2).double().eval()
    layer = PatchNormConv.from_conv(conv, form=form, offset=offset, strength=0.5).eval()
    x = torch.randn(3, 4, 7, 7, dtype=D)
    y = conv(x).detach() * 1.3 + 0.2
    calls = []
    real = PatchNormConv._forward
    monkeypatch.setattr(PatchNormConv, "_forward", lambda self, v: calls.append(1) or real(self, v))
    layer.calibration_begin(0.5)
    with torch.no_grad():
        layer.observe(x, y)
        layer.calibration_update()
        reused = layer(x)
        assert calls == [] and "last" not in layer._calib
        fresh = layer(x)  # nothing observed for this call: the ordinary forward
        assert calls == [1]
        layer.observe(x, y)
        assert layer(x.clone()) is not None and calls == [1, 1]  # another tensor: never reused
    torch.testing.assert_close(reused, fresh, rtol=1e-12, atol=1e-12)
    layer.calibration_end()
