"""UAN: Gaussian-mixture adaptive normalisation (docs/uan.md, docs/methods.md section 3).

Files: ``variant.py`` (the registered variant, channel and sample modes), ``kernel.py`` (the blocked mixture
forward/backward), ``fused.py`` (the same as one pointwise expression, for the compiler), ``calib.py`` (the EM calibration protocol), ``em.py``,
``estep.py`` and ``reservoir.py`` (the EM, its E step and the value sampling it runs on), ``examples.py`` (contract-suite models).
"""

from normswap.variants.uan.variant import (  # noqa: F401  (the folder's public names)
    UAN, UANChannel, UANConfig, UANSample,
)

from normswap.variants.uan.fused import compiled_enabled, set_compiled  # noqa: E402  (the opt-in compiled kernel)

__all__ = ["UAN", "UANChannel", "UANConfig", "UANSample", "compiled_enabled", "set_compiled"]
