"""The variant contract: what every normswap variant (one self-contained file each) provides.

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
- calibration hooks: :meth:`calibration_begin` / observe in forward / :meth:`calibration_end`, which
  write results into registered buffers so they land in the state_dict.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Mapping

import torch
from torch import nn

from normswap.errors import FileFormatError, OptionError
from normswap.surgery.plan import CONVERT, SKIP, Site

# A site action written by ``normswap.export``: the variant's layer was folded into its neighbours for
# inference and the source module is back in place; ``apply`` rebuilds only what the fold left behind
# (:meth:`Variant.apply_folded`), so the exported file still loads strictly.
FOLDED = "folded"


def qualname(obj: type | nn.Module) -> str:
    """``module.QualName`` of a class or of an instance's class."""
    cls = obj if isinstance(obj, type) else type(obj)
    return f"{cls.__module__}.{cls.__qualname__}"


def _parse(value: Any, hint: Any, key: str, variant: str) -> Any:
    """Convert a CLI string (or a JSON value) to the config field's type, or raise OptionError."""
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        choices = typing.get_args(hint)
        if value not in choices:
            raise OptionError(
                f"option '{key}' of variant '{variant}' must be one of {', '.join(map(str, choices))}; got {value!r}"
            )
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        low = str(value).strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
    elif hint in (int, float):
        if isinstance(value, bool):
            raise OptionError(f"option '{key}' of variant '{variant}' expects {hint.__name__}, got {value!r}")
        try:
            if hint is int and isinstance(value, float) and not value.is_integer():
                raise ValueError
            return hint(value) if not isinstance(value, str) else hint(value.strip())
        except (TypeError, ValueError):
            pass
    elif hint is str:
        return str(value)
    else:
        return value
    raise OptionError(f"option '{key}' of variant '{variant}' expects {getattr(hint, '__name__', hint)}, got {value!r}")


def check_strength(value: float) -> float:
    """``value`` as a float in [0, 1], or an OptionError naming it."""
    s = float(value)
    if not 0.0 <= s <= 1.0:
        raise OptionError(f"strength must be in [0, 1]; got {s}")
    return s


