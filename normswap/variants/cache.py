"""A one-entry cache of values computed from a module's tensors, valid while none of them changed.

Every variant folds its parameters and buffers into what its eval-time forward needs: UAN channel mode its
per-component coefficients (about 15 small operations per call,
:func:`normswap.variants.uan.kernel.channel_coefficients`), PatchNorm its gain-scaled weight and bias, ANAct
the scale and shift of its map. In eval and no-grad calls they depend on nothing else, so
:class:`TensorStateCache` keeps them until a source tensor changes. The key of a tensor is its identity,
its version counter (every in-place write bumps it: ``load_state_dict``, calibration's ``copy_``, an optimiser step, ``set_strength``), its data pointer,
dtype and device (``.to()``, ``.data =``); the key also holds the caller's Python-side values (the
strength's mirror, the compute dtype). Tensors made under ``torch.inference_mode`` have no version
counter: then nothing is cached. The caches live in a weak table keyed by their owner
(:func:`cache_for`), not on the module: a module's attributes stay its configuration (copies, identity
proofs and pickles see no cache)."""

from __future__ import annotations

import weakref
from typing import Any, Callable, Hashable

import torch

__all__ = ["TensorStateCache", "cache_for", "state_key"]

_CACHES: "weakref.WeakKeyDictionary[object, TensorStateCache]" = weakref.WeakKeyDictionary()


def state_key(tensors: tuple[torch.Tensor | None, ...], *extra: Hashable) -> tuple | None:
    """A key that changes whenever any of ``tensors`` is replaced or written in place (None: not cacheable)."""
    try:
        return extra + tuple(None if t is None else (id(t), t._version, t.data_ptr(), t.dtype, t.device)
                             for t in tensors)
    except RuntimeError:  # an inference tensor: no version counter to watch
        return None


class TensorStateCache:
    """One cached value and the :func:`state_key` it was computed under."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.value: Any = None
        self.refs: tuple = ()  # the key's tensors, held so that their ids cannot be reused meanwhile

    def get(self, tensors: tuple[torch.Tensor | None, ...], extra: tuple, build: Callable[[], Any]) -> Any:
        """The cached value when ``tensors`` and ``extra`` are as it was built under (:func:`state_key`),
        else ``build()``, kept for the next call unless the tensors have no version counter."""
        key = state_key(tensors, *extra)
        if key is not None and key == self.key:
            return self.value
        value = build()
        self.key, self.value, self.refs = (key, value, tensors) if key is not None else (None, None, ())
        return value


def cache_for(owner: object) -> TensorStateCache:
    """``owner``'s cache (made on first use, dropped with ``owner``)."""
    cache = _CACHES.get(owner)
    if cache is None:
        cache = _CACHES[owner] = TensorStateCache()
    return cache
