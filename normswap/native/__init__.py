"""normswap's native CPU kernels: C++ sources in ``csrc/``, built once per machine, loaded as torch operators.

The layers' eager paths are written in torch operations; where those make many passes over an activation
that one loop could make once (UAN's channel mode, PatchNorm's depthwise patch norms), a kernel in
``csrc/`` does the work in one pass, vectorised with ATen's ``at::vec`` and parallel with ``at::parallel_for``.
Every ``.cpp`` file there registers its operators in the ``normswap_native`` namespace
(``TORCH_LIBRARY_FRAGMENT``); all of them are compiled into one shared library by
``torch.utils.cpp_extension`` (g++ and ninja; about a minute on 2 cores), cached under
``$XDG_CACHE_HOME/normswap/native`` (or ``$NORMSWAP_NATIVE_DIR``) in a folder named by a hash of the sources,
torch's version and the flags, so a change to any of them builds afresh. ``scripts/setup.sh`` builds it;
``python -m normswap.native`` builds it and says where it is.

The switch is the environment variable ``NORMSWAP_NATIVE`` (or :func:`set_enabled`):

- unset or ``auto``: use the library when it is built or builds; a first build in a process prints one line
  to stderr, and a failed build warns once, is remembered on disk (no retry in every process) and leaves the
  eager kernels on;
- ``0`` (``false``, ``off``, ``no``): never; the eager kernels run;
- ``1`` (``true``, ``on``, ``yes``): required; a library that does not build is an error.

A layer asks :func:`ops` for the operator namespace (``None`` when the library is off or unavailable) and
keeps its eager path as the fallback: both paths compute the same function (the tests compare them).
"""

from __future__ import annotations

import hashlib
import os
import sys
import warnings
from pathlib import Path
from typing import Any

from normswap.errors import NormswapError, UsageError

__all__ = ["ENV", "NativeBuildError", "build", "enabled", "flags", "library_dir", "mode", "ops", "set_enabled",
           "sources"]

ENV = "NORMSWAP_NATIVE"
ABI = 1  # csrc/native.h's kAbi: the operators' signatures this Python side expects
NAMESPACE = "normswap_native"
CSRC = Path(__file__).resolve().parent / "csrc"
_STATE: dict[str, Any] = {"override": None, "ops": None, "tried": False}


class NativeBuildError(NormswapError):
    """The native kernels could not be built or loaded (no compiler, a compile error)."""


def mode() -> str:
    """``"auto"``, ``"off"`` or ``"on"``: what :func:`set_enabled` or ``NORMSWAP_NATIVE`` asks for."""
    if _STATE["override"] is not None:
        return "on" if _STATE["override"] else "off"
    raw = os.environ.get(ENV, "").strip().lower()
    if raw in ("", "auto"):
        return "auto"
    if raw in ("0", "false", "off", "no"):
        return "off"
    if raw in ("1", "true", "on", "yes"):
        return "on"
    raise UsageError(f"{ENV}={raw!r} is not one of auto, 0, 1 (or off, on)")


def set_enabled(flag: bool | None) -> None:
    """Turn the native kernels on (required) or off for this process; ``None`` goes back to ``NORMSWAP_NATIVE``."""
    _STATE["override"] = flag


def sources() -> list[Path]:
    """The C++ sources compiled into the library (every ``csrc/*.cpp``)."""
    return sorted(CSRC.glob("*.cpp"))


def flags() -> list[str]:
    """Compiler flags: optimised, OpenMP (``at::parallel_for``), and the CPU's vector width as torch detected it
    (``at::vec::Vectorized`` is 8 floats wide under AVX2, 16 under AVX-512, scalar loops otherwise)."""
    import torch

    cap = torch.backends.cpu.get_cpu_capability()
    out = ["-O3", "-fopenmp", "-DNDEBUG"]
    if cap == "AVX2":
        out += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    elif cap == "AVX512":
        out += ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
                "-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512"]
    return out


def _name() -> str:
    import torch

    h = hashlib.sha256()
    for part in (torch.__version__, sys.version, " ".join(flags())):
        h.update(part.encode() + b"\0")
    for src in sorted(CSRC.glob("*")):
        if src.suffix in (".cpp", ".h"):
            h.update(src.name.encode() + b"\0" + src.read_bytes() + b"\0")
    return f"{NAMESPACE}_{h.hexdigest()[:12]}"


