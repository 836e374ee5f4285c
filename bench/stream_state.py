"""What one long-lived connection keeps per stream it ever used: N messages on it (both
directions, half unidirectional, half request/response), then the engines' own count of
per-stream entries (``tracked_streams``) and the memory traced to qp2p's and the QUIC
library's files over those N messages (both ends; bounded state: a few dozen KiB).

    python bench/stream_state.py [qh3|aioquic] [messages]
"""

from __future__ import annotations

import asyncio
import sys
import time
import tracemalloc
from pathlib import Path

import qp2p

LIBRARIES = (str(Path(qp2p.__file__).parent), "/qh3/", "/aioquic/")


def library_bytes(snapshot: tracemalloc.Snapshot) -> int:
    """Bytes traced to allocations in qp2p's or a QUIC library's files."""
    return sum(
        stat.size for stat in snapshot.statistics("filename")
        if any(part in stat.traceback[0].filename for part in LIBRARIES)
    )


async def serve(conn: qp2p.Connection) -> None:
    while True:
        message = await conn.recv()
        if message.is_request:
            await message.reply(message.payload)


async def main(engine: str, count: int) -> None:
    config = qp2p.Config(engine=engine)
    a = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=config)
    b = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=config)
    conn = await a.connect_to(b.local_addr)
    accepted = await b.accept()
    tasks = [asyncio.ensure_future(serve(c)) for c in (conn, accepted)]

    async def burst(n: int) -> None:
        for start in range(0, n, 100):
            ops = []
            for i in range(start, min(n, start + 100)):
                side = (conn, accepted)[i % 2]
                ops.append(side.send(b"m%d" % i) if i % 4 < 2 else side.request(b"r%d" % i))
            await asyncio.gather(*ops)

    tracemalloc.start()
    await burst(1000)  # warm-up
    before = library_bytes(tracemalloc.take_snapshot())
    started = time.monotonic()
    await burst(count)
    elapsed = time.monotonic() - started
    after = library_bytes(tracemalloc.take_snapshot())
    tracemalloc.stop()
    kept = [c._quic.tracked_streams() for c in (conn, accepted)]  # the engine's own count
    print(f"{engine}: {count} messages in {elapsed:.1f} s; per-stream entries "
          f"dialler={kept[0]} acceptor={kept[1]}; library memory grew {after - before} B "
          f"({(after - before) / count:.1f} B a message, both ends)")
    for task in tasks:
        task.cancel()
    await a.close()
    await b.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "qh3",
                     int(sys.argv[2]) if len(sys.argv) > 2 else 5000))
