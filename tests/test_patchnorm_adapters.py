"""PatchNorm's adapters (normswap/variants/patchnorm/adapters.py): timm norm + activation layers folded with their
activation kept, same-padding convolutions (dynamic and static), plans that say how to register a missing
adapter, register_adapter, parity with UAN's and ANAct's norm-act classes, and a table of timm models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normswap
from normswap.calibration.runner import run_calibration
from normswap.errors import NormswapError, OptionError
from normswap.surgery.find import find
from normswap.core.plan import Site
from normswap.core.kinds import ACT_PARENTS
from normswap.variants.patchnorm import adapters as _patch_adapters, layer as _patch
from normswap.core.kinds import qualname
from normswap.variants.patchnorm.examples import randomize_batchnorms
from normswap.variants import CalibrationSettings
from normswap.variants.patchnorm import NormActTail, PatchNorm, PatchNormConv, fit_gain, register_adapter
from normswap.variants.uan import UAN

from conftest import require_module

timm = require_module("timm")
from timm.layers import BatchNormAct2d, Conv2dSame  # noqa: E402
from timm.layers.conv2d_same import Conv2dSameExport  # noqa: E402
from timm.layers.norm_act import SyncBatchNormAct  # noqa: E402

D = torch.float64


@pytest.fixture
def adapters():
    """register_adapter changes a process-wide table: restore it after the test."""
    saved = dict(_patch_adapters.ADAPTERS)
    yield _patch_adapters.ADAPTERS
    _patch_adapters.ADAPTERS.clear()
    _patch_adapters.ADAPTERS.update(saved)


def _stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial eval statistics in every BatchNorm (random init has mean 0, var 1: folding would be trivial)."""
    return randomize_batchnorms(model, torch.Generator().manual_seed(seed))


# ---- stand-ins for EfficientNet-PyTorch's convs (the package is not installed; code copied from its utils.py) ----
class Conv2dStaticSamePadding(nn.Conv2d):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, image_size=None, **kwargs):
        super().__init__(in_channels, out_channels, kernel_size, stride, **kwargs)
        self.stride = self.stride if len(self.stride) == 2 else [self.stride[0]] * 2
        ih, iw = (image_size, image_size) if isinstance(image_size, int) else image_size
        kh, kw = self.weight.size()[-2:]
        sh, sw = self.stride
        oh, ow = math.ceil(ih / sh), math.ceil(iw / sw)
        pad_h = max((oh - 1) * self.stride[0] + (kh - 1) * self.dilation[0] + 1 - ih, 0)
        pad_w = max((ow - 1) * self.stride[1] + (kw - 1) * self.dilation[1] + 1 - iw, 0)
        if pad_h > 0 or pad_w > 0:
            self.static_padding = nn.ZeroPad2d((pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2))
        else:
            self.static_padding = nn.Identity()

    def forward(self, x):
        x = self.static_padding(x)
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Conv2dDynamicSamePadding(nn.Conv2d):
    def __init__(self, in_channels, out_channels, kernel_size, stride=1, dilation=1, groups=1, bias=True):
        super().__init__(in_channels, out_channels, kernel_size, stride, 0, dilation, groups, bias)
        self.stride = self.stride if len(self.stride) == 2 else [self.stride[0]] * 2

    def forward(self, x):
        ih, iw = x.size()[-2:]
        kh, kw = self.weight.size()[-2:]
        sh, sw = self.stride
        oh, ow = math.ceil(ih / sh), math.ceil(iw / sw)
        pad_h = max((oh - 1) * self.stride[0] + (kh - 1) * self.dilation[0] + 1 - ih, 0)
        pad_w = max((ow - 1) * self.stride[1] + (kw - 1) * self.dilation[1] + 1 - iw, 0)
        if pad_h > 0 or pad_w > 0:
            x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


for _cls in (Conv2dStaticSamePadding, Conv2dDynamicSamePadding):
    _cls.__module__ = "efficientnet_pytorch.utils"  # the names PatchNorm's built-in adapters know

SAME_CONVS = [  # (factory, input sizes): odd and even sizes give asymmetric and symmetric "same" pads
    (lambda: Conv2dSame(4, 6, 3, stride=2), [(9, 9), (10, 7)]),
    (lambda: Conv2dSame(4, 8, 5, stride=2, groups=4, bias=False), [(11, 12)]),
    (lambda: Conv2dSame(4, 6, (3, 4), stride=(1, 3), dilation=(2, 1)), [(8, 13)]),
    (lambda: Conv2dDynamicSamePadding(4, 6, 3, stride=2), [(9, 10)]),
    (lambda: Conv2dStaticSamePadding(4, 6, 3, stride=2, image_size=9), [(9, 9)]),
    (lambda: Conv2dStaticSamePadding(4, 6, 3, stride=2, image_size=10, padding=1), [(10, 10)]),
    (lambda: Conv2dStaticSamePadding(4, 6, 1, image_size=9), [(9, 9)]),  # nn.Identity padding
]


