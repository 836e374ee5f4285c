"""The fast path's batched socket calls (``recv_batch``, ``send_batch``) and UDP GSO/GRO,
compiled module and twin, over real UDP on 127.0.0.1 / ::1 (fixture ``fp``; the codecs are
in ``tests/unit/test_fastpath.py``)."""

from __future__ import annotations

import logging
import os
import select
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest

from qp2p import _purepy
from tests.support.fastpath import both, compiled, outcome
from tests.support.paths import CWD, pythonpath

SOL_UDP = 17
UDP_GRO = 104
SO_NO_CHECK = 11
MIB = 1 << 20


def has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


FAMILIES = [
    pytest.param((socket.AF_INET, "127.0.0.1"), id="ipv4"),
    pytest.param(
        (socket.AF_INET6, "::1"),
        id="ipv6",
        marks=pytest.mark.skipif(not has_ipv6(), reason="no IPv6 loopback"),
    ),
]


def udp(
    family: int = socket.AF_INET, host: str = "127.0.0.1", rcvbuf: int = 4 * MIB
) -> socket.socket:
    s = socket.socket(family, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    s.bind((host, 0))
    s.setblocking(False)
    return s


@pytest.fixture
def sockets() -> Iterator[list[socket.socket]]:
    made: list[socket.socket] = []
    yield made
    for s in made:
        s.close()


def drain(
    mod: ModuleType, sock: socket.socket, want: int, timeout: float = 5.0, **kw: Any
) -> list[Any]:
    """Receive with ``mod.recv_batch`` until ``want`` datagrams arrived (or time is up)."""
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and time.monotonic() < deadline:
        batch = mod.recv_batch(sock, **kw)
        if batch:
            got.extend(batch)
        else:
            select.select([sock], [], [], 0.05)
    return got


def mixed_datagrams(count: int, seed: int = 1) -> list[bytes]:
    rng = __import__("random").Random(seed)
    return [rng.randbytes(rng.randint(1, 1472)) for _ in range(count)]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("receiver", ["cython", "python"])
def test_round_trip_thousands(
    fp: ModuleType, receiver: str, family: tuple[int, str], sockets: list[socket.socket]
) -> None:
    recv_mod = compiled() if receiver == "cython" else _purepy
    fam, host = family
    rx, tx = udp(fam, host), udp(fam, host)
    sockets += [rx, tx]
    payloads = mixed_datagrams(3000)
    dest = rx.getsockname()
    got: list[Any] = []
    for pos in range(0, len(payloads), 150):  # keep the receive buffer from overflowing
        chunk = [(d, dest) for d in payloads[pos : pos + 150]]
        assert fp.send_batch(tx, chunk) == (len(chunk), 0)
        got += drain(recv_mod, rx, len(chunk))
    assert [d for d, _ in got] == payloads
    assert {a for _, a in got} == {tx.getsockname()}
    # the very tuples socket.recvfrom gives
    tx.sendto(b"x", dest)
    select.select([rx], [], [], 1)
    raw = rx.recvfrom(10)
    assert got[0][1] == raw[1] and type(got[0][1][0]) is str
    assert recv_mod.recv_batch(rx) == []


def test_recv_batch_limits_and_truncation(fp: ModuleType, sockets: list[socket.socket]) -> None:
    rx, tx = udp(), udp()
    sockets += [rx, tx]
    assert fp.recv_batch(rx) == []
    for i in range(10):
        tx.sendto(bytes([i]) * 1000, rx.getsockname())
    time.sleep(0.05)
    first = fp.recv_batch(rx, 3)
    assert [d for d, _ in first] == [bytes([i]) * 1000 for i in range(3)]
    second = fp.recv_batch(rx, 4, bufsize=100)
    assert [d for d, _ in second] == [bytes([i]) * 100 for i in range(3, 7)]
    rest = fp.recv_batch(rx, max_datagrams=100, bufsize=10**12)
    assert [d for d, _ in rest] == [bytes([i]) * 1000 for i in range(7, 10)]
    tx.sendto(b"", rx.getsockname())  # an empty datagram is a datagram
    assert drain(fp, rx, 1) == [(b"", tx.getsockname())]


@pytest.mark.parametrize(
    ("kwargs", "exc", "message"),
    [
        ({"max_datagrams": 0}, ValueError, "max_datagrams must be at least 1, got 0"),
        ({"bufsize": 0}, ValueError, "bufsize must be at least 1, got 0"),
        ({"bufsize": "big"}, TypeError, None),
    ],
)
def test_recv_batch_argument_errors(
    kwargs: dict[str, Any], exc: type, message: str | None, sockets: list[socket.socket]
) -> None:
    c, p = both()
    rx = udp()
    sockets.append(rx)
    got = outcome(lambda m: m.recv_batch(rx, **kwargs), c)
    assert got == outcome(lambda m: m.recv_batch(rx, **kwargs), p)
    assert got[0] == "raised" and got[1] is exc
    if message:
        assert got[2] == message


def test_recv_batch_skips_icmp_errors(fp: ModuleType, sockets: list[socket.socket]) -> None:
    probe = udp()
    port = probe.getsockname()[1]
    probe.close()  # nothing listens on ``port`` now
    client = udp()
    sockets.append(client)
    client.connect(("127.0.0.1", port))
    client.send(b"hello?")  # answered by ICMP port unreachable
    time.sleep(0.05)
    assert fp.recv_batch(client) == []  # ECONNREFUSED was reported, and skipped
    client.send(b"again")
    time.sleep(0.05)
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sockets.append(server)
    server.bind(("127.0.0.1", port))
    server.sendto(b"late answer", client.getsockname())
    assert drain(fp, client, 1) == [(b"late answer", ("127.0.0.1", port))]


def test_recv_batch_raises_other_errors(fp: ModuleType) -> None:
    s = udp()
    s.close()
    c, p = both()
    got = outcome(c.recv_batch, s)
    assert got == outcome(p.recv_batch, s)
    assert got[1] is OSError and "Bad file descriptor" in got[2]


def test_batches_on_other_socket_families(fp: ModuleType) -> None:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    with a, b:
        a.setblocking(False)
        b.setblocking(False)
        # connected: an address is refused (EISCONN), counted like any send error
        assert fp.send_batch(a, [(b"x", "/nonexistent")]) == (1, 1)
        a.send(b"one")
        a.send(b"two")
        got = fp.recv_batch(b)
        assert [d for d, _ in got] == [b"one", b"two"]


def test_send_batch_counts_errors_and_goes_on(fp: ModuleType, sockets: list[socket.socket]) -> None:
    rx, tx = udp(), udp()
    sockets += [rx, tx]
    dest = rx.getsockname()
    batch = [
        (b"one", dest),
        (b"x" * 70000, dest),  # EMSGSIZE
        (b"two", dest),
        (b"three", ("127.0.0.1", 0)),  # EINVAL: port 0
        (bytearray(b"four"), dest),
        (memoryview(b"five"), dest),
        [b"six", dest],  # a list works as the pair too
        (b"seven", ("127.0.0.1", dest[1])),  # an equal but distinct address tuple
    ]
    assert fp.send_batch(tx, batch) == (len(batch), 2)
    got = drain(fp, rx, 6)
    assert [d for d, _ in got] == [b"one", b"two", b"four", b"five", b"six", b"seven"]
    assert fp.send_batch(tx, batch, len(batch)) == (len(batch), 0)
    assert fp.send_batch(tx, [], 0) == (0, 0)


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(("127.0.0.1",), id="short-address"),
        pytest.param(("127.0.0.1", 70000), id="port-out-of-range"),
        pytest.param("127.0.0.1:9", id="string-address"),
        pytest.param(None, id="no-address"),
    ],
)
def test_send_batch_bad_items_identical(bad: Any, sockets: list[socket.socket]) -> None:
    c, p = both()
    rx, tx = udp(), udp()
    sockets += [rx, tx]
    dest = rx.getsockname()
    results = []
    for mod in (c, p):
        batch = [(b"before", dest), (b"bad", bad), (b"after", dest)]
        results.append(outcome(mod.send_batch, tx, batch))
        assert [d for d, _ in drain(mod, rx, 1, timeout=1)] == [b"before"]
    assert results[0] == results[1] and results[0][0] == "raised"
    for items in ([(b"a", dest, 3)], [b"abc"], [42], [("text", dest)]):
        got = outcome(c.send_batch, tx, items)
        assert got == outcome(p.send_batch, tx, items) and got[0] == "raised"


