"""The finder: graph facts, the walk fallback, matching rules, the Plan's JSON form."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from normswap.errors import FileFormatError, TargetError, TraceError, UnknownVariantError, UsageError
from normswap.surgery.find import find
from normswap.core.graph import build_graph
from normswap.core.plan import PLAN_VERSION, Plan

from conftest import tv


def test_fx_graph_facts(small_cnn):
    g = build_graph(small_cnn)
    assert g.path == "fx" and g.trace_error is None
    stem_bn = g.info("stem.1")
    assert stem_bn.producer == "stem.0" and stem_bn.producer_exclusive is True
    assert stem_bn.activation == "stem.2" and stem_bn.pattern() == "conv->bn->act"
    bn = g.info("bn")  # conv output also feeds the residual add
    assert bn.producer == "conv" and bn.producer_exclusive is False
    assert bn.pattern() == "bn"
    head_bn = g.info("head.2")
    assert head_bn.producer == "head.1" and head_bn.producer_exclusive and head_bn.activation == "head.3"
    assert [c.function for c in g.functional] == ["torch.relu"]


def test_walk_fallback_decides_sequential_pairs(control_flow_net):
    g = build_graph(control_flow_net)
    assert g.path == "walk"
    assert g.trace_error.startswith("TraceError: symbolically traced variables cannot be used as inputs to control flow")
    assert g.info("features.1").producer == "features.0" and g.info("features.1").producer_exclusive
    assert g.info("features.1").activation == "features.2"
    assert g.info("alt").producer is None  # undecidable without the graph


def test_strict_trace_refuses_fallback(control_flow_net):
    with pytest.raises(TraceError) as err:
        build_graph(control_flow_net, strict_trace=True)
    assert str(err.value).startswith("torch.fx could not trace ControlFlowNet (TraceError: symbolically traced")
    assert str(err.value).endswith("run without --strict-trace to use the module-walk fallback")


def test_uan_plan_sites_and_facts(small_cnn):
    plan = find(small_cnn, "uan")
    assert [s.name for s in plan.converted] == ["stem.1", "bn", "head.2"]
    assert plan.converted[0].pattern == "conv->bn->act" and plan.converted[0].path == "fx"
    assert plan.converted[0].config == {"strength": 0.0, "k": 3, "var_floor": 1e-5, "source_kind": "bn"}
    assert plan.skipped == []  # UAN reports functional norm calls, not activations


def test_functional_norm_call_is_reported_not_rewritten():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = nn.LayerNorm(8)
            self.w = nn.Parameter(torch.ones(8))

        def forward(self, x):
            return torch.nn.functional.layer_norm(self.ln(x), (8,), self.w)

    plan = find(Net(), "uan")
    assert [s.name for s in plan.converted] == ["ln"]
    (site,) = plan.skipped
    assert (site.name, site.source_type, site.pattern) == ("layer_norm", "F.layer_norm", "functional")
    assert site.reason == ("functional F.layer_norm call: normswap rewrites modules, and a functional call has no "
                           "module to replace (wrap it in a module to convert it)")


@pytest.mark.parametrize(
    "targets, exclude, expected",
    [
        (["BatchNorm1d"], [], ["head.2"]),
        (["nn.BatchNorm2d"], [], ["stem.1", "bn"]),
        (["type:BatchNorm2d"], ["stem.1"], ["bn"]),
        ([".1"], [], ["stem.1"]),
        (["re:(stem|head)\\..*"], [], ["stem.1", "head.2"]),
        ([], ["re:.*\\.\\d"], ["bn"]),
        (["bn", "head.2"], [], ["bn", "head.2"]),
    ],
)
def test_matching_rules(small_cnn, targets, exclude, expected):
    plan = find(small_cnn, "uan", targets=targets, exclude=exclude)
    assert [s.name for s in plan.converted] == expected
    for site in plan.sites:
        if site.name not in expected:
            assert site.reason == "not targeted" or site.reason.startswith("excluded by '")


def test_target_matching_nothing_is_an_error(small_cnn):
    with pytest.raises(TargetError) as err:
        find(small_cnn, "uan", targets=["stem.7"])
    assert str(err.value) == "target 'stem.7' matches no uan site; nearby names: stem.1"  # stem.0, stem.2: no UAN site
    assert err.value.exit_code == 2
    with pytest.raises(TargetError, match="^exclude pattern 'layer9' matches no site; nearby names: "):
        find(small_cnn, "uan", exclude=["layer9"])


def test_bad_regex_and_unknown_variant(small_cnn):
    with pytest.raises(UsageError, match=r"^invalid regular expression in pattern 're:\(': "):
        find(small_cnn, "uan", targets=["re:("])
    with pytest.raises(UnknownVariantError) as err:
        find(small_cnn, "uann")
    assert str(err.value).startswith("unknown variant 'uann' (did you mean 'uan'?); known variants: ")


def test_unknown_subclass_is_refused_by_name():
    class MyBN(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) * 2

    model = nn.Sequential(nn.Conv2d(3, 4, 1), MyBN(4), nn.BatchNorm2d(4)).eval()
    plan = find(model, "uan")
    assert [s.name for s in plan.converted] == ["2"]
    (refused,) = plan.skipped
    assert refused.name == "1"
    assert refused.reason.startswith("unknown subclass test_find.test_unknown_subclass_is_refused_by_name.<locals>.MyBN "
                                     "of BatchNorm2d: no adapter, refused")


def test_shared_module_aliases():
    bn = nn.BatchNorm1d(4)
    model = nn.ModuleDict({"a": bn, "b": bn})

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = model

        def forward(self, x):
            return self.blocks["a"](x) + self.blocks["b"](x)

    plan = find(Net().eval(), "uan")
    (site,) = plan.converted
    assert site.facts["aliases"] == ["blocks.a", "blocks.b"] and site.facts["calls"] == 2


def test_plan_json_round_trip_and_versions(small_cnn):
    plan = find(small_cnn, "uan", strength=0.25, options={"k": "2"})
    again = Plan.from_json(plan.to_json())
    assert again == plan and again.strength == 0.25 and again.options == {"k": 2, "var_floor": 1e-5}
    newer = plan.to_dict() | {"version": PLAN_VERSION + 1}
    with pytest.raises(FileFormatError) as err:
        Plan.from_dict(newer)
    assert str(err.value) == (f"the plan is format version {PLAN_VERSION + 1}, newer than this normswap supports "
                              f"({PLAN_VERSION}); upgrade normswap to load it")
    with pytest.raises(FileFormatError, match="^the metadata holds no normswap plan"):
        Plan.from_dict({"variant": "uan"})


def test_vit_layernorms_and_resnet_pairs():
    vit = tv.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)
    plan = find(vit, "uan")
    assert [s.name for s in plan.converted] == ["encoder.layers.encoder_layer_0.ln_1", "encoder.layers.encoder_layer_0.ln_2",
                                                 "encoder.layers.encoder_layer_1.ln_1", "encoder.layers.encoder_layer_1.ln_2",
                                                 "encoder.ln"]
    assert all(s.config["source_kind"] == "ln" for s in plan.converted)
    r18 = tv.models.resnet18()
    g = build_graph(r18)
    assert g.info("layer1.0.bn1").pattern() == "conv->bn->act"
    assert g.info("layer1.0.bn2").pattern() == "conv->bn"  # followed by the residual add
    assert g.info("layer1.0.bn2").consumers == ["add"]
