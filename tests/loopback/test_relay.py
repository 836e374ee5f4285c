"""Relayed connections on loopback: a relay endpoint (``relay=True``) forwards opaque
packets between two peers that both asked; the connection stays end-to-end encrypted and
authenticated. A spy between the dialler and the relay sees (and tampers with) exactly
the bytes the relay gets: no plaintext, and nothing forged gets through. Hostile uses of
the relay are judged by what it forwards (its counters) and what raw sockets receive."""

from __future__ import annotations

import asyncio
import os
import socket
from collections.abc import AsyncIterator, Callable

import pytest
import pytest_asyncio

import qp2p
from qp2p import relay
from tests.support.endpoints import FAST
from tests.support.forwarder import UdpForwarder
from tests.support.udp_relay import UdpRelay

pytestmark = pytest.mark.asyncio


@pytest_asyncio.fixture
async def trio(
    impl: str, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[qp2p.Endpoint, qp2p.Endpoint, qp2p.Endpoint]]:
    """(relay, target, dialler); the target is connected to the relay. On loopback a
    direct path always exists, so relayed connections stay relayed here only because
    these tests turn the move to a direct path off (``test_relay_upgrade`` turns it on)."""
    monkeypatch.setattr(relay, "UPGRADE_ATTEMPTS", 0)
    r = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST, relay=True)
    b = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST)
    a = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST)
    try:
        await b.connect_to(r.local_addr)
        yield r, b, a
    finally:
        for ep in (a, b, r):
            await ep.close()


async def exchange(conn: qp2p.Connection, accepted: qp2p.Connection, count: int) -> None:
    """Messages both ways, a request/response and datagrams; all must arrive intact."""
    for i in range(count):
        await asyncio.wait_for(conn.send(b"to-b %d" % i), 5)
        await asyncio.wait_for(accepted.send(b"to-a %d" % i), 5)
    got_b = [(await asyncio.wait_for(accepted.recv(), 5)).payload for _ in range(count)]
    got_a = [(await asyncio.wait_for(conn.recv(), 5)).payload for _ in range(count)]
    assert sorted(got_b) == sorted(b"to-b %d" % i for i in range(count))
    assert sorted(got_a) == sorted(b"to-a %d" % i for i in range(count))

    async def answer() -> None:
        msg = await asyncio.wait_for(accepted.recv(), 5)
        await msg.reply(b"re: " + msg.payload)

    answering = asyncio.ensure_future(answer())
    reply = await asyncio.wait_for(conn.request(b"question"), 5)
    await answering
    assert reply.payload == b"re: question"


async def test_relayed_connection_carries_everything(
    trio: tuple[qp2p.Endpoint, qp2p.Endpoint, qp2p.Endpoint],
) -> None:
    r, b, a = trio
    conn = await a.connect_relayed(r.local_addr, b.peer_id)
    accepted = await asyncio.wait_for(b.accept(), 5)
    assert conn.path == accepted.path == "relayed"
    assert conn.peer_id == b.peer_id and accepted.peer_id == a.peer_id
    assert relay.is_wrapped(b"\x00" + bytes(9))
    before = r.stats_counters["relayed_bytes"]
    await exchange(conn, accepted, 20)
    conn.send_datagram(b"dgram")
    assert await asyncio.wait_for(accepted.recv_datagram(), 5) == b"dgram"
    assert r.stats_counters["relayed_bytes"] > before
    assert r.stats_counters["relayed_packets"] > 40
    # the relay is not a party: none of its own connections is to the dialler's peer id
    # carrying user messages, and the target's connection to it is unaffected
    assert all(c.path == "direct" for c in r.connections())
    # a direct connection between them is a different one, and both coexist
    direct = await a.connect_to(b.local_addr)
    assert direct.path == "direct" and direct is not conn
    await conn.close()
    await asyncio.sleep(0.2)
    assert accepted.is_closed


