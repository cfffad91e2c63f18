"""PatchNorm family: divergence-corrected affine and convolution layers.

Paper: G. Bird, "The Affine Divergence", arXiv 2512.22247. Specification: docs/methods.md sections 0 and 1.
One SGD step on an affine map ``z = W x + b`` moves ``z`` by ``-lr * g * (||x||^2 + 1)`` (``g = dL/dz``)
instead of ``-lr * g``; dividing by ``sqrt(||x||^2 + 1)`` removes that per-sample factor. For a conv the
"input" of an output location ``q`` is its receptive-field patch ``P_q`` (one group's channels times
every tap, with the conv's stride, padding, dilation and padding_mode), ``n2[q] = ||P_q||^2``.

**[reconstruction]** The formulas below are normswap's reconstruction of the paper's layers (docs/methods.md
sections 1.2, 1.3), consistent with its stated claims; the paper's own text could not be read. With ``lam`` the
homotopy buffer (``strength``), ``a`` the learnable per-output gain (init 1), ``o`` the optional offset::

    g      = 1 + lam * (a - 1)                              # gain blended in with lam (normswap design)
    k      = sqrt(lam * m + 1)   (l2/rms: 1 / ((1 - lam) + lam * r / sqrt(m + eps)))   # strength-aware scale
    corrected (default; PatchNormLinear and PatchNormConv):
    z      = g * k * (W . P + b) / sqrt(lam * n2 + 1) + lam * o
    l2 / rms (normaliser forms), r = 1 (l2) or sqrt(|P|) (rms):
    z      = g * k * (W . P) * ((1 - lam) + lam * r / sqrt(n2 + eps)) + b + lam * o

``m`` (buffer ``n2_mean``, per group) is a running mean of ``n2``, kept like BatchNorm's running statistics
(:mod:`._patch_scale`, normswap design): it keeps each layer's mean output scale as ``lam`` rises, and is a
constant absorbed by the gain at ``lam = 1``.

``lam = 1`` is the docs/methods.md layer exactly (``g = a``); ``lam = 0`` is the source layer exactly: the forward
then calls ``F.linear`` / the conv itself, bit-identical, whatever ``a`` and ``o`` hold (the Python
mirror ``_s`` decides that branch, never a tensor value, so torch.fx and torch.compile work). That is
why ``a`` and ``o`` are blended in with ``lam`` (normswap design, not the paper's): calibration fits
them for ``lam = 1`` while the model still starts exactly. The normaliser-form blend is normswap's
too. No batch statistics: train and eval behave the same. ``eps`` only enters the normaliser forms.

Sources: ``nn.Linear`` and ``nn.Conv1d/2d/3d`` (opt-in: converted only when a target names them), and
a Conv/Linear -> BatchNorm pair whose BatchNorm is folded in with its eval statistics
(``W' = W gamma / sqrt(var + eps)``, ``b' = beta + (b - mean) gamma / sqrt(var + eps)``) and replaced
by ``nn.Identity`` (a timm ``BatchNormAct2d`` by a :class:`NormActTail`: its activation stays). The classes
read, same-padding convs among them, and :func:`register_adapter`: :mod:`._patch_adapters`. State_dict keys: the source's ``weight`` and ``bias`` (a folded pair always has a
bias), plus ``gain``, ``lam``, ``n2_mean``, ``n2_batches`` and, with ``offset=True``, ``offset``. LayerNorm sites are left alone
(docs/methods.md section 1.4).

Calibration (docs/methods.md section 1.3.3) fits ``a`` (and ``o``) by least squares against the source's outputs ``y``:
``a_c = E[y_c u_c] / E[u_c^2]`` with ``u = (W'.P + b') / s`` at ``lam = 1``. Streaming API:
``calibration_begin(strength=1.0)``; then every forward observes its input (the target is the
module's own exact-start output, i.e. the source layer's output) or call ``observe(x, y)`` with
explicit targets; ``calibration_end()`` solves per channel and writes ``gain`` (and ``offset``).
:func:`fit_gain` wraps the three calls for one layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from normswap.errors import NormswapError, OptionError
from normswap.core.plan import Site
from normswap.variants.patchnorm import adapters as _patch_adapters, fast as _fast, layer as _patch
from normswap.variants.patchnorm import native_path as _native
from normswap.variants.patchnorm.layer import fold_batchnorm
from normswap.variants.patchnorm.adapters import ADAPTERS, NormActTail, register_adapter
from normswap.variants.patchnorm.calib import GainCalibration, fit_gain
from normswap.variants.patchnorm.scale import ScaleTracking
from normswap.variants.base import Variant
from normswap.variants.config import VariantConfig
from normswap.variants.strength import StrengthMirror
from normswap.variants.registry import register

__all__ = [
    "NormActTail", "PatchNorm", "PatchNormConfig", "PatchNormConv", "PatchNormLinear", "fit_gain", "fold_batchnorm",
    "register_adapter",
]

FORMS = ("corrected", "l2", "rms")
_CONV_CLS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
LN_REASON = (
    "LayerNorm left in place: a token is a 1x1 patch and LayerNorm already is PatchNorm's centred RMS "
    "normaliser form; dropping the centring is not faithful to a pretrained model (docs/methods.md section 1.4); "
    "target the Linear layers by name instead"
)


@dataclass
class PatchNormConfig(VariantConfig):
    """PatchNorm options. ``strength`` (inherited) is ``lam``: 0 = the source layer, 1 = the paper's.

    form: ``corrected`` (divide by ``sqrt(lam n2 + 1)``), ``l2`` or ``rms`` (normalise the patch).
    eps: added to ``n2`` in the normaliser forms (> 0). offset: add a learnable per-channel offset
    that calibration fits together with the gain."""

    form: Literal["corrected", "l2", "rms"] = "corrected"
    eps: float = 1e-5
    offset: bool = False

    def validate(self, variant: str) -> None:
        super().validate(variant)
        if self.form not in FORMS:
            raise OptionError(
                f"option 'form' of variant '{variant}' must be one of {', '.join(FORMS)}; got {self.form!r}"
            )
        if not (isinstance(self.eps, (int, float)) and math.isfinite(self.eps) and self.eps > 0):
            raise OptionError(f"option 'eps' of variant '{variant}' must be a finite number > 0; got {self.eps}")


def _source_params(src: nn.Module, bn: nn.Module | None) -> tuple[nn.Parameter, nn.Parameter | None]:
    """Copies of ``src``'s weight and bias (``bn`` folded in), with its dtype, device and requires_grad."""
    w, b = (src.weight, src.bias) if bn is None else fold_batchnorm(src.weight, src.bias, bn)
    grad = src.weight.requires_grad
    return nn.Parameter(w.detach().clone(), grad), (nn.Parameter(b.detach().clone(), grad) if b is not None else None)


