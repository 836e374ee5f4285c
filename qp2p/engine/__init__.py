"""The engine interface: everything qp2p's runtime asks of a QUIC implementation.

The runtime (endpoint, connection, pool, services) talks only to what this module names:

- :class:`Engine`, one per QUIC library (a module of :mod:`qp2p.engine`): builds the
  per-connection engines for both roles, answers handshakes it refuses, parses headers of
  datagrams that match no connection, and writes Version Negotiation and Retry packets;
- :class:`EngineConnection`, one per QUIC connection: a sans-I/O state machine fed with
  datagrams (a burst at once where the engine takes them), asked for datagrams to send and
  its timer, and emitting the engine-neutral events below;
- the events (:class:`StreamData`, :class:`StreamReset`, ...), the same for every engine.

Adapters: :mod:`qp2p.engine._aioquic` (aioquic, pure Python; its TLS hooks in
``_aioquic_tls``) and :mod:`qp2p.engine._qh3` (qh3 >= 2.1, a native packet core; its TLS
hooks in ``_qh3_tls``). They are the only modules that import a QUIC library.

Selection: :func:`resolve` turns ``Config.engine`` (``"auto"``, ``"aioquic"``, ``"qh3"``)
into an engine; ``"auto"`` takes ``QP2P_ENGINE`` when set, else qh3 when importable, else
aioquic. :func:`engines` lists the importable ones, preferred first.
"""

from __future__ import annotations

import hmac
import importlib
import itertools
import logging
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from ..errors import PeerAuthenticationError
from ..identity import Trust, _Failure
from ..ratelog import RateLimitedLog
from ..wire import encode_varint

if TYPE_CHECKING:
    from cryptography import x509

    from ..config import Config
    from ..identity import Identity, PeerId

__all__ = [
    "AUTH_REASON_PREFIX",
    "CID_LENGTH",
    "ENGINES",
    "INITIAL_MAX_DATA",
    "MAX_CREDIT",
    "MIN_INITIAL_SIZE",
    "NO_PARAMETERS",
    "TP_MAX_MESSAGE_SIZE",
    "TP_RECEIPTS",
    "AddressValidator",
    "CidIssued",
    "CidRetired",
    "Datagram",
    "Engine",
    "EngineConnection",
    "Event",
    "HandshakeDone",
    "LongHeader",
    "PeerCheck",
    "PeerParameters",
    "ReceiveBudget",
    "Receivers",
    "SendStalled",
    "StopSending",
    "StreamData",
    "StreamReset",
    "Terminated",
    "encode_transport_parameters",
    "engines",
    "is_tls_failure",
    "local_transport_parameters",
    "parse_peer_parameters",
    "resolve",
]

#: Length of the connection IDs our endpoints issue (short headers carry no length).
CID_LENGTH = 8
#: Connection-level credit a peer starts with (the transport parameter); on aioquic it
#: grows while the peer uses it, budget permitting.
INITIAL_MAX_DATA = 256 * 2**10
#: The most credit a peer gets ahead of what it sent (a bandwidth-delay product: 4 MiB
#: per round trip is 400 MiB/s at 10 ms); what it may make us hold is a separate bound.
MAX_CREDIT = 4 * 2**20
#: Smallest UDP payload that may carry a client's first Initial (RFC 9000 §14.1).
MIN_INITIAL_SIZE = 1200
#: How long a Retry token stays valid (seconds): one round trip is all it needs.
RETRY_TOKEN_LIFETIME = 10.0
#: Longest wait between loss probes (seconds). RFC 9002 doubles the wait after every
#: unanswered probe; on a lossy path a run of unlucky probes then outwaits the idle timeout
#: (nine in a row under 20 % loss each way: ~28 s) and a live connection dies. The aioquic
#: adapter caps it; qh3 2.1's native core has no hook for it (README, engine differences).
MAX_PROBE_INTERVAL = 1.0
#: Every ``Terminated.reason_phrase`` qp2p produces for a rejected peer starts so.
AUTH_REASON_PREFIX = "qp2p: peer authentication failed"

