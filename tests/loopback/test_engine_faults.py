"""An engine that raises (a bug in it or in its adapter, e.g. qh3 2.1's core under loss,
test_qh3_core.py) closes only its own connection, with the reason; the endpoint keeps
serving its other connections and nothing reaches the event loop's exception handler.
Real endpoints on loopback, both engines; the fault is injected into one engine object."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import qp2p
from qp2p import wire
from qp2p.engine import _aioquic
from tests.support.endpoints import FAST, connected

pytestmark = pytest.mark.asyncio

try:
    from qp2p.engine import _qh3
    ADAPTERS: tuple[Any, ...] = (_aioquic, _qh3)
except ImportError:  # pragma: no cover - qh3 is a test dependency
    ADAPTERS = (_aioquic,)


class EngineBug(Exception):
    """What the injected fault raises."""


@pytest.fixture
def dialled(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Every dialling engine the endpoints create, in creation order."""
    created: list[Any] = []

    def recording(real: Callable[..., Any]) -> Callable[..., Any]:
        def record(*args: Any, **kwargs: Any) -> Any:
            engine = real(*args, **kwargs)
            created.append(engine)
            return engine

        return record

    for adapter in ADAPTERS:  # whichever engine the endpoint runs on
        monkeypatch.setattr(adapter, "new_client", recording(adapter.new_client))
    yield created


def break_method(engine: Any, name: str) -> None:
    """From now on ``engine.<name>`` raises."""

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise EngineBug(f"injected fault in {name}")

    setattr(engine, name, broken)


async def answer(conn: qp2p.Connection) -> None:
    """Reply to ``conn``'s requests until it is closed."""
    with contextlib.suppress(qp2p.ConnectionClosed):
        async for msg in conn:
            await msg.reply(b"here")


async def drain(conn: qp2p.Connection) -> None:
    """Take ``conn``'s messages until it is closed (raises ``ConnectionClosed`` then)."""
    while True:
        await conn.recv()


@pytest.mark.parametrize("method", ["datagrams_to_send", "receive_datagrams", "handle_timer"])
async def test_engine_error_closes_only_its_connection(
    impl: str, dialled: list[Any], method: str
) -> None:
    loop = asyncio.get_running_loop()
    escaped: list[dict[str, Any]] = []
    loop.set_exception_handler(lambda _loop, context: escaped.append(context))
    a = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST)
    b = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST)
    c = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST)
    try:
        to_b, at_b = await connected(a, b)
        to_c, at_c = await connected(a, c)
        engine = dialled[0]  # a's engine for its connection to b
        answering = asyncio.ensure_future(answer(at_b))
        break_method(engine, method)
        if method == "receive_datagrams":
            break_method(engine, "receive_datagram")  # a single datagram takes this one
        # a request makes the endpoint call the engine: to send it, to take the reply, and
        # to acknowledge the reply once its ACK delay passed (a timer)
        with contextlib.suppress(qp2p.ConnectionClosed):
            await asyncio.wait_for(to_b.request(b"anyone there?", timeout=5), 10)
        with pytest.raises(qp2p.ConnectionClosed) as closed:
            await asyncio.wait_for(drain(to_b), 5)
        assert "internal error" in str(closed.value.reason)
        assert closed.value.error_code == wire.CLOSE_INTERNAL_ERROR
        assert to_b.is_closed and to_b not in a.connections()
        # the peer hears of it (CONNECTION_CLOSE) unless the engine could not build one
        if method != "datagrams_to_send":
            await asyncio.wait_for(answering, 5)  # it returns once at_b is closed
        # the endpoint still serves its other connection, in both directions, and new ones
        await to_c.send(b"still here")
        assert (await asyncio.wait_for(at_c.recv(), 5)).payload == b"still here"
        await at_c.send(b"and back")
        assert (await asyncio.wait_for(to_c.recv(), 5)).payload == b"and back"
        answering.cancel()
        again = await a.connect_to(b.local_addr)
        assert again is not to_b
        await again.send(b"redialled")
        assert escaped == []
    finally:
        await a.close()
        await b.close()
        await c.close()
        loop.set_exception_handler(None)
