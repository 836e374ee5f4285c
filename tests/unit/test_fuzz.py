"""Fuzzing the wire parsers: frames and datagrams, on both fast-path implementations.

Goes beyond the property tests in ``test_fastpath.py`` (which compare the twins on
frames with a few damaged bytes, fin always on the last chunk): here streams are
mutated harder (bit flips, field rewrites, huge claimed lengths, inserted and deleted
bytes), chunked with empty pieces, fin missing, early or repeated, fed as any
bytes-like type, and checked against oracles that hold for *both* implementations:

- only ``ProtocolError`` ever escapes, and a failed assembler stays failed;
- ``buffered`` is exactly what was fed while the frame is open, 0 after;
- every error (and result) is what ``decode_frame`` says about the bytes fed so far,
  and a header error is raised as soon as the 16 header bytes are in;
- nothing is allocated for what a header merely claims (tracemalloc);
- compiled and twin give identical traces (results, error messages, ``buffered``).

Datagrams (random bytes and mutations of real aioquic packets) go through
``ConnectionTable.lookup`` and ``engine._aioquic.parse_long_header``. No sockets here: the
same junk, and client Initials sealed around a damaged ClientHello, go over real UDP to a
live endpoint in ``tests/loopback/test_fuzz_udp.py``.
"""

from __future__ import annotations

import array
import re
import tracemalloc
from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import pytest
from aioquic.buffer import Buffer
from aioquic.quic.packet import pull_quic_header
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from qp2p import _fastpath, _purepy, engine
from qp2p.engine import _aioquic
from qp2p.errors import ProtocolError
from tests.support.frames import frame_header
from tests.support.packets import captured, initial_plaintext, sealed_initial

