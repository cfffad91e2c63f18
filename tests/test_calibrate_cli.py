"""``normswap calibrate``, ``normswap eval`` and ``convert --calibrate``: outputs, JSON, one-line errors, exit codes."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import normswap
from test_cli import run

from conftest import randomize_bn


def net() -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)))


MODEL_FILE = '''
import torch
from torch import nn

def net():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))
    return m.eval()
'''


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "models.py").write_text(MODEL_FILE)
    g = torch.Generator().manual_seed(2)
    save_file({"inputs": torch.randn(48, 3, 12, 12, generator=g) + 0.5,
               "labels": torch.randint(0, 4, (48,), generator=g)}, str(tmp_path / "data.safetensors"))
    torch.manual_seed(1)
    weights = randomize_bn(nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))).state_dict()
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp_path / "w.safetensors"))
    return tmp_path


def test_convert_with_calibrate_prints_the_report_and_saves(workdir):
    res = run("convert", "models.py:net", "--weights", "w.safetensors", "--to", "patchnorm", "--strength", "1",
              "--calibrate", "data.safetensors", "--calib-samples", "16", "--eval-samples", "16", "-o", "m.safetensors",
              cwd=workdir)
    assert res.exit_code == 0, res.output
    assert "end to end on 16 held-out samples" in res.output
    assert "after calibration" in res.output and "saved m.safetensors" in res.output
    model = normswap.load(workdir / "m.safetensors", model=net())
    assert float((model[0].gain - 1).abs().max()) > 1e-3  # the saved file holds the calibrated gains


def test_calibrate_and_eval_commands_with_json(workdir):
    assert run("convert", "models.py:net", "--weights", "w.safetensors", "--to", "uan", "-o", "u.safetensors",
               cwd=workdir).exit_code == 0
    res = run("calibrate", "u.safetensors", "--data", "data.safetensors", "--trust-source", "--calib-samples", "16",
              "--eval-samples", "16", "--strengths", "0,1", "--json", cwd=workdir)
    assert res.exit_code == 0, res.output
    out = json.loads(res.output)
    assert out["saved"].endswith("u-calibrated.safetensors")
    rows = {(r["model"], r["strength"]): r for r in out["report"]["rows"]}
    assert rows[("after calibration", 0.0)]["agreement"] == 1.0
    assert out["report"]["reference"].startswith("the original model (")  # reloaded from w.safetensors
    assert out["report"]["original_accuracy"] is not None
    res = run("eval", "u-calibrated.safetensors", "--data", "data.safetensors", "--trust-source", "--eval-samples",
              "8", cwd=workdir)
    assert res.exit_code == 0, res.output
    assert "converted" in res.output and "end to end on 8 held-out samples" in res.output


@pytest.mark.parametrize("args, code, message", [
    (("eval", "missing.safetensors", "--data", "data.safetensors"), 1, "Error: no such file: missing.safetensors"),
    (("eval", "u.safetensors", "--data", "nonsense-spec", "--trust-source"), 2, "Error: unknown data spec 'nonsense-spec'"),
    (("eval", "u.safetensors", "--data", "data.safetensors", "--strengths", "0,x"), 2,
     "Error: Invalid value for '--strengths': expected comma-separated numbers, got '0,x'"),
    (("eval", "u.safetensors", "--data", "data.safetensors", "--strengths", "2", "--trust-source"), 2,
     "Error: Invalid value for '--strengths': each strength must be in [0, 1], got 2"),
    (("calibrate", "u.safetensors", "--data", "data.safetensors", "--calib-strength", "0"), 2,
     "Error: Invalid value for '--calib-strength'"),
    (("calibrate", "u.safetensors", "--data", "data.safetensors", "--em-init", "random"), 2,
     "Error: Invalid value for '--em-init'"),
    (("calibrate", "u.safetensors", "--data", "data.safetensors"), 1,
     "Error: this file was made from custom code"),
])
def test_errors_are_one_line_with_exit_codes(workdir, args, code, message):
    assert run("convert", "models.py:net", "--weights", "w.safetensors", "--to", "uan", "-o", "u.safetensors",
               cwd=workdir).exit_code == 0
    res = run(*args, cwd=workdir)
    assert res.exit_code == code, res.output
    lines = [ln for ln in res.output.splitlines() if ln.strip()]
    assert lines[-1].startswith(message), res.output
    assert "Traceback" not in res.output


def test_calibrate_does_not_overwrite_without_force(workdir):
    assert run("convert", "models.py:net", "--weights", "w.safetensors", "--to", "uan", "-o", "u.safetensors",
               cwd=workdir).exit_code == 0
    (workdir / "u-calibrated.safetensors").write_bytes(b"keep")
    res = run("calibrate", "u.safetensors", "--data", "data.safetensors", "--trust-source", cwd=workdir)
    assert res.exit_code == 1 and "exists" in res.output
    assert (workdir / "u-calibrated.safetensors").read_bytes() == b"keep"
