"""The aioquic adapter: qp2p's engine interface on aioquic's sans-I/O ``QuicConnection``.

Everything qp2p needs beyond aioquic's public API is here (and its TLS hooks in
``_aioquic_tls``). The private aioquic attributes used are:

- ``_remote_max_streams_uni/bidi`` and ``_local_next_stream_id_uni/bidi``: stream credit,
  so qp2p queues messages instead of opening blocked streams (blocked streams make
  aioquic's packet builder walk them all on every packet; DESIGN.md §6);
- ``_local_max_streams_uni/bidi``: our stream limits (aioquic hard-codes 128);
- ``_streams``: per-stream send completion (aioquic emits no event when a stream's data
  is fully acknowledged);
- ``QuicStreamReceiver`` state, to keep a rejected stream alive until its STOP_SENDING
  has been written (aioquic discards a finished stream before writing it);
- ``_local_max_data`` and ``_write_connection_limits``: qp2p's receive credit policy;
- ``_loss._pto_count``: the probe backoff, capped at ``MAX_PROBE_INTERVAL``.
"""

from __future__ import annotations

import collections
import functools
import hmac
import os
import struct
import time
from typing import Any, NamedTuple

from aioquic import tls
from aioquic.buffer import Buffer  # type: ignore[attr-defined]
from aioquic.quic import events
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection, QuicConnectionState
from aioquic.quic.packet import (
    QuicErrorCode,
    QuicFrameType,
    QuicPacketType,
    QuicProtocolVersion,
    encode_long_header_first_byte,
    encode_quic_retry,
    encode_quic_version_negotiation,
    pull_quic_header,
)
from aioquic.quic.stream import QuicStreamReceiver
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .. import engine as _engine  # looked up per call: tests replace what we advertise
from ..config import Config
from ..errors import PeerAuthenticationError
from ..identity import Identity, PeerId, Trust
from . import (
    CID_LENGTH,
    INITIAL_MAX_DATA,
    MAX_CREDIT,
    MAX_PROBE_INTERVAL,
    NO_PARAMETERS,
    CidIssued,
    CidRetired,
    Datagram,
    Event,
    HandshakeDone,
    LongHeader,
    PeerParameters,
    ReceiveBudget,
    Receivers,
    StopSending,
    StreamData,
    StreamReset,
    Terminated,
    parse_peer_parameters,
)
from ._aioquic_tls import AuthenticatingQuicConnection, PeerAuthenticated, quic_configuration

# No __all__: the module is a qp2p.engine.Engine, whose Protocol lists what the runtime uses.

#: This engine's name in ``Config.engine``.
NAME = "aioquic"
_SUPPORTED_VERSIONS = tuple(QuicConfiguration().supported_versions)


def make_configuration(identity: Identity, config: Config, *, is_client: bool) -> QuicConfiguration:
    """A QUIC configuration for one role, from qp2p's ``Config`` and the endpoint's identity
    (no ALPN, certificate checks left to ``_aioquic_tls``)."""
    idle = config.idle_timeout if config.idle_timeout is not None else 10 * 365 * 86400.0
    return quic_configuration(
        identity,
        is_client=is_client,
        idle_timeout=idle,
        # DATAGRAM frames no larger than our packets (a received one beyond it
        # closes the connection: PROTOCOL_VIOLATION), not 64 KiB
        max_datagram_frame_size=config.max_datagram_size,
        max_datagram_size=config.max_datagram_size,
        connection_id_length=CID_LENGTH,
        # the connection's credit starts small and is managed by
        # FlowControlledQuicConnection; per stream, one message must fit
        max_data=min(INITIAL_MAX_DATA, config.max_buffered_bytes),
        max_stream_data=max(min(config.max_message_size + 16, config.max_buffered_bytes), 65536),
    )


def set_stream_limits(quic: QuicConnection, config: Config) -> None:
    """Advertise our stream limits (call before the handshake starts)."""
    for limit, value in (
        (quic._local_max_streams_bidi, config.max_concurrent_bidi_streams),
        (quic._local_max_streams_uni, config.max_concurrent_uni_streams),
    ):
        limit.value = limit.sent = value


