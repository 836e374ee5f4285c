"""qp2p's message format (DESIGN.md §3), on top of the fast path's frame codec.

A message is one frame on its own QUIC stream: a 16-byte header (version 0x0002,
lengths of ``header``, ``dst`` and ``payload``, a kind byte, a reserved byte), then the
three byte strings. Kind 0 is a user message (byte for byte the Rust crate's frame);
other kinds are qp2p's own control messages.
"""

from __future__ import annotations

from typing import Any, Final, TypeAlias

from . import _speedups
from .errors import MessageTooLarge, ProtocolError

#: A peer's address as qp2p reports it (``local_addr``, ``remote_addr``, ``public_addr``):
#: ``(host, port)``. Every method that takes an address also accepts ``"host:port"`` or
#: ``"[v6]:port"`` text, so parameters are typed ``Address | str``.
Address: TypeAlias = tuple[str, int]
#: An address in a socket's own form: ``(host, port)``, or ``(host, port, flow, scope)`` on
#: an IPv6 socket.
SockAddr: TypeAlias = tuple[Any, ...]

__all__ = [
    "ERR_BUFFER_FULL",
    "ERR_CANCELLED",
    "ERR_FRAME_REJECTED",
    "ERR_STALLED",
    "FRAME_HEADER_LEN",
    "KIND_ECHO_REQUEST",
    "KIND_ECHO_RESPONSE",
    "KIND_INTRODUCE_REQUEST",
    "KIND_INTRODUCE_RESPONSE",
    "KIND_INTRODUCTION",
    "KIND_PATH_CHECK",
    "KIND_PATH_OK",
    "KIND_RECEIPT",
    "KIND_RELAY_ACCEPT",
    "KIND_RELAY_OFFER",
    "KIND_RELAY_REQUEST",
    "KIND_RELAY_RESPONSE",
    "KIND_USER",
    "Address",
    "SockAddr",
    "addr_text",
    "as_bytes",
    "check_message",
    "encode_receipt",
    "encode_varint",
    "format_addr",
    "parse_addr",
    "parse_address",
    "parse_receipts",
    "to_address",
]

#: The frame header's size and the user kind (0) are the codec's (the fast path and its
#: twin define them; written once more here would be a third copy).
FRAME_HEADER_LEN: Final[int] = _speedups.impl.FRAME_HEADER_LEN
KIND_USER: Final[int] = _speedups.impl.KIND_USER

# qp2p's own frame kinds (byte 14).
KIND_ECHO_REQUEST: Final = 1  # "what address do you see me at?" (bidi stream)
KIND_ECHO_RESPONSE: Final = 2  # the observed address, as "host:port" text
KIND_INTRODUCE_REQUEST: Final = 3  # ask a rendezvous to introduce a peer (bidi)
KIND_INTRODUCE_RESPONSE: Final = 4  # the rendezvous' answer
KIND_INTRODUCTION: Final = 5  # rendezvous -> target: "a peer wants to punch to you"
# receiver -> sender, uni stream, only to peers advertising engine.TP_RECEIPTS: the payload
# is (stream id, code) varint pairs, one per message the sender sent on a unidirectional
# stream: code 0 = accepted (whole, into the receiver's memory), else the rejection's code
KIND_RECEIPT: Final = 6
# relayed connections (qp2p/relay.py): dialler -> relay, bidi, payload the target's peer
# id; relay -> target, uni, header the dialler's peer id, payload the session id; target ->
# relay, uni, header ok/err, payload the session id; the relay's answer to the request
KIND_RELAY_REQUEST: Final = 7
KIND_RELAY_OFFER: Final = 8
KIND_RELAY_ACCEPT: Final = 9
KIND_RELAY_RESPONSE: Final = 10
# a relayed connection's peers, uni, inside it: "I probe you directly with the nonce of
# this tag" (relay.probe_tag);
# "your probe with this nonce reached me directly" (qp2p/relay.py, moving to a direct path)
KIND_PATH_CHECK: Final = 11
KIND_PATH_OK: Final = 12

# Application error codes on streams (RESET_STREAM / STOP_SENDING).
ERR_FRAME_REJECTED: Final = 0x71_70_01  # the frame broke the wire format or a limit
ERR_CANCELLED: Final = 0x71_70_02  # the sender gave up on the message
ERR_BUFFER_FULL: Final = 0x71_70_03  # unfinished messages filled the receiver's buffer
# the sender's engine lost track of the stream (a RESET_STREAM); in a receipt: the receiver
# dropped it unread, so the sender may send the message again (see Connection)
ERR_STALLED: Final = 0x71_70_04

