"""Files written before the layout change (commit 3093c43, normswap 0.1.0) still load and compute the same.

``tests/data/v0.1-3093c43/`` holds one small model per built-in variant, converted from the variant's first
contract example, its parameters perturbed (so every tensor has to land in its place) and set to strength 0.5
(so the blend is exercised), saved by that commit; ``expected.safetensors`` holds the input and the output
that commit computed."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import normswap
from normswap.variants import registry

DATA = Path(__file__).parent / "data" / "v0.1-3093c43"
VARIANTS = ["uan", "patchnorm", "anact", "recenter", "rescale"]


@pytest.mark.parametrize("name", VARIANTS)
def test_file_from_before_the_layout_change_loads_and_matches(name):
    expected = load_file(DATA / "expected.safetensors")
    base, _ = registry.get(name).examples()[0]
    model = normswap.load(DATA / f"{name}.safetensors", base.eval()).eval()
    strengths = {m.current_strength() for m in model.modules() if isinstance(m, normswap.Variant)}
    assert strengths and all(abs(s - 0.5) < 1e-6 for s in strengths)
    with torch.no_grad():
        y = model(expected[f"{name}.x"])
    torch.testing.assert_close(y, expected[f"{name}.y"], rtol=1e-5, atol=1e-6)
