"""Calibration: fit the converted layers' statistics on data (see runner.py)."""

from normswap.calibrate.runner import calibrate

__all__ = ["calibrate"]
