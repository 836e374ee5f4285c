"""The connection pool: open connections keyed by the peer's socket address."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from .wire import SockAddr

if TYPE_CHECKING:
    from .connection import Connection
    from .identity import PeerId

__all__ = ["Pool"]

_DialKey = tuple[SockAddr, "PeerId | None"]


class Pool:
    """Open connections by remote address, dialled and accepted alike.

    An address may briefly hold two connections (both sides dialled at once); lookups
    return the oldest open one that matches the expected peer id. :meth:`share` shares
    one dial among concurrent ``connect_to`` calls for the same (address, expected peer).
    """

    def __init__(self) -> None:
        self._by_addr: dict[SockAddr, list[Connection]] = {}
        self._pending: dict[_DialKey, asyncio.Future[Connection]] = {}
        self._waiting: dict[_DialKey, int] = {}  # callers per pending dial

    async def share(
        self, key: _DialKey, dial: Callable[[], Awaitable[Connection]]
    ) -> Connection:
        """The outcome of the dial in flight for ``key`` (address, expected peer id), or
        of a new one ``dial()`` starts. A caller that is cancelled stops waiting; when the
        last one does, the dial is cancelled too."""
        pending = self._pending.get(key)
        if pending is None:
            pending = asyncio.ensure_future(dial())
            self._pending[key] = pending
            pending.add_done_callback(lambda f: self._dial_done(key, f))
        waiting = self._waiting
        waiting[key] = waiting.get(key, 0) + 1
        try:
            return await asyncio.shield(pending)
        finally:
            if not pending.done():
                waiting[key] -= 1
                if waiting[key] == 0:
                    # nobody waits for this dial any more: stop dialling. Forget it first:
                    # it finishes cancelling only later, and a caller arriving meanwhile
                    # must start its own dial, not join one that ends cancelled
                    del self._pending[key]
                    del waiting[key]
                    pending.cancel()

    def dials_in_flight(self) -> int:
        """Shared dials not finished yet."""
        return len(self._pending)

    def _dial_done(self, key: _DialKey, dial: asyncio.Future[Any]) -> None:
        """A shared dial ended: forget it, and retrieve its outcome so a failure that no
        caller awaited any more is not reported as "never retrieved"."""
        if self._pending.get(key) is dial:  # not a cancelled one a new dial replaced
            del self._pending[key]
            self._waiting.pop(key, None)
        if not dial.cancelled():
            dial.exception()

    def add(self, conn: Connection) -> None:
        """Pool an established connection."""
        conns = self._by_addr.setdefault(_key(conn.remote_addr), [])
        if conn not in conns:
            conns.append(conn)

    def remove(self, conn: Connection) -> None:
        """Drop a connection (closed or lost); a no-op if it isn't pooled."""
        key = _key(conn.remote_addr)
        conns = self._by_addr.get(key)
        if conns and conn in conns:
            conns.remove(conn)
            if not conns:
                del self._by_addr[key]

    def get(self, addr: SockAddr, expect_peer_id: PeerId | None = None) -> Connection | None:
        """The oldest open connection to ``addr`` (whose peer is ``expect_peer_id`` if given)."""
        for conn in self._by_addr.get(_key(addr), ()):
            if conn.is_closed:
                continue
            if expect_peer_id is None or conn.peer_id == expect_peer_id:
                return conn
        return None

    def all(self) -> list[Connection]:
        """Every pooled connection."""
        return [c for conns in self._by_addr.values() for c in conns]

    def all_open(self) -> list[Connection]:
        """Every pooled connection that is still open."""
        return [c for c in self.all() if not c.is_closed]

    def __len__(self) -> int:
        return sum(len(conns) for conns in self._by_addr.values())


def _key(addr: SockAddr) -> SockAddr:
    return (addr[0], int(addr[1]))
