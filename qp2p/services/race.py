"""Racing dials (``connect_to_any``): every address at once, the first handshake wins."""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from .. import wire
from ..errors import ConnectionError
from ..retry import retry_dial

if TYPE_CHECKING:
    from ..connection import Connection
    from ..wire import Address
    from .host import ServiceHost

__all__ = ["race"]


async def race(host: ServiceHost, addrs: list[Address | str]) -> Connection:
    """Dial every address at once; the first handshake wins, the others are closed.

    An address already in the pool wins at once. The race's own dials stay out of the pool
    until one wins, so closing the losers can't close a connection someone else holds.
    ``ConnectionError.errors`` is keyed by the addresses as the caller gave them.
    """
    for addr in addrs:
        try:
            pooled = host.pooled(await host.resolve(addr))
        except ConnectionError:
            continue  # reported by its dial below
        if pooled is not None:
            return pooled

    config = host.config

    async def dial(addr: Address | str) -> Connection:
        target = await host.resolve(addr)
        return await retry_dial(
            lambda t: host.dial(target, None, t, private=True),
            config.retry,
            config.handshake_timeout,
            wire.addr_text(target),
        )

    tasks = {asyncio.ensure_future(dial(a)): a for a in addrs}
    errors: dict[Address | str, BaseException] = {}
    winner: Connection | None = None
    kept = False  # the winner went to the pool and the caller
    pending = set(tasks)
    lost = "connect_to_any: another address answered first"
    try:
        try:
            while pending and winner is None:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    exc = task.exception()
                    if exc is not None:
                        errors[tasks[task]] = exc
                    elif winner is None:
                        winner = task.result()
                    else:
                        await task.result().close(lost)
        finally:
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)  # cancelling us here must not leak the winner
            for task in pending:
                if not task.cancelled() and task.exception() is None:
                    await task.result().close(lost)
        if winner is None:
            detail = "; ".join(f"{a!r}: {e}" for a, e in errors.items())
            raise ConnectionError(f"no address answered: {detail}", errors)
        host.adopt(winner)
        kept = True
        return winner
    finally:
        if winner is not None and not kept:  # private, so nobody else holds it
            await winner.close("connect_to_any was cancelled")
