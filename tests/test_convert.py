"""End to end through the API: convert -> verify -> save -> load, on real architectures."""

from __future__ import annotations

import pytest
import torch
from torch import fx, nn

import normswap
from normswap.errors import NormswapError, VerificationError
from normswap.core.probe import ProbeInput
from normswap.surgery.verify import verify
from normswap.variants.base import Variant

from conftest import needs_mobilenet, randomize_bn, require_module, tv


def _roundtrip(result, tmp_path, probe, model=None):
    path = result.save(tmp_path / "m.safetensors")
    loaded = normswap.load(path, model=model)
    with torch.no_grad():
        a, b = result.model.eval()(probe), loaded(probe)
    assert torch.allclose(a, b, atol=1e-6, rtol=0), float((a - b).abs().max())
    return loaded


def test_small_cnn_exact_and_roundtrip(small_cnn, tmp_path):
    x = torch.randn(4, 3, 16, 16)
    result = normswap.convert(small_cnn, to="uan", example_inputs=x)
    assert result.report.ok and result.report.end_to_end_claimed
    assert [c.name for c in result.report.sites] == ["stem.1", "bn", "head.2"]
    assert all(c.max_abs_diff <= 1e-6 for c in result.report.sites)
    assert result.report.end_to_end < 1e-5
    assert type(result.model) is type(small_cnn)  # the user's class is kept
    assert set(small_cnn.state_dict()) <= set(result.model.state_dict())  # original keys kept
    assert isinstance(small_cnn.stem[1], nn.BatchNorm2d)  # the input model is untouched
    _roundtrip(result, tmp_path, x, model=small_cnn)


def test_strength_one_moves_separated_model_and_verify_catches_broken_claims(small_cnn):
    x = torch.randn(4, 3, 16, 16)
    result = normswap.convert(small_cnn, to="uan", strength=1.0, example_inputs=x)
    assert result.report.ok  # coinciding components: exact at any strength
    uan = result.model.stem[1]
    with torch.no_grad():
        uan.mix_mean[0].add_(1.0)  # separate a component: no longer an exact copy at strength 1
    assert not uan.claims_exact()

    class Liar(type(uan)):
        def claims_exact(self):
            return True

    uan.__class__ = Liar
    report = verify(small_cnn, result.model, result.plan, ProbeInput((x,)))
    assert not report.ok and report.failures[0].name == "stem.1"


def test_verification_failure_raises(small_cnn, monkeypatch):
    from normswap.variants import uan as uan_mod

    original = uan_mod.UAN.from_site.__func__

    def broken(cls, site, module, absorbed):
        new = original(cls, site, module, absorbed)
        with torch.no_grad():
            if getattr(new, "bias", None) is not None:
                new.bias.add_(0.5)
        return new

    monkeypatch.setattr(uan_mod.UAN, "from_site", classmethod(broken))
    with pytest.raises(VerificationError) as err:
        normswap.convert(small_cnn, to="uan", example_inputs=torch.randn(2, 3, 16, 16))
    assert str(err.value).startswith("the converted model does not reproduce the original at the exact start "
                                     "(3 site(s), first stem.1: max |diff| 5.000e-01)")


def test_graph_module_and_inplace(small_cnn):
    gm = fx.symbolic_trace(small_cnn)
    x = torch.randn(2, 3, 16, 16)
    result = normswap.convert(gm, to="uan", example_inputs=x)
    assert isinstance(result.model, fx.GraphModule) and result.report.ok
    assert isinstance(gm.get_submodule("stem.1"), nn.BatchNorm2d)
    ref = small_cnn(x)
    same = normswap.convert(small_cnn, to="uan", example_inputs=x, inplace=True)
    assert same.model is small_cnn and isinstance(small_cnn.stem[1], Variant)
    assert torch.allclose(small_cnn(x), ref, atol=1e-5)


def test_control_flow_model_converts_through_fallback(control_flow_net, tmp_path):
    x = torch.randn(2, 3, 12, 12)
    result = normswap.convert(control_flow_net, to="uan", example_inputs=x)
    assert result.plan.trace_path == "walk" and result.plan.trace_error.startswith("TraceError")
    assert [(s.name, s.path, s.pattern) for s in result.plan.converted] == [
        ("features.1", "walk", "conv->bn->act"), ("alt", "walk", "bn")]
    assert result.report.ok
    _roundtrip(result, tmp_path, x, model=control_flow_net)


def test_torchvision_resnets_random_init(tmp_path):
    for name, n_bn in (("resnet18", 20), ("resnet50", 53)):
        result = normswap.convert(name, to="uan", weights="none")
        assert len(result.plan.converted) == n_bn and result.report.ok
        assert result.report.end_to_end == 0.0  # UAN at strength 0 calls F.batch_norm: bit-identical (README)
    loaded = _roundtrip(result, tmp_path, torch.randn(1, 3, 64, 64))  # resnet50, rebuilt from its spec
    assert isinstance(loaded, tv.models.ResNet)


def test_mlp_with_batchnorm1d_head(tmp_path):
    torch.manual_seed(1)
    mlp = randomize_bn(nn.Sequential(nn.Linear(10, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 32),
                                     nn.BatchNorm1d(32), nn.SiLU(), nn.Linear(32, 3)))
    result = normswap.convert(mlp, to="uan", options={"k": 5})
    assert [s.pattern for s in result.plan.converted] == ["linear->bn->act"] * 2
    assert result.report.probe == "(2, 10) float32" and result.report.ok
    assert result.model[1].mix_mean.shape == (5, 32)
    _roundtrip(result, tmp_path, torch.randn(7, 10), model=mlp)


