"""UAN channel mode's eval-time shortcuts: the coefficient cache (normswap/variants/cache.py) must see
every change of the layer's tensors, and the exponent floor (fused.EXP_FLOOR) must not move the output of
far-separated components (where it is active) away from the plain formula (docs/methods.md section 3.1)."""

from __future__ import annotations

import copy

import pytest
import torch

import normswap  # noqa: F401  (import guard before torchvision)
from normswap.variants.uan import UANChannel, UANConfig, fused, kernel
from normswap.variants.cache import cache_for
from test_uan_kernel import fast, params, plain


def _far(c: int, dtype=torch.float64):
    """Components 2 apart with variances 1e-3: most values sit hundreds of nats deep in two components' tails."""
    mu, var, logit, weight, bias, mean, rv = params(c, 3, dtype)
    mu = torch.tensor([-2.0, 0.0, 2.0], dtype=dtype)[:, None] + 0.1 * mu
    return mu, torch.full_like(var, 1e-3), logit, weight, bias, mean, rv


@pytest.mark.parametrize("shape", [(6, 3), (2, 3, 4, 5)])
def test_floored_exponents_match_the_plain_formula_forward_and_backward(shape):
    mu, var, logit, weight, bias, mean, rv = _far(shape[1])
    x = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2
    leaves = [t.clone().requires_grad_() for t in (x, mu, var, logit, weight, bias)]
    u = torch.randn(shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expected = plain(*leaves[:4], 0.7, *leaves[4:], mean, rv, 1e-5)
    l_gap = (x.unsqueeze(0) - mu.reshape((3, 1, -1) + (1,) * (x.dim() - 2))).square() / (2 * var[0, 0])
    assert float((l_gap.amax(0) - l_gap.amin(0)).max()) > -fused.EXP_FLOOR[torch.float64]  # the floor is active
    for name, fn in (("blocked", fast), ("pointwise", _pointwise)):
        got = fn(*leaves[:4], 0.7, *leaves[4:], mean, rv, 1e-5)
        torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12, msg=name)
        for g, e in zip(torch.autograd.grad(got, leaves, u), torch.autograd.grad(expected, leaves, u, retain_graph=True)):
            torch.testing.assert_close(g, e, atol=1e-10, rtol=1e-10, msg=name)
    with torch.no_grad():  # float32 (floor at -64): equal to the float64 formula within float32's resolution
        got32 = fast(*(t.float() for t in (x, mu, var, logit)), 0.7, weight.float(), bias.float(), mean.float(),
                     rv.float(), 1e-5)
    torch.testing.assert_close(got32.double(), expected.detach(), atol=2e-5, rtol=1e-5)


def _pointwise(x, mu, var, logit, rho, weight, bias, mean, rv, eps):
    from test_uan_kernel import _pointwise as pw
    return pw(x, mu, var, logit, rho, weight, bias, mean, rv, eps, False)


def test_unfloored_path_is_the_floored_one_when_components_coincide():
    mu, var, logit, weight, bias, mean, rv = params(4, 3)
    mu, var, logit = (t[:1].expand(3, -1).contiguous() for t in (mu, var, logit))
    coeffs = kernel.channel_coefficients(mu, var, torch.log_softmax(logit, 0), 3, torch.tensor(0.5, dtype=mu.dtype),
                                         weight, bias, mean, rv + 1e-5, one_dead=False)
    assert kernel.coincide(*coeffs[:3]) and not kernel.coincide(*params(4, 3)[:3])
    x = torch.randn(2, 4, 6, dtype=torch.float64) * 3
    with torch.no_grad():
        a, b = (kernel.channel_mixture(x, *coeffs, k=3, floor=f) for f in (True, False))
    assert torch.equal(a, b)
    torch.testing.assert_close(a, plain(x, mu, var, logit, 0.5, weight, bias, mean, rv, 1e-5), atol=1e-12, rtol=0)


def _layer(rho: float = 1.0) -> UANChannel:
    torch.manual_seed(0)
    bn = torch.nn.BatchNorm2d(4).eval()
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.uniform_(0.5, 1.5)
    module = UANChannel(bn, "bn", UANConfig(k=3, strength=rho)).eval()
    with torch.no_grad():
        module.mix_mean.add_(torch.randn_like(module.mix_mean))
    return module


def _fresh(module: UANChannel, x: torch.Tensor) -> torch.Tensor:
    """The output with nothing cached: a copy whose cache is empty."""
    twin = copy.deepcopy(module)
    assert cache_for(twin).key is None
    return twin(x)


