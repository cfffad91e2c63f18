"""UAN channel mode's fast path (normswap/variants/uan/kernel.py): blocked forward and the hand-written
backward against autograd of the plain formula (docs/methods.md section 3.1), in float64. Every test runs twice:
with the eager blocks (native kernels off) and with the native kernel (tests/test_uan_native.py has its own)."""

from __future__ import annotations

import math

import pytest
import torch

import normswap  # noqa: F401  (import guard before torchvision)
import normswap.native as native
from normswap.variants.uan import fused, kernel
from normswap.variants.uan import UANChannel, UANConfig
from test_native import require_library


@pytest.fixture(autouse=True, params=["eager", "native"])
def kernel_path(request):
    """The eager blocks (``NORMSWAP_NATIVE=0``) or the native kernel (required, skipped where it cannot build)."""
    if request.param == "native":
        require_library()
    native.set_enabled(request.param == "native")
    yield request.param
    native.set_enabled(None)


def plain(x, mu, var, logit, rho, weight, bias, mean, rv, eps):
    """docs/methods.md section 3.1 as written there, in x's dtype (autograd differentiates this)."""
    k, c = mu.shape
    view = (k, 1, c) + (1,) * (x.dim() - 2)
    cview = (1, c) + (1,) * (x.dim() - 2)
    mu, var = mu.reshape(view), var.reshape(view)
    log_pi = torch.log_softmax(logit, dim=0).reshape(view)
    xs = x.unsqueeze(0)
    log_p = log_pi - 0.5 * torch.log(2 * math.pi * var) - (xs - mu) ** 2 / (2 * var)
    tau = torch.softmax(log_p, dim=0)
    x_mix = (tau / torch.sqrt(torch.exp(log_pi)) * (xs - mu) / torch.sqrt(var)).sum(0) / math.sqrt(k)
    x_one = (x - mean.reshape(cview)) / torch.sqrt(rv.reshape(cview) + eps)
    y = (1 - rho) * x_one + rho * x_mix
    if weight is not None:
        y = y * weight.reshape(cview)
    if bias is not None:
        y = y + bias.reshape(cview)
    return y


def params(c: int, k: int, dtype=torch.float64, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(k, c, generator=g, dtype=dtype)
    var = torch.rand(k, c, generator=g, dtype=dtype) + 0.3
    logit = torch.randn(k, c, generator=g, dtype=dtype)
    weight = torch.rand(c, generator=g, dtype=dtype) + 0.5
    bias = torch.randn(c, generator=g, dtype=dtype) * 0.3
    mean = torch.randn(c, generator=g, dtype=dtype) * 0.3
    rv = torch.rand(c, generator=g, dtype=dtype) + 0.5
    return mu, var, logit, weight, bias, mean, rv


def fast(x, mu, var, logit, rho, weight, bias, mean, rv, eps, one_dead=False):
    coeffs = kernel.channel_coefficients(
        mu, var, torch.log_softmax(logit, dim=0), mu.shape[0], torch.tensor(rho, dtype=mu.dtype),
        weight, bias, mean, rv + eps, one_dead=one_dead,
    )
    return kernel.channel_mixture(x, *coeffs, k=mu.shape[0])


@pytest.fixture
def small_blocks(monkeypatch):
    monkeypatch.setattr(kernel, "BLOCK", 16)  # several blocks per sample and per channel range
    return kernel.BLOCK


@pytest.mark.parametrize("shape", [(5, 4), (3, 4, 7), (2, 4, 3, 5)])
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("rho", [0.4, 1.0])
def test_blocked_forward_matches_plain_formula(small_blocks, shape, affine, rho):
    mu, var, logit, weight, bias, mean, rv = params(shape[1], 3)
    if not affine:
        weight = bias = None
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 2
    expected = plain(x, mu, var, logit, rho, weight, bias, mean, rv, 1e-5)
    for one_dead in ((False, True) if rho == 1.0 else (False,)):
        with torch.no_grad():
            got = fast(x, mu, var, logit, rho, weight, bias, mean, rv, 1e-5, one_dead)
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
    assert list(kernel._blocks(torch.Size(shape))) and len(list(kernel._blocks(torch.Size(shape)))) > 1


@pytest.mark.parametrize("shape", [(6, 3), (2, 3, 4, 5)])
@pytest.mark.parametrize("rho,one_dead", [(0.6, False), (1.0, True)])
def test_backward_matches_autograd_of_plain_formula(small_blocks, shape, rho, one_dead):
    mu, var, logit, weight, bias, mean, rv = params(shape[1], 3)
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) * 2
    leaves = [t.clone().requires_grad_() for t in (x, mu, var, logit, weight, bias)]
    u = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))

    def grads(fn):
        out = fn(*leaves[:4], rho, *leaves[4:], mean, rv, 1e-5)
        return torch.autograd.grad(out, leaves, u)

    expected = grads(plain)
    got = grads(lambda *a: fast(*a, one_dead=one_dead))
    for name, g, e in zip(("x", "mu", "var", "logit", "weight", "bias"), got, expected):
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-10, msg=name)
    args = [t.detach().clone().requires_grad_() for t in leaves]
    assert torch.autograd.gradcheck(
        lambda x, m, v, lg, w, b: fast(x, m, v, lg, rho, w, b, mean, rv, 1e-5, one_dead), args, eps=1e-6, atol=1e-7
    )


