"""Per-channel 1-D Gaussian mixtures by EM, for UAN calibration (docs/methods.md sections 3.1 and 3.3).

Nothing here knows about UAN: the inputs are value matrices ``x`` of shape (C, n), one row per
channel, and every function works on all channels at once (every sum in float64; float32 values are
kept as they are and converted exactly where they are read).

- :class:`Reservoir` (:mod:`normswap.variants.uan.reservoir`, re-exported here): a seeded, uniform random
  subsample of up to ``capacity`` columns of a stream of (C, M) blocks (the same column positions for every
  channel), in bounded memory (C * capacity).
- :func:`fit_gmm`: a K-component mixture per row by EM. The E step (:mod:`normswap.variants.uan.estep`) is
  the log-space formula of docs/methods.md section 3.1 (Gaussian normaliser included, no eps anywhere), giving
  the sufficient statistics ``sum r``, ``sum r (x - mu)`` and ``sum r (x - mu)^2`` (shifted by the current means
  for accuracy) over cache-sized blocks of columns, mostly as two batched matrix products per block (that
  module says how, and how accurately); the M step floors the variances at ``var_floor``. With ``reduce`` /
  ``broadcast`` (sum over, resp. rank 0's copy from, the workers of a torch.distributed job) every
  worker fits its own values yet computes the same parameters, iteration counts and stopping decisions.
- :func:`single_gaussian`: the K = 1 baseline (the ML Gaussian); :func:`mixture_loglik`: the mean
  per-value log-likelihood of given parameters.

Choices (normswap's, not the paper's):
- A *dead* component (total responsibility below ``PRIOR_FLOOR`` of the values) keeps its previous
  mean and variance and gets the prior floor ``PRIOR_FLOOR`` (priors renormalised): it is kept, nearly
  switched off, and never produces 0/0. It is not re-seeded, so the fit stays a plain EM whose
  log-likelihood never decreases (up to the negligible prior floor).
- A channel stops iterating (its parameters are frozen) once an EM step improves its mean per-value
  log-likelihood by less than ``tol``, or after ``max_iter`` steps; the fit stops when every channel has.
- Warm start, for speed (an E step costs K exps per value and real activations take 100-300 steps at
  ``tol = 1e-6``): EM first runs on groups of up to 16 consecutive sorted values per channel (each
  group's count, mean and spread; its values share one responsibility), then continues on the values
  themselves until ``tol`` or the channel's remaining step budget, so the result is EM on the values,
  started from a better point. Measured (one CPU thread, K = 3): 3-5x faster than EM on the values
  throughout, at the same log-likelihood within 2e-4 nats per value (pretrained MobileNetV2
  activations on 8 photos: all 52 BatchNorm sites, 17k channels, in 19 s instead of 65 s).
- A channel whose EM optimum is worse than the single Gaussian (a poor local optimum) gets the single
  Gaussian instead, as K coinciding components with uniform priors: the fit is never worse than K = 1,
  so ``gain >= 0``.
- Components are returned sorted by mean within each channel.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import torch

from normswap.core.threads import serial
from normswap.native import ops as native_ops
from normswap.variants.uan.estep import estep as _estep
from normswap.variants.uan.reservoir import Reservoir

__all__ = ["GMMFit", "PRIOR_FLOOR", "Reservoir", "fit_gmm", "mixture_loglik", "single_gaussian"]

_LOG_2PI = math.log(2.0 * math.pi)
PRIOR_FLOOR = 1e-8
_F64 = torch.float64

Collective = Callable[[torch.Tensor], torch.Tensor]


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass
class GMMFit:
    """A K-component 1-D mixture per channel: parameters (K, C) sorted by mean, and how the fit went.

    ``loglik``: mean per-value log-likelihood of the returned parameters on all values (all workers);
    ``loglik_k1``: the same for the ML single Gaussian; ``history``: (steps + 1, C) mean per-value
    log-likelihood after each EM step on the values (row 0: where the warm start left the parameters;
    frozen channels repeat their last value); ``iterations``: EM steps, the most any channel took (warm
    start included; ``warm_iterations`` of them on groups); ``converged``: every channel met ``tol``;
    ``n``: values per channel fitted (summed over workers)."""

    mean: torch.Tensor
    var: torch.Tensor
    log_pi: torch.Tensor
    loglik: torch.Tensor
    loglik_k1: torch.Tensor
    iterations: int
    warm_iterations: int
    converged: bool
    history: torch.Tensor
    n: int
    channel_iterations: torch.Tensor | None = None  # (C,) EM steps per channel, warm start included
    channel_warm: torch.Tensor | None = None  # (C,) of them on groups
    channel_converged: torch.Tensor | None = None  # (C,) bool

    @property
    def gain(self) -> torch.Tensor:
        """Per-channel log-likelihood gain over K = 1 (nats per value)."""
        return self.loglik - self.loglik_k1

    def select(self, rows: slice) -> "GMMFit":
        """The fit of channels ``rows`` alone: what :func:`fit_gmm` returns for those rows by themselves
        (every channel's EM is independent of the others'), so several layers can be fitted in one call."""
        steps, warm, met = (t[rows] for t in (self.channel_iterations, self.channel_warm, self.channel_converged))
        some = steps.numel() > 0
        value_steps = int((steps - warm).max()) if some else 0
        return GMMFit(mean=self.mean[:, rows], var=self.var[:, rows], log_pi=self.log_pi[:, rows],
                      loglik=self.loglik[rows], loglik_k1=self.loglik_k1[rows],
                      iterations=int(steps.max()) if some else 0, warm_iterations=int(warm.max()) if some else 0,
                      converged=bool(met.all()), history=self.history[: value_steps + 1, rows], n=self.n,
                      channel_iterations=steps, channel_warm=warm, channel_converged=met)


def _row_blocks(x: torch.Tensor, work: int = 1 << 16):
    """Row slices of ``x`` (C, n) holding about ``work`` values each."""
    rows = max(1, work // max(1, x.shape[1]))
    for r0 in range(0, x.shape[0], rows):
        yield slice(r0, r0 + rows)


def _native_moments(x: torch.Tensor, mean: torch.Tensor | None = None, group: int = 0) -> list[torch.Tensor] | None:
    """Row sums, squared deviations from ``mean`` (default: each row's own mean) and, with ``group`` > 0, the
    means and mean squared deviations of runs of ``group`` values, all float64, in one read of ``x`` (C, n)
    (normswap/native/csrc/calib_moments.cpp); None where the kernel does not apply (off or unbuilt, another device
    or dtype, ``group`` not dividing n)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, _F64) or (group and x.shape[1] % group) \
            or torch.compiler.is_compiling():
        return None
    o = native_ops()
    return None if o is None else o.row_moments(x.contiguous(), None if mean is None else mean.contiguous(), group)


