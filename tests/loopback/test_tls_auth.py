"""Mutual TLS under qp2p's trust policies, over real UDP sockets on 127.0.0.1.

Two ``AuthenticatingQuicConnection`` objects (a dialer and an acceptor), each on its own
non-blocking UDP socket, are driven by a tiny in-test I/O loop (``add_reader`` + ``call_at``
timers) until both have either authenticated each other or terminated. Nothing about the
network is mocked. Every test runs under plain asyncio and under uvloop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest
from aioquic.buffer import Buffer  # type: ignore[attr-defined]
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import (
    ConnectionTerminated,
    HandshakeCompleted,
    QuicEvent,
    StreamDataReceived,
)
from aioquic.quic.packet import pull_quic_header
from aioquic.tls import SessionTicket

import qp2p.engine._aioquic_tls as qp2p_tls
from qp2p.engine import _peer_log as tls_log
from qp2p.engine._aioquic_tls import (
    AUTH_ERROR_CODES,
    AUTH_REASON_PREFIX,
    AuthenticatingQuicConnection,
    PeerAuthenticated,
    peer_rejection_error,
    quic_configuration,
)
from qp2p.errors import PeerAuthenticationError
from qp2p.identity import CertificateAuthority, Identity, PeerId, Trust

CRYPTO_ERROR = 0x100
BAD_CERTIFICATE = CRYPTO_ERROR + 42
ACCESS_DENIED = CRYPTO_ERROR + 49
CERTIFICATE_REQUIRED = CRYPTO_ERROR + 116
INTERNAL_ERROR = CRYPTO_ERROR + 80

#: Far below the 10 s idle timeout the connections use: a failure must be an alert, not a
#: timeout.
SETTLE_TIMEOUT = 5.0
IDLE_TIMEOUT = 10.0

# --------------------------------------------------------------------------- event loops

_LOOPS: dict[str, Callable[[], asyncio.AbstractEventLoop]] = {"asyncio": asyncio.new_event_loop}
try:
    import uvloop

    _LOOPS["uvloop"] = uvloop.new_event_loop
except ImportError:  # pragma: no cover - uvloop is optional
    pass

Runner = Callable[[Coroutine[Any, Any, Any]], Any]


@pytest.fixture(params=sorted(_LOOPS))
def run(request: pytest.FixtureRequest) -> Iterator[Runner]:
    """Run a coroutine to completion on a fresh loop of the parametrized kind."""
    factory = _LOOPS[request.param]

    def runner(coro: Coroutine[Any, Any, Any]) -> Any:
        loop = factory()
        try:
            return loop.run_until_complete(coro)
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    yield runner


# --------------------------------------------------------------------------- the driver


def _udp_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.setblocking(False)
    return sock


class Side:
    """One connection on one real UDP socket: reads, writes, timers, events."""

    def __init__(self, name: str, sock: socket.socket) -> None:
        self.name = name
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.quic: QuicConnection | None = None
        self.make_quic: Callable[[bytes], QuicConnection] | None = None
        self.events: list[QuicEvent] = []
        self.settled = asyncio.Event()
        self.settle_on_handshake = True  # for a plain aioquic peer (no PeerAuthenticated)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at: float | None = None
        self.loop.add_reader(sock.fileno(), self._readable)

    @property
    def addr(self) -> tuple[str, int]:
        host, port = self.sock.getsockname()[:2]
        return host, port

    @property
    def auth(self) -> AuthenticatingQuicConnection:
        assert isinstance(self.quic, AuthenticatingQuicConnection)
        return self.quic

    def of(self, kind: type[QuicEvent]) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    @property
    def terminated(self) -> ConnectionTerminated | None:
        found = self.of(ConnectionTerminated)
        return found[0] if found else None

    def _readable(self) -> None:
        while True:
            try:
                data, addr = self.sock.recvfrom(65536)
            except (BlockingIOError, InterruptedError):
                break
            if self.quic is None:
                if self.make_quic is None:
                    continue
                header = pull_quic_header(Buffer(data=data), host_cid_length=8)
                self.quic = self.make_quic(header.destination_cid)
            self.quic.receive_datagram(data, addr, now=self.loop.time())
        self.pump()

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = None
        assert self.quic is not None
        self.quic.handle_timer(now=self.loop.time())
        self.pump()

    def pump(self) -> None:
        """Send what the connection wants sent, collect its events, re-arm its timer."""
        quic = self.quic
        if quic is None:
            return
        for data, addr in quic.datagrams_to_send(now=self.loop.time()):
            with contextlib.suppress(BlockingIOError, InterruptedError):
                self.sock.sendto(data, addr)  # a dropped datagram is QUIC's to recover
        while (event := quic.next_event()) is not None:
            self.events.append(event)
            if isinstance(event, (PeerAuthenticated, ConnectionTerminated)):
                self.settled.set()
            elif (
                isinstance(event, HandshakeCompleted)
                and self.settle_on_handshake
                and not isinstance(quic, AuthenticatingQuicConnection)
            ):
                self.settled.set()  # a plain aioquic peer has no PeerAuthenticated
        when = quic.get_timer()
        if when != self._timer_at:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = self.loop.call_at(when, self._on_timer) if when is not None else None
            self._timer_at = when

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()


async def drive(
    client_quic: QuicConnection,
    make_server: Callable[[bytes], QuicConnection],
    *,
    plain_client_fails: bool = False,
    before_connect: Callable[[QuicConnection], None] | None = None,
    until: Callable[[Side, Side], bool] | None = None,
) -> tuple[Side, Side]:
    """Dial from ``client_quic`` to a server made by ``make_server`` on first contact, and
    run both until each side has settled (and ``until`` holds, if given).

    A plain aioquic peer settles on ``HandshakeCompleted`` unless ``plain_client_fails``.
    """
    server = Side("server", _udp_socket())
    client = Side("client", _udp_socket())
    client.settle_on_handshake = not plain_client_fails
    server.make_quic = make_server
    client.quic = client_quic
    loop = asyncio.get_running_loop()
    started = loop.time()
    client_quic.connect(server.addr, now=started)
    if before_connect is not None:
        before_connect(client_quic)
    client.pump()
    try:
        await asyncio.wait_for(
            asyncio.gather(client.settled.wait(), server.settled.wait()), SETTLE_TIMEOUT
        )
        while until is not None and not until(client, server):
            assert loop.time() - started < SETTLE_TIMEOUT
            await asyncio.sleep(0.01)
        # Let in-flight packets land, so a late close would still be seen.
        await asyncio.sleep(0.05)
    finally:
        client.close()
        server.close()
    assert loop.time() - started < IDLE_TIMEOUT / 2
    return client, server


async def handshake(
    *,
    client_config: QuicConfiguration,
    server_config: QuicConfiguration,
    client_trust: Trust | None = None,
    server_trust: Trust,
    client_expect: PeerId | None = None,
    server_expect: PeerId | None = None,
    plain_client_fails: bool = False,
    before_connect: Callable[[QuicConnection], None] | None = None,
) -> tuple[Side, Side]:
    """Dial an authenticating server; ``client_trust=None`` dials with plain aioquic."""

    def make_server(odcid: bytes) -> QuicConnection:
        return AuthenticatingQuicConnection(
            configuration=server_config,
            trust=server_trust,
            expect_peer_id=server_expect,
            original_destination_connection_id=odcid,
        )

    client_quic: QuicConnection
    if client_trust is None:
        client_quic = QuicConnection(configuration=client_config)
    else:
        client_quic = AuthenticatingQuicConnection(
            configuration=client_config, trust=client_trust, expect_peer_id=client_expect
        )
    return await drive(
        client_quic,
        make_server,
        plain_client_fails=plain_client_fails,
        before_connect=before_connect,
    )


def cfg(identity: Identity, *, is_client: bool) -> QuicConfiguration:
    return quic_configuration(identity, is_client=is_client, idle_timeout=IDLE_TIMEOUT)


def connect(
    run: Runner,
    client: Identity,
    server: Identity,
    *,
    client_trust: Trust,
    server_trust: Trust,
    client_expect: PeerId | None = None,
    server_expect: PeerId | None = None,
) -> tuple[Side, Side]:
    result: tuple[Side, Side] = run(
        handshake(
            client_config=cfg(client, is_client=True),
            server_config=cfg(server, is_client=False),
            client_trust=client_trust,
            server_trust=server_trust,
            client_expect=client_expect,
            server_expect=server_expect,
        )
    )
    return result


def assert_connected(
    client: Side, server: Side, client_identity: Identity | None, server_identity: Identity
) -> None:
    for side in (client, server):
        assert side.terminated is None, f"{side.name}: {side.terminated}"
        assert side.of(HandshakeCompleted), side.name
        assert side.auth.auth_error is None
        assert side.auth.is_authenticated
    expected_client_id = client_identity.peer_id if client_identity is not None else None
    assert client.auth.peer_id == server_identity.peer_id
    assert server.auth.peer_id == expected_client_id
    assert client.of(PeerAuthenticated) == [PeerAuthenticated(peer_id=server_identity.peer_id)]
    assert server.of(PeerAuthenticated) == [PeerAuthenticated(peer_id=expected_client_id)]


def assert_rejected_by(rejecter: Side, rejected: Side, code: int, seen: PeerId | None) -> None:
    """``rejecter`` refused its peer inside the handshake with alert ``code``."""
    err = rejecter.auth.auth_error
    assert isinstance(err, PeerAuthenticationError)
    assert err.peer_id == seen
    assert rejecter.auth.peer_id == seen
    assert not rejecter.of(PeerAuthenticated)
    assert not rejected.of(PeerAuthenticated)
    for side in (rejecter, rejected):
        term = side.terminated
        assert term is not None, f"{side.name} did not terminate"
        assert term.error_code == code, f"{side.name}: {term}"
        assert term.reason_phrase.startswith(AUTH_REASON_PREFIX), term.reason_phrase
        assert code in AUTH_ERROR_CODES
    # the side that rejected reports its own error; the other maps the close to one
    assert rejecter.auth.auth_failure(rejecter.terminated) is err  # type: ignore[arg-type]
    if isinstance(rejected.quic, AuthenticatingQuicConnection):
        assert rejected.auth.auth_error is None
        mapped = rejected.auth.auth_failure(rejected.terminated)  # type: ignore[arg-type]
        assert isinstance(mapped, PeerAuthenticationError)
        assert AUTH_REASON_PREFIX in str(mapped)


# --------------------------------------------------------------------------- identities


@pytest.fixture(scope="module")
def alice() -> Identity:
    return Identity.generate()


@pytest.fixture(scope="module")
def bob() -> Identity:
    return Identity.generate()


@pytest.fixture(scope="module")
def mallory() -> Identity:
    return Identity.generate()


@pytest.fixture(scope="module")
def net_ca() -> CertificateAuthority:
    return CertificateAuthority.generate("test-net")


# --------------------------------------------------------------------------- Trust.any


def test_any_both_ways(run: Runner, alice: Identity, bob: Identity) -> None:
    client, server = connect(run, alice, bob, client_trust=Trust.any(), server_trust=Trust.any())
    assert_connected(client, server, alice, bob)


def test_server_always_asks_for_the_client_certificate(
    run: Runner, alice: Identity, bob: Identity
) -> None:
    _, server = connect(run, alice, bob, client_trust=Trust.any(), server_trust=Trust.any())
    assert server.auth.peer_id == alice.peer_id  # known on the acceptor under Trust.any too


def test_no_alpn_offered_or_required(run: Runner, alice: Identity, bob: Identity) -> None:
    client, server = connect(run, alice, bob, client_trust=Trust.any(), server_trust=Trust.any())
    assert client.of(HandshakeCompleted)[0].alpn_protocol is None
    assert server.of(HandshakeCompleted)[0].alpn_protocol is None


def test_any_accepts_a_client_without_certificate(run: Runner, bob: Identity) -> None:
    bare = QuicConfiguration(
        is_client=True, verify_mode=ssl.CERT_NONE, alpn_protocols=None, idle_timeout=IDLE_TIMEOUT
    )
    client, server = run(
        handshake(
            client_config=bare,
            server_config=cfg(bob, is_client=False),
            client_trust=Trust.any(),
            server_trust=Trust.any(),
        )
    )
    assert_connected(client, server, None, bob)
    assert server.auth.peer_id is None


def test_plain_aioquic_client_without_certificate(run: Runner, bob: Identity) -> None:
    """A dialer without qp2p's hooks interoperates under Trust.any()."""
    bare = QuicConfiguration(is_client=True, verify_mode=ssl.CERT_NONE, idle_timeout=IDLE_TIMEOUT)
    client, server = run(
        handshake(
            client_config=bare,
            server_config=cfg(bob, is_client=False),
            client_trust=None,
            server_trust=Trust.any(),
        )
    )
    assert client.terminated is None and client.of(HandshakeCompleted)
    assert server.auth.is_authenticated and server.auth.peer_id is None