def library_dir() -> Path:
    """The folder this library version is built in (``$NORMSWAP_NATIVE_DIR`` or ``$XDG_CACHE_HOME/normswap/native``)."""
    root = os.environ.get("NORMSWAP_NATIVE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "normswap", "native")
    return Path(root) / _name()


def _built(folder: Path, name: str) -> Path | None:
    libs = sorted(folder.glob(f"{name}*.so"))  # torch's builder may suffix _v1, _v2 in one process
    return libs[-1] if libs else None


def build(verbose: bool = False) -> Path:
    """Build the library (or find it built) and load its operators into ``torch.ops.normswap_native``; returns
    the shared library's path. Raises :class:`NativeBuildError` with the compiler's last line on failure."""
    import torch
    from torch.utils import cpp_extension

    folder, name = library_dir(), _name()
    lib = _built(folder, name)
    if lib is None:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise NativeBuildError(f"cannot create {folder} for the native kernels ({e.strerror or e}); set "
                                   f"NORMSWAP_NATIVE_DIR to a writable folder or {ENV}=0") from None
        if not verbose:
            print(f"normswap: building the native kernels in {folder} (once per machine and torch version, "
                  "about a minute)", file=sys.stderr)
        try:
            _ninja_on_path()
            cpp_extension.load(name=name, sources=[str(s) for s in sources()], extra_cflags=flags(),
                               extra_ldflags=["-fopenmp"], build_directory=str(folder), verbose=verbose,
                               is_python_module=False)
        except (RuntimeError, OSError, ImportError, ValueError) as e:
            reason = _last_line(str(e))
            try:
                (folder / "FAILED").write_text(reason + "\n")
            except OSError:
                pass
            raise NativeBuildError(f"building the native kernels failed ({reason}); "
                                   f"set {ENV}=0 to use the eager kernels") from None
        (folder / "FAILED").unlink(missing_ok=True)
        lib = _built(folder, name)
        if lib is None:
            raise NativeBuildError(f"building the native kernels left no library in {folder}")
    elif not _loaded():
        torch.ops.load_library(str(lib))
    abi = torch.ops.normswap_native.abi()
    if abi != ABI:
        raise NativeBuildError(f"the native library in {folder} has ABI {abi}, this normswap expects {ABI}; "
                               "delete the folder to rebuild it")
    return lib


def _ninja_on_path() -> None:
    """torch's builder runs ``ninja`` from PATH: put the ``ninja`` package's binary there (a venv not activated)."""
    try:
        import ninja  # the PyPI package, a dependency of normswap
    except ImportError:
        return
    path = os.environ.get("PATH", "")
    if ninja.BIN_DIR not in path.split(os.pathsep):
        os.environ["PATH"] = ninja.BIN_DIR + (os.pathsep + path if path else "")


def _loaded() -> bool:
    import torch

    try:
        return hasattr(torch.ops, NAMESPACE) and torch.ops.normswap_native.abi is not None
    except (AttributeError, RuntimeError):
        return False


def _last_line(text: str) -> str:
    """The compiler's first ``error:`` line (``file:line:col: error: ...``), else the message's last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if " error: " in ln or ln.startswith("error: ") or "fatal error" in ln]
    return (errors[0] if errors else lines[-1] if lines else "unknown error")[:300]


def ops() -> Any | None:
    """``torch.ops.normswap_native`` when the native kernels are on and available, else ``None`` (the caller
    runs its eager path). The first call in a process loads, and if needed builds, the library."""
    m = mode()
    if m == "off":
        return None
    if _STATE["ops"] is not None:
        return _STATE["ops"]
    if _STATE["tried"] and m == "auto":
        return None
    _STATE["tried"] = True
    import torch

    failed = library_dir() / "FAILED"
    if m == "auto" and failed.is_file() and _built(library_dir(), _name()) is None:
        return None  # a build failed before on this machine: no retry in every process
    try:
        build()
    except NativeBuildError as e:
        if m == "on":
            raise
        warnings.warn(f"normswap: {e}", RuntimeWarning, stacklevel=2)
        return None
    _STATE["ops"] = torch.ops.normswap_native
    return _STATE["ops"]


def enabled() -> bool:
    """Whether :func:`ops` hands out the native kernels in this process (loading them if needed)."""
    return ops() is not None
