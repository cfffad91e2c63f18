"""UAN channel mode as one pointwise expression, unrolled over the K components, for the compiler.

The formula is the one of :mod:`normswap.variants.uan.kernel` (docs/methods.md section 3.1)::

    z_k = a_k x + c_k,  l_k = b_k - z_k^2 / 2,  tau = softmax_k l_k,  y = sum_k tau_k g_k z_k + p x + q

written with one tensor per component (``K`` is a Python int) instead of a leading ``K`` dimension and a
reduction over it. Eagerly that is no faster, but under ``torch.compile`` inductor turns it into a
single vectorised loop over ``x`` (read ``x`` once, write ``y`` once, K exponentials per value), where the
``(K, ...)`` form compiles to reductions that barely beat eager mode. It is what the layer runs under
``torch.fx`` / ``torch.compile`` tracing, so ``torch.compile(model)`` gets the fused loop.

Opt-in compiled kernel: with the environment variable ``NORMSWAP_COMPILE=1`` (or
:func:`set_compiled` ``(True)``), eager calls of the layer run this expression through
``torch.compile(dynamic=True)`` (one compile per K and dtype, about 10 s the first time in a process,
less with inductor's on-disk cache; gradients by AOTAutograd). It needs a C++ compiler at run time,
which is why it is not the default.
"""

from __future__ import annotations

import torch

from normswap.variants.compiled import requested

__all__ = ["EXP_FLOOR", "compiled_enabled", "exp_floor", "pointwise_mixture", "run_compiled", "set_compiled"]

# The lowest exponent ``l_k - max_k l_k`` exponentiated, per compute dtype: below about -87 (float32) or
# -708 (float64) exp's result is subnormal, and x86 computes exps and products of subnormals 30-100x slower.
# Calibrated components are far apart in units of their own spread, so most values sit that far in some
# component's tail (one 96-channel layer: the eager kernel 2x, the compiled one 4x slower than with
# coinciding components). Flooring the exponent changes a weight below exp(-64) = 1.6e-28 of the largest
# (21 orders of magnitude below float32's resolution) to exactly that: the output does not move.
EXP_FLOOR = {torch.float32: -64.0, torch.float64: -512.0}

_STATE: dict[str, object] = {"enabled": None, "fn": None}


def exp_floor(dtype: torch.dtype) -> float:
    """The lowest exponent ``l_k - max_k l_k`` the kernels exponentiate in ``dtype`` (:data:`EXP_FLOOR`)."""
    return EXP_FLOOR.get(dtype, EXP_FLOOR[torch.float32])


def pointwise_mixture(x: torch.Tensor, k: int, a: torch.Tensor, c: torch.Tensor, b: torch.Tensor, g: torch.Tensor,
                      p: torch.Tensor | None, q: torch.Tensor | None) -> torch.Tensor:
    """``y`` for ``x`` (N, C, ...) with coefficients viewed to broadcast: ``a, c, b, g`` (K, C, 1...) and
    ``p, q`` (C, 1...) or ``None``; computed in the coefficients' dtype and returned in ``x``'s."""
    xf = x.to(a.dtype)
    zs = [xf * a[i] + c[i] for i in range(k)]
    ls = [b[i] - 0.5 * (z * z) for i, z in enumerate(zs)]
    top = ls[0]
    for l in ls[1:]:
        top = torch.maximum(top, l)
    top = top.detach()  # softmax is shift-invariant: no gradient through the shift
    floor = exp_floor(a.dtype)  # no subnormal exps
    num = den = None
    for i, (z, l) in enumerate(zip(zs, ls)):
        e = torch.exp(torch.clamp_min(l - top, floor))
        num = e * (g[i] * z) if num is None else num + e * (g[i] * z)
        den = e if den is None else den + e
    y = num / den
    if p is not None:
        y = y + p * xf
    if q is not None:
        y = y + q
    return y.to(x.dtype)


def set_compiled(enabled: bool) -> None:
    """Turn the compiled channel-mode kernel on or off for this process (overrides ``NORMSWAP_COMPILE``)."""
    _STATE["enabled"] = bool(enabled)


def compiled_enabled() -> bool:
    """Whether eager UAN channel-mode calls run the compiled kernel (``NORMSWAP_COMPILE=1`` or :func:`set_compiled`)."""
    if _STATE["enabled"] is None:
        _STATE["enabled"] = requested()
    return bool(_STATE["enabled"])


def run_compiled(x: torch.Tensor, k: int, a: torch.Tensor, c: torch.Tensor, b: torch.Tensor, g: torch.Tensor,
                 p: torch.Tensor | None, q: torch.Tensor | None) -> torch.Tensor:
    """:func:`pointwise_mixture` through ``torch.compile`` (compiled on first use; coefficients (K, C), (C,))."""
    fn = _STATE["fn"]
    if fn is None:
        fn = _STATE["fn"] = torch.compile(pointwise_mixture, dynamic=True)
    tail = (1,) * (x.dim() - 2)
    view = lambda t, lead: None if t is None else t.reshape(lead + (-1,) + tail).contiguous()  # noqa: E731
    return fn(x, k, *(view(t, (k,)) for t in (a, c, b, g)), view(p, ()), view(q, ()))