IMPLS = (_fastpath, _purepy)
KIB = 1 << 10
MIB = 1 << 20
GIB = 1 << 30
# Examples per property: enough to matter in the default suite, small enough that the
# whole file stays quick (fuzz/ runs the long, coverage-guided campaign).
FUZZ = settings(
    max_examples=300,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# ----------------------------------------------------------------------------- streams

# Header fields: (offset, size) in the 16-byte frame header.
FIELDS = {"version": (0, 2), "lh": (2, 4), "ld": (6, 4), "lp": (10, 4), "kind": (14, 1),
          "reserved": (15, 1)}
lengths = st.one_of(
    st.integers(0, 80),
    st.sampled_from([2**16, 2**31, 2**32 - 2, 2**32 - 1]),
    st.integers(0, 2**32 - 1),
)
field_values = {
    "version": st.one_of(st.just(2), st.integers(0, 0xFFFF)),
    "lh": lengths,
    "ld": lengths,
    "lp": lengths,
    "kind": st.integers(0, 255),
    "reserved": st.one_of(st.just(0), st.integers(0, 255)),
}
Op = tuple[Any, ...]
ops = st.one_of(
    st.tuples(st.just("flip"), st.integers(0, 4096), st.integers(0, 7)),
    st.tuples(st.just("set"), st.integers(0, 4096), st.integers(0, 255)),
    st.tuples(st.just("truncate"), st.integers(0, 4096)),
    st.tuples(st.just("extend"), st.binary(min_size=1, max_size=40)),
    st.tuples(st.just("insert"), st.integers(0, 4096), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("delete"), st.integers(0, 4096), st.integers(1, 8)),
    st.sampled_from(sorted(FIELDS)).flatmap(
        lambda name: st.tuples(st.just("field"), st.just(name), field_values[name])
    ),
)


def mutate(data: bytes, edits: Sequence[Op]) -> bytes:
    """Apply edits in order; positions wrap around the current length."""
    buf = bytearray(data)
    for op in edits:
        kind = op[0]
        if kind == "extend":
            buf += op[1]
        elif kind == "field":
            offset, size = FIELDS[op[1]]
            if len(buf) < 16:
                buf += bytes(16 - len(buf))
            buf[offset : offset + size] = op[2].to_bytes(size, "big")
        elif not buf:
            continue
        elif kind == "flip":
            buf[op[1] % len(buf)] ^= 1 << op[2]
        elif kind == "set":
            buf[op[1] % len(buf)] = op[2]
        elif kind == "truncate":
            del buf[op[1] % len(buf) :]
        elif kind == "insert":
            pos = op[1] % (len(buf) + 1)
            buf[pos:pos] = op[2]
        elif kind == "delete":
            pos = op[1] % len(buf)
            del buf[pos : pos + op[2]]
    return bytes(buf)


@st.composite
def valid_frames(draw: st.DrawFn) -> bytes:
    return _purepy.encode_frame(
        draw(st.binary(max_size=64)),
        draw(st.binary(max_size=64)),
        draw(st.binary(min_size=1, max_size=300)),
        draw(st.one_of(st.integers(0, 7), st.integers(0, 255))),
    )


@st.composite
def claiming_headers(draw: st.DrawFn) -> bytes:
    """A well-formed header that claims a lot (up to 12 GiB), then some body."""
    head = frame_header(draw(lengths), draw(lengths), draw(lengths), draw(st.integers(0, 7)))
    return head + draw(st.binary(max_size=600))


# Weighted towards frames that get past the header (pure noise fails at the version).
streams = st.one_of(
    valid_frames(),
    valid_frames(),
    # a frame and a byte or three more: the off-by-one boundary of "after the end"
    st.builds(bytes.__add__, valid_frames(), st.binary(min_size=1, max_size=3)),
    st.builds(mutate, valid_frames(), st.lists(ops, min_size=1, max_size=5)),
    st.builds(mutate, valid_frames(), st.lists(ops, min_size=1, max_size=5)),
    st.builds(mutate, claiming_headers(), st.lists(ops, max_size=2)),
    st.binary(max_size=200),
)
limits = st.one_of(st.integers(0, 400), st.just(16 * MIB), st.just(1 << 40), st.just(1 << 80))


def limits_for(stream: bytes) -> st.SearchStrategy[int]:
    """Any limit, or one at the boundary of what the stream's header claims."""
    if len(stream) < 16:
        return limits
    claimed = 16 + sum(int.from_bytes(stream[i : i + 4], "big") for i in (2, 6, 10))
    return st.one_of(limits, st.sampled_from([claimed - 1, claimed, claimed + 1]))


max_kinds = st.one_of(st.just(7), st.integers(0, 255))

# How each piece is handed over: the assembler must treat all bytes-like objects alike.
WRAPS: dict[str, Callable[[bytes], Any]] = {
    "bytes": bytes,
    "bytearray": bytearray,
    "memoryview": lambda b: memoryview(b"<<" + b + b">>")[2 : 2 + len(b)],
    "array": lambda b: array.array("B", b),
}
Feed = tuple[bytes, bool, str]


@st.composite
def feed_plans(draw: st.DrawFn, data: bytes) -> list[Feed]:
    """Split ``data`` at random points (empty pieces included), choose where fin goes
    (last piece, nowhere, or anywhere, even several times) and append a few late feeds."""
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=12)))
    pieces, prev = [], 0
    for cut in cuts:
        pieces.append(data[prev:cut])
        prev = cut
    pieces.append(data[prev:])
    mode = draw(st.sampled_from(["last", "last", "never", "anywhere"]))
    if mode == "last":
        fins = [False] * (len(pieces) - 1) + [True]
    elif mode == "never":
        fins = [False] * len(pieces)
    else:
        fins = draw(st.lists(st.booleans(), min_size=len(pieces), max_size=len(pieces)))
    late = draw(st.lists(st.tuples(st.sampled_from([b"", b"x", b"x", b"late bytes"]),
                                   st.booleans()), max_size=3))
    plan = list(zip(pieces, fins, strict=True)) + late
    wraps = draw(st.lists(st.sampled_from(sorted(WRAPS)), min_size=len(plan),
                          max_size=len(plan)))
    return [(piece, fin, wrap) for (piece, fin), wrap in zip(plan, wraps, strict=True)]


def decode_outcome(mod: ModuleType, data: bytes, limit: int, max_kind: int) -> tuple[Any, ...]:
    try:
        return ("ok", mod.decode_frame(data, limit, max_kind))
    except ProtocolError as exc:
        assert type(exc) is ProtocolError
        return ("raised", str(exc))


