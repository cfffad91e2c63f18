"""ANAct's fast paths (docs/speed.md): the cached map applied in one pass, in place where nothing else reads the
tensor, equals the plain formula; the cache follows every change; the buffers follow the model's dtype."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import normswap
from normswap.calibration.identity import same_function
from normswap.variants.cache import cache_for
from normswap.variants.anact import ANAct


def _layer(per_channel: bool, folded: bool, strength: float, act: nn.Module | None = None,
           reuse_input: bool = False) -> ANAct:
    m = ANAct(act or nn.SiLU(), per_channel=per_channel, channels=4, folded=folded, strength=strength,
              reuse_input=reuse_input).eval()
    g = torch.Generator().manual_seed(0)
    shape = (4,) if per_channel else ()
    with torch.no_grad():
        m.running_rho.copy_(0.3 + torch.rand(shape, generator=g))
        m.running_rho_prime.copy_(0.2 + torch.rand(shape, generator=g))
        m.running_mean.copy_(torch.randn(shape, generator=g))
        m.alpha.fill_(0.4)
    return m


def _plain(m: ANAct, x: torch.Tensor) -> torch.Tensor:
    """``(1 - s) f + s c (f - mu)`` (folded: ``c (f - mu)``) in float64 from the module's own values."""
    f = m.act(x.double().clone())
    rho, rho_p = m.running_rho.double(), m.running_rho_prime.double()
    c = torch.sqrt((rho + rho_p) / (2 * rho * rho_p)) + 0.3 * torch.tanh(m.alpha.double())
    mu = m.running_mean.double()
    if m.per_channel:
        c, mu = c.reshape(-1, 1, 1), mu.reshape(-1, 1, 1)
    s = 1.0 if m.folded else m.current_strength()
    return (1 - s) * f + s * c * (f - mu)


@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("folded, strength", [(True, 0.0), (False, 0.3), (False, 1.0)])
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "grad, alpha frozen"])
def test_fast_path_equals_the_plain_formula(per_channel, folded, strength, mode):
    m = _layer(per_channel, folded, strength)
    x = torch.randn(3, 4, 5, 6)
    with torch.no_grad():  # the autograd path (gradients would flow to alpha) as the second reference
        m.alpha.requires_grad_(True)
    with torch.enable_grad():
        slow = m(x).detach()
    if mode == "grad, alpha frozen":
        m.alpha.requires_grad_(False)
        xg = x.clone().requires_grad_(True)
        out = m(xg)
        assert out.requires_grad and xg.grad is None
    else:
        with (torch.no_grad() if mode == "no_grad" else torch.inference_mode()):
            out, again = m(x), m(x)  # the second call takes the cached map
        assert torch.equal(out, again)
    torch.testing.assert_close(out.detach().double(), _plain(m, x), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out.detach(), slow, atol=1e-6, rtol=1e-6)


def test_gradient_to_the_input_with_alpha_frozen_matches_autograd_of_the_formula():
    m = _layer(True, False, 0.3).double()
    m.alpha.requires_grad_(False)
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(m(x).square().sum(), x)
    x2 = x.detach().clone().requires_grad_(True)
    (ref,) = torch.autograd.grad(_plain(m, x2).square().sum(), x2)
    torch.testing.assert_close(g, ref, atol=1e-12, rtol=1e-12)


def test_in_place_only_where_nothing_else_reads_the_tensor():
    x0 = torch.randn(2, 4, 3, 3) * 4
    f0 = nn.functional.relu6(x0)
    # an in-place activation whose input others may read: x becomes f (as in the original), the output is new
    m = _layer(False, True, 0.0, act=nn.ReLU6(inplace=True))
    x = x0.clone()
    with torch.no_grad():
        out = m(x)
    assert torch.equal(x, f0) and out.data_ptr() != x.data_ptr()
    torch.testing.assert_close(out.double(), _plain(m, x0))
    # reuse_input (the plan's facts: the producer's only reader is the activation): the map goes into x
    m.reuse_input = True
    x = x0.clone()
    with torch.inference_mode():
        out = m(x)
    assert out.data_ptr() == x.data_ptr()
    torch.testing.assert_close(out.double(), _plain(m, x0))
    # an out-of-place activation: its fresh output takes the map, the input is untouched
    m = _layer(True, True, 0.0, act=nn.ReLU6())
    x = x0.clone()
    with torch.no_grad():
        out = m(x)
    assert torch.equal(x, x0)
    torch.testing.assert_close(out.double(), _plain(m, x0))


