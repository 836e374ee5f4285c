"""Mutual TLS with qp2p's trust policies, on top of aioquic.

This is the one place that reaches into aioquic's TLS internals. aioquic's server asks for a
client certificate only through a private flag of its TLS context and never verifies the
chain a client presents; its client verifies only against X.509 roots and host names. qp2p
wants something else: both roles present a certificate, and each side applies its own
:class:`~qp2p.identity.Trust` policy (and an optional expected :class:`PeerId`) to the
peer's chain *inside* the handshake, as soon as the peer's Certificate message has been
parsed, before any application data can flow.

:class:`AuthenticatingQuicConnection` does this by configuring the ``tls.Context`` that
``QuicConnection._initialize`` creates:

- ``Context._request_client_certificate = True`` on servers (every dialer is asked for a
  certificate; under ``Trust.any()`` a dialer that sends none is still accepted);
- the bound methods ``_client_handle_certificate`` / ``_server_handle_certificate`` are
  wrapped so that, once aioquic has parsed the peer's chain into ``_peer_certificate`` and
  ``_peer_certificate_chain``, the trust policy runs; a rejection raises a ``tls.Alert``,
  which aioquic turns into a QUIC ``CRYPTO_ERROR`` (``0x100 + alert``) connection close;
- ``_client_handle_finished`` / ``_server_handle_finished`` are wrapped to fail closed
  (``internal_error`` alert) should the handshake ever reach Finished without the policy
  having run, and session resumption (which skips certificates) is switched off.

The peer still proves possession of the key in its CertificateVerify, which aioquic checks
after the Certificate message and before Finished, so a peer accepted here cannot complete
the handshake with a certificate that is not its own.

Failure codes (the ``ConnectionTerminated.error_code`` on both sides; the reason phrase is
the generic text below, the detailed message stays local in ``auth_error``):

============================  ==========================  ==========
check that failed             TLS alert                   error code
============================  ==========================  ==========
peer presented no certificate ``certificate_required``    ``0x174``
not pinned / not the expected ``access_denied``           ``0x131``
chain does not verify (CA)    ``bad_certificate``         ``0x12a``
============================  ==========================  ==========
"""

from __future__ import annotations

import logging
import re
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aioquic
from aioquic import tls
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import ConnectionTerminated, QuicEvent
from aioquic.quic.packet import QuicErrorCode
from cryptography import x509

from ..errors import PeerAuthenticationError
from ..identity import Identity, PeerId, Trust
from . import AUTH_REASON_PREFIX, PeerCheck

__all__ = [
    "AUTH_ERROR_CODES",
    "AUTH_REASON_PREFIX",
    "AuthenticatingQuicConnection",
    "PeerAuthenticated",
    "peer_rejection_error",
    "quic_configuration",
]

logger = logging.getLogger("qp2p.tls")

#: aioquic versions whose TLS internals this module was written against.
TESTED_AIOQUIC = ((1, 2), (1, 8))


#: QUIC error codes (``CRYPTO_ERROR + alert``) that mean "a certificate was refused": the
#: three qp2p sends, plus the certificate alerts aioquic or another TLS stack may send.
AUTH_ERROR_CODES: frozenset[int] = frozenset(
    QuicErrorCode.CRYPTO_ERROR + int(alert)
    for alert in (
        tls.AlertDescription.bad_certificate,
        tls.AlertDescription.unsupported_certificate,
        tls.AlertDescription.certificate_revoked,
        tls.AlertDescription.certificate_expired,
        tls.AlertDescription.certificate_unknown,
        tls.AlertDescription.unknown_ca,
        tls.AlertDescription.access_denied,
        tls.AlertDescription.certificate_required,
    )
)

# What of aioquic's internals we rely on; checked once here and again per connection.
_CONTEXT_METHODS = (
    "_client_handle_certificate",
    "_server_handle_certificate",
    "_client_handle_finished",
    "_server_handle_finished",
)
_CONTEXT_ATTRIBUTES = (
    "_request_client_certificate",
    "_peer_certificate",
    "_peer_certificate_chain",
    "session_ticket",
    "get_session_ticket_cb",
    "new_session_ticket_cb",
    "_supported_groups",
)
#: Key shares a dialler offers. aioquic offers four (P-256, P-384, X25519, X448), each a
#: fresh key pair per handshake; these two are what every TLS 1.3 stack accepts.
_CLIENT_GROUPS = (tls.Group.X25519, tls.Group.SECP256R1)
_CONNECTION_ATTRIBUTES = ("_initialize", "_is_client", "_handshake_confirmed", "_events")