#: qp2p's own QUIC transport parameter: the receiver's ``max_message_size`` (varint), so a
#: sender refuses an over-limit message locally instead of sending it to be rejected. The
#: id is a private one ("qpMS", not of the 31*N+27 GREASE form); RFC 9000 §7.4.2 makes
#: peers that don't know it (other QUIC stacks, older qp2p) ignore it.
TP_MAX_MESSAGE_SIZE = 0x71_70_4D_53
#: qp2p's flag parameter (empty, "qpRC"), for a receiver that does not advertise its
#: limit: "I send a receipt (``wire.KIND_RECEIPT``) for every message you send me on a
#: unidirectional stream". A sender whose peer advertises it returns from ``send()`` on the
#: receipt, not on the QUIC ACK, so a message the peer refused never reports success even
#: when the STOP_SENDING is lost or never sent (qh3). Every qp2p endpoint reads receipts;
#: qp2p's own endpoints advertise their limit instead, which needs no extra packets.
TP_RECEIPTS = 0x71_70_52_43
#: qp2p's flag parameter (empty, "qpRV") of an endpoint bound with ``rendezvous=True``: a
#: target that never called ``register_with`` heeds introductions only from a peer it
#: dialled that advertised this, so a plain peer it dialled cannot aim its probes.
TP_RENDEZVOUS = 0x71_70_52_56
#: RFC 9000 §18.2 initial_max_streams_bidi / _uni (an adapter rewrites qh3's fixed ones)
TP_INITIAL_MAX_STREAMS_BIDI = 0x08
TP_INITIAL_MAX_STREAMS_UNI = 0x09

#: Engine name -> (module, the extra that installs its library), preferred first.
ENGINES: dict[str, tuple[str, str]] = {
    "qh3": ("qp2p.engine._qh3", "qp2p[qh3]"),
    "aioquic": ("qp2p.engine._aioquic", "qp2p"),
}


# ---------------------------------------------------------------------- events
# (alike in shape, on purpose: one small type per event, which the runtime dispatches on)


class Event:
    """Base of the events an :class:`EngineConnection` emits."""

    __slots__ = ()


@dataclass(slots=True)
class StreamData(Event):
    """Bytes of a stream, in order; ``end_stream`` once its FIN arrived."""

    stream_id: int
    data: bytes
    end_stream: bool


@dataclass(slots=True)
class StreamReset(Event):
    """The peer reset its sending side of a stream (RESET_STREAM)."""

    stream_id: int
    error_code: int


@dataclass(slots=True)
class StopSending(Event):
    """The peer asked us to stop sending on a stream (STOP_SENDING)."""

    stream_id: int
    error_code: int


@dataclass(slots=True)
class SendStalled(Event):
    """A stream of ours whose bytes are all in packets but which the engine will never
    complete: it lost track of a retransmission (qh3 2.1 under heavy loss, see
    ``qp2p.engine._qh3.STALE_STREAM``). The runtime resets the stream and, once the peer
    confirms it dropped it, sends the message again; aioquic never emits this."""

    stream_id: int


@dataclass(slots=True)
class Datagram(Event):
    """An unreliable DATAGRAM frame (RFC 9221)."""

    data: bytes


@dataclass(slots=True)
class HandshakeDone(Event):
    """The TLS handshake completed on our side (a dialler still waits for confirmation:
    see :meth:`EngineConnection.handshake_confirmed`)."""


@dataclass(slots=True)
class CidIssued(Event):
    """We issued a connection ID the peer may address us with."""

    connection_id: bytes


@dataclass(slots=True)
class CidRetired(Event):
    """A connection ID of ours is no longer in use."""

    connection_id: bytes


@dataclass(slots=True)
class Terminated(Event):
    """The connection is over (closed by either side, timed out, or refused)."""

    error_code: int
    frame_type: int | None
    reason_phrase: str


# ---------------------------------------------------------------------- the interface


