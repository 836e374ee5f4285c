"""The send core of a connection (``Outbox``, ``PendingSend``), the endpoint's dirty set
(``DirtySet``) and qh3's event loop (``CorePuller``), compiled and twin: each test runs on
both (the ``fp`` fixture), against a fake engine that records what it was asked."""

from __future__ import annotations

import asyncio
import gc
import importlib
import weakref
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import pytest

from qp2p import wire
from qp2p.errors import ProtocolError

LARGE = 1000  # large_frame: a frame over this many bytes is a large one
MAX_PENDING = 1 << 20
MIN_SWEEP = 256
LIMIT = 1 << 20  # send_limit


class FakeQuic:
    """The engine as the Outbox sees it: ``streams`` new streams may open, ``credit`` is
    the peer's connection-level credit, ``unsent`` what each stream still has to put in
    packets (all of it once written), ``finished`` the streams fully acknowledged. Every
    call is recorded in ``calls``."""

    send_credit_tracked = True

    def __init__(self, *, streams: int = 1000, credit: int = 1 << 40) -> None:
        self.streams = streams
        self.credit = credit
        self.next_uni = 2  # a client's unidirectional streams: 2, 6, 10, ...
        self.written: dict[int, bytes] = {}
        self.unsent: dict[int, int] = {}
        self.finished: set[int] = set()
        self.calls: list[tuple[Any, ...]] = []

    def streams_available(self, unidirectional: bool) -> int:
        self.calls.append(("streams_available", unidirectional))
        return self.streams

    def send_credit(self) -> int:
        self.calls.append(("send_credit",))
        return self.credit

    def send_on_new_stream(self, unidirectional: bool, data: bytes) -> int:
        self.calls.append(("send_on_new_stream", unidirectional, data))
        if self.streams <= 0:
            return -1  # no stream credit: nothing written
        self.streams -= 1
        sid = self.next_uni
        self.next_uni += 4
        self.written[sid] = data
        self.unsent[sid] = len(data)
        return sid

    def unsent_bytes(self, stream_id: int) -> int:
        self.calls.append(("unsent_bytes", stream_id))
        return self.unsent.get(stream_id, 0)

    def send_finished(self, stream_id: int) -> bool:
        self.calls.append(("send_finished", stream_id))
        return stream_id in self.finished

    def in_packets(self, *sids: int) -> None:
        """Every byte of these streams went into packets."""
        for sid in sids:
            self.unsent[sid] = 0

    def asked(self, name: str) -> list[tuple[Any, ...]]:
        return [c for c in self.calls if c[0] == name]


class Conn:
    """Stands in for the connection (held weakly, marked dirty)."""


class Box:
    """An Outbox on a FakeQuic, open, with a known send limit; ``dirty`` records
    ``mark_dirty``'s calls and ``futures`` every future the Outbox created."""

    def __init__(
        self,
        fp: ModuleType,
        loop: asyncio.AbstractEventLoop,
        *,
        quic: FakeQuic | None = None,
        max_pending: int = MAX_PENDING,
        large_frame: int = LARGE,
        min_sweep: int = MIN_SWEEP,
        receipts: bool = False,
        conn: Any = None,
    ) -> None:
        self.fp = fp
        self.loop = loop
        self.quic = FakeQuic() if quic is None else quic
        self.conn: Any = Conn() if conn is None else conn
        self.dirty: list[Any] = []
        self.futures: list[asyncio.Future[None]] = []
        self.ob: Any = fp.Outbox(
            self.quic, self.future, self.dirty.append, weakref.ref(self.conn),
            max_pending, large_frame, min_sweep,
        )
        self.ob.open = True
        self.ob.send_limit = LIMIT
        self.ob.receipts = receipts

    def future(self) -> asyncio.Future[None]:
        future: asyncio.Future[None] = self.loop.create_future()
        self.futures.append(future)
        return future

    def send(self, frame_size: int, header: bytes = b"", dst: bytes = b"") -> Any:
        """``start`` a message whose frame is ``frame_size`` bytes."""
        payload = b"m" * (frame_size - wire.FRAME_HEADER_LEN - len(header) - len(dst))
        return self.ob.start(payload, header, dst)

    def pending(self, frame_size: int) -> Any:
        """A PendingSend of ``frame_size`` bytes, as the connection's long way builds."""
        return self.fp.PendingSend(self.fp.encode_frame(b"", b"", b"p" * (frame_size - 16)),
                                   self.future())

    def start_by_hand(self, pending: Any, awaits_ack: bool = True) -> int:
        """What the connection's pump does: a new stream, then ``started``."""
        sid: int = self.quic.send_on_new_stream(True, pending.frame)
        assert sid >= 0
        self.ob.started(pending, sid, awaits_ack)
        return sid


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


# ---------------------------------------------------------------- PendingSend


