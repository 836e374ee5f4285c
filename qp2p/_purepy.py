"""The fast path in plain Python: the twin of ``qp2p._fastpath``.

Same public names, same behaviour, byte-identical results and identical exceptions
(type and message) as the compiled module. ``qp2p._speedups`` picks one of the two;
``QP2P_NO_EXTENSIONS=1`` forces this one.

Wire format of a frame (all integers big-endian, see DESIGN.md §3)::

    u16 version (0x0002) | u32 len(header) | u32 len(dst) | u32 len(payload) | u8 kind | u8 0
    header | dst | payload
"""

import errno as _errno
import operator as _operator
import socket as _socket
import struct as _struct
from collections import deque as _deque
from collections.abc import Callable as _Callable
from collections.abc import Sequence as _Sequence
from typing import Any as _Any

from qp2p.errors import ProtocolError

__all__ = [
    "FRAME_HEADER_LEN",
    "KIND_USER",
    "MAX_KIND",
    "WIRE_VERSION",
    "ConnectionTable",
    "CorePuller",
    "DirtySet",
    "FrameAssembler",
    "MessageSink",
    "Outbox",
    "PendingSend",
    "decode_frame",
    "enable_gro",
    "encode_frame",
    "encode_receipt",
    "features",
    "parse_dcid",
    "parse_receipts",
    "recv_batch",
    "send_batch",
]

FRAME_HEADER_LEN: int = 16
"""Bytes in the fixed frame header."""
WIRE_VERSION: int = 0x0002
"""The frame version this code speaks."""
KIND_USER: int = 0
"""Frame kind of a user message."""
MAX_KIND: int = 12
"""Kinds ``0..MAX_KIND`` are valid; ``1..12`` are qp2p's own control messages."""

_HEADER = _struct.Struct(">HIIIBB")
_LEN_LIMIT = 1 << 32
_SIZE_CLAMP = 1 << 40  # as the compiled code: larger counts behave the same
_MAX_CID_LEN = 20
# A UDP payload never exceeds 65535 bytes: a larger receive buffer is never useful.
_MAX_RECV_BUFSIZE = 65536
_DONTWAIT: int = getattr(_socket, "MSG_DONTWAIT", 0)
# Errors from the socket that mean "try again later": stop, nothing is lost.
_SEND_STOP = frozenset({_errno.EAGAIN, _errno.EWOULDBLOCK, _errno.ENOBUFS})
_RECV_STOP = frozenset({_errno.EAGAIN, _errno.EWOULDBLOCK})
# Errors a UDP socket reports for an earlier datagram (ICMP and friends): skipped.
_RECV_TRANSIENT = frozenset(
    {
        _errno.ECONNREFUSED,
        _errno.ECONNRESET,
        _errno.EHOSTUNREACH,
        _errno.ENETUNREACH,
        _errno.EHOSTDOWN,
        _errno.ENETDOWN,
        _errno.ETIMEDOUT,
        _errno.EMSGSIZE,
    }
)

# FrameAssembler states.
_HEAD = 0  # collecting the 16 header bytes
_BODY = 1  # collecting header, dst, payload
_COMPLETE = 2  # every byte is in, waiting for the end of the stream
_DONE = 3  # the frame was returned
_FAILED = 4  # a ProtocolError was raised; every later feed raises it again


def _view(obj: _Any) -> bytes | bytearray | memoryview:
    """Any bytes-like object as something whose ``len`` counts bytes."""
    if type(obj) is bytes or type(obj) is bytearray:
        return obj
    return memoryview(obj).cast("B")


def _limits(max_message_size: _Any, max_kind: _Any) -> tuple[int, int]:
    size = _operator.index(max_message_size)
    if size < 0:
        raise ValueError(f"max_message_size must not be negative, got {size}")
    kind = _operator.index(max_kind)
    if not 0 <= kind <= 255:
        raise ValueError(f"max_kind must be in 0..255, got {kind}")
    return size, kind


def _cid_len(short_cid_len: _Any) -> int:
    n = _operator.index(short_cid_len)
    if not 0 <= n <= _MAX_CID_LEN:
        raise ValueError(f"short_cid_len must be in 0..{_MAX_CID_LEN}, got {n}")
    return n


def _parse_header(
    data: bytes | bytearray | memoryview, max_message_size: int, max_kind: int
) -> tuple[int, int, int, int, int]:
    """Validate the first 16 bytes of ``data``: ``(kind, len_h, len_d, len_p, total)``."""
    version, lh, ld, lp, kind, reserved = _HEADER.unpack_from(data)
    if version != WIRE_VERSION:
        raise ProtocolError(f"unsupported frame version 0x{version:04x}")
    if kind > max_kind:
        raise ProtocolError(f"unknown frame kind {kind}")
    if reserved != 0:
        raise ProtocolError(f"reserved byte is {reserved}, not 0")
    total = FRAME_HEADER_LEN + lh + ld + lp
    if total > max_message_size:
        raise ProtocolError(f"frame of {total} bytes exceeds the limit of {max_message_size}")
    if lp == 0:
        raise ProtocolError("empty payload")
    return kind, lh, ld, lp, total