def _aioquic_version() -> tuple[int, ...]:
    parts = re.findall(r"\d+", getattr(aioquic, "__version__", "0"))[:3]
    return tuple(int(p) for p in parts)


def _static_problem() -> str | None:
    missing = [m for m in _CONTEXT_METHODS if not callable(getattr(tls.Context, m, None))]
    if not callable(getattr(QuicConnection, "_initialize", None)):
        missing.append("QuicConnection._initialize")
    if not missing:
        return None
    return (
        f"aioquic {getattr(aioquic, '__version__', '?')} lacks the TLS internals qp2p's "
        f"mutual authentication hooks into ({', '.join(missing)}); qp2p was tested with "
        f"aioquic >={TESTED_AIOQUIC[0][0]}.{TESTED_AIOQUIC[0][1]},"
        f"<{TESTED_AIOQUIC[1][0]}.{TESTED_AIOQUIC[1][1]}"
    )


_STATIC_PROBLEM = _static_problem()
if not TESTED_AIOQUIC[0] <= _aioquic_version()[:2] < TESTED_AIOQUIC[1]:
    logger.warning(
        "aioquic %s is outside the range qp2p's TLS hooks were tested with; "
        "peer authentication is checked at run time and fails closed",
        getattr(aioquic, "__version__", "?"),
    )


class _PolicyAlert(tls.Alert):
    """A TLS alert raised because the peer failed qp2p's trust policy."""

    def __init__(self, refusal: tuple[int, str]) -> None:
        super().__init__(refusal[1])
        self.description = tls.AlertDescription(refusal[0])


@dataclass
class PeerAuthenticated(QuicEvent):
    """Emitted once, in both roles, when the handshake is *confirmed* and the peer accepted.

    On the server this follows ``HandshakeCompleted`` at once. On the client it comes when
    the server's HANDSHAKE_DONE arrives, i.e. after the server has checked the client's
    certificate: a client's ``HandshakeCompleted`` alone does not mean the server accepted
    it (in TLS 1.3 the client finishes before the server has seen its certificate).
    """

    peer_id: PeerId | None
    "The peer's id, or None for a peer that presented no certificate (``Trust.any()``)."


def quic_configuration(identity: Identity, *, is_client: bool, **options: Any) -> QuicConfiguration:
    """A ``QuicConfiguration`` that presents ``identity`` and leaves verification to qp2p.

    No ALPN is offered or required (like the Rust crate) and aioquic's own certificate
    verification is off (``verify_mode=CERT_NONE``): :class:`AuthenticatingQuicConnection`
    applies the trust policy instead. ``options`` are passed to ``QuicConfiguration``
    (``idle_timeout``, ``max_datagram_frame_size``, ``alpn_protocols``, ...); the identity
    fields and ``verify_mode`` cannot be overridden.
    """
    reserved = {"certificate", "certificate_chain", "private_key", "verify_mode", "is_client"}
    clash = reserved.intersection(options)
    if clash:
        raise TypeError(f"quic_configuration() sets {', '.join(sorted(clash))} itself")
    options.setdefault("alpn_protocols", None)
    configuration = QuicConfiguration(is_client=is_client, verify_mode=ssl.CERT_NONE, **options)
    configuration.certificate = identity.certificate
    configuration.certificate_chain = list(identity.chain[1:])
    configuration.private_key = identity.private_key
    return configuration