def test_pending_send_starts_unwritten(fp: ModuleType, loop: asyncio.AbstractEventLoop) -> None:
    frame = fp.encode_frame(b"h", b"d", b"payload")
    future = loop.create_future()
    p = fp.PendingSend(frame, future)
    assert p.frame is frame and p.future is future and p.size == len(frame) == 25
    assert p.stream_id == -1
    assert (p.receipt, p.control, p.stalled, p.resends) == (False, False, False, 0)
    p.stream_id, p.receipt, p.control, p.stalled, p.resends = 6, True, True, True, 2
    assert (p.stream_id, p.receipt, p.control, p.stalled, p.resends) == (6, True, True, True, 2)


# ---------------------------------------------------------------- start


def test_start_writes_a_small_message_on_a_new_stream_at_once(
    fp: ModuleType, loop: asyncio.AbstractEventLoop
) -> None:
    box = Box(fp, loop)
    p = box.ob.start(b"payload", b"head", b"dst")
    frame = fp.encode_frame(b"head", b"dst", b"payload")
    assert p.stream_id == 2
    assert box.quic.written == {2: frame}
    assert box.quic.asked("send_on_new_stream") == [("send_on_new_stream", True, frame)]
    assert fp.decode_frame(box.quic.written[2], LIMIT) == (wire.KIND_USER, b"head", b"dst",
                                                          b"payload")
    assert p.frame == frame and p.size == len(frame) == 16 + 4 + 3 + 7
    assert box.futures == [p.future] and not p.future.done()
    assert (p.receipt, p.control, p.stalled, p.resends) == (False, False, False, 0)
    assert box.ob.unacked == {2: p} and box.ob.unacked_bytes == p.size
    assert box.ob.sending == {2: p.size} and box.ob.sending_bytes == p.size
    assert box.dirty == [box.conn]
    assert not box.ob.queue_uni and not box.ob.queue_bidi and not box.ob.queue_reply
    assert box.ob.last_large == -1  # a small one
    q = box.ob.start(b"second", b"", b"")
    assert q.stream_id == 6 and box.quic.written[6] == fp.encode_frame(b"", b"", b"second")
    assert sorted(box.ob.unacked) == [2, 6] and box.ob.unacked_bytes == p.size + q.size
    assert box.ob.sending_bytes == p.size + q.size and box.dirty == [box.conn, box.conn]


def test_start_takes_the_receipt_flag_of_the_outbox(
    fp: ModuleType, loop: asyncio.AbstractEventLoop
) -> None:
    box = Box(fp, loop, receipts=True)
    assert box.send(100).receipt is True
    box.ob.receipts = False
    assert box.send(100).receipt is False


@pytest.mark.parametrize("case", [
    "closed", "empty", "over_limit", "limit_unknown", "payload_bytearray",
    "header_memoryview", "dst_subclass",
])
def test_start_returns_none_with_nothing_done(
    fp: ModuleType, loop: asyncio.AbstractEventLoop, case: str
) -> None:
    class Sub(bytes):
        pass

    box = Box(fp, loop)
    payload: Any = b"payload"
    header: Any = b"h"
    dst: Any = b"d"
    if case == "closed":
        box.ob.open = False
    elif case == "empty":
        payload = b""
    elif case == "over_limit":
        box.ob.send_limit = len(payload) + len(header) + len(dst) - 1
    elif case == "limit_unknown":
        box.ob.send_limit = 0
    elif case == "payload_bytearray":
        payload = bytearray(payload)
    elif case == "header_memoryview":
        header = memoryview(header)
    elif case == "dst_subclass":
        dst = Sub(dst)
    assert box.ob.start(payload, header, dst) is None
    assert box.futures == [] and box.quic.calls == [] and box.dirty == []
    assert box.ob.unacked == {} and box.ob.sending == {} and box.ob.unacked_bytes == 0


def test_start_at_exactly_the_send_limit(fp: ModuleType, loop: asyncio.AbstractEventLoop) -> None:
    box = Box(fp, loop)
    box.ob.send_limit = 3 + 1 + 1  # header + dst + payload (the frame header not counted)
    p = box.ob.start(b"pay", b"h", b"d")
    assert p is not None and p.stream_id == 2 and p.size == 21


def test_start_without_stream_credit_leaves_it_for_the_queue(
    fp: ModuleType, loop: asyncio.AbstractEventLoop
) -> None:
    box = Box(fp, loop, quic=FakeQuic(streams=0))
    p = box.send(100)
    assert p is not None and p.stream_id == -1 and p.size == 100
    assert not p.future.done() and box.futures == [p.future]
    assert box.quic.written == {}
    assert box.ob.unacked == {} and box.ob.unacked_bytes == 0
    assert box.ob.sending == {} and box.ob.sending_bytes == 0
    assert box.dirty == []
    assert not box.ob.queue_uni  # the connection queues it, not start
    box.quic.streams = 1  # credit came: the pump's start_at_once writes it now
    assert box.ob.start_at_once(p) is True
    assert p.stream_id == 2 and box.ob.unacked == {2: p} and box.dirty == [box.conn]