def encode_frame(header: bytes, dst: bytes, payload: bytes, kind: int = 0) -> bytes:
    """One frame: the 16-byte frame header, then ``header``, ``dst`` and ``payload``.

    Accepts any bytes-like objects. Raises ``ValueError`` if ``kind`` is not in
    ``0..255`` or a part is ``2**32`` bytes or longer. No size or emptiness policy:
    the caller checks those.
    """
    k = _operator.index(kind)
    if not 0 <= k <= 255:
        raise ValueError(f"frame kind must be in 0..255, got {k}")
    h = _view(header)
    lh = len(h)
    if lh >= _LEN_LIMIT:
        raise ValueError(f"header of {lh} bytes is too long for a frame")
    d = _view(dst)
    ld = len(d)
    if ld >= _LEN_LIMIT:
        raise ValueError(f"dst of {ld} bytes is too long for a frame")
    p = _view(payload)
    lp = len(p)
    if lp >= _LEN_LIMIT:
        raise ValueError(f"payload of {lp} bytes is too long for a frame")
    return b"".join((_HEADER.pack(WIRE_VERSION, lh, ld, lp, k, 0), h, d, p))


def decode_frame(
    data: bytes, max_message_size: int, max_kind: int = MAX_KIND
) -> tuple[int, bytes, bytes, bytes]:
    """Decode a whole frame held in one buffer: ``(kind, header, dst, payload)``.

    Same checks, same ``ProtocolError`` messages as ``FrameAssembler`` fed ``data``
    with ``fin=True``.
    """
    size, max_k = _limits(max_message_size, max_kind)
    buf = _view(data)
    n = len(buf)
    if n < FRAME_HEADER_LEN:
        raise ProtocolError(f"stream ended after {n} of {FRAME_HEADER_LEN} bytes")
    kind, lh, ld, _lp, total = _parse_header(buf, size, max_k)
    if n > total:
        raise ProtocolError(f"{n - total} bytes after the end of the frame")
    if n < total:
        raise ProtocolError(f"stream ended after {n} of {total} bytes")
    a = FRAME_HEADER_LEN + lh
    b = a + ld
    return kind, bytes(buf[FRAME_HEADER_LEN:a]), bytes(buf[a:b]), bytes(buf[b:])


class CorePuller:
    """A native QUIC core's event loop for its adapter (qh3's), where qp2p's per-message
    work on receipt runs: ``pull(next_event, budget, room)`` calls ``next_event()`` (the
    core's) until it returns ``None`` (returned) or an event the adapter must handle
    (returned). It owns ``pulled`` (stream bytes taken from the core so far).

    On the way it handles, without returning:

    - the core's acknowledgement bookkeeping: ``"streams_available"`` and
      ``"connection_credit"`` are skipped, and ``("stream_finished", stream_id)`` removes
      ``stream_id`` from ``unfinished`` and ``created``;
    - a peer's whole message (``("stream_data", sid, data, True)``, ``sid`` of parity
      ``peer_parity``, ``data`` bytes) while ``rejected`` is empty and ``receiver`` is
      set: ``pulled`` and (``budget`` not None) ``budget.reserved`` grow by its length,
      ``sid`` leaves ``peer_streams`` and joins ``fin_pulled``, and
      ``receiver(sid, data, True)`` takes it. Once ``room`` bytes or more were taken so,
      it returns ``()``: the adapter asks its gate again;
    - a datagram (``("datagram", data)``) while ``datagram_receiver`` is set: it takes it.

    ``unfinished``, ``created``, ``rejected``, ``peer_streams`` and ``fin_pulled`` are the
    adapter's; this loop only does the above to them. (qh3's core emits about four events
    per message: this is what runs for them.)
    """

    __slots__ = ("_created", "_fin_pulled", "_peer_parity", "_peer_streams", "_rejected",
                 "_unfinished", "datagram_receiver", "pulled", "receiver")

    def __init__(
        self,
        unfinished: set[int],
        created: set[int],
        rejected: dict[int, int],
        peer_streams: dict[int, int],
        fin_pulled: set[int],
        peer_parity: int,
    ) -> None:
        self.pulled = 0
        self.receiver: _Callable[[int, bytes, bool], None] | None = None
        self.datagram_receiver: _Callable[[bytes], None] | None = None
        self._unfinished = unfinished
        self._created = created
        self._rejected = rejected
        self._peer_streams = peer_streams
        self._fin_pulled = fin_pulled
        self._peer_parity = _operator.index(peer_parity) & 1

    def pull(
        self, next_event: _Callable[[], tuple[_Any, ...] | None], budget: _Any, room: int
    ) -> tuple[_Any, ...] | None:
        """The next event for the adapter, None, or ``()`` (see the class)."""
        stop = self.pulled + min(room, _SIZE_CLAMP)
        while True:
            native = next_event()
            if native is None:
                return None
            kind = native[0]
            if kind == "stream_data":
                sid, data = native[1], native[2]
                if (
                    native[3] is True and not self._rejected and self.receiver is not None
                    and type(data) is bytes and (sid & 1) == self._peer_parity
                ):
                    n = len(data)
                    self.pulled += n
                    if budget is not None:
                        budget.reserved += n
                    self._peer_streams.pop(sid, None)
                    self._fin_pulled.add(sid)
                    self.receiver(sid, data, True)
                    if self.pulled >= stop:
                        return ()
                    continue
                return native
            if kind == "stream_finished":
                self._unfinished.discard(native[1])
                self._created.discard(native[1])
            elif kind == "datagram" and self.datagram_receiver is not None:
                self.datagram_receiver(native[1])
            elif kind != "streams_available" and kind != "connection_credit":
                return native


