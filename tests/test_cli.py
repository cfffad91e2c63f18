"""The command line: exact messages and exit codes (1 failed operation, 2 bad usage)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from normswap.cli.main import cli

from conftest import needs_mobilenet

MODEL_FILE = '''
import torch
from torch import nn

def small():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.LazyLinear(2)).eval()

def tiny():
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 2)).eval()
'''


def run(*args, cwd=None):
    runner = CliRunner()
    if cwd is not None:
        old = os.getcwd()
        os.chdir(cwd)
    try:
        return runner.invoke(cli, list(args), catch_exceptions=False)
    finally:
        if cwd is not None:
            os.chdir(old)


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "models.py"
    path.write_text(MODEL_FILE)
    return path


def test_variants_lists_uan():
    res = run("variants", "--json")
    assert res.exit_code == 0
    names = [row["name"] for row in json.loads(res.stdout)]
    assert "uan" in names
    res = run("variants")
    assert "uan" in res.stdout and "(options: k, var_floor)" in res.stdout


def test_inspect_cnn_and_vit():
    res = run("inspect", "resnet18")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    assert lines[0] == "torchvision:resnet18: 29 norm/activation sites, found by torch.fx graph"
    assert lines[1].split() == ["name", "type", "shape", "pattern", "path"]
    bn1 = next(line for line in lines if line.startswith("bn1 "))
    assert bn1.split() == ["bn1", "BatchNorm2d", "2x64x112x112", "conv->bn->act", "fx"]
    res = run("inspect", "vit_b_16", "--json")
    data = json.loads(res.stdout)
    lns = [r for r in data["rows"] if r["type"] == "LayerNorm"]
    assert len(lns) == 25 and lns[0]["shape"] == "2x197x768" and data["path"] == "fx"
    assert any(r["type"] == "GELU" for r in data["rows"])


def test_convert_python_factory_and_load(model_file, tmp_path):
    out = tmp_path / "tiny.safetensors"
    res = run("convert", f"{model_file}:tiny", "--to", "uan", "--option", "k=2", "-o", str(out))
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[0].startswith("plan: 1 site(s) to convert to uan, 0 left alone (strength 0;")
    assert "end to end: max |output diff|" in res.stdout and res.stdout.rstrip().endswith(f"saved {out}")
    again = run("convert", f"{model_file}:tiny", "--to", "uan", "-o", str(out))
    assert again.exit_code == 1
    assert again.stderr == f"Error: {out} exists; pass --force (force=True) to overwrite it\n"
    assert run("convert", f"{model_file}:tiny", "--to", "uan", "-o", str(out), "--force").exit_code == 0


def test_convert_dry_run_json(model_file):
    res = run("convert", f"{model_file}:tiny", "--to", "uan", "--dry-run", "--json")
    plan = json.loads(res.stdout)["plan"]
    assert plan["variant"] == "uan" and [s["name"] for s in plan["sites"]] == ["1"]


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["convert", "resnt18", "--to", "uan"], 2,
         "Error: unknown model 'resnt18' (did you mean 'resnet18'"),
        (["convert", "{f}:tiny", "--to", "patchnorn"], 2, "Error: unknown variant 'patchnorn'"),
        (["convert", "{f}:tiny", "--to", "uan", "--targets", "layer9"], 2,
         "Error: target 'layer9' matches no uan site; nearby names: "),
        (["convert", "{f}:tiny", "--to", "uan", "--option", "k"], 2,
         "Error: Invalid value for '--option': expected KEY=VALUE, got 'k'"),
        (["convert", "{f}:tiny", "--to", "uan", "--option", "kk=2"], 2,
         "Error: unknown option 'kk' for variant 'uan'; valid options: k, var_floor"),
        (["convert", "{f}:tiny", "--to", "uan", "--strength", "2"], 2, "Error: Invalid value for '--strength'"),
        (["convert", "{f}:tiny", "--to", "uan", "-o", "/sys/kernel/x.safetensors"], 1,
         "Error: cannot write /sys/kernel/x.safetensors: directory /sys/kernel is not writable ("),
        (["convert", "{f}:tiny", "--to", "uan", "-o", "{d}/no/x.safetensors"], 1,
         "Error: cannot write {d}/no/x.safetensors: directory {d}/no does not exist"),
    ],
)
def test_bad_usage_messages(args, code, message, model_file, tmp_path):
    args = [a.format(f=model_file, d=tmp_path) for a in args]
    res = run(*args, cwd=tmp_path)
    assert res.exit_code == code, res.output
    assert res.stderr.startswith(message.format(d=tmp_path)), res.stderr
    assert "Traceback" not in res.output
    assert list(tmp_path.glob("*.safetensors")) == []


def test_strict_trace_flag(tmp_path):
    path = tmp_path / "cf.py"
    path.write_text(
        "import torch\nfrom torch import nn\n"
        "class Net(nn.Module):\n"
        "    def __init__(self):\n        super().__init__(); self.bn = nn.BatchNorm1d(4)\n"
        "    def forward(self, x):\n        return self.bn(x) if x.sum() > 0 else x\n"
        "def make():\n    return Net().eval()\n"
    )
    res = run("convert", f"{path}:make", "--to", "uan", "--strict-trace", "-o", str(tmp_path / "o.safetensors"))
    assert res.exit_code == 1
    assert res.stderr.startswith("Error: torch.fx could not trace Net (TraceError: symbolically traced variables")
    res = run("convert", f"{path}:make", "--to", "uan", "--dry-run")
    assert res.exit_code == 0 and "trace failed, used the module walk: TraceError" in res.stdout


def test_python_m_and_console_script():
    out = subprocess.run([sys.executable, "-m", "normswap", "--version"], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "normswap, version 0.1.0"
    exe = os.path.join(os.path.dirname(sys.executable), "normswap")
    out = subprocess.run([exe, "variants"], capture_output=True, text=True, check=True)
    assert out.stdout.startswith("uan") or "\nuan" in out.stdout


@needs_mobilenet
def test_convert_pretrained_mobilenet_cli(tmp_path):
    out = tmp_path / "mnv2.safetensors"
    res = run("convert", "mobilenet_v2", "--weights", "IMAGENET1K_V1", "--to", "uan", "-o", str(out), "--json")
    assert res.exit_code == 0, res.output
    data = json.loads(res.stdout)
    assert data["report"]["ok"] and data["report"]["end_to_end"] == 0.0 and len(data["report"]["sites"]) == 52
    assert out.is_file()
