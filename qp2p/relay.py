"""Relayed connections: when no direct path can be made, QUIC packets travel through a
relay peer (an endpoint bound with ``relay=True``), which forwards them opaque.

The relay never holds keys: the relayed connection is an ordinary QUIC connection between
the two peers (TLS 1.3, mutual authentication, end to end) whose packets are wrapped for
the hop through the relay. A wrapped datagram is::

    0x00 | session id (8 bytes) | one QUIC datagram

The first byte has the QUIC bit (0x40) clear, which no QUIC v1 packet has (RFC 9000 §17;
we never negotiate RFC 9287's greasing), so wrapped and plain datagrams share one socket.

Control (qp2p frames, DESIGN.md §3; kinds in ``wire``):

1. the dialler asks the relay on a bidirectional stream (``KIND_RELAY_REQUEST``, payload the
   target's peer id);
2. the relay offers the session to the target (``KIND_RELAY_OFFER``, uni; header the
   dialler's peer id, payload the session id);
3. the target accepts or declines (``KIND_RELAY_ACCEPT``, uni; header ``ok``/``err``) — it
   accepts only from a relay it dialled that advertises itself as a rendezvous (the rule
   for introductions, ``holepunch.Punching.is_registered``) and only while it accepts
   incoming connections;
4. the relay answers the dialler (``ok`` + session id, or ``err`` + reason).

The relay forwards a wrapped datagram only within a session both peers asked for, only
from the address of one side's QUIC connection to it (validated by that connection's
handshake) and only to the other side's: it sends at most what it received, never to an
address a peer names. Each session and the relay as a whole are held to a byte rate
(token buckets), and sessions are limited per peer and in total (constants below; README
"Relayed connections").

On each peer, a relayed path is given a placeholder address in 240.0.0.0/4 (reserved,
never routed): the engine and the pool see an ordinary, distinct address, and the
endpoint wraps what it sends there and unwraps what arrives from the relay.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
from typing import TYPE_CHECKING, Any

from . import wire
from .errors import ConnectionError, HolePunchFailed, MessageRejected, PeerAuthenticationError
from .identity import PeerId
from .ratelog import RateLimitedLog

if TYPE_CHECKING:  # pragma: no cover
    from .connection import Connection
    from .endpoint import Endpoint

__all__ = [
    "HEADER_LEN",
    "MAX_PATHS_PER_RELAY",
    "MAX_SESSIONS",
    "MAX_SESSIONS_PER_PEER",
    "RELAY_BURST",
    "RELAY_RATE",
    "SESSION_BURST",
    "SESSION_IDLE",
    "SESSION_RATE",
    "Relays",
    "connect_relayed",
    "is_wrapped",
]

logger = logging.getLogger("qp2p.relay")
_peer_log = RateLimitedLog(logger)

Address = wire.SockAddr

MARKER = 0x00
SESSION_LEN = 8
HEADER_LEN = 1 + SESSION_LEN

#: Sessions a relay forwards at once, in all and per peer (as either side).
MAX_SESSIONS = 256
MAX_SESSIONS_PER_PEER = 8
#: Bytes per second (and burst) one session may have forwarded, and the relay in all.
SESSION_RATE = 4 * 2**20
SESSION_BURST = 512 * 2**10
RELAY_RATE = 32 * 2**20
RELAY_BURST = 4 * 2**20
#: Seconds without a forwarded packet after which a session ends, when the relay's
#: ``idle_timeout`` is None (otherwise that).
SESSION_IDLE = 60.0
#: Relayed paths a peer keeps through one relay (offers beyond it are declined).
MAX_PATHS_PER_RELAY = 16

OK, ERR = b"ok", b"err"


def is_wrapped(data: bytes) -> bool:
    """The datagram is a relay wrapping (QUIC bit clear), not a QUIC packet."""
    return len(data) > HEADER_LEN and data[0] == MARKER


class _Bucket:
    """A token bucket of bytes."""

    __slots__ = ("burst", "rate", "stamp", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst, self.tokens, self.stamp = rate, burst, burst, now

    def take(self, nbytes: int, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        if self.tokens < nbytes:
            return False
        self.tokens -= nbytes
        return True


class _Session:
    """One forwarding session, on the relay."""

    __slots__ = ("bucket", "dialler", "last", "target")

    def __init__(self, dialler: Connection, target: Connection, now: float) -> None:
        self.dialler, self.target = dialler, target
        self.bucket = _Bucket(SESSION_RATE, SESSION_BURST, now)
        self.last = now  # when it last forwarded


class _Offer:
    """A session the relay offered a target and is waiting for it to accept."""

    __slots__ = ("dialler", "stream_id", "target", "timer")

    def __init__(self, dialler: Connection, target: Connection, stream_id: int,
                 timer: asyncio.TimerHandle) -> None:
        self.dialler, self.target, self.stream_id, self.timer = (
            dialler, target, stream_id, timer)


class Relays:
    """One endpoint's relay state: as a relay, the sessions it forwards and what it
    forwarded; as a peer, its relayed paths (placeholder address <-> relay connection and
    session id)."""

    def __init__(self, family: int, now: float, counters: dict[str, int]) -> None:
        self.family = family
        self.sessions: dict[bytes, _Session] = {}
        self.offers: dict[bytes, _Offer] = {}
        self.per_peer: dict[Connection, int] = {}
        self.bucket = _Bucket(RELAY_RATE, RELAY_BURST, now)
        # the endpoint's counters: what we forwarded, and what we dropped (spoofed source,
        # over a rate)
        self.counters = counters
        for key in ("relayed_packets", "relayed_bytes", "relay_dropped"):
            counters.setdefault(key, 0)
        # peer role
        # placeholder (host, port) -> (relay, sid); the relayed connection's remote_addr
        self.paths: dict[Any, tuple[Connection, bytes]] = {}
        self.by_session: dict[bytes, tuple[Any, Connection]] = {}  # sid -> (placeholder, relay)

    # -- peer role: placeholder addresses --------------------------------------------

    def add_path(self, relay: Connection, sid: bytes) -> Address:
        """A new placeholder address for the path through ``relay``'s session ``sid``."""
        while True:
            raw = os.urandom(6)
            host = str(ipaddress.IPv4Address(bytes([0xF0 | (raw[0] & 0x0F)]) + raw[1:4]))
            port = 1 + int.from_bytes(raw[4:6], "big") % 65535
            addr: Address
            if self.family == socket.AF_INET6:
                addr = (f"::ffff:{host}", port, 0, 0)
            else:
                addr = (host, port)
            if addr[:2] not in self.paths:
                break
        self.paths[addr[:2]] = (relay, sid)
        self.by_session[sid] = (addr, relay)
        return addr

    def drop_path(self, addr: Any) -> None:
        entry = self.paths.pop(addr[:2], None)
        if entry is not None:
            self.by_session.pop(entry[1], None)

    def path_for(self, data: bytes, addr: Any) -> Any:
        """The placeholder address of the relayed path a wrapped datagram from ``addr``
        arrived on (it must come from that path's relay), or None."""
        entry = self.by_session.get(bytes(data[1:HEADER_LEN]))
        if entry is None or not _same(addr, entry[1].remote_addr):
            return None
        return entry[0]

    def paths_through(self, relay: Connection) -> int:
        return sum(1 for r, _ in self.paths.values() if r is relay)

    def wrap(self, datagrams: list[tuple[bytes, Any]]) -> list[tuple[bytes, Any]]:
        """``datagrams`` with those bound for a placeholder address wrapped for its relay."""
        paths = self.paths
        out = []
        for data, addr in datagrams:
            entry = paths.get(addr[:2])
            if entry is None:
                out.append((data, addr))
            else:
                relay, sid = entry
                out.append((b"\x00" + sid + data, relay.remote_addr))
        return out

    def is_relayed(self, addr: Any) -> bool:
        return addr[:2] in self.paths

    # -- both roles -------------------------------------------------------------------

    def forget(self, conn: Connection) -> None:
        """``conn`` is gone: end the sessions and paths that ran over it (or on it)."""
        for sid in [s for s, v in self.sessions.items() if conn in (v.dialler, v.target)]:
            self._end_session(sid)
        for sid in [s for s, o in self.offers.items() if conn in (o.dialler, o.target)]:
            offer = self.offers.pop(sid)
            offer.timer.cancel()
        self.per_peer.pop(conn, None)
        for addr in [a for a, (r, _) in self.paths.items() if r is conn]:
            self.drop_path(addr)
        self.drop_path(conn.remote_addr)  # a relayed connection itself

    def sweep(self, now: float, idle: float) -> None:
        """End the sessions that forwarded nothing for ``idle`` seconds (the relay cannot
        see the relayed connection close: its packets are opaque)."""
        for sid in [s for s, v in self.sessions.items() if now - v.last > idle]:
            self._end_session(sid)

    def _end_session(self, sid: bytes) -> None:
        session = self.sessions.pop(sid, None)
        if session is not None:
            for side in (session.dialler, session.target):
                left = self.per_peer.get(side, 0) - 1
                if left > 0:
                    self.per_peer[side] = left
                else:
                    self.per_peer.pop(side, None)