class DirtySet:
    """An endpoint's connections with something to send: calling it with a connection
    adds it to ``dirty`` (a dict used as an ordered set) and, unless one is already
    scheduled (``scheduled``), schedules ``flush`` with ``call_soon``, so that everything
    written in one turn of the loop goes out in one batch. ``flush`` sets ``scheduled``
    back to False when it runs."""

    __slots__ = ("_call_soon", "_flush", "dirty", "scheduled")

    def __init__(self, call_soon: _Callable[..., _Any], flush: _Callable[[], None]) -> None:
        self.dirty: dict[_Any, None] = {}
        self.scheduled = False
        self._call_soon = call_soon
        self._flush = flush

    def __call__(self, conn: _Any) -> None:
        """Mark ``conn`` dirty (see the class)."""
        self.dirty[conn] = None
        if not self.scheduled:
            self.scheduled = True
            self._call_soon(self._flush)


class MessageSink:
    """A connection's receive core for whole messages: called with each piece of stream data
    its engine pulls (``sid, data, fin``), it takes a peer's message that arrived whole on
    a stream of its own (the common case: one call per small message) and hands anything
    else to ``fallback`` (a ``weakref.WeakMethod``): a frame in pieces, a stream being
    rejected, a control frame, a malformed frame, a receipt it cannot yet write.

    It owns ``inbox`` (``(header, dst, payload, stream_id or None, size)`` per message
    to be read), ``inbox_bytes`` (their stream bytes) and ``receipts`` (encoded receipt
    entries owed to the peer, which ``receipts_mode`` says how to write: 0 not known yet,
    so the fallback decides; 1 one per message from the peer's unidirectional streams;
    2 none). A message taken bumps ``stats["messages_received"]``, calls
    ``mark_dirty(conn)`` for a receipt written (``conn`` a ``weakref.ref``) and
    ``notify()``. ``assemblers`` and ``rejected`` (dicts keyed by stream) are only read:
    a stream in either goes to the fallback.
    """

    __slots__ = (
        "_assemblers", "_conn", "_fallback", "_mark_dirty", "_max_frame_size",
        "_max_receipts", "_notify", "_peer_parity", "_rejected", "_release_batch",
        "_starved", "_stats", "_window", "inbox", "inbox_bytes", "receipts", "receipts_mode",
        "unreleased",
    )

    def __init__(
        self,
        fallback: _Callable[[], _Callable[[int, bytes, bool], None] | None],
        conn: _Callable[[], _Any],
        mark_dirty: _Callable[[_Any], None],
        notify: _Callable[[], None],
        stats: dict[str, int],
        assemblers: dict[int, _Any],
        rejected: dict[int, int],
        max_frame_size: int,
        peer_parity: int,
        max_receipts: int,
        starved: dict[_Any, None],
        window: int,
        release_batch: int,
    ) -> None:
        self._fallback = fallback
        self._conn = conn
        self._mark_dirty = mark_dirty
        self._notify = notify
        self._stats = stats
        self._assemblers = assemblers
        self._rejected = rejected
        self._max_frame_size = _operator.index(max_frame_size)
        self._peer_parity = peer_parity & 1
        self._max_receipts = max_receipts
        self.inbox: _deque[tuple[bytes, bytes, bytes, int | None, int]] = _deque()
        self.inbox_bytes = 0
        self.receipts: list[bytes] = []
        self.receipts_mode = 0
        self.unreleased = 0
        self._starved = starved
        self._window = window
        self._release_batch = release_batch

    def take(self, held: int) -> tuple[bytes, bytes, bytes, int | None, int]:
        """The oldest message of ``inbox`` as ``(header, dst, payload, stream_id or None,
        release)``; its bytes leave ``inbox_bytes``. ``release`` is what to release now
        (its bytes and those of the messages read before it, then no longer counted in
        ``unreleased``), or 0 while nobody waits for this credit: more of the burst is in
        the inbox, fewer than ``release_batch`` bytes are unreleased, ``starved`` is
        empty (no connection waits for the endpoint's budget) and ``held``, the bytes
        the engine holds, stays ``release_batch`` under ``window``."""
        header, dst, payload, sid, size = self.inbox.popleft()
        self.inbox_bytes -= size
        release = 0
        if (
            self.inbox and self.unreleased + size < self._release_batch and not self._starved
            and held + self._release_batch < self._window
        ):
            self.unreleased += size
        else:
            release = self.unreleased + size
            self.unreleased = 0
        return header, dst, payload, sid, release

    def __call__(self, sid: int, data: bytes, fin: bool) -> None:
        """Take one piece of stream data (see the class)."""
        if (
            not fin or self._rejected or type(data) is not bytes
            or (sid & 1) != self._peer_parity or sid in self._assemblers
        ):
            return self._hand_over(sid, data, fin)
        try:
            kind, header, dst, payload = decode_frame(data, self._max_frame_size)
        except ProtocolError:
            return self._hand_over(sid, data, fin)
        if kind != KIND_USER:
            return self._hand_over(sid, data, fin)
        size = len(data)
        if sid & 2:
            mode = self.receipts_mode
            if mode == 1 and len(self.receipts) < self._max_receipts:
                self.receipts.append(encode_receipt(sid, 0))
                conn = self._conn()
                if conn is not None:
                    self._mark_dirty(conn)
            elif mode != 2:
                return self._hand_over(sid, data, fin)
            entry: tuple[bytes, bytes, bytes, int | None, int] = (
                header, dst, payload, None, size
            )
        else:
            entry = (header, dst, payload, sid, size)
        self._stats["messages_received"] += 1
        self.inbox.append(entry)
        self.inbox_bytes += size
        self._notify()
        return None

    def _hand_over(self, sid: int, data: bytes, fin: bool) -> None:
        fallback = self._fallback()
        if fallback is not None:
            fallback(sid, data, fin)


