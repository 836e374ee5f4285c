"""Request/reply: a server answers each request on the request's own stream.

Run: python examples/client_server.py
"""

import asyncio

import qp2p


async def serve(server: qp2p.Endpoint) -> None:
    """Answer every request of every client; runs until the server closes."""

    async def handle(conn: qp2p.Connection) -> None:
        try:
            async for msg in conn:
                if msg.is_request:
                    await msg.reply(msg.payload.upper(), header=b"upper")
        except qp2p.ConnectionClosed:
            pass  # reply() waits for the ACK; the client may leave before it arrives

    tasks = set()
    async for conn in server.incoming():
        task = asyncio.ensure_future(handle(conn))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


async def main() -> None:
    async with await qp2p.Endpoint.bind() as server, await qp2p.Endpoint.bind() as client:
        serving = asyncio.ensure_future(serve(server))
        conn = await client.connect_to(server.local_addr)
        for word in (b"hello", b"quic", b"world"):
            reply = await conn.request(word, timeout=5)
            print(f"request {word!r} -> reply {reply.payload!r} (header {reply.header!r})")
        # requests run concurrently, each on its own bidirectional stream
        replies = await asyncio.gather(*(conn.request(b"n%d" % i) for i in range(10)))
        print(f"10 concurrent requests -> {[r.payload.decode() for r in replies]}")
        print(f"rtt {conn.stats()['rtt'] * 1000:.2f} ms")
        await conn.close("bye")
    await serving  # incoming() ends when the server closes


if __name__ == "__main__":
    asyncio.run(main())
