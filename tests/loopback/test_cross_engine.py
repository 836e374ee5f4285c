"""Endpoints on different QUIC engines talk to each other: an aioquic endpoint and a qh3
endpoint exchange messages, requests, 1 MiB messages and datagrams, and authenticate each
other (pinned and CA; a stranger refused) with either one dialling (both loops)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import qp2p
from tests.support.endpoints import FAST, no_incoming

#: (dialler's engine, acceptor's engine)
DIRECTIONS = [("aioquic", "qh3"), ("qh3", "aioquic")]
NO_RETRY = qp2p.RetryConfig(initial_interval=0.05, max_interval=0.2, max_elapsed_time=1.0)


def config(engine: str, **kw: Any) -> qp2p.Config:
    kw.setdefault("retry", FAST.retry)
    return qp2p.Config(engine=engine, idle_timeout=10.0, handshake_timeout=3.0, **kw)


async def bind(engine: str, identity: qp2p.Identity | None = None,
               trust: qp2p.Trust | None = None, **kw: Any) -> qp2p.Endpoint:
    ep = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=config(engine, **kw),
                                  identity=identity, trust=trust)
    assert ep.engine == engine
    return ep


def test_both_engines_are_installed() -> None:
    assert qp2p.engines() == ["qh3", "aioquic"]  # the test matrix needs both


@pytest.mark.asyncio
@pytest.mark.parametrize(("dialler", "acceptor"), DIRECTIONS)
async def test_messages_requests_big_and_datagrams(dialler: str, acceptor: str) -> None:
    a, b = await bind(dialler), await bind(acceptor)
    try:
        conn = await a.connect_to(b.local_addr)
        accepted = await asyncio.wait_for(b.accept(), 5)
        assert conn.peer_id == b.peer_id and accepted.peer_id == a.peer_id
        for sender, receiver in ((conn, accepted), (accepted, conn)):
            await sender.send(b"hello", header=b"h", dst=b"d")
            msg = await asyncio.wait_for(receiver.recv(), 5)
            assert (msg.header, msg.dst, msg.payload) == (b"h", b"d", b"hello")
            assert not msg.is_request

            async def answer(receiver: qp2p.Connection = receiver) -> None:
                request = await receiver.recv()
                assert request.is_request
                await request.reply(request.payload[::-1], header=b"re")

            task = asyncio.ensure_future(answer())
            reply = await asyncio.wait_for(sender.request(b"ping!", header=b"q"), 5)
            await task
            assert (reply.header, reply.payload) == (b"re", b"!gnip")

            big = bytes(range(256)) * 4096  # 1 MiB
            await asyncio.wait_for(sender.send(big), 20)
            got = await asyncio.wait_for(receiver.recv(), 20)
            assert got.payload == big

            sent = [b"dg-%d" % i for i in range(20)]
            for data in sent:
                sender.send_datagram(data)
            first = await asyncio.wait_for(receiver.recv_datagram(), 5)
            assert first in sent  # unreliable, but nothing is lost on loopback here
        assert set(conn.stats()) == set(accepted.stats())  # the same keys on both engines
        await conn.close("cross-engine done")
        for _ in range(100):
            if accepted.is_closed:
                break
            await asyncio.sleep(0.02)
        assert accepted.is_closed
        with pytest.raises(qp2p.ConnectionClosed) as info:
            await accepted.recv()
        assert "cross-engine done" in str(info.value.reason)
    finally:
        await a.close()
        await b.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(("dialler", "acceptor"), DIRECTIONS)
async def test_pinned_both_ways_and_strangers_refused(dialler: str, acceptor: str) -> None:
    dial_id, accept_id, stranger_id = (qp2p.Identity.generate() for _ in range(3))
    server = await bind(acceptor, accept_id, qp2p.Trust.pinned({dial_id.peer_id}))
    client = await bind(dialler, dial_id, qp2p.Trust.pinned({accept_id.peer_id}))
    stranger = await bind(dialler, stranger_id, retry=NO_RETRY)  # Trust.any: it pins nobody
    wrong_pin = await bind(dialler, dial_id, qp2p.Trust.pinned({stranger_id.peer_id}),
                           retry=NO_RETRY)
    try:
        conn = await client.connect_to(server.local_addr, expect_peer_id=accept_id.peer_id)
        accepted = await asyncio.wait_for(server.accept(), 5)
        assert conn.peer_id == accept_id.peer_id and accepted.peer_id == dial_id.peer_id
        await conn.send(b"pinned")
        assert (await asyncio.wait_for(accepted.recv(), 5)).payload == b"pinned"
        # the acceptor refuses a dialler it did not pin: no connection on either side
        with pytest.raises((qp2p.PeerAuthenticationError, qp2p.ConnectionError)):
            await stranger.connect_to(server.local_addr)
        assert stranger.connections() == []
        # the dialler refuses an acceptor it did not pin
        with pytest.raises(qp2p.PeerAuthenticationError) as info:
            await wrong_pin.connect_to(server.local_addr)
        assert info.value.peer_id == accept_id.peer_id
        assert wrong_pin.connections() == []
        assert await no_incoming(server, 0.5)  # neither refused dial reached accept()
        assert [c.peer_id for c in server.connections()] == [dial_id.peer_id]
    finally:
        for ep in (server, client, stranger, wrong_pin):
            await ep.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(("dialler", "acceptor"), DIRECTIONS)
async def test_private_ca_both_ways_and_outsider_refused(dialler: str, acceptor: str) -> None:
    ca = qp2p.CertificateAuthority.generate("cross-engine")
    trust = qp2p.Trust.ca(ca.certificate_pem)
    server = await bind(acceptor, ca.issue(), trust)
    client = await bind(dialler, ca.issue(), trust)
    outsider = await bind(dialler, qp2p.Identity.generate(), trust, retry=NO_RETRY)
    outsider_server = await bind(acceptor, qp2p.Identity.generate(), trust)
    try:
        conn = await client.connect_to(server.local_addr)
        accepted = await asyncio.wait_for(server.accept(), 5)
        assert conn.peer_id == server.peer_id and accepted.peer_id == client.peer_id
        reply_task = asyncio.ensure_future(accepted.recv())
        await conn.send(b"member")
        assert (await asyncio.wait_for(reply_task, 5)).payload == b"member"
        # an outsider dialling members is refused by the acceptor's CA check
        with pytest.raises((qp2p.PeerAuthenticationError, qp2p.ConnectionError)):
            await outsider.connect_to(server.local_addr)
        assert await no_incoming(server, 0.3)
        # a member dialling an outsider refuses the outsider's certificate
        with pytest.raises(qp2p.PeerAuthenticationError):
            await client.connect_to(outsider_server.local_addr)
        assert await no_incoming(outsider_server, 0.3)
    finally:
        for ep in (server, client, outsider, outsider_server):
            await ep.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(("dialler", "acceptor"), DIRECTIONS)
async def test_retry_and_refusal_across_engines(dialler: str, acceptor: str) -> None:
    server = await bind(acceptor, require_address_validation=True, max_connections=1)
    first, second = await bind(dialler), await bind(dialler, retry=NO_RETRY)
    try:
        conn = await first.connect_to(server.local_addr)  # after a stateless Retry
        accepted = await asyncio.wait_for(server.accept(), 5)
        await conn.send(b"validated")
        assert (await asyncio.wait_for(accepted.recv(), 5)).payload == b"validated"
        assert server.stats_counters["retries_sent"] >= 1
        with pytest.raises(qp2p.ConnectionError) as info:  # over max_connections
            await second.connect_to(server.local_addr)
        assert "max_connections" in str(info.value.__cause__ or info.value)
        assert server.stats_counters["handshakes_refused"] >= 1
    finally:
        for ep in (server, first, second):
            await ep.close()
