"""A home router with a real port-mapping daemon, for the port-mapping tests.

``upnp_router(lab, workdir)`` builds ``behind_nat``'s topology (P on the public LAN, C behind
router R) and runs Debian's ``miniupnpd`` (nftables backend) in R's namespace, serving
UPnP-IGD, NAT-PMP and PCP on R's inside address 198.18.1.1.

Two details of the lab follow from the daemon:

* miniupnpd refuses to map when its outside address is reserved ("Reserved / private IP
  address ... Port forwarding is impossible"), and 198.18.0.0/15 is reserved (benchmarking).
  Its documented way out is ``ext_perform_stun=yes``: it asks a STUN server (with RFC 3489
  CHANGE-REQUEST) for its public address and enables mapping when the answers show no
  upstream NAT or filtering. So ``StunServer`` below answers on P's two addresses and two
  ports each, and R's input accepts the STUN server's answers (the one exception to
  dropping unsolicited inbound packets, as ``Lab.nat`` does).
* Filtering: R's input and forward chains drop inbound packets of no known flow, like
  ``Lab.nat(drop_unsolicited=True)``, but live in miniupnpd's own table and jumps to its
  chain first, so a mapping the daemon makes (a DNAT rule plus a forward accept) lets
  unsolicited packets through, and nothing else does.
"""

from __future__ import annotations

import select
import shutil
import socket
import struct
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.netlab import Host, Lab, Lan, NatTopology, behind_nat

MINIUPNPD = "/usr/sbin/miniupnpd"
TABLE = "qpupnp"
STUN_PORTS = (3478, 3479)


def miniupnpd_missing() -> str | None:
    """Why miniupnpd cannot run here, or ``None``."""
    if shutil.which(MINIUPNPD) is None and not Path(MINIUPNPD).exists():
        return ("miniupnpd not installed (Debian package miniupnpd-nftables); "
                "run tools/ensure-system-deps.sh as root")
    return None


class StunServer:
    """A minimal RFC 3489 STUN binding responder (MAPPED-ADDRESS; CHANGE-REQUEST honoured)
    on two addresses x two ports of ``host``, run by a thread of this process."""

    def __init__(self, host: Host, addrs: tuple[str, str]) -> None:
        self.socks: dict[tuple[int, int], socket.socket] = {}
        for i, a in enumerate(addrs):
            for j, port in enumerate(STUN_PORTS):
                s = host.socket()
                s.bind((a, port))
                self.socks[(i, j)] = s
        self.answered = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        by_sock = {s: key for key, s in self.socks.items()}
        while not self._stop.is_set():
            ready, _, _ = select.select(list(by_sock), [], [], 0.1)
            for s in ready:
                data, addr = s.recvfrom(2048)
                if len(data) < 20 or data[:2] != b"\x00\x01":
                    continue
                change = 0
                body = data[20:20 + struct.unpack_from("!H", data, 2)[0]]
                while len(body) >= 4:
                    kind, length = struct.unpack_from("!HH", body)
                    if kind == 3 and length == 4:
                        change = body[7]
                    body = body[4 + ((length + 3) & ~3):]
                i, j = by_sock[s]
                if change & 4:
                    i ^= 1
                if change & 2:
                    j ^= 1
                attr = struct.pack("!HHBBH4s", 1, 8, 0, 1, addr[1], socket.inet_aton(addr[0]))
                reply = struct.pack("!HH", 0x0101, len(attr)) + data[4:20] + attr
                self.socks[(i, j)].sendto(reply, addr)
                self.answered += 1

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        for s in self.socks.values():
            s.close()


@dataclass
class UpnpRouter:
    net: NatTopology
    lease_file: Path
    proc: subprocess.Popen[str]
    stun: StunServer
    log: list[str] = field(default_factory=list)

    def mappings(self) -> list[str]:
        """Lines of miniupnpd's lease file (``UDP:ext:int_ip:int_port:expiry:desc``)."""
        if not self.lease_file.exists():
            return []
        return [line for line in self.lease_file.read_text().splitlines() if line.strip()]

    def dnat_rules(self) -> list[str]:
        """The DNAT rules miniupnpd holds in R's nftables (one per live mapping)."""
        out = self.net.r.run("nft", "list", "table", "inet", TABLE).stdout
        return [line.strip() for line in out.splitlines() if "dnat" in line]

    def close(self) -> None:
        stop_process(self.proc)
        self.stun.close()