def test_send_batch_start_validated(fp: ModuleType, sockets: list[socket.socket]) -> None:
    tx = udp()
    sockets.append(tx)
    c, p = both()
    items = [(b"x", tx.getsockname())] * 3
    for start in (-1, 4, "1"):
        got = outcome(c.send_batch, tx, items, start)
        assert got == outcome(p.send_batch, tx, items, start) and got[0] == "raised"
    assert outcome(c.send_batch, tx, items, 4)[2] == "start 4 is out of range 0..3"


def test_send_batch_ipv6_address_forms(fp: ModuleType, sockets: list[socket.socket]) -> None:
    if not has_ipv6():
        pytest.skip("no IPv6 loopback")
    rx, tx = udp(socket.AF_INET6, "::1"), udp(socket.AF_INET6, "::1")
    sockets += [rx, tx]
    port = rx.getsockname()[1]
    batch = [
        (b"a", ("::1", port)),
        (b"b", ("::1", port, 0)),
        (b"c", ("::1", port, 0, 0)),
        (b"d", ("0:0:0:0:0:0:0:1", port, 0, 0)),
    ]
    assert fp.send_batch(tx, batch) == (4, 0)
    assert [d for d, _ in drain(fp, rx, 4)] == [b"a", b"b", b"c", b"d"]
    c, p = both()
    for bad in (("::1", port, 1 << 20, 0), ("::1", port, 0, 0, 0), ("::1", -1)):
        got = outcome(c.send_batch, tx, [(b"x", bad)])
        assert got == outcome(p.send_batch, tx, [(b"x", bad)]), bad


