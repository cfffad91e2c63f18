"""The site-local exactness proof: one recorded forward of the original, each converted site run on its inputs.

The argument (docs/speed.md, "Conversion"): when the converted model is the original's copy with only the
converted sites' modules replaced (every other module the untouched copy: :class:`~.copying.Snapshot`), its
forward is the original's forward with each site's function swapped. If every replacement, given the exact
input the original site received on the probe (every call of it), returns bit for bit the output the original
produced there, then by induction over the forward every later module receives the same input as in the
original, so the converted model's output on the probe is bit-identical to the original's (0 difference: both
run the same deterministic kernels on the same values; on a GPU with ``cudnn.benchmark`` the convolution
algorithm may change between runs, so there the converted model is run anyway). A site whose output is within
tolerance but not identical proves nothing downstream of it, so then the converted model is run end to end too.

The argument needs facts that :func:`sites` checks before any forward and :func:`check_sites` during it;
where one fails, verification falls back to comparing both models end to end:

- the model was traced by torch.fx (the module walk has no graph: which modules feed which is unknown), and the
  graph uses each site only by calling it (no ``get_attr`` of its parameters: the forward would read the
  replacement's instead);
- no site is a graph rewrite (a functional call turned into a module changes the graph itself);
- every site claims an exact start and is compared where it is built (the variant's compare point is its own
  output; ANAct's folded sites are exact only at their consumers, which it changes);
- no site absorbs modules: a folded Conv->BN pair computes the pair only to rounding, never bit for bit, so the
  end-to-end forward would run anyway, and then comparing each site inside that forward costs nothing more;
- nothing outside the sites changed since the copy (no module replaced, no tensor replaced or written in place);
- no site module, original or replacement, has forward hooks of its own (a pre-hook changes what the module
  sees; a replacement does not inherit them);
- no site module, original or replacement, writes into its input or returns storage of its input or weights
  (other users of that tensor, or an in-place op after the site, would see a difference the output does not show).

One assumption is not checked: that the forward's Python code does not branch on a site module's type or
attributes (fx evaluates such code while tracing, so the graph does not show it). The end-to-end forward would
see the effect of such a branch on the probe; this proof does not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from normswap.core.graph import ModelGraph
from normswap.core.plan import Plan
from normswap.core.probe import ProbeInput
from normswap.surgery.copying import Snapshot
from normswap.variants import registry
from normswap.variants.base import Variant

__all__ = ["Recording", "check_sites", "clone_tensors", "output_tensors", "record", "sites"]


def output_tensors(out: Any) -> list[torch.Tensor]:
    """The tensors in a model output (a tensor, or dicts, lists and tuples of them), in order."""
    if torch.is_tensor(out):
        return [out]
    if isinstance(out, dict) or hasattr(out, "items"):
        return [t for v in out.values() for t in output_tensors(v)]
    if isinstance(out, (list, tuple)):
        return [t for v in out for t in output_tensors(v)]
    return []


def clone_tensors(value: Any) -> Any:
    """``value`` with every tensor in it (in tuples, lists and dicts) cloned."""
    if torch.is_tensor(value):
        return value.detach().clone()
    if isinstance(value, dict):
        return type(value)((k, clone_tensors(v)) for k, v in value.items())
    if isinstance(value, (list, tuple)) and type(value) in (list, tuple):
        return type(value)(clone_tensors(v) for v in value)
    return value


def _versions(value: Any) -> list[tuple[torch.Tensor, int | None]]:
    return [(t, None if t.is_inference() else t._version) for t in output_tensors(value)]


def _storages(value: Any) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in output_tensors(value) if t.numel() and t.layout == torch.strided}


def _own_storages(module: nn.Module) -> set[int]:
    return _storages([*module.parameters(), *module.buffers()])


def _aliasing(out: Any, inputs: Any, own: set[int]) -> bool:
    """Whether ``out`` shares storage with ``inputs`` or with ``own`` (the module's tensors' storages): then an
    in-place op after the site would write into them, a side effect the output comparison does not see."""
    found = _storages(out)
    return bool(found & own or found & _storages(inputs))


def _written(versions: list[tuple[torch.Tensor, int | None]]) -> bool:
    """Whether any of the tensors was written in place since (an uncounted inference tensor counts as written)."""
    return any(v is None or t._version != v for t, v in versions)


def _hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward (pre-)hooks of its own: they belong to the site's function (a pre-hook
    can change the input the module sees), and a replacement does not carry them over."""
    return bool(module._forward_pre_hooks or module._forward_hooks)


