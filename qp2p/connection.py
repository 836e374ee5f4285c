"""A connection to one peer: QUIC streams in and out as discrete messages.

The endpoint feeds the engine and calls :meth:`Connection._handle_event` for each
event; everything here runs on the event loop, without a task per message.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, TypedDict, TypeVar, cast

from . import engine, wire
from .errors import (
    ConnectionClosed,
    MessageRejected,
    MessageTooLarge,
    PeerAuthenticationError,
    ProtocolError,
    RequestTimeout,
)
from .identity import PeerId
from .ratelog import RateLimitedLog
from .signal import Signal

if TYPE_CHECKING:
    from ._fastpath import Outbox, PendingSend
    from .config import Config

__all__ = [
    "ClosesOnExit",
    "Connection",
    "ConnectionStats",
    "ControlMessage",
    "Driver",
    "Message",
    "Port",
]

logger = logging.getLogger("qp2p.connection")
_peer_log = RateLimitedLog(logger)  # lines a peer can trigger: one per cause per interval

Frame = tuple[int, bytes, bytes, bytes]

#: Frames larger than this are started one at a time (the next once the previous has less
#: than this left to send): aioquic serves open streams round-robin per packet, so large
#: messages in parallel fill each packet with several small stream frames, which costs
#: per-frame work on both ends without delivering anything sooner.
LARGE_FRAME = 64 * 1024
#: Bytes of received unreliable datagrams a connection keeps for ``recv_datagram``
#: (payload plus ``DATAGRAM_COST`` each); beyond it the oldest are dropped. They are
#: charged to the endpoint's receive budget, and a datagram it has no room for is dropped.
DATAGRAM_QUEUE_BYTES = 256 * 2**10
#: What one queued datagram costs beyond its payload (the bytes object, the queue slot).
DATAGRAM_COST = 64
#: What a stream the peer keeps open with data on it costs us beyond its bytes (the
#: engine's stream state and our assembler; measured: tests/loopback/test_hardening_unread.py),
#: charged to the endpoint's receive budget until the stream ends.
STREAM_COST = 3 * 2**10
#: Streams in the Outbox's ``sending`` before the first sweep drops those whose bytes are
#: all in packets (then at twice what the last sweep kept).
SENDING_SWEEP = 256
#: Credit below which a connection the endpoint's budget starves counts as stalled.
STALL_CREDIT = 4096
#: Receipts (wire.KIND_RECEIPT) we keep for a peer that grants no stream to send them on;
#: beyond it new ones are dropped (only that peer's own send() calls then wait).
MAX_PENDING_RECEIPTS = 16384
#: MessageSink.receipts_mode: a receipt for each message from a peer's unidirectional
#: stream, or none (0: not known yet, the connection decides).
RECEIPTS_EACH = 1
RECEIPTS_NONE = 2
#: Most entries in one receipt frame (each at most 16 bytes).
RECEIPT_BATCH = 1024
#: qp2p control frames (``send_control``: introductions, relay offers and answers, path
#: checks) a connection keeps waiting for the peer's stream credit; beyond it new ones are
#: dropped and counted (``stats()["control_dropped"]``): a peer that grants no
#: unidirectional stream must not grow what we hold with each frame it makes us answer.
MAX_QUEUED_CONTROL = 64
#: Bytes of read messages released together while more messages wait to be read (the
#: rest of a burst): one release per burst, not per message. An emptied inbox, this many
#: bytes, a connection near its receive window or a starved endpoint budget release at once.
RELEASE_BATCH = 8192
#: Times one message is sent again after its stream stalled in the engine (SendStalled).
MAX_RESENDS = 3
#: Receipt frames kept until their stream is acknowledged, to be sent again if it stalls
#: (more than a peer's usual 100 open streams; beyond it the oldest goes unguarded).
MAX_KEPT_RECEIPT_FRAMES = 256


class ConnectionStats(TypedDict):
    """What :meth:`Connection.stats` returns: counters since the connection began and its
    path's congestion state. Sizes are bytes, times seconds. A new counter gets its key
    here (with its unit) and in ``Connection.stats``; a test checks the two agree."""

    bytes_sent: int
    """Bytes of QUIC packets sent (UDP payloads, all headers and retransmissions included)."""
    bytes_received: int
    """Bytes of QUIC packets received for this connection."""
    packets_sent: int
    """QUIC packets (UDP datagrams) sent."""
    packets_received: int
    """QUIC packets (UDP datagrams) received."""
    datagrams_sent: int
    """Unreliable datagrams handed to ``send_datagram``."""
    datagrams_received: int
    """Unreliable datagrams that arrived (including any later dropped)."""
    datagrams_dropped: int
    """Received datagrams dropped unread because the receive queue was full."""
    messages_sent: int
    """Messages ``send`` delivered (acknowledged by the peer)."""
    messages_received: int
    """User messages (including requests) that arrived complete."""
    requests_sent: int
    """Calls to ``request``."""
    streams_rejected: int
    """Streams from the peer reset for breaking the wire format or our limits."""
    sends_stalled: int
    """Streams of ours the engine stalled (qh3 under heavy loss, see ``SendStalled``)."""
    messages_resent: int
    """Messages sent again because the peer dropped their stalled stream unread."""
    rtt: float | None
    """Smoothed round-trip time (seconds); ``None`` before the first sample."""
    min_rtt: float | None
    """Smallest round-trip time seen (seconds); ``None`` before the first sample."""
    cwnd: int
    """Congestion window (bytes)."""
    bytes_in_flight: int
    """Bytes sent and not yet acknowledged or declared lost, as the congestion controller
    counts them."""
    unacked_bytes: int
    """Bytes of messages written to streams whose acknowledgement ``send`` still awaits."""
    buffered_bytes: int
    """Bytes received and held for this connection (unread messages, partial streams)."""
    datagram_bytes_buffered: int
    """Bytes of received datagrams waiting for ``recv_datagram`` (64 counted per datagram)."""
    queued_messages: int
    """Messages waiting for stream credit before they can be written."""
    control_dropped: int
    """qp2p's own control frames not sent because ``MAX_QUEUED_CONTROL`` of them already
    waited for the peer's stream credit."""


