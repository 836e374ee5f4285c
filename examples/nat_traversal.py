"""NAT traversal: a rendezvous peer introduces alice to bob, and they connect directly.

bob keeps a connection to a rendezvous endpoint (one with ``rendezvous=True`` and a public
address). alice, who knows only the rendezvous' address and bob's peer id, asks it for an
introduction with ``connect_via``: the rendezvous tells each side the address it sees for the
other, bob sends probes toward alice (opening his NAT's mapping) while alice dials him, and
the connection that results is direct, end to end encrypted — no data passes through the
rendezvous. Here all three run on loopback, so there is no NAT to get through; the same calls
work through NATs with endpoint-independent mapping (tests/netns/test_holepunch.py runs them through
Linux masquerade in network namespaces). A symmetric NAT makes ``connect_via`` raise
``qp2p.HolePunchFailed``.

Run: python examples/nat_traversal.py
"""

import asyncio

import qp2p

# bob's link to the rendezvous must stay open while he waits to be introduced
KEEP_ALIVE = qp2p.Config(keep_alive_interval=2.0)


async def main() -> None:
    async with (
        qp2p.Endpoint.bind(rendezvous=True) as rendezvous,
        qp2p.Endpoint.bind(config=KEEP_ALIVE) as bob,
        qp2p.Endpoint.bind() as alice,
    ):
        print(f"rendezvous at {rendezvous.local_addr}")
        await bob.connect_to(rendezvous.local_addr)  # bob is reachable through it now
        print(f"bob ({bob.peer_id.short()}) is connected to the rendezvous")

        conn = await alice.connect_via(rendezvous.local_addr, bob.peer_id)
        print(f"alice reached bob directly at {conn.remote_addr}: peer id {conn.peer_id}")
        incoming = await bob.accept()
        await conn.send(b"hello through the hole")
        msg = await incoming.recv()
        print(f"bob got {msg.payload!r} from {incoming.peer_id}")
        direct = conn.remote_addr == bob.local_addr and incoming.remote_addr == alice.local_addr
        print(f"direct path (no relay): {direct}")


if __name__ == "__main__":
    asyncio.run(main())
