"""Variants: the layers normswap converts into, and their registry."""

from normswap.variants.base import Variant, VariantConfig
from normswap.variants.registry import get, names, register

__all__ = ["Variant", "VariantConfig", "get", "names", "register"]
