"""Hostile and broken peers: a raw aioquic client (no qp2p code) sends malformed frames;
each offending stream is reset, never delivered, counted; the connection keeps serving."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest
from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.quic.events import QuicEvent

import qp2p
from tests.support.endpoints import FAST, state_kept
from tests.support.frames import frame
from tests.support.raw_quic import Attacker, raw_client_config, raw_server

pytestmark = pytest.mark.asyncio


BAD_FRAMES = {
    "truncated header": b"\x00\x02\x00\x00\x00",
    "unknown version 0x9999": frame(b"", b"", b"hello", version=0x9999),
    "claims 2 GiB": frame(b"", b"", b"x" * 100, lengths=(0, 0, 2**31)),
    "payload shorter than claimed": frame(b"", b"", b"abc", lengths=(0, 0, 10)),
    "bytes after the frame": frame(b"", b"", b"abc") + b"trailing",
    "header length beyond the data": frame(b"h", b"", b"abc", lengths=(50, 0, 3)),
    "empty payload": frame(b"h", b"d", b""),
    "unknown kind": frame(b"", b"", b"abc", kind=200),
    "reserved byte set": frame(b"", b"", b"abc", reserved=7),
    "empty stream": b"",
}


async def test_raw_client_bad_frames_then_valid_message(impl: str) -> None:
    async with await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST) as server:
        config = raw_client_config()
        host, port = server.local_addr
        async with connect(host, port, configuration=config, create_protocol=Attacker,
                           wait_connected=True) as client:
            assert isinstance(client, Attacker)
            quic = client._quic
            conn = await asyncio.wait_for(server.accept(), 5)
            assert conn.peer_id is None  # a raw client presents no certificate
            uni_ids = {}
            for name, data in BAD_FRAMES.items():
                sid = quic.get_next_available_stream_id(is_unidirectional=True)
                quic.send_stream_data(sid, data, end_stream=True)
                uni_ids[sid] = name
            # a malformed request on a bidirectional stream
            bidi = quic.get_next_available_stream_id(is_unidirectional=False)
            quic.send_stream_data(bidi, frame(b"", b"", b"q", version=7), end_stream=True)
            # and a valid message after all of them, on the same connection
            sid = quic.get_next_available_stream_id(is_unidirectional=True)
            quic.send_stream_data(sid, frame(b"H", b"D", b"valid"), end_stream=True)
            client.transmit()

            msg = await asyncio.wait_for(conn.recv(), 5)
            assert (msg.header, msg.dst, msg.payload) == (b"H", b"D", b"valid")
            # qh3 sends no STOP_SENDING for a stream that arrived whole (README, engine
            # differences): only the reset of our side of the bidirectional one shows
            stops = server.engine == "aioquic"
            for _ in range(100):
                if (len(client.stopped) >= len(uni_ids) + 1 or not stops) and bidi in client.reset:
                    break
                await asyncio.sleep(0.02)
            if stops:
                assert set(client.stopped) == {*uni_ids, bidi}, {
                    uni_ids[s] for s in uni_ids if s not in client.stopped
                }
            assert bidi in client.reset
            assert conn.stats()["streams_rejected"] == len(BAD_FRAMES) + 1
            # nothing else was delivered, and the connection keeps serving
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(conn.recv(), 0.2)
            assert not conn.is_closed
            await conn.send(b"still here")


async def test_unknown_quic_version_gets_version_negotiation(impl: str) -> None:
    async with await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST) as server:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setblocking(False)
        try:
            dcid, scid = b"\x11" * 8, b"\x22" * 8
            packet = (bytes([0xC0]) + struct.pack(">I", 0x1A2A3A4A) + bytes([8]) + dcid
                      + bytes([8]) + scid)
            packet += b"\x00" * (1200 - len(packet))
            sock.sendto(packet, server.local_addr)
            data = await asyncio.wait_for(recv(sock), 2)
            assert data[1:5] == b"\x00\x00\x00\x00"  # version 0: Version Negotiation
            assert data[6:14] == scid and data[15:23] == dcid
            # junk and short-header packets for unknown connections are dropped silently,
            # and so is an unknown version in a datagram too small to be an Initial
            # (RFC 9000 §5.2.2: no reflection amplifier)
            for junk in (b"\x40" + b"\x00" * 30, b"", b"\xff", packet[:20], packet[:1199],
                         bytes([0xC0]) + struct.pack(">I", 0x1A2A3A4A) + b"\x00\x00\x00\x00"):
                sock.sendto(junk, server.local_addr)
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(recv(sock), 0.3)
        finally:
            sock.close()
        # the endpoint still serves real peers
        async with await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST) as peer:
            conn = await peer.connect_to(server.local_addr)
            await conn.send(b"ok")
            assert (await asyncio.wait_for((await server.accept()).recv(), 5)).payload == b"ok"


async def recv(sock: socket.socket) -> bytes:
    """Poll a non-blocking socket (uvloop has no ``sock_recv`` for UDP sockets)."""
    while True:
        try:
            return sock.recv(2048)
        except BlockingIOError:
            await asyncio.sleep(0.005)


async def test_stream_flood_is_bounded(impl: str) -> None:
    """A peer opening many streams of junk: each is rejected, credit keeps flowing."""
    cfg = qp2p.Config(max_concurrent_uni_streams=16, handshake_timeout=3.0)
    async with await qp2p.Endpoint.bind(("127.0.0.1", 0), config=cfg) as server:
        config = raw_client_config()
        host, port = server.local_addr
        async with connect(host, port, configuration=config, create_protocol=Attacker) as client:
            quic = client._quic
            conn = await asyncio.wait_for(server.accept(), 5)
            sent = 0
            for _ in range(50):  # 50 rounds x up to 16 streams = far beyond the limit
                for _ in range(16):
                    sid = quic.get_next_available_stream_id(is_unidirectional=True)
                    if sid // 4 >= quic._remote_max_streams_uni:
                        break
                    quic.send_stream_data(sid, b"\x99\x99junk", end_stream=True)
                    sent += 1
                client.transmit()
                await asyncio.sleep(0.01)
            sid = quic.get_next_available_stream_id(is_unidirectional=True)
            for _ in range(200):
                if sid // 4 < quic._remote_max_streams_uni:
                    break
                await asyncio.sleep(0.01)
            quic.send_stream_data(sid, frame(b"", b"", b"valid"), end_stream=True)
            client.transmit()
            assert (await asyncio.wait_for(conn.recv(), 5)).payload == b"valid"
            assert sent > 16 * 10
            assert conn.stats()["streams_rejected"] == sent


async def test_qp2p_dials_a_plain_aioquic_server(impl: str) -> None:
    """Interop: a stock aioquic server (no qp2p code, its default TLS groups) accepts a
    qp2p dialler, which offers only X25519 and P-256 key shares, and reads its frame."""
    from aioquic.quic.events import StreamDataReceived

    ident = qp2p.Identity.generate()
    got: asyncio.Queue[bytes] = asyncio.Queue()

    class Server(QuicConnectionProtocol):
        def quic_event_received(self, event: QuicEvent) -> None:
            if isinstance(event, StreamDataReceived) and event.end_stream:
                got.put_nowait(event.data)

    server, port = await raw_server(ident, Server)
    try:
        async with await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST) as ep:
            conn = await ep.connect_to(("127.0.0.1", port), expect_peer_id=ident.peer_id)
            assert conn.peer_id == ident.peer_id
            send = asyncio.ensure_future(conn.send(b"hi raw", header=b"h"))
            data = await asyncio.wait_for(got.get(), 5)
            assert data == frame(b"h", b"", b"hi raw")
            await asyncio.wait_for(send, 5)
    finally:
        server.close()


async def test_junk_initial_flood_keeps_no_state(impl: str) -> None:
    """1200-byte "Initial" packets that don't decrypt create no connection state."""
    import os

    async with await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST) as server:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            for _ in range(500):
                dcid, scid = os.urandom(8), os.urandom(8)
                body = os.urandom(1200)  # "packet number + payload" that won't decrypt
                packet = (bytes([0xC3]) + struct.pack(">I", 1) + bytes([8]) + dcid + bytes([8])
                          + scid + b"\x00" + struct.pack(">H", 0x4000 | len(body)) + body)
                sock.sendto(packet, server.local_addr)
            await asyncio.sleep(0.3)
        finally:
            sock.close()
        # dropped, or (once address_validation_threshold of them were junk) answered
        # with a stateless Retry
        counters = server.stats_counters
        assert counters["dropped_unknown"] + counters["retries_sent"] >= 400
        assert state_kept(server) == (0, 0)
        async with await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST) as peer:
            conn = await peer.connect_to(server.local_addr)
            await conn.send(b"real")
            assert (await asyncio.wait_for((await server.accept()).recv(), 5)).payload == b"real"