def streams_available(quic: QuicConnection, unidirectional: bool) -> int:
    """How many more streams of one kind the peer lets us open right now."""
    if unidirectional:
        return quic._remote_max_streams_uni - quic._local_next_stream_id_uni // 4
    return quic._remote_max_streams_bidi - quic._local_next_stream_id_bidi // 4


def send_finished(quic: QuicConnection, stream_id: int) -> bool:
    """True once every byte and the FIN we wrote on ``stream_id`` were acknowledged
    (or the stream's state is gone because it finished)."""
    stream = quic._streams.get(stream_id)
    if stream is None:
        return True
    return bool(stream.sender.is_finished)


def send_credit(quic: QuicConnection) -> int:
    """Bytes the peer's connection-level flow control lets us send now."""
    left: int = quic._remote_max_data - quic._remote_max_data_used
    return left


def unsent_bytes(quic: QuicConnection, stream_id: int) -> int:
    """Bytes written to ``stream_id`` that have not been put in a packet yet."""
    stream = quic._streams.get(stream_id)
    if stream is None:
        return 0
    sender = stream.sender
    if sender._reset_error_code is not None:  # reset: nothing more will be sent
        return 0
    end = sender._buffer_fin if sender._buffer_fin is not None else sender._buffer_stop
    return max(0, int(end) - int(sender.highest_offset))


class _StopBeforeDiscardReceiver(QuicStreamReceiver):
    """A receiver that counts as finished only once its STOP_SENDING has been written.

    aioquic drops a stream whose FIN arrived before writing the STOP_SENDING queued on it,
    so the sender would take a rejected message for a delivered one.
    """

    @property
    def is_finished(self) -> bool:
        return bool(self.__dict__.get("is_finished", False)) and not self.stop_pending

    @is_finished.setter
    def is_finished(self, value: bool) -> None:
        self.__dict__["is_finished"] = value


def reject_stream(quic: QuicConnection, stream_id: int, error_code: int) -> None:
    """Stop the peer's sending on ``stream_id`` (and reset ours on a bidirectional one)."""
    stream = quic._streams.get(stream_id)
    if stream is None:
        return
    if not stream.receiver.is_finished or stream.receiver._final_size is not None:
        stream.receiver.__class__ = _StopBeforeDiscardReceiver
        stream.receiver.stop(error_code)
    if not stream.sender.is_finished:
        quic.reset_stream(stream_id, error_code)


def ack_now(quic: QuicConnection, now: float) -> None:
    """Make a delayed ACK due now, so it leaves before a CONNECTION_CLOSE we are about to
    queue: the peer then learns its last stream arrived instead of seeing its ``send()``
    fail with the close."""
    for space in quic._spaces.values():
        if space.ack_at is not None:
            space.ack_at = now


#: Stand-ins for aioquic's three 16 KiB per-connection TLS output buffers once the
#: handshake is over: TLS writes nothing more (qp2p sends no session tickets and QUIC
#: has no TLS KeyUpdate), so they never hold data; a write would fail loudly.
_NO_CRYPTO_OUTPUT: dict[Any, Buffer] = {
    epoch: Buffer(capacity=0) for epoch in (tls.Epoch.INITIAL, tls.Epoch.HANDSHAKE,
                                            tls.Epoch.ONE_RTT)
}


def release_handshake_buffers(quic: QuicConnection) -> None:
    """Free 48 KiB per connection after the handshake (idle connections stay small)."""
    if all(len(buf.data) == 0 for buf in quic._crypto_buffers.values()):
        quic._crypto_buffers = _NO_CRYPTO_OUTPUT


def accepted_any_packet(quic: QuicConnection) -> bool:
    """True once the engine decrypted at least one packet (a junk "Initial" leaves none)."""
    return any(space.largest_received_packet >= 0 for space in quic._spaces.values())


def is_closed(quic: QuicConnection) -> bool:
    """True once the engine has entered its closing/draining/terminated states."""
    return quic._state not in (QuicConnectionState.FIRSTFLIGHT, QuicConnectionState.CONNECTED)


