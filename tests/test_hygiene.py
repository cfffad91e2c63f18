"""The suite's own rules (docs/testing.md): no test reaches the network (a guard in conftest fails it, even when
the code under test swallows the error), and a missing asset is a skip locally but a failure in CI."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import guards
from guards import missing_asset, require_module

HERE = Path(__file__).resolve().parent


def test_a_connection_beyond_localhost_is_refused_and_recorded():
    with pytest.raises(OSError, match=r"^network access blocked by tests/guards.py: connect to \('192.0.2.1', 80\)$"):
        socket.create_connection(("192.0.2.1", 80), timeout=1)  # TEST-NET-1: never routed
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, pytest.raises(OSError, match="sendto to"):
        udp.sendto(b"x", ("198.51.100.7", 53))
    assert guards._NETWORK_ATTEMPTS == ["socket.connect(('192.0.2.1', 80))", "socket.sendto(('198.51.100.7', 53))"]
    guards._NETWORK_ATTEMPTS.clear()  # seen: this test must not fail for them


def test_localhost_and_unix_sockets_still_work(tmp_path):
    with socket.socket() as server:  # torch.distributed's rendezvous (torchrun) connects to 127.0.0.1
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=5):
            pass
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tmp_path / "s"))
        server.listen(1)
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(tmp_path / "s"))
    assert guards._NETWORK_ATTEMPTS == []


@pytest.mark.parametrize("env, outcome", [({"CI": "true"}, pytest.fail.Exception),
                                          ({"NORMSWAP_REQUIRE_ASSETS": "1"}, pytest.fail.Exception),
                                          ({"CI": "false"}, pytest.skip.Exception), ({}, pytest.skip.Exception)])
def test_missing_assets_skip_locally_and_fail_in_ci(monkeypatch, env, outcome):
    monkeypatch.delenv("CI", raising=False)
    monkeypatch.delenv("NORMSWAP_REQUIRE_ASSETS", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)

    def outcome_of(call, *args):  # a skip must not hide a missing failure: catch both, compare the type
        try:
            call(*args)
        except BaseException as exc:  # noqa: BLE001 - pytest's Skipped and Failed are BaseExceptions
            return exc
        return None

    got = outcome_of(missing_asset, "Fashion-MNIST", "run scripts/setup.sh")
    prefix = "asset missing in CI: " if outcome is pytest.fail.Exception else ""
    assert type(got) is outcome and str(got) == f"{prefix}Fashion-MNIST is not available (run scripts/setup.sh)"
    got = outcome_of(require_module, "no_such_pkg_xyz")
    assert type(got) is outcome and str(got).startswith(f"{prefix}Python package no_such_pkg_xyz is not available (pip")
    assert require_module("json") is sys.modules["json"]


def test_ci_script_turns_the_policy_on():
    root = HERE.parent
    text = (root / "scripts" / "test.sh").read_text()
    assert 'case "${CI:-}" in true|TRUE|True|1|yes) export NORMSWAP_REQUIRE_ASSETS=1 ;; esac' in text
    assert 'export CI="${CI:-true}"' in (root / ".ci" / "run").read_text()


INNER = '''
import socket
import pytest
from conftest import missing_asset


def test_swallows_a_download_error():
    try:
        socket.create_connection(("203.0.113.9", 443), timeout=1)
    except OSError:
        pass  # code under test often turns this into a friendly message: the guard still fails the test


def test_needs_an_asset():
    missing_asset("the frobnicator weights")


def test_plain():
    assert True
'''


def test_the_guard_and_the_policy_fail_a_real_session(tmp_path):
    """A pytest session whose conftest is tests/guards.py, as in CI: a swallowed connection attempt fails its test,
    and so does a missing asset (the local skip is tested above, in process)."""
    shutil.copy(HERE / "guards.py", tmp_path / "conftest.py")
    (tmp_path / "test_inner.py").write_text(INNER)
    env = {k: v for k, v in os.environ.items() if k not in ("NORMSWAP_REQUIRE_ASSETS", "PYTEST_ADDOPTS")}
    env.update(CI="true", COLUMNS="300", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), env.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA", "test_inner.py"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout
    assert proc.returncode == 1, out[-3000:]
    assert "ERROR at teardown of test_swallows_a_download_error" in out, out[-3000:]
    assert "ERROR test_inner.py::test_swallows_a_download_error - Failed: the test tried to reach the network: " \
           "socket.connect(('203.0.113.9', 443))" in out, out[-3000:]
    assert "FAILED test_inner.py::test_needs_an_asset - Failed: asset missing in CI: the frobnicator weights is " \
           "not available (run scripts/setup.sh)" in out, out[-3000:]
    assert "PASSED test_inner.py::test_plain" in out and "1 failed, 2 passed, 1 error" in out
