"""The ``normswap`` command line: a thin shell over :mod:`normswap.api`."""
