"""UAN channel mode, computed near its memory-traffic floor (docs/methods.md section 3.1).

The layer's output, with the affine folded into per-component coefficients of shape (K, C) and (C,)::

    z_k = a_k x + c_k                    a_k = 1 / sqrt(v_k),  c_k = -mu_k a_k
    l_k = b_k - z_k^2 / 2                b_k = log pi_k - log(v_k) / 2   (the 2 pi term cancels in tau)
    tau = softmax_k l_k                  (the max over k subtracted: no 0/0 in the tails; differences
                                          below fused.EXP_FLOOR are floored there)
    y   = sum_k tau_k g_k z_k + p x + q  g_k = rho gamma / sqrt(K pi_k), p = (1 - rho) gamma / sqrt(s2),
                                         q = beta - p m

which is ``gamma ((1 - rho) x_one + rho x_mix) + beta`` term for term. ``p`` is ``None`` when
``rho == 1`` (a dead term skipped) and ``q`` is ``None`` when it is known to be zero.

By default eager calls, forward and backward, run the native kernel ``normswap/native/csrc/uan_channel.cpp``
(one pass over ``x``; docs/native.md) whenever :func:`normswap.native.ops` hands out the library and ``x`` is
contiguous; the blocked torch kernel below is its fallback (``NORMSWAP_NATIVE=0``, no compiler, other layouts)
and the reference the tests compare it with.

Eagerly the input is processed in blocks of about :data:`BLOCK` values per component (whole samples,
or channel ranges of one sample), so the ``(K, block)`` temporaries stay in cache and the peak memory
is the output plus a few blocks, whatever the batch. Without autograd the temporaries are reused in
place. With autograd a :class:`torch.autograd.Function` saves only ``x`` and recomputes the block in
its hand-written backward (checked against autograd of the plain formula in tests/test_uan_kernel.py).
Under ``torch.fx`` tracing or ``torch.compile`` the formula runs once over the whole input as the
pointwise expression of :mod:`normswap.variants.uan.fused` (unrolled over K, so inductor fuses it into
one loop), and autograd (or the compiler) takes over; ``NORMSWAP_COMPILE=1`` runs that expression
compiled in eager calls too. All of it runs in ``x``'s dtype promoted to
float32 at least, and casts back once per block.
"""

from __future__ import annotations

import math

import torch
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from normswap.native import ops
from normswap.variants.uan.fused import compiled_enabled, exp_floor, pointwise_mixture, run_compiled

__all__ = ["BLOCK", "channel_coefficients", "channel_mixture", "coincide", "needs_floor", "tracing"]

BLOCK = 1 << 16  # values per component in one block (K * 256 KiB of float32 temporaries)


