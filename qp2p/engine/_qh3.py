"""The qh3 adapter: qp2p's engine interface on qh3 >= 2.1, whose packet core is native.

qh3's ``QuicConnection`` is a thin Python facade over a native ``QuicConnectionCore``
(streams, flow control, ACKs, loss recovery and packet protection all live there) and a
Python TLS layer. :class:`Qh3Connection` subclasses the facade and replaces three of its
steps (qh3 2.1's private ``_create_core``, ``_create_tls``, ``_drain_core``):

- the core is built with qp2p's stream limits and receive windows (qh3 hard-codes 100
  bidirectional / 103 unidirectional streams) and the transport parameters say the same;
- the TLS context enforces qp2p's trust policy in both roles (``_qh3_tls``);
- the core's native events become qp2p's engine-neutral events directly, including the two
  the facade drops: ``stream_finished`` (a stream we sent is fully acknowledged: ``send()``
  returns then) and ``streams_available`` (the peer's stream credit).

Receive memory. What we measured in qh3 2.1: the core grants connection credit back (MAX_DATA)
when a ``stream_data`` event is *pulled* from it, not when the data arrives. So the
adapter pulls stream data only while qp2p holds less than ``max_buffered_bytes`` of it (and
the endpoint budget has room); the core itself keeps at most its window
(``CORE_WINDOW``) beyond that. While the gate is shut, the core's later events wait
behind the stream data too (see README, engine differences).
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cryptography.hazmat.primitives.serialization import Encoding
from qh3 import __version__ as QH3_VERSION
from qh3 import tls
from qh3._hazmat import Certificate as Qh3Certificate
from qh3._hazmat import QuicConnectionCore
from qh3.quic import events
from qh3.quic.configuration import QuicConfiguration
from qh3.quic.connection import QuicConnection, QuicConnectionError, QuicConnectionState
from qh3.quic.packet import (
    QuicErrorCode,
    QuicFrameType,
    encode_quic_version_negotiation,
)
from qh3.quic.tls_bridge import QuicTlsBridge, QuicTlsBridgeError

from .. import _speedups
from .. import engine as _engine  # looked up per call: tests replace what we advertise
from ..config import Config
from ..errors import PeerAuthenticationError
from ..identity import Identity, PeerId, Trust
from ..ratelog import RateLimitedLog
from . import (
    CID_LENGTH,
    INITIAL_MAX_DATA,
    NO_PARAMETERS,
    TP_INITIAL_MAX_STREAMS_BIDI,
    TP_INITIAL_MAX_STREAMS_UNI,
    CidIssued,
    CidRetired,
    Datagram,
    Event,
    HandshakeDone,
    LongHeader,
    PeerParameters,
    ReceiveBudget,
    Receivers,
    SendStalled,
    StopSending,
    StreamData,
    StreamReset,
    Terminated,
    _aioquic,
    parse_peer_parameters,
    replace_transport_parameters,
)
from ._qh3_tls import CLIENT_SIGNATURE_ALGORITHMS, Authenticator

if TYPE_CHECKING:
    from .._fastpath import CorePuller

# No __all__: the module is a qp2p.engine.Engine, whose Protocol lists what the runtime uses.

logger = logging.getLogger("qp2p.engine")

#: This engine's name in ``Config.engine``.
NAME = "qh3"
#: The qh3 releases whose facade internals this adapter was written against.
TESTED = ((2, 1), (2, 2))
#: The connection-level receive window the native core keeps (its MAX_DATA runs this far
#: ahead of what qp2p pulled): the same as aioquic's initial credit, so the per-connection
#: and endpoint bounds stay those of the aioquic adapter.
CORE_WINDOW = INITIAL_MAX_DATA


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split(".")[:2] if part.isdigit())


if not TESTED[0] <= _version(QH3_VERSION) < TESTED[1]:  # pragma: no cover - install check
    raise ImportError(
        f"qh3 {QH3_VERSION} is not supported: qp2p's qh3 engine needs qh3 >=2.1,<2.2 "
        "(install qp2p[qh3])"
    )


def make_configuration(identity: Identity, config: Config, *, is_client: bool) -> QuicConfiguration:
    """A qh3 configuration for one role (no ALPN; certificates checked by ``_qh3_tls``)."""
    idle = config.idle_timeout if config.idle_timeout is not None else 10 * 365 * 86400.0
    configuration = QuicConfiguration(
        is_client=is_client,
        alpn_protocols=None,
        verify_mode=ssl.CERT_NONE,
        idle_timeout=idle,
        # DATAGRAM frames no larger than our packets (a received one beyond it
        # closes the connection: PROTOCOL_VIOLATION), not 64 KiB
        max_datagram_frame_size=config.max_datagram_size,
        max_datagram_size=config.max_datagram_size,
        # packets of exactly max_datagram_size, as on aioquic: no path MTU probing (qh3
        # 2.1's probes fail with "packet builder capacity exhausted" toward a peer that
        # advertises a max_udp_payload_size of 1200)
        probe_datagram_size=False,
        connection_id_length=CID_LENGTH,
        max_data=min(CORE_WINDOW, config.max_buffered_bytes),
        max_stream_data=max(min(config.max_message_size + 16, config.max_buffered_bytes), 65536),
        signature_algorithms=list(CLIENT_SIGNATURE_ALGORITHMS),
        supported_versions=supported_versions(),
    )
    configuration.certificate = Qh3Certificate(identity.certificate.public_bytes(Encoding.DER))
    configuration.certificate_chain = [
        Qh3Certificate(cert.public_bytes(Encoding.DER)) for cert in identity.chain[1:]
    ]
    configuration.private_key = tls.load_pem_private_key(identity.private_key_pem)
    return configuration


class _Bridge(QuicTlsBridge):
    """qh3's TLS bridge, advertising qp2p's stream limits and transport parameters, and
    reading the peer's."""

    qp2p_streams: tuple[int, int] = (100, 100)
    qp2p_parameters: bytes = b""
    peer_params: PeerParameters = NO_PARAMETERS

    def parse_transport_parameters(
        self, data: bytes, *, from_session_ticket: bool = False
    ) -> Any:
        parameters = super().parse_transport_parameters(  # validates first
            data, from_session_ticket=from_session_ticket
        )
        if not from_session_ticket:
            self.peer_params = parse_peer_parameters(data)
        return parameters

    def serialize_transport_parameters(self) -> bytes:
        # qh3 advertises fixed stream limits: ours replace them in its encoding (a
        # decode and re-encode of all parameters costs some 5 % of a handshake)
        bidi, uni = self.qp2p_streams
        return replace_transport_parameters(
            super().serialize_transport_parameters(),
            {TP_INITIAL_MAX_STREAMS_BIDI: bidi, TP_INITIAL_MAX_STREAMS_UNI: uni},
        ) + self.qp2p_parameters


