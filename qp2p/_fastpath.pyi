"""Types of the compiled fast path; ``qp2p._purepy`` is its pure-Python twin.

Both modules expose these names with the same behaviour, byte-identical results and
identical exceptions (type and message). Errors for bad wire data are
``qp2p.errors.ProtocolError``.
"""

import socket
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from typing_extensions import disjoint_base

from qp2p.errors import ProtocolError as ProtocolError

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

FRAME_HEADER_LEN: int
"""Bytes in the fixed frame header (16)."""
WIRE_VERSION: int
"""The frame version this code speaks (0x0002)."""
KIND_USER: int
"""Frame kind of a user message (0)."""
MAX_KIND: int
"""Kinds ``0..MAX_KIND`` (7) are valid; ``1..7`` are qp2p's own control messages."""

def encode_frame(header: bytes, dst: bytes, payload: bytes, kind: int = 0) -> bytes:
    """One frame: the 16-byte frame header, then ``header``, ``dst`` and ``payload``.

    The frame header is ``u16 version=2, u32 len(header), u32 len(dst),
    u32 len(payload), u8 kind, u8 0``, big-endian. Accepts any bytes-like objects.
    Raises ``ValueError`` if ``kind`` is not in ``0..255`` or a part is ``2**32`` bytes
    or longer. No size or emptiness policy: the caller checks those.
    """

def decode_frame(
    data: bytes, max_message_size: int, max_kind: int = MAX_KIND
) -> tuple[int, bytes, bytes, bytes]:
    """Decode a whole frame held in one buffer: ``(kind, header, dst, payload)``.

    Same checks and ``ProtocolError`` messages as ``FrameAssembler`` fed ``data`` with
    ``fin=True``.
    """

@disjoint_base
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

    pulled: int
    receiver: Callable[[int, bytes, bool], None] | None
    datagram_receiver: Callable[[bytes], None] | None

    def __init__(
        self,
        unfinished: set[int],
        created: set[int],
        rejected: dict[int, int],
        peer_streams: dict[int, int],
        fin_pulled: set[int],
        peer_parity: int,
    ) -> None: ...
    def pull(
        self, next_event: Callable[[], tuple[Any, ...] | None], budget: Any, room: int
    ) -> tuple[Any, ...] | None:
        """The next event for the adapter, None, or ``()`` (see the class)."""

@disjoint_base
class DirtySet:
    """An endpoint's connections with something to send: calling it with a connection
    adds it to ``dirty`` (a dict used as an ordered set) and, unless one is already
    scheduled (``scheduled``), schedules ``flush`` with ``call_soon``, so that everything
    written in one turn of the loop goes out in one batch. ``flush`` sets ``scheduled``
    back to False when it runs."""

    dirty: dict[Any, None]
    scheduled: bool

    def __init__(self, call_soon: Callable[..., Any], flush: Callable[[], None]) -> None: ...
    def __call__(self, conn: Any) -> None:
        """Mark ``conn`` dirty (see the class)."""

@disjoint_base
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

    inbox: deque[tuple[bytes, bytes, bytes, int | None, int]]
    inbox_bytes: int
    receipts: list[bytes]
    receipts_mode: int
    unreleased: int

    def __init__(
        self,
        fallback: Callable[[], Callable[[int, bytes, bool], None] | None],
        conn: Callable[[], Any],
        mark_dirty: Callable[[Any], None],
        notify: Callable[[], None],
        stats: dict[str, int],
        assemblers: dict[int, Any],
        rejected: dict[int, int],
        max_frame_size: int,
        peer_parity: int,
        max_receipts: int,
        starved: dict[Any, None],
        window: int,
        release_batch: int,
    ) -> None: ...
    def take(self, held: int) -> tuple[bytes, bytes, bytes, int | None, int]:
        """The oldest message of ``inbox`` as ``(header, dst, payload, stream_id or None,
        release)``; its bytes leave ``inbox_bytes``. ``release`` is what to release now
        (its bytes and those of the messages read before it, then no longer counted in
        ``unreleased``), or 0 while nobody waits for this credit: more of the burst is in
        the inbox, fewer than ``release_batch`` bytes are unreleased, ``starved`` is
        empty (no connection waits for the endpoint's budget) and ``held``, the bytes
        the engine holds, stays ``release_batch`` under ``window``."""
    def __call__(self, sid: int, data: bytes, fin: bool) -> None:
        """Take one piece of stream data (see the class)."""

