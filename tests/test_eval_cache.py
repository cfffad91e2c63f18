"""The fidelity report runs no forward for rows that are provably identical (normswap/calibration/identity.py):
a model at strength 0 against its own copy at strength 0, or two models in the same state."""

from __future__ import annotations

import copy

import pytest
import torch

import normswap
from normswap.calibration import report
from normswap.calibration.identity import same_function
from normswap.calibration.runner import run_calibration, set_strengths

from test_calibrate import batches, cnn


def _count_forwards(models: dict[str, torch.nn.Module]):
    """Sample counts of each model's forwards, by a global hook (a hook on the model would make it differ)."""
    calls: dict[str, list[int]] = {label: [] for label in models}
    by_id = {id(m): label for label, m in models.items()}
    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, args: calls[by_id[id(m)]].append(args[0].shape[0]) if id(m) in by_id else None)
    return calls, handle


def _figures(result):
    rows, per_site, acc, n = result
    return [(r.model, r.strength, r.agreement, r.cosine, r.kl, r.rel_error, r.accuracy) for r in rows], per_site, acc, n


def test_same_function_is_a_proof_by_inspection():
    r = normswap.convert(cnn(), to="uan", strength=0.5)
    twin = copy.deepcopy(r.model)
    assert same_function(r.model, twin) and not same_function(r.original, r.model)
    set_strengths(twin, 0.0)
    assert not same_function(r.model, twin)  # another strength: another rho buffer
    set_strengths(r.model, 0.0)
    assert same_function(r.model, twin)
    with torch.no_grad():
        twin[1].mix_mean[0, 0] += 1e-7  # one parameter one ulp-ish away
    assert not same_function(r.model, twin)
    twin = copy.deepcopy(r.model)
    twin[1].eps = 1e-3  # configuration outside the state dict
    assert not same_function(r.model, twin)
    twin = copy.deepcopy(r.model)
    twin[0].register_forward_hook(lambda *a: None)
    assert not same_function(r.model, twin)


def test_rows_identical_to_the_reference_or_to_another_row_run_no_forward(monkeypatch):
    r = normswap.convert(cnn(), to="uan", strength=1.0)
    run_calibration(r.model, r.plan, batches(3), reference=r.original)
    own = copy.deepcopy(r.model)
    set_strengths(own, 0.0)  # what normswap eval compares with when the original is unknown
    same = copy.deepcopy(r.model)  # "before" and "after" in the same state
    ev = [(x, torch.arange(6) % 5) for x in batches(2, seed=7)]
    models = {"before": same, "after": r.model}
    calls, handle = _count_forwards(models)
    try:
        fast = report.measure(own, models, r.plan, ev, [0.0, 0.5, 1.0], 0.5)
    finally:
        handle.remove()
    assert calls["before"] == [1, 1, 5, 5, 6, 6] and calls["after"] == []  # strengths 0.5 and 1 on each slice
    monkeypatch.setattr(report, "_aliases", lambda *a: {})
    slow = report.measure(own, models, r.plan, ev, [0.0, 0.5, 1.0], 0.5)
    f, s = _figures(fast), _figures(slow)
    assert f[2:] == s[2:] and f[1].keys() == s[1].keys() == {"before", "after"}
    for label in f[1]:
        assert f[1][label] == pytest.approx(s[1][label], rel=1e-6) and all(v > 0 for v in f[1][label].values())
    assert f[0] == s[0]  # every figure, bit for bit: strength 0 is exactly the reference
    zero = [row for row in f[0] if row[1] == 0.0]
    assert [row[2:6] for row in zero] == [(1.0, pytest.approx(1.0), 0.0, 0.0)] * 2


class _Residual(torch.nn.Module):
    """``head(h + fc2(h))``, ``h = relu(fc1(x))``: one ANAct site, unfolded (it feeds a residual add)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.relu, self.fc2, self.head = (torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8),
                                                    torch.nn.Linear(8, 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.fc1(x))
        return self.head(h + self.fc2(h))


def test_a_converted_model_is_proven_the_original_through_its_sites():
    from normswap.variants.anact.examples import ResidualExample

    torch.manual_seed(0)
    x = torch.randn(8, 6)
    r = normswap.convert(_Residual().eval(), to="anact", example_inputs=x)
    site = r.model.relu
    assert not site.folded and site.source_function() is site.act
    sites = [s.name for s in r.plan.converted]
    assert not same_function(r.model, r.original)  # another class at the site
    assert same_function(r.model, r.original, sites)  # ... that says it computes the ReLU it replaced
    set_strengths(r.model, 0.5)
    assert site.source_function() is None and not same_function(r.model, r.original, sites)
    set_strengths(r.model, 0.0)
    twin = copy.deepcopy(r.model)
    with torch.no_grad():
        twin.fc2.weight[0, 0] += 1e-3  # fine-tuned outside the sites
    assert not same_function(twin, r.original, sites)
    twin = copy.deepcopy(r.model)
    twin.relu.register_forward_hook(lambda *a: None)  # a hook on the site module itself
    assert not same_function(twin, r.original, sites)
    twin = copy.deepcopy(r.model)
    twin.relu.act = torch.nn.ReLU6()  # the site computes something else
    assert not same_function(twin, r.original, sites)
    folded = normswap.convert(ResidualExample().eval(), to="anact", example_inputs=x)
    assert not same_function(folded.model, folded.original, [s.name for s in folded.plan.converted])


def test_the_model_at_strength_zero_proven_the_original_is_not_run(monkeypatch):
    torch.manual_seed(0)
    r = normswap.convert(_Residual().eval(), to="anact", example_inputs=torch.randn(8, 6))
    ev = [(torch.randn(6, 6), torch.arange(6) % 5) for _ in range(2)]
    models = {"converted": r.model}
    calls, handle = _count_forwards(models)
    notes: list[str] = []
    try:
        fast = report.measure(r.original, models, r.plan, ev, [0.0, 1.0], 1.0, notes=notes)
    finally:
        handle.remove()
    assert calls["converted"] == [1, 5, 6]  # strength 1 only (the first batch in slices: recorded sites)
    assert len(notes) == 1 and notes[0].startswith("'converted' at strength 0 was not run: it provably computes")
    monkeypatch.setattr(report, "_aliases", lambda *a, **k: {})
    slow = report.measure(r.original, models, r.plan, ev, [0.0, 1.0], 1.0)
    assert _figures(fast) == _figures(slow)  # every figure, bit for bit: the forward it stands for agrees
    zero = [row for row in _figures(fast)[0] if row[1] == 0.0]
    assert [row[2:6] for row in zero] == [(1.0, pytest.approx(1.0), 0.0, 0.0)]
