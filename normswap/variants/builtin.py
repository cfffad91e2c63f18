"""Imports the built-in variants so that they register themselves."""

from normswap.variants import anact, patchnorm, uan  # noqa: F401
