"""ANAct: normalised activation functions, with a strength homotopy and compensation by folding.

Paper: P. Yuan, H. Liu, C. Zhu, Y. Wang, "ANAct: Adaptive Normalization for Activation Functions",
arXiv 2208.13315. Specification: docs/methods.md sections 0 and 2. For an activation ``f`` at one site
with pre-activation ``X``::

    rho   = E[f(X)^2] / Var[X]            # forward gain (Var: population variance, ddof 0)
    rho'  = E[f'(X)^2]                    # backward gain, f' exact (normswap.variants.anact.activations)
    lam   = sqrt((rho + rho') / (2 rho rho'))
    c     = lam + 0.3 tanh(alpha)         # alpha: learnable scalar, init 0
    f_hat = c * (f(X) - mu)               # mu: running mean of f(X)

Statistics (no gradient; float32, float64 for float64 inputs; one scalar per site or, with
``per_channel``, one per channel of dim 1 while ``alpha`` stays a scalar): EMA with rejection in training,
frozen in eval, exact sums in calibration, at every strength (:mod:`normswap.variants.anact.stats`).
``lam`` always uses the running values, so gradients flow through ``f`` and ``alpha`` only. Initial
``rho = rho' = 1, mu = 0`` give ``c = 1`` (normswap design).

Strength and exactness (docs/methods.md sections 0, 2.2 and 2.4; normswap design). The strength ``s`` in [0, 1] is the
``strength`` buffer (float32, in the state_dict) with a Python mirror ``_strength`` that decides the
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

Sites (docs/anact.md): activation modules, the ``act`` of timm norm + activation layers, and functional
calls, which become modules ``anact_fn_<fx node>`` in a ``torch.fx.GraphModule`` (:meth:`propose_functional`).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from normswap.errors import FileFormatError, NormswapError, OptionError
from normswap.core.kinds import ACTIVATION_TYPES
from normswap.core.plan import SKIP, Site
from normswap.variants.anact.activations import (
    DEFAULTS, KINDS, MODULE_CLASSES, UnsupportedActivationError, activation_kind, describe, make_activation,
    resolve_activation, unsupported_message,
)
from normswap.variants.anact.stats import ANActStatistics
from normswap.variants.anact.fold import (
    compensation_status, decide, decide_call, exact_at, export_fold, fold_into_consumer, folds, mark_unchecked,
)
from normswap.core.kinds import qualname
from normswap.variants.base import Variant
from normswap.variants.calibration import CalibrationSettings
from normswap.variants.config import VariantConfig
from normswap.variants.strength import StrengthMirror
from normswap.variants.registry import register

__all__ = ["ANAct", "ANActConfig", "KINDS", "UnsupportedActivationError", "activation_kind", "compensation_status",
           "export_fold", "fold_into_consumer"]

_TINY = 1e-12  # floor of rho and rho' inside lam (a dead unit would otherwise give 0/0)


@dataclass
class ANActConfig(VariantConfig):
    """ANAct options. ``strength`` blends the layer in at unfolded sites (docs/methods.md section 2.4);
    ``allow_inexact`` folds approximately compensated sites (zero-padded consumers) instead of leaving them
    unfolded."""

    per_channel: bool = False
    momentum: float = 0.9
    reject: float = 0.2
    allow_inexact: bool = False

    def validate(self, variant: str) -> None:
        super().validate(variant)
        if not 0.0 <= self.momentum < 1.0:
            raise OptionError(f"option 'momentum' of variant '{variant}' must be in [0, 1); got {self.momentum}")
        if not self.reject > 0.0:
            raise OptionError(f"option 'reject' of variant '{variant}' must be > 0; got {self.reject}")


@register
class ANAct(StrengthMirror, ANActStatistics, Variant):
    """``c * (f(x) - mu)`` around a kept activation module ``act``, blended in by strength where it is not
    folded into the consumers; see the module docstring."""

    name = "anact"
    needs_calibration = True
    description = ("normalised activations (Yuan et al. 2208.13315): folded into consumers where exact, "
                   "else blended in by strength")
    config_class = ANActConfig
    adapters = {qualname(c): activation_kind(c())[0] for c in MODULE_CLASSES}  # GELU: gelu or gelu_tanh
    families = MODULE_CLASSES
    functional_kinds = ("activation",)

    def __init__(self, act: nn.Module | str, *, per_channel: bool = False, channels: int | None = None,
                 momentum: float = 0.9, reject: float = 0.2, strength: float = 0.0, folded: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
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
        f = self.act(x)  # after the statistics: an in-place activation may overwrite x
        s = self._s
        if s == 0.0 and not self.folded:
            return f  # the source activation itself: no tensor value is read (torch.fx, torch.compile)
        c, mu = self.scale().to(f.dtype), self.running_mean.to(f.dtype)
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
        return torch.addcmul(shift, f, scale)  # one pass over f

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

    # ---- the variant contract -----------------------------------------------------------------------
    @classmethod
    def classify(cls, module: nn.Module) -> tuple[str | None, str]:
        found = activation_kind(module)
        if found is not None:
            return found[0], ""
        if type(module) in ACTIVATION_TYPES:
            return None, unsupported_message(describe(module))
        return super().classify(module)

    @classmethod
    def propose(cls, infos: list[Any], config: VariantConfig) -> list[Site]:
        """Every supported activation module becomes a site. ``facts["compensation"]`` (``{"status",
        "reason", "consumers"}``, from the finder's ``downstream`` facts) records whether ``c`` and ``mu`` fold
        into the consumers exactly; ``facts["exact_at"]`` says where the site is exact: ``"every strength"``
        (folded), ``"strength 0"`` (unfolded: the reason names the consumer that prevents folding) or ``"no
        strength"`` (folded approximately, ``allow_inexact``)."""
        by_name = {info.name: info for info in infos}
        sites = []
        for info in infos:
            kind, reason = cls.classify(info.module)
            if kind is None and not reason:
                continue
            facts, action, extra = info.facts(), SKIP, {}
            if kind:
                action, reason, extra = decide(kind, activation_kind(info.module)[1], info, facts, by_name, config)
            sites.append(Site(name=info.name, source_type=qualname(info.module), variant=cls.name, action=action,
                              reason=reason, pattern=info.pattern(kind), path=info.path, config=extra, facts=facts))
        return sites

    @classmethod
    def propose_functional(cls, calls: list[Any], infos: list[Any], config: VariantConfig) -> list[Site]:
        """Functional activation calls (``F.relu``, ``torch.sigmoid``, ``x.relu()``) become sites named
        ``anact_fn_<fx node name>``: ``apply`` re-traces the model, replaces the call by that module (a plain
        activation, then wrapped as ANAct) and returns a ``torch.fx.GraphModule`` (``facts["graph_rewrite"]``).
        Compensation is decided from the call's consumers exactly as for a module."""
        by_name, sites = {info.name: info for info in infos}, []
        for call in calls:
            if call.kind != "activation":
                continue
            name, facts = f"anact_fn_{call.node}", {**call.facts(), "graph_rewrite": True}
            action, reason, extra = decide_call(call, name, facts, by_name, config)
            sites.append(Site(name=name, source_type=call.function, variant=cls.name, action=action, reason=reason,
                              pattern="functional", path="fx", config=extra, facts=facts))
        return sites

    @classmethod
    def finalize_plan(cls, sites: list[Site], graph: Any) -> None:
        """A site downstream of an inexact one (folded approximately, or unfolded at strength > 0) is still
        exact where it is, but the probe (which compares with the original network) would see the upstream
        change: it is marked ``facts["probe_check"] = False`` and not compared; the end-to-end output is not
        claimed anyway."""
        mark_unchecked(sites, graph)

    @classmethod
    def functional_module(cls, site: Site) -> nn.Module:
        """The plain activation module computing the call (its parameters from the site's config)."""
        kind = site.config.get("source_kind")
        if kind not in KINDS:
            raise NormswapError(f"site '{site.name}': the plan names no supported activation kind ({kind!r})")
        return make_activation(kind, {k: site.config[k] for k in DEFAULTS.get(kind, {}) if k in site.config})

    @classmethod
    def from_site(cls, site: Site, module: nn.Module, absorbed: list[nn.Module]) -> "ANAct":
        kind, found = site.config.get("source_kind"), activation_kind(module)
        if absorbed or found is None or found[0] != kind:
            raise NormswapError(f"site '{site.name}': the plan says activation kind {kind!r} absorbing "
                                f"{len(absorbed)} module(s), but the module is {describe(module)}")
        config = ANActConfig.from_dict(site.config)
        config.validate(cls.name)
        p = next(iter(module.parameters()), None)
        return cls(module, per_channel=config.per_channel, channels=site.config.get("channels"),
                   momentum=config.momentum, reject=config.reject, strength=config.strength, folded=folds(site),
                   device=p.device if p is not None else None)

    @classmethod
    def _consumers(cls, model: nn.Module, site: Site) -> list[nn.Module]:
        """The modules a folded site's ``c`` and ``mu`` are folded into (none for an unfolded site)."""
        names = (site.facts.get("compensation") or {}).get("consumers", []) if folds(site) else []
        return [model.get_submodule(name) for name in names]

    @classmethod
    def compare_points(cls, site: Site) -> list[tuple[str, str]]:
        """A folded ANAct changes its own output on purpose: exactness is at its consumers. An unfolded one
        is compared with the source activation (at strength 0 it is that activation)."""
        if site.facts.get("probe_check") is False:
            return []  # an inexact site upstream changes what reaches it (see finalize_plan)
        if exact_at(site) == "every strength":
            return [(name, name) for name in site.facts["compensation"]["consumers"]]
        if site.facts.get("graph_rewrite"):
            return []  # a functional call has no module in the original to compare with
        return super().compare_points(site)

    @classmethod
    def after_apply(cls, model: nn.Module, site: Site, module: "Variant") -> None:
        """Fold the current ``(c, mu)`` into a folded site's consumers (docs/methods.md section 2.2): exact sites
        become compensated. A fresh ANAct has ``c = 1, mu = 0``, so this only gives bias-less consumers their
        ``bias`` key (``load`` relies on that before its strict load); :meth:`after_calibration` refolds."""
        ref = next(iter(model.parameters()), None)
        if ref is not None:
            module.to(device=ref.device)
        with torch.no_grad():
            c, mu = module.scale().detach(), module.shift().detach()
        for consumer in cls._consumers(model, site):
            fold_into_consumer(consumer, c, mu)
        module.compensated = exact_at(site) == "every strength"

    @classmethod
    def after_calibration(cls, model: nn.Module, site: Site, module: "Variant") -> None:
        """Undo the fold made with the pre-calibration ``(c, mu)`` and fold the calibrated ones."""
        old = getattr(module, "_folded", None)
        with torch.no_grad():
            c, mu = module.scale().detach(), module.shift().detach()
        for consumer in cls._consumers(model, site):
            if old is not None:
                fold_into_consumer(consumer, old[0], old[1], inverse=True)
            fold_into_consumer(consumer, c, mu)
        module._folded = None
        module.compensated = exact_at(site) == "every strength"

    @classmethod
    def fold_for_export(cls, model: nn.Module, sites: list[Site]) -> tuple[list[str], dict[str, str]]:
        """Inference export (:func:`export_fold`): an exactly folded site's frozen ``c`` and ``mu`` go into its
        consumers and the plain activation comes back; an unfolded site at strength 0 computes its plain
        activation, which simply comes back. Approximately folded sites and unfolded ones at strength > 0
        stay ANAct (nothing can absorb their map exactly)."""
        consumers, kept = {}, {}
        for site in sites:
            module, where = model.get_submodule(site.name), exact_at(site)
            status = (site.facts.get("compensation") or {}).get("status") or "not established"
            if not isinstance(module, ANAct):
                kept[site.name] = "not an ANAct module"
            elif where == "every strength":
                consumers[site.name] = list(site.facts["compensation"]["consumers"])
            elif where == "strength 0" and module.current_strength() == 0.0:
                consumers[site.name] = []
            elif where == "strength 0":
                kept[site.name] = (f"unfolded (compensation is {status}) at strength > 0: nothing can absorb its "
                                   "blend of f and c (f - mu) exactly")
            else:
                kept[site.name] = f"compensation is {status}: its consumers cannot absorb c and mu exactly"
        export_fold(model, consumers, inplace=True)
        return list(consumers), kept

    @classmethod
    def apply_folded(cls, model: nn.Module, site: Site) -> None:
        """An exported site holds the plain activation; a folded site's consumers keep the ``bias`` key the
        fold gave them (an unfolded site's consumers were never changed)."""
        act = model.get_submodule(site.name)
        found = activation_kind(act)
        if found is None or found[0] != site.config.get("source_kind"):
            raise FileFormatError(f"the plan does not fit this model: folded site '{site.name}' is {describe(act)}, "
                                  f"the plan expects activation kind {site.config.get('source_kind')!r}")
        for consumer in cls._consumers(model, site):
            if getattr(consumer, "bias", True) is None:
                fold_into_consumer(consumer, 1.0, 0.0)  # c = 1, mu = 0: only adds a zero bias

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

    def claims_exact(self) -> bool:
        if (self.compensated if self.folded else self._s == 0.0):
            return True
        with torch.no_grad():
            return bool((self.scale() == 1).all()) and bool((self.running_mean == 0).all())

    @classmethod
    def examples(cls) -> list[tuple[nn.Module, torch.Tensor]]:
        from normswap.variants.anact.examples import examples

        return examples()

    def extra_repr(self) -> str:
        params = "".join(f", {k}={v:g}" for k, v in self.act_params.items())
        chan = f", per_channel={self.channels}" if self.per_channel else ""
        return f"kind={self.kind}{params}{chan}, momentum={self.momentum:g}, reject={self.reject:g}"