class PendingSend:
    """One frame of ours waiting for stream credit, for its acknowledgement or for its
    receipt (``receipt``: the peer sends one, and the send completes on it, not on the
    ACK). ``stream_id`` is -1 until it is written; ``control``: from ``send_control``;
    ``stalled``: we reset its stream for a stall, a receipt says what next; ``resends``:
    times sent again after a stall."""

    __slots__ = ("control", "frame", "future", "receipt", "resends", "size", "stalled",
                 "stream_id")

    def __init__(self, frame: bytes, future: _Any) -> None:
        self.frame = frame
        self.future = future
        self.size = len(frame)
        self.stream_id = -1
        self.receipt = False
        self.control = False
        self.stalled = False
        self.resends = 0


class Outbox:
    """A connection's send core: what it wrote on its own streams and what waits to be.

    It owns the three queues of ``PendingSend`` waiting for stream credit (``queue_uni``,
    ``queue_bidi``, ``queue_reply``), ``unacked`` (stream id -> the send awaiting its
    acknowledgement or receipt) with ``unacked_bytes``, and ``sending`` (stream id ->
    frame size of a stream that may still have bytes to put in packets) with
    ``sending_bytes``. ``open`` (established and not closed), ``receipts`` (the peer
    sends them) and ``send_limit`` (the most header + dst + payload may hold; 0 until the
    peer's limit is known) are the connection's to set. ``quic`` is its engine;
    ``mark_dirty(conn())`` runs after a write (``conn`` a ``weakref.ref``). Streams start
    while unacknowledged bytes stay under ``max_pending``; a frame over ``large_frame``
    bytes starts once the previous large one is nearly all in packets; ``sending`` is
    swept of streams all in packets once it holds more than twice what the last sweep
    kept (at least ``min_sweep``)."""

    __slots__ = (
        "_conn", "_create_future", "_credit_tracked", "_large_frame", "_mark_dirty",
        "_max_pending", "_min_sweep", "_quic", "_sweep_at", "last_large", "open",
        "queue_bidi", "queue_reply", "queue_uni", "receipts", "send_limit", "sending",
        "sending_bytes", "unacked", "unacked_bytes",
    )

    def __init__(
        self,
        quic: _Any,
        create_future: _Callable[[], _Any],
        mark_dirty: _Callable[[_Any], None],
        conn: _Callable[[], _Any],
        max_pending: int,
        large_frame: int,
        min_sweep: int,
    ) -> None:
        self.queue_uni: _deque[PendingSend] = _deque()
        self.queue_bidi: _deque[PendingSend] = _deque()
        self.queue_reply: _deque[PendingSend] = _deque()
        self.unacked: dict[int, PendingSend] = {}
        self.sending: dict[int, int] = {}
        self.unacked_bytes = 0
        self.sending_bytes = 0
        self.send_limit = 0
        self.last_large = -1
        self.open = False
        self.receipts = False
        self._quic = quic
        self._credit_tracked: bool = getattr(quic, "send_credit_tracked", True)
        self._create_future = create_future
        self._mark_dirty = mark_dirty
        self._conn = conn
        self._max_pending = max_pending
        self._large_frame = large_frame
        self._min_sweep = min_sweep
        self._sweep_at = min_sweep

    def start(self, payload: bytes, header: bytes, dst: bytes) -> PendingSend | None:
        """A user message (all three ``bytes``) as a ``PendingSend``, written on a new
        unidirectional stream when ``start_at_once`` would (``stream_id`` set) and not
        queued otherwise; None, with nothing done, when the connection must decide:
        not open, an empty payload, over ``send_limit``, or not all ``bytes``."""
        if (
            not self.open or type(payload) is not bytes or type(header) is not bytes
            or type(dst) is not bytes
        ):
            return None
        size = len(header) + len(dst) + len(payload)
        if not payload or size > self.send_limit or size >= 0xFFFFFFFF:
            return None
        pending = PendingSend(encode_frame(header, dst, payload, KIND_USER),
                              self._create_future())
        pending.receipt = self.receipts
        self.start_at_once(pending)
        return pending

    def start_at_once(self, pending: PendingSend) -> bool:
        """Write a small message on a new unidirectional stream now if nothing waits
        before it and credit allows, as the connection's pump would; else False (it
        queues it)."""
        size = pending.size
        if (
            not self.open or self.queue_uni or self.queue_reply or self.queue_bidi
            or (self.unacked_bytes >= self._max_pending and self.unacked)
            or size > self._large_frame
        ):
            return False
        quic = self._quic
        if self._credit_tracked and (
            quic.send_credit() < size + self.sending_bytes and not self.credit_covers(size)
        ):
            return False
        stream_id: int = quic.send_on_new_stream(True, pending.frame)
        if stream_id < 0:  # no stream credit
            return False
        self.started(pending, stream_id)
        self.sweep()
        conn = self._conn()
        if conn is not None:
            self._mark_dirty(conn)
        return True

    def started(self, pending: PendingSend, stream_id: int, awaits_ack: bool = True) -> None:
        """``pending``'s frame is on ``stream_id``: it counts as sending and, if
        ``awaits_ack`` (not a request), awaits its acknowledgement or receipt."""
        pending.stream_id = stream_id
        if pending.size > self._large_frame:
            self.last_large = stream_id
        self.sending[stream_id] = pending.size
        self.sending_bytes += pending.size
        if awaits_ack:
            self.unacked[stream_id] = pending
            self.unacked_bytes += pending.size

    def full(self) -> bool:
        """Whether unacknowledged bytes reached ``max_pending`` (no stream starts)."""
        return self.unacked_bytes >= self._max_pending and bool(self.unacked)

    def may_start(self, size: int) -> bool:
        """Whether a message of ``size`` bytes may go on a stream now: a large one when
        the previous large one is nearly all sent, a small one when the peer's credit
        covers it (see ``credit_covers``)."""
        if size > self._large_frame:
            last = self.last_large
            return last < 0 or bool(self._quic.unsent_bytes(last) <= self._large_frame)
        return self.credit_covers(size)

    def credit_covers(self, size: int) -> bool:
        """Whether the peer's flow-control credit covers a small message of ``size``
        bytes on top of what the open small streams still have to send. Starting more
        than that would leave several messages half-sent, each waiting for credit the
        receiver only returns once one completes (it then resets the newest). The one
        large message in flight is not counted: it streams as credit comes."""
        if not self._credit_tracked:
            return True
        quic = self._quic
        left: int = quic.send_credit()
        if left >= size + self.sending_bytes:
            return True  # the common case, without looking at each stream
        unsent = 0
        for sid, frame_size in list(self.sending.items()):
            rest: int = quic.unsent_bytes(sid)
            if rest == 0:  # all in packets: never walked again
                del self.sending[sid]
                self.sending_bytes -= frame_size
            elif sid != self.last_large:
                unsent += rest
        return unsent == 0 or left >= unsent + size

    def sweep(self) -> None:
        """Sweep ``sending`` if it outgrew the last sweep (see the class)."""
        if len(self.sending) <= self._sweep_at:
            return
        # requests and replies leave ``sending`` only so; the entries dropped are those
        # credit_covers drops, so no decision changes (amortized: a constant per message)
        quic = self._quic
        for sid, frame_size in list(self.sending.items()):
            if quic.unsent_bytes(sid) == 0:
                del self.sending[sid]
                self.sending_bytes -= frame_size
        self._sweep_at = max(self._min_sweep, 2 * len(self.sending))

    def stop_sending_on(self, sid: int) -> None:
        """``sid`` will send nothing more (reset by us or the peer)."""
        size = self.sending.pop(sid, None)
        if size is not None:
            self.sending_bytes -= size

    def forget(self, sid: int) -> PendingSend | None:
        """The send awaiting its acknowledgement on ``sid``, no longer counted; or None."""
        pending = self.unacked.pop(sid, None)
        if pending is not None:
            self.unacked_bytes -= pending.size
        return pending

    def complete_acked(self) -> None:
        """Complete the sends (without receipts) whose streams the peer fully
        acknowledged."""
        quic = self._quic
        done = [sid for sid, p in self.unacked.items()
                if not p.receipt and quic.send_finished(sid)]
        for sid in done:
            pending = self.unacked.pop(sid)
            self.unacked_bytes -= pending.size
            size = self.sending.pop(sid, None)  # all acknowledged: nothing left to send
            if size is not None:
                self.sending_bytes -= size
            if not pending.future.done():
                pending.future.set_result(None)

    def take_receipts(self, payload: bytes) -> list[tuple[PendingSend, int]]:
        """Complete the sends a receipt frame's payload says the peer took; return
        ``(pending, code)`` for its other entries (refused, or dropped after a stall)
        that name a send awaiting a receipt, in order, for the connection to decide.
        Entries for streams not awaiting one (not ours, cancelled, done) are ignored."""
        left: list[tuple[PendingSend, int]] = []
        unacked = self.unacked
        sending = self.sending
        taken = unsent = 0
        for sid, code in parse_receipts(payload):
            pending = unacked.get(sid)
            if pending is None or not pending.receipt:
                continue
            if code:
                left.append((pending, code))
                continue
            del unacked[sid]
            taken += pending.size
            size = sending.pop(sid, None)  # the peer took it whole: all was sent
            if size is not None:
                unsent += size
            if not pending.future.done():
                pending.future.set_result(None)
        self.unacked_bytes -= taken
        self.sending_bytes -= unsent
        return left

    def close(self) -> list[PendingSend]:
        """Not open from here on: every send queued or awaiting its acknowledgement, for
        the connection to fail, and nothing kept."""
        out = [*self.queue_uni, *self.queue_bidi, *self.queue_reply, *self.unacked.values()]
        self.open = False
        self.queue_uni.clear()
        self.queue_bidi.clear()
        self.queue_reply.clear()
        self.sending.clear()
        self.sending_bytes = 0
        self.unacked.clear()
        self.unacked_bytes = 0
        return out