def test_tails_and_reduced_precision_blocked(small_blocks):
    mu, var, logit, weight, bias, mean, rv = (t.float() for t in params(4, 3))
    x = torch.randn(3, 4, 5) * 1e3  # far in every component's tail
    y = fast(x, mu, var, logit, 1.0, weight, bias, mean, rv, 1e-5, True)
    assert torch.isfinite(y).all()
    xh = x.to(torch.bfloat16) / 1e3
    yh = fast(xh, mu, var, logit, 0.5, weight, bias, mean, rv, 1e-5)
    assert yh.dtype == torch.bfloat16
    assert torch.equal(yh, fast(xh.float(), mu, var, logit, 0.5, weight, bias, mean, rv, 1e-5).to(torch.bfloat16))


def test_module_train_and_eval_paths_agree_at_rho_one():
    """The module's eager paths (no grad: blocked in place; grad: the autograd.Function) give one answer,
    and strength 1 (x_one skipped) equals the plain formula."""
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(8).eval()
    with torch.no_grad():
        bn.running_var.uniform_(0.5, 1.5)
        bn.running_mean.normal_()
    module = UANChannel(bn, "bn", UANConfig(k=3, strength=1.0))
    with torch.no_grad():
        module.mix_mean.add_(torch.randn_like(module.mix_mean))
    x = torch.randn(4, 8, 40, 40)  # > BLOCK values per sample: channel-range blocks
    with torch.no_grad():
        y0 = module(x)
    y1 = module(x)
    assert y1.requires_grad and torch.equal(y0, y1)
    expected = plain(x.double(), *(t.double() for t in (module.mix_mean, module.mix_var, module.mix_logit)), 1.0,
                     module.weight.double(), module.bias.double(), bn.running_mean.double(),
                     bn.running_var.double(), bn.eps)
    torch.testing.assert_close(y0.double(), expected, atol=1e-5, rtol=1e-5)


def _pointwise(x, mu, var, logit, rho, weight, bias, mean, rv, eps, one_dead=False):
    """The unrolled expression that fx / torch.compile trace (normswap/variants/uan/fused.py)."""
    k = mu.shape[0]
    a, c, b, g, p, q = kernel.channel_coefficients(
        mu, var, torch.log_softmax(logit, dim=0), k, torch.tensor(rho, dtype=mu.dtype), weight, bias, mean, rv + eps,
        one_dead=one_dead)
    tail = (1,) * (x.dim() - 2)
    view = lambda t, lead: None if t is None else t.reshape(lead + (-1,) + tail)  # noqa: E731
    return fused.pointwise_mixture(x, k, *(view(t, (k,)) for t in (a, c, b, g)), view(p, ()), view(q, ()))


@pytest.mark.parametrize("shape", [(6, 3), (2, 3, 4, 5)])
@pytest.mark.parametrize("rho,one_dead", [(0.6, False), (1.0, True)])
def test_pointwise_expression_and_its_gradients_match_plain_formula(shape, rho, one_dead):
    mu, var, logit, weight, bias, mean, rv = params(shape[1], 3)
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(6)) * 2
    leaves = [t.clone().requires_grad_() for t in (x, mu, var, logit, weight, bias)]
    u = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    out_e = plain(*leaves[:4], rho, *leaves[4:], mean, rv, 1e-5)
    out_g = _pointwise(*leaves[:4], rho, *leaves[4:], mean, rv, 1e-5, one_dead)
    torch.testing.assert_close(out_g, out_e, atol=1e-12, rtol=1e-12)
    for name, g, e in zip(("x", "mu", "var", "logit", "weight", "bias"), torch.autograd.grad(out_g, leaves, u),
                          torch.autograd.grad(out_e, leaves, u)):
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-10, msg=name)
    x64 = (x * 1e3).requires_grad_()  # far tails: the shift by the max keeps every exponential finite
    assert torch.isfinite(torch.autograd.grad(_pointwise(x64, mu, var, logit, rho, weight, bias, mean, rv, 1e-5,
                                                         one_dead).sum(), x64)[0]).all()


def test_fx_trace_of_a_uan_model_runs_the_pointwise_expression():
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(4).eval()
    module = UANChannel(bn, "bn", UANConfig(k=2, strength=0.5))
    with torch.no_grad():
        module.mix_mean.add_(torch.randn_like(module.mix_mean))
    traced = torch.fx.symbolic_trace(torch.nn.Sequential(module))
    assert "maximum" in traced.code and "sum" not in traced.code  # unrolled over K: no reduction over components
    x = torch.randn(2, 4, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), module(x), atol=1e-6, rtol=1e-6)


@pytest.mark.slow
def test_compiled_kernel_matches_plain_formula_forward_and_backward():
    """NORMSWAP_COMPILE's kernel (torch.compile of the pointwise expression) against the plain formula in float64."""
    shape, rho = (2, 3, 4, 5), 0.6
    mu, var, logit, weight, bias, mean, rv = params(shape[1], 3)
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    leaves = [t.clone().requires_grad_() for t in (x, mu, var, logit, weight, bias)]
    u = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    native.set_enabled(False)  # the native kernel takes precedence where it runs
    fused.set_compiled(True)
    try:
        got = fast(*leaves[:4], rho, *leaves[4:], mean, rv, 1e-5)
    finally:
        fused.set_compiled(False)
    expected = plain(*leaves[:4], rho, *leaves[4:], mean, rv, 1e-5)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
    for name, g, e in zip(("x", "mu", "var", "logit", "weight", "bias"), torch.autograd.grad(got, leaves, u),
                          torch.autograd.grad(expected, leaves, u)):
        torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-10, msg=name)
