"""CPU an endpoint spends per packet that a source which never proved its address can
send it: junk shaped like Initials, a token-bearing Initial replayed at the connection
limit (refused), tokenless Initials past the Retry threshold, unknown versions, short
headers for no connection.

    .venv/bin/python bench/unvalidated_cost.py [--packets N]

The endpoint runs in a child process that reports its own ``time.process_time()``; the
packets come from a raw UDP socket in this process. Figures vary with the machine; they
are not a test (tests assert counts, see tests/loopback/test_unvalidated.py).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.unvalidated import (  # noqa: E402
    after_retry,
    first_initial,
    junk_initial,
    unknown_version,
)


async def serve(mode: str) -> None:
    """Child. ``full``: an endpoint that will hold two half-open handshakes at
    max_connections=2 and requires address validation (new clients get a Retry).
    ``open``: an idle endpoint whose Retry threshold is never reached (every junk Initial
    takes the decrypt check)."""
    import qp2p

    if mode == "full":
        cfg = qp2p.Config(max_connections=2, require_address_validation=True,
                          handshake_timeout=30.0, idle_timeout=60.0)
    else:
        cfg = qp2p.Config(address_validation_threshold=10**9)
    async with await qp2p.Endpoint.bind(("127.0.0.1", 0), config=cfg) as ep:
        print("READY", ep.local_addr[1], flush=True)
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
        while line := (await reader.readline()).decode().strip():
            if line == "cpu":
                print("CPU", time.process_time(), ep.stats_counters["datagrams_received"],
                      len(ep._live), flush=True)


def main() -> None:
    if sys.argv[1:2] == ["--serve"]:
        asyncio.run(serve(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--packets", type=int, default=20000)
    args = parser.parse_args()
    rows = measure("full", args.packets) + measure("open", args.packets)
    print(f"{'packet':62} {'ms CPU/packet':>13} {'received':>9}")
    for name, ms, got in rows:
        print(f"{name:62} {ms:13.4f} {got:9d}")


def measure(mode: str, count: int) -> list[tuple[str, float, int]]:
    child = subprocess.Popen([sys.executable, __file__, "--serve", mode],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    assert child.stdin is not None and child.stdout is not None
    try:
        word, port = child.stdout.readline().split()
        assert word == "READY"
        server = ("127.0.0.1", int(port))
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 2**20)
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(2.0)

        def cpu() -> tuple[float, int, int]:
            child.stdin.write("cpu\n")  # type: ignore[union-attr]
            child.stdin.flush()  # type: ignore[union-attr]
            _, seconds, received, live = child.stdout.readline().split()  # type: ignore
            return float(seconds), int(received), int(live)

        if mode == "full":
            # three clients prove their address (Retry, then a token-bearing Initial); the
            # first two fill max_connections with half-open handshakes, the third's Initial
            # is then replayed: each copy is refused
            tokened = []
            for _ in range(3):
                quic, initial = first_initial(server)
                sock.sendto(initial, server)
                retry = sock.recv(65536)
                while retry[0] & 0xF0 != 0xF0:  # skip earlier clients' handshake flights
                    retry = sock.recv(65536)
                tokened.append(after_retry(quic, retry, server))
            for datagram in tokened[:2]:
                sock.sendto(datagram, server)
            time.sleep(0.3)
            replay = tokened[2]
        sock.settimeout(0)

        kinds: dict[str, Callable[[], bytes]] = {
            "junk Initial, idle endpoint (decrypt check fails)": lambda: junk_initial(),
        } if mode == "open" else {
            "junk Initial at max_connections (Retry, validation required)": junk_initial,
            "token-bearing Initial at max_connections (refused)": lambda: replay,
            "unknown version, 1,200 bytes (Version Negotiation)":
                lambda: unknown_version(os.urandom(8), os.urandom(8)),
            "short header for no connection": lambda: b"\x41" + os.urandom(60),
        }
        rows: list[tuple[str, float, int]] = []
        for name, make in kinds.items():
            packets = [make() for _ in range(count)]
            start, received0, _ = cpu()
            for i, p in enumerate(packets):
                sock.sendto(p, server)
                if i % 64 == 63:
                    time.sleep(0.0005)  # let the child keep up (no socket drops)
                    try:
                        while sock.recv(65536):
                            pass
                    except BlockingIOError:
                        pass
            time.sleep(0.5)
            end, received1, _ = cpu()
            got = received1 - received0
            rows.append((name, (end - start) / max(got, 1) * 1000, got))
        return rows
    finally:
        child.kill()
        child.wait()


if __name__ == "__main__":
    main()