class FrameAssembler:
    """Incremental decoder for ONE stream carrying exactly one frame.

    ``feed`` the stream's data as it arrives; it returns ``(kind, header, dst, payload)``
    once the frame is complete and the stream has ended, ``None`` while more is needed.
    A broken frame raises ``qp2p.errors.ProtocolError``; the assembler then stays failed
    and every later ``feed`` raises the same error. The frame header is checked against
    the limits as soon as its 16 bytes are in, before any of the body is buffered.
    """

    __slots__ = (
        "_error",
        "_head",
        "_kind",
        "_lens",
        "_max_kind",
        "_max_message_size",
        "_parts",
        "_received",
        "_seg",
        "_seg_left",
        "_state",
        "_total",
    )

    def __init__(self, max_message_size: int, max_kind: int = MAX_KIND) -> None:
        """``max_message_size`` bounds the whole frame (16 header bytes included)."""
        self._max_message_size, self._max_kind = _limits(max_message_size, max_kind)
        self._state = _HEAD
        self._head = bytearray()
        self._received = 0
        self._total = FRAME_HEADER_LEN
        self._kind = 0
        self._lens = (0, 0, 0)
        self._parts: tuple[list[bytes], list[bytes], list[bytes]] = ([], [], [])
        self._seg = 0
        self._seg_left = 0
        self._error = ""

    @property
    def buffered(self) -> int:
        """Bytes of the stream currently held (0 once the frame was returned or failed)."""
        if self._state >= _DONE:
            return 0
        return self._received

    def _fail(self, message: str) -> ProtocolError:
        self._state = _FAILED
        self._error = message
        self._head = bytearray()
        self._parts = ([], [], [])
        return ProtocolError(message)

    def _advance(self) -> None:
        # Move past finished (and empty) segments; the payload is never empty.
        while self._seg_left == 0 and self._seg < 2:
            self._seg += 1
            self._seg_left = self._lens[self._seg]

    def feed(self, data: bytes, fin: bool) -> tuple[int, bytes, bytes, bytes] | None:
        """Add the next piece of the stream; ``fin`` says the stream ended with it.

        Returns ``(kind, header, dst, payload)`` once the frame is complete and the
        stream has ended, else ``None``. Raises ``ProtocolError`` for a broken frame.
        """
        state = self._state
        if state == _FAILED:
            raise ProtocolError(self._error)
        if type(data) is not bytes:
            data = bytes(_view(data))
        n = len(data)
        if state == _DONE:
            if n:
                raise self._fail(f"{n} bytes after the end of the frame")
            return None
        pos = 0
        if state == _HEAD:
            head = self._head
            if n >= FRAME_HEADER_LEN and not head:
                head_bytes: bytes | bytearray = data  # the usual case: no copy
                pos = FRAME_HEADER_LEN
            else:
                pos = min(FRAME_HEADER_LEN - len(head), n)
                head += data[:pos]
                head_bytes = head
            self._received = len(head_bytes) if head_bytes is head else FRAME_HEADER_LEN
            if self._received < FRAME_HEADER_LEN:
                if fin:
                    raise self._fail(
                        f"stream ended after {self._received} of {FRAME_HEADER_LEN} bytes"
                    )
                return None
            try:
                kind, lh, ld, lp, total = _parse_header(
                    head_bytes, self._max_message_size, self._max_kind
                )
            except ProtocolError as exc:
                raise self._fail(exc.args[0]) from None
            self._head = bytearray()
            self._kind = kind
            self._lens = (lh, ld, lp)
            self._total = total
            self._seg = 0
            self._seg_left = lh
            self._advance()
            state = self._state = _BODY
            if fin and n == total and head_bytes is data:
                # The whole frame in one piece: slice it out directly.
                self._state = _DONE
                a = FRAME_HEADER_LEN + lh
                b = a + ld
                return kind, data[FRAME_HEADER_LEN:a], data[a:b], data[b:]
        if pos < n:
            avail = n - pos
            if state == _COMPLETE:
                raise self._fail(f"{avail} bytes after the end of the frame")
            need = self._total - self._received
            if avail > need:
                raise self._fail(f"{avail - need} bytes after the end of the frame")
            parts = self._parts
            if pos == 0 and self._seg_left >= n:
                parts[self._seg].append(data)  # the usual case: no copy
                self._seg_left -= n
                self._advance()
            else:
                while pos < n:
                    take = min(self._seg_left, n - pos)
                    parts[self._seg].append(data[pos : pos + take])
                    pos += take
                    self._seg_left -= take
                    self._advance()
            self._received += avail
            if self._received == self._total:
                state = self._state = _COMPLETE
        if not fin:
            return None
        if state != _COMPLETE:
            raise self._fail(f"stream ended after {self._received} of {self._total} bytes")
        header, dst, payload = self._parts
        result = (self._kind, b"".join(header), b"".join(dst), b"".join(payload))
        self._state = _DONE
        self._parts = ([], [], [])
        return result


