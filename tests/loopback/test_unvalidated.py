"""What a source that never proved its address can make an endpoint compute and log:
refusals and junk Initials must cost no TLS engine, only the Initial keys (RFC 9001
§5.2); each log line they trigger is rate limited; Version Negotiation follows RFC 8999's
invariants. Attackers are raw UDP sockets carrying packets built by raw aioquic. (The
per-IP limit on an IPv6 /64 needs a namespace: ``tests/netns/test_unvalidated_v6.py``.)

The CPU figure per packet printed here is informative (the README's figure comes from
``bench/unvalidated_cost.py``); the verdicts are counts: engines created, answers, lines."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from aioquic.quic.events import ConnectionTerminated
from aioquic.quic.packet import QuicErrorCode

import qp2p
from qp2p import engine
from qp2p.endpoint import _peer_log as endpoint_log
from qp2p.endpoint import ip_key
from qp2p.engine import _aioquic, _qh3
from tests.support.endpoints import FAST
from tests.support.unvalidated import (
    after_retry,
    first_initial,
    junk_initial,
    receive,
    unknown_version,
)


@pytest.fixture
def engines_created(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Counts every accepting TLS engine the endpoint creates (the expensive part)."""
    created = [0]

    def counting(real: Callable[..., Any]) -> Callable[..., Any]:
        def count(*args: Any, **kwargs: Any) -> Any:
            created[0] += 1
            return real(*args, **kwargs)

        return count

    for adapter in (_aioquic, _qh3):  # whichever engine the endpoint runs on
        monkeypatch.setattr(adapter, "new_server", counting(adapter.new_server))
    yield created


def udp_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 2**20)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


async def flood(sock: socket.socket, datagram: bytes | Callable[[], bytes], count: int,
                to: tuple[Any, ...]) -> float:
    """Send ``count`` datagrams (yielding now and then so the endpoint reads them);
    returns the process CPU seconds spent per datagram, endpoint and sender together."""
    started = time.process_time()
    for i in range(count):
        sock.sendto(datagram() if callable(datagram) else datagram, to)
        if i % 32 == 31:
            await asyncio.sleep(0)
    await asyncio.sleep(0.05)
    return (time.process_time() - started) / count


@pytest.mark.asyncio
async def test_refusal_at_the_limit_runs_no_tls(
    impl: str, engines_created: list[int], caplog: pytest.LogCaptureFixture
) -> None:
    """At max_connections, one token-bearing Initial replayed 300 times: every copy is
    answered with a CONNECTION_CLOSE(CONNECTION_REFUSED) a raw aioquic client can read,
    no TLS engine is created for any of them, and the log gets one line, not 300."""
    cfg = qp2p.Config(max_connections=1, require_address_validation=True,
                      handshake_timeout=3.0)
    async with await qp2p.Endpoint.bind(("127.0.0.1", 0), config=cfg) as server:
        sock = udp_socket()
        try:
            quic, initial = first_initial(server.local_addr)
            sock.sendto(initial, server.local_addr)
            (retry,) = await receive(sock, 1)
            replayed = after_retry(quic, retry, server.local_addr)
            assert len(replayed) >= engine.MIN_INITIAL_SIZE
            async with await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST) as honest:
                await honest.connect_to(server.local_addr)  # the endpoint is now full
                assert len(server.debug_snapshot()["live"]) == 1
                before = engines_created[0]
                refused_before = server.stats_counters["handshakes_refused"]
                caplog.set_level(logging.INFO, logger="qp2p")
                caplog.clear()
                cause = "endpoint at max_connections"
                suppressed = endpoint_log.suppressed(cause)
                count = 300
                cpu = await flood(sock, replayed, count, server.local_addr)
                answers = await receive(sock, count)
                print(f"\n[{impl}] refusal of a replayed token-bearing Initial: "
                      f"{cpu * 1000:.3f} ms CPU per packet (both ends)")
                detail = (len(answers), engines_created[0] - before, server.stats_counters)
                assert engines_created[0] == before, detail
                assert server.stats_counters["handshakes_refused"] - refused_before == count
                assert len(answers) == count, detail
                assert all(len(a) < len(replayed) for a in answers)  # no amplification
                lines = [r for r in caplog.records if "refusing handshake" in r.getMessage()]
                # one line per cause per interval (the log is process-wide: an earlier
                # test may have written this interval's line already); the rest are counted
                assert len(lines) <= 1, [r.getMessage() for r in lines]
                assert endpoint_log.suppressed(cause) - (0 if lines else suppressed) \
                    == count - len(lines)
                # the refusal is a real, readable QUIC close
                quic.receive_datagram(answers[0], server.local_addr, now=time.monotonic())
                close = _aioquic.close_event(quic)  # the engine drains before it reports it
                assert isinstance(close, ConnectionTerminated), close
                assert close.error_code == QuicErrorCode.CONNECTION_REFUSED
                assert "max_connections" in close.reason_phrase
                # and the connection that holds the slot is still served
                assert len(server.debug_snapshot()["live"]) == 1
        finally:
            sock.close()


