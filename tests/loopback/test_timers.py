"""The endpoint drives all its connections' engine timers from one heap, a bounded number
per loop turn (``endpoint.TIMERS_PER_TURN``): many due at once (after a slow turn) are
all served, over a few turns, instead of making one turn that long."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

import qp2p
from qp2p import endpoint as endpoint_mod

pytestmark = pytest.mark.asyncio

IDLE = qp2p.Config(idle_timeout=0.5, handshake_timeout=3.0)


async def test_many_due_timers_are_all_served_a_bounded_number_per_turn(
    impl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """16 connections whose idle timeouts all came due while the loop was blocked: each
    loop turn closes at most a few of them (the budget, twice when the loop timer and the
    next turn's call fall in one turn), and all of them close."""
    per_turn = 2
    count = 16
    monkeypatch.setattr(endpoint_mod, "TIMERS_PER_TURN", per_turn)
    loop = asyncio.get_running_loop()
    server = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=IDLE)
    clients = [await qp2p.Endpoint.bind(("127.0.0.1", 0), config=IDLE) for _ in range(count)]
    try:
        await asyncio.gather(*(c.connect_to(server.local_addr) for c in clients))
        for _ in range(count):
            await asyncio.wait_for(server.accept(), 5)
        assert len(server.connections()) == count
        live: list[int] = []
        sampling = True

        def sample() -> None:  # rescheduled from itself: runs once per loop turn
            live.append(len(server.debug_snapshot()["live"]))
            if sampling:
                loop.call_soon(sample)

        time.sleep(IDLE.idle_timeout * 3)  # the loop blocked on purpose
        loop.call_soon(sample)
        deadline = loop.time() + 5
        while server.debug_snapshot()["live"] and loop.time() < deadline:
            await asyncio.sleep(0)
        sampling = False
        assert live[-1] == 0 or not server.debug_snapshot()["live"], live  # all served
        closed_per_turn = max(a - b for a, b in itertools.pairwise([count, *live]))
        assert 0 < closed_per_turn <= 2 * per_turn, live
    finally:
        for ep in (server, *clients):
            await ep.close()


async def test_a_timer_due_at_once_runs_on_the_next_turn(impl: str) -> None:
    """With a single connection nothing waits: a request and its reply (the engine's ACK
    delay and pacing timers in between) take milliseconds on loopback."""
    async with (
        await qp2p.Endpoint.bind(("127.0.0.1", 0), config=IDLE) as server,
        await qp2p.Endpoint.bind(("127.0.0.1", 0), config=IDLE) as client,
    ):
        conn = await client.connect_to(server.local_addr)
        accepted = await asyncio.wait_for(server.accept(), 5)

        async def echo() -> None:
            async for msg in accepted:
                await msg.reply(msg.payload)

        echoing = asyncio.ensure_future(echo())
        try:
            t0 = time.perf_counter()
            for _ in range(20):
                assert (await asyncio.wait_for(conn.request(b"x" * 3000), 5)).payload
            assert time.perf_counter() - t0 < 2.0
        finally:
            echoing.cancel()
