"""UAN channel mode's native kernel (normswap/native/csrc/uan_channel.cpp) against the eager blocks and the plain
formula (docs/methods.md section 3.1): forward on every layout it takes, the exponent floor, dead terms, the
gradients in float64 and float32, and independence of the thread count."""

from __future__ import annotations

import pytest
import torch

import normswap  # noqa: F401  (import guard before torchvision)
import normswap.native as native
from normswap.variants.uan import UANChannel, UANConfig, kernel
from test_native import require_library
from test_uan_kernel import fast, params, plain


@pytest.fixture
def lib():
    """The native library built and forced on for the test (skipped, or failed in CI, where it cannot build)."""
    require_library()
    native.set_enabled(True)
    yield native.ops()
    native.set_enabled(None)


def both(fn):
    """``fn()`` with the native kernel, then with the eager blocks."""
    native.set_enabled(True)
    try:
        got = fn()
    finally:
        native.set_enabled(False)
    try:
        return got, fn()
    finally:
        native.set_enabled(True)


def fitted(c: int, k: int, dtype=torch.float32, seed: int = 0, spread: float = 4.0, rho: float = 1.0,
           affine: bool = True):
    """Coefficients ``(a, c, b, g, p, q)`` of calibrated-like components: means ``spread`` apart in units of
    narrow components (most values sit far in some component's tail: the floor region)."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(k, c, generator=g, dtype=torch.float64) * spread
    var = torch.rand(k, c, generator=g, dtype=torch.float64) * 0.05 + 0.01
    log_pi = torch.log_softmax(torch.randn(k, c, generator=g, dtype=torch.float64), dim=0)
    w = torch.rand(c, generator=g, dtype=torch.float64) + 0.5 if affine else None
    b = torch.randn(c, generator=g, dtype=torch.float64) if affine else None
    coeffs = kernel.channel_coefficients(mu, var, log_pi, k, torch.tensor(rho, dtype=torch.float64), w, b,
                                         torch.randn(c, generator=g, dtype=torch.float64) * 0.1,
                                         torch.rand(c, generator=g, dtype=torch.float64) + 0.5, one_dead=rho == 1.0)
    return tuple(None if t is None else t.to(dtype) for t in coeffs)


SHAPES = [(5, 4), (3, 19, 7), (2, 4, 3, 5), (3, 6, 1, 1), (2, 5, 17, 3), (2, 3, 16, 16), (1, 2, 33, 31)]


def as_accurate_as_eager(x32, c32, k, floor=True):
    """float32: the native forward is as close to the float64 result (of the same float32 inputs) as the eager
    blocks are. float32 rounding of l_k (in the hundreds for fitted components) and of z_k is amplified where
    two components' terms cancel: both paths err there, each by its own luck, so typical errors must match and
    the worst stay within a few times; float64: the two paths agree to rounding. Returns the float32 output."""
    coeffs, x = tuple(None if t is None else t.double() for t in c32), x32.double()
    truth = kernel._forward_blocks(x, coeffs, torch.float64)
    got64, eager64 = both(lambda: kernel.channel_mixture(x, *coeffs, k=k, floor=floor))
    torch.testing.assert_close(got64, eager64, rtol=1e-12, atol=1e-12)
    got, eager = both(lambda: kernel.channel_mixture(x32, *c32, k=k, floor=floor))
    assert got.dtype == torch.float32 and got.shape == x.shape and torch.isfinite(got).all()
    err = ((got.double() - truth).abs() / (truth.abs() + 1)).flatten()
    err_eager = ((eager.double() - truth).abs() / (truth.abs() + 1)).flatten()
    assert err.mean() <= 2 * err_eager.mean() + 1e-7, (err.mean(), err_eager.mean())
    assert err.max() <= 5 * err_eager.max() + 2e-6, (err.max(), err_eager.max())
    return got


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 2, 3, 5, 9])
def test_forward_is_as_accurate_as_the_eager_blocks(lib, shape, k):
    """Calibrated-like components (far apart: large z, the floor region) on every layout, K = 1 to 9."""
    as_accurate_as_eager(torch.randn(shape, generator=torch.Generator().manual_seed(1)) * 3,
                         fitted(shape[1], k, rho=0.7), k)


@pytest.mark.parametrize("k", [2, 3])
def test_moderate_components_agree_to_float32_resolution(lib, k):
    """Components that overlap (responsibilities away from 0 and 1): agreement to a few float32 ulps."""
    coeffs = fitted(8, k, spread=0.5, rho=0.6)
    x = torch.randn(4, 8, 21, 21, generator=torch.Generator().manual_seed(2))
    got, eager = both(lambda: kernel.channel_mixture(x, *coeffs, k=k))
    assert ((got - eager).abs() / (eager.abs() + 1)).max() < 5e-6  # outputs cross 0: relative to 1 + |y|


def test_the_floor_region_and_far_tails(lib):
    """Differences l_k - max below the float32 floor (-64) and inputs 1e3 sds out: finite, and as accurate as
    the eager path, which floors the same way."""
    coeffs = fitted(6, 3, spread=20.0)
    x = torch.randn(2, 6, 9, 9, generator=torch.Generator().manual_seed(3)) * 30
    x[0, 0, 0, :3] = torch.tensor([1e3, -1e3, 0.0])
    a, c, b = (t.double()[:, None, :, None, None] for t in coeffs[:3])
    l = b - 0.5 * (a * x.double() + c) ** 2
    assert ((l - l.amax(0)) < kernel.exp_floor(torch.float32)).any()  # the floor is exercised
    as_accurate_as_eager(x, coeffs, 3)


def test_coinciding_components_and_dead_terms(lib):
    """Coinciding components (every l_k equal: weights exactly 1/K, the eager path's floor=False case); rho = 1
    (no p) and no affine (no q)."""
    a, c, b, g, p, q = fitted(5, 3, rho=0.5)
    same = tuple(t[:1].expand_as(t).contiguous() for t in (a, c, b, g))
    x = torch.randn(3, 5, 6, 7, generator=torch.Generator().manual_seed(4))
    y = as_accurate_as_eager(x, (*same, p, q), 3, floor=False)
    view = lambda t: t.double().view(1, 5, 1, 1)  # noqa: E731
    expected = view(same[3][0]) * (view(same[0][0]) * x.double() + view(same[1][0])) + view(p) * x + view(q)
    assert ((y.double() - expected).abs() / (expected.abs() + 1)).max() < 1e-4  # y = g z + p x + q
    for coeffs in (fitted(5, 3, rho=1.0), fitted(5, 3, rho=1.0, affine=False)):
        assert coeffs[4] is None
        as_accurate_as_eager(x, coeffs, 3)


def test_layouts_and_dtypes_it_does_not_take_fall_back_or_convert(lib):
    """Channels-last inputs run the eager blocks (same result as native off); bfloat16 is converted to the
    coefficients' float32 and back."""
    coeffs = fitted(8, 3, spread=1.0, rho=0.5)
    x = torch.randn(2, 8, 5, 6, generator=torch.Generator().manual_seed(5))
    xl = x.to(memory_format=torch.channels_last)
    got, eager = both(lambda: kernel.channel_mixture(xl, *coeffs, k=3))
    assert torch.equal(got, eager) and got.is_contiguous(memory_format=torch.channels_last)
    xh = x.to(torch.bfloat16)
    yh = kernel.channel_mixture(xh, *coeffs, k=3)
    assert yh.dtype == torch.bfloat16
    assert torch.equal(yh, kernel.channel_mixture(xh.float(), *coeffs, k=3).to(torch.bfloat16))


@pytest.mark.parametrize("shape", [(6, 3), (2, 3, 5), (2, 3, 4, 5), (2, 2, 5, 7)])
@pytest.mark.parametrize("k,rho,one_dead", [(3, 0.6, False), (3, 1.0, True), (1, 0.6, False), (5, 0.8, False)])
def test_backward_matches_autograd_of_the_plain_formula(lib, shape, k, rho, one_dead):
    mu, var, logit, weight, bias, mean, rv = params(shape[1], k)
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6)) * 2
    leaves = [t.clone().requires_grad_() for t in (x, mu, var, logit, weight, bias)]
    u = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    expected = torch.autograd.grad(plain(*leaves[:4], rho, *leaves[4:], mean, rv, 1e-5), leaves, u)
    out = fast(*leaves[:4], rho, *leaves[4:], mean, rv, 1e-5, one_dead)
    assert out.grad_fn is not None and "ChannelMixture" in type(out.grad_fn).__name__
    for name, g, e in zip(("x", "mu", "var", "logit", "weight", "bias"), torch.autograd.grad(out, leaves, u),
                          expected):
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-10, msg=name)
    args = [t.detach().clone().requires_grad_() for t in leaves]
    assert torch.autograd.gradcheck(
        lambda x, m, v, lg, w, b: fast(x, m, v, lg, rho, w, b, mean, rv, 1e-5, one_dead), args, eps=1e-6, atol=1e-7)