def test_cached_coefficients_follow_every_change_of_the_layer():
    module, x = _layer(), torch.randn(2, 4, 5, 5)
    changes = [
        ("mix_mean in place", lambda m: m.mix_mean.add_(0.5)),
        ("mix_var in place", lambda m: m.mix_var.mul_(2.0)),
        ("mix_logit in place", lambda m: m.mix_logit[0].add_(1.0)),
        ("weight in place", lambda m: m.weight.mul_(-1.0)),
        ("bias in place", lambda m: m.bias.add_(3.0)),
        ("strength", lambda m: m.set_strength(0.5)),
        ("running_var in place", lambda m: m.running_var.add_(1.0)),  # the x_one term, live at rho < 1
        ("load_state_dict", lambda m: m.load_state_dict({**m.state_dict(), "mix_mean": m.mix_mean * 0 + 1.0})),
        ("replaced .data", lambda m: setattr(m.mix_var, "data", m.mix_var.data * 3)),
        ("replaced parameter", lambda m: setattr(m, "weight", torch.nn.Parameter(m.weight.detach() + 1))),
    ]
    with torch.no_grad():
        before = module(x)
        assert torch.equal(module(x), before)  # served from the cache: the same numbers
        assert cache_for(module).key is not None and "_coefficient_cache" not in vars(module)
        for name, change in changes:
            change(module)
            after = module(x)
            assert not torch.equal(after, before), name
            assert torch.equal(after, _fresh(module, x)), name
            before = after
    with torch.inference_mode():  # a separate entry; the layer's own tensors still have version counters
        assert torch.equal(module(x), before)
    y64 = module.double()(x.double())
    with torch.no_grad():
        assert y64.dtype == torch.float64 and torch.equal(y64, _fresh(module, x.double()))


def test_cache_is_bypassed_where_gradients_flow_and_training_sees_each_step():
    module, x = _layer(), torch.randn(2, 4, 5, 5)
    opt = torch.optim.SGD(module.parameters(), lr=0.1)
    outs = []
    for _ in range(2):
        y = module(x)
        assert y.requires_grad
        y.square().sum().backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            outs.append(module(x))
            assert torch.equal(outs[-1], _fresh(module, x))
    assert not torch.equal(outs[0], outs[1])


def test_the_eager_floor_is_chosen_only_where_tails_get_deep():
    def coeffs(mu, var):
        c = mu.shape[1]
        return kernel.channel_coefficients(mu, var, torch.full_like(mu, -1.0986), 3, torch.tensor(1.0), None, None,
                                           torch.zeros(c), torch.ones(c), one_dead=True)[:3]

    zero, one = torch.zeros(4), torch.ones(4)
    same = coeffs(torch.zeros(3, 4), torch.ones(3, 4))
    mild = coeffs(torch.tensor([-1.5, 0.0, 1.5])[:, None].expand(3, 4), torch.full((3, 4), 1 / 3))
    far = coeffs(torch.tensor([-2.0, 0.0, 2.0])[:, None].expand(3, 4), torch.full((3, 4), 0.05))
    assert not kernel.needs_floor(*same, zero, one)
    assert not kernel.needs_floor(*mild, zero, one)  # within 6 sd no exponent falls 60 nats below the top
    assert kernel.needs_floor(*mild, zero, 2 * one)  # inputs twice as spread: it does
    assert kernel.needs_floor(*far, zero, one)
    x = torch.randn(2, 4, 9) * 4
    for cs in (mild, far):  # a speed choice only: the output is the same either way
        full = (*cs, cs[0] * 0 + 0.7, None, None)
        with torch.no_grad():
            assert torch.equal(kernel.channel_mixture(x, *full, k=3, floor=True),
                               kernel.channel_mixture(x, *full, k=3, floor=False))


def test_switching_between_strengths_reuses_each_strengths_coefficients(monkeypatch):
    """evaluate alternates a model between two strengths: the coefficients are keyed by the strength's value and
    kept for a few strengths, so each is built once; a new value, or any other change, still builds afresh."""
    module, x = _layer(0.5), torch.randn(2, 4, 5, 5)
    built = []
    real = UANChannel._coefficients
    monkeypatch.setattr(UANChannel, "_coefficients",  # counted for this module, not the fresh copies compared with
                        lambda self, *a: (self is module and built.append(self._s)) or real(self, *a))
    with torch.no_grad():
        outs = {}
        for s in (0.5, 1.0, 0.5, 1.0, 0.5):
            module.set_strength(s)
            y = module(x)
            assert torch.equal(y, outs.setdefault(s, y))
        assert built == [0.5, 1.0]
        for s in (0.25, 0.75, 0.9, 0.5, 1.0):  # four entries kept: 1.0, the least recently used, is built again
            module.set_strength(s)
            assert torch.equal(module(x), _fresh(module, x))
        assert built == [0.5, 1.0, 0.25, 0.75, pytest.approx(0.9), 1.0]
        module.mix_mean.add_(0.1)
        module.set_strength(0.75)  # kept for the old mix_mean only
        assert torch.equal(module(x), _fresh(module, x)) and built[-1] == 0.75 and len(built) == 7
        module.rho.fill_(0.25)  # the buffer written directly counts by its value too
        module.rho.fill_(0.75)
        module(x)
        assert len(built) == 7