@pytest.mark.parametrize("case", range(len(SAME_CONVS)))
def test_same_padding_convs_use_their_own_padding(case):
    factory, sizes = SAME_CONVS[case]
    torch.manual_seed(case)
    conv = factory().to(D)
    for size in sizes:
        x = torch.randn(2, 4, *size, dtype=D)
        m = PatchNormConv.from_conv(conv)  # kind from the class's adapter
        with torch.no_grad():
            assert torch.equal(m(x), conv(x))  # strength 0: the source conv's own ops, bit for bit
        # n2 over the patches the conv really reads: the explicitly padded input under a pad-free geometry
        padded = m.geom.pre_pad(x)
        plain = nn.Conv2d(4, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                          conv.groups, dtype=D)
        ref = _patch._reference_n2(padded, _patch.ConvGeometry.from_conv(plain))
        assert padded.shape[-2:] != x.shape[-2:] or isinstance(getattr(conv, "static_padding", None), nn.Identity)
        for method in ("auto", "conv", "direct"):
            assert (_patch.patch_sq_norm(x, m.geom, method) - ref).abs().max() < 1e-10
        m.set_strength(1.0)
        with torch.no_grad():
            out = m(x)
        assert out.shape == conv(x).shape
        assert (out - _patch._reference_forward(m, x)).abs().max() < 1e-10


def test_same_padding_geometry_refuses_what_it_cannot_mirror():
    conv = Conv2dSame(2, 2, 3, stride=2)
    conv.padding = (1, 1)
    with pytest.raises(ValueError, match=r"^a conv_same convolution has no padding of its own; Conv2dSame has "
                                         r"padding=\(1, 1\)$"):
        _patch.ConvGeometry.from_conv(conv)
    static = Conv2dStaticSamePadding(2, 2, 3, stride=2, image_size=9)
    static.static_padding = nn.ReflectionPad2d(1)
    with pytest.raises(ValueError, match=r"^a conv_static_same convolution has a 'static_padding' nn.ZeroPad2d "
                                         r"or nn.Identity; Conv2dStaticSamePadding has ReflectionPad2d$"):
        _patch.ConvGeometry.from_conv(static)


def _normact_net() -> nn.Sequential:
    torch.manual_seed(0)
    return _stats(nn.Sequential(
        Conv2dSame(3, 8, 3, stride=2, bias=False), BatchNormAct2d(8, act_layer=nn.SiLU, drop_layer=nn.Dropout),
        nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), BatchNormAct2d(8, act_layer=nn.ReLU),
        nn.Conv2d(8, 4, 1), BatchNormAct2d(4, apply_act=False), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
    ))


def test_normact_pairs_keep_their_activation_and_round_trip(tmp_path):
    model, x = _normact_net(), torch.randn(4, 3, 11, 9)
    result = normswap.convert(model, to="patchnorm", example_inputs=x)
    plan = result.plan
    assert [(s.name, s.absorbs, s.facts["norm_kind"]) for s in plan.converted] == [
        ("0", ["1"], "bn_act"), ("2", ["3"], "bn_act"), ("4", ["5"], "bn_act")]
    assert plan.converted[0].reason == ("BatchNormAct2d '1' folded in (eval statistics); its drop and act stay "
                                        "after the layer")
    conv = result.model
    assert [type(conv[i]) for i in (1, 3, 5)] == [NormActTail] * 3
    assert isinstance(conv[1].act, nn.SiLU) and isinstance(conv[1].drop, nn.Dropout)
    assert isinstance(conv[5].act, nn.Identity) and conv[1].act is not model[1].act
    assert PatchNorm.compare_points(plan.converted[0]) == [("1.drop", "1.drop")]
    assert [c.max_abs_diff is not None for c in result.report.sites] == [True] * 3  # compared at the drop
    with torch.no_grad():
        ref = model(x)
        assert (conv(x) - ref).abs().max() < 1e-5
    assert not any(k.startswith(("1.", "3.", "5.")) for k in conv.state_dict())  # folded away
    path = normswap.save(result, tmp_path / "m.safetensors")
    loaded = normswap.load(path, model=model)
    assert type(loaded[1]) is NormActTail and isinstance(loaded[1].act, nn.SiLU)
    with torch.no_grad():
        assert torch.equal(loaded(x), conv(x))
    for s in plan.converted:
        conv.get_submodule(s.name).set_strength(1.0)
    with torch.no_grad():
        assert torch.isfinite(conv(x)).all()


