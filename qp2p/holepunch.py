"""NAT traversal: a rendezvous endpoint introduces two of its peers, which then open
their NAT mappings toward each other at the same moment and connect directly.

Protocol (control frames, DESIGN.md §3):

1. dialler -> rendezvous, on a bidirectional stream: ``INTRODUCE_REQUEST``, payload = the
   target's 32-byte peer id;
2. rendezvous -> target, on a unidirectional stream: ``INTRODUCTION``, header = the
   dialler's peer id (or empty), payload = the dialler's address as the rendezvous sees it;
3. rendezvous -> dialler, the reply: ``INTRODUCE_RESPONSE``, header ``ok`` and payload =
   the target's observed address, or header ``err`` and payload = the reason.

The target then sends a short train of probe datagrams from its endpoint socket to the
dialler's address (opening its own NAT's mapping); the dialler dials the target's
address with its first flight resent every ``PUNCH_RESEND_INTERVAL`` for the first
``PUNCH_FAST_PERIOD``, then less and less often (the first copies are often dropped by
the far NAT until the target's probes open it; DESIGN.md §7). No application data passes
through the rendezvous.

What a peer can make us send to an address it names is bounded (a third party must not
be flooded by us on a peer's word):

- a target honours introductions only from a rendezvous it registered with
  (:meth:`Endpoint.register_with`), a dialler only the answer to its own request;
- addresses are numeric (no name resolution), never unspecified, multicast or
  broadcast, and loopback only when the introducer itself is on loopback;
- one probe train per introducer at a time (a new introduction replaces the running
  train after its first probe, which is the one that opens the NAT), at most
  ``len(PROBE_SCHEDULE)`` probes each, and never more probe bytes than
  ``AMPLIFICATION`` times what the introducer has sent us;
- a rendezvous queues at most ``MAX_PENDING_INTRODUCTIONS`` introductions per target
  (a target that grants no streams cannot make it hold more); further requests are
  answered ``err`` at once.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
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
from .ratelog import RateLimitedLog
from .wire import format_addr, parse_addr

if TYPE_CHECKING:
    from .connection import Connection
    from .endpoint import Endpoint

__all__ = ["Punching", "connect_via", "numeric_target", "on_introduce_request",
           "on_introduction"]

logger = logging.getLogger("qp2p.holepunch")
_peer_log = RateLimitedLog(logger)

Address = tuple[Any, ...]

#: The dialler resends its first flight every ``PUNCH_RESEND_INTERVAL`` for
#: ``PUNCH_FAST_PERIOD`` seconds, then doubles the interval each time, at most
#: ``PUNCH_MAX_RESENDS`` times in all: a rendezvous that names a wrong address gets us to
#: send at most that many first flights there.
PUNCH_RESEND_INTERVAL = 0.025
PUNCH_FAST_PERIOD = 1.0
PUNCH_MAX_RESENDS = 48
#: When the target probes after an introduction (seconds after it): the first probe
#: opens its NAT's mapping; the others cover its loss.
PROBE_SCHEDULE = (0.0, 0.025, 0.05, 0.1, 0.2, 0.4, 0.8)
PROBE_SIZE = 25
#: The most probe bytes an introducer may make us send, as a multiple of what it sent us.
AMPLIFICATION = 3
#: Introductions a rendezvous keeps queued for one target (not yet acknowledged).
MAX_PENDING_INTRODUCTIONS = 16


class Punching:
    """One endpoint's hole-punching state: the rendezvous it registered with, the probe
    trains running and what each introducer made us send, and (as a rendezvous) the
    introductions queued per target."""

    def __init__(self) -> None:
        self.registered: set[Address] = set()  # (host, port) of rendezvous we chose
        self.trains: dict[Connection, Address] = {}  # the address each one has us probe
        self.probe_bytes: dict[Connection, int] = {}
        self.queued: dict[Connection, int] = {}

    def register(self, addr: Address) -> None:
        """Honour introductions from the rendezvous we dial at ``addr``; called before
        the dial, so an introduction that arrives with the handshake is heard too."""
        self.registered.add((addr[0], addr[1]))

    def is_registered(self, conn: Connection) -> bool:
        """``conn`` is a connection we dialled to a rendezvous we registered with. Until
        the endpoint registers with one, a peer it dialled that advertised itself as a
        rendezvous (``engine.TP_RENDEZVOUS``) counts: API.md's target reaches its
        rendezvous with plain ``connect_to``. A peer that claims it falsely can make us
        send no more than ``AMPLIFICATION`` times what it sent us."""
        if not conn._is_client:
            return False
        if self.registered:
            return (conn.remote_addr[0], conn.remote_addr[1]) in self.registered
        return conn._quic.peer_parameters().rendezvous

    def forget(self, conn: Connection) -> None:
        """``conn`` is gone: drop everything kept for it (running trains then stop)."""
        self.trains.pop(conn, None)
        self.probe_bytes.pop(conn, None)
        self.queued.pop(conn, None)


def numeric_target(payload: bytes, introducer: Address, family: int) -> Address:
    """The address an introduction names, in the socket's own form; ``ProtocolError``
    unless it is a numeric address we may send to on a peer's word.

    Names are refused (resolving one would block or leak a lookup), and so are the
    unspecified, multicast, broadcast and reserved addresses; loopback and link-local
    ones only when the introducer itself is on loopback (a test or a local setup)."""
    host, port = parse_addr(payload)
    try:
        ip = ipaddress.ip_address(str(host))
    except ValueError:
        raise ProtocolError(f"not a numeric address: {str(host)[:64]!r}") from None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    local = _is_loopback(introducer[0])
    if (ip.is_unspecified or ip.is_multicast or ip.is_reserved
            or ip == ipaddress.IPv4Address("255.255.255.255")):
        raise ProtocolError(f"refusing to send to {ip}")
    if (ip.is_loopback or ip.is_link_local) and not local:
        raise ProtocolError(f"refusing to send to {ip} for a peer that is not local")
    if family == socket.AF_INET6:
        text = f"::ffff:{ip}" if ip.version == 4 else str(ip)
        return (text, port, 0, 0)
    if ip.version == 6:
        raise ProtocolError(f"cannot reach IPv6 {ip} from an IPv4 endpoint")
    return (str(ip), port)


def _is_loopback(host: Any) -> bool:
    try:
        ip = ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback

OK, ERR = b"ok", b"err"


def on_introduce_request(
    endpoint: Endpoint, conn: Connection, payload: bytes, stream_id: int
) -> None:
    """Rendezvous side: introduce ``conn``'s peer to the peer it asks for."""
    if not endpoint.rendezvous:
        _peer_log.info("not-rendezvous", "refusing introduction request from %s: not a "
                       "rendezvous", wire.addr_text(conn.remote_addr))
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
    queued = endpoint._punching.queued
    if queued.get(target, 0) >= MAX_PENDING_INTRODUCTIONS:
        _answer(endpoint, conn, stream_id, ERR, b"target busy: too many introductions queued")
        return
    introduction = endpoint._fp.encode_frame(
        conn.peer_id.digest if conn.peer_id is not None else b"",
        b"",
        format_addr(conn.remote_addr),
        wire.KIND_INTRODUCTION,
    )
    sent = target._send_nowait(introduction)
    if sent is None:  # the target's connection is closing
        _answer(endpoint, conn, stream_id, ERR, b"target is gone")
        return
    queued[target] = queued.get(target, 0) + 1

    def delivered(_: object) -> None:
        left = queued.get(target, 0) - 1
        if left > 0:
            queued[target] = left
        else:
            queued.pop(target, None)

    sent.add_done_callback(delivered)
    _answer(endpoint, conn, stream_id, OK, format_addr(target.remote_addr))
    logger.debug("introduced %s to %s", conn.remote_addr, target.remote_addr)


