"""End-to-end scenarios for qp2p, and the helpers the raw-aioquic twin of them shares.

Each scenario is ``async def name(p: Params) -> dict`` and returns
``{"metrics": {metric: value}, "extra": {...}}``. Both ends run in this process on
127.0.0.1 with 1200-byte QUIC datagrams. ``bench/compare.py`` runs every scenario in a
fresh subprocess, so the fast-path implementation (``QP2P_NO_EXTENSIONS``) and the event
loop are chosen cleanly before anything is imported; ``bench/bench_e2e.py`` and
``bench/profile_bulk.py`` call the same functions in-process.

Rates are measured over the steady part of a run: deliveries are timestamped by the
receiver, the first ``warmup`` seconds are ignored, and the rate is the work completed
between the first and the last delivery after that (so a message in flight at either end
of the window is never counted partially).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import os
import sys
import time
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run from a checkout: import this tree's qp2p
    sys.path.insert(0, REPO)

MiB = 2**20
DATAGRAM_SIZE = 1200  # UDP payload QUIC builds packets for, for every configuration
HOST = "127.0.0.1"

Result = dict[str, Any]


@dataclasses.dataclass
class Params:
    """Knobs of every scenario (``compare.py`` has full and ``--quick`` presets)."""

    duration: float = 2.0  # seconds of traffic per rate scenario
    warmup: float = 0.3  # seconds ignored at the start of each rate scenario
    bulk_message: int = MiB  # bytes per bulk message
    bulk_inflight: int = 4  # bulk messages in flight (concurrent send() calls)
    small_message: int = 64  # bytes per small message / datagram
    msg_window: int = 64  # concurrent send() calls (qp2p); raw: min(window, stream credit)
    dgram_window: int = 1024  # datagrams sent but not yet received before the sender waits
    dgram_burst: int = 64  # datagrams queued per loop turn
    hs_duration: float = 2.0  # seconds of sequential handshakes
    mem_connections: int = 1000  # idle connections for the memory scenario
    mem_concurrency: int = 16  # handshakes in flight while building them

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Params:
        return cls(**json.loads(text))


# ---------------------------------------------------------------------- shared helpers


class Meter:
    """Receiver-side delivery log: ``add(units)`` per delivery, ``rate()`` at the end."""

    def __init__(self, warmup_until: float) -> None:
        self.warmup_until = warmup_until
        self.total = 0  # units delivered over the whole run
        self.first_t: float | None = None  # first delivery after the warm-up
        self.first_total = 0
        self.last_t = 0.0
        self.last_total = 0
        self.stop_at = float("inf")  # deliveries after this are not counted in the rate

    def add(self, units: int) -> None:
        """``units`` more were delivered just now."""
        self.sample(self.total + units)

    def sample(self, total: int) -> None:
        """``total`` units were delivered so far (for a receiver polled on a timer)."""
        self.total = total
        now = time.perf_counter()
        if now > self.stop_at or now < self.warmup_until:
            return
        if self.first_t is None:
            self.first_t = now
            self.first_total = self.total
            return
        self.last_t = now
        self.last_total = self.total

    def rate(self) -> float:
        """Units per second between the first and the last delivery after the warm-up.

        Raises when those deliveries span less than 40 % of the measured period (too
        few, or clumped): a rate from them would be noise.
        """
        period = self.stop_at - self.warmup_until
        if self.first_t is None or self.last_t - self.first_t < 0.4 * period:
            raise RuntimeError(
                f"too few deliveries to measure a rate: {self.total} units, spanning "
                f"{self.window():.3f}s of the {period:.3f}s measured"
            )
        return (self.last_total - self.first_total) / (self.last_t - self.first_t)

    def window(self) -> float:
        return self.last_t - self.first_t if self.first_t is not None else 0.0


class Progress:
    """Lets a paced sender sleep until the receiver makes progress (or a timeout)."""

    def __init__(self) -> None:
        self._waiter: asyncio.Future[None] | None = None

    def notify(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait(self, timeout: float) -> bool:
        """True if the receiver made progress within ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        waiter = self._waiter = loop.create_future()
        handle = loop.call_later(timeout, _resolve, waiter)
        try:
            await waiter
        finally:
            handle.cancel()
            self._waiter = None
        return waiter.result() is None


def _resolve(fut: asyncio.Future[Any]) -> None:
    if not fut.done():
        fut.set_result(False)