def run_assembler(
    mod: ModuleType, plan: Sequence[Feed], limit: int, max_kind: int
) -> list[tuple[Any, ...]]:
    """Feed ``plan`` to one implementation, checking the oracles after every feed; the
    trace (outcome and ``buffered`` per feed) is returned for the cross-check.

    Any exception other than ``ProtocolError`` escapes and fails the test.
    """
    asm = mod.FrameAssembler(limit, max_kind)
    assert asm.buffered == 0
    trace: list[tuple[Any, ...]] = []
    fed = b""
    state = "open"  # "open", "done" (frame returned) or the error message once failed
    for piece, fin, wrap in plan:
        try:
            outcome: tuple[Any, ...] = ("ok", asm.feed(WRAPS[wrap](piece), fin))
        except ProtocolError as exc:
            assert type(exc) is ProtocolError
            outcome = ("raised", str(exc))
        fed += piece
        buffered = asm.buffered
        trace.append((outcome, buffered))
        assert type(buffered) is int and 0 <= buffered <= len(fed)
        if state not in ("open", "done"):  # failed: the same error for ever, nothing held
            assert outcome == ("raised", state)
            assert buffered == 0
            continue
        if state == "done":  # after the frame, only empty pieces are harmless
            if piece:
                assert outcome == ("raised", f"{len(piece)} bytes after the end of the frame")
                state = outcome[1]
            else:
                assert outcome == ("ok", None)
            assert buffered == 0
            continue
        whole = decode_outcome(mod, fed, limit, max_kind)
        if outcome[0] == "raised":
            # every error is decode_frame's verdict on the bytes fed so far
            assert whole == outcome, (whole, outcome)
            assert buffered == 0
            state = outcome[1]
        elif outcome[1] is not None:
            kind, header, dst, payload = result = outcome[1]
            assert fin
            assert type(kind) is int
            assert (type(header), type(dst), type(payload)) == (bytes, bytes, bytes)
            assert whole == ("ok", result)
            assert mod.encode_frame(header, dst, payload, kind) == fed
            assert buffered == 0
            state = "done"
        else:
            # still open: the end of the stream has not come, every byte fed is held,
            # and nothing seen so far is already known to be broken
            assert not fin
            assert buffered == len(fed)
            assert whole[0] == "ok" or whole[1].startswith("stream ended after"), whole
    return trace


@settings(FUZZ, max_examples=600)
@given(st.data(), streams, max_kinds)
def test_assembler_fuzzed_streams_any_chunking(
    data: st.DataObject, stream: bytes, max_kind: int
) -> None:
    limit = data.draw(limits_for(stream))
    plan = data.draw(feed_plans(stream))
    traces = [run_assembler(mod, plan, limit, max_kind) for mod in IMPLS]
    assert traces[0] == traces[1]
    outcomes = [outcome for outcome, _ in traces[0]]
    if any(o[0] == "ok" and o[1] is not None for o in outcomes):
        event("a frame was returned")
    for o in outcomes:
        if o[0] == "raised":
            event("failed: " + re.sub(r"\d+", "N", o[1]))
            break


@FUZZ
@given(st.data(), streams, max_kinds, st.sampled_from(sorted(WRAPS)))
def test_decode_fuzzed_streams_identical(
    data: st.DataObject, stream: bytes, max_kind: int, wrap: str
) -> None:
    limit = data.draw(limits_for(stream))
    got = [decode_outcome(mod, WRAPS[wrap](stream), limit, max_kind) for mod in IMPLS]
    assert got[0] == got[1]
    assert got[0] == decode_outcome(_purepy, stream, limit, max_kind)  # any bytes-like alike
    if got[0][0] == "ok":
        kind, header, dst, payload = got[0][1]
        assert _purepy.encode_frame(header, dst, payload, kind) == stream


def test_oracle_catches_a_lenient_assembler() -> None:
    """The oracles in ``run_assembler`` are live: an assembler that accepts trailing
    bytes silently (a plausible bug) is caught."""

    class Lenient:
        def __init__(self, limit: int, max_kind: int) -> None:
            self.inner = _purepy.FrameAssembler(limit, max_kind)

        def feed(self, data: Any, fin: bool) -> Any:
            try:
                return self.inner.feed(data, fin)
            except ProtocolError as exc:
                if "after the end" in str(exc):
                    return None
                raise

        @property
        def buffered(self) -> int:
            return self.inner.buffered

    fake = ModuleType("lenient")
    fake.FrameAssembler = Lenient  # type: ignore[attr-defined]
    fake.decode_frame = _purepy.decode_frame  # type: ignore[attr-defined]
    fake.encode_frame = _purepy.encode_frame  # type: ignore[attr-defined]
    frame = _purepy.encode_frame(b"h", b"d", b"p")
    plan = [(frame, False, "bytes"), (b"junk", True, "bytes")]
    run_assembler(_purepy, plan, 100, 7)
    with pytest.raises(AssertionError):
        run_assembler(fake, plan, 100, 7)


