"""normswap.native: the switch, the build and load of the native library, and what a failed build does."""

from __future__ import annotations

import subprocess
import sys
import warnings

import pytest
import torch

import normswap.native as native
from guards import missing_asset


@pytest.fixture
def fresh_state(monkeypatch):
    """The module's per-process state, restored after the test."""
    monkeypatch.setattr(native, "_STATE", {"override": None, "ops": None, "tried": False})
    return native._STATE


def require_library():
    try:
        native.build()
    except native.NativeBuildError as e:
        missing_asset(f"normswap's native library ({e})", "run scripts/setup.sh on a machine with g++")


@pytest.mark.parametrize("raw,want", [("", "auto"), ("auto", "auto"), (" AUTO ", "auto"), ("0", "off"),
                                      ("off", "off"), ("False", "off"), ("no", "off"), ("1", "on"), ("on", "on"),
                                      ("TRUE", "on"), ("yes", "on")])
def test_mode_reads_the_variable(monkeypatch, fresh_state, raw, want):
    monkeypatch.setenv(native.ENV, raw)
    assert native.mode() == want


def test_a_bad_value_is_a_usage_error(monkeypatch, fresh_state):
    monkeypatch.setenv(native.ENV, "fast")
    with pytest.raises(native.UsageError) as e:
        native.mode()
    assert str(e.value) == "NORMSWAP_NATIVE='fast' is not one of auto, 0, 1 (or off, on)"
    assert e.value.exit_code == 2


def test_set_enabled_overrides_the_variable(monkeypatch, fresh_state):
    monkeypatch.setenv(native.ENV, "1")
    native.set_enabled(False)
    assert native.mode() == "off" and native.ops() is None and not native.enabled()
    native.set_enabled(None)
    assert native.mode() == "on"


def test_the_library_loads_and_answers(fresh_state):
    require_library()
    lib = native.build()
    assert lib.is_file() and lib.parent == native.library_dir()
    ops = native.ops()
    assert ops is torch.ops.normswap_native
    assert ops.abi() == native.ABI
    lanes = {"AVX512": 16, "AVX2": 8}.get(torch.backends.cpu.get_cpu_capability())
    if lanes is not None:
        assert ops.float_lanes() == lanes


def test_the_name_follows_sources_torch_and_flags(monkeypatch, tmp_path):
    base = native._name()
    assert base.startswith("normswap_native_") and len(base) == len("normswap_native_") + 12
    monkeypatch.setattr(native, "flags", lambda: ["-O0"])
    assert native._name() != base
    monkeypatch.undo()
    monkeypatch.setattr(native, "CSRC", tmp_path)
    (tmp_path / "x.cpp").write_text("int x;\n")
    assert native._name() != base


def test_the_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("NORMSWAP_NATIVE_DIR", str(tmp_path))
    assert native.library_dir() == tmp_path / native._name()
    monkeypatch.delenv("NORMSWAP_NATIVE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert native.library_dir() == tmp_path / "xdg" / "normswap" / "native" / native._name()


@pytest.fixture
def broken(monkeypatch, tmp_path, fresh_state):
    """A source tree that does not compile, built into an empty folder."""
    src = tmp_path / "csrc"
    src.mkdir()
    (src / "broken.cpp").write_text('#error "deliberately broken"\n')
    monkeypatch.setattr(native, "CSRC", src)
    monkeypatch.setenv("NORMSWAP_NATIVE_DIR", str(tmp_path / "lib"))
    return tmp_path


def test_a_failed_build_is_one_line_and_remembered(broken, monkeypatch):
    monkeypatch.setenv(native.ENV, "auto")
    with pytest.warns(RuntimeWarning) as record:
        assert native.ops() is None
    message = str(record[0].message)
    assert message.startswith("normswap: building the native kernels failed (") and "\n" not in message
    assert message.endswith("; set NORMSWAP_NATIVE=0 to use the eager kernels")
    assert "deliberately broken" in message
    assert (native.library_dir() / "FAILED").is_file()
    # a new process (state reset) does not try again in auto mode, and says nothing
    monkeypatch.setattr(native, "_STATE", {"override": None, "ops": None, "tried": False})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.ops() is None


def test_required_and_broken_is_an_error(broken, monkeypatch):
    monkeypatch.setenv(native.ENV, "1")
    with pytest.raises(native.NativeBuildError, match=r"^building the native kernels failed \(.*deliberately broken"):
        native.ops()


def test_the_module_command_reports_the_library():
    require_library()
    out = subprocess.run([sys.executable, "-m", "normswap.native"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"normswap native kernels: {native.build()} (ABI {native.ABI}, ")
    bad = subprocess.run([sys.executable, "-m", "normswap.native", "--bogus"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr == "usage: python -m normswap.native [--verbose]\n"


def test_an_unwritable_cache_is_one_line(monkeypatch, tmp_path, fresh_state):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("NORMSWAP_NATIVE_DIR", str(blocker / "sub"))
    monkeypatch.setattr(native, "CSRC", tmp_path)  # a name no library was built under
    with pytest.raises(native.NativeBuildError) as e:
        native.build()
    assert str(e.value).startswith(f"cannot create {blocker / 'sub'}/normswap_native_")
    assert str(e.value).endswith("; set NORMSWAP_NATIVE_DIR to a writable folder or NORMSWAP_NATIVE=0")
    monkeypatch.setenv(native.ENV, "auto")
    with pytest.warns(RuntimeWarning, match="^normswap: cannot create "):
        assert native.ops() is None
