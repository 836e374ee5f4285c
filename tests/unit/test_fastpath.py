"""The fast path: the compiled ``qp2p._fastpath`` and its twin ``qp2p._purepy``.

Every behaviour runs against both (fixture ``fp``, ids "cython" and "python"); property
tests feed both the same random inputs and demand identical results or identical
exceptions (type and message). No sockets here: the batched socket calls and GSO/GRO are
in ``tests/loopback/test_fastpath_sockets.py``. If the extension is not built the cython
cases fail: they never skip.
"""

from __future__ import annotations

import array
import mmap
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from qp2p import _purepy, _speedups
from qp2p.errors import ProtocolError
from tests.support.fastpath import both, compiled, outcome
from tests.support.frames import frame_header
from tests.support.paths import CWD, ROOT, pythonpath

MIB = 1 << 20


def feed_outcomes(mod: ModuleType, chunks: Sequence[bytes], limit: int, max_kind: int) -> list[Any]:
    asm = mod.FrameAssembler(limit, max_kind)
    out: list[Any] = []
    for i, chunk in enumerate(chunks):
        out.append(outcome(asm.feed, chunk, i == len(chunks) - 1))
        out.append(asm.buffered)
    return out


def split(data: bytes, cuts: Sequence[int]) -> list[bytes]:
    points = sorted(min(c, len(data)) for c in cuts)
    chunks, prev = [], 0
    for p in points:
        chunks.append(data[prev:p])
        prev = p
    chunks.append(data[prev:])
    return chunks


# ----------------------------------------------------------------------------- surface


def test_same_public_names() -> None:
    c, p = both()
    public = {n for n in dir(p) if not n.startswith("_")}
    assert {n for n in dir(c) if not n.startswith("_")} == public
    assert sorted(c.__all__) == sorted(p.__all__)
    assert set(p.__all__) <= public
    for cls in ("FrameAssembler", "ConnectionTable"):
        names_c = {n for n in dir(getattr(c, cls)) if not n.startswith("_")}
        names_p = {n for n in dir(getattr(p, cls)) if not n.startswith("_")}
        assert names_c == names_p, cls
    for name in c.__all__:
        assert getattr(c, name).__doc__ if callable(getattr(c, name)) else True, name
        assert getattr(p, name).__doc__ if callable(getattr(p, name)) else True, name


def test_constants(fp: ModuleType) -> None:
    assert fp.FRAME_HEADER_LEN == 16
    assert fp.WIRE_VERSION == 0x0002
    assert fp.KIND_USER == 0
    assert fp.MAX_KIND == 12


def test_select_switches_and_rejects_unknown_names() -> None:
    before = _speedups.implementation
    try:
        _speedups.select("python")
        assert _speedups.impl is _purepy and _speedups.implementation == "python"
        _speedups.select("cython")
        assert _speedups.impl is compiled() and _speedups.implementation == "cython"
        with pytest.raises(ValueError, match="unknown implementation"):
            _speedups.select("rust")
        assert _speedups.implementation == "cython"
    finally:
        _speedups.select(before)


@pytest.mark.parametrize(
    ("value", "expected"), [("1", "python"), ("yes", "python"), ("0", "cython"), ("", "cython")]
)
def test_qp2p_no_extensions_env(value: str, expected: str) -> None:
    env = dict(os.environ, QP2P_NO_EXTENSIONS=value, PYTHONPATH=pythonpath())
    code = "from qp2p import _speedups as s; print(s.implementation, s.impl.__name__)"
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True, cwd=CWD
    ).stdout.split()
    module = {"python": "qp2p._purepy", "cython": "qp2p._fastpath"}[expected]
    assert out == [expected, module]


def test_select_cython_when_not_built_raises_clear_import_error(tmp_path: Path) -> None:
    # A copy of the package without the extension module.
    shutil.copytree(ROOT / "qp2p", tmp_path / "qp2p", ignore=shutil.ignore_patterns("*.so"))
    code = (
        # an editable install can still map qp2p._fastpath to the source tree's build:
        # make the extension unimportable, as on a machine where it wasn't built
        "import sys\nsys.modules['qp2p._fastpath'] = None\n"
        "from qp2p import _speedups as s\n"
        "assert s.implementation == 'python', s.implementation\n"
        "try:\n    s.select('cython')\nexcept ImportError as e:\n    print(e)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    env.pop("QP2P_NO_EXTENSIONS", None)
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
    ).stdout
    assert "not available" in out and "build_ext" in out