# -- the data plane (called by the endpoint for datagrams that matched no connection) --


def forward(endpoint: Endpoint, relays: Relays, data: bytes, addr: Address,
            now: float) -> bool:
    """A wrapped datagram from ``addr`` for a session we relay: forward it to the other
    side. Returns False when it is no such session's (the caller then looks for one of
    its own relayed paths, ``Relays.path_for``)."""
    session = relays.sessions.get(bytes(data[1:HEADER_LEN]))
    if session is None:
        return False
    if _same(addr, session.dialler.remote_addr):
        dst = session.target
    elif _same(addr, session.target.remote_addr):
        dst = session.dialler
    else:  # not from either side's address: spoofed, or a stale path
        relays.counters["relay_dropped"] += 1
        return True
    size = len(data)
    if not session.bucket.take(size, now) or not relays.bucket.take(size, now):
        relays.counters["relay_dropped"] += 1
        return True
    session.last = now
    relays.counters["relayed_packets"] += 1
    relays.counters["relayed_bytes"] += size
    endpoint._send_raw(bytes(data), dst.remote_addr)
    return True


def _same(a: Any, b: Any) -> bool:
    return bool(a[0] == b[0] and a[1] == b[1])


# -- the control plane -----------------------------------------------------------------


def on_relay_request(endpoint: Endpoint, relays: Relays, conn: Connection, payload: bytes,
                     stream_id: int) -> None:
    """Relay side: ``conn``'s peer asks us to relay to the peer whose id is ``payload``."""
    if not endpoint.relay:
        _answer(endpoint, conn, stream_id, ERR, b"not a relay")
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
    relays.sweep(endpoint._loop.time(), endpoint.config.idle_timeout or SESSION_IDLE)
    if (len(relays.sessions) + len(relays.offers) >= MAX_SESSIONS
            or relays.per_peer.get(conn, 0) >= MAX_SESSIONS_PER_PEER
            or relays.per_peer.get(target, 0) >= MAX_SESSIONS_PER_PEER):
        _answer(endpoint, conn, stream_id, ERR, b"relay busy: too many sessions")
        return
    sid = os.urandom(SESSION_LEN)
    offer_frame = endpoint._fp.encode_frame(
        conn.peer_id.digest if conn.peer_id is not None else b"", b"", sid,
        wire.KIND_RELAY_OFFER,
    )
    if target._send_nowait(offer_frame) is None:
        _answer(endpoint, conn, stream_id, ERR, b"target is gone")
        return

    def expire() -> None:
        if relays.offers.pop(sid, None) is not None:
            _answer(endpoint, conn, stream_id, ERR, b"target did not accept in time")

    timer = endpoint._loop.call_later(endpoint.config.handshake_timeout, expire)
    relays.offers[sid] = _Offer(conn, target, stream_id, timer)
    for side in (conn, target):  # an offer counts toward the per-peer limit
        relays.per_peer[side] = relays.per_peer.get(side, 0) + 1