def test_max_pending_stops_new_streams(fp: ModuleType, loop: asyncio.AbstractEventLoop) -> None:
    box = Box(fp, loop, max_pending=250)
    started = [box.send(100) for _ in range(3)]
    assert [p.stream_id for p in started] == [2, 6, 10]  # 0, 100, 200 bytes under 250
    assert box.ob.unacked_bytes == 300 and box.ob.full() is True
    box.quic.calls.clear()
    waiting = box.send(100)
    assert waiting.stream_id == -1 and box.quic.calls == []  # decided before asking the engine
    assert box.ob.unacked_bytes == 300 and len(box.ob.unacked) == 3
    assert box.ob.forget(2) is started[0]
    assert box.ob.unacked_bytes == 200 and box.ob.full() is False
    assert box.ob.start_at_once(waiting) is True and waiting.stream_id == 14
    assert box.ob.full() is True


def test_one_message_over_max_pending_still_goes_alone(
    fp: ModuleType, loop: asyncio.AbstractEventLoop
) -> None:
    box = Box(fp, loop, max_pending=50)
    assert box.ob.full() is False
    p = box.send(100)
    assert p.stream_id == 2 and box.ob.full() is True
    assert box.send(100).stream_id == -1


@pytest.mark.parametrize("queue", ["queue_uni", "queue_bidi", "queue_reply"])
def test_start_waits_behind_anything_queued(
    fp: ModuleType, loop: asyncio.AbstractEventLoop, queue: str
) -> None:
    box = Box(fp, loop)
    ahead = box.pending(50)
    getattr(box.ob, queue).append(ahead)
    p = box.send(100)
    assert p.stream_id == -1 and box.quic.calls == [] and box.ob.unacked == {}
    assert list(getattr(box.ob, queue)) == [ahead]  # start queues nothing itself


def test_start_at_once_leaves_a_large_frame_to_the_pump(
    fp: ModuleType, loop: asyncio.AbstractEventLoop
) -> None:
    box = Box(fp, loop)
    at_limit = box.send(LARGE)
    assert at_limit.stream_id == 2 and box.ob.last_large == -1  # not over: small
    box.quic.calls.clear()
    large = box.send(LARGE + 1)
    assert large.stream_id == -1 and box.quic.calls == []
    assert box.ob.unacked == {2: at_limit}


# ---------------------------------------------------------------- credit


def test_start_waits_while_connection_credit_does_not_cover_it(
    fp: ModuleType, loop: asyncio.AbstractEventLoop
) -> None:
    box = Box(fp, loop, quic=FakeQuic(credit=150))
    first = box.send(100)
    assert first.stream_id == 2  # 150 >= 100
    second = box.send(100)  # 150 < 100 + 100 unsent on stream 2
    assert second.stream_id == -1 and sorted(box.quic.written) == [2]
    assert box.ob.credit_covers(100) is False
    assert box.ob.sending == {2: 100}
    box.quic.in_packets(2)  # stream 2 is all in packets: it no longer counts
    assert box.ob.credit_covers(100) is True
    assert box.ob.sending == {} and box.ob.sending_bytes == 0  # dropped on the way
    assert box.ob.unacked == {2: first}  # still awaiting its acknowledgement
    assert box.ob.start_at_once(second) is True and second.stream_id == 6


@pytest.mark.parametrize(("credit", "covered"), [(140, True), (139, False), (1 << 40, True)])
def test_credit_covers_counts_what_open_streams_still_have_to_send(
    fp: ModuleType, loop: asyncio.AbstractEventLoop, credit: int, covered: bool
) -> None:
    box = Box(fp, loop)
    box.send(100)
    box.quic.unsent[2] = 40  # 60 of its 100 bytes in packets
    box.quic.credit = credit
    assert box.ob.credit_covers(100) is covered  # 40 unsent + 100
    assert box.ob.may_start(100) is covered
    assert box.ob.sending == {2: 100}  # not all in packets: kept


def test_credit_not_tracked_by_the_engine_is_never_asked(
    fp: ModuleType, loop: asyncio.AbstractEventLoop
) -> None:
    quic = FakeQuic(credit=0)
    quic.send_credit_tracked = False  # qh3's: send_credit means nothing
    box = Box(fp, loop, quic=quic)
    assert box.send(100).stream_id == 2 and box.send(100).stream_id == 6
    assert box.ob.credit_covers(1 << 30) is True and box.ob.may_start(100) is True
    assert quic.asked("send_credit") == [] and quic.asked("unsent_bytes") == []


# ---------------------------------------------------------------- large frames


