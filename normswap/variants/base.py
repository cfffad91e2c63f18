"""The variant contract: what every normswap variant (one self-contained folder each) provides.

A variant is an ``nn.Module`` subclass, registered by name with :func:`normswap.variants.register`:

- ``name``: the registry name (``uan``); ``config_class``: its typed config (a :class:`VariantConfig`).
- ``adapters``: qualified class name of each accepted source type -> a source kind (``"bn"``, ...);
  ``families``: base classes whose *other* subclasses are refused by name, never silently downgraded.
- :meth:`propose`: which sites of a model it rewrites (default: every module :meth:`classify` accepts).
- :meth:`from_site`: build the replacement from the source module(s), copying every hyper-parameter,
  device and dtype. ``load`` calls the same constructor on a freshly built source model and then loads
  the state_dict strictly, so the structure must depend only on the site and the source structure.
- :meth:`set_strength`: the uniform homotopy parameter (docs/methods.md section 0): 0 = exact copy of the
  pretrained function, 1 = the paper's layer.
- :meth:`claims_exact`: whether the module claims to reproduce its source exactly right now; the
  apply step verifies every such claim on a probe batch.
- the calibration protocol (:mod:`normswap.variants.calibration`) and the export protocol
  (:mod:`normswap.variants.export`), with defaults that do nothing;
- :meth:`examples`: small models for the contract test suite (each variant's ``examples.py``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from normswap.core.kinds import qualname
from normswap.core.plan import CONVERT, SKIP, Site
from normswap.errors import FileFormatError
from normswap.variants.calibration import CalibrationHooks
from normswap.variants.config import VariantConfig
from normswap.variants.export import ExportHooks

__all__ = ["Variant", "share_tensors"]


class Variant(CalibrationHooks, ExportHooks, nn.Module):
    """Base class of the layers normswap converts into. See the module docstring for the contract."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    config_class: ClassVar[type[VariantConfig]] = VariantConfig
    adapters: ClassVar[dict[str, str]] = {}
    families: ClassVar[tuple[type, ...]] = ()
    functional_kinds: ClassVar[tuple[str, ...]] = ()  # "norm" / "activation": functional calls reported as skipped
    needs_calibration: ClassVar[bool] = False  # convert fits statistics on the probe batch before verifying
    # fits against the original network's activations in network order (normswap.variants.calibration)
    needs_targets: ClassVar[bool] = False
    normswap_leaf: ClassVar[bool] = True  # the finder's tracer keeps variant modules as leaves

    # ---- finding sites -------------------------------------------------------------------------
    @classmethod
    def classify(cls, module: nn.Module) -> tuple[str | None, str]:
        """Return ``(source_kind, "")`` if this variant converts ``module``, else ``(None, reason)``.

        A reason is empty when the module is simply not of interest; it is non-empty for a module of
        a known family that is refused (an unknown subclass, say)."""
        kind = cls.adapters.get(qualname(module))
        if kind is not None:
            return kind, ""
        if any(isinstance(module, fam) for fam in cls.families):
            known = next((c for c in type(module).__mro__[1:] if qualname(c) in cls.adapters), None)
            base = (known or next(f for f in cls.families if isinstance(module, f))).__name__
            return None, (
                f"unknown subclass {qualname(module)} of {base}: no adapter, refused "
                "rather than silently dropping its behaviour"
            )
        return None, ""

    @classmethod
    def propose(cls, infos: list[Any], config: VariantConfig) -> list[Site]:
        """Sites this variant would rewrite in a model, given the finder's per-module facts."""
        sites = []
        for info in infos:
            kind, reason = cls.classify(info.module)
            if kind is None and not reason:
                continue
            sites.append(
                Site(
                    name=info.name,
                    source_type=qualname(info.module),
                    variant=cls.name,
                    action=CONVERT if kind else SKIP,
                    reason=reason,
                    pattern=info.pattern(kind),
                    path=info.path,
                    config={**config.to_dict(), "source_kind": kind} if kind else {},
                    facts=info.facts(),
                )
            )
        return sites

    @classmethod
    def propose_functional(cls, calls: list[Any], infos: list[Any], config: VariantConfig) -> list[Site]:
        """Sites for the graph's functional calls (:class:`normswap.core.graph.FunctionalCall`). By
        default the calls of :attr:`functional_kinds` are reported as skipped; a variant that converts
        them returns converting sites with ``facts["graph_rewrite"] = True`` and builds the module that
        replaces the call in :meth:`functional_module` (``apply`` then returns a ``torch.fx.GraphModule``)."""
        return [
            Site(name=call.node, source_type=call.function, variant=cls.name, action=SKIP,
                 reason=(f"functional {call.function} call: normswap rewrites modules, and a functional call "
                         "has no module to replace (wrap it in a module to convert it)"),
                 pattern="functional", path="fx", facts={"consumers": call.consumers})
            for call in calls if call.kind in cls.functional_kinds
        ]

    @classmethod
    def finalize_plan(cls, sites: list[Site], graph: Any) -> None:
        """Adjust the sites once targets and excludes are settled (``graph``: the finder's ModelGraph)."""

    @classmethod
    def functional_module(cls, site: Site) -> nn.Module:
        """The plain module computing a graph-rewrite site's functional call (``nn.ReLU()`` for ``F.relu``);
        ``apply`` puts it under ``site.name`` in place of the call, then converts it like a module site."""
        raise FileFormatError(f"variant '{cls.name}' does not rewrite functional calls (site '{site.name}')")

    # ---- building --------------------------------------------------------------------------------
    @classmethod
    def from_site(cls, site: Site, module: nn.Module, absorbed: list[nn.Module]) -> "Variant":
        """Build the replacement for ``module`` (and the ``absorbed`` modules folded into it)."""
        raise NotImplementedError

    @classmethod
    def compare_points(cls, site: Site) -> list[tuple[str, str]]:
        """``(original module, converted module)`` pairs whose outputs must agree when the site claims
        an exact start: by default the last module the site replaces and its replacement."""
        return [(site.absorbs[-1] if site.absorbs else site.name, site.name)]

    @classmethod
    def after_apply(cls, model: nn.Module, site: Site, module: "Variant") -> None:
        """Called once every site of the plan is in place: adjust neighbouring modules (ANAct folds
        its compensation into its consumers here). ``load`` calls it too, before the strict load."""

    @classmethod
    def after_calibration(cls, model: nn.Module, site: Site, module: "Variant") -> None:
        """Called after :meth:`calibration_end`: refit neighbours to the new statistics."""

    def set_strength(self, strength: float) -> None:
        """Set the homotopy parameter: 0 = the exact source function, 1 = the paper's layer."""
        raise NotImplementedError

    def current_strength(self) -> float:
        """The homotopy value the module runs at now (what :meth:`set_strength` last set)."""
        raise NotImplementedError

    def claims_exact(self) -> bool:
        """True when this module claims to reproduce its source modules exactly (in eval mode)."""
        return False

    def source_function(self) -> nn.Module | None:
        """A plain module that computes exactly what this one computes now, in eval mode, for every input (bit for
        bit: the same kernels on the same values), or ``None`` (the default: no such proof). The fidelity report
        compares it by inspection with the original's module at the site
        (:func:`normswap.calibration.identity.same_function`); when every site and every other module pass, the
        converted model at that strength is the original, and it is not run."""
        return None

    @classmethod
    def examples(cls) -> list[tuple[nn.Module, torch.Tensor]]:
        """Small models holding every source kind this variant accepts, each with an example input.

        The contract test suite (tests/test_variant_contract.py) converts each of them through the
        whole pipeline, so a new variant is tested with no new test code."""
        return []


def share_tensors(plain: nn.Module, module: nn.Module, keys: tuple[str, ...]) -> nn.Module:
    """``plain`` (a freshly built source module, for :meth:`Variant.source_function`) holding ``module``'s own
    tensors under ``keys``, as parameters or buffers wherever ``plain`` has them (one ``module`` lacks: ``None``),
    in eval mode."""
    for key in keys:
        table = plain._parameters if key in plain._parameters else plain._buffers
        if key in table:
            table[key] = getattr(module, key, None)
    return plain.eval()