@pytest.mark.parametrize("trust", ["pinned", "ca"])
def test_policies_refuse_a_client_without_certificate(
    run: Runner, trust: str, bob: Identity, net_ca: CertificateAuthority
) -> None:
    bare = QuicConfiguration(is_client=True, verify_mode=ssl.CERT_NONE, idle_timeout=IDLE_TIMEOUT)
    server_identity = net_ca.issue() if trust == "ca" else bob
    policy = Trust.ca(net_ca.certificate_pem) if trust == "ca" else Trust.pinned([bob.peer_id])
    client, server = run(
        handshake(
            client_config=bare,
            server_config=cfg(server_identity, is_client=False),
            client_trust=None,
            server_trust=policy,
            plain_client_fails=True,
        )
    )
    assert_rejected_by(server, client, CERTIFICATE_REQUIRED, None)
    assert not server.of(HandshakeCompleted)
    assert "no certificate" in str(server.auth.auth_error)


def test_any_with_a_client_expectation_needs_that_peer(
    run: Runner, alice: Identity, bob: Identity, mallory: Identity
) -> None:
    client, server = connect(
        run, alice, bob, client_trust=Trust.any(), server_trust=Trust.any(),
        client_expect=bob.peer_id,
    )  # fmt: skip
    assert_connected(client, server, alice, bob)
    client, server = connect(
        run, alice, mallory, client_trust=Trust.any(), server_trust=Trust.any(),
        client_expect=bob.peer_id,
    )  # fmt: skip
    assert_rejected_by(client, server, ACCESS_DENIED, mallory.peer_id)
    message = str(client.auth.auth_error)
    assert str(mallory.peer_id) in message and str(bob.peer_id) in message
    assert "does not match the expected peer id" in message