def _grads(x, coeffs, u, k):
    leaves = [x.clone().requires_grad_()] + [None if t is None else t.clone().requires_grad_() for t in coeffs]
    out = kernel.channel_mixture(*leaves, k=k)
    wrt = [t for t in leaves if t is not None]
    return (out.detach(), *torch.autograd.grad(out, wrt, u))


@pytest.mark.parametrize("shape", [(7, 6), (3, 6, 40), (2, 6, 9, 11)])
def test_float32_backward_agrees_with_the_eager_backward(lib, shape):
    coeffs = fitted(shape[1], 3, spread=1.0, rho=0.7)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(8))
    u = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    got, eager = both(lambda: _grads(x, coeffs, u, 3))
    for name, g, e in zip(("y", "x", "a", "c", "b", "g", "p", "q"), got, eager):
        scale = e.abs().max().item()
        torch.testing.assert_close(g, e, rtol=2e-5, atol=2e-5 * scale, msg=name)


def test_the_backward_takes_the_path_its_forward_took(lib, monkeypatch):
    """A forward run with the kernels off keeps the eager backward though they are on again by then (the harness's
    eager rows switch the library off around the forward call only); a native forward gets the native backward."""
    coeffs = fitted(6, 3, spread=1.0, rho=0.7)
    x = torch.randn(2, 6, 5, 7, generator=torch.Generator().manual_seed(3))
    calls = []
    op = lib.uan_channel_backward
    monkeypatch.setattr(lib, "uan_channel_backward", lambda *a: calls.append("native") or op(*a))
    for forward_native in (False, True):
        calls.clear()
        leaves = [x.clone().requires_grad_()] + [None if t is None else t.clone().requires_grad_() for t in coeffs]
        native.set_enabled(forward_native)
        out = kernel.channel_mixture(*leaves, k=3)
        native.set_enabled(True)
        out.sum().backward()
        assert calls == (["native"] if forward_native else [])
        assert leaves[0].grad is not None and torch.isfinite(leaves[0].grad).all()


