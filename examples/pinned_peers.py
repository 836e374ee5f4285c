"""Pinned peers: each side names the peer ids it accepts; anyone else is refused.

Run: python examples/pinned_peers.py
"""

import asyncio
import logging

import qp2p


async def main() -> None:
    server_id, friend_id = qp2p.Identity.generate(), qp2p.Identity.generate()
    # the server talks only to its friend, the friend only to the server
    server = await qp2p.Endpoint.bind(
        identity=server_id, trust=qp2p.Trust.pinned({friend_id.peer_id})
    )
    friend = await qp2p.Endpoint.bind(
        identity=friend_id, trust=qp2p.Trust.pinned({server_id.peer_id})
    )
    stranger = await qp2p.Endpoint.bind()  # a fresh identity that nobody pinned
    async with server, friend, stranger:
        conn = await friend.connect_to(server.local_addr)
        await conn.send(b"hello, it's me")
        msg = await (await server.accept()).recv()
        print(f"server got {msg.payload!r} from pinned peer {msg.connection.peer_id}")

        try:  # the server refuses a peer it did not pin...
            await stranger.connect_to(server.local_addr)
        except qp2p.PeerAuthenticationError as exc:
            print(f"stranger refused by the server: {exc}")
        try:  # ...and the friend refuses to talk to anyone but the server
            await friend.connect_to(stranger.local_addr)
        except qp2p.PeerAuthenticationError as exc:
            print(f"friend refused the stranger: {exc}")


logging.basicConfig(format="  (log) %(name)s: %(message)s")  # refusals are logged too
asyncio.run(main())