def test_a_large_frame_waits_until_the_previous_one_is_nearly_in_packets(
    fp: ModuleType, loop: asyncio.AbstractEventLoop
) -> None:
    box = Box(fp, loop)
    assert box.ob.may_start(5 * LARGE) is True  # no large one in flight
    assert box.quic.calls == []
    big = box.pending(5 * LARGE)
    assert box.ob.start_at_once(big) is False and box.quic.calls == []
    sid = box.start_by_hand(big)
    assert box.ob.last_large == sid == 2
    assert box.ob.unacked == {2: big} and box.ob.sending == {2: 5 * LARGE}
    assert box.ob.may_start(5 * LARGE) is False  # all 5000 bytes unsent
    box.quic.unsent[sid] = LARGE + 1
    assert box.ob.may_start(LARGE + 1) is False
    box.quic.unsent[sid] = LARGE
    assert box.ob.may_start(LARGE + 1) is True  # nearly all in packets
    assert box.quic.asked("unsent_bytes") == [("unsent_bytes", 2)] * 3
    nxt = box.pending(2 * LARGE)
    assert box.start_by_hand(nxt) == 6 and box.ob.last_large == 6
    assert box.ob.may_start(LARGE + 1) is False  # now stream 6 is the one watched


def test_the_large_message_in_flight_does_not_hold_back_small_ones(
    fp: ModuleType, loop: asyncio.AbstractEventLoop
) -> None:
    box = Box(fp, loop, quic=FakeQuic(credit=500))
    box.start_by_hand(box.pending(5 * LARGE))  # stream 2, all 5000 bytes unsent
    assert box.ob.credit_covers(100) is True  # 500 < 100 + 5000, but that one streams
    small = box.send(100)
    assert small.stream_id == 6
    assert box.ob.credit_covers(401) is False  # 100 unsent on stream 6 + 401 > 500
    assert box.ob.credit_covers(400) is True


def test_started_without_ack_is_sending_but_not_awaited(
    fp: ModuleType, loop: asyncio.AbstractEventLoop
) -> None:
    box = Box(fp, loop)
    request = box.pending(100)
    box.ob.started(request, 1, False)  # a request on bidirectional stream 1
    assert request.stream_id == 1
    assert box.ob.sending == {1: 100} and box.ob.sending_bytes == 100
    assert box.ob.unacked == {} and box.ob.unacked_bytes == 0
    assert box.ob.full() is False and box.dirty == []  # started never marks dirty


# ---------------------------------------------------------------- sweep


def test_sweep_waits_until_sending_outgrows_min_sweep(
    fp: ModuleType, loop: asyncio.AbstractEventLoop
) -> None:
    box = Box(fp, loop, min_sweep=3)
    sids = [box.start_by_hand(box.pending(100)) for _ in range(3)]
    box.quic.in_packets(*sids)
    box.quic.calls.clear()
    box.ob.sweep()  # 3 entries, not more than 3
    assert box.quic.calls == [] and len(box.ob.sending) == 3 and box.ob.sending_bytes == 300
    fourth = box.start_by_hand(box.pending(50))  # 50 unsent
    box.ob.sweep()
    assert box.ob.sending == {fourth: 50} and box.ob.sending_bytes == 50
    assert sorted(c[1] for c in box.quic.asked("unsent_bytes")) == [*sids, fourth]
    assert len(box.ob.unacked) == 4 and box.ob.unacked_bytes == 350  # only sending is swept


def test_sweep_threshold_is_twice_what_the_last_sweep_kept(
    fp: ModuleType, loop: asyncio.AbstractEventLoop
) -> None:
    box = Box(fp, loop, min_sweep=2)
    sids = [box.start_by_hand(box.pending(100)) for _ in range(5)]
    box.ob.sweep()  # 5 > 2: swept, all kept (each has unsent bytes): next at 10
    assert len(box.ob.sending) == 5
    box.quic.in_packets(*sids)
    sids += [box.start_by_hand(box.pending(100)) for _ in range(5)]
    box.quic.in_packets(*sids)
    box.quic.calls.clear()
    box.ob.sweep()  # 10, not more than 10
    assert box.quic.calls == [] and len(box.ob.sending) == 10
    last = box.start_by_hand(box.pending(100))
    box.ob.sweep()
    assert box.ob.sending == {last: 100} and box.ob.sending_bytes == 100


def test_start_sweeps_as_it_writes(fp: ModuleType, loop: asyncio.AbstractEventLoop) -> None:
    box = Box(fp, loop, min_sweep=1)
    box.send(100)
    assert box.ob.sending == {2: 100}
    box.quic.in_packets(2)
    box.send(100)  # two entries, more than 1: swept after the write
    assert box.ob.sending == {6: 100} and box.ob.sending_bytes == 100
    assert sorted(box.ob.unacked) == [2, 6]


# ---------------------------------------------------------------- acknowledgements


