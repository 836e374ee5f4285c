"""The receiver's ``max_message_size`` reaches the sender (issue 14, item 2): a qp2p peer
advertises it in a private QUIC transport parameter, the sender refuses an over-limit
message locally, and a message the peer refused never reports success."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

import qp2p
from qp2p import engine
from tests.conftest import FAST, connected

SMALL = qp2p.Config(
    max_message_size=100, idle_timeout=10.0, handshake_timeout=3.0, retry=FAST.retry
)


def test_parameter_round_trip() -> None:
    data = engine.local_transport_parameters(SMALL)
    assert engine.peer_max_message_size(data) == 100
    # among other parameters, and absent or truncated
    other = bytes([0x04, 0x02, 0x40, 0x10])  # initial_max_data = 16
    assert engine.peer_max_message_size(other + data + other) == 100
    assert engine.peer_max_message_size(other) is None
    assert engine.peer_max_message_size(data[:-1]) is None
    for size in (0, 63, 64, 2**14, 2**30, 2**32 - 17):  # every varint length
        data = engine.local_transport_parameters(SimpleNamespace(max_message_size=size))  # type: ignore[arg-type]
        assert engine.peer_max_message_size(data) == size


@pytest.mark.asyncio
async def test_sender_learns_the_limit(impl: str) -> None:
    """Both directions learn the other's limit in the handshake; an over-limit send,
    request or reply raises MessageTooLarge before a byte is sent."""
    a = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST)
    b = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=SMALL)
    try:
        conn, accepted = await connected(a, b)
        assert conn._quic.peer_max_message_size() == 100
        assert accepted._quic.peer_max_message_size() == FAST.max_message_size
        before = conn.stats()
        with pytest.raises(qp2p.MessageTooLarge, match="peer's max_message_size of 100"):
            await conn.send(b"x" * 101)
        with pytest.raises(qp2p.MessageTooLarge):
            await conn.send(b"x" * 90, header=b"h" * 11)
        with pytest.raises(qp2p.MessageTooLarge):
            await conn.request(b"y" * 200, timeout=5)
        after = conn.stats()
        assert after["messages_sent"] == before["messages_sent"]
        assert after["unacked_bytes"] == 0 and after["queued_messages"] == 0
        # exactly the limit passes
        await asyncio.wait_for(conn.send(b"p" * 90, header=b"h" * 6, dst=b"d" * 4), 5)
        msg = await asyncio.wait_for(accepted.recv(), 5)
        assert len(msg.header) + len(msg.dst) + len(msg.payload) == 100
        assert accepted.stats()["streams_rejected"] == 0
        # the small side's own limit is what binds its sends (smaller than the peer's)
        with pytest.raises(qp2p.MessageTooLarge, match="exceeds max_message_size of 100"):
            await accepted.send(b"z" * 101)
    finally:
        await a.close()
        await b.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(("dialler", "acceptor"), [("aioquic", "qh3"), ("qh3", "aioquic")])
async def test_limits_cross_engines(dialler: str, acceptor: str) -> None:
    """Each engine's adapter writes the parameter the other's reads, in both roles."""
    a = await qp2p.Endpoint.bind(
        ("127.0.0.1", 0), config=qp2p.Config(engine=dialler, max_message_size=300)
    )
    b = await qp2p.Endpoint.bind(
        ("127.0.0.1", 0), config=qp2p.Config(engine=acceptor, max_message_size=200)
    )
    try:
        assert (a.engine, b.engine) == (dialler, acceptor)
        conn, accepted = await connected(a, b)
        assert conn._quic.peer_max_message_size() == 200
        assert accepted._quic.peer_max_message_size() == 300
        with pytest.raises(qp2p.MessageTooLarge, match="peer's max_message_size of 200"):
            await conn.send(b"x" * 201)
        with pytest.raises(qp2p.MessageTooLarge, match="max_message_size of 200"):
            await accepted.send(b"x" * 201)  # its own limit binds first
        await asyncio.wait_for(conn.send(b"x" * 200), 5)
        assert len((await asyncio.wait_for(accepted.recv(), 5)).payload) == 200
        assert accepted.stats()["streams_rejected"] == 0
    finally:
        await a.close()
        await b.close()
