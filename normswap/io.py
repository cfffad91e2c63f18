"""Self-describing safetensors files: tensors + metadata (normswap version, source spec, Plan).

Writing is atomic (a temporary file in the target directory, then ``os.replace``): an interrupted
save never leaves a half-written file. Reading never unpickles anything.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from normswap.errors import FileFormatError, OutputError

FILE_FORMAT = "normswap"


def check_output(path: str | os.PathLike, force: bool = False) -> Path:
    """Fail early (before any work) when ``path`` exists without ``force`` or cannot be written."""
    p = Path(path)
    if p.is_dir():
        raise OutputError(f"cannot write {p}: it is a directory")
    if p.exists() and not force:
        raise OutputError(f"{p} exists; pass --force (force=True) to overwrite it")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"cannot write {p}: directory {parent} does not exist")
    try:  # the only reliable test (root bypasses permission bits, read-only mounts do not)
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{p.name}.", suffix=".probe")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"cannot write {p}: directory {parent} is not writable ({exc.strerror})") from None
    return p


def atomic_write(path: Path, write: Any) -> None:
    """Call ``write(tmp_path)`` then rename the temporary file onto ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent if str(path.parent) else ".", prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict as independent, contiguous CPU tensors (shared storage duplicated)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        if torch.is_tensor(value):
            out[key] = value.detach().to("cpu").contiguous().clone()
    return out


def write_file(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, Any],
               force: bool = False) -> Path:
    """Atomically write ``tensors`` with JSON-encoded ``metadata`` values into a safetensors file."""
    p = check_output(path, force=force)
    meta = {"format": FILE_FORMAT, **{k: json.dumps(v, sort_keys=True) for k, v in metadata.items()}}
    try:
        atomic_write(p, lambda tmp: save_file(tensors, tmp, metadata=meta))
    except OSError as exc:
        raise OutputError(f"cannot write {p}: {exc.strerror or exc}") from None
    return p


def read_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a normswap safetensors file: (tensors, decoded metadata). Errors are one line."""
    p = Path(path)
    if not p.is_file():
        raise FileFormatError(f"no such file: {p}")
    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            raw = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # SafetensorError, OSError, ValueError on a damaged header
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise FileFormatError(f"{p} is not a readable safetensors file (truncated or corrupted?): {first}") from None
    if raw.get("format") != FILE_FORMAT:
        raise FileFormatError(f"{p} is a safetensors file but not a normswap model (no normswap metadata)")
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "format":
            continue
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            raise FileFormatError(f"{p} has corrupted normswap metadata (key '{key}' is not JSON)") from None
    return tensors, meta
