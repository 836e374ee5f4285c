"""Endpoint settings and steps many behaviour tests share."""

from __future__ import annotations

import asyncio
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
