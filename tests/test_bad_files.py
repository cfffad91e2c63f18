"""Crafted Plans and tensors in a file: one FileFormatError line naming the file (exit 1), never a traceback."""

from __future__ import annotations

import copy

import pytest
import torch
from click.testing import CliRunner

import normswap
from normswap.cli.main import cli
from normswap.errors import FileFormatError
from normswap.io import read_file, write_file


@pytest.fixture(scope="module")
def saved(small_cnn_uan_file):
    return small_cnn_uan_file


def _edit_site(plan: dict, **changes) -> dict:
    plan = copy.deepcopy(plan)
    plan["sites"][0].update(changes)
    return plan


def _config(plan: dict, **changes) -> dict:
    return _edit_site(plan, config={**plan["sites"][0]["config"], **changes})


CASES = [
    (lambda p: _config(p, k="3"), "bad plan in the file's metadata: site 'stem.1': config 'k' has a bad value '3'"),
    (lambda p: _config(p, k=500), "bad plan in the file's metadata: site 'stem.1': option 'k' of variant 'uan' must "
                                  "be between 1 and 64; got 500"),
    (lambda p: _config(p, var_floor=-1.0), "bad plan in the file's metadata: site 'stem.1': option 'var_floor' of "
                                           "variant 'uan' must be a finite number > 0; got -1.0"),
    (lambda p: _config(p, strength=2.0), "bad plan in the file's metadata: site 'stem.1': strength must be in [0, 1]; "
                                         "got 2.0"),
    (lambda p: _edit_site(p, config=[1, 2]), "bad plan in the file's metadata: site 0 ('stem.1'): field 'config' has "
                                             "a bad value [1, 2]"),
    (lambda p: _edit_site(p, facts="x"), "bad plan in the file's metadata: site 0 ('stem.1'): field 'facts' has a bad "
                                         "value 'x'"),
    (lambda p: _edit_site(p, absorbs="stem.0"), "bad plan in the file's metadata: site 0 ('stem.1'): field 'absorbs' "
                                                "has a bad value 'stem.0'"),
    (lambda p: _edit_site(p, action="exec"), "bad plan in the file's metadata: site 0 ('stem.1'): field 'action' has a "
                                             "bad value 'exec'"),
    (lambda p: _edit_site(p, name=7), "bad plan in the file's metadata: site 0 (7): field 'name' has a bad value 7"),
    (lambda p: _edit_site(p, variant="os.system"), "bad plan in the file's metadata: site 'stem.1': unknown variant "
                                                   "'os.system'; known variants: "),
    (lambda p: _edit_site(p, name="no.such.module"), "the plan does not fit this model: it has no module "
                                                     "'no.such.module' (the site)"),
    (lambda p: _edit_site(p, evil=1), "the normswap plan is malformed: Site.__init__() got an unexpected keyword "
                                      "argument 'evil'"),
    (lambda p: {**p, "strength": "high"}, "bad plan in the file's metadata: field 'strength' has a bad value 'high'"),
    (lambda p: {**p, "strength": float("nan")}, "bad plan in the file's metadata: field 'strength' has a bad value nan"),
    (lambda p: {**p, "sites": {"a": 1}}, "bad plan in the file's metadata: field 'sites' has a bad value {'a': 1}"),
    (lambda p: {**p, "sites": ["x"]}, "bad plan in the file's metadata: site 0 is a str, not an object"),
    (lambda p: {**p, "variant": "nope"}, "bad plan in the file's metadata: plan: unknown variant 'nope'"),
    (lambda p: [p], "the metadata holds no normswap plan (missing or wrong 'format')"),
]


@pytest.mark.parametrize("edit, message", CASES)
def test_bad_plans_are_one_line_naming_the_file(saved, tmp_path, edit, message):
    path, model = saved
    tensors, meta = read_file(path)
    bad = write_file(tmp_path / "bad.safetensors", tensors, {**meta, "plan": edit(meta["plan"])})
    with pytest.raises(FileFormatError) as err:
        normswap.load(bad, model=model)
    assert str(err.value).startswith(f"{bad}: {message}")
    assert "\n" not in str(err.value)


def test_wrong_shape_tensor(saved, tmp_path):
    path, model = saved
    tensors, meta = read_file(path)
    tensors["stem.1.mix_mean"] = torch.zeros(5, 5)
    tensors["head.4.weight"] = torch.zeros(1)
    bad = write_file(tmp_path / "shape.safetensors", tensors, meta)
    with pytest.raises(FileFormatError) as err:
        normswap.load(bad, model=model)
    assert str(err.value) == (f"{bad} does not fit the rebuilt model: tensor 'head.4.weight' is 1 in the file, 5x16 in "
                              "the model (and 1 more)")


@pytest.mark.parametrize("command", ["eval", "calibrate", "export"])
def test_commands_name_the_file_and_exit_1(r18_file, tmp_path, command):
    tensors, meta = read_file(r18_file)
    tensors["layer4.1.bn2.mix_mean"] = torch.zeros(2, 2)
    bad = write_file(tmp_path / "shape.safetensors", tensors, meta)
    res = CliRunner().invoke(cli, [command, str(bad), "--data", "photos"][: 2 if command == "export" else 4],
                             catch_exceptions=False)
    assert res.exit_code == 1
    assert res.stderr.startswith(f"Error: {bad} does not fit the rebuilt model: tensor 'layer4.1.bn2.mix_mean' is 2x2 "
                                 "in the file, ")
    plan = copy.deepcopy(meta["plan"])
    next(s for s in plan["sites"] if s["action"] == "convert")["config"]["k"] = 0
    bad = write_file(tmp_path / "k0.safetensors", read_file(r18_file)[0], {**meta, "plan": plan}, force=True)
    res = CliRunner().invoke(cli, [command, str(bad)], catch_exceptions=False)
    assert res.exit_code == 1 and res.stderr.startswith(f"Error: {bad}: bad plan in the file's metadata: ")