# ----------------------------------------------------------------------------- encode


def test_encode_known_bytes(fp: ModuleType) -> None:
    frame = fp.encode_frame(b"hd", b"dst", b"payload!", 5)
    assert frame == (
        b"\x00\x02\x00\x00\x00\x02\x00\x00\x00\x03\x00\x00\x00\x08\x05\x00hddstpayload!"
    )
    assert fp.encode_frame(b"", b"", b"x") == frame_header(0, 0, 1) + b"x"
    # no policy in the encoder: empty payloads and any kind up to 255 are encodable
    assert fp.encode_frame(b"", b"", b"", 255) == frame_header(0, 0, 0, 255)


def test_encode_accepts_bytes_like(fp: ModuleType) -> None:
    words = array.array("H", [1, 2, 3])
    frame = fp.encode_frame(bytearray(b"ab"), memoryview(b"xyz")[1:], words)
    assert frame == frame_header(2, 2, 6) + b"ab" + b"yz" + words.tobytes()
    assert type(frame) is bytes


@pytest.mark.parametrize(
    ("args", "exc", "message"),
    [
        ((b"", b"", b"x", -1), ValueError, "frame kind must be in 0..255, got -1"),
        ((b"", b"", b"x", 256), ValueError, "frame kind must be in 0..255, got 256"),
        ((b"", b"", b"x", 1.0), TypeError, None),
        (("text", b"", b"x"), TypeError, None),
        ((b"", None, b"x"), TypeError, None),
        ((b"", b"", memoryview(b"abcdef")[::2]), TypeError, None),
    ],
)
def test_encode_errors_identical(args: tuple[Any, ...], exc: type, message: str | None) -> None:
    c, p = both()
    got = outcome(c.encode_frame, *args)
    assert got == outcome(p.encode_frame, *args)
    assert got[0] == "raised" and got[1] is exc
    if message is not None:
        assert got[2] == message


@pytest.mark.parametrize("position", ["header", "dst", "payload"])
def test_encode_rejects_parts_of_4_gib(position: str) -> None:
    c, p = both()
    big = mmap.mmap(-1, 1 << 32)  # virtual memory only: nothing is touched or copied
    try:
        view = memoryview(big)
        try:
            parts = {"header": b"", "dst": b"", "payload": b"x"}
            parts[position] = view  # type: ignore[assignment]
            args = (parts["header"], parts["dst"], parts["payload"])
            got = outcome(c.encode_frame, *args)
            assert got == outcome(p.encode_frame, *args)
            assert got == (
                "raised",
                ValueError,
                f"{position} of 4294967296 bytes is too long for a frame",
            )
        finally:
            view.release()
    finally:
        big.close()


# ----------------------------------------------------------------------------- decode

LIMIT = 16 * MIB
GOOD = frame_header(1, 2, 3, 4) + b"h" + b"dd" + b"ppp"

ERROR_CASES = [
    # (stream bytes, limit, max_kind, message)
    (frame_header(1, 2, 3, version=3) + b"hddppp", LIMIT, 7, "unsupported frame version 0x0003"),
    (
        frame_header(1, 2, 3, version=0x0100) + b"hddppp",
        LIMIT,
        7,
        "unsupported frame version 0x0100",
    ),
    (frame_header(1, 2, 3, kind=8) + b"hddppp", LIMIT, 7, "unknown frame kind 8"),
    (frame_header(1, 2, 3, kind=1) + b"hddppp", LIMIT, 0, "unknown frame kind 1"),
    (frame_header(1, 2, 3, reserved=9) + b"hddppp", LIMIT, 7, "reserved byte is 9, not 0"),
    (frame_header(1, 2, 3) + b"hddppp", 21, 7, "frame of 22 bytes exceeds the limit of 21"),
    (frame_header(4, 0, 0) + b"hhhh", LIMIT, 7, "empty payload"),
    (GOOD + b"!!", LIMIT, 7, "2 bytes after the end of the frame"),
    (GOOD[:-1], LIMIT, 7, "stream ended after 21 of 22 bytes"),
    (GOOD[:16], LIMIT, 7, "stream ended after 16 of 22 bytes"),
    (GOOD[:5], LIMIT, 7, "stream ended after 5 of 16 bytes"),
    (b"", LIMIT, 7, "stream ended after 0 of 16 bytes"),
]