def _answer(endpoint: Endpoint, conn: Connection, stream_id: int, status: bytes,
            payload: bytes) -> None:
    frame = endpoint._fp.encode_frame(status, b"", payload, wire.KIND_INTRODUCE_RESPONSE)
    conn._reply_nowait(stream_id, frame)


def on_introduction(endpoint: Endpoint, conn: Connection, payload: bytes) -> None:
    """Target side: a rendezvous says a peer is about to dial us; open our NAT toward it.

    Only a rendezvous we registered with may ask, and what it can make us send is
    bounded (module docstring): otherwise any peer could aim our probes anywhere."""
    state = endpoint._punching
    if not state.is_registered(conn):
        _peer_log.info("intro-unregistered", "ignoring introduction from %s: not a "
                       "rendezvous we registered with", wire.addr_text(conn.remote_addr))
        return
    try:
        addr = numeric_target(payload, conn.remote_addr, endpoint._sock.family)
    except ProtocolError as exc:
        _peer_log.warning("intro-bad-address", "ignoring introduction from %s: %s",
                          wire.addr_text(conn.remote_addr), exc)
        return
    if endpoint.is_closed:
        return
    if state.trains.get(conn) == addr:
        return  # already probing it
    state.trains[conn] = addr  # replaces (and so stops) this introducer's previous train
    logger.debug("introduced to %s by %s: probing", addr, conn.remote_addr)
    loop = endpoint._loop
    start = loop.time()

    def probe(index: int) -> None:
        if state.trains.get(conn) != addr:  # replaced, or the introducer is gone
            return
        done = (endpoint.is_closed or index >= len(PROBE_SCHEDULE)
                or endpoint._pool.get(addr) is not None)  # the direct connection formed
        spent = state.probe_bytes.get(conn, 0)
        if not done and spent + PROBE_SIZE > AMPLIFICATION * conn.stats()["bytes_received"]:
            _peer_log.warning("intro-budget", "stopping probes for %s: its introductions "
                              "used up %dx what it sent us", wire.addr_text(conn.remote_addr),
                              AMPLIFICATION)
            done = True
        if done:
            del state.trains[conn]
            return
        state.probe_bytes[conn] = spent + PROBE_SIZE
        # a short-header-looking datagram for no connection: the dialler's endpoint drops
        # it silently, but our NAT now maps our socket toward the dialler
        endpoint._send_raw(bytes([0x40 | (os.urandom(1)[0] & 0x3F)])
                           + os.urandom(PROBE_SIZE - 1), addr)
        if index + 1 < len(PROBE_SCHEDULE):
            delay = max(0.0, start + PROBE_SCHEDULE[index + 1] - loop.time())
            loop.call_later(delay, probe, index + 1)
        else:
            del state.trains[conn]

    probe(0)


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
        target = numeric_target(reply.payload, rendezvous.remote_addr, endpoint._sock.family)
    except ProtocolError as exc:
        raise HolePunchFailed(f"rendezvous sent an address we will not dial: {exc}") from exc
    try:
        return await endpoint._dial(target, peer_id, remaining(), punch=True)
    except PeerAuthenticationError as exc:
        raise HolePunchFailed(f"the peer at {wire.addr_text(target)} is not {peer_id}: {exc}") \
            from exc
    except (asyncio.TimeoutError, ConnectionError) as exc:
        raise HolePunchFailed(
            f"no direct path to {peer_id} at {wire.addr_text(target)} within {budget:g}s "
            "(are both NATs endpoint-independent?)", no_direct_path=True,
        ) from exc
