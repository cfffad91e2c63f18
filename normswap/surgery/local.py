"""The site-local exactness proof: one recorded forward of the original, each converted site run on its inputs.

The argument (docs/speed.md, "Conversion"): when the converted model is the original's copy with only the
converted sites' modules replaced (every other module the untouched copy: :class:`~.copying.Snapshot`), its
forward is the original's forward with each site's function swapped. If every replacement, given the exact
input the original site received on the probe (every call of it), returns bit for bit the output the original
produced there, then by induction over the forward every later module receives the same input as in the
original, so the converted model's output on the probe is bit-identical to the original's (0 difference: both
run the same deterministic kernels on the same values). A site whose output is within tolerance but not
identical proves nothing downstream of it, so then the converted model is run end to end as well.

The argument needs facts that :func:`regions` checks before any forward and :func:`check_sites` during it;
where one fails, verification falls back to comparing both models end to end:

- the model was traced by torch.fx (the module walk has no graph: which modules feed which is unknown);
- no site is a graph rewrite (a functional call turned into a module changes the graph itself);
- every site claims an exact start and is compared where it is built (the variant's compare point is the last
  module it replaces; ANAct's folded sites are exact only at their consumers, which it changes);
- a site that absorbs modules (a Conv->BN pair) is a chain the graph proves exclusive: each absorbed module is
  fed by the previous one alone, and that output has no other user;
- nothing outside the sites changed since the copy (no module replaced, no tensor replaced or written in place);
- no site module, original or replacement, writes into its input (other users of that tensor would see it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from normswap.core.graph import ModelGraph
from normswap.core.plan import Plan, Site
from normswap.core.probe import ProbeInput
from normswap.surgery.copying import Snapshot
from normswap.variants import registry
from normswap.variants.base import Variant

__all__ = ["Recording", "check_sites", "record", "regions"]


def _tensors(value: Any) -> list[torch.Tensor]:
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, dict):
        return [t for v in value.values() for t in _tensors(v)]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


def _clone(value: Any) -> Any:
    """``value`` with every tensor in it (in tuples, lists and dicts) cloned."""
    if torch.is_tensor(value):
        return value.detach().clone()
    if isinstance(value, dict):
        return type(value)((k, _clone(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        return type(value)(_clone(v) for v in value)
    return value


def _versions(value: Any) -> list[tuple[torch.Tensor, int | None]]:
    return [(t, None if t.is_inference() else t._version) for t in _tensors(value)]


def _storages(value: Any) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in _tensors(value) if t.numel() and t.layout == torch.strided}


def _aliasing(out: Any, inputs: Any, modules: list[nn.Module]) -> bool:
    """Whether ``out`` shares storage with ``inputs`` or the modules' own tensors (then an in-place op after the
    site would write into them: a side effect the output comparison does not see)."""
    own = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    return bool(_storages(out) & (_storages(inputs) | _storages(own)))


def _written(versions: list[tuple[torch.Tensor, int | None]]) -> bool:
    """Whether any of the tensors was written in place since (an uncounted inference tensor counts as written)."""
    return any(v is None or t._version != v for t, v in versions)


def regions(plan: Plan, converted: nn.Module, graph: ModelGraph | None, snapshot: Snapshot | None
            ) -> dict[str, list[str]] | str:
    """Each converted site's chain of original module names (the site, then what it absorbs), or why the
    site-local argument does not hold for this conversion (a one-line reason)."""
    if graph is None or graph.path != "fx":
        return "no torch.fx graph of the model (module walk): which modules feed which is not established"
    if snapshot is None:
        return "the converted model is not a checked copy of the original"
    chains: dict[str, list[str]] = {}
    covered: set[str] = set()
    for site in plan.converted:
        if site.facts.get("graph_rewrite"):
            return f"site {site.name} rewrites the graph (a functional call became a module)"
        module = converted.get_submodule(site.name)
        if not (isinstance(module, Variant) and module.claims_exact()):
            return f"site {site.name} claims no exact start"
        chain = [site.name, *site.absorbs]
        if registry.get(site.variant).compare_points(site) != [(chain[-1], site.name)]:
            return f"site {site.name} is exact only where its variant compares it, not at its own output"
        for prev, cur in zip(chain, chain[1:]):
            info = graph.info(cur)
            if info is None or info.producer != prev or not info.producer_exclusive:
                return f"site {site.name}: the graph does not prove that '{prev}' alone feeds '{cur}'"
        chains[site.name] = chain
        covered |= {*chain, *site.facts.get("aliases", [])}
    changed = snapshot.unchanged_outside(converted, covered)
    if changed:
        return f"the conversion changed modules outside its sites ({', '.join(changed[:3])})"
    return chains


@dataclass
class Recording:
    """What one forward of the original recorded at the sites: per site, each call's inputs and output."""

    output: Any = None
    inputs: dict[str, list[tuple[tuple, dict]]] = field(default_factory=dict)
    outputs: dict[str, list[Any]] = field(default_factory=dict)
    unsafe: dict[str, str] = field(default_factory=dict)  # site -> why its original module breaks the argument

    def last_outputs(self, chains: dict[str, list[str]]) -> dict[str, Any]:
        """The last call's output of each site's compare module, by its name (what the end-to-end check uses)."""
        return {chains[s][-1]: outs[-1] for s, outs in self.outputs.items() if outs}