@dataclass
class CalibrationSettings:
    """What the calibration runner passes to :meth:`Variant.calibration_begin`.

    ``strength``: the homotopy value the statistics are fitted for (PatchNorm's gains: the layer at
    ``lam = strength``); ``seed``: every random choice (subsampling, k-means++) derives from it;
    ``em_*``: UAN's EM (docs/methods.md section 3.3): values kept per channel, initialisation (``quantile`` or
    ``kmeans++``), log-likelihood tolerance per value, iteration cap; ``reduce``: sums a tensor over
    the workers of a torch.distributed job in place-free style (returns the sum; ``None`` = one
    process), ``broadcast``: returns rank 0's copy of a tensor (``None`` = one process). Variants apply
    them to their accumulated statistics in ``calibration_end`` so every rank writes the same values."""

    strength: float = 1.0
    seed: int = 0
    em_samples: int = 4096
    em_init: str = "quantile"
    em_tol: float = 1e-4
    em_max_iter: int = 100  # beyond ~100 steps EM gains < 0.002 nats/value, under the noise of 4096 values
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
    broadcast: Callable[[torch.Tensor], torch.Tensor] | None = None

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` summed over the workers (``t`` itself in one process)."""
        return t if self.reduce is None else self.reduce(t)

    def from_rank0(self, t: torch.Tensor) -> torch.Tensor:
        """Rank 0's value of ``t`` (``t`` itself in one process)."""
        return t if self.broadcast is None else self.broadcast(t)


@dataclass
class VariantConfig:
    """Base of every variant's config. ``strength`` is the uniform homotopy parameter in [0, 1]."""

    strength: float = 0.0

    @classmethod
    def from_options(cls, options: Mapping[str, Any] | None, strength: float, variant: str) -> "VariantConfig":
        """Validate user options strictly (unknown keys and bad values are errors) and build the config."""
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls) if f.name != "strength"]
        values: dict[str, Any] = {}
        for key, value in (options or {}).items():
            if key not in names:
                known = ", ".join(names) if names else "none"
                raise OptionError(f"unknown option {key!r} for variant '{variant}'; valid options: {known}")
            values[key] = _parse(value, hints[key], key, variant)
        config = cls(strength=check_strength(_parse(strength, float, "strength", variant)), **values)
        config.validate(variant)
        return config

    def validate(self, variant: str) -> None:
        """Range checks; raise OptionError with a one-line message. Subclasses call ``super().validate``
        (plans read from a file are validated too, not only user options)."""
        check_strength(self.strength)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VariantConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


class Variant(nn.Module):
    """Base class of the layers normswap converts into. See the module docstring for the contract."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    config_class: ClassVar[type[VariantConfig]] = VariantConfig
    adapters: ClassVar[dict[str, str]] = {}
    families: ClassVar[tuple[type, ...]] = ()
    functional_kinds: ClassVar[tuple[str, ...]] = ()  # "norm" / "activation": functional calls reported as skipped
    needs_calibration: ClassVar[bool] = False  # convert fits statistics on the probe batch before verifying
    # calibration fits against the original network's activations, in network order: such a variant provides
    # ``observe(x, y)`` (the module's input in the converted network, the original network's output at the
    # site's first compare point) and ``calibration_update()`` (solve from what it has seen so far and keep
    # collecting; the runner's streaming mode calls it just before the module runs)
    needs_targets: ClassVar[bool] = False

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
        """Sites for the graph's functional calls (:class:`normswap.surgery.graph.FunctionalCall`). By
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

    @classmethod
    def fold_for_export(cls, model: nn.Module, sites: list[Site]) -> tuple[list[str], dict[str, str]]:
        """Inference export: fold the given converted sites of ``model`` into their neighbours, in place,
        putting the source module back. Returns the names folded and, per site kept as it is, why.
        Default: nothing folds."""
        return [], {s.name: f"variant '{cls.name}' has no inference folding" for s in sites}

    @classmethod
    def apply_folded(cls, model: nn.Module, site: Site) -> None:
        """Rebuild what :meth:`fold_for_export` left behind at a ``folded`` site (new state_dict keys,
        say), so that ``load`` can load an exported file strictly."""
        raise FileFormatError(f"variant '{cls.name}' has no folded sites, but the plan marks '{site.name}' folded")

    def set_strength(self, strength: float) -> None:
        """Set the homotopy parameter: 0 = the exact source function, 1 = the paper's layer."""
        raise NotImplementedError

    def current_strength(self) -> float:
        """The homotopy value the module runs at now (what :meth:`set_strength` last set)."""
        raise NotImplementedError

    def claims_exact(self) -> bool:
        """True when this module claims to reproduce its source modules exactly (in eval mode)."""
        return False

    @classmethod
    def examples(cls) -> list[tuple[nn.Module, torch.Tensor]]:
        """Small models holding every source kind this variant accepts, each with an example input.

        The contract test suite (tests/test_variant_contract.py) converts each of them through the
        whole pipeline, so a new variant is tested with no new test code."""
        return []

    # ---- calibration hooks (the calibration runner drives these) ----------------------------------
    def calibration_begin(self, settings: CalibrationSettings | None = None) -> None:
        """Start collecting statistics in forward (``settings``: defaults when None)."""

    def calibration_end(self) -> None:
        """Stop collecting and write the fitted statistics into registered buffers."""

    @classmethod
    def calibration_end_many(cls, modules: list["Variant"]) -> None:
        """:meth:`calibration_end` for several layers of this variant, which a variant may fit together
        (UAN batches its EM); by default one at a time."""
        for module in modules:
            module.calibration_end()

    def calibration_abort(self) -> None:
        """Stop collecting and discard what was collected (an error interrupted calibration)."""

    def calibration_info(self) -> dict[str, float]:
        """Figures about the last calibration for the fidelity report (UAN: ``ll_gain``, the mean
        per-value log-likelihood gain of the K-component fit over K = 1); empty by default."""
        return {}


def strength_buffer(value: float, like: torch.Tensor | None = None) -> torch.Tensor:
    """A float32 scalar buffer for a homotopy parameter, on ``like``'s device."""
    device = like.device if like is not None else None
    return torch.tensor(float(value), dtype=torch.float32, device=device)


def settle_batchnorms(model: nn.Module, x: torch.Tensor, steps: int = 4) -> nn.Module:
    """Give an example model's BatchNorms non-trivial running statistics (a few training batches of scaled and
    shifted ``x``), then eval mode: the variants' ``examples()`` use it so that exactness means something."""
    model.train()
    with torch.no_grad():
        for i in range(steps):
            model(x * (1.0 + 0.5 * i) + 0.3 * i)
    return model.eval()
