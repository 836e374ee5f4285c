"""Fault tolerance on loopback: delay, jitter and reordering, and a total outage (our
userspace relay, ``tests/support/udp_relay.py``), and a killed peer process. (Random loss
in the kernel and NAT need namespaces: ``tests/netns/test_faults.py``.)"""

from __future__ import annotations

import asyncio
import os

import pytest

import qp2p
from tests.support.peers import PeerProcess
from tests.support.traffic import LOSSY, exchange
from tests.support.udp_relay import UdpRelay

pytestmark = [pytest.mark.asyncio, pytest.mark.one_loop]  # slow: uvloop only


async def test_nothing_lost_through_delay_jitter_reorder(impl: str) -> None:
    b = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=LOSSY)
    relay = UdpRelay(("127.0.0.1", 0), b.local_addr, delay_ms=25, jitter_ms=10, reorder=0.1)
    await relay.start()
    a = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=LOSSY)
    try:
        conn = await a.connect_to(relay.address)
        sent, arrived = await exchange(conn, b, 1000)
        assert sent == 1000
        stats = conn.stats()
        assert stats["rtt"] >= 0.045, stats  # ~50 ms RTT through the relay
        print(f"relay 50ms RTT +-10ms jitter, 10% reorder: delivered "
              f"{sum(arrived.values())}/{sent}; relay stats {relay.stats()}")
    finally:
        await a.close()
        relay.close()
        await b.close()


async def test_probes_keep_coming_through_a_long_outage(impl: str, engine_name: str) -> None:
    # An unanswered probe doubles the next probe's wait (RFC 9002's backoff). Uncapped,
    # nine unlucky probes in a row under 20 % loss each way wait ~28 s: longer than the
    # idle timeout, so a live connection died. qp2p caps the wait on aioquic
    # (engine.MAX_PROBE_INTERVAL); qh3's native core backs off on its own (README).
    capped = engine_name == "aioquic"
    b = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=LOSSY)
    relay = UdpRelay(("127.0.0.1", 0), b.local_addr)
    await relay.start()
    a = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=LOSSY)
    try:
        conn = await a.connect_to(relay.address)
        await conn.send(b"before")
        relay.set_impairment(loss=1.0)
        # enough in flight to fill a collapsed congestion window: probes must still go
        during = [i.to_bytes(2, "big") + os.urandom(2000) for i in range(50)]
        sending = asyncio.gather(*(conn.send(body) for body in during))
        loop = asyncio.get_running_loop()
        seen, last, gaps = relay.upstream.received, loop.time(), []
        end = last + 8.0
        while loop.time() < end:
            await asyncio.sleep(0.05)
            if relay.upstream.received != seen:
                seen, now = relay.upstream.received, loop.time()
                gaps.append(now - last)
                last = now
        gaps.append(loop.time() - last)
        if capped:
            assert max(gaps) < 2.5 * qp2p.engine.MAX_PROBE_INTERVAL, gaps
        else:  # doubling: the last probe went out about half the outage in
            assert max(gaps) > 2.5 * qp2p.engine.MAX_PROBE_INTERVAL, gaps
        relay.set_impairment(loss=0.0)
        await asyncio.wait_for(sending, 2 * qp2p.engine.MAX_PROBE_INTERVAL + 1 if capped else 20)
        accepted = await asyncio.wait_for(b.accept(), 1)
        got = [(await accepted.recv()).payload for _ in range(1 + len(during))]
        assert got[0] == b"before" and sorted(got[1:]) == during
    finally:
        await a.close()
        relay.close()
        await b.close()


async def test_killed_peer_is_noticed_and_redialled(impl: str) -> None:
    idle = 1.5
    cfg = qp2p.Config(idle_timeout=idle, handshake_timeout=2.0,
                      retry=qp2p.RetryConfig(initial_interval=0.1, max_elapsed_time=10.0))
    peer = PeerProcess("127.0.0.1", 0, idle)
    addr = peer.addr
    try:
        async with await qp2p.Endpoint.bind(("127.0.0.1", 0), config=cfg) as ep:
            conn = await ep.connect_to(addr)
            await conn.send(b"echo me")
            assert (await asyncio.wait_for(conn.recv(), 5)).payload == b"echo me"
            peer.kill()
            loop = asyncio.get_running_loop()
            start = loop.time()
            with pytest.raises(qp2p.ConnectionClosed):
                await asyncio.wait_for(conn.recv(), idle * 3)
            detected = loop.time() - start
            print(f"killed peer noticed after {detected:.2f}s (idle_timeout {idle}s)")
            assert detected <= idle + 1.0
            assert ep.connections() == []
            peer = PeerProcess("127.0.0.1", addr[1], idle)  # restart on the same port
            assert peer.addr == addr
            conn2 = await ep.connect_to(addr)
            assert conn2 is not conn
            reply = await conn2.request(b"back again", timeout=5)
            assert reply.payload == b"back again"
    finally:
        peer.kill()
