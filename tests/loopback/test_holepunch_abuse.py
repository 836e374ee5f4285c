"""Hole-punching control frames from hostile peers, on loopback: raw aioquic rendezvous
that flood INTRODUCTION frames or lie about a target's address, and a raw aioquic target
that grants no streams while a raw dialler asks for it thousands of times. The verdict
is what arrives at raw UDP sockets the attacker names (packets and bytes counted there)
and what the rendezvous holds."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.events import HandshakeCompleted, QuicEvent, StreamDataReceived

import qp2p
from qp2p import engine, wire
from qp2p.errors import ProtocolError
from qp2p.services import holepunch, rendezvous
from tests.support.endpoints import FAST
from tests.support.frames import frame
from tests.support.raw_quic import GrantsNoUniStreams, RawPeer, raw_server


class Sink:
    """A raw UDP socket an attacker names as the victim; counts what reaches it."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 2**20)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.setblocking(False)
        self.addr = self.sock.getsockname()
        self.packets = self.bytes = 0

    def poll(self) -> None:
        while True:
            try:
                self.bytes += len(self.sock.recv(65536))
                self.packets += 1
            except BlockingIOError:
                return

    def close(self) -> None:
        self.sock.close()


async def watch(sinks: list[Sink], seconds: float) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while loop.time() < end:
        for sink in sinks:
            sink.poll()
        await asyncio.sleep(0.005)
    for sink in sinks:
        sink.poll()


@contextlib.asynccontextmanager
async def raw_rendezvous(
    on_handshake: Callable[[QuicConnectionProtocol], None] | None = None,
    answer: bytes | None = None,
    advertise: bool = True,
) -> AsyncIterator[tuple[str, int]]:
    """A stock aioquic server playing a rendezvous: on handshake it runs
    ``on_handshake``; it answers every INTRODUCE_REQUEST with ``ok`` and ``answer``;
    ``advertise``: it claims to be one (qp2p's ``TP_RENDEZVOUS`` parameter)."""
    ident = qp2p.Identity.generate()
    claim = engine.encode_transport_parameters(None, False, rendezvous=True)

    class Rendezvous(QuicConnectionProtocol):
        def __init__(self, quic: Any, **kwargs: Any) -> None:
            super().__init__(quic, **kwargs)
            if advertise:  # a stock server's parameters, plus the claim
                own = quic._serialize_transport_parameters
                quic._serialize_transport_parameters = lambda: own() + claim


        def quic_event_received(self, event: QuicEvent) -> None:
            if isinstance(event, HandshakeCompleted) and on_handshake is not None:
                on_handshake(self)
            elif (isinstance(event, StreamDataReceived) and event.end_stream
                  and event.stream_id % 4 == 0 and answer is not None):
                self._quic.send_stream_data(
                    event.stream_id,
                    frame(b"ok", b"", answer, kind=wire.KIND_INTRODUCE_RESPONSE),
                    end_stream=True)
                self.transmit()

    server, port = await raw_server(ident, Rendezvous)
    try:
        yield ("127.0.0.1", port)
    finally:
        server.close()


def introduce(payloads: list[bytes]) -> Callable[[QuicConnectionProtocol], None]:
    """Send one INTRODUCTION frame per payload, each on its own unidirectional stream."""
    def send(proto: QuicConnectionProtocol) -> None:
        quic = proto._quic
        for payload in payloads:
            sid = quic.get_next_available_stream_id(is_unidirectional=True)
            quic.send_stream_data(sid, frame(b"", b"", payload, kind=wire.KIND_INTRODUCTION),
                                  end_stream=True)
        proto.transmit()
    return send


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["registered", "dialled", "merely_dialled", "not_a_rendezvous",
                                 "registration_failed"])