# ----------------------------------------------------------------------------- GSO / GRO


def gro_socket(family: int = socket.AF_INET, host: str = "127.0.0.1") -> socket.socket:
    s = udp(family, host)
    s.setsockopt(SOL_UDP, UDP_GRO, 1)
    return s


def raw_gro_receive(sock: socket.socket, timeout: float = 2.0) -> list[tuple[bytes, int]]:
    """``(data, gso_size)`` per read with plain socket calls (gso_size 0: not coalesced)."""
    out = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        select.select([sock], [], [], 0.1)
        try:
            data, anc, _flags, _addr = sock.recvmsg(65536, socket.CMSG_SPACE(4))
        except BlockingIOError:
            if out:
                break
            continue
        size = 0
        for level, kind, value in anc:
            if level == SOL_UDP and kind == UDP_GRO:
                size = int.from_bytes(value[:4], sys.byteorder)
        out.append((data, size))
    return out


@pytest.fixture
def gso_module() -> Iterator[ModuleType]:
    """The compiled module with its kernel-offload probe reset (``_reset_offload``, the
    module's test hook: a private reach, on purpose, here and below)."""
    c = compiled()
    c._reset_offload()
    if not c.features()["gso"]:
        pytest.skip("the kernel has no UDP GSO")
    yield c
    c._reset_offload()


def test_twin_reports_no_kernel_features(sockets: list[socket.socket]) -> None:
    assert _purepy.features() == {"recvmmsg": False, "sendmmsg": False, "gso": False, "gro": False}
    s = udp()
    sockets.append(s)
    assert _purepy.enable_gro(s) is False
    assert compiled().features()["recvmmsg"] is True


@pytest.mark.parametrize("family", FAMILIES)
def test_gso_sends_runs_as_one_buffer(
    gso_module: ModuleType, family: tuple[int, str], sockets: list[socket.socket]
) -> None:
    fam, host = family
    rx, tx = gro_socket(fam, host), udp(fam, host)
    sockets += [rx, tx]
    dest = rx.getsockname()
    payloads = [bytes([i]) * 1200 for i in range(40)] + [b"tail" * 100]
    assert gso_module.send_batch(tx, [(d, dest) for d in payloads]) == (41, 0)
    reads = raw_gro_receive(rx)
    # the kernel saw one GSO send (proof that UDP_SEGMENT was used) and kept it whole
    assert reads == [(b"".join(payloads), 1200)]