async def test_connect_via_falls_back_to_the_relay(
    trio: tuple[qp2p.Endpoint, qp2p.Endpoint, qp2p.Endpoint],
) -> None:
    """On loopback punching always works; with allow_relay=False nothing changes."""
    r, b, a = trio
    conn = await a.connect_via(r.local_addr, b.peer_id, allow_relay=False)
    assert conn.path == "direct"


def flip_every(n: int, spy: UdpForwarder, flipped: list[int]) -> Callable[[bytes], bytes]:
    """A tamper that flips a byte in the middle of every ``n``-th wrapped datagram."""

    def tamper(data: bytes) -> bytes:
        if relay.is_wrapped(data) and len(spy.seen) % n == 0:
            pos = relay.HEADER_LEN + len(data[relay.HEADER_LEN:]) // 2
            data = data[:pos] + bytes([data[pos] ^ 0xFF]) + data[pos + 1:]
            flipped[0] += 1
        return data

    return tamper


async def test_relay_cannot_read_or_forge(
    trio: tuple[qp2p.Endpoint, qp2p.Endpoint, qp2p.Endpoint],
) -> None:
    """Everything the relay gets is ciphertext (a marker sent 50 times never shows), and
    datagrams tampered with on the way are dropped by the peers' AEAD: every message
    still arrives exactly as sent."""
    r, b, a = trio
    spy = UdpForwarder(r.local_addr)  # sees exactly what the relay gets from the dialler
    flipped = [0]
    try:
        conn = await a.connect_relayed(spy.addr, b.peer_id)
        accepted = await asyncio.wait_for(b.accept(), 5)
        spy.tamper = flip_every(7, spy, flipped)
        marker = b"PLAINTEXT-MARKER-" + os.urandom(8).hex().encode()
        for i in range(50):
            await asyncio.wait_for(conn.send(marker + b" %d" % i), 10)
        got = sorted([(await asyncio.wait_for(accepted.recv(), 10)).payload
                      for _ in range(50)])
        assert got == sorted(marker + b" %d" % i for i in range(50))
        assert flipped[0] > 0
        wrapped = [d for d in spy.seen if relay.is_wrapped(d)]
        assert len(wrapped) > 50
        assert not any(marker in d for d in spy.seen)
        assert not any(b"PLAINTEXT-MARKER" in d for d in spy.seen)
    finally:
        spy.close()


async def test_relay_forwards_only_sessions_both_asked_for(
    trio: tuple[qp2p.Endpoint, qp2p.Endpoint, qp2p.Endpoint],
) -> None:
    """A target that takes no incoming connections declines; an endpoint not bound
    with relay=True refuses; a peer not connected to the relay is unknown; wrapped
    datagrams naming no session, or a real session from a third address, are dropped
    and never forwarded."""
    r, b, a = trio
    closed = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST, accept_incoming=False)
    plain = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST, rendezvous=True)
    try:
        await closed.connect_to(r.local_addr)
        with pytest.raises(qp2p.HolePunchFailed, match="declined"):
            await a.connect_relayed(r.local_addr, closed.peer_id)
        await b.connect_to(plain.local_addr)
        with pytest.raises(qp2p.HolePunchFailed, match="not a relay"):
            await a.connect_relayed(plain.local_addr, b.peer_id)
        with pytest.raises(qp2p.HolePunchFailed, match="unknown peer id"):
            await a.connect_relayed(r.local_addr, qp2p.Identity.generate().peer_id)
        assert r.stats_counters["relayed_packets"] == 0
        # a working session, then raw datagrams injected from a third socket
        conn = await a.connect_relayed(r.local_addr, b.peer_id)
        await asyncio.wait_for(b.accept(), 5)
        await asyncio.wait_for(conn.send(b"hello"), 5)
        sessions = r.debug_snapshot()["relay"]["sessions"]  # the relay's own view, for the attack
        assert len(sessions) == 1
        forwarded = r.stats_counters["relayed_packets"]
        dropped = r.stats_counters["relay_dropped"]
        raw = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            raw.bind(("127.0.0.1", 0))
            for _ in range(100):
                raw.sendto(b"\x00" + sessions[0] + os.urandom(1200), r.local_addr)
                raw.sendto(b"\x00" + os.urandom(8) + os.urandom(1200), r.local_addr)
            await asyncio.sleep(0.3)
        finally:
            raw.close()
        assert r.stats_counters["relay_dropped"] - dropped == 100  # the spoofed session
        # only the peers' own few packets (ACKs) went through meanwhile, none of the 200
        assert r.stats_counters["relayed_packets"] - forwarded <= 10
        await asyncio.wait_for(conn.send(b"still works"), 5)
    finally:
        await closed.close()
        await plain.close()


