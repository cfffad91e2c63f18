"""The native calibration sums (normswap/native/csrc/calib_sums.cpp) against the eager paths they replace:
ANAct's block_sums (normswap/variants/anact/stats.py) and PatchNorm's lsq_accumulate
(normswap/variants/patchnorm/calib.py): float64 inputs to 1e-12, float32 to about 1e-6 of each sum's scale, the
same bits at any thread count, and whole calibrations equal with the kernels on and off."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import normswap.native as native
from normswap.variants.anact import stats
from normswap.variants.patchnorm.calib import lsq_accumulate
from test_native import require_library


@pytest.fixture
def library():
    """The native operators, required and switched on (whatever ``NORMSWAP_NATIVE`` says) for the test."""
    require_library()
    native.set_enabled(True)
    yield native.ops()
    native.set_enabled(None)


def _sums(fn, on: bool):
    native.set_enabled(on)
    try:
        return fn()
    finally:
        native.set_enabled(None)


def _reference(kind, params, x, channels, shift):
    """The sums of :func:`stats.block_sums` with ``f``, ``f'`` and ``d`` computed in ``x``'s dtype as the eager path
    does, then every value and product summed in float64; and each sum's scale (the same sums of absolute values:
    the sum of ``d`` is near 0 by construction)."""
    f = stats.apply_activation(kind, params, x).double()
    fp = stats.derivative(kind, params, x).double()
    sh = shift.to(x.dtype).reshape(1, -1, *([1] * (x.dim() - 2))) if channels else shift.to(x.dtype).reshape(())
    d = (x - sh).double()
    dims = [i for i in range(x.dim()) if i != 1] if channels else list(range(x.dim()))
    terms = (d, d.square(), f, f.square(), fp.square())
    return torch.stack([t.sum(dims) for t in terms]), torch.stack([t.abs().sum(dims) for t in terms])


KINDS = [(k, {"negative_slope": 0.2} if k == "leaky_relu" else {}) for k in stats.NATIVE_KINDS]


@pytest.mark.parametrize("kind, params", KINDS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("channels", [24, None])
def test_anact_sums_equal_the_eager_sums(library, kind, params, dtype, channels):
    """float64: native = eager within 1e-12 of each sum's scale. float32: the native sums are float64 sums of the
    float32 values (within 2e-7 of that reference: a few ulps where f is a transcendental), the eager ones float32
    cascades (within 5e-6 of it)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 24, 11, 13, generator=g, dtype=dtype) * 3 + 0.5  # planes of 143: vector tails
    x[0, 0, 0, :6] = torch.tensor([0.0, 6.0, 3.0, -3.0, 0.0, 6.0], dtype=dtype)  # the kinks
    eager = _sums(lambda: stats.block_sums(kind, params, x, channels, None), False)
    fast = _sums(lambda: stats.block_sums(kind, params, x, channels, None), True)
    assert torch.equal(eager[0], fast[0]) and eager[2] == fast[2]  # the shift and the count
    assert fast[1].shape == eager[1].shape and fast[1].dtype == torch.float64
    ref, scale = _reference(kind, params, x, channels, fast[0])
    rel = lambda a, b: float(((a - b).abs() / scale.clamp_min(1e-300)).max())  # noqa: E731
    if dtype == torch.float64:
        assert rel(fast[1], eager[1]) <= 1e-12
        assert rel(fast[1], ref) <= 1e-12
    else:
        assert rel(fast[1], ref) <= 2e-7, rel(fast[1], ref)
        assert rel(eager[1], ref) <= 5e-6
    assert float(scale[4].min()) > 0  # f' is not identically 0: a wrong f' at the kinks would show


@pytest.mark.parametrize("channels", [16, None])
def test_anact_sums_do_not_depend_on_the_thread_count(library, channels):
    x = torch.randn(3, 16, 70, 90)  # flat: 302,400 values, five planes
    old = torch.get_num_threads()
    try:
        out = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            shift = torch.full((channels or 1, 1) if channels else (1,), 0.25, dtype=torch.float64)
            out.append(stats.block_sums("silu", {}, x, channels, shift)[1])
    finally:
        torch.set_num_threads(old)
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])


def test_anact_sums_fall_back_where_there_is_no_kernel(library, monkeypatch):
    x = torch.randn(2, 4, 5, 5)
    calls = []
    real = library.anact_sums
    spy = SimpleNamespace(anact_sums=lambda *a: calls.append(a) or real(*a))
    monkeypatch.setattr(stats, "native_ops", lambda: spy)
    stats.block_sums("mish", {}, x, 4, None)  # no native mish
    stats.block_sums("relu", {}, x.transpose(2, 3), 4, None)  # strided
    stats.block_sums("relu", {}, x.half(), 4, None)  # float16
    assert calls == []
    stats.block_sums("relu", {}, x, 4, None)
    assert len(calls) == 1


