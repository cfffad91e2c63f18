"""UAN EM's E step (normswap/variants/uan/estep.py): the fast form (batched products of a quadratic in centred
values) against the plain formula, its accuracy bound, its fallbacks, and row independence."""

from __future__ import annotations

import math

import pytest
import torch

from normswap.variants.uan import estep as es
from normswap.variants.uan.em import _groups, fit_gmm
from normswap.variants.uan.reservoir import Reservoir

F64 = torch.float64


def _mixture(c: int, n: int, spread: float, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """c channels of n values from three components: a narrow one, and two wide ones ``spread`` summed
    deviations apart from it; far off zero (offsets of about 100). Returns x (float32), mu, var, log_pi."""
    g = torch.Generator().manual_seed(seed)
    narrow = torch.exp(torch.empty(c, dtype=F64).uniform_(-6, 0, generator=g))
    wide = torch.exp(torch.empty(c, dtype=F64).uniform_(0, 3, generator=g))
    off = 100 * torch.randn(c, dtype=F64, generator=g)
    mu = torch.stack([off, off + spread * (narrow + wide), off + 0.5 * spread * (narrow + wide)])
    sd = torch.stack([narrow, wide, wide])
    prior = torch.tensor([0.3, 0.5, 0.2], dtype=F64)
    comp = torch.multinomial(prior, c * n, replacement=True, generator=g).view(c, n)
    x = mu.t().gather(1, comp) + sd.t().gather(1, comp) * torch.randn(c, n, dtype=F64, generator=g)
    return x.float(), mu, sd.square(), prior.log()[:, None].expand(3, c).contiguous()


def _compare(fast: torch.Tensor, plain: torch.Tensor, var: torch.Tensor, n: int) -> tuple[float, float, float]:
    """Largest differences: mean per-value log-likelihood; S1 in units of S0 * sd; S2 in units of S0 * var + S2
    (grouped values add their within-group spread to S2)."""
    k = var.shape[0]
    s0 = plain[:k].clamp_min(1e-300)
    ll = float(((fast[3 * k] - plain[3 * k]).abs() / n).max())
    s1 = float(((fast[k : 2 * k] - plain[k : 2 * k]).abs() / (s0 * var.sqrt())).max())
    s2 = float(((fast[2 * k : 3 * k] - plain[2 * k : 3 * k]).abs() / (s0 * var + plain[2 * k : 3 * k].abs())).max())
    assert torch.allclose(fast[:k], plain[:k], rtol=1e-12, atol=1e-9)
    return ll, s1, s2


@pytest.mark.parametrize("spread", [0.5, 3.0, 12.0])
def test_fast_form_matches_the_plain_formula(spread, kernels):
    x, mu, var, log_pi = _mixture(40, 3000, spread)
    _, r = es._centres(mu, var.sqrt())
    assert float(r.max()) <= es._R_MAX  # every row takes the fast form here
    fast, plain = es.estep(x, mu, var, log_pi, 1024), es._estep_plain(x, mu, var, log_pi, 1024)
    ll, s1, s2 = _compare(fast, plain, var, x.shape[1])
    assert ll < 2e-13 and s1 < 1e-11 and s2 < 1e-11, (ll, s1, s2)
    torch.testing.assert_close(es.estep(x, mu, var, log_pi, stats=False)[9], plain[9], rtol=0, atol=1e-9)
    # grouped values (the warm start): weights and within-group spreads
    gx, gw, gs2 = _groups(x, 100)  # 3000 = 100 x 30
    fast = es.estep(gx, mu, var, log_pi, w=gw, s2=gs2)
    plain = es._estep_plain(gx.double(), mu, var, log_pi, w=gw, s2=gs2)
    ll, s1, s2 = _compare(fast, plain, var, x.shape[1])
    assert ll < 2e-13 and s1 < 1e-11 and s2 < 1e-11, (ll, s1, s2)


def test_error_of_the_expanded_square_grows_as_spread_squared_and_far_rows_take_the_plain_form(kernels):
    """The fast form's error on its own (every row forced through it) grows like eps R^2; ``estep`` sends rows
    with R > _R_MAX to the plain form, so its error stays at the R_MAX level."""
    errs = {}
    for spread in (4.0, 64.0, 1024.0):
        x, mu, var, log_pi = _mixture(32, 2048, spread, seed=1)
        centre, r = es._centres(mu, var.sqrt())
        torch.testing.assert_close(r, torch.full_like(r, spread))  # the pair's balance point: R = the spread
        forced, low = es._estep_fast(x, mu, var, log_pi, centre, None, w=None, s2=None, stats=True)
        assert not low.any()
        plain = es._estep_plain(x, mu, var, log_pi)
        errs[spread] = _compare(forced, plain, var, x.shape[1])[0]
        if spread > es._R_MAX:  # estep itself: the plain form, bit for bit
            assert torch.equal(es.estep(x, mu, var, log_pi), plain)
    assert errs[4.0] < 1e-14 and errs[1024.0] > 1e-12  # what the fallback is for
    assert errs[1024.0] / errs[4.0] > 1e3


@pytest.mark.parametrize("k", [1, 3, 5])
def test_the_native_fast_form_equals_the_eager_one(k):
    """csrc/calib_estep.cpp against the batched-product form, plain and grouped values, float32 and float64 rows
    (K = 1 and 3 take its unrolled loops, 5 the general one); the sums agree to float64 rounding."""
    from normswap import native
    from test_native import require_library

    require_library()
    x, mu, var, log_pi = _mixture(30, 2500, 3.0, seed=7)
    mu, var = torch.cat([mu, mu[:2] + 0.3 * var[:2].sqrt()])[:k], torch.cat([var, 2 * var[:2]])[:k]
    log_pi = torch.full_like(mu, -math.log(k))
    gx, gw, gs2 = _groups(x, 100)
    centre, _ = es._centres(mu, var.sqrt())
    for args, kw in (((x,), {}), ((x.double(),), {}), ((gx,), {"w": gw, "s2": gs2})):
        out = []
        for on in (False, True):
            native.set_enabled(on)
            try:
                out.append(es._estep_fast(*args, mu, var, log_pi, centre, None, stats=True,
                                          **{"w": None, "s2": None, **kw}))
            finally:
                native.set_enabled(None)
        (a, low_a), (b, low_b) = out
        assert torch.equal(low_a, low_b) and (k == 1 or not low_a.any())  # K = 1: far values underflow
        scale = torch.cat([a[:k], a[:k] * var.sqrt(), a[:k] * var, a[3 * k :].abs()]).clamp_min(1.0)
        assert float(((a - b).abs() / scale)[:, ~low_a].max()) < 1e-12


def test_centre_minimises_the_largest_component_distance():
    g = torch.Generator().manual_seed(2)
    mu = torch.randn(4, 50, dtype=F64, generator=g) * 5
    sd = torch.rand(4, 50, dtype=F64, generator=g) + 0.05
    centre, r = es._centres(mu, sd)
    torch.testing.assert_close(r, ((mu - centre).abs() / sd).amax(0))
    grid = torch.linspace(-30, 30, 60001, dtype=F64)
    brute = ((mu[:, :, None] - grid).abs() / sd[:, :, None]).amax(0).amin(1)  # (50,) on a 0.001 grid
    assert torch.all(r <= brute + 1e-12) and torch.all(brute - r < 0.01 * (1 + r))


def test_a_row_whose_density_underflows_takes_the_plain_form(kernels):
    x, mu, var, log_pi = _mixture(6, 1000, 3.0, seed=3)
    x[2, 17] = float(mu[1, 2] + 80 * var[1, 2].sqrt())  # 80 deviations beyond every component: p(x) e^-cmax = 0
    centre, _ = es._centres(mu, var.sqrt())
    _, low = es._estep_fast(x, mu, var, log_pi, centre, None, w=None, s2=None, stats=True)
    assert low.tolist() == [False, False, True, False, False, False]
    out, plain = es.estep(x, mu, var, log_pi), es._estep_plain(x, mu, var, log_pi)
    assert torch.isfinite(out).all()
    assert torch.equal(out[:, 2], plain[:, 2])  # that row: the plain form
    assert torch.equal(out[:, [0, 1, 3, 4, 5]], es.estep(x[[0, 1, 3, 4, 5]], mu[:, [0, 1, 3, 4, 5]],
                                                        var[:, [0, 1, 3, 4, 5]], log_pi[:, [0, 1, 3, 4, 5]]))


@pytest.mark.parametrize("threads", [1, 2])
def test_each_row_depends_on_that_row_alone(threads, kernels):
    """Fits of channels batched together must equal their fits alone (calibration_end_many): rows in any
    blocks, at any thread count, give bit-identical sums; float32 and float64 values give the same."""
    x, mu, var, log_pi = _mixture(70, 4096, 2.0, seed=4)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        full = es.estep(x, mu, var, log_pi)
        for step in (1, 9):
            parts = [es.estep(x[i : i + step], mu[:, i : i + step], var[:, i : i + step], log_pi[:, i : i + step])
                     for i in range(0, 70, step)]
            assert torch.equal(full, torch.cat(parts, 1)), step
        assert torch.equal(full, es.estep(x.double(), mu, var, log_pi))
    finally:
        torch.set_num_threads(old)


def test_rows_read_in_place_give_the_sums_of_the_gathered_rows(kernels):
    """EM's channels still iterating are passed as ``rows`` of the whole value matrix (the native kernel reads them
    where they are): the sums equal those of ``x[rows]`` bit for bit, plain and grouped values, a row taking the
    plain form included; the fit itself does not change (it gathers nothing)."""
    x, mu, var, log_pi = _mixture(12, 1000, 3.0, seed=9)
    x[5, 3] = float(mu[1, 5] + 80 * var[1, 5].sqrt())  # row 5 underflows: the plain form, on x[rows] too
    rows = torch.tensor([11, 5, 0, 7])
    p = tuple(t[:, rows] for t in (mu, var, log_pi))
    assert torch.equal(es.estep(x, *p, rows=rows), es.estep(x[rows], *p))
    gx, gw, gs2 = _groups(x, 100)
    assert torch.equal(es.estep(gx, *p, w=gw, s2=gs2, rows=rows), es.estep(gx[rows], *p, w=gw, s2=gs2[rows]))


def test_fit_on_far_separated_components_keeps_the_monotone_log_likelihood(kernels):
    """EM through the fast form (and the plain form where R > _R_MAX): the log-likelihood never decreases by
    more than 1e-12 per value, on narrow components far from wide ones and far from zero."""
    x = torch.cat([_mixture(4, 4096, spread, seed=5)[0] for spread in (2.0, 6.0, 14.0, 40.0)])
    for warm_group in (16, 0):
        fit = fit_gmm(x, 3, warm_group=warm_group, tol=1e-9, max_iter=150, var_floor=1e-6)
        assert torch.all(fit.history.diff(dim=0) >= -1e-12)
        assert torch.all(fit.gain > 0.1)
        assert torch.isfinite(fit.loglik).all()


def test_reservoir_values_in_slot_order_are_the_same_columns():
    r = Reservoir(64, torch.Generator().manual_seed(0))
    for i in range(10):
        r.add(torch.randn(3, 20) + i)
    ordered, slots = r.values(), r.values(ordered=False)
    assert slots.shape == ordered.shape == (3, 64)
    assert slots.data_ptr() == r._vals.data_ptr()  # a view: no copy
    assert torch.equal(slots.sort(1).values, ordered.sort(1).values)
    assert torch.equal(fit_gmm(slots, 2).mean, fit_gmm(ordered, 2).mean)  # EM sorts: the order does not matter
    assert not math.isnan(float(fit_gmm(slots, 2).loglik.sum()))


@pytest.mark.parametrize("threads", [1, 2])
def test_overwrite_sorts_in_place_and_fits_the_same(threads):
    x = _mixture(300, 4096, 3.0, seed=6)[0]  # 1.2 M values: row blocks sorted in parallel threads at 2 threads
    before = x.clone()
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        plain = fit_gmm(x, 3, max_iter=3)
        assert torch.equal(x, before)  # not overwritten unless asked
        mine = x.clone()
        fit = fit_gmm(mine, 3, max_iter=3, overwrite=True)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(mine, before.sort(dim=1).values)  # sorted in place
    for key in ("mean", "var", "log_pi", "loglik", "history"):
        assert torch.equal(getattr(fit, key), getattr(plain, key)), key


@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_the_native_row_moments_equal_the_eager_sums(dtype):
    """csrc/calib_moments.cpp against single_gaussian's and _groups' torch sums: the K = 1 fit (own means, and a
    given centre as under torch.distributed) and the warm start's group means and spreads, to float64 rounding;
    a row of another length or a non-dividing group size falls back; fit_gmm's fits agree either way."""
    from normswap import native
    from normswap.variants.uan import em
    from test_native import require_library

    require_library()
    x = _mixture(30, 2560, 3.0, seed=3)[0].to(dtype).sort(dim=1).values
    native.set_enabled(False)
    try:
        mean, var, ll, n = em.single_gaussian(x)
        gm, gw, gs2 = _groups(x, 160)
        assert em._native_moments(x, None, 16) is None
        eager = fit_gmm(x.clone(), 3, var_init=var)
    finally:
        native.set_enabled(None)
    native.set_enabled(True)
    try:
        moments = em._native_moments(x, None, 16)
        mean2, var2, ll2, n2 = em.single_gaussian(x, moments=moments)
        centred = em._native_moments(x, mean + 1.0)[1]  # about a given centre
        assert em._native_moments(x, None, 17) is None  # 2560 is no multiple of 17: the torch groups
        fast = fit_gmm(x.clone(), 3, var_init=var)
        with pytest.raises(ValueError, match="not with reduce"):
            em.single_gaussian(x, moments=moments, reduce=lambda t: t)
    finally:
        native.set_enabled(None)
    assert n2 == n == 2560
    torch.testing.assert_close(mean2, mean, rtol=1e-14, atol=1e-12)
    torch.testing.assert_close(var2, var, rtol=1e-13, atol=0)
    torch.testing.assert_close(ll2, ll, rtol=1e-13, atol=1e-13)
    want = ((x.double() - (mean + 1.0)[:, None]) ** 2).sum(1)
    torch.testing.assert_close(centred, want, rtol=1e-13, atol=0)
    assert moments[2].shape == (30, 160) and torch.equal(gw, torch.full((1, 160), 16.0, dtype=F64))
    torch.testing.assert_close(moments[2], gm, rtol=1e-15, atol=1e-13)
    torch.testing.assert_close(moments[3], gs2, rtol=1e-12, atol=1e-12)
    for a, b in ((fast.mean, eager.mean), (fast.var, eager.var), (fast.loglik, eager.loglik)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-8)
