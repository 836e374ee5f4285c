"""Micro-benchmarks of the fast-path primitives: compiled module vs pure-Python twin.

Run only when asked (``testpaths`` is ``tests/``)::

    .venv/bin/pytest bench/bench_fastpath.py --benchmark-only -q
    .venv/bin/pytest bench/bench_fastpath.py --benchmark-only -q -k lookup

Every benchmark runs once per implementation (ids ``cython`` and ``python``) in the same
group, so the table shows the two side by side. The cython cases fail, never skip, when
the extension is not built.
"""

from __future__ import annotations

import importlib
import os
import select
import socket
import sys
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

MODULES = {"cython": "qp2p._fastpath", "python": "qp2p._purepy"}


@pytest.fixture(params=list(MODULES))
def fp(request: pytest.FixtureRequest) -> ModuleType:
    try:
        return importlib.import_module(MODULES[request.param])
    except ImportError as exc:  # the compiled cases must fail, not skip
        pytest.fail(f"build the extension first (setup.py build_ext --inplace): {exc}")


def test_encode_64b(benchmark: Any, fp: ModuleType) -> None:
    benchmark.group = "encode_frame 64 B"
    header, dst, payload = b"h" * 8, b"d" * 8, b"p" * 48
    frame = benchmark(fp.encode_frame, header, dst, payload, 0)
    assert len(frame) == 16 + 64


def test_encode_64kib(benchmark: Any, fp: ModuleType) -> None:
    benchmark.group = "encode_frame 64 KiB"
    payload = os.urandom(64 * 1024)
    frame = benchmark(fp.encode_frame, b"hdr", b"dst", payload, 0)
    assert len(frame) == 16 + 6 + 64 * 1024


def test_decode_64b(benchmark: Any, fp: ModuleType) -> None:
    benchmark.group = "decode_frame 64 B"
    frame = fp.encode_frame(b"h" * 8, b"d" * 8, b"p" * 48)
    result = benchmark(fp.decode_frame, frame, 16 * 2**20)
    assert result[3] == b"p" * 48


def test_assembler_1mib_in_1200b_chunks(benchmark: Any, fp: ModuleType) -> None:
    benchmark.group = "FrameAssembler 1 MiB in 1200 B chunks"
    frame = fp.encode_frame(b"header", b"dst", os.urandom(2**20 - 25))
    assert len(frame) == 2**20
    chunks = [frame[i : i + 1200] for i in range(0, len(frame), 1200)]
    last = len(chunks) - 1

    def assemble() -> Any:
        asm = fp.FrameAssembler(16 * 2**20)
        feed = asm.feed
        for i, chunk in enumerate(chunks):
            result = feed(chunk, i == last)
        return result

    result = benchmark(assemble)
    assert result[1] == b"header" and len(result[3]) == 2**20 - 25


def test_table_lookup_1000(benchmark: Any, fp: ModuleType) -> None:
    benchmark.group = "ConnectionTable.lookup, 1000 entries"
    table = fp.ConnectionTable(8)
    cids = [i.to_bytes(8, "big") for i in range(1000)]
    for cid in cids:
        table.add(cid, cid)
    # short-header packets (the common case) for 100 different connections
    datagrams = [b"\x40" + cids[i * 7] + b"\x00" * 1100 for i in range(100)]

    def lookups() -> int:
        lookup = table.lookup
        found = 0
        for d in datagrams:
            if lookup(d) is not None:
                found += 1
        return found

    assert benchmark(lookups) == 100
    benchmark.extra_info["lookups_per_round"] = 100


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 2**20)
    rx.bind(("127.0.0.1", 0))
    rx.setblocking(False)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 * 2**20)
    tx.bind(("127.0.0.1", 0))
    tx.setblocking(False)
    yield rx, tx
    rx.close()
    tx.close()


@pytest.mark.parametrize("sizes", ["equal", "mixed"])
def test_send_recv_64x1200(
    benchmark: Any, fp: ModuleType, pair: tuple[socket.socket, socket.socket], sizes: str
) -> None:
    """64 datagrams out with send_batch and back in with recv_batch, on loopback.

    ``equal``: 64 x 1200 B to one address (a GSO run for the compiled module where the
    kernel has GSO). ``mixed``: sizes vary, so every datagram is its own message.
    """
    benchmark.group = f"send_batch + recv_batch 64 x 1200 B ({sizes})"
    rx, tx = pair
    fp.enable_gro(rx)
    dest = rx.getsockname()
    if sizes == "equal":
        batch = [(os.urandom(1200), dest) for _ in range(64)]
    else:
        batch = [(os.urandom(1000 + (i * 37) % 200), dest) for i in range(64)]
    send_batch, recv_batch = fp.send_batch, fp.recv_batch

    def round_trip() -> int:
        assert send_batch(tx, batch) == (64, 0)
        got = 0
        while got < 64:
            received = recv_batch(rx, 64)
            if not received:
                select.select([rx], [], [], 1.0)
            got += len(received)
        return got

    assert benchmark(round_trip) == 64
    benchmark.extra_info["features"] = fp.features()