def test_calibration_fits_normact_sites_to_the_pre_activation():
    model, x = _normact_net(), torch.randn(8, 3, 11, 9)
    result = normswap.convert(model, to="patchnorm", example_inputs=x)
    run_calibration(result.model, result.plan, [x], reference=model, layerwise=True,
              settings=CalibrationSettings(strength=1.0))
    first = result.model[0]
    with torch.no_grad():
        pre = F.batch_norm(model[0](x), model[1].running_mean, model[1].running_var, model[1].weight, model[1].bias,
                           False, 0.0, model[1].eps)
        want = fit_gain(PatchNormConv.from_conv(model[0], model[1]), [x], [pre]).gain
        post = fit_gain(PatchNormConv.from_conv(model[0], model[1]), [x], [F.silu(pre)]).gain
    assert torch.allclose(first.gain, want, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(first.gain, post, rtol=1e-2)


def test_plans_say_which_class_lacks_an_adapter_and_how_to_register(adapters):
    class MyBN(nn.BatchNorm2d):
        pass

    torch.manual_seed(0)
    model = nn.Sequential(Conv2dSameExport(3, 4, 3, stride=2), nn.BatchNorm2d(4), nn.ReLU(),
                          nn.Conv2d(4, 4, 1), MyBN(4), nn.ConvTranspose2d(4, 4, 2), nn.BatchNorm2d(4)).eval()
    got = {s.name: s for s in find(model, "patchnorm").sites}
    export = "timm.layers.conv2d_same.Conv2dSameExport"
    how = "normswap.variants.patchnorm.register_adapter"
    assert got["0"].reason == (
        f"unknown subclass {export} of Conv2d: no PatchNorm adapter; it feeds '1': if the pair should fold, "
        f"register one with {how}('{export}', KIND) before planning ('conv' if its forward is nn.Conv2d's, "
        "'conv_same' if it pads TF-'same' from the input size first; docs/patchnorm.md)")
    assert got["1"].reason.startswith(f"its input comes from '0', an unknown subclass {export} of Conv2d: "
                                      f"no PatchNorm adapter; if the pair should fold, register one with {how}(")
    mine = qualname(MyBN)
    assert got["4"].reason == (
        f"unknown subclass {mine} of BatchNorm2d: no PatchNorm adapter; the fx graph shows '3' feeding it: if the "
        f"pair should fold, register one with {how}('{mine}', KIND) before planning ('bn' if its forward is its "
        "BatchNorm base's in eval mode, 'bn_act' if its drop and act follow; docs/patchnorm.md)")
    assert got["6"].reason == "its input comes from '5' (ConvTranspose2d), not a Conv2d"  # no hint: no geometry
    assert "register" not in got["5"].reason
    cfg = {"strength": 0.0, "source_kind": "conv_bn"}
    with pytest.raises(NormswapError, match=rf"^site '3': no PatchNorm adapter for {mine}; register it with {how} "
                                            r"before building or loading \(docs/patchnorm.md\)$"):
        PatchNorm.from_site(Site("3", qualname(nn.Conv2d), "patchnorm", config=cfg), model[3], [model[4]])
    register_adapter(MyBN, "bn")
    register_adapter(export, "conv_same")  # by name; the export conv's cached pad equals the dynamic one here
    plan = find(model, "patchnorm")
    assert [(s.name, s.absorbs) for s in plan.converted if not s.opt_in] == [("0", ["1"]), ("3", ["4"])]
    x = torch.randn(2, 3, 9, 9)
    result = normswap.convert(model, to="patchnorm", example_inputs=x)
    with torch.no_grad():
        assert (result.model(x) - model(x)).abs().max() < 1e-5


def test_register_adapter_checks_its_arguments(adapters):
    with pytest.raises(OptionError, match=r"^unknown PatchNorm adapter kind 'batchnorm'; use one of linear, conv, "
                                          r"conv_same, conv_static_same, bn, bn_act, frozen_bn$"):
        register_adapter(nn.BatchNorm2d, "batchnorm")
    with pytest.raises(OptionError, match=r"^a conv adapter needs a subclass of _ConvNd \(not a transposed "
                                          r"convolution\); torch.nn.modules.conv.ConvTranspose2d is not one$"):
        register_adapter(nn.ConvTranspose2d, "conv")
    with pytest.raises(OptionError, match=r"^a bn adapter needs a subclass of _BatchNorm"):
        register_adapter(nn.GroupNorm, "bn")
    with pytest.raises(OptionError, match=r"^torch.nn.modules.conv.Conv2d already has the PatchNorm adapter "
                                          r"'conv', not 'conv_same'$"):
        register_adapter(nn.Conv2d, "conv_same")
    register_adapter(nn.Conv2d, "conv")  # the same again is fine
    register_adapter("torch.nn.modules.normalization.GroupNorm", "bn")  # by name: checked on each instance
    assert PatchNorm.classify(nn.GroupNorm(2, 4)) == (None, "torch.nn.modules.normalization.GroupNorm is registered "
                                                            "as a PatchNorm bn adapter but does not fit that kind")
    register_adapter("my.pkg.MyBN", "bn")
    assert adapters["my.pkg.MyBN"] == "bn" and PatchNorm.adapters is adapters


def test_every_norm_act_class_uan_and_anact_handle_patchnorm_folds():
    """UAN's BatchNorm-like classes all fold. Of the norm + activation classes whose act ANAct converts,
    the BatchNorm ones fold; GroupNorm/LayerNorm/RmsNorm ones normalise per sample: nothing fixed to fold."""
    uan = {name for name, kind in UAN.adapters.items() if kind in ("bn", "bn_act", "frozen_bn")}
    assert uan <= set(PatchNorm.adapters) and {PatchNorm.adapters[n] for n in uan} <= set(_patch_adapters.NORM_KINDS)
    from torchvision.ops.misc import FrozenBatchNorm2d

    for norm in (nn.BatchNorm2d(5), BatchNormAct2d(5, act_layer=nn.GELU), FrozenBatchNorm2d(5), nn.SyncBatchNorm(5)):
        assert qualname(norm) in uan or isinstance(norm, nn.SyncBatchNorm)
        model = _stats(nn.Sequential(nn.Conv2d(3, 5, 3), norm))
        if isinstance(norm, FrozenBatchNorm2d):
            with torch.no_grad():
                norm.running_mean.uniform_(-1, 1), norm.running_var.uniform_(0.5, 2), norm.weight.uniform_(0.5, 1.5)
        x = torch.randn(2, 3, 8, 8)
        result = normswap.convert(model, to="patchnorm", example_inputs=x)
        assert [(s.name, s.absorbs) for s in result.plan.converted] == [("0", ["1"])]
        with torch.no_grad():
            assert (result.model(x) - model(x)).abs().max() < 1e-5
    import timm.layers.norm_act as norm_act

    batchnorms = {"BatchNormAct2d", "SyncBatchNormAct", "FrozenBatchNormAct2d"}
    for name in ACT_PARENTS:
        short = name.rpartition(".")[2]
        folds = PatchNorm.adapters.get(name) == "bn_act"
        # FrozenBatchNormAct2d is not a norm to the fx finder (a plain nn.Module): it is traced through
        assert folds == (short in batchnorms - {"FrozenBatchNormAct2d"}), name
        assert folds or not issubclass(getattr(norm_act, short), nn.modules.batchnorm._BatchNorm)
    sync = timm.layers.convert_sync_batchnorm(_normact_net()).eval()
    assert type(sync[1]) is SyncBatchNormAct
    x = torch.randn(2, 3, 11, 9)
    result = normswap.convert(sync, to="patchnorm", example_inputs=x)
    assert [type(m) for m in result.model if isinstance(m, NormActTail)] == [NormActTail] * 3
    with torch.no_grad():
        assert (result.model(x) - sync(x)).abs().max() < 1e-5


# ---- timm models: every Conv -> BN pair folds, exact at strength 0, finite at strength 1 --------------------------
TIMM = [  # (name, converted pairs = every BatchNorm of the model, BatchNormAct2d tails)
    ("efficientnet_b0", 49, 49),
    ("tf_efficientnet_b0", 49, 49),
    ("mobilenetv3_large_100", 46, 46),
    ("regnety_008", 47, 47),
    ("resnet18", 20, 0),
]


@pytest.mark.parametrize("name, pairs, tails", TIMM, ids=[t[0] for t in TIMM])
def test_timm_models_fold_every_pair(name, pairs, tails, tmp_path):
    model = _stats(timm.create_model(name, pretrained=False))
    x = torch.randn(2, 3, 64, 64)
    result = normswap.convert(model, to="patchnorm", example_inputs=x)
    folded = [s for s in result.plan.converted if not s.opt_in]
    assert len(folded) == len(result.plan.converted) == pairs
    assert sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()) == pairs
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in result.model.modules())
    assert sum(isinstance(m, NormActTail) for m in result.model.modules()) == tails
    assert result.report.ok and result.report.end_to_end_claimed
    with torch.no_grad():
        ref = model(x)
        assert (result.model(x) - ref).abs().max() < 1e-4 * max(1.0, ref.abs().max().item())
    for s in result.plan.converted:
        result.model.get_submodule(s.name).set_strength(1.0)
    with torch.no_grad():
        assert torch.isfinite(result.model(x)).all()
