"""Any floating dtype: probes, verification tolerances and saved files follow the model's dtype (CPU here;
the same code paths take the model's device, and a GPU run repeats the float16 / bfloat16 cases there)."""

from __future__ import annotations

import pytest
import torch

import normswap
from normswap.sources.inputs import example_input, model_float
from normswap.surgery.verify import DEFAULT_RTOL, DTYPE_ULPS

from conftest import SmallCNN, randomize_bn

DTYPES = [torch.float64, torch.bfloat16, torch.float16]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _model(dtype: torch.dtype, device: str = "cpu") -> torch.nn.Module:
    torch.manual_seed(0)
    return randomize_bn(SmallCNN()).to(device=device, dtype=dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", ["uan", "patchnorm", "anact"])
def test_convert_follows_the_model_dtype(variant, dtype, device):
    model = _model(dtype, device)
    probe = example_input(model)
    assert probe.args[0].dtype == dtype and probe.args[0].device.type == device
    result = normswap.convert(model, to=variant)  # float32 probes made float64 models a raw traceback
    report = result.report
    rtol = max(DEFAULT_RTOL, DTYPE_ULPS * torch.finfo(dtype).eps)
    assert report.ok and str(dtype).replace("torch.", "") in report.probe
    assert report.end_to_end_tolerance >= rtol and report.end_to_end <= report.end_to_end_tolerance
    assert all(s.tolerance >= rtol for s in report.sites if s.tolerance is not None)
    if dtype == torch.float64:  # computed in float64 throughout, not in float32: far below float32's precision
        assert report.end_to_end < 1e-12 and max(s.max_abs_diff for s in report.sites) < 1e-12
    with torch.no_grad():
        out = result.model(probe.args[0])
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_low_precision_tolerance_is_eps_scaled_and_still_catches_a_broken_claim():
    from normswap.surgery.verify import verify

    model = _model(torch.bfloat16)
    result = normswap.convert(model, to="uan")
    broken = result.model
    with torch.no_grad():
        next(p for p in broken.stem[1].parameters()).add_(0.5)  # a real change, far above bfloat16 rounding
    report = verify(model, broken, result.plan, example_input(model))
    assert not report.ok and report.failures[0].name == "stem.1"
    assert report.failures[0].max_abs_diff > report.failures[0].tolerance >= DTYPE_ULPS * torch.finfo(torch.bfloat16).eps


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16], ids=str)
def test_saved_files_keep_the_dtype(dtype, tmp_path):
    model = _model(dtype)
    path = normswap.convert(model, to="uan").save(tmp_path / "m.safetensors")
    loaded = normswap.load(path, model=_model(torch.float32))  # a float32 base: the file's dtypes win
    assert model_float(loaded)[0] == dtype
    state = normswap.load(path, model=_model(torch.float32)).state_dict()
    assert all(torch.equal(state[k], v) for k, v in normswap.convert(model, to="uan").model.state_dict().items())


def test_model_float_defaults():
    assert model_float(torch.nn.ReLU()) == (torch.float32, torch.device("cpu"))
    ids = example_input(torch.nn.Sequential(torch.nn.Embedding(10, 4)).to(torch.float64)).args[0]
    assert ids.dtype == torch.long  # token ids stay integers