def channel_coefficients(
    mu: torch.Tensor, var: torch.Tensor, log_pi: torch.Tensor, k: int, rho: torch.Tensor,
    weight: torch.Tensor | None, bias: torch.Tensor | None, mean: torch.Tensor, s2: torch.Tensor,
    *, one_dead: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """``(a, c, b, g, p, q)`` of the module docstring from the (floored) component parameters (K, C),
    their number ``k``, ``rho``, the affine and the single-Gaussian statistics ``mean`` and
    ``s2 = running_var + eps`` (C,).
    ``one_dead`` (rho == 1, known from Python) drops ``p``; differentiable in every input."""
    a = torch.rsqrt(var)
    c = -mu * a
    b = log_pi - 0.5 * torch.log(var)
    g = rho * torch.exp(-0.5 * (log_pi + math.log(k)))
    if weight is not None:
        g = g * weight
    p = q = None
    if not one_dead:
        p = (1.0 - rho) * torch.rsqrt(s2)
        if weight is not None:
            p = p * weight
        q = -p * mean
    if bias is not None:
        q = bias if q is None else q + bias
    return a, c, b, g, p, q


def tracing() -> bool:
    """True under ``torch.fx`` symbolic tracing or ``torch.compile``: one plain pass, no Python branches
    on values (a compiled ramp keeps one graph for every ``rho > 0``)."""
    return is_fx_symbolic_tracing() or torch.compiler.is_compiling()


def _view(t: torch.Tensor | None, lead: tuple[int, ...], ndim: int) -> torch.Tensor | None:
    return None if t is None else t.reshape(lead + (-1,) + (1,) * (ndim - 2))


class _Work:
    """Flat buffers that every block of one call reuses: a fresh (K, block) temporary per operation
    costs page faults (large allocations are fresh mappings), and reused ones stay in cache."""

    def __init__(self, like: torch.Tensor) -> None:
        self.like, self.bufs = like, {}

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        n = math.prod(shape)
        buf = self.bufs.get(name)
        if buf is None or buf.numel() < n:
            buf = self.bufs[name] = torch.empty(n, dtype=self.like.dtype, device=self.like.device)
        return buf[:n].view(shape)


def _floor(l: torch.Tensor, work: _Work) -> torch.Tensor:
    """``l`` (K, ...) raised in place to at least ``max_k l - floor`` (:func:`exp_floor`): the softmax over K
    then never exponentiates below the floor. Skipped (``floor=False``) where the components coincide."""
    top = torch.amax(l, dim=0, keepdim=True, out=work.get("top", (1,) + tuple(l.shape[1:])))
    return torch.maximum(l, top.add_(exp_floor(l.dtype)), out=l)


def _mix(x: torch.Tensor, a, c, b, g, p, q, work: _Work, out: torch.Tensor | None = None, *,
         floor: bool = True) -> torch.Tensor:
    """The module docstring's ``y`` of one block ``x`` (n, C', ...) with coefficients viewed to
    broadcast: (K, 1, C', 1...) and (1, C', 1...); the temporaries are ``work``'s buffers and ``y``
    lands in ``out``. Each operation is a binary one or has one broadcast operand, so it runs
    vectorised; the responsibilities are one softmax over K (max, exp, sum and divide in one kernel),
    of ``l`` floored (:func:`_floor`) unless ``floor`` is False (coinciding components: all ``l_k`` equal)."""
    shape = (a.shape[0],) + tuple(x.shape)
    z = torch.mul(x.unsqueeze(0), a, out=work.get("z", shape)).add_(c)
    l = torch.addcmul(b, z, z, value=-0.5, out=work.get("l", shape))
    tau = torch.ops.aten._softmax.out(_floor(l, work) if floor else l, 0, False, out=work.get("tau", shape))
    y = torch.sum(tau.mul_(z.mul_(g)), dim=0, out=out if out is not None else work.get("y", tuple(x.shape)))
    if p is not None:
        y.addcmul_(x, p)
    return y.add_(q) if q is not None else y


def _blocks(shape: torch.Size):
    """(sample slice, channel slice) pairs covering ``shape`` in blocks of about BLOCK values per component."""
    n, c = shape[0], shape[1]
    per_channel = math.prod(shape[2:])
    per_sample = c * per_channel
    if per_sample <= BLOCK:
        step = max(1, BLOCK // max(1, per_sample))
        for i in range(0, n, step):
            yield slice(i, i + step), slice(None)
        return
    step_c = max(1, BLOCK // max(1, per_channel))
    for i in range(n):
        for j in range(0, c, step_c):
            yield slice(i, i + 1), slice(j, j + step_c)


def _native(x: torch.Tensor, coeffs) -> tuple | None:
    """``(ops, x in the compute dtype, contiguous coefficients)`` when the native kernel
    (normswap/native/csrc/uan_channel.cpp) can run this call, else ``None`` (the eager blocks run): the library
    on, a contiguous CPU ``x`` (other layouts, e.g. channels-last, stay eager) and float32/float64 coefficients.
    Half and bfloat16 inputs are converted to the compute dtype and back, as the eager blocks do."""
    o = ops()
    if o is None or not _native_takes(x, coeffs[0]):
        return None
    return o, x.to(coeffs[0].dtype), tuple(None if t is None else t.contiguous() for t in coeffs)


def _native_takes(x: torch.Tensor, a: torch.Tensor) -> bool:
    """Whether the native kernel takes ``x`` with coefficients like ``a`` (the library aside)."""
    return (x.device.type == "cpu" and x.is_contiguous() and x.dim() >= 2 and a.device.type == "cpu"
            and a.dtype in (torch.float32, torch.float64))


def _forward(x: torch.Tensor, coeffs, cdt: torch.dtype, floor: bool = True) -> torch.Tensor:
    """The formula's ``y`` without a graph: the native kernel where it runs (it always floors, which costs it
    nothing), else the eager blocks."""
    native = _native(x, coeffs)
    if native is None:
        return _forward_blocks(x, coeffs, cdt, floor)
    o, xc, cs = native
    return o.uan_channel_forward(xc, *cs).to(x.dtype)


def _block_coeffs(coeffs, cs: slice, ndim: int):
    a, c, b, g, p, q = (None if t is None else t[..., cs] for t in coeffs)
    return (*(_view(t, (t.shape[0], 1), ndim) for t in (a, c, b, g)), _view(p, (1,), ndim), _view(q, (1,), ndim))


def _forward_blocks(x: torch.Tensor, coeffs, cdt: torch.dtype, floor: bool = True) -> torch.Tensor:
    out = torch.empty_like(x)
    work = _Work(coeffs[0])
    for ns, cs in _blocks(x.shape):
        target = out[ns, cs]
        y = _mix(x[ns, cs].to(cdt), *_block_coeffs(coeffs, cs, x.dim()), work=work, floor=floor,
                 out=target if x.dtype == cdt else None)
        if y is not target:
            target.copy_(y)
    return out


class _ChannelMixture(torch.autograd.Function):
    """Blocked forward without a graph; backward recomputes each block from ``x`` (the only saved
    activation) and applies the derivatives of the module docstring's formula::

        t = tau, w_k = g_k z_k, m = sum_k t_k w_k, u = dL/dy
        dl_k = u t_k (w_k - m)           -> db_k = sum dl_k
        dz_k = u t_k g_k - dl_k z_k      -> dc_k = sum dz_k, da_k = sum dz_k x
        dg_k = sum u t_k z_k,  dp = sum u x,  dq = sum u,  dx = u p + sum_k dz_k a_k
    """

    @staticmethod
    def forward(ctx, x, a, c, b, g, p, q):  # type: ignore[override]
        cdt = a.dtype
        coeffs = (a, c, b, g, p, q)
        ctx.save_for_backward(x, *(t for t in coeffs if t is not None))
        ctx.has = (p is not None, q is not None)
        ctx.native = ops() is not None and _native_takes(x, a)  # the backward takes the path the forward took
        with torch.no_grad():
            return _forward(x, coeffs, cdt)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):  # type: ignore[override]
        x, a, c, b, g, *rest = ctx.saved_tensors
        p = rest.pop(0) if ctx.has[0] else None
        q = rest.pop(0) if ctx.has[1] else None
        native = _native(x, (a, c, b, g, p, q)) if ctx.native else None
        if native is not None:
            o, xc, (a, c, b, g, p, _) = native
            dx, da, dc, db, dg, dp, dq = o.uan_channel_backward(grad.to(a.dtype).contiguous(), xc, a, c, b, g, p)
            return dx.to(x.dtype), da, dc, db, dg, dp if p is not None else None, dq if q is not None else None
        cdt, k, nd = a.dtype, a.shape[0], x.dim()
        acc = {name: torch.zeros_like(a) for name in ("a", "c", "b", "g")}
        dp = torch.zeros_like(p) if p is not None else None
        dq = torch.zeros_like(q) if q is not None else None
        dx = torch.empty_like(x)
        kdims = (1,) + tuple(range(3, nd + 1))  # (K, n, C', ...) -> (K, C')
        cdims = (0,) + tuple(range(2, nd))  # (n, C', ...) -> (C',)
        work = _Work(a)
        for ns, cs in _blocks(x.shape):
            xb, u = x[ns, cs].to(cdt), grad[ns, cs].to(cdt)
            ab, cb, bb, gb, pb, _ = _block_coeffs((a, c, b, g, p, None), cs, nd)
            shape, one = (k,) + tuple(xb.shape), (1,) + tuple(xb.shape)
            tmp = work.get("tmp", shape)
            z = torch.mul(xb.unsqueeze(0), ab, out=work.get("z", shape)).add_(cb)
            t = _floor(torch.addcmul(bb, z, z, value=-0.5, out=work.get("t", shape)), work)
            t = torch.ops.aten._softmax.out(t, 0, False, out=work.get("tau", shape))  # tau, as forward's
            w = torch.mul(z, gb, out=work.get("w", shape))
            m = torch.sum(torch.mul(t, w, out=tmp), dim=0, keepdim=True, out=work.get("m", one))
            ut = t.mul_(u)
            acc["g"][:, cs] += torch.mul(ut, z, out=tmp).sum(dim=kdims)
            dl = w.sub_(m).mul_(ut)
            acc["b"][:, cs] += dl.sum(dim=kdims)
            dz = ut.mul_(gb).sub_(dl.mul_(z))
            acc["c"][:, cs] += dz.sum(dim=kdims)
            acc["a"][:, cs] += torch.mul(dz, xb, out=tmp).sum(dim=kdims)
            target = dx[ns, cs]
            dxb = torch.sum(dz.mul_(ab), dim=0, out=target if x.dtype == cdt else work.get("dx", tuple(xb.shape)))
            if pb is not None:
                dxb.addcmul_(u, pb)
                dp[cs] += torch.mul(u, xb, out=work.get("ux", tuple(xb.shape))).sum(dim=cdims)
            if dq is not None:
                dq[cs] += u.sum(dim=cdims)
            if dxb is not target:
                target.copy_(dxb)
        return dx, acc["a"], acc["c"], acc["b"], acc["g"], dp, dq


def channel_mixture(x: torch.Tensor, a, c, b, g, p, q, *, k: int, floor: bool = True) -> torch.Tensor:
    """``y`` of the module docstring for (N, C, ...) inputs and coefficients (K, C), (C,) of the compute
    dtype (``k`` = K as a Python int); returned in ``x``'s dtype. Traced (fx, ``torch.compile``) it is
    :func:`normswap.variants.uan.fused.pointwise_mixture`, which compiles to one fused loop; eagerly,
    the native kernel where the library is built and takes ``x``, else that expression compiled when
    ``NORMSWAP_COMPILE=1``, else the blocked kernel below. ``floor=False``
    (components known to coincide, :func:`coincide`) lets the eager forward skip the exponent floor."""
    cdt = a.dtype
    if tracing():
        tail = (1,) * (x.dim() - 2)
        views = [None if t is None else t.reshape(lead + (-1,) + tail)
                 for t, lead in zip((a, c, b, g, p, q), ((k,),) * 4 + ((),) * 2)]
        return pointwise_mixture(x, k, *views)
    if compiled_enabled() and (ops() is None or not _native_takes(x, a)):  # native first: it measured faster
        return run_compiled(x, k, a, c, b, g, p, q)
    tensors = (x, a, c, b, g, p, q)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _ChannelMixture.apply(*tensors)
    with torch.no_grad():
        return _forward(x, (a, c, b, g, p, q), cdt, floor)


def coincide(a: torch.Tensor, c: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether the K components of every channel coincide (``a, c, b`` (K, C) equal over K): then every
    ``l_k`` is the same, the responsibilities are exactly 1/K and no exponent needs a floor."""
    return all(torch.equal(t, t[:1].expand_as(t)) for t in (a, c, b))


FLOOR_SPAN, FLOOR_GAP = 6.0, 60.0  # see needs_floor


def needs_floor(a: torch.Tensor, c: torch.Tensor, b: torch.Tensor, mean: torch.Tensor, sd: torch.Tensor) -> bool:
    """Whether the eager kernel should floor its exponents (a speed choice only: the output is the same
    either way). False when, for inputs within ``FLOOR_SPAN`` standard deviations ``sd`` of ``mean`` (C,) (the
    layer's running statistics), no ``l_k`` falls more than ``FLOOR_GAP`` nats below ``max_k l_k`` (float32's
    exps turn subnormal, and 30-100x slower, below about -87): then the floor's two passes would buy nothing
    for all but a few values. Checked on 65 points of that span per channel (``l_k`` differ by quadratics)."""
    if coincide(a, c, b):
        return False
    t = torch.linspace(-FLOOR_SPAN, FLOOR_SPAN, 65, dtype=a.dtype, device=a.device)
    x = mean[:, None] + sd[:, None] * t  # (C, 65)
    l = b[..., None] - 0.5 * (a[..., None] * x + c[..., None]).square()  # (K, C, 65)
    return bool(((l.amax(dim=0) - l.amin(dim=0)) > FLOOR_GAP).any())
