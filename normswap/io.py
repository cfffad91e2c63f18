"""Self-describing safetensors files: tensors + metadata (normswap version, source spec, Plan, checksum).

Writing is atomic: the data goes to a temporary file next to the target (``.NAME.normswap-PID-XXXXXXXX.tmp``),
is flushed and fsynced, and is renamed onto the target; the directory is fsynced after the rename. An
interrupted save (an error, Ctrl-C, SIGTERM) removes its temporary file and leaves any old file as it was;
a save killed outright (SIGKILL, power loss) leaves one behind, which the next write to the same place
removes (its process is gone). New files get the usual permissions (0666 less the umask); overwriting with
``force`` keeps the old file's mode.

Every file records a sha256 over its tensors (name, dtype, shape and bytes, in name order) and its other
metadata entries; reading checks it, so a flipped byte is an error, not a silently different model. Files
written before the checksum existed still load. Reading never unpickles anything.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import secrets
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from normswap.errors import FileFormatError, OutputError, UsageError

FILE_FORMAT = "normswap"
CHECKSUM_KEY = "checksum"
_TMP_TAG = ".normswap-"
_TMP_RE = re.compile(r"\.normswap-(\d+)-[0-9a-f]{8}\.tmp$")
_TMP_EXTRA = len(".") + len(_TMP_TAG) + 10 + len("-xxxxxxxx.tmp")  # what a temporary name adds to the target's


def _name_max(parent: Path) -> int:
    try:
        return os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def check_output(path: str | os.PathLike, force: bool = False) -> Path:
    """Fail early (before any work) when ``path`` exists without ``force`` or cannot be written."""
    if not str(path).strip():  # Path("") is "." (the current directory): say what is wrong instead
        raise UsageError("the output path is empty: name a file (-o FILE, or output= in Python)")
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    limit = _name_max(parent) - _TMP_EXTRA
    if len(os.fsencode(p.name)) > limit:
        raise OutputError(f"cannot write {p.name[:40]}...: the file name is too long ({len(os.fsencode(p.name))} "
                          f"bytes; at most {limit} here)")
    if p.is_dir():
        raise OutputError(f"cannot write {p}: it is a directory")
    if p.exists() and not force:
        raise OutputError(f"{p} exists; pass --force (force=True) to overwrite it")
    if not parent.is_dir():
        raise OutputError(f"cannot write {p}: directory {parent} does not exist")
    try:  # the only reliable test (root bypasses permission bits, read-only mounts do not)
        fd, probe = _create_temp(p)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"cannot write {p}: directory {parent} is not writable ({exc.strerror})") from None
    return p


def _create_temp(path: Path) -> tuple[int, str]:
    """A new, empty temporary file next to ``path`` (mode 0666 less the umask), named after it and this process."""
    parent = path.parent if str(path.parent) else Path(".")
    for _ in range(100):
        tmp = str(parent / f".{path.name}{_TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue
    raise OSError(errno.EEXIST, "no free temporary file name", str(parent))


def _umask() -> int:
    """The process umask, read without changing it where /proc allows (os.umask sets it to read it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration, ValueError):
        mask = os.umask(0o022)
        os.umask(mask)
        return mask


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stale_temp_files(path: str | os.PathLike) -> list[Path]:
    """Temporary files of writes to ``path`` whose process is gone (killed mid-write)."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    found = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return []
    for entry in entries:
        name = entry.name
        if name.startswith(f".{p.name}{_TMP_TAG}"):
            m = _TMP_RE.search(name)
            if m and len(name) == len(p.name) + 1 + len(m.group(0)) and not _alive(int(m.group(1))):
                found.append(entry)
    return found


class _Terminated(KeyboardInterrupt):
    """SIGTERM during a write: handled like Ctrl-C (the temporary file is removed, nothing is renamed)."""


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated("terminated (SIGTERM)")


def _fsync_dir(parent: Path) -> None:
    try:
        fd = os.open(parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> None:
    """Call ``write(tmp_path)`` on a new temporary file next to ``path``, fsync it, and rename it onto ``path``.

    Stale temporary files of earlier, killed writes to ``path`` are removed first. SIGTERM is handled like
    SIGINT while writing: the temporary file is removed and the exception (a KeyboardInterrupt) propagates.
    An existing ``path`` keeps its permission bits."""
    p = Path(path)
    for stale in stale_temp_files(p):
        try:
            stale.unlink()
        except OSError:
            pass
    try:
        mode = p.stat().st_mode & 0o7777
    except OSError:
        mode = 0o666 & ~_umask()  # writers (safetensors) may create their file 0600: set the usual mode
    main = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if main else None
    tmp = None
    try:
        fd, tmp = _create_temp(p)
        os.close(fd)
        write(tmp)
        os.chmod(tmp, mode)
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, p)
        tmp = None
        _fsync_dir(p.parent if str(p.parent) else Path("."))
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        if main:
            signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state_dict tensors, detached (no copy: :func:`write_file` reads them as they are, copying only a
    tensor that is not a contiguous CPU tensor)."""
    return {key: value.detach() for key, value in model.state_dict().items() if torch.is_tensor(value)}


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """``t``'s bytes as a flat uint8 CPU tensor: a view of ``t`` when it is a contiguous CPU tensor, else a copy."""
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)


