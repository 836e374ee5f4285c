"""A private CA: peers holding certificates the network's CA issued accept each other;
a self-signed peer is refused.

Run: python examples/private_ca.py
"""

import asyncio
import contextlib
import logging

import qp2p


async def answer(ep: qp2p.Endpoint) -> None:
    async for conn in ep.incoming():
        with contextlib.suppress(qp2p.ConnectionClosed):  # the asker may hang up first
            async for msg in conn:
                await msg.reply(b"yes, my certificate is from my-net too")


async def main() -> None:
    ca = qp2p.CertificateAuthority.generate("my-net")  # ca.save(path): keep it safe
    trust = qp2p.Trust.ca(ca.certificate_pem)  # what every member is configured with
    alice = await qp2p.Endpoint.bind(identity=ca.issue(), trust=trust)
    bob = await qp2p.Endpoint.bind(identity=ca.issue(), trust=trust)
    outsider = await qp2p.Endpoint.bind(identity=qp2p.Identity.generate(), trust=trust)
    async with alice, bob, outsider:
        server = asyncio.ensure_future(answer(alice))
        conn = await bob.connect_to(alice.local_addr)
        reply = await conn.request(b"are you in my network?")
        print(f"bob asked alice {conn.peer_id}: {reply.payload!r}")

        try:
            await outsider.connect_to(alice.local_addr)
        except qp2p.PeerAuthenticationError as exc:
            print(f"self-signed outsider refused: {exc}")
    await server  # ends once alice is closed


logging.basicConfig(format="  (log) %(name)s: %(message)s")  # refusals are logged too
asyncio.run(main())
