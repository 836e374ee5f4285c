"""``MessageSink``, the receive core of a connection (compiled and twin): a peer's whole
message goes to the inbox in one call, with its receipt; everything else goes, unchanged,
to the fallback."""

from __future__ import annotations

import gc
import weakref
from types import ModuleType
from typing import Any

import pytest

MAX_FRAME = 1 << 20
WINDOW = 1 << 16
RELEASE_BATCH = 1000


class Counter:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


class Owner:
    """Stands in for the connection: the fallback and the object marked dirty (the sink
    holds it weakly; ``notify``, like the connection's signal, is apart from it)."""

    def __init__(self) -> None:
        self.handed: list[tuple[int, bytes, bool]] = []
        self.dirty: list[Any] = []
        self.notify = Counter()

    @property
    def notified(self) -> int:
        return self.notify.count

    def fallback(self, sid: int, data: bytes, fin: bool) -> None:
        self.handed.append((sid, data, fin))


def _sink(fp: ModuleType, owner: Owner, *, peer_parity: int = 1, mode: int = 1,
          assemblers: dict[int, Any] | None = None, rejected: dict[int, int] | None = None,
          max_receipts: int = 16, starved: dict[Any, None] | None = None) -> Any:
    stats = {"messages_received": 0}
    sink = fp.MessageSink(
        weakref.WeakMethod(owner.fallback), weakref.ref(owner), owner.dirty.append,
        owner.notify, stats, {} if assemblers is None else assemblers,
        {} if rejected is None else rejected, MAX_FRAME, peer_parity, max_receipts,
        {} if starved is None else starved, WINDOW, RELEASE_BATCH,
    )
    sink.receipts_mode = mode
    return sink


def test_a_whole_message_goes_to_the_inbox_with_its_receipt(fp: ModuleType) -> None:
    owner = Owner()
    sink = _sink(fp, owner)
    frame = fp.encode_frame(b"h", b"d", b"payload")
    sink(3, frame, True)  # the server's (peer's) first unidirectional stream
    assert list(sink.inbox) == [(b"h", b"d", b"payload", None, len(frame))]
    assert sink.inbox_bytes == len(frame)
    assert sink.receipts == [fp.encode_receipt(3, 0)]
    assert owner.dirty == [owner] and owner.notified == 1 and owner.handed == []
    request = fp.encode_frame(b"", b"", b"ask")
    sink(1, request, True)  # a bidirectional stream: a request, no receipt
    assert sink.inbox[-1] == (b"", b"", b"ask", 1, len(request))
    assert sink.receipts == [fp.encode_receipt(3, 0)]
    assert sink.inbox_bytes == len(frame) + len(request)


@pytest.mark.parametrize("case", [
    "not_whole", "own_stream", "assembling", "rejecting", "control", "malformed",
    "receipts_unknown", "receipts_full",
])
def test_everything_else_goes_to_the_fallback_untouched(fp: ModuleType, case: str) -> None:
    owner = Owner()
    sid, fin = 3, True
    data = fp.encode_frame(b"", b"", b"x")
    kwargs: dict[str, Any] = {}
    if case == "not_whole":
        fin = False
    elif case == "own_stream":
        sid = 2
    elif case == "assembling":
        kwargs["assemblers"] = {3: object()}
    elif case == "rejecting":
        kwargs["rejected"] = {7: 10}
    elif case == "control":
        data = fp.encode_frame(b"", b"", b"x", 1)
    elif case == "malformed":
        data = data[:-1]
    elif case == "receipts_unknown":
        kwargs["mode"] = 0
    elif case == "receipts_full":
        kwargs["max_receipts"] = 0
    sink = _sink(fp, owner, **kwargs)
    sink(sid, data, fin)
    assert owner.handed == [(sid, data, fin)]
    assert not sink.inbox and sink.inbox_bytes == 0 and sink.receipts == []
    assert owner.notified == 0 and owner.dirty == []


def test_no_receipts_mode_takes_messages_without_one(fp: ModuleType) -> None:
    owner = Owner()
    sink = _sink(fp, owner, mode=2)
    sink(3, fp.encode_frame(b"", b"", b"x"), True)
    assert len(sink.inbox) == 1 and sink.receipts == [] and owner.dirty == []


def test_a_gone_owner_is_not_kept_alive_nor_called(fp: ModuleType) -> None:
    owner = Owner()
    sink = _sink(fp, owner)
    ref = weakref.ref(owner)
    del owner
    gc.collect()
    assert ref() is None  # the sink held it weakly
    sink(3, b"short", False)  # to the fallback, which is gone: nothing happens
    sink(3, fp.encode_frame(b"", b"", b"x"), True)  # taken; nobody to mark dirty
    assert len(sink.inbox) == 1


def _fill(fp: ModuleType, sink: Any, n: int, size: int) -> int:
    """``n`` messages of ``size`` payload bytes into the inbox; returns a frame's length."""
    frame = fp.encode_frame(b"", b"", b"x" * size)
    for i in range(n):
        sink(3 + 4 * i, frame, True)
    return len(frame)


def test_take_releases_once_per_burst(fp: ModuleType) -> None:
    owner = Owner()
    sink = _sink(fp, owner, max_receipts=64)
    flen = _fill(fp, sink, 25, 84)  # 100-byte frames: ten fit under RELEASE_BATCH
    released = []
    for _ in range(25):
        header, dst, payload, sid, release = sink.take(0)
        assert (header, dst, payload, sid) == (b"", b"", b"x" * 84, None)
        released.append(release)
    # the tenth read reaches the batch; the last read empties the inbox: both release all
    assert released == [0] * 9 + [10 * flen] + [0] * 9 + [10 * flen] + [0] * 4 + [5 * flen]
    assert sink.unreleased == 0 and sink.inbox_bytes == 0


def test_take_releases_at_once_when_credit_is_wanted(fp: ModuleType) -> None:
    owner = Owner()
    starved: dict[Any, None] = {}
    sink = _sink(fp, owner, starved=starved)
    flen = _fill(fp, sink, 4, 84)
    assert sink.take(0)[4] == 0
    assert sink.take(WINDOW - RELEASE_BATCH)[4] == 2 * flen  # near the window: now
    starved[object()] = None  # another connection waits for the endpoint's budget
    assert sink.take(0)[4] == flen
    assert sink.inbox_bytes == flen
