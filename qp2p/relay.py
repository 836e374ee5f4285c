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
import collections
import ipaddress
import logging
import os
import socket
from typing import TYPE_CHECKING, Any

from . import holepunch, wire
from .errors import (
    ConnectionError,
    HolePunchFailed,
    MessageRejected,
    PeerAuthenticationError,
    ProtocolError,
)
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
    "UPGRADE_ATTEMPTS",
    "UPGRADE_INTERVAL",
    "Relays",
    "connect_relayed",
    "is_probe",
    "is_wrapped",
    "start_upgrade",
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

#: Moving a relayed connection to a direct path: each peer probes the other's address (as
#: the relay saw it) with ``PROBE_MARKER`` + a 16-byte nonce on ``holepunch.PROBE_SCHEDULE``
#: and tells the peer the nonce inside the connection (``KIND_PATH_CHECK``); a peer that got
#: both answers ``KIND_PATH_OK``, and the prober then sends straight there. Tried every
#: ``UPGRADE_INTERVAL`` seconds, ``UPGRADE_ATTEMPTS`` times, while the connection is relayed.
PROBE_MARKER = 0x01
PROBE_LEN = 1 + 16
UPGRADE_INTERVAL = 5.0
UPGRADE_ATTEMPTS = 12
#: Nonces of raw probes remembered (and checks waiting for theirs), oldest dropped first.
MAX_PROBES_SEEN = 256

OK, ERR = b"ok", b"err"


def is_probe(data: bytes) -> bool:
    """The datagram is a direct-path probe (QUIC bit clear, exactly ``PROBE_LEN``)."""
    return len(data) == PROBE_LEN and data[0] == PROBE_MARKER


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


class _Path:
    """One relayed path, on a peer: through which relay and session, the peer's address
    as the relay saw it (where we probe for a direct path), and, once a probe proved it,
    the direct address our packets now go to."""

    __slots__ = ("attempt", "candidate", "direct", "nonce", "placeholder", "probed", "relay",
                 "sid", "timer")

    def __init__(self, relay: Connection, sid: bytes, placeholder: Address,
                 candidate: Address | None) -> None:
        self.relay, self.sid, self.placeholder, self.candidate = (
            relay, sid, placeholder, candidate)
        self.direct: Address | None = None
        self.nonce: bytes | None = None  # our current probe's
        self.probed: Address | None = None  # where it went
        self.attempt = 0
        self.timer: asyncio.TimerHandle | None = None  # the next attempt