def test_decode_good(fp: ModuleType) -> None:
    assert fp.decode_frame(GOOD, LIMIT) == (4, b"h", b"dd", b"ppp")
    assert fp.decode_frame(GOOD, 22) == (4, b"h", b"dd", b"ppp")  # the limit is inclusive
    assert fp.decode_frame(bytearray(GOOD), LIMIT) == (4, b"h", b"dd", b"ppp")
    assert fp.decode_frame(memoryview(GOOD), LIMIT, 4) == (4, b"h", b"dd", b"ppp")
    for part in fp.decode_frame(memoryview(GOOD), LIMIT)[1:]:
        assert type(part) is bytes


@pytest.mark.parametrize(("data", "limit", "max_kind", "message"), ERROR_CASES)
def test_decode_errors(
    fp: ModuleType, data: bytes, limit: int, max_kind: int, message: str
) -> None:
    with pytest.raises(ProtocolError) as info:
        fp.decode_frame(data, limit, max_kind)
    assert str(info.value) == message


@pytest.mark.parametrize(("data", "limit", "max_kind", "message"), ERROR_CASES)
@pytest.mark.parametrize("chunking", ["whole", "bytewise", "header-then-rest"])
def test_assembler_errors_and_stays_failed(
    fp: ModuleType, data: bytes, limit: int, max_kind: int, message: str, chunking: str
) -> None:
    if chunking == "whole":
        chunks = [data]
    elif chunking == "bytewise":
        chunks = [data[i : i + 1] for i in range(len(data))] or [b""]
    else:
        chunks = [data[:16], data[16:]]
    asm = fp.FrameAssembler(limit, max_kind)
    raised = None
    for i, chunk in enumerate(chunks):
        try:
            assert asm.feed(chunk, i == len(chunks) - 1) is None
        except ProtocolError as exc:
            raised = exc
            break
    if raised is None:  # all bytes in, no error yet: the end of the stream must tell
        with pytest.raises(ProtocolError) as info:
            asm.feed(b"", True)
        raised = info.value
    if "after the end" in message and chunking == "bytewise":
        assert str(raised) == "1 bytes after the end of the frame"
    else:
        assert str(raised) == message
    assert asm.buffered == 0
    for later in (b"", b"more", GOOD):
        with pytest.raises(ProtocolError) as again:
            asm.feed(later, True)
        assert str(again.value) == str(raised)


def test_header_claiming_2_gib_fails_after_16_bytes(fp: ModuleType) -> None:
    head = frame_header(0, 0, 1 << 31)
    asm = fp.FrameAssembler(16 * MIB)
    for i in range(15):
        assert asm.feed(head[i : i + 1], False) is None
        assert asm.buffered == i + 1
    with pytest.raises(
        ProtocolError, match=r"^frame of 2147483664 bytes exceeds the limit of 16777216$"
    ):
        asm.feed(head[15:] + b"x" * 100, False)
    assert asm.buffered == 0
    with pytest.raises(ProtocolError, match="exceeds the limit"):
        asm.feed(b"x" * 1000, False)
    assert asm.buffered == 0
    # the largest claim a header can make
    asm = fp.FrameAssembler(16 * MIB)
    with pytest.raises(ProtocolError, match=r"^frame of 12884901901 bytes exceeds"):
        asm.feed(frame_header(2**32 - 1, 2**32 - 1, 2**32 - 1), False)


def test_assembler_16_mib_in_1_kib_chunks(fp: ModuleType) -> None:
    payload = os.urandom(16 * MIB - 64)
    frame = fp.encode_frame(b"H" * 30, b"D" * 18, payload)
    assert len(frame) == 16 * MIB
    asm = fp.FrameAssembler(16 * MIB)
    start = time.perf_counter()
    for pos in range(0, len(frame), 1024):
        assert asm.feed(frame[pos : pos + 1024], False) is None
        assert asm.buffered == min(pos + 1024, len(frame))
    result = asm.feed(b"", True)
    elapsed = time.perf_counter() - start
    assert result == (0, b"H" * 30, b"D" * 18, payload)
    assert asm.buffered == 0
    assert elapsed < 10, "feeding must stay linear"


