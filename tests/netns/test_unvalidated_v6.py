"""The per-IP limit on unvalidated sources counts an IPv6 source by its /64: raw clients
at several addresses of one /64, in a network namespace holding them on its loopback."""

from __future__ import annotations

import asyncio
import socket

import pytest

import qp2p
from tests.support.netlab import Lab
from tests.support.unvalidated import first_initial, receive


@pytest.mark.asyncio
@pytest.mark.netns
@pytest.mark.one_loop
async def test_per_ip_limit_holds_an_ipv6_slash_64(lab: Lab, impl: str) -> None:
    """In a namespace holding addresses of 2001:2::/48 (RFC 5180's benchmarking range) on
    its loopback, five raw clients at five addresses of one /64 send a first Initial each: with
    max_connections_per_ip=3 three get a handshake flight and two a refusal; a client in
    another /64 still gets a handshake."""
    host = lab.host("v6")
    host.sysctl(net__ipv6__conf__all__disable_ipv6=0, net__ipv6__conf__lo__disable_ipv6=0)
    sources = [f"2001:2::{i:x}:{i:x}" for i in range(0x10, 0x15)] + ["2001:2:0:1::10"]
    for addr in ["2001:2::1", *sources]:
        host.ip("-6", "addr", "add", f"{addr}/128", "dev", "lo", "nodad")
    cfg = qp2p.Config(max_connections_per_ip=3, handshake_timeout=5.0)
    with host.entered():
        server = await qp2p.Endpoint.bind(("2001:2::1", 0), config=cfg)
    socks = [host.socket(socket.AF_INET6) for _ in sources]
    try:
        for sock, src in zip(socks, sources, strict=True):
            sock.bind((src, 0))
            sock.setblocking(False)
            _, initial = first_initial(server.local_addr)
            sock.sendto(initial, server.local_addr)
            await asyncio.sleep(0.05)  # in order: the first three take the /64's slots
        answers = [await receive(sock, 1, 2.0) for sock in socks]
        kinds = []
        for got in answers:
            assert got, kinds
            # a handshake flight is padded to 1,200 bytes; a refusal is one small packet
            kinds.append("handshake" if max(len(d) for d in got) >= 1200 else "refused")
        assert kinds == ["handshake"] * 3 + ["refused"] * 2 + ["handshake"], kinds
        assert server.stats_counters["handshakes_refused"] == 2
        per_ip = server.debug_snapshot()["incoming_per_ip"]
        assert per_ip == {"2001:2::/64": 3, "2001:2:0:1::/64": 1}
    finally:
        for sock in socks:
            sock.close()
        await server.close()
