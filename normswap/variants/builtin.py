"""Imports the built-in variants so that they register themselves."""

from normswap.variants import uan  # noqa: F401
