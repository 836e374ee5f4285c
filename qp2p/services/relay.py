"""Relayed connections, the control plane (the data plane and the wire format of wrapped
datagrams are :mod:`qp2p.relay`'s):

1. the dialler asks the relay on a bidirectional stream (``KIND_RELAY_REQUEST``, payload the
   target's peer id);
2. the relay offers the session to the target (``KIND_RELAY_OFFER``, uni; header the
   dialler's peer id, payload the session id and the dialler's address as the relay sees
   it);
3. the target accepts or declines (``KIND_RELAY_ACCEPT``, uni; header ``ok``/``err``) — it
   accepts only from a relay it dialled that advertises itself as a rendezvous (the rule
   for introductions, :meth:`HolePunch.heeds`) and only while it accepts incoming
   connections;
4. the relay answers the dialler (``ok`` + session id + the target's address, or ``err`` +
   reason), and forwards that session's wrapped datagrams from then on.

Then each peer of the relayed connection probes the other's address for a direct path
(``KIND_PATH_CHECK`` inside the connection names a tag of its raw probes' nonce;
``KIND_PATH_OK`` answers one that arrived straight with the nonce, which only the probe
carried, once per nonce), and moves its sending there once
its own direction is confirmed. The engines keep the placeholder address, so the QUIC
connection never notices.
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import TYPE_CHECKING, Any

from .. import relay, wire
from ..errors import (
    ConnectionError,
    HolePunchFailed,
    PeerAuthenticationError,
    ProtocolError,
)
from ..identity import PeerId
from ..ratelog import RateLimitedLog
from .holepunch import (
    PROBE_SCHEDULE,
    ask_introducer,
    connect_introducer,
    countdown,
    numeric_target,
)
from .rendezvous import asked_for

if TYPE_CHECKING:
    from ..connection import Connection, ControlMessage
    from ..relay import RelayPath, Relays
    from ..wire import Address, SockAddr
    from .holepunch import HolePunch
    from .host import ServiceHost

__all__ = ["Relay"]

logger = logging.getLogger("qp2p.relay")
_peer_log = RateLimitedLog(logger)

OK, ERR = relay.OK, relay.ERR


class Relay:
    """Relaying for the endpoint: as a relay (``relay=True``), sessions between peers
    that both asked; as a peer, relayed connections and their move to a direct path."""

    def __init__(self, host: ServiceHost, relays: Relays, holepunch: HolePunch) -> None:
        self._host = host
        self._relays = relays
        self._holepunch = holepunch
        relays.on_confirm = self._confirm
        host.on_control(wire.KIND_RELAY_REQUEST, self._on_request)
        host.on_control(wire.KIND_RELAY_OFFER, self._on_offer)
        host.on_control(wire.KIND_RELAY_ACCEPT, self._on_accept)
        host.on_control(wire.KIND_PATH_CHECK, self._on_path_check)
        host.on_control(wire.KIND_PATH_OK, self._on_path_ok)

    # ------------------------------------------------------------------ relay side

    def _on_request(self, conn: Connection, msg: ControlMessage) -> None:
        """``conn``'s peer asks us to relay to the peer whose id is the payload."""
        stream_id = msg.stream_id
        if stream_id is None:
            return
        host, relays = self._host, self._relays

        def answer(status: bytes, payload: bytes) -> None:
            conn.reply_control(stream_id, wire.KIND_RELAY_RESPONSE, payload, status)

        if not host.relay:
            answer(ERR, b"not a relay")
            return
        target, problem = asked_for(host, conn, msg.payload)
        if target is None:
            answer(ERR, problem)
            return
        relays.sweep(host.loop.time(), host.config.idle_timeout or relay.SESSION_IDLE)
        if relays.busy(conn, target):
            answer(ERR, b"relay busy: too many sessions")
            return
        sid = os.urandom(relay.SESSION_LEN)
        sent = target.send_control(  # the session, and where the dialler is
            wire.KIND_RELAY_OFFER, sid + wire.format_addr(conn.remote_addr),
            conn.peer_id.digest if conn.peer_id is not None else b"",
        )
        if sent is None:  # closing, or takes no control frames (MAX_QUEUED_CONTROL wait)
            answer(ERR, b"target is gone")
            return

        def expire() -> None:
            if relays.offers.pop(sid, None) is not None:
                relays.release_peers(conn, target)
                answer(ERR, b"target did not accept in time")

        timer = host.loop.call_later(host.config.handshake_timeout, expire)
        relays.offers[sid] = relay.Offer(conn, target, stream_id, timer)
        relays.hold_peers(conn, target)  # an offer counts toward the per-peer limit

    def _on_accept(self, conn: Connection, msg: ControlMessage) -> None:
        """A target answers our offer (the payload); only that target may."""
        relays = self._relays
        sid = bytes(msg.payload)
        offer = relays.offers.get(sid)
        if offer is None or offer.target is not conn:
            return
        del relays.offers[sid]
        offer.timer.cancel()
        dialler, stream_id = offer.dialler, offer.stream_id
        if msg.header != OK:
            relays.release_peers(dialler, conn)
            dialler.reply_control(stream_id, wire.KIND_RELAY_RESPONSE, b"the target declined",
                                  ERR)
            return
        relays.sessions[sid] = relay.Session(dialler, conn, self._host.loop.time())
        dialler.reply_control(stream_id, wire.KIND_RELAY_RESPONSE,
                              sid + wire.format_addr(conn.remote_addr), OK)
        logger.debug("relaying between %s and %s", dialler.remote_addr, conn.remote_addr)

    # ------------------------------------------------------------------ target side

    def _on_offer(self, conn: Connection, msg: ControlMessage) -> None:
        """The relay ``conn`` offers a session from the peer in the header."""
        payload = bytes(msg.payload)
        if len(payload) < relay.SESSION_LEN:
            return
        host, relays = self._host, self._relays
        sid = payload[:relay.SESSION_LEN]
        accept = (self._holepunch.heeds(conn) and host.accepts_incoming and not host.is_closed
                  and relays.paths_through(conn) < relay.MAX_PATHS_PER_RELAY
                  and sid not in relays.by_session)
        if accept:
            addr = relays.add_path(conn, sid,
                                   self._candidate(conn, payload[relay.SESSION_LEN:]))

            def unused() -> None:  # no connection came over the path: drop it
                path = relays.path_of(addr)
                if path is not None and path.sid == sid and host.pooled(addr) is None:
                    relays.drop_path(addr)

            host.loop.call_later(2 * host.config.handshake_timeout, unused)
        else:
            _peer_log.info("relay-offer-declined", "declining a relayed session from %s",
                           wire.addr_text(conn.remote_addr))
        conn.send_control(wire.KIND_RELAY_ACCEPT, sid, OK if accept else ERR)

    # ------------------------------------------------------------------ dialler side

    async def connect_relayed(self, relay_addr: Address | str, peer_id: PeerId,
                              timeout: float) -> Connection:
        """A connection to ``peer_id`` whose packets go through the relay at
        ``relay_addr``; ``HolePunchFailed`` (a ``ConnectionError``) when it cannot be
        made."""
        host, relays = self._host, self._relays
        remaining = countdown(host.loop, timeout, f"relaying to {peer_id}")
        name = f"relay {relay_addr}"
        via = await connect_introducer(host, relay_addr, name, remaining)
        reply = await ask_introducer(via, wire.KIND_RELAY_REQUEST, peer_id.digest, name,
                                     "refused to relay: {}", remaining)
        payload = bytes(reply.payload)
        if (reply.kind != wire.KIND_RELAY_RESPONSE or reply.header != OK
                or len(payload) < relay.SESSION_LEN):
            reason = payload.decode("utf-8", "replace")[:200]
            raise HolePunchFailed(f"relay {relay_addr}: {reason}")
        addr = relays.add_path(via, payload[:relay.SESSION_LEN],
                               self._candidate(via, payload[relay.SESSION_LEN:]))
        try:
            conn = await host.dial(addr, peer_id, remaining())
        except PeerAuthenticationError as exc:
            relays.drop_path(addr)
            raise HolePunchFailed(f"the relayed peer is not {peer_id}: {exc}") from exc
        except (asyncio.TimeoutError, ConnectionError) as exc:
            relays.drop_path(addr)
            raise HolePunchFailed(f"no relayed connection to {peer_id} through {relay_addr}: "
                                  f"{exc}") from exc
        logger.info("connected to %s through relay %s", peer_id, wire.addr_text(via.remote_addr))
        self._start_upgrade(conn)
        return conn

    def _candidate(self, via: Connection, text: bytes) -> SockAddr | None:
        """The peer's address as the relay saw it (where we probe for a direct path), if
        it is one we may send to on the relay's word (``holepunch.numeric_target``)."""
        if not text:
            return None
        try:
            return numeric_target(text, via.remote_addr, self._host.family)
        except ProtocolError:
            return None

    # ------------------------------------------------------------------ direct path

    def _start_upgrade(self, conn: Connection) -> None:
        """Relayed ``conn`` is established: keep probing for a direct path."""
        path = self._relays.path_of(conn.remote_addr)
        if path is not None and path.candidate is not None and path.direct is None:
            self._attempt(conn, path)

    def _attempt(self, conn: Connection, path: RelayPath) -> None:
        host = self._host
        if (conn.is_closed or host.is_closed or path.direct is not None
                or path.attempt >= relay.UPGRADE_ATTEMPTS
                or self._relays.path_of(conn.remote_addr) is not path
                or path.candidate is None):
            return
        path.attempt += 1
        if path.timer is not None:
            path.timer.cancel()
        nonce = os.urandom(relay.PROBE_LEN - 1)
        path.nonce, path.probed = nonce, path.candidate
        # the peer learns the nonce only from the probe itself: its PATH_OK proves it got it
        conn.send_control(wire.KIND_PATH_CHECK, relay.probe_tag(nonce))
        probe = bytes([relay.PROBE_MARKER]) + nonce
        loop = host.loop
        for delay in PROBE_SCHEDULE:
            loop.call_later(delay, self._probe, path, nonce, probe)
        path.timer = loop.call_later(relay.UPGRADE_INTERVAL, self._attempt, conn, path)

    def _probe(self, path: RelayPath, nonce: bytes, probe: bytes) -> None:
        if (path.nonce == nonce and path.direct is None and path.probed is not None
                and not self._host.is_closed):
            self._host.send_raw(probe, path.probed)

    def _on_path_check(self, conn: Connection, msg: ControlMessage) -> None:
        """The peer of relayed ``conn`` says it probes us with the nonce whose tag is the
        payload."""
        relays = self._relays
        path = relays.path_of(conn.remote_addr)
        if len(msg.payload) != relay.PROBE_LEN - 1 or path is None:
            return
        if path.attempt == 0:  # the target side starts probing on the dialler's first
            self._start_upgrade(conn)
        tag = bytes(msg.payload)
        if tag in relays.probes_seen:
            seen = relays.probes_seen[tag]
            if seen is not None:  # a nonce confirms once: a repeated check gets nothing
                relays.probes_seen[tag] = None
                self._confirm(conn, *seen)
            return
        for old in [n for n, c in relays.checks.items() if c is conn]:
            del relays.checks[old]  # one check waiting per connection
        relays.checks[tag] = conn
        if len(relays.checks) > relay.MAX_PROBES_SEEN:
            relays.checks.popitem(last=False)

    def _confirm(self, conn: Connection, nonce: bytes, addr: Any) -> None:
        """The peer's probe came straight from ``addr``: tell it its direction works,
        and probe back there (a symmetric NAT may have given it a port the relay never
        saw)."""
        path = self._relays.path_of(conn.remote_addr)
        if path is None or conn.is_closed:
            return
        if path.candidate is not None and str(addr[0]) != str(path.candidate[0]):
            _peer_log.info("probe-elsewhere", "ignoring a direct-path probe from %s: the "
                           "relay saw that peer at %s", wire.addr_text(addr),
                           wire.addr_text(path.candidate))
            return
        conn.send_control(wire.KIND_PATH_OK, nonce)
        if path.candidate is None or not relay.same_address(addr, path.candidate):
            path.candidate = addr
            if path.direct is None:  # our own probes went elsewhere: try there at once
                self._attempt(conn, path)

    def _on_path_ok(self, conn: Connection, msg: ControlMessage) -> None:
        """The peer got our current probe straight: send to it directly from now on."""
        path = self._relays.path_of(conn.remote_addr)
        if (path is None or path.direct is not None or path.nonce is None
                or bytes(msg.payload) != path.nonce or path.probed is None):
            return
        self._relays.go_direct(path)
        logger.info("connection with %s moved from relay %s to a direct path at %s",
                    conn.peer_id, wire.addr_text(path.relay.remote_addr),
                    wire.addr_text(path.probed))