# ----------------------------------------------------------------------------- memory


def traced_peak(action: Callable[[], Any]) -> int:
    """Peak bytes traced by tracemalloc while ``action`` runs."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        action()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("mod", IMPLS, ids=["cython", "python"])
@pytest.mark.parametrize(
    "claim", [(0, 0, 4 * GIB - 1), (4 * GIB - 1, 4 * GIB - 1, 4 * GIB - 1)], ids=["4GiB", "12GiB"]
)
def test_huge_claims_allocate_only_what_arrived(mod: ModuleType, claim: tuple[int, ...]) -> None:
    head = frame_header(*claim)
    asm = mod.FrameAssembler(1 << 40)  # no limit: only arrival may cost memory

    def header_only() -> None:
        for i in range(16):
            assert asm.feed(head[i : i + 1], False) is None

    assert traced_peak(header_only) < 16 * KIB
    assert asm.buffered == 16
    # the body drips in: memory follows what arrived (geometric growth at most doubles
    # it), never what the header claims
    fed = MIB

    def drip() -> None:
        for _ in range(fed // 4096):
            # a fresh object per piece, as from the network (the twin keeps references)
            assert asm.feed(bytes(4096), False) is None

    peak = traced_peak(drip)
    assert asm.buffered == 16 + fed
    assert fed <= peak < 3 * fed + 256 * KIB  # the lower bound proves the tracing sees it
    with pytest.raises(ProtocolError, match=r"^stream ended after 1048592 of \d+ bytes$"):
        asm.feed(b"", True)
    assert asm.buffered == 0
    # decoding a whole "frame" that claims gigabytes allocates nothing either
    data = head + bytes(4096)

    def decode() -> None:
        with pytest.raises(ProtocolError, match="stream ended after 4112 of"):
            mod.decode_frame(data, 1 << 40)

    assert traced_peak(decode) < 16 * KIB


@settings(max_examples=40, deadline=None)
@given(
    st.tuples(lengths, lengths, st.integers(GIB, 4 * GIB - 1)),
    st.lists(st.integers(0, 20_000), max_size=8),
)
def test_fuzzed_claims_memory_follows_arrival(claim: tuple[int, ...], sizes: list[int]) -> None:
    head = frame_header(*claim)
    fed = sum(sizes)
    for mod in IMPLS:
        asm = mod.FrameAssembler(1 << 40)

        def feed_all(asm: Any = asm) -> None:
            assert asm.feed(head, False) is None
            for size in sizes:
                assert asm.feed(bytes(size), False) is None

        peak = traced_peak(feed_all)
        assert asm.buffered == 16 + fed
        # at most a 1 KiB starting buffer per segment plus geometric slack
        assert peak < 3 * fed + 3 * KIB + 32 * KIB, (mod.__name__, peak, fed)


@pytest.mark.parametrize("mod", IMPLS, ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_many_streams_of_a_few_bytes_cost_a_few_bytes_each(mod: ModuleType) -> None:
    """A peer opening hundreds of streams that each send a header claiming a large
    message and one byte of it makes us allocate about that, not a buffer per claim."""
    head = frame_header(0, 0, 16 * 2**20)
    assemblers: list[Any] = []

    def open_streams() -> None:
        for _ in range(300):
            asm = mod.FrameAssembler(1 << 40)
            assert asm.feed(head, False) is None
            assert asm.feed(b"x", False) is None
            assemblers.append(asm)

    peak = traced_peak(open_streams)
    assert peak < 300 * 2 * KIB, (mod.__name__, peak)


# ----------------------------------------------------------------------------- datagrams


@st.composite
def datagrams(draw: st.DrawFn) -> bytes:
    cap = captured()
    how = draw(st.sampled_from(["random", "mutated", "mutated", "shaped"]))
    if how == "random":
        return draw(st.binary(max_size=1500))
    if how == "mutated":
        base = draw(st.sampled_from(cap.datagrams))
        return mutate(base, draw(st.lists(ops, min_size=1, max_size=4)))
    # long/short header shapes with random fields: the DCID length byte, versions, CIDs
    first = draw(st.one_of(st.sampled_from([0xC0, 0xC3, 0xD0, 0xE0, 0xF0, 0x40, 0x80, 0x00]),
                           st.integers(0, 255)))
    version = draw(st.sampled_from([0, 1, 0x6B3343CF, 0x1A2A3A4A, 0xFFFFFFFF]))
    dcid = draw(st.one_of(st.sampled_from(cap.cids), st.binary(max_size=24)))
    dcid_len = draw(st.one_of(st.just(len(dcid)), st.integers(0, 255)))
    rest = draw(st.binary(max_size=64))
    return bytes([first]) + version.to_bytes(4, "big") + bytes([dcid_len]) + dcid + rest


def reference_dcid(data: bytes, short_cid_len: int) -> bytes | None:
    """RFC 8999's invariants, written out independently of both implementations."""
    if not data:
        return None
    if data[0] & 0x80:
        if len(data) < 6 or data[5] > 20 or len(data) < 6 + data[5]:
            return None
        return data[6 : 6 + data[5]]
    return data[1 : 1 + short_cid_len] if len(data) >= 1 + short_cid_len else None