class Relays:
    """One endpoint's relay state: as a relay, the sessions it forwards and what it
    forwarded; as a peer, its relayed paths (placeholder address <-> relay connection and
    session id) and the probes for a direct path."""

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
        # peer role: placeholder (host, port), the relayed connection's remote_addr -> path
        self.paths: dict[Any, _Path] = {}
        self.by_session: dict[bytes, _Path] = {}
        # direct-path probes: nonces seen on raw probes (-> source), and the peer's own
        # checks waiting for their probe (-> path); both bounded
        self.probes_seen: collections.OrderedDict[bytes, Address] = collections.OrderedDict()
        self.checks: collections.OrderedDict[bytes, Connection] = collections.OrderedDict()

    # -- peer role: placeholder addresses --------------------------------------------

    def add_path(self, relay: Connection, sid: bytes,
                 candidate: Address | None = None) -> Address:
        """A new placeholder address for the path through ``relay``'s session ``sid``
        (``candidate``: the peer's address as the relay sees it)."""
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
        path = _Path(relay, sid, addr, candidate)
        self.paths[addr[:2]] = path
        self.by_session[sid] = path
        return addr

    def drop_path(self, addr: Any) -> None:
        path = self.paths.pop(addr[:2], None)
        if path is not None:
            self.by_session.pop(path.sid, None)

    def path_of(self, addr: Any) -> _Path | None:
        return self.paths.get(addr[:2])

    def path_for(self, data: bytes, addr: Any) -> Any:
        """The placeholder address of the relayed path a wrapped datagram from ``addr``
        arrived on (it must come from that path's relay), or None."""
        path = self.by_session.get(bytes(data[1:HEADER_LEN]))
        if path is None or not _same(addr, path.relay.remote_addr):
            return None
        return path.placeholder

    def paths_through(self, relay: Connection) -> int:
        return sum(1 for p in self.paths.values() if p.relay is relay)

    def wrap(self, datagrams: list[tuple[bytes, Any]]) -> list[tuple[bytes, Any]]:
        """``datagrams`` with those bound for a placeholder address wrapped for its relay,
        or sent to the path's direct address once it has one."""
        paths = self.paths
        out = []
        for data, addr in datagrams:
            path = paths.get(addr[:2])
            if path is None:
                out.append((data, addr))
            elif path.direct is not None:
                out.append((data, path.direct))
            else:
                out.append((b"\x00" + path.sid + data, path.relay.remote_addr))
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
        # paths through it end, except those that moved to a direct path
        for addr in [a for a, p in self.paths.items() if p.relay is conn and p.direct is None]:
            self.drop_path(addr)
        self.drop_path(conn.remote_addr)  # a relayed connection itself
        for nonce in [n for n, c in self.checks.items() if c is conn]:
            del self.checks[nonce]

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
    offer_frame = endpoint._fp.encode_frame(  # the session, and where the dialler is
        conn.peer_id.digest if conn.peer_id is not None else b"", b"",
        sid + wire.format_addr(conn.remote_addr), wire.KIND_RELAY_OFFER,
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
    _answer(endpoint, offer.dialler, offer.stream_id, OK,
            sid + wire.format_addr(conn.remote_addr))
    logger.debug("relaying between %s and %s", offer.dialler.remote_addr, conn.remote_addr)


def on_relay_offer(endpoint: Endpoint, relays: Relays, conn: Connection, header: bytes,
                   payload: bytes, registered: bool) -> None:
    """Target side: the relay ``conn`` offers a session from the peer ``header``.

    ``registered``: ``conn`` is a relay we may take offers from (the introductions rule)."""
    if len(payload) < SESSION_LEN:
        return
    sid = bytes(payload[:SESSION_LEN])
    candidate = _candidate(endpoint, conn, bytes(payload[SESSION_LEN:]))
    accept = (registered and endpoint._accepts_incoming() and not endpoint.is_closed
              and relays.paths_through(conn) < MAX_PATHS_PER_RELAY
              and sid not in relays.by_session)
    if accept:
        addr = relays.add_path(conn, sid, candidate)
        logger.debug("relayed path from %s through %s: %s", header.hex()[:16],
                     conn.remote_addr, addr)

        def unused() -> None:  # no connection came over the path: drop it
            path = relays.path_of(addr)
            if path is not None and path.sid == sid and not endpoint._has_connection(addr):
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
    if reply.header != OK or len(reply.payload) < SESSION_LEN:
        reason = bytes(reply.payload).decode("utf-8", "replace")[:200]
        raise HolePunchFailed(f"relay {relay_addr}: {reason}")
    payload = bytes(reply.payload)
    addr = relays.add_path(relay, payload[:SESSION_LEN],
                           _candidate(endpoint, relay, payload[SESSION_LEN:]))
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


def _candidate(endpoint: Endpoint, relay: Connection, text: bytes) -> Address | None:
    """The peer's address as the relay saw it (where we probe for a direct path), if it
    is one we may send to on the relay's word (``holepunch.numeric_target``)."""
    if not text:
        return None
    try:
        return holepunch.numeric_target(text, relay.remote_addr, endpoint._sock.family)
    except ProtocolError:
        return None


# -- moving to a direct path ----------------------------------------------------------


def start_upgrade(endpoint: Endpoint, relays: Relays, conn: Connection) -> None:
    """``conn`` (relayed) is established: keep probing for a direct path."""
    path = relays.path_of(conn.remote_addr)
    if path is not None and path.candidate is not None and path.direct is None:
        _attempt(endpoint, relays, conn, path)


def _attempt(endpoint: Endpoint, relays: Relays, conn: Connection, path: _Path) -> None:
    if (conn.is_closed or endpoint.is_closed or path.direct is not None
            or path.attempt >= UPGRADE_ATTEMPTS or relays.path_of(conn.remote_addr) is not path
            or path.candidate is None):
        return
    path.attempt += 1
    if path.timer is not None:
        path.timer.cancel()
    nonce = os.urandom(PROBE_LEN - 1)
    path.nonce, path.probed = nonce, path.candidate
    conn._send_nowait(endpoint._fp.encode_frame(b"", b"", nonce, wire.KIND_PATH_CHECK))
    probe = bytes([PROBE_MARKER]) + nonce
    loop = endpoint._loop
    for delay in holepunch.PROBE_SCHEDULE:
        loop.call_later(delay, _probe, endpoint, path, nonce, probe)
    path.timer = loop.call_later(UPGRADE_INTERVAL, _attempt, endpoint, relays, conn, path)


def _probe(endpoint: Endpoint, path: _Path, nonce: bytes, probe: bytes) -> None:
    if path.nonce == nonce and path.direct is None and path.probed is not None \
            and not endpoint.is_closed:
        endpoint._send_raw(probe, path.probed)


def on_probe(endpoint: Endpoint, relays: Relays, data: bytes, addr: Address) -> None:
    """A raw probe from ``addr``: remember its nonce; if the peer already told us it
    (inside a relayed connection), the peer reaches us directly from ``addr``."""
    nonce = bytes(data[1:])
    seen = relays.probes_seen
    if nonce in seen:
        return
    seen[nonce] = addr
    if len(seen) > MAX_PROBES_SEEN:
        seen.popitem(last=False)
    conn = relays.checks.pop(nonce, None)
    if conn is not None:
        _confirm(endpoint, relays, conn, nonce, addr)


def on_path_check(endpoint: Endpoint, relays: Relays, conn: Connection,
                  payload: bytes) -> None:
    """The peer of relayed ``conn`` says it probes us with ``payload``."""
    if len(payload) != PROBE_LEN - 1 or relays.path_of(conn.remote_addr) is None:
        return
    nonce = bytes(payload)
    addr = relays.probes_seen.get(nonce)
    if addr is not None:
        _confirm(endpoint, relays, conn, nonce, addr)
        return
    for old in [n for n, c in relays.checks.items() if c is conn]:
        del relays.checks[old]  # one check waiting per connection
    relays.checks[nonce] = conn
    if len(relays.checks) > MAX_PROBES_SEEN:
        relays.checks.popitem(last=False)


def _confirm(endpoint: Endpoint, relays: Relays, conn: Connection, nonce: bytes,
             addr: Address) -> None:
    """The peer's probe came straight from ``addr``: tell it its direction works, and
    probe back there (a symmetric NAT may have given it a port the relay never saw)."""
    path = relays.path_of(conn.remote_addr)
    if path is None or conn.is_closed:
        return
    if path.candidate is not None and str(addr[0]) != str(path.candidate[0]):
        _peer_log.info("probe-elsewhere", "ignoring a direct-path probe from %s: the "
                       "relay saw that peer at %s", wire.addr_text(addr),
                       wire.addr_text(path.candidate))
        return
    conn._send_nowait(endpoint._fp.encode_frame(b"", b"", nonce, wire.KIND_PATH_OK))
    if path.candidate is None or not _same(addr, path.candidate):
        path.candidate = addr
        if path.direct is None:  # our own probes went elsewhere: try there at once
            _attempt(endpoint, relays, conn, path)


def on_path_ok(endpoint: Endpoint, relays: Relays, conn: Connection, payload: bytes) -> None:
    """The peer got our current probe straight: send to it directly from now on."""
    path = relays.path_of(conn.remote_addr)
    if (path is None or path.direct is not None or path.nonce is None
            or bytes(payload) != path.nonce or path.probed is None):
        return
    path.direct = path.probed
    conn._set_path("direct")
    logger.info("connection with %s moved from relay %s to a direct path at %s",
                conn.peer_id, wire.addr_text(path.relay.remote_addr),
                wire.addr_text(path.direct))
    endpoint._mark_dirty(conn)
