"""Endpoint settings and steps many behaviour tests share."""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import qp2p

#: Short timeouts and quick retries, so a test that fails does so in seconds.
FAST = qp2p.Config(
    idle_timeout=10.0,
    handshake_timeout=3.0,
    retry=qp2p.RetryConfig(initial_interval=0.05, max_interval=0.5, max_elapsed_time=5.0),
)


async def connected(
    a: qp2p.Endpoint, b: qp2p.Endpoint, **kw: Any
) -> tuple[qp2p.Connection, qp2p.Connection]:
    """Dial b from a; return (a's connection, b's accepted connection)."""
    conn = await a.connect_to(b.local_addr, **kw)
    accepted = await asyncio.wait_for(b.accept(), 5)
    return conn, accepted


def state_kept(ep: qp2p.Endpoint) -> tuple[int, int]:
    """(connections the engine still drives, connection IDs routed) at ``ep``: (0, 0) when
    nothing is kept for anyone (read through the diagnostics snapshot)."""
    snap = ep.debug_snapshot()
    return len(snap["live"]), snap["table_size"]


#: Gives up on a dead address within about a second (no answer: 0.3 s handshakes).
GIVE_UP_FAST = qp2p.Config(
    handshake_timeout=0.3,
    retry=qp2p.RetryConfig(initial_interval=0.05, max_elapsed_time=1.0),
)


async def no_incoming(ep: qp2p.Endpoint, seconds: float) -> bool:
    """True when nothing reaches ``ep.accept()`` within ``seconds``."""
    try:
        await asyncio.wait_for(ep.accept(), seconds)
    except asyncio.TimeoutError:
        return True
    return False


def dead_udp_port() -> int:
    """A loopback UDP port nobody listens on (bound, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port
