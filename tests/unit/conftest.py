"""The unit layer opens no IP socket: creating one fails the test (such a test belongs in
``tests/loopback/``). Unix sockets stay allowed (an event loop's self-pipe is one)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from typing import Any

import pytest


@pytest.fixture(autouse=True)
def no_ip_sockets(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """``socket.socket(AF_INET or AF_INET6, ...)`` raises for the test's duration (the
    class stays the same object: only its constructor is wrapped)."""
    real_init = socket.socket.__init__

    def guarded(self: socket.socket, family: Any = -1, type: Any = -1, proto: int = -1,
                fileno: int | None = None) -> None:
        if fileno is None and family in (-1, socket.AF_INET, socket.AF_INET6):
            raise AssertionError("a unit test opened an IP socket: move it to tests/loopback/")
        real_init(self, family, type, proto, fileno)

    monkeypatch.setattr(socket.socket, "__init__", guarded)
    yield