_VARINT_LIMIT = 1 << 62
_VARINT_MASKS = (0x3F, 0x3FFF, 0, 0x3FFF_FFFF, 0, 0, 0, 0x3FFF_FFFF_FFFF_FFFF)


def _varint(value: _Any, what: str) -> bytes:
    v = _operator.index(value)
    if not 0 <= v < _VARINT_LIMIT:
        raise ValueError(f"{what} must be in 0..2**62-1, got {v}")
    if v < 0x40:
        return bytes((v,))
    if v < 0x4000:
        return (v | 0x4000).to_bytes(2, "big")
    if v < 0x4000_0000:
        return (v | 0x8000_0000).to_bytes(4, "big")
    return (v | 0xC000_0000_0000_0000).to_bytes(8, "big")


def encode_receipt(stream_id: int, code: int) -> bytes:
    """One receipt entry: ``stream_id`` and ``code`` (0: accepted) as QUIC varints.

    Raises ``ValueError`` for a value outside ``0..2**62-1``.
    """
    return _varint(stream_id, "stream id") + _varint(code, "code")


def parse_receipts(payload: bytes) -> list[tuple[int, int]]:
    """The ``(stream id, code)`` entries of a receipt frame's payload, in order.

    Raises ``ProtocolError("truncated receipt")`` when a varint runs past the end or
    the values do not pair up.
    """
    buf = _view(payload)
    end = len(buf)
    pos = 0
    values: list[int] = []
    while pos < end:
        length = 1 << (buf[pos] >> 6)
        if pos + length > end:
            raise ProtocolError("truncated receipt")
        values.append(int.from_bytes(buf[pos : pos + length], "big") & _VARINT_MASKS[length - 1])
        pos += length
    if len(values) % 2:
        raise ProtocolError("truncated receipt")
    return [(values[i], values[i + 1]) for i in range(0, len(values), 2)]