#: The invariant part of a long header (RFC 8999 §5.1): 1 byte, version, DCID, SCID.
_INVARIANT_MIN = 7


def parse_long_header(datagram: bytes) -> LongHeader | None:
    """Parse a datagram that matched no connection; None when it is not a parsable QUIC
    header (or is itself a Version Negotiation packet, which we never answer).

    A long header of a version we do not speak is read by RFC 8999's invariants alone
    (connection IDs of up to 255 bytes, nothing after them), so it can be answered with
    Version Negotiation whatever that version's packets look like."""
    data = bytes(datagram)
    if data and data[0] & 0x80:
        if len(data) < _INVARIANT_MIN:
            return None
        version = int.from_bytes(data[1:5], "big")
        if version == 0:
            return None  # Version Negotiation: never answered
        if version not in _SUPPORTED_VERSIONS:
            dcid_end = 6 + data[5]
            if dcid_end >= len(data) or dcid_end + 1 + data[dcid_end] > len(data):
                return None
            scid = data[dcid_end + 1 : dcid_end + 1 + data[dcid_end]]
            return LongHeader(version, False, data[6:dcid_end], scid, b"")
    buf = Buffer(data=data)
    try:
        header = pull_quic_header(buf, host_cid_length=CID_LENGTH)
    except ValueError:
        return None
    if header.packet_type == QuicPacketType.VERSION_NEGOTIATION:
        return None
    is_initial = header.packet_type == QuicPacketType.INITIAL
    return LongHeader(
        header.version,
        is_initial,
        header.destination_cid,
        header.source_cid,
        header.token,
        buf.tell() if is_initial else 0,
        header.packet_length if is_initial else 0,
    )


# ---------------------------------------------------------------- Initial protection
# RFC 9001 §5.2: Initial packets are protected with keys derived from the client's
# first DCID alone. Deriving them with the stdlib's one-shot HMAC (a single HKDF block
# each) and aioquic's C AEAD costs a few tens of microseconds, so junk can be told from a
# real Initial, and a refusal sent, without creating a TLS engine.

_INITIAL_SALTS: dict[int, bytes] = {
    QuicProtocolVersion.VERSION_1: bytes.fromhex("38762cf7f55934b34d179ae6a4c80cadccbb7f0a"),
    QuicProtocolVersion.VERSION_2: bytes.fromhex("0dede3def700a6db819381be6e269dcbf9bd2ed9"),
}
_KEY_LABELS: dict[int, tuple[bytes, bytes, bytes]] = {
    QuicProtocolVersion.VERSION_1: (b"quic key", b"quic iv", b"quic hp"),
    QuicProtocolVersion.VERSION_2: (b"quicv2 key", b"quicv2 iv", b"quicv2 hp"),
}


def _expand_label(secret: bytes, label: bytes, length: int) -> bytes:
    """HKDF-Expand-Label (RFC 8446 §7.1) for outputs of one SHA-256 block."""
    full = b"tls13 " + label
    info = struct.pack("!HB", length, len(full)) + full + b"\x00\x01"
    return hmac.digest(secret, info, "sha256")[:length]


class _Protection(NamedTuple):
    """One side's Initial packet protection: header protection cipher, AEAD, IV."""

    hp: Any  # an AES-ECB encryptor: stateless per block, so one serves every mask
    aead: AESGCM
    iv: int


# Cached per DCID: a replayed Initial (the same DCID again and again) derives nothing
# twice; random junk evicts only itself.
@functools.lru_cache(maxsize=128)
def _initial_secret(cid: bytes, version: int, side: bytes) -> bytes:
    return _expand_label(hmac.digest(_INITIAL_SALTS[version], cid, "sha256"), side, 32)


@functools.lru_cache(maxsize=128)
def _header_protection(secret: bytes, version: int) -> Any:
    return Cipher(algorithms.AES(_expand_label(secret, _KEY_LABELS[version][2], 16)),
                  modes.ECB()).encryptor()


