"""The BatchNorm-decomposed ablations ``recenter`` and ``rescale``: exact start, the formulas at strength 1,
batch statistics in training mode (running statistics updated as BatchNorm does), save/load."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normswap
from normswap.variants import registry


def _bn(momentum=0.1, affine=True) -> nn.BatchNorm2d:
    torch.manual_seed(0)
    bn = nn.BatchNorm2d(5, momentum=momentum, affine=affine)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        if affine:
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return bn


def _convert(name: str, bn: nn.Module, strength: float) -> nn.Module:
    model = nn.Sequential(bn)
    x = torch.randn(4, 5, 3, 3)
    return normswap.convert(model.eval(), to=name, strength=strength, example_inputs=x).model[0]


@pytest.mark.parametrize("name", ["recenter", "rescale"])
def test_registered_and_exact_at_zero_in_train_mode(name):
    assert name in registry.names()
    bn = _bn(momentum=None)
    layer = _convert(name, copy.deepcopy(bn), 0.0)
    assert layer.claims_exact() and layer.current_strength() == 0.0
    bn.train(), layer.train()
    for i in range(3):
        x = torch.randn(6, 5, 4, 4) * (1 + i) + i
        assert torch.equal(layer(x), bn(x))
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        assert torch.equal(getattr(layer, key), getattr(bn, key)), key


def test_recenter_formula_eval_and_train():
    bn = _bn()
    layer = _convert("recenter", copy.deepcopy(bn), 1.0)
    assert not layer.claims_exact()
    x = torch.randn(6, 5, 4, 4) * 3 + 1
    w, b = bn.weight.view(1, -1, 1, 1), bn.bias.view(1, -1, 1, 1)
    with torch.no_grad():
        expect = (x - bn.running_mean.view(1, -1, 1, 1)) * w + b
        assert torch.allclose(layer(x), expect, atol=1e-6)
        layer.train()
        m = x.mean(dim=(0, 2, 3), keepdim=True)
        assert torch.allclose(layer(x), (x - m) * w + b, atol=1e-5)
        # the running statistics moved as BatchNorm's would
        ref = copy.deepcopy(bn).train()
        ref(x)
        assert torch.allclose(layer.running_mean, ref.running_mean, atol=1e-6)
        assert torch.allclose(layer.running_var, ref.running_var, atol=1e-5)
        assert int(layer.num_batches_tracked) == int(ref.num_batches_tracked) == 1
        # halfway: the straight line between BatchNorm and recentering
        layer.eval(), layer.set_strength(0.5)
        ref.eval()  # same running statistics as the layer now
        mid = 0.5 * ref(x) + 0.5 * ((x - layer.running_mean.view(1, -1, 1, 1)) * w + b)
        assert torch.allclose(layer(x), mid, atol=1e-5)


def test_rescale_formula_eval_and_train():
    bn = _bn(affine=False)
    layer = _convert("rescale", copy.deepcopy(bn), 1.0)
    x = torch.randn(6, 5, 4, 4) * 2 + 0.5
    with torch.no_grad():
        second = bn.running_var + bn.running_mean.square()
        expect = x / torch.sqrt(second.view(1, -1, 1, 1) + bn.eps)
        assert torch.allclose(layer(x), expect, atol=1e-6)
        layer.train()
        q = x.square().mean(dim=(0, 2, 3), keepdim=True)  # the batch's second moment, no centring
        assert torch.allclose(layer(x), x / torch.sqrt(q + bn.eps), atol=1e-5)
        layer.eval(), layer.set_strength(0.5)
        m, v = layer.running_mean.view(1, -1, 1, 1), layer.running_var.view(1, -1, 1, 1)
        expect = (x - 0.5 * m) / torch.sqrt(v + 0.25 * m.square() + bn.eps)
        assert torch.allclose(layer(x), expect, atol=1e-6)


@pytest.mark.parametrize("name", ["recenter", "rescale"])
def test_refuses_without_running_stats_and_roundtrips(name, tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, track_running_stats=False), nn.ReLU())
    plan = normswap.plan(model, to=name)
    assert not plan.converted and "track_running_stats=False" in plan.skipped[0].reason
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).eval()
    r = normswap.convert(model, to=name, strength=0.3, example_inputs=torch.randn(2, 3, 8, 8))
    loaded = normswap.load(r.save(tmp_path / "m.safetensors"), model=model)
    assert loaded[1].current_strength() == pytest.approx(0.3)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(loaded(x), r.model.eval()(x))
