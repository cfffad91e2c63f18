"""A file never runs code, reads other files or reaches the network on its own (docs/security.md).

Every case builds a crafted file and checks the exact one-line error, the exit code, and that nothing ran.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

import normswap
from normswap.api.calibration import _reference
from normswap.cli.main import cli
from normswap.errors import FileFormatError, NormswapError
from normswap.io import read_file, write_file
from normswap.api.metadata import source_from_file
from normswap.sources import SourceSpec, cached_weights, load_model, rebuild

from conftest import require_module

EVIL = '''
import pathlib
pathlib.Path({marker!r}).write_text("ran")
from transformers import BertModel
class EvilModel(BertModel):
    pass
'''
EVIL_CONFIG = {"model_type": "bert", "hidden_size": 8, "num_hidden_layers": 1, "num_attention_heads": 2,
               "intermediate_size": 8, "vocab_size": 10, "architectures": ["EvilModel"],
               "auto_map": {"AutoModel": "modeling_evil.EvilModel"}}


def run(*args: str, cwd=None):
    old = os.getcwd()
    os.chdir(cwd or old)
    try:
        return CliRunner().invoke(cli, list(args), catch_exceptions=False)
    finally:
        os.chdir(old)


def _with_meta(src, dst, **changes):
    tensors, meta = read_file(src)
    meta.update(changes)
    write_file(dst, tensors, meta, force=True)
    return dst


@pytest.fixture
def bundle(tmp_path, r18_file):
    """A 'downloaded bundle': weights whose metadata points transformers at a folder holding modeling_evil.py."""
    require_module("transformers")
    folder = tmp_path / "bundle"
    folder.mkdir()
    marker = tmp_path / "PWNED"
    (folder / "modeling_evil.py").write_text(EVIL.format(marker=str(marker)))
    (folder / "config.json").write_text(json.dumps(EVIL_CONFIG))
    return folder, marker


def test_crafted_bundle_never_runs_its_code(bundle, r18_file):
    folder, marker = bundle
    crafted = {"spec": "hf:.", "kind": "hf", "name": ".", "kwargs": {"trust_remote_code": True}}
    path = _with_meta(r18_file, folder / "model.safetensors", source=crafted)
    for args in (["eval", "model.safetensors", "--data", "photos"], ["export", "model.safetensors"],
                 ["calibrate", "model.safetensors", "--force"]):
        res = run(*args, cwd=folder)
        assert res.exit_code == 1, res.output
        assert res.stderr == ("Error: model.safetensors: refused model source in the file's metadata: hf source '.' is "
                              "not an absolute directory path (normswap writes absolute ones)\n")
    with pytest.raises(FileFormatError, match="hf source '.' is not an absolute directory path"):
        normswap.load(path, trust_source=True)  # not even with trust: the file is malformed
    absolute = dict(crafted, spec=f"hf:{folder}", name=str(folder))
    path = _with_meta(r18_file, folder / "abs.safetensors", source=absolute)
    with pytest.raises(FileFormatError) as err:
        normswap.load(path, trust_source=True)
    assert str(err.value) == (f"{path}: refused model source in the file's metadata: builder kwarg 'trust_remote_code' "
                              "is never taken from a file (it runs code that ships with a model)")
    assert not marker.exists()


def test_hf_folder_with_custom_code_needs_trust(bundle, r18_file):
    folder, marker = bundle
    path = _with_meta(r18_file, folder / "plain.safetensors",
                      source={"spec": f"hf:{folder}", "kind": "hf", "name": str(folder), "kwargs": {}})
    expected = (f"hf directory {folder} is custom code (its config.json maps classes to custom code (auto_map)); "
                "normswap runs it only when you allow it (--trust-source on the command line, trust_source=True in "
                "Python)")
    with pytest.raises(NormswapError) as err:
        normswap.load(path)
    assert str(err.value) == expected
    res = run("export", str(path))
    assert (res.exit_code, res.stderr) == (1, f"Error: {expected}\n")
    with pytest.raises(NormswapError, match=r"^hf directory .* is custom code \(its config.json maps"):
        load_model(f"hf:{folder}")  # a folder named on the command line is refused the same way
    config = dict(EVIL_CONFIG)
    del config["auto_map"], config["architectures"]  # no auto_map: a .py next to the config still counts
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(NormswapError, match=r"is custom code \(it holds Python code \(modeling_evil.py\)\); normswap "
                                            r"runs it only when you allow it \(--trust-source on the command line, "
                                            r"trust_source=True in Python\)$"):
        normswap.load(path)
    assert not marker.exists()


def test_trust_source_is_the_only_door(bundle, tmp_path):
    """With --trust-source, transformers runs the folder's code: the refusals above are what stood in the way."""
    folder, marker = bundle
    script = ("import normswap\nfrom normswap.sources import SourceSpec, rebuild\n"
              f"rebuild(SourceSpec('hf:{folder}', 'hf', {str(folder)!r}), allow_code=True)\n")
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert marker.read_text() == "ran"


@pytest.fixture
def no_network(monkeypatch):
    """Every connection attempt is recorded and refused."""
    attempts: list = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


