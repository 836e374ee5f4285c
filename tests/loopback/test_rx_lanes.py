"""How the endpoint schedules what it read ahead (issue 16, ``bench/scale.py --clients
10000``): a backlog of queued datagrams is handled a bounded number per loop turn, so the
socket is read every turn; a just-established connection's first exchange overtakes that
backlog as its handshake did. The backlog is junk for a known connection ID (read and
queued like any established connection's traffic, dropped by the engine), the per-turn
budget is lowered so that one process on loopback builds one."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import sys
import time
from collections.abc import Iterator

import pytest

import qp2p
from qp2p import endpoint as endpoint_mod
from tests.support.endpoints import FAST
from tests.support.raw_quic import attacker, honest_exchange

pytestmark = pytest.mark.asyncio


@contextlib.contextmanager
def junk_sender() -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 2**20)
    sock.setblocking(False)
    try:
        yield sock
    finally:
        sock.close()


def junk_for(dcid: bytes) -> bytes:
    """A short-header packet for ``dcid`` that no key opens."""
    return bytes([0x40]) + dcid + bytes(600 - 1 - len(dcid))


def send_burst(sock: socket.socket, data: bytes, addr: tuple[str, int], count: int) -> None:
    for _ in range(count):
        with contextlib.suppress(BlockingIOError):
            sock.sendto(data, addr)


async def queue_backlog(server: qp2p.Endpoint, count: int) -> None:
    """Send ``count`` junk datagrams for the server's only connection and let the server
    read them (into its queue, or dropped)."""
    (dcid, *_), = server.debug_snapshot()["cids"].values()
    with junk_sender() as sock:
        send_burst(sock, junk_for(dcid), server.local_addr, count)
    for _ in range(20):
        await asyncio.sleep(0)


async def test_a_backlog_is_handled_a_bounded_number_per_loop_turn(
    impl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While a backlog drains and more keeps arriving, every loop turn handles at most
    ``RX_DRAIN_PER_TURN`` of it (twice that when the queue ran dry in the turn and the
    socket refilled it): each readable event must not start one more chain of drains."""
    per_turn = 4
    monkeypatch.setattr(endpoint_mod, "RX_DRAIN_PER_TURN", per_turn)
    loop = asyncio.get_running_loop()
    async with await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST) as server:
        async with attacker(server) as client:
            assert client is not None
            (dcid, *_), = server.debug_snapshot()["cids"].values()
            junk = junk_for(dcid)
            handled: list[int] = []  # datagrams handled so far, once per loop turn
            sampling = True

            def sample() -> None:  # rescheduled from itself: runs once per loop turn
                handled.append(server.stats_counters["datagrams_received"])
                if sampling:
                    loop.call_soon(sample)

            with junk_sender() as sock:
                loop.call_soon(sample)
                queued_at_most = 0
                for _ in range(20):
                    send_burst(sock, junk, server.local_addr, 100)
                    await asyncio.sleep(0)
                    queued_at_most = max(queued_at_most, server.debug_snapshot()["rx_queue"])
                while server.debug_snapshot()["rx_queue"]:
                    await asyncio.sleep(0)
                sampling = False
            assert queued_at_most > 10 * per_turn, queued_at_most  # there was a backlog
            per_turn_seen = max(b - a for a, b in itertools.pairwise(handled))
            # the attacker connection's own packets (ACKs) may share a turn: a few more
            assert per_turn_seen <= 2 * per_turn + 4, per_turn_seen
        await honest_exchange(server, rounds=2)