def parse_dcid(datagram: bytes, short_cid_len: int) -> bytes | None:
    """The destination connection ID of a QUIC packet (RFC 8999 invariants), or ``None``.

    Long header (first bit set): the length byte at offset 5 (more than 20 -> ``None``)
    and the ID after it. Short header: the ``short_cid_len`` bytes after the first byte.
    ``None`` for an empty or truncated datagram.
    """
    n_cid = _cid_len(short_cid_len)
    if type(datagram) is not bytes:
        datagram = bytes(_view(datagram))
    n = len(datagram)
    if n == 0:
        return None
    if datagram[0] & 0x80:
        if n < 6:
            return None
        length = datagram[5]
        if length > _MAX_CID_LEN or n < 6 + length:
            return None
        return datagram[6 : 6 + length]
    if n < 1 + n_cid:
        return None
    return datagram[1 : 1 + n_cid]


class ConnectionTable:
    """Destination connection ID -> connection object, consulted for every datagram.

    ``short_cid_len`` is the length of the connection IDs this endpoint issues: a short
    header packet carries no length, so the table must know it.
    """

    __slots__ = ("_short_cid_len", "_table")

    def __init__(self, short_cid_len: int) -> None:
        """An empty table for connection IDs of ``short_cid_len`` bytes (0..20)."""
        self._short_cid_len = _cid_len(short_cid_len)
        self._table: dict[object, object] = {}

    def add(self, cid: bytes, value: object) -> None:
        """Map ``cid`` to ``value`` (replacing any earlier value)."""
        self._table[cid] = value

    def remove(self, cid: bytes) -> None:
        """Forget ``cid``; no error if it is not there."""
        self._table.pop(cid, None)

    def get(self, cid: bytes) -> object | None:
        """The value for ``cid``, or ``None``."""
        return self._table.get(cid)

    def lookup(self, datagram: bytes) -> object | None:
        """The value for the destination connection ID of ``datagram``, or ``None``."""
        cid = parse_dcid(datagram, self._short_cid_len)
        if cid is None:
            return None
        return self._table.get(cid)

    def __len__(self) -> int:
        """Number of connection IDs in the table."""
        return len(self._table)

    def __contains__(self, cid: object, /) -> bool:
        """Whether ``cid`` is in the table."""
        return cid in self._table