def test_complete_acked_resolves_only_finished_sends_without_receipts(
    fp: ModuleType, loop: asyncio.AbstractEventLoop
) -> None:
    box = Box(fp, loop)
    p1, p2, p3 = box.send(100), box.send(110), box.send(120)  # streams 2, 6, 10
    box.ob.receipts = True
    p4 = box.send(130)  # stream 14: completes on its receipt, not on the ACK
    p3.future.cancel()  # the user gave up, but the stream finished anyway
    box.quic.in_packets(2)
    box.quic.credit = 0
    box.ob.credit_covers(1)  # drops stream 2 from sending (all in packets)
    assert 2 not in box.ob.sending and box.ob.sending_bytes == 110 + 120 + 130
    box.quic.finished = {2, 10, 14}
    box.quic.calls.clear()
    box.ob.complete_acked()
    assert p1.future.done() and p1.future.result() is None
    assert p3.future.cancelled()
    assert not p2.future.done() and not p4.future.done()
    assert box.ob.unacked == {6: p2, 14: p4} and box.ob.unacked_bytes == 110 + 130
    assert box.ob.sending == {6: 110, 14: 130} and box.ob.sending_bytes == 240
    assert sorted(c[1] for c in box.quic.asked("send_finished")) == [2, 6, 10]  # not 14
    box.ob.complete_acked()  # nothing more finished
    assert box.ob.unacked == {6: p2, 14: p4} and box.ob.unacked_bytes == 240


def _receipt(*entries: tuple[int, int]) -> bytes:
    return b"".join(wire.encode_receipt(sid, code) for sid, code in entries)


def test_take_receipts_completes_the_taken_and_returns_the_refused(
    fp: ModuleType, loop: asyncio.AbstractEventLoop
) -> None:
    box = Box(fp, loop, receipts=True)
    p = [box.send(100 + i) for i in range(4)]  # streams 2, 6, 10, 14
    box.ob.receipts = False
    plain = box.send(200)  # stream 18: completes on its ACK
    box.ob.receipts = True
    gone = box.send(300)  # stream 22, cancelled by the user
    gone.future.cancel()
    box.quic.calls.clear()
    left = box.ob.take_receipts(_receipt(
        (2, 0), (6, wire.ERR_FRAME_REJECTED), (18, 0), (999, 0), (22, 0), (10, 0),
        (14, wire.ERR_STALLED),
    ))
    assert left == [(p[1], wire.ERR_FRAME_REJECTED), (p[3], wire.ERR_STALLED)]
    assert left[0][0] is p[1] and left[1][0] is p[3]
    assert p[0].future.result() is None and p[2].future.result() is None
    assert gone.future.cancelled()
    assert not p[1].future.done() and not p[3].future.done() and not plain.future.done()
    assert box.ob.unacked == {6: p[1], 14: p[3], 18: plain}  # the refused: connection's call
    assert box.ob.unacked_bytes == 101 + 103 + 200
    assert box.ob.sending == {6: 101, 14: 103, 18: 200}
    assert box.ob.sending_bytes == 101 + 103 + 200
    assert box.quic.calls == []  # receipts need no engine
    assert box.ob.take_receipts(_receipt((2, 0), (10, 0))) == []  # repeated: ignored
    assert box.ob.unacked_bytes == 404


def test_take_receipts_after_the_stream_left_sending(
    fp: ModuleType, loop: asyncio.AbstractEventLoop
) -> None:
    box = Box(fp, loop, receipts=True)
    p = box.send(100)
    box.ob.stop_sending_on(2)  # e.g. reset for a stall: the receipt still decides
    assert box.ob.sending == {} and box.ob.sending_bytes == 0
    assert box.ob.take_receipts(_receipt((2, 0))) == []
    assert p.future.done() and box.ob.unacked == {} and box.ob.unacked_bytes == 0
    assert box.ob.sending_bytes == 0


@pytest.mark.parametrize("payload", [b"\x02", b"\x02\x00\x06", b"\x40", b"\x02\x80\x00"])
def test_take_receipts_on_a_truncated_payload_raises_and_changes_nothing(
    fp: ModuleType, loop: asyncio.AbstractEventLoop, payload: bytes
) -> None:
    box = Box(fp, loop, receipts=True)
    p = box.send(100)
    with pytest.raises(ProtocolError, match="truncated receipt"):
        box.ob.take_receipts(payload)
    assert box.ob.unacked == {2: p} and box.ob.unacked_bytes == 100
    assert box.ob.sending_bytes == 100 and not p.future.done()
    assert box.ob.take_receipts(b"") == [] and box.ob.unacked == {2: p}


def test_forget_and_stop_sending_on(fp: ModuleType, loop: asyncio.AbstractEventLoop) -> None:
    box = Box(fp, loop)
    p1, p2 = box.send(100), box.send(150)
    assert box.ob.forget(2) is p1
    assert box.ob.unacked == {6: p2} and box.ob.unacked_bytes == 150
    assert box.ob.sending == {2: 100, 6: 150} and box.ob.sending_bytes == 250  # untouched
    assert box.ob.forget(2) is None and box.ob.forget(12345) is None
    assert box.ob.unacked_bytes == 150
    assert not p1.future.done()  # forgetting fails nothing: the connection does
    box.ob.stop_sending_on(6)
    assert box.ob.sending == {2: 100} and box.ob.sending_bytes == 100
    assert box.ob.unacked == {6: p2} and box.ob.unacked_bytes == 150  # untouched
    box.ob.stop_sending_on(6)
    box.ob.stop_sending_on(12345)
    assert box.ob.sending_bytes == 100


