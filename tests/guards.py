"""The suite's rules, with nothing but pytest and the standard library (docs/testing.md): a missing asset is a skip
locally and a failure in CI; no test reaches the network. tests/conftest.py imports everything here, which makes
the hooks and the autouse fixture active for the whole session."""

from __future__ import annotations

import importlib
import ipaddress
import os
import socket

import pytest


# ------------------------------------------------------------------------------------------ assets
def assets_required() -> bool:
    """True in CI (``CI=true``, or ``NORMSWAP_REQUIRE_ASSETS=1``, which scripts/test.sh sets there): a missing
    asset (weights, data sets, optional packages, the browser) is then a failure, not a skip."""
    return (os.environ.get("NORMSWAP_REQUIRE_ASSETS", "") == "1"
            or os.environ.get("CI", "").strip().lower() in ("1", "true", "yes"))


def missing_asset(what: str, how: str = "run scripts/setup.sh") -> None:
    """The one way a test gives up for want of an asset: skip locally, fail in CI (never a silent green)."""
    message = f"{what} is not available ({how})"
    if assets_required():
        pytest.fail(f"asset missing in CI: {message}", pytrace=False)
    pytest.skip(message)


def require_module(name: str, how: str | None = None):
    """``pytest.importorskip`` under the asset policy: the module, or a skip locally / a failure in CI."""
    try:
        return importlib.import_module(name)
    except ImportError:
        missing_asset(f"Python package {name}", how or "pip install -e '.[test]' (scripts/setup.sh)")



# ------------------------------------------------------------------------------------------ no network
_NETWORK_ATTEMPTS: list[str] = []


def _local(address: object) -> bool:
    """Loopback or a Unix socket: what torch.distributed and subprocess plumbing use."""
    if not isinstance(address, tuple) or not address:
        return True  # AF_UNIX paths (str/bytes) and anything that is not an internet address
    host = address[0]
    if isinstance(host, bytes):
        host = host.decode(errors="replace")
    if host in ("localhost", "", "0.0.0.0", "::"):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False  # a host name other than localhost: resolving it is already reaching out


def _guarded(name: str, real):
    def guard(sock, *args):
        address = args[-1] if name == "sendto" else args[0]  # sendto(data[, flags], address)
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _local(address):
            _NETWORK_ATTEMPTS.append(f"socket.{name}({address!r})")
            raise OSError(f"network access blocked by tests/guards.py: {name} to {address!r}")
        return real(sock, *args)

    guard.__wrapped__ = real
    return guard


def pytest_sessionstart(session) -> None:
    """Every test runs behind a guard: a connection (or datagram) to anything but localhost is refused and the
    test fails, even where the code under test swallows the OSError (docs/testing.md)."""
    for name in ("connect", "connect_ex", "sendto"):
        setattr(socket.socket, name, _guarded(name, getattr(socket.socket, name)))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item) -> None:
    _NETWORK_ATTEMPTS.clear()


@pytest.fixture(autouse=True)
def _no_network_reached():
    yield
    if _NETWORK_ATTEMPTS:
        attempts = "; ".join(_NETWORK_ATTEMPTS)
        _NETWORK_ATTEMPTS.clear()
        pytest.fail(f"the test tried to reach the network: {attempts}", pytrace=False)
