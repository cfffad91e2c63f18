"""ANAct: normalised activation functions, made exact on a pretrained network by compensation.

Paper: P. Yuan, H. Liu, C. Zhu, Y. Wang, "ANAct: Adaptive Normalization for Activation Functions",
arXiv 2208.13315. Specification: docs/methods.md sections 0 and 2. For an activation ``f`` at one site with
pre-activation ``X``::

    rho   = E[f(X)^2] / Var[X]            # forward gain (Var: population variance, ddof 0)
    rho'  = E[f'(X)^2]                    # backward gain, f' exact (normswap.variants._activations)
    lam   = sqrt((rho + rho') / (2 rho rho'))
    c     = lam + 0.3 tanh(alpha)         # alpha: learnable scalar, init 0
    f_hat = c * (f(X) - mu)               # mu: running mean of f(X)

Statistics (no gradient; float32, float64 for float64 inputs) are one scalar per site, or per channel
(``per_channel``: dim 1, BN layout; buffers of shape (C,), ``alpha`` stays a scalar). ``lam`` always
uses the running values, so gradients flow through ``f`` and ``alpha`` only.

- Training: the first batch (``num_batches_tracked == 0``) is taken as is, later ones by EMA
  ``new = momentum * old + (1 - momentum) * batch``; the output uses the updated values. Each statistic
  (and channel) is tested on its own: a rejected one keeps its running value, the others still update,
  and ``num_batches_tracked`` counts every batch. rho, rho' are rejected outside ``[1 - reject,
  1 + reject] x`` the running value (the paper's [0.8, 1.2]). The mean is signed and often near 0
  (tanh), where a ratio band would freeze it, so it is rejected when ``|batch - running| > reject *
  sqrt(E_batch[f^2])``, the same band on the scale of ``f`` (normswap design). Non-finite estimates (a
  constant input: Var = 0) are always rejected.
- Eval: frozen. Calibration: :meth:`calibration_begin` resets float64 accumulators (count, sums of x
  and x^2 shifted by the first batch's mean, f, f^2, f'^2), each forward adds to them, and
  :meth:`calibration_end` writes the exact full-data statistics (no EMA, no rejection; no data: no change).
- Initial ``rho = rho' = 1, mu = 0`` give ``c = 1``: before any statistics the layer is exactly ``f``
  (normswap design), so a fresh conversion is exact even before compensation.

Exactness (docs/methods.md sections 0 and 2.3). ANAct has no homotopy: ``set_strength`` only records the value. The start
is exact when every consumer of the output is folded (:func:`fold_into_consumer`, ``W' = W / c``,
``b' = b + W mu``; :func:`compensation_status` says where that is exact), which the apply step marks with
``compensated = True``; a training update or a calibration clears it (refold). :meth:`claims_exact` is
``compensated``, or ``c == 1 and mu == 0`` (the layer is ``f`` itself). :func:`export_fold` folds c and
mu back into the consumers and restores the plain activation for inference. State_dict: ``act.*`` (the
activation's own keys, none for most), ``alpha``, ``running_rho``, ``running_rho_prime``,
``running_mean``, ``num_batches_tracked``; folding adds a ``bias`` key to a consumer without one.

Sites (docs/anact.md): activation modules; the ``act`` of timm norm + activation layers (it takes the
layer's consumers); functional calls, which become modules ``anact_fn_<fx node>`` (:meth:`propose_functional`;
``apply`` then returns a ``torch.fx.GraphModule``). ``normswap.export`` uses :meth:`fold_for_export`, and
``load`` rebuilds its ``folded`` sites with :meth:`apply_folded`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from normswap.errors import FileFormatError, NormswapError, OptionError
from normswap.surgery.graph import ACTIVATION_TYPES
from normswap.surgery.plan import CONVERT, SKIP, Site
from normswap.variants._activations import (
    DEFAULTS, KINDS, MODULE_CLASSES, UnsupportedActivationError, activation_kind, apply_activation, derivative, describe,
    make_activation, resolve_activation, sum_over_ranks, unsupported_message,
)
from normswap.variants._fold import compensation_status, decide, export_fold, fold_into_consumer, mark_unchecked
from normswap.variants.base import CalibrationSettings, Variant, VariantConfig, check_strength, qualname
from normswap.variants.registry import register

__all__ = ["ANAct", "ANActConfig", "KINDS", "UnsupportedActivationError", "activation_kind", "compensation_status",
           "export_fold", "fold_into_consumer"]

_TINY = 1e-12  # floor of rho and rho' inside lam (a dead unit would otherwise give 0/0)


@dataclass
class ANActConfig(VariantConfig):
    """ANAct options. ``strength`` is recorded only: ANAct is exact through compensation (docs/methods.md section 2.3)."""

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
class ANAct(Variant):
    """``c * (f(x) - mu)`` around a kept activation module ``act``; see the module docstring."""

    name = "anact"
    needs_calibration = True
    description = "normalised activations (Yuan et al. 2208.13315), exact through folding into consumers"
    config_class = ANActConfig
    adapters = {qualname(c): activation_kind(c())[0] for c in MODULE_CLASSES}  # GELU: gelu or gelu_tanh
    families = MODULE_CLASSES
    functional_kinds = ("activation",)

    def __init__(self, act: nn.Module | str, *, per_channel: bool = False, channels: int | None = None,
                 momentum: float = 0.9, reject: float = 0.2, strength: float = 0.0,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        act = make_activation(act) if isinstance(act, str) else act
        self.kind, self.act_params = resolve_activation(act)
        self.act = copy.deepcopy(act)
        if per_channel and not (isinstance(channels, int) and channels > 0):
            raise NormswapError(f"ANAct per_channel needs a positive channel count; got {channels!r}")
        self.per_channel, self.channels = bool(per_channel), (int(channels) if per_channel else None)
        self.momentum, self.reject, self.strength = float(momentum), float(reject), float(strength)
        shape = (self.channels,) if per_channel else ()
        factory = {"device": device, "dtype": dtype or torch.float32}
        self.alpha = nn.Parameter(torch.zeros((), **factory))
        self.register_buffer("running_rho", torch.ones(shape, **factory))
        self.register_buffer("running_rho_prime", torch.ones(shape, **factory))
        self.register_buffer("running_mean", torch.zeros(shape, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        self.compensated, self._calibrating, self._acc = False, False, None
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
        c, mu = self.scale().to(f.dtype), self.running_mean.to(f.dtype)
        if self.per_channel:
            return ((f.transpose(1, -1) - mu) * c).transpose(1, -1)
        return (f - mu) * c

    def _columns(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x, f(x), f'(x) detached in the statistics dtype, reshaped so that dim -1 is reduced."""
        xs = x.detach().to(torch.promote_types(x.dtype, torch.float32))
        if self.per_channel:
            if xs.dim() < 2 or xs.shape[1] != self.channels:
                raise NormswapError(f"ANAct per_channel expects {self.channels} channels in dim 1; "
                                    f"got input of shape {tuple(x.shape)}")
            xs = xs.transpose(0, 1).reshape(self.channels, -1)
        else:
            xs = xs.reshape(-1)
        return xs, apply_activation(self.kind, self.act_params, xs), derivative(self.kind, self.act_params, xs)

    @torch.no_grad()
    def _update(self, x: torch.Tensor) -> None:
        xs, f, fp = self._columns(x)
        var = (xs - xs.mean(-1, keepdim=True)).square().mean(-1)
        f2 = f.square().mean(-1)
        self._update_running(f2 / var, fp.square().mean(-1), f.mean(-1), f2)
        self.compensated = False

    @torch.no_grad()
    def _update_running(self, rho: torch.Tensor, rho_p: torch.Tensor, mean: torch.Tensor, f2: torch.Tensor) -> None:
        """EMA with per-statistic rejection (module docstring); ``f2 = E_batch[f^2]`` scales the mean's band."""
        first = self.num_batches_tracked == 0
        m, r = self.momentum, self.reject
        for buf, est in ((self.running_rho, rho), (self.running_rho_prime, rho_p), (self.running_mean, mean)):
            est = est.to(buf.dtype)
            if buf is self.running_mean:
                ok = (est - buf).abs() <= r * f2.to(buf.dtype).sqrt()
            else:
                ok = (est >= (1 - r) * buf) & (est <= (1 + r) * buf)
            ok = (ok | first) & torch.isfinite(est)
            new = torch.where(first, est, m * buf + (1 - m) * est)
            buf.copy_(torch.where(ok, new, buf))
        self.num_batches_tracked.add_(1)

    # ---- calibration ---------------------------------------------------------------------------------
    def calibration_begin(self, settings: CalibrationSettings | None = None) -> None:
        """Reset the accumulators; every forward until :meth:`calibration_end` adds to them. The current
        ``(c, mu)`` -- what the consumers are folded with -- is kept for :meth:`after_calibration`.
        ``settings.reduce`` (torch.distributed) makes every rank write the statistics of all ranks' data."""
        with torch.no_grad():
            self._folded = (self.scale().detach().clone(), self.shift().detach().clone())
        self._calibrating, self._acc = True, None
        self._settings = settings or CalibrationSettings()

    def calibration_abort(self) -> None:
        self._calibrating, self._acc, self._folded = False, None, None

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        xs, f, fp = (t.to(torch.float64) for t in self._columns(x))
        acc = self._acc
        if acc is None:  # the first batch's mean shifts x, so that Var = E[d^2] - E[d]^2 does not cancel
            acc = self._acc = {"shift": xs.mean(-1, keepdim=True), "count": 0, "batches": 0}
        d = xs - acc["shift"]
        for key, t in (("sum_x", d), ("sum_x2", d.square()), ("sum_f", f), ("sum_f2", f.square()),
                       ("sum_fp2", fp.square())):
            acc[key] = acc.get(key, 0) + t.sum(-1)
        acc["count"] += xs.shape[-1]
        acc["batches"] += 1

    @torch.no_grad()
    def calibration_end(self) -> None:
        """Write rho, rho', mu from all calibration data (non-finite values keep the running ones)."""
        acc, self._calibrating, self._acc = self._acc, False, None
        if self._settings is not None and self._settings.reduce is not None:
            acc = sum_over_ranks(acc, self._settings, self.running_mean)
        if acc is None or acc["count"] == 0:
            return
        n = acc["count"]
        var = acc["sum_x2"] / n - (acc["sum_x"] / n).square()
        stats = (acc["sum_f2"] / n / var, acc["sum_fp2"] / n, acc["sum_f"] / n)
        for buf, est in zip((self.running_rho, self.running_rho_prime, self.running_mean), stats):
            buf.copy_(torch.where(torch.isfinite(est), est.to(buf), buf))
        self.num_batches_tracked.add_(acc["batches"])
        self.compensated = False

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
        "reason", "consumers"}``, from the finder's ``downstream`` facts) records whether the start can be
        made exact; a site that is not exact is skipped unless ``allow_inexact``; without facts it converts."""
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
            found, extra = activation_kind(call.target, call.args, call.kwargs), {}
            what = f"functional {call.function} call (node {call.node})"
            action = SKIP
            if found is None and activation_kind(call.target) is not None:
                reason = f"{what}: its parameters are not constants, so no module can replace it"
            elif found is None:
                reason = unsupported_message(call.function)
            elif name in by_name:
                reason = f"{what}: the model already has a module named '{name}'"
            elif call.inplace and not (call.input_users == 1 and call.input_fresh):
                reason = (f"{what} works in place on a tensor that other code may still read: replacing it by an "
                          "out-of-place module could change the model")
            else:
                action, reason, extra = decide(found[0], found[1], call, facts, by_name, config)
                if action == CONVERT and not reason:
                    reason = f"{what} becomes module {name}: the converted model is a torch.fx.GraphModule"
            sites.append(Site(name=name, source_type=call.function, variant=cls.name, action=action, reason=reason,
                              pattern="functional", path="fx", config=extra, facts=facts))
        return sites

    @classmethod
    def finalize_plan(cls, sites: list[Site], graph: Any) -> None:
        """With ``allow_inexact``, an exact site downstream of an inexact one is still exact where it is, but
        the probe (which compares with the original network) would see the upstream change: it is marked
        ``facts["probe_check"] = False`` and not compared; the end-to-end output is not claimed anyway."""
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
                   momentum=config.momentum, reject=config.reject, strength=config.strength,
                   device=p.device if p is not None else None)

    @classmethod
    def _consumers(cls, model: nn.Module, site: Site) -> list[nn.Module]:
        comp = site.facts.get("compensation") or {}
        if comp.get("status") == "exact" or (comp.get("status") == "approximate" and site.config.get("allow_inexact")):
            return [model.get_submodule(name) for name in comp.get("consumers", [])]
        return []

    @classmethod
    def compare_points(cls, site: Site) -> list[tuple[str, str]]:
        """A compensated ANAct changes its own output on purpose: exactness is at its consumers."""
        comp = site.facts.get("compensation") or {}
        if site.facts.get("probe_check") is False:
            return []  # an inexact site upstream changes what reaches it (see finalize_plan)
        if comp.get("status") == "exact" and comp.get("consumers"):
            return [(name, name) for name in comp["consumers"]]
        if site.facts.get("graph_rewrite"):
            return []  # a functional call has no module in the original to compare with
        return super().compare_points(site)

    @classmethod
    def after_apply(cls, model: nn.Module, site: Site, module: "Variant") -> None:
        """Fold the current ``(c, mu)`` into the consumers (docs/methods.md section 2.2): exact sites become
        compensated.

        A fresh ANAct has ``c = 1, mu = 0``, so this only gives bias-less consumers their ``bias`` key
        (``load`` relies on that before its strict load); :meth:`after_calibration` refolds."""
        ref = next(iter(model.parameters()), None)
        if ref is not None:
            module.to(device=ref.device)
        with torch.no_grad():
            c, mu = module.scale().detach(), module.shift().detach()
        for consumer in cls._consumers(model, site):
            fold_into_consumer(consumer, c, mu)
        module.compensated = (site.facts.get("compensation") or {}).get("status") == "exact"

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
        module.compensated = (site.facts.get("compensation") or {}).get("status") == "exact"

    @classmethod
    def fold_for_export(cls, model: nn.Module, sites: list[Site]) -> tuple[list[str], dict[str, str]]:
        """Fold every exactly compensated site's frozen ``c`` and ``mu`` into its consumers and put the plain
        activation back (:func:`export_fold`); sites whose consumers cannot absorb them exactly stay ANAct."""
        consumers, kept = {}, {}
        for site in sites:
            comp = site.facts.get("compensation") or {}
            if not isinstance(model.get_submodule(site.name), ANAct):
                kept[site.name] = "not an ANAct module"
            elif comp.get("status") == "exact" and comp.get("consumers"):
                consumers[site.name] = list(comp["consumers"])
            else:
                status = comp.get("status") or "not established"
                kept[site.name] = f"compensation is {status}: its consumers cannot absorb c and mu exactly"
        export_fold(model, consumers, inplace=True)
        return list(consumers), kept

    @classmethod
    def apply_folded(cls, model: nn.Module, site: Site) -> None:
        """An exported site holds the plain activation; its consumers keep the ``bias`` key the fold gave them."""
        act = model.get_submodule(site.name)
        found = activation_kind(act)
        if found is None or found[0] != site.config.get("source_kind"):
            raise FileFormatError(f"the plan does not fit this model: folded site '{site.name}' is {describe(act)}, "
                                  f"the plan expects activation kind {site.config.get('source_kind')!r}")
        for name in (site.facts.get("compensation") or {}).get("consumers", []):
            consumer = model.get_submodule(name)
            if getattr(consumer, "bias", True) is None:
                fold_into_consumer(consumer, 1.0, 0.0)  # c = 1, mu = 0: only adds a zero bias

    def set_strength(self, strength: float) -> None:
        """Recorded only: ANAct has no homotopy; it is exact at any strength once compensated."""
        s = check_strength(strength)
        self.strength = s

    def current_strength(self) -> float:
        return self.strength

    def claims_exact(self) -> bool:
        if self.compensated:
            return True
        with torch.no_grad():
            return bool((self.scale() == 1).all()) and bool((self.running_mean == 0).all())

    @classmethod
    def examples(cls) -> list[tuple[nn.Module, torch.Tensor]]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return [
                (nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 4)).eval(), torch.randn(8, 6)),
                (nn.Sequential(nn.Conv2d(3, 8, 1), nn.GELU(), nn.Conv2d(8, 5, 1)).eval(), torch.randn(2, 3, 6, 6)),
                (nn.Sequential(nn.Linear(6, 10), nn.SiLU(), nn.Linear(10, 3)).eval(), torch.randn(8, 6)),
            ]

    def extra_repr(self) -> str:
        params = "".join(f", {k}={v:g}" for k, v in self.act_params.items())
        chan = f", per_channel={self.channels}" if self.per_channel else ""
        return f"kind={self.kind}{params}{chan}, momentum={self.momentum:g}, reject={self.reject:g}"


