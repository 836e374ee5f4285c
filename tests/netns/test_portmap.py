"""Port mapping against a real daemon: Debian's miniupnpd (UPnP-IGD, NAT-PMP, PCP) in the
NAT router's namespace, the mapped peer behind a NAT that drops unsolicited packets
(tests/support/upnp_lab.py); and against a scripted hostile gateway for the strict parsing.

The peer behind the NAT runs as a subprocess inside its namespace (tests/support/peer_proc.py):
port mapping opens its own sockets (to the gateway, SSDP, HTTP) after bind, and those must
live in the peer's namespace, which a whole process does.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

import qp2p
from tests.support.netlab import Host, Lab, behind_nat
from tests.support.paths import CWD, pythonpath
from tests.support.peers import PeerProcess
from tests.support.upnp_lab import TABLE, UpnpRouter, miniupnpd_missing, upnp_router

pytestmark = [pytest.mark.netns, pytest.mark.one_loop]
CFG = qp2p.Config(handshake_timeout=2.0, retry=qp2p.RetryConfig(max_elapsed_time=3.0))
ROUTER_PUBLIC = "198.18.0.1"
PEER = "198.18.1.10"


@pytest.fixture
def router(lab: Lab, tmp_path: Path) -> Iterator[UpnpRouter]:
    reason = miniupnpd_missing()
    if reason is not None:
        pytest.skip(reason)
    rt = upnp_router(lab, tmp_path)
    try:
        yield rt
    finally:
        rt.close()


class Peer(PeerProcess):
    """tests/support/peer_proc.py inside ``host``, on this test's implementation and
    engine; on uvloop with qh3 and asyncio with aioquic (so the four implementation x
    engine runs cover both loops too: the port mapping runs in this process)."""

    def __init__(self, host: Host, impl: str, *flags: str, stderr: int | None = None) -> None:
        env = {**os.environ, "PYTHONPATH": pythonpath()}
        env.pop("QP2P_NO_EXTENSIONS", None)
        if impl == "python":
            env["QP2P_NO_EXTENSIONS"] = "1"
        if os.environ.get("QP2P_ENGINE") == "qh3":
            flags = (*flags, "--uvloop")
        super().__init__("0.0.0.0", 0, 30, *flags, netns=host, env=env, stderr=stderr)

    async def log_until(self, marker: str) -> list[str]:
        """Lines of the peer's ``--log`` output up to the one containing ``marker``."""
        assert self.proc.stderr is not None
        lines = []
        while marker not in (line := await asyncio.to_thread(self.proc.stderr.readline)):
            assert line, f"the peer exited before logging {marker!r}: {lines}"
            lines.append(line)
        return lines

    async def wait_public_addr(self, timeout: float = 15.0) -> tuple[str, int]:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while (addr := self.public_addr()) is None:
            assert loop.time() < deadline, "no mapping within the time bound"
            await asyncio.sleep(0.05)
        return addr


async def bind_in(host: Host) -> qp2p.Endpoint:
    with host.entered():
        return await qp2p.Endpoint.bind(("0.0.0.0", 0), config=CFG)


async def echo(ep: qp2p.Endpoint, addr: tuple[str, int], peer_id: qp2p.PeerId) -> None:
    conn = await ep.connect_to(addr, expect_peer_id=peer_id)
    assert conn.peer_id == peer_id
    reply = await asyncio.wait_for(conn.request(b"through the mapping"), 5)
    assert reply.payload == b"through the mapping"


@pytest.mark.asyncio
@pytest.mark.parametrize("protocols,label", [
    ("--port-mapping", "PCP MAP"),             # True: PCP is tried first and miniupnpd has it
    ("--port-mapping=natpmp", "NAT-PMP"),
    ("--port-mapping=upnp", "qp2p"),
])
async def test_mapped_peer_is_reached_directly(router: UpnpRouter, impl: str, protocols: str,
                                               label: str) -> None:
    """Behind a NAT that drops unsolicited packets, the peer maps its port; a peer outside
    reaches ``public_addr`` directly; the daemon's lease and DNAT rule go at close."""
    net = router.net
    outside = await bind_in(net.p)
    peer = Peer(net.c, impl, protocols)
    try:
        public = await peer.wait_public_addr()
        assert public[0] == ROUTER_PUBLIC
        leases = router.mappings()
        # UDP:<external port>:<internal ip>:<internal port>:<expiry>:<description>
        assert len(leases) == 1, leases
        proto, ext, int_ip, int_port, _, desc = leases[0].split(":", 5)
        assert (proto, int(ext), int_ip, int(int_port)) == ("UDP", public[1], PEER, peer.port)
        assert desc.startswith(label), desc
        assert any(f"dport {public[1]} dnat ip to {PEER}:{peer.port}" in rule
                   for rule in router.dnat_rules()), router.dnat_rules()
        dropped_before = router_drops(router)
        await echo(outside, public, peer.peer_id)
        assert router_drops(router) == dropped_before  # nothing of it was dropped
    finally:
        peer.close()
        await outside.close()
    assert router.mappings() == []
    assert router.dnat_rules() == []


