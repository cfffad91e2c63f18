"""Fine-tuning (normswap.finetune / `normswap finetune`): schedules, checkpoints, the whole run on a tiny model,
exact resume after SIGKILL, torchrun matching one process, and the one-line errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file
from torch import nn

import normswap
from normswap.cli.main import cli
from normswap.recipe.schema import LrScheduleSection, StrengthSection
from normswap.train.checkpoint import load_state, save_state
from normswap.train.schedule import lr_at, stage_starts, strength_at

MODEL_PY = textwrap.dedent("""
    import torch
    from torch import nn

    def net():
        torch.manual_seed(0)
        m = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
                          nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for mod in m.modules():
                if isinstance(mod, nn.BatchNorm2d):
                    mod.running_mean.copy_(torch.randn(mod.num_features, generator=g) * 0.2)
                    mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
        return m.eval()
""")

RECIPE = textwrap.dedent("""
    version: 1
    seed: 3
    model: {{source: tiny.py:net, weights: none}}
    convert: {{to: {variant}}}
    data: {{spec: data.safetensors}}
    calibrate: {{samples: 16, batch_size: 8}}
    finetune:
      steps: 12
      batch_size: 8
      train_samples: 64
      optimizer: {{name: adamw, lr: 0.01}}
      lr_schedule: {{shape: cosine, warmup_steps: 2}}
    strength: {{shape: linear, span: 8}}
    distill: {{temperature: 2.0, kl_weight: 1.0, label_weight: 0.5}}
    eval: {{samples: 16, batch_size: 8, every: 6}}
    output: {{path: out/m.safetensors, checkpoint_every: 4}}
    control: {control}
