"""Copy a model for conversion: ``copy.deepcopy``'s result, without most of its Python overhead.

``copy.deepcopy`` of a ResNet-50 spends more time walking module ``__dict__``s through the generic
``__reduce_ex__`` protocol than copying its 100 MB of weights. :func:`copy_model` clones every plain parameter
and buffer first, in one pass (into the deepcopy memo, so a tensor reachable twice is cloned once), then
rebuilds each module whose class uses ``nn.Module``'s default pickling protocol directly: a new instance of the
same class, its parameter, buffer and child dicts rebuilt, its immutable attributes shared, and everything
else (hooks, lists, dicts, tensors that are not parameters or buffers) deep-copied through the same memo.
Modules with their own protocol (``__deepcopy__``, ``__reduce_ex__``, a ``__getstate__`` not nn.Module's, e.g.
``torch.fx.GraphModule``) and tensors that are not plain (subclasses, views sharing a storage, tensors with a
``grad`` or attributes) go through ``copy.deepcopy`` itself, with that memo. The copy shares no parameter or
buffer storage with the original.

:class:`Snapshot` records which tensor and module objects a copy holds, and at which version (torch's
per-tensor counter of in-place writes), so the verifier can tell that a module is still the untouched copy.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["Snapshot", "copy_model"]

_ATOMIC = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.Size,
           torch.memory_format, torch.layout)
_TENSOR_DICTS = ("_parameters", "_buffers")


def _plain_class(cls: type) -> bool:
    """Whether ``cls`` copies through nn.Module's default protocol (the one the fast path reproduces)."""
    return (getattr(cls, "__deepcopy__", None) is None and cls.__reduce_ex__ is object.__reduce_ex__
            and cls.__reduce__ is object.__reduce__ and cls.__getstate__ is nn.Module.__getstate__
            and not any("__slots__" in vars(c) for c in cls.__mro__))


def _plain_tensor(t: torch.Tensor) -> bool:
    if type(t) is nn.Parameter:
        pass  # Parameter.__deepcopy__ clones the data and keeps requires_grad, nothing else
    elif type(t) is not torch.Tensor or t.grad is not None or t.__dict__:
        return False
    return (t.is_leaf and t.layout == torch.strided and not t.is_quantized and not t.is_inference()
            and t.device.type in ("cpu", "cuda"))


def _clone(t: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        data = t.detach().clone(memory_format=torch.preserve_format)
    if type(t) is nn.Parameter:
        return nn.Parameter(data, t.requires_grad)
    return data.requires_grad_(t.requires_grad)


def _seed(model: nn.Module, memo: dict[int, Any]) -> list[torch.Tensor]:
    """Clone every plain parameter and buffer into ``memo``; tensors sharing a storage are left to deepcopy
    (which keeps them sharing). Returns the originals, which must stay alive while ``memo`` is used."""
    tensors: dict[int, torch.Tensor] = {}
    storages: dict[int, int] = {}
    for mod in model.modules():
        for t in (*mod._parameters.values(), *mod._buffers.values()):
            if t is not None and id(t) not in tensors:
                tensors[id(t)] = t
    for t in tensors.values():
        if t.device.type in ("cpu", "cuda") and t.layout == torch.strided and not t.is_inference():
            ptr = t.untyped_storage().data_ptr()
            storages[ptr] = storages.get(ptr, 0) + 1
    kept = []
    for key, t in tensors.items():
        if _plain_tensor(t) and t.numel() and storages.get(t.untyped_storage().data_ptr()) == 1:
            memo[key] = _clone(t)
            kept.append(t)
    return kept


def _copy_value(value: Any, memo: dict[int, Any]) -> Any:
    """``copy.deepcopy(value, memo)``, short-cut for the attributes every module has (hyper-parameters, empty
    hook dicts, tuples, lists and sets of numbers or names)."""
    kind = type(value)
    if kind in _ATOMIC:
        return value
    if kind in (dict, OrderedDict) and not value:
        return kind()
    if kind in (tuple, frozenset) and all(type(v) in _ATOMIC for v in value):
        return value
    if kind in (list, set) and all(type(v) in _ATOMIC for v in value):
        return kind(value)
    return copy.deepcopy(value, memo)


def _copy_module(module: nn.Module, memo: dict[int, Any]) -> nn.Module:
    found = memo.get(id(module))
    if found is not None:
        return found
    cls = type(module)
    if not _plain_class(cls):
        return copy.deepcopy(module, memo)
    new = cls.__new__(cls)
    memo[id(module)] = new
    state: dict[str, Any] = {}
    for key, value in module.__dict__.items():
        if key == "_compiled_call_impl":  # what nn.Module.__getstate__ leaves out
            continue
        if key == "_modules":
            state[key] = type(value)((n, None if c is None else _copy_module(c, memo)) for n, c in value.items())
        elif key in _TENSOR_DICTS:
            state[key] = type(value)((n, None if t is None else memo[id(t)] if id(t) in memo else
                                      copy.deepcopy(t, memo)) for n, t in value.items())
        else:
            state[key] = _copy_value(value, memo)
    new.__setstate__(state)  # the class's own, as deepcopy calls it (some fill in attributes of old versions)
    return new


def copy_model(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` (what ``copy.deepcopy`` returns, several times faster on large models)."""
    memo: dict[int, Any] = {}
    originals = _seed(model, memo)
    memo[id(memo)] = originals  # deepcopy's keep-alive slot: the ids in memo stay valid
    return _copy_module(model, memo)


@dataclass
class Snapshot:
    """The module and tensor objects of a model, by name, with each tensor's version (in-place write count)."""

    modules: dict[str, nn.Module]
    tensors: dict[str, tuple[torch.Tensor, int | None]]  # None: an inference tensor, whose writes are not counted

    @classmethod
    def of(cls, model: nn.Module) -> "Snapshot":
        modules = dict(model.named_modules(remove_duplicate=False))
        return cls(modules, _tensors(modules))

    def unchanged_outside(self, model: nn.Module, regions: set[str]) -> list[str]:
        """Names outside ``regions`` (module names, each with everything under it) where ``model`` no longer
        holds the snapshot's module or tensor objects, or a tensor was written in place since; [] when none."""
        memo: dict[str, bool] = {"": False}

        def inside(name: str) -> bool:  # ``name`` or a module above it is a region
            found = memo.get(name)
            if found is None:
                found = memo[name] = name in regions or inside(name.rpartition(".")[0])
            return found

        changed = []
        now = dict(model.named_modules(remove_duplicate=False))
        for name in {*self.modules, *now}:
            if name and not inside(name) and self.modules.get(name) is not now.get(name):
                changed.append(name)
        tensors = _tensors(now)
        for name in {*self.tensors, *tensors}:
            if not inside(name.rpartition(".")[0]):
                old, new = self.tensors.get(name), tensors.get(name)
                if old is None or new is None or old[0] is not new[0] or old[1] is None or old[1] != new[1]:
                    changed.append(name)
        return sorted(changed)


def _tensors(modules: dict[str, nn.Module]) -> dict[str, tuple[torch.Tensor, int | None]]:
    """Every parameter and buffer under each of the named modules, as ``named_parameters(remove_duplicate=False)``
    names them, with its version (None for an inference tensor, whose writes are not counted)."""
    out = {}
    for prefix, module in modules.items():
        for own in (module._parameters, module._buffers):
            for key, t in own.items():
                if t is not None:
                    out[f"{prefix}.{key}" if prefix else key] = (t, None if t.is_inference() else t._version)
    return out
