"""Recipe files: the strict schema, one-line errors with path and line, --set, dump round trip, CLI."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner
from pydantic import ValidationError

from normswap.cli.main import cli
from normswap.errors import RecipeError, UsageError
from normswap.recipe import SCHEMA_VERSION, Recipe, dump_recipe, load_recipe, parse_recipe, recipe_schema

# The smallest valid recipe; the line numbers below are this text's.
MINIMAL = """\
model:
  source: examples/fmnist_cnn.py:build
convert:
  to: uan
finetune:
  steps: 600
  optimizer:
    lr: 0.001
output:
  path: out.safetensors
"""

FULL = """\
version: 1
seed: 7
model:
  source: timm:resnet18
  weights: none
convert:
  to: patchnorm
  targets: [layer1, 're:layer2\\.\\d+']
  exclude: [fc]
  options: {k: 5, name: x, flag: true, rate: 0.5}
data:
  spec: photos
  image_size: 96
  mean: [0.5, 0.5, 0.5]
  std: [0.25, 0.25, 0.25]
calibrate:
  refit: stages
  em_init: kmeans++
  em_tol: 1e-6
finetune:
  epochs: 2.5
  batch_size: 16
  optimizer: {name: sgd, lr: 3e-4, momentum: 0.8, betas: [0.5, 0.9]}
  lr_schedule: {shape: linear, warmup_steps: 20, min_lr: 1e-6}
  trainable: norms
  grad_clip: null
  precision: bf16
strength:
  from: 0
  to: 1
  shape: step
  levels: [0.001, 0.01, 0.1, 0.3, 1]
distill:
  kl_weight: 0
  label_weight: 1
eval: {every: 50}
output:
  path: runs/x.safetensors
  checkpoint_every: 0
  plot: false
