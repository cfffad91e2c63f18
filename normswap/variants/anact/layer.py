"""The ANAct layer: a normalised activation function, with a strength homotopy (the registered variant,
which finds sites and folds compensation into consumers, is :mod:`normswap.variants.anact.variant`).

Paper: P. Yuan, H. Liu, C. Zhu, Y. Wang, "ANAct: Adaptive Normalization for Activation Functions",
arXiv 2208.13315. Specification: docs/methods.md sections 0 and 2. For an activation ``f`` at one site
with pre-activation ``X``::

    rho   = E[f(X)^2] / Var[X]            # forward gain (Var: population variance, ddof 0)
    rho'  = E[f'(X)^2]                    # backward gain, f' exact (normswap.variants.anact.activations)
    lam   = sqrt((rho + rho') / (2 rho rho'))
    c     = lam + 0.3 tanh(alpha)         # alpha: learnable scalar, init 0
    f_hat = c * (f(X) - mu)               # mu: running mean of f(X)

Statistics (no gradient; computed in float32, or float64 for float64 inputs, and stored, like ``alpha``, in
the model's floating dtype, which conversion gives them (:meth:`follow`); one scalar per site or, with
``per_channel``, one per channel of dim 1 while ``alpha`` stays a scalar): EMA with rejection in training,
frozen in eval, exact sums in calibration, at every strength (:mod:`normswap.variants.anact.stats`).
``lam`` always uses the running values, so gradients flow through ``f`` and ``alpha`` only. Initial
``rho = rho' = 1, mu = 0`` give ``c = 1`` (normswap design).

Speed (docs/speed.md): without gradients to ``alpha`` the map ``a f + b`` is cached per parameter and buffer
version and applied in one vectorised pass, ``torch.add(b, f, alpha=a)`` (``addcmul`` with two broadcast
operands runs as a scalar loop), in place on ``f`` when nothing else can read it: ``f`` is a fresh tensor,
or ``reuse_input`` (set from the plan's facts) says the in-place activation's input has no other reader.
With gradients (training) it is :class:`AffineMap`, the same forward with a hand-written backward.

Strength and exactness (docs/methods.md sections 0, 2.2 and 2.4; normswap design). The strength ``s`` in [0, 1] is the
``strength`` buffer (float32, in the state_dict) with a Python mirror ``_s`` that decides the
branches, so ``s == 0`` never reads a tensor value (torch.fx / torch.compile). Two kinds of site:

- **folded** (``folded = True``): every consumer absorbs ``c`` and ``mu`` (:func:`fold_into_consumer`,
  ``W' = W / c``, ``b' = b + W mu``), exactly where :func:`compensation_status` says "exact" (or
  approximately, with ``allow_inexact``). The layer computes ``c (f - mu)`` at *every* strength: the
  folded consumers make the network exact at every strength, so strength does not change the function
  there, only the parametrisation training sees. ``compensated`` says the fold matches the current
  statistics; a training update or a calibration clears it until the refold (``after_calibration``).
- **unfolded** (a residual add, a zero-padded conv, a non-affine consumer, a shared module: nothing
  absorbs the map): the output is the blend ``(1 - s) f + s c (f - mu)``, affine in ``f`` as
  ``c_s (f - mu_s)`` with ``c_s = 1 + s (c - 1)``, ``mu_s = s c mu / c_s`` (:meth:`affine`): exactly
  ``f`` at 0 (bit for bit, the value ``act`` returns) and the paper's layer at 1.

:meth:`claims_exact`: folded: ``compensated``; unfolded: ``s == 0``; either: ``c == 1 and mu == 0``.
Export (:func:`export_fold`) folds an exact folded site's ``c`` and ``mu`` back into its consumers and
puts the plain activation back; an unfolded site at strength 0 simply becomes its plain activation;
an unfolded site at ``s > 0`` stays ANAct. State_dict: ``act.*`` (none for most), ``alpha``, ``running_rho``,
``running_rho_prime``, ``running_mean``, ``num_batches_tracked``, ``strength``; folding adds a ``bias`` key
to a consumer without one. A file from before the strength
buffer loads strictly: unfolded sites get strength 1 (that layer always computed ``c (f - mu)``),
folded ones keep the plan's strength (their function does not depend on it).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from normswap.errors import NormswapError
from normswap.variants.anact.activations import make_activation, resolve_activation
from normswap.native import ops as native_ops
from normswap.variants.anact.stats import NATIVE_KINDS, ANActStatistics
from normswap.variants.cache import cache_for
from normswap.variants.calibration import CalibrationSettings
from normswap.variants.strength import StrengthMirror

__all__ = ["ANActLayer"]

_TINY = 1e-12  # floor of rho and rho' inside lam (a dead unit would otherwise give 0/0)


class AffineMap(torch.autograd.Function):
    """``a f + b`` with ``a``, ``b`` broadcast along ``f`` (0-dim, or ``(C, 1, ...)`` per channel) and a hand-written
    backward: ``df = a g``, ``da = sum(g f)``, ``db = sum(g)`` over the broadcast dims. On the CPU the eager
    ``addcmul(b, f, a)`` with two broadcast 0-dim operands runs as a scalar loop, forward and backward (its
    gradients to ``a`` and ``b`` also go through full-size products and broadcast-reducing sums); here a scalar
    site is one vectorised ``torch.add(b, f, alpha=a)`` forward and, backward, one vectorised pass for ``df``, a dot
    product for ``da`` and a sum for ``db``, each only when that input needs it. First order only (``once_differentiable``); tests/test_anact_fast.py checks it
    against autograd of ``addcmul`` in float64 (``torch.autograd.gradcheck``)."""

    @staticmethod
    def forward(ctx: Any, f: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(f if ctx.needs_input_grad[1] else None, a)
        ctx.a_shape, ctx.b_shape = a.shape, b.shape
        if a.dim() == 0 and f.device.type == "cpu":
            return torch.add(b, f, alpha=a.item())
        return torch.addcmul(b, f, a)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, g: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        f, a = ctx.saved_tensors
        grad_f = grad_a = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_f = torch.mul(g, a.item()) if a.dim() == 0 and g.device.type == "cpu" else g * a
        if ctx.needs_input_grad[1]:
            dot = not ctx.a_shape and g.is_contiguous() and f.is_contiguous()  # one read of each, no product written
            grad_a = torch.dot(g.view(-1), f.view(-1)) if dot else _sum_to(g * f, ctx.a_shape)
        if ctx.needs_input_grad[2]:
            grad_b = _sum_to(g, ctx.b_shape)
        return grad_f, grad_a, grad_b


def _sum_to(t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """``t`` summed over the dims that ``shape`` broadcasts along it (right-aligned), reshaped to ``shape``."""
    lead = t.dim() - len(shape)
    dims = [d for d in range(t.dim()) if d < lead or shape[d - lead] == 1 != t.shape[d]]
    return (t.sum(dims) if dims else t).reshape(shape)


_EXACT_NATIVE = ("relu", "relu6", "leaky_relu")  # max / min / one multiply: torch's values, bit for bit


class ANActLayer(StrengthMirror, ANActStatistics, nn.Module):
    """``c * (f(x) - mu)`` around a kept activation module ``act``, blended in by strength where it is not
    folded into the consumers; see the module docstring."""

    def __init__(self, act: nn.Module | str, *, per_channel: bool = False, channels: int | None = None,
                 momentum: float = 0.9, reject: float = 0.2, strength: float = 0.0, folded: bool = False,
                 reuse_input: bool = False, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        act = make_activation(act) if isinstance(act, str) else act
        self.kind, self.act_params = resolve_activation(act)
        self.act = copy.deepcopy(act)
        if per_channel and not (isinstance(channels, int) and channels > 0):
            raise NormswapError(f"ANAct per_channel needs a positive channel count; got {channels!r}")
        self.per_channel, self.channels = bool(per_channel), (int(channels) if per_channel else None)
        self.momentum, self.reject, self.folded = float(momentum), float(reject), bool(folded)
        shape = (self.channels,) if per_channel else ()
        factory = {"device": device, "dtype": dtype or torch.float32}
        self.alpha = nn.Parameter(torch.zeros((), **factory))
        self.register_buffer("running_rho", torch.ones(shape, **factory))
        self.register_buffer("running_rho_prime", torch.ones(shape, **factory))
        self.register_buffer("running_mean", torch.zeros(shape, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        self.init_strength(strength, like=self.running_mean)  # the mirror ``_s`` decides the branches in forward
        self.compensated, self._calibrating, self._acc, self._folded = False, False, None, None
        self._settings: CalibrationSettings | None = None
        self.reuse_input = bool(reuse_input)

    # ---- the layer ---------------------------------------------------------------------------------
    def scale(self) -> torch.Tensor:
        """``c = lam + 0.3 tanh(alpha)`` from the running values (shape () or (C,); grad flows to alpha)."""
        rho, rho_p = self.running_rho.clamp_min(_TINY), self.running_rho_prime.clamp_min(_TINY)
        return torch.sqrt((rho + rho_p) / (2 * rho * rho_p)) + 0.3 * torch.tanh(self.alpha)

    def shift(self) -> torch.Tensor:
        """``mu``: the running mean of ``f(X)`` (shape () or (C,))."""
        return self.running_mean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._calibrating:
            self._observe(x)
        elif self.training:
            self._update(x)
        if self._s == 0.0 and not self.folded:
            return self.act(x)  # the source activation itself: no tensor value is read (torch.fx, torch.compile)
        fused = self._native_map(x)
        if fused is not None:
            return fused
        f = self.act(x)  # after the statistics: an in-place activation may overwrite x
        if not isinstance(f, torch.Tensor) or self.training or torch.compiler.is_compiling() or (
                torch.is_grad_enabled() and self.alpha.requires_grad):
            scale, shift = self._coefficients(f)  # traced, or gradients flow to alpha
            if not isinstance(f, torch.Tensor) or torch.compiler.is_compiling():
                return torch.addcmul(shift, f, scale)
            return AffineMap.apply(f, scale, shift)
        scale, shift = self._frozen(f)
        if (torch.is_grad_enabled() and f.requires_grad) or (f is x and not self.reuse_input):
            out = torch.mul(f, scale) if torch.is_tensor(scale) else torch.add(shift, f, alpha=scale)
            return out.add_(shift) if torch.is_tensor(scale) else out
        if torch.is_tensor(scale):  # per channel: two passes in place
            return f.mul_(scale).add_(shift)
        return torch.add(shift, f, alpha=scale, out=f)  # one vectorised pass, in place

    def _native_map(self, x: torch.Tensor) -> torch.Tensor | None:
        """The frozen per-site map ``a f(x) + b`` in one pass of the native kernel (csrc/anact_affine.cpp) where nothing
        needs two: eval without gradients, a contiguous float32/float64 CPU input, an activation whose values
        the kernel computes exactly as torch does (:data:`_EXACT_NATIVE`: a site's exact start must stay exact); in
        place on ``x`` where the eager path's result would be ``x`` itself (an in-place activation whose input has
        no other reader), else into a new tensor. None: the eager path (which also keeps an in-place activation's
        write into an input that others read)."""
        if self.training or not isinstance(x, torch.Tensor) or x.device.type != "cpu" or x.numel() == 0 \
                or x.dtype not in (torch.float32, torch.float64) or not x.is_contiguous() \
                or self.kind not in _EXACT_NATIVE or torch.compiler.is_compiling() \
                or (torch.is_grad_enabled() and (x.requires_grad or self.alpha.requires_grad)):
            return None
        inplace = bool(getattr(self.act, "inplace", False))
        if inplace and not self.reuse_input:
            return None
        o = native_ops()
        if o is None:
            return None
        scale, shift = self._frozen(x)
        if torch.is_tensor(scale):  # a per-channel map: mul_ then add_, two roundings the kernel does not repeat
            return None
        name = NATIVE_KINDS[self.kind]
        out = x if inplace else torch.empty_like(x)
        o.anact_affine(x, self.kind, float(self.act_params[name]) if name else 0.0, scale, shift.reshape(-1), out)
        return out

    def _coefficients(self, f: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(a, b)`` of the map ``a f + b`` the layer applies now, in ``f``'s dtype, shaped to broadcast
        along dim 1 when per channel; gradients flow to ``alpha``."""
        c, mu, s = self.scale().to(f.dtype), self.running_mean.to(f.dtype), self._s
        if self.training:  # a module called twice updates running_mean in place between the calls: keep a copy
            mu = mu.clone()  # for the backward of c * mu
        if self.folded or s == 1.0:  # c (f - mu) = c f - c mu
            scale, shift = c, -c * mu
        else:  # (1 - s) f + s c (f - mu), affine in f
            cs = c * s
            scale, shift = cs + (1.0 - s), -cs * mu
        if self.per_channel:  # (C,) along dim 1
            view = (-1,) + (1,) * (f.dim() - 2)
            scale, shift = scale.reshape(view), shift.reshape(view)
        return scale, shift

    def _frozen(self, f: torch.Tensor) -> tuple[torch.Tensor | float, torch.Tensor]:
        """:meth:`_coefficients` without gradients, cached (:mod:`normswap.variants.cache`) until ``alpha``, a
        statistic (replaced, moved or written in place), the strength or ``f``'s dtype, device, rank or inference
        mode changes. The scale of a scalar site is a Python float, for the one-pass ``torch.add(b, f, alpha=a)``."""
        src = (self.alpha, self.running_rho, self.running_rho_prime, self.running_mean)
        extra = (f.dtype, f.device, f.dim(), self._s, self.folded, torch.is_inference_mode_enabled())

        def build() -> tuple[torch.Tensor | float, torch.Tensor]:
            with torch.no_grad():
                scale, shift = self._coefficients(f)
            return scale if self.per_channel else float(scale), shift
        return cache_for(self).get(src, extra, build)

    def affine(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(c_s, mu_s)`` of the map ``c_s (f - mu_s)`` the layer applies to ``f`` now: ``(c, mu)`` at a
        folded site or at strength 1, ``(1, 0)`` at an unfolded site at strength 0, else
        ``c_s = 1 + s (c - 1)``, ``mu_s = s c mu / c_s`` (what :func:`export_fold` folds)."""
        c, mu, s = self.scale(), self.shift(), self._s
        if self.folded or s == 1.0:
            return c, mu
        if s == 0.0:
            return torch.ones_like(c), torch.zeros_like(mu)
        cs = 1 + s * (c - 1)
        return cs, s * c * mu / cs

    def follow(self, dtype: torch.dtype | None, device: torch.device | None) -> None:
        """Move the layer to ``device`` and its statistics and ``alpha`` to the floating ``dtype`` (the model's:
        an activation module has none to copy); ``strength`` stays float32. ``None`` leaves either as it is."""
        if device is not None:
            self.to(device=device)
        if dtype is not None and dtype.is_floating_point:
            with torch.no_grad():
                self.alpha.data = self.alpha.data.to(dtype)
                for name in ("running_rho", "running_rho_prime", "running_mean"):
                    self._buffers[name] = self._buffers[name].to(dtype)

    # ---- the variant contract -----------------------------------------------------------------------
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,  # type: ignore[override]
                              unexpected_keys, error_msgs) -> None:
        """A file from before the ``strength`` buffer has no such key: an unfolded site there computed
        ``c (f - mu)``, which is strength 1; a folded site keeps its strength (the function does not depend on it)."""
        key = prefix + "strength"
        old_layout = key not in state_dict
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if old_layout:
            if key in missing_keys:
                missing_keys.remove(key)
            if not self.folded:
                self.set_strength(1.0)

    def source_function(self) -> nn.Module | None:
        """The activation itself at an unfolded site at strength 0 (forward then returns ``act(x)``, the value the
        source returns, outside calibration and training); ``None`` elsewhere (folded sites are exact only with
        their consumers, which differ from the original's)."""
        return self.act if not self.folded and self._s == 0.0 else None

    def claims_exact(self) -> bool:
        if (self.compensated if self.folded else self._s == 0.0):
            return True
        with torch.no_grad():
            return bool((self.scale() == 1).all()) and bool((self.running_mean == 0).all())

    def extra_repr(self) -> str:
        params = "".join(f", {k}={v:g}" for k, v in self.act_params.items())
        chan = f", per_channel={self.channels}" if self.per_channel else ""
        return f"kind={self.kind}{params}{chan}, momentum={self.momentum:g}, reject={self.reject:g}"
