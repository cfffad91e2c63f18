"""The export protocol: folding a converted site into its neighbours for inference (``normswap export``)."""

from __future__ import annotations

from typing import Any

from torch import nn

from normswap.errors import FileFormatError

__all__ = ["ExportHooks"]


class ExportHooks:
    """Hooks ``normswap.export`` and ``load`` call. A variant that can fold overrides both; the defaults fold nothing.

    ``fold_for_export`` folds some converted sites of a model into their neighbours, in place, putting the
    source module back, and the plan marks them ``folded``; ``apply_folded`` then rebuilds, on load, what the
    fold left behind (new state_dict keys, say) so that the exported file still loads strictly."""

    name: str = ""

    @classmethod
    def fold_for_export(cls, model: nn.Module, sites: list[Any]) -> tuple[list[str], dict[str, str]]:
        """Fold the given converted sites of ``model`` into their neighbours, in place. Returns the names
        folded and, per site kept as it is, why. Default: nothing folds."""
        return [], {s.name: f"variant '{cls.name}' has no inference folding" for s in sites}

    @classmethod
    def apply_folded(cls, model: nn.Module, site: Any) -> None:
        """Rebuild what :meth:`fold_for_export` left behind at a ``folded`` site."""
        raise FileFormatError(f"variant '{cls.name}' has no folded sites, but the plan marks '{site.name}' folded")
