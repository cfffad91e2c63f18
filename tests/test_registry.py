"""The variant registry: @register refuses a taken name, plugins come in through the ``normswap.variants``
entry-point group (a broken one warns, never breaks normswap), and a plugin without examples is reported by the
contract suite instead of slipping through it."""

from __future__ import annotations

import sys
from importlib import metadata

import pytest
from torch import nn

import normswap
from normswap import variants
from normswap.errors import NormswapError, UnknownVariantError

from test_variant_contract import contract_cases, example

PLUGIN = '''
import normswap
from torch import nn


@normswap.register
class Dummy(normswap.Variant):
    """A third-party variant that forgot its examples()."""

    name = "contract_dummy"
    adapters = {"torch.nn.modules.activation.Tanh": "tanh"}

    @classmethod
    def from_site(cls, site, module, absorbed):
        return cls()

    def forward(self, x):
        return x.tanh()
'''


@pytest.fixture
def fresh_registry(monkeypatch):
    """The registry as on first use (built-ins registered again, plugins not yet loaded); restored afterwards."""
    registry = sys.modules[variants.register.__module__]
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    monkeypatch.setattr(registry, "_PLUGINS_LOADED", False)
    return registry


@pytest.fixture
def entry_points(monkeypatch, tmp_path):
    """Simulated installed distributions: ``entry_points(group="normswap.variants")`` returns the given ones."""
    found: list[metadata.EntryPoint] = []
    real = metadata.entry_points

    def fake(**kwargs):
        return list(found) if kwargs.get("group") == "normswap.variants" else real(**kwargs)

    monkeypatch.setattr(metadata, "entry_points", fake)
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "normswap_dummy_plugin.py").write_text(PLUGIN)
    monkeypatch.delitem(sys.modules, "normswap_dummy_plugin", raising=False)
    return found


def test_register_refuses_a_taken_name():
    uan = variants.get("uan")

    class Impostor(normswap.Variant):
        name = "uan"

    with pytest.raises(NormswapError) as err:
        normswap.register(Impostor)
    assert str(err.value) == f"variant name 'uan' is already registered by {uan.__module__}.{uan.__qualname__}"
    assert variants.get("uan") is uan
    assert normswap.register(uan) is uan  # the same class again is not a conflict

    class Nameless(normswap.Variant):
        pass

    with pytest.raises(NormswapError, match=r"^variant class .*Nameless has no 'name'$"):
        normswap.register(Nameless)


def test_an_entry_point_plugin_is_found_and_reported_without_examples(fresh_registry, entry_points):
    entry_points.append(metadata.EntryPoint("dummy", "normswap_dummy_plugin:Dummy", "normswap.variants"))
    assert "contract_dummy" in variants.names()
    assert variants.get("contract_dummy").__module__ == "normswap_dummy_plugin"
    result = normswap.convert(nn.Sequential(nn.Linear(3, 3), nn.Tanh()), to="contract_dummy", check=False)
    assert [s.name for s in result.plan.converted] == ["1"]  # usable like a built-in
    # the contract suite gets a case for it, and that case fails with a message saying why
    assert ("contract_dummy", None, __import__("torch").float32) in contract_cases()
    with pytest.raises(pytest.fail.Exception) as err:
        example("contract_dummy", None)
    assert str(err.value).startswith("variant 'contract_dummy' provides no examples(): the contract suite cannot "
                                     "test it")


def test_a_broken_plugin_warns_and_the_rest_works(fresh_registry, entry_points):
    entry_points.append(metadata.EntryPoint("broken", "no_such_module_xyz:Variant", "normswap.variants"))
    with pytest.warns(UserWarning, match=r"^normswap: could not load variant plugin 'broken': No module named "
                                         r"'no_such_module_xyz'$"):
        names = variants.names()
    assert {"uan", "patchnorm", "anact", "recenter", "rescale"} <= set(names)
    with pytest.raises(UnknownVariantError, match=r"^unknown variant 'brokn'; known variants: anact, "):
        variants.get("brokn")