class Message:
    """One received message: ``header``, ``dst`` and ``payload`` bytes, and the
    ``connection`` it arrived on.

    ``is_request`` is True for a message that arrived on a bidirectional stream;
    answer it (once) with :meth:`reply`.
    """

    __slots__ = ("_replied", "_replier", "_stream_id", "connection", "dst", "header",
                 "is_request", "payload")

    def __init__(
        self,
        connection: Connection,
        header: bytes,
        dst: bytes,
        payload: bytes,
        stream_id: int | None = None,
        replier: Callable[[int, bytes, bytes, bytes], Awaitable[None]] | None = None,
    ) -> None:
        self.connection = connection
        # the connection's _reply_message for a request: checks the reply at once, then
        # returns what completes once it is acknowledged
        self._replier = replier
        self.header = header
        self.dst = dst
        self.payload = payload
        self.is_request = stream_id is not None
        self._stream_id = stream_id
        self._replied = False

    async def reply(self, payload: bytes, header: bytes = b"", dst: bytes = b"") -> None:
        """Answer this request on its own stream; returns once the peer acknowledged it.

        Raises ``MessageRejected`` (code ``0x717002``) when the asker gave up on the
        request (its ``request()`` timed out or was cancelled: it then stops the stream),
        so a reply nobody will read is not reported as sent. Only a reply already on
        the wire when the asker gives up can still be acknowledged and then dropped."""
        if self._stream_id is None or self._replier is None:
            raise ValueError("only a request (a message from request()) can be replied to")
        if self._replied:
            raise ValueError("this request was already replied to")
        sent = self._replier(self._stream_id, payload, header, dst)  # may raise
        self._replied = True
        await sent

    def __repr__(self) -> str:
        kind = "request" if self.is_request else "message"
        return (
            f"<qp2p.Message {kind} header={len(self.header)}B dst={len(self.dst)}B "
            f"payload={len(self.payload)}B>"
        )


class _Closable(Protocol):
    async def close(self) -> None: ...


_C = TypeVar("_C", bound=_Closable)


