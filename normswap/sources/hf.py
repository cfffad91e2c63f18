"""Hugging Face sources: a local model directory built with transformers, and the checks that keep the code
shipped with such a directory from running unless the user allows it."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from torch import nn

from normswap.errors import NormswapError, UsageError, WeightsError
from normswap.sources.libs import download_errors, optional_module
from normswap.sources.weights import first_line as _first_line

__all__ = ["HF_CODE_KWARGS", "TRUST_HINT", "hf_build", "hf_custom_code"]

HF_CODE_KWARGS = ("trust_remote_code", "code_revision", "revision", "custom_pipelines")
TRUST_HINT = "--trust-source on the command line, trust_source=True in Python"


def hf_custom_code(path: str | os.PathLike) -> str | None:
    """Why loading the hf directory ``path`` would run code that ships with it (``auto_map`` in its config,
    a ``*.py`` file next to it), or ``None`` when transformers' own classes build it."""
    folder = Path(path)
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        config = None
    if isinstance(config, dict) and config.get("auto_map"):
        return "its config.json maps classes to custom code (auto_map)"
    code = sorted(p.name for p in folder.glob("*.py")) if folder.is_dir() else []
    return f"it holds Python code ({', '.join(code[:3])})" if code else None


def hf_build(path: str, kwargs: dict[str, Any], pretrained: bool, allow_code: bool = False) -> nn.Module:
    """The model in the hf directory ``path`` (builder ``kwargs``): the directory's ``config.architectures[0]``
    class when transformers has it (keeps task heads), else AutoModel.

    A directory with custom code is built only with ``allow_code`` (then transformers runs it); code-enabling
    keys in ``kwargs`` are refused."""
    tr = optional_module("transformers", "hf")
    if not (Path(path) / "config.json").is_file():
        raise UsageError(f"hf source directory {path} not found (or has no config.json): pass the model itself")
    bad = [k for k in kwargs if k in HF_CODE_KWARGS]
    if bad:
        raise UsageError(f"builder kwarg '{bad[0]}' is not accepted for hf:{path}: custom code runs only when you "
                         f"allow it ({TRUST_HINT})")
    why = hf_custom_code(path)
    if why and not allow_code:
        raise NormswapError(f"hf directory {path} is custom code ({why}); normswap runs it only when you allow it "
                            f"({TRUST_HINT})")
    code = {"trust_remote_code": True} if why else {}
    try:
        config = tr.AutoConfig.from_pretrained(path, local_files_only=True, **code)
        arch = (getattr(config, "architectures", None) or [None])[0]
        cls = getattr(tr, arch, None) if isinstance(arch, str) and not why else None
        cls = cls if isinstance(cls, type) and issubclass(cls, nn.Module) else tr.AutoModel
        if not pretrained:
            return (getattr(cls, "from_config", None) or cls._from_config)(config, **code, **kwargs)
    except (ValueError, TypeError, KeyError, AttributeError, OSError) as exc:
        raise UsageError(f"cannot build hf:{path}: {type(exc).__name__}: {_first_line(exc)}") from None
    try:
        return cls.from_pretrained(path, local_files_only=True, **code, **kwargs)
    except download_errors() as exc:
        raise WeightsError(f"could not load the weights in hf directory {path}: {_first_line(exc)}; "
                           "pass --weights FILE (.safetensors/.pt) or --weights none for random init") from None