async def test_relay_session_limits(
    trio: tuple[qp2p.Endpoint, qp2p.Endpoint, qp2p.Endpoint],
) -> None:
    """A peer gets at most MAX_SESSIONS_PER_PEER sessions; then the relay says busy (a
    session ends with either side's connection to the relay, or after idle_timeout
    without a packet: the relay cannot see the relayed connection close)."""
    r, b, a = trio
    conns = []
    for _ in range(relay.MAX_SESSIONS_PER_PEER):
        conns.append(await a.connect_relayed(r.local_addr, b.peer_id))
    with pytest.raises(qp2p.HolePunchFailed, match="busy"):
        await a.connect_relayed(r.local_addr, b.peer_id)
    assert len(r.debug_snapshot()["relay"]["sessions"]) == relay.MAX_SESSIONS_PER_PEER
    await exchange(conns[-1], await asyncio.wait_for(_accepted_last(b, len(conns)), 5), 2)


async def _accepted_last(b: qp2p.Endpoint, count: int) -> qp2p.Connection:
    accepted = [await b.accept() for _ in range(count)]
    return accepted[-1]


async def test_relayed_connection_moves_to_a_direct_path(impl: str) -> None:
    """With a direct path available (loopback), a relayed connection probes it, moves
    onto it (``path`` becomes "direct") and loses or duplicates nothing sent meanwhile;
    the relay then forwards nothing more for it. The dialler reaches the relay through a
    delay line (20 ms each way), so the first messages travel relayed while the probes run, and the
    relay gives the target a wrong address for the dialler (the delay line's): the
    target learns the right one from the dialler's probe."""
    r = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST, relay=True)
    b = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST)
    a = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST)
    line = UdpRelay(("127.0.0.1", 0), r.local_addr, delay_ms=20)
    try:
        await b.connect_to(r.local_addr)
        conn = await a.connect_relayed(await line.start(), b.peer_id)
        at_connect = r.stats_counters["relayed_packets"]
        # 300 messages at once, from the moment the connection exists: the first ones
        # travel while the probes run, through the relay
        sending = asyncio.ensure_future(asyncio.gather(
            *(conn.send(b"m%d" % i) for i in range(300))))
        accepted = await asyncio.wait_for(b.accept(), 5)
        got = [(await asyncio.wait_for(accepted.recv(), 5)).payload for _ in range(300)]
        await asyncio.wait_for(sending, 5)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while (conn.path, accepted.path) != ("direct", "direct") and loop.time() < deadline:
            await asyncio.sleep(0.01)
        assert (conn.path, accepted.path) == ("direct", "direct")
        assert sorted(got) == sorted(b"m%d" % i for i in range(300))  # nothing lost or twice
        during = r.stats_counters["relayed_packets"] - at_connect
        relayed = r.stats_counters["relayed_packets"]
        await exchange(conn, accepted, 20)  # both ways and a request, on the direct path
        after = r.stats_counters["relayed_packets"] - relayed
        assert after <= 5  # stragglers at most: the direct path carries it now
        print(f"\n[{impl}] moved to a direct path; {during} packets relayed while 300 "
              f"messages went, {after} after")
        assert during > 0
    finally:
        line.close()
        for ep in (a, b, r):
            await ep.close()