def test_the_cached_map_follows_every_change():
    m = _layer(False, False, 0.3)
    x = torch.randn(2, 4, 3, 3)

    def check() -> None:
        with torch.no_grad():
            out = m(x)
        torch.testing.assert_close(out.double(), _plain(m, x).to(out.dtype).double(), atol=1e-6, rtol=1e-6)

    check()
    with torch.no_grad():
        m.alpha.add_(0.5)  # an optimiser step
    check()
    with torch.no_grad():
        m.running_mean.add_(1.0)
    check()
    m.set_strength(0.8)
    check()
    m.load_state_dict({**m.state_dict(), "running_rho": torch.tensor(2.5)})
    check()
    x = x.double()
    m.double()
    check()
    x = x.float()
    m.float()
    check()
    m.half().float()  # .to() replaces the data without a version bump: same dtype and versions, rounded values
    check()
    m.train()  # training updates the statistics and takes the autograd path; eval again
    with torch.no_grad():
        m(x * 3)
    m.eval()
    check()


def test_copies_with_a_cached_map_are_still_provably_the_same_function():
    m = _layer(False, True, 0.0)
    twin = copy.deepcopy(m)
    with torch.no_grad():
        m(torch.randn(2, 4, 3, 3))
    assert cache_for(m).key is not None and same_function(m, twin) and same_function(twin, m)


