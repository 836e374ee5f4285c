"""Traffic for the fault tests: many distinct messages one way, checked to arrive exactly
once and byte-identical whatever the path did to them."""

from __future__ import annotations

import asyncio
import os
from collections import Counter

import qp2p

#: Patient settings for paths that lose, delay and reorder packets.
LOSSY = qp2p.Config(
    idle_timeout=30.0,
    handshake_timeout=10.0,
    retry=qp2p.RetryConfig(initial_interval=0.2, max_elapsed_time=40.0),
)


async def exchange(sender: qp2p.Connection, receiver_ep: qp2p.Endpoint, count: int,
                   size: int = 1024, window: int = 100) -> tuple[int, Counter[bytes]]:
    """Send ``count`` distinct messages, ``window`` at a time; return how many ``send()``
    calls returned and a multiset of what arrived."""
    receiver = await asyncio.wait_for(receiver_ep.accept(), 30)
    arrived: Counter[bytes] = Counter()
    returned: list[bytes] = []

    async def drain() -> None:
        while True:
            arrived[(await receiver.recv()).payload] += 1

    drainer = asyncio.ensure_future(drain())
    bodies = [i.to_bytes(4, "big") + os.urandom(size - 4) for i in range(count)]

    async def send(body: bytes) -> None:
        await sender.send(body)
        returned.append(body)

    for start in range(0, count, window):
        await asyncio.wait_for(
            asyncio.gather(*(send(b) for b in bodies[start:start + window])), 120)
    for _ in range(500):  # acked means received: allow the receiver's loop to catch up
        if sum(arrived.values()) >= len(returned):
            break
        await asyncio.sleep(0.01)
    drainer.cancel()
    assert set(arrived) == set(returned), "every returned send arrives"
    assert all(n == 1 for n in arrived.values()), "exactly once"
    assert all(b in set(bodies) for b in arrived), "byte-identical"
    return len(returned), arrived
