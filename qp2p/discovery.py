"""qp2p's own services, carried as control frames (kind != 0) that users never see:
address echo (``discover_public_addr``), reachability checks, and racing dials.
"""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from . import holepunch, relay, wire
from .errors import ConnectionError, ProtocolError
from .wire import format_addr, parse_addr

if TYPE_CHECKING:
    from .connection import Connection
    from .endpoint import Endpoint

__all__ = ["echo", "is_reachable", "on_control", "race"]

logger = logging.getLogger("qp2p.discovery")

Address = tuple[Any, ...]


def on_control(
    endpoint: Endpoint,
    conn: Connection,
    kind: int,
    header: bytes,
    dst: bytes,
    payload: bytes,
    stream_id: int | None,
) -> None:
    """Serve one control request from a peer (called on the loop, never blocks)."""
    if kind == wire.KIND_ECHO_REQUEST and stream_id is not None:
        frame = endpoint._fp.encode_frame(b"", b"", format_addr(conn.remote_addr),
                                          wire.KIND_ECHO_RESPONSE)
        conn._reply_nowait(stream_id, frame)
        return
    if kind == wire.KIND_INTRODUCE_REQUEST and stream_id is not None:
        holepunch.on_introduce_request(endpoint, conn, payload, stream_id)
        return
    if kind == wire.KIND_INTRODUCTION and stream_id is None:
        holepunch.on_introduction(endpoint, conn, payload)
        return
    relays = endpoint._relays
    if kind == wire.KIND_RELAY_REQUEST and stream_id is not None:
        relay.on_relay_request(endpoint, relays, conn, payload, stream_id)
        return
    if kind == wire.KIND_RELAY_OFFER and stream_id is None:
        relay.on_relay_offer(endpoint, relays, conn, header, payload,
                             endpoint._punching.is_registered(conn))
        return
    if kind == wire.KIND_RELAY_ACCEPT and stream_id is None:
        relay.on_relay_accept(endpoint, relays, conn, header, payload)
        return
    logger.debug("unexpected control frame kind %d from %s", kind, conn.remote_addr)
    if stream_id is not None:
        conn._quic.reject_stream(stream_id, wire.ERR_FRAME_REJECTED)
        endpoint._mark_dirty(conn)


async def echo(conn: Connection, timeout: float | None = None) -> wire.Address:
    """Ask the peer which address it sees us at."""
    frame = conn._fp.encode_frame(b"", b"", b"?", wire.KIND_ECHO_REQUEST)
    reply: Any = await conn._request_frame(frame, timeout)
    if getattr(reply, "kind", None) != wire.KIND_ECHO_RESPONSE:
        raise ProtocolError("peer answered the echo request with a user message")
    return parse_addr(reply.payload)


async def is_reachable(endpoint: Endpoint, addr: Address | str, timeout: float | None) -> bool:
    """Dial (or reuse) a connection to ``addr`` and ping it with an echo, in ``timeout``."""
    limit = endpoint.config.handshake_timeout if timeout is None else timeout
    created: Connection | None = None

    async def probe() -> None:
        nonlocal created
        target = await endpoint._resolve(addr)
        conn = endpoint._pool.get(target)
        if conn is None:  # a private probe: nobody else can be handed it
            conn = created = await endpoint._dial(target, None, limit, private=True)
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


async def race(endpoint: Endpoint, addrs: list[Address | str]) -> Connection:
    """Dial every address at once; the first handshake wins, the others are closed.

    An address already in the pool wins at once. The race's own dials stay out of the pool
    until one wins, so closing the losers can't close a connection someone else holds.
    ``ConnectionError.errors`` is keyed by the addresses as the caller gave them.
    """
    from .retry import retry_dial

    for addr in addrs:
        try:
            pooled = endpoint._pool.get(await endpoint._resolve(addr))
        except ConnectionError:
            continue  # reported by its dial below
        if pooled is not None:
            return pooled

    config = endpoint.config

    async def dial(addr: Address | str) -> Connection:
        target = await endpoint._resolve(addr)
        return await retry_dial(
            lambda t: endpoint._dial(target, None, t, private=True),
            config.retry,
            config.handshake_timeout,
            wire.addr_text(target),
        )

    tasks = {asyncio.ensure_future(dial(a)): a for a in addrs}
    errors: dict[Address | str, BaseException] = {}
    winner: Connection | None = None
    pending = set(tasks)
    lost = "connect_to_any: another address answered first"
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
            await asyncio.wait(pending)
        for task in pending:
            if not task.cancelled() and task.exception() is None:
                await task.result().close(lost)
    if winner is None:
        detail = "; ".join(f"{a!r}: {e}" for a, e in errors.items())
        raise ConnectionError(f"no address answered: {detail}", errors)
    endpoint._adopt(winner)
    return winner
