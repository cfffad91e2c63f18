"""Building an architecture without its random initialisation, for ``load``, whose file then sets every tensor.

Most of a rebuild's time is the constructors' random initialisers (ResNet-50: about 95 % of it), filling weights
that the strict load overwrites at once. :func:`build_uninitialised` runs the builder with them skipped, in this
thread only: the random initialisers of ``torch.nn.init`` (``uniform_``, ``normal_``, ``trunc_normal_``, the
kaiming, xavier, orthogonal and sparse ones) and the ``Tensor.uniform_`` / ``Tensor.normal_`` methods (timm's own
``trunc_normal_``, Hugging Face's ``weight.data.normal_()``) leave their tensor as allocated. Everything else
runs as usual: constant fills, and the buffers constructors compute (position ids, relative position indexes,
attention masks), persistent or not.

The result stands for a normal build only where nothing can tell them apart once the file is loaded; otherwise
``None`` is returned and the caller builds normally (the skipped attempt is then wasted, never wrong):

- every skipped tensor is persistent state of the model (a parameter or a persistent buffer, which the file sets):
  a random non-persistent buffer or a tensor kept in a plain attribute keeps its random values in a normal build;
- no operation read a skipped tensor during the build (a :class:`torch.overrides.TorchFunctionMode` watches: a
  constructor that derives something from its initial weights, or a rejection loop on them, aborts the attempt),
  views of it and in-place operations on it aside, and metadata (shape, dtype) aside;
- nothing else drew from torch's global random generator (a ``torch.randn`` buffer, say): after the skipped
  draws it would have drawn other numbers than in a normal build;
- the builder raised nothing (its error is the normal build's to raise).

One difference remains: a normal build draws from torch's global random generator, and this one does not, so the
random numbers a program draws after a ``load`` differ from before.
"""

from __future__ import annotations

import functools
import threading
import weakref
from typing import Any, Callable

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["build_uninitialised"]

_INITS = ("uniform_", "normal_", "trunc_normal_", "kaiming_uniform_", "kaiming_normal_", "xavier_uniform_",
          "xavier_normal_", "orthogonal_", "sparse_")
_METHODS = ("uniform_", "normal_")
# operations that read no value of their tensor arguments (metadata, or new tensors of the same shape)
_NO_READ = {"size", "dim", "ndimension", "numel", "nelement", "stride", "is_contiguous", "element_size",
            "storage_offset", "data_ptr", "untyped_storage", "is_floating_point", "is_complex", "get_device",
            "__len__", "__hash__", "__get__", "__set__", "new_empty", "new_zeros", "new_ones", "new_full",
            "empty_like", "zeros_like", "ones_like", "full_like", "requires_grad_", "has_names", "is_pinned",
            "is_shared", "is_set_to"}

_local = threading.local()  # .skipped, while building: the storages whose initialisation was skipped (_Skipped)
_lock = threading.Lock()
_users = 0
_saved: dict[tuple[Any, str], Any] = {}


class _Read(Exception):
    """A skipped tensor was read while building."""


class _Skipped(dict):
    """Storage address -> weak reference to the storage: a temporary that the builder dropped (timm builds and
    discards layers) no longer counts, and its address may serve a new storage."""

    def add(self, t: torch.Tensor) -> None:
        if _storage(t) is not None:
            self[_storage(t)] = weakref.ref(t.untyped_storage())

    def live(self) -> set[int]:
        return {p for p, ref in self.items() if ref() is not None}

    def holds(self, found: set[int]) -> bool:
        return any(p in self and self[p]() is not None for p in found)


def _storage(t: torch.Tensor) -> int | None:
    if not isinstance(t, torch.Tensor) or t.device.type == "meta" or t.numel() == 0:
        return None
    return t.untyped_storage().data_ptr()


def _storages(value: Any) -> set[int]:
    found: set[int] = set()
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, torch.Tensor):
            s = _storage(v)
            if s is not None:
                found.add(s)
        elif isinstance(v, (list, tuple)):
            stack.extend(v)
        elif isinstance(v, dict):
            stack.extend(v.values())
    return found


def _skipping(original: Callable[..., Any]) -> Callable[..., Any]:
    """``original`` (an initialiser, or a Tensor method), skipped in a thread that is building uninitialised."""
    @functools.wraps(original)
    def init(tensor: Any, *args: Any, **kwargs: Any) -> Any:
        skipped = getattr(_local, "skipped", None)
        if skipped is None or not isinstance(tensor, torch.Tensor):
            return original(tensor, *args, **kwargs)
        skipped.add(tensor)
        return tensor
    return init


def _install() -> None:
    global _users
    with _lock:
        if _users == 0:
            for owner, names in ((torch.nn.init, _INITS), (torch.Tensor, _METHODS)):
                for name in names:
                    _saved[(owner, name)] = original = getattr(owner, name)
                    setattr(owner, name, _skipping(original))
        _users += 1


def _uninstall() -> None:
    global _users
    with _lock:
        _users -= 1
        if _users == 0:
            for (owner, name), original in _saved.items():
                setattr(owner, name, original)
            _saved.clear()


class _Watch(TorchFunctionMode):
    """Raises :class:`_Read` when an operation reads a skipped tensor: one whose result is not made of skipped
    storage only (a view of it, or it written in place) and that is not in :data:`_NO_READ`."""

    def __init__(self, skipped: _Skipped) -> None:
        super().__init__()
        self.skipped = skipped

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.skipped and getattr(func, "__name__", "") not in _NO_READ and self.skipped.holds(_storages((args, kwargs))):
            made = _storages(out)
            if not made or not made <= self.skipped.live():
                raise _Read(getattr(func, "__name__", str(func)))
        return out


def build_uninitialised(build: Callable[[], nn.Module]) -> nn.Module | None:
    """``build()`` with the random initialisers skipped in this thread (module docstring), or ``None`` where that
    build could differ from a normal one once the persistent state is loaded (build normally then)."""
    skipped = _Skipped()
    outer = getattr(_local, "skipped", None)
    rng = torch.get_rng_state()
    _install()
    _local.skipped = skipped
    try:
        with _Watch(skipped):
            model = build()
    except Exception:  # noqa: BLE001  (_Read, or the builder's own error: the normal build raises it)
        return None
    finally:
        _local.skipped = outer
        _uninstall()
    persistent = _storages(list(model.state_dict(keep_vars=True).values()))
    return model if skipped.live() <= persistent and torch.equal(rng, torch.get_rng_state()) else None