def test_server_expectation(run: Runner, alice: Identity, bob: Identity, mallory: Identity) -> None:
    client, server = connect(
        run, alice, bob, client_trust=Trust.any(), server_trust=Trust.any(),
        server_expect=alice.peer_id,
    )  # fmt: skip
    assert_connected(client, server, alice, bob)
    client, server = connect(
        run, mallory, bob, client_trust=Trust.any(), server_trust=Trust.any(),
        server_expect=alice.peer_id,
    )  # fmt: skip
    assert_rejected_by(server, client, ACCESS_DENIED, mallory.peer_id)
    assert not server.of(HandshakeCompleted)


# --------------------------------------------------------------------------- Trust.pinned


def test_pinned_both_ways(run: Runner, alice: Identity, bob: Identity) -> None:
    client, server = connect(
        run, alice, bob,
        client_trust=Trust.pinned([bob.peer_id]), server_trust=Trust.pinned([alice.peer_id]),
    )  # fmt: skip
    assert_connected(client, server, alice, bob)


def test_client_pin_excludes_server(
    run: Runner, alice: Identity, bob: Identity, mallory: Identity
) -> None:
    client, server = connect(
        run, alice, mallory, client_trust=Trust.pinned([bob.peer_id]), server_trust=Trust.any()
    )
    assert_rejected_by(client, server, ACCESS_DENIED, mallory.peer_id)
    # the dialer refused before sending its Finished: neither side completed
    assert not client.of(HandshakeCompleted)
    assert not server.of(HandshakeCompleted)
    assert str(client.auth.auth_error) == f"peer {mallory.peer_id} is not pinned"