def test_rebuilding_never_downloads(no_network, r18_file, tmp_path):
    model = normswap.load(r18_file)
    assert type(model.layer4[1].bn2).__name__ == "UANChannel"
    uncached = next(n for n in ("IMAGENET1K_V1", "IMAGENET1K_V2") if n not in cached_weights("resnet18"))
    source = SourceSpec("torchvision:resnet18", "torchvision", "resnet18", uncached, {"num_classes": 1000})
    path = _with_meta(r18_file, tmp_path / "pretrained.safetensors", source=source.to_dict())
    model = normswap.load(path)
    ref, label = _reference(model, source, None, False)  # eval's comparison model: no reload, no download
    assert label == (f"this model at strength 0, i.e. the function it started from (the original's {uncached} weights "
                     "are not in torch's hub cache, and normswap does not download them)")
    timm = require_module("timm")
    assert timm.is_model("resnet18")
    rebuild(SourceSpec("timm:resnet18", "timm", "resnet18", None, {"num_classes": 10}))
    transformers = require_module("transformers")
    config = transformers.BertConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16, vocab_size=50)
    transformers.BertModel(config).save_pretrained(tmp_path / "bert")
    rebuild(SourceSpec(f"hf:{tmp_path / 'bert'}", "hf", str(tmp_path / "bert")))
    assert no_network == []


def test_the_network_guard_works(no_network, tmp_path):
    """The guard above sees a download: torchvision's weights API goes through it."""
    with pytest.raises(Exception):
        torch.hub.load_state_dict_from_url("https://download.pytorch.org/models/resnet18-f37072fd.pth",
                                           model_dir=str(tmp_path), progress=False)
    assert no_network


TV = {"spec": "torchvision:resnet18", "kind": "torchvision", "name": "resnet18"}


@pytest.mark.parametrize("source, why", [
    ("resnet18", "expected a JSON object, got str"),
    ({**TV, "code": "x"}, "unknown field 'code'"),
    ({**TV, "kind": "shell"}, "unknown kind 'shell' (known: torchvision, timm, hf, python, file)"),
    ({**TV, "name": "resnet_evil"}, "unknown torchvision model 'resnet_evil'"),
    ({**TV, "name": ["resnet18"]}, "name ['resnet18'] is not a model name"),
    ({**TV, "kwargs": []}, "'spec' must be a string and 'kwargs' an object"),
    ({**TV, "kwargs": {"weights_backbone": "DEFAULT"}},
     "builder kwarg 'weights_backbone' is never taken from a file (it can download weights)"),
    ({**TV, "kwargs": {"num_clases": 3}}, "builder kwarg 'num_clases' is not allowed for a torchvision source "
     "(allowed: _frozen_bn, attention_dropout, aux_logits, aux_loss, backend, dropout, groups, image_size, "
     "init_weights, input_size, num_classes, num_keypoints, quantize, replace_stride_with_dilation, "
     "stochastic_depth_prob, transform_input, width_mult, width_per_group, zero_init_residual)"),
    ({**TV, "kwargs": {"num_classes": "10"}}, "builder kwarg 'num_classes' has a bad value '10'"),
    ({**TV, "kwargs": {"num_classes": 10 ** 12}}, "builder kwarg 'num_classes' has a bad value 1000000000000"),
    ({**TV, "kwargs": {"_frozen_bn": ["bn1; rm -rf"]}}, "builder kwarg '_frozen_bn' has a bad value ['bn1; rm -rf']"),
    ({**TV, "weights": "DEFAULT"}, "weights 'DEFAULT' is neither a weights name of resnet18 nor an absolute weights "
     "file path"),
    ({**TV, "weights": "https://example.com/w.pth"}, "weights 'https://example.com/w.pth' is neither a weights name of "
     "resnet18 nor an absolute weights file path"),
    ({"spec": "timm:x", "kind": "timm", "name": "resnet18", "kwargs": {"checkpoint_path": "/etc/passwd"}},
     "builder kwarg 'checkpoint_path' is never taken from a file (it reads another file)"),
    ({"spec": "timm:x", "kind": "timm", "name": "resnet18", "kwargs": {"pretrained_cfg_overlay": {"file": "/x"}}},
     "builder kwarg 'pretrained_cfg_overlay' is never taken from a file (it can read files or download)"),
    ({"spec": "timm:x", "kind": "timm", "name": "no_such_net"}, "unknown timm model 'no_such_net'"),
    ({"spec": "hf:/m", "kind": "hf", "name": "/m", "kwargs": {"device_map": "auto"}},
     "builder kwarg 'device_map' is not allowed for a hf source (allowed: none)"),
    ({"spec": "x", "kind": "python", "name": "os:system;"}, "python source 'os:system;' is not MODULE:FACTORY"),
    ({"spec": "x", "kind": "file", "name": "evil.py:make"}, "file source 'evil.py:make' is not an absolute path to a "
     ".py file"),
    ({"spec": "x", "kind": "python", "name": "m:make", "kwargs": {"x": float("nan")}},
     "builder kwarg 'x' is not a plain keyword with a JSON value"),
])
def test_bad_sources_are_refused(source, why):
    with pytest.raises(FileFormatError) as err:
        source_from_file(source, "m.safetensors")
    assert str(err.value) == f"m.safetensors: refused model source in the file's metadata: {why}"


def test_valid_sources_pass_and_are_normalised():
    got = source_from_file({**TV, "spec": "whatever", "weights": "IMAGENET1K_V1", "kwargs": {"num_classes": 1000}}, "f")
    assert got == SourceSpec("torchvision:resnet18", "torchvision", "resnet18", "IMAGENET1K_V1", {"num_classes": 1000})
    assert source_from_file(None, "f") is None


def test_bad_builder_kwargs_in_a_file_are_one_line(r18_file, tmp_path):
    """A kwarg of the allow-list that this builder does not take: exit 1, naming the file."""
    path = _with_meta(r18_file, tmp_path / "kw.safetensors", source={**TV, "kwargs": {"num_keypoints": 3}})
    res = run("export", str(path))
    assert res.exit_code == 1
    assert res.stderr == (f"Error: {path}: cannot build torchvision:resnet18: TypeError: ResNet.__init__() got an "
                          "unexpected keyword argument 'num_keypoints'\n")
