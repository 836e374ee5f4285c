"""netlab: real (namespace) networks for tests: hosts, links, LANs, routers, loss, NAT.

What this host can do (checked 2025-11-25: kernel 6.18.44-fc-v595, iproute2 6.1.0, nftables 1.0.6):

* **netem: NO.** ``tc qdisc add dev X root netem delay 10ms`` fails with
  "Error: Specified qdisc kind is unknown." The kernel has no ``sch_netem`` and cannot load
  modules (no /lib/modules/<release>, no modprobe). Therefore:
    - random loss comes from nftables: ``numgen random mod 10000 < N drop`` (``Lab.set_loss``);
    - delay, jitter, reordering and duplication come from the userspace relay
      ``tests/support/udp_relay.py`` (``UdpRelay``), which also runs inside a namespace
      (``UdpRelay(..., socket_factory=host.socket)``).
  ``netem_available()`` re-checks at run time, should a later kernel have it.
* Yes: network namespaces, veth pairs created straight into namespaces, Linux bridges,
  nftables with conntrack, ``masquerade`` / ``masquerade fully-random``, ``numgen random``.
* ``nft`` is not installed on a fresh machine: ``tools/ensure-system-deps.sh`` installs it.

Policy this module enforces: every address is in the benchmarking range 198.18.0.0/15
(``ValueError`` otherwise), nothing is created in the root namespace (veths are born inside
their namespaces, nft tables live in lab namespaces only), and ``Lab.close()`` removes all
it made. Namespace names are ``qp-<random6>-<pid>-...``: unique per lab, and the first lab of
a process deletes ``qp-…`` namespaces left by dead processes (``sweep_stale_namespaces``).

Quick tour::

    with Lab() as lab:                      # or the ``lab`` pytest fixture below
        a, b = lab.host("a"), lab.host("b")
        link = lab.link(a, b)               # a.addr == "198.19.1.1", b.addr == "198.19.1.2"
        lab.set_loss(link, 20, direction="a->b")
        sock = b.socket()                   # a socket living in b's namespace, used in-process
        b.run("ip", "addr")                 # a command inside b's namespace
        # NAT topologies: behind_nat(lab, mode=...), double_nat(lab, mode=...)

Addresses: point-to-point links get 198.19.<k>.1/24 and .2/24 (k = 1, 2, ... per lab).
``behind_nat``/``double_nat`` use the public LAN 198.18.0.0/24 (P = .10 and .11, routers
R1 = .1, R2 = .2) and private LANs 198.18.1.0/24 (R1 = .1, C1 = .10) and 198.18.2.0/24
(R2 = .1, C2 = .10). Different labs reuse addresses freely: their namespaces are disjoint.

Running code "inside" a host: ``host.run``/``host.popen`` (``ip netns exec``) for
subprocesses; ``host.socket()`` for a socket that lives in the namespace but is used by this
process (e.g. by asyncio); ``with host.entered():`` switches the *calling thread's* network
namespace for a synchronous block (never hold it across an ``await``: other tasks would run
in the namespace too).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ipaddress
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import pytest

__all__ = [
    "BENCHMARK_NET",
    "CommandFailed",
    "DoubleNat",
    "Host",
    "Iface",
    "Lab",
    "LabError",
    "LabUnavailable",
    "Lan",
    "Link",
    "NatMode",
    "NatTopology",
    "TwoHosts",
    "behind_nat",
    "double_nat",
    "lab",
    "lab_fixture",
    "netem_available",
    "sweep_stale_namespaces",
    "two_hosts",
    "unavailable_reason",
]

BENCHMARK_NET = ipaddress.IPv4Network("198.18.0.0/15")
P2P_NET = ipaddress.IPv4Network("198.19.0.0/16")  # point-to-point links, one /24 each
NatMode = Literal["masquerade", "fully-random"]

_NS_RE = re.compile(r"^qp-[0-9a-f]{6}-(\d+)-")
_NAME_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")
_CLONE_NEWNET = 0x40000000


class LabError(RuntimeError):
    """Building or tearing down a lab failed."""


class LabUnavailable(LabError):
    """This host cannot run network-namespace labs; ``str()`` is the precise reason."""


class CommandFailed(subprocess.CalledProcessError):
    """A command exited non-zero; unlike CalledProcessError its message shows stderr."""

    def __str__(self) -> str:
        err = self.stderr.strip() if isinstance(self.stderr, str) else self.stderr
        return f"{super().__str__()} stderr: {err!r}"


# --------------------------------------------------------------------------- helpers


def _cmd(argv: Sequence[str], *, input: str | None = None, check: bool = True,
         timeout: float = 30) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(argv), input=input, capture_output=True, text=True,
                          timeout=timeout, check=False)
    if check and proc.returncode != 0:
        raise CommandFailed(proc.returncode, proc.args, proc.stdout, proc.stderr)
    return proc


def _check_addr(addr: str | ipaddress.IPv4Address) -> ipaddress.IPv4Address:
    a = ipaddress.IPv4Address(addr)
    if a not in BENCHMARK_NET:
        raise ValueError(f"{a} is outside 198.18.0.0/15; test networks use only that range")
    return a


def _check_net(net: str | ipaddress.IPv4Network) -> ipaddress.IPv4Network:
    n = ipaddress.IPv4Network(net)
    if not n.subnet_of(BENCHMARK_NET):
        raise ValueError(f"{n} is outside 198.18.0.0/15; test networks use only that range")
    return n


def _setns(fd: int) -> None:
    if hasattr(os, "setns"):  # Python >= 3.12
        os.setns(fd, _CLONE_NEWNET)
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _list_netns() -> list[str]:
    out = _cmd(["ip", "netns", "list"]).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def sweep_stale_namespaces() -> list[str]:
    """Delete ``qp-…`` namespaces whose creating process is gone; return their names.

    Namespaces of live processes (parallel test runs) are left alone.
    """
    removed = []
    for ns in _list_netns():
        m = _NS_RE.match(ns)
        if (m and not _pid_alive(int(m.group(1)))
                and _cmd(["ip", "netns", "del", ns], check=False).returncode == 0):
            removed.append(ns)
    return removed


_availability: list[str | None] = []  # [] = not probed yet; [None] = available


def unavailable_reason() -> str | None:
    """``None`` when labs can be built here, else the precise reason they cannot (cached)."""
    if not _availability:
        _availability.append(_probe())
    return _availability[0]


def _probe() -> str | None:
    if not sys.platform.startswith("linux"):
        return f"network namespaces need Linux (this is {sys.platform})"
    if os.geteuid() != 0:
        return f"network namespaces need root (euid={os.geteuid()})"
    for tool, pkg in (("ip", "iproute2"), ("nft", "nftables")):
        if shutil.which(tool) is None:
            return (f"`{tool}` not found (Debian package {pkg}); "
                    "run tools/ensure-system-deps.sh as root")
    ns = f"qp-{secrets.token_hex(3)}-{os.getpid()}-probe"
    try:
        step = "ip netns add"
        _cmd(["ip", "netns", "add", ns])
        try:
            step = "loopback up"
            _cmd(["ip", "-n", ns, "link", "set", "lo", "up"])
            step = "veth pair"
            _cmd(["ip", "-n", ns, "link", "add", "p0", "type", "veth", "peer", "name", "p1"])
            step = "bridge"
            _cmd(["ip", "-n", ns, "link", "add", "br0", "type", "bridge"])
            step = "nftables NAT + numgen + conntrack rules"
            _cmd(["ip", "netns", "exec", ns, "nft", "-f", "-"], input=(
                "table inet qpprobe {\n"
                " chain c { type filter hook prerouting priority -300; policy accept;\n"
                "  numgen random mod 10000 < 1 drop\n"
                "  ct state established,related accept\n }\n}\n"
                "table ip qpprobenat {\n"
                " chain c { type nat hook postrouting priority srcnat; policy accept;\n"
                "  oifname \"p0\" masquerade fully-random\n }\n}\n"))
        finally:
            _cmd(["ip", "netns", "del", ns], check=False)
    except (OSError, subprocess.SubprocessError) as e:
        detail = e.stderr.strip() if isinstance(e, CommandFailed) else str(e)
        return f"cannot build a network namespace lab ({step} failed): {detail}"
    return None


def netem_available() -> bool:
    """Whether ``tc ... netem`` works here (it does not on the kernel this was written on)."""
    if unavailable_reason() is not None or shutil.which("tc") is None:
        return False
    ns = f"qp-{secrets.token_hex(3)}-{os.getpid()}-netem"
    try:
        _cmd(["ip", "netns", "add", ns])
        return _cmd(["tc", "-n", ns, "qdisc", "add", "dev", "lo", "root", "netem",
                     "delay", "1ms"], check=False).returncode == 0
    finally:
        _cmd(["ip", "netns", "del", ns], check=False)


# --------------------------------------------------------------------------- model


@dataclass(eq=False)
class Iface:
    """One interface of a host: its name inside the namespace and its IPv4 address."""

    host: Host
    name: str
    addr: str
    network: ipaddress.IPv4Network
    peer: Iface | None = None  # the other end of a point-to-point link
    lan: Lan | None = None     # or the LAN it is attached to

    @property
    def cidr(self) -> str:
        return f"{self.addr}/{self.network.prefixlen}"

    def __repr__(self) -> str:
        return f"<Iface {self.host.name}:{self.name} {self.cidr}>"


@dataclass(eq=False)
class Link:
    """A veth pair between two hosts; ``a``/``b`` are the two ends."""

    a: Iface
    b: Iface

    @property
    def network(self) -> ipaddress.IPv4Network:
        return self.a.network


@dataclass(eq=False)
class Lan:
    """A switched segment (a bridge in its own namespace) several hosts attach to."""

    lab: Lab
    name: str
    ns: str
    network: ipaddress.IPv4Network
    ifaces: list[Iface] = field(default_factory=list)
    _ports: int = 0
    _next_host: int = 1

    def _allocate(self, addr: str | None) -> str:
        if addr is not None:
            a = _check_addr(addr)
            if a not in self.network:
                raise ValueError(f"{a} is not in LAN {self.name} ({self.network})")
            return str(a)
        used = {i.addr for i in self.ifaces}
        while True:
            a = self.network.network_address + self._next_host
            self._next_host += 1
            if a == self.network.broadcast_address:
                raise LabError(f"LAN {self.name} is full")
            if str(a) not in used:
                return str(a)


class Host:
    """A network namespace. ``addr`` is its first address (the one on its first interface)."""

    def __init__(self, lab: Lab, name: str, ns: str) -> None:
        self.lab = lab
        self.name = name
        self.ns = ns  # the namespace's name as `ip netns list` shows it
        self.ifaces: list[Iface] = []
        self._extra_addrs: list[str] = []
        self._nifs = 0
        self._loss: dict[tuple[str, str], int] = {}  # (ifname, "in"/"out") -> per 10000

    def __repr__(self) -> str:
        return f"<Host {self.name} {self.addrs}>"

    @property
    def addr(self) -> str:
        if not self.ifaces:
            raise LabError(f"host {self.name} has no interface yet")
        return self.ifaces[0].addr

    @property
    def addrs(self) -> list[str]:
        """All IPv4 addresses, interface order first, then ``add_addr`` extras."""
        return [i.addr for i in self.ifaces] + self._extra_addrs

    def iface_to(self, other: Host | Lan) -> Iface:
        """This host's interface on the link to ``other`` (a Host) or on LAN ``other``."""
        for i in self.ifaces:
            if (isinstance(other, Lan) and i.lan is other) or (
                    isinstance(other, Host) and i.peer is not None and i.peer.host is other):
                return i
        raise LabError(f"{self.name} has no interface to {other!r}")

    # -- running things inside

    def run(self, *argv: str, check: bool = True, timeout: float = 60,
            **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` in this namespace; output captured as text. Raises CommandFailed
        on a non-zero exit unless ``check=False``."""
        self.lab.wait_ready()
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        proc = subprocess.run(["ip", "netns", "exec", self.ns, *argv], check=False,
                              timeout=timeout, **kw)
        if check and proc.returncode != 0:
            raise CommandFailed(proc.returncode, proc.args, proc.stdout, proc.stderr)
        return proc

    def popen(self, *argv: str, **kw: Any) -> subprocess.Popen[Any]:
        """Start ``argv`` in this namespace; the lab kills it (if still running) on close."""
        self.lab.wait_ready()
        proc = subprocess.Popen(["ip", "netns", "exec", self.ns, *argv], **kw)
        self.lab._procs.append(proc)
        return proc

    def python(self, code: str, *args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
        """Run a snippet of Python (this interpreter, this venv) inside the namespace."""
        return self.run(sys.executable, "-c", code, *args, **kw)

    @contextlib.contextmanager
    def entered(self) -> Iterator[None]:
        """Put the *calling thread* in this namespace for a synchronous block."""
        self.lab.wait_ready()
        own = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
        try:
            target = os.open(f"/run/netns/{self.ns}", os.O_RDONLY)
            try:
                _setns(target)
            finally:
                os.close(target)
            try:
                yield
            finally:
                _setns(own)
        finally:
            os.close(own)

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_DGRAM,
               proto: int = 0) -> socket.socket:
        """A new socket that lives in this namespace (it stays there whoever uses it)."""
        with self.entered():
            return socket.socket(family, type, proto)

    # -- configuration

    def ip(self, *args: str) -> str:
        return _cmd(["ip", "-n", self.ns, *args]).stdout

    def nft(self, script: str) -> None:
        """Load an nft script (``nft -f -``) into this namespace."""
        _cmd(["ip", "netns", "exec", self.ns, "nft", "-f", "-"], input=script)

    def sysctl(self, **settings: str | int) -> None:
        """``sysctl(net__ipv4__ip_forward=1)``: ``__`` stands for ``.`` in keys."""
        args = [f"{k.replace('__', '.')}={v}" for k, v in settings.items()]
        _cmd(["ip", "netns", "exec", self.ns, "sysctl", "-q", "-w", *args])

    def route(self, dst: str, via: str | Host | Iface) -> None:
        """Add a route; ``dst`` is a CIDR or ``"default"``; ``via`` the next hop's address,
        or a Host/Iface reachable on a shared link or LAN."""
        if dst != "default":
            _check_net(dst)
        if isinstance(via, Host):
            via = self._neighbour_iface(via)
        gw = via.addr if isinstance(via, Iface) else str(_check_addr(via))
        _cmd(["ip", "-n", self.ns, "route", "replace", dst, "via", gw])

    def _neighbour_iface(self, other: Host) -> Iface:
        for mine in self.ifaces:
            for theirs in other.ifaces:
                if mine.peer is theirs or (mine.lan is not None and mine.lan is theirs.lan):
                    return theirs
        raise LabError(f"{other.name} is not a neighbour of {self.name}")

    def add_addr(self, addr: str, iface: Iface | None = None) -> None:
        """A further address on ``iface`` (default: the first), same prefix length."""
        iface = iface or self.ifaces[0]
        a = _check_addr(addr)
        if a not in iface.network:
            raise ValueError(f"{a} is not in {iface.network}")
        _cmd(["ip", "-n", self.ns, "addr", "add", f"{a}/{iface.network.prefixlen}",
              "dev", iface.name])
        self._extra_addrs.append(str(a))

    def _new_ifname(self) -> str:
        name = f"eth{self._nifs}"
        self._nifs += 1
        return name


_live_labs: weakref.WeakSet[Lab] = weakref.WeakSet()
_swept = False


class Lab:
    """Owns a set of namespaces and everything in them; ``close()`` removes it all.

    Raises ``LabUnavailable`` (with the reason) when this host cannot build one.
    """

    def __init__(self) -> None:
        global _swept
        reason = unavailable_reason()
        if reason is not None:
            raise LabUnavailable(reason)
        if not _swept:
            _swept = True
            sweep_stale_namespaces()
        self.id = secrets.token_hex(3)
        self.prefix = f"qp-{self.id}-{os.getpid()}"
        self.hosts: dict[str, Host] = {}
        self.lans: dict[str, Lan] = {}
        self.links: list[Link] = []
        self._namespaces: list[str] = []
        self._procs: list[subprocess.Popen[Any]] = []
        self._nlinks = 0
        self._unsettled: set[tuple[str, str]] = set()  # (namespace, ifname) just set up
        self._closed = False
        _live_labs.add(self)

    def __enter__(self) -> Lab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def namespaces(self) -> list[str]:
        """Names of every namespace this lab made (hosts and LAN switches)."""
        return list(self._namespaces)

    def _new_ns(self, kind: str, name: str) -> str:
        if self._closed:
            raise LabError("lab is closed")
        if not _NAME_RE.match(name):
            raise ValueError(f"bad name {name!r}: use [a-z][a-z0-9]{{0,11}}")
        ns = f"{self.prefix}-{kind}-{name}"
        _cmd(["ip", "netns", "add", ns])
        self._namespaces.append(ns)
        _cmd(["ip", "-n", ns, "link", "set", "lo", "up"])
        # No IPv6: no router solicitations, DAD or MLD noise on test links.
        _cmd(["ip", "netns", "exec", ns, "sysctl", "-q", "-w",
              "net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1"])
        return ns

    # -- building

    def host(self, name: str, *, forward: bool = False) -> Host:
        """A new namespace with loopback up; ``forward=True`` makes it a router."""
        if name in self.hosts:
            raise ValueError(f"host {name!r} exists")
        h = Host(self, name, self._new_ns("h", name))
        self.hosts[name] = h
        if forward:
            h.sysctl(net__ipv4__ip_forward=1)
        return h

    def router(self, name: str) -> Host:
        """A host with IPv4 forwarding on."""
        return self.host(name, forward=True)

    def link(self, a: Host, b: Host, *, subnet: str | None = None,
             addr_a: str | None = None, addr_b: str | None = None) -> Link:
        """Connect two hosts with a veth pair. Without ``subnet`` the link gets the next
        198.19.<k>.0/24; ``a`` takes host number 1 and ``b`` number 2 unless given."""
        if subnet is None:
            self._nlinks += 1
            if self._nlinks > 254:
                raise LabError("too many links")
            net = ipaddress.IPv4Network(f"198.19.{self._nlinks}.0/24")
        else:
            net = _check_net(subnet)
        ia = str(_check_addr(addr_a)) if addr_a else str(net.network_address + 1)
        ib = str(_check_addr(addr_b)) if addr_b else str(net.network_address + 2)
        for x in (ia, ib):
            if ipaddress.IPv4Address(x) not in net:
                raise ValueError(f"{x} is not in {net}")
        na, nb = a._new_ifname(), b._new_ifname()
        _cmd(["ip", "-n", a.ns, "link", "add", na, "type", "veth",
              "peer", "name", nb, "netns", b.ns])
        ea = Iface(a, na, ia, net)
        eb = Iface(b, nb, ib, net, peer=ea)
        ea.peer = eb
        for e in (ea, eb):
            self._up(e)
        link = Link(ea, eb)
        self.links.append(link)
        return link

    def lan(self, name: str, subnet: str) -> Lan:
        """A switched segment; hosts join it with ``attach``."""
        if name in self.lans:
            raise ValueError(f"LAN {name!r} exists")
        lan = Lan(self, name, self._new_ns("s", name), _check_net(subnet))
        _cmd(["ip", "-n", lan.ns, "link", "add", "br0", "type", "bridge"])
        _cmd(["ip", "-n", lan.ns, "link", "set", "br0", "up"])
        self.lans[name] = lan
        return lan

    def attach(self, host: Host, lan: Lan, addr: str | None = None) -> Iface:
        """Plug ``host`` into ``lan`` with ``addr`` (default: the next free one)."""
        a = lan._allocate(addr)
        port = f"p{lan._ports}"
        lan._ports += 1
        ifname = host._new_ifname()
        _cmd(["ip", "-n", lan.ns, "link", "add", port, "type", "veth",
              "peer", "name", ifname, "netns", host.ns])
        _cmd(["ip", "-n", lan.ns, "link", "set", port, "master", "br0", "up"])
        self._unsettled.add((lan.ns, port))
        iface = Iface(host, ifname, a, lan.network, lan=lan)
        self._up(iface)
        lan.ifaces.append(iface)
        return iface

    def _up(self, iface: Iface) -> None:
        ns = iface.host.ns
        _cmd(["ip", "-n", ns, "addr", "add", iface.cidr, "dev", iface.name])
        _cmd(["ip", "-n", ns, "link", "set", iface.name, "up"])
        iface.host.ifaces.append(iface)
        self._unsettled.add((ns, iface.name))

    def wait_ready(self, timeout: float = 10.0) -> None:
        """Block until every interface made so far shows carrier and a real qdisc.

        Why: measured here with four test runs in parallel (2 CPUs), about 1 in 80 fresh
        veth links lost the very first ARP request (the sender's veth counted one TX drop)
        and the test's first datagram arrived a full ARP retransmit (1 s) late. With this
        wait before first use: 0 in 960. The mechanism is not proven: the likely one is the
        kernel finishing a veth's bring-up (carrier, qdisc) asynchronously in linkwatch,
        whose non-urgent work runs up to 1 s apart, but this poll has never caught an
        interface still unready, so part of the cure may simply be its few ms of delay.
        It checks LOWER_UP and a qdisc other than ``noop``, not ``state UP`` (operstate lags
        up to 1 s and IPv4 ignores it); cost 10-30 ms per topology. Called for you before
        ``Host.run/popen/socket/entered``.
        """
        deadline = time.monotonic() + timeout
        while self._unsettled:
            for ns in {ns for ns, _ in self._unsettled}:
                for line in _cmd(["ip", "-n", ns, "-o", "link", "show"]).stdout.splitlines():
                    name = line.split(":")[1].strip().split("@")[0]
                    if ((ns, name) in self._unsettled and "LOWER_UP" in line
                            and "qdisc noop" not in line):
                        self._unsettled.discard((ns, name))
            if self._unsettled:
                if time.monotonic() > deadline:
                    raise LabError(f"interfaces not ready after {timeout}s: "
                                   f"{sorted(self._unsettled)}")
                time.sleep(0.005)

    # -- impairment

    def set_loss(self, target: Link | Host | Iface, percent: float,
                 direction: str = "both") -> None:
        """Drop ``percent`` % of packets at random (nftables ``numgen``); 0 removes the rule.

        * Link: ``direction`` is ``"a->b"``, ``"b->a"`` or ``"both"``; the drop happens as
          packets arrive at the receiving end.
        * Host or Iface: ``"in"``, ``"out"`` or ``"both"``; for a Host, on every interface
          (this includes forwarded traffic on a router).
        Drops happen before conntrack, so a lost packet leaves no NAT/conntrack state.
        Resolution is 0.01 %.
        """
        if not 0 <= percent <= 100:
            raise ValueError("percent must be within 0..100")
        per10k = round(percent * 100)
        rules: list[tuple[Iface, str]] = []
        if isinstance(target, Link):
            if direction not in ("a->b", "b->a", "both"):
                raise ValueError("direction for a Link: 'a->b', 'b->a' or 'both'")
            if direction in ("a->b", "both"):
                rules.append((target.b, "in"))
            if direction in ("b->a", "both"):
                rules.append((target.a, "in"))
        else:
            if direction not in ("in", "out", "both"):
                raise ValueError("direction for a Host/Iface: 'in', 'out' or 'both'")
            ifaces = target.ifaces if isinstance(target, Host) else [target]
            dirs = ("in", "out") if direction == "both" else (direction,)
            rules += [(i, d) for i in ifaces for d in dirs]
        touched = set()
        for iface, d in rules:
            key = (iface.name, d)
            if per10k:
                iface.host._loss[key] = per10k
            else:
                iface.host._loss.pop(key, None)
            touched.add(iface.host)
        for host in touched:
            self._write_loss_table(host)

    @staticmethod
    def _write_loss_table(host: Host) -> None:
        def rule(match: str, per10k: int) -> str:
            chance = f"numgen random mod 10000 < {per10k} " if per10k < 10000 else ""
            return f'    {match} {chance}counter drop\n'

        rin = "".join(rule(f'iifname "{i}"', n)
                      for (i, d), n in sorted(host._loss.items()) if d == "in")
        rout = "".join(rule(f'oifname "{i}"', n)
                       for (i, d), n in sorted(host._loss.items()) if d == "out")
        # "add table; delete table; table {...}" replaces the table in one transaction.
        host.nft(
            "add table inet qploss\ndelete table inet qploss\n"
            "table inet qploss {\n"
            "  chain ingress {\n    type filter hook prerouting priority -300; policy accept;\n"
            f"{rin}  }}\n"
            "  chain egress {\n    type filter hook postrouting priority 300; policy accept;\n"
            f"{rout}  }}\n}}\n")

    def dropped(self, host: Host, table: str = "qploss") -> int:
        """Packets dropped by ``counter drop`` rules of ``host``'s table (``qploss`` = random
        loss, ``qpfw`` = the NAT router's unsolicited-inbound drops)."""
        out = _cmd(["ip", "netns", "exec", host.ns, "nft", "-j", "list", "table", "inet",
                    table], check=False)
        if out.returncode != 0:
            return 0
        total = 0
        for item in json.loads(out.stdout).get("nftables", []):
            for expr in item.get("rule", {}).get("expr", []):
                if "counter" in expr:
                    total += expr["counter"]["packets"]
        return total

    # -- NAT

    def nat(self, router: Host, outside: Iface | Lan | Host, *,
            inside: str | Sequence[str] | None = None, mode: NatMode = "masquerade",
            drop_unsolicited: bool = True) -> Iface:
        """Source-NAT everything ``router`` forwards out of its ``outside`` interface.

        ``outside``: the router's public Iface, or the Lan/Host it reaches through it.
        ``inside``: only NAT these source subnets (default: all traffic leaving ``outside``).
        ``mode``: ``"masquerade"`` keeps the source port when it can and reuses one mapping
        for every destination (endpoint-independent); ``"fully-random"`` picks a random port
        per destination (symmetric NAT, defeats hole punching).
        ``drop_unsolicited``: like a home router, drop inbound packets on the outside
        interface that belong to no flow started from inside (``ct state
        established,related accept; drop``, in both the input and forward hooks) — needed for
        reliable hole punching, see DESIGN.md §7. Returns the outside Iface.
        """
        if mode not in ("masquerade", "fully-random"):
            raise ValueError(f"mode must be 'masquerade' or 'fully-random', not {mode!r}")
        out = outside if isinstance(outside, Iface) else router.iface_to(outside)
        if out.host is not router:
            raise ValueError(f"{out!r} is not an interface of {router.name}")
        match = ""
        if inside is not None:
            nets = [inside] if isinstance(inside, str) else list(inside)
            match = "ip saddr { " + ", ".join(str(_check_net(n)) for n in nets) + " } "
        flags = " fully-random" if mode == "fully-random" else ""
        t = f"qpnat_{out.name}"
        router.nft(
            f"add table ip {t}\ndelete table ip {t}\n"
            f"table ip {t} {{\n  chain postrouting {{\n"
            "    type nat hook postrouting priority srcnat; policy accept;\n"
            f'    oifname "{out.name}" {match}masquerade{flags}\n  }}\n}}\n')
        if drop_unsolicited:
            chains = "".join(
                f"  chain {hook} {{\n"
                f"    type filter hook {hook} priority filter; policy accept;\n"
                f'    iifname "{out.name}" ct state established,related accept\n'
                f'    iifname "{out.name}" counter drop\n  }}\n'
                for hook in ("input", "forward"))
            router.nft(f"add table inet qpfw\ndelete table inet qpfw\n"
                       f"table inet qpfw {{\n{chains}}}\n")
        return out

    # -- teardown

    def close(self) -> None:
        """Kill processes started with ``popen``, delete every namespace (their veths,
        bridges, nft tables and conntrack state go with them). Idempotent. Raises LabError
        if anything could not be removed."""
        if self._closed:
            return
        self._closed = True
        for proc in self._procs:
            if proc.poll() is None:
                proc.terminate()
        for proc in self._procs:
            try:
                proc.wait(timeout=3)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=3)
        problems = []
        for ns in reversed(self._namespaces):
            r = _cmd(["ip", "netns", "del", ns], check=False)
            if r.returncode != 0:
                problems.append(f"{ns}: {r.stderr.strip()}")
        left = set(self._namespaces) & set(_list_netns())
        _live_labs.discard(self)
        if problems or left:
            raise LabError(f"lab teardown left {sorted(left)}: {problems}")


def _close_live_labs() -> None:
    for lab_ in list(_live_labs):
        with contextlib.suppress(Exception):
            lab_.close()


atexit.register(_close_live_labs)  # e.g. after KeyboardInterrupt; SIGKILL: see the sweep


# --------------------------------------------------------------------------- topologies


@dataclass
class TwoHosts:
    a: Host
    b: Host
    link: Link


def two_hosts(lab: Lab, *, loss_ab: float = 0, loss_ba: float = 0) -> TwoHosts:
    """Topology 1: A (198.19.1.1) -- B (198.19.1.2) with random loss per direction (%)."""
    a, b = lab.host("a"), lab.host("b")
    link = lab.link(a, b)
    if loss_ab:
        lab.set_loss(link, loss_ab, direction="a->b")
    if loss_ba:
        lab.set_loss(link, loss_ba, direction="b->a")
    return TwoHosts(a, b, link)


@dataclass
class NatTopology:
    p: Host       # public host (servers): 198.18.0.10 and 198.18.0.11
    r: Host       # NAT router: public 198.18.0.1, inside 198.18.1.1
    c: Host       # private host 198.18.1.10
    public: Lan   # 198.18.0.0/24
    private: Lan  # 198.18.1.0/24

    @property
    def r_public(self) -> str:
        return self.r.iface_to(self.public).addr


def _private_site(lab: Lab, public: Lan, n: int, mode: NatMode,
                  drop_unsolicited: bool) -> tuple[Host, Host, Lan]:
    r = lab.router(f"r{n}")
    lab.attach(r, public, f"198.18.0.{n}")
    priv = lab.lan(f"priv{n}", f"198.18.{n}.0/24")
    lab.attach(r, priv, f"198.18.{n}.1")
    c = lab.host(f"c{n}")
    lab.attach(c, priv, f"198.18.{n}.10")
    c.route("default", via=f"198.18.{n}.1")
    lab.nat(r, public, inside=f"198.18.{n}.0/24", mode=mode, drop_unsolicited=drop_unsolicited)
    return r, c, priv


def _public(lab: Lab) -> tuple[Host, Lan]:
    public = lab.lan("pub", "198.18.0.0/24")
    p = lab.host("p")
    lab.attach(p, public, "198.18.0.10")
    p.add_addr("198.18.0.11")
    return p, public


def behind_nat(lab: Lab, *, mode: NatMode = "masquerade",
               drop_unsolicited: bool = True) -> NatTopology:
    """Topology 2: P on the public LAN; C (198.18.1.10) behind NAT router R (198.18.0.1).
    P has no route to 198.18.1.0/24: it can only answer what R's NAT maps back."""
    p, public = _public(lab)
    r, c, priv = _private_site(lab, public, 1, mode, drop_unsolicited)
    return NatTopology(p, r, c, public, priv)


@dataclass
class DoubleNat:
    p: Host       # rendezvous / servers: 198.18.0.10 and 198.18.0.11
    r1: Host      # 198.18.0.1 | 198.18.1.1
    c1: Host      # 198.18.1.10
    r2: Host      # 198.18.0.2 | 198.18.2.1
    c2: Host      # 198.18.2.10
    public: Lan


def double_nat(lab: Lab, *, mode: NatMode = "masquerade", mode2: NatMode | None = None,
               drop_unsolicited: bool = True) -> DoubleNat:
    """Topology 3: P on the public LAN; C1 behind R1 and C2 behind R2 (``mode2`` defaults
    to ``mode``). No route between the private LANs; the routers drop unsolicited inbound."""
    p, public = _public(lab)
    r1, c1, _ = _private_site(lab, public, 1, mode, drop_unsolicited)
    r2, c2, _ = _private_site(lab, public, 2, mode2 or mode, drop_unsolicited)
    return DoubleNat(p, r1, c1, r2, c2, public)


# --------------------------------------------------------------------------- pytest


@pytest.fixture(name="lab")
def lab_fixture() -> Iterator[Lab]:
    """Fixture ``lab``: an empty Lab, removed after the test whatever happens; skips with the
    reason when this host cannot build one. ``tests/conftest.py`` registers this module as
    a plugin (``pytest_plugins``): a test takes a ``lab`` argument."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    the_lab = Lab()
    try:
        yield the_lab
    finally:
        the_lab.close()


lab = lab_fixture  # the same fixture under its own name (``from tests.support.netlab import lab``)