async def test_introduction_flood_stays_within_3x(impl: str, how: str) -> None:
    """A rendezvous sends 200 INTRODUCTION frames naming 20 raw sockets (and a few names
    we must never send to: a host name, the unspecified and a multicast address). Only a
    rendezvous we registered with is heard at all ("merely_dialled": the target registered
    with another one; "dialled": it registered with none, so a peer it dialled that claims
    to be a rendezvous may introduce; "not_a_rendezvous": a peer it dialled that makes no
    such claim; "registration_failed": it registered with a rendezvous that refused it,
    which leaves it registered with none, as "dialled"), and then what reaches the
    sockets stays within 3x what the rendezvous sent us: one probe train at a time (each
    introduction replaces the last after its first probe), none for names."""
    sinks = [Sink() for _ in range(20)]
    named = Sink()  # reachable only through the name "localhost"
    payloads = [wire.format_addr(sinks[i % len(sinks)].addr) for i in range(200)]
    payloads += [b"localhost:%d" % named.addr[1], b"0.0.0.0:%d" % named.addr[1],
                 b"224.0.0.1:%d" % named.addr[1]]
    try:
        async with raw_rendezvous(on_handshake=introduce(payloads),
                                  advertise=how != "not_a_rendezvous") as addr, \
                await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST) as target:
            if how == "registered":
                conn = await target.register_with(addr)
            else:
                if how == "merely_dialled":
                    other = await qp2p.Endpoint.bind(config=FAST, rendezvous=True)
                    await target.register_with(other.local_addr)
                    await other.close()
                elif how == "registration_failed":  # a rendezvous that takes only others
                    stranger = qp2p.Trust.pinned([qp2p.Identity.generate().peer_id])
                    async with qp2p.Endpoint.bind(config=FAST, rendezvous=True,
                                                  trust=stranger) as other:
                        with pytest.raises(qp2p.PeerAuthenticationError):
                            await target.register_with(other.local_addr)
                conn = await target.connect_to(addr)
            await watch([*sinks, named], 1.5)  # longer than a probe train
            got = sum(s.bytes for s in sinks)
            received = conn.stats()["bytes_received"]
            print(f"\n[{impl}] {how}: the rendezvous sent us {received} bytes, the named "
                  f"sockets got {sum(s.packets for s in sinks)} probes, {got} bytes")
            assert named.packets == 0
            if how in ("merely_dialled", "not_a_rendezvous"):
                assert got == 0
                return
            assert 0 < got <= holepunch.AMPLIFICATION * received
    finally:
        for sink in [*sinks, named]:
            sink.close()


@pytest.mark.asyncio
async def test_lying_rendezvous_gets_few_initials_sent_to_its_victim(impl: str) -> None:
    """A rendezvous answers every introduction request with the address of a raw socket
    that never answers: the dialler sends it at most PUNCH_MAX_RESENDS first flights
    (plus the engine's own few retransmissions) before HolePunchFailed, not one every
    25 ms for the whole hole_punch_timeout."""
    victim = Sink()
    cfg = qp2p.Config(hole_punch_timeout=3.0, handshake_timeout=3.0,
                      retry=qp2p.RetryConfig(max_elapsed_time=3.0))
    try:
        async with raw_rendezvous(answer=wire.format_addr(victim.addr)) as addr, \
                await qp2p.Endpoint.bind(("127.0.0.1", 0), config=cfg) as dialler:
            watching = asyncio.ensure_future(watch([victim], 4.0))
            with pytest.raises(qp2p.HolePunchFailed):
                await dialler.connect_via(addr, qp2p.Identity.generate().peer_id)
            await watching
            print(f"\n[{impl}] the victim got {victim.packets} datagrams, {victim.bytes} "
                  f"bytes in {cfg.hole_punch_timeout:g} s")
            assert 0 < victim.packets <= holepunch.PUNCH_MAX_RESENDS + 10
    finally:
        victim.close()


@pytest.mark.asyncio
@pytest.mark.parametrize("lie", [b"localhost:4433", b"0.0.0.0:4433", b"224.0.0.9:4433",
                                 b"[::]:4433", b"198.18.0.300:4433"])
async def test_rendezvous_naming_a_forbidden_address_fails_at_once(impl: str,
                                                                   lie: bytes) -> None:
    async with raw_rendezvous(answer=lie) as addr, \
            await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST) as dialler:
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(qp2p.HolePunchFailed, match="will not dial"):
            await dialler.connect_via(addr, qp2p.Identity.generate().peer_id)
        assert loop.time() - start < FAST.handshake_timeout  # no dial was attempted
        assert dialler.stats_counters["datagrams_sent"] < 10  # only the rendezvous dial


