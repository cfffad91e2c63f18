"""The calibration machinery: the runner that drives the variants' calibration protocol over batches, UAN's
EM, the fidelity report. The user-facing function is :func:`normswap.calibrate` (``normswap.api.calibration``)."""
