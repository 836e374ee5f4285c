"""Two nodes on loopback: one says "marco", the other answers "polo".

Each node is one Endpoint: one UDP socket that both dials and accepts. The "polo" node
answers on the connection the "marco" node opened, and every message is its own stream.

Run: python examples/p2p_node.py
"""

import asyncio
import contextlib

import qp2p


async def polo_node(ep: qp2p.Endpoint) -> None:
    conn = await ep.accept()
    # send() waits for marco's acknowledgement; marco may hang up before it comes
    with contextlib.suppress(qp2p.ConnectionClosed):
        async for msg in conn:
            print(f"polo node heard {msg.payload.decode()!r} from {qp2p_addr(conn)}")
            await conn.send(b"polo")


async def main() -> None:
    async with await qp2p.Endpoint.bind() as marco, await qp2p.Endpoint.bind() as polo:
        print(f"marco node at {marco.local_addr}, peer id {marco.peer_id.short()}")
        print(f"polo  node at {polo.local_addr}, peer id {polo.peer_id.short()}")
        listener = asyncio.ensure_future(polo_node(polo))

        conn = await marco.connect_to(polo.local_addr)
        for _ in range(3):
            await conn.send(b"marco")
            reply = await conn.recv()
            print(f"marco node heard {reply.payload.decode()!r}")
        await conn.close("game over")
        await listener  # the polo node's loop ends when marco closes the connection
    print(f"done ({qp2p.implementation} fast path)")


def qp2p_addr(conn: qp2p.Connection) -> str:
    host, port = conn.remote_addr[:2]
    return f"{host}:{port}"


if __name__ == "__main__":
    asyncio.run(main())