def _net(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6), nn.ReLU6(inplace=True), nn.Conv2d(6, 5, 1)).eval().to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("per_channel", [False, True])
def test_buffers_follow_the_model_dtype(dtype, per_channel):
    model = _net(dtype)
    x = torch.randn(2, 3, 4, 4, dtype=dtype)
    r = normswap.convert(model, to="anact", options={"per_channel": per_channel}, example_inputs=x)
    (layer,) = [m for m in r.model.modules() if isinstance(m, ANAct)]
    assert layer.folded and layer.reuse_input  # BatchNorm -> ReLU6 (in place) -> conv, traced by fx
    assert {layer.alpha.dtype, layer.running_rho.dtype, layer.running_rho_prime.dtype,
            layer.running_mean.dtype} == {dtype}
    assert layer.strength.dtype == torch.float32  # by design, whatever the model
    with torch.no_grad():
        torch.testing.assert_close(r.model(x), model(x), atol=1e-5 if dtype == torch.float32 else 1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("block", [7, 40, 1 << 17])  # several blocks per channel, several samples per block, one
@pytest.mark.parametrize("channels", [None, 5])
def test_block_sums_equal_the_float64_sums(dtype, block, channels, monkeypatch):
    from normswap.variants.anact import stats
    from normswap.variants.anact.activations import apply_activation, derivative

    monkeypatch.setattr(stats, "BLOCK", block)
    x = (torch.randn(3, 5, 4, 6, dtype=torch.float64) * 2 + 0.7).to(dtype)
    shift, sums, count = stats.block_sums("gelu", {}, x, channels, None)
    cols = x.double().transpose(0, 1).reshape(5, -1) if channels else x.double().reshape(1, -1)
    ref_shift = cols[:, :cols.shape[1] // 3].mean(-1) if channels else cols[0, :block].mean().reshape(1)
    torch.testing.assert_close(shift.reshape(-1), ref_shift, rtol=1e-6 if dtype == torch.float32 else 1e-12, atol=0)
    d = cols - shift.reshape(-1, 1)
    f, fp = apply_activation("gelu", {}, cols), derivative("gelu", {}, cols)
    ref = torch.stack([d.sum(-1), d.square().sum(-1), f.sum(-1), f.square().sum(-1), fp.square().sum(-1)])
    ref = ref if channels else ref[:, 0]
    assert sums.dtype == torch.float64 and sums.shape == ref.shape and count == cols.shape[1]
    tol = dict(rtol=2e-6, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sums, ref, **tol)


@pytest.mark.parametrize("shape, coef, layout", [
    ((2, 3, 4, 5), (), "contiguous"), ((2, 3, 4, 5), (), "channels_last"), ((2, 3, 4, 5), (3, 1, 1), "contiguous"),
    ((2, 3, 4, 5), (3, 1, 1), "channels_last"), ((6, 3), (3,), "contiguous"), ((7,), (), "contiguous")])
def test_affine_map_gradients_match_autograd_of_addcmul(shape, coef, layout):
    from normswap.variants.anact.layer import AffineMap

    g = torch.Generator().manual_seed(1)
    f = torch.randn(shape, dtype=torch.float64, generator=g)
    if layout == "channels_last":
        f = f.to(memory_format=torch.channels_last)
    a = (torch.rand(coef, dtype=torch.float64, generator=g) + 0.5).requires_grad_()
    b = torch.randn(coef, dtype=torch.float64, generator=g).requires_grad_()
    f.requires_grad_()
    assert torch.autograd.gradcheck(AffineMap.apply, (f, a, b))
    out = AffineMap.apply(f, a, b)
    ref = torch.addcmul(b, f, a)
    torch.testing.assert_close(out, ref, rtol=1e-15, atol=1e-15)
    w = torch.randn(shape, dtype=torch.float64, generator=g)
    got = torch.autograd.grad((out * w).sum(), (f, a, b))
    want = torch.autograd.grad((ref * w).sum(), (f, a, b))
    for x, y in zip(got, want):
        assert x.shape == y.shape
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-12)
    # only the gradients asked for: b without a gradient, f frozen
    (ga,) = torch.autograd.grad(AffineMap.apply(f.detach(), a, b.detach()).mul(w).sum(), (a,))
    torch.testing.assert_close(ga, want[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("per_channel", [False, True])
def test_training_forward_and_gradients_equal_the_plain_formula(per_channel):
    m = _layer(per_channel, folded=False, strength=0.3).double().train()
    m.momentum = 1.0  # the update keeps the statistics: the plain formula reads the same values
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    m.num_batches_tracked.fill_(1)
    out = m(x)
    f, s = m.act(x), m.current_strength()
    rho, rho_p = m.running_rho, m.running_rho_prime
    c = torch.sqrt((rho + rho_p) / (2 * rho * rho_p)) + 0.3 * torch.tanh(m.alpha)
    mu = m.running_mean
    if per_channel:
        c, mu = c.reshape(-1, 1, 1), mu.reshape(-1, 1, 1)
    ref = (1 - s) * f + s * c * (f - mu)  # the plain formula, autograd's own gradients
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    w = torch.randn_like(ref)
    got = torch.autograd.grad((out * w).sum(), (x, m.alpha))
    want = torch.autograd.grad((ref * w).sum(), (x, m.alpha))
    for u, v in zip(got, want):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("act", [nn.ReLU(), nn.ReLU6(), nn.LeakyReLU(0.07), nn.ReLU6(inplace=True)],
                         ids=["relu", "relu6", "leaky", "relu6-inplace"])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_native_map_is_the_eager_one_bit_for_bit(act, per_channel, dtype):
    """csrc/anact_affine.cpp: activation and per-site map in one pass for relu, relu6 and leaky_relu, the same bits
    as the eager activation + torch.add(b, f, alpha=a), with the same writes: into x only where the eager path's
    output is x itself (per-channel maps stay eager: the same either way)."""
    from normswap import native
    from test_native import require_library

    require_library()
    inplace = getattr(act, "inplace", False)
    x0 = torch.randn(3, 4, 5, 7, dtype=dtype) * 4  # 105 values per plane: vector tails too
    outs = {}
    for on in (False, True):
        m = _layer(per_channel, False, 0.6, act=copy.deepcopy(act), reuse_input=True).to(dtype)
        native.set_enabled(on)
        try:
            x = x0.clone()
            with torch.no_grad():
                out = m(x)
        finally:
            native.set_enabled(None)
        assert (out.data_ptr() == x.data_ptr()) == inplace and (inplace or torch.equal(x, x0))
        outs[on] = out
    assert torch.equal(outs[True], outs[False])
    torch.testing.assert_close(outs[True].double(), _plain(m, x0), rtol=1e-6 if dtype == torch.float32 else 1e-12,
                               atol=1e-6 if dtype == torch.float32 else 1e-12)


def test_the_native_map_is_taken_only_where_it_applies(monkeypatch):
    from normswap import native
    from test_native import require_library

    require_library()
    taken = []
    real = native.ops()

    class Spy:
        def __getattr__(self, name):
            if name == "anact_affine":
                return lambda *a: taken.append(a[1]) or real.anact_affine(*a)
            return getattr(real, name)

    monkeypatch.setattr("normswap.variants.anact.layer.native_ops", lambda: Spy())
    x0 = torch.randn(2, 4, 3, 3) * 4
    with torch.no_grad():
        _layer(False, False, 0.5, act=nn.ReLU())(x0)
        _layer(False, False, 0.5, act=nn.SiLU())(x0)  # not computed bit for bit as torch does: eager
        _layer(False, False, 0.0, act=nn.ReLU())(x0)  # strength 0: the activation itself
        _layer(True, False, 0.5, act=nn.ReLU())(x0)  # a per-channel map: eager
        m = _layer(False, False, 0.5, act=nn.ReLU6(inplace=True))  # others read x: eager, x becomes relu6(x)
        x = x0.clone()
        out = m(x)
        assert torch.equal(x, nn.functional.relu6(x0)) and out.data_ptr() != x.data_ptr()
    _layer(False, False, 0.5, act=nn.ReLU()).train()(x0)  # training: the statistics and AffineMap
    assert taken == ["relu"]
