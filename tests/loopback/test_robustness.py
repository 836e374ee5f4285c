"""Edge cases an independent review found: bad addresses, concurrent waiters, closing with
work in flight, retryable replies, config bounds (both implementations x both loops)."""

from __future__ import annotations

import array
import asyncio
import socket
import traceback

import pytest

import qp2p
from tests.support.endpoints import FAST, connected

pytestmark = pytest.mark.asyncio


async def test_out_of_range_port_fails_cleanly(pair: tuple[qp2p.Endpoint, qp2p.Endpoint]) -> None:
    a, b = pair
    for port in (70000, 0, -1):
        with pytest.raises(qp2p.ConnectionError):
            await a.connect_to(("127.0.0.1", port))
        assert not await a.is_reachable(("127.0.0.1", port), timeout=0.5)
    with pytest.raises(qp2p.ConnectionError):
        await a.connect_to(("name.invalid", 5000))
    # the endpoint keeps serving
    conn = await a.connect_to(b.local_addr)
    await conn.send(b"fine")
    assert (await asyncio.wait_for((await b.accept()).recv(), 5)).payload == b"fine"


async def test_concurrent_accept_and_recv_waiters(
    pair: tuple[qp2p.Endpoint, qp2p.Endpoint],
) -> None:
    a, b = pair
    accepts = [asyncio.ensure_future(b.accept()) for _ in range(2)]
    await asyncio.sleep(0.05)
    c = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST)
    try:
        conn_a = await a.connect_to(b.local_addr)
        conn_c = await c.connect_to(b.local_addr)
        got = await asyncio.wait_for(asyncio.gather(*accepts), 5)
        assert {g.remote_addr for g in got} == {a.local_addr, c.local_addr}
        receivers = [asyncio.ensure_future(conn_a.recv()) for _ in range(2)]
        datagrams = [asyncio.ensure_future(conn_c.recv_datagram()) for _ in range(2)]
        await asyncio.sleep(0.05)
        await conn_a.close("bye")
        await conn_c.close("bye")
        for task in (*receivers, *datagrams):
            with pytest.raises(qp2p.ConnectionClosed):
                await asyncio.wait_for(task, 2)
    finally:
        await c.close()


async def test_close_fails_dials_in_flight(impl: str) -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    ep = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST)
    try:
        dial = asyncio.ensure_future(ep.connect_to(silent.getsockname()))
        probe = asyncio.ensure_future(ep.is_reachable(silent.getsockname()))
        await asyncio.sleep(0.2)
        loop = asyncio.get_running_loop()
        start = loop.time()
        await ep.close()
        with pytest.raises(qp2p.EndpointClosed):
            await asyncio.wait_for(dial, 2)
        assert await asyncio.wait_for(probe, 2) is False
        assert loop.time() - start < 1.0
    finally:
        silent.close()


async def test_accept_after_close_and_queue_hygiene(impl: str) -> None:
    server = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST)
    client = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST)
    try:
        for _ in range(3):  # connections the server never accepts, closed by the client
            conn = await client.connect_to(server.local_addr)
            await conn.close("never mind")
        for _ in range(50):
            if not server.debug_snapshot()["accept_queue"]:
                break
            await asyncio.sleep(0.02)
        assert not server.debug_snapshot()["accept_queue"]  # closed and nothing to read: not kept
        await client.connect_to(server.local_addr)  # one more, left in the queue
        await asyncio.sleep(0.1)
        await server.close()
        with pytest.raises(qp2p.EndpointClosed):
            await server.accept()
        with pytest.raises(qp2p.EndpointClosed):
            server.connections()
    finally:
        await client.close()
        await server.close()


async def test_is_reachable_does_not_close_shared_connections(
    pair: tuple[qp2p.Endpoint, qp2p.Endpoint],
) -> None:
    a, b = pair
    probe = asyncio.ensure_future(a.is_reachable(b.local_addr, timeout=2))
    conn = await a.connect_to(b.local_addr)
    assert await probe
    await asyncio.sleep(0.1)
    assert not conn.is_closed
    await conn.send(b"still usable")


async def test_connect_to_any_bad_entries_do_not_stop_the_race(
    pair: tuple[qp2p.Endpoint, qp2p.Endpoint],
) -> None:
    a, b = pair
    conn = await a.connect_to_any([("name.invalid", 5000), ("::1", 5000), b.local_addr])
    assert conn.remote_addr == b.local_addr
    assert a.connections() == [conn]
    with pytest.raises(qp2p.ConnectionError) as info:
        await a.connect_to_any([("name.invalid", 5000), ("127.0.0.1", 70000)])
    assert set(info.value.errors) == {("name.invalid", 5000), ("127.0.0.1", 70000)}


