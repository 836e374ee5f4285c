"""A qp2p peer in its own process, for tests that kill or restart a peer.

``python tests/peer_proc.py HOST PORT [IDLE_TIMEOUT]``: binds, prints
``READY <host> <port> <peer_id>``, then echoes every message back (and answers every
request with its payload) until killed or its stdin closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys

import qp2p


async def main(host: str, port: int, idle_timeout: float) -> None:
    config = qp2p.Config(idle_timeout=idle_timeout)
    async with await qp2p.Endpoint.bind((host, port), config=config) as ep:
        print("READY", ep.local_addr[0], ep.local_addr[1], ep.peer_id, flush=True)

        async def serve(conn: qp2p.Connection) -> None:
            with contextlib.suppress(qp2p.Qp2pError):
                async for msg in conn:
                    if msg.is_request:
                        await msg.reply(msg.payload)
                    else:
                        await conn.send(msg.payload)

        async def accept_all() -> None:
            async for conn in ep.incoming():
                asyncio.ensure_future(serve(conn))

        acceptor = asyncio.ensure_future(accept_all())
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, sys.stdin.read)  # until stdin closes
        acceptor.cancel()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else 10.0))