def on_relay_accept(endpoint: Endpoint, relays: Relays, conn: Connection, header: bytes,
                    payload: bytes) -> None:
    """Relay side: a target answers our offer ``payload``; only that target may."""
    offer = relays.offers.get(bytes(payload))
    if offer is None or offer.target is not conn:
        return
    sid = bytes(payload)
    del relays.offers[sid]
    offer.timer.cancel()
    if header != OK:
        for side in (offer.dialler, offer.target):
            left = relays.per_peer.get(side, 0) - 1
            if left > 0:
                relays.per_peer[side] = left
            else:
                relays.per_peer.pop(side, None)
        _answer(endpoint, offer.dialler, offer.stream_id, ERR, b"the target declined")
        return
    relays.sessions[sid] = _Session(offer.dialler, conn, endpoint._loop.time())
    _answer(endpoint, offer.dialler, offer.stream_id, OK, sid)
    logger.debug("relaying between %s and %s", offer.dialler.remote_addr, conn.remote_addr)


def on_relay_offer(endpoint: Endpoint, relays: Relays, conn: Connection, header: bytes,
                   payload: bytes, registered: bool) -> None:
    """Target side: the relay ``conn`` offers a session from the peer ``header``.

    ``registered``: ``conn`` is a relay we may take offers from (the introductions rule)."""
    if len(payload) != SESSION_LEN:
        return
    sid = bytes(payload)
    accept = (registered and endpoint._accepts_incoming() and not endpoint.is_closed
              and relays.paths_through(conn) < MAX_PATHS_PER_RELAY
              and sid not in relays.by_session)
    if accept:
        addr = relays.add_path(conn, sid)
        logger.debug("relayed path from %s through %s: %s", header.hex()[:16],
                     conn.remote_addr, addr)

        def unused() -> None:  # no connection came over the path: drop it
            if relays.paths.get(addr[:2]) == (conn, sid) and not endpoint._has_connection(addr):
                relays.drop_path(addr)

        endpoint._loop.call_later(2 * endpoint.config.handshake_timeout, unused)
    else:
        _peer_log.info("relay-offer-declined", "declining a relayed session from %s",
                       wire.addr_text(conn.remote_addr))
    frame = endpoint._fp.encode_frame(OK if accept else ERR, b"", sid, wire.KIND_RELAY_ACCEPT)
    conn._send_nowait(frame)


