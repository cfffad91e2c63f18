"""Atomic writes through the command line (README: "a failed run never leaves a partial file").

The safetensors writer is replaced by one that writes the first half of the real file's bytes and then fails
like a disk would. Every command that writes (convert, calibrate, export) must then exit 1 with one line, keep an
old file under --force byte for byte, leave no new file under -o, and leave no temporary file behind."""

from __future__ import annotations

import os

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save as safetensors_bytes
from safetensors.torch import save_file

import normswap
from normswap.cli.main import cli

MODELS = '''
import torch
from torch import nn

def net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(4, 2)).eval()
'''


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "models.py").write_text(MODELS)
    g = torch.Generator().manual_seed(0)
    save_file({"inputs": torch.randn(24, 3, 8, 8, generator=g)}, str(tmp_path / "d.safetensors"))
    monkeypatch.chdir(tmp_path)
    for name, variant in (("uan.safetensors", "uan"), ("anact.safetensors", "anact")):
        res = run("convert", "models.py:net", "--weights", "none", "--to", variant, "-o", name)
        assert res.exit_code == 0, res.output
    return tmp_path


def half_then_fail(written: list):
    """A writer that puts the first half of the real file on disk, then fails with EIO."""

    def writer(tensors, tmp, metadata=None):
        data = safetensors_bytes(tensors, metadata=metadata)
        with open(tmp, "wb") as f:
            f.write(data[: len(data) // 2])
        written.append((tmp, len(data) // 2))
        raise OSError(5, "Input/output error")

    return writer


COMMANDS = {
    "convert": ["convert", "models.py:net", "--weights", "none", "--to", "uan"],
    "calibrate": ["calibrate", "uan.safetensors", "--data", "d.safetensors", "--trust-source", "--calib-samples", "8",
                  "--eval-samples", "8"],
    "export": ["export", "anact.safetensors", "--trust-source"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
@pytest.mark.parametrize("force", [False, True], ids=["new file", "force"])
def test_a_write_failing_halfway_keeps_the_old_file_and_leaves_no_temp(workdir, monkeypatch, command, force):
    out = workdir / "out.safetensors"
    if force:
        res = run(*COMMANDS[command], "-o", str(out))
        assert res.exit_code == 0, res.output
        before = out.read_bytes()
        assert normswap.load(out, trust_source=True) is not None  # a whole, loadable file to lose
    listing = sorted(p.name for p in workdir.iterdir())
    written: list = []
    monkeypatch.setattr("normswap.io._write_safetensors", half_then_fail(written))
    res = run(*COMMANDS[command], "-o", str(out), *(["--force"] if force else []))
    assert res.exit_code == 1, res.output
    assert res.output == f"Error: cannot write {out}: Input/output error\n"
    (tmp, size), = written
    assert size > 100 and os.path.dirname(tmp) == str(workdir)  # it really wrote, next to the target
    assert sorted(p.name for p in workdir.iterdir()) == listing  # no temporary file, no new file
    if force:
        assert out.read_bytes() == before
    else:
        assert not out.exists()