def test_results_do_not_depend_on_the_thread_count(lib):
    """Per-(n, c) sums reduced over n in order: 1 and 2 threads give the same bits, forward and backward."""
    coeffs = fitted(16, 3, spread=1.0, rho=0.7)
    out = {}
    threads = torch.get_num_threads()
    for shape in [(4, 16, 30, 30), (64, 16)]:
        x = torch.randn(shape, generator=torch.Generator().manual_seed(10))
        u = torch.randn(shape, generator=torch.Generator().manual_seed(11))
        try:
            for n in (1, 2):
                torch.set_num_threads(n)
                out[n] = _grads(x, coeffs, u, 3)
        finally:
            torch.set_num_threads(threads)
        for a, b in zip(out[1], out[2]):
            assert torch.equal(a, b)


def test_the_module_runs_the_native_kernel_and_agrees_with_eager(lib, monkeypatch):
    """A UAN layer with separated components: eval (cached coefficients) and training-mode gradients agree
    between the native kernel and the eager path; the native operator is what runs."""
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(8).eval()
    module = UANChannel(bn, "bn", UANConfig(k=3, strength=1.0))
    with torch.no_grad():
        module.mix_mean.add_(torch.randn_like(module.mix_mean) * 2)
    x = torch.randn(2, 8, 12, 12)
    calls = []
    real = kernel._native

    def spy(*args):
        r = real(*args)
        calls.append(r is not None)
        return r

    monkeypatch.setattr(kernel, "_native", spy)
    got, eager = both(lambda: _module_out(module, x))
    assert calls[:3] == [True, True, True] and not any(calls[3:])
    for name, g, e in zip(("eval", "train", "dx", "dmean"), got, eager):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5, msg=name)


def _module_out(module, x):
    with torch.no_grad():
        y0 = module(x)
    xx = x.clone().requires_grad_()
    y1 = module(xx)
    dx, dm = torch.autograd.grad(y1.square().sum(), (xx, module.mix_mean))
    return y0, y1.detach(), dx, dm


def test_coinciding_components_get_equal_gradients(lib):
    """Every component's terms are the same instructions (no product left for the compiler to contract into an
    fma for some components only): coinciding components get bitwise equal gradients, so an optimiser keeps
    them coinciding (tests/test_finetune.py's one-process vs two-process run relies on it)."""
    a, c, b, g, p, _ = (t if t is None or t.dim() == 1 else t[:1].expand_as(t).contiguous()
                        for t in fitted(6, 3, spread=1.0, rho=0.5))
    x = torch.randn(8, 6, 8, 8, generator=torch.Generator().manual_seed(12))
    u = torch.randn(8, 6, 8, 8, generator=torch.Generator().manual_seed(13))
    for xs, us in ((x, u), (x[:, :, 0, :3].contiguous(), u[:, :, 0, :3].contiguous())):  # planes and lanes over C
        _, da, dc, db, dg, _, _ = lib.uan_channel_backward(us, xs, a, c, b, g, p)
        for t in (da, dc, db, dg):
            assert torch.equal(t, t[:1].expand_as(t))
