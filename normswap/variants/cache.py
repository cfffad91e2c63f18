"""A one-entry cache of values computed from a module's tensors, valid while none of them changed.

Every variant folds its parameters and buffers into what its eval-time forward needs: UAN channel mode its
per-component coefficients (about 15 small operations per call,
:func:`normswap.variants.uan.kernel.channel_coefficients`), PatchNorm its gain-scaled weight and bias, ANAct
the scale and shift of its map. In eval and no-grad calls they depend on nothing else, so
:class:`TensorStateCache` keeps them until a source tensor changes. The key of a tensor is its identity,
its version counter (every in-place write bumps it: ``load_state_dict``, calibration's ``copy_``, an optimiser step, ``set_strength``), its data pointer,
dtype and device (``.to()``, ``.data =``); the key also holds the caller's Python-side values (the
strength's mirror, the compute dtype). Tensors made under ``torch.inference_mode`` have no version
counter: then nothing is cached. A one-element CPU tensor may be keyed by its value instead (``by_value``: a
strength buffer, whose every ``set_strength`` bumps its version), and a caller whose values are small may keep
several entries (``capacity``): UAN's coefficients at each strength ``normswap eval`` alternates between are then
built once, not at every switch. The caches live in a weak table keyed by their owner
(:func:`cache_for`), not on the module: a module's attributes stay its configuration (copies, identity
proofs and pickles see no cache)."""

from __future__ import annotations

import weakref
from collections import OrderedDict
from typing import Any, Callable, Hashable

import torch

__all__ = ["TensorStateCache", "cache_for", "state_key"]

_CACHES: "weakref.WeakKeyDictionary[object, TensorStateCache]" = weakref.WeakKeyDictionary()


def state_key(tensors: tuple[torch.Tensor | None, ...], *extra: Hashable,
              by_value: tuple[torch.Tensor, ...] = ()) -> tuple | None:
    """A key that changes whenever any of ``tensors`` is replaced or written in place (None: not cacheable);
    ``by_value``: tensors that count by their value where it is one number on the CPU (by version otherwise), so
    that writing a value back gives the key it had before."""
    try:
        return extra + tuple(None if t is None else (id(t), t._version, t.data_ptr(), t.dtype, t.device)
                             for t in tensors) + tuple(
            (id(t), t.data_ptr(), t.dtype, t.device, t.item() if t.device.type == "cpu" and t.numel() == 1 else
             ("version", t._version)) for t in by_value)
    except RuntimeError:  # an inference tensor: no version counter to watch
        return None


class TensorStateCache:
    """The last ``capacity`` values built (one unless a caller asks for more), each under the :func:`state_key`
    it was computed under."""

    def __init__(self) -> None:
        # key -> (value, the key's tensors, held so that their ids cannot be reused meanwhile); oldest first
        self.entries: OrderedDict[tuple, tuple[Any, tuple]] = OrderedDict()

    @property
    def key(self) -> tuple | None:
        """The key of the value built or used last (None: nothing cached)."""
        return next(reversed(self.entries)) if self.entries else None

    def get(self, tensors: tuple[torch.Tensor | None, ...], extra: tuple, build: Callable[[], Any], *,
            by_value: tuple[torch.Tensor, ...] = (), capacity: int = 1) -> Any:
        """The cached value when ``tensors`` and ``extra`` (and ``by_value``'s values) are as one was built under
        (:func:`state_key`), else ``build()``, kept for later calls (with the ``capacity - 1`` most recently
        used others) unless the tensors have no version counter."""
        key = state_key(tensors, *extra, by_value=by_value)
        if key is not None and key in self.entries:
            self.entries.move_to_end(key)
            return self.entries[key][0]
        value = build()
        if key is None:
            self.entries.clear()
            return value
        self.entries[key] = (value, tensors + by_value)
        while len(self.entries) > max(1, capacity):
            self.entries.popitem(last=False)
        return value


def cache_for(owner: object) -> TensorStateCache:
    """``owner``'s cache (made on first use, dropped with ``owner``)."""
    cache = _CACHES.get(owner)
    if cache is None:
        cache = _CACHES[owner] = TensorStateCache()
    return cache
