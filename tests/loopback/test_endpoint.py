"""Endpoint core behaviour on real UDP sockets, real TLS, real aioquic (both
implementations x both loops, via the ``impl`` fixture and the loop-factory hook in conftest)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import tracemalloc
from pathlib import Path

import pytest

import qp2p
from tests.support.endpoints import FAST, GIVE_UP_FAST, connected

pytestmark = pytest.mark.asyncio


async def test_connect_accept_addresses(pair: tuple[qp2p.Endpoint, qp2p.Endpoint]) -> None:
    a, b = pair
    conn, accepted = await connected(a, b)
    assert accepted.remote_addr == a.local_addr
    assert conn.remote_addr == b.local_addr
    assert conn.peer_id == b.peer_id
    assert accepted.peer_id == a.peer_id
    assert not conn.is_closed and not accepted.is_closed
    assert a.connections() == [conn]


async def test_message_with_header_and_dst(pair: tuple[qp2p.Endpoint, qp2p.Endpoint]) -> None:
    a, b = pair
    conn, accepted = await connected(a, b)
    payload = os.urandom(1024)
    await conn.send(payload, header=b"hdr", dst=b"destination")
    msg = await asyncio.wait_for(accepted.recv(), 5)
    assert (msg.payload, msg.header, msg.dst) == (payload, b"hdr", b"destination")
    assert not msg.is_request
    assert msg.connection is accepted


async def test_both_directions_one_connection(pair: tuple[qp2p.Endpoint, qp2p.Endpoint]) -> None:
    a, b = pair
    conn, accepted = await connected(a, b)
    await accepted.send(b"from acceptor")
    assert (await asyncio.wait_for(conn.recv(), 5)).payload == b"from acceptor"
    # the acceptor's connect_to finds the accepted connection in its pool
    assert await b.connect_to(a.local_addr) is accepted


async def test_request_reply_many_senders(impl: str) -> None:
    server = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST)

    async def serve() -> None:
        async def handle(conn: qp2p.Connection) -> None:
            async for msg in conn:
                assert msg.is_request
                try:
                    await msg.reply(hashlib.sha256(msg.payload).digest(), header=b"sha256")
                except qp2p.ConnectionClosed:  # the client may leave before our ACK returns
                    return

        async with asyncio.TaskGroup() as tg:
            async for conn in server.incoming():
                tg.create_task(handle(conn))

    server_task = asyncio.ensure_future(serve())
    clients = [await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST) for _ in range(10)]
    try:

        async def client(ep: qp2p.Endpoint) -> None:
            conn = await ep.connect_to(server.local_addr)
            for _ in range(100):
                body = os.urandom(1024)
                reply = await conn.request(body, timeout=10)
                assert reply.header == b"sha256"
                assert reply.payload == hashlib.sha256(body).digest()
                assert not reply.is_request

        await asyncio.wait_for(asyncio.gather(*(client(ep) for ep in clients)), 60)
    finally:
        for ep in clients:
            await ep.close()
        await server.close()
        await asyncio.wait_for(server_task, 5)


@pytest.mark.parametrize("mode", ["uni", "bi"])
async def test_large_messages(pair: tuple[qp2p.Endpoint, qp2p.Endpoint], mode: str) -> None:
    a, b = pair
    conn, accepted = await connected(a, b)
    bodies = [os.urandom(2**20) for _ in range(10)]

    async def echo_server() -> None:
        for _ in bodies:
            msg = await accepted.recv()
            if mode == "bi":
                await msg.reply(msg.payload)
            else:
                await accepted.send(msg.payload)

    server = asyncio.ensure_future(echo_server())
    for body in bodies:
        if mode == "bi":
            got = (await conn.request(body, timeout=30)).payload
        else:
            await conn.send(body)
            got = (await asyncio.wait_for(conn.recv(), 30)).payload
        assert got == body
    await asyncio.wait_for(server, 10)


async def test_ten_thousand_concurrent_sends(pair: tuple[qp2p.Endpoint, qp2p.Endpoint]) -> None:
    a, b = pair
    conn, accepted = await connected(a, b)
    n = 10_000
    ids = [i.to_bytes(8, "big") for i in range(n)]
    received: list[bytes] = []

    async def drain() -> None:
        while len(received) < n:
            received.append((await accepted.recv()).payload)

    drainer = asyncio.ensure_future(drain())
    await asyncio.wait_for(asyncio.gather(*(conn.send(i) for i in ids)), 120)
    await asyncio.wait_for(drainer, 30)
    assert sorted(received) == ids  # each exactly once
    assert accepted.stats()["messages_received"] == n


async def test_datagram_round_trip(pair: tuple[qp2p.Endpoint, qp2p.Endpoint]) -> None:
    a, b = pair
    conn, accepted = await connected(a, b)
    conn.send_datagram(b"ping")
    assert await asyncio.wait_for(accepted.recv_datagram(), 5) == b"ping"
    accepted.send_datagram(b"x" * accepted.max_datagram_payload)
    assert await asyncio.wait_for(conn.recv_datagram(), 5) == b"x" * conn.max_datagram_payload
    with pytest.raises(qp2p.MessageTooLarge):
        conn.send_datagram(b"x" * (conn.max_datagram_payload + 1))


async def test_stats_grow(pair: tuple[qp2p.Endpoint, qp2p.Endpoint]) -> None:
    a, b = pair
    conn, accepted = await connected(a, b)
    before = conn.stats()
    await conn.send(b"a" * 5000)
    await accepted.recv()
    conn.send_datagram(b"d")
    await accepted.recv_datagram()
    after = conn.stats()
    for key in ("bytes_sent", "packets_sent", "messages_sent", "datagrams_sent"):
        assert after[key] > before[key], key
    assert after["rtt"] is not None and after["rtt"] > 0
    assert after["cwnd"] > 0
    assert accepted.stats()["bytes_received"] >= 5000
    assert accepted.stats()["datagrams_received"] == 1


async def test_close_is_seen_by_peer(pair: tuple[qp2p.Endpoint, qp2p.Endpoint]) -> None:
    a, b = pair
    conn, accepted = await connected(a, b)
    await conn.send(b"last words")
    await conn.close("bye now")
    assert conn.is_closed
    await conn.close()  # idempotent
    # a message fully received before the close is still returned
    assert (await asyncio.wait_for(accepted.recv(), 1)).payload == b"last words"
    with pytest.raises(qp2p.ConnectionClosed) as info:
        await asyncio.wait_for(accepted.recv(), 1)
    assert info.value.reason == "bye now"
    assert accepted.is_closed
    with pytest.raises(qp2p.ConnectionClosed):
        await accepted.send(b"too late")
    with pytest.raises(qp2p.ConnectionClosed):
        await conn.send(b"too late")
    assert accepted not in b.connections()
    assert conn not in a.connections()


async def test_endpoint_close_ends_incoming(impl: str) -> None:
    ep = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST)
    seen: list[qp2p.Connection] = []

    async def consume() -> None:
        async for conn in ep.incoming():
            seen.append(conn)

    task = asyncio.ensure_future(consume())
    await asyncio.sleep(0.05)
    await ep.close()
    await asyncio.wait_for(task, 2)
    await ep.close()  # idempotent
    with pytest.raises(qp2p.EndpointClosed):
        await ep.connect_to(("127.0.0.1", 9))
    with pytest.raises(qp2p.EndpointClosed):
        await ep.accept()


async def test_endpoint_close_closes_peers(pair: tuple[qp2p.Endpoint, qp2p.Endpoint]) -> None:
    a, b = pair
    _, accepted = await connected(a, b)
    async with a:
        pass  # the context manager closes the endpoint
    with pytest.raises(qp2p.ConnectionClosed) as info:
        await asyncio.wait_for(accepted.recv(), 2)
    assert info.value.reason == "endpoint closed"


async def test_sender_side_validation(pair: tuple[qp2p.Endpoint, qp2p.Endpoint]) -> None:
    a, b = pair
    conn, accepted = await connected(a, b)
    with pytest.raises(ValueError):
        await conn.send(b"")
    with pytest.raises(TypeError):
        await conn.send("text")  # type: ignore[arg-type]
    with pytest.raises(qp2p.MessageTooLarge):
        await conn.send(b"x" * (FAST.max_message_size + 1))
    with pytest.raises(qp2p.MessageTooLarge):
        await conn.request(b"x", header=b"h" * FAST.max_message_size)
    # nothing was sent: the connection still works and nothing odd arrived
    await conn.send(b"fine")
    assert (await asyncio.wait_for(accepted.recv(), 5)).payload == b"fine"
    assert accepted.stats()["streams_rejected"] == 0


async def test_oversized_for_receiver_is_refused_locally(impl: str) -> None:
    """The receiver advertised its limit in the handshake: the sender refuses what
    exceeds it before sending a byte (tests/loopback/test_message_limits.py covers a receiver
    whose limit the sender did not learn)."""
    small = qp2p.Config(max_message_size=1024, handshake_timeout=3.0)
    a = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST)
    b = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=small)
    try:
        conn, accepted = await connected(a, b)
        for size in (2000, 200_000):
            with pytest.raises(qp2p.MessageTooLarge):
                await asyncio.wait_for(conn.send(b"x" * size), 5)
        with pytest.raises(qp2p.MessageTooLarge):
            await conn.request(b"y" * 5000, timeout=5)
        # the connection keeps serving; the limit counts header+dst+payload exactly
        await conn.send(b"p" * 1000, header=b"h" * 20, dst=b"d" * 4)
        msg = await asyncio.wait_for(accepted.recv(), 5)
        assert len(msg.header) + len(msg.dst) + len(msg.payload) == 1024
        assert accepted.stats()["streams_rejected"] == 0
        assert not conn.is_closed and not accepted.is_closed
    finally:
        await a.close()
        await b.close()


async def test_request_timeout_and_unanswered(pair: tuple[qp2p.Endpoint, qp2p.Endpoint]) -> None:
    a, b = pair
    conn, accepted = await connected(a, b)
    with pytest.raises(asyncio.TimeoutError):
        await conn.request(b"nobody answers", timeout=0.2)
    msg = await asyncio.wait_for(accepted.recv(), 5)
    assert msg.is_request
    await conn.send(b"still alive")
    plain = await asyncio.wait_for(accepted.recv(), 5)
    assert plain.payload == b"still alive"
    with pytest.raises(ValueError):
        await plain.reply(b"not a request")
    # replying to a request the requester gave up on fails cleanly or is dropped by the peer
    with contextlib.suppress(qp2p.MessageRejected):
        await asyncio.wait_for(msg.reply(b"late"), 2)


async def test_reply_once(pair: tuple[qp2p.Endpoint, qp2p.Endpoint]) -> None:
    a, b = pair
    conn, accepted = await connected(a, b)
    pending = asyncio.ensure_future(conn.request(b"q", timeout=5))
    msg = await asyncio.wait_for(accepted.recv(), 5)
    await msg.reply(b"answer")
    with pytest.raises(ValueError):
        await msg.reply(b"again")
    assert (await pending).payload == b"answer"


async def test_connect_to_dead_port_fails(impl: str) -> None:
    cfg = GIVE_UP_FAST
    async with await qp2p.Endpoint.bind(("127.0.0.1", 0), config=cfg) as ep:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(qp2p.ConnectionError) as info:
            await ep.connect_to(("127.0.0.1", 9))
        assert loop.time() - start < 3
        assert isinstance(info.value.__cause__, asyncio.TimeoutError)
        assert ep.connections() == []


async def test_dial_only_endpoint_refuses_incoming(impl: str) -> None:
    cfg = qp2p.Config(handshake_timeout=0.5, retry=qp2p.RetryConfig(max_elapsed_time=0.6))
    a = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=cfg)
    b = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=cfg, accept_incoming=False)
    try:
        with pytest.raises(qp2p.ConnectionError):
            await a.connect_to(b.local_addr)
        conn = await b.connect_to(a.local_addr)  # b can still dial out
        await conn.send(b"hi")
        assert (await asyncio.wait_for((await a.accept()).recv(), 5)).payload == b"hi"
    finally:
        await a.close()
        await b.close()


async def test_many_peers_one_endpoint(impl: str) -> None:
    hub = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST)
    peers = [await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST) for _ in range(5)]
    try:
        for i, peer in enumerate(peers):
            conn = await peer.connect_to(hub.local_addr)
            await conn.send(f"hello {i}".encode())
        got = set()
        for _ in peers:
            conn = await asyncio.wait_for(hub.accept(), 5)
            got.add((await asyncio.wait_for(conn.recv(), 5)).payload)
        assert got == {f"hello {i}".encode() for i in range(5)}
        assert len(hub.connections()) == 5
    finally:
        for ep in [hub, *peers]:
            await ep.close()


async def test_close_after_receiving_lets_last_send_succeed(
    pair: tuple[qp2p.Endpoint, qp2p.Endpoint],
) -> None:
    """The closing side acknowledges what it received before closing, so the peer's last
    send() returns instead of failing with the close."""
    a, b = pair
    for i in range(10):
        conn = await a.connect_to(b.local_addr)
        accepted = await asyncio.wait_for(b.accept(), 5)
        sending = asyncio.ensure_future(accepted.send(b"last %d" % i))
        assert (await asyncio.wait_for(conn.recv(), 5)).payload == b"last %d" % i
        await conn.close("got it")
        await asyncio.wait_for(sending, 5)  # returned: the peer acknowledged it


async def test_ipv6_loopback(impl: str) -> None:
    try:
        a = await qp2p.Endpoint.bind(("::1", 0), config=FAST)
    except OSError as exc:  # pragma: no cover - a host without IPv6
        pytest.skip(f"no IPv6 loopback here: {exc}")
    b = await qp2p.Endpoint.bind(("::1", 0), config=FAST)
    try:
        conn = await a.connect_to(("::1", b.local_addr[1]))
        accepted = await asyncio.wait_for(b.accept(), 5)
        assert accepted.remote_addr == a.local_addr == ("::1", a.local_addr[1])
        await conn.send(b"over v6")
        assert (await asyncio.wait_for(accepted.recv(), 5)).payload == b"over v6"
        assert await b.connect_to(a.local_addr) is accepted
        assert await a.discover_public_addr(b.local_addr) == a.local_addr
    finally:
        await a.close()
        await b.close()


#: Where the per-stream state of a connection lives: qp2p and the QUIC libraries.
_LIBRARIES = (str(Path(qp2p.__file__).parent), "/qh3/", "/aioquic/")


def _library_bytes(snapshot: tracemalloc.Snapshot) -> int:
    """Bytes traced to allocations in qp2p's or a QUIC library's files."""
    return sum(
        stat.size for stat in snapshot.statistics("filename")
        if any(part in stat.traceback[0].filename for part in _LIBRARIES)
    )


async def test_long_lived_connection_keeps_no_state_per_stream_ever_used(
    pair: tuple[qp2p.Endpoint, qp2p.Endpoint],
) -> None:
    """Thousands of messages on one connection, both ways, unidirectional and
    request/response: what the engines keep per stream stays bounded by the streams
    that may be open (each once its message is done, by the engine's own count), and
    the memory qp2p and the QUIC library hold stops growing (tracemalloc). qh3's facade
    kept every local stream id (and qp2p's send bookkeeping every request and reply):
    a few hundred KiB per 5,000 messages."""
    a, b = pair
    conn, accepted = await connected(a, b)

    async def serve(receiver: qp2p.Connection) -> None:
        while True:
            message = await receiver.recv()
            if message.is_request:
                await message.reply(message.payload[::-1])

    async def burst(count: int) -> None:
        for start in range(0, count, 100):
            ops = []
            for i in range(start, min(count, start + 100)):
                sender = (conn, accepted)[i % 2]
                ops.append(sender.send(b"m%d" % i) if i % 4 < 2 else sender.request(b"r%d" % i))
            results = await asyncio.wait_for(asyncio.gather(*ops), 30)
            assert [r.payload for r in results if r is not None] == [
                (b"r%d" % i)[::-1] for i in range(start, min(count, start + 100)) if i % 4 >= 2
            ]

    serving = [asyncio.ensure_future(serve(c)) for c in (conn, accepted)]
    started = not tracemalloc.is_tracing()
    if started:
        tracemalloc.start()
    try:
        await burst(1000)  # warm-up: the long-lived structures reach their sizes
        before = _library_bytes(tracemalloc.take_snapshot())
        await burst(4000)
        after = _library_bytes(tracemalloc.take_snapshot())
    finally:
        if started:
            tracemalloc.stop()
        for task in serving:
            task.cancel()
    # under 8 bytes a message: any entry kept per stream costs more (its int id alone
    # 32); bounded state moves by a few KiB either way (measured: -10 to +12 KiB)
    assert after - before < 4000 * 8, (before, after)
    limit = FAST.max_concurrent_bidi_streams + FAST.max_concurrent_uni_streams
    for side in (conn, accepted):
        assert side.debug_snapshot()["tracked_streams"] <= limit


async def test_close_takes_effect_at_once(impl: str) -> None:
    """From the moment ``close()`` is called (before its work ran), the endpoint is closed:
    no new dial or accept starts."""
    ep = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST)
    closing = asyncio.ensure_future(ep.close())
    await asyncio.sleep(0)  # close() ran up to its first wait; its work did not run yet
    assert ep.is_closed
    with pytest.raises(qp2p.EndpointClosed):
        await ep.connect_to(("127.0.0.1", 9))
    with pytest.raises(qp2p.EndpointClosed):
        await ep.accept()
    await closing