def single_gaussian(
    x: torch.Tensor, *, var_floor: float = 1e-5, reduce: Collective | None = None,
    moments: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The ML Gaussian per row of ``x`` (C, n) over all workers: ``(mean, var, loglik, n)``, where ``var``
    is floored at ``var_floor``, ``loglik`` is the mean per-value log-likelihood (C,) and ``n`` the
    number of values per row (all workers). Raises ValueError when there are none, or any non-finite one.
    ``moments``: :func:`_native_moments` of ``x`` already taken (about each row's own mean; one worker only)."""
    red = reduce or _same
    x = x.detach()  # any floating dtype: the sums are taken in float64 (as of the values converted first)
    if moments is None and reduce is None:
        moments = _native_moments(x)
    if moments is not None and reduce is not None:
        raise ValueError("precomputed moments are about this worker's own means: not with reduce")
    # finite sums: every value is finite (a NaN or an inf makes its row's non-finite)
    sums = moments[0] if moments is not None else x.sum(dim=1, dtype=_F64)
    bad = sums.new_tensor(0.0) if bool(torch.isfinite(sums).all()) else (~torch.isfinite(x)).sum().to(_F64)
    head = red(torch.cat([torch.stack([sums.new_tensor(float(x.shape[1])), bad]), sums]))
    n = int(round(float(head[0])))
    if n == 0:
        raise ValueError("no values to fit")
    if float(head[1]) > 0:  # decided on the summed count, so every worker raises
        raise ValueError(f"{int(head[1])} of the values to fit are NaN or infinite")
    mean = head[2:] / n
    if moments is None:
        moments = _native_moments(x, mean)
    if moments is not None:
        var_ml = moments[1]
    else:
        var_ml = sums.new_empty(x.shape[0])
        for rs in _row_blocks(x):  # row blocks: no full-size temporary (its page faults cost more than the sums)
            torch.sum((x[rs] - mean[rs, None]).square_(), dim=1, out=var_ml[rs])
    var_ml = red(var_ml) / n
    var = var_ml.clamp_min(var_floor)
    loglik = -0.5 * (torch.log(var) + _LOG_2PI) - var_ml / (2.0 * var)
    return mean, var, loglik, n


def mixture_loglik(
    x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, log_pi: torch.Tensor, *,
    reduce: Collective | None = None,
) -> torch.Tensor:
    """Mean per-value log-likelihood (C,) of mixture parameters (K, C) on ``x`` (C, n), over all workers."""
    red = reduce or _same
    x = x.detach().to(_F64)
    k = mean.shape[0]
    tot = _estep(x, mean.to(_F64), var.to(_F64), log_pi.to(_F64), stats=False)[3 * k]
    n = red(torch.cat([torch.tensor([float(x.shape[1])], dtype=_F64, device=x.device), tot]))
    return n[1:] / n[0]


def _sort_rows(x: torch.Tensor, overwrite: bool = False) -> torch.Tensor:
    """``x`` sorted along dim 1 (numpy's sort on the CPU: several times faster than torch's there), in place
    when ``overwrite`` and ``x`` is contiguous; row blocks in parallel threads when torch has several (numpy
    releases the GIL while it sorts)."""
    if x.device.type != "cpu" or not x.numel():
        return x.sort(dim=1).values
    a = x.contiguous().numpy()
    if not (overwrite and x.is_contiguous()):
        a = a.copy()  # the one copy (np.sort would make it too)
    threads = min(torch.get_num_threads(), a.shape[0])
    if threads < 2 or a.size < (1 << 20):
        a.sort(axis=1)
        return torch.from_numpy(a)
    bounds = [a.shape[0] * i // threads for i in range(threads + 1)]
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(lambda i: a[bounds[i] : bounds[i + 1]].sort(axis=1), range(threads)))
    return torch.from_numpy(a)


def _quantiles(srt: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Linearly interpolated quantiles (C, P) of sorted rows ``srt`` (C, n)."""
    n = srt.shape[1]
    pos = probs * (n - 1)
    lo = pos.floor().long()
    hi = (lo + 1).clamp_max(n - 1)
    frac = (pos - lo.to(_F64))[None, :]
    return srt[:, lo] * (1.0 - frac) + srt[:, hi] * frac


def _init_means(srt: torch.Tensor, k: int, init: str, seed: int, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
    """Initial means (K, C), sorted within each channel, from the sorted rows ``srt`` (C, n)."""
    c, n = srt.shape
    probs = (torch.arange(k, dtype=_F64, device=srt.device) + 0.5) / k
    if n == 0:  # this worker saw nothing: spread around the global Gaussian (rank 0's values win anyway)
        z = math.sqrt(2.0) * torch.erfinv(2.0 * probs - 1.0)
        return mean[None, :] + z[:, None] * var.sqrt()[None, :]
    if init == "quantile":
        return _quantiles(srt, probs).t().contiguous()
    # k-means++ (seeded): the first centre uniformly, each next one with probability ~ D(x)^2
    g = torch.Generator().manual_seed(int(seed))
    xc = srt.cpu().to(_F64)
    centres = [xc.gather(1, torch.randint(n, (c, 1), generator=g))]
    d2 = (xc - centres[0]).square()
    for _ in range(1, k):
        wts = d2.clone()
        wts[wts.sum(dim=1) <= 0] = 1.0  # every value equals a centre already: a uniform choice
        centres.append(xc.gather(1, torch.multinomial(wts, 1, generator=g)))
        d2 = torch.minimum(d2, (xc - centres[-1]).square())
    return torch.cat(centres, dim=1).sort(dim=1).values.t().contiguous().to(srt.device)


def _groups(srt: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``count`` groups of consecutive sorted values per row: means (C, G), sizes (1, G), mean squared
    deviations (C, G)."""
    c, n = srt.shape
    g = min(count, n)
    if n % g == 0:  # equal groups (the usual n = 4096): a reshape, no scatter
        parts = srt.reshape(c, g, n // g)
        mean, s2 = (torch.empty(c, g, dtype=_F64, device=srt.device) for _ in range(2))
        for rs in _row_blocks(srt):
            torch.mean(parts[rs], dim=2, dtype=_F64, out=mean[rs])
            torch.mean((parts[rs] - mean[rs, :, None]).square_(), dim=2, out=s2[rs])
        return mean, mean.new_full((1, g), float(n // g)), s2
    srt = srt.to(_F64)
    gid = torch.arange(n, device=srt.device) * g // n
    w = torch.bincount(gid, minlength=g).to(_F64)
    mean = srt.new_zeros(c, g).index_add_(1, gid, srt) / w
    s2 = srt.new_zeros(c, g).index_add_(1, gid, (srt - mean[:, gid]).square()) / w
    return mean, w[None, :], s2


def _mstep(stats: torch.Tensor, p: tuple, n: int, var_floor: float) -> tuple:
    """M step from reduced statistics (3K+1, C'): a dead component keeps its mean and variance from ``p``;
    priors are floored at ``PRIOR_FLOOR`` and renormalised."""
    mu, var, _ = p
    k = mu.shape[0]
    s0, s1, s_2 = stats[:k], stats[k : 2 * k], stats[2 * k : 3 * k]
    alive = s0 > PRIOR_FLOOR * n
    safe = torch.where(alive, s0, torch.ones_like(s0))
    shift = s1 / safe
    new_mu = torch.where(alive, mu + shift, mu)
    new_var = torch.where(alive, (s_2 / safe - shift.square()).clamp_min(var_floor), var)
    pi = (s0 / n).clamp_min(PRIOR_FLOOR)
    return new_mu, new_var, torch.log(pi) - torch.log(pi.sum(dim=0, keepdim=True))


def _em(
    x: torch.Tensor, mu: torch.Tensor, var: torch.Tensor, log_pi: torch.Tensor, n: int, *, budget: torch.Tensor,
    tol: float, var_floor: float, red: Collective, chunk: int | None,
    w: torch.Tensor | None = None, s2: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """EM in place on ``mu``, ``var``, ``log_pi`` (K, C), at most ``budget[c]`` steps for channel ``c``. A
    channel stops (is frozen) once a step improves its mean per-value log-likelihood by less than
    ``tol``, or its budget is spent. Returns the log-likelihood of the final parameters (C,), the steps
    taken (C,), whether each channel met ``tol`` (C,), and the log-likelihood after each step (row 0:
    the starting parameters; frozen channels repeat their value)."""
    k, c = mu.shape
    stats = red(_estep(x, mu, var, log_pi, chunk, w=w, s2=s2))
    loglik = stats[3 * k] / n
    history = [loglik.clone()]
    steps = torch.zeros(c, dtype=torch.long, device=x.device)
    met = torch.zeros(c, dtype=torch.bool, device=x.device)
    going = budget > 0
    active = torch.arange(c, device=x.device)
    p = (mu, var, log_pi)
    small = serial if x.device.type == "cpu" else nullcontext  # per-channel bookkeeping (normswap.core.threads)
    while True:
        with small():
            if not bool(going.all()):
                active, stats, p = active[going], stats[:, going], tuple(t[:, going] for t in p)
            if active.numel() == 0:
                return loglik, steps, met, history
            p = _mstep(stats, p, n, var_floor)
            mu[:, active], var[:, active], log_pi[:, active] = p
            steps[active] += 1
        rows = None if active.numel() == c else active  # the kernel reads the active rows where they are
        stats = red(_estep(x, *p, chunk, w=w, s2=s2, rows=rows))  # this step's log-likelihood, the next one's sums
        with small():
            ll = stats[3 * k] / n
            improving = (ll - loglik[active]) >= tol  # False for NaN
            met[active] = ~improving
            loglik[active] = ll
            history.append(loglik.clone())
            going = improving & (steps[active] < budget[active])


def fit_gmm(
    x: torch.Tensor,
    k: int,
    *,
    init: str = "quantile",
    var_init: torch.Tensor | None = None,
    var_floor: float = 1e-5,
    tol: float = 1e-6,
    max_iter: int = 300,
    seed: int = 0,
    reduce: Collective | None = None,
    broadcast: Collective | None = None,
    chunk: int | None = None,
    warm_group: int = 16,
    overwrite: bool = False,
) -> GMMFit:
    """Fit a ``k``-component 1-D Gaussian mixture to each row of ``x`` (C, n) by EM.

    Args:
        init: initial means at the row quantiles ``(j + 0.5) / k`` (``quantile``) or by k-means++ seeded
            with ``seed`` (``kmeans++``). Variances start at ``var_init`` (C,) (UAN: the BatchNorm's
            ``running_var + eps``) or the row variance, floored; priors uniform.
        var_floor: lowest variance (initial and every M step).
        tol: a channel stops once its mean per-value log-likelihood improves by less than this.
        max_iter: most EM steps per channel (warm start included).
        reduce: ``t -> sum of t over the workers``; applied to counts, sufficient statistics and
            log-likelihood sums. ``broadcast``: ``t -> rank 0's t``; applied to the initial parameters.
            Every worker must call with the same ``k`` and options; its ``x`` may differ, even be empty.
        chunk: columns per E-step chunk (default 4096; rows per block are chosen to stay cache-sized).
        warm_group: most values per group of the warm start (at least 64 groups per channel; 0 or 1 =
            no warm start): EM first runs on groups of consecutive sorted values of each channel and worker
            (each group's count, mean and spread; all its values share one responsibility), then
            continues on the values themselves, both to ``tol``. The result is EM on the values; the warm
            start only makes its first, longest stretch cheaper (16x fewer densities for n >= 1024).
        overwrite: ``x`` may be overwritten (its rows sorted in place: one copy of the values fewer, for a
            caller that does not need them afterwards).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1; got {k}")
    if x.dim() != 2:
        raise ValueError(f"fit_gmm expects (C, n) values; got shape {tuple(x.shape)}")
    if init not in ("quantile", "kmeans++"):
        raise ValueError(f"unknown EM initialisation {init!r}; expected 'quantile' or 'kmeans++'")
    red, bc = reduce or _same, broadcast or _same
    x = x.detach()
    if x.dtype not in (torch.float32, _F64):
        x = x.float()
    # sorted rows: the same values for EM, and the quantiles / groups come free. float32 values stay float32
    # (every sum is taken in float64, on the values converted exactly): half the memory and the traffic
    x = _sort_rows(x, overwrite=overwrite)
    c = x.shape[0]
    size = min(int(warm_group), x.shape[1] // 64)  # values per group (below: n // 64 over all workers)
    # one worker: the K = 1 fit's sums and the warm start's groups in one read of the values, where native
    moments = _native_moments(x, None, size if size >= 2 and x.shape[1] % size == 0 else 0) \
        if reduce is None and x.shape[1] else None
    mean1, var1, loglik_k1, n = single_gaussian(x, var_floor=var_floor, reduce=reduce, moments=moments)
    mu = _init_means(x, k, init, seed, mean1, var1)
    v0 = var1 if var_init is None else var_init.detach().to(device=x.device, dtype=_F64).reshape(c)
    mu, var = bc(torch.stack([mu, v0.clamp_min(var_floor).expand(k, c)]).contiguous()).unbind(0)
    mu, var = mu.clone(), var.clone()
    log_pi = torch.full((k, c), -math.log(k), dtype=_F64, device=x.device)

    opts = {"tol": tol, "var_floor": var_floor, "red": red, "chunk": chunk}
    budget = torch.full((c,), int(max_iter), dtype=torch.long, device=x.device)
    size = min(int(warm_group), n // 64)  # values per group: at most warm_group, at least 64 groups
    warm = torch.zeros_like(budget)
    if size >= 2:
        if moments is not None and moments[2].shape[1] == -(-x.shape[1] // size):
            gx, gw, gs2 = moments[2], moments[2].new_full((1, moments[2].shape[1]), float(size)), moments[3]
        else:
            gx, gw, gs2 = _groups(x, -(-x.shape[1] // size))
        _, warm, _, _ = _em(gx, mu, var, log_pi, n, budget=budget, w=gw, s2=gs2, **opts)
    loglik, steps, met, history = _em(x, mu, var, log_pi, n, budget=budget - warm, **opts)

    worse = loglik < loglik_k1  # a poor local optimum: the single Gaussian instead (K coinciding components)
    if bool(worse.any()):
        mu[:, worse], var[:, worse], log_pi[:, worse] = mean1[worse], var1[worse], -math.log(k)
        loglik = torch.where(worse, loglik_k1, loglik)
    order = mu.argsort(dim=0, stable=True)
    mu, var, log_pi = mu.gather(0, order), var.gather(0, order), log_pi.gather(0, order)
    return GMMFit(mean=mu, var=var, log_pi=log_pi, loglik=loglik, loglik_k1=loglik_k1,
                  iterations=int((warm + steps).max()) if c else 0, warm_iterations=int(warm.max()) if c else 0,
                  converged=bool(met.all()), history=torch.stack(history), n=n,
                  channel_iterations=warm + steps, channel_warm=warm, channel_converged=met)