def test_close_returns_every_send_and_keeps_nothing(
    fp: ModuleType, loop: asyncio.AbstractEventLoop
) -> None:
    box = Box(fp, loop)
    queues = (box.ob.queue_uni, box.ob.queue_bidi, box.ob.queue_reply)
    a, b = box.send(100), box.send(110)
    box.ob.started(box.pending(120), 1, False)  # a request: sending only
    qu, qb, qr = box.pending(50), box.pending(60), box.pending(70)
    box.ob.queue_uni.append(qu)
    box.ob.queue_bidi.append(qb)
    box.ob.queue_reply.append(qr)
    out = box.ob.close()
    assert len(out) == 5 and all(x is y for x, y in zip(out, [qu, qb, qr, a, b], strict=True))
    assert box.ob.open is False
    # emptied in place: the connection holds these very deques
    assert all(q is r for q, r in zip(queues, (box.ob.queue_uni, box.ob.queue_bidi,
                                               box.ob.queue_reply), strict=True))
    assert not any(queues)
    assert box.ob.unacked == {} and box.ob.unacked_bytes == 0
    assert box.ob.sending == {} and box.ob.sending_bytes == 0
    assert not any(p.future.done() for p in out)  # the connection fails them
    box.quic.calls.clear()
    assert box.send(100) is None and box.ob.start_at_once(box.pending(100)) is False
    assert box.quic.calls == [] and box.ob.close() == []


def test_a_gone_connection_is_not_marked_dirty(
    fp: ModuleType, loop: asyncio.AbstractEventLoop
) -> None:
    conn = Conn()
    box = Box(fp, loop, conn=conn)
    box.conn = None
    ref = weakref.ref(conn)
    del conn
    gc.collect()
    assert ref() is None  # the Outbox held it weakly
    p = box.send(100)
    assert p.stream_id == 2 and box.dirty == []


# ---------------------------------------------------------------- DirtySet


def test_dirty_set_schedules_one_flush_however_many_are_marked(fp: ModuleType) -> None:
    scheduled: list[Callable[[], None]] = []

    def flush() -> None:
        pass

    ds = fp.DirtySet(scheduled.append, flush)
    dirty = ds.dirty
    conns = [Conn() for _ in range(5)]
    assert ds.scheduled is False and ds.dirty == {}
    for conn in conns + conns[::-1] + conns:
        ds(conn)
    assert scheduled == [flush] and scheduled[0] is flush
    assert ds.scheduled is True
    assert list(ds.dirty) == conns and ds.dirty is dirty
    ds.dirty.clear()
    ds(conns[0])  # flush has not run (nobody set scheduled back): nothing more scheduled
    assert scheduled == [flush] and list(ds.dirty) == [conns[0]]
    ds.scheduled = False  # what the endpoint's flush does first
    ds(conns[1])
    assert scheduled == [flush, flush] and list(ds.dirty) == [conns[0], conns[1]]


def test_dirty_set_flushes_once_per_turn_of_the_loop(
    fp: ModuleType, loop: asyncio.AbstractEventLoop
) -> None:
    seen: list[list[Conn]] = []

    def flush() -> None:  # as Endpoint._flush
        ds.scheduled = False
        seen.append(list(ds.dirty))
        ds.dirty.clear()

    ds = fp.DirtySet(loop.call_soon, flush)
    a, b, c = Conn(), Conn(), Conn()
    for conn in (a, b, a, c, b, a):
        ds(conn)
    assert seen == []  # scheduled, not run
    loop.run_until_complete(asyncio.sleep(0))
    assert seen == [[a, b, c]] and ds.dirty == {} and ds.scheduled is False
    loop.run_until_complete(asyncio.sleep(0))
    assert seen == [[a, b, c]]  # nothing marked: no flush

    async def marks_during_a_turn() -> None:
        ds(c)
        ds(a)
        await asyncio.sleep(0)  # the flush runs here
        ds(c)

    loop.run_until_complete(marks_during_a_turn())
    loop.run_until_complete(asyncio.sleep(0))
    assert seen == [[a, b, c], [c, a], [c]]


# ---------------------------------------------------------------- CorePuller


class Budget:
    def __init__(self) -> None:
        self.reserved = 0


