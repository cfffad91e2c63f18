"""normswap eval's measure (normswap/calibration/report.py): per-site figures in batch slices of bounded memory."""

from __future__ import annotations

import copy

import pytest
import torch

import normswap
from normswap.calibration import report
from normswap.calibration.runner import run_calibration

from test_calibrate import batches, cnn


def test_sliced_batches_give_the_same_figures_and_hold_bounded_activations(monkeypatch):
    r = normswap.convert(cnn(), to="patchnorm", strength=1.0)
    before = copy.deepcopy(r.model)
    run_calibration(r.model, r.plan, batches(3), reference=r.original)
    ev = [(x, torch.arange(6) % 5) for x in batches(2, seed=7)]
    models = {"before": before, "after": r.model}
    whole = report.measure(r.original, models, r.plan, ev, [0.0, 1.0], 1.0)
    sizes = []
    hook = r.original.register_forward_pre_hook(lambda _m, args: sizes.append(args[0].shape[0]))
    per_sample = 4 * (8 * 10 * 10 + 8 * 10 * 10 + 16)  # the three recorded BN outputs of one sample, float32
    monkeypatch.setattr(report, "RECORD_BUDGET", 2 * per_sample)  # two samples per slice
    sliced = report.measure(r.original, models, r.plan, ev, [0.0, 1.0], 1.0)
    hook.remove()
    assert sizes == [1, 2, 2, 1, 2, 2, 2]  # a first slice of one sample sizes the rest; every sample once
    assert whole[2] == sliced[2] and whole[3] == sliced[3] == 12
    for a, b in zip(whole[0], sliced[0]):
        assert (a.model, a.strength, a.agreement, a.accuracy) == (b.model, b.strength, b.agreement, b.accuracy)
        assert a.rel_error == pytest.approx(b.rel_error, rel=1e-4, abs=1e-7)
        assert a.cosine == pytest.approx(b.cosine, rel=1e-6)
    assert whole[1].keys() == sliced[1].keys()
    for label in whole[1]:
        assert whole[1][label] == pytest.approx(sliced[1][label], rel=1e-4)
        assert whole[1][label] and all(v > 0 for v in sliced[1][label].values())


def test_evaluate_streams_the_evaluation_batches(tmp_path, monkeypatch):
    from safetensors.torch import save_file

    from normswap.data import open_data

    r = normswap.convert(cnn(), to="anact", strength=0.5)
    path = tmp_path / "inputs.safetensors"
    save_file({"inputs": torch.randn(13, 3, 10, 10, generator=torch.Generator().manual_seed(2))}, str(path))
    split = open_data(str(path), r.original, calib_samples=1, eval_samples=12, seed=0)
    made, ahead = [], []
    real = split.batches

    def counted(part, batch_size=32, **kw):
        for b in real(part, batch_size, **kw):
            made.append(b[0].shape[0])
            yield b

    monkeypatch.setattr(split, "batches", counted)
    hook = r.original.register_forward_pre_hook(lambda _m, args: ahead.append(len(made)))
    rep = normswap.evaluate(r, split, original=r.original, eval_samples=12, batch_size=4)
    hook.remove()
    assert rep.samples == 12 and made == [1, 4, 4, 4]  # the one-sample data check, then the three batches
    # the reference's forwards on evaluation batch k see k batches made (plus the check's): the batches are read
    # as they are used, not all at once (which would show 4 everywhere)
    assert ahead[0] == 1 and set(ahead[1:]) == {2, 3, 4}