@disjoint_base
class PendingSend:
    """One frame of ours waiting for stream credit, for its acknowledgement or for its
    receipt (``receipt``: the peer sends one, and the send completes on it, not on the
    ACK). ``stream_id`` is -1 until it is written; ``control``: from ``send_control``;
    ``stalled``: we reset its stream for a stall, a receipt says what next; ``resends``:
    times sent again after a stall."""

    frame: bytes
    future: Any
    size: int
    stream_id: int
    receipt: bool
    control: bool
    stalled: bool
    resends: int

    def __init__(self, frame: bytes, future: Any) -> None: ...

@disjoint_base
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

    queue_uni: deque[PendingSend]
    queue_bidi: deque[PendingSend]
    queue_reply: deque[PendingSend]
    unacked: dict[int, PendingSend]
    sending: dict[int, int]
    unacked_bytes: int
    sending_bytes: int
    send_limit: int
    last_large: int
    open: bool
    receipts: bool

    def __init__(
        self,
        quic: Any,
        create_future: Callable[[], Any],
        mark_dirty: Callable[[Any], None],
        conn: Callable[[], Any],
        max_pending: int,
        large_frame: int,
        min_sweep: int,
    ) -> None: ...
    def start(self, payload: bytes, header: bytes, dst: bytes) -> PendingSend | None:
        """A user message (all three ``bytes``) as a ``PendingSend``, written on a new
        unidirectional stream when ``start_at_once`` would (``stream_id`` set) and not
        queued otherwise; None, with nothing done, when the connection must decide:
        not open, an empty payload, over ``send_limit``, or not all ``bytes``."""
    def start_at_once(self, pending: PendingSend) -> bool:
        """Write a small message on a new unidirectional stream now if nothing waits
        before it and credit allows, as the connection's pump would; else False (it
        queues it)."""
    def started(self, pending: PendingSend, stream_id: int, awaits_ack: bool = True) -> None:
        """``pending``'s frame is on ``stream_id``: it counts as sending and, if
        ``awaits_ack`` (not a request), awaits its acknowledgement or receipt."""
    def full(self) -> bool:
        """Whether unacknowledged bytes reached ``max_pending`` (no stream starts)."""
    def may_start(self, size: int) -> bool:
        """Whether a message of ``size`` bytes may go on a stream now: a large one when
        the previous large one is nearly all sent, a small one when the peer's credit
        covers it (see ``credit_covers``)."""
    def credit_covers(self, size: int) -> bool:
        """Whether the peer's flow-control credit covers a small message of ``size``
        bytes on top of what the open small streams still have to send. Starting more
        than that would leave several messages half-sent, each waiting for credit the
        receiver only returns once one completes (it then resets the newest). The one
        large message in flight is not counted: it streams as credit comes."""
    def sweep(self) -> None:
        """Sweep ``sending`` if it outgrew the last sweep (see the class)."""
    def stop_sending_on(self, sid: int) -> None:
        """``sid`` will send nothing more (reset by us or the peer)."""
    def forget(self, sid: int) -> PendingSend | None:
        """The send awaiting its acknowledgement on ``sid``, no longer counted; or None."""
    def complete_acked(self) -> None:
        """Complete the sends (without receipts) whose streams the peer fully
        acknowledged."""
    def take_receipts(self, payload: bytes) -> list[tuple[PendingSend, int]]:
        """Complete the sends a receipt frame's payload says the peer took; return
        ``(pending, code)`` for its other entries (refused, or dropped after a stall)
        that name a send awaiting a receipt, in order, for the connection to decide.
        Entries for streams not awaiting one (not ours, cancelled, done) are ignored."""
    def close(self) -> list[PendingSend]:
        """Not open from here on: every send queued or awaiting its acknowledgement, for
        the connection to fail, and nothing kept."""

@disjoint_base
class FrameAssembler:
    """Incremental decoder for ONE stream carrying exactly one frame.

    ``feed`` the stream's data as it arrives. The frame header is checked as soon as
    its 16 bytes are in, before any of the body is buffered; only what has arrived is
    ever allocated. On a broken frame ``feed`` raises ``ProtocolError`` and the
    assembler stays failed: every later ``feed`` raises the same error. Messages:

    - ``unsupported frame version 0x%04x``
    - ``unknown frame kind %d`` (kind > ``max_kind``)
    - ``reserved byte is %d, not 0``
    - ``frame of %d bytes exceeds the limit of %d`` (16 + lengths > ``max_message_size``)
    - ``empty payload``
    - ``%d bytes after the end of the frame``
    - ``stream ended after %d of %d bytes`` (16 is the expected total while the frame
      header is incomplete)
    """

    def __init__(self, max_message_size: int, max_kind: int = MAX_KIND) -> None:
        """``max_message_size`` bounds the whole frame, its 16 header bytes included.

        Raises ``ValueError`` if it is negative or ``max_kind`` is not in ``0..255``.
        """

    def feed(self, data: bytes, fin: bool) -> tuple[int, bytes, bytes, bytes] | None:
        """Add the next piece of the stream; ``fin`` says the stream ended with it.

        Returns ``(kind, header, dst, payload)`` once the frame is complete and the
        stream has ended, ``None`` while more is needed. Raises ``ProtocolError``.
        """

    @property
    def buffered(self) -> int:
        """Bytes of the stream currently held (0 once the frame was returned or failed)."""

