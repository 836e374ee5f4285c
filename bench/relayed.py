"""Relayed throughput beside direct: the same qp2p workloads over a direct connection and
over one relayed by a third endpoint (``relay=True``), loopback, all three endpoints in
this process (so the relay's forwarding shares the CPU with both peers, as the direct
case does not: the ratio is an upper bound of the relay's cost on one machine).

    .venv/bin/python bench/relayed.py [--engine qh3|aioquic] [--duration 2] [--uncapped]

Prints bulk MiB/s (1 MiB messages, 4 in flight) and 64 B messages/s (64 concurrent
``send()`` loops) per path, and relayed / direct. The move to a direct path is turned off
(``qp2p.relay.UPGRADE_ATTEMPTS = 0``): on loopback it would happen at once. The relay's
per-session, per-host and total rates (``qp2p.relay.SESSION_RATE``, ``HOST_RATE``,
``RELAY_RATE``) cap relayed bulk
by design; ``--uncapped`` lifts them to show what forwarding itself costs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run from a checkout: import this tree's qp2p
    sys.path.insert(0, REPO)

MiB = 2**20


async def measure(path: str, size: int, window: int, duration: float) -> float:
    """Messages of ``size`` bytes per second delivered over a ``path`` connection."""
    import qp2p

    cfg = qp2p.Config(idle_timeout=60.0, handshake_timeout=5.0)
    relay_ep = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=cfg, relay=True)
    target = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=cfg)
    dialler = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=cfg)
    try:
        await target.connect_to(relay_ep.local_addr)
        if path == "relayed":
            conn = await dialler.connect_relayed(relay_ep.local_addr, target.peer_id)
        else:
            conn = await dialler.connect_to(target.local_addr)
        accepted = await asyncio.wait_for(target.accept(), 5)
        assert conn.path == path, conn.path
        payload = os.urandom(size)
        stop = False
        received = 0
        first = last = 0.0
        warmup = time.perf_counter() + 0.3

        async def sender() -> None:
            while not stop:
                await conn.send(payload)

        async def receiver() -> None:
            nonlocal received, first, last
            while True:
                await accepted.recv()
                now = time.perf_counter()
                if now >= warmup:
                    if not received:
                        first = now
                    received += 1
                    last = now

        tasks = [asyncio.ensure_future(receiver())]
        tasks += [asyncio.ensure_future(sender()) for _ in range(window)]
        await asyncio.sleep(duration + 0.3)
        stop = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if received < 2 or last <= first:
            return 0.0
        return (received - 1) / (last - first)
    finally:
        for ep in (dialler, target, relay_ep):
            await ep.close()


async def main(args: argparse.Namespace) -> None:
    import qp2p
    from qp2p import relay

    relay.UPGRADE_ATTEMPTS = 0  # stay relayed (loopback always has a direct path)
    if args.uncapped:
        relay.SESSION_RATE = relay.RELAY_RATE = relay.HOST_RATE = 2**40
        relay.SESSION_BURST = relay.RELAY_BURST = relay.HOST_BURST = 2**40
    rows: list[tuple[str, str, float, float]] = []
    for name, size, window, unit, scale in (
        ("bulk, 1 MiB messages", MiB, 4, "MiB/s", MiB),
        ("64 B messages", 64, 64, "msg/s", 1),
    ):
        rates: dict[str, float] = {}
        for path in ("direct", "relayed"):
            per_s = await measure(path, size, window, args.duration)
            rates[path] = per_s * size / scale if scale != 1 else per_s
        rows.append((name, unit, rates["direct"], rates["relayed"]))
    engine = os.environ.get("QP2P_ENGINE", "auto")
    caps = "uncapped" if args.uncapped else (
        f"relay caps {relay.SESSION_RATE // MiB} MiB/s per session, "
        f"{relay.RELAY_RATE // MiB} in all")
    print(f"qp2p {qp2p.implementation}, engine {engine}, loopback, {args.duration:g} s each, "
          f"{caps}")
    print(f"{'metric':<22} {'unit':<6} {'direct':>10} {'relayed':>10} {'relayed/direct':>15}")
    for name, unit, direct, relayed in rows:
        ratio = relayed / direct if direct else 0.0
        print(f"{name:<22} {unit:<6} {direct:>10,.1f} {relayed:>10,.1f} {ratio:>14.2f}x")


def cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--engine", choices=("qh3", "aioquic"), default=None)
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--uncapped", action="store_true",
                        help="lift the relay's rate limits")
    args = parser.parse_args()
    if args.engine:
        os.environ["QP2P_ENGINE"] = args.engine
    try:
        import uvloop
        runner: Any = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    runner(main(args))


if __name__ == "__main__":
    cli()