""")


@pytest.fixture()
def workdir(tmp_path, monkeypatch):
    (tmp_path / "tiny.py").write_text(MODEL_PY)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(96, 1, 8, 8, generator=g)
    save_file({"inputs": x, "labels": (x.mean((1, 2, 3)) > 0).long() + 2 * (x[:, 0, 0, 0] > 0).long()},
              str(tmp_path / "data.safetensors"))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _write(tmp, variant="uan", control="false", name="r.yaml"):
    (tmp / name).write_text(RECIPE.format(variant=variant, control=control))
    return str(tmp / name)


def _run_cli(args, env_extra=None, cwd=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "normswap", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


# ---- schedules -------------------------------------------------------------------------------------
def test_strength_shapes_and_lr_schedule():
    lin = StrengthSection(shape="linear", start=10, span=100)
    assert [strength_at(lin, s, 200) for s in (0, 9, 10, 35, 109, 110, 199)] == [0, 0, 0, 0.25, 0.99, 1, 1]
    cos = StrengthSection(shape="cosine", span=10)
    assert strength_at(cos, 5, 20) == pytest.approx(0.5) and strength_at(cos, 1, 20) == pytest.approx(0.0245, abs=1e-4)
    log = StrengthSection(shape="log", span=4, log_min=0.001)
    assert [round(strength_at(log, s, 10), 6) for s in range(5)] == [0.001, 0.005623, 0.031623, 0.177828, 1.0]
    step = StrengthSection(shape="step", span=10, levels=[0.001, 0.01, 0.1, 1.0])
    assert [strength_at(step, s, 20) for s in (0, 2, 3, 4, 5, 7, 8, 9, 10)] == [0.001] * 2 + [0.01] * 2 + [0.1] * 2 + [1.0] * 3
    assert stage_starts(step, 20) == [0, 3, 5, 8]
    stairs = StrengthSection(shape="step", span=4, stages=2, **{"from": 0.2})
    assert [strength_at(stairs, s, 10) for s in range(5)] == pytest.approx([0.6, 0.6, 1.0, 1.0, 1.0], abs=1e-12)
    default_span = StrengthSection(shape="linear")  # 3/4 of the run
    assert strength_at(default_span, 75, 100) == 1.0 and strength_at(default_span, 37, 100) < 0.5
    lr = LrScheduleSection(shape="linear", warmup_steps=4, min_lr=0.1)
    assert [round(lr_at(lr, 1.0, s, 14), 6) for s in (0, 3, 4, 9, 14)] == [0.25, 1.0, 1.0, 0.55, 0.1]
    assert lr_at(LrScheduleSection(shape="constant"), 0.3, 50, 100) == 0.3


def test_checkpoint_round_trip_restores_optimizer_and_random_state(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, betas=(0.8, 0.99))
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).square().sum().backward()
        opt.step()
    save_state(tmp_path / "s.safetensors", model=model, optimizer=opt, position={"step": 3, "best": None})
    want = (torch.rand(3), np.random.rand(2), random.random())
    other = nn.Linear(4, 3)
    opt2 = torch.optim.AdamW(other.parameters(), lr=0.5)
    pos = load_state(tmp_path / "s.safetensors", model=other, optimizer=opt2)
    assert pos == {"step": 3, "best": None}
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s2["param_groups"][0]["betas"] == (0.8, 0.99) and s2["param_groups"][0]["lr"] == 0.1
    for k in s1["state"]:
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1["state"][k][key], s2["state"][k][key])
    got = (torch.rand(3), np.random.rand(2), random.random())  # the generators continue from the checkpoint
    assert torch.equal(got[0], want[0]) and np.array_equal(got[1], want[1]) and got[2] == want[2]


# ---- the whole run -------------------------------------------------------------------------------------
def test_finetune_runs_end_to_end_and_the_output_loads(workdir):
    result = normswap.finetune(_write(workdir, control="true"))
    out = workdir / "out" / "m.safetensors"
    assert result.output.resolve() == out and out.is_file()
    run = workdir / "out" / "m.run"
    for name in ("recipe.yaml", "converted-state.safetensors", "control-state.safetensors", "summary.json",
                 "training.png", "before.json"):
        assert (run / name).is_file(), name
    rows = [json.loads(ln) for ln in (run / "converted-metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert rows[0]["strength"] == 0.0 and rows[4]["strength"] == 0.5 and rows[-1]["strength"] == 1.0
    assert "eval_agreement" in rows[5] and "eval_agreement" in rows[11]
    summary = result.summary
    assert summary.row("original")["agreement"] == 1.0
    assert {r["model"] for r in summary.rows} == {"original", "converted, before fine-tuning",
                                                    "converted, fine-tuned", "control: original, fine-tuned"}
    loaded = normswap.load(out, trust_source=True)
    assert all(m.current_strength() == 1.0 for m in loaded.modules() if isinstance(m, normswap.Variant))
    x = load_file("data.safetensors")["inputs"][:8]
    result.model.eval()
    assert torch.allclose(loaded(x), result.model.cpu()(x), atol=1e-6)
    text = result.render()
    assert "converted, fine-tuned" in text and "control: original, fine-tuned" in text


def test_finetune_errors_are_one_line(workdir):
    recipe = _write(workdir)
    r = CliRunner().invoke(cli, ["finetune", recipe, "--set", "finetune.steps=2", "--set", "eval.every=0"])
    assert r.exit_code == 0, r.output
    again = CliRunner().invoke(cli, ["finetune", recipe, "--set", "finetune.steps=2", "--set", "eval.every=0"])
    assert again.exit_code == 1
    assert again.output.strip() == "Error: out/m.safetensors exists; pass --force (force=True) to overwrite it"
    other = CliRunner().invoke(cli, ["finetune", recipe, "-o", "out/n.safetensors", "--resume"])
    assert other.exit_code == 2
    assert other.output.strip() == ("Error: --resume: no checkpoint in out/n.run (nothing to resume; run without "
                                    "--resume)")
    changed = CliRunner().invoke(cli, ["finetune", recipe, "--resume", "--set", "finetune.steps=3"])
    assert changed.exit_code == 2
    assert changed.output.strip() == (
        "Error: --resume: the recipe differs from the one the checkpoint in out/m.run was made with (compare with "
        "out/m.run/recipe.yaml); resume with the same recipe, or start over with --force")
    (workdir / "out" / "m.safetensors").unlink()
    stale = CliRunner().invoke(cli, ["finetune", recipe, "--set", "finetune.steps=2"])
    assert stale.exit_code == 1
    assert stale.output.strip() == ("Error: out/m.run holds a previous run's checkpoint: pass --resume to continue "
                                    "it or --force to start over")
    bad_out = CliRunner().invoke(cli, ["finetune", recipe, "-o", "out/model.pt"])
    assert bad_out.exit_code == 2
    assert bad_out.output.strip() == "Error: output.path must end in .safetensors, got out/model.pt"
    (workdir / "nolabels.safetensors").write_bytes(b"")
    save_file({"inputs": torch.randn(80, 1, 8, 8)}, str(workdir / "nolabels.safetensors"))
    unlabelled = CliRunner().invoke(cli, ["finetune", recipe, "--force", "--set", "data.spec=nolabels.safetensors"])
    assert unlabelled.exit_code == 1
    assert unlabelled.output.strip().splitlines()[-1] == (
        "Error: distill.label_weight > 0 needs labelled data, but this data has no labels: set "
        "distill.label_weight: 0 or use labelled data")


def test_dry_run_converts_and_trains_nothing(workdir):
    r = CliRunner().invoke(cli, ["finetune", _write(workdir), "--dry-run", "--json"])
    assert r.exit_code == 0, r.output
    data = json.loads(r.output)
    assert data["dry_run"] is True and data["sites"] == 2 and data["data"]["sizes"]["training"] == 64
    assert not (workdir / "out" / "m.run").exists() and not (workdir / "out" / "m.safetensors").exists()


KILLER = textwrap.dedent("""
    import os, signal, sys
    import normswap
    from normswap.train import loop
    calls = {"n": 0}
    original = loop.distill_loss

    def dying(*args, **kwargs):  # SIGKILL in the middle of step 7 (after the step-4 checkpoint, mid-epoch)
        calls["n"] += 1
        if calls["n"] == 7:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    loop.distill_loss = dying
    sys.argv = ["normswap", "finetune", sys.argv[1], "-o", sys.argv[2]]
    from normswap.cli.main import main
    main()