def test_assembler_fin_and_after_the_end(fp: ModuleType) -> None:
    asm = fp.FrameAssembler(LIMIT)
    assert asm.feed(GOOD, False) is None  # complete, but the stream has not ended
    assert asm.buffered == len(GOOD)
    assert asm.feed(b"", True) == (4, b"h", b"dd", b"ppp")
    assert asm.buffered == 0
    assert asm.feed(b"", True) is None  # an empty end-of-stream repeat is harmless
    with pytest.raises(ProtocolError, match=r"^3 bytes after the end of the frame$"):
        asm.feed(b"abc", False)
    # bytes after a complete frame, before the end of the stream
    asm = fp.FrameAssembler(LIMIT)
    assert asm.feed(GOOD, False) is None
    with pytest.raises(ProtocolError, match=r"^5 bytes after the end of the frame$"):
        asm.feed(b"12345", True)
    # a frame whose header and dst are empty
    asm = fp.FrameAssembler(LIMIT)
    frame = fp.encode_frame(b"", b"", b"only payload", 7)
    assert asm.feed(frame[:3], False) is None
    assert asm.feed(frame[3:20], False) is None
    assert asm.feed(frame[20:], True) == (7, b"", b"", b"only payload")


def test_assembler_accepts_bytes_like(fp: ModuleType) -> None:
    asm = fp.FrameAssembler(LIMIT)
    source = bytearray(GOOD)
    assert asm.feed(source[:10], False) is None
    assert asm.feed(memoryview(source)[10:19], False) is None
    assert asm.feed(array.array("B", source[19:]), True) == (4, b"h", b"dd", b"ppp")


@pytest.mark.parametrize(
    ("args", "exc", "message"),
    [
        ((-1,), ValueError, "max_message_size must not be negative, got -1"),
        ((100, 256), ValueError, "max_kind must be in 0..255, got 256"),
        ((100, -1), ValueError, "max_kind must be in 0..255, got -1"),
        (("100",), TypeError, None),
        ((100, 2.0), TypeError, None),
    ],
)
def test_limits_validated_identically(
    args: tuple[Any, ...], exc: type, message: str | None
) -> None:
    c, p = both()
    for make in (lambda m, *a: m.FrameAssembler(*a), lambda m, *a: m.decode_frame(GOOD, *a)):
        got = outcome(make, c, *args)
        assert got == outcome(make, p, *args)
        assert got[0] == "raised" and got[1] is exc
        if message is not None:
            assert got[2] == message


def test_huge_limit_is_no_limit(fp: ModuleType) -> None:
    assert fp.decode_frame(GOOD, 1 << 80) == (4, b"h", b"dd", b"ppp")
    asm = fp.FrameAssembler(1 << 80)
    with pytest.raises(ProtocolError, match=r"^stream ended after 16 of 12884901901 bytes$"):
        asm.feed(frame_header(2**32 - 1, 2**32 - 1, 2**32 - 1), True)


# ----------------------------------------------------------------------------- properties

parts = st.binary(max_size=64)
kinds = st.integers(0, 7)
limits = st.one_of(st.integers(0, 300), st.just(LIMIT))


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    return _purepy.encode_frame(
        draw(parts), draw(parts), draw(st.binary(min_size=1, max_size=200)), draw(kinds)
    )


@st.composite
def damaged_frames(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(frames()))
    for _ in range(draw(st.integers(0, 3))):
        pos = draw(st.integers(0, len(data) - 1))
        data[pos] = draw(st.integers(0, 255))
    how = draw(st.sampled_from(["keep", "cut", "extend"]))
    if how == "cut":
        del data[draw(st.integers(0, len(data))) :]
    elif how == "extend":
        data += draw(st.binary(min_size=1, max_size=20))
    return bytes(data)


@st.composite
def plausible_headers(draw: st.DrawFn) -> bytes:
    """Version 2, random lengths, kinds and reserved bytes, then a random body."""
    lengths = st.one_of(st.integers(0, 40), st.integers(0, 2**32 - 1))
    head = frame_header(
        draw(lengths),
        draw(lengths),
        draw(lengths),
        draw(st.one_of(kinds, st.integers(0, 255))),
        2,
        draw(st.sampled_from([0, 0, 0, 1, 255])),
    )
    return head + draw(st.binary(max_size=120))


streams = st.one_of(frames(), damaged_frames(), plausible_headers(), st.binary(max_size=80))
cuts = st.lists(st.integers(0, 400), max_size=12)
PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPS
@given(parts, parts, st.binary(min_size=1, max_size=300), st.integers(0, 255), cuts)
def test_round_trip_identical(
    header: bytes, dst: bytes, payload: bytes, kind: int, cut: list[int]
) -> None:
    c, p = both()
    frame = p.encode_frame(header, dst, payload, kind)
    assert c.encode_frame(header, dst, payload, kind) == frame
    assert c.encode_frame(bytearray(header), memoryview(dst), bytearray(payload), kind) == frame
    expected = (kind, header, dst, payload)
    for mod in (c, p):
        assert mod.decode_frame(frame, len(frame), 255) == expected
        asm = mod.FrameAssembler(len(frame), 255)
        chunks = split(frame, cut)
        results = [asm.feed(ch, i == len(chunks) - 1) for i, ch in enumerate(chunks)]
        assert results[:-1] == [None] * (len(chunks) - 1)
        assert results[-1] == expected