class Adapter:
    """The qh3 adapter's sets and dicts, a CorePuller over them and what it handed on."""

    def __init__(self, fp: ModuleType, *, rejected: dict[int, int] | None = None,
                 receiver: bool = True, datagrams: bool = True) -> None:
        self.unfinished = {0, 4}
        self.created = {0, 4, 8}
        self.rejected: dict[int, int] = {} if rejected is None else rejected
        self.peer_streams = {3: 0, 7: 0, 11: 0}
        self.fin_pulled: set[int] = set()
        self.taken: list[tuple[int, bytes, bool]] = []
        self.datagrams: list[bytes] = []
        self.puller: Any = fp.CorePuller(self.unfinished, self.created, self.rejected,
                                         self.peer_streams, self.fin_pulled, 1)
        if receiver:
            self.puller.receiver = self.take
        if datagrams:
            self.puller.datagram_receiver = self.datagrams.append

    def take(self, sid: int, data: bytes, fin: bool) -> None:
        self.taken.append((sid, data, fin))


def _core(events: list[tuple[Any, ...]]) -> tuple[Callable[[], tuple[Any, ...] | None],
                                                  list[tuple[Any, ...]]]:
    """A core's ``next_event`` over ``events``, and the list of those not yet taken."""
    left = list(events)

    def next_event() -> tuple[Any, ...] | None:
        return left.pop(0) if left else None

    return next_event, left


def test_core_puller_handles_the_per_message_events_itself(fp: ModuleType) -> None:
    ad = Adapter(fp)
    budget = Budget()
    frame = fp.encode_frame(b"", b"", b"hello")
    piece = ("stream_data", 7, b"part", False)
    other = ("handshake_completed", "h3")
    next_event, left = _core([
        ("streams_available",), ("connection_credit",), ("stream_finished", 4),
        ("stream_data", 3, frame, True), ("datagram", b"dg"), piece, other,
        ("stream_finished", 8), ("stream_finished", 99),
    ])
    assert ad.puller.pull(next_event, budget, 1 << 62) is piece  # not whole: the adapter's
    assert ad.unfinished == {0} and ad.created == {0, 8}
    assert ad.taken == [(3, frame, True)] and ad.datagrams == [b"dg"]
    assert ad.puller.pulled == len(frame) and budget.reserved == len(frame)
    assert ad.peer_streams == {7: 0, 11: 0} and ad.fin_pulled == {3}
    assert ad.puller.pull(next_event, budget, 1 << 62) is other
    assert ad.puller.pull(next_event, None, 1 << 62) is None
    assert left == [] and ad.unfinished == {0} and ad.created == {0}
    assert ad.puller.pulled == len(frame)  # only whole messages count here


@pytest.mark.parametrize("case", [
    "not_fin", "fin_not_true", "own_stream", "rejecting", "no_receiver", "not_bytes",
])
def test_core_puller_returns_other_stream_data_untouched(fp: ModuleType, case: str) -> None:
    ad = Adapter(fp, rejected={5: 1} if case == "rejecting" else None,
                 receiver=case != "no_receiver")
    data: Any = b"whole"
    sid = 3
    fin: Any = True
    if case == "not_fin":
        fin = False
    elif case == "fin_not_true":
        fin = 1  # truthy, but the core's FIN is True itself
    elif case == "own_stream":
        sid = 2
    elif case == "not_bytes":
        data = bytearray(data)
    event = ("stream_data", sid, data, fin)
    next_event, _ = _core([event])
    budget = Budget()
    assert ad.puller.pull(next_event, budget, 1 << 62) is event
    assert ad.taken == [] and ad.puller.pulled == 0 and budget.reserved == 0
    assert ad.peer_streams == {3: 0, 7: 0, 11: 0} and ad.fin_pulled == set()


def test_core_puller_returns_a_datagram_with_nobody_to_take_it(fp: ModuleType) -> None:
    ad = Adapter(fp, datagrams=False)
    event = ("datagram", b"dg")
    next_event, _ = _core([event])
    assert ad.puller.pull(next_event, None, 1 << 62) is event and ad.datagrams == []


def test_core_puller_stops_once_room_is_taken(fp: ModuleType) -> None:
    ad = Adapter(fp)
    ad.puller.pulled = 1000  # the adapter counts other pulls in it too
    frames = [fp.encode_frame(b"", b"", bytes([i]) * 84) for i in range(3)]  # 100 bytes
    next_event, left = _core([("stream_data", 3 + 4 * i, f, True) for i, f in enumerate(frames)])
    assert ad.puller.pull(next_event, None, 150) == ()  # 100 < 150, then 200 >= 150
    assert [t[0] for t in ad.taken] == [3, 7] and len(left) == 1
    assert ad.puller.pulled == 1200
    assert ad.puller.pull(next_event, None, 100) == ()  # exactly the room
    assert ad.puller.pull(next_event, None, 0) is None and ad.puller.pulled == 1300
    assert ad.fin_pulled == {3, 7, 11} and ad.peer_streams == {}


# ---------------------------------------------------------------- the two agree


