"""Model sources: spec parsing, weights (names, files, offline failures), rebuild, probe inputs. No network."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from normswap.compat import import_torchvision
from normswap.errors import NormswapError, UnknownModelError, UsageError, WeightsError
from normswap.api.metadata import source_from_file
from conftest import needs_mobilenet, require_module
from normswap.sources import (RandomInitWarning, SourceSpec, example_input, load_model, parse_spec,
                              rebuild)

tv = import_torchvision()
HUB_FILE = os.path.join(torch.hub.get_dir(), "checkpoints", "mobilenet_v2-b0353104.pth")


def _keys_shapes(model: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def resnet18() -> nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RandomInitWarning)
        model, _ = load_model("resnet18", "none")
    return model


# ------------------------------------------------------------------------------------------ parsing
@pytest.mark.parametrize("text, spec, kind, name", [
    ("resnet50", "torchvision:resnet50", "torchvision", "resnet50"),
    ("torchvision:mobilenet_v2", "torchvision:mobilenet_v2", "torchvision", "mobilenet_v2"),
    ("ResNet18", "torchvision:resnet18", "torchvision", "resnet18"),
    ("timm:efficientnet_b0", "timm:efficientnet_b0", "timm", "efficientnet_b0"),
    ("pkg.mod:make", "pkg.mod:make", "python", "pkg.mod:make"),
])
def test_parse_names(text, spec, kind, name):
    parsed = parse_spec(text)
    assert (parsed.spec, parsed.kind, parsed.name, parsed.weights, parsed.kwargs) == (spec, kind, name, None, {})


def test_parse_file_and_hf_are_absolute(tmp_path, monkeypatch):
    (tmp_path / "m.py").write_text("")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    monkeypatch.chdir(tmp_path)
    assert parse_spec("m.py:make").spec == f"{tmp_path}/m.py:make"
    assert parse_spec("hf:hf").spec == f"hf:{tmp_path}/hf"


def test_unknown_names_suggest_close_ones():
    with pytest.raises(UnknownModelError) as err:
        parse_spec("resnt50")
    assert str(err.value) == ("unknown model 'resnt50' (did you mean 'resnet50', 'resnet152', 'resnet101'?); "
                              "see torchvision.models.list_models()")
    with pytest.raises(UnknownModelError) as err:
        parse_spec("timm:efficientnet_b00")
    assert str(err.value) == ("unknown timm model 'efficientnet_b00' (did you mean 'efficientnet_b0', "
                              "'efficientnet_b8', 'efficientnet_b7'?); see timm.list_models()")
    with pytest.raises(UnknownModelError, match=r"\(timm has it: use 'timm:convnext_nano'\)$"):
        parse_spec("convnext_nano")


def test_bad_specs():
    with pytest.raises(UsageError) as err:
        parse_spec("hf:no/such/dir")
    assert str(err.value) == ("hf source 'no/such/dir' is not a local directory holding config.json: normswap loads "
                              "Hugging Face models from a save_pretrained directory (download it first)")
    with pytest.raises(UsageError, match=r"^source file missing.py not found \(spec 'missing.py:make'\)$"):
        parse_spec("missing.py:make")


# ------------------------------------------------------------------------------------------ torchvision weights
def test_weights_none_warns_and_records(resnet18):
    with pytest.warns(RandomInitWarning, match=r"^torchvision:resnet18 has random weights \(--weights none\)"):
        model, source = load_model("resnet18", "none")
    assert not model.training
    assert source == SourceSpec("torchvision:resnet18", "torchvision", "resnet18", "none", {})
    assert SourceSpec.from_dict(source.to_dict()) == source


@needs_mobilenet
def test_cached_mobilenet_loads_offline_and_rebuilds():
    model, source = load_model("mobilenet_v2", "IMAGENET1K_V1")
    expected = torch.load(HUB_FILE, map_location="cpu", weights_only=True)
    assert _same_state(model.state_dict(), dict(expected))
    assert (source.weights, source.kwargs) == ("IMAGENET1K_V1", {"num_classes": 1000})
    assert _keys_shapes(rebuild(source)) == _keys_shapes(model)
    probe = example_input(model, source)
    assert probe.args[0].shape == (2, 3, 224, 224) and probe.kwargs == {}


def test_default_weights_fail_offline_in_one_line(monkeypatch):
    """DEFAULT is IMAGENET1K_V2 (not installable here): the download is attempted through torchvision's weights API,
    which is patched to refuse as an offline machine would; nothing leaves the machine, no clock is read."""
    import urllib.error

    import torchvision.models._api as tv_api

    asked = []

    def offline(url, *args, **kwargs):
        asked.append(url)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tv_api, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError) as err:
        load_model("mobilenet_v2")
    assert asked == [tv.models.MobileNet_V2_Weights.IMAGENET1K_V2.url]  # the download it would have made, once
    cached = ", a cached weights name (IMAGENET1K_V1)" if os.path.isfile(HUB_FILE) else ""
    assert str(err.value) == ("could not download the DEFAULT weights for torchvision:mobilenet_v2 "
                              "(MobileNet_V2_Weights.IMAGENET1K_V2): [Errno -3] Temporary failure in name resolution; "
                              "this machine may be offline: pass --weights FILE (.safetensors/.pt)"
                              f"{cached}, or --weights none for random init")


def test_unknown_weights_name_lists_valid_ones():
    with pytest.raises(UsageError) as err:
        load_model("mobilenet_v2", "IMAGENET")
    assert str(err.value) == ("unknown weights 'IMAGENET' for torchvision:mobilenet_v2; valid: DEFAULT, IMAGENET1K_V1, "
                              "IMAGENET1K_V2, none (random init), or a weights file (.safetensors/.pt)")


def test_bad_builder_kwargs_are_one_line():
    with pytest.raises(UsageError) as err:
        load_model("resnet18", "none", kwargs={"num_clases": 3})
    assert str(err.value) == ("cannot build torchvision:resnet18: TypeError: ResNet.__init__() got an unexpected "
                              "keyword argument 'num_clases'")
    with pytest.raises(UsageError, match=r"^builder kwargs must be JSON-able"):
        load_model("resnet18", "none", kwargs={"norm_layer": nn.BatchNorm2d})


def test_pretrained_architecture_changes_are_recorded():
    from normswap.sources.models import _tv_arch_kwargs
    w = tv.models.Inception_V3_Weights.IMAGENET1K_V1
    assert _tv_arch_kwargs("inception_v3", w, {}) == {"num_classes": 1000, "transform_input": True,
                                                      "aux_logits": True, "init_weights": False}
    w = tv.models.ViT_B_16_Weights.IMAGENET1K_SWAG_E2E_V1
    assert _tv_arch_kwargs("vit_b_16", w, {})["image_size"] == 384


def _structure(model: nn.Module) -> dict[str, tuple]:
    types = {name: type(m).__name__ for name, m in model.named_modules()}
    return {k: (tuple(v.shape), types[k.rpartition(".")[0]]) for k, v in model.state_dict().items() if torch.is_tensor(v)}


@pytest.mark.parametrize("name, weights", [
    ("inception_v3", "IMAGENET1K_V1"), ("googlenet", "IMAGENET1K_V1"), ("vit_b_16", "IMAGENET1K_SWAG_E2E_V1"),
    ("fasterrcnn_mobilenet_v3_large_320_fpn", "COCO_V1"), ("deeplabv3_mobilenet_v3_large", "DEFAULT"),
])
def test_rebuild_matches_pretrained_builders(monkeypatch, name, weights):
    """Builders change the architecture when given weights; rebuild (no weights) must match it, module types too."""
    from torchvision.models._api import WeightsEnum
    monkeypatch.setattr(WeightsEnum, "get_state_dict", lambda self, *a, **k: {})  # no download: structure only
    monkeypatch.setattr(nn.Module, "load_state_dict", lambda self, *a, **k: None)
    with torch.device("meta"):
        model, source = load_model(name, weights)
        rebuilt = rebuild(source_from_file(source.to_dict(), "f.safetensors"))  # what it records passes the allow-list
        again, _ = load_model(source)  # the recorded kwargs are accepted by the builder with weights again
    assert _structure(rebuilt) == _structure(model) == _structure(again)


# ------------------------------------------------------------------------------------------ weights files
@pytest.mark.parametrize("suffix", [".safetensors", ".pt"])
def test_state_dict_file_round_trip(resnet18, tmp_path, suffix):
    path = tmp_path / f"r18{suffix}"
    state = {k: v.clone() for k, v in resnet18.state_dict().items()}
    save_file(state, path) if suffix == ".safetensors" else torch.save({"state_dict": state, "epoch": 3}, path)
    model, source = load_model("resnet18", str(path))
    assert _same_state(model.state_dict(), resnet18.state_dict())
    assert source.weights == str(path) and not model.training


def test_module_prefix_is_stripped(resnet18, tmp_path):
    path = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in resnet18.state_dict().items()}, path)
    model, _ = load_model("resnet18", str(path))
    assert _same_state(model.state_dict(), resnet18.state_dict())


def test_keys_that_do_not_fit(resnet18, tmp_path):
    state = dict(resnet18.state_dict())
    del state["fc.weight"], state["fc.bias"]
    state["head.weight"] = torch.zeros(3)
    path = tmp_path / "x.pt"
    torch.save(state, path)
    with pytest.raises(WeightsError) as err:
        load_model("resnet18", str(path))
    assert str(err.value) == (f"weights file {path} does not fit torchvision:resnet18: 2 missing keys (fc.weight, "
                              "fc.bias), 1 unexpected key (head.weight)")
    state = dict(resnet18.state_dict(), **{"fc.weight": torch.zeros(10, 512), "fc.bias": torch.zeros(10)})
    save_file(state, tmp_path / "y.safetensors")
    with pytest.raises(WeightsError) as err:
        load_model("resnet18", str(tmp_path / "y.safetensors"))
    assert str(err.value).endswith("does not fit torchvision:resnet18: 2 shape mismatches (fc.weight: file 10x512, "
                                   "model 1000x512; fc.bias: file 10, model 1000)")


class Payload:
    """A class instance inside a checkpoint: torch.load(weights_only=True) must refuse it."""


def test_pickle_with_objects_is_refused(resnet18, tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": resnet18.state_dict(), "payload": Payload()}, path)
    with pytest.raises(WeightsError) as err:
        load_model("resnet18", str(path))
    assert str(err.value) == (
        f"weights file {path} was refused by torch.load(weights_only=True): it contains pickled objects beyond "
        f"tensors ({__name__}.Payload), and normswap never unpickles untrusted files; convert it to .safetensors "
        "(safetensors.torch.save_file(state_dict, 'model.safetensors')) where you trust it")


def test_corrupt_and_missing_files(resnet18, tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file(dict(resnet18.state_dict()), path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(WeightsError, match=rf"^weights file {path} is not a readable safetensors file \(.+\)$"):
        load_model("resnet18", str(path))
    with pytest.raises(WeightsError) as err:
        load_model("resnet18", "nope.pt")
    assert str(err.value) == ("weights file nope.pt not found (pass an existing .safetensors/.pt file, a weights name, "
                              "or --weights none)")


# ------------------------------------------------------------------------------------------ timm, hf, user code
def test_timm_random_init_and_rebuild():
    require_module("timm")
    with pytest.warns(RandomInitWarning):
        model, source = load_model("timm:efficientnet_b0", "none")
    assert source.spec == "timm:efficientnet_b0" and source.weights == "none"
    assert _keys_shapes(rebuild(source)) == _keys_shapes(model)
    assert example_input(model, source).args[0].shape == (2, 3, 224, 224)
    with pytest.raises(UsageError, match=r"^unknown weights 'IMAGENET1K_V1' for timm:efficientnet_b0: pass none"):
        load_model("timm:efficientnet_b0", "IMAGENET1K_V1")


def test_timm_pretrained_fails_offline_in_one_line():
    require_module("timm")
    if os.environ.get("HF_HUB_OFFLINE") != "1":
        pytest.skip("needs HF_HUB_OFFLINE=1 (otherwise the hub client retries for about a minute)")
    try:
        load_model("timm:efficientnet_b0")
    except WeightsError as exc:
        message = str(exc)
    else:
        pytest.skip("timm efficientnet_b0 weights are cached")
    assert message.startswith("could not download the pretrained weights for timm:efficientnet_b0: ")
    assert message.endswith("; this machine may be offline: pass --weights FILE (.safetensors/.pt), "
                            "or --weights none for random init") and "\n" not in message


@pytest.fixture
def bert_dir(tmp_path):
    transformers = require_module("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=37, vocab_size=100)
    torch.manual_seed(0)
    model = transformers.BertModel(config).eval()
    model.save_pretrained(tmp_path / "bert")
    return tmp_path / "bert", model


def test_hf_directory(bert_dir):
    path, original = bert_dir
    model, source = load_model(f"hf:{path}")
    assert (source.kind, source.spec, source.weights) == ("hf", f"hf:{path}", None)
    assert _same_state(model.state_dict(), original.state_dict())
    assert _keys_shapes(rebuild(source)) == _keys_shapes(model)
    probe = example_input(model, source)
    assert probe.args == () and probe.kwargs["input_ids"].shape == (2, 16)
    assert probe.kwargs["input_ids"].max() < 100 and probe.kwargs["attention_mask"].shape == (2, 16)
    with torch.no_grad():
        model(*probe.args, **probe.kwargs)
    with pytest.warns(RandomInitWarning):
        load_model(f"hf:{path}", "none")


FACTORY = """
from torch import nn