@PROPS
@given(streams, limits, kinds)
def test_decode_identical_on_anything(data: bytes, limit: int, max_kind: int) -> None:
    c, p = both()
    got = outcome(c.decode_frame, data, limit, max_kind)
    assert got == outcome(p.decode_frame, data, limit, max_kind)
    if got[0] == "raised":
        assert got[1] is ProtocolError


@PROPS
@given(streams, cuts, limits, kinds)
def test_feed_identical_on_any_chunking(
    data: bytes, cut: list[int], limit: int, max_kind: int
) -> None:
    c, p = both()
    chunks = split(data, cut)
    got = feed_outcomes(c, chunks, limit, max_kind)
    assert got == feed_outcomes(p, chunks, limit, max_kind)
    # the result of a successful stream never depends on the chunking
    final = got[-2]
    whole = outcome(p.decode_frame, data, limit, max_kind)
    if final[0] == "ok" or whole[0] == "ok":
        assert final == whole


# ----------------------------------------------------------------------------- DCIDs


def long_header(cid: bytes, rest: bytes = b"\x00" * 20) -> bytes:
    return bytes([0xC3, 0, 0, 0, 1, len(cid)]) + cid + rest


@pytest.mark.parametrize(
    ("datagram", "short_len", "expected"),
    [
        (b"", 8, None),
        (b"\x40", 0, b""),
        (b"\x40" + bytes(range(8)), 8, bytes(range(8))),
        (b"\x40" + bytes(range(7)), 8, None),
        (b"\x40" + bytes(range(30)), 8, bytes(range(8))),
        (b"\xc0\x00\x00\x00", 8, None),
        (b"\xc0\x00\x00\x00\x01", 8, None),
        (b"\xc0\x00\x00\x00\x01\x00", 8, b""),
        (long_header(b"ABCD"), 8, b"ABCD"),
        (long_header(bytes(20)), 8, bytes(20)),
        (long_header(bytes(21)), 8, None),
        (long_header(b"ABCD", b"")[:-1], 8, None),
        (long_header(b"ABCD", b""), 8, b"ABCD"),
    ],
)
def test_parse_dcid(
    fp: ModuleType, datagram: bytes, short_len: int, expected: bytes | None
) -> None:
    assert fp.parse_dcid(datagram, short_len) == expected
    assert fp.parse_dcid(bytearray(datagram), short_len) == expected
    assert fp.parse_dcid(memoryview(datagram), short_len) == expected
    got = fp.parse_dcid(memoryview(datagram), short_len)
    assert got is None or type(got) is bytes


def test_cid_len_validated_identically() -> None:
    c, p = both()
    for bad in (-1, 21, "8", 8.0):
        for call in (lambda m, n: m.parse_dcid(b"\x40" * 9, n), lambda m, n: m.ConnectionTable(n)):
            got = outcome(call, c, bad)
            assert got == outcome(call, p, bad)
            assert got[0] == "raised"
    assert outcome(c.parse_dcid, b"\x40", 21)[2] == "short_cid_len must be in 0..20, got 21"


@PROPS
@given(
    st.one_of(st.binary(max_size=40), st.builds(long_header, st.binary(max_size=25))),
    st.integers(0, 20),
)
def test_parse_dcid_identical(datagram: bytes, short_len: int) -> None:
    c, p = both()
    assert outcome(c.parse_dcid, datagram, short_len) == outcome(p.parse_dcid, datagram, short_len)


# ----------------------------------------------------------------------------- receipts


def test_receipt_known_bytes(fp: ModuleType) -> None:
    # QUIC varints (RFC 9000 §16): 1, 2, 4 and 8 bytes
    assert fp.encode_receipt(2, 0) == b"\x02\x00"
    assert fp.encode_receipt(1002, 0x71_70_03) == b"\x43\xea\x80\x71\x70\x03"
    assert fp.encode_receipt(2**62 - 1, 63) == b"\xff" * 8 + b"\x3f"
    entries = [(2, 0), (1002, 0x71_70_03), (2**62 - 1, 63)]
    payload = b"".join(fp.encode_receipt(sid, code) for sid, code in entries)
    for form in (payload, bytearray(payload), memoryview(payload)):
        assert fp.parse_receipts(form) == entries
    assert fp.parse_receipts(b"") == []
    for bad in (b"\x02", b"\x40", b"\x02\x00\x80\x00\x00", b"\xc0" + bytes(6)):
        with pytest.raises(ProtocolError, match="truncated receipt"):
            fp.parse_receipts(bad)


