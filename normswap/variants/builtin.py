"""Imports the built-in variants so that they register themselves: every folder (sub-package) of
``normswap.variants`` is one, so a variant added by copying a folder needs no line here."""

from __future__ import annotations

import importlib
import pkgutil

import normswap.variants as _variants

for _info in sorted(pkgutil.iter_modules(_variants.__path__), key=lambda m: m.name):
    if _info.ispkg:
        importlib.import_module(f"{_variants.__name__}.{_info.name}")
