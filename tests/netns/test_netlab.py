"""Self-tests of the test network (tests/support/netlab.py), with plain UDP sockets: if
these pass, a qp2p fault test that fails on a netlab network is failing because of qp2p.
(The impairment relay alone, on loopback: ``tests/loopback/test_udp_relay.py``.)"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time

import pytest

from tests.support import netlab
from tests.support.netlab import Lab, behind_nat, double_nat, two_hosts
from tests.support.paths import ROOT
from tests.support.udp_echo import client_socket, echo_server, round_trips
from tests.support.udp_relay import UdpRelay, set_big_buffers

netns = pytest.mark.netns


# --------------------------------------------------------------------------- helpers


def udp(host: netlab.Host, addr: str = "0.0.0.0", port: int = 0,
        timeout: float = 1.0) -> socket.socket:
    s = host.socket()
    set_big_buffers(s, 8 << 20)  # a burst of probes must not overflow the receive buffer
    s.bind((addr, port))
    s.settimeout(timeout)
    return s


def drain(sock: socket.socket, quiet: float = 0.2) -> list[tuple[bytes, tuple[str, int]]]:
    """Everything that arrives until ``quiet`` seconds pass without a datagram."""
    got = []
    sock.settimeout(quiet)
    while True:
        try:
            got.append(sock.recvfrom(2048))
        except TimeoutError:
            return got


def blast(src: socket.socket, dst: tuple[str, int], n: int, tag: bytes) -> None:
    for i in range(n):
        src.sendto(tag + b"%d" % i, dst)
        if i % 100 == 99:
            time.sleep(0.001)  # let the receiving side's softirq keep up


def root_state() -> tuple[list[str], str, list[str]]:
    """Root-namespace view: namespace names (minus those of other processes' labs, which
    parallel runs create and remove as they please), nft tables, interface names."""
    ns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    tables = subprocess.run(["nft", "list", "tables"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    mine = [n.split()[0] for n in ns.splitlines()
            if n.strip() and not re.match(rf"qp-[0-9a-f]{{6}}-(?!{os.getpid()}-)\d+-", n)]
    return (sorted(mine), tables,
            sorted(line.split(":")[1].strip() for line in links.splitlines()))


# --------------------------------------------------------------------------- topology 1


@netns
def test_two_hosts_connectivity_and_loopback(lab: Lab) -> None:
    t = two_hosts(lab)
    assert (t.a.addr, t.b.addr) == ("198.19.1.1", "198.19.1.2")
    sa, sb = udp(t.a, t.a.addr, 4000), udp(t.b, t.b.addr, 4000)
    sa.sendto(b"ping", (t.b.addr, 4000))
    assert sb.recvfrom(100) == (b"ping", ("198.19.1.1", 4000))
    sb.sendto(b"pong", (t.a.addr, 4000))
    assert sa.recvfrom(100) == (b"pong", ("198.19.1.2", 4000))
    for h in (t.a, t.b):  # loopback is up inside every namespace
        s = udp(h, "127.0.0.1")
        s.sendto(b"self", s.getsockname())
        assert s.recvfrom(100)[0] == b"self"
        assert "LOOPBACK,UP" in h.run("ip", "link", "show", "lo").stdout
    # subprocesses run inside the namespace too
    out = t.b.python("import socket; s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM);"
                     "s.connect(('198.19.1.1', 9)); print(s.getsockname()[0])")
    assert out.stdout.strip() == "198.19.1.2"
    # and nothing outside the benchmarking range can be configured
    with pytest.raises(ValueError):
        lab.link(t.a, t.b, subnet="10.0.0.0/24")


@netns
def test_random_loss_each_way_measured(lab: Lab) -> None:
    t = two_hosts(lab, loss_ab=20, loss_ba=5)
    sa, sb = udp(t.a, t.a.addr, 5000), udp(t.b, t.b.addr, 5000)
    n = 2000
    blast(sa, (t.b.addr, 5000), n, b"ab")
    blast(sb, (t.a.addr, 5000), n, b"ba")
    at_b, at_a = len(drain(sb)), len(drain(sa))
    loss_ab, loss_ba = 1 - at_b / n, 1 - at_a / n
    assert 0.10 <= loss_ab <= 0.30, loss_ab
    assert 0.015 <= loss_ba <= 0.10, loss_ba
    # every missing probe was dropped by our rule, not lost elsewhere (buffers, backlog)
    assert lab.dropped(t.b) == n - at_b
    assert lab.dropped(t.a) == n - at_a
    # 0 removes the rules
    lab.set_loss(t.link, 0)
    blast(sa, (t.b.addr, 5000), 300, b"ab")
    assert len(drain(sb)) == 300
    assert "numgen" not in t.b.run("nft", "list", "ruleset").stdout


@netns
def test_host_loss_applies_to_all_its_interfaces(lab: Lab) -> None:
    t = two_hosts(lab)
    lab.set_loss(t.b, 100, direction="in")
    sa, sb = udp(t.a, t.a.addr, 5001), udp(t.b, t.b.addr, 5001)
    blast(sa, (t.b.addr, 5001), 50, b"x")
    assert drain(sb, 0.1) == []
    sb.sendto(b"out is untouched", (t.a.addr, 5001))
    assert sa.recvfrom(100)[0] == b"out is untouched"


# --------------------------------------------------------------------------- topology 2


@netns
def test_nat_server_sees_router_public_address(lab: Lab) -> None:
    n = behind_nat(lab)
    assert n.r_public == "198.18.0.1" and n.c.addr == "198.18.1.10"
    # the server is a separate process in P, answering with the address it sees
    server = n.p.popen(sys.executable, "-c", (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); s.bind(('198.18.0.10', 3478))\n"
        "print('ready', flush=True)\n"
        "while True:\n"
        "    data, addr = s.recvfrom(100); s.sendto(('%s:%d' % addr).encode(), addr)\n"),
        stdout=subprocess.PIPE, text=True)
    assert server.stdout is not None and server.stdout.readline().strip() == "ready"
    c = udp(n.c, port=4100)
    c.sendto(b"who am i", ("198.18.0.10", 3478))
    seen, frm = c.recvfrom(100)
    host, port = seen.decode().split(":")
    assert host == "198.18.0.1" != n.c.addr
    assert int(port) == 4100  # masquerade keeps the port when it can
    assert frm == ("198.18.0.10", 3478)
    # P has no route into the private LAN ...
    p = udp(n.p, "198.18.0.10")
    with pytest.raises(OSError):
        p.sendto(b"in", (n.c.addr, 4100))
    # ... and unsolicited packets to R's public address are dropped by the router
    p.sendto(b"unsolicited", ("198.18.0.1", 4100))
    p.sendto(b"unsolicited", ("198.18.0.1", 4101))
    assert drain(c, 0.1) == []
    assert lab.dropped(n.r, "qpfw") == 2


# --------------------------------------------------------------------------- topology 3


@netns
def test_double_nat_private_nets_isolated(lab: Lab) -> None:
    d = double_nat(lab)
    c1, c2 = udp(d.c1, port=4200), udp(d.c2, port=4200)
    for dst in ("198.18.2.10", "198.18.2.1"):
        # an ICMP unreachable from R1 may surface as OSError here: equally isolated
        with contextlib.suppress(OSError):
            c1.sendto(b"direct?", (dst, 4200))
    assert drain(c2, 0.2) == []
    with pytest.raises(OSError, match="unreachable"):  # R1 knows no route to C2's LAN
        udp(d.r1).sendto(b"x", ("198.18.2.10", 9))
    # both private hosts do reach the public side
    srv = udp(d.p, "198.18.0.10", 3478)
    c1.sendto(b"1", ("198.18.0.10", 3478))
    c2.sendto(b"2", ("198.18.0.10", 3478))
    seen = dict(drain(srv, 0.2))
    assert seen[b"1"][0] == "198.18.0.1" and seen[b"2"][0] == "198.18.0.2"


def _mappings(d: netlab.DoubleNat) -> tuple[tuple[str, int], tuple[str, int], int]:
    """C1 sends from one socket to two servers in P; returns what each saw, and the port."""
    s1 = udp(d.p, "198.18.0.10", 3478)
    s2 = udp(d.p, "198.18.0.11", 3478)
    c = udp(d.c1)
    c.sendto(b"a", ("198.18.0.10", 3478))
    c.sendto(b"b", ("198.18.0.11", 3478))
    return s1.recvfrom(10)[1], s2.recvfrom(10)[1], c.getsockname()[1]


@netns
@pytest.mark.parametrize("mode", ["masquerade", "fully-random"])
def test_nat_mapping_per_destination(lab: Lab, mode: netlab.NatMode) -> None:
    d = double_nat(lab, mode=mode)
    seen1, seen2, local_port = _mappings(d)
    assert seen1[0] == seen2[0] == "198.18.0.1"
    if mode == "masquerade":  # endpoint-independent: one public port for every destination
        assert seen1[1] == seen2[1] == local_port
    else:                     # symmetric: a new port per destination
        assert seen1[1] != seen2[1]


def _punch(d: netlab.DoubleNat, budget: float) -> tuple[bool, float]:
    """Plain-UDP hole punching via a rendezvous in P. C1 sends first each round."""
    rdv = udp(d.p, "198.18.0.10", 3478)
    s1, s2 = udp(d.c1), udp(d.c2)
    s1.sendto(b"reg", ("198.18.0.10", 3478))
    s2.sendto(b"reg", ("198.18.0.10", 3478))
    (_, m_a), (_, m_b) = rdv.recvfrom(10), rdv.recvfrom(10)
    m1, m2 = (m_a, m_b) if m_a[0] == "198.18.0.1" else (m_b, m_a)
    t0 = time.monotonic()
    rdv.sendto(json.dumps(m2).encode(), m1)  # introduce each to the other
    rdv.sendto(json.dumps(m1).encode(), m2)
    peer_of_1 = tuple(json.loads(s1.recvfrom(100)[0]))
    peer_of_2 = tuple(json.loads(s2.recvfrom(100)[0]))
    s1.setblocking(False)
    s2.setblocking(False)
    got1 = got2 = False
    while time.monotonic() - t0 < budget and not (got1 and got2):
        s1.sendto(b"punch", peer_of_1)
        s2.sendto(b"punch", peer_of_2)
        time.sleep(0.02)
        for s, peer in ((s1, peer_of_1), (s2, peer_of_2)):
            try:
                while True:
                    data, frm = s.recvfrom(100)
                    if data == b"punch" and frm == peer:
                        if s is s1:
                            got1 = True
                        else:
                            got2 = True
            except BlockingIOError:
                pass
    return got1 and got2, time.monotonic() - t0


@netns
def test_hole_punching_through_masquerade(lab: Lab) -> None:
    d = double_nat(lab, mode="masquerade")
    ok, elapsed = _punch(d, budget=2.0)
    assert ok, "plain UDP punching through two endpoint-independent NATs must work"
    assert elapsed < 1.0
    # C1's first probe reached R2 before C2 had opened its side: R2 dropped it
    assert lab.dropped(d.r2, "qpfw") >= 1


@netns
def test_hole_punching_fails_through_fully_random(lab: Lab) -> None:
    d = double_nat(lab, mode="fully-random")
    ok, _ = _punch(d, budget=0.5)
    assert not ok
    assert lab.dropped(d.r1, "qpfw") > 0 and lab.dropped(d.r2, "qpfw") > 0


# --------------------------------------------------------------------------- cleanup


@netns
def test_lab_removes_everything_even_on_failure() -> None:
    if netlab.unavailable_reason():
        pytest.skip(netlab.unavailable_reason() or "")
    before = root_state()
    with pytest.raises(RuntimeError, match="boom"), Lab() as the_lab:
        d = double_nat(the_lab, mode="fully-random")
        the_lab.set_loss(d.public.ifaces[0], 5)
        sleeper = d.p.popen("sleep", "60")
        names = the_lab.namespaces
        assert len(names) == 8 and all(n.startswith("qp-") for n in names)
        raise RuntimeError("boom")
    assert sleeper.poll() is not None
    after = root_state()
    assert not set(names) & set(after[0])
    assert after == before  # namespaces, nft tables and links of the root namespace


@netns
def test_sweep_removes_namespaces_of_dead_processes_only() -> None:
    if netlab.unavailable_reason():
        pytest.skip(netlab.unavailable_reason() or "")
    dead = subprocess.Popen(["true"])
    dead.wait()
    tag = os.urandom(3).hex()
    stale, mine = f"qp-{tag}-{dead.pid}-h-x", f"qp-{tag}-{os.getpid()}-h-x"
    try:
        for ns in (stale, mine):
            subprocess.run(["ip", "netns", "add", ns], check=True)
        netlab.sweep_stale_namespaces()  # (a parallel run's sweep may get there first)
        left = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert stale not in left and mine in left
    finally:
        for ns in (stale, mine):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)


def test_unavailable_reasons_are_precise(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netlab, "_availability", [])
    monkeypatch.setattr(netlab.os, "geteuid", lambda: 1000)
    assert netlab.unavailable_reason() == "network namespaces need root (euid=1000)"
    with pytest.raises(netlab.LabUnavailable, match="need root"):
        Lab()
    monkeypatch.setattr(netlab, "_availability", [])
    monkeypatch.setattr(netlab.os, "geteuid", lambda: 0)
    monkeypatch.setattr(netlab.shutil, "which", lambda t: None if t == "nft" else "/x")
    reason = netlab.unavailable_reason()
    assert reason is not None and "`nft` not found" in reason and "nftables" in reason


def test_ensure_system_deps_is_quiet_when_present_and_harmless_without_root() -> None:
    script = ROOT / "tools" / "ensure-system-deps.sh"
    if shutil.which("ip") and shutil.which("nft"):
        r = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=60)
        assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    setpriv = shutil.which("setpriv")
    if os.geteuid() != 0 or setpriv is None:
        return
    # as nobody, with nft/ip hidden from PATH: a note, exit 0, no apt-get
    r = subprocess.run([setpriv, "--reuid=65534", "--regid=65534", "--clear-groups",
                        "env", "PATH=/usr/bin:/bin", "bash", "-c", script.read_text()],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "not root" in r.stderr, r


def test_netem_answer_recorded() -> None:
    """The module docstring says whether netem exists here; keep it honest."""
    if netlab.unavailable_reason():
        pytest.skip(netlab.unavailable_reason() or "")
    says_no = "**netem: NO.**" in (netlab.__doc__ or "")
    assert says_no == (not netlab.netem_available())


@netns
@pytest.mark.asyncio
async def test_relay_inside_namespaces_with_nft_loss(lab: Lab) -> None:
    """The relay's sockets live in A (socket_factory), the echo server in B; delay from the
    relay and loss from nftables compose."""
    t = two_hosts(lab)
    srv = t.b.socket()
    srv.bind((t.b.addr, 7000))
    st, echo = await echo_server(sock=srv)
    async with UdpRelay(("127.0.0.1", 0), (t.b.addr, 7000), delay_ms=10,
                        socket_factory=t.a.socket) as relay:
        ct, client = await client_socket(relay.address, sock=t.a.socket())
        rtts = await round_trips(client, ct, 5)
        assert min(rtts) >= 20, rtts
        assert echo.got[0][1][0] == t.a.addr  # B saw the relay's upstream socket in A
        lab.set_loss(t.link, 100, direction="a->b")
        ct.sendto(b"lost")
        await asyncio.sleep(0.1)
        assert relay.upstream.sent == 6 and len(echo.got) == 5 and lab.dropped(t.b) == 1
        ct.close()
    st.close()