async def paced_datagrams(
    p: Params,
    send_burst: Callable[[int], None],
    received: Callable[[], int],
    progress: Progress,
    meter: Meter,
) -> Result:
    """Send 64-byte datagrams for ``p.duration`` s, never more than ``p.dgram_window``
    ahead of the receiver (the closed loop that keeps loopback delivery near 100 %).

    A stall of 50 ms without progress writes the outstanding datagrams off as lost, so
    losses cost rate instead of wedging the sender. Delivery is counted after a 0.3 s drain.
    """
    start = time.perf_counter()
    deadline = start + p.duration
    sent = 0
    written_off = 0
    stalls = 0
    while time.perf_counter() < deadline:
        outstanding = sent - received() - written_off
        if outstanding >= p.dgram_window:
            if not await progress.wait(0.05):
                stalls += 1
                written_off = sent - received()
            continue
        n = min(p.dgram_burst, p.dgram_window - outstanding)
        send_burst(n)
        sent += n
        await asyncio.sleep(0)
    meter.stop_at = time.perf_counter()
    await asyncio.sleep(0.3)  # drain what is still in flight
    got = received()
    return {
        "metrics": {"datagrams_per_s": meter.rate()},
        "extra": {
            "datagrams_sent": sent,
            "datagrams_received": got,
            "delivery_pct": 100.0 * got / sent if sent else 0.0,
            "stalls": stalls,
        },
    }


def wall_guard(coro: Awaitable[Result], timeout: float) -> Awaitable[Result]:
    """Bound a scenario in time: ``asyncio.TimeoutError`` instead of a hang."""
    return asyncio.wait_for(coro, timeout)


def scenario_timeout(p: Params, name: str) -> float:
    """Seconds a scenario may take before it is reported as stuck."""
    if name == "memory":
        return 60.0 + p.mem_connections * 0.25
    if name == "handshakes":
        return p.hs_duration + 30.0
    return p.duration + 30.0


# ---------------------------------------------------------------------- qp2p


def _config(**overrides: Any) -> Any:
    import qp2p

    base: dict[str, Any] = {
        "idle_timeout": 60.0,
        "handshake_timeout": 5.0,
        "max_datagram_size": DATAGRAM_SIZE,
        "retry": qp2p.RetryConfig(initial_interval=0.05, max_interval=0.5, max_elapsed_time=10),
        # every benchmark peer dials from 127.0.0.1; the memory scenario opens 1,000
        "max_connections_per_ip": 100_000,
        "address_validation_threshold": 100_000,
    }
    base.update(overrides)
    return qp2p.Config(**base)


@contextlib.asynccontextmanager
async def qp2p_pair(**config: Any) -> Any:
    """(dialer endpoint, its connection, acceptor endpoint, the accepted connection)."""
    import qp2p

    cfg = _config(**config)
    identity = qp2p.Identity.generate()
    server = await qp2p.Endpoint.bind((HOST, 0), config=cfg, identity=identity)
    client = await qp2p.Endpoint.bind((HOST, 0), config=cfg, accept_incoming=False)
    try:
        conn = await client.connect_to(server.local_addr)
        accepted = await asyncio.wait_for(server.accept(), 5)
        yield client, conn, server, accepted
    finally:
        await client.close()
        await server.close()


async def _cancel(tasks: list[asyncio.Task[Any]]) -> None:
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def _stream_scenario(
    p: Params, size: int, window: int, metric: str, per_message: bool
) -> Result:
    """``window`` tasks each looping ``await conn.send(payload)``; the receiver counts
    messages (``per_message``) or, for large messages, stream bytes as they arrive (the
    connection's ``bytes_received``, polled every 10 ms), so that a handful of 1 MiB
    messages completing together does not quantize the rate."""
    import qp2p

    payload = os.urandom(size)
    async with qp2p_pair() as (_client, conn, _server, accepted):
        start = time.perf_counter()
        meter = Meter(start + p.warmup)
        stop = False
        messages = 0

        async def sender() -> None:
            while not stop:
                await conn.send(payload)

        async def receiver() -> None:
            nonlocal messages
            while True:
                await accepted.recv()
                messages += 1
                if per_message:
                    meter.add(1)

        async def sampler() -> None:
            while True:
                meter.sample(accepted.stats()["bytes_received"])
                await asyncio.sleep(0.01)

        rx = asyncio.ensure_future(receiver())
        if not per_message:
            rx = asyncio.ensure_future(asyncio.gather(rx, sampler()))
        senders = [asyncio.ensure_future(sender()) for _ in range(window)]
        done, _ = await asyncio.wait(
            [rx, *senders], timeout=p.duration, return_when=asyncio.FIRST_EXCEPTION
        )
        stop = True
        meter.stop_at = time.perf_counter()
        for task in done:  # a sender or the receiver failed: report it
            with contextlib.suppress(asyncio.CancelledError, qp2p.ConnectionClosed):
                task.result()
        stats = conn.stats()
        await _cancel([rx, *senders])
    return {
        "metrics": {metric: meter.rate() / (1 if per_message else MiB)},
        "extra": {
            "messages_received": messages,
            "window_s": round(meter.window(), 3),
            "sender_packets": stats.get("packets_sent"),
            "sender_rtt_ms": None if stats.get("rtt") is None else 1000 * stats["rtt"],
            "sender_cwnd": stats.get("cwnd"),
            "receiver_packets": accepted.stats().get("packets_sent"),
            "implementation": qp2p.implementation,
        },
    }