def _script(mod: ModuleType, loop: asyncio.AbstractEventLoop) -> list[Any]:
    """One scripted run of an Outbox: ``(label, result, state...)`` after each step."""
    quic = FakeQuic(streams=10, credit=400)
    box = Box(mod, loop, quic=quic, max_pending=700, large_frame=300, min_sweep=2)
    ob = box.ob
    trace: list[Any] = []
    sends: dict[str, Any] = {}

    def show(p: Any) -> Any:
        return None if p is None else (p.stream_id, p.size, p.receipt, p.frame)

    def step(label: str, result: Any = None) -> None:
        trace.append((
            label, result, list(ob.unacked), ob.unacked_bytes, dict(ob.sending),
            ob.sending_bytes, ob.last_large, len(ob.queue_uni), len(ob.queue_bidi),
            len(ob.queue_reply), ob.full(), ob.open,
            [(f.done(), f.cancelled()) for f in box.futures], len(box.dirty),
            list(quic.calls), dict(quic.written),
        ))
        quic.calls.clear()

    def send(label: str, size: int, header: bytes = b"") -> None:
        sends[label] = p = box.send(size, header)
        step(label, show(p))

    send("small", 100, b"h")
    send("small2", 150)
    send("no_credit", 200)  # 400 < 200 + 250 unsent on streams 2 and 6
    quic.in_packets(2)
    step("covers", ob.credit_covers(200))  # stream 2 leaves sending
    ob.queue_uni.append(sends["no_credit"])
    send("behind_queue", 50)
    ob.queue_uni.clear()
    step("at_once", ob.start_at_once(sends["no_credit"]))  # stream 10
    step("at_once2", ob.start_at_once(sends["behind_queue"]))  # 14; 3 > 2: swept
    big = box.pending(800)
    step("may_large", ob.may_start(800))
    ob.started(big, quic.send_on_new_stream(True, big.frame))  # stream 18
    step("large", show(big))
    step("may_large2", ob.may_start(301))
    quic.unsent[18] = 300
    step("may_large3", ob.may_start(301))
    send("full", 60)  # 1300 unacknowledged bytes >= 700
    step("forget", show(ob.forget(6)))
    quic.finished = {2, 10, 18}
    ob.complete_acked()
    step("acked")
    ob.receipts = True
    quic.credit = 1000
    send("receipt", 70)  # stream 22
    send("receipt2", 80)  # 26
    send("receipt3", 90)  # 30
    quic.finished |= {22, 26, 30}
    ob.complete_acked()  # receipts decide those: nothing completes
    step("acked2")
    ob.stop_sending_on(14)
    step("stopped")
    step("receipts", [(show(p), c) for p, c in ob.take_receipts(_receipt(
        (22, wire.ERR_STALLED), (26, 0), (22, 0), (14, 0), (1000, 0),
        (30, wire.ERR_FRAME_REJECTED),
    ))])
    quic.in_packets(*quic.written)
    for sid in (1, 5, 9, 13, 17):
        ob.started(box.pending(40), sid, False)  # requests: in sending only
    quic.unsent[13] = 7
    ob.sweep()
    step("sweep")
    sends["small"].future.cancel()
    ob.queue_bidi.append(box.pending(90))
    step("close", [show(p) for p in ob.close()])
    send("closed", 100)
    return trace


def test_both_implementations_agree_on_a_scripted_run(loop: asyncio.AbstractEventLoop) -> None:
    try:
        compiled = importlib.import_module("qp2p._fastpath")
    except ImportError as exc:
        pytest.fail(f"the compiled fast path must be built for these tests: {exc}")
    twin = importlib.import_module("qp2p._purepy")
    ran = _script(compiled, loop)
    assert ran == _script(twin, loop)
    # and the script reaches what it means to (the twin's state, so the compiled one's)
    steps = {label: (result, unacked, unacked_bytes, sending, full)
             for label, result, unacked, unacked_bytes, sending, _, _, _, _, _, full, *_
             in ran}
    assert steps["no_credit"][0][0] == -1 and steps["covers"][0] is True
    assert steps["at_once2"][3] == {6: 150, 10: 200, 14: 50}
    assert steps["may_large2"][0] is False and steps["may_large3"][0] is True
    assert steps["full"][0][0] == -1 and steps["full"][4] is True
    assert steps["acked"][1:3] == ([14], 50)
    assert steps["acked2"][1] == [14, 22, 26, 30]
    receipts = steps["receipts"]
    assert [(entry[:3], code) for entry, code in receipts[0]] == [
        ((22, 70, True), wire.ERR_STALLED), ((30, 90, True), wire.ERR_FRAME_REJECTED),
    ]
    assert receipts[1:3] == ([14, 30], 140)
    assert steps["sweep"][3] == {13: 40}
    assert [entry[:2] for entry in steps["close"][0]] == [(-1, 90), (14, 50), (30, 90)]
    assert steps["closed"][0] is None
