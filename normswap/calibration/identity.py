"""When two models provably compute the same function, so that the fidelity report runs one of them only.

Proof by inspection, not by running: the same module tree (names and classes), the same configuration
(every plain attribute compared by value, a GraphModule's generated code), bit-equal parameters and
buffers, and no hooks. A model and a deep copy of it at the same strength pass; a converted model and
the original it came from do not (other classes), even where they agree to the last bit.
"""

from __future__ import annotations

from dataclasses import fields, is_dataclass
from typing import Any

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


def same_function(a: nn.Module, b: nn.Module) -> bool:
    """True when ``a`` and ``b`` provably compute the same function in eval mode: the same module tree
    (names, classes), the same configuration (every plain attribute, a GraphModule's code), bit-equal
    parameters and buffers, and no hooks (``a`` and a deep copy of it at the same strength, say)."""
    if a is b:
        return True
    ma, mb = list(a.named_modules(remove_duplicate=False)), list(b.named_modules(remove_duplicate=False))
    if len(ma) != len(mb):
        return False
    for (na, x), (nb, y) in zip(ma, mb):
        if na != nb or type(x) is not type(y) or (isinstance(x, torch.fx.GraphModule) and x.code != y.code):
            return False
        dx, dy = vars(x), vars(y)
        if dx.keys() != dy.keys():
            return False
        for key, u in dx.items():
            if key in _SKIP:
                continue
            if key.endswith("_hooks") or key.endswith("_hooks_with_kwargs") or key.endswith("_hooks_always_called"):
                if u or dy[key]:
                    return False
            elif not _plain_equal(u, dy[key]):
                return False
        for kind in ("_parameters", "_buffers"):
            tx, ty = dx[kind], dy[kind]
            if tx.keys() != ty.keys() or any(
                    (tx[k] is None) != (ty[k] is None) or tx[k] is not None and (
                        tx[k].dtype != ty[k].dtype or tx[k].device != ty[k].device or not torch.equal(tx[k], ty[k]))
                    for k in tx):
                return False
    return True