def _answer(endpoint: Endpoint, conn: Connection, stream_id: int, status: bytes,
            payload: bytes) -> None:
    frame = endpoint._fp.encode_frame(status, b"", payload, wire.KIND_RELAY_RESPONSE)
    conn._reply_nowait(stream_id, frame)


async def connect_relayed(endpoint: Endpoint, relays: Relays, relay_addr: Address | str,
                          peer_id: PeerId, timeout: float) -> Connection:
    """Dialler side: a connection to ``peer_id`` whose packets go through the relay at
    ``relay_addr``; ``HolePunchFailed`` (a ``ConnectionError``) when it cannot be made."""
    loop = endpoint._loop
    deadline = loop.time() + timeout

    def remaining() -> float:
        left = deadline - loop.time()
        if left <= 0:
            raise HolePunchFailed(f"relaying to {peer_id} took longer than {timeout:g}s")
        return left

    try:
        relay = await asyncio.wait_for(endpoint.connect_to(relay_addr), remaining())
    except (ConnectionError, asyncio.TimeoutError) as exc:
        if isinstance(exc, (HolePunchFailed, PeerAuthenticationError)):
            raise
        raise HolePunchFailed(f"relay {relay_addr} unreachable: {exc}") from exc
    request = endpoint._fp.encode_frame(b"", b"", peer_id.digest, wire.KIND_RELAY_REQUEST)
    try:
        reply: Any = await relay._request_frame(request, remaining())
    except MessageRejected as exc:
        raise HolePunchFailed(f"relay {relay_addr} refused to relay: {exc}") from exc
    except asyncio.TimeoutError as exc:
        raise HolePunchFailed(f"relay {relay_addr} did not answer in time") from exc
    if getattr(reply, "kind", None) != wire.KIND_RELAY_RESPONSE:
        raise HolePunchFailed(f"relay {relay_addr} answered with a user message")
    if reply.header != OK or len(reply.payload) != SESSION_LEN:
        reason = bytes(reply.payload).decode("utf-8", "replace")[:200]
        raise HolePunchFailed(f"relay {relay_addr}: {reason}")
    addr = relays.add_path(relay, bytes(reply.payload))
    try:
        conn = await endpoint._dial(addr, peer_id, remaining())
    except PeerAuthenticationError as exc:
        relays.drop_path(addr)
        raise HolePunchFailed(f"the relayed peer is not {peer_id}: {exc}") from exc
    except (asyncio.TimeoutError, ConnectionError) as exc:
        relays.drop_path(addr)
        raise HolePunchFailed(f"no relayed connection to {peer_id} through {relay_addr}: "
                              f"{exc}") from exc
    logger.info("connected to %s through relay %s", peer_id, wire.addr_text(relay.remote_addr))
    return conn
