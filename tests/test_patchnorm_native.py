"""PatchNorm's native inference kernels (normswap/native/csrc/patchnorm_*.cpp, normswap/variants/patchnorm/
native_path.py): on every geometry they take, the layer's output with the library on equals the eager path's
(native off) and the unfold reference (float64 tight, float32 to rounding), for every form, with and without
bias and post term; the geometries and inputs they leave alone fall back to the eager path; the result does not
depend on the thread count."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

import normswap.native as native
from normswap.variants.patchnorm import fast as _fast, layer as _patch, native_path as _native
from normswap.variants.patchnorm.variant import PatchNormConv
from tests.test_native import require_library
from tests.test_patchnorm import FORMS, _perturb

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}  # of the output's largest magnitude


@pytest.fixture(autouse=True)
def _library():
    require_library()
    yield
    native.set_enabled(None)


@pytest.fixture
def calls(monkeypatch):
    """The kernel each layer call ran ('depthwise', 'dense') or None (the eager path)."""
    seen: list[str | None] = []
    real = _native.run

    def spy(module, x_in, *args):
        out = real(module, x_in, *args)
        seen.append(_native.kind(module.geom, x_in, args[1]) if out is not None else None)
        return out
    monkeypatch.setattr(_native, "run", spy)
    return seen


def _layer(conv: nn.Module, form: str, offset: bool, strength: float = 0.7) -> PatchNormConv:
    m = _perturb(PatchNormConv.from_conv(conv, form=form, offset=offset, strength=strength))
    with torch.no_grad():
        m.n2_mean.copy_(torch.rand(m.n2_mean.shape, dtype=m.n2_mean.dtype) * 5 + 1)  # k(lam) != 1
    return m.eval()


def _both(m: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's output with the native kernels on, and with them off (the eager path)."""
    with torch.inference_mode():
        native.set_enabled(True)
        fast = m(x)
        native.set_enabled(False)
        eager = m(x)
    native.set_enabled(None)
    return fast, eager


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and bool((a - b).abs().max() <= TOL[a.dtype] * b.abs().max().clamp_min(1))


def _check(conv: nn.Module, x: torch.Tensor, calls: list, want: str | None) -> None:
    for form, offset in itertools.product(FORMS, (False, True)):
        m = _layer(conv, form, offset)
        fast, eager = _both(m, x)
        assert calls[-2:] == [want, None], (form, offset, calls[-2:])
        ref = _patch._reference_forward(copy.deepcopy(m).double(), x.double()).to(x.dtype)
        assert fast.is_contiguous() and fast.dtype == x.dtype
        assert _close(fast, eager) and _close(fast, ref), (form, offset, (fast - ref).abs().max().item())


DEPTHWISE = list(itertools.product((1, 3, 5), (1, 2), (1, 2)))  # kernel, stride, dilation


@pytest.mark.parametrize("k,stride,dilation", DEPTHWISE, ids=lambda v: str(v))
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=("f32", "f64"))
def test_depthwise_kernel_equals_the_eager_path(k, stride, dilation, dtype, calls):
    """Padding 0-2, channel multiplier 1 and 2, with and without bias, odd sizes that are not whole vectors
    (and wider than one), batch 1 and 3."""
    torch.manual_seed(0)
    for pad, mult, bias, (n, h, w) in itertools.product((0, 1, 2), (1, 2), (True, False),
                                                        ((1, 13, 19), (3, 11, 37))):
        if h + 2 * pad < dilation * (k - 1) + 1:
            continue
        conv = nn.Conv2d(3, 3 * mult, k, stride, pad, dilation, groups=3, bias=bias).to(dtype)
        _check(conv, torch.randn(n, 3, h, w, dtype=dtype), calls, "depthwise")


DENSE = [dict(kernel_size=1), dict(kernel_size=1, stride=2), dict(kernel_size=3, padding=1),
         dict(kernel_size=3, stride=2, padding=1, bias=False), dict(kernel_size=3, padding=2, dilation=2),
         dict(kernel_size=(3, 5), padding=(0, 2)), dict(kernel_size=4, padding="same"),
         dict(kernel_size=3, padding=1, padding_mode="reflect"), dict(kernel_size=1, padding=1)]


@pytest.mark.parametrize("kw", DENSE, ids=str)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=("f32", "f64"))
def test_dense_kernel_equals_the_eager_path(kw, dtype, calls):
    """groups = 1: torch's conv, then the native factor; 23 x 29 = 667 pixels spans two of the kernel's blocks."""
    torch.manual_seed(0)
    for cin, (n, h, w) in ((5, (1, 23, 29)), (3, (3, 9, 17))):
        conv = nn.Conv2d(cin, 7, **kw).to(dtype)
        _check(conv, torch.randn(n, cin, h, w, dtype=dtype), calls, "dense")


def test_a_same_padding_conv_is_padded_first_then_native(calls):
    """A timm-style conv_same layer: its TF "same" padding is applied by prepare, the kernel sees no padding."""
    conv = nn.Conv2d(4, 4, 3, stride=2, groups=4).double()
    m = _layer(conv, "corrected", True)
    m.geom = _patch.ConvGeometry.from_conv(conv, "conv_same")
    x = torch.randn(2, 4, 10, 11, dtype=torch.float64)
    fast, eager = _both(m, x)
    assert calls[-2:] == ["depthwise", None]
    assert _close(fast, eager) and _close(fast, _patch._reference_forward(m, x))


