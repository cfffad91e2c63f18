"""ANAct, the registered variant: which activations it converts, how it builds the layer
(:class:`normswap.variants.anact.layer.ANActLayer`, whose docstring gives the maths), and how it folds the
layer's compensation into consumers and exports it.

Sites (docs/anact.md): activation modules, the ``act`` of timm norm + activation layers, and functional
calls, which become modules ``anact_fn_<fx node>`` in a ``torch.fx.GraphModule`` (:meth:`propose_functional`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from normswap.core.kinds import ACTIVATION_TYPES, qualname
from normswap.core.plan import SKIP, Site
from normswap.errors import FileFormatError, NormswapError, OptionError
from normswap.variants.anact.activations import (
    DEFAULTS, KINDS, MODULE_CLASSES, UnsupportedActivationError, activation_kind, describe, make_activation,
    unsupported_message,
)
from normswap.variants.anact.fold import (
    compensation_status, decide, decide_call, exact_at, export_fold, fold_into_consumer, folds, mark_unchecked,
)
from normswap.variants.anact.layer import ANActLayer
from normswap.variants.base import Variant
from normswap.variants.config import VariantConfig
from normswap.variants.registry import register

__all__ = ["ANAct", "ANActConfig", "KINDS", "UnsupportedActivationError", "activation_kind", "compensation_status",
           "export_fold", "fold_into_consumer"]


def _model_float(model: nn.Module) -> tuple[torch.dtype | None, torch.device | None]:
    """The floating dtype and device of ``model``'s first floating tensor outside normswap's variant modules
    (whose strength buffers are float32 whatever the model); ``(None, None)`` when it has none."""
    for m in model.modules():
        if getattr(m, "normswap_leaf", False):
            continue
        for t in (*m.parameters(recurse=False), *m.buffers(recurse=False)):
            if t.is_floating_point():
                return t.dtype, t.device
    return None, None


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
class ANAct(ANActLayer, Variant):
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
        # an in-place activation's input buffer may take c (f - mu) only where nothing else reads it (fx's facts)
        reuse = site.path == "fx" and site.facts.get("producer_exclusive") is True
        return cls(module, per_channel=config.per_channel, channels=site.config.get("channels"),
                   momentum=config.momentum, reject=config.reject, strength=config.strength, folded=folds(site),
                   reuse_input=reuse, device=p.device if p is not None else None)

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
        module.follow(*_model_float(model))  # an activation has no dtype of its own: the model's
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

    @classmethod
    def examples(cls) -> list[tuple[nn.Module, torch.Tensor]]:
        from normswap.variants.anact.examples import examples

        return examples()
