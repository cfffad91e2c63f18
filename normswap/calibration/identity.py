"""When two models provably compute the same function, so that the fidelity report runs one of them only.

Proof by inspection, not by running: the same module tree (names and classes), the same configuration
(every plain attribute compared by value, a GraphModule's generated code), bit-equal parameters and
buffers, and no hooks. A model and a deep copy of it at the same strength pass; a converted model and
the original it came from do not (other classes), even where they agree to the last bit, unless every
converted site says which plain module it computes now (``Variant.source_function``) and that module
passes against the original's.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from typing import Any, Iterable

import torch
from torch import nn

__all__ = ["same_function"]

_PLAIN = (bool, int, float, str, type(None))
# compared separately (tensors, children), or not read by forward (a GraphModule's graph: its code is compared;
# normswap's metadata of a converted model)
_SKIP = {"_parameters", "_buffers", "_modules", "training", "_graph", "_tracer_cls", "_tracer_extras", "meta",
         "_normswap_meta"}


def _plain_equal(u: Any, v: Any) -> bool:
    """``u == v`` for plain data (numbers, strings, tuples / lists / dicts of them, the same object); anything
    else is not provably equal."""
    if u is v:
        return True
    if isinstance(u, _PLAIN) or isinstance(v, _PLAIN):
        return type(u) is type(v) and u == v
    if is_dataclass(u) and not isinstance(u, type) and type(u) is type(v):
        return all(_plain_equal(getattr(u, f.name), getattr(v, f.name)) for f in fields(u))
    if isinstance(u, (set, frozenset)) and type(u) is type(v):
        return all(isinstance(e, _PLAIN) for e in u) and u == v
    if isinstance(u, (tuple, list)) and type(u) is type(v):
        return len(u) == len(v) and all(_plain_equal(a, b) for a, b in zip(u, v))
    if isinstance(u, dict) and type(u) is type(v):
        return u.keys() == v.keys() and all(_plain_equal(u[k], v[k]) for k in u)
    return False


def _hook_key(key: str) -> bool:
    return key.endswith(("_hooks", "_hooks_with_kwargs", "_hooks_always_called"))


def _hooked(d: dict[str, Any]) -> bool:
    """Whether a module's ``vars`` hold any hook (forward, pre-forward, backward, state-dict ...)."""
    return any(v for k, v in d.items() if _hook_key(k))


def _same_module(x: nn.Module, y: nn.Module) -> bool:
    """One module of each tree, children aside: class, a GraphModule's code, plain attributes, no hooks, bit-equal
    parameters and buffers."""
    if type(x) is not type(y) or (isinstance(x, torch.fx.GraphModule) and x.code != y.code):
        return False
    dx, dy = vars(x), vars(y)
    if dx.keys() - _SKIP != dy.keys() - _SKIP or _hooked(dx) or _hooked(dy):
        return False
    for key, u in dx.items():
        if key not in _SKIP and not _hook_key(key) and not _plain_equal(u, dy[key]):
            return False
    for kind in ("_parameters", "_buffers"):
        tx, ty = dx[kind], dy[kind]
        if tx.keys() != ty.keys() or any(
                (tx[k] is None) != (ty[k] is None) or tx[k] is not None and (
                    tx[k].dtype != ty[k].dtype or tx[k].device != ty[k].device or not torch.equal(tx[k], ty[k]))
                for k in tx):
            return False
    return True


def _same_tree(x: nn.Module, y: nn.Module, name: str, sites: set[str]) -> bool:
    if name in sites:  # a converted site: what its variant says it computes now, against the original's module
        plain = x.source_function() if hasattr(x, "source_function") and not _hooked(vars(x)) else None
        return plain is not None and same_function(plain, y)
    if not _same_module(x, y) or x._modules.keys() != y._modules.keys():
        return False
    return all((cx is None) == (cy is None) and (cx is None or _same_tree(cx, cy, f"{name}.{key}" if name else key,
                                                                            sites))
               for (key, cx), cy in zip(x._modules.items(), y._modules.values()))


def same_function(a: nn.Module, b: nn.Module, sites: Iterable[str] = ()) -> bool:
    """True when ``a`` and ``b`` provably compute the same function in eval mode: the same module tree
    (names, classes), the same configuration (every plain attribute, a GraphModule's code), bit-equal
    parameters and buffers, and no hooks (``a`` and a deep copy of it at the same strength, say).

    ``sites``: names of converted sites in ``a`` (a converted model) whose module may differ from ``b``'s (the
    original): each must offer :meth:`~normswap.variants.base.Variant.source_function` (a plain module computing
    exactly its function now: ANAct's unfolded site at strength 0 is its activation), which must in turn be
    provably ``b``'s module there; everything else as above."""
    return a is b or _same_tree(a, b, "", set(sites))
