"""``normswap diagnose``: what a normalisation does to a model, layer by layer (docs/diagnose.md).

:func:`diagnose` runs a model (and comparisons) on a few batches with hooks on every affine, norm and
activation layer and reports the affine divergence, forward/backward variance and activation gains, batch
geometry (Batch Normalization Decomposed) and UAN mixtures per layer, as JSON, PNG figures and one HTML page.
Modules: :mod:`.measures` (pure functions, streaming reducers), :mod:`.run` (hooks), :mod:`.plots`,
:mod:`.report`, :mod:`.session` (the API function).
"""

from normswap.diagnostics.report import DiagnoseReport
from normswap.diagnostics.session import diagnose

__all__ = ["DiagnoseReport", "diagnose"]