async def test_control_frame_reply_to_user_request_is_a_protocol_error(impl: str) -> None:
    """A (misbehaving) peer answering a request with a qp2p control frame: ProtocolError,
    never a control frame handed to the user."""
    from aioquic.quic.events import StreamDataReceived

    ident = qp2p.Identity.generate()

    class Server(QuicConnectionProtocol):
        def quic_event_received(self, event: QuicEvent) -> None:
            if isinstance(event, StreamDataReceived) and event.end_stream:
                self._quic.send_stream_data(event.stream_id, frame(b"", b"", b"1.2.3.4:5", kind=2),
                                            end_stream=True)
                self.transmit()

    server, port = await raw_server(ident, Server)
    try:
        async with await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST) as ep:
            conn = await ep.connect_to(("127.0.0.1", port))
            with pytest.raises(qp2p.ProtocolError):
                await conn.request(b"hello", timeout=5)
            assert not conn.is_closed
    finally:
        server.close()


async def test_a_peer_that_never_answers_the_echo_times_out(impl: str) -> None:
    """``discover_public_addr`` toward a peer that takes the request and never answers (a
    stock aioquic server: no qp2p echo service) raises ``TimeoutError`` after
    ``handshake_timeout``, instead of waiting for as long as the peer keeps it alive."""
    class Silent(QuicConnectionProtocol):
        def quic_event_received(self, event: QuicEvent) -> None:
            pass  # takes every stream, answers none

    server, port = await raw_server(qp2p.Identity.generate(), Silent)
    config = qp2p.Config(idle_timeout=30.0, handshake_timeout=1.0)
    try:
        async with await qp2p.Endpoint.bind(("127.0.0.1", 0), config=config) as ep:
            # RequestTimeout (a TimeoutError), not the test's own wait_for giving up
            with pytest.raises(qp2p.RequestTimeout):
                await asyncio.wait_for(ep.discover_public_addr(("127.0.0.1", port)), 10)
            assert ep.public_addr is None
    finally:
        server.close()


async def test_no_datagram_to_a_peer_that_takes_none(impl: str) -> None:
    """A peer that advertised no ``max_datagram_frame_size`` takes no DATAGRAM frames
    (RFC 9221 §3: one would close the connection): ``send_datagram`` raises
    ``MessageTooLarge`` locally and the connection lives on."""
    from aioquic.quic.events import StreamDataReceived

    got: asyncio.Queue[bytes] = asyncio.Queue()

    class Server(QuicConnectionProtocol):
        def quic_event_received(self, event: QuicEvent) -> None:
            if isinstance(event, StreamDataReceived) and event.end_stream:
                got.put_nowait(event.data)

    server, port = await raw_server(qp2p.Identity.generate(), Server)
    try:
        async with await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST) as ep:
            conn = await ep.connect_to(("127.0.0.1", port))
            assert conn.max_datagram_payload == 0
            for data in (b"x", b""):
                with pytest.raises(qp2p.MessageTooLarge, match="no datagrams"):
                    conn.send_datagram(data)
            await conn.send(b"still open")
            assert await asyncio.wait_for(got.get(), 5) == frame(b"", b"", b"still open")
            assert not conn.is_closed
    finally:
        server.close()