def _lsq(w, r, base, on):
    acc: dict = {}
    _sums(lambda: lsq_accumulate(acc, w, r, 1, base), on)
    return acc


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 1e-6)])
@pytest.mark.parametrize("base", ["none", "bias", "full"])
def test_lsq_sums_equal_the_eager_sums(library, dtype, tol, base):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(4, 12, 9, 7, generator=g, dtype=dtype) + 2.0
    r = 0.7 * w + torch.randn(w.shape, generator=g, dtype=dtype) + 5.0
    b = {"none": None, "bias": torch.randn(12, generator=g, dtype=dtype).view(-1, 1, 1),
         "full": torch.randn(w.shape, generator=g, dtype=dtype)}[base]
    eager, fast = _lsq(w, r, b, False), _lsq(w, r, b, True)
    assert eager["n"] == fast["n"] == 4 * 9 * 7
    wd, rd = w.double(), (r - b if b is not None else r).double()
    scale = {"ww": wd.square().sum((0, 2, 3)), "wr": (wd * rd).abs().sum((0, 2, 3)),
             "w": wd.abs().sum((0, 2, 3)), "r": rd.abs().sum((0, 2, 3))}
    for key, s in scale.items():
        assert float(((fast[key] - eager[key]).abs() / s).max()) <= tol, key


def test_lsq_sums_do_not_depend_on_the_thread_count(library):
    w, r = torch.randn(8, 32, 20, 20), torch.randn(8, 32, 20, 20)
    old = torch.get_num_threads()
    try:
        out = []
        for t in (1, 2):
            torch.set_num_threads(t)
            out.append(_lsq(w, r, None, True))
    finally:
        torch.set_num_threads(old)
    for key in ("ww", "wr", "w", "r"):
        assert torch.equal(out[0][key], out[1][key])


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(),
                        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.BatchNorm2d(8), nn.SiLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    net.train()
    with torch.no_grad():
        net(torch.randn(16, 3, 12, 12))
    return net.eval()


@pytest.mark.parametrize("variant, strength", [("anact", 0.0), ("patchnorm", 1.0)])
def test_calibration_with_the_kernels_equals_the_eager_one(library, variant, strength, tmp_path):
    import normswap
    from safetensors.torch import save_file

    base = _net()
    data = tmp_path / "x.safetensors"
    save_file({"inputs": torch.randn(24, 3, 12, 12)}, str(data))
    states = []
    for on in (False, True):
        r = normswap.convert(base, to=variant, strength=strength, example_inputs=torch.randn(2, 3, 12, 12))
        _sums(lambda r=r: normswap.calibrate(r, str(data), original=base, calib_samples=24, batch_size=8,
                                             evaluate=False), on)
        states.append(r.model.state_dict())
    moved = [k for k in states[0] if states[0][k].is_floating_point()]
    assert moved
    for k in moved:
        torch.testing.assert_close(states[1][k], states[0][k], rtol=2e-5, atol=1e-6, msg=k)


@pytest.mark.parametrize("shape, dtype", [((3, 5, 7, 9), torch.float32), ((70001,), torch.float64), ((0, 4), torch.float32),
                                          ((2, 1 << 17), torch.float32)])
def test_diff_sums_are_the_float64_sums_of_the_exact_difference_at_any_thread_count(library, shape, dtype):
    """evaluate's per-site sums (normswap/calibration/site_errors.py): sum (a - b)^2 and sum b^2 of the values
    converted exactly, to float64 rounding; the same bits on one thread and two (planes of fixed size)."""
    g = torch.Generator().manual_seed(4)
    a = torch.randn(shape, generator=g, dtype=dtype)
    b = (a + 1e-3 * torch.randn(shape, generator=g, dtype=dtype)).to(dtype)
    want = torch.stack([(a.double() - b.double()).square().sum(), b.double().square().sum()])
    old = torch.get_num_threads()
    got = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            got.append(library.diff_sums(a, b))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(got[0], got[1])
    torch.testing.assert_close(got[0], want, rtol=1e-12, atol=0)
    with pytest.raises(RuntimeError, match="b must match a"):
        library.diff_sums(a, b.reshape(-1)[:max(0, b.numel() - 1)])


def test_per_site_errors_with_the_kernel_equal_the_eager_ones(library):
    """The fidelity report's per-site table with the native sums and with torch's float32 norms: the same figures
    to float32 rounding, and exactly 0 at a site equal to the reference."""
    import normswap
    from normswap.calibration.report import measure
    from test_calibrate import batches, cnn

    r = normswap.convert(cnn(), to="uan", strength=0.5)
    ev = [(x, None) for x in batches(2, seed=3)]
    tables = [_sums(lambda: measure(r.original, {"m": r.model}, r.plan, ev, [0.5], 0.5)[1], on) for on in (False, True)]
    eager, fast = tables[0]["m"], tables[1]["m"]
    assert eager.keys() == fast.keys() and eager
    for site in eager:
        assert fast[site] == pytest.approx(eager[site], rel=1e-5, abs=1e-7) and fast[site] > 0
    zero = [_sums(lambda: measure(r.original, {"m": r.model}, r.plan, ev, [0.0], 0.0)[1], on) for on in (False, True)]
    assert all(v == 0.0 for t in zero for v in t["m"].values())
