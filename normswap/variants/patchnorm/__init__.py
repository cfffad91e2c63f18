"""PatchNorm and the divergence-corrected affine layer (docs/patchnorm.md, docs/methods.md section 1).

Files: ``variant.py`` (the registered variant, Linear and Conv layers), ``layer.py`` (patch norms and
convolution geometry), ``scale.py`` (the strength-aware scale), ``calib.py`` (the gain fit),
``adapters.py`` (source types, timm norm+act layers), ``examples.py`` (contract-suite models), ``fast.py`` (the
inference path: cached gain-scaled weights, chunked depthwise layers), ``fused.py`` (the opt-in compiled
depthwise kernel).
"""

from normswap.variants.patchnorm.variant import (  # noqa: F401  (the folder's public names)
    NormActTail, PatchNorm, PatchNormConfig, PatchNormConv, PatchNormLinear, fit_gain, fold_batchnorm,
    register_adapter,
)

__all__ = ["NormActTail", "PatchNorm", "PatchNormConfig", "PatchNormConv", "PatchNormLinear", "fit_gain", "fold_batchnorm", "register_adapter"]
