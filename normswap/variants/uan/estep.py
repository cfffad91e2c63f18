"""The E step of UAN's EM (:mod:`normswap.variants.uan.em`): sufficient statistics and log-likelihood of 1-D
Gaussian mixtures, one mixture per row of a value matrix, in float64 (docs/methods.md section 3.1).

:func:`estep` returns, per row ``c`` of ``x`` (C, n) and component ``k``, ``S0 = sum r``, ``S1 = sum r (x - mu)``,
``S2 = sum r (x - mu)^2`` and ``sum log p(x)``, with ``r = tau_k(x)`` and ``log p_k(x) = log pi_k - 0.5 log(2 pi
v_k) - (x - mu_k)^2 / (2 v_k)``. Two ways to the same sums:

- **Fast form** (almost every row). With a centre ``m`` per row and ``y = x - m``, every component's log-density
  is a quadratic in ``y``: ``log p_k(x) - cmax = B_k y + A_k y^2 + C_k`` (``A_k = -1 / (2 v_k)``, ``B_k = (mu_k - m)
  / v_k``, ``cmax = max_k (log pi_k - 0.5 log(2 pi v_k))``), so the K log-densities of a block of rows are one
  batched matrix product of per-row coefficients (K, 2) with the features ``[y, y^2]`` (2, cols), and ``sum r``,
  ``sum r y``, ``sum r y^2`` are one more: the responsibilities (K, cols) times ``[1, y, y^2] / p(x)`` (cols, 3).
  The sums about ``mu_k`` follow algebraically. Since ``log p_k(x) - cmax <= 0`` the exponentials need no
  per-value maximum; a row where some value's ``p(x) e^-cmax`` falls below ``_TINY`` (a value some 36 standard
  deviations from every component) is redone in the plain form. About 7 passes over (K, rows, cols) instead of
  the plain form's 16.
- **Plain form**: ``d = x - mu_k``, log-sum-exp over k with the per-value maximum, products and sums (the formula
  as written). Rows the fast form cannot evaluate accurately take it.

Accuracy of the fast form: expanding the square costs digits when a component's mean is many of its standard
deviations from the centre. ``m`` is the centre that minimises ``R = max_k |mu_k - m| / sd_k`` (the balance point
of the pair of components furthest apart in units of their summed deviations), and rows with ``R > _R_MAX``
take the plain form. Below it each value's log-density is off by at most about ``2 eps (R + 3)^2`` (eps = 2.2e-16),
so the mean per-value log-likelihood by well under 1e-12, and the centred sums by a relative ``4 eps (1 + R^2)``
(their errors move the M step's parameters, which changes the log-likelihood only at second order).
Every row's sums depend on that row alone (not on which rows share its block), so fits of channels batched
together equal their fits alone.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch

from normswap.core.threads import serial
from normswap.native import ops as native_ops

__all__ = ["estep"]

_LOG_2PI = math.log(2.0 * math.pi)
_R_MAX = 16.0  # rows whose components lie further from the centre (in their own deviations) take the plain form
_TINY = 1e-290  # smallest p(x) e^-cmax the fast form accepts (normal float64: full relative precision)
_WORK = 1 << 17  # values per component that one plain-form block holds (cache-sized)
_FAST_WORK = 1 << 18  # the same for the fast form (fewer, larger operations: per-call overhead matters more)


def _exp_(t: torch.Tensor) -> torch.Tensor:
    """In-place exp (numpy's on the CPU, for the plain form)."""
    if t.device.type == "cpu" and t.is_contiguous():
        np.exp(t.numpy(), out=t.numpy())
        return t
    return t.exp_()


def _cols(n: int, chunk: int | None) -> int:
    return max(1, min(n, int(chunk) if chunk else 4096))


def _blocks(c: int, n: int, k: int, chunk: int | None, work: int = _WORK):
    """(row slice, column slice) blocks covering a (c, n) matrix: column chunks of ``chunk`` (default
    4096) values, as many rows per block as keep ``k * rows * cols`` near ``work``."""
    cols = _cols(n, chunk)
    rows = max(1, work // (k * cols))
    for r0 in range(0, c, rows):
        for c0 in range(0, n, cols):
            yield slice(r0, r0 + rows), slice(c0, c0 + cols)


def estep(
    x: torch.Tensor, mu: torch.Tensor, var: torch.Tensor, log_pi: torch.Tensor, chunk: int | None = None, *,
    w: torch.Tensor | None = None, s2: torch.Tensor | None = None, stats: bool = True,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sums over the columns of ``x`` (C, n; float32 or float64, read exactly): rows ``[S0 (K), S1 (K), S2 (K),
    loglik (1)]`` of a float64 (3K+1, C) (only the last row is filled when ``stats`` is False); float64
    parameters (K, C). ``rows`` (C,): the parameters are for these rows of ``x`` (and ``s2``), the sums those of
    ``x[rows]`` (EM's channels still iterating: the native kernel reads them in place, without the gather).

    Grouped values (EM's warm start): column ``j`` stands for ``w[j]`` values ((1, n) weights) with mean
    ``x[:, j]`` and mean squared deviation ``s2[:, j]``, which share one responsibility computed from the
    group's mean log-density ``log pi_k - 0.5 log(2 pi v_k) - ((x - mu_k)^2 + s2) / (2 v_k)``; the sums are
    then exact sums over the group's values."""
    k, c = mu.shape
    if c == 0 or x.shape[1] == 0:
        return mu.new_zeros(3 * k + 1, c)
    with _small(x):
        centre, spread = _centres(mu, var.sqrt())
    out, low = _estep_fast(x, mu, var, log_pi, centre, chunk, w=w, s2=s2, stats=stats, rows=rows)
    with _small(x):
        redo = torch.nonzero((spread > _R_MAX) | low).squeeze(1)
    if redo.numel():
        src = redo if rows is None else rows[redo]
        out[:, redo] = _estep_plain(x[src], mu[:, redo], var[:, redo], log_pi[:, redo], chunk, w=w,
                                    s2=None if s2 is None else s2[src], stats=stats)
    return out


def _centres(mu: torch.Tensor, sd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per column of (K, C) means and deviations: the centre ``m`` minimising ``max_k |mu_k - m| / sd_k`` and
    that maximum (both (C,)). The minimum is the largest ``|mu_i - mu_j| / (sd_i + sd_j)`` over pairs, reached
    at that pair's balance point ``(mu_i sd_j + mu_j sd_i) / (sd_i + sd_j)``."""
    k, c = mu.shape
    gap = (mu[:, None] - mu[None, :]).abs() / (sd[:, None] + sd[None, :])  # (K, K, C)
    pair = gap.reshape(k * k, c).argmax(dim=0)
    i, j = (pair // k)[None], (pair % k)[None]
    mi, mj, si, sj = mu.gather(0, i)[0], mu.gather(0, j)[0], sd.gather(0, i)[0], sd.gather(0, j)[0]
    centre = (mi * sj + mj * si) / (si + sj)
    return centre, ((mu - centre).abs() / sd).amax(dim=0)


def _estep_fast(
    x: torch.Tensor, mu: torch.Tensor, var: torch.Tensor, log_pi: torch.Tensor, centre: torch.Tensor,
    chunk: int | None, *, w: torch.Tensor | None, s2: torch.Tensor | None, stats: bool,
    rows: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The fast form (module docstring) on every row: the (3K+1, C) sums and which rows had a value whose
    ``p(x) e^-cmax`` fell below ``_TINY`` (their sums are then not to be used)."""
    k, c = mu.shape
    n = x.shape[1]
    with _small(x):
        shift = mu - centre  # (K, C): the means about the centre
        head = log_pi - 0.5 * (torch.log(var) + _LOG_2PI)
        cmax = head.amax(dim=0)  # (C,)
        coef = torch.stack([shift / var, -0.5 / var], dim=2).transpose(0, 1).contiguous()  # (C, K, 2): [B, A]
        const = (head - cmax - 0.5 * shift.square() / var).t().unsqueeze(2).contiguous()  # (C, K, 1)
    native = _native_fast(x, centre, coef, const, w, s2, stats, rows)
    if native is not None:
        sums, loglik, tmin = native
    else:
        if rows is not None:
            x, s2 = x[rows], None if s2 is None else s2[rows]
        sums, loglik, tmin = _fast_blocks(x, centre, coef, const, chunk, w, s2, stats)
    with _small(x):
        low = tmin < _TINY
        out = mu.new_empty(3 * k + 1, c)
        out[3 * k] = loglik + cmax * (float(n) if w is None else w.sum())
        if stats:
            s0, sy, sq = sums.permute(2, 1, 0)  # (K, C) each
            out[:k] = s0
            out[k : 2 * k] = sy - shift * s0  # sum r (x - mu)
            out[2 * k : 3 * k] = sq - 2.0 * shift * sy + shift.square() * s0  # sum r (x - mu)^2 (+ s2)
    return out, low


def _small(x: torch.Tensor) -> Any:
    """A context for the per-channel arithmetic around the sums: one thread on the CPU (normswap.core.threads)."""
    return serial() if x.device.type == "cpu" else nullcontext()


def _native_fast(x: torch.Tensor, centre: torch.Tensor, coef: torch.Tensor, const: torch.Tensor,
                 w: torch.Tensor | None, s2: torch.Tensor | None, stats: bool,
                 rows: torch.Tensor | None = None) -> tuple | None:
    """:func:`_fast_blocks`' sums from the native kernel (normswap/native/csrc/calib_estep.cpp: one pass over each
    row, every row's sums its own), or None where it does not apply (off or unbuilt, another device or dtype)."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or centre.dtype != torch.float64 \
            or coef.shape[1] > 64 or torch.compiler.is_compiling():
        return None
    o = native_ops()
    if o is None:
        return None
    f64 = lambda t: None if t is None else t.to(torch.float64).contiguous()  # noqa: E731
    c, k = coef.shape[:2]
    sums, loglik, tmin = o.estep_fast(x.contiguous(), rows, centre.contiguous(), coef.contiguous(),
                                      const.reshape(c, k).contiguous(), f64(w), f64(s2), stats)
    return sums, loglik, tmin


def _fast_blocks(x: torch.Tensor, centre: torch.Tensor, coef: torch.Tensor, const: torch.Tensor, chunk: int | None,
                 w: torch.Tensor | None, s2: torch.Tensor | None, stats: bool) -> tuple:
    """The fast form's sums in torch operations, over blocks of rows and columns: ``(sums (C, K, 3), loglik (C,),
    tmin (C,))`` with ``tmin`` each row's smallest ``p(x) e^-cmax``."""
    c, k = coef.shape[:2]
    n = x.shape[1]
    cols = _cols(n, chunk)
    rows = max(1, _FAST_WORK // (k * cols))
    feat = coef.new_empty(rows, 2, cols)  # [y, y^2 (+ s2)]
    scaled = coef.new_empty(rows, 3, cols)  # [1, y, y^2 (+ s2)] * w / p(x)
    dens = coef.new_empty(rows * k * cols)  # (rows, K, cols) p_k(x) e^-cmax, then tau_k(x)
    sums = coef.new_zeros(c, k, 3)  # sum r, sum r y, sum r y^2 (+ s2), weighted
    loglik = coef.new_zeros(c)
    tmin = coef.new_full((c,), math.inf)  # smallest p(x) e^-cmax of each row
    for r0 in range(0, c, rows):
        r1 = min(c, r0 + rows)
        nr = r1 - r0
        xr, mr, cr, kr, sr, lr, tr = (x[r0:r1], centre[r0:r1, None], coef[r0:r1], const[r0:r1], sums[r0:r1],
                                      loglik[r0:r1], tmin[r0:r1])
        for c0 in range(0, n, cols):
            c1 = min(n, c0 + cols)
            f = feat[:nr, :, : c1 - c0]
            y = torch.sub(xr[:, c0:c1], mr, out=f[:, 0])
            q = torch.mul(y, y, out=f[:, 1])
            if s2 is not None:
                q.add_(s2[r0:r1, c0:c1])
            e = torch.bmm(cr, f, out=dens[: nr * k * (c1 - c0)].view(nr, k, c1 - c0)).add_(kr).exp_()
            g = scaled[:nr, :, : c1 - c0]
            tot = torch.sum(e, dim=1, out=g[:, 0])  # p(x) e^-cmax
            torch.minimum(tr, tot.amin(dim=1), out=tr)
            lse = tot.log()
            lr += (lse if w is None else lse.mul_(w[:, c0:c1])).sum(dim=1)
            if not stats:
                continue
            inv = torch.reciprocal(tot, out=g[:, 0]) if w is None else torch.div(w[:, c0:c1], tot, out=g[:, 0])
            torch.mul(f, inv.unsqueeze(1), out=g[:, 1:])
            sr.baddbmm_(e, g.transpose(1, 2))
    return sums, loglik, tmin


def _estep_plain(
    x: torch.Tensor, mu: torch.Tensor, var: torch.Tensor, log_pi: torch.Tensor, chunk: int | None = None, *,
    w: torch.Tensor | None = None, s2: torch.Tensor | None = None, stats: bool = True,
) -> torch.Tensor:
    """The plain form (module docstring): the same sums as :func:`estep`."""
    k, c = mu.shape
    out = mu.new_zeros(3 * k + 1, c)
    const = (log_pi - 0.5 * (torch.log(var) + _LOG_2PI)).unsqueeze(2)
    neg_half_inv = (-0.5 / var).unsqueeze(2)
    mu3 = mu.unsqueeze(2)
    for rs, cs in _blocks(c, x.shape[1], k, chunk):
        d = x[rs, cs].unsqueeze(0) - mu3[:, rs]  # (K, rows, cols)
        sq = d.square()
        if s2 is not None:
            sq.add_(s2[rs, cs])
        logp = torch.addcmul(const[:, rs], sq, neg_half_inv[:, rs])  # log p_k(x)
        top = logp.amax(dim=0)
        r = _exp_(logp.sub_(top))
        tot = r.sum(dim=0)
        lse = tot.log().add_(top)  # log p(x) = logsumexp_k log p_k(x)
        out[3 * k, rs] += (lse if w is None else lse * w[:, cs]).sum(dim=1)
        if not stats:
            continue
        r.div_(tot)  # tau_k(x)
        if w is not None:
            r.mul_(w[:, cs])
        out[:k, rs] += r.sum(dim=2)
        out[k : 2 * k, rs] += d.mul_(r).sum(dim=2)
        out[2 * k : 3 * k, rs] += sq.mul_(r).sum(dim=2)
    return out
