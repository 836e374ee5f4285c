"""Relayed connections, the data plane (the endpoint's): when no direct path can be made,
QUIC packets travel through a relay peer (an endpoint bound with ``relay=True``), which
forwards them opaque. The control plane — asking, offering, accepting, probing for a
direct path — is the relay service, :mod:`qp2p.services.relay`.

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
address a peer names. Each session, each source host and the relay as a whole are held
to a byte rate (token buckets), and sessions are limited per peer, per host and in total
(constants below; README "Relayed connections").

On each peer, a relayed path is given a placeholder address in 240.0.0.0/4 (reserved,
never routed): the engine and the pool see an ordinary, distinct address, and the
endpoint wraps what it sends there and unwraps what arrives from the relay.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import ipaddress
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import wire

if TYPE_CHECKING:  # pragma: no cover
    from .connection import Connection

__all__ = [
    "HEADER_LEN",
    "HOST_BURST",
    "HOST_RATE",
    "MAX_PATHS_PER_RELAY",
    "MAX_SESSIONS",
    "MAX_SESSIONS_PER_IP",
    "MAX_SESSIONS_PER_PEER",
    "RELAY_BURST",
    "RELAY_RATE",
    "SESSION_BURST",
    "SESSION_IDLE",
    "SESSION_RATE",
    "UPGRADE_ATTEMPTS",
    "UPGRADE_INTERVAL",
    "Offer",
    "RelayPath",
    "Relays",
    "Session",
    "forward",
    "is_probe",
    "is_wrapped",
    "on_probe",
    "probe_tag",
    "same_address",
]

Address = wire.SockAddr

MARKER = 0x00
SESSION_LEN = 8
HEADER_LEN = 1 + SESSION_LEN

#: Sessions a relay forwards at once, in all and per peer (as either side); per source IP
#: (an IPv4 address, an IPv6 /64, as ``max_connections_per_ip`` counts), so that one host
#: with many peers cannot take every session and leave the relay busy for all others.
MAX_SESSIONS = 256
MAX_SESSIONS_PER_PEER = 8
MAX_SESSIONS_PER_IP = 32
#: Bytes per second (and burst) one session may have forwarded, and the relay in all.
SESSION_RATE = 4 * 2**20
SESSION_BURST = 512 * 2**10
RELAY_RATE = 32 * 2**20
RELAY_BURST = 4 * 2**20
#: Bytes per second (and burst) the relay forwards from one host (``MAX_SESSIONS_PER_IP``'s
#: key) over all its sessions: a quarter of the relay, so one host cannot starve the rest.
HOST_RATE = 8 * 2**20
HOST_BURST = 1 * 2**20
#: Seconds without a forwarded packet after which a session ends, when the relay's
#: ``idle_timeout`` is None (otherwise that).
SESSION_IDLE = 60.0
#: Relayed paths a peer keeps through one relay (offers beyond it are declined).
MAX_PATHS_PER_RELAY = 16

#: Moving a relayed connection to a direct path: each peer probes the other's address (as
#: the relay saw it) with ``PROBE_MARKER`` + a 16-byte nonce on ``holepunch.PROBE_SCHEDULE``
#: and tells the peer only the nonce's tag (``probe_tag``) inside the connection
#: (``KIND_PATH_CHECK``); a peer that got both answers ``KIND_PATH_OK`` with the nonce
#: itself, which only the probe carried — so a peer cannot claim a probe it never got —
#: and the prober then sends straight there. Tried every
#: ``UPGRADE_INTERVAL`` seconds, ``UPGRADE_ATTEMPTS`` times, while the connection is relayed.
PROBE_MARKER = 0x01
PROBE_LEN = 1 + 16
UPGRADE_INTERVAL = 5.0
UPGRADE_ATTEMPTS = 12
#: Nonces of raw probes remembered (and checks waiting for theirs), oldest dropped first.
MAX_PROBES_SEEN = 256

OK, ERR = b"ok", b"err"


def probe_tag(nonce: bytes) -> bytes:
    """What ``KIND_PATH_CHECK`` names of a probe's nonce: a commitment, not the nonce."""
    return hashlib.sha256(b"qp2p path check" + nonce).digest()[:PROBE_LEN - 1]


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