def test_server_pin_excludes_client(
    run: Runner, alice: Identity, bob: Identity, mallory: Identity
) -> None:
    client, server = connect(
        run, mallory, bob, client_trust=Trust.any(), server_trust=Trust.pinned([alice.peer_id])
    )
    assert_rejected_by(server, client, ACCESS_DENIED, mallory.peer_id)
    assert not server.of(HandshakeCompleted)  # the acceptor never completes
    assert "is not pinned" in str(server.auth.auth_error)
    # the dialer learns it was refused from the close, and never authenticates
    assert not client.auth.is_authenticated


def test_pinned_by_text_form(run: Runner, alice: Identity, bob: Identity) -> None:
    client, server = connect(
        run, alice, bob,
        client_trust=Trust.pinned([str(bob.peer_id)]), server_trust=Trust.any(),
    )  # fmt: skip
    assert_connected(client, server, alice, bob)


# --------------------------------------------------------------------------- Trust.ca


def test_ca_issued_identities_connect_both_ways(run: Runner, net_ca: CertificateAuthority) -> None:
    one, two = net_ca.issue(), net_ca.issue()
    trust = Trust.ca(net_ca.certificate_pem)
    client, server = connect(run, one, two, client_trust=trust, server_trust=trust)
    assert_connected(client, server, one, two)
    client, server = connect(run, two, one, client_trust=trust, server_trust=trust)
    assert_connected(client, server, two, one)


