"""The optional libraries sources build models with (timm, transformers), imported behind the torchvision
guard, and the errors a download can raise."""

from __future__ import annotations

import importlib
import sys
import urllib.error
from types import ModuleType

from normswap.compat import import_torchvision
from normswap.errors import UsageError

__all__ = ["download_errors", "optional_module"]


def optional_module(module: str, extra: str) -> ModuleType:
    import_torchvision()  # the torchvision guard must run before timm / transformers import it
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(f"{module} is not installed: pip install normswap[{extra}]") from None


def download_errors() -> tuple[type[BaseException], ...]:
    """URLError, socket/HTTP errors (all OSError) and the Hugging Face hub's offline / HTTP errors."""
    hub = sys.modules.get("huggingface_hub.errors")
    names = ("LocalEntryNotFoundError", "OfflineModeIsEnabled", "HfHubHTTPError")
    return (OSError, urllib.error.URLError, *(getattr(hub, n) for n in names if hasattr(hub, n)))
