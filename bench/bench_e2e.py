"""End-to-end benchmarks under pytest-benchmark: fixed work per round, on loopback.

Run only when asked (``testpaths`` is ``tests/``, so ``make test`` never collects this)::

    .venv/bin/python -m pytest bench/bench_e2e.py --benchmark-only
    .venv/bin/python -m pytest bench/bench_e2e.py --benchmark-only -k "cython and uvloop"

Each benchmark is parametrized over the stack (qp2p with the compiled fast path, qp2p
with the pure-Python twin, raw aioquic) and the event loop (uvloop, asyncio; raw aioquic
runs on uvloop only, as in compare.py). The setup (endpoints, handshake) is outside the
timed part; a round is one fixed piece of work, and ``extra_info`` holds the rate it
implies. ``bench/compare.py`` is the side-by-side tool with steady-state rates; these are
small and meant for ``--benchmark-compare`` between commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import raw_aioquic  # noqa: E402
import scenarios  # noqa: E402
from scenarios import HOST, MiB, Params  # noqa: E402

BULK_MESSAGES = 4  # x 1 MiB, all in flight
SMALL_MESSAGES = 1000  # x 64 B, 64 in flight
DATAGRAMS = 2000  # x 64 B, at most 1024 ahead of the receiver
HANDSHAKES = 10  # sequential
WORK_TIMEOUT = 30.0

STACKS = [
    ("qp2p-cython", "uvloop"),
    ("qp2p-cython", "asyncio"),
    ("qp2p-python", "uvloop"),
    ("qp2p-python", "asyncio"),
    ("raw", "uvloop"),
]


@pytest.fixture(params=STACKS, ids=[f"{s}-{lp}" for s, lp in STACKS])
def stack(request: pytest.FixtureRequest) -> Iterator[tuple[str, asyncio.AbstractEventLoop]]:
    """(stack name, a fresh event loop), with the qp2p fast path selected."""
    name, loop_name = request.param
    if loop_name == "uvloop":
        uvloop = pytest.importorskip("uvloop")
        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    before = None
    if name.startswith("qp2p"):
        from qp2p import _speedups

        before = _speedups.implementation
        _speedups.select(name.split("-")[1])  # the cython case fails if it isn't built
    try:
        yield name, loop
    finally:
        if before is not None:
            from qp2p import _speedups

            _speedups.select(before)
        loop.close()
        asyncio.set_event_loop(None)


class Harness:
    """A connected pair for one stack, entered outside the timed part."""

    def __init__(self, name: str, loop: asyncio.AbstractEventLoop) -> None:
        self.name = name
        self.loop = loop
        self.stack = contextlib.AsyncExitStack()
        self.p = Params(warmup=0.0)
        if name == "raw":
            self.client, self.sink = self.run(
                self.stack.enter_async_context(raw_aioquic.raw_pair(self.p)))
        else:
            _c, self.conn, _s, self.accepted = self.run(
                self.stack.enter_async_context(scenarios.qp2p_pair()))

    def run(self, coro: Awaitable[Any]) -> Any:
        return self.loop.run_until_complete(asyncio.wait_for(coro, WORK_TIMEOUT))

    def close(self) -> None:
        self.run(self.stack.aclose())


@pytest.fixture
def harness(stack: tuple[str, asyncio.AbstractEventLoop]) -> Iterator[Harness]:
    h = Harness(*stack)
    try:
        yield h
    finally:
        h.close()


def _bench(benchmark: Any, h: Harness, work: Callable[[], Awaitable[None]], units: float,
           unit: str) -> None:
    benchmark.pedantic(lambda: h.run(work()), rounds=5, warmup_rounds=1, iterations=1)
    benchmark.extra_info[f"{unit}_per_s"] = units / benchmark.stats.stats.median


# ---------------------------------------------------------------------- raw helpers


async def _raw_streams(h: Harness, payload: bytes, n: int, window: int) -> None:
    """Send ``n`` one-message uni streams, never beyond the peer's stream credit nor
    ``window`` unacknowledged, until the server saw all of them end."""
    client, sink = h.client, h.sink
    quic = client._quic
    target = sink.messages + n
    opened = 0
    outstanding: list[int] = []
    while sink.messages < target:
        outstanding = [s for s in outstanding if not client.send_finished(s)]
        room = min(window - len(outstanding), client.credit_uni(), n - opened)
        for _ in range(max(room, 0)):
            sid = quic.get_next_available_stream_id(is_unidirectional=True)
            quic.send_stream_data(sid, payload, end_stream=True)
            outstanding.append(sid)
            opened += 1
        if room > 0:
            client.transmit()
        await client.progress.wait(0.05)


# ---------------------------------------------------------------------- benchmarks


def test_bulk(benchmark: Any, harness: Harness) -> None:
    """4 x 1 MiB messages in flight on one connection, until all are delivered."""
    payload = os.urandom(MiB)

    async def qp2p_work() -> None:
        async def receive() -> None:
            for _ in range(BULK_MESSAGES):
                await harness.accepted.recv()

        await asyncio.gather(receive(), *(harness.conn.send(payload)
                                          for _ in range(BULK_MESSAGES)))

    async def raw_work() -> None:
        await _raw_streams(harness, payload, BULK_MESSAGES, BULK_MESSAGES)

    _bench(benchmark, harness, raw_work if harness.name == "raw" else qp2p_work,
           BULK_MESSAGES, "MiB")


def test_small_messages(benchmark: Any, harness: Harness) -> None:
    """1,000 x 64-byte messages, 64 concurrent ``send()`` loops (raw: 64 open streams)."""
    payload = os.urandom(64)
    window = 64

    async def qp2p_work() -> None:
        left = SMALL_MESSAGES

        async def sender() -> None:
            nonlocal left
            while left > 0:
                left -= 1
                await harness.conn.send(payload)

        async def receive() -> None:
            for _ in range(SMALL_MESSAGES):
                await harness.accepted.recv()

        await asyncio.gather(receive(), *(sender() for _ in range(window)))

    async def raw_work() -> None:
        await _raw_streams(harness, payload, SMALL_MESSAGES, window)

    _bench(benchmark, harness, raw_work if harness.name == "raw" else qp2p_work,
           SMALL_MESSAGES, "messages")


def test_datagrams(benchmark: Any, harness: Harness) -> None:
    """2,000 x 64-byte QUIC datagrams, paced by the receiver (loss costs a 50 ms stall)."""
    payload = os.urandom(64)
    p = harness.p
    lost = 0

    if harness.name == "raw":
        sink = harness.sink
        quic = harness.client._quic

        def received() -> int:
            return int(sink.datagrams)

        def send(n: int) -> None:
            for _ in range(n):
                quic.send_datagram_frame(payload)
            harness.client.transmit()

        progress = sink.progress
        stop_rx = None
    else:
        count = 0
        progress = scenarios.Progress()

        async def receiver() -> None:
            nonlocal count
            while True:
                await harness.accepted.recv_datagram()
                count += 1
                progress.notify()

        def received() -> int:
            return count

        rx = harness.loop.create_task(receiver())
        stop_rx = rx.cancel

        def send(n: int) -> None:
            for _ in range(n):
                harness.conn.send_datagram(payload)

    async def work() -> None:
        nonlocal lost
        base = received()
        sent = written_off = 0
        while sent < DATAGRAMS or received() - base + written_off < sent:
            outstanding = sent - (received() - base) - written_off
            if sent < DATAGRAMS and outstanding < p.dgram_window:
                n = min(p.dgram_burst, p.dgram_window - outstanding, DATAGRAMS - sent)
                send(n)
                sent += n
                await asyncio.sleep(0)
            elif not await progress.wait(0.05):
                written_off = sent - (received() - base)
                lost += written_off

    try:
        _bench(benchmark, harness, work, DATAGRAMS, "datagrams")
    finally:
        if stop_rx is not None:
            stop_rx()
            harness.run(asyncio.sleep(0))
    benchmark.extra_info["presumed_lost"] = lost


def test_handshakes(benchmark: Any, stack: tuple[str, asyncio.AbstractEventLoop]) -> None:
    """10 sequential connects (each closed; raw: closes finish in the background)."""
    name, loop = stack

    async def qp2p_setup() -> Any:
        import qp2p

        cfg = scenarios._config()
        server = await qp2p.Endpoint.bind((HOST, 0), config=cfg)
        client = await qp2p.Endpoint.bind((HOST, 0), config=cfg, accept_incoming=False)

        async def acceptor() -> None:
            async for _conn in server.incoming():
                pass

        task = asyncio.ensure_future(acceptor())

        async def work() -> None:
            for _ in range(HANDSHAKES):
                conn = await client.connect_to(server.local_addr)
                await conn.close()

        async def teardown() -> None:
            await client.close()
            await server.close()
            task.cancel()

        return work, teardown

    async def raw_setup() -> Any:
        server_cfg, client_cfg = raw_aioquic._configs()
        server = await raw_aioquic.serve(HOST, 0, configuration=server_cfg)
        port = server._transport.get_extra_info("sockname")[1]
        closing: list[asyncio.Future[Any]] = []

        async def work() -> None:
            for _ in range(HANDSHAKES):
                manager = raw_aioquic.connect(HOST, port, configuration=client_cfg)
                await manager.__aenter__()
                closing.append(asyncio.ensure_future(manager.__aexit__(None, None, None)))

        async def teardown() -> None:
            await asyncio.wait_for(asyncio.gather(*closing, return_exceptions=True), 10)
            server.close()

        return work, teardown

    work, teardown = loop.run_until_complete(raw_setup() if name == "raw" else qp2p_setup())
    try:
        def run() -> None:
            loop.run_until_complete(asyncio.wait_for(work(), WORK_TIMEOUT))

        benchmark.pedantic(run, rounds=5, warmup_rounds=1, iterations=1)
        benchmark.extra_info["handshakes_per_s"] = HANDSHAKES / benchmark.stats.stats.median
    finally:
        loop.run_until_complete(teardown())