class EngineConnection(Protocol):
    """One QUIC connection's engine, as the runtime drives it.

    Time is ``time.monotonic()`` seconds throughout. Stream IDs follow RFC 9000.
    """

    host_cid: bytes
    #: whether :meth:`send_credit` reports the peer's connection-level credit; False: it
    #: always returns ``1 << 62`` (qh3's core does not expose it) and need not be asked
    send_credit_tracked: bool

    # -- I/O
    def connect(self, addr: Any, now: float) -> None:
        """Start a dial to ``addr`` (dialler only)."""

    def receive_datagram(self, data: bytes, addr: Any, now: float) -> None:
        """Feed one UDP payload from ``addr``."""

    def receive_datagrams(self, datagrams: list[bytes], addr: Any, now: float) -> None:
        """Feed a burst of UDP payloads from one address (one call into the engine)."""

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Any]]:
        """Everything the engine wants sent now, as ``(payload, addr)``."""

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must be called next, or None."""

    def handle_timer(self, now: float) -> None:
        """The timer is due."""

    def next_event(self) -> Event | None:
        """The next event, or None when there are no more for now."""

    def has_pending_events(self) -> bool:
        """Events the engine held back (receive memory was full) can be pulled now: the
        runtime drains them when it flushes."""

    def deliver_to(
        self,
        stream_data: Callable[[int, bytes, bool], None] | None,
        datagram: Callable[[bytes], None] | None,
    ) -> None:
        """From now on :meth:`next_event` hands stream data (stream ID, bytes, FIN) and
        datagrams to these callables as it pulls them, in order with the other events,
        instead of returning ``StreamData``/``Datagram`` (one call per message, no event
        object). ``None`` goes back to returning them (a forgotten connection: no cycle)."""

    # -- streams and datagrams
    def open_stream(self, unidirectional: bool) -> int:
        """A new local stream's ID (call only while :meth:`streams_available` > 0)."""

    def send_stream(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        """Queue ``data`` on a stream; raises ValueError when the stream can't take it."""

    def send_on_new_stream(self, unidirectional: bool, data: bytes) -> int:
        """Open a local stream, queue all of ``data`` on it with the FIN, and return its
        ID: ``open_stream`` + ``send_stream(..., True)`` in one call (one message, one
        stream). Returns -1, writing nothing, when the peer's limit lets no new stream of
        that kind open now (:meth:`streams_available` is 0)."""

    def reset_stream(self, stream_id: int, error_code: int) -> None:
        """Abandon our sending side (RESET_STREAM)."""

    def reject_stream(self, stream_id: int, error_code: int) -> None:
        """Stop the peer's sending on a stream (and reset ours on a bidirectional one);
        the STOP_SENDING is written even if the stream's FIN already arrived."""

    def streams_available(self, unidirectional: bool) -> int:
        """How many more local streams of one kind the peer lets us open now."""

    def send_finished(self, stream_id: int) -> bool:
        """Every byte and the FIN we wrote on the stream were acknowledged (or the
        stream is gone because it finished)."""

    def unsent_bytes(self, stream_id: int) -> int:
        """Bytes written to the stream that are not in a packet yet."""

    def send_credit(self) -> int:
        """Bytes the peer's connection-level flow control lets us send now."""

    def send_datagram(self, data: bytes) -> None:
        """Queue a DATAGRAM frame."""

    def ping(self) -> None:
        """Queue a PING (keep-alive)."""

    def shutdown(self, error_code: int, reason: str) -> None:
        """Close with an application error code and a reason the peer sees."""

    def ack_now(self, now: float) -> None:
        """Make pending ACKs due now (before a close we are about to queue)."""

    # -- state
    def is_closed(self) -> bool:
        """The engine is closing, draining or terminated."""

    def close_event(self) -> Terminated | None:
        """Why the engine is closing, as soon as it knows."""

    def accepted_any_packet(self) -> bool:
        """At least one packet decrypted (a junk "Initial" leaves none)."""

    def handshake_confirmed(self) -> bool:
        """For a dialler: the acceptor finished and accepted the handshake."""

    def authenticated_peer(self) -> PeerId | None:
        """The peer's id once authenticated; raises PeerAuthenticationError if the
        trust policy rejected it."""

    def closed_by_peer(self) -> bool | None:
        """True if the peer sent the CONNECTION_CLOSE, False if we did, None while open."""

    def rejection(self) -> PeerAuthenticationError | None:
        """Why the trust policy rejected the peer, if it did."""

    def peer_certificate_chain(self) -> list[Any]:
        """The peer's certificates (``cryptography`` x509 objects), leaf first."""

    def release_handshake_buffers(self) -> None:
        """The handshake is over: free what only it needed."""

    def path_stats(self) -> dict[str, Any]:
        """``rtt``, ``min_rtt`` (seconds or None), ``cwnd``, ``bytes_in_flight``."""

    def peer_parameters(self) -> PeerParameters:
        """qp2p's transport parameters the peer advertised (``NO_PARAMETERS`` until its
        transport parameters arrived, and for peers that are not qp2p)."""

    def local_parameters(self) -> PeerParameters:
        """qp2p's transport parameters this engine advertises (so the connection knows
        whether it promised receipts)."""

    def peer_max_datagram_frame_size(self) -> int | None:
        """The largest DATAGRAM frame the peer accepts (its transport parameter), or
        None before it is known or when the peer takes none."""

    # -- receive memory (qp2p's bound and credit policy)
    @property
    def held(self) -> int:
        """Stream bytes received and not released yet."""

    def release(self, nbytes: int) -> None:
        """``nbytes`` of stream data are no longer held by qp2p."""

    def attach_budget(self, budget: ReceiveBudget, owner: Any) -> None:
        """Take receive credit from the endpoint-wide ``budget`` on behalf of ``owner``."""

    def credit_left(self) -> int:
        """How many more bytes the peer may send now."""

    def credit_low(self) -> bool:
        """Worth flushing: the engine has credit to announce."""

    def starved(self) -> bool:
        """The endpoint's budget could not give us the credit we wanted."""

    def reservation(self) -> int:
        """What the peer may still make us hold (counted against the budget)."""

    def receiving_streams(self) -> list[int]:
        """The peer's unfinished streams that already hold data (not yet rejected)."""

    def has_stream(self, stream_id: int) -> bool:
        """The engine still keeps state for the stream."""

    def undelivered_bytes(self, stream_id: int) -> int:
        """For a stream the peer reset: bytes below its final size never handed to us
        that qp2p counted as held."""

    # -- debugging
    def tracked_streams(self) -> int:
        """How many per-stream entries the engine and its QUIC library's Python layer
        keep (a stream may count more than once): bounded by the streams not yet over,
        never growing with the streams a connection ever used. For tests and profiling."""


class Engine(Protocol):
    """A QUIC library behind qp2p (each adapter module is one)."""

    NAME: str

    def make_configuration(self, identity: Identity, config: Config, *, is_client: bool) -> Any:
        """The engine's configuration for one role (no ALPN; qp2p checks certificates)."""

    def new_client(
        self,
        configuration: Any,
        config: Config,
        trust: Trust,
        expect_peer_id: PeerId | None,
        rendezvous: bool = False,
    ) -> EngineConnection:
        """A dialling engine whose handshake enforces ``trust`` (``rendezvous``: advertise
        ``TP_RENDEZVOUS``, as in ``new_server``)."""

    def new_server(
        self,
        configuration: Any,
        config: Config,
        trust: Trust,
        original_dcid: bytes,
        retry_scid: bytes | None = None,
        rendezvous: bool = False,
    ) -> EngineConnection:
        """An accepting engine for a client whose first Initial used ``original_dcid``;
        ``rendezvous``: advertise ``TP_RENDEZVOUS`` (the endpoint introduces peers)."""

    def refusal(self, header: LongHeader, datagram: bytes, reason: str) -> bytes | None:
        """An Initial carrying CONNECTION_CLOSE(CONNECTION_REFUSED, ``reason``) answering a
        client's first Initial, built from the Initial keys alone (no TLS, no state);
        None when that Initial does not decrypt."""

    def initial_opens(self, header: LongHeader, datagram: bytes) -> bool:
        """The datagram's first packet is an Initial that decrypts with its DCID's keys."""

    def parse_long_header(self, datagram: bytes) -> LongHeader | None:
        """Parse a datagram that matched no connection."""

    def supported_versions(self) -> list[int]:
        """QUIC versions the engine speaks."""

    def version_negotiation(self, dcid: bytes, scid: bytes) -> bytes:
        """A Version Negotiation packet answering ``dcid``/``scid``."""

    def retry_packet(self, header: LongHeader, source_cid: bytes, token: bytes) -> bytes:
        """A Retry packet carrying ``token``, from ``source_cid``."""


# ---------------------------------------------------------------------- shared pieces


def is_tls_failure(error_code: int) -> bool:
    """A QUIC CRYPTO_ERROR (0x100-0x1ff): the TLS handshake failed, e.g. a TLS alert."""
    return 0x100 <= error_code <= 0x1FF


def _pull_varint(data: bytes, pos: int) -> tuple[int, int]:
    """The varint at ``pos`` and the position after it; IndexError past the end."""
    length = 1 << (data[pos] >> 6)
    if pos + length > len(data):
        raise IndexError("truncated varint")
    value = int.from_bytes(data[pos : pos + length], "big") & ((1 << (8 * length - 2)) - 1)
    return value, pos + length


_tls_log = logging.getLogger("qp2p.tls")
_peer_log = RateLimitedLog(_tls_log)  # lines a peer can trigger

#: The TLS alert (RFC 8446 §6 code) and reason each trust-policy failure is refused with.
_ALERTS: dict[_Failure, tuple[int, str]] = {
    _Failure.NO_CERTIFICATE: (116, "no certificate"),  # certificate_required
    _Failure.UNEXPECTED_PEER: (49, "peer id not accepted"),  # access_denied
    _Failure.NOT_PINNED: (49, "peer id not accepted"),
    _Failure.UNTRUSTED_CHAIN: (42, "certificate not trusted"),  # bad_certificate
}
_INTERNAL_ERROR = 80  # the TLS alert internal_error


class Receivers:
    """:meth:`EngineConnection.deliver_to` for an adapter (a base class of both): where
    its ``next_event`` hands stream data and datagrams, if anywhere."""

    _stream_receiver: Callable[[int, bytes, bool], None] | None = None
    _datagram_receiver: Callable[[bytes], None] | None = None

    def deliver_to(
        self,
        stream_data: Callable[[int, bytes, bool], None] | None,
        datagram: Callable[[bytes], None] | None,
    ) -> None:
        """See :meth:`EngineConnection.deliver_to`."""
        self._stream_receiver = stream_data
        self._datagram_receiver = datagram


class PeerCheck:
    """One connection's trust decision, the same on every engine: each adapter's TLS
    hooks call :meth:`judge` once the peer's chain is parsed and :meth:`judge_finished`
    before the handshake's Finished, and raise their library's TLS alert for the
    ``(alert code, reason)`` either returns."""

    def __init__(self, trust: Trust, expect_peer_id: PeerId | None) -> None:
        if not isinstance(trust, Trust):
            raise TypeError(f"trust must be a qp2p.Trust, not {type(trust).__name__}")
        self.trust = trust
        self.expect_peer_id = expect_peer_id
        self.peer_id: PeerId | None = None
        self.auth_error: PeerAuthenticationError | None = None
        self.checked = False
        self.chain: list[x509.Certificate] = []

    def judge(self, chain: list[x509.Certificate]) -> tuple[int, str] | None:
        """Apply the policy to the peer's chain (leaf first); the alert to refuse it with,
        or None when it is accepted."""
        self.chain = chain
        verdict = self.trust._evaluate(chain, self.expect_peer_id)
        self.peer_id = verdict.peer_id
        self.checked = True
        if verdict.failure is None:
            _tls_log.debug("accepted peer %s under %r", verdict.peer_id, self.trust)
            return None
        self.auth_error = PeerAuthenticationError(verdict.message, peer_id=verdict.peer_id)
        _peer_log.warning(f"reject-{verdict.failure}", "rejecting peer: %s", verdict.message)
        alert, what = _ALERTS[verdict.failure]
        return alert, f"{AUTH_REASON_PREFIX}: {what}"

    def judge_finished(self) -> tuple[int, str] | None:
        """Fail closed (the alert to raise) if the handshake got to Finished without the
        policy having run."""
        if self.checked:
            return None
        self.auth_error = PeerAuthenticationError(
            "the handshake skipped the peer certificate check", peer_id=None
        )
        return _INTERNAL_ERROR, f"{AUTH_REASON_PREFIX}: certificate check skipped"


class PeerParameters(NamedTuple):
    """What a peer's qp2p transport parameters said (nothing, for other QUIC stacks)."""

    max_message_size: int | None
    receipts: bool
    rendezvous: bool = False


#: A peer whose transport parameters carry none of qp2p's (or did not arrive yet).
NO_PARAMETERS = PeerParameters(None, False)


def encode_transport_parameters(
    max_message_size: int | None, receipts: bool, rendezvous: bool = False
) -> bytes:
    """qp2p's transport parameters, encoded to append to the engine's own."""
    out = b""
    if max_message_size is not None:
        value = encode_varint(max_message_size)
        out += encode_varint(TP_MAX_MESSAGE_SIZE) + encode_varint(len(value)) + value
    if receipts:
        out += encode_varint(TP_RECEIPTS) + encode_varint(0)
    if rendezvous:
        out += encode_varint(TP_RENDEZVOUS) + encode_varint(0)
    return out


def local_transport_parameters(
    config: Config, rendezvous: bool = False, receipts: bool = False
) -> bytes:
    """What our endpoints advertise (the adapters append it in both roles): the limit,
    whether we serve as a rendezvous, and receipts where the adapter needs them (qh3:
    its core acknowledges data qp2p may still shed or reject unseen)."""
    return encode_transport_parameters(config.max_message_size, receipts, rendezvous)


def replace_transport_parameters(data: bytes, values: dict[int, int]) -> bytes:
    """Encoded transport parameters ``data`` with the integer parameters in ``values``
    (id -> value) set: each replaced where it stands, the missing ones appended; every
    other parameter is kept byte for byte. ``data`` is our engine's own encoding
    (well-formed); ValueError if it is not."""
    out: list[bytes] = []
    left = dict(values)
    pos = 0
    try:
        while pos < len(data):
            start = pos
            param_id, pos = _pull_varint(data, pos)
            length, pos = _pull_varint(data, pos)
            if pos + length > len(data):
                raise IndexError("truncated parameter")
            if param_id in left:
                out.append(_int_parameter(param_id, left.pop(param_id)))
            else:
                out.append(data[start : pos + length])
            pos += length
    except IndexError as exc:
        raise ValueError(f"malformed transport parameters: {exc}") from exc
    out.extend(_int_parameter(param_id, value) for param_id, value in left.items())
    return b"".join(out)


def _int_parameter(param_id: int, value: int) -> bytes:
    encoded = encode_varint(value)
    return encode_varint(param_id) + encode_varint(len(encoded)) + encoded


def parse_peer_parameters(data: bytes) -> PeerParameters:
    """qp2p's parameters among a peer's encoded transport parameters (the engine has
    validated the encoding; a malformed qp2p value counts as absent)."""
    limit: int | None = None
    receipts = rendezvous = False
    pos = 0
    try:
        while pos < len(data):
            param_id, pos = _pull_varint(data, pos)
            length, pos = _pull_varint(data, pos)
            if pos + length > len(data):
                break
            if param_id == TP_MAX_MESSAGE_SIZE:
                value, end = _pull_varint(data, pos)
                limit = value if end == pos + length else None
            elif param_id == TP_RECEIPTS:
                receipts = length == 0
            elif param_id == TP_RENDEZVOUS:
                rendezvous = length == 0
            pos += length
    except IndexError:
        pass
    return PeerParameters(limit, receipts, rendezvous)


class LongHeader(NamedTuple):
    """What the endpoint needs from a datagram that matched no connection."""

    version: int | None  # None for a short header
    is_initial: bool
    dcid: bytes
    scid: bytes
    token: bytes
    pn_offset: int = 0  # an Initial's packet number offset, and the end of that packet
    packet_end: int = 0


class ReceiveBudget:
    """The endpoint-wide cap on receive memory.

    Each connection's *reservation* is what its peer may make us hold. Grants come out of
    ``limit`` and go back as bytes are released (or the connection ends), so the sum over
    all connections never exceeds it, except that every connection may keep
    ``INITIAL_MAX_DATA`` (so the bound is ``limit + connections * INITIAL_MAX_DATA``). A
    connection whose grant was cut short is remembered as *starved* and woken once memory
    is released.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.reserved = 0
        self.starved: dict[Any, None] = {}

    def grant(self, owner: Any, want: int, reservation: int) -> int:
        """Take up to ``want`` bytes of credit for ``owner``, whose reservation is now
        ``reservation``; returns what was granted. Up to ``INITIAL_MAX_DATA`` of
        reservation is granted even over the limit, so peers that fill the budget
        cannot starve the others."""
        floor = min(want, max(INITIAL_MAX_DATA - reservation, 0))
        granted = floor + min(want - floor, max(self.limit - self.reserved - floor, 0))
        self.reserved += granted
        if granted < want:
            self.starved[owner] = None
        return granted

    def release(self, nbytes: int) -> None:
        """Give ``nbytes`` of reservation back."""
        self.reserved -= nbytes

    def charge(self, nbytes: int, force: bool = False) -> bool:
        """Charge ``nbytes`` held outside any engine's credit (received datagrams, the
        cost of open streams) if there is room, or regardless with ``force``; returns
        whether it was charged."""
        if not force and self.reserved + nbytes > self.limit:
            return False
        self.reserved += nbytes
        return True

    def wake(self, threshold: int, at_most: int) -> list[Any]:
        """Starved owners to wake now that memory was released: once at least
        ``threshold`` bytes are free (enough to be worth a packet), the oldest
        ``at_most`` of them (not the whole herd on every read). They are no longer
        counted as starved; one that still gets too little is starved again."""
        starved = self.starved
        if not starved or self.limit - self.reserved < threshold:
            return []
        woken = list(itertools.islice(starved, at_most))
        for owner in woken:
            del starved[owner]
        return woken


class AddressValidator:
    """Stateless QUIC Retry (RFC 9000 §8.1.2): a new client must echo a token bound to its
    address before we keep any state for it, which defeats floods from spoofed sources.

    A token is ``time | len | original DCID | retry SCID | MAC``, the MAC an HMAC-SHA256
    under a per-endpoint random secret over the client's address and the rest. Checking
    one costs a hash, no state and no public-key operation, and it expires after
    ``lifetime`` seconds. ``engine`` writes the Retry packets.
    """

    _MAC_LEN = 16
    _TIME = struct.Struct("!d")

    def __init__(
        self, lifetime: float = RETRY_TOKEN_LIFETIME, engine: Engine | None = None
    ) -> None:
        self._secret = os.urandom(32)
        self.lifetime = lifetime
        self._engine = engine

    def _mac(self, addr: Any, body: bytes) -> bytes:
        host, port = addr[0], addr[1]
        message = b"%s|%d|" % (str(host).encode(), port) + body
        return hmac.digest(self._secret, message, "sha256")[: self._MAC_LEN]

    def make_token(self, addr: Any, odcid: bytes, retry_scid: bytes, now: float) -> bytes:
        """A token for ``addr`` whose retried Initial will carry ``retry_scid`` as DCID."""
        body = self._TIME.pack(now) + bytes([len(odcid)]) + odcid + retry_scid
        return body + self._mac(addr, body)

    def retry_packet(self, header: LongHeader, addr: Any, now: float) -> bytes:
        """A Retry packet carrying a fresh token for ``addr``."""
        assert header.version is not None and self._engine is not None
        source_cid = os.urandom(CID_LENGTH)
        token = self.make_token(addr, header.dcid, source_cid, now)
        return self._engine.retry_packet(header, source_cid, token)

    def validate(self, header: LongHeader, addr: Any, now: float) -> bytes | None:
        """The original destination CID if the token is ours, for ``addr``, unexpired and
        answered to the Retry's source CID; else None."""
        token = header.token
        size = self._TIME.size
        if len(token) < size + 1 + CID_LENGTH + self._MAC_LEN:
            return None
        body, mac = token[: -self._MAC_LEN], token[-self._MAC_LEN :]
        odcid_len = body[size]
        if len(body) != size + 1 + odcid_len + CID_LENGTH:
            return None
        if not hmac.compare_digest(mac, self._mac(addr, body)):
            return None
        (issued,) = self._TIME.unpack_from(body)
        if not issued - 1.0 <= now <= issued + self.lifetime:
            return None
        if body[size + 1 + odcid_len :] != header.dcid:
            return None
        return bytes(body[size + 1 : size + 1 + odcid_len])


