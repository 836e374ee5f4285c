"""Scale, reduced (the full 1,000-connection run is ``make scale``, bench/scale.py): one
endpoint holds 150 connections from 150 client endpoints, each its own socket on its own
loopback address, all sending; meanwhile a fresh peer connects and gets a reply, and every
message arrives exactly once."""

from __future__ import annotations

import asyncio
import collections
import os

import pytest

import qp2p

pytestmark = pytest.mark.asyncio

CLIENTS = 150
MESSAGES = 4  # per client at least; they keep sending until the fresh peer is done
SIZES = (64, 1024)
DIALS_IN_FLIGHT = 32

CONFIG = qp2p.Config(
    idle_timeout=60.0,
    handshake_timeout=10.0,
    max_connections=CLIENTS + 10,
    retry=qp2p.RetryConfig(initial_interval=0.1, max_interval=1.0, max_elapsed_time=30.0),
)


def client_host(i: int) -> str:
    """A loopback address of its own per client (Linux routes all of 127/8 to lo), so the
    server's per-IP connection limit plays no part."""
    return f"127.20.{i // 250 + 1}.{i % 250 + 1}"


async def test_many_connections_all_sending_and_a_fresh_peer_gets_in(impl: str) -> None:
    server = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=CONFIG)
    clients: list[qp2p.Endpoint] = []
    received: dict[str, list[bytes]] = collections.defaultdict(list)
    serve_errors: list[BaseException] = []
    serving: set[asyncio.Task[None]] = set()

    async def serve(conn: qp2p.Connection) -> None:
        try:
            async for msg in conn:
                if msg.is_request:
                    await msg.reply(msg.payload[::-1])
                else:
                    received[conn.remote_addr[0]].append(msg.payload)
        except Exception as exc:  # asserted empty below
            serve_errors.append(exc)

    async def accept_all() -> None:
        async for conn in server.incoming():
            task = asyncio.ensure_future(serve(conn))
            serving.add(task)
            task.add_done_callback(serving.discard)

    acceptor = asyncio.ensure_future(accept_all())
    fresh: qp2p.Endpoint | None = None
    try:
        for i in range(CLIENTS):
            clients.append(await qp2p.Endpoint.bind((client_host(i), 0), config=CONFIG,
                                                    accept_incoming=False))
        assert {ep.implementation for ep in clients} == {impl}
        sem = asyncio.Semaphore(DIALS_IN_FLIGHT)

        async def dial(ep: qp2p.Endpoint) -> qp2p.Connection:
            async with sem:
                return await ep.connect_to(server.local_addr)

        conns = await asyncio.wait_for(asyncio.gather(*(dial(ep) for ep in clients)), 60)
        assert all(not c.is_closed for c in conns)
        assert len(server.connections()) == CLIENTS

        sent: dict[str, list[bytes]] = collections.defaultdict(list)
        fresh_done = asyncio.Event()
        fresh_started = asyncio.Event()

        async def sender(i: int, conn: qp2p.Connection) -> None:
            k = 0
            # at least MESSAGES each, and on until the fresh peer is through: it always
            # meets a server that is busy receiving
            while k < MESSAGES or not fresh_done.is_set():
                payload = f"{i}:{k}:".encode() + os.urandom(SIZES[k % len(SIZES)] - 12)
                await conn.send(payload)
                sent[conn.local_addr[0]].append(payload)
                k += 1
                if k == 1 and i == 0:
                    fresh_started.set()

        async def fresh_peer() -> bytes:
            nonlocal fresh
            await fresh_started.wait()  # traffic is flowing
            fresh = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=CONFIG,
                                             accept_incoming=False)
            try:
                conn = await fresh.connect_to(server.local_addr)
                reply = await conn.request(b"fresh peer", timeout=30)
                return reply.payload
            finally:
                fresh_done.set()

        senders = [asyncio.ensure_future(sender(i, c)) for i, c in enumerate(conns)]
        reply = await asyncio.wait_for(fresh_peer(), 60)
        await asyncio.wait_for(asyncio.gather(*senders), 60)
        assert reply == b"reep hserf"

        total = sum(len(v) for v in sent.values())
        assert total >= CLIENTS * MESSAGES
        # every send returned only once the server acknowledged it: all of them are read
        # (or about to be: give the readers a moment)
        for _ in range(100):
            if sum(len(v) for v in received.values()) >= total:
                break
            await asyncio.sleep(0.05)
        assert {h: sorted(v) for h, v in received.items()} == {
            h: sorted(v) for h, v in sent.items()
        }
        assert len(sent) == CLIENTS
        assert not serve_errors
        assert all(not c.is_closed for c in conns)
        assert len(server.connections()) == CLIENTS + 1  # the fresh peer too
    finally:
        acceptor.cancel()
        for task in list(serving):
            task.cancel()
        endpoints = [*clients, server] + ([fresh] if fresh is not None else [])
        await asyncio.gather(*(ep.close() for ep in endpoints), return_exceptions=True)
