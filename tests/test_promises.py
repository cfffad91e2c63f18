"""README promises that had no test of their own: a failed conversion never leaves a half-converted model,
``normswap.plan`` plans without converting, ``--weights none`` is said on stderr, the CLI exits 1 for a broken
exact claim and for weights that do not fit, and calibration never sees an evaluation image."""

from __future__ import annotations

import pytest
import torch
from click.testing import CliRunner

import normswap
from normswap import variants
from normswap.cli.main import cli
from normswap.data import open_data
from normswap.errors import UnknownVariantError

from conftest import SmallCNN, randomize_bn

MODELS = '''
import torch
from torch import nn

def small():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(4, 2))
    with torch.no_grad():
        m[1].running_mean.uniform_(-0.5, 0.5)
        m[1].running_var.uniform_(0.5, 1.5)
    return m.eval()
'''


def run(*args: str):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    (tmp_path / "models.py").write_text(MODELS)
    monkeypatch.chdir(tmp_path)
    return tmp_path


# ------------------------------------------------------------------------------------------ apply
def test_every_replacement_is_built_before_the_first_mutation(monkeypatch):
    """An in-place conversion whose third replacement cannot be built leaves the model exactly as it was."""
    torch.manual_seed(0)
    model = randomize_bn(SmallCNN())
    before = {n: m for n, m in model.named_modules()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    uan = variants.get("uan")
    real = uan.from_site.__func__
    calls = []

    def third_fails(cls, site, module, absorbed):
        calls.append(site.name)
        if len(calls) == 3:
            raise RuntimeError(f"cannot build {site.name}")
        return real(cls, site, module, absorbed)

    monkeypatch.setattr(uan, "from_site", classmethod(third_fails))
    with pytest.raises(RuntimeError, match=r"^cannot build head\.2$"):
        normswap.convert(model, to="uan", inplace=True, example_inputs=torch.randn(2, 3, 16, 16))
    assert calls == ["stem.1", "bn", "head.2"]
    assert dict(model.named_modules()) == before  # the same module objects under the same names: nothing replaced
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)


# ------------------------------------------------------------------------------------------ normswap.plan
def test_plan_plans_without_converting(small_cnn):
    state = {k: v.clone() for k, v in small_cnn.state_dict().items()}
    plan = normswap.plan(small_cnn, to="uan", exclude=["bn"], options={"k": 5}, strength=0.5)
    assert isinstance(plan, normswap.Plan) and plan.variant == "uan" and plan.strength == 0.5
    assert [s.name for s in plan.converted] == ["stem.1", "head.2"]
    assert all(s.config["k"] == 5 for s in plan.converted)
    assert not any(isinstance(m, normswap.Variant) for m in small_cnn.modules())  # the model is untouched
    assert all(torch.equal(small_cnn.state_dict()[k], v) for k, v in state.items())
    converted = normswap.convert(small_cnn, to="uan", exclude=["bn"], options={"k": 5}, strength=0.5,
                                 example_inputs=torch.randn(2, 3, 16, 16))
    assert converted.plan.to_dict() == plan.to_dict()  # the plan convert then carries out
    by_name = normswap.plan("resnet18", to="patchnorm")  # a named source: random init, nothing downloaded
    assert len(by_name.converted) == 20 and by_name.converted[0].absorbs == ["bn1"]
    with pytest.raises(UnknownVariantError, match=r"^unknown variant 'uann' \(did you mean 'uan'\?\)"):
        normswap.plan(small_cnn, to="uann")


# ------------------------------------------------------------------------------------------ CLI
def test_weights_none_is_said_on_stderr(workdir):
    res = run("convert", "resnet18", "--weights", "none", "--to", "uan", "--targets", "layer4.1.bn2",
              "-o", "r.safetensors")
    assert res.exit_code == 0, res.output
    assert res.stderr.splitlines() == ["warning: torchvision:resnet18 has random weights (--weights none): its outputs "
                                       "mean nothing until it is trained"]
    assert "random weights" not in res.stdout


def test_cli_exit_1_for_a_broken_exact_claim(workdir, monkeypatch):
    """A replacement that claims the exact start but computes something else: convert refuses it and writes nothing."""
    uan = variants.get("uan")
    real = uan.from_site.__func__

    def off_by_a_little(cls, site, module, absorbed):
        new = real(cls, site, module, absorbed)
        with torch.no_grad():
            new.running_mean.add_(1e-2)
        return new

    monkeypatch.setattr(uan, "from_site", classmethod(off_by_a_little))
    res = run("convert", "models.py:small", "--weights", "none", "--to", "uan", "-o", "out.safetensors")
    assert res.exit_code == 1, res.output
    lines = res.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: the converted model does not reproduce the original at "
                                                   "the exact start (1 site(s), first 1: max |diff| ")
    assert "Traceback" not in res.output and not (workdir / "out.safetensors").exists()


def test_cli_exit_1_for_weights_that_do_not_fit(workdir):
    from safetensors.torch import save_file

    save_file({"0.weight": torch.zeros(4, 3, 3, 3), "9.bias": torch.zeros(2)}, str(workdir / "w.safetensors"))
    res = run("convert", "models.py:small", "--weights", "w.safetensors", "--to", "uan", "-o", "out.safetensors")
    assert res.exit_code == 1, res.output
    assert res.stderr == (f"Error: weights file w.safetensors does not fit {workdir}/models.py:small: 7 missing keys "
                          "(0.bias, 1.weight, 1.bias, ...), 1 unexpected key (9.bias)\n")
    assert not (workdir / "out.safetensors").exists()


# ------------------------------------------------------------------------------------------ held-out images
def test_image_folder_items_come_from_their_parts_images(tmp_path, small_cnn):
    """Each file is one flat colour, so an item's colour names the file it was read from."""
    from PIL import Image

    colours = {f"img{k:02d}.png": (20 * k, 255 - 20 * k, 128) for k in range(12)}
    for name, colour in colours.items():
        Image.new("RGB", (40, 30), colour).save(tmp_path / name)
    data = open_data(str(tmp_path), small_cnn, calib_samples=5, eval_samples=4, train_samples=3, seed=1)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    by_colour = {c: n for n, c in colours.items()}

    def file_of(x: torch.Tensor) -> str:
        return by_colour[tuple(round(float(v)) for v in (x * std + mean).mul(255).mean((1, 2)))]

    files = {part: [file_of(getattr(data, part)[i][0]) for i in range(len(getattr(data, part)))]
             for part in ("calibration", "training", "evaluation")}
    assert {p: len(f) for p, f in files.items()} == {"calibration": 5, "training": 3, "evaluation": 4}
    for part, names in files.items():
        assert names == data.images[part]  # what the report lists is what the items show
    assert not set(files["evaluation"]) & (set(files["calibration"]) | set(files["training"]))