class Session:
    """One forwarding session, on the relay."""

    __slots__ = ("bucket", "dialler", "last", "target")

    def __init__(self, dialler: Connection, target: Connection, now: float) -> None:
        self.dialler, self.target = dialler, target
        self.bucket = _Bucket(SESSION_RATE, SESSION_BURST, now)
        self.last = now  # when it last forwarded


class Offer:
    """A session the relay offered a target and is waiting for it to accept."""

    __slots__ = ("dialler", "stream_id", "target", "timer")

    def __init__(self, dialler: Connection, target: Connection, stream_id: int,
                 timer: asyncio.TimerHandle) -> None:
        self.dialler, self.target, self.stream_id, self.timer = (
            dialler, target, stream_id, timer)


class RelayPath:
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

    def __init__(self, family: int, now: float, counters: dict[str, int],
                 send_raw: Callable[[bytes, Address], None],
                 ip_key: Callable[[Any], str] = str) -> None:
        self.family = family
        self.ip_key = ip_key  # the host a peer's sessions count under
        self.send_raw = send_raw  # the endpoint's socket
        #: the relay service's: a raw probe arrived whose check was waiting (conn, nonce, addr)
        self.on_confirm: Callable[[Connection, bytes, Address], None] | None = None
        self.sessions: dict[bytes, Session] = {}
        self.offers: dict[bytes, Offer] = {}
        self.per_peer: dict[Connection, int] = {}
        self.per_ip: dict[str, int] = {}
        self.host_buckets: dict[str, _Bucket] = {}  # hosts with an offer or session
        self.bucket = _Bucket(RELAY_RATE, RELAY_BURST, now)
        # the endpoint's counters: what we forwarded, and what we dropped (spoofed source,
        # over a rate)
        self.counters = counters
        for key in ("relayed_packets", "relayed_bytes", "relay_dropped"):
            counters.setdefault(key, 0)
        # peer role: placeholder (host, port), the relayed connection's remote_addr -> path
        self.paths: dict[Any, RelayPath] = {}
        self.by_session: dict[bytes, RelayPath] = {}
        # direct-path probes: tags of nonces seen on raw probes (-> nonce, source; None
        # once a check confirmed it: a nonce confirms once), and the peer's checks waiting
        # for their probe (tag -> connection); both bounded
        self.probes_seen: collections.OrderedDict[bytes, tuple[bytes, Address] | None] = (
            collections.OrderedDict())
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
        path = RelayPath(relay, sid, addr, candidate)
        self.paths[addr[:2]] = path
        self.by_session[sid] = path
        return addr

    def drop_path(self, addr: Any) -> None:
        path = self.paths.pop(addr[:2], None)
        if path is not None:
            self.by_session.pop(path.sid, None)

    def path_of(self, addr: Any) -> RelayPath | None:
        return self.paths.get(addr[:2])

    def path_for(self, data: bytes, addr: Any) -> Any:
        """The placeholder address of the relayed path a wrapped datagram from ``addr``
        arrived on (it must come from that path's relay), or None."""
        path = self.by_session.get(bytes(data[1:HEADER_LEN]))
        if path is None or not same_address(addr, path.relay.remote_addr):
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

    # -- both roles -------------------------------------------------------------------

    def forget(self, conn: Connection) -> None:
        """``conn`` is gone: end the sessions and paths that ran over it (or on it)."""
        for sid in [s for s, v in self.sessions.items() if conn in (v.dialler, v.target)]:
            self._end_session(sid)
        for sid in [s for s, o in self.offers.items() if conn in (o.dialler, o.target)]:
            offer = self.offers.pop(sid)
            offer.timer.cancel()
            self.release_peers(offer.dialler, offer.target)
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
            self.release_peers(session.dialler, session.target)

    def hosts(self, *peers: Connection) -> set[str]:
        """The hosts ``peers`` count under (one session between two peers of one host
        counts once)."""
        return {self.ip_key(p.remote_addr[0]) for p in peers}

    def busy(self, *peers: Connection) -> bool:
        """A new offer involving ``peers`` would exceed a limit."""
        return (len(self.sessions) + len(self.offers) >= MAX_SESSIONS
                or any(self.per_peer.get(p, 0) >= MAX_SESSIONS_PER_PEER for p in peers)
                or any(self.per_ip.get(h, 0) >= MAX_SESSIONS_PER_IP
                       for h in self.hosts(*peers)))

    def hold_peers(self, *peers: Connection) -> None:
        """An offer or session involving ``peers`` (toward the per-peer and per-IP
        limits)."""
        for side in peers:
            self.per_peer[side] = self.per_peer.get(side, 0) + 1
        for host in self.hosts(*peers):
            self.per_ip[host] = self.per_ip.get(host, 0) + 1
            if host not in self.host_buckets:
                self.host_buckets[host] = _Bucket(HOST_RATE, HOST_BURST, 0.0)  # starts full

    def release_peers(self, *peers: Connection) -> None:
        """An offer or session involving ``peers`` ended."""
        for side in peers:
            left = self.per_peer.get(side, 0) - 1
            if left > 0:
                self.per_peer[side] = left
            else:
                self.per_peer.pop(side, None)
        for host in self.hosts(*peers):
            left = self.per_ip.get(host, 0) - 1
            if left > 0:
                self.per_ip[host] = left
            else:
                self.per_ip.pop(host, None)
                self.host_buckets.pop(host, None)

    def go_direct(self, path: RelayPath) -> None:
        """Send the path's packets straight to the address its probe reached."""
        path.direct = path.probed

    def placeholder(self, addr: Any) -> Any:
        """The engine's address for a relayed (or formerly relayed) path, else None."""
        path = self.paths.get(addr[:2]) if self.paths else None
        return None if path is None else path.placeholder

    def path_name(self, addr: Any) -> str:
        """``"relayed"`` while a placeholder's packets go through the relay, else
        ``"direct"``."""
        path = self.paths.get(addr[:2]) if self.paths else None
        return "relayed" if path is not None and path.direct is None else "direct"