@FUZZ
@given(datagrams(), st.one_of(st.just(engine.CID_LENGTH), st.integers(0, 20)),
       st.lists(st.binary(max_size=20), max_size=4))
def test_lookup_fuzzed_datagrams_identical(
    datagram: bytes, short_cid_len: int, extra_cids: list[bytes]
) -> None:
    expected_cid = reference_dcid(datagram, short_cid_len)
    cids = [*captured().cids, *extra_cids]
    if expected_cid is not None and len(extra_cids) % 2:  # the datagram's ID known, or not
        cids.append(expected_cid)
    known = {cid: f"conn-{i}" for i, cid in enumerate(cids)}
    expected = None if expected_cid is None else known.get(expected_cid)
    for mod in IMPLS:
        table = mod.ConnectionTable(short_cid_len)
        for cid, value in known.items():
            table.add(cid, value)
        assert mod.parse_dcid(datagram, short_cid_len) == expected_cid
        for wrap in WRAPS.values():
            assert table.lookup(wrap(datagram)) == expected
        assert len(table) == len(known)


@FUZZ
@given(datagrams())
def test_parse_long_header_fuzzed_datagrams(datagram: bytes) -> None:
    header = _aioquic.parse_long_header(datagram)  # any exception fails the test
    if header is None:
        return
    assert isinstance(header, engine.LongHeader)
    assert all(type(v) is bytes for v in (header.dcid, header.scid, header.token))
    if header.version is None:  # short header: the DCID has our length
        assert not header.is_initial
        assert header.dcid == datagram[1 : 1 + engine.CID_LENGTH]
        assert len(header.dcid) == engine.CID_LENGTH
    else:
        assert datagram[0] & 0x80
        assert header.version == int.from_bytes(datagram[1:5], "big") != 0
        if header.version in _aioquic.supported_versions():
            assert header.dcid == reference_dcid(datagram, engine.CID_LENGTH)
        else:  # RFC 8999: an unknown version's connection IDs may be up to 255 bytes
            assert header.dcid == datagram[6 : 6 + datagram[5]]
            assert not header.is_initial


def test_captured_packets_parse() -> None:
    """The capture really holds parsable Initials and short headers (else the mutations
    above would start from nothing real)."""
    cap = captured()
    parsed = [_aioquic.parse_long_header(d) for d in cap.datagrams]
    assert all(p is not None for p in parsed)
    assert any(p.is_initial for p in parsed if p is not None)
    assert any(p.version is None for p in parsed if p is not None)
    for d in cap.datagrams:
        for mod in IMPLS:
            assert mod.parse_dcid(d, engine.CID_LENGTH) in cap.cids


def test_sealed_initial_round_trip() -> None:
    """``sealed_initial`` makes what a real client makes: the unchanged payload sealed to
    the original DCID is the captured datagram, byte for byte."""
    cap = captured()
    dcid = pull_quic_header(Buffer(data=cap.datagrams[0]), engine.CID_LENGTH).destination_cid
    assert sealed_initial(initial_plaintext()[1], dcid) == cap.datagrams[0]
