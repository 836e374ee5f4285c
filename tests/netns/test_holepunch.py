"""NAT traversal through real kernel NAT (nftables masquerade in network namespaces):
peers behind two NATs connect directly via a rendezvous; symmetric NATs fail cleanly."""

from __future__ import annotations

import asyncio
import statistics

import pytest

import qp2p
from tests.support.netlab import Host, Lab, double_nat
from tests.support.peers import PeerProcess

pytestmark = [pytest.mark.asyncio, pytest.mark.netns, pytest.mark.one_loop]
CFG = qp2p.Config(hole_punch_timeout=4.0, handshake_timeout=3.0,
                  retry=qp2p.RetryConfig(max_elapsed_time=5.0))


def rendezvous_in(host: Host, addr: str, relay: bool = False) -> PeerProcess:
    """A rendezvous peer (relaying if ``relay``) as a subprocess inside ``host``."""
    return PeerProcess(addr, 0, 30, "--rendezvous", *(["--relay"] if relay else []), netns=host)


async def bind_in(host: Host) -> qp2p.Endpoint:
    with host.entered():  # the socket is created in the namespace and stays there
        return await qp2p.Endpoint.bind(("0.0.0.0", 0), config=CFG)


async def exchange(a: qp2p.Connection, b: qp2p.Connection, count: int) -> None:
    for i in range(count):
        await a.send(b"a%d" % i)
        await b.send(b"b%d" % i)
    got_b = sorted([(await asyncio.wait_for(b.recv(), 5)).payload for _ in range(count)])
    got_a = sorted([(await asyncio.wait_for(a.recv(), 5)).payload for _ in range(count)])
    assert got_b == sorted(b"a%d" % i for i in range(count))
    assert got_a == sorted(b"b%d" % i for i in range(count))


@pytest.mark.parametrize("target_joins", ["register_with", "connect_to"])
async def test_connect_via_through_two_nats(lab: Lab, impl: str, target_joins: str) -> None:
    """API.md's target reaches its rendezvous with plain ``connect_to``; ``register_with``
    also locks introductions to that rendezvous. Both must punch."""
    net = double_nat(lab, mode="masquerade")
    rdv = rendezvous_in(net.p, "198.18.0.10")
    b = await bind_in(net.c2)
    endpoints = [b]
    try:
        await getattr(b, target_joins)(rdv.addr)  # B joins the rendezvous
        loop = asyncio.get_running_loop()
        times = []
        attempts = 20 if target_joins == "register_with" else 5
        for _ in range(attempts):  # in a row, each from a fresh endpoint (fresh NAT state)
            a = await bind_in(net.c1)
            endpoints.append(a)
            start = loop.time()
            conn = await a.connect_via(rdv.addr, b.peer_id)
            times.append(loop.time() - start)
            assert conn.peer_id == b.peer_id
            assert conn.remote_addr[0] == "198.18.0.2"  # B's router's public address
            accepted = await asyncio.wait_for(b.accept(), 5)
            assert accepted.peer_id == a.peer_id
            assert accepted.remote_addr[0] == "198.18.0.1"
            await exchange(conn, accepted, 2)
            if len(times) < attempts:
                await a.close()
        print(f"connect_via through two NATs: {attempts}/{attempts} succeeded, median "
              f"{statistics.median(times) * 1000:.0f} ms, max {max(times) * 1000:.0f} ms")
        await exchange(conn, accepted, 100)
        assert rdv.user_messages() == 0  # no application data went through the rendezvous
        rdv.kill()
        await exchange(conn, accepted, 20)  # the direct path lives on without it
        assert conn in a.connections() and accepted in b.connections()
    finally:
        rdv.kill()
        for ep in endpoints:
            await ep.close()


async def test_symmetric_nat_fails_cleanly(lab: Lab, impl: str) -> None:
    net = double_nat(lab, mode="fully-random")
    rdv = rendezvous_in(net.p, "198.18.0.10")
    a, b = await bind_in(net.c1), await bind_in(net.c2)
    try:
        rb = await b.register_with(rdv.addr)
        loop = asyncio.get_running_loop()
        start = loop.time()
        with pytest.raises(qp2p.HolePunchFailed) as info:
            await a.connect_via(rdv.addr, b.peer_id)  # this rendezvous does not relay
        elapsed = loop.time() - start
        print(f"symmetric NAT: HolePunchFailed after {elapsed:.2f}s: {info.value.reason}")
        assert elapsed <= CFG.hole_punch_timeout + 1.0
        assert isinstance(info.value, qp2p.ConnectionError)
        await asyncio.sleep(0.5)
        # nothing half-open: each side holds only its rendezvous connection
        assert [c.remote_addr for c in a.connections()] == [rdv.addr]
        assert b.connections() == [rb]
    finally:
        rdv.kill()
        await a.close()
        await b.close()


async def test_symmetric_nats_connect_through_a_relay(lab: Lab, impl: str) -> None:
    """Both peers behind symmetric NATs: punching cannot work, so ``connect_via`` falls
    back to the rendezvous relaying (``relay=True``): a relayed, end-to-end encrypted
    connection that carries every message; the relay delivers none to itself."""
    net = double_nat(lab, mode="fully-random")
    rdv = rendezvous_in(net.p, "198.18.0.10", relay=True)
    a, b = await bind_in(net.c1), await bind_in(net.c2)
    try:
        await b.connect_to(rdv.addr)
        loop = asyncio.get_running_loop()
        start = loop.time()
        conn = await a.connect_via(rdv.addr, b.peer_id)
        elapsed = loop.time() - start
        accepted = await asyncio.wait_for(b.accept(), 5)
        assert conn.path == accepted.path == "relayed"
        assert conn.peer_id == b.peer_id and accepted.peer_id == a.peer_id
        first = loop.time()
        await exchange(conn, accepted, 1)
        print(f"symmetric NATs: relayed after {elapsed:.2f}s (punching gave up), first "
              f"message {1000 * (loop.time() - first):.0f} ms later")
        await exchange(conn, accepted, 100)
        assert rdv.user_messages() == 0
        assert rdv.relayed_bytes() > 100 * 20
    finally:
        rdv.kill()
        await a.close()
        await b.close()


async def test_unknown_peer_and_refusing_rendezvous_fail_fast(lab: Lab, impl: str) -> None:
    net = double_nat(lab, mode="masquerade")
    rdv = rendezvous_in(net.p, "198.18.0.10")
    plain = PeerProcess("198.18.0.11", 0, 30, netns=net.p)
    a = await bind_in(net.c1)
    try:
        loop = asyncio.get_running_loop()
        stranger = qp2p.Identity.generate().peer_id
        start = loop.time()
        with pytest.raises(qp2p.HolePunchFailed, match="unknown peer id"):
            await a.connect_via(rdv.addr, stranger)
        with pytest.raises(qp2p.HolePunchFailed, match="refused"):
            await a.connect_via(plain.addr, stranger)
        assert loop.time() - start < 1.5
    finally:
        rdv.kill()
        plain.kill()
        await a.close()