async def bulk(p: Params) -> Result:
    """MiB/s of ``p.bulk_message``-byte messages on one connection, ``p.bulk_inflight``
    ``send()`` calls in flight (each returns when the peer acknowledged its stream)."""
    return await _stream_scenario(p, p.bulk_message, p.bulk_inflight, "bulk_mib_s", False)


async def messages(p: Params) -> Result:
    """64-byte messages/s on one connection: ``p.msg_window`` concurrent ``send()`` loops."""
    return await _stream_scenario(p, p.small_message, p.msg_window, "msgs_per_s", True)


async def datagrams(p: Params) -> Result:
    """64-byte QUIC datagrams/s delivered, sender paced by the receiver (see
    :func:`paced_datagrams`)."""
    import qp2p

    payload = os.urandom(p.small_message)
    async with qp2p_pair() as (_client, conn, _server, accepted):
        meter = Meter(time.perf_counter() + p.warmup)
        progress = Progress()

        async def receiver() -> None:
            while True:
                await accepted.recv_datagram()
                meter.add(1)
                progress.notify()

        def send_burst(n: int) -> None:
            send = conn.send_datagram
            for _ in range(n):
                send(payload)

        rx = asyncio.ensure_future(receiver())
        try:
            res = await paced_datagrams(p, send_burst, lambda: meter.total, progress, meter)
        finally:
            await _cancel([rx])
        res["extra"]["receiver_dropped"] = accepted.stats().get("datagrams_dropped")
        res["extra"]["implementation"] = qp2p.implementation
    return res


async def handshakes(p: Params) -> Result:
    """Sequential handshakes/s: the time of ``connect_to`` alone (each connection is
    closed afterwards, outside the timed part); n / sum(connect times)."""
    import qp2p

    cfg = _config()
    server = await qp2p.Endpoint.bind((HOST, 0), config=cfg)
    client = await qp2p.Endpoint.bind((HOST, 0), config=cfg, accept_incoming=False)

    async def acceptor() -> None:
        async for conn in server.incoming():
            del conn  # accepted and dropped: the client closes it

    acc = asyncio.ensure_future(acceptor())
    try:
        spent = 0.0
        n = 0
        end = time.perf_counter() + p.hs_duration
        while time.perf_counter() < end:
            t0 = time.perf_counter()
            conn = await client.connect_to(server.local_addr)
            spent += time.perf_counter() - t0
            n += 1
            await conn.close()
    finally:
        await client.close()
        await server.close()
        await _cancel([acc])
    return {
        "metrics": {"handshakes_per_s": n / spent},
        "extra": {"handshakes": n, "mean_ms": 1000 * spent / n,
                  "implementation": qp2p.implementation},
    }


# ------------------------------------------------------------- memory per idle connection


async def _peer_command(proc: asyncio.subprocess.Process, line: str) -> list[str]:
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(line.encode() + b"\n")
    await proc.stdin.drain()
    reply = (await proc.stdout.readline()).decode().split()
    if not reply or reply[0] != "ok":
        raise RuntimeError(f"memory peer failed on {line!r}: {' '.join(reply) or 'no answer'}")
    return reply[1:]


def _traced() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