def test_ca_loaded_from_disk(run: Runner, net_ca: CertificateAuthority, tmp_path: Any) -> None:
    net_ca.save(tmp_path / "ca.pem")
    loaded = CertificateAuthority.load(tmp_path / "ca.pem")
    one = loaded.issue()
    one.save(tmp_path / "one.pem")
    one = Identity.load(tmp_path / "one.pem")
    two = net_ca.issue()
    trust = Trust.ca(loaded.certificate_pem)
    client, server = connect(run, one, two, client_trust=trust, server_trust=trust)
    assert_connected(client, server, one, two)


@pytest.mark.parametrize("stranger_kind", ["other-ca", "self-signed"])
@pytest.mark.parametrize("stranger_role", ["client", "server"])
def test_ca_rejects_strangers(
    run: Runner, net_ca: CertificateAuthority, stranger_kind: str, stranger_role: str
) -> None:
    member = net_ca.issue()
    if stranger_kind == "other-ca":
        stranger = CertificateAuthority.generate("other-net").issue()
        stranger_trust = Trust.ca(b"".join(c.certificate_pem for c in [net_ca]))  # trusts us
    else:
        stranger = Identity.generate()
        stranger_trust = Trust.any()
    trust = Trust.ca(net_ca.certificate_pem)
    if stranger_role == "client":
        client, server = connect(
            run, stranger, member, client_trust=stranger_trust, server_trust=trust
        )
        assert_rejected_by(server, client, BAD_CERTIFICATE, stranger.peer_id)
        assert not server.of(HandshakeCompleted)
        err = server.auth.auth_error
    else:
        client, server = connect(
            run, member, stranger, client_trust=trust, server_trust=stranger_trust
        )
        assert_rejected_by(client, server, BAD_CERTIFICATE, stranger.peer_id)
        assert not client.of(HandshakeCompleted)
        err = client.auth.auth_error
    assert "is not issued by the trusted CA" in str(err)
    assert str(stranger.peer_id) in str(err)


def test_ca_with_several_roots(run: Runner, net_ca: CertificateAuthority) -> None:
    other = CertificateAuthority.generate("other-net")
    trust = Trust.ca(net_ca.certificate_pem + other.certificate_pem)
    one, two = net_ca.issue(), other.issue()
    client, server = connect(run, one, two, client_trust=trust, server_trust=trust)
    assert_connected(client, server, one, two)


def test_ca_and_expectation(run: Runner, net_ca: CertificateAuthority) -> None:
    one, two, three = net_ca.issue(), net_ca.issue(), net_ca.issue()
    trust = Trust.ca(net_ca.certificate_pem)
    client, server = connect(
        run, one, two, client_trust=trust, server_trust=trust, client_expect=three.peer_id
    )
    assert_rejected_by(client, server, ACCESS_DENIED, two.peer_id)


# --------------------------------------------------------------------------- key types


@pytest.mark.parametrize(
    ("client_kind", "server_kind"),
    [("ed25519", "ed25519"), ("ed25519", "p256"), ("p256", "ed25519")],
)
@pytest.mark.parametrize("policy", ["any", "pinned"])
def test_ed25519_and_p256_interop(
    run: Runner, client_kind: str, server_kind: str, policy: str
) -> None:
    c, s = Identity.generate(client_kind), Identity.generate(server_kind)
    if policy == "any":
        client_trust, server_trust = Trust.any(), Trust.any()
    else:
        client_trust, server_trust = Trust.pinned([s.peer_id]), Trust.pinned([c.peer_id])
    client, server = connect(run, c, s, client_trust=client_trust, server_trust=server_trust)
    assert_connected(client, server, c, s)


