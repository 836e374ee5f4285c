"""A tiny "something changed" signal for tasks waiting on a queue."""

from __future__ import annotations

import asyncio

__all__ = ["Signal"]


class Signal:
    """Wakes every task waiting in :meth:`wait` when :meth:`notify_all` is called.

    Each waiter has its own future, so cancelling one waiter never disturbs the others
    (a single shared waiter slot loses all but the last task).
    """

    __slots__ = ("_loop", "_waiters")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._waiters: list[asyncio.Future[None]] = []

    async def wait(self) -> None:
        """Return after the next :meth:`notify_all`."""
        future: asyncio.Future[None] = self._loop.create_future()
        self._waiters.append(future)
        try:
            await future
        finally:
            # notify_all took the list already (the usual case): nothing to remove
            waiters = self._waiters
            if waiters and future in waiters:
                waiters.remove(future)

    def notify_all(self) -> None:
        """Wake every current waiter."""
        if not self._waiters:
            return
        waiters, self._waiters = self._waiters, []
        for future in waiters:
            if not future.done():
                future.set_result(None)