@functools.lru_cache(maxsize=128)
def _protection(cid: bytes, version: int, side: bytes) -> _Protection:
    secret = _initial_secret(cid, version, side)
    key_label, iv_label, _ = _KEY_LABELS[version]
    return _Protection(
        _header_protection(secret, version),
        AESGCM(_expand_label(secret, key_label, 16)),
        int.from_bytes(_expand_label(secret, iv_label, 12), "big"),
    )


def initial_opens(header: LongHeader, datagram: bytes) -> bool:
    """True if the datagram's first packet is an Initial that decrypts with the keys its
    DCID implies: a real client's, not junk shaped like one.

    The header protection is removed first (one HKDF chain and one AES block): a packet
    whose reserved bits are then not zero is invalid (RFC 9000 §17.2) and dropped before
    the payload key is even derived, which is where three quarters of random junk ends."""
    version = header.version
    if not header.is_initial or version is None or version not in _INITIAL_SALTS:
        return False
    data = bytes(datagram[: header.packet_end])
    offset = header.pn_offset
    sample = data[offset + 4 : offset + 20]
    if len(sample) < 16:
        return False
    secret = _initial_secret(header.dcid, version, b"client in")
    mask = _header_protection(secret, version).update(sample)
    first = data[0] ^ (mask[0] & 0x0F)
    if first & 0x0C:
        return False
    pn_length = (first & 0x03) + 1
    pn_bytes = bytes(b ^ m for b, m in zip(data[offset : offset + pn_length],
                                        mask[1 : 1 + pn_length], strict=True))
    plain_header = bytes([first]) + data[1:offset] + pn_bytes
    keys = _protection(header.dcid, version, b"client in")
    nonce = (keys.iv ^ int.from_bytes(pn_bytes, "big")).to_bytes(12, "big")
    try:
        keys.aead.decrypt(nonce, data[offset + pn_length :], plain_header)
    except InvalidTag:
        return False
    return True


def _varint(value: int) -> bytes:
    if value < 0x40:
        return bytes([value])
    if value < 0x4000:
        return struct.pack("!H", 0x4000 | value)
    return struct.pack("!I", 0x80000000 | value)


#: A refusal's reason is cut to this many bytes (it is only a hint for the dialler).
MAX_REFUSAL_REASON = 128


#: Refusals already built, by the Initial they answer: a replayed Initial (a token is
#: reusable for its lifetime) is answered again without deriving or decrypting anything.
_REFUSALS: collections.OrderedDict[tuple[bytes, str], bytes] = collections.OrderedDict()
_REFUSALS_KEPT = 64


def refusal(header: LongHeader, datagram: bytes, reason: str) -> bytes | None:
    """An Initial packet carrying CONNECTION_CLOSE(CONNECTION_REFUSED, ``reason``) that
    answers a client's first Initial, so its dial fails at once instead of timing out;
    None when that Initial does not decrypt (junk gets no answer).

    Built from the Initial keys alone (RFC 9001 §5.2): no engine, no TLS, no state. It is
    smaller than the datagram it answers, and not ack-eliciting, so it needs no padding."""
    key = (bytes(datagram[: header.packet_end]), reason)
    cached = _REFUSALS.get(key)
    if cached is not None:
        _REFUSALS.move_to_end(key)
        return cached
    if not initial_opens(header, datagram):
        return None
    answer = _build_refusal(header, reason)
    _REFUSALS[key] = answer
    if len(_REFUSALS) > _REFUSALS_KEPT:
        _REFUSALS.popitem(last=False)
    return answer


