"""Pool.share: concurrent connect_to calls share one dial; cancelling the last waiter stops
it, and a caller arriving while it stops gets a dial of its own (unit: no network)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from qp2p.pool import Pool

pytestmark = pytest.mark.asyncio

KEY: Any = (("198.18.0.1", 5000), None)


async def test_callers_share_one_dial() -> None:
    pool, dials = Pool(), []

    async def dial() -> Any:
        dials.append(1)
        await asyncio.sleep(0.01)
        return "conn"

    assert await asyncio.gather(*(pool.share(KEY, dial) for _ in range(5))) == ["conn"] * 5
    assert len(dials) == 1 and pool.dials_in_flight() == 0


async def test_a_caller_arriving_while_the_dial_stops_is_not_cancelled() -> None:
    pool, started = Pool(), []

    async def dial() -> Any:
        started.append(1)
        try:
            await asyncio.sleep(10 if len(started) == 1 else 0.01)
        except asyncio.CancelledError:
            await asyncio.sleep(0.01)  # a dial takes a moment to stop (closing its engine)
            raise
        return "conn"

    first = asyncio.ensure_future(pool.share(KEY, dial))
    await asyncio.sleep(0.001)
    first.cancel()  # the last waiter leaves: the dial is cancelled, still stopping
    await asyncio.sleep(0)
    second = asyncio.ensure_future(pool.share(KEY, dial))
    assert await asyncio.wait_for(second, 1) == "conn"
    assert not second.cancelled() and len(started) == 2
    await asyncio.sleep(0.05)
    assert first.cancelled() and pool.dials_in_flight() == 0