@pytest.mark.asyncio
async def test_junk_initials_run_no_tls(impl: str, engines_created: list[int]) -> None:
    """500 datagrams shaped like first Initials that do not decrypt create no engine; the
    first address_validation_threshold of them are dropped once their header protection
    or payload fails to open, and then, counted like half-open handshakes, they switch
    the endpoint to stateless Retry (no decryption at all). A real peer still connects."""
    async with await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST) as server:
        sock = udp_socket()
        try:
            count, threshold = 500, FAST.address_validation_threshold
            cpu = await flood(sock, junk_initial, count, server.local_addr)
            print(f"\n[{impl}] junk Initial: {cpu * 1000:.3f} ms CPU per packet (both ends)")
            answers = await receive(sock, count - threshold)
            assert engines_created[0] == 0
            assert server.stats_counters["dropped_unknown"] == threshold
            assert server.stats_counters["retries_sent"] == count - threshold
            assert len(answers) == count - threshold
            assert all(a[0] & 0xF0 == 0xF0 and len(a) < 200 for a in answers)  # Retries
            assert not server.debug_snapshot()["live"]
        finally:
            sock.close()
        async with await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST) as peer:
            conn = await peer.connect_to(server.local_addr)  # through a Retry now
            await conn.send(b"real")
            assert (await asyncio.wait_for((await server.accept()).recv(), 5)).payload == b"real"
        assert engines_created[0] == 1  # the real one


@pytest.mark.asyncio
async def test_version_negotiation_follows_the_invariants(impl: str) -> None:
    """RFC 8999: a long header of an unknown version is read by its invariant fields only
    (connection IDs up to 255 bytes, any bits in the first byte's low seven), and a
    datagram of 1,200 bytes or more gets a Version Negotiation echoing both IDs."""
    async with await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST) as server:
        sock = udp_socket()
        try:
            cases = [(b"\x11" * 40, b"\x22" * 30, 0x80), (b"\x33" * 255, b"", 0x80),
                     (b"", b"\x44" * 255, 0xFF), (b"\x55" * 8, b"\x66" * 8, 0xC0)]
            for dcid, scid, first in cases:
                packet = bytes([first]) + unknown_version(dcid, scid)[1:]
                sock.sendto(packet, server.local_addr)
                (answer,) = await receive(sock, 1)
                assert answer[0] & 0x80 and answer[1:5] == b"\x00\x00\x00\x00", answer[:8]
                # the answer's DCID is the client's SCID and its SCID the client's DCID
                assert answer[5] == len(scid) and answer[6 : 6 + len(scid)] == scid
                rest = answer[6 + len(scid) :]
                assert rest[0] == len(dcid) and rest[1 : 1 + len(dcid)] == dcid
                versions = rest[1 + len(dcid) :]
                assert len(versions) % 4 == 0 and versions
                assert set(server.debug_snapshot()["quic_versions"]) <= {  # the engine in use
                    int.from_bytes(versions[i : i + 4], "big") for i in range(0, len(versions), 4)}
            # too small to be a first Initial (no reflection amplifier): no answer
            for size in (1199, 600, 60):
                sock.sendto(unknown_version(b"\x11" * 40, b"\x22" * 8, size=size),
                            server.local_addr)
            assert await receive(sock, 1, 0.3) == []
            assert server.stats_counters["version_negotiations"] == len(cases)
        finally:
            sock.close()


def test_per_ip_key_is_the_v6_slash_64() -> None:
    """max_connections_per_ip counts IPv4 sources by address (also written IPv4-mapped)
    and IPv6 sources by their /64, which one subscriber can walk freely."""
    assert ip_key("198.18.0.7") == "198.18.0.7"
    assert ip_key("::ffff:198.18.0.7") == "198.18.0.7"
    assert ip_key("2001:2::1") == ip_key("2001:2::ffff:1:2:3") == "2001:2::/64"
    assert ip_key("2001:2:0:0:abcd::1%lo") == "2001:2::/64"
    assert ip_key("2001:2:0:1::1") == "2001:2:0:1::/64" != ip_key("2001:2::1")
    assert ip_key("::1") == "::/64"
