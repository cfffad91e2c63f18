"""Imports the built-in variants so that they register themselves."""

from normswap.variants import anact, patchnorm, uan  # noqa: F401
from normswap.variants import bn_decomposed  # noqa: F401,E402  (recenter, rescale)