def router_drops(router: UpnpRouter) -> int:
    """Inbound packets R's firewall dropped as unsolicited."""
    return router.net.r.lab.dropped(router.net.r, table=TABLE)


@pytest.mark.asyncio
async def test_without_port_mapping_outside_cannot_reach(router: UpnpRouter,
                                                         impl: str) -> None:
    """The same lab with port mapping off: no lease, no public_addr, and a dial to the
    router's address and the peer's port is dropped by the NAT."""
    net = router.net
    outside = await bind_in(net.p)
    peer = Peer(net.c, impl)
    try:
        assert peer.public_addr() is None
        before = router_drops(router)
        with pytest.raises(qp2p.ConnectionError):
            await outside.connect_to((ROUTER_PUBLIC, peer.port), expect_peer_id=peer.peer_id)
        assert router_drops(router) > before
        assert router.mappings() == []
        assert peer.public_addr() is None
    finally:
        peer.close()
        await outside.close()


def test_lease_is_renewed(router: UpnpRouter) -> None:
    """A short lease is renewed at half its lifetime, with each protocol: the daemon's
    expiry (its lease file) moves forward, and the lease is gone after stop()."""
    code = (
        "import asyncio, json, sys\n"
        "from pathlib import Path\n"
        "from qp2p.portmap import PortMapper\n"
        "def expiry():\n"
        "    return [int(l.split(':')[4]) for l in Path(sys.argv[2]).read_text().splitlines()\n"
        "            if l.startswith('UDP:')]\n"
        "async def main(proto):\n"
        "    m = PortMapper(40000, protocols=(proto,), lifetime=4)\n"
        "    m.start()\n"
        "    seen = []\n"
        "    for _ in range(400):\n"
        "        if m.renewals >= 2: break\n"
        "        if m.mapping and not seen: seen = expiry()\n"
        "        await asyncio.sleep(0.05)\n"
        "    print(json.dumps([m.mapping and m.mapping.protocol, m.renewals, seen, expiry()]))\n"
        "    await m.stop()\n"
        "asyncio.run(main(sys.argv[1]))\n")
    for proto in ("pcp", "natpmp", "upnp"):
        out = router.net.c.python(code, proto, str(router.lease_file), cwd=CWD,
                                  env={**os.environ, "PYTHONPATH": pythonpath()}).stdout
        name, renewals, first_expiry, last_expiry = json.loads(out)
        assert (name, renewals) == (proto, 2), out
        assert len(first_expiry) == 1 and len(last_expiry) == 1, out
        assert last_expiry[0] > first_expiry[0], out
        assert router.mappings() == []


# ------------------------------------------------------------------ a hostile gateway


class FakeGateway:
    """UDP port 5351 of R's inside address, scripted by the test (this process)."""

    def __init__(self, host: Host, addr: str) -> None:
        self.sock = host.socket()
        self.sock.bind((addr, 5351))
        self.sock.settimeout(10)
        self.spoof = host.socket()
        self.spoof.bind((addr, 5352))  # the right address, the wrong port

    def recv(self) -> tuple[bytes, tuple[str, int]]:
        data, src = self.sock.recvfrom(2048)
        return data, src

    def close(self) -> None:
        self.sock.close()
        self.spoof.close()


def v4mapped(ip: str) -> bytes:
    return b"\x00" * 10 + b"\xff\xff" + socket.inet_aton(ip)


def pcp_reply(req: bytes, *, ext: str, eport: int, code: int = 0, lifetime: int = 600,
              nonce: bytes | None = None, opcode: int = 0x81, version: int = 2,
              iport: int | None = None) -> bytes:
    header = struct.pack("!BBBBII12x", version, opcode, 0, code, lifetime, 1)
    body = ((nonce if nonce is not None else req[24:36]) + req[36:40]
            + struct.pack("!HH", iport if iport is not None else struct.unpack_from(
                "!H", req, 40)[0], eport) + v4mapped(ext))
    return header + body