def test_gro_receive_splits_like_the_twin(
    gso_module: ModuleType, sockets: list[socket.socket]
) -> None:
    rx, tx = udp(), udp()
    sockets += [rx, tx]
    assert gso_module.enable_gro(rx) is True
    dest = rx.getsockname()
    rng = __import__("random").Random(3)
    payloads: list[bytes] = []
    for _ in range(60):  # runs of equal sizes with shorter tails, and singles
        size = rng.choice([1, 100, 1200, 1472])
        payloads += [rng.randbytes(size) for _ in range(rng.randint(1, 70))]
        if rng.random() < 0.5:
            payloads.append(rng.randbytes(rng.randint(1, size)))
    expected = [(d, tx.getsockname()) for d in payloads]
    got: list[Any] = []
    for pos in range(0, len(payloads), 300):
        chunk = [(d, dest) for d in payloads[pos : pos + 300]]
        assert gso_module.send_batch(tx, chunk) == (len(chunk), 0)
        got += drain(gso_module, rx, len(chunk))
    assert got == expected
    # and the twin, sending one by one to a plain socket, gives exactly the same list
    rx2 = udp()
    sockets.append(rx2)
    tx2 = udp()
    sockets.append(tx2)
    twin: list[Any] = []
    for pos in range(0, len(payloads), 300):
        chunk = [(d, rx2.getsockname()) for d in payloads[pos : pos + 300]]
        assert _purepy.send_batch(tx2, chunk) == (len(chunk), 0)
        twin += drain(_purepy, rx2, len(chunk))
    assert [d for d, _ in twin] == [d for d, _ in got]


def test_gso_runs_to_several_addresses(
    gso_module: ModuleType, sockets: list[socket.socket]
) -> None:
    rxs = [gro_socket() for _ in range(3)]
    tx = udp()
    sockets += [*rxs, tx]
    batch = []
    for i in range(400):
        dest = rxs[(i // 7) % 3].getsockname()  # runs of 7 to one address, then the next
        batch.append((bytes([i % 256]) * (1000 if i % 7 != 6 else 10), dest))
    assert gso_module.send_batch(tx, batch) == (400, 0)
    for rx in rxs:
        expected = [d for d, a in batch if a == rx.getsockname()]
        got = drain(gso_module, rx, len(expected))
        assert [d for d, _ in got] == expected


def test_gso_falls_back_when_the_kernel_refuses(
    gso_module: ModuleType, sockets: list[socket.socket], caplog: pytest.LogCaptureFixture
) -> None:
    rx, tx = gro_socket(), udp()
    sockets += [rx, tx]
    tx.setsockopt(socket.SOL_SOCKET, SO_NO_CHECK, 1)  # the kernel refuses GSO: EINVAL
    dest = rx.getsockname()
    payloads = [bytes([i]) * 1200 for i in range(20)]
    with caplog.at_level(logging.DEBUG, logger="qp2p._fastpath"):
        assert gso_module.send_batch(tx, [(d, dest) for d in payloads]) == (20, 0)
    assert gso_module.features()["gso"] is False  # remembered
    assert "GSO refused" in caplog.text
    reads = raw_gro_receive(rx)
    assert reads == [(d, 0) for d in payloads]  # sent one by one, nothing lost
    assert gso_module.send_batch(tx, [(d, dest) for d in payloads]) == (20, 0)
    assert raw_gro_receive(rx) == [(d, 0) for d in payloads]


def test_qp2p_no_gso_forces_plain_batches(
    gso_module: ModuleType, monkeypatch: pytest.MonkeyPatch, sockets: list[socket.socket]
) -> None:
    monkeypatch.setenv("QP2P_NO_GSO", "1")
    gso_module._reset_offload()
    assert gso_module.features() == {"recvmmsg": True, "sendmmsg": True, "gso": False, "gro": False}
    rx, tx = gro_socket(), udp()
    sockets += [rx, tx]
    assert gso_module.enable_gro(udp()) is False
    payloads = [bytes([i]) * 1200 for i in range(20)]
    assert gso_module.send_batch(tx, [(d, rx.getsockname()) for d in payloads]) == (20, 0)
    assert raw_gro_receive(rx) == [(d, 0) for d in payloads]
    # and at import time, in a fresh interpreter
    env = dict(os.environ, QP2P_NO_GSO="1", PYTHONPATH=pythonpath())
    out = subprocess.run(
        [sys.executable, "-c", "import qp2p._fastpath as f; print(f.features())"],
        env=env,
        cwd=CWD,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "'gso': False" in out and "'gro': False" in out


def test_gso_send_errors_counted_per_datagram(
    gso_module: ModuleType, sockets: list[socket.socket]
) -> None:
    # A run to an address the kernel refuses: each datagram is one error, like the twin.
    tx = udp()
    sockets.append(tx)
    batch = [(b"x" * 1000, ("127.0.0.1", 0))] * 5
    assert gso_module.send_batch(tx, batch) == (5, 5)
    assert _purepy.send_batch(tx, batch) == (5, 5)
    assert gso_module.features()["gso"] is True  # an address error is not a GSO problem