@pytest.mark.parametrize("queue_full", [False, True], ids=["queue", "queue-full"])
async def test_a_fresh_connection_overtakes_the_backlog(
    impl: str, monkeypatch: pytest.MonkeyPatch, queue_full: bool
) -> None:
    """A fresh peer connects and makes a request while thousands of datagrams wait in the
    server's queue, handled one per loop turn: its handshake and then its first request
    (the fresh lane) are handled before the backlog, which is still mostly there when the
    reply arrives. With the queue full (``queue-full``: more was sent than it holds) the
    excess is read and dropped, not left in the kernel in front of the handshake."""
    monkeypatch.setattr(endpoint_mod, "RX_DRAIN_PER_TURN", 1)
    backlog = 3000
    queue_max = 500 if queue_full else endpoint_mod.RX_QUEUE_MAX
    monkeypatch.setattr(endpoint_mod, "RX_QUEUE_MAX", queue_max)
    async with (
        await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST) as server,
        attacker(server) as client,
    ):
        assert client is not None
        await queue_backlog(server, backlog)
        queued = server.debug_snapshot()["rx_queue"]
        # (the attacker's connection is fresh too: its first datagrams take that lane)
        assert min(queue_max, backlog) // 2 < queued <= queue_max + endpoint_mod.RX_FRESH_DATAGRAMS
        if queue_full:
            assert server.stats_counters["rx_queue_dropped"] >= backlog - queue_max - 64

        async def echo(conn: qp2p.Connection) -> None:
            async for msg in conn:
                if msg.is_request:
                    await msg.reply(msg.payload)

        async def serve() -> None:
            async for conn in server.incoming():  # the attacker's too
                echoes.add(asyncio.ensure_future(echo(conn)))

        echoes: set[asyncio.Future[None]] = set()
        serving = asyncio.ensure_future(serve())
        handled_before = server.stats_counters["datagrams_received"]
        try:
            async with await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST) as peer:
                conn = await asyncio.wait_for(peer.connect_to(server.local_addr), 10)
                reply = await asyncio.wait_for(conn.request(b"first"), 10)
                handled = server.stats_counters["datagrams_received"] - handled_before
        finally:
            for task in (serving, *echoes):
                task.cancel()
        assert reply.payload == b"first"
        # it did not wait behind the backlog: most of it was not handled yet
        assert handled < queued // 3, (handled, queued)


def may_exceed_buffer_caps() -> bool:
    """Whether this process has CAP_NET_ADMIN (what SO_RCVBUFFORCE needs)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                return bool(int(line.split()[1], 16) >> 12 & 1)
    return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux's buffer caps")
async def test_socket_buffers_exceed_the_system_cap_where_permitted() -> None:
    """A busy endpoint's kernel queue is its socket buffer: asked beyond the system's cap
    (``net.core.rmem_max``), a privileged process gets it all, any other the cap, with
    no error either way."""
    with open("/proc/sys/net/core/rmem_max") as f:
        cap = int(f.read())
    want = 2 * cap
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        endpoint_mod.size_buffers(sock, want)
        got = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)  # Linux doubles it
    finally:
        sock.close()
    if may_exceed_buffer_caps():
        assert got >= want, (got, want)
    else:
        assert got <= 2 * cap, (got, cap)


async def test_queued_datagrams_that_waited_too_long_are_dropped(
    impl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An endpoint behind its traffic drops what waited longer than
    ``RX_QUEUE_MAX_DELAY`` instead of answering it seconds late (its peers would take
    seconds as their RTT); what it reads afterwards is handled."""
    monkeypatch.setattr(endpoint_mod, "RX_DRAIN_PER_TURN", 1)
    monkeypatch.setattr(endpoint_mod, "RX_QUEUE_MAX_DELAY", 0.05)
    backlog = 2000
    async with (
        await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST) as server,
        attacker(server) as client,
    ):
        assert client is not None
        await queue_backlog(server, backlog)
        assert server.debug_snapshot()["rx_queue"] > backlog // 2
        assert server.stats_counters["rx_queue_dropped"] == 0
        time.sleep(0.1)  # the loop blocked on purpose: everything queued is now late
        for _ in range(3):
            await asyncio.sleep(0)
        assert server.debug_snapshot()["rx_queue"] <= endpoint_mod.RX_FRESH_DATAGRAMS
        assert server.stats_counters["rx_queue_dropped"] > backlog // 2
        await honest_exchange(server, rounds=2)