class AuthenticatingQuicConnection(QuicConnection):
    """A QuicConnection whose TLS handshake enforces a Trust policy in both roles.

    ``peer_id`` is the peer's id once its certificate has been seen (and, unless the policy
    rejected it, accepted); ``auth_error`` is set when the policy rejected the peer, and the
    connection is then closing with one of :data:`AUTH_ERROR_CODES`. Use
    :func:`quic_configuration` to build ``configuration``. Session resumption is disabled:
    every handshake authenticates both peers by certificate.
    """

    def __init__(
        self,
        *,
        configuration: QuicConfiguration,
        trust: Trust,
        expect_peer_id: PeerId | None = None,
        **kwargs: Any,
    ) -> None:
        if _STATIC_PROBLEM is not None:
            raise RuntimeError(_STATIC_PROBLEM)
        self._policy = PeerCheck(trust, expect_peer_id)  # TypeError unless a Trust
        if configuration.verify_mode not in (None, ssl.CERT_NONE):
            raise ValueError("use quic_configuration(): qp2p verifies peers itself")
        self._qp2p_announced = False
        super().__init__(configuration=configuration, **kwargs)

    @property
    def peer_id(self) -> PeerId | None:
        """The peer's id once its certificate has been seen."""
        return self._policy.peer_id

    @property
    def auth_error(self) -> PeerAuthenticationError | None:
        """Why the policy rejected the peer, if it did."""
        return self._policy.auth_error

    @property
    def is_authenticated(self) -> bool:
        """True once both sides accepted each other and the handshake is confirmed."""
        return self._qp2p_announced

    def receive_datagram(self, data: bytes, addr: Any, now: float) -> None:
        """Like ``QuicConnection.receive_datagram``; may also queue :class:`PeerAuthenticated`."""
        super().receive_datagram(data, addr, now)
        if (
            not self._qp2p_announced
            and self._handshake_confirmed
            and self._policy.checked
            and self.auth_error is None
        ):
            self._qp2p_announced = True
            self._events.append(PeerAuthenticated(peer_id=self.peer_id))

    def auth_failure(self, event: ConnectionTerminated) -> PeerAuthenticationError | None:
        """The authentication error a termination stands for, or None if it is not one.

        That is ``auth_error`` when this side rejected the peer, or an error built by
        :func:`peer_rejection_error` when the peer refused our certificate.
        """
        if self.auth_error is not None:
            return self.auth_error
        return peer_rejection_error(event, peer_id=self.peer_id)

    # -- the hooks -------------------------------------------------------------------

    def _initialize(self, peer_cid: bytes) -> None:
        super()._initialize(peer_cid)
        ctx = self.tls
        missing = [a for a in _CONTEXT_ATTRIBUTES if not hasattr(ctx, a)]
        missing += [a for a in _CONNECTION_ATTRIBUTES if not hasattr(self, a)]
        if missing:
            raise RuntimeError(
                f"aioquic {getattr(aioquic, '__version__', '?')} changed the internals "
                f"qp2p's mutual TLS relies on (missing: {', '.join(missing)})"
            )
        # Every handshake authenticates by certificate: no resumption, no tickets.
        ctx.session_ticket = None
        ctx.get_session_ticket_cb = None
        ctx.new_session_ticket_cb = None
        if self._is_client:
            offered = [g for g in _CLIENT_GROUPS if g in ctx._supported_groups]
            ctx._supported_groups = offered or ctx._supported_groups
            self._wrap(ctx, "_client_handle_certificate", self._after_peer_certificate)
            self._wrap(ctx, "_client_handle_finished", self._before_finished, before=True)
        else:
            ctx._request_client_certificate = True
            self._wrap(ctx, "_server_handle_certificate", self._after_peer_certificate)
            self._wrap(ctx, "_server_handle_finished", self._before_finished, before=True)

    @staticmethod
    def _wrap(
        ctx: tls.Context, name: str, hook: Callable[[tls.Context], None], *, before: bool = False
    ) -> None:
        original: Callable[..., None] = getattr(ctx, name)

        def wrapper(*args: Any) -> None:
            if before:
                hook(ctx)
            original(*args)
            if not before:
                hook(ctx)

        setattr(ctx, name, wrapper)

    def _after_peer_certificate(self, ctx: tls.Context) -> None:
        """Run the trust policy on the chain aioquic just parsed; reject with an alert."""
        leaf: x509.Certificate | None = ctx._peer_certificate
        refusal = self._policy.judge(
            [leaf, *ctx._peer_certificate_chain] if leaf is not None else []
        )
        if refusal is not None:
            raise _PolicyAlert(refusal)

    def _before_finished(self, ctx: tls.Context) -> None:
        """Fail closed if the handshake got to Finished without the policy having run."""
        refusal = self._policy.judge_finished()
        if refusal is not None:
            raise _PolicyAlert(refusal)


def peer_rejection_error(
    event: ConnectionTerminated, *, peer_id: PeerId | None = None
) -> PeerAuthenticationError | None:
    """A ``PeerAuthenticationError`` if ``event`` says a certificate was refused, else None.

    Meant for the side that did *not* reject (e.g. a dialer whose certificate the acceptor
    refused): ``event.error_code`` is one of :data:`AUTH_ERROR_CODES`. The event does not
    say which side closed; on the side that rejected, ``auth_error`` has the details (see
    :meth:`AuthenticatingQuicConnection.auth_failure`). ``peer_id`` is put on the error.
    """
    if event.error_code not in AUTH_ERROR_CODES:
        return None
    alert = tls.AlertDescription(event.error_code - QuicErrorCode.CRYPTO_ERROR)
    reason = event.reason_phrase or "no reason given"
    return PeerAuthenticationError(
        f"TLS handshake refused a certificate (alert {alert.name}): {reason}", peer_id=peer_id
    )
