"""What an unvalidated source can send an endpoint, built with raw aioquic: genuine first
Initials, token-bearing Initials (after a real Retry), junk shaped like Initials, long
headers of unknown versions; and the raw socket's side. Shared by the unvalidated-source
tests (tests/loopback/test_unvalidated.py, tests/netns/test_unvalidated_v6.py) and
bench/unvalidated_cost.py."""

from __future__ import annotations

import asyncio
import os
import socket
import ssl
import struct
import time
from typing import Any

from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection

Address = tuple[Any, ...]


def raw_client_config() -> QuicConfiguration:
    """A raw client's configuration: no certificate, no ALPN, any server certificate."""
    return QuicConfiguration(is_client=True, verify_mode=ssl.CERT_NONE, alpn_protocols=None)


def first_initial(server_addr: Address) -> tuple[QuicConnection, bytes]:
    """A fresh raw aioquic client and its first Initial datagram."""
    quic = QuicConnection(configuration=raw_client_config())
    quic.connect(server_addr, now=time.monotonic())
    (datagram, _), *_ = quic.datagrams_to_send(now=time.monotonic())
    return quic, datagram


def after_retry(quic: QuicConnection, retry: bytes, server_addr: Address) -> bytes:
    """The token-bearing Initial a raw client sends once ``retry`` (a real Retry packet
    from the server) reached it; valid for the token's lifetime, from the same address."""
    assert retry[0] & 0xF0 == 0xF0, "expected a Retry packet"  # long header, type 3 (v1)
    quic.receive_datagram(retry, server_addr, now=time.monotonic())
    (datagram, _), *_ = quic.datagrams_to_send(now=time.monotonic())
    return datagram


def junk_initial(version: int = 1) -> bytes:
    """1,200+ bytes shaped like a v1 Initial (fresh CIDs, a length that fits) that cannot
    decrypt."""
    dcid, scid = os.urandom(8), os.urandom(8)
    body = os.urandom(1200)
    return (bytes([0xC3]) + struct.pack(">I", version) + bytes([8]) + dcid + bytes([8]) + scid
            + b"\x00" + struct.pack(">H", 0x4000 | len(body)) + body)


def unknown_version(dcid: bytes, scid: bytes, version: int = 0x1A2A3A4A,
                    size: int = 1200) -> bytes:
    """A long header of an unknown version, only RFC 8999's invariant fields meaningful."""
    packet = bytes([0x80 | 0x3F]) + struct.pack(">I", version) + bytes([len(dcid)]) + dcid \
        + bytes([len(scid)]) + scid
    return packet + os.urandom(max(0, size - len(packet)))


def drain(sock: socket.socket) -> list[bytes]:
    """Everything waiting on a non-blocking socket."""
    out = []
    while True:
        try:
            out.append(sock.recv(65536))
        except BlockingIOError:
            return out


async def receive(sock: socket.socket, count: int, seconds: float = 3.0) -> list[bytes]:
    """Datagrams arriving at ``sock`` until ``count`` came or ``seconds`` passed."""
    got: list[bytes] = []
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while len(got) < count and loop.time() < end:
        got.extend(drain(sock))
        await asyncio.sleep(0.005)
    return got
