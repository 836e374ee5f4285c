"""Fuzzed datagrams over real UDP to a live endpoint (the parsers alone are fuzzed in
``tests/unit/test_fuzz.py``): random bytes and damaged real packets, and client Initials
that decrypt around a damaged ClientHello; the endpoint must log no error, keep no state,
and keep serving a real peer."""

from __future__ import annotations

import asyncio
import logging
import random
import socket
import time
from collections.abc import Sequence

import pytest

import qp2p
from tests.support.endpoints import FAST, state_kept
from tests.support.packets import fuzz_datagrams, fuzzed_initials


async def blast(sock: socket.socket, endpoint: qp2p.Endpoint, packets: Sequence[bytes]) -> None:
    """Send ``packets`` to ``endpoint`` in small bursts (so the kernel drops none) and wait
    until the endpoint has read every one of them."""
    start = endpoint.stats_counters["datagrams_received"]
    for pos in range(0, len(packets), 32):
        burst = packets[pos : pos + 32]
        for packet in burst:
            sock.sendto(packet, endpoint.local_addr)
        deadline = time.monotonic() + 5
        while endpoint.stats_counters["datagrams_received"] < start + pos + len(burst):
            assert time.monotonic() < deadline, "the endpoint stopped reading datagrams"
            await asyncio.sleep(0.002)


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]


@pytest.mark.asyncio
@pytest.mark.parametrize("validation", [False, True], ids=["plain", "retry"])
async def test_fuzzed_datagrams_over_udp_leave_endpoint_serving(
    impl: str, validation: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    rng = random.Random(f"{impl}-{validation}")
    config = qp2p.Config(
        idle_timeout=FAST.idle_timeout, handshake_timeout=FAST.handshake_timeout,
        retry=FAST.retry, require_address_validation=validation,
    )
    fuzzer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fuzzer.bind(("127.0.0.1", 0))
    fuzzer.setblocking(False)
    try:
        async with await qp2p.Endpoint.bind(("127.0.0.1", 0), config=config) as server:
            junk = fuzz_datagrams(rng, 400)
            await blast(fuzzer, server, junk)
            # nothing was accepted, nothing is kept
            assert state_kept(server) == (0, 0)
            assert server.stats_counters["datagrams_received"] == len(junk)
            async with await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST) as peer:
                conn = await peer.connect_to(server.local_addr)
                accepted = await asyncio.wait_for(server.accept(), 5)
                await conn.send(b"before")
                assert (await asyncio.wait_for(accepted.recv(), 5)).payload == b"before"
                # now junk aimed at the live connection's own connection IDs
                cids = sorted(server.debug_snapshot()["cids"][accepted])
                assert cids
                await blast(fuzzer, server, fuzz_datagrams(rng, 300, cids))
                await blast(fuzzer, server, [
                    bytes([0x40 | rng.randrange(64)]) + rng.choice(cids)
                    + rng.randbytes(rng.randrange(0, 1300))
                    for _ in range(100)
                ])
                assert len(server.debug_snapshot()["live"]) == 1 and not accepted.is_closed
                await accepted.send(b"after, from the fuzzed side")
                got = await asyncio.wait_for(conn.recv(), 5)
                assert got.payload == b"after, from the fuzzed side"
                await conn.send(b"after")
                assert (await asyncio.wait_for(accepted.recv(), 5)).payload == b"after"
                assert accepted.stats()["streams_rejected"] == 0
    finally:
        fuzzer.close()
    assert errors_logged(caplog) == []


@pytest.mark.asyncio
async def test_fuzzed_decryptable_initials_leave_no_state(
    impl: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Damaged ClientHellos the endpoint can decrypt reach aioquic's TLS and frame parsers
    through the endpoint's handshake path: no error escapes, every half-open handshake
    they start is dropped again, and a real peer is served."""
    caplog.set_level(logging.WARNING)
    rng = random.Random(f"initials-{impl}")
    config = qp2p.Config(idle_timeout=FAST.idle_timeout, handshake_timeout=0.5, retry=FAST.retry)
    fuzzer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    fuzzer.bind(("127.0.0.1", 0))
    fuzzer.setblocking(False)
    try:
        async with await qp2p.Endpoint.bind(("127.0.0.1", 0), config=config) as server:
            junk = fuzzed_initials(rng, 200)
            await blast(fuzzer, server, junk)
            assert server.stats_counters["datagrams_received"] == len(junk)
            # they really were parsed: aioquic refused some of them for what was inside
            # (and says so in its log); qh3's core opened handshakes for the decryptable ones
            if server.engine == "aioquic":
                assert any("quic" in r.name and r.levelno == logging.WARNING
                           for r in caplog.records)
            else:
                counters = server.stats_counters
                assert counters["dropped_unknown"] < len(junk), counters
            deadline = time.monotonic() + 10
            while (kept := state_kept(server)) != (0, 0):
                assert time.monotonic() < deadline, kept
                await asyncio.sleep(0.05)
            async with await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST) as peer:
                conn = await peer.connect_to(server.local_addr)
                accepted = await asyncio.wait_for(server.accept(), 5)
                await conn.send(b"real")
                assert (await asyncio.wait_for(accepted.recv(), 5)).payload == b"real"
                await accepted.send(b"reply")
                assert (await asyncio.wait_for(conn.recv(), 5)).payload == b"reply"
    finally:
        fuzzer.close()
    assert errors_logged(caplog) == []
