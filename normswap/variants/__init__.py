"""Variants: the layers normswap converts into, their contract and their registry.

Each variant lives in one folder (``uan/``, ``patchnorm/``, ``anact/``, ``bn_decomposed/``) with the same file
roles: ``variant.py`` (the registered :class:`Variant` subclass: finding and building sites, strength, exact
claims), ``layer.py``/``kernel.py`` (the forward maths), ``calib.py`` (the calibration protocol),
``examples.py`` (the models the contract test suite converts). docs/contributing.md says how to add one.
"""

from normswap.variants.base import Variant
from normswap.variants.calibration import CalibrationSettings
from normswap.variants.config import VariantConfig
from normswap.variants.registry import get, names, register
from normswap.variants.strength import check_strength, set_strengths, strengths_of

__all__ = ["CalibrationSettings", "Variant", "VariantConfig", "check_strength", "get", "names", "register",
           "set_strengths", "strengths_of"]
