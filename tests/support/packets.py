"""Real QUIC packets for the fuzz tests and fuzz/make_seeds.py: a raw aioquic handshake's
datagrams, captured in memory (no sockets), damaged copies of them, and client Initials
sealed again around a damaged ClientHello."""

from __future__ import annotations

import functools
import random
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

from aioquic.buffer import Buffer
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.crypto import CryptoPair
from aioquic.quic.packet import pull_quic_header

import qp2p
from qp2p import _purepy, engine


@dataclass(frozen=True)
class Captured:
    """Datagrams a raw aioquic client sent in a real handshake (no qp2p code)."""

    datagrams: tuple[bytes, ...]
    first_packet: tuple[int, ...]  # length of each datagram's first QUIC packet
    cids: tuple[bytes, ...]  # connection IDs seen in them


@functools.cache
def captured() -> Captured:
    """A real client's Initial, Handshake and 1-RTT (short header) datagrams, from an
    aioquic client and server exchanging packets in memory until a stream was sent."""
    ident = qp2p.Identity.generate()
    client = QuicConnection(configuration=QuicConfiguration(
        is_client=True, verify_mode=ssl.CERT_NONE, alpn_protocols=None,
        connection_id_length=engine.CID_LENGTH))
    server_config = QuicConfiguration(
        is_client=False, alpn_protocols=None, certificate=ident.certificate,
        private_key=ident.private_key, connection_id_length=engine.CID_LENGTH)
    server: QuicConnection | None = None
    caught: list[bytes] = []
    now = 100.0
    client.connect(("198.18.0.2", 4433), now=now)
    for step in range(12):
        for data, _ in client.datagrams_to_send(now=now):
            caught.append(data)
            if server is None:
                first = pull_quic_header(Buffer(data=data), engine.CID_LENGTH)
                server = QuicConnection(configuration=server_config,
                                        original_destination_connection_id=first.destination_cid)
            server.receive_datagram(data, ("198.18.0.1", 5000), now)
        assert server is not None
        for data, _ in server.datagrams_to_send(now=now):
            client.receive_datagram(data, ("198.18.0.2", 4433), now)
        if step == 4:
            sid = client.get_next_available_stream_id(is_unidirectional=True)
            client.send_stream_data(sid, _purepy.encode_frame(b"h", b"", b"hello"),
                                    end_stream=True)
        now += 0.01
    heads = [pull_quic_header(Buffer(data=d), engine.CID_LENGTH) for d in caught]
    kinds = {h.packet_type.name for h in heads}
    assert {"INITIAL", "ONE_RTT"} <= kinds, kinds
    cids = {h.destination_cid for h in heads} | {h.source_cid for h in heads if h.source_cid}
    return Captured(tuple(caught), tuple(h.packet_length for h in heads), tuple(sorted(cids)))


def fuzz_datagrams(rng: random.Random, count: int, dcids: Sequence[bytes] = ()) -> list[bytes]:
    """Junk for a live endpoint: random bytes, and real packets with at least one byte of
    their first QUIC packet changed (an unchanged Initial would rightly be accepted).
    With ``dcids``, mutated packets are re-addressed to those connection IDs."""
    cap = captured()
    out = []
    for _ in range(count):
        roll = rng.random()
        if roll < 0.25:
            out.append(rng.randbytes(rng.choice([0, 1, 5, 6, 9, 30, 200, 1200, 1400])))
            continue
        i = rng.randrange(len(cap.datagrams))
        buf = bytearray(cap.datagrams[i])
        if dcids:
            cid = rng.choice(dcids)
            if buf[0] & 0x80:  # long header: same length, so the rest still parses
                buf[6 : 6 + buf[5]] = cid[: buf[5]].ljust(buf[5], b"\0")
            else:
                buf[1 : 1 + len(cid)] = cid
        # a change inside the first packet (its header or its protected payload)
        lo = 1 + engine.CID_LENGTH if (dcids and not buf[0] & 0x80) else 0
        pos = rng.randrange(lo, cap.first_packet[i])
        buf[pos] ^= rng.randrange(1, 256)
        for _ in range(rng.randrange(3)):
            edit = rng.random()
            if not buf:
                break
            if edit < 0.4:
                buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
            elif edit < 0.6:
                del buf[rng.randrange(len(buf)) :]
            elif edit < 0.8:
                buf += rng.randbytes(rng.randrange(1, 64))
            else:
                buf[rng.randrange(len(buf))] = rng.randrange(256)
        end = cap.first_packet[i]
        if len(buf) >= end and buf[lo:end] == cap.datagrams[i][lo:end]:
            buf[pos] ^= 0x01  # the edits undid the change: a real packet must not pass
        out.append(bytes(buf))
    return out


@functools.cache
def initial_plaintext() -> tuple[bytes, bytes, int, bytes]:
    """The captured client Initial opened: ``(plain header, payload, packet number,
    what follows the packet in its datagram)``. Initial keys derive from the DCID alone,
    so anyone can seal a changed payload again: the endpoint then really parses it."""
    cap = captured()
    data = cap.datagrams[0]
    buf = Buffer(data=data)
    header = pull_quic_header(buf, engine.CID_LENGTH)
    assert header.packet_type.name == "INITIAL" and len(header.destination_cid) == 8
    end = header.packet_length
    pair = CryptoPair()
    pair.setup_initial(cid=header.destination_cid, is_client=False, version=header.version)
    plain_header, payload, number = pair.decrypt_packet(data[:end], buf.tell(), 0)
    return plain_header, payload, number, data[end:]


def sealed_initial(payload: bytes, dcid: bytes) -> bytes:
    """A client Initial carrying ``payload`` (the captured one's length) to ``dcid``."""
    plain_header, original, number, padding = initial_plaintext()
    assert len(payload) == len(original) and len(dcid) == 8
    pair = CryptoPair()
    pair.setup_initial(cid=dcid, is_client=True, version=1)
    # the DCID sits at bytes 6..14 of the long header (its length byte is 8)
    return pair.encrypt_packet(plain_header[:6] + dcid + plain_header[14:], payload, number) \
        + padding


def fuzzed_initials(rng: random.Random, count: int) -> list[bytes]:
    """Initials that decrypt, each to a fresh DCID, whose frames (a CRYPTO frame with the
    TLS ClientHello and its QUIC transport parameters) were damaged."""
    payload = initial_plaintext()[1]
    out = []
    for _ in range(count):
        p = bytearray(payload)
        for _ in range(rng.randrange(1, 6)):
            pos = rng.randrange(len(p))
            roll = rng.random()
            if roll < 0.5:
                p[pos] ^= 1 << rng.randrange(8)
            elif roll < 0.8:
                p[pos] = rng.randrange(256)
            else:
                size = len(p[pos : pos + rng.randrange(1, 32)])
                p[pos : pos + size] = rng.randbytes(size)
        out.append(sealed_initial(bytes(p), rng.randbytes(8)))
    return out