async def test_failed_reply_can_be_retried(pair: tuple[qp2p.Endpoint, qp2p.Endpoint]) -> None:
    a, b = pair
    conn, accepted = await connected(a, b)
    answer = asyncio.ensure_future(conn.request(b"q", timeout=5))
    msg = await asyncio.wait_for(accepted.recv(), 5)
    with pytest.raises(ValueError):
        await msg.reply(b"")  # invalid: does not use up the reply
    with pytest.raises(qp2p.MessageTooLarge):
        await msg.reply(b"x" * (FAST.max_message_size + 1))
    await msg.reply(b"a")
    assert (await answer).payload == b"a"


async def test_closed_errors_stay_small(pair: tuple[qp2p.Endpoint, qp2p.Endpoint]) -> None:
    a, b = pair
    conn, _ = await connected(a, b)
    await conn.close("done")
    depth = 0
    for _ in range(200):
        try:
            await conn.send(b"x")
        except qp2p.ConnectionClosed as exc:
            assert exc.reason == "done"
            depth = len(traceback.extract_tb(exc.__traceback__))
    assert depth < 10


async def test_any_buffer_is_a_payload(pair: tuple[qp2p.Endpoint, qp2p.Endpoint]) -> None:
    a, b = pair
    conn, accepted = await connected(a, b)
    await conn.send(array.array("B", b"abc"), header=bytearray(b"h"), dst=memoryview(b"d"))
    msg = await asyncio.wait_for(accepted.recv(), 5)
    assert (msg.payload, msg.header, msg.dst) == (b"abc", b"h", b"d")
    with pytest.raises(TypeError):
        await conn.send("text")  # type: ignore[arg-type]


async def test_string_addresses_and_text_peer_ids(impl: str) -> None:
    a = await qp2p.Endpoint.bind("127.0.0.1:0", config=FAST)
    b = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST)
    try:
        host, port = b.local_addr
        conn = await a.connect_to(f"{host}:{port}", expect_peer_id=str(b.peer_id))
        assert conn.peer_id == b.peer_id
        assert await a.connect_to(b.local_addr) is conn
        with pytest.raises(qp2p.PeerAuthenticationError):
            await a.connect_to(b.local_addr, expect_peer_id=str(qp2p.Identity.generate().peer_id))
        with pytest.raises(ValueError):
            await a.connect_to(b.local_addr, expect_peer_id="not a peer id")
        with pytest.raises(qp2p.ConnectionError):
            await a.connect_to("no-port-here")
        with pytest.raises(TypeError):
            await qp2p.Endpoint.bind(5000)  # type: ignore[arg-type]
    finally:
        await a.close()
        await b.close()


async def test_abandoned_dial_stops_and_logs_nothing(
    impl: str, caplog: pytest.LogCaptureFixture
) -> None:
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    silent.setblocking(False)
    ep = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST)
    try:
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(ep.connect_to(silent.getsockname()), 0.3)
        await asyncio.sleep(0.1)
        assert ep.debug_snapshot()["dials_in_flight"] == 0  # cancelled with its last caller
        while True:  # drain what was sent before the cancel
            try:
                silent.recv(2048)
            except BlockingIOError:
                break
        await asyncio.sleep(1.0)
        with pytest.raises(BlockingIOError):
            silent.recv(2048)  # no more handshake packets
    finally:
        await ep.close()
        silent.close()
    assert "never retrieved" not in caplog.text


async def test_introductions_only_from_a_rendezvous_we_registered_with(
    pair: tuple[qp2p.Endpoint, qp2p.Endpoint],
) -> None:
    """An INTRODUCTION makes the receiver probe an address; only a rendezvous it
    registered with may ask (not a peer that dialled it, not one it merely dialled), or
    any peer could aim its probes anywhere."""
    from qp2p import wire

    a, b = pair
    sink = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sink.bind(("127.0.0.1", 0))
    sink.setblocking(False)
    target = wire.format_addr(sink.getsockname())
    try:
        # b dialled a: a must ignore b's introduction
        from_b, _ = await connected(b, a)
        from_b.send_control(wire.KIND_INTRODUCTION, target)
        await asyncio.sleep(0.5)
        with pytest.raises(BlockingIOError):
            sink.recv(2048)
        # a merely dials c: c's introduction is ignored too
        c = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST)
        try:
            to_c, from_a = await connected(a, c)
            from_a.send_control(wire.KIND_INTRODUCTION, target)
            await asyncio.sleep(0.5)
            with pytest.raises(BlockingIOError):
                sink.recv(2048)
            # a registers with c (its rendezvous): c's introduction is honoured
            assert await a.register_with(c.local_addr) is to_c
            from_a.send_control(wire.KIND_INTRODUCTION, target)
            for _ in range(100):
                try:
                    assert sink.recv(2048)
                    break
                except BlockingIOError:
                    await asyncio.sleep(0.01)
            else:
                pytest.fail("no probe arrived")
        finally:
            await c.close()
    finally:
        sink.close()