# Connection close codes (application CONNECTION_CLOSE).
CLOSE_NORMAL: Final = 0
CLOSE_INTERNAL_ERROR: Final = 1  # our engine failed on this connection (a bug): closed


def encode_receipt(stream_id: int, code: int) -> bytes:
    """One receipt entry: the stream's id and the code (0: accepted), as QUIC varints
    (the fast path's; ``ValueError`` outside ``0..2**62-1``)."""
    encoded: bytes = _speedups.impl.encode_receipt(stream_id, code)
    return encoded


def parse_receipts(payload: bytes) -> list[tuple[int, int]]:
    """The entries of a receipt frame; ``ProtocolError`` for a malformed one (the fast
    path's)."""
    entries: list[tuple[int, int]] = _speedups.impl.parse_receipts(payload)
    return entries


def encode_varint(value: int) -> bytes:
    """``value`` as a QUIC variable-length integer (RFC 9000 §16)."""
    if value < 0x40:
        return bytes([value])
    if value < 0x4000:
        return (value | 0x4000).to_bytes(2, "big")
    if value < 0x4000_0000:
        return (value | 0x8000_0000).to_bytes(4, "big")
    return (value | 0xC000_0000_0000_0000).to_bytes(8, "big")


def as_bytes(name: str, value: object) -> bytes:
    """``value`` as ``bytes``; ``TypeError`` for anything not bytes-like."""
    if isinstance(value, bytes):
        return value
    if not isinstance(value, str):
        try:
            return memoryview(value).tobytes()  # type: ignore[arg-type]  # any buffer
        except TypeError:
            pass
    raise TypeError(f"{name} must be bytes-like, not {type(value).__name__}")


def check_message(
    header: bytes,
    dst: bytes,
    payload: bytes,
    max_message_size: int,
    limit_name: str = "max_message_size",
) -> int:
    """Validate a message before anything is sent; returns its framed size.

    ``max_message_size`` counts header+dst+payload (API.md), not the 16-byte frame header;
    ``limit_name`` names it in the error.
    """
    if not payload:
        raise ValueError("payload must not be empty")
    size = len(header) + len(dst) + len(payload)
    if size > max_message_size:
        raise MessageTooLarge(
            f"message of {size} bytes (header+dst+payload) exceeds {limit_name} of "
            f"{max_message_size}"
        )
    return FRAME_HEADER_LEN + size


def parse_address(text: str) -> Address:
    """``"host:port"`` or ``"[v6]:port"`` as ``(host, port)``: qp2p's one parser of address
    text (parameters, the command line, control messages). ``ValueError`` unless the
    port is 0-65535 and an IPv6 address is in brackets."""
    host, sep, port_text = text.strip().rpartition(":")
    if not sep or not host:
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"write an IPv6 address in brackets, e.g. [::1]:5000, got {text!r}")
    if not host or not (port_text.isascii() and port_text.isdigit()) or int(port_text) > 65535:
        raise ValueError(f"bad address {text!r}")
    return host, int(port_text)


def to_address(addr: object) -> Address:
    """``(host, port)`` from a tuple/list or address text (:func:`parse_address`);
    ``ValueError`` (or ``TypeError`` for other types) otherwise."""
    if isinstance(addr, str):
        return parse_address(addr)
    if isinstance(addr, (tuple, list)) and len(addr) >= 2:
        try:
            return str(addr[0]), int(addr[1])
        except (TypeError, ValueError):
            raise ValueError(f"not a (host, port) address: {addr!r}") from None
    raise TypeError(f"an address is a (host, port) tuple or 'host:port', not {addr!r}")


def addr_text(addr: SockAddr) -> str:
    """``host:port`` (``[v6]:port``) for messages and logs."""
    return format_addr(addr).decode("ascii")


def format_addr(addr: SockAddr) -> bytes:
    """``host:port`` text (``[v6]:port`` for IPv6), the echo service's answer."""
    host, port = str(addr[0]), int(addr[1])
    if host.startswith("::ffff:") and "." in host:
        host = host[len("::ffff:") :]
    text = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    return text.encode("ascii")


def parse_addr(data: bytes) -> Address:
    """The inverse of :func:`format_addr` (a control message's address, never port 0);
    ``ProtocolError`` for junk."""
    try:
        host, port = parse_address(data.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ProtocolError(f"malformed address in control message: {data[:64]!r}") from None
    if port == 0:
        raise ProtocolError(f"malformed address in control message: {data[:64]!r}")
    return (host, port)
