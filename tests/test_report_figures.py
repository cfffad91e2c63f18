"""The fidelity report's figures on planted logits whose answers are known by hand: top-1 agreement, the
top-5 overlap, agreement on confidently classified samples (and their count), and outputs holding NaN or inf
(left out and said, never a perfect match); NaN in the original's weights is reported as such."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file
from torch import nn

import normswap
from normswap.cli.main import cli
from normswap.data import DataSplit, LazyDataset
from normswap.errors import WeightsError

C = 10
# per sample: the original's class order (best first), whether it is confident, the model's class order
PLANT = [
    ([0, 1, 2, 3, 4, 5, 6, 7, 8, 9], True, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]),  # same top 1, top-5 overlap 5/5
    ([1, 2, 3, 4, 5, 0, 6, 7, 8, 9], True, [1, 2, 3, 9, 8, 7, 6, 5, 4, 0]),  # same top 1, overlap 3/5
    ([2, 3, 4, 5, 6, 0, 1, 7, 8, 9], True, [2, 0, 1, 7, 8, 9, 3, 4, 5, 6]),  # same top 1, overlap 1/5
    ([3, 4, 5, 6, 7, 0, 1, 2, 8, 9], True, [4, 3, 5, 6, 7, 0, 1, 2, 8, 9]),  # other top 1, overlap 5/5
    ([4, 5, 6, 7, 8, 0, 1, 2, 3, 9], False, [4, 5, 6, 7, 9, 0, 1, 2, 3, 8]),  # same top 1, overlap 4/5
    ([5, 6, 7, 8, 9, 0, 1, 2, 3, 4], False, [5, 0, 1, 2, 3, 4, 6, 7, 8, 9]),  # same top 1, overlap 1/5
    ([6, 7, 8, 9, 0, 1, 2, 3, 4, 5], False, [7, 6, 8, 9, 0, 1, 2, 3, 4, 5]),  # other top 1, overlap 5/5
    ([7, 8, 9, 0, 1, 2, 3, 4, 5, 6], False, [2, 3, 4, 5, 6, 0, 1, 7, 8, 9]),  # other top 1, overlap 0/5
]
OVERLAP = (5 + 3 + 1 + 5 + 4 + 1 + 5 + 0) / 5 / 8
AGREEMENT = 5 / 8
CONFIDENT_AGREEMENT, CONFIDENT = 3 / 4, 4


def _logits(order: list[int], confident: bool) -> torch.Tensor:
    row = torch.empty(C)
    for rank, cls in enumerate(order):
        row[cls] = -0.01 * rank if confident and rank else 0.1 * (C - rank)
    if confident:
        row[order[0]] = 10.0  # softmax max ~ 0.9995
    return row


def _lookup(table: torch.Tensor) -> nn.Module:
    """A one-hot input picks row i of ``table``; an identity BatchNorm1d in front gives UAN a site."""
    n = table.shape[0]
    bn = nn.BatchNorm1d(n)
    with torch.no_grad():
        bn.running_var.fill_(1.0 - bn.eps)  # sqrt(var + eps) == 1 exactly: the identity
    fc = nn.Linear(n, C, bias=False)
    with torch.no_grad():
        fc.weight.copy_(table.T)
    return nn.Sequential(bn, fc).eval()


class _NaNWhereTop(nn.Module):
    """NaN logits for the samples whose top class is in ``classes``."""

    def __init__(self, classes: set[int]) -> None:
        super().__init__()
        self.classes = sorted(classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bad = torch.isin(x.argmax(1), torch.tensor(self.classes))
        return torch.where(bad[:, None], torch.full_like(x, float("nan")), x)


def _split(n: int) -> DataSplit:
    ds = LazyDataset(n, lambda i: (torch.eye(n)[i], -1))
    return DataSplit("planted", False, False, ds, ds, 0, "every sample in both parts")


@pytest.fixture
def planted():
    ref = torch.stack([_logits(o, c) for o, c, _ in PLANT])
    out = torch.stack([_logits(m, c) for _, c, m in PLANT])
    original = _lookup(ref)
    result = normswap.convert(_lookup(ref), to="uan", example_inputs=torch.eye(len(PLANT))[:2])
    with torch.no_grad():
        result.model[1].weight.copy_(out.T)  # the "converted" model now answers the planted rows
    assert float((torch.softmax(ref, 1).amax(1) > 0.5).sum()) == CONFIDENT
    return result, original


def test_planted_figures(planted):
    result, original = planted
    rep = normswap.evaluate(result, _split(len(PLANT)), original=original, strengths=[0.0])
    row = rep.row("converted", 0.0)
    assert row.agreement == pytest.approx(AGREEMENT, abs=1e-12)
    assert row.top5_overlap == pytest.approx(OVERLAP, abs=1e-12)
    assert row.confident == CONFIDENT
    assert row.confident_agreement == pytest.approx(CONFIDENT_AGREEMENT, abs=1e-12)
    assert row.nonfinite == 0
    d = rep.to_dict()["rows"][0]
    assert (d["top5_overlap"], d["confident"], d["confident_agreement"]) == (row.top5_overlap, 4, 0.75)
    text = rep.render()
    assert "top-5 overlap" in text and "agree p>0.5" in text and "75.0% (4)" in text
    assert f"{100 * OVERLAP:.1f}%" in text


def test_the_original_against_itself_is_a_perfect_match(planted):
    result, original = planted
    rep = normswap.evaluate(result, _split(len(PLANT)), original=result.model, strengths=[0.0])
    row = rep.row("converted", 0.0)
    assert (row.agreement, row.top5_overlap, row.confident_agreement, row.confident) == (1.0, 1.0, 1.0, 4)


def test_nonfinite_outputs_are_left_out_and_said(planted):
    result, original = planted
    result.model.append(_NaNWhereTop({5, 7}))  # samples 5 and 6: NaN logits
    rep = normswap.evaluate(result, _split(len(PLANT)), original=original, strengths=[0.0])
    row = rep.row("converted", 0.0)
    assert row.nonfinite == 2
    assert row.agreement == pytest.approx(4 / 6)  # of samples 0-4 and 7: 0, 1, 2, 4 agree
    assert (row.confident, row.confident_agreement) == (CONFIDENT, CONFIDENT_AGREEMENT)  # 0-3 are all finite
    assert rep.notes == ["'converted' at strength 0: 2 of 8 outputs hold NaN or inf, left out of that row's figures"]
    assert "non-finite" in rep.render()
    with torch.no_grad():
        result.model[1].weight.fill_(float("nan"))
    rep = normswap.evaluate(result, _split(len(PLANT)), original=original, strengths=[0.0])
    row = rep.row("converted", 0.0)
    assert (row.agreement, row.cosine, row.kl, row.rel_error, row.top5_overlap, row.nonfinite) == \
        (None, None, None, None, None, 8)
    assert rep.notes[-1].endswith("(no figure is defined)")
    assert "100.0%" not in rep.render()


def test_nonfinite_reference_is_named(planted):
    result, original = planted
    with torch.no_grad():
        original[0].running_mean[2] = float("nan")
    rep = normswap.evaluate(result, _split(len(PLANT)), original=original, strengths=[0.0])
    assert rep.notes[0] == ("the reference's outputs hold NaN or inf on 8 of 8 samples, left out of every figure "
                            "(the reference's weights hold NaN or infinite values (0.running_mean: 1 value))")
    row = rep.row("converted", 0.0)  # the model's outputs are finite; nothing is left to compare them with
    assert row.nonfinite == 0 and row.agreement is None and row.rel_error is None


def test_nan_in_the_original_weights_is_not_a_failed_conversion():
    model = _lookup(torch.randn(4, C))
    with torch.no_grad():
        model[0].running_var[1] = float("nan")
    with pytest.raises(WeightsError) as err:
        normswap.convert(model, to="uan", example_inputs=torch.eye(4))
    assert str(err.value) == ("the original model's weights hold NaN or infinite values (0.running_var: 1 value); its "
                              "outputs are not finite, so no conversion of it can be verified: fix or reload its "
                              "weights")


MODELS = """
import torch
from torch import nn

def cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(4, 10)).eval()
"""


def test_eval_json_has_the_new_figures(tmp_path):
    (tmp_path / "models.py").write_text(MODELS)
    data, ckpt = tmp_path / "d.safetensors", tmp_path / "cnn.safetensors"
    save_file({"inputs": torch.randn(6, 3, 16, 16, generator=torch.Generator().manual_seed(0))}, str(data))
    res = CliRunner().invoke(cli, ["convert", f"{tmp_path / 'models.py'}:cnn", "--to", "uan", "-o", str(ckpt)])
    assert res.exit_code == 0, res.output
    res = CliRunner().invoke(cli, ["eval", str(ckpt), "--data", str(data), "--json", "--strengths", "0,1",
                                   "--trust-source"])
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)["report"]["rows"]
    assert {"top5_overlap", "confident_agreement", "confident", "nonfinite"} <= set(rows[0])
    assert rows[0]["top5_overlap"] == 1.0 and rows[0]["nonfinite"] == 0 and rows[0]["confident"] >= 0
    assert 0.0 <= rows[1]["top5_overlap"] <= 1.0
