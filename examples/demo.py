"""The ``make demo`` program: three peers on loopback exchanging messages.

alice, bob and carol each bind one Endpoint (one UDP socket that dials and accepts).
They send each other messages (one QUIC stream each), ask and answer a request, send
an unreliable datagram, share pooled connections, and close with a reason the other
side sees. Everything is printed as it happens; it takes well under a second.

Run: python examples/demo.py   (or: make demo)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Coroutine
from typing import Any

import qp2p

NAMES: dict[qp2p.PeerId | None, str] = {}


class Peer:
    """One named node: serves every connection, whoever dialled it."""

    def __init__(self, name: str, endpoint: qp2p.Endpoint) -> None:
        self.name = name
        self.ep = endpoint
        self.received: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self.closed: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self._handled: set[qp2p.Connection] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self.connect_calls = 0
        NAMES[endpoint.peer_id] = name

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def serve(self) -> None:
        async for conn in self.ep.incoming():
            self.handle(conn)

    async def connect(self, other: Peer) -> qp2p.Connection:
        self.connect_calls += 1
        conn = await self.ep.connect_to(other.ep.local_addr)
        self.handle(conn)  # the pool may hand back a connection we accepted earlier
        return conn

    def handle(self, conn: qp2p.Connection) -> None:
        if conn not in self._handled:
            self._handled.add(conn)
            self._spawn(self._messages(conn))
            self._spawn(self._datagrams(conn))

    async def _messages(self, conn: qp2p.Connection) -> None:
        who = NAMES.get(conn.peer_id, "?")
        with contextlib.suppress(qp2p.ConnectionClosed):
            async for msg in conn:
                text = msg.payload.decode()
                if msg.is_request:
                    a, b = text.split("*")
                    answer = str(int(a) * int(b))
                    say(f"{self.name:>5} answers {who}'s request {text!r} with {answer!r}")
                    await msg.reply(answer.encode())
                else:
                    say(f"{self.name:>5} received {text!r} from {who}")
                    await self.received.put((who, text))
        try:
            await conn.recv()
        except qp2p.ConnectionClosed as exc:
            await self.closed.put((who, exc.reason))

    async def _datagrams(self, conn: qp2p.Connection) -> None:
        who = NAMES.get(conn.peer_id, "?")
        with contextlib.suppress(qp2p.ConnectionClosed):
            while True:
                data = await conn.recv_datagram()
                say(f"{self.name:>5} received datagram {data.decode()!r} from {who}")
                await self.received.put((who, data.decode()))


START = time.perf_counter()


def say(text: str) -> None:
    print(f"  [{(time.perf_counter() - START) * 1000:6.1f} ms] {text}", flush=True)


def step(title: str) -> None:
    print(f"\n{title}", flush=True)


async def main() -> None:
    alice = Peer("alice", await qp2p.Endpoint.bind(("127.0.0.1", 0)))
    bob = Peer("bob", await qp2p.Endpoint.bind(("127.0.0.1", 0)))
    carol = Peer("carol", await qp2p.Endpoint.bind(("127.0.0.1", 0)))
    loop_name = (
        "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"
    )
    print(f"qp2p demo: three peers on loopback ({qp2p.implementation} fast path, {loop_name} loop)")
    for p in (alice, bob, carol):
        host, port = p.ep.local_addr[:2]
        print(f"  {p.name:<5} {host}:{port:<5}  peer id {p.ep.peer_id}")
    servers = [asyncio.ensure_future(p.serve()) for p in (alice, bob, carol)]

    step("1. messages: one QUIC stream each; send() returns once the receiver acknowledged")
    dialled: dict[tuple[str, str], qp2p.Connection] = {}
    for sender, receiver, text in [
        (alice, bob, "hi bob, it's alice"),
        (bob, carol, "hello carol, bob here"),
        (carol, alice, "hey alice, carol says hi"),
    ]:
        conn = dialled[sender.name, receiver.name] = await sender.connect(receiver)
        say(f"{sender.name:>5} sends {text!r} to {receiver.name}")
        await conn.send(text.encode())
        assert await asyncio.wait_for(receiver.received.get(), 5) == (sender.name, text)

    step("2. request/reply: the answer comes back on the request's own stream")
    conn = await alice.connect(carol)
    reply = await conn.request(b"6 * 7", timeout=5)
    say(f"{'alice':>5} got the reply {reply.payload.decode()!r} from carol")
    assert reply.payload == b"42"

    step("3. datagram: unreliable and unordered (RFC 9221), for state that is soon stale")
    conn = await bob.connect(alice)
    for attempt in range(5):  # loopback rarely drops one, but a datagram may be lost
        conn.send_datagram(b"position 12,34")
        say(f"{'bob':>5} sent datagram 'position 12,34' to alice")
        try:
            assert await asyncio.wait_for(alice.received.get(), 1) == ("bob", "position 12,34")
            break
        except asyncio.TimeoutError:
            say(f"{'bob':>5}: datagram {attempt + 1} lost, sending another")

    step("4. the pool: one connection per pair of peers, whoever dialled it")
    first = await alice.connect(bob)
    same = first is dialled["alice", "bob"]
    say(f"alice.connect_to(bob) again: the connection from step 1? {same}")
    calls = sum(p.connect_calls for p in (alice, bob, carol))
    pairs = {
        frozenset((p.name, NAMES[c.peer_id]))
        for p in (alice, bob, carol)
        for c in p.ep.connections()
    }
    say(f"{calls} connect_to calls so far, {len(pairs)} QUIC connections in all")
    for p in (alice, bob, carol):
        for c in p.ep.connections():
            rtt = c.stats()["rtt"]
            say(
                f"{p.name:>5} <-> {NAMES.get(c.peer_id, '?'):<5} rtt "
                f"{rtt * 1000 if rtt else float('nan'):.2f} ms"
            )

    step("5. closing: the peer sees the reason")
    await first.close("alice is going offline")
    who, reason = await asyncio.wait_for(bob.closed.get(), 5)
    say(f"{'bob':>5} saw the connection from {who} close: {reason!r}")
    for p in (alice, bob, carol):
        await p.ep.close()
    for server in servers:
        await server  # incoming() ends when its endpoint closes
    print(f"\ndone in {time.perf_counter() - START:.2f} s")


if __name__ == "__main__":
    try:
        import uvloop
    except ImportError:
        asyncio.run(main())
    else:
        uvloop.run(main())
