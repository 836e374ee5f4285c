"""Shared fixtures: every behaviour test runs on both QUIC engines (aioquic and qh3),
both fast-path implementations (compiled and pure-Python twin) and both event loops
(uvloop and asyncio).

The ``impl`` fixture carries the engine axis too (``cython-qh3``, ``python-aioquic``, ...:
endpoints bound in the test get the engine through ``QP2P_ENGINE``). Running all eight
engine x implementation x loop combinations would double the suite, so an async test runs
on a pairwise covering of them: four runs in which every engine meets every
implementation and every loop (see ``COVERING``). Sync tests run all four engine x
implementation pairs.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator
from types import ModuleType
from typing import Any

import pytest
import pytest_asyncio

import qp2p
from qp2p import _speedups
from tests.support.endpoints import FAST

pytest_plugins = ["tests.support.netlab"]  # the ``lab`` fixture for namespace tests

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


#: (loop, implementation, engine) runs kept for an async test using ``impl``.
COVERING = {
    ("asyncio", "cython", "aioquic"),
    ("asyncio", "python", "qh3"),
    ("uvloop", "cython", "qh3"),
    ("uvloop", "python", "aioquic"),
}
ENGINES = ("aioquic", "qh3")


@pytest.fixture(params=[f"{i}-{e}" for i in ("cython", "python") for e in ENGINES])
def impl(request: pytest.FixtureRequest) -> Iterator[str]:
    """Selects the compiled fast path or the pure-Python twin, and the QUIC engine, for
    endpoints bound in this test (the cython case fails, not skips, when the extension
    isn't built; a missing engine fails at bind). Yields the implementation's name."""
    name, engine = request.param.split("-")
    before = _speedups.implementation
    before_engine = os.environ.get("QP2P_ENGINE")
    _speedups.select(name)
    os.environ["QP2P_ENGINE"] = engine
    assert qp2p.implementation == name
    yield name
    _speedups.select(before)
    if before_engine is None:
        os.environ.pop("QP2P_ENGINE", None)
    else:
        os.environ["QP2P_ENGINE"] = before_engine


@pytest.fixture
def engine_name(impl: str) -> str:
    """The engine the ``impl`` fixture selected for this test."""
    return os.environ["QP2P_ENGINE"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Keep an async test's engine x implementation x loop runs to ``COVERING``."""
    kept, dropped = [], []
    for item in items:
        callspec = getattr(item, "callspec", None)
        combo = callspec.params.get("impl") if callspec is not None else None
        loop = _loop_of(item)
        if combo is None or loop is None:
            kept.append(item)
            continue
        name, engine = combo.split("-")
        (kept if (loop, name, engine) in COVERING else dropped).append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


def _loop_of(item: pytest.Item) -> str | None:
    """The event loop an async test item runs under, from its id."""
    if item.get_closest_marker("asyncio") is None:
        return None
    for loop in ("asyncio", "uvloop"):
        if f"[{loop}-" in item.name or f"-{loop}]" in item.name or f"-{loop}-" in item.name:
            return loop
    return None


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


@pytest.fixture(params=["cython", "python"])
def fp(request: pytest.FixtureRequest) -> Iterator[ModuleType]:
    """The fast-path module under test (compiled or twin), selected through
    ``_speedups.select``; the cython case fails, not skips, when the extension isn't built."""
    before = _speedups.implementation
    try:
        _speedups.select(request.param)
    except ImportError as exc:
        pytest.fail(f"the compiled fast path must be built for these tests: {exc}")
    assert _speedups.implementation == request.param
    yield _speedups.impl
    _speedups.select(before)