def _build_refusal(header: LongHeader, reason: str) -> bytes:
    assert header.version is not None
    phrase = reason.encode("utf-8", "replace")[:MAX_REFUSAL_REASON]
    # a transport close (0x1c) with frame type 0 (PADDING): an application close's reason
    # would have to be blanked in the Initial space
    payload = (bytes([QuicFrameType.TRANSPORT_CLOSE]) + _varint(QuicErrorCode.CONNECTION_REFUSED)
               + b"\x00" + _varint(len(phrase)) + phrase)
    keys = _protection(header.dcid, header.version, b"server in")
    pn_length = 2
    plain_header = (
        bytes([encode_long_header_first_byte(header.version, QuicPacketType.INITIAL,
                                             pn_length - 1)])
        + struct.pack("!I", header.version)
        + bytes([len(header.scid)]) + header.scid
        + bytes([CID_LENGTH]) + os.urandom(CID_LENGTH)
        + b"\x00"  # no token
        + struct.pack("!H", 0x4000 | (pn_length + len(payload) + 16))
        + b"\x00" * pn_length  # packet number 0
    )
    sealed = keys.aead.encrypt(keys.iv.to_bytes(12, "big"), payload, plain_header)  # pn 0
    # header protection: the sample starts 4 bytes after the packet number's offset
    pn_offset = len(plain_header) - pn_length
    sample = sealed[4 - pn_length : 20 - pn_length]
    mask = keys.hp.update(sample)
    protected = bytearray(plain_header + sealed)
    protected[0] ^= mask[0] & 0x0F
    for i in range(pn_length):
        protected[pn_offset + i] ^= mask[1 + i]
    return bytes(protected)


def retry_packet(header: LongHeader, source_cid: bytes, token: bytes) -> bytes:
    """A Retry packet carrying ``token``, answering ``header``'s client."""
    assert header.version is not None
    return encode_quic_retry(
        version=header.version,
        source_cid=source_cid,
        destination_cid=header.scid,
        original_destination_cid=header.dcid,
        retry_token=token,
    )


def supported_versions() -> list[int]:
    """QUIC versions our engine speaks."""
    return list(_SUPPORTED_VERSIONS)


def version_negotiation(dcid: bytes, scid: bytes) -> bytes:
    """A Version Negotiation packet answering a client that used ``dcid``/``scid``."""
    return encode_quic_version_negotiation(
        source_cid=dcid, destination_cid=scid, supported_versions=supported_versions()
    )


def peer_certificate_chain(quic: QuicConnection) -> list[Any]:
    """The certificates the peer presented in the handshake (leaf first), if any."""
    tls = getattr(quic, "tls", None)
    if tls is None:
        return []
    leaf = getattr(tls, "_peer_certificate", None)
    if leaf is None:
        return []
    return [leaf, *getattr(tls, "_peer_certificate_chain", [])]


def path_stats(quic: QuicConnection) -> dict[str, Any]:
    """Round-trip time and congestion state of the connection's path."""
    loss = quic._loss
    return {
        "rtt": loss._rtt_smoothed if loss._rtt_initialized else None,
        "min_rtt": loss._rtt_min if loss._rtt_initialized else None,
        "cwnd": loss.congestion_window,
        "bytes_in_flight": loss.bytes_in_flight,
    }


def close_event(quic: QuicConnection) -> events.ConnectionTerminated | None:
    """Why the engine is closing, as soon as it knows (before draining ends)."""
    event = quic._close_event
    return event if isinstance(event, events.ConnectionTerminated) else None


