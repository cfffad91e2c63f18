"""UAN: unsupervised adaptive normalisation, a Gaussian-mixture generalisation of BatchNorm.

Paper: B. Faye, H. Azzag, M. Lebbah, F. Feng, "Unsupervised Adaptive Normalization",
arXiv 2409.04757 (IJCNN 2024), of the Mixture Normalization family (M. Kalayeh, M. Shah,
"Training Faster by Separating Modes of Variation in Batch-normalized Models").
Specification: docs/methods.md sections 0 and 3.

Channel mode (BatchNorm sources; docs/methods.md section 3.1). Per channel ``c`` (dim 1 of ``x``), K components with
means ``mu[k,c]``, variances ``v[k,c] >= var_floor``, priors ``pi[k,c] = softmax_k(mix_logit)``::

    log p_k(x) = log pi_k - 0.5 log(2 pi v_k) - (x - mu_k)^2 / (2 v_k)
    tau_k(x)   = softmax_k log p_k(x)                      # in log space, no eps in the denominator
    x_mix      = (1/sqrt(K)) sum_k tau_k / sqrt(pi_k) * (x - mu_k) / sqrt(v_k)
    x_one      = (x - m) / sqrt(s2),   m = running_mean,  s2 = running_var + eps
    y          = gamma * ((1 - rho) x_one + rho x_mix) + beta

Sample mode (LayerNorm sources; docs/methods.md section 3.4), over the LayerNorm's normalised dims ``i`` of a sample,
with one set of K components per site::

    z_i     = (x_i - mean x) / sqrt(var x + eps)             # = x_one_i, the LayerNorm itself
    tau_ik  = softmax_k log p_k(z_i)
    E_k     = sum_i tau_ik x_i / sum_i tau_ik,   V_k = sum_i tau_ik (x_i - E_k)^2 / sum_i tau_ik + eps
    x_mix_i = (1/sqrt(K)) sum_k tau_ik / sqrt(pi_k) * (x_i - E_k) / sqrt(V_k)
    y_i     = gamma_i ((1 - rho) x_one_i + rho x_mix_i) + beta_i

Exact start (docs/methods.md section 3.2): every component equals the single Gaussian it replaces (channel mode:
``(m, s2)``; sample mode: any common value) and priors are uniform, so ``tau_k = 1/K``,
``x_mix = x_one`` and the layer is the source layer for every ``rho`` and ``K``. With ``rho == 0`` the
forward calls ``F.batch_norm`` / ``F.layer_norm`` (or FrozenBatchNorm2d's own formula), so the output is
bit-identical to the source in eval mode. Statistics are the learned ones in train and eval alike
(no batch statistics); the mixture is computed in float32 (float64 for float64 inputs) and cast back.

What is the paper's and what is normswap's:
- paper: the mixture-of-Gaussians normalisation (``x_mix`` without ``1/sqrt(K)``, ``rho = 1``), the
  component parameters learned as weights.
- normswap design: the ``1/sqrt(K)`` factor (a constant that gamma absorbs, chosen so coinciding
  components give ``x_one`` exactly); the ``rho`` blend with the source's statistics (docs/methods.md section 0); the
  log-space responsibilities and the variance floor (the official code's eps in the denominator breaks
  exactness); the whole sample mode (3.4), including the eps in ``z`` (a constant token gives ``z = 0``,
  not 0/0) and the per-sample weights ``tau_ik / sum_i tau_ik`` computed as a softmax over ``i`` in log
  space (no 0/0 when a component takes no value of a sample).

Calibration (EM, docs/methods.md section 3.3) only has to write ``mix_mean``, ``mix_var`` (variances, floored in
forward) and ``mix_logit`` (log-priors up to a constant); the hooks (``calib.py``) fit them by EM.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from normswap.errors import NormswapError, OptionError
from normswap.core.plan import Site
from normswap.variants.uan.calib import UANCalibration
from normswap.variants.cache import cache_for
from normswap.variants.uan.kernel import channel_coefficients, channel_mixture, needs_floor, tracing
from normswap.core.kinds import qualname
from normswap.variants.base import Variant, share_tensors
from normswap.variants.bn import copy_batchnorm_state
from normswap.variants.config import VariantConfig
from normswap.variants.strength import StrengthMirror
from normswap.variants.registry import register

__all__ = ["UAN", "UANChannel", "UANConfig", "UANSample"]

_CHANNEL_KINDS = ("bn", "bn_act", "frozen_bn")
_SAMPLE_KINDS = ("ln", "ln2d")
_LOG_2PI = math.log(2.0 * math.pi)
_PLAIN_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_BN_STATE = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")



@dataclass
class UANConfig(VariantConfig):
    """UAN options: ``k`` mixture components, ``var_floor`` the lowest component variance.

    ``strength`` (inherited) is ``rho``: 0 = the source layer exactly, 1 = the paper's layer."""

    k: int = 3
    var_floor: float = 1e-5

    def validate(self, variant: str) -> None:
        super().validate(variant)
        if not 1 <= self.k <= 64:
            raise OptionError(f"option 'k' of variant '{variant}' must be between 1 and 64; got {self.k}")
        if not 0 < self.var_floor < math.inf:  # inf floors every variance at inf: the layer outputs zeros
            raise OptionError(f"option 'var_floor' of variant '{variant}' must be a finite number > 0; got "
                              f"{self.var_floor}")


