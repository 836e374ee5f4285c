"""Shared fixtures: every behaviour test runs on both fast-path implementations
(compiled and pure-Python twin) and under both event loops (uvloop and asyncio)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio

import qp2p
from qp2p import _speedups

pytest_plugins = ["tests.netlab"]  # the ``lab`` fixture for namespace tests

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a test dependency
    uvloop = None

def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    """Every async test runs under plain asyncio and under uvloop; tests marked
    ``one_loop`` (slow namespace tests) under uvloop only."""
    if uvloop is None:
        raise pytest.UsageError("uvloop is a test dependency and must be installed")
    if item.get_closest_marker("one_loop"):
        return {"uvloop": uvloop.new_event_loop}
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture(params=["cython", "python"])
def impl(request: pytest.FixtureRequest) -> Iterator[str]:
    """Selects the compiled fast path or the pure-Python twin for endpoints bound in
    this test (the cython case fails, not skips, when the extension isn't built)."""
    before = _speedups.implementation
    _speedups.select(request.param)
    assert qp2p.implementation == request.param
    yield request.param
    _speedups.select(before)


FAST = qp2p.Config(
    idle_timeout=10.0,
    handshake_timeout=3.0,
    retry=qp2p.RetryConfig(initial_interval=0.05, max_interval=0.5, max_elapsed_time=5.0),
)


@pytest_asyncio.fixture
async def pair(impl: str) -> AsyncIterator[tuple[qp2p.Endpoint, qp2p.Endpoint]]:
    """Two endpoints on loopback: (dialer, acceptor)."""
    a = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST)
    b = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST)
    try:
        yield a, b
    finally:
        await a.close()
        await b.close()


async def connected(
    a: qp2p.Endpoint, b: qp2p.Endpoint, **kw: Any
) -> tuple[qp2p.Connection, qp2p.Connection]:
    """Dial b from a; return (a's connection, b's accepted connection)."""
    conn = await a.connect_to(b.local_addr, **kw)
    accepted = await asyncio.wait_for(b.accept(), 5)
    return conn, accepted
