"""Mutual TLS with qp2p's trust policies, on top of qh3's Python TLS (``qh3.tls``).

qh3's server never asks for a client certificate: it sends no CertificateRequest and
anticipates the client's Finished right after its own flight. qp2p wants both roles to
present a certificate and each side to apply its :class:`~qp2p.identity.Trust` policy (and
an optional expected :class:`PeerId`) *inside* the handshake. So:

- servers run :class:`MutualServerContext`, a ``qh3.tls.Context`` whose ServerHello flight
  carries a CertificateRequest (after EncryptedExtensions), and which then takes the
  client's Certificate and CertificateVerify (checking the signature over the transcript)
  before its Finished. That flight is written here (qh3's own writes no request); it is
  the subset of qh3's that qp2p uses: no PSK/resumption, no early data, no ALPN, no ALPS;
- clients keep qh3's own code (it answers a CertificateRequest by itself); qp2p wraps its
  certificate handlers to run the policy once the server's chain has been parsed.

A rejection raises a TLS alert, which qh3 turns into a QUIC ``CRYPTO_ERROR`` (``0x100 +
alert``) connection close, with the same alerts as the aioquic adapter (``certificate_required``
for no certificate, ``access_denied`` for a peer not pinned or not the expected one,
``bad_certificate`` for a chain that does not verify). A handshake that reaches Finished
without the policy having run fails closed (``internal_error``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from cryptography import x509
from qh3 import tls
from qh3._hazmat import (
    Buffer,
    ECDHP256KeyExchange,
    ECDHP384KeyExchange,
    EcPrivateKey,
    Ed25519PrivateKey,
    RsaPrivateKey,
    SignatureError,
    X25519KeyExchange,
    X25519ML768KeyExchange,
    verify_with_public_key,
)
from qh3._hazmat import Certificate as Qh3Certificate
from qh3.tls import (
    AlertDecodeError,
    AlertDecryptError,
    AlertHandshakeFailure,
    AlertUnexpectedMessage,
    Certificate,
    CertificateVerify,
    Direction,
    EncryptedExtensions,
    Epoch,
    Finished,
    Group,
    HandshakeType,
    KeySchedule,
    ServerHello,
    SignatureAlgorithm,
    State,
)

from . import PeerCheck

__all__ = ["Authenticator", "MutualServerContext", "to_x509"]

logger = logging.getLogger("qp2p.tls")

#: Signature schemes a server accepts in a client's CertificateVerify (every key type
#: a qp2p identity can hold).
CLIENT_SIGNATURE_ALGORITHMS = [
    SignatureAlgorithm.ECDSA_SECP256R1_SHA256,
    SignatureAlgorithm.ED25519,
    SignatureAlgorithm.ECDSA_SECP384R1_SHA384,
    SignatureAlgorithm.ECDSA_SECP521R1_SHA512,
    SignatureAlgorithm.RSA_PSS_RSAE_SHA256,
    SignatureAlgorithm.RSA_PSS_RSAE_SHA384,
    SignatureAlgorithm.RSA_PSS_RSAE_SHA512,
    SignatureAlgorithm.RSA_PKCS1_SHA256,
    SignatureAlgorithm.RSA_PKCS1_SHA384,
    SignatureAlgorithm.RSA_PKCS1_SHA512,
]
#: Key shares a dialler offers (what every TLS 1.3 stack accepts; qh3 would add a
#: post-quantum hybrid that aioquic does not know).
CLIENT_GROUPS = [Group.X25519, Group.SECP256R1]


class _PolicyAlert(tls.Alert):
    """A TLS alert raised because the peer failed qp2p's trust policy."""

    def __init__(self, refusal: tuple[int, str]) -> None:
        super().__init__(refusal[1])
        self.description = tls.AlertDescription(refusal[0])


def to_x509(cert: Qh3Certificate) -> x509.Certificate:
    """A qh3 certificate as a ``cryptography`` one (what the trust policies take)."""
    return x509.load_der_x509_certificate(cert.public_bytes())


