"""``Variant.source_function`` for UAN: at strength 0 a site is its source norm, bit for bit, so the fidelity
report proves the converted model the original by inspection and does not run it (normswap/calibration/identity.py)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normswap
from normswap.calibration import report
from normswap.calibration.identity import same_function
from normswap.calibration.runner import run_calibration, set_strengths
from normswap.variants.uan import UAN, UANChannel, UANSample

from conftest import randomize_bn
from test_calibrate import batches, cnn
from test_eval_cache import _count_forwards, _figures


def _site(source: nn.Module, strength: float = 0.0) -> UAN:
    from normswap.core.plan import Site

    kind = UAN.classify(source)[0]
    site = Site(name="n", source_type="", variant="uan", config={"source_kind": kind, "strength": strength, "k": 3})
    return UAN.from_site(site, source, [])


def _sources() -> list[tuple[nn.Module, torch.Tensor]]:
    from torchvision.ops.misc import FrozenBatchNorm2d

    torch.manual_seed(0)
    frozen = FrozenBatchNorm2d(4, eps=1e-3)
    frozen.running_mean.normal_()
    frozen.weight.uniform_(0.5, 2)
    ln = nn.LayerNorm((3, 5), eps=1e-4)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 2)
        ln.bias.normal_()
    return [
        (randomize_bn(nn.BatchNorm1d(4)), torch.randn(6, 4)),
        (randomize_bn(nn.BatchNorm2d(4, momentum=None)), torch.randn(2, 4, 5, 5)),
        (randomize_bn(nn.BatchNorm2d(4, affine=False, eps=1e-3)), torch.randn(2, 4, 5, 5)),
        (randomize_bn(nn.BatchNorm3d(4)), torch.randn(2, 4, 3, 3, 3)),
        (frozen, torch.randn(2, 4, 5, 5)),
        (ln.eval(), torch.randn(2, 3, 5) * 3 + 1),
        (nn.LayerNorm(5, elementwise_affine=False).eval(), torch.randn(4, 5)),
        (nn.LayerNorm(5, bias=False).eval(), torch.randn(4, 5)),
    ]


@pytest.mark.parametrize("i", range(8))
def test_a_uan_site_at_strength_zero_is_its_source_bit_for_bit(i):
    source, x = _sources()[i]
    site = _site(source).eval()
    plain = site.source_function()
    assert plain is not None and type(plain) is type(source) and same_function(plain, source)
    own = site.state_dict(keep_vars=True)
    assert all(t is own[k] for k, t in plain.state_dict(keep_vars=True).items())  # its own tensors, not copies
    with torch.no_grad():
        assert torch.equal(site(x), source(x)) and torch.equal(plain(x), source(x))
    site.set_strength(0.5)
    assert site.source_function() is None  # the mixture: no such proof
    site.set_strength(0.0)
    site.calibration_begin()
    assert site.source_function() is None  # a calibrating forward also observes
    site.calibration_abort()
    twin = copy.deepcopy(source)
    twin.eps = 0.5  # another configuration: not the same function
    assert not same_function(site.source_function(), twin)


def test_no_proof_for_sources_whose_forward_is_more_than_the_call():
    timm = pytest.importorskip("timm")
    for source in (timm.layers.BatchNormAct2d(4), timm.layers.LayerNorm2d(4), timm.layers.LayerNorm(4)):
        assert _site(source.eval()).source_function() is None


def test_evaluate_does_not_run_a_uan_model_at_strength_zero_and_its_figures_stand(monkeypatch):
    r = normswap.convert(cnn(), to="uan", strength=1.0)
    run_calibration(r.model, r.plan, batches(3), reference=r.original)
    sites = [s.name for s in r.plan.converted]
    set_strengths(r.model, 0.0)
    assert not same_function(r.model, r.original) and same_function(r.model, r.original, sites)
    set_strengths(r.model, 1.0)
    ev = [(x, torch.arange(6) % 5) for x in batches(2, seed=7)]
    models = {"converted": r.model}
    calls, handle = _count_forwards(models)
    notes: list[str] = []
    try:
        fast = report.measure(r.original, models, r.plan, ev, [0.0, 0.5, 1.0], 1.0, notes=notes)
    finally:
        handle.remove()
    assert calls["converted"] == [1, 1, 5, 5, 6, 6]  # strengths 0.5 and 1 only
    assert len(notes) == 1 and notes[0].startswith("'converted' at strength 0 was not run: it provably computes")
    for cls in (UANChannel, UANSample):
        monkeypatch.setattr(cls, "source_function", lambda self: None)  # no proof: the forward runs
    calls, handle = _count_forwards(models)
    try:
        slow = report.measure(r.original, models, r.plan, ev, [0.0, 0.5, 1.0], 1.0)
    finally:
        handle.remove()
    assert calls["converted"] == [1, 1, 1, 5, 5, 5, 6, 6, 6]
    assert _figures(fast) == _figures(slow)  # every figure, bit for bit
    zero = [row for row in _figures(fast)[0] if row[1] == 0.0]
    assert [row[2:6] for row in zero] == [(1.0, pytest.approx(1.0), 0.0, 0.0)]


def test_normswap_evaluate_notes_the_skip(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "data.safetensors"
    save_file({"inputs": torch.randn(12, 3, 10, 10, generator=torch.Generator().manual_seed(3))}, str(path))
    r = normswap.convert(cnn(), to="uan", strength=0.5)
    rep = normswap.evaluate(r, str(path), original=r.original, eval_samples=12, batch_size=6)
    assert any(n.startswith("'converted' at strength 0 was not run") for n in rep.notes)
    assert rep.row("converted", 0.0).rel_error == 0.0 and rep.row("converted", 0.5) is not None


def _patchnorm_sites() -> list[tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    return [(nn.Linear(6, 4), torch.randn(3, 6)),
            (nn.Linear(6, 4, bias=False), torch.randn(2, 3, 6)),
            (nn.Conv2d(3, 4, 3, stride=2, padding=1), torch.randn(2, 3, 9, 9)),
            (nn.Conv2d(4, 4, 3, padding="same", groups=2, bias=False, padding_mode="reflect"), torch.randn(2, 4, 7, 7)),
            (nn.Conv1d(3, 5, 3, dilation=2, padding_mode="circular", padding=2), torch.randn(2, 3, 11)),
            (nn.Conv3d(2, 3, 2, padding="valid"), torch.randn(1, 2, 4, 4, 4))]


@pytest.mark.parametrize("i", range(6))
def test_an_unpaired_patchnorm_site_at_strength_zero_is_its_source(i):
    from normswap.variants.patchnorm import PatchNormConv, PatchNormLinear

    source, x = _patchnorm_sites()[i]
    source.eval()
    site = (PatchNormLinear.from_linear if isinstance(source, nn.Linear) else PatchNormConv.from_conv)(source).eval()
    plain = site.source_function()
    assert plain is not None and type(plain) is type(source) and same_function(plain, source)
    with torch.no_grad():
        assert torch.equal(site(x), source(x)) and torch.equal(plain(x), source(x))
    site.set_strength(0.5)
    assert site.source_function() is None


def test_a_folded_pair_has_no_such_proof():
    from normswap.variants.patchnorm import PatchNormConv

    conv, bn = nn.Conv2d(3, 4, 3), randomize_bn(nn.BatchNorm2d(4))
    assert PatchNormConv.from_conv(conv, bn).source_function() is None  # the fold is exact only to rounding
    timm = pytest.importorskip("timm")
    same = timm.layers.Conv2dSame(3, 4, 3, stride=2)
    assert PatchNormConv.from_conv(same, kind="conv_same").source_function() is None


def test_evaluate_skips_a_patchnorm_model_whose_sites_are_all_unpaired(monkeypatch):
    from normswap.variants.patchnorm import PatchNormConv, PatchNormLinear

    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 8), nn.ReLU(),
                        nn.Linear(8, 5)).eval()
    r = normswap.convert(mlp, to="patchnorm", targets=["0", "3", "5"], strength=1.0, example_inputs=batches(1)[0])
    assert {s.name for s in r.plan.converted} == {"0", "3", "5"} and all(not s.absorbs for s in r.plan.converted)
    ev = [(x, torch.arange(6) % 5) for x in batches(2, seed=7)]
    notes: list[str] = []
    fast = report.measure(r.original, {"converted": r.model}, r.plan, ev, [0.0, 1.0], 1.0, notes=notes)
    assert len(notes) == 1 and notes[0].startswith("'converted' at strength 0 was not run")
    for cls in (PatchNormLinear, PatchNormConv):
        monkeypatch.setattr(cls, "source_function", lambda self: None)
    slow = report.measure(r.original, {"converted": r.model}, r.plan, ev, [0.0, 1.0], 1.0)
    assert _figures(fast) == _figures(slow)