class FlowControlledQuicConnection(Receivers, AuthenticatingQuicConnection):
    """Connection-level flow control that counts every byte we still hold.

    aioquic treats data as consumed the moment it hands it over and doubles MAX_DATA on
    its own, so a peer could fill our memory with half-sent messages or out-of-order
    gaps. Here MAX_DATA never goes past ``released + receive_window``: ``released`` counts
    the stream bytes whose memory we gave back (messages the application read, control
    frames handled, rejected or reset streams), so everything received and not yet
    released (``held``) stays within ``receive_window``. Within that, the peer gets
    ``credit`` bytes ahead of what it sent: it starts small and doubles when the peer
    uses half of it within two round trips, up to ``MAX_CREDIT``, so an idle connection
    reserves little of the endpoint's ``budget`` (which caps the sum of what all peers may
    make us hold). New credit is announced once the peer has used half of it.
    """

    send_credit_tracked = True
    receive_window: int = 16 * 2**20
    credit: int = INITIAL_MAX_DATA
    max_credit: int = MAX_CREDIT
    _credit_mark = 0  # bytes received when the credit's use was last measured, and when
    _credit_mark_time = 0.0
    released: int = 0
    budget: ReceiveBudget | None = None
    owner: Any = None
    #: qp2p's transport parameters, appended to aioquic's (see new_client/new_server)
    qp2p_parameters: bytes = b""
    peer_params: PeerParameters = NO_PARAMETERS

    closed_by_us: bool | None = None  # set when the close begins (see closed_by_peer)

    def _close_begin(self, is_initiator: bool, now: float) -> None:
        self.closed_by_us = is_initiator
        super()._close_begin(is_initiator, now)

    @property
    def held(self) -> int:
        """Stream bytes received (gaps included) and not released yet."""
        used: int = self._local_max_data.used
        return used - self.released

    def credit_left(self) -> int:
        """How many more bytes the peer may send now."""
        max_data = self._local_max_data
        left: int = max_data.value - max_data.used
        return left

    def credit_low(self) -> bool:
        """The peer has less than half its credit left: worth announcing more."""
        return self.credit_left() < self.credit // 2

    def starved(self) -> bool:
        """The endpoint's budget could not give us the credit we wanted."""
        return self.budget is not None and self.owner in self.budget.starved

    def reservation(self) -> int:
        """What the peer may still make us hold: granted credit minus released bytes."""
        value: int = self._local_max_data.value
        return value - self.released

    # -- qp2p's transport parameter ----------------------------------------------------

    def _serialize_transport_parameters(self) -> bytes:
        data: bytes = super()._serialize_transport_parameters()
        return data + self.qp2p_parameters

    def _parse_transport_parameters(self, data: bytes, from_session_ticket: bool = False) -> None:
        super()._parse_transport_parameters(data, from_session_ticket)  # validates first
        if not from_session_ticket:
            self.peer_params = parse_peer_parameters(data)

    def handle_timer(self, now: float) -> None:
        super().handle_timer(now)
        cap_probe_backoff(self._loss)

    # -- the engine interface (qp2p.engine.EngineConnection) ----------------------------

    def receive_datagrams(self, datagrams: list[bytes], addr: Any, now: float) -> None:
        """aioquic takes one datagram per call."""
        for data in datagrams:
            self.receive_datagram(data, addr, now)

    def next_event(self) -> Event | None:  # type: ignore[override]
        """The next engine-neutral event (aioquic's translated; the ones qp2p does not
        use are skipped)."""
        while True:
            event = super().next_event()
            if event is None:
                return None
            kind = type(event)
            if kind is events.StreamDataReceived:
                if self._stream_receiver is None:
                    return StreamData(event.stream_id, event.data, event.end_stream)  # type: ignore[attr-defined]
                self._stream_receiver(event.stream_id, event.data, event.end_stream)  # type: ignore[attr-defined]
                continue
            if kind is events.DatagramFrameReceived:
                if self._datagram_receiver is None:
                    return Datagram(event.data)  # type: ignore[attr-defined]
                self._datagram_receiver(event.data)  # type: ignore[attr-defined]
                continue
            if kind is events.StreamReset:
                return StreamReset(event.stream_id, event.error_code)  # type: ignore[attr-defined]
            if kind is events.StopSendingReceived:
                return StopSending(event.stream_id, event.error_code)  # type: ignore[attr-defined]
            if kind is events.ConnectionIdIssued:
                return CidIssued(event.connection_id)  # type: ignore[attr-defined]
            if kind is events.ConnectionIdRetired:
                return CidRetired(event.connection_id)  # type: ignore[attr-defined]
            if kind is events.HandshakeCompleted:
                return HandshakeDone()
            if kind is events.ConnectionTerminated:
                return _terminated(event)  # type: ignore[arg-type]
            if kind is PeerAuthenticated:
                continue  # the runtime asks authenticated_peer() instead

    def has_pending_events(self) -> bool:
        return False  # aioquic's events are all pulled after each datagram

    def open_stream(self, unidirectional: bool) -> int:
        stream_id: int = self.get_next_available_stream_id(is_unidirectional=unidirectional)
        return stream_id

    def send_stream(self, stream_id: int, data: bytes, end_stream: bool) -> None:
        self.send_stream_data(stream_id, data, end_stream=end_stream)

    def send_on_new_stream(self, unidirectional: bool, data: bytes) -> int:
        if streams_available(self, unidirectional) <= 0:
            return -1
        stream_id: int = self.get_next_available_stream_id(is_unidirectional=unidirectional)
        self.send_stream_data(stream_id, data, end_stream=True)
        return stream_id

    def reject_stream(self, stream_id: int, error_code: int) -> None:
        reject_stream(self, stream_id, error_code)

    def streams_available(self, unidirectional: bool) -> int:
        return streams_available(self, unidirectional)

    def send_finished(self, stream_id: int) -> bool:
        return send_finished(self, stream_id)

    def unsent_bytes(self, stream_id: int) -> int:
        return unsent_bytes(self, stream_id)

    def send_credit(self) -> int:
        return send_credit(self)

    def send_datagram(self, data: bytes) -> None:
        self.send_datagram_frame(data)

    def ping(self) -> None:
        self.send_ping(0)

    def shutdown(self, error_code: int, reason: str) -> None:
        self.close(error_code=error_code, reason_phrase=reason)

    def ack_now(self, now: float) -> None:
        ack_now(self, now)

    def is_closed(self) -> bool:
        return is_closed(self)

    def close_event(self) -> Terminated | None:
        event = close_event(self)
        return None if event is None else _terminated(event)

    def accepted_any_packet(self) -> bool:
        return accepted_any_packet(self)

    def handshake_confirmed(self) -> bool:
        return bool(self._handshake_confirmed)

    def authenticated_peer(self) -> PeerId | None:
        return authenticated_peer(self)

    def rejection(self) -> PeerAuthenticationError | None:
        return self.auth_error

    def closed_by_peer(self) -> bool | None:
        return closed_by_peer(self)

    def peer_certificate_chain(self) -> list[Any]:
        return peer_certificate_chain(self)

    def release_handshake_buffers(self) -> None:
        release_handshake_buffers(self)

    def path_stats(self) -> dict[str, Any]:
        return path_stats(self)

    def peer_parameters(self) -> PeerParameters:
        return self.peer_params

    def local_parameters(self) -> PeerParameters:
        return parse_peer_parameters(self.qp2p_parameters)

    def peer_max_datagram_frame_size(self) -> int | None:
        limit: int | None = self._remote_max_datagram_frame_size
        return limit

    def release(self, nbytes: int) -> None:
        self.released += nbytes

    def attach_budget(self, budget: ReceiveBudget, owner: Any) -> None:
        self.budget = budget
        self.owner = owner

    def receiving_streams(self) -> list[int]:
        return receiving_streams(self)

    def has_stream(self, stream_id: int) -> bool:
        return stream_id in self._streams

    def undelivered_bytes(self, stream_id: int) -> int:
        return undelivered_bytes(self, stream_id)

    def tracked_streams(self) -> int:
        # aioquic's only per-stream state; it drops a stream once both sides are done
        # (at the next packet it builds), and this adapter keeps none of its own
        return len(self._streams)

    def _write_connection_limits(self, builder: Any, space: Any) -> None:
        max_data = self._local_max_data
        credit = self.credit
        if credit < self.max_credit and max_data.used - self._credit_mark >= credit // 2:
            # the peer used half its credit: if that took less than two round trips, the
            # credit (announced in halves, a round trip late) is what limits it: double it
            now = time.monotonic()
            loss = self._loss
            if loss._rtt_initialized and now - self._credit_mark_time < 2 * loss._rtt_smoothed:
                credit = self.credit = min(2 * credit, self.max_credit)
            self._credit_mark, self._credit_mark_time = max_data.used, now
        target = min(self.released + self.receive_window, max_data.used + credit)
        want = target - max_data.value
        # announce only once the peer has used half its credit: a MAX_DATA frame makes
        # every ACK we send ack-eliciting (twice the packets for small messages)
        if want > 0 and max_data.value - max_data.used < credit // 2:
            if self.budget is not None:
                want = self.budget.grant(self.owner, want, max_data.value - self.released)
            max_data.value += want
        used = max_data.used
        max_data.used = 0  # keeps aioquic from doubling the window behind our back
        try:
            super()._write_connection_limits(builder, space)
        finally:
            max_data.used = used