control: false
"""


def edit(old: str, new: str) -> str:
    assert old in MINIMAL, old
    return MINIMAL.replace(old, new, 1)


KNOWN = "anact, patchnorm, recenter, rescale, uan"

# (id, recipe text, --set overrides, the exact one-line message)
MALFORMED = [
    ("unknown top-level key", edit("finetune:", "fintune:"), (),
     "r.yaml: fintune: unknown key (did you mean 'finetune'?) (line 5)"),
    ("unknown nested key", edit("  optimizer:", "  optimzer:"), (),
     "r.yaml: finetune.optimzer: unknown key (did you mean 'optimizer'?) (line 7)"),
    ("unknown key, nothing close", MINIMAL + "strength:\n  zzz: 1\n", (),
     "r.yaml: strength.zzz: unknown key (valid keys: from, to, start, span, shape, stages, levels, log_min) (line 12)"),
    ("string for number", edit("lr: 0.001", "lr: fast"), (),
     "r.yaml: finetune.optimizer.lr: expected a number, got 'fast' (line 8)"),
    ("bool for int", edit("steps: 600", "steps: true"), (),
     "r.yaml: finetune.steps: expected an integer, got true (line 6)"),
    ("float for int", edit("steps: 600", "steps: 1.5"), (),
     "r.yaml: finetune.steps: expected an integer, got 1.5 (line 6)"),
    ("list for mapping", edit("  optimizer:\n    lr: 0.001", "  optimizer: [1, 2]"), (),
     "r.yaml: finetune.optimizer: expected a mapping, got a list (line 7)"),
    ("string for list", edit("to: uan", "to: uan\n  targets: features"), (),
     "r.yaml: convert.targets: expected a list, got 'features' (line 5)"),
    ("empty section", edit("output:\n  path: out.safetensors", "output:"), (),
     "r.yaml: output: expected a mapping, got null (line 9)"),
    ("lr 0", edit("lr: 0.001", "lr: 0"), (),
     "r.yaml: finetune.optimizer.lr: must be > 0, got 0 (line 8)"),
    ("negative weight decay", edit("lr: 0.001", "weight_decay: -0.1"), (),
     "r.yaml: finetune.optimizer.weight_decay: must be >= 0, got -0.1 (line 8)"),
    ("strength.from 1.5", MINIMAL + "strength:\n  from: 1.5\n", (),
     "r.yaml: strength.from: must be in [0, 1], got 1.5 (line 12)"),
    ("momentum 1.0", edit("lr: 0.001", "momentum: 1.0"), (),
     "r.yaml: finetune.optimizer.momentum: must be in [0, 1), got 1.0 (line 8)"),
    ("beta out of range", edit("lr: 0.001", "betas: [0.9, 1.5]"), (),
     "r.yaml: finetune.optimizer.betas[1]: must be in [0, 1), got 1.5 (line 8)"),
    ("three betas", edit("lr: 0.001", "betas: [0.9, 0.99, 0.5]"), (),
     "r.yaml: finetune.optimizer.betas: expected 2 values, got 3 (line 8)"),
    ("std item 0", MINIMAL + "data:\n  std: [0.5, 0]\n", (),
     "r.yaml: data.std[1]: must be > 0, got 0 (line 12)"),
    ("infinite lr", edit("lr: 0.001", "lr: .inf"), (),
     "r.yaml: finetune.optimizer.lr: expected a finite number, got inf (line 8)"),
    ("unknown choice", edit("lr: 0.001", "name: adan"), (),
     "r.yaml: finetune.optimizer.name: expected one of adamw, adam, sgd, got 'adan' (did you mean 'adam'?) (line 8)"),
    ("bad option value", edit("to: uan", "to: uan\n  options: {k: [1]}"), (),
     "r.yaml: convert.options.k: expected a string, number or true/false, got a list (line 5)"),
    ("missing model.source", edit("  source: examples/fmnist_cnn.py:build", "  weights: none"), (),
     "r.yaml: model.source: required field is missing (line 1)"),
    ("missing output.path", edit("  path: out.safetensors", "  plot: false"), (),
     "r.yaml: output.path: required field is missing (line 9)"),
    ("missing finetune section", edit("finetune:\n  steps: 600\n  optimizer:\n    lr: 0.001\n", ""), (),
     "r.yaml: finetune: required section is missing (line 1)"),
    ("steps and epochs", edit("steps: 600", "steps: 600\n  epochs: 2"), (),
     "r.yaml: finetune.epochs: give either steps or epochs, not both (line 7)"),
    ("neither steps nor epochs", edit("  steps: 600\n", ""), (),
     "r.yaml: finetune: give the training budget: steps or epochs (line 5)"),
    ("levels without step shape", MINIMAL + "strength:\n  levels: [0.1, 0.5]\n", (),
     "r.yaml: strength.levels: needs shape: step (shape is 'linear') (line 12)"),
    ("levels not increasing", MINIMAL + "strength:\n  shape: step\n  levels: [0.1, 0.5, 0.3]\n", (),
     "r.yaml: strength.levels[2]: must increase (0.3 after 0.5) (line 13)"),
    ("level outside from..to", MINIMAL + "strength:\n  shape: step\n  to: 0.5\n  levels: [0.1, 0.9]\n", (),
     "r.yaml: strength.levels[1]: 0.9 is outside [from, to] = [0, 0.5] (line 14)"),
    ("no loss", MINIMAL + "distill:\n  kl_weight: 0\n", (),
     "r.yaml: distill: kl_weight + label_weight + feature_weight must be > 0 (there is nothing to train on) (line 11)"),
    ("unknown variant", edit("to: uan", "to: patchnrom"), (),
     f"r.yaml: convert.to: unknown variant 'patchnrom' (did you mean 'patchnorm'?); known variants: {KNOWN} (line 4)"),
    ("future version", "version: 2\n" + MINIMAL, (),
     "r.yaml: version: unsupported recipe version 2 (this normswap reads version 1) (line 1)"),
    ("negative seed", "seed: -3\n" + MINIMAL, (), "r.yaml: seed: must be >= 0, got -3 (line 1)"),
    ("duplicate key", edit("lr: 0.001", "lr: 0.001\n    lr: 0.01"), (),
     "r.yaml: finetune.optimizer.lr: duplicate key (first at line 8) (line 9)"),
    ("duplicate section", MINIMAL + "model:\n  source: x\n", (),
     "r.yaml: model: duplicate key (first at line 1) (line 11)"),
    ("YAML syntax error", edit("  steps: 600", " steps: 600"), (),
     "r.yaml: invalid YAML at line 7: mapping values are not allowed here"),
    ("two documents", MINIMAL + "---\na: 1\n", (),
     "r.yaml: invalid YAML at line 11: expected a single document in the stream but found another document"),
    ("empty file", "", (),
     "r.yaml: empty recipe (expected a mapping with the sections model, convert, finetune, output)"),
    ("only comments", "# nothing yet\n", (),
     "r.yaml: empty recipe (expected a mapping with the sections model, convert, finetune, output)"),
    ("top-level list", "- model\n- convert\n", (),
     "r.yaml: expected a mapping of sections at the top level, got a list (line 1)"),
    ("several errors", edit("lr: 0.001", "lr: fast\n    name: x") + "eval:\n  every: -1\n", (),
     "r.yaml: finetune.optimizer.lr: expected a number, got 'fast' (line 8) (and 2 more)"),
    ("--set unknown path", MINIMAL, ("finetune.optimzer.lr=3e-4",),
     "r.yaml: --set finetune.optimzer.lr=3e-4: unknown key 'optimzer' (did you mean 'optimizer'?)"),
    ("--set wrong type", MINIMAL, ("finetune.optimizer.lr=fast",),
     "r.yaml: finetune.optimizer.lr: expected a number, got 'fast' (from --set)"),
    ("--set out of range", MINIMAL, ("strength.from=1.5",),
     "r.yaml: strength.from: must be in [0, 1], got 1.5 (from --set)"),
    ("--set breaks a rule", MINIMAL, ("finetune.epochs=3",),
     "r.yaml: finetune.epochs: give either steps or epochs, not both (from --set)"),
    ("--set without =", MINIMAL, ("finetune.steps",),
     "r.yaml: --set finetune.steps: expected KEY.PATH=VALUE, e.g. finetune.optimizer.lr=3e-4"),
    ("--set below a value", MINIMAL, ("finetune.steps.x=1",),
     "r.yaml: --set finetune.steps.x=1: 'steps' takes a value, not keys"),
    ("--set bad YAML", MINIMAL, ("convert.targets=[a",),
     "r.yaml: --set convert.targets=[a: invalid YAML at line 1: expected ',' or ']', but got '<stream end>'"),
]


@pytest.mark.parametrize("text,overrides,message", [m[1:] for m in MALFORMED], ids=[m[0] for m in MALFORMED])
def test_malformed_recipe_is_one_exact_line(text, overrides, message):
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, "r.yaml", overrides)
    assert str(info.value) == message
    assert "\n" not in str(info.value)
    assert isinstance(info.value, UsageError) and info.value.exit_code == 2


def test_several_errors_are_listed_in_file_order():
    text = edit("lr: 0.001", "lr: fast\n    name: x") + "eval:\n  every: -1\n"
    with pytest.raises(RecipeError) as info:
        parse_recipe(text, "r.yaml")
    assert info.value.problems == [
        "r.yaml: finetune.optimizer.lr: expected a number, got 'fast' (line 8)",
        "r.yaml: finetune.optimizer.name: expected one of adamw, adam, sgd, got 'x' (line 9)",
        "r.yaml: eval.every: must be >= 0, got -1 (line 13)",
    ]


def test_file_errors(tmp_path):
    with pytest.raises(RecipeError, match=r"^.*nope\.yaml: no such file$"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(RecipeError, match=r": is a directory, not a recipe file$"):
        load_recipe(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(MINIMAL.encode() + b"seed: \xff\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(bad)
    assert str(info.value) == f"{bad}: not UTF-8 text (byte 0xff at line 11)"
    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbf" + MINIMAL.encode())
    assert load_recipe(bom) == parse_recipe(MINIMAL)


def test_minimal_recipe_defaults():
    r = parse_recipe(MINIMAL)
    assert r.version == SCHEMA_VERSION == 1 and r.seed == 0
    assert r.model.weights is None and r.convert.targets == [] and r.convert.options == {}
    assert r.calibrate.refit == "start" and r.calibrate.em_samples == 4096
    assert r.finetune.steps == 600 and r.finetune.epochs is None and r.finetune.grad_clip == 1.0
    assert r.finetune.optimizer.betas == (0.9, 0.999) and r.finetune.optimizer.lr == 0.001
    assert r.finetune.lr_schedule.shape == "cosine"
    assert (r.strength.from_, r.strength.to, r.strength.shape, r.strength.span) == (0.0, 1.0, "linear", None)
    assert (r.distill.kl_weight, r.distill.temperature) == (1.0, 2.0)
    assert r.output.checkpoint_every == 100 and r.control is True
    assert r.finetune.total_steps(10) == 600 and r.strength.resolved_span(600) == 450


def test_number_spellings():
    """``3e-4`` is a number (plain PyYAML reads it as a string); an int is fine where a float is expected."""
    r = parse_recipe(edit("lr: 0.001", "lr: 3e-4"))
    assert r.finetune.optimizer.lr == pytest.approx(3e-4) and isinstance(r.finetune.optimizer.lr, float)
    r = parse_recipe(edit("lr: 0.001", "lr: 1"))
    assert r.finetune.optimizer.lr == 1.0 and isinstance(r.finetune.optimizer.lr, float)
    r = parse_recipe(edit("steps: 600", "epochs: 2"))
    assert r.finetune.epochs == 2.0 and r.finetune.total_steps(7) == 14
    assert parse_recipe(edit("steps: 600", "epochs: 0.5")).finetune.total_steps(7) == 4


def test_overrides_apply_before_validation():
    r = parse_recipe(MINIMAL, overrides=["finetune.optimizer.lr=3e-4", "convert.targets=[a,b]", "convert.options.k=5",
                                         "strength.from=0.2", "data.spec=photos", "output.path=o.safetensors"])
    assert r.finetune.optimizer.lr == pytest.approx(3e-4)
    assert r.convert.targets == ["a", "b"] and r.convert.options == {"k": 5}
    assert r.strength.from_ == 0.2 and r.data.spec == "photos" and r.output.path == "o.safetensors"
    # an override replaces the file's value, and a later override the earlier one
    r = parse_recipe(MINIMAL, overrides=["finetune.steps=null", "finetune.epochs=1", "finetune.epochs=2"])
    assert (r.finetune.steps, r.finetune.epochs) == (None, 2.0)
    # the attribute name works as well as the YAML key
    assert parse_recipe(MINIMAL, overrides=["strength.from_=0.3"]).strength.from_ == 0.3


def test_round_trip_dump_parse():
    for text in (MINIMAL, FULL):
        r = parse_recipe(text)
        dumped = dump_recipe(r)
        assert parse_recipe(dumped) == r
        assert "from: " in dumped and "from_" not in dumped
        assert dumped.count("\n") > 60  # every default written out
    full = parse_recipe(FULL)
    assert full.convert.options == {"k": 5, "name": "x", "flag": True, "rate": 0.5}
    assert isinstance(full.convert.options["flag"], bool) and isinstance(full.convert.options["k"], int)
    assert full.calibrate.em_tol == 1e-6 and full.finetune.grad_clip is None
    assert full.convert.targets == ["layer1", r"re:layer2\.\d+"]
    d = full.to_dict()
    assert json.loads(json.dumps(d)) == d and d["strength"]["from"] == 0.0 and d["finetune"]["optimizer"]["betas"] == [0.5, 0.9]
    assert Recipe.model_validate(d) == full


def test_recipe_is_frozen():
    r = parse_recipe(MINIMAL)
    with pytest.raises(ValidationError):
        r.finetune.steps = 5  # type: ignore[misc]
    assert r.model_copy(update={"seed": 3}).seed == 3


def test_json_schema():
    schema = json.loads(json.dumps(recipe_schema()))
    assert schema["x-normswap-schema-version"] == 1 and schema["$schema"].endswith("2020-12/schema")
    assert schema["additionalProperties"] is False
    assert set(schema["required"]) == {"model", "convert", "finetune", "output"}
    assert "finetune" in schema["properties"] and schema["properties"]["version"]["const"] == 1
    defs = schema["$defs"]

    def described(prop):  # pydantic leaves out a field's description when its section's docstring says the same
        return prop.get("description") or defs[prop["$ref"].split("/")[-1]]["description"]

    for name, definition in [("Recipe", schema), *defs.items()]:
        assert definition["additionalProperties"] is False and definition["description"], name
        for key, prop in definition["properties"].items():
            assert described(prop), f"{name}.{key}"
    strength = schema["$defs"]["StrengthSection"]["properties"]
    assert "from" in strength and strength["from"]["maximum"] == 1
    assert schema["$defs"]["OptimizerSection"]["properties"]["momentum"]["exclusiveMaximum"] == 1


# ---- the command line --------------------------------------------------------------------------


def run(*args):
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


@pytest.fixture
def recipe_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(MINIMAL)
    return path


def test_cli_validate(recipe_file):
    res = run("recipe", "validate", str(recipe_file))
    assert res.exit_code == 0, res.output
    assert res.stdout == (f"{recipe_file}: ok (model examples/fmnist_cnn.py:build, variant uan, 600 steps, "
                          "strength 0 -> 1 linear, distill kl 1, output out.safetensors)\n")
    res = run("recipe", "validate", str(recipe_file), "--set", "finetune.optimizer.lr=fast")
    assert res.exit_code == 2 and res.stdout == ""
    assert res.stderr == f"Error: {recipe_file}: finetune.optimizer.lr: expected a number, got 'fast' (from --set)\n"
    res = run("recipe", "validate", str(recipe_file), "--set", "finetune.steps=0", "--set", "seed=x", "--json")
    assert res.exit_code == 2
    out = json.loads(res.stdout)
    assert out["ok"] is False and out["problems"] == [
        f"{recipe_file}: seed: expected an integer, got 'x' (from --set)",
        f"{recipe_file}: finetune.steps: must be >= 1, got 0 (from --set)",
    ] and out["error"] == out["problems"][0] + " (and 1 more)"
    res = run("recipe", "validate", str(recipe_file), "--json", "--set", "finetune.epochs=null")
    assert res.exit_code == 0 and json.loads(res.stdout)["ok"] is True
    res = run("recipe", "validate", str(recipe_file.parent / "missing.yaml"))
    assert res.exit_code == 2 and res.stderr == f"Error: {recipe_file.parent / 'missing.yaml'}: no such file\n"


def test_cli_show(recipe_file):
    res = run("recipe", "show", str(recipe_file), "--set", "finetune.steps=50")
    assert res.exit_code == 0, res.output
    shown = parse_recipe(res.stdout)
    assert shown == parse_recipe(MINIMAL, overrides=["finetune.steps=50"]) and shown.finetune.steps == 50
    assert "  em_samples: 4096\n" in res.stdout
    res = run("recipe", "show", str(recipe_file), "--json")
    assert res.exit_code == 0 and json.loads(res.stdout) == parse_recipe(MINIMAL).to_dict()
    assert yaml.safe_load(dump_recipe(parse_recipe(MINIMAL)))["strength"]["from"] == 0.0


def test_cli_schema(tmp_path):
    res = run("recipe", "schema")
    assert res.exit_code == 0 and json.loads(res.stdout) == json.loads(json.dumps(recipe_schema()))
    out = tmp_path / "recipe.schema.json"
    res = run("recipe", "schema", "-o", str(out))
    assert res.exit_code == 0 and res.stdout == f"wrote {out}\n"
    assert json.loads(out.read_text()) == json.loads(json.dumps(recipe_schema()))
    res = run("recipe", "schema", "-o", str(out))
    assert res.exit_code == 1 and res.stderr == f"Error: {out} exists; pass --force (force=True) to overwrite it\n"
    assert run("recipe", "schema", "-o", str(out), "--force").exit_code == 0
    assert [p.name for p in tmp_path.iterdir()] == ["recipe.schema.json"]  # no temporary file left


def test_docs_schema_reference_is_current():
    """docs/recipes.md carries the generated reference; regenerate with ``python -m normswap.recipe.reference docs/recipes.md``."""
    from pathlib import Path

    from normswap.recipe.reference import BEGIN, END, reference

    doc = (Path(__file__).resolve().parents[1] / "docs" / "recipes.md").read_text(encoding="utf-8")
    assert f"{BEGIN}\n{reference()}{END}" in doc
    assert "| `from` | number in [0, 1] | `0.0` |" in doc and "| `path` | string | **required** |" in doc
