"""Address echo and reachability: a peer tells us which address it sees us at
(``discover_public_addr``), and an echo round trip proves a peer is alive
(``is_reachable``). Carried as control frames (``wire.KIND_ECHO_*``) users never see."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING

from .. import wire
from ..errors import ProtocolError, RequestTimeout
from ..wire import format_addr, parse_addr

if TYPE_CHECKING:
    from ..connection import Connection, ControlMessage
    from ..wire import Address
    from .host import ServiceHost

__all__ = ["Echo", "echo"]

logger = logging.getLogger("qp2p.discovery")


async def echo(conn: Connection, timeout: float | None = None) -> Address:
    """Ask the peer which address it sees us at; ``RequestTimeout`` past ``timeout``."""
    try:
        reply = await conn.request_control(wire.KIND_ECHO_REQUEST, b"?", timeout=timeout)
    except asyncio.TimeoutError:
        assert timeout is not None
        raise RequestTimeout(
            f"{wire.addr_text(conn.remote_addr)} did not answer the echo request within "
            f"{timeout:g}s", timeout) from None
    if reply.kind != wire.KIND_ECHO_RESPONSE:
        raise ProtocolError(f"peer answered the echo request with a frame of kind {reply.kind}")
    return parse_addr(reply.payload)


class Echo:
    """The echo service: answers peers' echo requests, and checks reachability."""

    def __init__(self, host: ServiceHost) -> None:
        self._host = host
        host.on_control(wire.KIND_ECHO_REQUEST, self._on_request)

    def _on_request(self, conn: Connection, msg: ControlMessage) -> None:
        if msg.stream_id is None:  # a request must be answerable
            logger.debug("echo request without a stream to answer on from %s",
                         conn.remote_addr)
            return
        conn.reply_control(msg.stream_id, wire.KIND_ECHO_RESPONSE, format_addr(conn.remote_addr))

    async def is_reachable(self, addr: Address | str, timeout: float | None) -> bool:
        """Dial (or reuse) a connection to ``addr`` and ping it with an echo, in ``timeout``."""
        host = self._host
        limit = host.config.handshake_timeout if timeout is None else timeout
        created: Connection | None = None

        async def probe() -> None:
            nonlocal created
            target = await host.resolve(addr)
            conn = host.pooled(target)
            if conn is None:  # a private probe: nobody else can be handed it
                conn = created = await host.dial(target, None, limit, private=True)
            await echo(conn)

        try:
            await asyncio.wait_for(probe(), limit)
            return True
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # unreachable for whatever reason: the answer is False
            logger.debug("%s is not reachable: %r", addr, exc)
            return False
        finally:
            if created is not None:
                await created.close("reachability check done")