FALLBACK = [
    (nn.Conv1d(4, 4, 3, padding=1, groups=4), (2, 4, 9), torch.float64),
    (nn.Conv3d(4, 4, 3, padding=1, groups=4), (2, 4, 5, 5, 5), torch.float64),
    (nn.Conv2d(4, 6, 3, padding=1, groups=2), (2, 4, 9, 9), torch.float64),  # two channels per group
    (nn.Conv2d(4, 4, 3, padding=1, groups=4), (2, 4, 9, 9), torch.bfloat16),
    (nn.Conv2d(4, 6, 1), (2, 4, 9, 9), torch.bfloat16),
]


@pytest.mark.parametrize("conv,shape,dtype", FALLBACK,
                         ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else str(v))
def test_what_the_kernels_do_not_take_runs_the_eager_path(conv, shape, dtype, calls):
    m = _layer(conv.to(dtype), "corrected", True)
    x = torch.randn(shape, dtype=dtype)
    fast, eager = _both(m, x)
    assert calls[-2:] == [None, None]
    assert torch.equal(fast, eager)


def test_channels_last_and_empty_inputs_run_the_eager_path(calls):
    m = _layer(nn.Conv2d(4, 4, 3, padding=1, groups=4).double(), "l2", True)
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64).to(memory_format=torch.channels_last)
    fast, eager = _both(m, x)
    assert calls[-2:] == [None, None] and torch.equal(fast, eager)
    fast, _ = _both(m, x[:0].contiguous())
    assert calls[-2] is None and fast.shape == (0, 4, 9, 9)


def test_training_and_autograd_keep_the_plain_formula(calls):
    m = _layer(nn.Conv2d(4, 4, 3, padding=1, groups=4).double(), "corrected", False)
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    native.set_enabled(True)
    out = m(x)  # eval with autograd on: the plain formula, differentiable
    assert out.grad_fn is not None and not calls
    assert _close(out.detach(), _patch._reference_forward(m, x).detach())


@pytest.mark.parametrize("conv", [nn.Conv2d(8, 8, 3, 2, 1, groups=8), nn.Conv2d(8, 16, 3, padding=1)], ids=str)
def test_the_result_does_not_depend_on_the_thread_count(conv):
    m = _layer(conv, "rms", True)
    x = torch.randn(3, 8, 21, 35)
    threads = torch.get_num_threads()
    native.set_enabled(True)
    try:
        outs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            with torch.inference_mode():
                outs.append(m(x))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


def test_the_operators_check_their_arguments():
    ops = native.ops()
    x = torch.randn(1, 2, 5, 5)
    with pytest.raises(RuntimeError, match="coef has 4 values"):
        ops.patchnorm_depthwise(x, torch.randn(2, 1, 3, 3), None, None, [1, 1], [1, 1], [1, 1], [5, 5], [1.0])
    with pytest.raises(RuntimeError, match="float32 or float64"):
        ops.patchnorm_depthwise(x.half(), torch.randn(2, 1, 3, 3).half(), None, None, [1, 1], [1, 1], [1, 1],
                                [5, 5], [1.0, 1.0, 1.0, 0.0])
    with pytest.raises(RuntimeError, match="one value per output channel"):
        ops.patchnorm_scale_(torch.randn(1, 3, 5, 5), x, [1, 1], [1, 1], [0, 0], [1, 1], [1.0, 1.0, 1.0, 0.0],
                             torch.randn(2))


@pytest.mark.parametrize("conv", [nn.Conv2d(3, 6, 3, 2, 1, groups=3), nn.Conv2d(3, 3, 5, 1, 4, 2, groups=3),
                                  nn.Conv2d(5, 7, 3, padding=1), nn.Conv2d(5, 7, 1), nn.Conv2d(5, 7, 1, stride=2),
                                  nn.Conv2d(5, 7, (3, 5), padding=(0, 2), dilation=(2, 1))], ids=str)
@pytest.mark.parametrize("dtype", (torch.float32, torch.float64), ids=("f32", "f64"))
def test_patch_norms_equal_the_eager_ones(conv, dtype):
    """Calibration's n2 (fast.sq_norm, autograd off): the native kernel against the eager box filter."""
    geom = _patch.ConvGeometry.from_conv(conv)
    x = torch.randn(3, conv.in_channels, 23, 29, dtype=dtype)
    with torch.no_grad():
        fast = _native.sq_norm(x, geom)
        native.set_enabled(False)
        assert _native.sq_norm(x, geom) is None
        eager = _fast.sq_norm(x, geom)
    assert fast is not None and _close(fast, eager) and _close(fast, _patch._reference_n2(x.double(), geom).to(dtype))


@pytest.mark.parametrize("conv", [nn.Conv2d(3, 6, 3, 2, 1, groups=3), nn.Conv2d(5, 7, 3, padding=1),
                                  nn.Conv2d(3, 3, 5, 1, 4, 2, groups=3, bias=False)], ids=str)
def test_calibrations_plain_conv_equals_torchs(conv):
    """Calibration's plain conv (autograd off): the depthwise loop with a unit factor, torch's conv otherwise."""
    conv = conv.double()
    geom = _patch.ConvGeometry.from_conv(conv)
    x = torch.randn(3, conv.in_channels, 23, 29, dtype=torch.float64)
    with torch.no_grad():
        fast = _native.conv(geom, x, geom.padding, conv.weight, conv.bias)
        assert _close(fast, conv(x))
    assert _native.conv(geom, x, geom.padding, conv.weight, conv.bias).grad_fn is not None  # autograd: torch's