@register
class PatchNorm(StrengthMirror, GainCalibration, ScaleTracking, Variant):
    """The registered PatchNorm variant. :meth:`from_site` builds a :class:`PatchNormLinear` or a
    :class:`PatchNormConv`; both subclass this one, which holds the gain, ``lam`` and its Python
    mirror, the calibration and the contract methods."""

    name = "patchnorm"
    description = "divergence-corrected affine/conv layers (Bird 2512.22247), BN folded in, lam ramped from 0"
    config_class = PatchNormConfig
    adapters = ADAPTERS  # the same dict: register_adapter adds to it (kinds: normswap.variants.patchnorm.adapters)
    families = (nn.Linear, nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)
    needs_targets = True

    form: str
    eps: float
    _r: float  # the rms form's sqrt(|P|) (1 for l2)
    strength_key = "lam"  # the strength buffer's state_dict key (the paper's symbol); its mirror is ``_s``
    _calib: dict[str, Any] | None

    # ---- finding sites ---------------------------------------------------------------------------
    @classmethod
    def classify(cls, module: nn.Module) -> tuple[str | None, str]:
        """The adapter kind of ``module``'s class, refused when the instance does not fit the kind."""
        return _patch_adapters.classify(super().classify(module), module)

    @classmethod
    def propose(cls, infos: list[Any], config: VariantConfig) -> list[Site]:
        """Conv/Linear -> BatchNorm pairs (the norm absorbed; timm's BatchNormAct2d leaves its activation), skip
        sites for other norms (saying which class lacks an adapter and how to register one) and LayerNorms, and
        opt-in sites for every other Linear/Conv (:func:`._patch_adapters.propose`)."""
        return _patch_adapters.propose(cls, infos, config, LN_REASON)

    # ---- building --------------------------------------------------------------------------------
    @classmethod
    def from_site(cls, site: Site, module: nn.Module, absorbed: list[nn.Module]) -> "PatchNorm":
        config = PatchNormConfig.from_dict(site.config)
        config.validate(cls.name)
        shape, src, bn, norm_kind = _patch_adapters.check_site(cls.classify, site, module, absorbed)
        opts = dict(form=config.form, eps=config.eps, offset=config.offset, strength=config.strength)
        if shape == "linear":
            return PatchNormLinear.from_linear(module, bn, **opts)
        try:
            new = PatchNormConv.from_conv(module, bn, kind=src, **opts)
        except ValueError as exc:
            raise NormswapError(f"site '{site.name}': {exc}") from None
        if norm_kind == "bn_act":  # after_apply puts it in the norm's place
            new.__dict__["_tail"] = NormActTail(bn)
        return new

    @classmethod
    def compare_points(cls, site: Site) -> list[tuple[str, str]]:
        """A folded norm + activation's ``drop`` output is the pre-activation value on both sides (the source's
        norm output, the PatchNorm layer's output): exactness and calibration targets are taken there."""
        if site.facts.get("norm_kind") == "bn_act" and site.absorbs:
            return [(f"{site.absorbs[-1]}.drop", f"{site.absorbs[-1]}.drop")]
        return super().compare_points(site)

    @classmethod
    def after_apply(cls, model: nn.Module, site: Site, module: "Variant") -> None:
        """Put a folded norm + activation's :class:`NormActTail` where ``apply`` left ``nn.Identity`` (every alias)."""
        _patch_adapters.place_tail(model, site, module)

    def _init_common(self, weight: nn.Parameter, bias: nn.Parameter | None, out: int, form: str, eps: float,
                     offset: bool, strength: float, groups: int = 1) -> None:
        config = PatchNormConfig(strength=float(strength), form=form, eps=float(eps), offset=bool(offset))
        config.validate(self.name)
        self.form, self.eps = form, float(eps)
        self.weight = weight
        self.register_parameter("bias", bias)
        like = dict(device=weight.device, dtype=weight.dtype)
        self.gain = nn.Parameter(torch.ones(out, **like), requires_grad=weight.requires_grad)
        self.register_parameter(
            "offset", nn.Parameter(torch.zeros(out, **like), requires_grad=weight.requires_grad) if offset else None
        )
        self.init_strength(strength, like=weight)
        self._init_scale(groups, weight)
        self._calib = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, *args):  # type: ignore[override]
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, *args)
        self._scale_compat(state_dict, prefix, missing_keys)

    def claims_exact(self) -> bool:
        return self._s == 0.0

    def source_function(self) -> nn.Module | None:
        """At strength 0, an unpaired nn.Linear / nn.ConvNd site's source (:func:`.adapters.plain_source`)."""
        return _patch_adapters.plain_source(self) if self._s == 0.0 and self._calib is None else None

    @classmethod
    def examples(cls) -> list[tuple[nn.Module, torch.Tensor]]:
        """A Conv2d->BN2d->ReLU CNN (an affine=False BN too), a Linear->BN1d MLP, a Conv1d net with reflect
        padding, a depthwise conv + BN and, with timm, Conv2dSame/Conv2d -> BatchNormAct2d pairs: eval mode,
        non-trivial running statistics."""
        from normswap.variants.patchnorm.examples import examples

        return examples()

    def _blend(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``g = 1 + lam (a - 1)`` (exactly ``a`` at lam = 1) and ``lam * o`` (or None)."""
        lam = self.lam.to(self.gain.dtype)
        g = self.gain * lam + (1 - lam)
        return g, (self.offset * lam if self.offset is not None else None)

    def _calib_terms(self, x: torch.Tensor, t: float, source: bool = True) -> tuple[torch.Tensor, ...]:
        """``(w, base, source, n2)``: the layer at strength t is ``g * k(t) * w + base + t * o`` (``k``: the
        strength-aware scale, a constant per group; ``base`` the normaliser forms' bias, shaped to broadcast
        against ``w``, or None); ``source`` = lam 0 (None unless asked for); ``n2`` the patch norms."""
        raise NotImplementedError

    def _factor(self, n2: torch.Tensor, lam: torch.Tensor | float) -> torch.Tensor:
        """The per-patch factor from the patch norms: ``1/s`` (corrected) or the normaliser blend."""
        lam = lam.to(n2.dtype) if isinstance(lam, torch.Tensor) else lam
        corrected = self.form == "corrected"
        if not torch.is_grad_enabled():  # the same operations, all but the first in place (one temporary)
            f = n2 * lam if corrected else n2 + self.eps
            return f.add_(1).rsqrt_() if corrected else f.rsqrt_().mul_(lam * self._r).add_(1 - lam)
        return torch.rsqrt(n2 * lam + 1) if corrected else torch.rsqrt(n2 + self.eps) * (lam * self._r) + (1 - lam)

    def _gains(self, n2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Training mode tracks ``n2``; returns the blended gain times the scale ``k(lam)``, and the offset."""
        if self.training:
            self._track(n2, channels_last=not self._conv_layout)
        g, off = self._blend()
        return g * self.scale_per_output(self.lam), off

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._calib is not None and not self._calib.get("explicit"):  # no observe(x, y) call: own targets
            self.observe(x)
        reused = self.reuse_observation(x) if self._calib is not None else None
        return self._forward(x) if reused is None else reused

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"form={self.form}, lam={self._s:g}, eps={self.eps}, offset={self.offset is not None}"


def _calib_split(layer: PatchNorm, v: torch.Tensor, n2: torch.Tensor, t: float, source: bool,
                 bias: torch.Tensor | None, scale: Any, scale_: Any) -> tuple[torch.Tensor, ...]:
    """:meth:`PatchNorm._calib_terms` from the plain layer's ``v`` (with the bias in the corrected form) and
    ``n2``: ``w = v * factor`` (in place on ``v`` where the source is not asked for or is a new tensor)."""
    f = layer._factor(n2, t).to(v.dtype)
    if layer.form == "corrected" or bias is None:
        return (scale(v, f), None, v, n2) if source else (scale_(v, f), None, None, n2)
    src = v + bias if source else None
    return scale_(v, f), bias, src, n2


class PatchNormLinear(PatchNorm):
    """Divergence-corrected affine layer, docs/methods.md section 1.2 **[reconstruction]**; replaces ``nn.Linear``.

    ``z = g * (W x + b) / sqrt(lam * ||x||^2 + 1) + lam * o``, the norm over the last dimension only
    (``g``, ``o``: see the module docstring); ``form="l2"``/``"rms"`` normalise ``x`` instead (``|P|`` =
    in_features). ``lam = 0`` is exactly ``F.linear``. Keys: ``weight``, ``bias``, ``gain``, ``lam``
    (and ``offset``)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, form: str = "corrected",
                 eps: float = 1e-5, offset: bool = False, strength: float = 1.0, device=None, dtype=None) -> None:
        super().__init__()
        src = nn.Linear(in_features, out_features, bias, device=device, dtype=dtype)
        self._setup(src.weight, src.bias, form, eps, offset, strength)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bn: nn.modules.batchnorm._BatchNorm | None = None, *,
                    form: str = "corrected", eps: float = 1e-5, offset: bool = False,
                    strength: float = 0.0) -> "PatchNormLinear":
        """Wrap ``linear`` (a copy of its weights; ``bn``, a BatchNorm1d after it, folded in)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(*_source_params(linear, bn), form, eps, offset, strength)
        self._source = None if bn is not None else type(linear)  # a fold computes the pair only to rounding
        return self.train(linear.training)

    def _setup(self, weight, bias, form, eps, offset, strength) -> None:
        self.out_features, self.in_features = weight.shape
        self._r = math.sqrt(self.in_features) if form == "rms" else 1.0
        self._init_common(weight, bias, self.out_features, form, eps, offset, strength)

    @staticmethod
    def _sq_norm(x: torch.Tensor) -> torch.Tensor:
        xs = _patch.to_acc(x)
        return torch.linalg.vecdot(xs, xs, dim=-1).unsqueeze(-1)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._s == 0.0:
            return F.linear(x, self.weight, self.bias)
        if _fast.inference_path(self):
            return _fast.linear_inference(self, x)
        n2 = self._sq_norm(x)
        g, off = self._gains(n2)
        corrected = self.form == "corrected"
        z = F.linear(x, self.weight, self.bias if corrected else None) * g * self._factor(n2, self.lam).to(x.dtype)
        if not corrected and self.bias is not None:
            z = z + self.bias
        return z if off is None else z + off

    def _calib_terms(self, x, t, source=True):
        corrected = self.form == "corrected"
        v = F.linear(x, self.weight, self.bias if corrected else None)
        return _calib_split(self, v, self._sq_norm(x), t, source, self.bias, lambda v, f: v * f, lambda v, f: v.mul_(f))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " + super().extra_repr()


class PatchNormConv(PatchNorm):
    """PatchNorm convolution, docs/methods.md section 1.3 **[reconstruction]**; replaces ``nn.Conv1d/2d/3d`` (or a
    Conv -> BatchNorm pair, folded). Every conv option is honoured: stride, int/tuple/``"same"``/``"valid"``
    padding, dilation, groups (each group's patch norm scales that group's outputs), bias, padding_mode
    zeros/reflect/replicate/circular, and the zero padding a same-padding conv (timm ``Conv2dSame``: TF "same"
    from each input's size) applies before its own (:mod:`._patch_adapters`). ``n2`` comes from :mod:`._patch` (channel sum
    of ``x^2``, then a box filter), so the correction costs one broadcast multiply of the ordinary
    conv output. ``lam = 0`` calls the conv exactly. Keys: ``weight``, ``bias``, ``gain``, ``lam``
    (and ``offset``)."""

    _conv_layout = True  # channels in dim 1 (the gain calibration's per-channel axis)

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *, dims: int = 2,
                 form: str = "corrected", eps: float = 1e-5, offset: bool = False, strength: float = 1.0,
                 device=None, dtype=None) -> None:
        super().__init__()
        if dims not in _CONV_CLS:
            raise OptionError(f"dims must be 1, 2 or 3; got {dims}")
        src = _CONV_CLS[dims](in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                              padding_mode, device=device, dtype=dtype)
        self._setup(src, src.weight, src.bias, form, eps, offset, strength)

    @classmethod
    def from_conv(cls, conv: nn.modules.conv._ConvNd, bn: nn.Module | None = None, *, kind: str | None = None,
                  form: str = "corrected", eps: float = 1e-5, offset: bool = False,
                  strength: float = 0.0) -> "PatchNormConv":
        """Wrap ``conv`` (a copy of its weights; ``bn``, a BatchNorm after it, folded in). ``kind``: how its
        padding is read (``conv``, ``conv_same``, ``conv_static_same``; None: its class's adapter)."""
        self = cls.__new__(cls)
        nn.Module.__init__(self)
        self._setup(conv, *_source_params(conv, bn), form, eps, offset, strength, kind)
        self._source = None if bn is not None else type(conv)
        return self.train(conv.training)

    def _setup(self, conv, weight, bias, form, eps, offset, strength, kind=None) -> None:
        self.geom = _patch.ConvGeometry.from_conv(conv, kind)
        g = self.geom
        self.dims, self.in_channels, self.out_channels, self.groups = g.dims, g.in_channels, g.out_channels, g.groups
        self.kernel_size, self.stride, self.padding = g.kernel_size, g.stride, g.padding
        self.dilation, self.padding_mode = g.dilation, g.padding_mode
        self._r = math.sqrt(g.patch_size) if form == "rms" else 1.0
        self._init_common(weight, bias, g.out_channels, form, eps, offset, strength, groups=g.groups)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._s != 0.0 and _fast.inference_path(self, x):  # cached gain-scaled weight, chunked batch
            return _fast.conv_inference(self, x)
        x_in, padding = self.geom.prepare(x)
        if self._s == 0.0:
            return self.geom.conv(x_in, self.weight, self.bias, padding)
        corrected = self.form == "corrected"
        n2 = _patch.prepared_sq_norm(x_in, self.geom)  # (N, G, *out)
        g, off = self._gains(n2)
        m = self._factor(n2, self.lam)
        w = self.weight * g.view(-1, *([1] * (self.dims + 1)))
        b = self.bias * g if corrected and self.bias is not None else None
        v = self.geom.conv(x_in, w, b, padding)
        z = _patch.scale_by_group(v, m.to(v.dtype), self.groups, inplace=not torch.is_grad_enabled())
        shape = (-1, *([1] * self.dims))
        if not corrected and self.bias is not None:
            z = z + self.bias.view(shape)
        return z if off is None else z + off.view(shape)

    def _calib_terms(self, x, t, source=True):
        x_in, padding = self.geom.prepare(x)
        corrected = self.form == "corrected"
        v = _native.conv(self.geom, x_in, padding, self.weight, self.bias if corrected else None)
        bias = self.bias.view(-1, *([1] * self.dims)) if self.bias is not None else None
        return _calib_split(self, v, _fast.sq_norm(x_in, self.geom), t, source, bias,
                            lambda v, f: _patch.scale_by_group(v, f, self.groups),
                            lambda v, f: _patch.scale_by_group(v, f, self.groups, inplace=True))

    def extra_repr(self) -> str:
        g = self.geom
        s = f"{g.in_channels}, {g.out_channels}, kernel_size={g.kernel_size}, stride={g.stride}, padding={g.padding}"
        if g.pre_pads is not None:  # a same-padding conv's own zero padding first
            s += f", pre_pad={g.pre_pads}"
        if any(d != 1 for d in g.dilation):
            s += f", dilation={g.dilation}"
        if g.groups != 1:
            s += f", groups={g.groups}"
        if g.padding_mode != "zeros":
            s += f", padding_mode={g.padding_mode}"
        return f"{s}, bias={self.bias is not None}, " + super().extra_repr()