@register
class UAN(StrengthMirror, UANCalibration, Variant):
    """The registered UAN variant. :meth:`from_site` builds a :class:`UANChannel` (BatchNorm sources)
    or a :class:`UANSample` (LayerNorm sources); both subclass this one, which holds what they share:
    the mixture parameters, ``rho`` and its Python mirror, the contract methods."""

    name = "uan"
    description = "Gaussian-mixture normalisation (Faye et al. 2409.04757), blended in from an exact BN/LN copy"
    config_class = UANConfig
    adapters = {
        "torch.nn.modules.batchnorm.BatchNorm1d": "bn",
        "torch.nn.modules.batchnorm.BatchNorm2d": "bn",
        "torch.nn.modules.batchnorm.BatchNorm3d": "bn",
        "timm.layers.norm_act.BatchNormAct2d": "bn_act",
        "torchvision.ops.misc.FrozenBatchNorm2d": "frozen_bn",
        "torch.nn.modules.normalization.LayerNorm": "ln",
        "timm.layers.norm.LayerNorm": "ln",
        "timm.layers.norm.LayerNorm2d": "ln2d",
        "torchvision.models.convnext.LayerNorm2d": "ln2d",
    }
    families = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)
    functional_kinds = ("norm",)

    kind: str
    k: int
    var_floor: float
    strength_key = "rho"  # the strength buffer's state_dict key (the paper's symbol); its mirror is ``_s``
    _rho_zero: bool  # the only mirror forward reads: torch.compile guards on it, not on every strength value

    @classmethod
    def classify(cls, module: nn.Module) -> tuple[str | None, str]:
        kind, reason = super().classify(module)
        if kind in ("bn", "bn_act") and (
            not module.track_running_stats or module.running_mean is None or module.running_var is None
        ):
            return None, (
                f"{qualname(module)} has track_running_stats=False: no fixed statistics to start an exact copy from"
            )
        return kind, reason

    @classmethod
    def examples(cls) -> list[tuple[nn.Module, torch.Tensor]]:
        from normswap.variants.uan.examples import examples

        return examples()

    @classmethod
    def from_site(cls, site: Site, module: nn.Module, absorbed: list[nn.Module]) -> "UAN":
        if absorbed:
            raise NormswapError(f"site '{site.name}': variant 'uan' absorbs no modules, got {len(absorbed)}")
        kind = site.config.get("source_kind")
        found, reason = UAN.classify(module)
        if kind not in _CHANNEL_KINDS + _SAMPLE_KINDS or found != kind:
            why = reason or f"it is of kind {found!r}"
            raise NormswapError(
                f"site '{site.name}': the plan says source kind {kind!r} but the module is {qualname(module)} ({why})"
            )
        config = UANConfig.from_dict(site.config)
        config.validate(cls.name)
        return (UANChannel if kind in _CHANNEL_KINDS else UANSample)(module, kind, config)

    def _init_mixture(self, config: UANConfig, mean: torch.Tensor, var: torch.Tensor) -> None:
        """K coinciding components at ``mean``, ``var`` (one channel's values, or a scalar per site): new tensors
        (``torch.stack`` of K references: several times cheaper than cloning an expanded view on small tensors)."""
        self.k, self.var_floor = int(config.k), float(config.var_floor)
        self.mix_mean = nn.Parameter(torch.stack([mean.detach()] * self.k))
        self.mix_var = nn.Parameter(torch.stack([var.detach()] * self.k))
        self.mix_logit = nn.Parameter(torch.zeros_like(self.mix_mean))
        self.init_strength(config.strength, like=self.mix_mean)

    def strength_changed(self, value: float) -> None:
        self._rho_zero = value == 0.0

    def _params(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Component means, floored variances and log-priors (softmax over dim 0 = K) in ``dtype``."""
        mu = self.mix_mean.to(dtype)
        var = self.mix_var.to(dtype).clamp_min(self.var_floor)
        log_pi = torch.log_softmax(self.mix_logit.to(dtype), dim=0)
        return mu, var, log_pi

    def _components_coincide(self) -> bool:
        var = self.mix_var.clamp_min(self.var_floor)
        return all(torch.equal(t, t[:1].expand_as(t)) for t in (self.mix_mean, var, self.mix_logit))

    def _affine(self, y: torch.Tensor) -> torch.Tensor:
        if self.weight is not None:
            y = y * self.weight.to(y.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y


class UANChannel(UAN):
    """Channel mode (docs/methods.md sections 3.1, 3.2) for BatchNorm1d/2d/3d, timm BatchNormAct2d, FrozenBatchNorm2d.

    Keeps the source's state_dict keys (``weight``, ``bias``, ``running_mean``, ``running_var``,
    ``num_batches_tracked``; FrozenBatchNorm2d's stay buffers) and adds ``mix_mean``, ``mix_var``,
    ``mix_logit`` of shape (K, C) and the scalar buffer ``rho``. BatchNormAct2d's ``drop`` and ``act``
    children are kept and applied after the norm."""

    def __init__(self, source: nn.Module, kind: str, config: UANConfig) -> None:
        super().__init__()
        self.kind = kind
        self.eps = float(source.eps)
        self._source = (type(source), getattr(source, "momentum", None))  # what source_function rebuilds
        rm, rv = source.running_mean.detach(), source.running_var.detach()
        self.num_features = rm.numel()
        copy_batchnorm_state(self, source, frozen=kind == "frozen_bn")
        self._init_mixture(config, rm, rv + self.eps)
        if kind == "bn_act":
            self.drop = copy.deepcopy(source.drop)
            self.act = copy.deepcopy(source.act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._calib is not None:
            self._observe(x)
        if self._rho_zero:
            if self.kind == "frozen_bn":  # FrozenBatchNorm2d.forward, term for term
                scale = self.weight.reshape(1, -1, 1, 1) * (self.running_var.reshape(1, -1, 1, 1) + self.eps).rsqrt()
                y = x * scale + (self.bias.reshape(1, -1, 1, 1) - self.running_mean.reshape(1, -1, 1, 1) * scale)
            else:
                y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        else:
            y = self._mixture(x)
        if self.kind == "bn_act":
            y = self.drop(y)
            y = self.act(y)
        return y

    def _coefficients(self, cdt: torch.dtype, one_dead: bool) -> tuple:
        """:func:`channel_coefficients` in ``cdt`` from the current parameters and buffers."""
        weight = None if self.weight is None else self.weight.to(cdt)
        bias = None if self.bias is None else self.bias.to(cdt)
        return channel_coefficients(*self._params(cdt), self.k, self.rho.to(cdt), weight, bias,
                                    self.running_mean.to(cdt), self.running_var.to(cdt) + self.eps, one_dead=one_dead)

    def _mixture(self, x: torch.Tensor) -> torch.Tensor:
        """Weight, bias and the single-Gaussian term folded into per-component coefficients, computed
        blockwise (:mod:`normswap.variants.uan.kernel`); at ``rho == 1`` the ``x_one`` term is skipped.
        Where no gradient flows to them the coefficients are cached (:mod:`normswap.variants.cache`)
        with whether the eager kernel needs its exponent floor (:func:`needs_floor`)."""
        cdt = torch.promote_types(x.dtype, torch.float32)
        if tracing():
            return channel_mixture(x, *self._coefficients(cdt, one_dead=False), k=self.k)
        one_dead = self._s == 1.0
        tensors = (self.mix_mean, self.mix_var, self.mix_logit, self.weight, self.bias, self.running_mean,
                   self.running_var)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (*tensors, self.rho)):
            return channel_mixture(x, *self._coefficients(cdt, one_dead), k=self.k)

        def build() -> tuple:
            coeffs = self._coefficients(cdt, one_dead)
            sd = (self.running_var.to(cdt) + self.eps).sqrt()
            return coeffs, needs_floor(*coeffs[:3], self.running_mean.to(cdt), sd)

        extra = (cdt, one_dead, torch.is_inference_mode_enabled())
        # keyed by the strength's value, several entries: evaluate's switches between strengths rebuild nothing
        coeffs, floor = cache_for(self).get(tensors, extra, build, by_value=(self.rho,), capacity=4)
        return channel_mixture(x, *coeffs, k=self.k, floor=floor)

    def claims_exact(self) -> bool:
        if self._rho_zero:
            return True
        start_var = (self.running_var + self.eps).expand_as(self.mix_var)
        return (
            self._components_coincide()
            and torch.equal(self.mix_mean, self.running_mean.expand_as(self.mix_mean))
            and torch.equal(self.mix_var.clamp_min(self.var_floor), start_var)
        )

    def source_function(self) -> nn.Module | None:
        """At ``rho == 0`` outside calibration, the source BatchNorm1d/2d/3d or FrozenBatchNorm2d with this module's
        own tensors (not copies): forward then makes the source's own call on them (``F.batch_norm`` in eval mode,
        whose momentum is unused there; FrozenBatchNorm2d's formula term for term), so the two agree bit for bit on
        every input. ``None`` elsewhere, and for timm's BatchNormAct2d (its forward has more to it)."""
        cls, momentum = self._source
        if not self._rho_zero or self._calib is not None or self.kind == "bn_act":
            return None
        if self.kind == "frozen_bn":
            plain = cls(self.num_features, eps=self.eps)
        elif cls in _PLAIN_BN:
            plain = cls(self.num_features, eps=self.eps, momentum=momentum, affine=self.weight is not None,
                        device="meta")
        else:
            return None
        return share_tensors(plain, self, _BN_STATE)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, kind={self.kind}, k={self.k}, eps={self.eps}, "
            f"var_floor={self.var_floor}, rho={self._s:g}, affine={self.weight is not None}"
        )


