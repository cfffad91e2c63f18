"""The one registry of variants. Names resolve only here: never by import path, never by pickle.

Built-in variants register with the :func:`register` decorator, the same way a third-party plugin
does; plugins are found through the ``normswap.variants`` entry-point group on first lookup.
"""

from __future__ import annotations

import difflib
from importlib import metadata
from typing import TypeVar

from normswap.errors import NormswapError, UnknownVariantError

_REGISTRY: dict[str, type] = {}
_PLUGINS_LOADED = False
V = TypeVar("V", bound=type)


def register(cls: V) -> V:
    """Class decorator: add a :class:`~normswap.variants.base.Variant` subclass under ``cls.name``.

    Registering a different class under a taken name is refused (no silent override)."""
    name = getattr(cls, "name", "")
    if not name or not isinstance(name, str):
        raise NormswapError(f"variant class {cls.__qualname__} has no 'name'")
    existing = _REGISTRY.get(name)
    if existing is not None and existing is not cls:
        raise NormswapError(
            f"variant name '{name}' is already registered by {existing.__module__}.{existing.__qualname__}"
        )
    _REGISTRY[name] = cls
    return cls


def _load_plugins() -> None:
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    import normswap.variants.builtin  # noqa: F401  (registers the built-ins)

    for ep in metadata.entry_points(group="normswap.variants"):
        try:
            ep.load()
        except Exception as exc:  # a broken plugin must not break normswap
            import warnings

            warnings.warn(f"normswap: could not load variant plugin {ep.name!r}: {exc}", stacklevel=2)


def names() -> list[str]:
    """Sorted names of every registered variant."""
    _load_plugins()
    return sorted(_REGISTRY)


def get(name: str) -> type:
    """The variant class registered under ``name``; an unknown name lists the known ones."""
    _load_plugins()
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise UnknownVariantError(
            f"unknown variant '{name}'{hint}; known variants: {', '.join(sorted(_REGISTRY))}"
        ) from None