def cap_probe_backoff(loss: Any) -> None:
    """Keep the wait before the next loss probe (aioquic doubles it per unanswered probe,
    without limit) at most ``MAX_PROBE_INTERVAL``, or one unbacked-off probe timeout."""
    base = loss.get_probe_timeout()
    while loss._pto_count > 0 and base * 2**loss._pto_count > MAX_PROBE_INTERVAL:
        loss._pto_count -= 1


def _terminated(event: events.ConnectionTerminated) -> Terminated:
    return Terminated(event.error_code, event.frame_type, event.reason_phrase)


def receiving_streams(quic: QuicConnection) -> list[int]:
    """Streams the peer is still sending us that already hold data (delivered or not)."""
    return [
        sid
        for sid, stream in quic._streams.items()
        if not stream.receiver.is_finished
        and stream.receiver.highest_offset > 0
        and not stream.receiver.stop_pending  # already rejected, STOP_SENDING on its way
    ]


def undelivered_bytes(quic: QuicConnection, stream_id: int) -> int:
    """For a stream the peer reset: bytes below its final size never handed to us (they
    count against flow control all the same)."""
    stream = quic._streams.get(stream_id)
    if stream is None:
        return 0
    receiver = stream.receiver
    return max(0, int(receiver.highest_offset) - int(receiver.starting_offset()))


