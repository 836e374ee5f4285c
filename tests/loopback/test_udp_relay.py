"""Self-tests of the impairment relay (tests/support/udp_relay.py) on loopback, with plain
UDP sockets: delay, jitter, reordering, duplication, loss and its command line. (The relay
inside namespaces with kernel loss: ``tests/netns/test_netlab.py``.) Async tests run under
asyncio and uvloop: tests/conftest.py's loop factories."""

from __future__ import annotations

import asyncio
import json
import socket
import statistics
import sys
import time

import pytest

from tests.support.paths import SUPPORT
from tests.support.udp_echo import client_socket, echo_server, round_trips
from tests.support.udp_relay import UdpRelay, set_big_buffers


@pytest.mark.asyncio
async def test_relay_adds_configured_delay_each_way() -> None:
    st, _ = await echo_server()
    async with UdpRelay(("127.0.0.1", 0), st.get_extra_info("sockname"),
                        delay_ms=25) as relay:
        ct, client = await client_socket(relay.address)
        rtts = await round_trips(client, ct, 10)
        assert min(rtts) >= 50 and statistics.median(rtts) < 120, rtts
        relay.set_impairment("down", delay_ms=0)  # only client -> target delayed now
        rtts = await round_trips(client, ct, 10)
        assert min(rtts) >= 25 and statistics.median(rtts) < 50, rtts
        assert relay.upstream.sent == relay.downstream.sent == 20
        ct.close()
    st.close()


class _Stamper(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.one_way: list[float] = []

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.one_way.append((time.monotonic() - float(data)) * 1000)


@pytest.mark.asyncio
async def test_relay_never_delivers_early() -> None:
    """Per packet, in bursts: at least delay - jitter (loop timers can fire early; the
    relay must not)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    set_big_buffers(sock)
    st, stamper = await loop.create_datagram_endpoint(_Stamper, sock=sock)
    async with UdpRelay(("127.0.0.1", 0), sock.getsockname(), delay_ms=4,
                        jitter_ms=2.5) as relay:
        ct, _ = await client_socket(relay.address)
        for i in range(200):
            ct.sendto(repr(time.monotonic()).encode())
            if i % 10 == 9:
                await asyncio.sleep(0.0005)
        while len(stamper.one_way) < 200:
            await asyncio.sleep(0.01)
        assert min(stamper.one_way) >= 1.5, sorted(stamper.one_way)[:5]
        ct.close()
    st.close()


async def _through_relay(n: int, **impairment: float) -> tuple[list[int], UdpRelay]:
    """Send ``n`` numbered datagrams client -> target through a relay impairing only that
    way; return the sequence numbers in arrival order, and the (closed) relay."""
    st, echo = await echo_server()
    async with UdpRelay(("127.0.0.1", 0), st.get_extra_info("sockname"), seed=7,
                        **impairment) as relay:
        relay.set_impairment("down", delay_ms=0, jitter_ms=0, reorder=0, duplicate=0)
        ct, _ = await client_socket(relay.address)
        for i in range(n):
            ct.sendto(b"%d" % i)
            if i % 20 == 19:
                await asyncio.sleep(0.001)
        deadline = time.monotonic() + 3
        while relay.stats()["in_flight"] or len(echo.got) < n:
            assert time.monotonic() < deadline, relay.stats()
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.05)
        ct.close()
    st.close()
    return [int(d) for d, _ in echo.got], relay


def _late(seqs: list[int]) -> int:
    """Packets that arrive after a higher-numbered one."""
    late, top = 0, -1
    for x in seqs:
        if x < top:
            late += 1
        top = max(top, x)
    return late


@pytest.mark.asyncio
async def test_relay_reorders_and_duplicates() -> None:
    n = 600
    seqs, relay = await _through_relay(n, delay_ms=5, reorder=0.1, duplicate=0.05)
    up = relay.upstream
    assert up.received == n and up.dropped == 0
    assert sorted(set(seqs)) == list(range(n))                 # nothing lost
    assert len(seqs) == n + up.duplicated == up.sent           # duplicates delivered
    assert 10 <= up.duplicated <= 55, up.duplicated
    assert 30 <= up.reordered <= 95, up.reordered
    # each packet held back an extra delay is overtaken by those sent meanwhile
    assert _late(seqs) >= up.reordered // 2, (_late(seqs), up.reordered)
    # jitter alone reorders too (on uvloop only by whole milliseconds: timer resolution)
    seqs, relay = await _through_relay(n, delay_ms=5, jitter_ms=3)
    assert relay.upstream.reordered == 0 and sorted(seqs) == list(range(n))
    assert _late(seqs) >= 20, _late(seqs)


@pytest.mark.asyncio
async def test_relay_loss_and_multiple_clients() -> None:
    st, echo = await echo_server()
    async with UdpRelay(("127.0.0.1", 0), st.get_extra_info("sockname"), loss=0.2,
                        seed=1) as relay:
        relay.set_impairment("down", loss=0)
        (t1, c1), (t2, c2) = await client_socket(relay.address), await client_socket(relay.address)
        for _ in range(500):
            t1.sendto(b"one")
            t2.sendto(b"two")
        await asyncio.sleep(0.2)
        assert relay.clients == 2
        assert len({addr for _, addr in echo.got}) == 2  # the target sees two peers
        up = relay.upstream
        assert up.received == 1000 and up.sent == len(echo.got) == 1000 - up.dropped
        assert 120 <= up.dropped <= 280, up.dropped
        replies1 = [c1.queue.get_nowait() for _ in range(c1.queue.qsize())]
        replies2 = [c2.queue.get_nowait() for _ in range(c2.queue.qsize())]
        assert set(replies1) == {b"one"} and set(replies2) == {b"two"}  # no cross-talk
        assert len(replies1) + len(replies2) == len(echo.got)
        t1.close()
        t2.close()
    st.close()
    assert relay.stats()["clients"] == 0


@pytest.mark.one_loop  # the relay process runs its own asyncio loop anyway
@pytest.mark.asyncio
async def test_relay_command_line() -> None:
    st, _ = await echo_server()
    port = st.get_extra_info("sockname")[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(SUPPORT / "udp_relay.py"), "--listen", "127.0.0.1:0",
        "--target", f"127.0.0.1:{port}", "--delay-ms", "5", "--jitter-ms", "2",
        "--reorder", "0.1", "--duplicate", "0.01", "--loss", "0",
        stdout=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
        assert line.startswith("listening on 127.0.0.1:"), line
        relay_port = int(line.split()[2].rsplit(":", 1)[1])
        ct, client = await client_socket(("127.0.0.1", relay_port))
        rtts = await round_trips(client, ct, 3)
        assert min(rtts) >= 6, rtts  # 2 x (5 +- 2) ms
        ct.close()
    finally:
        proc.terminate()
        out, _ = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0
    stats = json.loads(out)
    assert stats["upstream"]["received"] == 3 and stats["downstream"]["sent"] >= 3
    st.close()
