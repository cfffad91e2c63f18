"""ANAct: normalised activation functions (docs/anact.md, docs/methods.md section 2).

Files: ``variant.py`` (the registered variant: sites, folding, export), ``layer.py`` (the layer),
``activations.py`` (the activations and their derivatives), ``stats.py`` (the calibration protocol: running
moments), ``fold.py`` (compensation folded into consumers, inference export), ``examples.py`` (contract-suite
models).
"""

from normswap.variants.anact.variant import (  # noqa: F401  (the folder's public names)
    ANAct, ANActConfig, KINDS, UnsupportedActivationError, activation_kind, compensation_status, export_fold,
    fold_into_consumer,
)

__all__ = ["ANAct", "ANActConfig", "KINDS", "UnsupportedActivationError", "activation_kind", "compensation_status", "export_fold", "fold_into_consumer"]
