"""Guards for every test: no real API key, no real home directory, no connection off this machine."""

from __future__ import annotations

import ipaddress
import socket

import pytest

KEY_VARIABLES = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "GEMINI_API_KEY", "GOOGLE_API_KEY", "GEMINI_BASE_URL")


@pytest.fixture(autouse=True)
def isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> None:
    for name in KEY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name in [n for n in __import__("os").environ if n.startswith("CONDUCTOR_")]:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path_factory.mktemp("home")))


_real_connect = socket.socket.connect


def _loopback_only(self: socket.socket, address: object) -> object:
    if isinstance(address, tuple) and self.family in (socket.AF_INET, socket.AF_INET6):
        host = str(address[0])
        try:
            loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ConnectionRefusedError(f"tests may not connect to {host}: only loopback servers exist here")
    return _real_connect(self, address)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Longest first: the fault suite's batches, then other slow tests, then the rest. Test processes
    (pytest-xdist, ``--dist load``) take tests in this order as they free up, so no long test starts last
    and leaves one CPU idle while it runs (a greedy longest-first schedule)."""
    def weight(item: pytest.Item) -> int:
        if item.get_closest_marker("slow") is None:
            return 2
        return 0 if item.nodeid.startswith("tests/fault/") else 1

    items.sort(key=weight)  # stable: the collection order within each class


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket.socket, "connect", _loopback_only)


