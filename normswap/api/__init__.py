"""The Python API: what ``import normswap`` exposes. ``conversion`` holds convert, plan, load, save, inspect and
export; ``calibration`` holds calibrate and evaluate; ``metadata`` validates what a saved file says."""
