"""Resumable training state in one safetensors file: no pickle anywhere.

A checkpoint holds the model's state_dict, the optimizer's state (its tensors as tensors, its scalars and
param groups as JSON), the gradient scaler's state, every random generator (torch CPU and CUDA, numpy, python)
and the position (step). The schedules and the data order are functions of the step and the seed, so
nothing else is needed to continue exactly where a run stopped. Written atomically (``normswap.io``).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from normswap.errors import FileFormatError, a_type
from normswap.io import read_file, write_file

__all__ = ["load_state", "save_state"]

KEY = "training_state"


def _split(value: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """JSON-able copy of ``value`` with every tensor moved into ``tensors`` under a path key."""
    if torch.is_tensor(value):
        tensors[prefix] = value.detach().to("cpu").contiguous().clone()
        return {"__tensor__": prefix}
    if isinstance(value, dict):
        return {"__dict__": [[_key(k), _split(v, f"{prefix}/{k}", tensors)] for k, v in value.items()]}
    if isinstance(value, (list, tuple)):
        return {"__list__": [_split(v, f"{prefix}/{i}", tensors) for i, v in enumerate(value)],
                "tuple": isinstance(value, tuple)}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise FileFormatError(f"cannot store {a_type(value)} in a training checkpoint")


def _key(k: Any) -> Any:
    return k if isinstance(k, (int, str)) else str(k)


def _join(value: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(value, dict):
        if "__tensor__" in value:
            return tensors[value["__tensor__"]]
        if "__dict__" in value:
            return {k: _join(v, tensors) for k, v in value["__dict__"]}
        if "__list__" in value:
            items = [_join(v, tensors) for v in value["__list__"]]
            return tuple(items) if value.get("tuple") else items
    return value


def rng_state() -> dict[str, Any]:
    """Every random generator's state (torch, CUDA, numpy, python)."""
    np_state = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": list(torch.cuda.get_rng_state_all()) if torch.cuda.is_available() else [],
        "numpy": [np_state[0], torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)), *map(_plain, np_state[2:])],
        "python": _plain(random.getstate()),
    }


def _plain(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_plain(x) for x in v]
    return v.item() if hasattr(v, "item") else v


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(list(state["cuda"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))


def save_state(path: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer,
               scaler: Any = None, position: dict[str, Any]) -> Path:
    """Write the training state atomically (an existing checkpoint is replaced)."""
    tensors: dict[str, torch.Tensor] = {}
    state = {
        "model": _split(dict(model.state_dict()), "model", tensors),
        "optimizer": _split(optimizer.state_dict(), "optimizer", tensors),
        "scaler": _split(scaler.state_dict(), "scaler", tensors) if scaler is not None else None,
        "rng": _split(rng_state(), "rng", tensors),
        "position": position,
    }
    return write_file(path, tensors, {KEY: state}, force=True)


def load_state(path: str | os.PathLike, *, model: nn.Module, optimizer: torch.optim.Optimizer,
               scaler: Any = None) -> dict[str, Any]:
    """Restore model, optimizer, scaler and random generators from ``path``; return the saved position."""
    tensors, meta = read_file(path)
    state = meta.get(KEY)
    if not isinstance(state, dict) or "position" not in state:
        raise FileFormatError(f"{path} is not a normswap training checkpoint")
    try:
        model.load_state_dict(_join(state["model"], tensors))
        optimizer.load_state_dict(_join(state["optimizer"], tensors))
        if scaler is not None and state.get("scaler") is not None:
            scaler.load_state_dict(_join(state["scaler"], tensors))
        set_rng_state(_join(state["rng"], tensors))
    except (KeyError, RuntimeError, ValueError, TypeError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FileFormatError(f"{path} does not fit this run (was the recipe changed?): {first}") from None
    return dict(state["position"])
