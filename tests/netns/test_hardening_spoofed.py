"""A flood of genuine-looking Initials from spoofed sources (raw packets from another
network namespace) against one endpoint: no connection state for them, and an honest peer
still gets in (the other floods: ``tests/loopback/test_hardening.py``)."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

import qp2p
from tests.support.endpoints import FAST
from tests.support.netlab import Lab, two_hosts
from tests.support.raw_quic import client_initials

pytestmark = pytest.mark.asyncio


def nothing_open(server: qp2p.Endpoint) -> bool:
    """No connection, and no incoming handshake in progress, at ``server``."""
    snap = server.debug_snapshot()
    return not snap["live"] and not snap["half_open"]


def spoofed_udp(src: str, sport: int, dst: str, dport: int, payload: bytes) -> bytes:
    """An IPv4/UDP packet from an address we do not own (the kernel fills the checksum)."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0, 0, 64, socket.IPPROTO_UDP,
                     0, socket.inet_aton(src), socket.inet_aton(dst))
    return ip + udp


@pytest.mark.netns
@pytest.mark.one_loop
@pytest.mark.parametrize("mode", ["required", "under_load"])
async def test_spoofed_initial_flood_costs_no_state(lab: Lab, impl: str, mode: str) -> None:
    """10,000 genuine-looking Initials from spoofed sources (raw packets from another
    namespace, 198.19.128.0/17): with address validation required every one is answered
    with a stateless Retry and no connection state is kept; without it, Retry takes over
    once ``address_validation_threshold`` handshakes are open, and those time out."""
    net = two_hosts(lab)
    net.b.route("198.19.128.0/17", via=net.a)  # answers to the spoofed sources go to A
    threshold = 16
    cfg = qp2p.Config(require_address_validation=(mode == "required"),
                      address_validation_threshold=threshold, handshake_timeout=1.0)
    with net.b.entered():
        server = await qp2p.Endpoint.bind((net.b.addr, 0), config=cfg)
    raw = net.a.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        dst, dport = server.local_addr
        initials = client_initials(200, (dst, dport))
        count, peak_half_open = 10_000, 0
        flood_start = asyncio.get_running_loop().time()
        for i in range(count):
            src = f"198.19.{128 + i // 250}.{i % 250 + 1}"
            raw.sendto(spoofed_udp(src, 1024 + i, dst, dport, initials[i % len(initials)]),
                       (dst, 0))
            if i % 50 == 49:  # let the endpoint drain its socket
                await asyncio.sleep(0.001)
                peak_half_open = max(peak_half_open, len(server.debug_snapshot()["half_open"]))
        for _ in range(200):  # until the last datagrams are handled
            before = server.stats_counters["datagrams_received"]
            await asyncio.sleep(0.02)
            if server.stats_counters["datagrams_received"] == before:
                break
        flood_time = asyncio.get_running_loop().time() - flood_start
        stats = dict(server.stats_counters)
        print(f"\n[{impl}/{mode}] {count} spoofed Initials: received "
              f"{stats['datagrams_received']}, Retry sent {stats['retries_sent']}, "
              f"peak half-open {peak_half_open}, live now {len(server.debug_snapshot()['live'])}")
        assert stats["datagrams_received"] >= count // 2  # the flood did arrive
        if mode == "required":
            assert stats["retries_sent"] == stats["datagrams_received"]
            assert peak_half_open == 0 and nothing_open(server)
        else:
            assert 0 < peak_half_open <= threshold
            # the rest got a Retry, except replays of the open handshakes' own Initials;
            # half-open ones time out after handshake_timeout, so a flood that lasts
            # longer (a loaded machine) lets `threshold` new ones in per such window
            windows = 1 + int(flood_time // cfg.handshake_timeout)
            replays = threshold * windows * (count // len(initials))
            assert stats["retries_sent"] >= stats["datagrams_received"] - replays
            await asyncio.sleep(cfg.handshake_timeout + 0.3)
            assert nothing_open(server)  # the half-open timed out
        # an honest peer with a real address still gets in
        with net.a.entered():
            peer = await qp2p.Endpoint.bind((net.a.addr, 0), config=FAST)
        try:
            conn = await asyncio.wait_for(peer.connect_to(server.local_addr), 10)
            await conn.send(b"hello after the flood")
            got = await asyncio.wait_for(server.accept(), 5)
            assert (await asyncio.wait_for(got.recv(), 5)).payload == b"hello after the flood"
        finally:
            await peer.close()
    finally:
        raw.close()
        await server.close()