class Authenticator(PeerCheck):
    """The trust decision for one connection: run by the TLS hooks, read by the engine."""

    def check(self, leaf: Qh3Certificate | None, rest: list[Qh3Certificate]) -> None:
        """Apply the policy to the peer's chain; raise a TLS alert if it is refused."""
        refusal = self.judge([to_x509(leaf), *map(to_x509, rest)] if leaf is not None else [])
        if refusal is not None:
            raise _PolicyAlert(refusal)

    def before_finished(self) -> None:
        """Fail closed if the handshake got to Finished without the policy having run."""
        refusal = self.judge_finished()
        if refusal is not None:
            raise _PolicyAlert(refusal)

    # -- installing the hooks ---------------------------------------------------------

    def install(self, ctx: tls.Context, *, is_client: bool) -> None:
        """Hook this policy into a fresh qh3 TLS context (before its first message)."""
        ctx.session_ticket = None
        ctx.get_session_ticket_cb = None
        ctx.new_session_ticket_cb = None
        if is_client:
            ctx._supported_groups = list(CLIENT_GROUPS)
            self._wrap(ctx, "_client_handle_certificate", after=True)
            self._wrap(ctx, "_client_handle_compressed_certificate", after=True)
            self._wrap(ctx, "_client_handle_finished", after=False)
        else:
            ctx.__class__ = MutualServerContext
            assert isinstance(ctx, MutualServerContext)
            ctx.qp2p_setup(self)

    def _wrap(self, ctx: tls.Context, name: str, *, after: bool) -> None:
        original: Callable[..., None] = getattr(ctx, name)

        def wrapper(*args: Any) -> None:
            if not after:
                self.before_finished()
            original(*args)
            if after:
                self.check(ctx._peer_certificate, ctx._peer_certificate_chain)

        setattr(ctx, name, wrapper)


def _push_certificate_request(
    buf: Buffer, context: bytes, algorithms: list[SignatureAlgorithm]
) -> None:
    buf.push_uint8(HandshakeType.CERTIFICATE_REQUEST)
    with tls.push_block(buf, 3):
        tls.push_opaque(buf, 1, context)
        with tls.push_block(buf, 2), tls.push_extension(
            buf, tls.ExtensionType.SIGNATURE_ALGORITHMS
        ):
            tls.push_list(buf, 2, buf.push_uint16, [int(a) for a in algorithms])


