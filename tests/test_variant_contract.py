"""One contract suite over every registered variant: a new variant is tested with no new test code.

For each model a variant's ``examples()`` returns: the conversion at strength 0 is exact (verified
per site), shapes/dtypes are kept, the converted model traces with torch.fx, a rebuilt-and-loaded
copy is identical, strength is settable on every converted module, and torch.compile runs (slow)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import fx

import normswap
from normswap.variants import registry
from normswap.variants.base import Variant

CASES = [(name, i) for name in registry.names() for i in range(len(registry.get(name).examples()))]


def _case(name: str, i: int):
    torch.manual_seed(i)
    model, x = registry.get(name).examples()[i]
    return model.eval(), x


@pytest.mark.parametrize("name, i", CASES)
def test_contract(name, i, tmp_path):
    model, x = _case(name, i)
    cls = registry.get(name)
    assert cls.examples(), f"variant {name} provides no examples"
    result = normswap.convert(model, to=name, targets=None, example_inputs=x)
    assert result.report.ok and result.plan.converted
    converted = result.model
    modules = [converted.get_submodule(s.name) for s in result.plan.converted]
    assert all(isinstance(m, Variant) and m.claims_exact() for m in modules)
    with torch.no_grad():
        ref, out = model(x), converted(x)
    assert out.shape == ref.shape and out.dtype == ref.dtype
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)
    # fx-traceable, at strength 0 and 1
    for strength in (0.0, 1.0):
        for m in modules:
            m.set_strength(strength)
        gm = fx.symbolic_trace(converted)
        with torch.no_grad():
            assert torch.allclose(gm(x), converted(x), atol=1e-6)
    # deterministic: two conversions give identical state
    again = normswap.convert(model, to=name, example_inputs=x, strength=1.0).model
    for m in modules:
        m.set_strength(1.0)
    a, b = converted.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # save -> load identical, strength included
    path = normswap.save(converted, tmp_path / "m.safetensors", plan=result.plan)
    loaded = normswap.load(path, model=model)
    with torch.no_grad():
        assert torch.equal(loaded(x), converted.eval()(x))
    # device/dtype kept
    p = next(iter(modules[0].parameters()), None)
    if p is not None:
        assert p.dtype == torch.float32


@pytest.mark.slow
@pytest.mark.parametrize("name", registry.names())
def test_torch_compile_smoke(name):
    model, x = _case(name, 0)
    converted = normswap.convert(model, to=name, example_inputs=x, strength=0.5).model
    compiled = torch.compile(copy.deepcopy(converted))
    with torch.no_grad():
        assert torch.allclose(compiled(x), converted(x), atol=1e-5, rtol=1e-5)