def make(width=4):
    return nn.Sequential(nn.Linear(3, width), nn.BatchNorm1d(width), nn.ReLU())

def not_a_model():
    return [1, 2]

NUMBER = 3
"""


def test_python_factory(tmp_path, monkeypatch):
    (tmp_path / "my_models.py").write_text(FACTORY)
    monkeypatch.syspath_prepend(str(tmp_path))
    model, source = load_model("my_models:make", kwargs={"width": 6})
    assert model[0].out_features == 6 and source.kwargs == {"width": 6} and source.kind == "python"
    with pytest.raises(NormswapError) as err:
        rebuild(source)
    assert str(err.value) == ("this file was made from custom code 'my_models:make'; normswap does not run code named "
                              "inside a file: pass the model (normswap.load(path, model=...)) or allow it explicitly "
                              "(--trust-source)")
    assert _keys_shapes(rebuild(source, allow_code=True)) == _keys_shapes(model)
    with pytest.raises(UsageError, match=r"^'my_models' has no attribute 'mak' \(did you mean 'make'\?\)"):
        load_model("my_models:mak")
    with pytest.raises(UsageError, match=r"^'my_models:NUMBER' is not callable \(it is an int\)"):
        load_model("my_models:NUMBER")
    with pytest.raises(NormswapError, match=r"^factory 'my_models:not_a_model' returned a list, not a torch.nn.Module"):
        load_model("my_models:not_a_model")
    with pytest.raises(UsageError, match=r"^cannot import module 'no_such_pkg.mod' for source 'no_such_pkg.mod:make': "
                                         r"ModuleNotFoundError: No module named 'no_such_pkg'$"):
        load_model("no_such_pkg.mod:make")


def test_file_factory(tmp_path):
    (tmp_path / "net.py").write_text(FACTORY)
    model, source = load_model(f"{tmp_path}/net.py:make")
    assert source.kind == "file" and source.spec == f"{tmp_path}/net.py:make" and isinstance(model[1], nn.BatchNorm1d)
    with pytest.raises(NormswapError, match="custom code"):
        rebuild(SourceSpec.from_dict(source.to_dict()))
    (tmp_path / "net.py").unlink()
    with pytest.raises(UsageError, match=r"^source file .*net.py not found"):
        rebuild(source, allow_code=True)


# ------------------------------------------------------------------------------------------ probes
class ConvNet1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(5, 4, 3)
        self.bn = nn.BatchNorm1d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


def test_example_inputs_for_unknown_models(resnet18):
    assert example_input(nn.Sequential(nn.Linear(7, 3), nn.ReLU()), None).args[0].shape == (2, 7)
    assert example_input(ConvNet1d(), None).args[0].shape == (2, 5, 32)
    ids = example_input(nn.Sequential(nn.Embedding(50, 8)), None).args[0]
    assert ids.shape == (2, 16) and ids.dtype == torch.long and ids.max() < 50
    assert example_input(nn.ReLU(), None) is None
    assert example_input(resnet18, None).args[0].shape == (2, 3, 32, 32)
    vit = tv.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=16, mlp_dim=16)
    assert example_input(vit, None).args[0].shape == (2, 3, 32, 32)
    first, again = example_input(resnet18, parse_spec("resnet18")), example_input(resnet18, parse_spec("resnet18"))
    assert first.args[0].shape == (2, 3, 224, 224) and torch.equal(first.args[0], again.args[0])
    assert example_input(resnet18, parse_spec("inception_v3")).args[0].shape == (2, 3, 299, 299)


def test_misfit_message_says_when_it_lists_only_some_keys(tmp_path):
    """A weights file missing seven keys names three of them and says there are more."""
    from safetensors.torch import save_file

    from normswap.sources import load_weights_file

    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    state = {k: v for k, v in model.state_dict().items() if k == "0.weight"}
    path = tmp_path / "part.safetensors"
    save_file(state, str(path))
    with pytest.raises(WeightsError) as err:
        load_weights_file(model, str(path), "the model")
    assert str(err.value) == (f"weights file {path} does not fit the model: 7 missing keys "
                              "(0.bias, 1.weight, 1.bias, ...)")
