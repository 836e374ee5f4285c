"""The PCP and NAT-PMP reply parsers on hostile input (no network): any bytes give a valid
answer to our request, ``None``, or the protocol's refusal, never another exception; and a
reply is accepted only when it matches the request it answers."""

from __future__ import annotations

import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qp2p import portmap
from qp2p.portmap import parse_natpmp_address, parse_natpmp_map, parse_pcp_map

NONCE = bytes(range(12))
PORT = 40000


def pcp_reply(*, code: int = 0, lifetime: int = 600, nonce: bytes = NONCE, port: int = PORT,
              eport: int = 4242, ext: str = "198.18.0.1", proto: int = 17) -> bytes:
    return (struct.pack("!BBBBII12x", 2, 0x81, 0, code, lifetime, 1) + nonce
            + struct.pack("!B3xHH", proto, port, eport)
            + b"\x00" * 10 + b"\xff\xff" + socket.inet_aton(ext))


def natpmp_map(*, code: int = 0, port: int = PORT, eport: int = 4242,
               lifetime: int = 600) -> bytes:
    return struct.pack("!BBHIHHI", 0, 0x81, code, 1, port, eport, lifetime)


def outcome(fn, *args):  # type: ignore[no-untyped-def]
    try:
        return fn(*args)
    except portmap._Refused as exc:
        return exc


def test_valid_replies_parse() -> None:
    assert parse_pcp_map(pcp_reply(), NONCE, PORT, 600) == ("198.18.0.1", 4242, 600)
    assert parse_natpmp_map(natpmp_map(), PORT, 600) == (4242, 600)
    assert parse_natpmp_address(struct.pack("!BBHI4s", 0, 0x80, 0, 1,
                                            socket.inet_aton("198.18.0.1"))) == "198.18.0.1"


@pytest.mark.parametrize("reply", [
    pcp_reply(nonce=b"\xff" * 12),      # someone else's request
    pcp_reply(port=PORT + 1),
    pcp_reply(proto=6),                  # TCP
    pcp_reply()[:59],
    pcp_reply() + b"\x00" * 2,           # not a multiple of 4
    pcp_reply() + b"\x00" * 1100,        # over the 1100-byte limit
    b"\x03" + pcp_reply()[1:],           # another version
    pcp_reply()[:1] + b"\x82" + pcp_reply()[2:],  # another opcode
    pcp_reply()[:44] + b"\x20\x01" + b"\x00" * 14,  # an IPv6 external address
    pcp_reply(code=2, nonce=b"\xff" * 12),  # an error for someone else: not ours to heed
])
def test_pcp_mismatches_are_ignored(reply: bytes) -> None:
    assert parse_pcp_map(reply, NONCE, PORT, 600) is None


def test_pcp_refusals() -> None:
    for reply in (pcp_reply(code=2), pcp_reply(lifetime=0), pcp_reply(eport=0),
                  pcp_reply(ext="0.0.0.0")):
        assert isinstance(outcome(parse_pcp_map, reply, NONCE, PORT, 600), portmap._Refused)
    unsupported = outcome(parse_pcp_map, struct.pack("!BBHI", 0, 0x81, 1, 7), NONCE, PORT, 600)
    assert isinstance(unsupported, portmap._Refused) and unsupported.unsupported_version
    # a zero-lifetime reply is the answer to a delete
    assert parse_pcp_map(pcp_reply(lifetime=0, eport=0), NONCE, PORT, 0) == (
        "198.18.0.1", 0, 0)


def test_natpmp_mismatches_are_ignored() -> None:
    for reply in (natpmp_map(port=1), natpmp_map()[:15], natpmp_map() + b"\x00",
                  b"\x01" + natpmp_map()[1:], natpmp_map()[:1] + b"\x80" + natpmp_map()[2:],
                  natpmp_map(code=3, port=1)):
        assert parse_natpmp_map(reply, PORT, 600) is None
    assert isinstance(outcome(parse_natpmp_map, natpmp_map(code=3), PORT, 600),
                      portmap._Refused)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=1200))
def test_random_bytes_never_raise(data: bytes) -> None:
    for result in (outcome(parse_pcp_map, data, NONCE, PORT, 600),
                   outcome(parse_natpmp_map, data, PORT, 600),
                   outcome(parse_natpmp_address, data)):
        assert result is None or isinstance(result, (tuple, str, portmap._Refused))


@settings(max_examples=2000, deadline=None)
@given(st.integers(0, 59), st.integers(1, 255))
def test_a_changed_byte_of_a_pcp_reply_is_never_taken_for_another_grant(pos: int,
                                                                         flip: int) -> None:
    """Flip any byte of the valid reply: the parser ignores it, refuses, or (for bytes
    that do not bear on the grant: reserved fields, epoch) returns the same grant."""
    reply = bytearray(pcp_reply())
    reply[pos] ^= flip
    result = outcome(parse_pcp_map, bytes(reply), NONCE, PORT, 600)
    if isinstance(result, tuple):
        changed = result != ("198.18.0.1", 4242, 600)
        grant_bytes = set(range(4, 8)) | set(range(42, 44)) | set(range(56, 60))
        assert changed == (pos in grant_bytes)
        assert pos not in range(24, 36) and pos not in range(40, 42)  # nonce, internal port
