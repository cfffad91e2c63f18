"""Weights files: a state_dict from ``.safetensors`` or ``torch.load(weights_only=True)``, loaded strictly.

Pickles are only read with ``torch.load(weights_only=True)``; nothing here runs code from a file.
"""

from __future__ import annotations

import os
import pickle
import re
from typing import Any

import torch
from torch import nn

from normswap.errors import WeightsError

_STATE_KEYS = ("state_dict", "model", "model_state_dict")


def first_line(exc: BaseException, limit: int = 160) -> str:
    """The first line of an exception's message, at most ``limit`` characters."""
    line = (str(getattr(exc, "reason", None) or exc).strip().splitlines() or [type(exc).__name__])[0]
    line = line.split(". ", 1)[0] if len(line) > limit else line
    return line if len(line) <= limit else line[: limit - 3] + "..."


def first_three(items: list[str], sep: str = ", ") -> str:
    """The first three of ``items`` joined by ``sep``, with ``...`` when there are more (a message's examples)."""
    return sep.join(items[:3]) + (f"{sep}..." if len(items) > 3 else "")


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """A state_dict from ``.safetensors`` or ``torch.load(weights_only=True)``: bare, or under ``state_dict`` /
    ``model`` / ``model_state_dict``; a uniform ``module.`` / ``_orig_mod.`` prefix is stripped."""
    if not os.path.isfile(path):
        raise WeightsError(f"weights file {path} not found (pass an existing .safetensors/.pt file, "
                           "a weights name, or --weights none)")
    if path.lower().endswith(".safetensors"):
        from safetensors.torch import load_file
        try:
            data: Any = load_file(path, device="cpu")
        except Exception as exc:  # SafetensorError, OSError: the file is not a valid safetensors file
            raise WeightsError(f"weights file {path} is not a readable safetensors file "
                               f"({first_line(exc)})") from None
    else:
        try:
            data = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if re.search(r"Unsupported operand|invalid load key", str(exc)):  # not a pickle at all (text, say)
                raise WeightsError(f"weights file {path} is neither a safetensors file nor a torch .pt/.pth file "
                                   "(it does not parse as one)") from None
            found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(exc))
            what = f" ({found.group(1)})" if found else ""
            raise WeightsError(
                f"weights file {path} was refused by torch.load(weights_only=True): it contains pickled objects "
                f"beyond tensors{what}, and normswap never unpickles untrusted files; convert it to .safetensors "
                "(safetensors.torch.save_file(state_dict, 'model.safetensors')) where you trust it") from None
        except Exception as exc:
            raise WeightsError(f"could not read weights file {path}: {first_line(exc)}") from None
    if isinstance(data, dict) and not all(torch.is_tensor(v) for v in data.values()):
        data = next((data[k] for k in _STATE_KEYS if isinstance(data.get(k), dict)), data)
    if not isinstance(data, dict) or not data or not all(isinstance(k, str) and torch.is_tensor(v)
                                                         for k, v in data.items()):
        keys = ", ".join(map(str, list(data)[:5])) if isinstance(data, dict) else type(data).__name__
        raise WeightsError(f"weights file {path} holds no state_dict (a dict of tensors, or one under "
                           f"'state_dict'/'model'/'model_state_dict'); found: {keys or 'an empty dict'}")
    for prefix in ("module.", "_orig_mod."):
        if all(k.startswith(prefix) for k in data):
            data = {k[len(prefix):]: v for k, v in data.items()}
    return dict(data)


def load_weights_file(model: nn.Module, path: str, label: str) -> None:
    """Load ``path`` into ``model`` strictly; a misfit raises one :class:`WeightsError` with examples."""
    state = read_state_dict(path)
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    extra = [k for k in state if k not in own]
    shapes = [f"{k}: file {'x'.join(map(str, state[k].shape))}, model {'x'.join(map(str, v.shape))}"
              for k, v in own.items() if k in state and state[k].shape != v.shape]
    problems = [f"{len(items)} {one if len(items) == 1 else many} ({first_three(items, sep)})" for items, one, many, sep
                in [(missing, "missing key", "missing keys", ", "), (extra, "unexpected key", "unexpected keys", ", "),
                    (shapes, "shape mismatch", "shape mismatches", "; ")] if items]
    if problems:
        raise WeightsError(f"weights file {path} does not fit {label}: {', '.join(problems)}")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise WeightsError(f"weights file {path} does not fit {label}: {first_line(exc)}") from None
