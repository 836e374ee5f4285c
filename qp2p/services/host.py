"""The narrow interface a service gets from its endpoint.

A service (echo, rendezvous, hole punching, ...) is a plug-in: the endpoint creates it at
bind with a :class:`ServiceHost`, the service registers a handler per control-frame kind
it serves, and from then on it talks to peers only through this host and the public
(plus the qp2p-internal control-frame) API of :class:`~qp2p.connection.Connection`.
Adding a service touches no endpoint internals.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from ..config import Config
    from ..connection import Connection, ControlMessage
    from ..identity import PeerId
    from ..wire import Address, SockAddr

__all__ = ["ControlHandler", "FirstFlight", "ServiceHost"]

#: Serves one control frame from a peer; called on the loop, must not block.
ControlHandler = Callable[["Connection", "ControlMessage"], None]
#: Takes over sending a dial's first flight (the datagrams and their address) instead of
#: the endpoint's normal loss timer: hole punching resends it on a short schedule.
FirstFlight = Callable[["Connection", "list[tuple[bytes, SockAddr]]"], None]


class ServiceHost(Protocol):
    """What an endpoint offers its services."""

    @property
    def config(self) -> Config:
        """The endpoint's settings."""

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The loop the endpoint runs on (its ``time()`` is the services' clock)."""

    @property
    def family(self) -> int:
        """The socket's address family (``AF_INET`` or ``AF_INET6``)."""

    @property
    def is_closed(self) -> bool:
        """True once the endpoint began closing."""

    @property
    def rendezvous(self) -> bool:
        """Whether this endpoint introduces its peers to each other."""

    @property
    def relay(self) -> bool:
        """Whether this endpoint relays for peers that found no direct path."""

    @property
    def accepts_incoming(self) -> bool:
        """Whether this endpoint takes incoming connections."""

    def connections(self) -> list[Connection]:
        """Every open pooled connection (a copy: a read-only view of the pool)."""

    def pooled(self, addr: SockAddr, expect_peer_id: PeerId | None = None) -> Connection | None:
        """The pooled open connection to ``addr`` (of that peer, if given), if any."""

    async def resolve(self, addr: Address | SockAddr | str) -> SockAddr:
        """``addr`` in the socket's own form; ``ConnectionError`` if it has none."""

    async def connect(self, addr: Address | SockAddr | str) -> Connection:
        """``Endpoint.connect_to``: the pooled connection, or a shared, retried dial."""

    # Endpoint._dial's signature: the endpoint hands that method over as it is
    async def dial(
        self,
        addr: SockAddr,
        expect_peer_id: PeerId | None,
        timeout: float,
        *,
        private: bool = False,
        first_flight: FirstFlight | None = None,
    ) -> Connection:
        """One handshake attempt (no retries). ``private``: keep the connection out of
        the pool until :meth:`adopt`; ``first_flight``: hand the first flight over to it."""

    def adopt(self, conn: Connection) -> None:
        """Pool a privately dialled connection."""

    def send_raw(self, data: bytes, addr: SockAddr) -> None:
        """Send one UDP datagram from the endpoint's socket (queued if it is full)."""

    def on_control(self, kind: int, handler: ControlHandler) -> None:
        """Route peers' control frames of ``kind`` to ``handler`` (one per kind)."""

    def on_connection_gone(self, callback: Callable[[Connection], None]) -> None:
        """Call ``callback`` when the endpoint stops driving a connection, so a service
        can drop what it keeps for it."""
