"""What the finder knows about a model: per-module facts from a torch.fx graph, or from a module walk.

The fx path traces with norm, activation, conv and linear modules (and normswap's own variants) kept
as leaves, and reads structure the module tree cannot show: which module produces a norm's input,
whether that output has other users (a residual add, say), which op consumes an activation, and
functional norm/activation calls. When tracing fails (data-dependent control flow, Hugging Face
transformers), the walk path falls back to ``named_modules()``: it can still decide producer and
consumer inside a plain ``nn.Sequential``, and records nothing it cannot prove.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import fx, nn

from normswap.core.kinds import (AFFINE_TYPES, ACTIVATION_TYPES, EXTRA_NORMS, NORM_FUNCTIONS, ACTIVATION_FUNCTIONS, ACTIVATION_METHODS, COMMUTING_MODULES, COMMUTING_FUNCTIONS, COMMUTING_METHODS, ACT_PARENTS, is_norm, is_activation, short_kind, qualname)
from normswap.errors import TraceError


class NormswapTracer(fx.Tracer):
    """An fx tracer that keeps norms, activations, convs, linears and normswap variants as leaves."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if getattr(m, "normswap_leaf", False) or isinstance(m, AFFINE_TYPES + ACTIVATION_TYPES) or is_norm(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


@dataclass
class ModuleInfo:
    """Facts about one module, as far as the finder could establish them."""

    name: str
    module: nn.Module
    path: str
    aliases: list[str] = field(default_factory=list)
    calls: int | None = None
    producer: str | None = None
    producer_exclusive: bool | None = None
    consumers: list[str] = field(default_factory=list)
    activation: str | None = None
    producer_kind: str | None = None
    downstream: list[dict[str, Any]] | None = None  # fx only: consumers reached through commuting ops
    inside: str | None = None  # fx only, for a module with no node: the called leaf module that runs it

    def pattern(self, kind: str | None = None) -> str:
        """``conv->bn->act`` style description of this module and its neighbours."""
        parts = []
        if self.producer_exclusive and self.producer_kind:
            parts.append(self.producer_kind)
        parts.append(kind or short_kind(self.module))
        if self.activation:
            parts.append("act")
        return "->".join(parts)

    def facts(self) -> dict[str, Any]:
        """JSON-able facts for the Plan."""
        d: dict[str, Any] = {}
        for key in ("producer", "producer_exclusive", "calls", "activation", "inside"):
            value = getattr(self, key)
            if value is not None:
                d[key] = value
        if self.consumers:
            d["consumers"] = list(self.consumers)
        if len(self.aliases) > 1:
            d["aliases"] = list(self.aliases)
        if self.downstream is not None:
            d["downstream"] = [dict(x) for x in self.downstream]
        return d


@dataclass
class FunctionalCall:
    """A functional norm or activation call found in the fx graph (``F.layer_norm``, ``torch.relu``).

    ``target``, ``args`` and ``kwargs`` are the fx node's (the function or method name; the arguments
    with the input, as fx nodes and constants), for variants that turn the call into a module."""

    node: str
    function: str
    kind: str  # "norm" | "activation"
    consumers: list[str] = field(default_factory=list)
    downstream: list[dict[str, Any]] | None = None  # consumers reached through commuting ops, as for modules
    producer: str | None = None  # the module whose output is the call's input, if a module produced it
    input_users: int = 1  # how many nodes use the call's input (an in-place call is safe to rewrite only at 1)
    input_fresh: bool = False  # the input is a Linear/conv/norm module's output (a new tensor, not a view)
    target: Any = None
    args: tuple = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    calls: int = 1

    @property
    def inplace(self) -> bool:
        """Whether the call writes into its input (``F.relu_``, ``x.relu_()``, ``F.relu(x, inplace=True)``)."""
        return self.function.endswith("_") or self.kwargs.get("inplace") is True or (
            len(self.args) > 1 and self.args[-1] is True and self.function in INPLACE_FLAG_POSITIONAL)

    def facts(self) -> dict[str, Any]:
        """JSON-able facts for the Plan."""
        d: dict[str, Any] = {"node": self.node, "function": self.function, "consumers": list(self.consumers)}
        if self.producer is not None:
            d["producer"] = self.producer
        if self.downstream is not None:
            d["downstream"] = [dict(x) for x in self.downstream]
        return d


@dataclass
class ModelGraph:
    """The finder's view of a model."""

    path: str  # "fx" or "walk"
    infos: list[ModuleInfo]
    functional: list[FunctionalCall]
    trace_error: str | None = None
    graph: fx.Graph | None = None

    def info(self, name: str) -> ModuleInfo | None:
        for info in self.infos:
            if info.name == name:
                return info
        return None