def upnp_router(lab: Lab, workdir: Path, *, min_lifetime: int = 2) -> UpnpRouter:
    """Build the topology and start miniupnpd; returns once it serves (or raises)."""
    net = behind_nat(lab, drop_unsolicited=False)
    stun = StunServer(net.p, ("198.18.0.10", "198.18.0.11"))
    try:
        proc, lease_file, log = start_miniupnpd(net.r, net.public, net.private, "198.18.1.0/24",
                                                workdir, min_lifetime=min_lifetime)
    except BaseException:
        stun.close()
        raise
    return UpnpRouter(net, lease_file, proc, stun, log)


def start_miniupnpd(r: Host, public: Lan, private: Lan, inside: str, workdir: Path, *,
                    min_lifetime: int = 2) -> tuple[subprocess.Popen[str], Path, list[str]]:
    """Run miniupnpd in router ``r``'s namespace for the hosts of ``inside`` (its LAN
    ``private``), with the filtering described in the module docstring; a STUN server
    must answer on 198.18.0.10/.11 (``StunServer``). Returns once it serves (or raises):
    the process, its lease file and its log lines (still growing)."""
    out_if = r.iface_to(public).name
    in_if = r.iface_to(private).name
    # miniupnpd adds its rules to these chains (names are its defaults but the table)
    r.nft(
        f"table inet {TABLE} {{\n"
        "  chain forward {\n    type filter hook forward priority filter; policy accept;\n"
        f'    iifname "{out_if}" ct state established,related accept\n'
        f'    iifname "{out_if}" jump miniupnpd\n'
        f'    iifname "{out_if}" counter drop\n  }}\n'
        "  chain input {\n    type filter hook input priority filter; policy accept;\n"
        f'    iifname "{out_if}" ct state established,related accept\n'
        # the daemon's STUN check needs the server's answers from its other address/port
        f'    iifname "{out_if}" ip saddr {{ 198.18.0.10, 198.18.0.11 }} '
        f'udp sport {{ {STUN_PORTS[0]}, {STUN_PORTS[1]} }} accept\n'
        f'    iifname "{out_if}" counter drop\n  }}\n'
        "  chain miniupnpd {\n  }\n"
        "  chain prerouting {\n    type nat hook prerouting priority dstnat; policy accept;\n"
        "    jump prerouting_miniupnpd\n  }\n"
        "  chain postrouting {\n    type nat hook postrouting priority srcnat; policy accept;\n"
        "    jump postrouting_miniupnpd\n  }\n"
        "  chain prerouting_miniupnpd {\n  }\n"
        "  chain postrouting_miniupnpd {\n  }\n}\n")
    lease_file = workdir / "miniupnpd.leases"
    conf = workdir / "miniupnpd.conf"
    conf.write_text(
        f"ext_ifname={out_if}\n"
        f"listening_ip={in_if}\n"
        "ext_perform_stun=yes\n"
        f"ext_stun_host=198.18.0.10\next_stun_port={STUN_PORTS[0]}\n"
        "http_port=0\n"
        "enable_natpmp=yes\nenable_upnp=yes\n"
        "secure_mode=yes\n"
        "system_uptime=no\n"
        f"lease_file={lease_file}\n"
        f"upnp_table_name={TABLE}\nupnp_nat_table_name={TABLE}\n"
        f"min_lifetime={min_lifetime}\nmax_lifetime=86400\n"
        "clean_ruleset_interval=0\n"
        "uuid=3f2a5e1c-0b6d-4c7e-9d1a-2b3c4d5e6f70\n"
        f"allow 1024-65535 {inside} 1024-65535\n"
        "deny 0-65535 0.0.0.0/0 0-65535\n")
    proc = r.popen(MINIUPNPD, "-f", str(conf), "-d", "-P", str(workdir / "miniupnpd.pid"),
                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            log.append(line.rstrip())
            if "Port forwarding is now enabled" in line:
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    deadline = time.monotonic() + 20
    while not ready.wait(0.05):
        if time.monotonic() > deadline:
            break
    if proc.poll() is not None or not any("Port forwarding is now enabled" in line
                                          for line in log):
        stop_process(proc)
        raise RuntimeError("miniupnpd did not start serving:\n" + "\n".join(log))
    return proc, lease_file, log


def stop_process(proc: subprocess.Popen[str]) -> None:
    """Terminate (then kill) a daemon started in a namespace."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