def _configured(
    quic: FlowControlledQuicConnection, config: Config, rendezvous: bool
) -> FlowControlledQuicConnection:
    """``quic`` with qp2p's receive bounds, transport parameters and stream limits (both
    roles; call before the handshake starts)."""
    quic.receive_window = config.max_buffered_bytes
    quic.credit = min(INITIAL_MAX_DATA, config.max_buffered_bytes)
    quic.max_credit = min(MAX_CREDIT, config.max_buffered_bytes)
    quic.qp2p_parameters = _engine.local_transport_parameters(config, rendezvous)
    set_stream_limits(quic, config)
    return quic


# new_client and new_server: Engine's signatures (qp2p.engine), as every adapter has them
def new_client(
    configuration: QuicConfiguration,
    config: Config,
    trust: Trust,
    expect_peer_id: PeerId | None,
    rendezvous: bool = False,
) -> FlowControlledQuicConnection:
    """A dialling engine whose handshake enforces ``trust`` (and the per-dial pin)."""
    quic = FlowControlledQuicConnection(
        configuration=configuration, trust=trust, expect_peer_id=expect_peer_id
    )
    return _configured(quic, config, rendezvous)


def new_server(
    configuration: QuicConfiguration,
    config: Config,
    trust: Trust,
    original_dcid: bytes,
    retry_scid: bytes | None = None,
    rendezvous: bool = False,
) -> FlowControlledQuicConnection:
    """An accepting engine for a client whose first Initial used ``original_dcid``
    (and, after a Retry, whose token we issued with ``retry_scid``)."""
    quic = FlowControlledQuicConnection(
        configuration=configuration,
        trust=trust,
        original_destination_connection_id=original_dcid,
        retry_source_connection_id=retry_scid,
    )
    return _configured(quic, config, rendezvous)


def authenticated_peer(quic: QuicConnection) -> PeerId | None:
    """The peer's id once the handshake completed; raises if the policy rejected it."""
    error = auth_error(quic)
    if error is not None:
        raise error
    peer: PeerId | None = getattr(quic, "peer_id", None)
    return peer


def auth_error(quic: QuicConnection) -> PeerAuthenticationError | None:
    """Why the trust policy rejected the peer, if it did."""
    error: PeerAuthenticationError | None = getattr(quic, "auth_error", None)
    return error


def closed_by_peer(quic: QuicConnection) -> bool | None:
    """Who closed the connection: True if the peer sent the CONNECTION_CLOSE, False if we
    did (or are about to), None while it is open."""
    by_us: bool | None = getattr(quic, "closed_by_us", None)
    if by_us is None:
        return False if quic._close_pending else None
    return not by_us
