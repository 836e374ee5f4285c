"""NAT traversal: a rendezvous endpoint introduces two of its peers, which then open
their NAT mappings toward each other at the same moment and connect directly.

Protocol (control frames, DESIGN.md §3):

1. dialler -> rendezvous, on a bidirectional stream: ``INTRODUCE_REQUEST``, payload = the
   target's 32-byte peer id;
2. rendezvous -> target, on a unidirectional stream: ``INTRODUCTION``, header = the
   dialler's peer id (or empty), payload = the dialler's address as the rendezvous sees it;
3. rendezvous -> dialler, the reply: ``INTRODUCE_RESPONSE``, header ``ok`` and payload =
   the target's observed address, or header ``err`` and payload = the reason.

The target then sends a burst of probe datagrams from its endpoint socket to the
dialler's address (opening its own NAT's mapping); the dialler dials the target's
address with its first flight resent every ``PUNCH_RESEND_INTERVAL`` (the first copies
are often dropped by the far NAT until the target's probes open it; DESIGN.md §7).
No application data passes through the rendezvous.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING, Any

from . import wire
from .errors import (
    ConnectionError,
    HolePunchFailed,
    MessageRejected,
    PeerAuthenticationError,
    ProtocolError,
)
from .identity import PeerId
from .wire import format_addr, parse_addr

if TYPE_CHECKING:
    from .connection import Connection
    from .endpoint import Endpoint

__all__ = ["connect_via", "on_introduce_request", "on_introduction"]

logger = logging.getLogger("qp2p.holepunch")

Address = tuple[Any, ...]

#: How often the dialler resends its first flight while punching, and for how long the
#: target sends probes (every interval) after an introduction.
PUNCH_RESEND_INTERVAL = 0.025
PROBE_INTERVAL = 0.025
PROBE_DURATION = 1.5

OK, ERR = b"ok", b"err"


def on_introduce_request(
    endpoint: Endpoint, conn: Connection, payload: bytes, stream_id: int
) -> None:
    """Rendezvous side: introduce ``conn``'s peer to the peer it asks for."""
    if not endpoint.rendezvous:
        logger.info("refusing introduction request from %s: not a rendezvous", conn.remote_addr)
        conn._quic.reject_stream(stream_id, wire.ERR_FRAME_REJECTED)
        endpoint._mark_dirty(conn)
        return
    if len(payload) != 32:
        _answer(endpoint, conn, stream_id, ERR, b"malformed peer id")
        return
    wanted = PeerId(payload)
    target = next(
        (c for c in endpoint.connections() if c.peer_id == wanted and c is not conn), None
    )
    if target is None:
        _answer(endpoint, conn, stream_id, ERR, f"unknown peer id {wanted}".encode())
        return
    introduction = endpoint._fp.encode_frame(
        conn.peer_id.digest if conn.peer_id is not None else b"",
        b"",
        format_addr(conn.remote_addr),
        wire.KIND_INTRODUCTION,
    )
    target._send_nowait(introduction)
    _answer(endpoint, conn, stream_id, OK, format_addr(target.remote_addr))
    logger.debug("introduced %s to %s", conn.remote_addr, target.remote_addr)


def _answer(endpoint: Endpoint, conn: Connection, stream_id: int, status: bytes,
            payload: bytes) -> None:
    frame = endpoint._fp.encode_frame(status, b"", payload, wire.KIND_INTRODUCE_RESPONSE)
    conn._reply_nowait(stream_id, frame)


def on_introduction(endpoint: Endpoint, conn: Connection, payload: bytes) -> None:
    """Target side: a rendezvous says a peer is about to dial us; open our NAT toward it.

    Only a peer we dialled ourselves (our rendezvous) may ask: otherwise any peer could
    make us send probes to an address of its choosing."""
    if not conn._is_client:
        logger.info("ignoring introduction from %s, a peer we did not dial", conn.remote_addr)
        return
    try:
        addr = parse_addr(payload)
    except ProtocolError as exc:
        logger.warning("ignoring malformed introduction from %s: %s", conn.remote_addr, exc)
        return
    if endpoint.is_closed:
        return
    logger.debug("introduced to %s by %s: probing", addr, conn.remote_addr)
    loop = endpoint._loop
    stop_at = loop.time() + PROBE_DURATION

    def probe() -> None:
        if endpoint.is_closed or loop.time() > stop_at:
            return
        if endpoint._pool.get(addr) is not None:  # the direct connection formed
            return
        # a short-header-looking datagram for no connection: the dialler's endpoint drops
        # it silently, but our NAT now maps our socket toward the dialler
        endpoint._send_raw(bytes([0x40 | (os.urandom(1)[0] & 0x3F)]) + os.urandom(24), addr)
        loop.call_later(PROBE_INTERVAL, probe)

    probe()


async def connect_via(
    endpoint: Endpoint, rendezvous_addr: Address | str, peer_id: PeerId
) -> Connection:
    """Dialler side: ask the rendezvous for ``peer_id`` and punch a direct connection."""
    loop = endpoint._loop
    budget = endpoint.config.hole_punch_timeout
    deadline = loop.time() + budget

    def remaining() -> float:
        left = deadline - loop.time()
        if left <= 0:
            raise HolePunchFailed(f"hole punching to {peer_id} took longer than {budget:g}s")
        return left

    try:
        rendezvous = await asyncio.wait_for(endpoint.connect_to(rendezvous_addr), remaining())
    except (ConnectionError, asyncio.TimeoutError) as exc:
        if isinstance(exc, (HolePunchFailed, PeerAuthenticationError)):
            raise  # an untrusted rendezvous says so, not "unreachable"
        raise HolePunchFailed(f"rendezvous {rendezvous_addr} unreachable: {exc}") from exc
    for conn in endpoint.connections():
        if conn.peer_id == peer_id and conn is not rendezvous:
            return conn  # already connected to that peer
    request = endpoint._fp.encode_frame(b"", b"", peer_id.digest, wire.KIND_INTRODUCE_REQUEST)
    try:
        reply: Any = await rendezvous._request_frame(request, remaining())
    except MessageRejected as exc:
        raise HolePunchFailed(
            f"rendezvous {rendezvous_addr} refused to introduce peers (not a rendezvous)"
        ) from exc
    except asyncio.TimeoutError as exc:
        raise HolePunchFailed(f"rendezvous {rendezvous_addr} did not answer in time") from exc
    if getattr(reply, "kind", None) != wire.KIND_INTRODUCE_RESPONSE:
        raise HolePunchFailed(f"rendezvous {rendezvous_addr} answered with a user message")
    if reply.header != OK:
        reason = reply.payload.decode("utf-8", "replace")
        raise HolePunchFailed(f"rendezvous {rendezvous_addr}: {reason}")
    try:
        target = parse_addr(reply.payload)
        target = await endpoint._resolve(target)
    except ProtocolError as exc:
        raise HolePunchFailed(f"rendezvous sent a malformed address: {exc}") from exc
    try:
        return await endpoint._dial(target, peer_id, remaining(), punch=True)
    except PeerAuthenticationError as exc:
        raise HolePunchFailed(f"the peer at {wire.addr_text(target)} is not {peer_id}: {exc}") \
            from exc
    except (asyncio.TimeoutError, ConnectionError) as exc:
        raise HolePunchFailed(
            f"no direct path to {peer_id} at {wire.addr_text(target)} within {budget:g}s "
            "(are both NATs endpoint-independent?)"
        ) from exc