def forward(relays: Relays, data: bytes, addr: Address, now: float) -> bool:
    """A wrapped datagram from ``addr`` for a session we relay: forward it to the other
    side. Returns False when it is no such session's (the caller then looks for one of
    its own relayed paths, ``Relays.path_for``)."""
    session = relays.sessions.get(bytes(data[1:HEADER_LEN]))
    if session is None:
        return False
    if same_address(addr, session.dialler.remote_addr):
        dst = session.target
    elif same_address(addr, session.target.remote_addr):
        dst = session.dialler
    else:  # not from either side's address: spoofed, or a stale path
        relays.counters["relay_dropped"] += 1
        return True
    size = len(data)
    host = relays.host_buckets.get(relays.ip_key(addr[0]))
    if (not session.bucket.take(size, now) or (host is not None and not host.take(size, now))
            or not relays.bucket.take(size, now)):
        relays.counters["relay_dropped"] += 1
        return True
    session.last = now
    relays.counters["relayed_packets"] += 1
    relays.counters["relayed_bytes"] += size
    relays.send_raw(bytes(data), dst.remote_addr)
    return True


def on_probe(relays: Relays, data: bytes, addr: Address) -> None:
    """A raw probe from ``addr``: remember its nonce; if the peer already told us it
    (inside a relayed connection, as its tag), the peer reaches us directly from
    ``addr``."""
    nonce = bytes(data[1:])
    tag = probe_tag(nonce)
    seen = relays.probes_seen
    if tag in seen:
        return
    conn = relays.checks.pop(tag, None)
    # kept even once confirmed: the rest of the probe train must not confirm it again
    seen[tag] = (nonce, addr) if conn is None else None
    if len(seen) > MAX_PROBES_SEEN:
        seen.popitem(last=False)
    if conn is not None and relays.on_confirm is not None:
        relays.on_confirm(conn, nonce, addr)


def same_address(a: Any, b: Any) -> bool:
    """The same (host, port), whatever the tuples' lengths."""
    return bool(a[0] == b[0] and a[1] == b[1])