# Functions whose last positional argument may be ``inplace`` (``F.relu(x, True)``).
INPLACE_FLAG_POSITIONAL = {"F.relu", "F.relu6", "F.elu", "F.selu", "F.celu", "F.leaky_relu", "F.hardswish",
                           "F.hardsigmoid", "F.hardtanh", "F.silu", "F.mish", "F.dropout"}


def call_name(node: fx.Node) -> str | None:
    """``"F.relu"`` / ``"torch.sigmoid"`` / ``"Tensor.relu"`` for a functional norm or activation node, else None."""
    if node.op == "call_function":
        try:
            return NORM_FUNCTIONS.get(node.target) or ACTIVATION_FUNCTIONS.get(node.target)
        except TypeError:  # an unhashable target
            return None
    if node.op == "call_method" and node.target in ACTIVATION_METHODS:
        return f"Tensor.{node.target}"
    return None


def reached_modules(graph: fx.Graph, modules: set[str], nodes: set[str]) -> set[str]:
    """Targets of the module calls whose input depends on a call of one of ``modules`` or on one of ``nodes``."""
    todo = [n for n in graph.nodes if n.name in nodes or (n.op == "call_module" and str(n.target) in modules)]
    seen: set[fx.Node] = set()
    while todo:
        for user in todo.pop().users:
            if user not in seen:
                seen.add(user)
                todo.append(user)
    return {str(n.target) for n in seen if n.op == "call_module"}


def _aliases(model: nn.Module) -> dict[int, list[str]]:
    names: dict[int, list[str]] = {}
    for name, mod in model.named_modules(remove_duplicate=False):
        names.setdefault(id(mod), []).append(name)
    return names


def _describe_user(user: fx.Node) -> str:
    if user.op == "call_module":
        return str(user.target)
    if user.op == "call_function":
        return getattr(user.target, "__name__", str(user.target))
    if user.op == "call_method":
        return f".{user.target}()"
    return user.op