class MutualServerContext(tls.Context):
    """A qh3 server TLS context that requests and checks the client's certificate.

    Installed by class assignment on the context qh3's TLS bridge creates (see
    :meth:`Authenticator.install`); adds no constructor of its own.
    """

    _qp2p_auth: Authenticator
    _qp2p_expect: int | None  # the client message we wait for before its Finished

    def qp2p_setup(self, auth: Authenticator) -> None:
        self._qp2p_auth = auth
        self._qp2p_expect = None

    def handle_message(
        self, input_data: bytes, output_buf: dict[Epoch, Buffer], epoch: int = -1
    ) -> None:
        if self._qp2p_expect is None:
            super().handle_message(input_data, output_buf, epoch)
            return
        self._receive_buffer += input_data
        while self._qp2p_expect is not None and len(self._receive_buffer) >= 4:
            message_type = self._receive_buffer[0]
            length = 4 + int.from_bytes(self._receive_buffer[1:4], byteorder="big")
            if len(self._receive_buffer) < length:
                return
            message = self._receive_buffer[:length]
            self._receive_buffer = self._receive_buffer[length:]
            if (epoch >= 0 and epoch != Epoch.HANDSHAKE) or message_type != self._qp2p_expect:
                raise AlertUnexpectedMessage
            input_buf = Buffer(data=message)
            if message_type == HandshakeType.CERTIFICATE:
                self._qp2p_client_certificate(input_buf)
            else:
                self._qp2p_client_certificate_verify(input_buf)
            if not input_buf.eof():
                raise AlertDecodeError("extra bytes at the end of a handshake message")
        if self._qp2p_expect is None and self._receive_buffer:
            rest, self._receive_buffer = self._receive_buffer, b""
            super().handle_message(rest, output_buf, epoch)

    def _schedule(self) -> KeySchedule:
        schedule = self.key_schedule
        assert schedule is not None  # set by the ClientHello
        return schedule

    def _qp2p_client_certificate(self, input_buf: Buffer) -> None:
        certificate = tls.pull_certificate(input_buf)
        self._schedule().update_hash(input_buf.data)
        if certificate.certificates:
            self._peer_certificate = Qh3Certificate(certificate.certificates[0][0])
            self._peer_certificate_chain = [
                Qh3Certificate(entry[0]) for entry in certificate.certificates[1:]
            ]
            self._qp2p_expect = HandshakeType.CERTIFICATE_VERIFY
        else:  # no certificate: Finished comes next (the policy decides)
            self._qp2p_expect = None
        self._qp2p_auth.check(self._peer_certificate, self._peer_certificate_chain)

    def _qp2p_client_certificate_verify(self, input_buf: Buffer) -> None:
        verify = tls.pull_certificate_verify(input_buf)
        if verify.algorithm not in CLIENT_SIGNATURE_ALGORITHMS:
            raise AlertDecryptError("CertificateVerify uses a scheme we did not offer")
        assert self._peer_certificate is not None
        try:
            verify_with_public_key(
                self._peer_certificate.public_key(),
                verify.algorithm,
                self._schedule().certificate_verify_data(b"TLS 1.3, client CertificateVerify"),
                verify.signature,
            )
        except SignatureError as exc:
            raise AlertDecryptError(str(exc)) from exc
        self._schedule().update_hash(input_buf.data)
        self._qp2p_expect = None

    def _server_handle_finished(self, input_buf: Buffer, output_buf: Buffer) -> None:
        self._qp2p_auth.before_finished()
        finished = tls.pull_finished(input_buf)
        # the client's Finished covers its Certificate and CertificateVerify: computed
        # now, not anticipated at the end of our flight as qh3 does without client auth
        schedule = self._schedule()
        assert self._dec_key is not None and self._next_dec_key is not None
        if finished.verify_data != schedule.finished_verify_data(self._dec_key):
            raise AlertDecryptError
        schedule.update_hash(input_buf.data)
        self._dec_key = self._next_dec_key
        self._next_dec_key = None
        self.update_traffic_key_cb(
            Direction.DECRYPT, Epoch.ONE_RTT, schedule.cipher_suite, self._dec_key
        )
        self._set_state(State.SERVER_POST_HANDSHAKE)

    def _server_handle_hello(
        self,
        input_buf: Buffer,
        initial_buf: Buffer,
        handshake_buf: Buffer,
        onertt_buf: Buffer,
    ) -> None:
        peer_hello = tls.pull_client_hello(input_buf)

        key = self.certificate_private_key
        assert key is not None and self.certificate is not None  # servers have an identity
        signature_algorithms: list[SignatureAlgorithm] = []
        if isinstance(key, RsaPrivateKey):
            signature_algorithms = [
                SignatureAlgorithm.RSA_PSS_RSAE_SHA256,
                SignatureAlgorithm.RSA_PKCS1_SHA256,
            ]
        elif isinstance(key, EcPrivateKey):
            signature_algorithms = {
                256: [SignatureAlgorithm.ECDSA_SECP256R1_SHA256],
                384: [SignatureAlgorithm.ECDSA_SECP384R1_SHA384],
                521: [SignatureAlgorithm.ECDSA_SECP521R1_SHA512],
            }.get(key.curve_type, [])
        elif isinstance(key, Ed25519PrivateKey):
            signature_algorithms = [SignatureAlgorithm.ED25519]

        cipher_suite = tls.negotiate(
            self._cipher_suites,
            peer_hello.cipher_suites,
            AlertHandshakeFailure("No supported cipher suite"),
            excl_fn=tls._is_grease_value,
        )
        compression_method = tls.negotiate(
            self._legacy_compression_methods,
            peer_hello.legacy_compression_methods,
            AlertHandshakeFailure("No supported compression method"),
        )
        signature_algorithm = tls.negotiate(
            signature_algorithms,
            peer_hello.signature_algorithms,
            AlertHandshakeFailure("No supported signature algorithm"),
        )
        supported_version = tls.negotiate(
            self._supported_versions,
            peer_hello.supported_versions,
            tls.AlertProtocolVersion("No supported protocol version"),
        )
        if self._alpn_protocols is not None:
            self.alpn_negotiated = tls.negotiate(
                self._alpn_protocols,
                peer_hello.alpn_protocols,
                AlertHandshakeFailure("No common ALPN protocols"),
            )

        assert peer_hello.random is not None
        self.client_random = peer_hello.random
        self.server_random = os.urandom(32)
        self.legacy_session_id = peer_hello.legacy_session_id
        self.received_extensions = peer_hello.other_extensions
        if self.alpn_cb:  # qh3's bridge parses the QUIC transport parameters here
            self.alpn_cb(self.alpn_negotiated)  # type: ignore[arg-type]

        # no resumption: every handshake authenticates both peers by certificate
        schedule = self.key_schedule = KeySchedule(cipher_suite)
        schedule.extract(None)
        schedule.update_hash(input_buf.data)

        public_key: bytes | None = None
        shared_key: bytes | None = None
        group_kx: int | None = None
        for group, peer_public_key in peer_hello.key_share or []:
            if group == Group.X25519:
                self._x25519_private_key = X25519KeyExchange()
                public_key = self._x25519_private_key.public_key()
                shared_key = self._x25519_private_key.exchange(peer_public_key)
            elif group == Group.X25519ML768:
                self._x25519_kyber_768_private_key = X25519ML768KeyExchange()
                shared_key = self._x25519_kyber_768_private_key.exchange(peer_public_key)
                public_key = self._x25519_kyber_768_private_key.shared_ciphertext()
            elif group == Group.SECP256R1:
                self._ec_p256_private_key = ECDHP256KeyExchange()
                public_key = self._ec_p256_private_key.public_key()
                shared_key = self._ec_p256_private_key.exchange(peer_public_key)
            elif group == Group.SECP384R1:
                self._ec_p384_private_key = ECDHP384KeyExchange()
                public_key = self._ec_p384_private_key.public_key()
                shared_key = self._ec_p384_private_key.exchange(peer_public_key)
            else:
                continue
            group_kx = group
            break
        if shared_key is None or public_key is None or group_kx is None:
            raise AlertHandshakeFailure("No supported key share group in ClientHello")

        hello = ServerHello(
            random=self.server_random,
            legacy_session_id=self.legacy_session_id,
            cipher_suite=cipher_suite,
            compression_method=compression_method,
            key_share=(group_kx, public_key),
            pre_shared_key=None,
            supported_version=supported_version,
        )
        with tls.push_message(schedule, initial_buf):
            tls.push_server_hello(initial_buf, hello)
        schedule.extract(shared_key)
        self._setup_traffic_protection(Direction.ENCRYPT, Epoch.HANDSHAKE, b"s hs traffic")
        self._setup_traffic_protection(Direction.DECRYPT, Epoch.HANDSHAKE, b"c hs traffic")

        with tls.push_message(schedule, handshake_buf):
            tls.push_encrypted_extensions(
                handshake_buf,
                EncryptedExtensions(
                    alpn_protocol=self.alpn_negotiated,
                    early_data=False,
                    other_extensions=self.handshake_extensions,
                ),
            )
        # the one addition to qh3's flight: ask the dialler for its certificate
        with tls.push_message(schedule, handshake_buf):
            _push_certificate_request(handshake_buf, b"", CLIENT_SIGNATURE_ALGORITHMS)
        with tls.push_message(schedule, handshake_buf):
            tls.push_certificate(
                handshake_buf,
                Certificate(
                    request_context=b"",
                    certificates=[
                        (x.public_bytes(), b"")
                        for x in [self.certificate, *self.certificate_chain]
                    ],
                ),
            )
        signature = key.sign(
            schedule.certificate_verify_data(b"TLS 1.3, server CertificateVerify"),
            *tls.signature_algorithm_params(signature_algorithm),
        )
        with tls.push_message(schedule, handshake_buf):
            tls.push_certificate_verify(
                handshake_buf, CertificateVerify(algorithm=signature_algorithm, signature=signature)
            )
        with tls.push_message(schedule, handshake_buf):
            tls.push_finished(
                handshake_buf,
                Finished(verify_data=schedule.finished_verify_data(self._enc_key or b"")),
            )

        schedule.extract(None)
        self._setup_traffic_protection(Direction.ENCRYPT, Epoch.ONE_RTT, b"s ap traffic")
        self._next_dec_key = schedule.derive_secret(b"c ap traffic")
        self._qp2p_expect = HandshakeType.CERTIFICATE
        self._set_state(State.SERVER_EXPECT_FINISHED)