def test_ed25519_rejected_by_pin(run: Runner, alice: Identity) -> None:
    ed = Identity.generate("ed25519")
    client, server = connect(
        run, ed, alice, client_trust=Trust.any(), server_trust=Trust.pinned([alice.peer_id])
    )
    assert_rejected_by(server, client, ACCESS_DENIED, ed.peer_id)


def test_ca_issued_ed25519_leaf(run: Runner, net_ca: CertificateAuthority) -> None:
    one, two = net_ca.issue("ed25519"), net_ca.issue("p256")
    trust = Trust.ca(net_ca.certificate_pem)
    client, server = connect(run, one, two, client_trust=trust, server_trust=trust)
    assert_connected(client, server, one, two)


# --------------------------------------------------------------------------- plumbing


def test_application_data_flows_only_after_authentication(
    run: Runner, alice: Identity, bob: Identity, mallory: Identity
) -> None:
    """A refused dialer's early stream data never reaches the acceptor's application."""

    def send_early(quic: QuicConnection) -> None:
        # queued at once: aioquic sends it as soon as it has 1-RTT keys, i.e. together
        # with the dialer's certificate, before the acceptor has judged it
        quic.send_stream_data(quic.get_next_available_stream_id(), b"secret", end_stream=True)

    client, server = run(
        handshake(
            client_config=cfg(mallory, is_client=True),
            server_config=cfg(bob, is_client=False),
            client_trust=Trust.any(),
            server_trust=Trust.pinned([alice.peer_id]),
            before_connect=send_early,
        )
    )
    assert not server.of(StreamDataReceived)
    assert_rejected_by(server, client, ACCESS_DENIED, mallory.peer_id)


def test_accepted_peers_exchange_data(run: Runner, alice: Identity, bob: Identity) -> None:
    def send_early(quic: QuicConnection) -> None:
        quic.send_stream_data(quic.get_next_available_stream_id(), b"hello", end_stream=True)

    client, server = run(
        handshake(
            client_config=cfg(alice, is_client=True),
            server_config=cfg(bob, is_client=False),
            client_trust=Trust.pinned([bob.peer_id]),
            server_trust=Trust.pinned([alice.peer_id]),
            before_connect=send_early,
        )
    )
    assert_connected(client, server, alice, bob)
    assert b"".join(e.data for e in server.of(StreamDataReceived)) == b"hello"


def test_session_resumption_cannot_skip_authentication(run: Runner, bob: Identity) -> None:
    """A client holding a session ticket still gets (and checks) the server's certificate."""
    tickets: dict[bytes, SessionTicket] = {}
    received: list[SessionTicket] = []
    plain_server_config = cfg(bob, is_client=False)

    def plain_server(odcid: bytes) -> QuicConnection:
        return QuicConnection(
            configuration=plain_server_config,
            original_destination_connection_id=odcid,
            session_ticket_fetcher=tickets.get,
            session_ticket_handler=lambda t: tickets.__setitem__(t.ticket, t),
        )

    def plain_client(ticket: SessionTicket | None) -> QuicConnection:
        conf = QuicConfiguration(is_client=True, verify_mode=ssl.CERT_NONE)
        conf.session_ticket = ticket
        return QuicConnection(configuration=conf, session_ticket_handler=received.append)

    # 1. a plain client obtains a ticket
    run(drive(plain_client(None), plain_server, until=lambda c, s: bool(received)))
    ticket = received[0]
    # 2. control: with it, plain aioquic resumes without any certificate
    client, _ = run(drive(plain_client(ticket), plain_server))
    assert client.of(HandshakeCompleted)[0].session_resumed
    # 3. qp2p's client ignores the ticket and authenticates the server as usual
    conf = quic_configuration(Identity.generate(), is_client=True, idle_timeout=IDLE_TIMEOUT)
    conf.session_ticket = ticket
    quic = AuthenticatingQuicConnection(configuration=conf, trust=Trust.pinned([bob.peer_id]))
    client, _ = run(drive(quic, plain_server, until=lambda c, s: bool(c.of(PeerAuthenticated))))
    assert not client.of(HandshakeCompleted)[0].session_resumed
    assert client.auth.peer_id == bob.peer_id and client.auth.auth_error is None