def test_timm_efficientnet_batchnormact(tmp_path):
    require_module("timm")
    result = normswap.convert("timm:efficientnet_b0", to="uan", weights="none")
    kinds = {s.config["source_kind"] for s in result.plan.converted}
    assert kinds == {"bn_act"} and len(result.plan.converted) == 49
    assert result.report.ok and result.report.end_to_end == 0.0  # bit-identical, BatchNormAct2d's act included
    bn1 = result.model.bn1
    assert isinstance(bn1.act, nn.SiLU)  # BatchNormAct2d's activation is kept
    _roundtrip(result, tmp_path, torch.randn(1, 3, 64, 64))


def test_vit_layernorms_to_sample_mode_exactly(tiny_vit, tmp_path):
    x = torch.randn(2, 3, 32, 32)
    result = normswap.convert(tiny_vit, to="uan", strength=1.0, example_inputs=x)
    assert len(result.plan.converted) == 5 and result.report.ok
    assert result.report.end_to_end < 1e-4
    _roundtrip(result, tmp_path, x, model=tiny_vit)


def test_nothing_to_convert_is_an_error():
    with pytest.raises(NormswapError) as err:
        normswap.convert(nn.Sequential(nn.Linear(3, 3), nn.ReLU()), to="uan")
    assert str(err.value) == "nothing to convert: Sequential has no site for variant 'uan'"


@needs_mobilenet
def test_pretrained_mobilenet_v2_on_real_photos(photo_batch, tmp_path):
    result = normswap.convert("mobilenet_v2", to="uan", weights="IMAGENET1K_V1")
    assert len(result.plan.converted) == 52 and result.report.ok
    assert result.report.end_to_end == 0.0  # README: max |logit diff| 0
    original = tv.models.mobilenet_v2(weights="IMAGENET1K_V1").eval()
    with torch.no_grad():
        a, b = original(photo_batch), result.model.eval()(photo_batch)
    assert torch.equal(a, b)  # bit-identical on real photos too
    assert torch.equal(a.argmax(1), b.argmax(1))
    assert a.argmax(1)[2].item() in range(281, 286)  # chelsea is a cat (ImageNet classes 281-285)
    path = result.save(tmp_path / "mnv2.safetensors")
    loaded = normswap.load(path)
    with torch.no_grad():
        assert torch.equal(loaded(photo_batch), b)


def test_hugging_face_bert_through_the_walk(tmp_path):
    transformers = require_module("transformers")
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=37, max_position_embeddings=64)
    model = transformers.BertModel(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0, 0.1)
    model.save_pretrained(tmp_path / "bert")
    result = normswap.convert(f"hf:{tmp_path / 'bert'}", to="uan", strength=1.0)
    assert result.plan.trace_path == "walk"
    assert len(result.plan.converted) == 5 and {s.config["source_kind"] for s in result.plan.converted} == {"ln"}
    assert result.report.ok and result.report.end_to_end < 1e-4
    path = result.save(tmp_path / "bert-uan.safetensors")
    loaded = normswap.load(path)
    ids = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        a = result.model.eval()(input_ids=ids).last_hidden_state
        b = loaded(input_ids=ids).last_hidden_state
    assert torch.allclose(a, b, atol=1e-6, rtol=0)


def test_patchnorm_resnet50_cli_and_reload(tmp_path):
    from click.testing import CliRunner

    from normswap.cli.main import cli

    out = tmp_path / "r50-pn.safetensors"
    res = CliRunner().invoke(cli, ["convert", "resnet50", "--to", "patchnorm", "--weights", "none", "-o", str(out),
                                   "--json"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    data = __import__("json").loads(res.stdout)
    sites = data["plan"]["sites"]
    assert sum(s["action"] == "convert" for s in sites) == 53
    assert {s["pattern"] for s in sites if s["action"] == "convert"} <= {"conv->bn", "conv->bn->act"}
    fc = next(s for s in sites if s["name"] == "fc")
    assert fc["action"] == "skip" and fc["reason"] == "converted only when a target names it (e.g. --targets fc)"
    assert data["report"]["ok"] and data["report"]["end_to_end"] < 1e-3
    loaded = normswap.load(out)
    assert isinstance(loaded.layer1[0].bn1, nn.Identity)  # folded into the PatchNorm conv
    original = normswap.sources.rebuild(normswap.sources.parse_spec("resnet50"))
    reference = normswap.convert(original, to="patchnorm", check=False).model
    reference.load_state_dict(loaded.state_dict())
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x), reference.eval()(x))


@needs_mobilenet
def test_patchnorm_pretrained_mobilenet_both_ends(photo_batch, tmp_path):
    original = tv.models.mobilenet_v2(weights="IMAGENET1K_V1").eval()
    exact = normswap.convert(original, to="patchnorm", example_inputs=photo_batch[:2])
    assert len(exact.plan.converted) == 52 and exact.report.ok and exact.report.end_to_end < 1e-4  # README: ~1e-5
    full = normswap.convert(original, to="patchnorm", strength=1.0, example_inputs=photo_batch[:2])
    assert not full.report.end_to_end_claimed and full.report.end_to_end > 1e-2  # the paper's layer moves the model
    with torch.no_grad():
        a, b, c = original(photo_batch), exact.model(photo_batch), full.model(photo_batch)
    assert torch.equal(a.argmax(1), b.argmax(1))
    path = full.save(tmp_path / "mnv2-pn1.safetensors")
    with torch.no_grad():
        assert torch.allclose(normswap.load(path, model=original)(photo_batch), c, atol=1e-6, rtol=0)