@pytest.mark.asyncio
async def test_hostile_gateway_pcp(lab: Lab, impl: str) -> None:
    """Spoofed, malformed and mismatched replies are ignored; the one true reply wins.
    ``bind`` returned before the gateway answered anything (the mapping runs after it)."""
    net = behind_nat(lab)
    gw = FakeGateway(net.r, "198.18.1.1")
    peer = Peer(net.c, impl, "--port-mapping=pcp")
    try:
        assert peer.public_addr() is None  # bound and serving; the gateway said nothing yet
        req, src = await asyncio.to_thread(gw.recv)
        assert len(req) == 60 and req[:2] == b"\x02\x01" and src[0] == PEER
        assert struct.unpack_from("!H", req, 40)[0] == peer.port
        lies = [
            pcp_reply(req, ext="6.6.6.6", eport=666, nonce=b"\x00" * 12),  # wrong nonce
            pcp_reply(req, ext="6.6.6.6", eport=666, opcode=0x82),         # wrong opcode
            pcp_reply(req, ext="6.6.6.6", eport=666, iport=1),             # wrong port
            pcp_reply(req, ext="6.6.6.6", eport=666, version=3),           # wrong version
            pcp_reply(req, ext="6.6.6.6", eport=666)[:59],                 # truncated
            pcp_reply(req, ext="6.6.6.6", eport=666) + b"\x00" * 2000,     # oversized
            pcp_reply(req, ext="6.6.6.6", eport=666)[:-16] + b"\x20\x01" + b"\x00" * 14,
            b"", b"\xff" * 7,
        ]
        for lie in lies:
            gw.sock.sendto(lie, src)
        gw.spoof.sendto(pcp_reply(req, ext="6.6.6.6", eport=666), src)  # from port 5352
        gw.sock.sendto(pcp_reply(req, ext="198.18.0.1", eport=4242), src)
        assert await peer.wait_public_addr() == ("198.18.0.1", 4242)
        peer.proc.stdin.close()  # type: ignore[union-attr]
        # the delete at close: MAP, lifetime 0, the mapping's own nonce
        while True:
            delete, _ = await asyncio.to_thread(gw.recv)
            if struct.unpack_from("!I", delete, 4)[0] == 0:
                break
        assert delete[24:36] == req[24:36] and delete[1] == 1
        gw.sock.sendto(pcp_reply(delete, ext="198.18.0.1", eport=0, lifetime=0), src)
    finally:
        peer.close()
        gw.close()


@pytest.mark.asyncio
async def test_hostile_gateway_natpmp(lab: Lab, impl: str) -> None:
    """A NAT-PMP-only gateway answers PCP with "unsupported version": NAT-PMP follows.
    Its external address and mapping are taken only from well-formed replies to the
    request made."""
    net = behind_nat(lab)
    gw = FakeGateway(net.r, "198.18.1.1")
    peer = Peer(net.c, impl, "--port-mapping=pcp,natpmp")
    try:
        assert peer.public_addr() is None
        req, src = await asyncio.to_thread(gw.recv)
        assert req[:2] == b"\x02\x01"  # PCP first
        gw.sock.sendto(struct.pack("!BBHI", 0, 0x81, 1, 7), src)  # RFC 6886 §3.5
        while (req := (await asyncio.to_thread(gw.recv))[0])[0] == 2:
            pass  # PCP retransmissions
        assert req == b"\x00\x00"  # external address first
        for lie in [struct.pack("!BBHI4s", 0, 0x81, 0, 1, socket.inet_aton("6.6.6.6")),
                    struct.pack("!BBHI4s", 1, 0x80, 0, 1, socket.inet_aton("6.6.6.6")),
                    struct.pack("!BBHI4sH", 0, 0x80, 0, 1, socket.inet_aton("6.6.6.6"), 0),
                    b"\x00\x80"]:
            gw.sock.sendto(lie, src)
        gw.spoof.sendto(struct.pack("!BBHI4s", 0, 0x80, 0, 1, socket.inet_aton("6.6.6.6")),
                        src)
        gw.sock.sendto(struct.pack("!BBHI4s", 0, 0x80, 0, 1, socket.inet_aton("198.18.0.1")),
                       src)
        while True:
            req, src = await asyncio.to_thread(gw.recv)
            if req[:2] == b"\x00\x01":
                break
        iport, _, life = struct.unpack_from("!HHI", req, 4)
        assert iport == peer.port and life > 0
        for lie in [struct.pack("!BBHIHHI", 0, 0x81, 0, 1, 1, 666, 600),        # other port
                    struct.pack("!BBHIHHI", 0, 0x81, 0, 1, iport, 666, 600)[:15],
                    struct.pack("!BBHIHHI", 0, 0x82, 0, 1, iport, 666, 600)]:
            gw.sock.sendto(lie, src)
        gw.spoof.sendto(struct.pack("!BBHIHHI", 0, 0x81, 0, 1, iport, 666, 600), src)
        gw.sock.sendto(struct.pack("!BBHIHHI", 0, 0x81, 0, 1, iport, 4243, 600), src)
        assert await peer.wait_public_addr() == ("198.18.0.1", 4243)
    finally:
        peer.close()
        gw.close()


