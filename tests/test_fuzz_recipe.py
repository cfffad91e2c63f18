"""Property-based fuzzing of the recipe loader (hypothesis): no text, file, mutated recipe or ``--set`` override
yields anything but a one-line NormswapError, and whatever it accepts dumps and loads back equal.

A few hundred cases per property by default; thousands under ``-m slow``. The YAML bombs (nested aliases,
deep nesting, code tags) are fixed cases with a time limit."""

from __future__ import annotations

import copy
import time

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from normswap.errors import NormswapError
from normswap.recipe import Recipe, dump_recipe, load_recipe, parse_recipe

FAST, SLOW = 200, 3000

BASE = {
    "version": 1, "seed": 0,
    "model": {"source": "examples/fmnist_cnn.py:build", "weights": None},
    "convert": {"to": "uan", "targets": ["BatchNorm2d"], "exclude": [], "options": {"k": 3}},
    "data": {"spec": "fashion-mnist", "image_size": None, "mean": [0.5], "std": [0.25]},
    "calibrate": {"samples": 64, "batch_size": 32, "refit": "start", "em_init": "quantile"},
    "finetune": {"steps": 10, "batch_size": 8, "optimizer": {"name": "adamw", "lr": 1e-3, "betas": [0.9, 0.99]},
                 "lr_schedule": {"shape": "cosine", "warmup_steps": 2}, "trainable": "all"},
    "strength": {"from": 0.0, "to": 1.0, "shape": "step", "levels": [0.1, 0.5, 1.0]},
    "distill": {"temperature": 2.0, "kl_weight": 1.0},
    "eval": {"samples": 16, "batch_size": 8, "every": 5},
    "output": {"path": "out/x.safetensors", "checkpoint_every": 5},
}

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12),
                    st.sampled_from(["uan", "cosine", "1e-4", "-1", "0", ".inf", "null", "yes", "~", "3.5"]))
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=8)


def _paths(data, prefix=()):
    """Every dotted path of BASE, leaves and sections alike."""
    out = [prefix] if prefix else []
    if isinstance(data, dict):
        for k, v in data.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(data, list):
        for i, v in enumerate(data):
            out += _paths(v, prefix + (i,))
    return out


PATHS = _paths(BASE)
keys = st.sampled_from(sorted({str(p[-1]) for p in PATHS})) | st.text(max_size=8)
mutation = st.tuples(st.sampled_from(PATHS), st.sampled_from(["set", "delete", "add"]), values, keys)


def _mutate(data: dict, path: tuple, how: str, value, key) -> dict:
    data = copy.deepcopy(data)
    parent = data
    for part in path[:-1]:
        parent = parent[part]
    last = path[-1]
    if how == "set":
        parent[last] = value
    elif how == "delete":
        del parent[last]
    elif isinstance(parent[last], dict):
        parent[last][key] = value
    else:
        parent[last] = {key: value}
    return data


def _settings(n: int):
    return settings(max_examples=n, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


def _outcome(make) -> Recipe | None:
    """The Recipe, or None after a one-line NormswapError; anything else fails the property."""
    try:
        recipe = make()
    except NormswapError as exc:
        assert str(exc) and "\n" not in str(exc) and "Traceback" not in str(exc)
        return None
    assert isinstance(recipe, Recipe)
    assert parse_recipe(dump_recipe(recipe), "again.yaml") == recipe  # accepted: it round-trips
    return recipe


def _check_texts(n: int) -> None:
    @_settings(n)
    @given(st.text(max_size=200) | st.sampled_from(["model:", "a: *b", "- [", "!!binary x", "%YAML 9.9\n---\na: 1"]))
    def prop(text):
        _outcome(lambda: parse_recipe(text, "r.yaml"))

    prop()


def _check_mutations(n: int) -> list[int]:
    accepted = [0, 0]

    @_settings(n)
    @given(st.lists(mutation, min_size=1, max_size=3))
    def prop(changes):
        data = BASE
        for path, how, value, key in changes:
            try:
                data = _mutate(data, path, how, value, key)
            except (KeyError, IndexError, TypeError):  # the path went away with an earlier change
                continue
        text = yaml.safe_dump(data, sort_keys=False)
        accepted[_outcome(lambda: parse_recipe(text, "r.yaml")) is None] += 1

    prop()
    return accepted


def _check_overrides(n: int) -> None:
    dotted = st.sampled_from([".".join(map(str, p)) for p in PATHS]) | st.text(max_size=12)
    item = st.tuples(dotted, st.sampled_from(["=", "", "=="]), scalars.map(str) | st.text(max_size=10))

    @_settings(n)
    @given(st.lists(item, max_size=3))
    def prop(items):
        overrides = [f"{k}{sep}{v}" for k, sep, v in items]
        _outcome(lambda: parse_recipe(yaml.safe_dump(BASE, sort_keys=False), "r.yaml", overrides))

    prop()


def _check_files(tmp_path, n: int) -> None:
    good = yaml.safe_dump(BASE, sort_keys=False).encode()

    @_settings(n)
    @given(st.binary(max_size=64), st.integers(0, len(good)), st.booleans())
    def prop(junk, at, replace):
        path = tmp_path / "r.yaml"
        path.write_bytes(good[:at] + junk + good[at + (len(junk) if replace else 0):])
        _outcome(lambda: load_recipe(path))

    prop()


def test_the_base_recipe_is_valid():
    """The fuzzer's baseline: unmutated, BASE loads, so the refusals below are about the mutations."""
    assert _outcome(lambda: parse_recipe(yaml.safe_dump(BASE, sort_keys=False), "r.yaml")) is not None


def test_fuzz_texts():
    _check_texts(FAST)


def test_fuzz_mutations():
    accepted, refused = _check_mutations(FAST)
    assert accepted and refused  # both sides of the border are reached


def test_fuzz_overrides():
    _check_overrides(FAST // 2)


def test_fuzz_files(tmp_path):
    _check_files(tmp_path, FAST // 2)


@pytest.mark.slow
def test_fuzz_thousands(tmp_path):
    _check_texts(SLOW)
    _check_mutations(SLOW)
    _check_overrides(SLOW)
    _check_files(tmp_path, SLOW)


def _laughs(levels: int) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("text, message", [
    (_laughs(9), "r.yaml: the recipe expands to more than 10000 values (nested YAML aliases?); a recipe holds about "
                 "a hundred"),
    ("model:\n  source: x\nconvert: {to: uan, targets: *t}\n", "r.yaml: invalid YAML at line 3: found undefined alias 't'"),
    ("[" * 2000, "r.yaml: the YAML is nested too deeply to be a recipe"),
    ("a: " + "{b: " * 3000 + "1" + "}" * 3000, "r.yaml: the YAML is nested too deeply to be a recipe"),
    ("!!python/object/apply:os.system ['touch pwned']", "r.yaml: invalid YAML at line 1: could not determine a "
     "constructor for the tag 'tag:yaml.org,2002:python/object/apply:os.system'"),
])
def test_yaml_bombs_are_one_line_and_quick(text, message):
    start = time.perf_counter()
    with pytest.raises(NormswapError) as err:
        parse_recipe(text, "r.yaml")
    assert str(err.value) == message
    assert time.perf_counter() - start < 10.0
