"""Every pair of peers connects: both peers behind each combination of {no NAT,
endpoint-independent NAT (masquerade), symmetric NAT (masquerade fully-random), a NAT
router running miniupnpd (UPnP-IGD, NAT-PMP, PCP) with ``Config(port_mapping=True)``},
ten attempts each, through a rendezvous that relays. Reports per combination the path
used and the median time from ``connect_via`` to the first message."""

from __future__ import annotations

import asyncio
import dataclasses
import statistics
import subprocess
from collections import Counter
from pathlib import Path

import pytest

import qp2p
from tests.support.netlab import Host, Lab, Lan
from tests.support.peers import PeerProcess
from tests.support.upnp_lab import StunServer, miniupnpd_missing, start_miniupnpd, stop_process

pytestmark = [pytest.mark.asyncio, pytest.mark.netns, pytest.mark.one_loop]

#: Short punch budget: through endpoint-independent NATs punching succeeds in tens of ms
#: (DESIGN.md §7); the symmetric cases wait this long before the relay is asked.
CFG = qp2p.Config(hole_punch_timeout=1.0, handshake_timeout=3.0,
                  retry=qp2p.RetryConfig(max_elapsed_time=5.0))
KINDS = ("none", "eim", "symmetric", "upnp")
ATTEMPTS = 10
#: Each combination runs once, on one implementation x engine in turn, so the nine cover
#: all four and the test stays within CI's budget.
IMPLS = ("cython-qh3", "python-aioquic", "cython-aioquic", "python-qh3")
MATRIX = [(d, t, IMPLS[i % len(IMPLS)])
          for i, (d, t) in enumerate((d, t) for d in KINDS for t in KINDS)]


def site(lab: Lab, public: Lan, n: int, kind: str, workdir: Path,
         daemons: list[subprocess.Popen[str]]) -> Host:
    """A peer's host: on the public LAN itself, or behind its own NAT router (for
    "upnp" one that runs miniupnpd, whose own table drops unsolicited packets)."""
    if kind == "none":
        host = lab.host(f"c{n}")
        lab.attach(host, public, f"198.18.0.{20 + n}")
        return host
    router = lab.router(f"r{n}")
    lab.attach(router, public, f"198.18.0.{n}")
    private = lab.lan(f"priv{n}", f"198.18.{n}.0/24")
    lab.attach(router, private, f"198.18.{n}.1")
    host = lab.host(f"c{n}")
    lab.attach(host, private, f"198.18.{n}.10")
    host.route("default", via=f"198.18.{n}.1")
    lab.nat(router, public, inside=f"198.18.{n}.0/24",
            mode="fully-random" if kind == "symmetric" else "masquerade",
            drop_unsolicited=kind != "upnp")
    if kind == "upnp":
        folder = workdir / f"r{n}"
        folder.mkdir()
        proc, _, _ = start_miniupnpd(router, public, private, f"198.18.{n}.0/24", folder)
        daemons.append(proc)
    return host


async def bind_in(host: Host, kind: str) -> qp2p.Endpoint:
    """An endpoint in ``host``; behind the UPnP router, with its port mapped first (the
    mapper's sockets are made while this thread is in the namespace: we stay in it until
    the mapping is there)."""
    config = dataclasses.replace(CFG, port_mapping=kind == "upnp")
    with host.entered():
        ep = await qp2p.Endpoint.bind(("0.0.0.0", 0), config=config)
        if kind == "upnp":
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 5
            while ep.public_addr is None and loop.time() < deadline:
                await asyncio.sleep(0.005)
            assert ep.public_addr is not None, "no port mapping from miniupnpd"
    return ep


@pytest.mark.parametrize(("dialler_kind", "target_kind", "impl"), MATRIX, indirect=["impl"])
async def test_every_pair_connects(lab: Lab, impl: str, dialler_kind: str,
                                   target_kind: str, tmp_path: Path) -> None:
    if "upnp" in (dialler_kind, target_kind) and miniupnpd_missing():
        pytest.skip(miniupnpd_missing())
    public = lab.lan("pub", "198.18.0.0/24")
    p = lab.host("p")
    lab.attach(p, public, "198.18.0.10")
    p.add_addr("198.18.0.11")
    stun = StunServer(p, ("198.18.0.10", "198.18.0.11"))  # miniupnpd's check of its address
    daemons: list[subprocess.Popen[str]] = []
    endpoints: list[qp2p.Endpoint] = []
    rdv: PeerProcess | None = None
    try:
        c1 = site(lab, public, 1, dialler_kind, tmp_path, daemons)
        c2 = site(lab, public, 2, target_kind, tmp_path, daemons)
        rdv = PeerProcess("198.18.0.10", 0, 30, "--rendezvous", "--relay", netns=p)
        target = await bind_in(c2, target_kind)
        endpoints.append(target)
        await target.connect_to(rdv.addr)
        paths: Counter[str] = Counter()
        times = []
        loop = asyncio.get_running_loop()
        for i in range(ATTEMPTS):
            dialler = await bind_in(c1, dialler_kind)  # a fresh socket: fresh NAT mappings
            endpoints.append(dialler)
            start = loop.time()
            conn = await dialler.connect_via(rdv.addr, target.peer_id)
            await conn.send(b"hello %d" % i)
            accepted = await asyncio.wait_for(target.accept(), 5)
            msg = await asyncio.wait_for(accepted.recv(), 5)
            times.append(loop.time() - start)
            assert msg.payload == b"hello %d" % i
            assert accepted.peer_id == dialler.peer_id and conn.peer_id == target.peer_id
            assert conn.path == accepted.path
            paths[conn.path] += 1
            await dialler.close()
            endpoints.remove(dialler)
        print(f"\n[{impl}-{target.engine}] {dialler_kind:>9} -> {target_kind:<9}: "
              f"{ATTEMPTS}/{ATTEMPTS} connected, "
              f"paths {dict(paths)}, median {statistics.median(times) * 1000:.0f} ms to the "
              f"first message (max {max(times) * 1000:.0f} ms)")
        if "symmetric" not in (dialler_kind, target_kind):
            assert paths["direct"] == ATTEMPTS  # punching works without a symmetric NAT
        if dialler_kind == target_kind == "symmetric":
            assert paths["relayed"] == ATTEMPTS
    finally:
        if rdv is not None:
            rdv.kill()
        for ep in endpoints:
            await ep.close()
        for proc in daemons:
            stop_process(proc)
        stun.close()
