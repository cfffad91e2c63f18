"""Property-based fuzzing of what a file may say (hypothesis): no source, Plan, option set or damaged file
yields anything but a NormswapError, and whatever the parser accepts also loads or fails as one.

A few hundred cases per property by default; thousands under ``-m slow``."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import normswap
from normswap.errors import NormswapError
from normswap.io import read_file, write_file
from normswap.api.metadata import NEVER, SOURCE_KWARGS, plan_from_file, replay, source_from_file
from normswap.sources import KINDS, SourceSpec
from normswap.variants import registry


FAST, SLOW = 200, 3000
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2 ** 70), 2 ** 70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=12))
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                           max_leaves=12)
kwarg_names = st.sampled_from(sorted({k for d in SOURCE_KWARGS.values() for k in d} | set(NEVER))) | st.text(max_size=10)
names = st.sampled_from(["resnet18", "mobilenet_v2", "efficientnet_b0", "/abs/dir", "/abs/m.py:make", "pkg.mod:make",
                         ".", "os:system", "resnet18.a1_in1k"]) | st.text(max_size=20)
sources = st.one_of(json_values, st.fixed_dictionaries(
    {"kind": st.sampled_from(KINDS) | st.text(max_size=6), "name": names},
    optional={"spec": st.text(max_size=10) | scalars,
              "weights": st.sampled_from([None, "none", "IMAGENET1K_V1", "DEFAULT", "/w.pt", "w.pt"]) | scalars,
              "kwargs": st.dictionaries(kwarg_names, json_values, max_size=3) | json_values,
              "extra": json_values}))


def _settings(n: int):
    return settings(max_examples=n, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


def _check_sources(n: int) -> None:
    @_settings(n)
    @given(sources)
    def prop(data):
        try:
            got = source_from_file(data, "f.safetensors")
        except NormswapError as exc:
            assert str(exc) and "\n" not in str(exc)
            return
        assert got is None or isinstance(got, SourceSpec)
        if got is not None:
            assert not set(got.kwargs) & set(NEVER)

    prop()


@pytest.fixture(scope="module")
def saved(small_cnn_uan_file):
    path, model = small_cnn_uan_file
    tensors, meta = read_file(path)
    return path, model, tensors, meta


# A mutation: a path into the plan (top level, a site, a site's config / facts) and what to do there.
where = st.sampled_from(["plan", "site", "config", "facts"])
keys = st.sampled_from(["variant", "strength", "options", "targets", "exclude", "trace_path", "trace_error", "sites",
                        "version", "format", "name", "source_type", "action", "reason", "pattern", "path",
                        "absorbs", "config", "facts", "opt_in", "k", "var_floor", "source_kind", "channels",
                        "graph_rewrite", "node", "compensation"]) | st.text(max_size=8)
mutations = st.lists(st.tuples(where, st.integers(0, 10), keys, st.sampled_from(["set", "delete"]), json_values),
                     min_size=1, max_size=4)


def _mutate(plan: dict, steps: list) -> dict:
    plan = copy.deepcopy(plan)
    for place, index, key, action, value in steps:
        sites = plan.get("sites") if isinstance(plan.get("sites"), list) else []
        site = sites[index % len(sites)] if sites and isinstance(sites[index % len(sites)], dict) else None
        target = {"plan": plan, "site": site, "config": (site or {}).get("config"), "facts": (site or {}).get("facts")}[place]
        if not isinstance(target, dict):
            continue
        if action == "delete":
            target.pop(key, None)
        else:
            target[key] = value
    return plan


def _check_plans(saved, n: int) -> None:
    path, model, tensors, meta = saved

    @_settings(n)
    @given(mutations)
    def prop(steps):
        plan_data = _mutate(meta["plan"], steps)
        try:
            plan = plan_from_file(plan_data, path)
            replay(path, model, plan, tensors)  # whatever the parser accepts loads, or fails as a NormswapError
        except NormswapError as exc:
            assert str(exc) and "\n" not in str(exc)

    prop()


option_sets = st.dictionaries(st.sampled_from(["k", "var_floor", "form", "eps", "offset", "per_channel", "momentum",
                                               "reject", "allow_inexact"]) | st.text(max_size=6),
                              scalars | st.text(max_size=6), max_size=3)


def _check_options(n: int) -> None:
    @_settings(n)
    @given(st.sampled_from(registry.names()), option_sets, scalars)
    def prop(variant, options, strength):
        try:
            config = registry.get(variant).config_class.from_options(options, strength, variant)
        except NormswapError as exc:
            assert str(exc) and "\n" not in str(exc)
            return
        assert 0.0 <= config.strength <= 1.0 and not math.isnan(config.strength)

    prop()


def _check_bytes(saved, tmp_path, n: int) -> None:
    path, model, _, _ = saved
    data = path.read_bytes()

    @_settings(n)
    @given(st.lists(st.tuples(st.integers(0, len(data) - 1), st.integers(0, 255)), min_size=1, max_size=4),
           st.integers(0, len(data)))
    def prop(flips, cut):
        damaged = bytearray(data[:max(cut, 1)] if cut < 64 else data)
        for at, byte in flips:
            if at < len(damaged):
                damaged[at] = byte
        out = tmp_path / "damaged.safetensors"
        out.write_bytes(bytes(damaged))
        try:
            normswap.load(out, model=model)
        except NormswapError as exc:
            assert str(exc) and "\n" not in str(exc)

    prop()


def test_fuzz_sources():
    _check_sources(FAST)


def test_fuzz_plans(saved):
    _check_plans(saved, FAST)


def test_fuzz_options():
    _check_options(FAST)


def test_fuzz_damaged_files(saved, tmp_path):
    _check_bytes(saved, tmp_path, FAST // 2)


@pytest.mark.slow
def test_fuzz_thousands(saved, tmp_path):
    _check_sources(SLOW)
    _check_plans(saved, SLOW)
    _check_options(SLOW)
    _check_bytes(saved, tmp_path, SLOW // 3)


def test_a_mutated_plan_that_stays_valid_still_loads(saved):
    """The fuzzer's baseline: the unmutated plan passes, so refusals above are about the mutations."""
    path, model, tensors, meta = saved
    loaded = replay(path, model, plan_from_file(meta["plan"], path), tensors)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in tensors.items())
    write_file(path.with_name("again.safetensors"), tensors, meta, force=True)
