"""The rendezvous side of NAT traversal: introduce a peer to another peer it names.

Protocol (control frames, DESIGN.md §3), the dialler's half in :mod:`.holepunch`:

1. dialler -> rendezvous, on a bidirectional stream: ``INTRODUCE_REQUEST``, payload = the
   target's 32-byte peer id;
2. rendezvous -> target, on a unidirectional stream: ``INTRODUCTION``, header = the
   dialler's peer id (or empty), payload = the dialler's address as the rendezvous sees it;
3. rendezvous -> dialler, the reply: ``INTRODUCE_RESPONSE``, header ``ok`` and payload =
   the target's observed address, or header ``err`` and payload = the reason.

A rendezvous queues at most ``MAX_PENDING_INTRODUCTIONS`` introductions per target (a
target that grants no streams cannot make it hold more); further requests are answered
``err`` at once. No application data passes through the rendezvous.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from .. import wire
from ..identity import PeerId
from ..ratelog import RateLimitedLog
from ..wire import format_addr

if TYPE_CHECKING:
    from ..connection import Connection, ControlMessage
    from .host import ServiceHost

__all__ = ["ERR", "MAX_PENDING_INTRODUCTIONS", "OK", "Rendezvous", "asked_for"]

logger = logging.getLogger("qp2p.holepunch")
_peer_log = RateLimitedLog(logger)

#: Introductions a rendezvous keeps queued for one target (not yet acknowledged).
MAX_PENDING_INTRODUCTIONS = 16
#: The ``INTRODUCE_RESPONSE`` header: introduced, or refused (the payload says why).
OK, ERR = b"ok", b"err"


def asked_for(host: ServiceHost, conn: Connection,
              payload: bytes) -> tuple[Connection | None, bytes]:
    """The connected peer (other than ``conn``'s) whose id ``payload`` is, for an
    introduction or a relay; else None and why, for the asker."""
    if len(payload) != 32:
        return None, b"malformed peer id"
    wanted = PeerId(payload)
    target = next(
        (c for c in host.connections() if c.peer_id == wanted and c is not conn), None
    )
    if target is None:
        return None, f"unknown peer id {wanted}".encode()
    return target, b""


class Rendezvous:
    """Serves peers' introduction requests when the endpoint is a rendezvous (and
    refuses them otherwise)."""

    def __init__(self, host: ServiceHost) -> None:
        self._host = host
        self._queued: dict[Connection, int] = {}  # target -> introductions not yet acked
        host.on_control(wire.KIND_INTRODUCE_REQUEST, self._on_request)
        host.on_connection_gone(self._forget)

    def _forget(self, conn: Connection) -> None:
        self._queued.pop(conn, None)

    def _on_request(self, conn: Connection, msg: ControlMessage) -> None:
        """Introduce ``conn``'s peer to the peer it asks for."""
        stream_id = msg.stream_id
        if stream_id is None:
            logger.debug("introduction request without a stream from %s", conn.remote_addr)
            return
        host = self._host
        if not host.rendezvous:
            _peer_log.info("not-rendezvous", "refusing introduction request from %s: not a "
                           "rendezvous", wire.addr_text(conn.remote_addr))
            conn.refuse_control(stream_id)
            return

        def answer(status: bytes, payload: bytes) -> None:
            conn.reply_control(stream_id, wire.KIND_INTRODUCE_RESPONSE, payload, status)

        target, problem = asked_for(host, conn, msg.payload)
        if target is None:
            answer(ERR, problem)
            return
        queued = self._queued
        if queued.get(target, 0) >= MAX_PENDING_INTRODUCTIONS:
            answer(ERR, b"target busy: too many introductions queued")
            return
        sent = target.send_control(
            wire.KIND_INTRODUCTION,
            format_addr(conn.remote_addr),
            conn.peer_id.digest if conn.peer_id is not None else b"",
        )
        if sent is None:  # the target's connection is closing, or takes no control frames
            answer(ERR, b"target is gone")
            return
        queued[target] = queued.get(target, 0) + 1

        def delivered(_: object) -> None:
            left = queued.get(target, 0) - 1
            if left > 0:
                queued[target] = left
            else:
                queued.pop(target, None)

        sent.add_done_callback(delivered)
        answer(OK, format_addr(target.remote_addr))
        logger.debug("introduced %s to %s", conn.remote_addr, target.remote_addr)