def _batch_args(max_datagrams: _Any, bufsize: _Any) -> tuple[int, int]:
    count = _operator.index(max_datagrams)
    if count < 1:
        raise ValueError(f"max_datagrams must be at least 1, got {count}")
    size = _operator.index(bufsize)
    if size < 1:
        raise ValueError(f"bufsize must be at least 1, got {size}")
    return count, min(size, _MAX_RECV_BUFSIZE)


def recv_batch(
    sock: _socket.socket, max_datagrams: int = 64, bufsize: int = 65536
) -> list[tuple[bytes, tuple[_Any, ...]]]:
    """Read up to ``max_datagrams`` waiting datagrams from a non-blocking UDP socket.

    Returns ``[(data, address), ...]`` in arrival order, addresses as ``sock.recvfrom``
    gives them; ``[]`` when nothing is waiting. A datagram longer than ``bufsize`` is
    truncated. Errors reported for earlier datagrams (ICMP: ECONNREFUSED, ...) are
    skipped; any other error raises ``OSError``.
    """
    count, size = _batch_args(max_datagrams, bufsize)
    out: list[tuple[bytes, tuple[_Any, ...]]] = []
    recvfrom = sock.recvfrom
    for _ in range(count):
        try:
            data, addr = recvfrom(size, _DONTWAIT)
        except OSError as exc:
            if exc.errno in _RECV_STOP:
                break
            if exc.errno in _RECV_TRANSIENT:
                continue
            raise
        out.append((data, addr))
    return out


def send_batch(
    sock: _socket.socket,
    datagrams: _Sequence[tuple[bytes, tuple[_Any, ...]]],
    start: int = 0,
) -> tuple[int, int]:
    """Send ``datagrams[start:]`` (``(data, address)`` pairs) in order.

    Returns ``(next_index, errors)``. ``next_index == len(datagrams)`` when everything
    went out; it is smaller when the socket would block (EAGAIN, EWOULDBLOCK, ENOBUFS):
    wait until it is writable and call again with ``start=next_index``; nothing is
    lost. A datagram failing with any other ``OSError`` (EMSGSIZE, EHOSTUNREACH, a bad
    address, ...) is skipped and counted in ``errors``.
    """
    n = len(datagrams)
    i = _operator.index(start)
    if not 0 <= i <= n:
        raise ValueError(f"start {i} is out of range 0..{n}")
    errors = 0
    sendto = sock.sendto
    while i < n:
        data, addr = datagrams[i]
        try:
            sendto(data, _DONTWAIT, addr)
        except OSError as exc:
            if exc.errno in _SEND_STOP:
                return i, errors
            errors += 1
        i += 1
    return n, errors


def enable_gro(sock: _socket.socket) -> bool:
    """Turn on UDP GRO for ``sock`` if this implementation uses it; the twin never does."""
    return False


def features() -> dict[str, bool]:
    """Which kernel batching features this implementation uses (the twin: none)."""
    return {"recvmmsg": False, "sendmmsg": False, "gso": False, "gro": False}