class ClosesOnExit:
    """``async with x:`` gives ``x`` and awaits ``x.close()`` on the way out (a
    :class:`Connection`, an :class:`~qp2p.Endpoint`)."""

    __slots__ = ()

    async def __aenter__(self: _C) -> _C:
        return self

    async def __aexit__(
        self: _Closable,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()


class Connection(ClosesOnExit):
    """An encrypted QUIC connection to one peer, carrying discrete messages.

    Obtain one from :meth:`Endpoint.connect_to` or :meth:`Endpoint.accept`.
    ``async with conn:`` (e.g. ``async with await ep.connect_to(addr) as conn:``) closes
    it on exit.
    """

    def __init__(
        self,
        driver: Driver,
        quic: engine.EngineConnection,
        remote_addr: wire.SockAddr,
        *,
        is_client: bool,
        attach: Callable[[Connection, Port], None],
    ) -> None:
        self._driver = driver
        self._config = config = driver.config
        self._loop = driver.loop
        self._quic = quic
        self._is_client = is_client
        self._fp = driver.fp
        self._max_message_size = config.max_message_size
        # the fast path's limit counts the whole frame, ours header+dst+payload
        self._max_frame_size = self._max_message_size + wire.FRAME_HEADER_LEN
        #: the peer's (host, port); the engine keeps the socket's full address form
        self.remote_addr: wire.Address = (remote_addr[0], remote_addr[1])
        #: the peer's id; None only for a peer that presented no certificate (only
        #: Trust.any() admits one, and every qp2p endpoint presents one): see require_peer_id
        self.peer_id: PeerId | None = None
        self._established = False
        self._keepalive: asyncio.TimerHandle | None = None
        self._closed: ConnectionClosed | None = None
        # receive side
        self._assemblers: dict[int, Any] = {}
        # streams we rejected whose FIN/reset hasn't arrived yet -> bytes seen on them: their
        # data is dropped, but counts as held until the stream ends (flow control)
        self._rejected: dict[int, int] = {}
        self._shed_pending: int | None = None  # a stream reset for lack of room, until it ends
        # set once the endpoint forgot us with messages unread: only they stay charged to
        # its budget, until recv() hands them over (or this object is collected)
        self._inbox_charged = False
        self._inbox_signal = Signal(self._loop)
        # flow control (see the engine adapters): the bound on what we hold
        self._window = config.max_buffered_bytes
        quic.attach_budget(driver.budget, self)
        self._budget = driver.budget  # charged per received datagram (_on_datagram)
        self._datagrams: collections.deque[bytes] = collections.deque()
        self._datagram_limit = -1  # max_datagram_payload, once it is fixed (established)
        self._peer_params: engine.PeerParameters | None = None  # fixed once established
        self._datagram_bytes = 0  # payload bytes queued in _datagrams
        self._datagram_signal = Signal(self._loop)
        # send side: the fast path's Outbox owns the queues, the streams being sent and
        # the sends awaiting their acknowledgement; the queues are aliased for _pump
        self._tx: Outbox = self._fp.Outbox(
            quic, self._loop.create_future, driver.mark_dirty, weakref.ref(self),
            config.max_pending_send_bytes, LARGE_FRAME, SENDING_SWEEP,
        )
        self._queue_uni = self._tx.queue_uni
        self._queue_bidi = self._tx.queue_bidi
        self._queue_reply = self._tx.queue_reply
        self._control_queued = 0  # control frames in _queue_uni (MAX_QUEUED_CONTROL)
        self._requests: dict[int, asyncio.Future[Message | ControlMessage]] = {}  # our bidi streams
        # our streams of receipts not yet acknowledged -> their frame (sent again on a stall)
        self._receipt_frames: dict[int, bytes] = {}
        self._receipt_prune = MAX_KEPT_RECEIPT_FRAMES // 4  # its size that makes a prune
        self._receipt_resends: list[bytes] = []  # frames of stalled streams, to send again
        # whether we promised the peer receipts (see engine.TP_RECEIPTS)
        self._sends_receipts = quic.local_parameters().receipts
        # we owe this peer receipts, known for good (set by _owe_receipt once established)
        self._receipting = False
        # counters for stats()
        self._stats = dict.fromkeys(
            (
                "bytes_sent",
                "bytes_received",
                "packets_sent",
                "packets_received",
                "datagrams_sent",
                "datagrams_received",
                "datagrams_dropped",
                "messages_sent",
                "messages_received",
                "requests_sent",
                "streams_rejected",
                "sends_stalled",
                "messages_resent",
                "control_dropped",
            ),
            0,
        )
        # the receive core (the fast path's MessageSink): it takes each whole message, and
        # owns the inbox ((header, dst, payload, request stream or None, stream bytes): a
        # Message is made as recv() hands it over, so a dropped connection is not kept
        # alive by a cycle), its byte count and the receipts owed to the peer for its
        # unidirectional streams (wire.KIND_RECEIPT). It holds us weakly, for that reason.
        self._rx = self._fp.MessageSink(
            weakref.WeakMethod(self._on_stream_data), weakref.ref(self), driver.mark_dirty,
            self._inbox_signal.notify_all, self._stats, self._assemblers, self._rejected,
            self._max_frame_size, 1 if is_client else 0, MAX_PENDING_RECEIPTS,
            driver.budget.starved, self._window, RELEASE_BATCH,
        )
        if not self._sends_receipts:
            self._rx.receipts_mode = RECEIPTS_NONE
        self._inbox = self._rx.inbox
        self._receipts = self._rx.receipts
        # what the endpoint driving us may do beyond the public API
        attach(self, Port(
            stats=self._stats, handle_event=self._handle_event, after_events=self._after_events,
            established=self._on_established, set_closed=self._set_closed,
            before_send=self._before_send, forgotten=self._keep_inbox_charged,
            stream_data=self._rx, datagram=self._on_datagram,
        ))

    # ------------------------------------------------------------------ public API

    @property
    def path(self) -> str:
        """``"direct"``, or ``"relayed"`` when the packets travel through a relay
        (``connect_via(..., allow_relay=True)`` without a direct path, or
        ``connect_relayed``); then ``remote_addr`` is a placeholder in 240.0.0.0/4, which
        stays when a probe finds a direct path and the connection moves onto it
        (``"direct"`` again, logged by ``qp2p.relay``)."""
        return self._driver.path(self)

    @property
    def is_closed(self) -> bool:
        """True once the connection is closed (by either side, or it timed out)."""
        return self._closed is not None

    @property
    def local_addr(self) -> wire.Address:
        """The endpoint's bound address this connection uses."""
        return self._driver.local_addr

    def require_peer_id(self) -> PeerId:
        """The peer's id, typed non-optional: what code that keys on peers should use.

        ``peer_id`` is ``None`` only for a peer that presented no certificate, which
        ``Trust.any()`` admits (every qp2p endpoint presents one, so such a peer is some
        other QUIC client); for it this raises ``PeerAuthenticationError``.
        """
        peer_id = self.peer_id
        if peer_id is None:
            raise PeerAuthenticationError(
                f"peer at {wire.addr_text(self.remote_addr)} presented no certificate"
            )
        return peer_id

    async def send(self, payload: bytes, header: bytes = b"", dst: bytes = b"") -> None:
        """Send one message on a new unidirectional stream.

        Returns once the peer acknowledged the whole stream, or, from a receiver that
        advertises receipts (``engine.TP_RECEIPTS``: qp2p on qh3, or one that does not
        advertise its limit), once its receipt says it took the message. Raises ``ValueError`` for
        an empty payload, ``MessageTooLarge`` before sending anything if it does not fit
        ``max_message_size`` or the peer's (qp2p peers advertise theirs in the handshake),
        ``MessageRejected`` if the peer refused the message (or, with ``error_code``
        ``wire.ERR_STALLED``, if qh3's engine lost track of its stream under heavy loss
        and whether the peer has it cannot be told: see README, engine differences) and
        ``ConnectionClosed`` if the connection is or becomes closed first.
        """
        # the common case (established, within the limit known for good) in one compiled call
        pending = self._tx.start(payload, header, dst)
        if pending is None:  # a check that raises, or not yet established: the long way
            pending = self._fp.PendingSend(self._frame(payload, header, dst, wire.KIND_USER),
                                           self._loop.create_future())
            pending.receipt = (self._peer_params or self._peer_parameters()).receipts
            self._tx.start_at_once(pending)
        if pending.stream_id < 0:
            self._queue_uni.append(pending)
            self._pump()
        try:
            await pending.future
        except asyncio.CancelledError:
            self._cancel_send(pending)
            raise
        self._stats["messages_sent"] += 1

    async def recv(self) -> Message:
        """The next message from this peer (sent with ``send`` or ``request``).

        Messages fully received before the connection closed are still returned; after
        that ``ConnectionClosed`` is raised.
        """
        while not self._inbox:
            self._raise_if_closed()
            await self._inbox_signal.wait()
        if self._inbox_charged:  # the engine is gone: only the budget still counts it
            header, dst, payload, sid, size = self._inbox.popleft()
            self._rx.inbox_bytes -= size
            self._driver.release_budget(size)
        else:  # credit goes back once per burst read (RELEASE_BATCH: see the sink's take)
            header, dst, payload, sid, release = self._rx.take(self._quic.held)
            if release:
                self._release(release)
        # a bound method for requests only: kept on the connection it would be a cycle,
        # and a dropped connection must be freed at once (its __del__ returns budget)
        return Message(self, header, dst, payload, sid,
                       None if sid is None else self._reply_message)

    def __aiter__(self) -> AsyncIterator[Message]:
        """``async for msg in conn``: each message as ``recv()`` returns it; ends when the
        connection closes (after the messages received before)."""
        return self._iter_messages()

    async def _iter_messages(self) -> AsyncIterator[Message]:
        while True:
            try:
                yield await self.recv()
            except ConnectionClosed:
                return

    async def request(
        self,
        payload: bytes,
        header: bytes = b"",
        dst: bytes = b"",
        timeout: float | None = None,
    ) -> Message:
        """Send a request on a new bidirectional stream and return the peer's reply.

        ``timeout`` (seconds) bounds the wait for the reply; ``None`` waits as long as the
        connection lives. Past it, the request's stream is reset and
        :class:`~qp2p.RequestTimeout` (a ``TimeoutError``) is raised.
        """
        frame = self._frame(payload, header, dst, wire.KIND_USER)
        self._stats["requests_sent"] += 1
        try:
            reply = await self._request_frame(frame, timeout)
        except asyncio.TimeoutError:
            assert timeout is not None
            raise RequestTimeout(
                f"request to {wire.addr_text(self.remote_addr)} got no reply within "
                f"{timeout:g}s",
                timeout,
            ) from None
        if not isinstance(reply, Message):  # a control frame answering a user request
            raise ProtocolError("peer answered the request with a qp2p control frame")
        return reply

    def send_datagram(self, data: bytes) -> None:
        """Send an unreliable QUIC DATAGRAM (RFC 9221); it may be lost, never split."""
        if type(data) is not bytes:
            data = wire.as_bytes("data", data)
        if self._closed is not None:
            self._raise_if_closed()
        limit = self._datagram_limit
        if limit < 0:  # not known for good yet (the peer's limit comes with the handshake)
            limit = self.max_datagram_payload
            if self._established:
                self._datagram_limit = limit
        if len(data) > limit or limit == 0:
            if limit == 0:
                raise MessageTooLarge("the peer takes no datagrams (it advertised no "
                                      "max_datagram_frame_size)")
            raise MessageTooLarge(f"datagram of {len(data)} bytes exceeds the {limit}-byte limit")
        self._quic.send_datagram(data)
        self._stats["datagrams_sent"] += 1
        self._driver.mark_dirty(self)

    async def recv_datagram(self) -> bytes:
        """The next unreliable datagram from this peer; ``ConnectionClosed`` once the
        connection is closed and every datagram received before is read.

        Unread datagrams are kept up to ``DATAGRAM_QUEUE_BYTES`` (256 KiB, 64 bytes of
        overhead counted per datagram) per connection, charged to the endpoint's
        ``max_endpoint_buffered_bytes``; beyond either the oldest (or the new one) is
        dropped and counted in ``stats()["datagrams_dropped"]``."""
        while not self._datagrams:
            self._raise_if_closed()
            await self._datagram_signal.wait()
        data = self._datagrams.popleft()
        size = len(data)
        self._datagram_bytes -= size
        budget = self._budget
        if budget.starved:  # connections wait for memory: the endpoint wakes them
            self._driver.release_budget(size + DATAGRAM_COST)
        else:  # the endpoint's _release_budget without starved ones, inlined (per datagram)
            budget.reserved -= size + DATAGRAM_COST
        return data

    async def datagrams(self) -> AsyncIterator[bytes]:
        """``async for data in conn.datagrams()``: each datagram as it arrives; ends when
        the connection closes (after the ones already received)."""
        while True:
            try:
                data = await self.recv_datagram()
            except ConnectionClosed:
                return
            yield data

    @property
    def max_datagram_payload(self) -> int:
        """The largest ``send_datagram`` payload that fits one QUIC packet and the peer's
        advertised DATAGRAM frame size (0 for a peer that takes no datagrams)."""
        # short header (1 + CID) + packet number (4) + AEAD tag (16) + frame type and length (3)
        own = self._config.max_datagram_size - (1 + engine.CID_LENGTH + 4 + 16 + 3)
        peer = self._quic.peer_max_datagram_frame_size()
        if peer is None:
            # not known before the handshake; after it, the peer takes none (RFC 9221 §3:
            # a DATAGRAM frame it did not ask for closes the connection)
            return 0 if self._established else own
        # frame type and length (3); aioquic refuses a frame of exactly the advertised size
        return max(0, min(own, peer - 4))

    def stats(self) -> ConnectionStats:
        """Counters and congestion state, a fresh :class:`ConnectionStats` dict: rtt (s),
        cwnd (bytes), bytes/packets/datagrams sent and received, messages, rejected
        streams, queued and unacknowledged bytes (each key is documented there)."""
        out: dict[str, Any] = dict(self._stats)
        out.update(self._quic.path_stats())
        out["unacked_bytes"] = self._tx.unacked_bytes
        out["buffered_bytes"] = self._quic.held
        out["datagram_bytes_buffered"] = self._datagram_bytes
        out["queued_messages"] = (
            len(self._queue_uni) + len(self._queue_bidi) + len(self._queue_reply)
        )
        return cast(ConnectionStats, out)  # its keys: tests/loopback/test_surface.py checks them

    async def close(self, reason: str = "") -> None:
        """Close gracefully; the peer sees ``reason``. Idempotent."""
        if self._closed is None:
            self._driver.close(self, reason, reason or "closed locally")

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<qp2p.Connection {self.remote_addr} peer={self.peer_id} {state}>"

    def _raise_if_closed(self) -> None:
        """Raise a fresh ``ConnectionClosed`` (re-raising one stored instance would grow
        its traceback on every call)."""
        closed = self._closed
        if closed is not None:
            raise ConnectionClosed(closed.reason, closed.error_code)

    def _peer_parameters(self) -> engine.PeerParameters:
        """The peer's qp2p transport parameters: asked of the engine until the connection
        is established, fixed (and kept) from then on."""
        params = self._peer_params
        if params is None:
            params = self._quic.peer_parameters()
            if self._established:
                self._peer_params = params
                peer_limit = params.max_message_size
                self._tx.send_limit = (self._max_message_size if peer_limit is None
                                       else min(peer_limit, self._max_message_size))
                self._tx.receipts = params.receipts
        return params

    # ------------------------------------------------------------------ sending

    def _frame(self, payload: Any, header: Any, dst: Any, kind: int) -> bytes:
        if type(payload) is not bytes:
            payload = wire.as_bytes("payload", payload)
        if type(header) is not bytes:
            header = wire.as_bytes("header", header)
        if type(dst) is not bytes:
            dst = wire.as_bytes("dst", dst)
        if not payload or len(header) + len(dst) + len(payload) > self._tx.send_limit:
            # past the limit known for good (or it is not known yet): which one, if any
            wire.check_message(header, dst, payload, self._max_message_size)  # raises
            # the peer's own limit, when it advertised one: refused here, before a byte
            # is sent, rather than sent for the peer to reject
            peer_limit = (self._peer_params or self._peer_parameters()).max_message_size
            if peer_limit is not None and peer_limit < self._max_message_size:
                wire.check_message(header, dst, payload, peer_limit,
                                   "the peer's max_message_size")
        if self._closed is not None:
            self._raise_if_closed()
        frame: bytes = self._fp.encode_frame(header, dst, payload, kind)
        return frame

    async def _request_frame(
        self, frame: bytes, timeout: float | None
    ) -> Message | ControlMessage:
        future: asyncio.Future[Message | ControlMessage] = self._loop.create_future()
        pending = self._fp.PendingSend(frame, future)
        self._queue_bidi.append(pending)
        self._pump()
        try:
            if timeout is None:
                return await future
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except (asyncio.CancelledError, asyncio.TimeoutError):
            self._cancel_send(pending)
            raise

    def _reply_message(
        self, stream_id: int, payload: bytes, header: bytes, dst: bytes
    ) -> Awaitable[None]:
        """A reply to the request on ``stream_id``: checked now (raising before anything
        is sent), sent by awaiting the result."""
        return self._reply_frame(stream_id, self._frame(payload, header, dst, wire.KIND_USER))

    async def _reply_frame(self, stream_id: int, frame: bytes) -> None:
        self._raise_if_closed()
        future: asyncio.Future[None] = self._loop.create_future()
        pending = self._fp.PendingSend(frame, future)
        pending.stream_id = stream_id
        # replies queue like messages: large ones one at a time, small ones when the
        # requester's credit covers them
        self._queue_reply.append(pending)
        self._pump()
        await future

    # ------------------------------------------------------------------ control frames
    # qp2p-internal (not in API.md): what services (qp2p.services) use to talk to the
    # peer's services. Each encodes one frame of a control ``kind`` and queues it.

    @property
    def dialled(self) -> bool:
        """True if we dialled this connection, False if we accepted it."""
        return self._is_client

    @property
    def peer_is_rendezvous(self) -> bool:
        """The peer advertised in its handshake that it introduces peers
        (``engine.TP_RENDEZVOUS``); only a claim, not a proof."""
        return self._quic.peer_parameters().rendezvous

    async def request_control(
        self, kind: int, payload: bytes, header: bytes = b"", timeout: float | None = None
    ) -> ControlMessage:
        """Send a control request on a new bidirectional stream; return the peer's reply.
        ``ProtocolError`` if the peer answered with a user message; ``MessageRejected``
        if it refused the stream; ``asyncio.TimeoutError`` past ``timeout``."""
        frame: bytes = self._fp.encode_frame(header, b"", payload, kind)
        reply = await self._request_frame(frame, timeout)
        if not isinstance(reply, ControlMessage):
            raise ProtocolError("peer answered a qp2p control request with a user message")
        return reply

    def send_control(
        self, kind: int, payload: bytes, header: bytes = b""
    ) -> asyncio.Future[None] | None:
        """Queue a control message on a fresh unidirectional stream; don't wait for it.
        Returns the future that completes once it is acknowledged (or failed), or None
        when the connection is closed or ``MAX_QUEUED_CONTROL`` control frames already
        wait for the peer's stream credit (then it is dropped and counted)."""
        if self._closed is not None:
            return None
        if self._control_queued >= MAX_QUEUED_CONTROL:
            self._stats["control_dropped"] += 1
            _peer_log.info("control-dropped", "dropping a control frame for %s: %d wait "
                           "for stream credit it does not grant",
                           wire.addr_text(self.remote_addr), self._control_queued)
            return None
        future: asyncio.Future[None] = self._loop.create_future()
        future.add_done_callback(_consume_exception)
        pending = self._fp.PendingSend(self._fp.encode_frame(header, b"", payload, kind),
                                       future)
        pending.control = True
        self._control_queued += 1
        self._queue_uni.append(pending)
        self._pump()
        return future

    def reply_control(
        self, stream_id: int, kind: int, payload: bytes, header: bytes = b""
    ) -> None:
        """Answer the peer's control request on ``stream_id`` without waiting for the
        acknowledgement (a no-op once the connection is closed or the asker gave up)."""
        if self._closed is not None:
            return
        try:
            self._quic.send_stream(stream_id, self._fp.encode_frame(header, b"", payload, kind),
                                   True)
        except ValueError:  # the requester gave up on the stream
            return
        self._driver.mark_dirty(self)

    def refuse_control(self, stream_id: int) -> None:
        """Refuse the peer's control request on ``stream_id`` (no service takes it): its
        ``request_control`` raises ``MessageRejected``."""
        self._quic.reject_stream(stream_id, wire.ERR_FRAME_REJECTED)
        self._driver.mark_dirty(self)

    def _pump(self) -> None:
        """Move queued frames onto streams while the peer grants stream credit and
        unacknowledged bytes stay under ``max_pending_send_bytes``."""
        if self._closed is not None or not self._established:
            return
        quic = self._quic
        tx = self._tx
        wrote = False
        queue: collections.deque[PendingSend]
        for queue, kind in (
            (self._queue_reply, 0), (self._queue_uni, 1), (self._queue_bidi, 2)
        ):
            if not queue:
                continue
            credit = 1 << 62 if kind == 0 else quic.streams_available(kind == 1)
            while queue and credit > 0 and not tx.full():
                head = queue[0]
                if head.future.done():  # cancelled while queued
                    queue.popleft()
                    if head.control:
                        self._control_queued -= 1
                    continue
                if not tx.may_start(head.size):
                    break
                pending = queue.popleft()
                if kind == 0:
                    stream_id = pending.stream_id
                    try:
                        quic.send_stream(stream_id, pending.frame, True)
                    except (ValueError, RuntimeError) as exc:
                        # the asker stopped (gave up on) or reset the stream
                        pending.future.set_exception(MessageRejected(
                            f"cannot reply: the asker gave up on the request ({exc})",
                            wire.ERR_CANCELLED))
                        continue
                else:
                    stream_id = quic.send_on_new_stream(kind == 1, pending.frame)
                    if stream_id < 0:  # no stream after all: it stays first in line
                        queue.appendleft(pending)
                        break
                    if pending.control:
                        self._control_queued -= 1
                    credit -= 1
                wrote = True
                tx.started(pending, stream_id, kind != 2)
                if kind == 2:
                    self._requests[stream_id] = pending.future
        if wrote:
            tx.sweep()
            self._driver.mark_dirty(self)

    def _cancel_send(self, pending: PendingSend) -> None:
        """The user gave up on a message: drop it, or reset its stream if already started."""
        if not pending.future.done():
            pending.future.cancel()
        sid = pending.stream_id
        if sid < 0 or self._closed is not None:
            return
        self._tx.forget(sid)
        asked = self._requests.pop(sid, None) is not None
        self._tx.stop_sending_on(sid)
        if asked:
            # a request: stop the reply too, so the replier's reply() fails instead of
            # reporting a reply we will drop
            self._quic.reject_stream(sid, wire.ERR_CANCELLED)
            self._driver.mark_dirty(self)
        elif not self._quic.send_finished(sid):
            self._quic.reset_stream(sid, wire.ERR_CANCELLED)
            self._driver.mark_dirty(self)

    def _check_acks(self) -> None:
        """Complete sends whose streams the peer fully acknowledged, then send more."""
        if self._tx.unacked:
            self._tx.complete_acked()
        if self._queue_uni or self._queue_bidi or self._queue_reply:
            self._pump()

    def _on_receipts(self, payload: bytes) -> None:
        """The peer's receipts for our unidirectional streams: each completes its send,
        or fails it with the peer's rejection code (or, after a stall, sends it again)."""
        tx = self._tx
        for pending, code in tx.take_receipts(payload):
            sid = pending.stream_id
            if tx.unacked.get(sid) is not pending:
                continue  # an earlier entry of this frame decided it
            if code == wire.ERR_STALLED and pending.stalled:
                self._send_again(pending)
                continue
            self._on_peer_rejected(sid, code, "refused")
            if not self._quic.send_finished(sid):  # its STOP_SENDING may still come
                self._quic.reset_stream(sid, code)
                self._driver.mark_dirty(self)
        if self._queue_uni or self._queue_bidi or self._queue_reply:
            self._pump()

    def _send_again(self, pending: PendingSend) -> None:
        """The peer dropped ``pending``'s stalled stream unread: queue it first, for a new
        stream (``_on_receipts`` pumps after it)."""
        self._tx.forget(pending.stream_id)
        pending.stream_id = -1
        pending.stalled = False
        pending.resends += 1
        self._stats["messages_resent"] += 1
        self._queue_uni.appendleft(pending)  # (a message: control frames take no receipts)

    def _owe_receipt(self, sid: int, code: int) -> None:
        """The peer's unidirectional stream ``sid`` was taken whole (code 0) or rejected:
        tell the peer, if we promised receipts and it is a qp2p peer (sent at the next
        flush)."""
        if not self._sends_receipts or (
            self._peer_params or self._peer_parameters()
        ) == engine.NO_PARAMETERS:
            if self._peer_params is not None:  # fixed from here on: none for this peer
                self._rx.receipts_mode = RECEIPTS_NONE
            return
        self._receipting = self._peer_params is not None  # fixed from here on
        if self._receipting:
            self._rx.receipts_mode = RECEIPTS_EACH
        if len(self._receipts) < MAX_PENDING_RECEIPTS:
            self._receipts.append(self._fp.encode_receipt(sid, code))
            self._driver.mark_dirty(self)

    def _flush_receipts(self) -> None:
        """Write the receipts owed, while the peer grants streams (the endpoint calls this
        before asking the engine for datagrams, and before a close)."""
        receipts = self._receipts
        quic = self._quic
        if self._closed is not None:
            receipts.clear()
            self._receipt_resends.clear()
            return
        peer_limit = quic.peer_parameters().max_message_size
        batch = RECEIPT_BATCH
        if peer_limit is not None:  # each frame must fit the peer's own limit
            batch = max(1, min(batch, peer_limit // 16))
        kept = self._receipt_frames
        if len(kept) >= self._receipt_prune:  # amortized: a constant per frame
            for sid in [sid for sid in kept if quic.send_finished(sid)]:
                del kept[sid]
            self._receipt_prune = max(MAX_KEPT_RECEIPT_FRAMES // 4, 2 * len(kept))
        resends = self._receipt_resends
        while resends and quic.streams_available(True) > 0:
            self._send_receipt_frame(resends.pop(0))
        while receipts and quic.streams_available(True) > 0:
            payload = b"".join(receipts[:batch])
            del receipts[:batch]
            self._send_receipt_frame(self._fp.encode_frame(b"", b"", payload, wire.KIND_RECEIPT))

    def _send_receipt_frame(self, frame: bytes) -> None:
        kept = self._receipt_frames
        kept[self._quic.send_on_new_stream(True, frame)] = frame
        if len(kept) > MAX_KEPT_RECEIPT_FRAMES:  # a peer acknowledging none: the oldest
            del kept[next(iter(kept))]  # goes unguarded

    # ------------------------------------------------------------------ events

    def _after_events(self) -> None:
        """A burst of events ended: shed a stalled stream, complete acknowledged sends."""
        self._check_receive_stall()
        self._check_acks()

    def _before_send(self) -> None:
        """The endpoint is about to collect our datagrams: write the receipts owed."""
        if self._receipts or self._receipt_resends:
            self._flush_receipts()

    def _handle_event(self, event: engine.Event) -> None:
        """Dispatch one engine event (called by the endpoint, on the loop)."""
        kind = type(event)
        if kind is engine.StreamData:
            self._on_stream_data(event.stream_id, event.data, event.end_stream)  # type: ignore[attr-defined]
        elif kind is engine.Datagram:
            self._on_datagram(event.data)  # type: ignore[attr-defined]
        elif kind is engine.StopSending:
            self._on_peer_rejected(event.stream_id, event.error_code, "stopped")  # type: ignore[attr-defined]
        elif kind is engine.StreamReset:
            self._on_stream_reset(event.stream_id, event.error_code)  # type: ignore[attr-defined]
        elif kind is engine.SendStalled:
            self._on_send_stalled(event.stream_id)  # type: ignore[attr-defined]

    def _on_send_stalled(self, sid: int) -> None:
        """Our engine will never complete stream ``sid`` (see engine.SendStalled). A message
        whose receiver sends receipts: reset the stream; the receipt then says whether the
        peer took it whole (the send completes) or dropped it (``ERR_STALLED``: it goes
        again, on a new stream), so it arrives exactly once. Receipts are sent again as
        they are (the peer ignores a repeated one). Anything else (a request, a reply, a
        send to a peer without receipts, a message stalled more than MAX_RESENDS times)
        cannot be told apart from one the peer took: it fails with ``MessageRejected``
        (``ERR_STALLED``) rather than wait for good."""
        quic = self._quic
        pending = self._tx.unacked.get(sid)
        if pending is not None and pending.receipt and pending.resends < MAX_RESENDS:
            pending.stalled = True
            quic.reset_stream(sid, wire.ERR_STALLED)
            self._tx.stop_sending_on(sid)
        elif (frame := self._receipt_frames.pop(sid, None)) is not None:
            quic.reset_stream(sid, wire.ERR_STALLED)
            self._receipt_resends.append(frame)  # by _flush_receipts, as streams allow
        elif pending is not None or sid in self._requests:
            quic.reset_stream(sid, wire.ERR_STALLED)
            self._fail_stream(sid, wire.ERR_STALLED, "our QUIC engine lost track of the {}'s "
                              "stream (qh3 under heavy loss): the peer may or may not have it")
        else:
            return  # done or gone meanwhile
        self._stats["sends_stalled"] += 1
        self._driver.mark_dirty(self)

    def _on_stream_data(self, sid: int, data: bytes, fin: bool) -> None:
        assembler = self._assemblers.get(sid)
        if assembler is None and self._rejected and sid in self._rejected:
            if fin:  # the stream is over: nothing of it is held any more
                self._release(self._rejected.pop(sid) + len(data))
                if sid == self._shed_pending:
                    self._shed_pending = None
            else:
                self._rejected[sid] += len(data)
            return
        size = len(data)  # bytes of this stream so far
        try:
            if assembler is None:
                if fin:  # the whole frame in one piece: the common case for small messages
                    frame: Frame | None = self._fp.decode_frame(data, self._max_frame_size)
                else:
                    assembler = self._assemblers[sid] = self._fp.FrameAssembler(
                        self._max_frame_size
                    )
                    self._driver.charge_budget(STREAM_COST, True)
                    frame = assembler.feed(data, fin)
            else:
                size += assembler.buffered
                frame = assembler.feed(data, fin)
                if frame is not None or fin:
                    self._drop_assembler(sid)
        except ProtocolError as exc:
            self._drop_assembler(sid)
            if fin:
                self._release(size)
            else:
                self._rejected[sid] = size
            self._reject(sid, exc)
            return
        if frame is not None:
            self._on_frame(sid, frame, size)

    def _drop_assembler(self, sid: int) -> Any:
        """The stream ``sid`` no longer assembles a frame: its cost goes back to the
        budget. Returns its assembler, if it had one."""
        assembler = self._assemblers.pop(sid, None)
        if assembler is not None:
            self._driver.release_budget(STREAM_COST)
        return assembler

    def _check_receive_stall(self) -> None:
        """Called by the endpoint after a burst of packets. When the peer cannot send
        more (the bound is reached, or the endpoint's budget has nothing left for us) and
        nothing waits for ``recv()``, no read can free credit: only unfinished streams
        (half-sent messages, out-of-order data) hold it. Reset the newest of them, keeping
        the oldest so it can complete; its bytes are released when the peer answers with
        RESET_STREAM. Between qp2p peers this happens only under memory pressure: a sender
        starts large messages one at a time and the bound fits the largest."""
        quic = self._quic
        if self._inbox or self._closed is not None:
            return
        if self._shed_pending is not None:  # one at a time: its bytes may be all we need
            if quic.has_stream(self._shed_pending):
                return
            self._shed_pending = None
        if quic.held < self._window and not (quic.credit_left() < STALL_CREDIT and quic.starved()):
            return
        candidates = [
            sid for sid in self._quic.receiving_streams() if sid not in self._rejected
        ]
        if len(candidates) < 2:
            return
        sid = max(candidates)
        self._shed_pending = sid
        assembler = self._drop_assembler(sid)
        self._rejected[sid] = assembler.buffered if assembler is not None else 0
        self._reject(
            sid,
            ProtocolError(f"receive buffer full ({self._quic.held} bytes of unfinished streams)"),
            wire.ERR_BUFFER_FULL,
        )

    def _reject(self, sid: int, exc: ProtocolError, code: int = wire.ERR_FRAME_REJECTED) -> None:
        self._stats["streams_rejected"] += 1
        _peer_log.warning(f"reject-{code:#x}", "rejecting stream %d from %s: %s", sid,
                          self.remote_addr, exc)
        self._quic.reject_stream(sid, code)
        if sid & 2 and (sid & 1) != (0 if self._is_client else 1):
            self._owe_receipt(sid, code)  # STOP_SENDING may be lost or not sent (qh3)
        self._tx.stop_sending_on(sid)
        future = self._requests.pop(sid, None)
        if future is not None and not future.done():
            if code == wire.ERR_BUFFER_FULL:  # not the peer's fault: our buffer was full
                future.set_exception(MessageRejected(f"reply dropped: {exc}", code))
            else:
                future.set_exception(ProtocolError(f"malformed reply: {exc}"))
        self._driver.mark_dirty(self)

    def _on_frame(self, sid: int, frame: Frame, size: int) -> None:
        """A complete frame of ``size`` bytes (its whole stream) arrived on ``sid``."""
        kind, header, dst, payload = frame
        if kind == wire.KIND_USER and (sid & 1) != (0 if self._is_client else 1):
            if sid & 2:
                receipts = self._receipts
                if self._receipting and len(receipts) < MAX_PENDING_RECEIPTS:
                    # _owe_receipt's common case, inlined (once per message)
                    receipts.append(self._fp.encode_receipt(sid, 0))
                    self._driver.mark_dirty(self)
                else:
                    self._owe_receipt(sid, 0)
            self._stats["messages_received"] += 1
            self._inbox.append((header, dst, payload, None if sid & 2 else sid, size))
            self._rx.inbox_bytes += size
            self._inbox_signal.notify_all()
            return  # held until recv() hands it over
        self._release(size)  # anything else is handled (or dropped) right here
        local = (sid & 1) == (0 if self._is_client else 1)
        if local:  # a reply on one of our own bidirectional streams
            future = self._requests.pop(sid, None)
            if future is None or future.done():
                return
            if kind == wire.KIND_USER:
                future.set_result(Message(self, header, dst, payload))
            else:
                future.set_result(ControlMessage(kind, header, dst, payload, None))
            return
        if kind == wire.KIND_RECEIPT and sid & 2:
            try:
                self._on_receipts(payload)
            except ProtocolError as exc:
                self._stats["streams_rejected"] += 1
                logger.debug("malformed receipt from %s: %s", self.remote_addr, exc)
            return
        self._driver.control(self, ControlMessage(kind, header, dst, payload,
                                                 None if sid & 2 else sid))

    def _release(self, nbytes: int) -> None:
        """``nbytes`` of stream data are no longer held: the peer may send that much more."""
        if nbytes <= 0:
            return
        self._quic.release(nbytes)
        self._driver.release_credit(self, nbytes)
        # MAX_DATA goes out once the peer has used half its credit; a blocked peer sends
        # nothing we would answer with a packet, so flush for it now
        if self._quic.credit_low():
            self._driver.mark_dirty(self)
        elif not self._inbox and self._quic.starved():
            # nothing left to read and still no credit: only unfinished streams hold it
            self._check_receive_stall()

    def _on_datagram(self, data: bytes) -> None:
        stats = self._stats
        stats["datagrams_received"] += 1
        queue = self._datagrams
        size = len(data)
        cost = size + DATAGRAM_COST
        if self._datagram_bytes + len(queue) * DATAGRAM_COST + cost > DATAGRAM_QUEUE_BYTES:
            freed = 0
            while queue and self._datagram_bytes + len(queue) * DATAGRAM_COST + cost > (
                DATAGRAM_QUEUE_BYTES
            ):  # unreliable: the oldest go first
                old = queue.popleft()
                self._datagram_bytes -= len(old)
                freed += len(old) + DATAGRAM_COST
                stats["datagrams_dropped"] += 1
            if freed:
                self._driver.release_budget(freed)
        budget = self._budget  # the endpoint's _charge_budget, inlined (per datagram)
        if cost > DATAGRAM_QUEUE_BYTES or budget.reserved + cost > budget.limit:
            stats["datagrams_dropped"] += 1
            return
        budget.reserved += cost
        queue.append(data)
        self._datagram_bytes += size
        self._datagram_signal.notify_all()

    def _on_peer_rejected(self, sid: int, code: int, how: str) -> None:
        self._fail_stream(sid, code, f"peer {how} the {{}}'s stream (code {code:#x})")

    def _fail_stream(self, sid: int, code: int, text: str) -> None:
        """The send or request on our stream ``sid`` fails with ``MessageRejected(text,
        code)`` (``text`` names it at ``{}``: "message" or "request")."""
        self._tx.stop_sending_on(sid)
        pending = self._tx.forget(sid)
        if pending is not None and not pending.future.done():
            pending.future.set_exception(MessageRejected(text.format("message"), code))
        future = self._requests.pop(sid, None)
        if future is not None and not future.done():
            future.set_exception(MessageRejected(text.format("request"), code))

    def _on_stream_reset(self, sid: int, code: int) -> None:
        # everything the stream counted against flow control is gone: what we were
        # assembling, what we were dropping, and what never arrived below its final size
        nbytes = self._quic.undelivered_bytes(sid) + self._rejected.pop(sid, 0)
        if sid == self._shed_pending:
            self._shed_pending = None
        assembler = self._drop_assembler(sid)
        if assembler is not None:
            nbytes += assembler.buffered
        self._release(nbytes)
        self._on_peer_rejected(sid, code, "reset")
        if code == wire.ERR_STALLED and sid & 2 and (sid & 1) != (0 if self._is_client else 1):
            # the peer's engine stalled it and we did not take it: say so, and it comes
            # again (a stream we took whole was receipted, and its reset is not reported)
            self._owe_receipt(sid, wire.ERR_STALLED)

    # ------------------------------------------------------------------ lifecycle

    def _keep_inbox_charged(self) -> int:
        """The endpoint forgets us: the bytes of our unread messages, which stay charged
        to its budget until ``recv()`` takes them (or this connection is collected).
        Queued datagrams are charged apart from the engine and stay so too; streams that
        began arriving while the engine drained are over."""
        if self._assemblers:
            self._driver.release_budget(STREAM_COST * len(self._assemblers))
            self._assemblers.clear()
        inbox_bytes: int = self._rx.inbox_bytes
        self._inbox_charged = inbox_bytes > 0
        self._rx.unreleased = 0  # still held by the engine: the endpoint releases them
        return inbox_bytes

    def __del__(self) -> None:
        # an application that dropped a connection without reading it: give the
        # endpoint's budget back what its messages and datagrams still held
        charged = getattr(self, "_datagram_bytes", 0) + DATAGRAM_COST * len(
            getattr(self, "_datagrams", ())
        )
        if getattr(self, "_inbox_charged", False):
            charged += self._rx.inbox_bytes
        if charged > 0:
            self._driver.release_budget_soon(charged)

    def _on_established(self, peer_id: PeerId | None) -> None:
        self.peer_id = peer_id
        self._established = True
        self._tx.open = self._closed is None
        self._quic.release_handshake_buffers()
        if self._config.keep_alive_interval is not None:
            self._schedule_keepalive()
        self._pump()

    def _schedule_keepalive(self) -> None:
        interval = self._config.keep_alive_interval
        assert interval is not None
        self._keepalive = self._loop.call_later(interval, self._send_keepalive)

    def _send_keepalive(self) -> None:
        if self._closed is not None:
            return
        self._quic.ping()
        self._driver.mark_dirty(self)
        self._schedule_keepalive()

    def _set_closed(self, exc: ConnectionClosed) -> None:
        """Fail everything waiting on this connection; keep already received messages."""
        if self._closed is not None:
            return
        self._tx.complete_acked()  # acknowledged before the close: those sends succeeded
        self._closed = exc
        if self._keepalive is not None:
            self._keepalive.cancel()
            self._keepalive = None
        for pending in self._tx.close():
            if not pending.future.done():
                pending.future.set_exception(exc)
        self._control_queued = 0
        for future in self._requests.values():
            if not future.done():
                future.set_exception(exc)
        self._requests.clear()
        if self._assemblers:
            self._driver.release_budget(STREAM_COST * len(self._assemblers))
            self._assemblers.clear()
        self._inbox_signal.notify_all()
        self._datagram_signal.notify_all()
        self._driver.closed(self, bool(self._inbox))

    def debug_snapshot(self) -> dict[str, Any]:
        """Internal state, copied, for tests and diagnostics: **not** part of the API, no
        stability promise (keys and values may change in any release).

        Keys: ``inbox_messages`` / ``inbox_bytes`` (received, not yet read),
        ``assemblers`` (incoming streams with a frame being assembled), ``unacked_streams``
        (our streams whose send awaits its acknowledgement or receipt), ``receipt_streams``
        (our unacknowledged streams of receipts); from the engine:
        ``held`` (stream bytes received, not released), ``credit`` (the receive window it
        grants, or None), ``reservation`` (what the peer may still make us hold),
        ``starved`` (the endpoint's budget could not give the credit wanted),
        ``tracked_streams`` (per-stream entries kept), ``peer_parameters`` (qp2p's
        transport parameters the peer advertised)."""
        quic = self._quic
        return {
            "inbox_messages": len(self._inbox),
            "inbox_bytes": self._rx.inbox_bytes,
            "assemblers": len(self._assemblers),
            "unacked_streams": sorted(self._tx.unacked),
            "receipt_streams": sorted(
                sid for sid in self._receipt_frames if not quic.send_finished(sid)
            ),
            "held": quic.held,
            "credit": getattr(quic, "credit", None),  # an adapter's, not the Protocol's
            "reservation": quic.reservation(),
            "starved": quic.starved(),
            "tracked_streams": quic.tracked_streams(),
            "peer_parameters": quic.peer_parameters(),
        }


def _consume_exception(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()


class ControlMessage(NamedTuple):
    """One of qp2p's own frames (kind != 0): a control request or message from the peer,
    or the reply to one of ours. ``stream_id`` is the bidirectional stream to answer on
    (:meth:`Connection.reply_control`), ``None`` for a unidirectional message or a reply."""

    kind: int
    header: bytes
    dst: bytes
    payload: bytes
    stream_id: int | None


@dataclass(frozen=True, slots=True)
class Driver:
    """What a connection asks of the endpoint that drives it, as plain values and
    callbacks: this layer never imports the endpoint (imports go downward)."""

    config: Config
    loop: asyncio.AbstractEventLoop
    fp: Any  # the fast path module (_fastpath or _purepy)
    budget: engine.ReceiveBudget  # the endpoint-wide receive budget the engine draws on
    local_addr: wire.Address
    #: the connection has something to send: flush it with the others this loop turn
    mark_dirty: Callable[[Connection], None]
    #: bytes held outside the engine's credit go back to the budget / are charged to it
    #: (``force``: even over its limit); ``release_budget_soon`` is safe in a finalizer
    release_budget: Callable[[int], None]
    #: stream data no longer held: back to the budget while it counts the connection
    release_credit: Callable[[Connection, int], None]
    charge_budget: Callable[[int, bool], bool]
    release_budget_soon: Callable[[int], None]
    #: close gracefully (``reason`` for the peer, the other for our ConnectionClosed)
    close: Callable[[Connection, str, str], None]
    #: the connection just became closed (any cause), with messages unread or not: drop it
    #: from the pool and queues
    closed: Callable[[Connection, bool], None]
    #: a control frame from the peer (not a reply): route it to its service by kind
    control: Callable[[Connection, ControlMessage], None]
    #: ``Connection.path``: "direct", or "relayed" while its packets go through a relay
    path: Callable[[Connection], str]


@dataclass(frozen=True, slots=True)
class Port:
    """What the endpoint driving a connection may do to it beyond its public API: handed
    to the endpoint when the connection is made (``Connection(attach=...)``), so the
    seam between the two is this list, not the connection's attributes."""

    #: the connection's counters; the endpoint counts the packets and bytes it moves
    stats: dict[str, int]
    #: a stream, datagram, stop-sending or reset event of the connection's engine
    handle_event: Callable[[engine.Event], None]
    #: a burst of events ended: shed a stalled stream, complete acknowledged sends
    after_events: Callable[[], None]
    #: both sides accepted each other (with the peer's id): hand it to the user
    established: Callable[[PeerId | None], None]
    #: the connection is closed: fail what waits, keep what arrived
    set_closed: Callable[[ConnectionClosed], None]
    #: the endpoint is about to collect the engine's datagrams
    before_send: Callable[[], None]
    #: the endpoint stops driving it: returns the unread bytes that stay charged
    forgotten: Callable[[], int]
    #: stream bytes (``StreamData``'s fields): what ``handle_event`` does with one, without
    #: the dispatch (the receive loop's per-message call)
    stream_data: Callable[[int, bytes, bool], None]
    #: a DATAGRAM's payload (``Datagram``'s field), likewise
    datagram: Callable[[bytes], None]
