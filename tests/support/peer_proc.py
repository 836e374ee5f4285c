"""A qp2p peer in its own process, for tests that kill, restart or namespace a peer.

``python tests/support/peer_proc.py HOST PORT [IDLE_TIMEOUT] [--rendezvous] [--relay]
[--port-mapping[=P,Q]] [--uvloop] [--log]``: binds, prints ``READY <host> <port> <peer_id>``,
then echoes every message back (and answers every request with its payload). Each line
``count`` on stdin prints ``COUNT <n>``: the user messages this peer has received;
``relayed`` prints ``RELAYED <bytes>``: what it forwarded as a relay; ``public`` prints
``PUBLIC <host> <port>`` (or ``PUBLIC none``): its ``public_addr``. ``--port-mapping`` binds
with ``Config(port_mapping=True)``, ``--port-mapping=pcp,upnp`` with those protocols;
``--uvloop`` runs on uvloop; ``--log`` logs at DEBUG to stderr. It exits (closing the
endpoint) when killed or when its stdin closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys

import qp2p


async def main(host: str, port: int, idle_timeout: float, rendezvous: bool,
               relay: bool, port_mapping: bool | tuple[str, ...] = False) -> None:
    config = qp2p.Config(idle_timeout=idle_timeout, port_mapping=port_mapping)
    received = 0
    async with await qp2p.Endpoint.bind((host, port), config=config,
                                        rendezvous=rendezvous, relay=relay) as ep:
        print("READY", ep.local_addr[0], ep.local_addr[1], ep.peer_id, flush=True)

        async def serve(conn: qp2p.Connection) -> None:
            nonlocal received
            with contextlib.suppress(qp2p.Qp2pError):
                async for msg in conn:
                    received += 1
                    if msg.is_request:
                        await msg.reply(msg.payload)
                    else:
                        await conn.send(msg.payload)

        tasks: set[asyncio.Future[None]] = set()

        async def accept_all() -> None:
            async for conn in ep.incoming():
                task = asyncio.ensure_future(serve(conn))
                tasks.add(task)
                task.add_done_callback(tasks.discard)

        acceptor = asyncio.ensure_future(accept_all())
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            if line.strip() == "count":
                print("COUNT", received, flush=True)
            elif line.strip() == "relayed":
                print("RELAYED", ep.stats_counters["relayed_bytes"], flush=True)
            elif line.strip() == "public":
                public = ep.public_addr
                print("PUBLIC", *(public[:2] if public else ["none"]), flush=True)
        acceptor.cancel()


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    mapping: bool | tuple[str, ...] = False
    for flag in sys.argv[1:]:
        if flag == "--port-mapping":
            mapping = True
        elif flag.startswith("--port-mapping="):
            mapping = tuple(flag.split("=", 1)[1].split(","))
    if "--log" in sys.argv:
        logging.basicConfig(level=logging.DEBUG, stream=sys.stderr)
    run = asyncio.run
    if "--uvloop" in sys.argv:
        import uvloop
        run = uvloop.run
    run(main(args[0], int(args[1]), float(args[2]) if len(args) > 2 else 10.0,
             "--rendezvous" in sys.argv, "--relay" in sys.argv, mapping))