def test_receipt_errors_identical() -> None:
    c, p = both()
    for bad in (-1, 2**62, "1", 1.0):
        for args in ((bad, 0), (0, bad)):
            got = outcome(c.encode_receipt, *args)
            assert got == outcome(p.encode_receipt, *args)
            assert got[0] == "raised"
    assert outcome(c.encode_receipt, 2**62, 0)[2] == "stream id must be in 0..2**62-1, got " + str(
        2**62
    )
    for bad in ("ab", 5, None):
        assert outcome(c.parse_receipts, bad) == outcome(p.parse_receipts, bad)


varint = st.one_of(st.integers(0, 63), st.integers(0, 2**14 - 1), st.integers(0, 2**30 - 1),
                   st.integers(0, 2**62 - 1))


@PROPS
@given(st.lists(st.tuples(varint, varint), max_size=8), st.integers(0, 80))
def test_receipts_round_trip_identical(entries: list[tuple[int, int]], cut: int) -> None:
    c, p = both()
    payload = b"".join(c.encode_receipt(sid, code) for sid, code in entries)
    assert payload == b"".join(p.encode_receipt(sid, code) for sid, code in entries)
    assert c.parse_receipts(payload) == p.parse_receipts(payload) == entries
    assert outcome(c.parse_receipts, payload[:cut]) == outcome(p.parse_receipts, payload[:cut])


@PROPS
@given(st.binary(max_size=40))
def test_parse_receipts_identical_on_anything(data: bytes) -> None:
    c, p = both()
    assert outcome(c.parse_receipts, data) == outcome(p.parse_receipts, data)


def test_connection_table(fp: ModuleType) -> None:
    table = fp.ConnectionTable(8)
    assert len(table) == 0
    a, b = object(), object()
    table.add(b"AAAAAAAA", a)
    table.add(b"BBBB", b)
    assert len(table) == 2 and b"AAAAAAAA" in table and b"CCCC" not in table
    assert table.get(b"AAAAAAAA") is a and table.get(b"none") is None
    assert table.lookup(b"\x41AAAAAAAA rest of a short header packet") is a
    assert table.lookup(long_header(b"BBBB")) is b
    assert table.lookup(long_header(b"AAAAAAAA")) is a
    assert table.lookup(memoryview(long_header(b"BBBB"))) is b
    assert table.lookup(b"\x41AAAA") is None
    assert table.lookup(b"") is None
    assert table.lookup(long_header(b"CCCC")) is None
    table.add(b"BBBB", a)
    assert table.get(b"BBBB") is a
    table.remove(b"BBBB")
    table.remove(b"BBBB")  # missing: no error
    assert len(table) == 1 and table.lookup(long_header(b"BBBB")) is None
    assert 42 not in table


@PROPS
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["add", "remove", "get", "lookup", "contains", "len"]),
            st.binary(min_size=0, max_size=10),
            st.integers(0, 3),
        ),
        max_size=40,
    ),
    st.integers(0, 10),
)
def test_connection_table_identical(ops: list[tuple[str, bytes, int]], short_len: int) -> None:
    c, p = both()
    tables = [c.ConnectionTable(short_len), p.ConnectionTable(short_len)]
    for op, cid, value in ops:
        results = []
        for t in tables:
            if op == "add":
                results.append(t.add(cid, value))
            elif op == "remove":
                results.append(t.remove(cid))
            elif op == "get":
                results.append(t.get(cid))
            elif op == "lookup":
                results.append(t.lookup(bytes([0x40]) + cid))
                results.append(t.lookup(long_header(cid)))
            elif op == "contains":
                results.append(cid in t)
            else:
                results.append(len(t))
        assert results[: len(results) // 2] == results[len(results) // 2 :]



def test_stub_matches_module() -> None:
    stub = (ROOT / "qp2p" / "_fastpath.pyi").read_text()
    for name in compiled().__all__:
        assert name in stub
    proc = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "qp2p._fastpath", "--ignore-missing-stub"],
        capture_output=True,
        text=True,
        cwd=CWD,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
