"""Unreliable datagrams (RFC 9221): a tick loop sending position updates, echoed back.

Datagrams are for data that is stale once a newer value exists (positions, telemetry,
heartbeats): no retransmission, no ordering, no head-of-line blocking, at most
``conn.max_datagram_payload`` bytes each and never split. A lost one is simply not there, so
the receiver counts what arrived rather than waiting for everything.

Run: python examples/datagram_loop.py
"""

import asyncio
import contextlib
import struct

import qp2p

TICKS = 50
TICK = 0.005  # seconds between updates
POSITION = struct.Struct("!Iff")  # tick number, x, y


async def echo(conn: qp2p.Connection) -> None:
    """The peer: send every datagram straight back, until the connection closes."""
    with contextlib.suppress(qp2p.ConnectionClosed):  # send_datagram on a closing connection
        async for data in conn.datagrams():  # ends when the connection closes
            conn.send_datagram(data)


async def main() -> None:
    async with qp2p.Endpoint.bind() as player, qp2p.Endpoint.bind() as server:
        conn = await player.connect_to(server.local_addr)
        echoer = asyncio.ensure_future(echo(await server.accept()))
        print(f"datagrams up to {conn.max_datagram_payload} bytes on this path")

        latest, where = -1, (0.0, 0.0)
        for tick in range(TICKS):
            conn.send_datagram(POSITION.pack(tick, tick * 1.5, tick * -0.5))  # never blocks
            await asyncio.sleep(TICK)
        received = 0
        while True:  # drain the echoes; one that was lost just never comes
            try:
                data = await asyncio.wait_for(conn.recv_datagram(), timeout=0.5)
            except asyncio.TimeoutError:  # the builtin TimeoutError from Python 3.11 on
                break
            tick, x, y = POSITION.unpack(data)
            received += 1
            if tick > latest:  # datagrams may arrive out of order: keep the newest
                latest, where = tick, (x, y)
        print(f"sent {TICKS} datagrams, {received} came back; newest: tick {latest} at {where}")
        await conn.close("game over")
        await echoer


if __name__ == "__main__":
    asyncio.run(main())