def record(original: nn.Module, probe: ProbeInput, chains: dict[str, list[str]]) -> Recording:
    """Run ``original`` once on ``probe`` (eval mode, no_grad; modes restored) recording every call of each
    site: its inputs and its output (clones: an in-place op may follow), and whether a module wrote its input."""
    rec = Recording()
    handles = []
    modes = {m: m.training for m in original.modules()}

    def watch(site: str, module: nn.Module, first: bool, last: bool) -> None:
        pending: list[list[tuple[torch.Tensor, int | None]]] = []

        def pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            pending.append(_versions((args, kwargs)))
            if first:
                rec.inputs[site].append((_clone(args), _clone(kwargs)))

        def post(m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            if _written(pending.pop()):
                rec.unsafe.setdefault(site, f"site {site}'s original module writes into its input")
            elif _aliasing(out, (args, kwargs), [m]):
                rec.unsafe.setdefault(site, f"site {site}'s original module returns storage of its input or weights")
            if last:
                rec.outputs[site].append(_clone(out))

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))

    for site, chain in chains.items():
        rec.inputs[site], rec.outputs[site] = [], []
        for i, name in enumerate(chain):
            watch(site, original.get_submodule(name), i == 0, i == len(chain) - 1)
    try:
        original.eval()
        with torch.no_grad():
            rec.output = original(*probe.args, **probe.kwargs)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    return rec


def check_sites(converted: nn.Module, chains: dict[str, list[str]], rec: Recording
                ) -> dict[str, list[tuple[Any, Any]]] | str:
    """Run each site's chain of converted modules on every recorded input of the original's site: per site, the
    ``(original output, converted output)`` pairs, or why the site-local argument fails (a module writes its
    input, or the calls do not pair up)."""
    if rec.unsafe:
        return rec.unsafe[sorted(rec.unsafe)[0]]
    pairs: dict[str, list[tuple[Any, Any]]] = {}
    for site, chain in chains.items():
        modules = [converted.get_submodule(n) for n in chain]
        modes = {m: m.training for mod in modules for m in mod.modules()}
        calls, outs = rec.inputs[site], rec.outputs[site]
        if len(calls) != len(outs):
            return f"site {site}: {len(calls)} call(s) of '{chain[0]}' but {len(outs)} of '{chain[-1]}'"
        try:
            for mod in modules:
                mod.eval()
            with torch.no_grad():
                got = []
                for args, kwargs in calls:
                    before = _versions((args, kwargs))
                    y = modules[0](*args, **kwargs)
                    for mod in modules[1:]:
                        y = mod(y)
                    if _written(before):
                        return f"site {site}: the converted module writes into its input"
                    if _aliasing(y, (args, kwargs), modules):
                        return f"site {site}: the converted module returns storage of its input or weights"
                    got.append(y)
        finally:
            for m, mode in modes.items():
                m.training = mode
        pairs[site] = list(zip(outs, got))
    return pairs