def sites(plan: Plan, original: nn.Module, converted: nn.Module, graph: ModelGraph | None,
          snapshot: Snapshot | None) -> list[str] | str:
    """The converted sites' names, or why the site-local argument does not hold for this conversion (one line)."""
    if graph is None or graph.path != "fx":
        return "no torch.fx graph of the model (module walk): which modules feed which is not established"
    if snapshot is None:
        return "the converted model is not a checked copy of the original"
    names: list[str] = []
    covered: set[str] = set()
    new_modules = dict(converted.named_modules(remove_duplicate=False))
    old_modules = dict(original.named_modules(remove_duplicate=False))
    for site in plan.converted:
        if site.facts.get("graph_rewrite"):
            return f"site {site.name} rewrites the graph (a functional call became a module)"
        module = new_modules[site.name]
        if not (isinstance(module, Variant) and module.claims_exact()):
            return f"site {site.name} claims no exact start"
        if site.absorbs:
            return (f"site {site.name} folds '{site.absorbs[-1]}' into it: a fold is exact only to rounding, so "
                    "the end-to-end forward would run anyway")
        hooked = next((m for m in (module, old_modules[site.name]) if _hooks(m)), None)
        if hooked is not None:
            return f"site {site.name}'s {'original' if hooked is not module else 'new'} module has hooks of its own"
        if registry.get(site.variant).compare_points(site) != [(site.name, site.name)]:
            return f"site {site.name} is exact only where its variant compares it, not at its own output"
        names.append(site.name)
        covered |= {site.name, *site.facts.get("aliases", [])}
    read = next((str(n.target) for n in graph.graph.nodes if n.op == "get_attr" and any(
        str(n.target).startswith(f"{name}.") for name in covered)), None) if graph.graph is not None else None
    if read is not None:
        return f"the forward reads '{read}' itself, not only by calling the site"
    changed = snapshot.unchanged_outside(converted, covered)
    if changed:
        return f"the conversion changed modules outside its sites ({', '.join(changed[:3])})"
    return names


@dataclass
class Recording:
    """What one forward of the original recorded at the sites: per site, each call's inputs and output."""

    output: Any = None
    inputs: dict[str, list[tuple[tuple, dict]]] = field(default_factory=dict)
    outputs: dict[str, list[Any]] = field(default_factory=dict)
    unsafe: dict[str, str] = field(default_factory=dict)  # site -> why its original module breaks the argument
    order: list[tuple[str, int]] = field(default_factory=list)  # every call: (site, its index in inputs[site])

    def calls(self, names: Iterable[str]) -> list[tuple[str, tuple, dict]]:
        """``(site, args, kwargs)`` of every recorded call of the named sites, in the forward's order."""
        wanted = set(names)
        return [(name, *self.inputs[name][i]) for name, i in self.order if name in wanted]

    def last_outputs(self) -> dict[str, Any]:
        """Each site's last output (what the end-to-end method compares with)."""
        return {name: outs[-1] for name, outs in self.outputs.items() if outs}


def record(original: nn.Module, probe: ProbeInput, names: list[str]) -> Recording:
    """Run ``original`` once on ``probe`` (eval mode, no_grad; modes restored) recording every call of each named
    site: its inputs and its output (clones: an in-place op may follow), and whether it wrote or aliased its input."""
    rec = Recording()
    handles = []
    modes = {m: m.training for m in original.modules()}

    def watch(name: str, module: nn.Module) -> None:
        pending: list[list[tuple[torch.Tensor, int | None]]] = []
        rec.inputs[name], rec.outputs[name] = [], []
        own = _own_storages(module)

        def pre(_m: nn.Module, args: tuple, kwargs: dict) -> None:
            pending.append(_versions((args, kwargs)))
            rec.order.append((name, len(rec.inputs[name])))
            rec.inputs[name].append((clone_tensors(args), clone_tensors(kwargs)))

        def post(_m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            if _written(pending.pop()):
                rec.unsafe.setdefault(name, f"site {name}'s original module writes into its input")
            elif _aliasing(out, (args, kwargs), own):
                rec.unsafe.setdefault(name, f"site {name}'s original module returns storage of its input or weights")
            rec.outputs[name].append(clone_tensors(out))

        handles.append(module.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(module.register_forward_hook(post, with_kwargs=True))

    modules = dict(original.named_modules(remove_duplicate=False))
    for name in names:
        watch(name, modules[name])
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


def check_sites(converted: nn.Module, names: list[str], rec: Recording) -> dict[str, list[tuple[Any, Any]]] | str:
    """Run each named site's converted module on every input recorded at the original's: per site, the
    ``(original output, converted output)`` pairs, or why the site-local argument fails (a module writes into
    or returns its input, or an original module was left mid-call)."""
    unsafe = sorted(n for n in rec.unsafe if n in names)  # the recording may hold other modules (compare points)
    if unsafe:
        return rec.unsafe[unsafe[0]]
    pairs: dict[str, list[tuple[Any, Any]]] = {}
    modules = dict(converted.named_modules(remove_duplicate=False))
    for name in names:
        module = modules[name]
        modes = {m: m.training for m in module.modules()}
        own = _own_storages(module)
        calls, outs = rec.inputs[name], rec.outputs[name]
        if len(calls) != len(outs):  # a call that raised inside the original's forward (caught by its caller)
            return f"site {name}: {len(calls)} call(s) began but {len(outs)} returned"
        got = []
        try:
            module.eval()
            with torch.no_grad():
                for args, kwargs in calls:
                    before = _versions((args, kwargs))
                    y = module(*args, **kwargs)
                    if _written(before):
                        return f"site {name}: the converted module writes into its input"
                    if _aliasing(y, (args, kwargs), own):
                        return f"site {name}: the converted module returns storage of its input or weights"
                    got.append(y)
        finally:
            for m, mode in modes.items():
                m.training = mode
        pairs[name] = list(zip(outs, got))
    return pairs
