"""Hole punching: the target and dialler halves of NAT traversal (the introducer's half
is :mod:`.rendezvous`, whose docstring has the protocol).

After an introduction the target sends a short train of probe datagrams from its
endpoint socket to the dialler's address (opening its own NAT's mapping); the dialler
dials the target's address with its first flight resent every ``PUNCH_RESEND_INTERVAL``
for the first ``PUNCH_FAST_PERIOD``, then less and less often (the first copies are
often dropped by the far NAT until the target's probes open it; DESIGN.md §7).

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
- a dialler resends its first flight at most ``PUNCH_MAX_RESENDS`` times.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import os
import socket
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .. import wire
from ..errors import (
    ConnectionError,
    HolePunchFailed,
    MessageRejected,
    PeerAuthenticationError,
    ProtocolError,
)
from ..identity import PeerId
from ..ratelog import RateLimitedLog
from ..wire import parse_addr
from .rendezvous import OK

if TYPE_CHECKING:
    from ..connection import Connection, ControlMessage
    from ..wire import Address, SockAddr
    from .host import ServiceHost

__all__ = ["HolePunch", "ask_introducer", "connect_introducer", "countdown", "numeric_target"]

logger = logging.getLogger("qp2p.holepunch")
_peer_log = RateLimitedLog(logger)

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


def numeric_target(payload: bytes, introducer: SockAddr, family: int) -> SockAddr:
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


def countdown(loop: asyncio.AbstractEventLoop, budget: float, what: str) -> Callable[[], float]:
    """The seconds left of ``budget`` from now, each time it is called; once none are,
    ``HolePunchFailed`` ("``what`` took longer than ...")."""
    deadline = loop.time() + budget

    def remaining() -> float:
        left = deadline - loop.time()
        if left <= 0:
            raise HolePunchFailed(f"{what} took longer than {budget:g}s")
        return left

    return remaining


async def connect_introducer(
    host: ServiceHost, addr: Address | str, name: str, remaining: Callable[[], float]
) -> Connection:
    """Connect to the rendezvous or relay ``name`` at ``addr`` (pooled) within
    ``remaining()``; ``HolePunchFailed`` when it is unreachable."""
    try:
        return await asyncio.wait_for(host.connect(addr), remaining())
    except (ConnectionError, asyncio.TimeoutError) as exc:
        if isinstance(exc, (HolePunchFailed, PeerAuthenticationError)):
            raise  # an untrusted introducer says so, not "unreachable"
        raise HolePunchFailed(f"{name} unreachable: {exc}") from exc


async def ask_introducer(
    conn: Connection, kind: int, payload: bytes, name: str, refused: str,
    remaining: Callable[[], float],
) -> ControlMessage:
    """Ask the rendezvous or relay ``name`` on ``conn`` (a control request) and return its
    answer; ``HolePunchFailed`` when it refuses (``refused``, a format string that may
    name the rejection as ``{}``), times out or answers with a malformed frame."""
    try:
        return await conn.request_control(kind, payload, timeout=remaining())
    except MessageRejected as exc:
        raise HolePunchFailed(f"{name} {refused.format(exc)}") from exc
    except asyncio.TimeoutError as exc:
        raise HolePunchFailed(f"{name} did not answer in time") from exc
    except ProtocolError as exc:
        raise HolePunchFailed(f"{name}: {exc}") from exc


class HolePunch:
    """One endpoint's hole punching: the rendezvous it registered with, the probe trains
    running and what each introducer made us send (target side), and punching dials
    (dialler side)."""

    def __init__(self, host: ServiceHost) -> None:
        self._host = host
        self._registered: set[Address] = set()  # (host, port) of rendezvous we chose
        self._trains: dict[Connection, SockAddr] = {}  # the address each one has us probe
        self._probe_bytes: dict[Connection, int] = {}
        host.on_control(wire.KIND_INTRODUCTION, self._on_introduction)
        host.on_connection_gone(self._forget)

    def _forget(self, conn: Connection) -> None:
        """``conn`` is gone: drop everything kept for it (running trains then stop)."""
        self._trains.pop(conn, None)
        self._probe_bytes.pop(conn, None)

    async def register_with(self, rendezvous_addr: Address | str) -> Connection:
        """Honour introductions from the rendezvous at ``rendezvous_addr`` (registered
        before the dial, so an introduction that arrives with the handshake is heard
        too), and connect to it. A dial that fails (or is cancelled) registers nothing:
        the address would otherwise silence every other rendezvous (:meth:`heeds`)."""
        addr = await self._host.resolve(rendezvous_addr)
        key = (addr[0], addr[1])
        added = key not in self._registered  # a second call must not undo the first
        self._registered.add(key)
        try:
            return await self._host.connect(rendezvous_addr)
        except BaseException:
            if added:
                self._registered.discard(key)
            raise

    def heeds(self, conn: Connection) -> bool:
        """``conn`` is a connection we dialled to a rendezvous we registered with. Until
        the endpoint registers with one, a peer it dialled that advertised itself as a
        rendezvous (``engine.TP_RENDEZVOUS``) counts: API.md's target reaches its
        rendezvous with plain ``connect_to``. A peer that claims it falsely can make us
        send no more than ``AMPLIFICATION`` times what it sent us."""
        if not conn.dialled:
            return False
        if self._registered:
            return (conn.remote_addr[0], conn.remote_addr[1]) in self._registered
        return conn.peer_is_rendezvous

    # ------------------------------------------------------------------ target side

    def _on_introduction(self, conn: Connection, msg: ControlMessage) -> None:
        """A rendezvous says a peer is about to dial us; open our NAT toward it.

        Only a rendezvous we registered with may ask, and what it can make us send is
        bounded (module docstring): otherwise any peer could aim our probes anywhere."""
        host = self._host
        if msg.stream_id is not None:  # introductions come on unidirectional streams
            conn.refuse_control(msg.stream_id)
            return
        if not self.heeds(conn):
            _peer_log.info("intro-unregistered", "ignoring introduction from %s: not a "
                           "rendezvous we registered with", wire.addr_text(conn.remote_addr))
            return
        try:
            addr = numeric_target(msg.payload, conn.remote_addr, host.family)
        except ProtocolError as exc:
            _peer_log.warning("intro-bad-address", "ignoring introduction from %s: %s",
                              wire.addr_text(conn.remote_addr), exc)
            return
        if host.is_closed:
            return
        trains, spent_by = self._trains, self._probe_bytes
        if trains.get(conn) == addr:
            return  # already probing it
        trains[conn] = addr  # replaces (and so stops) this introducer's previous train
        logger.debug("introduced to %s by %s: probing", addr, conn.remote_addr)
        loop = host.loop
        start = loop.time()

        def probe(index: int) -> None:
            if trains.get(conn) != addr:  # replaced, or the introducer is gone
                return
            done = (host.is_closed or index >= len(PROBE_SCHEDULE)
                    or host.pooled(addr) is not None)  # the direct connection formed
            spent = spent_by.get(conn, 0)
            if not done and spent + PROBE_SIZE > AMPLIFICATION * conn.stats()["bytes_received"]:
                _peer_log.warning("intro-budget", "stopping probes for %s: its introductions "
                                  "used up %dx what it sent us",
                                  wire.addr_text(conn.remote_addr), AMPLIFICATION)
                done = True
            if done:
                del trains[conn]
                return
            spent_by[conn] = spent + PROBE_SIZE
            # a short-header-looking datagram for no connection: the dialler's endpoint
            # drops it silently, but our NAT now maps our socket toward the dialler
            host.send_raw(bytes([0x40 | (os.urandom(1)[0] & 0x3F)])
                          + os.urandom(PROBE_SIZE - 1), addr)
            if index + 1 < len(PROBE_SCHEDULE):
                delay = max(0.0, start + PROBE_SCHEDULE[index + 1] - loop.time())
                loop.call_later(delay, probe, index + 1)
            else:
                del trains[conn]

        probe(0)

    # ------------------------------------------------------------------ dialler side

    async def connect_via(self, rendezvous_addr: Address | str, peer_id: PeerId) -> Connection:
        """Ask the rendezvous for ``peer_id`` and punch a direct connection."""
        host = self._host
        budget = host.config.hole_punch_timeout
        remaining = countdown(host.loop, budget, f"hole punching to {peer_id}")
        name = f"rendezvous {rendezvous_addr}"
        rendezvous = await connect_introducer(host, rendezvous_addr, name, remaining)
        for conn in host.connections():
            if conn.peer_id == peer_id and conn is not rendezvous:
                return conn  # already connected to that peer
        reply = await ask_introducer(
            rendezvous, wire.KIND_INTRODUCE_REQUEST, peer_id.digest, name,
            "refused to introduce peers (not a rendezvous)", remaining,
        )
        if reply.kind != wire.KIND_INTRODUCE_RESPONSE:
            raise HolePunchFailed(f"rendezvous {rendezvous_addr} answered with a frame of "
                                  f"kind {reply.kind}")
        if reply.header != OK:
            reason = reply.payload.decode("utf-8", "replace")
            raise HolePunchFailed(f"rendezvous {rendezvous_addr}: {reason}")
        try:
            target = numeric_target(reply.payload, rendezvous.remote_addr, host.family)
        except ProtocolError as exc:
            raise HolePunchFailed(f"rendezvous sent an address we will not dial: {exc}") \
                from exc
        try:
            return await host.dial(target, peer_id, remaining(), first_flight=self._resend)
        except PeerAuthenticationError as exc:
            raise HolePunchFailed(
                f"the peer at {wire.addr_text(target)} is not {peer_id}: {exc}") from exc
        except (asyncio.TimeoutError, ConnectionError) as exc:
            raise HolePunchFailed(
                f"no direct path to {peer_id} at {wire.addr_text(target)} within {budget:g}s "
                "(are both NATs endpoint-independent?)", no_direct_path=True,
            ) from exc

    def _resend(
        self, conn: Connection, datagrams: list[tuple[bytes, SockAddr]], sent: int = 0,
        interval: float = PUNCH_RESEND_INTERVAL, started: float | None = None,
    ) -> None:
        """Send a punching dial's first flight, and resend it until the peer answers:
        every ``PUNCH_RESEND_INTERVAL`` for ``PUNCH_FAST_PERIOD``, then twice as long
        each time, ``PUNCH_MAX_RESENDS`` times at most (a wrong address is not flooded)."""
        host = self._host
        if conn.is_closed or host.is_closed or conn.stats()["packets_received"]:
            return
        now = host.loop.time()
        started = now if started is None else started
        for data, addr in datagrams:
            host.send_raw(data, addr)
        sent += 1
        if sent >= PUNCH_MAX_RESENDS:
            return
        if now - started >= PUNCH_FAST_PERIOD:
            interval *= 2
        host.loop.call_later(interval, self._resend, conn, datagrams, sent, interval, started)