class Qh3Connection(Receivers, QuicConnection):
    """A qh3 connection driven through qp2p's engine interface (see the module docstring)."""

    send_credit_tracked = False  # see send_credit

    def __init__(
        self,
        *,
        configuration: QuicConfiguration,
        config: Config,
        trust: Trust,
        expect_peer_id: PeerId | None = None,
        rendezvous: bool = False,
        **kwargs: Any,
    ) -> None:
        self._auth = Authenticator(trust, expect_peer_id)
        self._streams_limit = (
            config.max_concurrent_bidi_streams,
            config.max_concurrent_uni_streams,
        )
        self._window = config.max_buffered_bytes
        # receipts too: the core acknowledges stream data before qp2p pulls it, so a
        # message qp2p then sheds (memory) or rejects unseen (no STOP_SENDING after the
        # FIN) would otherwise count as delivered at a qp2p sender
        self._qp2p_parameters = _engine.local_transport_parameters(
            config, rendezvous, receipts=True
        )
        self._peer_streams: dict[int, int] = {}  # peer's unfinished streams -> bytes pulled
        self._rejected: dict[int, int] = {}  # of those, the ones we rejected -> bytes
        self._exempt = 0  # bytes of rejected streams: held, but no reason to shut the gate
        self._unfinished: set[int] = set()  # streams we wrote whose FIN is not acknowledged
        self._early: deque[Event] = deque()  # pulled in the handshake, or our own: not yet asked
        self._released = 0
        self._budget: ReceiveBudget | None = None
        self._owner: Any = None
        self._announced = False
        self._min_rtt: float | None = None
        self._closed_by_peer: bool | None = None
        self._carried = 0  # datagrams still to send with copies (see datagrams_to_send)
        # the stall watch after a stale build (see _check_stalls): when it next looks, until
        # when it keeps looking, the streams that looked stalled last time, those reported
        self._stall_check: float | None = None
        self._stall_watch_until = 0.0
        self._stall_suspects: set[int] = set()
        self._stall_reported: set[int] = set()
        # the peer's streams whose FIN was pulled since the core's events last ran out: a
        # reset of one queued behind its data is not reported (qp2p took the message whole,
        # and a receiver must not then say it dropped it: see SendStalled)
        self._fin_pulled: set[int] = set()
        #: How often the core failed a packet build on a stale retransmission (STALE_STREAM).
        self.stale_stream_errors = 0
        super().__init__(configuration=configuration, **kwargs)
        self._local_parity = 0 if self._is_client else 1  # stream ID bit 0 of our streams
        # the loop over the core's events (the implementation selected now): it owns the
        # count of stream bytes pulled, and takes each whole message and datagram itself
        self._puller: CorePuller = _speedups.impl.CorePuller(
            self._unfinished, self._created_local_stream_ids, self._rejected,
            self._peer_streams, self._fin_pulled, 1 - self._local_parity,
        )

    def deliver_to(
        self,
        stream_data: Callable[[int, bytes, bool], None] | None,
        datagram: Callable[[bytes], None] | None,
    ) -> None:
        """See :meth:`EngineConnection.deliver_to` (the core's loop hands them over)."""
        super().deliver_to(stream_data, datagram)
        self._puller.receiver = stream_data
        self._puller.datagram_receiver = datagram

    # -- the facade's steps, replaced -------------------------------------------------

    def _create_core(self, remote_addr: Any, initial_dcid: bytes, now: float) -> None:
        configuration = self._configuration
        assert self._version is not None
        self._core = QuicConnectionCore(
            self._is_client,
            self._version,
            ("0.0.0.0", 0),
            remote_addr,
            self.host_cid,
            initial_dcid,
            self._is_client or self._retry_source_connection_id is not None,
            configuration.active_connection_id_limit or (2 if self._is_client else 8),
            configuration.max_datagram_size,
            configuration.probe_datagram_size,
            configuration.idle_timeout,
            3,
            configuration.max_datagram_frame_size,
            None,
            configuration.max_data,
            0,
            configuration.max_stream_data,
            0,
            0,
            0,
            configuration.max_stream_data,
            self._streams_limit[0],
            self._streams_limit[1],
            0,
            0,
            configuration.initial_rtt,
            0.025,
            now,
        )
        self._applied_transport_parameters = None
        self._pre_handshake_state_replayed = False

    def _create_tls(self, remote_source_cid: bytes | None) -> QuicTlsBridge:
        bridge = _Bridge.__new__(_Bridge)
        bridge.qp2p_streams = self._streams_limit
        bridge.qp2p_parameters = self._qp2p_parameters
        bridge.__init__(  # type: ignore[misc]
            self._configuration,
            version=self._version,
            local_initial_source_connection_id=self.host_cid,
            remote_initial_source_connection_id=remote_source_cid,
            original_destination_connection_id=self._original_destination_connection_id,
            retry_source_connection_id=self._retry_source_connection_id,
            quic_logger=self._quic_logger,
            version_change_handler=self._set_version,
        )
        self._auth.install(bridge.tls, is_client=self._is_client)
        self._tls = bridge
        return bridge

    def _gate_open(self) -> bool:
        """Pull more stream data now? Not while qp2p holds its bound, nor while the
        endpoint's budget is spent and this connection holds its floor of it (as on
        aioquic, every connection may keep ``INITIAL_MAX_DATA``). A closing connection
        drains: its peer can send no more."""
        held = self._puller.pulled - self._released - self._exempt
        budget = self._budget
        if held < self._window and (
            budget is None or held < INITIAL_MAX_DATA or budget.reserved < budget.limit
        ):
            return True  # the common case, asked per event: no look at the core's state
        if self._close_event is not None or (
            self._core is not None and self._core.state in _CLOSING_STATES
        ):
            return True  # closing: the peer sends no more, its close must get through
        if held < self._window:
            assert budget is not None
            budget.starved[self._owner] = None  # woken when memory is released
        return False

    def _drain_core(self) -> None:
        # the facade calls this after every packet, timer and send. While the handshake
        # runs, TLS must see CRYPTO data at once (before the next coalesced packet);
        # afterwards events are pulled one at a time as the runtime asks (next_event),
        # so stream credit goes back only as qp2p takes data, and a stream qp2p rejects
        # on its first bytes is not yet complete in the core (STOP_SENDING still goes)
        while not self._handshake_complete:
            event = self._pull_one()
            if event is None:
                return
            if event is not _NOTHING:
                self._early.append(event)  # e.g. connection IDs issued during the handshake

    def _pull_one(self) -> Event | None:
        """Pull one native event (if the gate allows); return the qp2p event it makes."""
        core = self._core
        if core is None or not self._gate_open():
            return None
        native = core.next_event()
        if native is None:
            return None
        return self._translate(native)

    def _translate(self, native: tuple[Any, ...]) -> Event:
        """The qp2p event for one native event (``_NOTHING`` for those that make none)."""
        kind = native[0]
        if kind == "stream_data":
            sid, data, fin = native[1], native[2], native[3]
            self._on_pulled(sid, len(data), fin)
            return StreamData(sid, data, fin)
        if kind == "datagram":
            return Datagram(native[1])
        if kind == "stream_finished":
            self._sent_all(native[1])
        elif kind == "stream_reset":
            if native[1] in self._fin_pulled:
                return _NOTHING  # its message was taken whole (see _fin_pulled)
            self._end_peer_stream(native[1])
            return StreamReset(native[1], native[2])
        elif kind == "stop_sending":
            self._sent_all(native[1])
            return StopSending(native[1], native[2])
        elif kind == "connection_id_issued":
            return CidIssued(native[1])
        elif kind == "connection_id_retired":
            return CidRetired(native[1])
        elif kind == "crypto_data":
            self._on_crypto(native)
        elif kind == "handshake_done":
            assert self._core is not None
            self._handshake_confirmed = True
            self._core.handshake_confirmed()
        elif kind == "new_token":
            self._peer_token = native[1]
        elif kind in ("peer_closed", "protocol_error", "connection_terminated"):
            return self._on_closing(native)
        # "streams_available": the core's stream_limits say the same, asked when needed
        return _NOTHING

    def _on_crypto(self, native: tuple[Any, ...]) -> None:
        # as qh3's facade does: TLS must take CRYPTO data in order, errors close
        assert self._tls is not None and self._core is not None
        try:
            self._tls.receive_crypto(
                tls.Epoch(native[1]), native[3], native[2], version=self._core.version
            )
            self._drain_tls()
        except QuicTlsBridgeError as exc:
            self._tls_failed(exc.error_code, exc.reason_phrase)
        except Exception as exc:
            # qh3's TLS raises BufferReadError on a malformed message and CryptoError on a
            # bad key share instead of an alert: whatever the peer sent, it fails the
            # handshake, never the endpoint (answered as TLS would, decode_error)
            self._tls_failed(
                QuicErrorCode.CRYPTO_ERROR + int(tls.AlertDescription.decode_error),
                f"malformed handshake message: {exc}",
            )

    def _tls_failed(self, error_code: int, reason: str) -> None:
        assert self._core is not None
        self._call_core(
            self._core.close, error_code, int(QuicFrameType.CRYPTO), reason.encode()
        )
        self._close_event = events.ConnectionTerminated(
            error_code, int(QuicFrameType.CRYPTO), reason
        )

    def _on_closing(self, native: tuple[Any, ...]) -> Event:
        kind = native[0]
        if self._closed_by_peer is None:
            self._closed_by_peer = kind == "peer_closed"
        if kind == "peer_closed":
            code, frame_type, reason = native[2], native[3], native[4]
        else:
            code, frame_type, reason = native[1], native[2], native[3]
        if isinstance(reason, bytes):
            reason = reason.decode("utf8", "replace")
        event = events.ConnectionTerminated(code, frame_type, reason)
        if kind == "connection_terminated":
            self._state = QuicConnectionState.TERMINATED
            if self._close_event is not None:  # keep the first cause (e.g. our own close)
                event = self._close_event
            self._close_event = event
            return _terminated(event)
        if self._close_event is None:
            self._close_event = event
        return _NOTHING

    def _on_pulled(self, sid: int, nbytes: int, fin: bool) -> None:
        self._puller.pulled += nbytes
        if self._budget is not None:
            # charged as pulled (the core grants the credit back then)
            self._budget.reserved += nbytes
        if (sid & 1) == self._local_parity:
            return
        rejected = self._rejected
        if rejected and sid in rejected:
            rejected[sid] += nbytes
            self._exempt += nbytes
        if fin:  # _end_peer_stream, inlined (once per message)
            self._fin_pulled.add(sid)
            self._peer_streams.pop(sid, None)
            if rejected:
                self._exempt -= rejected.pop(sid, 0)
        else:
            self._peer_streams[sid] = self._peer_streams.get(sid, 0) + nbytes

    def _sent_all(self, sid: int) -> None:
        """Our sending side of ``sid`` is over (acknowledged, stopped or reset): forget it.
        The facade records every local stream it is handed (to number the next one) and
        forgets one only in its own ``_drain_core``, which this class replaces: without
        this its set grew by one entry per message for the connection's lifetime. A
        stream handed to it again is recorded again (a no-op once the handshake is done);
        before that its record replays the stream, so it stays."""
        self._unfinished.discard(sid)
        if self._handshake_complete:
            self._created_local_stream_ids.discard(sid)

    def _end_peer_stream(self, sid: int) -> None:
        self._peer_streams.pop(sid, None)
        # the runtime releases a rejected stream's bytes when it ends: from here on they
        # count as ordinary held bytes, which that release removes
        self._exempt -= self._rejected.pop(sid, 0)

    # -- the engine interface (qp2p.engine.EngineConnection) ---------------------------

    def receive_datagrams(self, datagrams: list[bytes], addr: Any, now: float) -> None:
        core = self._core
        if core is None or not self._handshake_complete or self._quic_logger is not None:
            self.receive_many_datagrams(datagrams, addr, now)
            return
        # the facade's receive_many_datagrams once the handshake is done, without its call
        # per datagram (to a logger there is none of) and its check of an address the
        # endpoint took from its socket; its _drain_core then does nothing (see ours)
        try:
            core.receive_many_datagrams(datagrams, addr, now)
        except RuntimeError as exc:
            raise QuicConnectionError(QuicErrorCode.INTERNAL_ERROR, None, str(exc)) from exc

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
        core = self._core
        if core is None:
            return []
        out: list[tuple[bytes, Any]] = []
        stale = 0
        while True:
            try:
                transmit = core.poll_transmit(now)
            except RuntimeError as exc:
                # qh3 2.1: a server limited by anti-amplification (3x what it received)
                # raises "packet builder capacity exhausted" instead of waiting; the
                # datagrams already built still go out (the facade would drop them)
                logger.debug("qh3 core stopped building packets: %s", exc)
                break
            except ValueError as exc:
                # qh3 2.1 under loss (see STALE_STREAM): the failed build dropped the
                # stale entry, and the next build or the one after goes on; anything else
                # is for the caller (the endpoint closes the connection)
                if stale >= MAX_STALE_PER_POLL or str(exc) not in _STALE_ERRORS:
                    raise
                stale += 1
                self.stale_stream_errors += 1
                self._carried = CARRIED_DATAGRAMS
                self._stall_watch_until = now + STALL_WATCH
                if self._stall_check is None:
                    self._stall_check = now + STALL_AFTER
                _core_log.log(
                    logging.DEBUG, "stale-stream",
                    "qh3 core: %s (a stale retransmission); the next %d datagrams go out "
                    "%d times", exc, CARRIED_DATAGRAMS, 1 + EXTRA_COPIES,
                )
                continue
            if transmit is None:
                break
            datagram = (transmit[0], transmit[1])
            out.append(datagram)
            if self._carried:
                # its retransmissions may be untracked (see STALE_STREAM): copies make
                # their loss, which would stall their stream for good, far less likely
                self._carried -= 1
                out.extend([datagram] * EXTRA_COPIES)
        return out

    def next_event(self) -> Event | None:  # type: ignore[override]
        while True:
            # the facade's own (TLS and negotiation events): its next_event, inlined
            event = self._events.popleft() if self._events else None
            if event is not None:
                kind = type(event)
                if kind is events.HandshakeCompleted:
                    return HandshakeDone()
                if kind is events.ConnectionTerminated:
                    return _terminated(event)  # type: ignore[arg-type]
                continue
            if self._early:
                return self._early.popleft()
            core = self._core
            if core is None:
                return None
            puller = self._puller
            window = self._window
            held = puller.pulled - self._released - self._exempt
            budget = self._budget
            if held < window and (
                budget is None or held < INITIAL_MAX_DATA or budget.reserved < budget.limit
            ):  # the gate's common case first, without a call; room: what keeps it open
                room = window - held
                if budget is not None:
                    room = min(room, max(INITIAL_MAX_DATA - held, budget.limit - budget.reserved))
            elif self._gate_open():
                room = 1 << 62  # closing: drain
            else:
                return None
            # the core's acknowledgement bookkeeping, whole messages and datagrams (what
            # every message brings) are handled in the fast path's loop; the rest, here
            native = puller.pull(core.next_event, budget, room)
            if native is None:
                if self._fin_pulled:  # no reset can still come behind their data
                    self._fin_pulled.clear()
                return None
            if not native:
                continue  # the room ran out: the gate is asked again
            kind = native[0]
            if kind == "stream_data":
                sid, data, fin = native[1], native[2], native[3]
                self._on_pulled(sid, len(data), fin)
                if self._stream_receiver is None:
                    return StreamData(sid, data, fin)
                self._stream_receiver(sid, data, fin)
                continue  # from the top: the gate is asked again after each delivery
            if kind == "datagram":
                if self._datagram_receiver is None:
                    return Datagram(native[1])
                self._datagram_receiver(native[1])
                continue
            mine = self._translate(native)
            if mine is not _NOTHING:
                return mine

    def get_timer(self) -> float | None:
        # the facade's, inlined (after every flush), and the stall watch's
        core = self._core
        if core is None:
            return None
        timer = core.get_timer()
        check = self._stall_check
        if check is not None and (timer is None or check < timer[1]):
            return check
        return None if timer is None else timer[1]

    def handle_timer(self, now: float) -> None:
        check = self._stall_check
        if check is not None and now >= check:
            self._check_stalls(now)
            core = self._core
            due = None if core is None else core.get_timer()
            if due is None or due[1] > now:
                return  # only the watch was due: firing the core early raises its backoff
        super().handle_timer(now)

    def _check_stalls(self, now: float) -> None:
        """After a stale build (STALE_STREAM) the core may hold a stream of ours that it
        will never complete: all its bytes in packets, none of them tracked any more. One
        that looks so at two checks STALL_AFTER apart, while the peer acknowledges (no
        probe outstanding), is reported once as ``SendStalled``."""
        core = self._core
        if core is None or core.state in _CLOSING_STATES:
            self._stall_check = None
            return
        if core.has_events:  # acknowledgements may wait there (behind the gate): look later
            self._stall_check = now + STALL_AFTER
            return
        size_of = core.get_send_buffer_size
        suspects = {sid for sid in self._unfinished if size_of(sid) == 0}
        suspects -= self._stall_reported
        if core.pto_count == 0:
            for sid in sorted(suspects & self._stall_suspects):
                self._stall_reported.add(sid)
                self._early.append(SendStalled(sid))
            suspects -= self._stall_reported
        self._stall_reported &= self._unfinished
        self._stall_suspects = suspects
        if suspects or now < self._stall_watch_until:
            self._stall_check = now + max(STALL_AFTER, 8 * (core.smoothed_rtt or 0.0))
        else:
            self._stall_check = None

    def has_pending_events(self) -> bool:
        """Events held back by the gate can be pulled now (after memory was released)."""
        return bool(self._early) or (
            self._core is not None and self._core.has_events and self._gate_open()
        )

    def open_stream(self, unidirectional: bool) -> int:
        return self.get_next_available_stream_id(unidirectional)

    def _core_closed(self) -> bool:
        return self._core is not None and self._core.state in _CLOSING_STATES

    def send_stream(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        if end_stream:
            self._unfinished.add(stream_id)  # until the core reports it acknowledged
        try:
            core = self._core
            if self._handshake_complete and core is not None and type(data) is bytes:
                # the facade's send_stream_data for bytes after the handshake, without
                # its four extra calls per message (same bookkeeping, same errors)
                self._record_local_stream(stream_id)
                try:
                    core.send_stream(stream_id, data, end_stream)
                except RuntimeError as exc:
                    raise QuicConnectionError(
                        QuicErrorCode.INTERNAL_ERROR, None, str(exc)
                    ) from exc
            else:
                self.send_stream_data(stream_id, data, end_stream)
        except QuicConnectionError as exc:
            if self._core_closed():
                return  # never acknowledged: its waiter fails with the close
            self._sent_all(stream_id)
            raise ValueError(str(exc)) from exc

    def send_on_new_stream(self, unidirectional: bool, data: bytes) -> int:
        core = self._core
        if not (self._handshake_complete and core is not None and type(data) is bytes):
            if self.streams_available(unidirectional) <= 0:
                return -1
            stream_id = self.open_stream(unidirectional)
            self.send_stream(stream_id, data, True)
            return stream_id
        # streams_available, open_stream and send_stream (above) in one, with the facade's
        # _record_local_stream for a new local stream inlined: this runs once per message
        limits = core.stream_limits
        if unidirectional:
            if limits[1] <= limits[3]:
                return -1
            stream_id = self._next_stream_id_uni
            self._next_stream_id_uni = self._local_next_stream_id_uni = stream_id + 4
        else:
            if limits[0] <= limits[2]:
                return -1
            stream_id = self._next_stream_id_bidi
            self._next_stream_id_bidi = self._local_next_stream_id_bidi = stream_id + 4
        self._created_local_stream_ids.add(stream_id)
        self._unfinished.add(stream_id)  # until the core reports it acknowledged
        try:
            core.send_stream(stream_id, data, True)
        except RuntimeError as exc:
            if self._core_closed():
                return stream_id  # never acknowledged: its waiter fails with the close
            self._sent_all(stream_id)
            raise ValueError(str(exc)) from exc
        return stream_id

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        # finished (ValueError from the core), or gone
        with contextlib.suppress(QuicConnectionError, AssertionError, ValueError):
            super().reset_stream(stream_id, error_code)
        self._sent_all(stream_id)  # after the facade's call: it records the stream

    def reject_stream(self, stream_id: int, error_code: int) -> None:
        if stream_id in self._peer_streams and stream_id not in self._rejected:
            self._rejected[stream_id] = self._peer_streams[stream_id]
            self._exempt += self._peer_streams[stream_id]
        try:
            self.stop_stream(stream_id, error_code)
        except (QuicConnectionError, AssertionError) as exc:
            logger.debug("cannot stop stream %d: %s", stream_id, exc)
        if stream_id & 2 == 0:  # bidirectional: our side of it is abandoned too
            self.reset_stream(stream_id, error_code)

    def streams_available(self, unidirectional: bool) -> int:
        if self._core is None:
            return 0
        limits = self._core.stream_limits
        return limits[1] - limits[3] if unidirectional else limits[0] - limits[2]

    def send_finished(self, stream_id: int) -> bool:
        return stream_id not in self._unfinished

    def unsent_bytes(self, stream_id: int) -> int:
        return self.get_send_buffer_size(stream_id)

    def send_credit(self) -> int:
        return 1 << 62  # the core does not expose the peer's credit (README)

    def send_datagram(self, data: bytes) -> None:
        # the facade's send_datagram_frame, without its two extra calls per datagram
        core = self._core
        if core is None:
            raise AssertionError("connection has not been started")
        try:
            core.send_datagram(data)
        except RuntimeError as exc:
            if not self._core_closed():  # e.g. larger than the peer takes
                raise QuicConnectionError(QuicErrorCode.INTERNAL_ERROR, None, str(exc)) from exc
            # closing: an unreliable datagram is simply not sent

    def ping(self) -> None:
        with contextlib.suppress(QuicConnectionError):  # closing: nothing to keep alive
            self.send_ping(0)

    def shutdown(self, error_code: int, reason: str) -> None:
        with contextlib.suppress(QuicConnectionError):  # the core closed already
            self.close(error_code=error_code, reason_phrase=reason)

    def ack_now(self, now: float) -> None:
        pass  # the core sends its pending ACKs with the CONNECTION_CLOSE itself

    def is_closed(self) -> bool:
        return self._close_event is not None or self._core_closed()

    def close_event(self) -> Terminated | None:
        return None if self._close_event is None else _terminated(self._close_event)

    def accepted_any_packet(self) -> bool:
        return self._core is not None and bool(self._core.received_authenticated_packet)

    def handshake_confirmed(self) -> bool:
        return bool(self._handshake_confirmed)

    def authenticated_peer(self) -> PeerId | None:
        if self._auth.auth_error is not None:
            raise self._auth.auth_error
        return self._auth.peer_id

    def rejection(self) -> PeerAuthenticationError | None:
        return self._auth.auth_error

    def closed_by_peer(self) -> bool | None:
        if self._closed_by_peer is None and self._close_event is not None:
            return False  # we closed (or our TLS refused) before the core said anything
        return self._closed_by_peer

    def peer_certificate_chain(self) -> list[Any]:
        return list(self._auth.chain)

    def release_handshake_buffers(self) -> None:
        pass  # qh3 keeps no per-connection TLS output buffers

    def path_stats(self) -> dict[str, Any]:
        core = self._core
        if core is None:
            return {"rtt": None, "min_rtt": None, "cwnd": 0, "bytes_in_flight": 0}
        latest = core.latest_rtt
        if latest is not None and (self._min_rtt is None or latest < self._min_rtt):
            self._min_rtt = latest
        return {
            "rtt": core.smoothed_rtt,
            "min_rtt": self._min_rtt,
            "cwnd": core.congestion_window,
            "bytes_in_flight": core.bytes_in_flight,
        }

    def peer_parameters(self) -> PeerParameters:
        bridge = self._tls
        return bridge.peer_params if isinstance(bridge, _Bridge) else NO_PARAMETERS

    def local_parameters(self) -> PeerParameters:
        return parse_peer_parameters(self._qp2p_parameters)

    @property
    def held(self) -> int:
        return self._puller.pulled - self._released

    @property
    def credit(self) -> int:
        """The core's fixed window (qh3 has no growing credit)."""
        return int(self._configuration.max_data)

    def peer_max_datagram_frame_size(self) -> int | None:
        limit: int | None = self._remote_max_datagram_frame_size
        return limit

    def release(self, nbytes: int) -> None:
        self._released += nbytes

    def attach_budget(self, budget: ReceiveBudget, owner: Any) -> None:
        self._budget = budget
        self._owner = owner

    def credit_left(self) -> int:
        if not self._gate_open():
            return 0  # nothing more is pulled: the peer stays blocked where it is
        return max(0, self._window - (self.held - self._exempt))

    # the gate holds events back while memory is short: once it opens, the runtime
    # pulls them (the peer's credit comes back as they are pulled)
    credit_low = has_pending_events

    def starved(self) -> bool:
        return self._budget is not None and self._owner in self._budget.starved

    def reservation(self) -> int:
        return self.held + int(self._configuration.max_data)

    def receiving_streams(self) -> list[int]:
        return [
            sid for sid, seen in self._peer_streams.items() if seen and sid not in self._rejected
        ]

    def has_stream(self, stream_id: int) -> bool:
        # a rejected stream's bytes stop counting at once (they are exempt from the gate),
        # and its RESET_STREAM may wait behind data the gate holds back: don't wait for it
        return stream_id in self._peer_streams and stream_id not in self._rejected

    def undelivered_bytes(self, stream_id: int) -> int:
        return 0  # only what was pulled counts as held; the core accounts for the rest

    def tracked_streams(self) -> int:
        # the facade's record of local streams, and ours of unacknowledged sends and of
        # the peer's unfinished (and rejected) streams
        return (
            len(self._created_local_stream_ids) + len(self._unfinished)
            + len(self._peer_streams) + len(self._rejected)
        )


#: What qh3 2.1's core raises from ``poll_transmit`` under heavy loss (diagnosed by
#: decrypting its packets in a lossy simulation of two cores, tests/unit/test_qh3_core.py). The
#: core may queue one lost range of a stream for retransmission more than once (we saw a
#: range resent five times: once per lost copy, again by probes). When a copy is
#: acknowledged the stream completes and the core forgets it, but not its other queued
#: entries; the packet build that reaches one fails with this. Before it, the build took
#: retransmissions queued ahead of the entry; they still go out in the next packets, but
#: for a while the core no longer tracks the retransmissions it sends for loss recovery:
#: lost once more, their stream never completes (its ``send()`` waited for the idle
#: timeout: now ``_check_stalls`` reports it, as ``SendStalled``, and the runtime sends
#: the message again). Raising it to the endpoint was worse: the flush was aborted, so the
#: datagrams built so far were dropped and the connection's timer was not re-armed.
STALE_STREAM = "reserved stream is missing"
#: What a build may raise in the same state (right after that failure, and on its own):
#: the failed build left its reservation open. The build after it succeeds.
STALE_RESERVATION = "another stream reservation is already active"
_STALE_ERRORS = frozenset((STALE_STREAM, STALE_RESERVATION))
#: Failed builds skipped in one ``datagrams_to_send`` before the error counts as a fault.
MAX_STALE_PER_POLL = 64
#: Datagrams after such a failure that go out in copies: those whose retransmissions the
#: core may no longer track (7 in a row in one trace; 2 were not enough under 20 % loss).
CARRIED_DATAGRAMS = 32
#: Extra copies of each of those (the peer drops duplicate packets): a frame is then lost
#: only if all four are (p^4 at loss p). At 20 % loss each way, 1000 messages of 1 KiB
#: took 1472 datagrams with 1 failure, 1787 with 5 (0-11 failures per run).
EXTRA_COPIES = 3
#: After such a failure: how long a stream of ours may look stalled (all bytes in packets,
#: unacknowledged, while acknowledgements come) before it is reported (at least 8 RTTs),
#: and how long after the last failure the adapter keeps looking (see _check_stalls).
STALL_AFTER = 2.0
STALL_WATCH = 30.0
_core_log = RateLimitedLog(logger)

#: Native core states of a closing connection: the gate holds nothing back then.
_CLOSING_STATES = frozenset(("closing", "draining", "terminated"))
#: What ``_pull_one`` returns for a native event that makes no qp2p event.
_NOTHING = Event()


def _terminated(event: events.ConnectionTerminated) -> Terminated:
    return Terminated(event.error_code, event.frame_type, event.reason_phrase)


# new_client and new_server: Engine's signatures (qp2p.engine), as every adapter has them
def new_client(
    configuration: QuicConfiguration,
    config: Config,
    trust: Trust,
    expect_peer_id: PeerId | None,
    rendezvous: bool = False,
) -> Qh3Connection:
    """A dialling engine whose handshake enforces ``trust`` (and the per-dial pin)."""
    return Qh3Connection(
        configuration=configuration, config=config, trust=trust,
        expect_peer_id=expect_peer_id, rendezvous=rendezvous,
    )


def new_server(
    configuration: QuicConfiguration,
    config: Config,
    trust: Trust,
    original_dcid: bytes,
    retry_scid: bytes | None = None,
    rendezvous: bool = False,
) -> Qh3Connection:
    """An accepting engine for a client whose first Initial used ``original_dcid``."""
    return Qh3Connection(
        configuration=configuration,
        config=config,
        trust=trust,
        rendezvous=rendezvous,
        original_destination_connection_id=original_dcid,
        retry_source_connection_id=retry_scid,
    )


def refusal(header: LongHeader, datagram: bytes, reason: str) -> bytes | None:
    """CONNECTION_CLOSE(CONNECTION_REFUSED) for a first Initial, from its Initial keys
    alone: packet crypto every QUIC stack shares (RFC 9001 §5.2), so the aioquic adapter's
    builder serves (no engine, no TLS, no state; aioquic is always installed)."""
    return _aioquic.refusal(header, datagram, reason)


def initial_opens(header: LongHeader, datagram: bytes) -> bool:
    """The datagram's first packet is an Initial that decrypts (see ``refusal``)."""
    return _aioquic.initial_opens(header, datagram)


def parse_long_header(datagram: bytes) -> LongHeader | None:
    """Parse a datagram that matched no connection (RFC 8999 invariants for versions we
    do not speak; packet number offset and end for an Initial): the aioquic adapter's
    parser, pure header parsing."""
    return _aioquic.parse_long_header(datagram)


def supported_versions() -> list[int]:
    """QUIC versions qp2p speaks on qh3: the ones both engines speak (endpoints on
    either engine negotiate the same)."""
    theirs = {int(v) for v in QuicConfiguration().supported_versions}
    return [v for v in _aioquic.supported_versions() if v in theirs]


def version_negotiation(dcid: bytes, scid: bytes) -> bytes:
    """A Version Negotiation packet answering a client that used ``dcid``/``scid``."""
    return encode_quic_version_negotiation(
        source_cid=dcid, destination_cid=scid, supported_versions=supported_versions()
    )


def retry_packet(header: LongHeader, source_cid: bytes, token: bytes) -> bytes:
    """A Retry packet carrying ``token``, answering ``header``'s client: the aioquic
    adapter's (the packet and its integrity tag are RFC 9001's, the same on both)."""
    return _aioquic.retry_packet(header, source_cid, token)