def test_numeric_target_rules() -> None:
    """Numeric only; never unspecified/multicast/broadcast; loopback and link-local only
    for an introducer on loopback; the socket's own address form."""
    v4, v6 = socket.AF_INET, socket.AF_INET6
    local, remote = ("127.0.0.1", 1), ("198.18.0.10", 1)
    assert holepunch.numeric_target(b"198.18.0.2:5", remote, v4) == ("198.18.0.2", 5)
    assert holepunch.numeric_target(b"198.18.0.2:5", remote, v6) == ("::ffff:198.18.0.2", 5,
                                                                    0, 0)
    assert holepunch.numeric_target(b"[2001:2::1]:5", remote, v6) == ("2001:2::1", 5, 0, 0)
    assert holepunch.numeric_target(b"127.0.0.1:5", local, v4) == ("127.0.0.1", 5)
    assert holepunch.numeric_target(b"127.0.0.1:5", ("::ffff:127.0.0.1", 1, 0, 0), v6)
    for bad, introducer in [(b"example.com:5", local), (b"127.0.0.1:5", remote),
                            (b"[::1]:5", remote), (b"169.254.0.1:5", remote),
                            (b"0.0.0.0:5", local), (b"[::]:5", local),
                            (b"224.0.0.1:5", local), (b"[ff02::1]:5", local),
                            (b"255.255.255.255:5", local), (b"[::ffff:127.0.0.1]:5", remote),
                            (b"198.18.0.2:0", remote), (b"[2001:2::1]:5", remote)]:
        family = v4 if b"2001:2" in bad else v6
        with pytest.raises(ProtocolError):
            holepunch.numeric_target(bad, introducer, family)


@pytest.mark.asyncio
async def test_rendezvous_queues_few_introductions_for_a_silent_target(impl: str) -> None:
    """A raw aioquic target grants the rendezvous no unidirectional streams, so nothing
    queued for it ever leaves; a raw dialler then asks for it 3,000 times. The rendezvous
    keeps at most MAX_PENDING_INTRODUCTIONS for it and answers the rest ``err`` at once."""
    ident = qp2p.Identity.generate()
    cfg = qp2p.Config(handshake_timeout=3.0)
    async with await qp2p.Endpoint.bind(("127.0.0.1", 0), config=cfg,
                                        rendezvous=True) as rdv:
        host, port = rdv.local_addr
        target_cfg = QuicConfiguration(is_client=True, verify_mode=ssl.CERT_NONE,
                                       alpn_protocols=None, certificate=ident.certificate,
                                       private_key=ident.private_key)
        answers: dict[bytes, int] = {}
        partial: dict[int, bytes] = {}

        class Dialler(RawPeer):
            def quic_event_received(self, event: QuicEvent) -> None:
                if isinstance(event, StreamDataReceived):
                    data = partial.pop(event.stream_id, b"") + event.data
                    if not event.end_stream:
                        partial[event.stream_id] = data
                        return
                    status = data[16 : 16 + int.from_bytes(data[2:6], "big")]
                    answers[status] = answers.get(status, 0) + 1

        dialler_cfg = QuicConfiguration(is_client=True, verify_mode=ssl.CERT_NONE,
                                        alpn_protocols=None)
        async with connect(host, port, configuration=target_cfg,
                           create_protocol=GrantsNoUniStreams), \
                connect(host, port, configuration=dialler_cfg,
                        create_protocol=Dialler) as dialler:
            assert isinstance(dialler, Dialler)
            target_conn = next(c for c in rdv.connections() if c.peer_id == ident.peer_id)
            request = frame(b"", b"", ident.peer_id.digest, kind=wire.KIND_INTRODUCE_REQUEST)
            # aioquic holds the requests beyond the rendezvous' stream credit until it
            # grants more
            dialler.send_frames([request] * 3000, unidirectional=False)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while sum(answers.values()) < 3000 and loop.time() < deadline:
                await asyncio.sleep(0.01)
            print(f"\n[{impl}] 3,000 requests for a silent target: answers {answers}, "
                  f"{target_conn.stats()['queued_messages']} queued for it")
            ok = rendezvous.MAX_PENDING_INTRODUCTIONS
            assert answers == {b"ok": ok, b"err": 3000 - ok}
            assert target_conn.stats()["queued_messages"] <= \
                rendezvous.MAX_PENDING_INTRODUCTIONS