def _is_activation_node(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return is_activation(modules[str(node.target)])
    if node.op == "call_function":
        return node.target in ACTIVATION_FUNCTIONS
    return node.op == "call_method" and node.target in ACTIVATION_METHODS


def _commutes(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """A short name when ``node`` commutes with a positive per-tensor affine map of its first input."""
    if node.op == "call_module":
        mod = modules[str(node.target)]
        return type(mod).__name__ if isinstance(mod, COMMUTING_MODULES) else None
    if node.op == "call_function":
        return COMMUTING_FUNCTIONS.get(node.target)
    if node.op == "call_method" and node.target in COMMUTING_METHODS:
        return f".{node.target}()"
    return None


def _downstream(node: fx.Node, modules: dict[str, nn.Module]) -> list[dict[str, Any]]:
    """Every final consumer of ``node``'s output, following ops that commute with an affine map."""
    out: list[dict[str, Any]] = []
    stack: list[tuple[fx.Node, list[str]]] = [(node, [])]
    while stack:
        cur, via = stack.pop()
        for user in cur.users:
            first = user.args[0] if user.args else None
            op = _commutes(user, modules) if first is cur else None
            if op is not None:
                stack.append((user, [*via, op]))
            elif user.op == "call_module" and first is cur and isinstance(modules[str(user.target)], AFFINE_TYPES):
                out.append({"consumer": str(user.target), "module": True, "via": via})
            else:
                out.append({"consumer": _describe_user(user), "module": False, "via": via})
    return out


def trace(model: nn.Module) -> fx.Graph:
    """Trace ``model`` with :class:`NormswapTracer` (raises whatever fx raises)."""
    return NormswapTracer().trace(model)


def _from_graph(model: nn.Module, graph: fx.Graph) -> ModelGraph:
    modules = dict(model.named_modules())
    aliases = _aliases(model)
    nodes_of: dict[str, list[fx.Node]] = {}
    functional: list[FunctionalCall] = []
    for node in graph.nodes:
        if node.op == "call_module":
            nodes_of.setdefault(str(node.target), []).append(node)
        elif call_name(node) is not None:
            functional.append(_functional_call(node, modules))
    infos = []
    for name, mod in modules.items():
        if name == "":
            continue
        info = ModuleInfo(name=name, module=mod, path="fx", aliases=aliases.get(id(mod), [name]))
        calls = nodes_of.get(name, [])
        info.calls = len(calls)
        if calls:
            node = calls[0]
            src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
            if src is not None and src.op == "call_module":
                info.producer = str(src.target)
                info.producer_kind = short_kind(modules[info.producer])
                info.producer_exclusive = (
                    len(src.users) == 1 and len(calls) == 1 and len(nodes_of.get(info.producer, [])) == 1
                    and len(aliases.get(id(modules[info.producer]), [])) == 1
                )
            info.consumers = [_describe_user(u) for u in node.users]
            if is_activation(mod) or qualname(mod) in EXTRA_NORMS or is_norm(mod):
                info.downstream = _downstream(node, modules) if len(calls) == 1 else None
            if len(node.users) == 1 and len(calls) == 1:
                (user,) = node.users
                if _is_activation_node(user, modules):
                    info.activation = info.consumers[0]
        infos.append(info)
    _inner_facts(infos, modules)
    return ModelGraph("fx", infos, functional, graph=graph)


def _functional_call(node: fx.Node, modules: dict[str, nn.Module]) -> FunctionalCall:
    function = call_name(node) or ""
    src = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    producer = str(src.target) if src is not None and src.op == "call_module" else None
    fresh = producer is not None and (isinstance(modules[producer], AFFINE_TYPES) or is_norm(modules[producer]))
    return FunctionalCall(
        node.name, function, "norm" if function in NORM_FUNCTIONS.values() else "activation",
        [_describe_user(u) for u in node.users], downstream=_downstream(node, modules), producer=producer,
        input_users=len(src.users) if src is not None else 0, input_fresh=fresh, target=node.target,
        args=tuple(node.args), kwargs=dict(node.kwargs))


def _inner_facts(infos: list[ModuleInfo], modules: dict[str, nn.Module]) -> None:
    """Modules with no node of their own run inside a called leaf (``inside``). The ``act`` of a known
    norm + activation leaf (:data:`ACT_PARENTS`) produces that leaf's output, so it takes the leaf's
    consumers and call count, and the leaf becomes its producer."""
    by_name = {i.name: i for i in infos}
    for info in infos:
        if info.calls:
            continue
        parent = info.name.rpartition(".")[0]
        while parent and not (by_name.get(parent) and by_name[parent].calls):
            parent = parent.rpartition(".")[0]
        if not parent:
            continue
        info.inside = parent
        pinfo = by_name[parent]
        if info.name == f"{parent}.act" and qualname(pinfo.module) in ACT_PARENTS and len(info.aliases) == 1:
            info.calls, info.consumers, info.downstream = pinfo.calls, list(pinfo.consumers), pinfo.downstream
            info.producer, info.producer_kind, info.producer_exclusive = parent, short_kind(pinfo.module), True


def _walk(model: nn.Module, error: str) -> ModelGraph:
    """Module-walk fallback: only facts decidable without a graph (adjacency in a plain Sequential)."""
    aliases = _aliases(model)
    infos: dict[str, ModuleInfo] = {}
    for name, mod in model.named_modules():
        if name:
            infos[name] = ModuleInfo(name=name, module=mod, path="walk", aliases=aliases.get(id(mod), [name]))
    for pname, parent in model.named_modules():
        if not isinstance(parent, nn.Sequential) or type(parent).forward is not nn.Sequential.forward:
            continue
        children = list(parent.named_children())
        for (a_name, a), (b_name, b) in zip(children, children[1:]):
            full_a = f"{pname}.{a_name}" if pname else a_name
            full_b = f"{pname}.{b_name}" if pname else b_name
            if full_a not in infos or full_b not in infos:
                continue
            single = len(aliases.get(id(a), [])) == 1 and len(aliases.get(id(b), [])) == 1
            leaf_a = not isinstance(a, (nn.Sequential, nn.ModuleList, nn.ModuleDict))
            if leaf_a:
                infos[full_b].producer = full_a
                infos[full_b].producer_kind = short_kind(a)
                infos[full_b].producer_exclusive = single
                infos[full_a].consumers = [full_b]
                if single and is_activation(b):
                    infos[full_a].activation = full_b
    return ModelGraph("walk", list(infos.values()), [], trace_error=error)


def build_graph(model: nn.Module, strict_trace: bool = False) -> ModelGraph:
    """Trace ``model`` (fx path), or fall back to the module walk; ``strict_trace`` forbids the fallback."""
    try:
        graph = trace(model)
    except Exception as exc:  # fx raises many types (TraceError, TypeError, NotImplementedError, ...)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        error = f"{type(exc).__name__}: {first}"[:300]
        if strict_trace:
            raise TraceError(
                f"torch.fx could not trace {type(model).__name__} ({error}); run without --strict-trace "
                "to use the module-walk fallback"
            ) from None
        return _walk(model, error)
    return _from_graph(model, graph)


__all__ = [
    "ModuleInfo", "FunctionalCall", "ModelGraph", "NormswapTracer", "build_graph", "trace",
    "call_name", "reached_modules",
]
