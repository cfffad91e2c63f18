"""Find: model -> Plan. Pure: the model is traced and read, never changed.

Matching rules (DESIGN.md): a pattern selects sites by type (``BatchNorm2d``, ``torch.nn.BatchNorm2d``,
``type:LayerNorm``) or by name: an exact module name, ``.suffix`` (any name ending in it), or
``re:REGEX`` (a full match). Excludes are applied first. A pattern that matches nothing is an error
that names the pattern and the nearest names.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Iterable, Mapping

from torch import nn

from normswap.errors import TargetError, UsageError
from normswap.core.graph import ModelGraph, build_graph
from normswap.core.plan import CONVERT, SKIP, Plan, Site
from normswap.variants import registry


def _compile(pattern: str) -> Any:
    if pattern.startswith("re:"):
        try:
            return re.compile(pattern[3:])
        except re.error as exc:
            raise UsageError(f"invalid regular expression in pattern '{pattern}': {exc}") from None
    return None


def _type_names(qual: str) -> set[str]:
    short = qual.rsplit(".", 1)[-1]
    names = {qual, short, f"type:{short}", f"type:{qual}"}
    if qual.startswith("torch.nn.modules."):
        names |= {f"nn.{short}", f"torch.nn.{short}", f"type:nn.{short}", f"type:torch.nn.{short}"}
    return names


def site_matches(pattern: str, site: Site, compiled: Any = None) -> bool:
    """Whether ``pattern`` selects ``site`` (its module name, an absorbed name, or its type)."""
    if pattern in _type_names(site.source_type):
        return True
    if pattern.startswith("type:"):
        return False
    names = [site.name, *site.absorbs, *site.facts.get("aliases", [])]
    if isinstance(site.facts.get("node"), str):  # a functional call: its fx node name too
        names.append(site.facts["node"])
    if pattern.startswith("re:"):
        rx = compiled or re.compile(pattern[3:])
        return any(rx.fullmatch(n) for n in names)
    if pattern.startswith("."):
        return any(n.endswith(pattern) or n == pattern[1:] for n in names)
    return pattern in names


def _nearby(pattern: str, candidates: Iterable[str]) -> str:
    key = pattern[3:] if pattern.startswith("re:") else pattern.lstrip(".")
    pool = sorted(set(candidates))
    close = difflib.get_close_matches(key, pool, n=3, cutoff=0.5)
    if not close:
        close = [c for c in pool if key and key.split(".")[-1] in c][:3] or pool[:3]
    return ", ".join(close) if close else "none"


def _patterns(value: Iterable[str] | str | None, what: str) -> list[str]:
    """A pattern list: a single string is one pattern (not a list of its characters); empty ones are dropped."""
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    bad = next((p for p in items if not isinstance(p, str)), None)
    if bad is not None:
        raise TargetError(f"{what} must be pattern strings; got {type(bad).__name__} {bad!r}")
    return [p for p in items if p]


def find(model: nn.Module, to: str, targets: Iterable[str] | None = None, exclude: Iterable[str] | None = None,
         strength: float = 0.0, options: Mapping[str, Any] | None = None, strict_trace: bool = False,
         graph: ModelGraph | None = None) -> Plan:
    """Plan the conversion of ``model`` to variant ``to`` without changing the model (see :func:`find_graph`)."""
    return find_graph(model, to, targets, exclude, strength, options, strict_trace, graph)[0]


def find_graph(
    model: nn.Module,
    to: str,
    targets: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    strength: float = 0.0,
    options: Mapping[str, Any] | None = None,
    strict_trace: bool = False,
    graph: ModelGraph | None = None,
) -> tuple[Plan, ModelGraph]:
    """Plan the conversion of ``model`` to variant ``to`` without changing the model; also return the
    :class:`ModelGraph` it was planned on (for apply and verify to share one trace).

    Args:
        model: the model (any ``nn.Module``, a ``torch.fx.GraphModule`` included).
        to: a registered variant name (``normswap.variants.names()``).
        targets: patterns selecting sites (default: every site the variant proposes, except opt-in ones); a
            single string is one pattern.
        exclude: patterns removing sites; applied before targets.
        strength: the uniform homotopy parameter, 0 (exact start) to 1 (the paper's layer).
        options: variant-specific settings, validated strictly against the variant's config.
        strict_trace: raise instead of falling back to the module walk when torch.fx cannot trace.
        graph: a pre-built :class:`ModelGraph` (to share one trace between calls).
    """
    cls = registry.get(to)
    config = cls.config_class.from_options(options, strength, to)
    targets, exclude = _patterns(targets, "targets"), _patterns(exclude, "exclude")
    compiled = {p: _compile(p) for p in [*targets, *exclude]}
    graph = graph or build_graph(model, strict_trace=strict_trace)
    sites = cls.propose(graph.infos, config) + cls.propose_functional(graph.functional, graph.infos, config)
    all_names = [n for s in sites for n in (s.name, *s.absorbs)]  # hints name only real sites of this variant

    def matching(pattern: str) -> list[Site]:
        return [s for s in sites if site_matches(pattern, s, compiled[pattern])]

    for pattern in exclude:
        hits = matching(pattern)
        if not hits:
            raise TargetError(f"exclude pattern '{pattern}' matches no site; nearby names: {_nearby(pattern, all_names)}")
        for site in hits:
            if site.action == CONVERT:
                site.action, site.reason = SKIP, f"excluded by '{pattern}'"
    if targets:
        chosen: set[int] = set()
        for pattern in targets:
            hits = matching(pattern)
            if not hits:
                raise TargetError(
                    f"target '{pattern}' matches no {to} site; nearby names: {_nearby(pattern, all_names)}"
                )
            chosen |= {id(s) for s in hits}
        for site in sites:
            if site.action == CONVERT and id(site) not in chosen:
                site.action, site.reason = SKIP, "not targeted"
    else:
        for site in sites:
            if site.action == CONVERT and site.opt_in:
                site.action = SKIP
                site.reason = f"converted only when a target names it (e.g. --targets {site.name})"
    cls.finalize_plan(sites, graph)
    return Plan(
        variant=to,
        strength=config.strength,
        options={k: v for k, v in config.to_dict().items() if k != "strength"},
        targets=targets,
        exclude=exclude,
        trace_path=graph.path,
        trace_error=graph.trace_error,
        sites=sites,
    ), graph
