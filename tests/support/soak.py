"""Soak: many qp2p peers exchange messages for minutes under churn and impairment, and
every message whose ``send()`` returned must arrive exactly once, byte-identical.

``python -m tests.support.soak --minutes 10 [--seed S] [--peers 20] [--json]`` (``make soak``); the
short CI version is tests/netns/test_soak.py, which calls :func:`run_soak`.

Set-up (needs root for the namespaces; ``--ns-peers 0`` runs without them):

* ``--peers`` endpoints in this process on 127.0.0.1;
* ``--ns-peers`` peers, each a subprocess in its own network namespace (tests/support/netlab.py)
  behind an impairment path: main peers dial a :class:`~tests.support.udp_relay.UdpRelay` on
  127.0.0.1 (delay, jitter, reordering) whose upstream sockets live in a ``gw`` namespace
  linked to the peer's namespace by a veth pair with nftables random loss both ways.
  Namespace peers send on the connections the main peers opened to them (QUIC connections
  carry traffic both ways), so no route back into the root namespace is needed.

Traffic: workers pick random pairs and send a uni message (``send()``) or a request
(``request()``/``reply()``); payload sizes are log-uniform over 1 B..1 MiB, at most a few
messages above 64 KiB in flight at once. Every message carries a 48-byte header: origin
tag, sequence number, payload length and SHA-256 of the payload, so receivers check
identity and byte-exactness.

The ledger (what counts):

* sent: a ``send()`` or ``reply()`` that returned (the peer's QUIC stack acknowledged the
  whole stream), or a ``request()`` that returned the reply (then the request counts as
  sent and the reply as received). A send that raises (``ConnectionClosed``,
  ``MessageRejected``, ``ConnectionError``, ``EndpointClosed``, a hang timeout) is dropped:
  not counted and not retried (the worker's next message is a new one with a new id).
* received: every message ``recv()`` hands out (and every reply ``request()`` returns),
  counted per id; a header/payload mismatch counts as corrupted instead.
* at the end: lost = sent but never received, duplicates = received more than once,
  corrupted. All must be 0. Received-but-not-sent is fine (the sender saw a failure
  after the peer already had it) and reported as "unconfirmed".

Churn: random ``conn.close()`` calls (main and namespace peers), and random graceful peer
restarts (``Endpoint.close()`` then a new endpoint on the same port; a namespace peer gets
SIGTERM, closes and drains, prints its ledger and exits, and a new process starts). A
message acknowledged before a close is still in the connection's inbox, so every
connection has a reader task that runs ``async for msg in conn`` until it ends; a restart
only rebinds, the old readers finish draining on their own, and the final ledger is read
after every reader has finished.

Metrics: this process's RSS (VmRSS) and open file descriptors (and the namespace peers'),
sampled every ``--sample-every`` seconds; the report compares the first and the last
minute (a quarter of the run when it is shorter than four minutes).
"""

from __future__ import annotations

import argparse
import array
import asyncio
import collections
import contextlib
import gc
import hashlib
import json
import logging
import math
import os
import random
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass, field
from typing import Any

import qp2p
from qp2p import _speedups
from tests.support.paths import CWD, pythonpath
from tests.support.udp_relay import UdpRelay, _Client, set_big_buffers

__all__ = ["SoakReport", "main", "run_soak"]

logger = logging.getLogger("soak")

HEADER = struct.Struct("!IQI32s")  # origin tag, sequence, payload length, sha256(payload)
PREFIX = struct.Struct("!IQ")      # payloads start with tag+sequence (tiny ones: a prefix)
MAX_SIZE = 2**20
BIG = 64 * 1024
NS_PORT = 7000
KINDS = ("uni", "request", "reply")
#: failures that are normal under churn (the peer went away, the connection was closed)
EXPECTED_FAILURES = (qp2p.ConnectionClosed, qp2p.ConnectionError, qp2p.EndpointClosed)

SOAK_CONFIG = qp2p.Config(
    idle_timeout=8.0,  # a peer whose CONNECTION_CLOSE was lost is noticed within seconds
    handshake_timeout=3.0,
    retry=qp2p.RetryConfig(initial_interval=0.1, max_interval=1.0, max_elapsed_time=4.0),
)


# --------------------------------------------------------------------------- messages


def _id(tag: int, seq: int) -> str:
    return f"{tag}:{seq}"


def verify(header: bytes, payload: bytes) -> tuple[int, int, str]:
    """(tag, seq, problem) of a received message; ``problem`` is "" when it is intact."""
    if len(header) != HEADER.size:
        return -1, -1, f"header of {len(header)} bytes"
    tag, seq, size, digest = HEADER.unpack(header)
    if len(payload) != size:
        return tag, seq, f"payload of {len(payload)} bytes, header says {size}"
    prefix = PREFIX.pack(tag, seq)[:size]
    if payload[:len(prefix)] != prefix:
        return tag, seq, "payload does not start with its own id"
    if hashlib.sha256(payload).digest() != digest:
        return tag, seq, "SHA-256 mismatch"
    return tag, seq, ""


class Traffic:
    """Makes messages with unique ids for one origin ``tag``."""

    def __init__(self, tag: int, rng: random.Random) -> None:
        self.tag = tag
        self.seq = 0
        self.rng = rng
        self._pool = rng.randbytes(2 * MAX_SIZE)  # payload bodies are slices of it

    def size(self) -> int:
        """Log-uniform over 1 B..1 MiB: mostly small, regularly large."""
        return min(MAX_SIZE, int(math.exp(self.rng.uniform(0.0, math.log(MAX_SIZE + 1)))))

    def make(self, size: int) -> tuple[int, bytes, bytes]:
        """(seq, header, payload) of a fresh message of ``size`` payload bytes."""
        seq = self.seq
        self.seq += 1
        prefix = PREFIX.pack(self.tag, seq)
        if size <= len(prefix):
            payload = prefix[:size]
        else:
            off = self.rng.randrange(len(self._pool) - size)
            payload = prefix + self._pool[off:off + size - len(prefix)]
        header = HEADER.pack(self.tag, seq, size, hashlib.sha256(payload).digest())
        return seq, header, payload