def checksum(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """``sha256:HEX`` over the tensors (name, dtype, shape, bytes, in name order) and the metadata entries
    (key and JSON text, in key order; the checksum entry itself excluded)."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name]
        h.update(json.dumps([name, str(t.dtype), list(t.shape)]).encode())
        if t.numel():
            h.update(_bytes(t).numpy())
    for key in sorted(k for k in metadata if k != CHECKSUM_KEY):
        h.update(json.dumps([key, metadata[key]]).encode())
    return "sha256:" + h.hexdigest()


_DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool", "C64": "complex64",
                "U64": "uint64", "U32": "uint32", "U16": "uint16", "F8_E4M3": "float8_e4m3fn",
                "F8_E5M2": "float8_e5m2", "F8_E4M3FNUZ": "float8_e4m3fnuz", "F8_E5M2FNUZ": "float8_e5m2fnuz"}
SAFETENSORS_DTYPES = {getattr(torch, attr): name for name, attr in _DTYPE_NAMES.items() if hasattr(torch, attr)}
_PLACEHOLDER = "sha256:" + "0" * 64  # same length as a real checksum: the header's size does not change


def _header(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> tuple[bytes, list[str]]:
    """The safetensors header (8-byte little-endian length, JSON padded with spaces to a multiple of 8) and the order
    of the tensors' data: widest element first, then by name, so every tensor starts aligned to its element size."""
    for name, t in tensors.items():
        if not torch.is_tensor(t):
            raise UsageError(f"cannot save '{name}': it is a {type(t).__name__}, not a tensor")
        if t.dtype not in SAFETENSORS_DTYPES:
            raise UsageError(f"cannot save '{name}': safetensors has no dtype {str(t.dtype).replace('torch.', '')}")
    order = sorted(tensors, key=lambda n: (-tensors[n].element_size(), n))
    head: dict[str, Any] = {"__metadata__": meta}
    start = 0
    for name in order:
        t = tensors[name]
        end = start + t.numel() * t.element_size()
        head[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [start, end]}
        start = end
    text = json.dumps(head, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text, order


def _write_safetensors(tensors: dict[str, torch.Tensor], tmp: str, metadata: dict[str, str]) -> None:
    """Write ``tensors`` and ``metadata`` (plus its checksum) to ``tmp`` as a safetensors file, straight from the tensors'
    memory. The checksum (a second read of the same bytes) runs in a thread meanwhile (hashing and writing both
    release the GIL); the header goes in first with a placeholder of the checksum's length and is rewritten after."""
    meta = {k: v for k, v in metadata.items() if k != CHECKSUM_KEY}
    head, order = _header(tensors, {**meta, CHECKSUM_KEY: _PLACEHOLDER})
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["sum"] = checksum(tensors, meta)
        except BaseException as exc:  # noqa: BLE001  (re-raised in the writing thread)
            box["error"] = exc

    worker = threading.Thread(target=run, name="normswap-checksum", daemon=True)
    worker.start()
    with open(tmp, "wb") as f:
        try:
            f.write(head)
            for name in order:
                if tensors[name].numel():
                    f.write(_bytes(tensors[name]).numpy())
        finally:
            worker.join()
        if "error" in box:
            raise box["error"]
        final, _ = _header(tensors, {**meta, CHECKSUM_KEY: box["sum"]})
        f.seek(0)
        f.write(final)


def write_file(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, Any],
               force: bool = False) -> Path:
    """Atomically write ``tensors`` with JSON-encoded ``metadata`` values (and their checksum) into a safetensors file.

    The tensors are written from their own memory (non-contiguous or non-CPU ones through a copy); tensors that
    share storage are written each in full, as separate entries."""
    p = check_output(path, force=force)
    meta = {"format": FILE_FORMAT, **{k: json.dumps(v, sort_keys=True) for k, v in metadata.items()
                                      if k != CHECKSUM_KEY}}
    _header(tensors, meta)  # a tensor safetensors cannot store fails here, before any file is made
    tensors = {k: v if v.device.type == "cpu" and v.is_contiguous() else v.detach().to("cpu").contiguous()
               for k, v in tensors.items()}  # copied once here, not once per reader below
    if sys.byteorder != "little":  # safetensors is little-endian: let its own writer swap the bytes
        copies = {k: v.clone() for k, v in tensors.items()}  # its writer refuses tensors that share storage
        meta[CHECKSUM_KEY] = checksum(copies, meta)
        write: Callable[[str], Any] = lambda tmp: save_file(copies, tmp, metadata=meta)  # noqa: E731
    else:
        write = lambda tmp: _write_safetensors(tensors, tmp, meta)  # noqa: E731
    try:
        atomic_write(p, write)
    except OSError as exc:
        why = "no space left on device" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise OutputError(f"cannot write {p}: {why}") from None
    except SafetensorError as exc:  # the Rust writer's own error type: disk full, I/O errors
        text = str(exc)
        why = "no space left on device" if "StorageFull" in text or "No space left" in text else \
            (text.strip().splitlines() or ["write failed"])[0][:160]
        raise OutputError(f"cannot write {p}: {why}") from None
    return p


def read_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a normswap safetensors file: (tensors, decoded metadata), its checksum verified. Errors are one line."""
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
    recorded = raw.get(CHECKSUM_KEY)
    if recorded is not None and recorded != checksum(tensors, raw):
        raise FileFormatError(f"{p}: checksum mismatch: its tensors or metadata changed after normswap wrote it "
                              "(damaged on disk or in transfer?); write or fetch it again")
    meta: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("format", CHECKSUM_KEY):
            continue
        try:
            meta[key] = json.loads(value)
        except json.JSONDecodeError:
            raise FileFormatError(f"{p} has corrupted normswap metadata (key '{key}' is not JSON)") from None
    return tensors, meta