class UANSample(UAN):
    """Sample mode (docs/methods.md section 3.4, normswap design) for nn.LayerNorm, timm LayerNorm and LayerNorm2d.

    Keeps ``weight``/``bias`` as in the source (either may be absent) and adds ``mix_mean``, ``mix_var``,
    ``mix_logit`` of shape (K,) (one set per site, on the standardised scale) and the buffer ``rho``.
    ``ln2d`` sources normalise dim 1 of (N, C, H, W) inputs, permuting as LayerNorm2d.forward does."""

    def __init__(self, source: nn.Module, kind: str, config: UANConfig) -> None:
        super().__init__()
        self.kind = kind
        self.eps = float(source.eps)
        self._source = (type(source), None)  # what source_function rebuilds
        self.normalized_shape = tuple(source.normalized_shape)
        for key in ("weight", "bias"):
            p = getattr(source, key, None)
            self.register_parameter(
                key, None if p is None else nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
            )
        like = self.weight if self.weight is not None else self.bias
        factory = {"dtype": like.dtype, "device": like.device} if like is not None else {}
        self._init_mixture(config, torch.zeros((), **factory), torch.ones((), **factory))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "ln2d":
            x = x.permute(0, 2, 3, 1)
        if self._calib is not None:
            self._observe(x)
        if self._rho_zero:
            y = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        else:
            y = self._mixture(x)
        if self.kind == "ln2d":
            y = y.permute(0, 3, 1, 2)
        return y

    def _mixture(self, x: torch.Tensor) -> torch.Tensor:
        """K-first layout (K, *x.shape), as channel mode: every reduction over the normalised dims runs
        over contiguous memory, the one over K is a sum of K slices, and the two softmaxes (over K, then
        over the values of a sample) are single kernels; no (..., K) tensors with K = 3 innermost."""
        cdt = torch.promote_types(x.dtype, torch.float32)
        d = len(self.normalized_shape)
        dims = tuple(range(-d, 0))
        xf = x.to(cdt)
        xc = xf - xf.mean(dim=dims, keepdim=True)
        x_one = xc * torch.rsqrt(xc.square().mean(dim=dims, keepdim=True) + self.eps)  # also z, for assignment
        mu, var, log_pi = (t.reshape((-1,) + (1,) * x.dim()) for t in self._params(cdt))  # (K, 1, ...)
        log_p = log_pi - 0.5 * (torch.log(var) + _LOG_2PI) - (x_one - mu).square() / (2.0 * var)
        log_tau = torch.log_softmax(log_p, dim=0)  # (K, *x.shape)
        flat = log_tau.flatten(-d) if d > 1 else log_tau
        w_i = torch.softmax(flat, dim=-1).view_as(log_tau)  # tau_ik / sum_i tau_ik
        e_k = (w_i * xc).sum(dim=dims, keepdim=True)  # E_k - mean(x): centred first, for accuracy
        dev = xc - e_k
        v_k = (w_i * dev.square()).sum(dim=dims, keepdim=True) + self.eps
        coef = torch.exp(log_tau - 0.5 * log_pi - 0.5 * math.log(self.k))  # tau_k / (sqrt(K) sqrt(pi_k))
        x_mix = (coef * dev * torch.rsqrt(v_k)).sum(dim=0)
        rho = self.rho.to(cdt)
        return self._affine((1.0 - rho) * x_one + rho * x_mix).to(x.dtype)

    def claims_exact(self) -> bool:
        return self._rho_zero or self._components_coincide()

    def source_function(self) -> nn.Module | None:
        """At ``rho == 0`` outside calibration, the source ``nn.LayerNorm`` with this module's own ``weight`` and
        ``bias``: forward then calls ``F.layer_norm`` exactly as ``nn.LayerNorm.forward`` does. ``None`` elsewhere,
        and for timm's LayerNorm and the LayerNorm2d kinds (their forwards differ from that call)."""
        cls = self._source[0]
        if not self._rho_zero or self._calib is not None or cls is not nn.LayerNorm:
            return None
        plain = cls(self.normalized_shape, eps=self.eps, elementwise_affine=self.weight is not None,
                    bias=self.bias is not None, device="meta")
        return share_tensors(plain, self, ("weight", "bias"))

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, kind={self.kind}, k={self.k}, eps={self.eps}, var_floor={self.var_floor}, "
            f"rho={self._s:g}, affine={self.weight is not None}, bias={self.bias is not None}"
        )