def test_fails_closed_if_the_certificate_hook_never_ran(
    run: Runner, alice: Identity, bob: Identity, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Should aioquic ever reach Finished without our certificate hook, the handshake fails."""
    monkeypatch.setattr(
        AuthenticatingQuicConnection, "_after_peer_certificate", lambda self, ctx: None
    )
    client, server = connect(run, alice, bob, client_trust=Trust.any(), server_trust=Trust.any())
    for side in (client, server):
        term = side.terminated
        assert term is not None and term.error_code == INTERNAL_ERROR, side.name
        assert not side.of(PeerAuthenticated)
    assert isinstance(client.auth.auth_error, PeerAuthenticationError)
    assert "skipped" in str(client.auth.auth_error)


def test_guard_against_changed_internals(alice: Identity, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(qp2p_tls, "_STATIC_PROBLEM", "aioquic 9.9 lacks the TLS internals")
    with pytest.raises(RuntimeError, match="lacks the TLS internals"):
        AuthenticatingQuicConnection(configuration=cfg(alice, is_client=True), trust=Trust.any())
    monkeypatch.setattr(qp2p_tls, "_STATIC_PROBLEM", None)
    monkeypatch.setattr(
        qp2p_tls, "_CONTEXT_ATTRIBUTES", (*qp2p_tls._CONTEXT_ATTRIBUTES, "_gone_in_aioquic_2")
    )
    quic = AuthenticatingQuicConnection(configuration=cfg(alice, is_client=True), trust=Trust.any())
    with pytest.raises(RuntimeError, match="_gone_in_aioquic_2"):
        quic.connect(("127.0.0.1", 9), now=0.0)


def test_quic_configuration(alice: Identity, net_ca: CertificateAuthority) -> None:
    conf = quic_configuration(alice, is_client=True, idle_timeout=3.0, max_datagram_frame_size=9)
    assert conf.is_client and conf.verify_mode == ssl.CERT_NONE and conf.alpn_protocols is None
    assert conf.certificate == alice.certificate and conf.certificate_chain == []
    assert conf.private_key is alice.private_key
    assert conf.idle_timeout == 3.0 and conf.max_datagram_frame_size == 9
    member = net_ca.issue()
    conf = quic_configuration(member, is_client=False)
    assert not conf.is_client and conf.certificate_chain == [net_ca.certificate]
    with pytest.raises(TypeError):
        quic_configuration(alice, is_client=True, verify_mode=ssl.CERT_REQUIRED)


def test_connection_argument_checks(alice: Identity) -> None:
    with pytest.raises(TypeError):
        AuthenticatingQuicConnection(
            configuration=cfg(alice, is_client=True),
            trust="any",  # type: ignore[arg-type]
        )
    strict = QuicConfiguration(is_client=True, verify_mode=ssl.CERT_REQUIRED)
    with pytest.raises(ValueError):
        AuthenticatingQuicConnection(configuration=strict, trust=Trust.any())


def test_peer_rejection_error_mapping(bob: Identity) -> None:
    refused = ConnectionTerminated(
        error_code=ACCESS_DENIED, frame_type=6, reason_phrase=f"{AUTH_REASON_PREFIX}: x"
    )
    err = peer_rejection_error(refused, peer_id=bob.peer_id)
    assert isinstance(err, PeerAuthenticationError)
    assert err.peer_id == bob.peer_id and "access_denied" in str(err)
    for code in (0, 0x1, 0x100 + 40, 0x100 + 51):
        other = ConnectionTerminated(error_code=code, frame_type=None, reason_phrase="")
        assert peer_rejection_error(other) is None


def test_rejection_is_logged(
    run: Runner, alice: Identity, bob: Identity, caplog: pytest.LogCaptureFixture
) -> None:
    # rate limited (one line per cause per interval): an earlier test may have written
    # this interval's line, and then this rejection is counted instead
    cause = "reject-_Failure.NOT_PINNED"
    before = tls_log.suppressed(cause)
    with caplog.at_level(logging.WARNING, logger="qp2p.tls"):
        connect(
            run, alice, bob, client_trust=Trust.pinned([alice.peer_id]), server_trust=Trust.any()
        )
    logged = any(r.name == "qp2p.tls" and str(bob.peer_id) in r.getMessage()
                 for r in caplog.records)
    assert logged or tls_log.suppressed(cause) == before + 1
