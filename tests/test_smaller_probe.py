"""The smaller verification probe (normswap/surgery/probes.py): tried first for an inferred image probe, it checks
the same claims (a broken site is still caught on it), and the full probe decides wherever the model does not run
at the smaller size or a site goes unreached."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normswap
from normswap.core.probe import ProbeInput
from normswap.errors import VerificationError
from normswap.surgery.probes import SMALL, smaller_probe
from normswap.variants.uan.variant import UANChannel

from conftest import randomize_bn

_UAN_FORWARD = UANChannel.forward


class Sized(nn.Module):
    """A conv net that says its input size (as torchvision's ViT and timm models do), so normswap infers a probe
    of ``image_size`` pixels; ``fixed``: it refuses any other size (as a ViT does); ``branch``: ``bn2`` runs only
    on inputs wider than SMALL pixels."""

    def __init__(self, image_size: int = 64, fixed: bool = False, branch: bool = False) -> None:
        super().__init__()
        self.image_size, self.fixed, self.branch = image_size, fixed, branch
        self.conv = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.bn2 = nn.BatchNorm2d(4) if branch else None
        self.head = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fixed and x.shape[-1] != self.image_size:
            raise ValueError(f"expected {self.image_size} pixels, got {x.shape[-1]}")
        y = torch.relu(self.bn(self.conv(x)))
        if self.branch and x.shape[-1] > SMALL:
            y = self.bn2(y)
        return self.head(y.mean(dim=(2, 3)))


def _sized(**kw) -> nn.Module:
    torch.manual_seed(0)
    return randomize_bn(Sized(**kw))


def test_smaller_probe_applies_to_large_image_batches_only():
    x = torch.randn(2, 3, 64, 48, dtype=torch.float64)
    small = smaller_probe(ProbeInput((x,)))
    assert small.args[0].shape == (2, 3, SMALL, SMALL) and small.args[0].dtype == torch.float64 and not small.kwargs
    assert smaller_probe(ProbeInput((torch.randn(2, 3, 8, 112, 112),))).args[0].shape == (2, 3, 8, SMALL, SMALL)
    for probe in (None, ProbeInput((torch.randn(2, 3, SMALL, SMALL),)), ProbeInput((torch.randn(2, 16),)),
                  ProbeInput((torch.randint(0, 9, (2, 3, 64, 64)),)), ProbeInput((), {"pixel_values": x}),
                  ProbeInput((x, x))):
        assert smaller_probe(probe) is None


def test_an_inferred_probe_is_verified_smaller_and_still_proven():
    model = _sized()
    result = normswap.convert(model, to="uan")
    rep = result.report
    assert rep.ok and rep.method == "site-local" and rep.end_to_end_derived
    assert rep.probe == f"(2, 3, {SMALL}, {SMALL}) float32" and rep.shrunk_from == "(2, 3, 64, 64) float32"
    assert "a smaller batch than the inferred (2, 3, 64, 64)" in rep.render()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():  # the claim holds at the full size too
        assert torch.equal(model(x), result.model.eval()(x))


def test_a_conversion_that_claims_no_exact_start_is_measured_on_the_full_probe():
    """PatchNorm at strength 1 claims nothing: the differences reported are figures of the model's behaviour, which
    depend on the input's size, so the inferred probe measures them (and the report matches an explicit one)."""
    model = _sized()
    rep = normswap.convert(model, to="patchnorm", strength=1.0).report
    assert rep.shrunk_from == "" and rep.probe == "(2, 3, 64, 64) float32"
    assert not any(s.claims_exact for s in rep.sites) and rep.end_to_end > 0
    given = normswap.convert(model, to="patchnorm", strength=1.0, example_inputs=torch.randn(2, 3, 64, 64)).report
    assert given.probe == rep.probe and given.shrunk_from == ""


def test_a_broken_site_is_caught_on_the_smaller_probe(monkeypatch):
    seen = []

    def off(self, x):
        seen.append(x.shape[-1])
        return _UAN_FORWARD(self, x) + 1e-3

    monkeypatch.setattr(UANChannel, "forward", off)
    with pytest.raises(VerificationError) as err:
        normswap.convert(_sized(), to="uan")
    rep = err.value.report
    assert [c.name for c in rep.failures] == ["bn"] and rep.shrunk_from and seen[0] == SMALL // 2
    assert set(seen) == {SMALL // 2}  # the failure on the smaller probe stands: the full one is not run


def test_a_model_that_does_not_run_smaller_is_verified_on_the_full_probe():
    rep = normswap.convert(_sized(fixed=True), to="uan").report
    assert rep.ok and rep.probe == "(2, 3, 64, 64) float32" and rep.shrunk_from == ""


def test_a_site_unreached_on_the_smaller_probe_sends_the_check_to_the_full_one(monkeypatch):
    sizes = []

    def watched(self, x):
        sizes.append(x.shape[-1])
        return _UAN_FORWARD(self, x)

    monkeypatch.setattr(UANChannel, "forward", watched)
    rep = normswap.convert(_sized(branch=True), to="uan").report
    assert rep.ok and rep.probe == "(2, 3, 64, 64) float32" and rep.shrunk_from == ""
    assert [c.name for c in rep.sites] == ["bn", "bn2"] and all(c.max_abs_diff == 0.0 for c in rep.sites)
    assert 32 in sizes  # bn2 ran, on the full probe (its input is 32 pixels wide there)


def test_given_probes_and_calibrating_variants_are_never_shrunk():
    x = torch.randn(2, 3, 64, 64)
    assert normswap.convert(_sized(), to="uan", example_inputs=x).report.probe == "(2, 3, 64, 64) float32"
    rep = normswap.convert(_sized(), to="anact").report  # the probe is ANAct's calibration batch
    assert rep.probe == "(2, 3, 64, 64) float32" and rep.shrunk_from == ""


def test_a_replacement_that_raises_on_the_smaller_probe_is_not_hidden_by_the_full_one(monkeypatch):
    """The original runs at 32 px, so an error of a replacement there is the conversion's, not the size's."""
    def fragile(self, x):
        if x.shape[-1] < SMALL:
            raise RuntimeError("replacement broken on small inputs")
        return _UAN_FORWARD(self, x)

    monkeypatch.setattr(UANChannel, "forward", fragile)
    with pytest.raises(RuntimeError, match="^replacement broken on small inputs$"):
        normswap.convert(_sized(), to="uan")


@pytest.mark.parametrize("broken", ["neighbour scaled", "hook on the site"])
def test_broken_preconditions_are_caught_on_the_smaller_probe(monkeypatch, broken):
    """The premises of the site-local proof are checked whatever the probe's size: where one fails, both models run
    end to end on the smaller probe, and the difference fails there."""
    from normswap.variants.uan.variant import UAN

    model = _sized()
    if broken == "neighbour scaled":
        def after_apply(cls, converted, site, module):  # a wrong rewrite: the site is exact, its neighbour changed
            with torch.no_grad():
                converted.conv.weight.mul_(1.01)

        monkeypatch.setattr(UAN, "after_apply", classmethod(after_apply))
    else:
        model.bn.register_forward_pre_hook(lambda m, args: (args[0] * 2,))  # part of the site's function
    with pytest.raises(VerificationError) as err:
        normswap.convert(model, to="uan")
    rep = err.value.report
    assert rep.method == "forward" and rep.local_skipped and not rep.ok
    assert rep.probe == f"(2, 3, {SMALL}, {SMALL}) float32" and rep.shrunk_from == "(2, 3, 64, 64) float32"
