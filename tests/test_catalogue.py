"""A catalogue of bad inputs, command line and Python alike: each gives its exact one-line message and exit code
(1 a failed operation, 2 bad usage), and none prints a traceback.

Cheap models only: small nn.Modules from a factory file, resnet18 with ``--weights none`` for names. Every CLI
case runs in process (click's runner, in a scratch folder); a few run as real processes to check stderr.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

import normswap
from normswap.cli.main import cli
from normswap.data import DataSplit, LazyDataset
from normswap.errors import NormswapError

MODELS = """
import torch
from torch import nn

def flat():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)).eval()

def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 10)).eval()

NOT_A_FACTORY = 3
"""


def _tensors(path: Path, inputs: torch.Tensor, labels: torch.Tensor | None = None) -> None:
    save_file({"inputs": inputs, **({"labels": labels} if labels is not None else {})}, str(path))


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """A scratch folder: models.py, converted files, data files good and bad, an existing output."""
    d = tmp_path_factory.mktemp("catalogue")
    (d / "models.py").write_text(MODELS)
    g = torch.Generator().manual_seed(0)
    old = os.getcwd()
    os.chdir(d)
    try:
        for spec, variant, out in (("models.py:flat", "uan", "flat-uan.safetensors"),
                                   ("models.py:cnn", "uan", "cnn-uan.safetensors")):
            res = CliRunner().invoke(cli, ["convert", spec, "--to", variant, "-o", out])
            assert res.exit_code == 0, res.output
        res = CliRunner().invoke(cli, ["convert", "resnet18", "--weights", "none", "--to", "uan", "--targets",
                                       "layer4.1.bn2", "-o", "r18-uan.safetensors"])
        assert res.exit_code == 0, res.output
    finally:
        os.chdir(old)
    _tensors(d / "good.safetensors", torch.randn(12, 8, generator=g))
    nan = torch.randn(12, 8, generator=g)
    nan[4, 1] = float("nan")
    _tensors(d / "nan.safetensors", nan)
    inf = torch.randn(12, 8, generator=g)
    inf[0, 0], inf[9, 3] = float("inf"), -float("inf")
    _tensors(d / "inf.safetensors", inf)
    _tensors(d / "shape.safetensors", torch.randn(12, 5, generator=g))
    _tensors(d / "labels.safetensors", torch.randn(12, 8, generator=g), torch.arange(12))
    _tensors(d / "images.safetensors", torch.randn(12, 3, 8, 8, generator=g))
    (d / "data.pt").write_bytes(b"\x80\x04K\x01.")
    (d / "notes.txt").write_text("not a model\n")
    (d / "exists.safetensors").write_bytes(b"keep me")
    (d / "folder").mkdir()
    raw = (d / "flat-uan.safetensors").read_bytes()
    (d / "truncated.safetensors").write_bytes(raw[:len(raw) // 2])
    flipped = bytearray(raw)
    flipped[-1] ^= 0xFF
    (d / "flipped.safetensors").write_bytes(bytes(flipped))
    (d / "bad.yaml").write_text("model: [unclosed\n")
    (d / "typo.yaml").write_text("model:\n  source: models.py:flat\nconvert:\n  to: uan\nfintune:\n  steps: 10\n"
                                 "output:\n  path: o.safetensors\n")
    return d


F = "models.py:flat"
C = "models.py:cnn"
T = "--trust-source"
LONG = "n" * 300 + ".safetensors"

# (id, arguments, exit code, the exact error line without "Error: "); outputs never go to existing files
CLI_CASES = [
    # convert: names, options, targets
    ("unknown variant", ["convert", F, "--to", "nope"], 2,
     "unknown variant 'nope'; known variants: anact, patchnorm, recenter, rescale, uan"),
    ("unknown model name", ["convert", "resnet1888", "--to", "uan", "--weights", "none"], 2,
     "unknown model 'resnet1888' (did you mean 'resnet18', 'resnet152', 'resnet101'?); see torchvision.models.list_models()"),
    ("factory file missing", ["convert", "missing.py:build", "--to", "uan"], 2,
     "source file missing.py not found (spec 'missing.py:build')"),
    ("factory name missing", ["convert", "models.py:nope", "--to", "uan"], 2,
     "'{work}/models.py' has no attribute 'nope' (source '{work}/models.py:nope')"),
    ("factory not callable", ["convert", "models.py:NOT_A_FACTORY", "--to", "uan"], 2,
     "'{work}/models.py:NOT_A_FACTORY' is not callable (it is an int); name a function or class that returns an nn.Module"),
    ("option without =", ["convert", F, "--to", "uan", "--option", "k"], 2,
     "Invalid value for '--option': expected KEY=VALUE, got 'k'"),
    ("unknown option", ["convert", F, "--to", "uan", "--option", "q=1"], 2,
     "unknown option 'q' for variant 'uan'; valid options: k, var_floor"),
    ("option not a number", ["convert", F, "--to", "uan", "--option", "k=abc"], 2,
     "option 'k' of variant 'uan' expects int, got 'abc'"),
    ("k out of range", ["convert", F, "--to", "uan", "--option", "k=0"], 2,
     "option 'k' of variant 'uan' must be between 1 and 64; got 0"),
    ("var_floor inf", ["convert", F, "--to", "uan", "--option", "var_floor=inf"], 2,
     "option 'var_floor' of variant 'uan' must be a finite number > 0; got inf"),
    ("var_floor nan", ["convert", F, "--to", "uan", "--option", "var_floor=nan"], 2,
     "option 'var_floor' of variant 'uan' must be a finite number > 0; got nan"),
    ("var_floor negative", ["convert", F, "--to", "uan", "--option", "var_floor=-1"], 2,
     "option 'var_floor' of variant 'uan' must be a finite number > 0; got -1.0"),
    ("patchnorm eps 0", ["convert", F, "--to", "patchnorm", "--option", "eps=0"], 2,
     "option 'eps' of variant 'patchnorm' must be a finite number > 0; got 0.0"),
    ("anact momentum 1", ["convert", F, "--to", "anact", "--option", "momentum=1"], 2,
     "option 'momentum' of variant 'anact' must be in [0, 1); got 1.0"),
    ("strength above 1", ["convert", F, "--to", "uan", "--strength", "2"], 2,
     "Invalid value for '--strength': 2.0 is not in the range 0.0<=x<=1.0."),
    ("strength not a number", ["convert", F, "--to", "uan", "--strength", "high"], 2,
     "Invalid value for '--strength': 'high' is not a valid float range."),
    ("target matches nothing", ["convert", F, "--to", "uan", "--targets", "bn"], 2,
     "target 'bn' matches no uan site; nearby names: 1"),
    ("target names a non-site", ["convert", F, "--to", "uan", "--targets", "2"], 2,
     "target '2' matches no uan site; nearby names: 1"),
    ("exclude matches nothing", ["convert", F, "--to", "uan", "--exclude", "zzz"], 2,
     "exclude pattern 'zzz' matches no site; nearby names: 1"),
    ("bad target regex", ["convert", F, "--to", "uan", "--targets", "re:(("], 2,
     "invalid regular expression in pattern 're:((': missing ), unterminated subpattern at position 1"),
    ("nothing to convert", ["convert", F, "--to", "anact", "--exclude", "2", "-o", "x1.safetensors"], 1,
     "nothing to convert: Sequential has no site for variant 'anact' (1 skipped: excluded by '2')"),
    ("nothing to convert, dry run", ["convert", F, "--to", "anact", "--exclude", "2", "--dry-run"], 1,
     "nothing to convert: Sequential has no site for variant 'anact' (1 skipped: excluded by '2')"),
    ("missing option value", ["convert", F, "--to"], 2,
     "Option '--to' requires an argument."),
    ("no such command", ["conver", F], 2,
     "No such command 'conver'. Did you mean 'convert'?"),
    # convert: weights and outputs
    ("weights file missing", ["convert", F, "--to", "uan", "--weights", "nope.pt", "-o", "x2.safetensors"], 1,
     'weights file nope.pt not found (pass an existing .safetensors/.pt file, a weights name, or --weights none)'),
    ("weights name unknown", ["convert", "resnet18", "--to", "uan", "--weights", "NOPE"], 2,
     "unknown weights 'NOPE' for torchvision:resnet18; valid: DEFAULT, IMAGENET1K_V1, none (random init), or a weights file (.safetensors/.pt)"),
    ("weights file of text", ["convert", F, "--to", "uan", "--weights", "notes.txt", "-o", "x3.safetensors"], 1,
     'weights file notes.txt is neither a safetensors file nor a torch .pt/.pth file (it does not parse as one)'),
    ("empty output", ["convert", F, "--to", "uan", "-o", ""], 2,
     'the output path is empty: name a file (-o FILE, or output= in Python)'),
    ("output name too long", ["convert", F, "--to", "uan", "-o", LONG], 1,
     'cannot write nnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnnn...: the file name is too long (312 bytes; at most 221 here)'),
    ("output exists", ["convert", F, "--to", "uan", "-o", "exists.safetensors"], 1,
     'exists.safetensors exists; pass --force (force=True) to overwrite it'),
    ("output exists, dry run", ["convert", F, "--to", "uan", "-o", "exists.safetensors", "--dry-run"], 1,
     'exists.safetensors exists; pass --force (force=True) to overwrite it'),
    ("output is a folder", ["convert", F, "--to", "uan", "-o", "folder"], 2,
     "Invalid value for '-o' / '--output': File 'folder' is a directory."),
    ("output folder missing", ["convert", F, "--to", "uan", "-o", "no/such/dir/x.safetensors"], 1,
     'cannot write no/such/dir/x.safetensors: directory no/such/dir does not exist'),
    # convert --calibrate: data
    ("calibrate NaN data", ["convert", F, "--to", "uan", "--calibrate", "nan.safetensors", "-o", "x4.safetensors"],
     1,
     "data 'nan.safetensors': 1 NaN or infinite input value(s) in calibration batch 1 (calibration and evaluation need finite inputs)"),
    ("calibrate data of the wrong shape, dry run",
     ["convert", F, "--to", "uan", "--calibrate", "shape.safetensors", "--dry-run"], 1,
     "data 'shape.safetensors' does not fit the model: it fails on calibration inputs shaped (5,) per sample (mat1 and mat2 shapes cannot be multiplied (1x5 and 8x16))"),
    ("calibrate data missing", ["convert", F, "--to", "uan", "--calibrate", "no/data", "-o", "x5.safetensors"], 2,
     'data path no/data not found (no such file or directory)'),
    ("calibrate unknown data spec", ["convert", F, "--to", "uan", "--calibrate", "mnist", "-o", "x6.safetensors"],
     2,
     "unknown data spec 'mnist': expected stamps, stamps:CATEGORY,..., photos, fashion-mnist, fashion-mnist:test (aliases fashionmnist, fmnist), synthetic, synthetic:CxHxW, a directory of images, or a .safetensors file"),
    ("calibrate pickle data", ["convert", F, "--to", "uan", "--calibrate", "data.pt", "-o", "x7.safetensors"], 1,
     "data file data.pt is a pickle: normswap never unpickles data; convert it to .safetensors with tensors 'inputs' (N, ...) and optional 'labels' (N,) (safetensors.torch.save_file({'inputs': x, 'labels': y}, 'data.safetensors'))"),
    ("calibrate std 0", ["convert", C, "--to", "uan", "--calibrate", "photos", "--std", "0", "--dry-run"], 2,
     'std (--std) must be finite numbers > 0; got 0'),
    # calibrate
    ("calibrate missing file", ["calibrate", "nope.safetensors"], 1,
     'no such file: nope.safetensors'),
    ("calibrate a text file", ["calibrate", "notes.txt", "-o", "x8.safetensors"], 1,
     'notes.txt is not a readable safetensors file (truncated or corrupted?): Error while deserializing header: header too large'),
    ("custom code without trust", ["calibrate", "flat-uan.safetensors", "--data", "good.safetensors", "-o",
                                   "x9.safetensors"], 1,
     "this file was made from custom code '{work}/models.py:flat'; normswap does not run code named inside a file: pass the model (normswap.load(path, model=...)) or allow it explicitly (--trust-source)"),
    ("calibrate on NaN", ["calibrate", "flat-uan.safetensors", T, "--data", "nan.safetensors", "-o", "y1.safetensors"],
     1,
     "data 'nan.safetensors': 1 NaN or infinite input value(s) in calibration batch 1 (calibration and evaluation need finite inputs)"),
    ("calibrate on inf", ["calibrate", "flat-uan.safetensors", T, "--data", "inf.safetensors", "-o", "y2.safetensors"],
     1,
     "data 'inf.safetensors': 2 NaN or infinite input value(s) in calibration batch 1 (calibration and evaluation need finite inputs)"),
    ("calibrate on the wrong shape", ["calibrate", "flat-uan.safetensors", T, "--data", "shape.safetensors", "-o",
                                      "y3.safetensors"], 1,
     "data 'shape.safetensors' does not fit the model: it fails on calibration inputs shaped (5,) per sample (mat1 and mat2 shapes cannot be multiplied (1x5 and 8x16))"),
    ("calibrate empty output", ["calibrate", "flat-uan.safetensors", T, "--data", "good.safetensors", "-o", ""],
     2,
     'the output path is empty: name a file (-o FILE, or output= in Python)'),
    ("calibrate strength 0", ["calibrate", "flat-uan.safetensors", "--calib-strength", "0"], 2,
     "Invalid value for '--calib-strength': 0.0 is not in the range 0.0<x<=1.0."),
    ("calibrate em-samples 1", ["calibrate", "flat-uan.safetensors", "--em-samples", "1"], 2,
     "Invalid value for '--em-samples': 1 is not in the range x>=2."),
    ("calibrate em-init unknown", ["calibrate", "flat-uan.safetensors", "--em-init", "random"], 2,
     "Invalid value for '--em-init': 'random' is not one of 'quantile', 'kmeans++'."),
    ("calibrate truncated file", ["calibrate", "truncated.safetensors", "-o", "y4.safetensors"], 1,
     'truncated.safetensors is not a readable safetensors file (truncated or corrupted?): Error while deserializing header: invalid header length'),
    ("calibrate output exists", ["calibrate", "flat-uan.safetensors", "-o", "exists.safetensors"], 1,
     'exists.safetensors exists; pass --force (force=True) to overwrite it'),
    # eval
    ("eval labels outside the classes", ["eval", "flat-uan.safetensors", T, "--data", "labels.safetensors"], 1,
     "data 'labels.safetensors': label(s) 3, 4, 5, 6, 7 lie outside the model's 3 classes (0..2); the labels must index the model's outputs"),
    ("eval on the wrong shape", ["eval", "flat-uan.safetensors", T, "--data", "shape.safetensors"], 1,
     "data 'shape.safetensors' does not fit the model: it fails on evaluation inputs shaped (5,) per sample (mat1 and mat2 shapes cannot be multiplied (1x5 and 8x16))"),
    ("eval on NaN", ["eval", "flat-uan.safetensors", T, "--data", "nan.safetensors"], 1,
     "data 'nan.safetensors': 1 NaN or infinite input value(s) in evaluation batch 1 (calibration and evaluation need finite inputs)"),
    ("eval on images the model cannot take", ["eval", "flat-uan.safetensors", T, "--data", "images.safetensors"],
     1,
     "data 'images.safetensors' does not fit the model: it fails on evaluation inputs shaped (3, 8, 8) per sample (running_mean should contain 3 elements not 16)"),
    ("eval std 0", ["eval", "cnn-uan.safetensors", T, "--data", "photos", "--std", "0"], 2,
     'std (--std) must be finite numbers > 0; got 0'),
    ("eval std negative", ["eval", "cnn-uan.safetensors", T, "--data", "photos", "--std", "-1,1,1"], 2,
     'std (--std) must be finite numbers > 0; got -1, 1, 1'),
    ("eval mean nan", ["eval", "cnn-uan.safetensors", T, "--data", "photos", "--mean", "nan"], 2,
     'mean (--mean) must be finite numbers; got nan'),
    ("eval mean inf", ["eval", "cnn-uan.safetensors", T, "--data", "photos", "--mean", "inf"], 2,
     'mean (--mean) must be finite numbers; got inf'),
    ("eval std two values", ["eval", "cnn-uan.safetensors", T, "--std", "1,2"], 2,
     "Invalid value for '--std': expected 1 or 3 comma-separated numbers, got '1,2'"),
    ("eval std text", ["eval", "cnn-uan.safetensors", T, "--std", "wide"], 2,
     "Invalid value for '--std': expected comma-separated numbers, got 'wide'"),
    ("eval strengths out of range", ["eval", "cnn-uan.safetensors", T, "--data", "photos", "--strengths", "0,2"],
     2,
     "Invalid value for '--strengths': each strength must be in [0, 1], got 2"),
    ("eval zero samples", ["eval", "cnn-uan.safetensors", T, "--eval-samples", "0"], 2,
     "Invalid value for '--eval-samples': 0 is not in the range x>=1."),
    ("eval malformed synthetic", ["eval", "cnn-uan.safetensors", T, "--data", "synthetic:0x3"], 2,
     "malformed synthetic shape '0x3': expected positive sizes joined by x, e.g. synthetic:3x224x224"),
    ("eval photos on a model of vectors", ["eval", "flat-uan.safetensors", T, "--data", "photos"], 1,
     "data 'photos' does not fit the model: it fails on evaluation inputs shaped (3, 224, 224) per sample (mat1 and mat2 shapes cannot be multiplied (672x224 and 8x16))"),
    ("eval flipped byte", ["eval", "flipped.safetensors"], 1,
     'flipped.safetensors: checksum mismatch: its tensors or metadata changed after normswap wrote it (damaged on disk or in transfer?); write or fetch it again'),
    ("eval a folder", ["eval", "folder"], 2,
     "Invalid value for 'CKPT.safetensors': File 'folder' is a directory."),
    # export, inspect, recipes, finetune
    ("export nothing to fold", ["export", "r18-uan.safetensors", "-o", "y5.safetensors"], 1,
     "nothing to export: no site of this model folds for inference (variant 'uan' has no inference folding)"),
    ("export empty output", ["export", "r18-uan.safetensors", "-o", ""], 2,
     'the output path is empty: name a file (-o FILE, or output= in Python)'),
    ("export missing file", ["export", "nope.safetensors"], 1,
     'no such file: nope.safetensors'),
    ("inspect unknown model", ["inspect", "resnet1888"], 2,
     "unknown model 'resnet1888' (did you mean 'resnet18', 'resnet152', 'resnet101'?); see torchvision.models.list_models()"),
    ("recipe missing", ["recipe", "validate", "nope.yaml"], 2,
     'nope.yaml: no such file'),
    ("recipe bad YAML", ["recipe", "validate", "bad.yaml"], 2,
     "bad.yaml: invalid YAML at line 2: expected ',' or ']', but got '<stream end>'"),
    ("recipe unknown key", ["recipe", "validate", "typo.yaml"], 2,
     "typo.yaml: fintune: unknown key (did you mean 'finetune'?) (line 5)"),
    ("finetune bad override", ["finetune", "typo.yaml", "--set", "nonsense"], 2,
     'typo.yaml: --set nonsense: expected KEY.PATH=VALUE, e.g. finetune.optimizer.lr=3e-4'),
]


def _run(work: Path, args: list[str]):
    old = os.getcwd()
    os.chdir(work)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return CliRunner().invoke(cli, args)
    finally:
        os.chdir(old)


@pytest.mark.parametrize("name, args, code, message", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_case(work, name, args, code, message):
    before = {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()}
    res = _run(work, args)
    assert isinstance(res.exception, SystemExit) or res.exception is None, repr(res.exception)  # never a raw error
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, res.output
    assert (res.exit_code, errors[0][len("Error: "):]) == (code, message.replace("{work}", str(work)))
    after = {p.name: p.read_bytes() for p in work.iterdir() if p.is_file()}
    assert {k: v for k, v in after.items() if k in before} == before  # nothing existing was touched
    assert not [n for n in after if n.endswith(".tmp")]


def _flat() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3)).eval()


def _split(x: torch.Tensor, labels: torch.Tensor | None = None, classes: int | None = None) -> DataSplit:
    ds = LazyDataset(len(x), lambda i: (x[i], int(labels[i]) if labels is not None else -1))
    return DataSplit("mine: by hand", False, labels is not None, ds, ds, 0, "both parts alike", classes=classes)


def _nan_original() -> nn.Module:
    model = _flat()
    with torch.no_grad():
        model[1].running_var[3] = float("nan")
    return model


def _converted():
    return normswap.convert(_flat(), to="uan")


G = torch.Generator().manual_seed(1)
GOOD = torch.randn(10, 8, generator=G)
NAN = GOOD.clone().index_put_((torch.tensor([2]), torch.tensor([5])), torch.tensor(float("nan")))

# (id, call, exit code, exact message)
API_CASES = [
    ("string targets is one pattern", lambda w: normswap.plan(_flat(), "uan", targets="bn"), 2,
     "target 'bn' matches no uan site; nearby names: 1"),
    ("targets not strings", lambda w: normswap.plan(_flat(), "uan", targets=[1]), 2,
     "targets must be pattern strings; got int 1"),
    ("unknown variant", lambda w: normswap.convert(_flat(), to="nope"), 2,
     "unknown variant 'nope'; known variants: anact, patchnorm, recenter, rescale, uan"),
    ("var_floor inf", lambda w: normswap.convert(_flat(), to="uan", options={"var_floor": float("inf")}), 2,
     "option 'var_floor' of variant 'uan' must be a finite number > 0; got inf"),
    ("strength 2", lambda w: normswap.plan(_flat(), "uan", strength=2.0), 2, "strength must be in [0, 1]; got 2.0"),
    ("not a model", lambda w: normswap.convert(42, to="uan"), 1, "expected an nn.Module or a model name, got int"),
    ("NaN in the original's weights", lambda w: normswap.convert(_nan_original(), to="uan"), 1,
     "the original model's weights hold NaN or infinite values (1.running_var: 1 value); its outputs are not "
     "finite, so no conversion of it can be verified: fix or reload its weights"),
    ("save to ''", lambda w: _converted().save(""), 2,
     "the output path is empty: name a file (-o FILE, or output= in Python)"),
    ("load a missing file", lambda w: normswap.load(w / "nope.safetensors"), 1, "no such file: {work}/nope.safetensors"),
    ("calibrate on NaN", lambda w: normswap.calibrate(_converted(), _split(NAN)), 1,
     "data 'mine': 1 NaN or infinite input value(s) in calibration batch 1 (calibration and evaluation need finite "
     "inputs)"),
    ("calibrate on the wrong shape", lambda w: normswap.calibrate(_converted(), _split(GOOD[:, :5])), 1,
     "data 'mine' does not fit the model: it fails on calibration inputs shaped (5,) per sample (mat1 and mat2 "
     "shapes cannot be multiplied (1x5 and 8x16))"),
    ("calibrate with std 0", lambda w: normswap.calibrate(_converted(), str(w / "good.safetensors"),
                                                          data_options={"std": [0.0]}), 2,
     "std (--std) must be finite numbers > 0; got 0"),
    ("calibrate em_init", lambda w: normswap.calibrate(_converted(), _split(GOOD), em_init="random"), 2,
     "em_init must be one of quantile, kmeans++; got 'random'"),
    ("evaluate labels outside", lambda w: normswap.evaluate(_converted(), _split(GOOD, torch.arange(10) - 1)), 1,
     "data 'mine': label(s) -1, 3, 4, 5, 6 lie outside the model's 3 classes (0..2); the labels must index the "
     "model's outputs"),
    ("evaluate zero samples", lambda w: normswap.evaluate(_converted(), _split(GOOD), eval_samples=0), 2,
     "eval_samples must be >= 1"),
    ("evaluate NaN", lambda w: normswap.evaluate(_converted(), _split(NAN)), 1,
     "data 'mine': 1 NaN or infinite input value(s) in evaluation batch 1 (calibration and evaluation need finite "
     "inputs)"),
    ("export nothing to fold", lambda w: normswap.export(_converted()), 1,
     "nothing to export: no site of this model folds for inference (variant 'uan' has no inference folding)"),
]


@pytest.mark.parametrize("name, call, code, message", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_case(work, name, call, code, message):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(NormswapError) as err:
            call(work)
    assert (err.value.exit_code, str(err.value)) == (code, message.replace("{work}", str(work)))


def test_labels_of_other_classes_warn_and_leave_accuracy_out():
    """Fashion-MNIST's 10 classes on a 3-class head: a warning and a note, agreement still measured, no accuracy."""
    split = _split(GOOD, torch.arange(10) % 3, classes=10)
    with pytest.warns(UserWarning, match="^accuracy not computed: the labels of 'mine' are 10 classes, the model "
                                         r"has 3 outputs \(agreement with the original is still measured\)$"):
        rep = normswap.evaluate(_converted(), split, strengths=[0.0])
    assert rep.original_accuracy is None and rep.row("converted", 0.0).accuracy is None
    assert rep.row("converted", 0.0).agreement == 1.0 and any(n.startswith("accuracy not computed") for n in rep.notes)
    rep = normswap.evaluate(_converted(), _split(GOOD, torch.arange(10) % 3, classes=3), strengths=[0.0])
    assert rep.original_accuracy is not None and "accuracy not computed" not in " ".join(rep.notes)


@pytest.mark.parametrize("name", ["calibrate on NaN"])  # one: a process start costs ~10 s here
def test_real_processes_print_one_line(work, name):
    """Outside click's test runner too: stderr is one ``Error:`` line, no traceback."""
    _, args, code, message = next(c for c in CLI_CASES if c[0] == name)
    env = {**os.environ, "PYTHONPATH": str(Path(normswap.__file__).parent.parent)}
    res = subprocess.run([sys.executable, "-m", "normswap", *args], cwd=work, capture_output=True, text=True,
                         env=env, timeout=120)
    assert "Traceback" not in res.stderr
    lines = [line for line in res.stderr.splitlines() if not line.startswith("warning: ")]
    assert (res.returncode, lines) == (code, [f"Error: {message}".replace("{work}", str(work))])
