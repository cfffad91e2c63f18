"""Apply: replay a Plan by module name on a copy of the model (in place only when asked; the copy:
:func:`normswap.surgery.copying.copy_model`).

Every check and every replacement module is built before the first mutation, so a failure never
leaves a half-converted model. Replaced modules keep their names (so the user's class and the
state_dict key prefixes stay), modules folded into a neighbour become ``nn.Identity``, and a module
reachable under several names (a shared instance) is replaced under all of them by one new module.

Functional calls (``F.relu(x)``) have no module to replace. A site marked ``facts["graph_rewrite"]``
names the fx node of such a call (``facts["node"]``): the finder's graph is reused (or the model re-traced
with its tracer: node names are deterministic, so they match the plan), the call becomes a ``call_module`` of a new
top-level submodule ``site.name``, and the result is a ``torch.fx.GraphModule`` (it keeps the original's
module paths, so the state_dict keys stay; modules the forward never calls are not carried over).

A ``folded`` site (written by ``normswap.export``) keeps its source module; the variant's
``apply_folded`` rebuilds what the fold left behind (a consumer's new ``bias``, say).
"""

from __future__ import annotations

import copy

from torch import fx, nn

from normswap.errors import FileFormatError, NormswapError
from normswap.core.graph import call_name, trace
from normswap.core.plan import CONVERT, FOLDED, Plan, Site
from normswap.core.threads import serial
from normswap.variants import registry
from normswap.core.kinds import qualname
from normswap.surgery.copying import Snapshot, copy_model


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def _get(model: nn.Module, name: str, what: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise FileFormatError(f"the plan does not fit this model: it has no module '{name}' ({what})") from None


def rewrite_functional(model: nn.Module, sites: list[Site], graph: fx.Graph | None = None) -> fx.GraphModule:
    """A GraphModule of ``model`` in which each site's functional call is a call of module ``site.name``
    (built by the site's variant: :meth:`Variant.functional_module`). ``model``'s modules are shared.

    ``graph``: the finder's trace of ``model`` or of the model it was copied from (its nodes name modules, not
    objects); a copy of it is rewritten instead of tracing again."""
    try:
        graph = copy.deepcopy(graph) if graph is not None else trace(model)
    except Exception as exc:  # fx raises many types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise FileFormatError(f"the plan rewrites functional calls, but torch.fx cannot trace this model "
                              f"({type(exc).__name__}: {first})") from None
    nodes = {n.name: n for n in graph.nodes}
    jobs = []
    for site in sites:
        node = nodes.get(str(site.facts.get("node")))
        if node is None or call_name(node) != site.source_type:
            raise FileFormatError(f"the plan does not fit this model: it has no functional {site.source_type} call "
                                  f"at graph node '{site.facts.get('node')}' (site {site.name})")
        if hasattr(model, site.name):
            raise FileFormatError(f"cannot rewrite node '{node.name}': the model already has an attribute '{site.name}'")
        module = registry.get(site.variant).functional_module(site)
        module.train(model.training)
        jobs.append((site.name, node, module))
    gm = fx.GraphModule(model, graph)
    gm.train(model.training)
    for name, node, module in jobs:
        gm.add_submodule(name, module)
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (node.args[0],))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return gm


def apply_plan(model: nn.Module, plan: Plan, inplace: bool = False, *, graph: fx.Graph | None = None) -> nn.Module:
    """Return ``model`` converted as ``plan`` says (a copy unless ``inplace``).

    The result is a ``torch.fx.GraphModule`` when the plan rewrites functional calls (``graph``: the finder's
    trace of ``model``, reused for that instead of tracing again)."""
    return apply_checked(model, plan, inplace, graph=graph)[0]


def apply_checked(model: nn.Module, plan: Plan, inplace: bool = False, *, graph: fx.Graph | None = None
                  ) -> tuple[nn.Module, Snapshot]:
    """:func:`apply_plan`, also returning a :class:`Snapshot` of the model taken just before the first site was
    replaced (the copy, or ``model`` itself when ``inplace``): what the site-local verification checks against."""
    rewrites = [s for s in plan.sites if s.facts.get("graph_rewrite") and s.action in (CONVERT, FOLDED)]
    if rewrites and inplace:
        raise NormswapError(
            f"cannot convert in place: {len(rewrites)} functional call(s) (first: node "
            f"'{rewrites[0].facts.get('node')}') need a new torch.fx.GraphModule; convert a copy or exclude them")
    target = model if inplace else copy_model(model)
    if rewrites:
        target = rewrite_functional(target, rewrites, graph)
    snapshot = Snapshot.of(target)
    names_of: dict[int, list[str]] = {}
    for name, mod in target.named_modules(remove_duplicate=False):
        names_of.setdefault(id(mod), []).append(name)

    replacements: list[tuple[list[str], nn.Module]] = []
    built = []
    with serial():  # per-channel arithmetic, a parallel region each (normswap.core.threads)
        _build(target, plan, names_of, replacements, built)
    folded = [s for s in plan.sites if s.action == FOLDED]
    for site in folded:
        old = _get(target, site.name, "a folded site")
        if not site.facts.get("graph_rewrite") and qualname(old) != site.source_type:
            raise FileFormatError(f"the plan does not fit this model: folded site '{site.name}' is {qualname(old)}, "
                                  f"the plan expects {site.source_type}")

    for names, new in replacements:
        for name in names:
            _set(target, name, new)
    for cls, site, new in built:
        cls.after_apply(target, site, new)
    for site in folded:
        registry.get(site.variant).apply_folded(target, site)
    return target, snapshot


def _build(target: nn.Module, plan: Plan, names_of: dict[int, list[str]],
           replacements: list[tuple[list[str], nn.Module]], built: list) -> None:
    """Build every converted site's replacement (appended to ``built``) and list what replaces which names
    (``replacements``: a site's module, and ``nn.Identity`` for each module it absorbs); nothing is changed yet."""
    for site in plan.converted:
        cls = registry.get(site.variant)
        old = _get(target, site.name, "the site")
        if not site.facts.get("graph_rewrite") and qualname(old) != site.source_type:
            raise FileFormatError(
                f"the plan does not fit this model: '{site.name}' is {qualname(old)}, the plan expects {site.source_type}"
            )
        absorbed = [_get(target, a, f"absorbed by {site.name}") for a in site.absorbs]
        new = cls.from_site(site, old, absorbed)
        new.train(old.training)
        built.append((cls, site, new))
        replacements.append((names_of[id(old)], new))
        for a_name, a_mod in zip(site.absorbs, absorbed):
            replacements.append((names_of.get(id(a_mod), [a_name]), nn.Identity()))