def _mark(table: dict[int, bytearray], tag: int, seq: int) -> None:
    """Count one for (tag, seq); one byte per id, saturating at 255, grown geometrically."""
    arr = table.get(tag)
    if arr is None:
        arr = table[tag] = bytearray()
    if seq >= len(arr):
        arr.extend(bytes(max(seq + 1, len(arr) * 3 // 2 + 1024) - len(arr)))
    if arr[seq] < 255:
        arr[seq] += 1


class Ledger:
    """Which ids were sent (confirmed) and how often each was received, per origin tag."""

    def __init__(self) -> None:
        self.sent: dict[int, bytearray] = {}
        self.received: dict[int, bytearray] = {}
        self.sent_count: collections.Counter[str] = collections.Counter()
        self.sent_bytes = 0
        self.corrupted = 0
        self.corrupt_examples: list[str] = []

    def mark_sent(self, tag: int, seq: int, nbytes: int, kind: str) -> None:
        _mark(self.sent, tag, seq)
        self.sent_count[kind] += 1
        self.sent_bytes += nbytes

    def receive(self, header: bytes, payload: bytes) -> None:
        tag, seq, problem = verify(header, payload)
        if problem:
            self.corrupted += 1
            if len(self.corrupt_examples) < 10:
                self.corrupt_examples.append(f"{_id(tag, seq)}: {problem}")
            return
        _mark(self.received, tag, seq)

    # namespace peers report their ledger as JSON
    def export(self) -> dict[str, Any]:
        def ids(table: dict[int, bytearray]) -> dict[str, list[int]]:
            out: dict[str, list[int]] = {}
            for tag, arr in table.items():
                seqs = []
                for seq, n in enumerate(arr):
                    seqs.extend([seq] * n)
                out[str(tag)] = seqs
            return out
        return {"sent": ids(self.sent), "received": ids(self.received),
                "sent_count": dict(self.sent_count), "sent_bytes": self.sent_bytes,
                "corrupted": self.corrupted, "corrupt_examples": self.corrupt_examples}

    def merge(self, data: dict[str, Any]) -> None:
        for tag, seqs in data["sent"].items():
            for seq in seqs:
                _mark(self.sent, int(tag), seq)
        for tag, seqs in data["received"].items():
            for seq in seqs:
                _mark(self.received, int(tag), seq)
        self.sent_count.update(data["sent_count"])
        self.sent_bytes += data["sent_bytes"]
        self.corrupted += data["corrupted"]
        self.corrupt_examples += data["corrupt_examples"][:10]

    def tally(self) -> dict[str, Any]:
        lost: list[str] = []
        duplicates: list[str] = []
        delivered = unconfirmed = lost_n = dup_n = 0
        for tag in sorted(set(self.sent) | set(self.received)):
            s = self.sent.get(tag, bytearray())
            r = self.received.get(tag, bytearray())
            for seq in range(max(len(s), len(r))):
                sent = seq < len(s) and s[seq]
                got = r[seq] if seq < len(r) else 0
                if got > 1:
                    dup_n += 1
                    if len(duplicates) < 20:
                        duplicates.append(f"{_id(tag, seq)} x{got}")
                if sent and got:
                    delivered += 1
                elif sent:
                    lost_n += 1
                    if len(lost) < 20:
                        lost.append(_id(tag, seq))
                elif got:
                    unconfirmed += 1
        return {"delivered": delivered, "lost": lost_n, "duplicates": dup_n,
                "unconfirmed": unconfirmed, "lost_ids": lost, "duplicate_ids": duplicates}


# --------------------------------------------------------------------------- one peer


class Peer:
    """One endpoint's application: reads every connection to the end, answers requests,
    records everything in the (process-wide) ledger."""

    def __init__(self, name: str, ledger: Ledger, traffic: Traffic,
                 failures: collections.Counter[str], hang: float,
                 reply_slots: asyncio.Semaphore) -> None:
        self.name = name
        self.ledger = ledger
        self.traffic = traffic
        self.failures = failures
        self.hang = hang
        self.reply_slots = reply_slots
        self.ep: qp2p.Endpoint | None = None
        self.up = False
        self.tasks: set[asyncio.Task[Any]] = set()
        self._watched: set[qp2p.Connection] = set()
        self.reader_errors: list[str] = []
        self.on_op: Callable[[str, int, int, str], None] | None = None  # meta recorder

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def start(self, host: str, port: int, config: qp2p.Config,
                    identity: qp2p.Identity | None = None) -> None:
        for attempt in range(40):  # the port was just ours; only another process can hold it
            try:
                self.ep = await qp2p.Endpoint.bind((host, port), config=config, identity=identity)
                break
            except OSError:
                if attempt == 39 or port == 0:
                    raise
                await asyncio.sleep(0.05)
        self.spawn(self._accept(self.ep))
        self.up = True

    async def stop(self) -> None:
        """Graceful: close the endpoint; readers keep draining what arrived before."""
        self.up = False
        ep = self.ep
        if ep is None:
            return
        self.watch_all()
        await ep.close()

    def watch_all(self) -> None:
        """Make sure every pooled connection has a reader (a dial whose caller gave up
        leaves one without)."""
        ep = self.ep
        if ep is not None and not ep.is_closed:
            for conn in ep.connections():
                self.watch(conn)

    def watch(self, conn: qp2p.Connection) -> None:
        if conn not in self._watched:
            self._watched.add(conn)
            self.spawn(self._read(conn))

    async def _accept(self, ep: qp2p.Endpoint) -> None:
        async for conn in ep.incoming():
            self.watch(conn)

    async def _read(self, conn: qp2p.Connection) -> None:
        try:
            async for msg in conn:  # ends when the connection is closed and drained
                self.ledger.receive(msg.header, msg.payload)
                if msg.is_request:
                    self.spawn(self._reply(msg))
        except Exception as exc:  # anything but the end of the connection is a bug
            self.reader_errors.append(f"{self.name}: {exc!r}")
            logger.exception("%s: reader failed", self.name)
        finally:
            self._watched.discard(conn)

    async def _reply(self, msg: qp2p.Message) -> None:
        size = self.traffic.size()
        async with self.reply_slots if size > BIG else contextlib.nullcontext():
            seq, header, payload = self.traffic.make(size)
            if self.on_op:
                self.on_op("reply", seq, size, self.name)
            try:
                await asyncio.wait_for(msg.reply(payload, header=header), self.hang)
            except Exception as exc:
                self.failed("reply", exc)
                return
        self.ledger.mark_sent(self.traffic.tag, seq, size, "reply")

    def failed(self, op: str, exc: BaseException) -> None:
        key = f"{op}: {type(exc).__name__}"
        if isinstance(exc, asyncio.TimeoutError):
            key = f"{op}: HANG (no result within {self.hang:g}s)"
        elif not isinstance(exc, EXPECTED_FAILURES):
            key = f"{op}: UNEXPECTED {exc!r}"[:200]
            logger.warning("%s: %s failed: %r", self.name, op, exc)
        self.failures[key] += 1

    async def exchange(self, conn: qp2p.Connection, kind: str, size: int) -> float | None:
        """Send one message (``kind`` "uni") or request on ``conn`` and record it; the
        seconds it took, None if it failed."""
        seq, header, payload = self.traffic.make(size)
        if self.on_op:
            self.on_op(kind, seq, size, self.name)
        start = time.monotonic()
        try:
            if kind == "uni":
                await asyncio.wait_for(conn.send(payload, header=header), self.hang)
            else:
                reply = await asyncio.wait_for(conn.request(payload, header=header), self.hang)
        except Exception as exc:
            self.failed(kind, exc)
            return None
        self.ledger.mark_sent(self.traffic.tag, seq, size, kind)
        if kind == "request":
            self.ledger.receive(reply.header, reply.payload)
        return time.monotonic() - start

    async def drain(self, timeout: float) -> list[str]:
        """Wait for readers and replies to finish; names of the tasks still stuck."""
        deadline = time.monotonic() + timeout
        while self.tasks and time.monotonic() < deadline:
            await asyncio.wait(set(self.tasks), timeout=deadline - time.monotonic())
        stuck = [f"{self.name}: {t.get_coro()!r}" for t in self.tasks]
        for t in list(self.tasks):
            t.cancel()
        return stuck


# --------------------------------------------------------------------------- metrics


def _proc_rss_kb(pid: int | str = "self") -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _proc_fds(pid: int | str = "self") -> int | None:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return None


def live_connections() -> int:
    """qp2p Connection objects still alive in this process (a leak would make it grow)."""
    return sum(1 for o in gc.get_objects() if type(o) is qp2p.Connection)


def _window_stats(samples: list[tuple[float, int]], lo: float, hi: float) -> dict[str, Any]:
    vals = [v for t, v in samples if lo <= t <= hi]
    if not vals:
        return {"n": 0}
    return {"n": len(vals), "median": statistics.median(vals),
            "mean": round(statistics.fmean(vals), 1), "min": min(vals), "max": max(vals)}


# --------------------------------------------------------------------------- the report


@dataclass
class SoakReport:
    seconds: float
    implementation: str
    loop: str
    seed: int
    peers: int
    ns_peers: int
    sent: dict[str, int] = field(default_factory=dict)   # confirmed, by kind
    sent_total: int = 0
    sent_bytes: int = 0
    received: int = 0          # ids received at least once
    delivered: int = 0         # sent and received
    lost: int = 0
    duplicates: int = 0
    corrupted: int = 0
    unconfirmed: int = 0
    lost_ids: list[str] = field(default_factory=list)
    duplicate_ids: list[str] = field(default_factory=list)
    corrupt_examples: list[str] = field(default_factory=list)
    lost_details: list[str] = field(default_factory=list)
    failures: dict[str, int] = field(default_factory=dict)
    hangs: int = 0
    unexpected: int = 0
    reader_errors: list[str] = field(default_factory=list)
    stuck_tasks: list[str] = field(default_factory=list)
    restarts: int = 0
    ns_restarts: int = 0
    closes: int = 0
    ns_closes: int = 0
    nft_dropped: int = 0
    relay: dict[str, int] = field(default_factory=dict)
    rss_kb: list[tuple[float, int]] = field(default_factory=list)
    fds: list[tuple[float, int]] = field(default_factory=list)
    py_blocks: list[tuple[float, int]] = field(default_factory=list)   # sys.getallocatedblocks
    conns_alive: list[tuple[float, int]] = field(default_factory=list)  # qp2p.Connection objects
    conns_reachable: list[tuple[float, int]] = field(default_factory=list)  # ...after gc.collect()
    conns_alive_after: int = -1  # after teardown and a gc.collect()
    ns_rss_kb: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    window: float = 60.0
    cpu_seconds: float = 0.0   # this process's CPU time during the run (2 cores shared)
    fds_baseline: int = 0
    fds_after: int = 0
    ledger_bytes: int = 0
    latency_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    events: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return (self.lost == self.duplicates == self.corrupted == 0 and self.hangs == 0
                and self.unexpected == 0 and not self.reader_errors and not self.stuck_tasks
                and self.fds_after <= self.fds_baseline)  # fewer: an earlier test's, collected

    @property
    def rate(self) -> float:
        return self.sent_total / self.seconds if self.seconds else 0.0

    def first_last(self, samples: list[tuple[float, int]]) -> tuple[dict[str, Any],
                                                                     dict[str, Any]]:
        end = samples[-1][0] if samples else 0.0
        return (_window_stats(samples, 0.0, self.window),
                _window_stats(samples, end - self.window, end))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        d["rate_per_s"] = round(self.rate, 1)
        d["rss_first"], d["rss_last"] = self.first_last(self.rss_kb)
        d["fds_first"], d["fds_last"] = self.first_last(self.fds)
        d["py_blocks_first"], d["py_blocks_last"] = self.first_last(self.py_blocks)
        d["conns_alive_first"], d["conns_alive_last"] = self.first_last(self.conns_alive)
        d["conns_reachable_first"], d["conns_reachable_last"] = self.first_last(
            self.conns_reachable)
        return d

    def format(self) -> str:
        mib = self.sent_bytes / 2**20
        rf, rl = self.first_last(self.rss_kb)
        ff, fl = self.first_last(self.fds)
        w = f"{self.window:.0f}s"
        lines = [
            f"soak: {self.seconds:.0f}s, {self.peers} peers in-process + {self.ns_peers} in "
            f"namespaces, {self.implementation} fast path, {self.loop} loop, seed {self.seed}",
            f"  sent (send()/reply() returned, request() answered): {self.sent_total} "
            f"({', '.join(f'{k} {v}' for k, v in sorted(self.sent.items()))}), "
            f"{mib:.1f} MiB, {self.rate:.1f} msg/s, {mib / max(self.seconds, 1e-9):.2f} MiB/s "
            f"(this process used {self.cpu_seconds:.0f}s CPU)",
            f"  received {self.received}, delivered {self.delivered}, LOST {self.lost}, "
            f"DUPLICATES {self.duplicates}, CORRUPTED {self.corrupted}, unconfirmed "
            f"(arrived, sender saw a failure) {self.unconfirmed}",
            f"  churn: {self.restarts} peer restarts ({self.ns_restarts} of namespace peers), "
            f"{self.closes + self.ns_closes} connection closes ({self.ns_closes} by namespace "
            f"peers); impairment: nft dropped {self.nft_dropped} packets, relay "
            f"reordered {self.relay.get('reordered', 0)} of {self.relay.get('received', 0)}",
            "  failed sends (dropped, not retried): "
            + (", ".join(f"{k} {v}" for k, v in sorted(self.failures.items())) or "none"),
            f"  RSS (MiB) first {w}: median {_mb(rf.get('median'))} (min {_mb(rf.get('min'))}, "
            f"max {_mb(rf.get('max'))}); last {w}: median {_mb(rl.get('median'))} "
            f"(min {_mb(rl.get('min'))}, max {_mb(rl.get('max'))}); ledger itself "
            f"{self.ledger_bytes / 2**20:.1f} MiB",
            f"  open fds first {w}: median {ff.get('median')} (min {ff.get('min')}, max "
            f"{ff.get('max')}); last {w}: median {fl.get('median')} (min {fl.get('min')}, max "
            f"{fl.get('max')}); before {self.fds_baseline}, after teardown {self.fds_after}",
        ]
        bf, bl = self.first_last(self.py_blocks)
        cf, cl = self.first_last(self.conns_alive)
        lines.append(
            f"  Python heap blocks first {w}: median {bf.get('median')}; last {w}: median "
            f"{bl.get('median')}; qp2p.Connection objects (incl. garbage not yet collected) "
            f"first {w}: median {cf.get('median')} (max {cf.get('max')}); last {w}: median "
            f"{cl.get('median')} (max {cl.get('max')}); after teardown "
            f"{self.conns_alive_after}")
        lines.append("  qp2p.Connection objects reachable (after gc.collect(), every 30 s): "
                     + " ".join(f"{t:.0f}s:{n}" for t, n in self.conns_reachable))
        for name, samples in sorted(self.ns_rss_kb.items()):
            a, b = self.first_last(samples)
            lines.append(f"  {name} RSS (MiB, restarts reset it) first {w}: median "
                         f"{_mb(a.get('median'))}; last {w}: median {_mb(b.get('median'))}")
        lines.append("  latency of main-process sends/requests (ms): " + "; ".join(
            f"{k}: n {v['n']} median {v['median']} p99 {v['p99']} max {v['max']}"
            for k, v in self.latency_ms.items()))
        lines.append("  timeline: " + ", ".join(self.events))
        curve = " ".join(f"{t:.0f}s:{kb / 1024:.0f}M/{n}" for (t, kb), (_, n)
                         in zip(self.rss_kb, self.fds, strict=False))
        lines.append(f"  curve (t:RSS/fds): {curve}")
        for label, items in (("lost", self.lost_details or self.lost_ids),
                             ("duplicate", self.duplicate_ids),
                             ("corrupted", self.corrupt_examples),
                             ("reader error", self.reader_errors),
                             ("stuck task", self.stuck_tasks)):
            for item in items[:20]:
                lines.append(f"  {label}: {item}")
        lines.append(f"  RESULT: {'OK' if self.ok else 'FAILED'}")
        return "\n".join(lines)


def _mb(kb: float | None) -> str:
    return "-" if kb is None else f"{kb / 1024:.1f}"


# --------------------------------------------------------------------------- namespace peers


class SoakRelay(UdpRelay):
    """UdpRelay listening in this namespace, with its per-client upstream sockets made by
    ``upstream_factory`` (e.g. ``Host.socket`` of a namespace); like UdpRelay's own they
    are unconnected (a connected UDP socket gets ICMP errors while a peer restarts, and
    uvloop stops polling a socket after its first error)."""

    def __init__(self, *args: Any, upstream_factory: Callable[..., socket.socket],
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._upstream_factory = upstream_factory

    def _client_for(self, addr: tuple[str, int]) -> Any:
        c = self._clients.get(addr)
        if c is None:
            assert self._loop is not None
            s = self._upstream_factory(self._family, socket.SOCK_DGRAM)
            s.setblocking(False)
            set_big_buffers(s)
            c = _Client(addr, s)
            self._clients[addr] = c
            self._loop.add_reader(c.sock.fileno(), self._on_upstream_readable, c)
        c.last_seen = time.monotonic()
        return c


@dataclass
class NsPeer:
    """A peer process in a namespace, reached through ``relay``."""

    name: str
    index: int
    host: Any  # tests.support.netlab.Host
    relay: Any  # tests.support.udp_relay.UdpRelay
    proc: subprocess.Popen[str] | None = None
    tag: int = 0
    up: bool = False
    ledgers: int = 0


# --------------------------------------------------------------------------- the soak


class Soak:
    def __init__(self, seconds: float, seed: int, peers: int, ns_peers: int, workers: int,
                 ns_workers: int, restart_every: float, close_every: float,
                 sample_every: float, loss: float, hang: float, lab: Any) -> None:
        self.seconds = seconds
        self.seed = seed
        self.rng = random.Random(seed)
        self.n_peers = peers
        self.n_ns = ns_peers
        self.n_workers = workers
        self.ns_workers = ns_workers
        self.restart_every = restart_every
        self.close_every = close_every
        self.sample_every = sample_every
        self.loss = loss
        self.hang = hang
        self.lab = lab
        self.own_lab = False
        self.ledger = Ledger()
        self.failures: collections.Counter[str] = collections.Counter()
        self.traffic = Traffic(0, random.Random(seed + 1))
        self.peers: list[Peer] = []
        self.identities: list[qp2p.Identity] = []
        self.ports: list[int] = []
        self.ns: list[NsPeer] = []
        self.next_tag = 1
        self.stop = asyncio.Event()
        # large messages in flight (memory stays sane); the slow relayed path has its own
        # slots so it does not starve the local pairs
        self.big = asyncio.Semaphore(8)
        self.big_relayed = asyncio.Semaphore(3)
        self.reply_slots = asyncio.Semaphore(4)  # separate: requests wait for replies
        self.restarts = self.ns_restarts = self.closes = self.ns_closes = 0
        self.rss: list[tuple[float, int]] = []
        self.fds: list[tuple[float, int]] = []
        self.py_blocks: list[tuple[float, int]] = []
        self.conns_alive: list[tuple[float, int]] = []
        self.conns_reachable: list[tuple[float, int]] = []
        self.ns_rss: dict[str, list[tuple[float, int]]] = {}
        self.events: list[tuple[float, str]] = []
        self.latency: dict[str, array.array[float]] = {}  # seconds per successful exchange
        self.stuck: list[str] = []
        self.reader_errors: list[str] = []
        self.nft_dropped = 0
        self.relay_totals: collections.Counter[str] = collections.Counter()
        self.t0 = 0.0
        # what each main-origin id was, to explain a loss: kind, sender, size, time
        self.meta_kind = array.array("B")
        self.meta_size = array.array("I")
        self.meta_time = array.array("f")
        self.meta_from = array.array("B")
        self.names: dict[str, int] = {}

    def now(self) -> float:
        return time.monotonic() - self.t0

    def event(self, text: str) -> None:
        self.events.append((self.now(), text))
        logger.info("%.1fs %s", self.now(), text)

    def record_op(self, kind: str, seq: int, size: int, who: str) -> None:
        assert seq == len(self.meta_kind)
        self.meta_kind.append(KINDS.index(kind))
        self.meta_size.append(size)
        self.meta_time.append(self.now())
        code = self.names.setdefault(who, len(self.names))
        self.meta_from.append(code)

    # -- set-up

    async def setup(self) -> None:
        from tests.support.netlab import Lab  # imported here so the module loads without pytest

        for i in range(self.n_peers):
            peer = Peer(f"p{i}", self.ledger, self.traffic, self.failures, self.hang,
                        self.reply_slots)
            peer.on_op = self.record_op
            ident = qp2p.Identity.generate()
            await peer.start("127.0.0.1", 0, SOAK_CONFIG, ident)
            assert peer.ep is not None
            self.peers.append(peer)
            self.identities.append(ident)
            self.ports.append(peer.ep.local_addr[1])
        if not self.n_ns:
            return

        if self.lab is None:
            self.lab = Lab()
            self.own_lab = True
        gw = self.lab.host("gw")
        for i in range(self.n_ns):
            host = self.lab.host(f"n{i}")
            link = self.lab.link(gw, host)
            self.lab.set_loss(link, self.loss, direction="both")
            # listens here on 127.0.0.1; its upstream sockets live in gw, which reaches the peer
            relay = SoakRelay(("127.0.0.1", 0), (host.addr, NS_PORT), delay_ms=5, jitter_ms=3,
                              reorder=0.05, seed=self.seed + 100 + i, upstream_factory=gw.socket)
            await relay.start()
            self.ns.append(NsPeer(f"n{i}", i, host, relay))
        await asyncio.gather(*(self.start_ns(ns) for ns in self.ns))

    async def start_ns(self, ns: NsPeer) -> None:
        ns.tag = self.next_tag
        self.next_tag += 1
        argv = [sys.executable, "-m", "tests.support.soak", "--ns-peer", ns.host.addr, str(NS_PORT),
                "--tag", str(ns.tag), "--seed", str(self.seed + 1000 * ns.tag),
                "--ns-workers", str(self.ns_workers), "--close-every", str(self.close_every * 4),
                "--hang", str(self.hang), "--impl", _speedups.implementation,
                "--loop", _loop_name()]
        ns.proc = ns.host.popen(*argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                text=True, cwd=CWD,
                                env={**os.environ, "PYTHONPATH": pythonpath()})
        loop = asyncio.get_running_loop()
        assert ns.proc.stdout is not None
        line = await asyncio.wait_for(loop.run_in_executor(None, ns.proc.stdout.readline), 60)
        if not line.startswith("READY"):
            raise RuntimeError(f"namespace peer {ns.name} did not start: {line!r}")
        ns.up = True

    async def stop_ns(self, ns: NsPeer) -> None:
        """SIGTERM: the peer closes, drains, prints its ledger; merge it."""
        ns.up = False
        proc = ns.proc
        if proc is None:
            return
        ns.proc = None
        proc.send_signal(signal.SIGTERM)
        loop = asyncio.get_running_loop()
        try:
            out, _ = await loop.run_in_executor(None, lambda: proc.communicate(timeout=60))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise RuntimeError(f"namespace peer {ns.name} (tag {ns.tag}) did not stop") from None
        for line in out.splitlines():
            if line.startswith("LEDGER "):
                data = json.loads(line[len("LEDGER "):])
                self.ledger.merge(data["ledger"])
                self.ns_closes += data["closes"]
                for k, v in data["failures"].items():
                    self.failures[f"{ns.name} {k}"] += v
                self.stuck += data["stuck"]
                self.reader_errors += data["reader_errors"]
                ns.ledgers += 1
                return
        raise RuntimeError(f"namespace peer {ns.name} (tag {ns.tag}) exited "
                           f"{proc.returncode} without a ledger")

    # -- activities

    async def sleep(self, seconds: float) -> bool:
        """Sleep unless stopping; True when it is time to stop."""
        try:
            await asyncio.wait_for(self.stop.wait(), seconds)
        except asyncio.TimeoutError:
            return False
        return True

    async def worker(self, rng: random.Random) -> None:
        while not self.stop.is_set():
            up = [p for p in self.peers if p.up]
            if not up:
                await asyncio.sleep(0.05)
                continue
            a = rng.choice(up)
            ns_up = [n for n in self.ns if n.up]
            target: tuple[str, int]
            big = self.big
            if ns_up and rng.random() < 0.2:
                target = rng.choice(ns_up).relay.address
                big = self.big_relayed
            else:
                others = [i for i, p in enumerate(self.peers) if p is not a and p.up]
                if not others:
                    await asyncio.sleep(0.05)
                    continue
                target = ("127.0.0.1", self.ports[rng.choice(others)])
            kind = "uni" if rng.random() < 0.6 else "request"
            size = self.traffic.size()
            async with big if size > BIG else contextlib.nullcontext():
                if self.stop.is_set():  # waited for a slot past the end: don't start more
                    return
                ep = a.ep
                assert ep is not None
                try:
                    conn = await asyncio.wait_for(ep.connect_to(target), self.hang)
                except Exception as exc:
                    logger.info("%s: connect to %s failed: %r", a.name, target, exc)
                    a.failed("connect", exc)
                    await asyncio.sleep(0.01)  # the target may be restarting
                    continue
                a.watch(conn)
                took = await a.exchange(conn, kind, size)
                if took is not None:
                    path = "relayed" if big is self.big_relayed else "local"
                    self.latency.setdefault(f"{path} {kind}", array.array("f")).append(took)

    async def closer(self, rng: random.Random) -> None:
        while not await self.sleep(rng.expovariate(1 / self.close_every)):
            up = [p for p in self.peers if p.up]
            if not up:
                continue
            peer = rng.choice(up)
            assert peer.ep is not None
            conns = peer.ep.connections()
            if conns:
                conn = rng.choice(conns)
                peer.watch(conn)
                await conn.close("soak: random close")
                self.closes += 1

    async def restarter(self, rng: random.Random) -> None:
        n = 0
        while not await self.sleep(self.restart_every * rng.uniform(0.5, 1.5)):
            if self.ns and n % 3 == 1:  # every third restart is a namespace peer's
                ns = rng.choice(self.ns)
                self.event(f"restart {ns.name} (tag {ns.tag})")
                await self.stop_ns(ns)
                await asyncio.sleep(rng.uniform(0, 0.5))
                await self.start_ns(ns)
                self.ns_restarts += 1
            else:
                i = rng.randrange(len(self.peers))
                peer = self.peers[i]
                self.event(f"restart {peer.name}")
                await peer.stop()
                await asyncio.sleep(rng.uniform(0, 0.5))
                await peer.start("127.0.0.1", self.ports[i], SOAK_CONFIG, self.identities[i])
            self.restarts += 1
            n += 1

    async def sweeper(self) -> None:
        while not await self.sleep(1.0):
            for p in self.peers:
                p.watch_all()

    async def sampler(self) -> None:
        while True:
            t = self.now()
            rss, fds = _proc_rss_kb(), _proc_fds()
            if rss is not None and fds is not None:
                self.rss.append((t, rss))
                self.fds.append((t, fds))
            self.py_blocks.append((t, sys.getallocatedblocks()))
            self.conns_alive.append((t, live_connections()))
            if not self.conns_reachable or t - self.conns_reachable[-1][0] >= 30:
                gc.collect()  # rarely: it perturbs what the RSS samples measure
                self.conns_reachable.append((t, live_connections()))
            for ns in self.ns:
                proc = ns.proc
                kb = _proc_rss_kb(proc.pid) if proc is not None else None
                if kb is not None:
                    self.ns_rss.setdefault(ns.name, []).append((t, kb))
            if await self.sleep(self.sample_every):
                return

    # -- the run

    async def run(self) -> SoakReport:
        fds_baseline = _proc_fds() or 0
        loop_name = _loop_name()
        report = SoakReport(seconds=0, implementation=_speedups.implementation, loop=loop_name,
                            seed=self.seed, peers=self.n_peers, ns_peers=self.n_ns,
                            fds_baseline=fds_baseline)
        self.t0 = time.monotonic()
        background: list[asyncio.Task[Any]] = []
        try:
            await self.setup()
            self.t0 = time.monotonic()  # the clock starts when everyone is up
            cpu0 = time.process_time()
            rng = self.rng
            background = [asyncio.ensure_future(self.sampler()),
                          asyncio.ensure_future(self.sweeper()),
                          asyncio.ensure_future(self.closer(random.Random(rng.random()))),
                          asyncio.ensure_future(self.restarter(random.Random(rng.random())))]
            workers = [asyncio.ensure_future(self.worker(random.Random(rng.random())))
                       for _ in range(self.n_workers)]
            await asyncio.sleep(self.seconds)
            self.stop.set()
            report.seconds = self.now()
            self.event("stopping")
            _, pending = await asyncio.wait(workers, timeout=self.hang + 10)
            for t in pending:  # an operation stuck beyond its own timeout
                self.stuck.append(f"worker: {t.get_coro()!r}")
                t.cancel()
            await asyncio.gather(*background[1:])  # a restart in progress completes
            report.cpu_seconds = round(time.process_time() - cpu0, 1)
            self.event("workers done")
            # namespace peers first (they send to us), then ours; then wait for the readers
            await asyncio.gather(*(self.stop_ns(ns) for ns in self.ns))
            self.event("namespace peers stopped")
            await asyncio.gather(*(p.stop() for p in self.peers))
            for p in self.peers:
                self.stuck += await p.drain(30)
            self.event("drained")
        finally:
            self.stop.set()
            for t in background:
                t.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            await self.teardown()
        report.fds_after = _proc_fds() or 0
        self.fill(report)
        for p in self.peers:  # what is left is what nothing refers to any more
            p.ep = None
        gc.collect()
        report.conns_alive_after = live_connections()
        return report

    async def teardown(self) -> None:
        """Remove everything, also after a failure or Ctrl-C."""
        for p in self.peers:
            if p.ep is not None and not p.ep.is_closed:
                with contextlib.suppress(Exception):
                    await p.ep.close()
            for t in list(p.tasks):
                t.cancel()
            if p.tasks:
                await asyncio.gather(*p.tasks, return_exceptions=True)
        for ns in self.ns:
            if ns.proc is not None:
                ns.proc.kill()
                ns.proc.communicate()
                ns.proc = None
            self.relay_stats(ns)
            ns.relay.close()
        if self.lab is not None:
            for ns in self.ns:
                self.nft_dropped += self.lab.dropped(ns.host)
            self.nft_dropped += self.lab.dropped(self.lab.hosts["gw"]) if self.ns else 0
            if self.own_lab:
                self.lab.close()

    def relay_stats(self, ns: NsPeer) -> None:
        for direction in ("upstream", "downstream"):
            for k, v in ns.relay.stats()[direction].items():
                self.relay_totals[k] += v

    def fill(self, r: SoakReport) -> None:
        t = self.ledger.tally()
        r.sent = dict(self.ledger.sent_count)
        r.sent_total = sum(self.ledger.sent_count.values())
        r.sent_bytes = self.ledger.sent_bytes
        r.received = t["delivered"] + t["unconfirmed"]
        r.delivered = t["delivered"]
        r.lost = t["lost"]
        r.duplicates = t["duplicates"]
        r.corrupted = self.ledger.corrupted
        r.unconfirmed = t["unconfirmed"]
        r.lost_ids = t["lost_ids"]
        r.duplicate_ids = t["duplicate_ids"]
        r.corrupt_examples = self.ledger.corrupt_examples
        r.lost_details = [self.explain(i) for i in r.lost_ids]
        r.failures = dict(self.failures)
        r.hangs = sum(v for k, v in self.failures.items() if "HANG" in k)
        r.unexpected = sum(v for k, v in self.failures.items() if "UNEXPECTED" in k)
        r.reader_errors = self.reader_errors + [e for p in self.peers for e in p.reader_errors]
        r.stuck_tasks = self.stuck
        r.restarts, r.ns_restarts = self.restarts, self.ns_restarts
        r.closes, r.ns_closes = self.closes, self.ns_closes
        r.nft_dropped = self.nft_dropped
        r.relay = dict(self.relay_totals)
        r.rss_kb, r.fds, r.ns_rss_kb = self.rss, self.fds, self.ns_rss
        r.py_blocks, r.conns_alive = self.py_blocks, self.conns_alive
        r.conns_reachable = self.conns_reachable
        r.window = 60.0 if r.seconds >= 240 else max(r.seconds / 4, 1.0)
        r.ledger_bytes = (sum(len(a) for a in self.ledger.sent.values())
                          + sum(len(a) for a in self.ledger.received.values())
                          + 10 * len(self.meta_kind))
        r.events = [f"{t:.1f}s {e}" for t, e in self.events]
        for label, values in sorted(self.latency.items()):
            v = sorted(values)
            r.latency_ms[label] = {"n": len(v), "median": round(v[len(v) // 2] * 1000, 1),
                                   "p99": round(v[int(len(v) * 0.99)] * 1000, 1),
                                   "max": round(v[-1] * 1000, 1)}

    def explain(self, ident: str) -> str:
        tag, seq = (int(x) for x in ident.split(":"))
        if tag != 0 or seq >= len(self.meta_kind):
            ns = [n.name for n in self.ns]
            return f"{ident}: from a namespace peer ({ns}), tag {tag}"
        who = {v: k for k, v in self.names.items()}[self.meta_from[seq]]
        around = [f"{t:.1f}s {e}" for t, e in self.events
                  if abs(t - self.meta_time[seq]) < 10]
        return (f"{ident}: {KINDS[self.meta_kind[seq]]} of {self.meta_size[seq]} B by {who} "
                f"at {self.meta_time[seq]:.2f}s; events nearby: {around}")


def _loop_name() -> str:
    loop = asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


async def run_soak(seconds: float, *, seed: int = 1, peers: int = 20, ns_peers: int = 2,
                   workers: int | None = None, ns_workers: int = 3,
                   restart_every: float = 10.0, close_every: float = 1.0,
                   sample_every: float = 5.0, loss: float = 2.0, hang: float = 60.0,
                   lab: Any = None) -> SoakReport:
    """Run the soak for ``seconds`` on the running loop with the active fast path.

    ``lab``: a tests.support.netlab.Lab to build the namespaces in (e.g. the pytest fixture);
    without one, a Lab is made and removed here. ``ns_peers=0`` needs no root.
    """
    soak = Soak(seconds, seed, peers, ns_peers, workers or peers + 4, ns_workers,
                restart_every, close_every, sample_every, loss, hang, lab)
    return await soak.run()


# --------------------------------------------------------------------------- namespace peer


async def ns_peer_main(host: str, port: int, tag: int, seed: int, n_workers: int,
                       close_every: float, hang: float) -> None:
    """A peer process: accept, read everything, answer requests, send on the accepted
    connections; SIGTERM or SIGINT closes, drains and prints ``LEDGER {json}``."""
    rng = random.Random(seed)
    ledger = Ledger()
    failures: collections.Counter[str] = collections.Counter()
    peer = Peer(f"ns{tag}", ledger, Traffic(tag, random.Random(seed + 1)), failures, hang,
                asyncio.Semaphore(4))
    await peer.start(host, port, SOAK_CONFIG)
    assert peer.ep is not None
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print("READY", *peer.ep.local_addr, flush=True)
    big = asyncio.Semaphore(2)
    closes = 0

    async def worker(wrng: random.Random) -> None:
        while not stop.is_set():
            assert peer.ep is not None
            conns = peer.ep.connections() if not peer.ep.is_closed else []
            if not conns:
                await asyncio.sleep(0.05)
                continue
            conn = wrng.choice(conns)
            size = peer.traffic.size()
            async with big if size > BIG else contextlib.nullcontext():
                if not stop.is_set():
                    await peer.exchange(conn, "uni" if wrng.random() < 0.6 else "request", size)

    async def closer() -> None:
        nonlocal closes
        while not stop.is_set():
            await asyncio.sleep(rng.expovariate(1 / close_every))
            assert peer.ep is not None
            conns = peer.ep.connections() if not peer.ep.is_closed else []
            if conns and not stop.is_set():
                await rng.choice(conns).close("soak: random close")
                closes += 1

    workers = [asyncio.ensure_future(worker(random.Random(rng.random())))
               for _ in range(n_workers)]
    closing = asyncio.ensure_future(closer())
    await stop.wait()
    closing.cancel()
    await peer.stop()  # in-flight sends fail at once; acknowledged ones still count
    _, pending = await asyncio.wait(workers, timeout=hang + 5)
    stuck = [f"ns{tag} worker: {t.get_coro()!r}" for t in pending]
    for t in pending:
        t.cancel()
    stuck += await peer.drain(30)
    out = {"ledger": ledger.export(), "closes": closes, "failures": dict(failures),
           "stuck": stuck, "reader_errors": peer.reader_errors, "rss_kb": _proc_rss_kb()}
    sys.stdout.write("LEDGER " + json.dumps(out) + "\n")
    sys.stdout.flush()


# --------------------------------------------------------------------------- command line


def _runner(loop_name: str) -> asyncio.Runner:
    if loop_name == "uvloop":
        import uvloop

        return asyncio.Runner(loop_factory=uvloop.new_event_loop)
    return asyncio.Runner()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.support.soak",
                                 description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--seconds", type=float, default=None, help="overrides --minutes")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--peers", type=int, default=20)
    ap.add_argument("--ns-peers", type=int, default=2)
    ap.add_argument("--workers", type=int, default=None, help="default: peers + 4")
    ap.add_argument("--ns-workers", type=int, default=3)
    ap.add_argument("--restart-every", type=float, default=10.0, help="mean seconds")
    ap.add_argument("--close-every", type=float, default=1.0, help="mean seconds")
    ap.add_argument("--sample-every", type=float, default=5.0)
    ap.add_argument("--loss", type=float, default=2.0, help="percent, each way (nftables)")
    ap.add_argument("--hang", type=float, default=60.0,
                    help="an operation without result for this long counts as a hang")
    ap.add_argument("--impl", choices=("cython", "python"), default=None)
    ap.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    ap.add_argument("--json", action="store_true", help="print the report as JSON")
    ap.add_argument("--ns-peer", nargs=2, metavar=("HOST", "PORT"), help=argparse.SUPPRESS)
    ap.add_argument("--tag", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.impl:
        _speedups.select(args.impl)
    if args.ns_peer:
        logging.basicConfig(level=logging.WARNING,
                            format=f"ns-peer tag {args.tag}: %(levelname)s %(name)s: %(message)s")
        with _runner(args.loop) as runner:
            runner.run(ns_peer_main(args.ns_peer[0], int(args.ns_peer[1]), args.tag,
                                    args.seed or 0, args.ns_workers, args.close_every,
                                    args.hang))
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    seconds = args.seconds if args.seconds is not None else args.minutes * 60
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    print(f"soak: {seconds:.0f}s, seed {seed}, {args.peers} peers + {args.ns_peers} in "
          f"namespaces, {_speedups.implementation} fast path, {args.loop}", flush=True)
    with _runner(args.loop) as runner:
        main_task: list[asyncio.Task[SoakReport]] = []

        async def go() -> SoakReport:
            task = asyncio.current_task()
            assert task is not None
            main_task.append(task)
            # SIGTERM like Ctrl-C: cancel, so the finally blocks remove everything
            asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
            return await run_soak(seconds, seed=seed, peers=args.peers, ns_peers=args.ns_peers,
                                  workers=args.workers, ns_workers=args.ns_workers,
                                  restart_every=args.restart_every,
                                  close_every=args.close_every, sample_every=args.sample_every,
                                  loss=args.loss, hang=args.hang)

        report = runner.run(go())
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        print(report.format())
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