# ---------------------------------------------------------------------- selection

_loaded: dict[str, ModuleType | ImportError] = {}


def _load(name: str) -> ModuleType | ImportError:
    if name not in _loaded:
        try:
            _loaded[name] = importlib.import_module(ENGINES[name][0])
        except ImportError as exc:
            _loaded[name] = exc
    return _loaded[name]


def engines() -> list[str]:
    """The engines importable here, preferred first."""
    return [name for name in ENGINES if isinstance(_load(name), ModuleType)]


def resolve(name: str) -> Engine:
    """The engine for ``Config.engine``: ``"auto"`` takes ``QP2P_ENGINE`` when set, else
    the first of :func:`engines`. Raises ValueError for an unknown name or an engine
    whose library is not installed (naming the extra that installs it)."""
    if name == "auto":
        name = os.environ.get("QP2P_ENGINE", "").strip() or "auto"
    if name == "auto":
        available = engines()
        if not available:
            raise ValueError("no QUIC engine is importable: install qp2p (aioquic) or qp2p[qh3]")
        name = available[0]
    if name not in ENGINES:
        known = ", ".join(map(repr, ENGINES))
        raise ValueError(f"unknown engine {name!r}: expected 'auto', {known}")
    module = _load(name)
    if isinstance(module, ImportError):
        raise ValueError(
            f"engine {name!r} is not available ({module}): install {ENGINES[name][1]}"
        ) from module
    engine: Engine = module
    return engine