async def memory(p: Params) -> Result:
    """KiB of Python memory (tracemalloc) per idle connection held by one endpoint.

    The measured endpoint lives here; its peers live in a helper process (not traced).
    Dialer side: this endpoint dials ``n`` connections, one to each of ``n`` peer
    endpoints (the pool keys connections by address, so one peer address would give one
    connection). Acceptor side: ``n`` peer endpoints each dial this one. Ten warm-up
    connections first, so one-off caches are not billed to the connections.
    """
    import qp2p

    n, warm = p.mem_connections, 10
    cfg = _config(idle_timeout=600.0)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, os.path.abspath(__file__), "--memory-peer",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
    )
    ep = None
    try:
        tracemalloc.start()
        ep = await qp2p.Endpoint.bind((HOST, 0), config=cfg)
        accepted: list[Any] = []
        arrived = asyncio.Event()

        async def acceptor() -> None:
            async for conn in ep.incoming():
                accepted.append(conn)
                arrived.set()

        acc = asyncio.ensure_future(acceptor())
        addrs = [(HOST, int(port)) for port in await _peer_command(proc, f"listen {n + warm}")]
        dialled: list[Any] = []
        sem = asyncio.Semaphore(p.mem_concurrency)

        async def dial(addr: tuple[str, int]) -> None:
            async with sem:
                dialled.append(await ep.connect_to(addr))

        await asyncio.gather(*(dial(a) for a in addrs[:warm]))
        await asyncio.sleep(0.3)
        m0 = _traced()
        await asyncio.gather(*(dial(a) for a in addrs[warm:]))
        await asyncio.sleep(0.5)  # let the handshakes' last ACKs and CID frames settle
        m1 = _traced()

        await _peer_command(proc, f"dial {ep.local_addr[1]} {warm}")
        while len(accepted) < warm:
            arrived.clear()
            await asyncio.wait_for(arrived.wait(), 10)
        await asyncio.sleep(0.3)
        m2 = _traced()
        await _peer_command(proc, f"dial {ep.local_addr[1]} {n}")
        while len(accepted) < warm + n:
            arrived.clear()
            await asyncio.wait_for(arrived.wait(), 10)
        await asyncio.sleep(0.5)
        m3 = _traced()
        peak = tracemalloc.get_traced_memory()[1]
        open_conns = len(ep.connections())
        await _cancel([acc])
    finally:
        tracemalloc.stop()
        if ep is not None:
            await ep.close()
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
    return {
        "metrics": {
            "mem_kib_acceptor": (m3 - m2) / n / 1024,
            "mem_kib_dialer": (m1 - m0) / n / 1024,
        },
        "extra": {"connections": n, "open_at_end": open_conns,
                  "traced_peak_mib": peak / MiB, "implementation": qp2p.implementation},
    }


async def _memory_peer() -> None:
    """The untraced side of :func:`memory`: commands on stdin, ``ok ...`` on stdout.

    ``listen N``: bind N accepting endpoints, answer their ports.
    ``dial PORT N``: bind N dial-only endpoints, each connects to 127.0.0.1:PORT once.
    End of input: close everything and exit.
    """
    import qp2p

    cfg = _config(idle_timeout=600.0)
    identity = qp2p.Identity.generate()  # one key for all: generating 2,000 is slow
    endpoints: list[Any] = []
    conns: list[Any] = []
    loop = asyncio.get_running_loop()
    sem = asyncio.Semaphore(16)

    async def dial(port: int) -> None:
        async with sem:
            ep = await qp2p.Endpoint.bind((HOST, 0), config=cfg, identity=identity,
                                          accept_incoming=False)
            endpoints.append(ep)
            conns.append(await ep.connect_to((HOST, port)))

    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        cmd, *args = line.split()
        try:
            if cmd == "listen":
                new = [await qp2p.Endpoint.bind((HOST, 0), config=cfg, identity=identity)
                       for _ in range(int(args[0]))]
                endpoints.extend(new)
                reply = "ok " + " ".join(str(ep.local_addr[1]) for ep in new)
            elif cmd == "dial":
                await asyncio.gather(*(dial(int(args[0])) for _ in range(int(args[1]))))
                reply = "ok"
            else:
                reply = f"error unknown command {cmd}"
        except Exception as exc:
            reply = f"error {type(exc).__name__}: {exc}".replace("\n", " ")
        sys.stdout.write(reply + "\n")
        sys.stdout.flush()
    for ep in endpoints:
        await ep.close()


SCENARIOS: dict[str, Callable[[Params], Awaitable[Result]]] = {
    "bulk": bulk,
    "messages": messages,
    "datagrams": datagrams,
    "handshakes": handshakes,
    "memory": memory,
}


if __name__ == "__main__" and sys.argv[1:] == ["--memory-peer"]:
    try:
        import uvloop

        uvloop.run(_memory_peer())
    except ImportError:
        asyncio.run(_memory_peer())
