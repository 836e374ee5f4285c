"""A userspace UDP relay that delays, jitters, reorders, duplicates and drops packets.

This kernel has no ``sch_netem`` (see tests/support/netlab.py), so this relay is how tests get
latency and reordering. A client (e.g. a QUIC endpoint) sends to the relay's address and
talks to the target through it; every client gets its own upstream socket, so the target
sees one distinct source port per client, and replies travel back the same way. Both
directions are impaired (each can be set on its own with ``set_impairment``).

Per packet, in order: dropped with probability ``loss``; sent twice with probability
``duplicate``; each copy waits ``delay_ms`` ± uniform ``jitter_ms`` (jitter alone reorders),
plus, with probability ``reorder``, one more ``delay_ms`` (10 ms if the delay is 0) so it
lands behind later packets. Timers are ``loop.call_later``; no threads. No root needed.
Timer resolution is the loop's: under uvloop (libuv) delays are whole milliseconds, so
jitter below ~1 ms reorders nothing there; asyncio's timers are finer.

Command line::

    python tests/support/udp_relay.py --listen 127.0.0.1:9000 --target 127.0.0.1:5000 \\
        --delay-ms 25 --jitter-ms 10 --reorder 0.1 --duplicate 0.01 --loss 0

prints ``listening on HOST:PORT`` once ready and its counters (JSON) when stopped
(SIGINT/SIGTERM). In code::

    relay = UdpRelay(("127.0.0.1", 0), target, delay_ms=25, jitter_ms=10)
    host, port = await relay.start()
    ...
    relay.upstream.received, relay.downstream.duplicated, relay.stats()
    relay.close()

``socket_factory=host.socket`` (tests/support/netlab.py) puts the relay's sockets in a namespace.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from typing import Any

__all__ = ["DirectionStats", "Impairment", "UdpRelay", "main", "set_big_buffers"]

Addr = tuple[str, int]
_BUF = 4 * 1024 * 1024
_MAX_DATAGRAM = 65535
_BATCH = 256  # datagrams read per readiness callback before yielding to the loop
_SO_SNDBUFFORCE = getattr(socket, "SO_SNDBUFFORCE", 32)  # Linux values; Python lacks them
_SO_RCVBUFFORCE = getattr(socket, "SO_RCVBUFFORCE", 33)


@dataclass(frozen=True)
class Impairment:
    """What happens to packets going one way. Probabilities are 0..1."""

    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    reorder: float = 0.0
    duplicate: float = 0.0
    loss: float = 0.0

    def __post_init__(self) -> None:
        if self.delay_ms < 0 or self.jitter_ms < 0:
            raise ValueError("delay_ms and jitter_ms must be >= 0")
        for name in ("reorder", "duplicate", "loss"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} is a probability: 0..1")


@dataclass
class DirectionStats:
    """Counters for one direction (``upstream`` = client → target)."""

    received: int = 0     # datagrams that entered the relay
    sent: int = 0         # datagrams that left it (duplicates count twice)
    dropped: int = 0      # removed by ``loss``
    duplicated: int = 0   # extra copies scheduled
    reordered: int = 0    # copies held back an extra delay
    send_errors: int = 0  # sendto failed (buffer full, ICMP unreachable, ...)


def set_big_buffers(s: socket.socket, size: int = _BUF) -> None:
    """Large send/receive buffers, beyond net.core.rmem_max when privileged (the default
    208 KiB overflows under a burst, which would be loss the test did not ask for)."""
    for force, plain in ((_SO_RCVBUFFORCE, socket.SO_RCVBUF), (_SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            s.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, plain, size)


class _Client:
    __slots__ = ("addr", "last_seen", "sock")

    def __init__(self, addr: Addr, sock: socket.socket) -> None:
        self.addr = addr
        self.sock = sock
        self.last_seen = time.monotonic()


class UdpRelay:
    """Relay ``listen`` ⇄ ``target`` with impairment; see the module docstring."""

    def __init__(self, listen: Addr, target: Addr, *, delay_ms: float = 0.0,
                 jitter_ms: float = 0.0, reorder: float = 0.0, duplicate: float = 0.0,
                 loss: float = 0.0, seed: int | None = None, idle_timeout: float = 120.0,
                 socket_factory: Callable[..., socket.socket] | None = None) -> None:
        imp = Impairment(delay_ms, jitter_ms, reorder, duplicate, loss)
        self.listen = listen
        self.target = target
        self.up_impairment = imp
        self.down_impairment = imp
        self.upstream = DirectionStats()
        self.downstream = DirectionStats()
        self.idle_timeout = idle_timeout
        self._rng = random.Random(seed)
        self._socket_factory = socket_factory or socket.socket
        self._family = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
        self._loop: asyncio.AbstractEventLoop | None = None
        self._sock: socket.socket | None = None
        self._clients: dict[Addr, _Client] = {}
        self._pending: dict[int, asyncio.TimerHandle] = {}
        self._next_id = 0
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False

    # -- lifecycle

    async def start(self) -> Addr:
        """Bind and start relaying; returns the bound listen address."""
        self._loop = asyncio.get_running_loop()
        fam = socket.AF_INET6 if ":" in self.listen[0] else socket.AF_INET
        self._sock = self._new_socket(fam)
        self._sock.bind(self.listen)
        self._loop.add_reader(self._sock.fileno(), self._on_listen_readable)
        self._sweeper = self._loop.call_later(self.idle_timeout / 2, self._sweep_idle)
        return self.address

    @property
    def address(self) -> Addr:
        if self._sock is None:
            raise RuntimeError("relay not started")
        host, port = self._sock.getsockname()[:2]
        return host, port

    @property
    def clients(self) -> int:
        return len(self._clients)

    def close(self) -> None:
        """Stop at once: cancel packets in flight, close every socket. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for handle in self._pending.values():
            handle.cancel()
        self._pending.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
        for c in self._clients.values():
            self._close_socket(c.sock)
        self._clients.clear()
        if self._sock is not None:
            self._close_socket(self._sock)

    async def __aenter__(self) -> UdpRelay:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def set_impairment(self, direction: str = "both", **changes: float) -> None:
        """Change impairment while running, e.g. ``set_impairment("down", loss=0.2)``;
        ``direction`` is ``"up"`` (client → target), ``"down"`` or ``"both"``."""
        if direction not in ("up", "down", "both"):
            raise ValueError("direction: 'up', 'down' or 'both'")
        if direction in ("up", "both"):
            self.up_impairment = replace(self.up_impairment, **changes)
        if direction in ("down", "both"):
            self.down_impairment = replace(self.down_impairment, **changes)

    def stats(self) -> dict[str, Any]:
        return {"upstream": asdict(self.upstream), "downstream": asdict(self.downstream),
                "clients": len(self._clients), "in_flight": len(self._pending)}

    # -- sockets

    def _new_socket(self, family: int) -> socket.socket:
        s = self._socket_factory(family, socket.SOCK_DGRAM)
        s.setblocking(False)
        set_big_buffers(s)
        return s

    def _close_socket(self, s: socket.socket) -> None:
        if self._loop is not None and s.fileno() >= 0:
            self._loop.remove_reader(s.fileno())
        s.close()

    def _client_for(self, addr: Addr) -> _Client:
        c = self._clients.get(addr)
        if c is None:
            assert self._loop is not None
            # unconnected: a connected UDP socket gets ICMP errors while the target is down,
            # and uvloop stops polling a socket after its first error
            s = self._new_socket(self._family)
            c = _Client(addr, s)
            self._clients[addr] = c
            self._loop.add_reader(s.fileno(), self._on_upstream_readable, c)
        c.last_seen = time.monotonic()
        return c

    def _sweep_idle(self) -> None:
        now = time.monotonic()
        for addr, c in list(self._clients.items()):
            if now - c.last_seen > self.idle_timeout:
                del self._clients[addr]
                self._close_socket(c.sock)
        assert self._loop is not None
        self._sweeper = self._loop.call_later(self.idle_timeout / 2, self._sweep_idle)

    # -- the two directions

    def _on_listen_readable(self) -> None:
        assert self._sock is not None
        for _ in range(_BATCH):
            try:
                data, addr = self._sock.recvfrom(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # e.g. ICMP port unreachable from a gone client
                continue
            c = self._client_for(addr[:2])
            self._impair(data, self.up_impairment, self.upstream, c.sock.sendto, self.target)

    def _on_upstream_readable(self, c: _Client) -> None:
        assert self._sock is not None
        sendto = self._sock.sendto
        for _ in range(_BATCH):
            try:
                data, source = c.sock.recvfrom(_MAX_DATAGRAM)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                continue
            if source[:2] != self.target[:2]:
                continue  # only the target's answers go back to the client
            c.last_seen = time.monotonic()
            self._impair(data, self.down_impairment, self.downstream, sendto, c.addr)

    def _impair(self, data: bytes, imp: Impairment, st: DirectionStats,
                send: Callable[..., int], addr: Addr | None) -> None:
        st.received += 1
        rng = self._rng
        if imp.loss and rng.random() < imp.loss:
            st.dropped += 1
            return
        copies = 1
        if imp.duplicate and rng.random() < imp.duplicate:
            copies = 2
            st.duplicated += 1
        for _ in range(copies):
            delay = imp.delay_ms
            if imp.jitter_ms:
                delay += rng.uniform(-imp.jitter_ms, imp.jitter_ms)
            if imp.reorder and rng.random() < imp.reorder:
                delay += imp.delay_ms or 10.0
                st.reordered += 1
            if delay <= 0:
                self._send(send, data, addr, st, None, 0.0)
            else:
                assert self._loop is not None
                key = self._next_id
                self._next_id += 1
                due = time.monotonic() + delay / 1000.0
                self._pending[key] = self._loop.call_later(
                    delay / 1000.0, self._send, send, data, addr, st, key, due)

    def _send(self, send: Callable[..., int], data: bytes, addr: Addr | None,
              st: DirectionStats, key: int | None, due: float) -> None:
        if self._closed:
            return
        if key is not None:
            early = due - time.monotonic()
            if early > 0:
                # uvloop rounds timers to whole ms from a clock cached per loop turn, so a
                # timer can fire up to ~1 ms early: never deliver before the delay is up.
                assert self._loop is not None
                self._pending[key] = self._loop.call_later(
                    max(early, 0.001), self._send, send, data, addr, st, key, due)
                return
            self._pending.pop(key, None)
        try:
            if addr is None:
                send(data)
            else:
                send(data, addr)
            st.sent += 1
        except OSError:
            st.send_errors += 1


# --------------------------------------------------------------------------- CLI


def _parse_addr(text: str) -> Addr:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def _probability(text: str) -> float:
    v = float(text)
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError("a probability between 0 and 1")
    return v


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", type=_parse_addr, required=True, metavar="HOST:PORT")
    ap.add_argument("--target", type=_parse_addr, required=True, metavar="HOST:PORT")
    ap.add_argument("--delay-ms", type=float, default=0.0)
    ap.add_argument("--jitter-ms", type=float, default=0.0)
    ap.add_argument("--reorder", type=_probability, default=0.0)
    ap.add_argument("--duplicate", type=_probability, default=0.0)
    ap.add_argument("--loss", type=_probability, default=0.0)
    ap.add_argument("--seed", type=int, default=None)
    args = ap.parse_args(argv)

    async def run() -> None:
        relay = UdpRelay(args.listen, args.target, delay_ms=args.delay_ms,
                         jitter_ms=args.jitter_ms, reorder=args.reorder,
                         duplicate=args.duplicate, loss=args.loss, seed=args.seed)
        host, port = await relay.start()
        print(f"listening on {host}:{port} -> {args.target[0]}:{args.target[1]}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        try:
            await stop.wait()
        finally:
            relay.close()
            print(json.dumps(relay.stats()), flush=True)

    asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())