""")


def test_sigkill_then_resume_ends_with_the_same_weights(workdir):
    recipe = _write(workdir, variant="patchnorm")
    (workdir / "killer.py").write_text(KILLER)
    full = _run_cli(["finetune", recipe, "-o", "full/m.safetensors"], cwd=workdir)
    assert full.returncode == 0, full.stderr[-2000:]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    killed = subprocess.run([sys.executable, "killer.py", recipe, "cut/m.safetensors"], cwd=workdir, env=env,
                            capture_output=True, text=True, timeout=600)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (workdir / "cut" / "m.safetensors").exists()
    steps = [json.loads(ln)["step"] for ln in (workdir / "cut/m.run/converted-metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]  # step 7 never finished
    resumed = _run_cli(["finetune", recipe, "-o", "cut/m.safetensors", "--resume"], cwd=workdir)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed at step 4" in resumed.stdout
    a, b = load_file(str(workdir / "full/m.safetensors")), load_file(str(workdir / "cut/m.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    la = (workdir / "full/m.run/converted-metrics.jsonl").read_text()
    lb = (workdir / "cut/m.run/converted-metrics.jsonl").read_text()
    assert la == lb  # the same losses, step for step


def test_torchrun_two_processes_match_one_process(workdir):
    recipe = _write(workdir)
    common = ["--set", "calibrate.enabled=false", "--set", "eval.every=0", "--set", "finetune.steps=6"]
    one = _run_cli(["finetune", recipe, "-o", "one/m.safetensors", "--set", "finetune.batch_size=8", *common],
                   cwd=workdir)
    assert one.returncode == 0, one.stderr[-2000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(port), "-m", "normswap", "finetune", recipe, "-o", "two/m.safetensors",
                          "--set", "finetune.batch_size=4", *common], cwd=workdir, env=env, capture_output=True,
                         text=True, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("saved two/m.safetensors") == 1  # rank 0 writes and prints
    rows1 = [json.loads(ln) for ln in (workdir / "one/m.run/converted-metrics.jsonl").read_text().splitlines()]
    rows2 = [json.loads(ln) for ln in (workdir / "two/m.run/converted-metrics.jsonl").read_text().splitlines()]
    assert len(rows1) == len(rows2) == 6
    for r1, r2 in zip(rows1, rows2):
        assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-5, abs=1e-6), (r1, r2)
    a, b = load_file(str(workdir / "one/m.safetensors")), load_file(str(workdir / "two/m.safetensors"))
    # Adam divides by sqrt(v): parameters whose gradients are ~0 (UAN's coinciding mixture priors) turn float
    # rounding differences of the two reductions into updates of up to ~lr * 1e-2, so weights get a looser bound
    assert all(torch.allclose(a[k].double(), b[k].double(), rtol=1e-4, atol=1e-4) for k in a)


def test_every_shipped_recipe_validates():
    from pathlib import Path

    from normswap.recipe import load_recipe

    root = Path(__file__).resolve().parent.parent / "recipes"
    names = sorted(p.name for p in root.glob("*.yaml"))
    assert {"fmnist-uan.yaml", "fmnist-patchnorm.yaml", "fmnist-anact.yaml", "mobilenet_v2-uan.yaml",
            "mobilenet_v2-patchnorm.yaml", "mobilenet_v2-anact.yaml", "imagefolder-template.yaml",
            "resnet50-patchnorm.yaml", "resnet18-anact.yaml"} <= set(names)
    for name in names:
        recipe = load_recipe(root / name)
        assert recipe.output.path == f"out/{recipe.output.path[4:]}" and recipe.strength.to == 1.0, name


def test_resnet18_anact_recipe_anneals_every_relu(tmp_path, monkeypatch):
    """Every ReLU of a ResNet feeds a residual add: ANAct converts them unfolded at strength 0 (exact) and the
    recipe anneals them to 1 (a shortened run of recipes/resnet18-anact.yaml on synthetic 64 px input)."""
    from pathlib import Path

    import warnings

    recipe = Path(__file__).resolve().parent.parent / "recipes" / "resnet18-anact.yaml"
    monkeypatch.chdir(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = normswap.finetune(recipe, overrides=["finetune.steps=4", "finetune.batch_size=2",
                                                      "finetune.train_samples=8", "data.spec=synthetic:3x64x64",
                                                      "data.image_size=null", "calibrate.samples=4",
                                                      "eval.samples=4", "eval.every=0", "strength.span=3"])
    sites = [s for s in normswap.load(result.output).modules() if isinstance(s, normswap.Variant)]
    plan = normswap.plan("resnet18", "anact")
    assert len(plan.converted) == len(sites) == 9
    assert all(s.facts.get("exact_at") == "strength 0" for s in plan.converted)
    assert all(m.current_strength() == 1.0 for m in sites)
    strengths = [json.loads(ln)["strength"] for ln in (tmp_path / "out/resnet18-anact.run/converted-metrics.jsonl")
                 .read_text().splitlines()]
    assert strengths[0] == 0.0 and 0 < strengths[1] < strengths[2] < 1.0 and strengths[3] == 1.0


def test_parameter_selection_and_budget_errors(workdir):
    from normswap.train.loop import select_parameters

    model = normswap.convert(nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).eval(),
                             to="uan").model
    assert len(select_parameters(model, "all")) == 4 + len(list(model[1].parameters()))
    assert {id(p) for p in select_parameters(model, "new")} == {id(p) for p in model[1].parameters()}
    with pytest.raises(normswap.NormswapError) as err:
        select_parameters(nn.Sequential(nn.Linear(2, 2)), "new")
    assert str(err.value) == ("finetune.trainable: 'new' selects no trainable parameter in this model "
                              "(set finetune.trainable: all)")
    r = CliRunner().invoke(cli, ["finetune", _write(workdir), "--set", "finetune.batch_size=80"])
    assert r.exit_code == 2
    assert r.output.strip().splitlines()[-1] == ("Error: the training part has 64 items, fewer than one global batch "
                                                 "of 80: raise finetune.train_samples or lower finetune.batch_size")
    assert not (workdir / "out" / "m.run" / "converted-state.safetensors").exists()


def test_feature_matching_and_staged_refits(workdir):
    """distill.feature_weight adds the normalised feature term at the sites' compare points; calibrate.refit:
    stages refits PatchNorm's gains at each stair of a step schedule (the gains then differ from the start's)."""
    recipe = _write(workdir, variant="patchnorm")
    result = normswap.finetune(recipe, overrides=[
        "finetune.steps=6", "eval.every=0", "distill.feature_weight=1.0", "strength.shape=step",
        "strength.levels=[0.25, 1.0]", "strength.span=4", "calibrate.refit=stages", "finetune.optimizer.lr=1e-9"])
    rows = [json.loads(ln) for ln in (workdir / "out/m.run/converted-metrics.jsonl").read_text().splitlines()]
    assert [r["strength"] for r in rows] == [0.25, 0.25, 1.0, 1.0, 1.0, 1.0]
    assert all(r["feature"] > 0 and r["loss"] == pytest.approx(r["kl"] + 0.5 * r["ce"] + r["feature"], rel=1e-5)
               for r in rows[1:])
    # a refit for another strength (0.25, the first stair) solves other gains against the original's activations
    from normswap.api.conversion import META_ATTR
    from normswap.data import open_data
    from normswap.train.loop import _refit
    from normswap.variants.patchnorm import PatchNorm

    model = result.model.cpu()
    layers = [m for m in model.modules() if isinstance(m, PatchNorm)]
    before = [m.gain.detach().clone() for m in layers]
    original = normswap.convert("tiny.py:net", to="patchnorm", weights="none").original
    split = open_data("data.safetensors", original, calib_samples=16, eval_samples=16, train_samples=64, seed=3)
    _refit(model, getattr(model, META_ATTR)["plan"], original, split, result.recipe, 0.25, 0, 1)
    assert any(not torch.allclose(a, m.gain) for a, m in zip(before, layers))
