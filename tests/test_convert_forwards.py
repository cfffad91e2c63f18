"""ANAct's conversion calibrates from the site inputs recorded in verification's forward of the original: two
forwards (the original's, recorded; the converted model's), not three, and the same calibrated model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normswap
from normswap.api import conversion
from normswap.calibration.runner import run_calibration
from normswap.errors import NormswapError
from normswap.variants.anact.examples import ResidualExample

from test_calibrate import batches, cnn
from test_eval_cache import _Residual


def _models() -> list[tuple[str, nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    return [("cnn", cnn(), torch.randn(4, 3, 10, 10)),  # in-place ReLUs, a BatchNorm1d consumer
            ("residual (folded)", ResidualExample().eval(), torch.randn(8, 6)),
            ("residual (unfolded)", _Residual().eval(), torch.randn(8, 6) * 2)]


def _forwards(model: nn.Module, x: torch.Tensor) -> tuple[int, object]:
    """How many whole-model forwards ``convert(model, "anact")`` runs (calls of a module of the model's class:
    the original or its converted copy), and the result."""
    calls = []
    handle = torch.nn.modules.module.register_module_forward_pre_hook(
        lambda m, a: calls.append(1) if type(m) is type(model) else None)
    try:
        result = normswap.convert(model, to="anact", example_inputs=x)
    finally:
        handle.remove()
    return len(calls), result


@pytest.mark.parametrize("i", range(3))
def test_anact_conversion_runs_two_forwards_and_calibrates_as_the_data_pass_did(i, monkeypatch):
    name, model, x = _models()[i]
    n, new = _forwards(model, x)
    monkeypatch.setattr(conversion, "_recording", lambda *a, **k: None)  # calibration runs the converted model
    n_old, old = _forwards(model, x)
    assert new.report.ok and old.report.ok and new.report.method == old.report.method
    assert (n, n_old) == ((1, 2) if name.endswith("(unfolded)") else (2, 3))  # unfolded: the site-local proof
    a, b = new.model.state_dict(), old.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name  # calibrated bit for bit alike
    assert [(s.name, s.max_abs_diff) for s in new.report.sites] == [(s.name, s.max_abs_diff) for s in old.report.sites]
    assert new.report.end_to_end == old.report.end_to_end
    sites = [s.name for s in new.plan.converted]
    assert any(float(new.model.get_submodule(s).running_mean.abs().max()) > 0 for s in sites)  # it did calibrate


def test_recorded_inputs_stand_for_a_data_pass_only():
    r = normswap.convert(cnn(), to="patchnorm", strength=1.0)
    with pytest.raises(NormswapError, match="^recorded site inputs stand for a data pass only"):
        run_calibration(r.model, r.plan, batches(1), site_inputs=[])