def encode_receipt(stream_id: int, code: int) -> bytes:
    """One receipt entry: ``stream_id`` and ``code`` (0: accepted) as QUIC varints.

    Raises ``ValueError`` for a value outside ``0..2**62-1``.
    """

def parse_receipts(payload: bytes) -> list[tuple[int, int]]:
    """The ``(stream id, code)`` entries of a receipt frame's payload, in order.

    Raises ``ProtocolError("truncated receipt")`` when a varint runs past the end or
    the values do not pair up.
    """

def parse_dcid(datagram: bytes, short_cid_len: int) -> bytes | None:
    """The destination connection ID of a QUIC packet (RFC 8999 invariants), or ``None``.

    Long header (first bit set): needs 6 bytes; the byte at offset 5 is the ID's length
    (more than 20 -> ``None``) and the ID follows. Short header: the ``short_cid_len``
    bytes after the first byte. ``None`` for an empty or truncated datagram. Raises
    ``ValueError`` if ``short_cid_len`` is not in ``0..20``.
    """

@disjoint_base
class ConnectionTable:
    """Destination connection ID -> connection object, consulted for every datagram."""

    def __init__(self, short_cid_len: int) -> None:
        """An empty table; ``short_cid_len`` (0..20) is the length of short-header IDs."""

    def add(self, cid: bytes, value: object) -> None:
        """Map ``cid`` to ``value`` (replacing any earlier value)."""

    def remove(self, cid: bytes) -> None:
        """Forget ``cid``; no error if it is not there."""

    def get(self, cid: bytes) -> object | None:
        """The value for ``cid``, or ``None``."""

    def lookup(self, datagram: bytes) -> object | None:
        """The value for the destination connection ID of ``datagram``, or ``None``.

        ``parse_dcid`` and ``get`` in one call: the receive hot path.
        """

    def __len__(self) -> int:
        """Number of connection IDs in the table."""

    def __contains__(self, cid: object, /) -> bool:
        """Whether ``cid`` is in the table."""

def recv_batch(
    sock: socket.socket, max_datagrams: int = 64, bufsize: int = 65536
) -> list[tuple[bytes, tuple[Any, ...]]]:
    """Read up to ``max_datagrams`` waiting datagrams from a non-blocking UDP socket.

    Returns ``[(data, address), ...]`` in arrival order, addresses exactly as
    ``sock.recvfrom`` gives them (``(host, port)`` for IPv4, ``(host, port, flowinfo,
    scope_id)`` for IPv6); ``[]`` when nothing is waiting. A datagram longer than
    ``bufsize`` is truncated. Errors reported for earlier datagrams (ICMP:
    ECONNREFUSED, ...) are skipped; any other error raises ``OSError``.

    Compiled: recvmmsg(2), one system call per burst. On a socket where ``enable_gro``
    succeeded, a datagram coalesced by the kernel is split back into the datagrams that
    were sent, so the list can hold somewhat more than ``max_datagrams`` entries.
    """

def send_batch(
    sock: socket.socket,
    datagrams: Sequence[tuple[bytes, tuple[Any, ...]]],
    start: int = 0,
) -> tuple[int, int]:
    """Send ``datagrams[start:]`` (``(data, address)`` pairs) in order.

    Returns ``(next_index, errors)``. ``next_index == len(datagrams)`` when everything
    went out; it is smaller when the socket would block (EAGAIN, EWOULDBLOCK, ENOBUFS):
    wait until it is writable and call again with ``start=next_index``; nothing is
    lost. A datagram failing with any other ``OSError`` (EMSGSIZE, EHOSTUNREACH, a bad
    address, ...) is skipped and counted in ``errors``.

    Compiled: sendmmsg(2), with UDP GSO for runs of datagrams to one address that have
    one size (the last may be shorter) where the kernel supports it.
    """

def enable_gro(sock: socket.socket) -> bool:
    """Turn on UDP GRO for ``sock`` (call once after binding); ``True`` if it is on.

    The twin, and the compiled module under ``QP2P_NO_GSO=1`` or without kernel
    support, return ``False``. ``recv_batch`` splits coalesced datagrams again.
    """

def features() -> dict[str, bool]:
    """Which kernel batching features are in use: ``recvmmsg``, ``sendmmsg``, ``gso``, ``gro``.

    The twin reports all ``False``.
    """