@pytest.mark.asyncio
async def test_close_during_the_request_deletes_it(lab: Lab, impl: str) -> None:
    """Closed before the gateway answered: the gateway may have granted it all the same,
    so the close sends the delete (PCP: lifetime 0, the same nonce)."""
    net = behind_nat(lab)
    gw = FakeGateway(net.r, "198.18.1.1")
    peer = Peer(net.c, impl, "--port-mapping=pcp")
    try:
        req, src = await asyncio.to_thread(gw.recv)
        assert struct.unpack_from("!I", req, 4)[0] > 0
        peer.proc.stdin.close()  # type: ignore[union-attr]
        while True:
            delete, _ = await asyncio.to_thread(gw.recv)
            if struct.unpack_from("!I", delete, 4)[0] == 0:
                break
        assert delete[24:42] == req[24:42]  # nonce, protocol, internal port
        gw.sock.sendto(pcp_reply(delete, ext="198.18.0.1", eport=0, lifetime=0), src)
    finally:
        peer.close()
        gw.close()


@pytest.mark.asyncio
async def test_ssdp_answer_from_another_lan_host_is_ignored(lab: Lab, impl: str) -> None:
    """A LAN host that answers the IGD search with its own description URL is not the
    gateway: the peer neither fetches that URL nor maps anything."""
    net = behind_nat(lab)
    evil = lab.host("evil")
    lab.attach(evil, net.private, "198.18.1.20")
    evil.route("default", via="198.18.1.1")
    ssdp = evil.socket()
    ssdp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ssdp.bind(("0.0.0.0", 1900))
    ssdp.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP,
                    socket.inet_aton("239.255.255.250") + socket.inet_aton("198.18.1.20"))
    ssdp.settimeout(10)
    http = evil.socket(type=socket.SOCK_STREAM)
    http.bind(("198.18.1.20", 0))
    http.listen()
    http.setblocking(False)
    location = f"http://198.18.1.20:{http.getsockname()[1]}/rootDesc.xml"
    peer = Peer(net.c, impl, "--port-mapping=upnp", "--log", stderr=subprocess.PIPE)
    try:
        search, src = await asyncio.to_thread(ssdp.recvfrom, 2048)
        assert search.startswith(b"M-SEARCH") and src[0] == PEER
        ssdp.sendto(("HTTP/1.1 200 OK\r\nCACHE-CONTROL: max-age=120\r\nEXT:\r\n"
                     f"LOCATION: {location}\r\nSERVER: test UPnP/1.1\r\n"
                     "ST: urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n"
                     "USN: uuid:0f0f0f0f-0000-4000-8000-000000000000::"
                     "urn:schemas-upnp-org:device:InternetGatewayDevice:1\r\n\r\n"
                     ).encode(), src)
        lines = await peer.log_until("no IGD answered SSDP")
        assert any("ignored SSDP answer from 198.18.1.20" in x for x in lines), lines
        with pytest.raises(BlockingIOError):
            http.accept()  # nobody came for the description
        assert peer.public_addr() is None
    finally:
        peer.close()
        ssdp.close()
        http.close()


@pytest.mark.asyncio
async def test_no_gateway_service_is_quiet(lab: Lab, impl: str) -> None:
    """A router with no mapping service at all: every protocol's attempt ends (PCP on
    the ICMP "port unreachable", so NAT-PMP is not waited for; IGD when SSDP times out)
    without an error; the peer closes as usual; public_addr stays None."""
    net = behind_nat(lab)
    peer = Peer(net.c, impl, "--port-mapping", "--log", stderr=subprocess.PIPE)
    try:
        lines = await peer.log_until("no IGD answered SSDP")
        mine = [x for x in lines if "qp2p.portmap" in x]
        assert any("pcp: gateway refused" in x for x in mine), mine
        assert not any("natpmp" in x for x in mine), mine
        assert not any("port mapping failed" in x or "Traceback" in x for x in lines), mine
        assert peer.public_addr() is None
    finally:
        peer.close()  # asserts a clean exit
