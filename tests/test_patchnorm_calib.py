"""PatchNorm calibration's cheaper bookkeeping: the observer's terms with and without the lam-0 source, the
least-squares sums on float32 activations far from zero, the streaming pass's own execution order, and a failed
calibration restoring exactly what calibration writes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normswap
from normswap.calibration.runner import _calibrated_state, execution_order, run_calibration
from normswap.core.probe import ProbeInput
from normswap.variants.patchnorm.calib import lsq_accumulate, lsq_solve
from normswap.variants.patchnorm.variant import PatchNormConv, PatchNormLinear
from tests.test_patchnorm import D, FORMS, _perturb


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("bias", [True, False])
def test_terms_without_the_source_equal_the_terms_with_it(form, bias):
    torch.manual_seed(0)
    conv = PatchNormConv(4, 6, 3, padding=1, groups=2, bias=bias, form=form, dtype=D)
    for m, x in ((conv, torch.randn(2, 4, 7, 7, dtype=D)),
                 (PatchNormLinear(5, 3, bias=bias, form=form, dtype=D), torch.randn(4, 5, dtype=D))):
        with torch.no_grad():
            w, base, source, n2 = m._calib_terms(x, 0.7)
            w2, base2, none, n2b = m._calib_terms(x, 0.7, source=False)
        m.set_strength(0.0)
        with torch.no_grad():
            plain = m(x)  # the lam-0 layer: the source
        assert none is None and torch.equal(w, w2) and torch.equal(n2, n2b)
        assert torch.allclose(source, plain, atol=1e-12)
        assert (base is None) == (form == "corrected" or not bias)
        if base is not None:  # the layer at strength t is g k w + base: the normaliser forms' bias
            assert torch.equal(base, base2) and torch.allclose(source - base, source - m.bias.view(base.shape))


def test_least_squares_sums_keep_float64_accuracy_on_float32_far_from_zero(kernels):
    """A regressor whose mean is 1000 times its spread, over batches whose means differ: the float32 sums
    (centred per batch) give the slope and intercept of the float64 fit."""
    g = torch.Generator().manual_seed(0)
    ws = [1000 + 3 * b + torch.randn(8, 3, 5, 5, generator=g, dtype=D) for b in range(4)]
    rs = [0.7 * w - 650 + 0.1 * torch.randn(w.shape, generator=g, dtype=D) for w in ws]
    acc32: dict = {}
    for w, r in zip(ws, rs):
        lsq_accumulate(acc32, w.float(), r.float(), 1)
    w64, r64 = torch.cat(ws).transpose(0, 1).reshape(3, -1), torch.cat(rs).transpose(0, 1).reshape(3, -1)
    slope = ((w64 - w64.mean(1, keepdim=True)) * (r64 - r64.mean(1, keepdim=True))).sum(1) / \
        (w64 - w64.mean(1, keepdim=True)).square().sum(1)
    intercept = r64.mean(1) - slope * w64.mean(1)
    g32, o32, live = lsq_solve(acc32, True)
    assert live.all()
    assert torch.allclose(g32, slope, rtol=1e-4) and torch.allclose(o32, intercept, rtol=1e-4, atol=0.05)


class _TwoPairs(nn.Module):
    """Two conv -> BN pairs registered in one order and called in the other."""

    def __init__(self) -> None:
        super().__init__()
        self.late = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.early = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.late(torch.relu(self.early(x)))


def _converted():
    torch.manual_seed(0)
    model = _TwoPairs().eval()
    for bn in (model.early[1], model.late[1]):
        with torch.no_grad():
            bn.running_mean.normal_(0, 0.3)
            bn.running_var.uniform_(0.5, 2)
    return normswap.convert(model, to="patchnorm", strength=1.0, example_inputs=torch.randn(2, 3, 8, 8))


def test_streaming_records_the_execution_order_in_its_first_pass():
    r = _converted()
    data = [torch.randn(3, 3, 8, 8) for _ in range(2)]
    names = [s.name for s in r.plan.converted]
    want = execution_order(r.model, names, ProbeInput((data[0],)))
    assert want == ["early.0", "late.0"]
    log = run_calibration(r.model, r.plan, data, reference=r.original)
    assert list(log.sites) == want
    assert all("streaming" in log.sites[n]["method"] for n in want)


def test_failed_calibration_restores_every_state_entry_and_copies_only_calibrated_ones(monkeypatch):
    r = _converted()
    early, late = r.model.get_submodule("early.0"), r.model.get_submodule("late.0")
    _perturb(late)
    before = {n: {k: v.clone() for k, v in m.state_dict().items()} for n, m in (("early", early), ("late", late))}
    assert set(_calibrated_state(early)) == {"gain", "n2_mean", "n2_batches"}  # no conv weight copied
    weight = early.weight

    def fails(*args, **kwargs):
        raise RuntimeError("the second layer's fit failed")

    monkeypatch.setattr(late, "observe", fails)  # the first layer has observed and re-solved its gains by then
    with pytest.raises(RuntimeError, match="second layer"):
        run_calibration(r.model, r.plan, [torch.randn(3, 3, 8, 8)], reference=r.original)
    for name, m in (("early", early), ("late", late)):
        state = m.state_dict()
        assert state.keys() == before[name].keys()
        for k, v in before[name].items():
            assert torch.equal(state[k], v), (name, k)
    assert early.weight is weight and early.current_strength() == 1.0


@pytest.mark.parametrize("form", FORMS)
def test_factor_without_autograd_is_bitwise_the_autograd_one(form):
    m = PatchNormConv(2, 2, 3, form=form)
    n2 = torch.rand(2, 1, 5, 5) * 100
    for lam in (1.0, 0.3, torch.tensor(0.6)):
        with_grad = m._factor(n2, lam)
        with torch.no_grad():
            assert torch.equal(m._factor(n2, lam), with_grad), (form, lam)
