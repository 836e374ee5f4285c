"""The endpoint: one UDP socket carrying every QUIC connection of a node, both ways.

Receive path: the socket is drained in bursts (``recv_batch``); each datagram is routed by
its destination connection ID through the connection table and fed to its engine, whose
events are handled at once. Send path: connections with something to send are marked
dirty and flushed together once per loop turn (``send_batch``), so ACKs and data coalesce.
Timers: every connection's engine deadline in one heap (``qp2p.timers``) and one loop
timer for the earliest; at most ``TIMERS_PER_TURN`` handled per loop turn.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import enum
import functools
import ipaddress
import logging
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Generator, Iterable
from types import TracebackType
from typing import TYPE_CHECKING, Any, ParamSpec

from . import _speedups, services, wire
from . import engine as quic_engine
from . import relay as relay_mod
from .config import Config
from .connection import ClosesOnExit, Connection, ControlMessage, Driver, Port
from .errors import (
    ConnectionClosed,
    ConnectionError,
    EndpointClosed,
    HolePunchFailed,
    PeerAuthenticationError,
)
from .identity import Identity, PeerId, Trust
from .pool import Pool
from .portmap import PROTOCOLS, Mapping, PortMapper
from .ratelog import RateLimitedLog
from .retry import retry_dial
from .signal import Signal
from .timers import DeadlineQueue
from .wire import SockAddr

if TYPE_CHECKING:
    from ._fastpath import DirtySet
    from .services.host import ControlHandler, FirstFlight

__all__ = ["Endpoint", "EndpointBinding"]

logger = logging.getLogger("qp2p.endpoint")
#: Lines a peer can trigger: one per cause per interval, with counts.
_peer_log = RateLimitedLog(logger)

#: Datagrams read per ``recv_batch`` call.
RECV_BATCH = 64
#: Datagrams read ahead of handling them, at most, and their bytes at most (beyond, the
#: established connections' datagrams are read and dropped, counted in ``stats_counters
#: ["rx_queue_dropped"]``: left in the kernel they would stop the handshakes behind them
#: from being read, and the kernel would drop those too): anyone who knows a connection
#: ID can fill the queue.
RX_QUEUE_MAX = 65536
RX_QUEUE_MAX_BYTES = 16 * 2**20
#: Queued datagrams that waited longer than this are dropped unhandled (counted the same):
#: an endpoint behind its traffic must not answer seconds late, or its peers' RTT samples
#: grow to seconds and their loss timers back off past any useful bound; dropped, they are
#: resent after a loss timer sized by the delay we keep to.
RX_QUEUE_MAX_DELAY = 1.0
#: Datagrams read per readable event at most: a flood faster than we read cannot hold the
#: loop (the rest wait in the kernel until the next turn).
RX_READ_PER_TURN = 16384
#: Datagrams of handshakes and unknown connection IDs handled per readable event, at most:
#: a flood of them ends the read, so it cannot hold the loop (the rest wait in the kernel).
RX_URGENT_PER_TURN = 1024
#: Queued datagrams handled per loop turn: few enough that the socket is read again soon
#: (new peers' handshakes overtake the queue only when they are read).
RX_DRAIN_PER_TURN = 256
#: A connection's first datagrams once established (this many, within this many seconds)
#: queue in a lane of their own, handled before the others' queue: a fresh peer's first
#: exchange (its first request) overtakes everyone's traffic, as its handshake did. Both
#: bounded: a handshake buys a peer no more, and thousands of connections established at
#: once share that lane only briefly.
RX_FRESH_DATAGRAMS = 32
RX_FRESH_SECONDS = 1.0
#: The fresh lane's own bound (datagrams, and bytes beyond ``RX_QUEUE_MAX_BYTES``): a
#: full queue does not stop a fresh connection's first exchange.
RX_FRESH_MAX = 1024
RX_FRESH_MAX_BYTES = 2**20
#: The socket's receive and send buffers: what a loop turn of thousands of busy
#: connections leaves waiting in the kernel. The system caps what a process may ask
#: (``net.core.rmem_max``, ``wmem_max``: often 208 KiB); a process allowed to exceed it
#: (CAP_NET_ADMIN, Linux's SO_RCVBUFFORCE / SO_SNDBUFFORCE) gets the whole size.
SOCKET_BUFFER_BYTES = 4 * 2**20
# Linux's SO_RCVBUFFORCE and SO_SNDBUFFORCE (the socket module does not name them)
_BUFFER_OPTIONS = (
    ((33, socket.SO_RCVBUF), (32, socket.SO_SNDBUF)) if sys.platform.startswith("linux")
    else ((None, socket.SO_RCVBUF), (None, socket.SO_SNDBUF))
)
#: Timers due sooner than this run on the next loop turn instead of a loop timer.
TIMER_GRANULARITY = 0.001
#: Connection timers handled per loop turn at most, earliest deadline first (the rest on
#: the next turns): thousands due at once (after a slow turn) must not make one turn
#: last hundreds of ms, during which the socket is not read.
TIMERS_PER_TURN = 256
# the two events each message or datagram brings, looked up once (the receive loop)
_STREAM_DATA = quic_engine.StreamData
_DATAGRAM = quic_engine.Datagram
#: The engine's clock. Not ``loop.time()``: uvloop caches it in whole milliseconds, which
#: turns aioquic's microsecond pacing into millisecond stalls.
_now = time.monotonic
#: A connection starved by the endpoint's receive budget is woken once this much is free,
#: a few at a time.
WAKE_STARVED_BYTES = 64 * 2**10
WAKE_STARVED_AT_ONCE = 8
#: How long ``close()`` waits for the CONNECTION_CLOSE frames to leave the socket.
CLOSE_FLUSH_TIMEOUT = 1.0


#: IPv6 sources are limited per /64: one subscriber usually holds a whole /64 and can
#: pick any address in it (RFC 6177), so a per-address limit would not hold it.
IPV6_LIMIT_PREFIX = 64


def ip_key(host: Any) -> str:
    """The key ``max_connections_per_ip`` counts a source under: the IPv4 address itself
    (also when written IPv4-mapped, ``::ffff:a.b.c.d``), or the IPv6 address's /64."""
    text = str(host)
    if ":" not in text:  # IPv4 (the per-packet common case: no parsing)
        return text
    if text.startswith("::ffff:") and "." in text:
        return text[7:]
    text = text.split("%", 1)[0]  # a scope id is not part of the address
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return text
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, IPV6_LIMIT_PREFIX), strict=False))
    return str(ip)


class EndpointBinding:
    """What :meth:`Endpoint.bind` returns: ``await`` it for the :class:`Endpoint`, or use
    it directly as an async context manager that closes the endpoint on exit::

        async with qp2p.Endpoint.bind(addr) as ep: ...
        ep = await qp2p.Endpoint.bind(addr)

    (like asyncpg's ``create_pool``). The socket is bound when it is awaited or entered,
    once: a second use raises ``RuntimeError`` (call ``bind`` again for another endpoint).
    """

    __slots__ = ("_endpoint", "_open")

    def __init__(self, open_endpoint: Callable[[], Coroutine[Any, Any, Endpoint]]) -> None:
        self._open: Callable[[], Coroutine[Any, Any, Endpoint]] | None = open_endpoint
        self._endpoint: Endpoint | None = None

    def _start(self) -> Coroutine[Any, Any, Endpoint]:
        open_endpoint, self._open = self._open, None
        if open_endpoint is None:
            raise RuntimeError("this Endpoint.bind(...) was already awaited or entered")
        return open_endpoint()

    def __await__(self) -> Generator[Any, None, Endpoint]:
        return self._start().__await__()

    async def __aenter__(self) -> Endpoint:
        self._endpoint = await self._start()
        return self._endpoint

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._endpoint is not None:
            await self._endpoint.close()


_P = ParamSpec("_P")


def _binding(
    bind: Callable[_P, Coroutine[Any, Any, Endpoint]],
) -> Callable[_P, EndpointBinding]:
    """Make the ``bind`` coroutine function return an :class:`EndpointBinding`."""

    @functools.wraps(bind)
    def wrapper(*args: _P.args, **kwargs: _P.kwargs) -> EndpointBinding:
        return EndpointBinding(lambda: bind(*args, **kwargs))

    return wrapper


def _as_peer_id(value: PeerId | str | None) -> PeerId | None:
    """A ``PeerId`` from a ``PeerId`` or its text form (as ``qp2p identity show`` prints)."""
    if value is None or isinstance(value, PeerId):
        return value
    if isinstance(value, str):
        return PeerId.from_str(value)
    raise TypeError(f"expected a PeerId or its text form, not {type(value).__name__}")


def size_buffers(sock: socket.socket, size: int | None = None) -> None:
    """Ask for ``size`` (``SOCKET_BUFFER_BYTES``) of receive and send buffer: beyond the
    system's cap where the process may (the forcing option), else up to the cap (quietly:
    an unprivileged process gets what the system allows)."""
    size = SOCKET_BUFFER_BYTES if size is None else size
    for force, plain in _BUFFER_OPTIONS:
        if force is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, force, size)
                continue
            except OSError:  # EPERM without CAP_NET_ADMIN
                pass
        with contextlib.suppress(OSError):  # the system may cap it
            sock.setsockopt(socket.SOL_SOCKET, plain, size)


class Endpoint(ClosesOnExit):
    """One node: a UDP socket that accepts and dials QUIC connections.

    Create with ``await Endpoint.bind(addr)``, or ``async with Endpoint.bind(addr) as ep``
    to close it on exit (an endpoint is itself an async context manager too).

    Attributes (read them; they are set at bind):

    - ``local_addr``: the ``(host, port)`` the socket is bound to.
    - ``public_addr``: the address peers see us at, once known (``discover_public_addr``,
      port mapping), else ``None``.
    - ``config``, ``identity``, ``trust``: what the endpoint was bound with.
    - ``rendezvous``, ``relay``: whether it introduces peers and relays for them.
    - ``stats_counters``: the endpoint's own counters (datagrams in and out, send errors,
      datagrams for unknown connections dropped, datagrams dropped from the read-ahead
      queue (full, or waited too long), Version Negotiations, refused and timed-out
      handshakes, Retries sent).
    """

    def __init__(
        self,
        sock: socket.socket,
        config: Config,
        identity: Identity,
        trust: Trust,
        accept_incoming: bool,
        rendezvous: bool,
        relay: bool = False,
    ) -> None:
        self._loop = asyncio.get_running_loop()
        self._sock = sock
        self._fd = sock.fileno()
        self.config = config
        self.identity = identity
        self.trust = trust
        self._accept_incoming = accept_incoming
        self.rendezvous = rendezvous or relay
        self.relay = relay
        self._fp = _speedups.impl
        self._table = self._fp.ConnectionTable(quic_engine.CID_LENGTH)
        self._engine = quic_engine.resolve(config.engine)
        self._client_config = self._engine.make_configuration(identity, config, is_client=True)
        self._server_config = self._engine.make_configuration(identity, config, is_client=False)
        self._versions = set(self._engine.supported_versions())
        self._validator = quic_engine.AddressValidator(engine=self._engine)
        self._budget = quic_engine.ReceiveBudget(config.max_endpoint_buffered_bytes)
        self._half_open: set[Connection] = set()  # incoming handshakes in progress
        # when recent tokenless Initials were junk or refused (engine clock), at most
        # as many as it takes to switch to Retry
        self._unproven: collections.deque[float] = collections.deque(
            maxlen=config.address_validation_threshold)
        self._incoming_per_ip: collections.Counter[str] = collections.Counter()
        self.local_addr: wire.Address = sock.getsockname()[:2]
        self.public_addr: wire.Address | None = None
        self._pool = Pool()
        self._handshaking: set[Connection] = set()
        self._live: set[Connection] = set()  # every connection the engine still drives
        # what we keep per connection to drive it, from its creation until it is forgotten
        self._drives: dict[Connection, _Drive] = {}
        self._accept_queue: collections.deque[Connection] = collections.deque()
        self._accept_signal = Signal(self._loop)
        # connections with something to send, flushed together at the end of a turn
        self._mark_dirty: DirtySet = self._fp.DirtySet(self._loop.call_soon, self._flush)
        self._dirty: dict[Connection, None] = self._mark_dirty.dirty
        self._backlog: list[tuple[bytes, SockAddr]] = []
        self._backlog_pos = 0
        self._writer_armed = False
        # datagrams read from the socket, not handled yet (see _on_readable)
        self._rx_queue: collections.deque[tuple[bytes, SockAddr]] = collections.deque()
        # those of just-established connections, handled before _rx_queue
        self._rx_fresh: collections.deque[tuple[bytes, SockAddr]] = collections.deque()
        self._rx_queue_bytes = 0  # the bytes of the datagrams in both
        # [datagrams, when read] per read, oldest first, for _rx_queue (RX_QUEUE_MAX_DELAY)
        self._rx_stamps: collections.deque[list[float]] = collections.deque()
        self._rx_drain_scheduled = False
        # every connection's engine deadline, and the one loop timer for the earliest
        self._timers: DeadlineQueue[_Drive] = DeadlineQueue()
        self._timer_wakeup: asyncio.Handle | None = None
        self._timer_wakeup_at: float | None = None
        self._closed = False
        self._close_task: asyncio.Task[None] | None = None
        self.stats_counters = dict.fromkeys(
            ("datagrams_received", "datagrams_sent", "send_errors", "dropped_unknown",
             "rx_queue_dropped", "version_negotiations", "handshakes_refused", "retries_sent",
             "handshakes_timed_out"),
            0,
        )
        # what each connection asks of us, and the services with their control kinds
        self._driver = Driver(
            config=config, loop=self._loop, fp=self._fp, budget=self._budget,
            local_addr=self.local_addr, mark_dirty=self._mark_dirty,
            release_budget=self._release_budget, release_credit=self._release_credit,
            charge_budget=self._budget.charge,
            release_budget_soon=self._release_budget_soon, close=self._close_and_flush,
            closed=self._on_connection_closed, control=self._on_control,
            path=self._path_name,
        )
        self._control_handlers: dict[int, ControlHandler] = {}
        # relayed paths and, as a relay, the sessions we forward (the data plane)
        self._relays = relay_mod.Relays(sock.family, self._loop.time(), self.stats_counters,
                                        self._send_raw, ip_key)
        self._gone_callbacks: list[Callable[[Connection], None]] = []
        self._host = _Host(
            self, self._loop, self._pool, sock.family, self._resolve, self._dial, self._adopt,
            self._send_raw, self._control_handlers, self._gone_callbacks,
            lambda: self._accept_incoming,
        )
        self._services = services.start(self._host, self._relays)
        self._loop.add_reader(self._fd, self._on_readable)
        self._portmap: PortMapper | None = None
        self._mapped_addr: wire.Address | None = None
        if config.port_mapping:
            self._start_port_mapping()

    # ------------------------------------------------------------------ construction

    @classmethod
    @_binding
    async def bind(
        cls,
        addr: wire.Address | str = ("127.0.0.1", 0),
        config: Config | None = None,
        identity: Identity | None = None,
        trust: Trust | None = None,
        accept_incoming: bool = True,
        rendezvous: bool = False,
        relay: bool = False,
    ) -> Endpoint:
        """Bind one UDP socket at ``addr`` and serve QUIC on it.

        Returns an :class:`EndpointBinding`: ``await`` it for the endpoint, or write
        ``async with Endpoint.bind(...) as ep:`` to close the endpoint on exit.
        ``addr`` is ``(host, port)`` or ``"host:port"``; port 0 picks a free one.

        ``identity`` defaults to a fresh self-signed ECDSA P-256 one; ``trust`` to
        ``Trust.any()`` (encrypted, any peer). ``accept_incoming=False`` makes a
        dial-only node; ``rendezvous=True`` lets connected peers ask it for introductions;
        ``relay=True`` (implies ``rendezvous``) also forwards the packets of peers it
        introduced that found no direct path (``connect_via(..., allow_relay=True)``,
        :meth:`connect_relayed`), opaque and end-to-end encrypted, within the limits in
        ``qp2p.relay``.
        """
        config = config or Config()
        quic_engine.resolve(config.engine)  # a missing engine fails before any socket exists
        host, port = wire.to_address(addr)
        family = socket.AF_INET6 if ":" in str(host) else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            sock.setblocking(False)
            size_buffers(sock)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            sock.bind((host, port))
            _speedups.impl.enable_gro(sock)  # receive coalesced bursts where the kernel can
        except BaseException:
            sock.close()
            raise
        return cls(sock, config, identity or Identity.generate(), trust or Trust.any(),
                   accept_incoming, rendezvous, relay)

    # ------------------------------------------------------------------ public API

    @property
    def peer_id(self) -> PeerId:
        """This endpoint's ``PeerId`` (from its identity's certificate)."""
        return self.identity.peer_id

    @property
    def is_closed(self) -> bool:
        """True once ``close()`` was called."""
        return self._closed

    @property
    def engine(self) -> str:
        """The QUIC engine this endpoint runs on: ``"aioquic"`` or ``"qh3"``."""
        return self._engine.NAME

    @property
    def implementation(self) -> str:
        """Which fast path this endpoint runs on: ``"cython"`` or ``"python"``."""
        return "cython" if self._fp.__name__.endswith("_fastpath") else "python"

    def connections(self) -> list[Connection]:
        """The pool: every open connection, dialled or accepted."""
        self._check_open()
        return self._pool.all_open()

    async def connect_to(
        self, addr: wire.Address | str, expect_peer_id: PeerId | str | None = None
    ) -> Connection:
        """An open connection to ``addr``: the pooled one if any (whoever dialled it),
        else a new dial shared by concurrent callers, retried per ``config.retry``.
        Callers share a dial when they also expect the same peer: ``expect_peer_id`` is
        checked inside the handshake, so a call expecting a peer id and one expecting
        none (or another) dial on their own, and neither can fail the other's."""
        self._check_open()
        expect_peer_id = _as_peer_id(expect_peer_id)
        target = await self._resolve(addr)
        conn = self._pool.get(target, expect_peer_id)
        if conn is not None:
            return conn
        return await self._pool.share(
            (target, expect_peer_id),
            lambda: retry_dial(
                lambda timeout: self._dial(target, expect_peer_id, timeout),
                self.config.retry,
                self.config.handshake_timeout,
                wire.addr_text(target),
            ),
        )

    async def connect_to_any(self, addrs: Iterable[wire.Address | str]) -> Connection:
        """Dial all of ``addrs`` at once; keep the first connection that completes and
        close the others gracefully. All failing raises ``ConnectionError`` whose
        ``errors`` maps each address to its exception."""
        self._check_open()
        targets = list(addrs)
        if not targets:
            raise ValueError("connect_to_any needs at least one address")
        return await services.race.race(self._host, targets)

    async def accept(self) -> Connection:
        """The next incoming connection (after its handshake and authentication)."""
        while True:
            self._check_open()
            if self._accept_queue:
                return self._accept_queue.popleft()
            await self._accept_signal.wait()

    async def incoming(self) -> AsyncIterator[Connection]:
        """Incoming connections as they arrive; ends when the endpoint closes."""
        while True:
            try:
                yield await self.accept()
            except EndpointClosed:
                return

    async def discover_public_addr(self, peer_addr: wire.Address | str) -> wire.Address:
        """Ask the peer at ``peer_addr`` which address it sees us at; sets ``public_addr``.
        A peer that does not answer within ``config.handshake_timeout`` raises
        ``RequestTimeout`` (a ``TimeoutError``)."""
        self._check_open()
        conn = await self.connect_to(peer_addr)
        observed = await services.echo.echo(conn, self.config.handshake_timeout)
        self.public_addr = observed
        return observed

    async def is_reachable(self, addr: wire.Address | str, timeout: float | None = None) -> bool:
        """True if a peer at ``addr`` completes a handshake and answers a ping within
        ``timeout`` (default ``config.handshake_timeout``); never raises for a dead peer."""
        self._check_open()
        return await self._services.echo.is_reachable(addr, timeout)

    async def connect_via(
        self, rendezvous_addr: wire.Address | str, peer_id: PeerId | str,
        allow_relay: bool = True,
    ) -> Connection:
        """A direct connection to ``peer_id`` through both NATs, introduced by the
        rendezvous endpoint at ``rendezvous_addr`` (hole punching). When no direct path
        can be made and ``allow_relay`` is true, a connection relayed by the rendezvous
        if it relays (``relay=True``; ``conn.path == "relayed"``), still end-to-end
        encrypted; otherwise ``HolePunchFailed``."""
        self._check_open()
        peer = _as_peer_id(peer_id)
        assert peer is not None
        try:
            return await self._services.holepunch.connect_via(rendezvous_addr, peer)
        except HolePunchFailed as exc:
            if not allow_relay or not exc.no_direct_path:
                raise
            punch_error = exc
        logger.info("no direct path to %s: trying a relayed connection", peer)
        try:
            return await self._services.relay.connect_relayed(
                rendezvous_addr, peer, self.config.hole_punch_timeout)
        except HolePunchFailed as exc:
            raise HolePunchFailed(f"{punch_error}; and no relay: {exc}") from exc

    async def connect_relayed(
        self, relay_addr: wire.Address | str, peer_id: PeerId | str
    ) -> Connection:
        """A connection to ``peer_id`` whose packets travel through the relay endpoint at
        ``relay_addr`` (bound with ``relay=True``; the peer must be connected to it, as
        for ``connect_via``), without trying a direct path first; it moves to a direct
        path when probes find one (``conn.path``). TLS and authentication stay end to
        end: the relay forwards opaque packets. ``HolePunchFailed`` when the relay
        refuses or the handshake through it fails."""
        self._check_open()
        peer = _as_peer_id(peer_id)
        assert peer is not None
        return await self._services.relay.connect_relayed(
            relay_addr, peer, self.config.hole_punch_timeout)

    async def register_with(self, rendezvous_addr: wire.Address | str) -> Connection:
        """Connect to the rendezvous at ``rendezvous_addr`` (pooled, like ``connect_to``)
        and honour its introductions: the target side of ``connect_via``. Keep the
        connection open (``keep_alive_interval``) for as long as peers should reach us
        through it. Once an endpoint registered with a rendezvous, introductions from
        any other peer are ignored (before that, any peer it dialled that advertises
        itself as a rendezvous may introduce, within the probe bound), so no other peer
        can make us probe an address."""
        self._check_open()
        return await self._services.holepunch.register_with(rendezvous_addr)

    async def close(self) -> None:
        """Close every connection (peers see the reason), flush, release the socket.
        Idempotent; calls on a closed endpoint then raise ``EndpointClosed``."""
        if self._close_task is None:
            self._closed = True  # at once: no dial, accept or new peer from here on
            self._close_task = asyncio.ensure_future(self._close())
        await asyncio.shield(self._close_task)

    def __repr__(self) -> str:
        return f"<qp2p.Endpoint {self.local_addr} peer_id={self.peer_id} closed={self._closed}>"

    # ------------------------------------------------------------------ dialling

    async def _resolve(self, addr: SockAddr | str) -> SockAddr:
        """``addr`` in the socket's own address form; ``ConnectionError`` if it has none."""
        try:
            host, port = wire.to_address(addr)
        except ValueError as exc:
            raise ConnectionError(str(exc)) from None
        if not 0 < port < 65536:
            raise ConnectionError(f"port {port} of {host} is out of range")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            try:
                infos = await self._loop.getaddrinfo(
                    host, port, family=self._sock.family, type=socket.SOCK_DGRAM
                )
            except OSError as exc:
                raise ConnectionError(f"cannot resolve {host!r}: {exc}") from exc
            if not infos:
                raise ConnectionError(f"cannot resolve {host!r}") from None
            resolved: SockAddr = tuple(infos[0][4])
            return resolved
        if self._sock.family == socket.AF_INET6:
            # the socket's own address form: recvfrom reports (host, port, flow, scope) and
            # aioquic matches a path by tuple equality
            host = f"::ffff:{ip}" if ip.version == 4 else str(ip)
            return (host, port, 0, 0)
        if ip.version == 6:
            raise ConnectionError(f"cannot dial IPv6 {host} from an IPv4 endpoint")
        return (str(ip), port)

    async def _dial(
        self,
        addr: SockAddr,
        expect_peer_id: PeerId | None,
        timeout: float,
        *,
        private: bool = False,
        first_flight: FirstFlight | None = None,
    ) -> Connection:
        """One handshake attempt to ``addr``; raises on timeout, refusal or bad auth.

        ``first_flight``: takes the first flight's datagrams and sends them itself (hole
        punching resends them on a short timer: the far NAT drops them until the peer's
        probes open a mapping). ``private``: a fresh connection kept out of the pool
        until :meth:`_adopt` (for probes and races, which may close it again)."""
        self._check_open()
        if not private:
            existing = self._pool.get(addr, expect_peer_id)
            if existing is not None:  # the peer dialled us meanwhile (simultaneous open)
                return existing
        quic = self._engine.new_client(
            self._client_config, self.config, self.trust, expect_peer_id, self.rendezvous
        )
        drive = self._new_drive(quic, addr, is_client=True)
        conn = drive.conn
        drive.pooled = not private
        ready = drive.ready = self._loop.create_future()
        self._track(conn)
        now = _now()
        quic.connect(addr, now=now)
        self._register(drive, quic.host_cid)
        if first_flight is not None:
            datagrams = quic.datagrams_to_send(now)
            drive.stats["packets_sent"] += len(datagrams)
            self._arm_timer(conn, drive, quic.get_timer())
            first_flight(conn, datagrams)
        else:
            self._mark_dirty(conn)
        try:
            await asyncio.wait_for(asyncio.shield(ready), timeout)
        except asyncio.TimeoutError:
            self._abandon(conn, "handshake timed out")
            raise asyncio.TimeoutError(
                f"handshake with {wire.addr_text(addr)} timed out after {timeout:g}s"
            ) from None
        except asyncio.CancelledError:
            self._abandon(conn, "dial cancelled")
            raise
        return conn

    def _adopt(self, conn: Connection) -> None:
        """Pool a privately dialled connection (the winner of a race)."""
        drive = self._drives.get(conn)
        if drive is not None and not drive.pooled and not conn.is_closed:
            drive.pooled = True
            self._pool.add(conn)

    def _abandon(self, conn: Connection, reason: str) -> None:
        """Drop a connection that never completed its handshake."""
        drive = self._drives.get(conn)
        if drive is not None and drive.phase is not _TERMINATED:
            drive.quic.shutdown(wire.CLOSE_NORMAL, reason)
            self._mark_dirty(conn)
            self._flush()
            self._set_closed(drive, ConnectionClosed(reason))
            self._forget(conn)

    # ------------------------------------------------------------------ receive path

    def _on_readable(self) -> None:
        """Drain the socket (``RX_READ_PER_TURN`` datagrams at most): datagrams of
        handshakes (unknown connection IDs, connections not yet established) are handled
        at once (``RX_URGENT_PER_TURN`` at most), the rest queue in arrival order
        (``RX_QUEUE_MAX`` datagrams, ``RX_QUEUE_MAX_BYTES``; beyond, they are dropped, as
        are those that waited ``RX_QUEUE_MAX_DELAY``) and are handled
        ``RX_DRAIN_PER_TURN`` per loop turn. Emptying the kernel queue first
        is what lets a new peer's handshake overtake the traffic of thousands of busy
        connections instead of waiting behind all of it (and keeps the kernel from
        dropping what it cannot hold). A just-established connection's first datagrams
        (``RX_FRESH_DATAGRAMS``, ``RX_FRESH_SECONDS``) queue in the fresh lane, drained
        first. A connection's lane only moves down (urgent, fresh, queued) and the lanes
        are handled in that order, so nothing of one connection is reordered."""
        fp = self._fp
        table = self._table
        sock = self._sock
        queue = self._rx_queue
        fresh = self._rx_fresh
        urgent: list[tuple[bytes, SockAddr]] = []
        queued = self._rx_queue_bytes
        dropped = 0
        now = _now()
        read = 0
        queued_before = len(queue)
        while read < RX_READ_PER_TURN and len(urgent) < RX_URGENT_PER_TURN:
            try:
                batch = fp.recv_batch(sock, RECV_BATCH)
            except OSError as exc:
                logger.debug("recv failed: %r", exc)
                break
            read += len(batch)
            for item in batch:
                drive = table.lookup(item[0])
                if drive is None or drive.phase is not _ESTABLISHED_PHASE:
                    urgent.append(item)  # all of a connection's packets take one lane
                elif drive.fresh and drive.fresh_until > now:
                    drive.fresh -= 1
                    if (len(fresh) < RX_FRESH_MAX
                            and queued < RX_QUEUE_MAX_BYTES + RX_FRESH_MAX_BYTES):
                        fresh.append(item)
                        queued += len(item[0])
                    else:
                        dropped += 1
                elif len(queue) < RX_QUEUE_MAX and queued < RX_QUEUE_MAX_BYTES:
                    queue.append(item)
                    queued += len(item[0])
                else:
                    dropped += 1
            if len(batch) < RECV_BATCH:
                break
        self._rx_queue_bytes = queued
        if len(queue) > queued_before:
            self._rx_stamps.append([len(queue) - queued_before, now])
        if dropped:
            self.stats_counters["rx_queue_dropped"] += dropped
        if urgent:
            self._handle_datagrams(urgent)
        # one drain per loop turn: when one is scheduled already it runs this turn, and a
        # second chain of drains would double the turn's work (and halve how often the
        # socket is read) for as long as the queue stays non-empty
        if not self._rx_drain_scheduled:
            self._drain_rx_queue()

    def _drain_rx_queue(self) -> None:
        """Handle up to one turn's worth of the queued datagrams, the fresh lane's first;
        the rest next turn."""
        self._rx_drain_scheduled = False
        queue = self._rx_queue
        fresh = self._rx_fresh
        if not queue and not fresh:
            return
        if queue:
            self._drop_late()
        n = RX_DRAIN_PER_TURN
        batch: list[tuple[bytes, SockAddr]] = []
        if fresh:
            take = min(len(fresh), n)
            popleft = fresh.popleft
            batch = [popleft() for _ in range(take)]
            n -= take
        if n and queue:
            take = min(len(queue), n)
            popleft = queue.popleft
            batch += [popleft() for _ in range(take)]
            self._unstamp(take)
        self._rx_queue_bytes -= sum([len(item[0]) for item in batch])
        self._handle_datagrams(batch)
        if (queue or fresh) and not self._rx_drain_scheduled:
            self._rx_drain_scheduled = True
            self._loop.call_soon(self._drain_rx_queue)

    def _unstamp(self, count: int) -> None:
        """``count`` datagrams left the head of ``_rx_queue``: forget their stamps."""
        stamps = self._rx_stamps
        while count:
            head = stamps[0]
            if head[0] > count:
                head[0] -= count
                return
            count -= int(head[0])
            stamps.popleft()

    def _drop_late(self) -> None:
        """Drop the queued datagrams read more than ``RX_QUEUE_MAX_DELAY`` ago."""
        stamps = self._rx_stamps
        cutoff = _now() - RX_QUEUE_MAX_DELAY
        late = 0
        while stamps and stamps[0][1] < cutoff:
            late += int(stamps.popleft()[0])
        if late:
            queue = self._rx_queue
            nbytes = 0
            for _ in range(late):
                nbytes += len(queue.popleft()[0])
            self._rx_queue_bytes -= nbytes
            self.stats_counters["rx_queue_dropped"] += late

    def _handle_datagrams(self, batch: list[tuple[bytes, SockAddr]]) -> None:
        """Give each datagram to its connection (or ``_on_unknown``), then send."""
        table = self._table
        now = _now()
        dirty = self._dirty
        # consecutive datagrams for one connection from one address enter its engine
        # in one call (qh3 takes them as a batch), then its events are handled
        run: list[bytes] = []
        run_drive: _Drive | None = None
        run_addr: SockAddr | None = None
        for data, addr in batch:
            drive = table.lookup(data)
            if drive is None:
                try:
                    if not relay_mod.is_wrapped(data):
                        self._on_unknown(data, addr, now)
                        continue
                    relayed = self._on_wrapped(data, addr, now)
                except Exception:  # a bug for one datagram must not stop the endpoint
                    _peer_log.exception("new-datagram-error",
                                        "error handling a new datagram from %s", addr)
                    continue
                if relayed is None:
                    continue
                data, addr, drive = relayed  # over a relayed path: as any other
            stats = drive.stats
            stats["packets_received"] += 1
            stats["bytes_received"] += len(data)
            if drive is run_drive and addr == run_addr:
                run.append(data)
                continue
            if run_drive is not None:
                self._feed(run_drive, run, run_addr, now)
            run, run_drive, run_addr = [data], drive, addr
            dirty[drive.conn] = None
        if run_drive is not None:
            self._feed(run_drive, run, run_addr, now)
        self.stats_counters["datagrams_received"] += len(batch)
        drives = self._drives
        for conn in list(dirty):
            drive = drives.get(conn)
            if drive is not None and drive.phase is not _TERMINATED:
                self._after_events(conn, drive)
        self._flush()

    def _on_wrapped(self, data: bytes, addr: SockAddr,
                    now: float) -> tuple[bytes, SockAddr, _Drive] | None:
        """A relay-wrapped datagram: forward it (we relay its session), or take the QUIC
        datagram inside when it came over one of our relayed paths: returned with the
        path's placeholder address and its connection's record, for the receive loop to handle as
        any other (None when handled here: forwarded, a new handshake, or dropped)."""
        relays = self._relays
        if relay_mod.forward(relays, data, addr, now):
            return None
        placeholder = relays.path_for(data, addr)
        inner = bytes(data[relay_mod.HEADER_LEN:])
        if placeholder is None:
            self.stats_counters["dropped_unknown"] += 1
            return None
        drive = self._table.lookup(inner)
        if drive is None:
            self._on_unknown(inner, placeholder, now)
            return None
        return inner, placeholder, drive

    def _path_name(self, conn: Connection) -> str:
        """``conn.path``: ``"relayed"`` while its packets go through a relay."""
        return self._relays.path_name(conn.remote_addr)

    def _feed(self, drive: _Drive, datagrams: list[bytes], addr: Any, now: float) -> None:
        """Give ``datagrams`` (all from ``addr``) to a connection's engine; handle its
        events."""
        if drive.phase is _TERMINATED:
            return
        if self._relays.paths:  # a relayed path's engine keeps its placeholder address,
            placeholder = self._relays.placeholder(drive.conn.remote_addr)  # whichever way
            if placeholder is not None:  # the packets came (relay, or direct after a move)
                addr = placeholder
        quic = drive.quic
        try:
            if len(datagrams) == 1:
                quic.receive_datagram(datagrams[0], addr, now)
            else:
                quic.receive_datagrams(datagrams, addr, now)
            self._drain_events(drive)
        except Exception:  # a bug for one connection must not stop the endpoint
            self._engine_failed(drive.conn, "handling its datagrams")

    def _after_events(self, conn: Connection, drive: _Drive) -> None:
        """What a burst of events may have changed: establishment, receive stalls,
        acknowledged sends, an engine that started closing."""
        if drive.phase is Phase.CONFIRMING:
            self._maybe_established(conn)
        drive.port.after_events()
        self._check_engine_closed(conn)

    def _drain_held_events(self, conn: Connection, drive: _Drive) -> None:
        """Events the engine held back while receive memory was full (qh3): pull them
        now that the application released some."""
        try:
            self._drain_events(drive)
        except Exception:  # a bug for one connection must not stop the endpoint
            self._engine_failed(conn, "handling its held events")
        if drive.phase is not _TERMINATED:
            self._after_events(conn, drive)

    def _drain_events(self, drive: _Drive) -> None:
        """Handle every event a connection's engine has ready, in order."""
        next_event = drive.quic.next_event
        port = drive.port
        stream_data = port.stream_data
        datagram = port.datagram
        event = next_event()
        while event is not None:
            kind = type(event)
            # the per-message and per-datagram events go straight to the connection
            if kind is _STREAM_DATA:
                stream_data(event.stream_id, event.data, event.end_stream)  # type: ignore[attr-defined]
            elif kind is _DATAGRAM:
                datagram(event.data)  # type: ignore[attr-defined]
            else:
                self._on_event(drive, event)
            event = next_event()

    def _on_event(self, drive: _Drive, event: quic_engine.Event) -> None:
        kind = type(event)
        if kind is quic_engine.StreamData or kind is quic_engine.Datagram:
            drive.port.handle_event(event)
        elif kind is quic_engine.CidIssued:
            self._register(drive, event.connection_id)  # type: ignore[attr-defined]
        elif kind is quic_engine.CidRetired:
            cid = event.connection_id  # type: ignore[attr-defined]
            drive.cids.discard(cid)
            self._table.remove(cid)
        elif kind is quic_engine.HandshakeDone:
            self._on_handshake(drive.conn)
        elif kind is quic_engine.Terminated:
            self._on_terminated(drive.conn, event)  # type: ignore[arg-type]
        else:
            drive.port.handle_event(event)

    def _on_unknown(self, data: bytes, addr: SockAddr, now: float) -> None:
        """A datagram for no known connection: maybe a new handshake, else dropped.

        Everything before ``quic_engine.new_server`` is cheap and keeps no state: an unproven
        source can make us parse a header, check a token, derive Initial keys and decrypt
        one packet (tens of microseconds), never run TLS."""
        if relay_mod.is_wrapped(data):  # a relay's wrapping inside a wrapping: dropped
            self.stats_counters["dropped_unknown"] += 1
            return
        if relay_mod.is_probe(data):
            relay_mod.on_probe(self._relays, data, addr)
            return
        header = self._engine.parse_long_header(data)
        if header is None or header.version is None:
            self.stats_counters["dropped_unknown"] += 1
            return
        if header.version not in self._versions:
            # RFC 9000 §5.2.2: no Version Negotiation for datagrams too small to be a
            # first Initial (and so no reflection amplifier)
            if len(data) >= quic_engine.MIN_INITIAL_SIZE:
                self.stats_counters["version_negotiations"] += 1
                self._send_raw(self._engine.version_negotiation(header.dcid, header.scid), addr)
            return
        if not header.is_initial or len(data) < quic_engine.MIN_INITIAL_SIZE:
            self.stats_counters["dropped_unknown"] += 1
            return
        if not self._accept_incoming or self._closed:
            self.stats_counters["handshakes_refused"] += 1
            return
        host = ip_key(addr[0])
        refusal = None
        if len(self._live) >= self.config.max_connections:
            refusal = "endpoint at max_connections"
        elif len(self._accept_queue) + len(self._half_open) >= self.config.max_accept_backlog:
            refusal = "accept backlog full"
        elif self._incoming_per_ip[host] >= self.config.max_connections_per_ip:
            refusal = "too many connections from this address"
        validator = self._validator
        original_dcid, retry_scid = header.dcid, None
        if header.token:
            odcid = validator.validate(header, addr, now)
            if odcid is None:
                self.stats_counters["handshakes_refused"] += 1
                _peer_log.info("bad-token", "dropping Initial from %s: invalid address "
                               "validation token", wire.addr_text(addr))
                return
            original_dcid, retry_scid = odcid, header.dcid
        elif (
            self.config.require_address_validation
            or len(self._half_open) + self._unproven_recently(now)
            >= self.config.address_validation_threshold
        ):  # prove the address first: until then a client costs us no state (and a
            # flood of junk or of refused Initials costs a Retry each, no decryption)
            self.stats_counters["retries_sent"] += 1
            self._send_raw(validator.retry_packet(header, addr, now), addr)
            return
        if refusal is not None:
            # a refusal costs no TLS (the Initial keys suffice) and is smaller than the
            # Initial it answers: no Retry needed first
            answer = self._engine.refusal(header, data, refusal)
            if not header.token:
                self._unproven.append(now)
            if answer is None:
                self.stats_counters["dropped_unknown"] += 1
                return
            self.stats_counters["handshakes_refused"] += 1
            _peer_log.warning(refusal, "refusing handshake from %s: %s",
                              wire.addr_text(addr), refusal)
            self._send_raw(answer, addr)
            return
        if not self._engine.initial_opens(header, data):
            # shaped like an Initial but does not decrypt: junk, dropped before any engine
            self.stats_counters["dropped_unknown"] += 1
            self._unproven.append(now)
            return
        quic = self._engine.new_server(
            self._server_config, self.config, self.trust, original_dcid, retry_scid,
            self.rendezvous,
        )
        drive = self._new_drive(quic, addr, is_client=False)
        conn = drive.conn
        self._register(drive, header.dcid)
        self._register(drive, quic.host_cid)
        try:
            quic.receive_datagram(data, addr, now)
            accepted = quic.accepted_any_packet()
        except Exception:
            accepted = False
            _peer_log.exception("initial-error", "error handling a first Initial from %s",
                                addr)
        if not accepted:
            # it decrypted, yet the engine took nothing from it: keep no state for it
            self.stats_counters["dropped_unknown"] += 1
            self._table.remove(header.dcid)
            self._table.remove(quic.host_cid)
            del self._drives[conn]
            return
        self._handshaking.add(conn)
        self._half_open.add(conn)
        self._incoming_per_ip[host] += 1
        self._track(conn)
        drive.handshake_deadline = self._loop.call_later(
            self.config.handshake_timeout, self._handshake_expired, conn
        )
        drive.stats["packets_received"] += 1
        drive.stats["bytes_received"] += len(data)
        self._drain_events(drive)
        self._dirty[conn] = None

    def _unproven_recently(self, now: float) -> int:
        """Tokenless Initials that were junk or refused within ``handshake_timeout``:
        they count toward ``address_validation_threshold`` like half-open handshakes."""
        unproven = self._unproven
        horizon = now - self.config.handshake_timeout
        while unproven and unproven[0] < horizon:
            unproven.popleft()
        return len(unproven)

    def _handshake_expired(self, conn: Connection) -> None:
        """An incoming handshake that did not finish in time: drop it (a half-open flood
        must not hold state for long)."""
        drive = self._drives.get(conn)
        if drive is not None:
            drive.handshake_deadline = None
        if conn in self._half_open and not conn.is_closed:
            self.stats_counters["handshakes_timed_out"] += 1
            _peer_log.info("handshake-timeout", "incoming handshake from %s timed out",
                           wire.addr_text(conn.remote_addr))
            self._abandon(conn, "handshake timed out")

    def _track(self, conn: Connection) -> None:
        """``conn`` is now driven by this endpoint: count it and its receive credit."""
        self._live.add(conn)
        drive = self._drives[conn]
        drive.budgeted = True
        self._budget.reserved += drive.quic.reservation()

    def _release_budget(self, nbytes: int) -> None:
        budget = self._budget
        budget.release(nbytes)
        # connections waiting for credit may get some now: a few at a time
        for conn in budget.wake(WAKE_STARVED_BYTES, WAKE_STARVED_AT_ONCE):
            drive = self._drives.get(conn)
            if drive is not None and drive.budgeted:
                self._mark_dirty(conn)

    def _release_credit(self, conn: Connection, nbytes: int) -> None:
        """``conn`` no longer holds ``nbytes`` of stream data: back to the budget, while
        the budget still counts the connection's engine."""
        drive = self._drives.get(conn)
        if drive is not None and drive.budgeted:
            budget = self._budget
            if budget.starved:
                self._release_budget(nbytes)
            else:  # nobody to wake: _release_budget, inlined (once per message read)
                budget.reserved -= nbytes

    def _release_budget_soon(self, nbytes: int) -> None:
        """``_release_budget`` from a finalizer (which may run in any thread, or after the
        loop closed): the count at once, the wake-up on the loop."""
        self._budget.release(nbytes)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to wake
            self._loop.call_soon_threadsafe(self._release_budget, 0)

    def _on_handshake(self, conn: Connection) -> None:
        if self._drives[conn].advance(Phase.CONFIRMING):
            self._maybe_established(conn)

    def _maybe_established(self, conn: Connection) -> None:
        """Hand the connection to the user once both sides accepted each other: for a
        dialler that means the handshake is *confirmed* (the acceptor checked our
        certificate and sent HANDSHAKE_DONE), so a peer that rejects us never yields
        a connection."""
        drive = self._drives[conn]
        if conn.dialled and not drive.quic.handshake_confirmed():
            return
        try:
            peer_id = drive.quic.authenticated_peer()
        except PeerAuthenticationError as exc:  # the engine aborts the handshake itself
            logger.debug("peer at %s failed authentication: %s", conn.remote_addr, exc)
            return
        drive.advance(Phase.ESTABLISHED)
        drive.fresh_until = _now() + RX_FRESH_SECONDS
        drive.port.established(peer_id)
        self._handshaking.discard(conn)
        self._end_half_open(conn)
        if drive.pooled:
            self._pool.add(conn)
        ready = drive.ready
        if ready is not None:
            if not ready.done():
                ready.set_result(None)
        else:
            self._accept_queue.append(conn)
            self._accept_signal.notify_all()
        logger.debug("connection %s with %s established", conn.remote_addr, peer_id)

    def _check_engine_closed(self, conn: Connection) -> None:
        """Report a close as soon as the engine knows, not after draining ends."""
        quic = self._drives[conn].quic
        if not conn.is_closed and quic.is_closed():
            self._fail(conn, quic.close_event())

    def _on_terminated(self, conn: Connection, event: quic_engine.Terminated) -> None:
        self._drives[conn].advance(_TERMINATED)
        self._fail(conn, event)
        self._forget(conn)

    def _engine_failed(self, conn: Connection, during: str) -> None:
        """An engine call for ``conn`` raised (called from its ``except`` block): a bug in
        the engine or its adapter, after which that engine's state can't be trusted. Close
        this connection with the reason (CONNECTION_CLOSE if the engine still builds one)
        and keep serving the others."""
        exc = sys.exc_info()[1]
        reason = f"internal error {during}: {type(exc).__name__}: {exc}"
        _peer_log.log(logging.ERROR, "engine-error", "closing the connection to %s: %s",
                      wire.addr_text(conn.remote_addr), reason, exc_info=True)
        drive = self._drives.get(conn)
        if drive is None or drive.phase is _TERMINATED:
            return
        drive.advance(_TERMINATED)
        quic = drive.quic
        try:
            quic.shutdown(wire.CLOSE_INTERNAL_ERROR, reason)
            self._backlog.extend(self._relays.wrap(quic.datagrams_to_send(_now())))
        except Exception:  # the engine can't even close: the peer's idle timeout will
            logger.debug("no CONNECTION_CLOSE for %s", conn.remote_addr, exc_info=True)
        self._fail(conn, quic_engine.Terminated(wire.CLOSE_INTERNAL_ERROR, None, reason))
        self._forget(conn)
        if self._backlog and not self._writer_armed:
            self._send_backlog()

    def _fail(self, conn: Connection, event: quic_engine.Terminated | None) -> None:
        reason = event.reason_phrase if event is not None else ""
        code = event.error_code if event is not None else None
        drive = self._drives[conn]
        auth_error = drive.quic.rejection()
        ready = drive.ready
        if ready is not None and not ready.done():
            if auth_error is not None:
                ready.set_exception(auth_error)
            elif code is not None and quic_engine.is_tls_failure(code):
                # the TLS handshake failed, refused by whichever side: retrying can't help
                prefix = quic_engine.AUTH_REASON_PREFIX
                detail = reason.removeprefix(prefix).lstrip(": ") or hex(code)
                where = wire.addr_text(conn.remote_addr)
                by_peer = drive.quic.closed_by_peer()
                if by_peer is None:
                    text = f"authentication with the peer at {where} failed ({detail})"
                elif by_peer:
                    text = (f"peer at {where} refused our certificate: "
                            f"authentication failed ({detail})")
                else:  # e.g. its signature did not verify
                    text = f"we rejected the peer at {where}: authentication failed ({detail})"
                ready.set_exception(PeerAuthenticationError(text, by_peer=bool(by_peer)))
            else:
                ready.set_exception(
                    ConnectionError(
                        f"connection to {wire.addr_text(conn.remote_addr)} refused: "
                        f"{reason or code}"
                    )
                )
            ready.exception()  # retrieved here so an abandoned dial logs nothing
        elif auth_error is not None:
            logger.debug("rejected peer at %s: %s", conn.remote_addr, auth_error)
        self._set_closed(drive, ConnectionClosed(reason or "connection lost", code))

    def _set_closed(self, drive: _Drive, exc: ConnectionClosed) -> None:
        """The connection is closed (by us, the peer, or lost): what waits on it fails."""
        drive.advance(Phase.CLOSED)
        drive.port.set_closed(exc)

    def _on_connection_closed(self, conn: Connection, unread: bool) -> None:
        if not unread and conn in self._accept_queue:  # nothing left to hand over
            self._accept_queue.remove(conn)
        self._pool.remove(conn)
        self._handshaking.discard(conn)

    def _new_drive(
        self, quic: quic_engine.EngineConnection, addr: SockAddr, *, is_client: bool
    ) -> _Drive:
        """A new connection over ``quic`` and the record we drive it with."""
        drive = _Drive(quic)
        Connection(self._driver, quic, addr, is_client=is_client, attach=drive.attach)
        self._drives[drive.conn] = drive
        return drive

    def _register(self, drive: _Drive, cid: bytes) -> None:
        drive.cids.add(cid)
        self._table.add(cid, drive)

    def _end_half_open(self, conn: Connection) -> None:
        if conn in self._half_open:
            self._half_open.discard(conn)
            drive = self._drives[conn]
            if drive.handshake_deadline is not None:
                drive.handshake_deadline.cancel()
                drive.handshake_deadline = None

    def _forget(self, conn: Connection) -> None:
        """Stop driving ``conn`` (closed, lost or dropped): release everything we keep
        for it. Idempotent."""
        drive = self._drives.get(conn)
        if drive is None:
            return
        self._end_half_open(conn)
        del self._drives[conn]
        self._relays.forget(conn)
        drive.advance(_TERMINATED)  # nothing more to feed it or send for it
        drive.quic.deliver_to(None, None)  # no cycle through its receivers either
        for gone in self._gone_callbacks:
            gone(conn)
        if drive.budgeted:
            drive.budgeted = False
            self._budget.starved.pop(conn, None)
            # unread messages stay charged until the application reads them
            kept = drive.port.forgotten()
            self._release_budget(drive.quic.reservation() - kept)  # may wake starved ones
            drive.quic.attach_budget(self._budget, None)  # no cycle keeps a dropped conn
        if not conn.dialled and conn in self._live:
            host = ip_key(conn.remote_addr[0])
            self._incoming_per_ip[host] -= 1
            if self._incoming_per_ip[host] <= 0:
                del self._incoming_per_ip[host]
        for cid in drive.cids:
            self._table.remove(cid)
        drive.cids.clear()
        if drive.timer_at is not None:
            drive.timer_at = None
            self._timers.set(drive, None)
        self._dirty.pop(conn, None)
        self._pool.remove(conn)
        self._handshaking.discard(conn)
        self._live.discard(conn)

    # ------------------------------------------------------------------ control messages

    def _on_control(self, conn: Connection, msg: ControlMessage) -> None:
        """Route a peer's control frame to the service registered for its kind."""
        handler = self._control_handlers.get(msg.kind)
        if handler is not None:
            handler(conn, msg)
            return
        logger.debug("unexpected control frame kind %d from %s", msg.kind, conn.remote_addr)
        if msg.stream_id is not None:
            conn.refuse_control(msg.stream_id)

    # ------------------------------------------------------------------ send path

    def _flush(self) -> None:
        """Collect every dirty connection's datagrams and send them in one batch."""
        self._mark_dirty.scheduled = False
        if not self._dirty:
            return
        now = _now()
        out = self._backlog
        relay_paths = self._relays.paths
        dirty = list(self._dirty)
        self._dirty.clear()
        drives = self._drives
        for conn in dirty:
            drive = drives.get(conn)
            if drive is None or drive.phase is _TERMINATED:
                continue
            quic = drive.quic
            if quic.has_pending_events():
                self._drain_held_events(conn, drive)
                if drive.phase is _TERMINATED:
                    continue
            try:
                drive.port.before_send()
                datagrams = quic.datagrams_to_send(now)
                timer = quic.get_timer()
            except Exception:  # one broken connection must not stop the others' flush
                self._engine_failed(conn, "building its packets")
                continue
            if datagrams:
                if relay_paths and conn.remote_addr in relay_paths:
                    datagrams = self._relays.wrap(datagrams)
                out.extend(datagrams)
                stats = drive.stats
                stats["packets_sent"] += len(datagrams)
                nbytes = 0
                for data, _addr in datagrams:  # a plain loop: no generator per connection
                    nbytes += len(data)
                stats["bytes_sent"] += nbytes
            self._arm_timer(conn, drive, timer)
        if out and not self._writer_armed:
            self._send_backlog()

    def _send_backlog(self) -> None:
        out = self._backlog
        try:
            pos, errors = self._fp.send_batch(self._sock, out, self._backlog_pos)
        except Exception as exc:  # one bad datagram must not wedge the socket
            logger.error("batched send failed (%r): sending one by one", exc)
            pos, errors = self._send_one_by_one(out, self._backlog_pos)
        self.stats_counters["datagrams_sent"] += pos - self._backlog_pos - errors
        self.stats_counters["send_errors"] += errors
        if pos >= len(out):
            out.clear()
            self._backlog_pos = 0
            if self._writer_armed:
                self._loop.remove_writer(self._fd)
                self._writer_armed = False
        else:  # kernel buffer full: wait for writability, lose nothing
            self._backlog_pos = pos
            if not self._writer_armed:
                self._writer_armed = True
                self._loop.add_writer(self._fd, self._send_backlog)

    def _send_one_by_one(self, out: list[tuple[bytes, SockAddr]], start: int) -> tuple[int, int]:
        """Fallback for a batch that raised: skip (and count) each datagram that fails."""
        errors = 0
        for pos in range(start, len(out)):
            data, addr = out[pos]
            try:
                self._sock.sendto(data, addr)
            except BlockingIOError:
                return pos, errors
            except Exception:  # counted in stats_counters["send_errors"]
                errors += 1
        return len(out), errors

    def _send_raw(self, data: bytes, addr: SockAddr) -> None:
        if addr[:2] in self._relays.paths:
            self._backlog.extend(self._relays.wrap([(data, addr)]))
        else:
            self._backlog.append((data, addr))
        if not self._writer_armed:
            self._send_backlog()

    # ------------------------------------------------------------------ timers

    def _arm_timer(self, conn: Connection, drive: _Drive, when: float | None) -> None:
        """``conn``'s engine wants ``handle_timer`` at ``when`` (None: never)."""
        if when == drive.timer_at:
            return
        drive.timer_at = when
        self._timers.set(drive, when)
        if when is not None:
            self._wake_timers_by(when)

    def _wake_timers_by(self, when: float) -> None:
        """Make sure ``_run_timers`` runs by ``when``: the one loop timer moves earlier."""
        at = self._timer_wakeup_at
        if at is not None and at <= when:
            return
        if self._timer_wakeup is not None:
            self._timer_wakeup.cancel()
        self._timer_wakeup_at = when
        delay = when - _now()
        # uvloop's timers have 1 ms granularity: a pacing wait of a few µs must not
        # become a whole millisecond
        self._timer_wakeup = (
            self._loop.call_soon(self._run_timers)
            if delay < TIMER_GRANULARITY
            else self._loop.call_later(delay, self._run_timers)
        )

    def _run_timers(self) -> None:
        """Handle the due connection timers, earliest first, ``TIMERS_PER_TURN`` at most;
        the loop timer is then armed for what is left (the next turn, if still due)."""
        self._timer_wakeup = None
        self._timer_wakeup_at = None
        now = _now()
        # a loop timer may fire a little early: what is due within its granularity is due
        for drive, deadline in self._timers.pop_due(now + TIMER_GRANULARITY, TIMERS_PER_TURN):
            drive.timer_at = None
            self._on_timer(drive, max(now, deadline))
        earliest = self._timers.earliest()
        if earliest is not None:
            self._wake_timers_by(earliest)

    def _on_timer(self, drive: _Drive, now: float) -> None:
        if drive.phase is _TERMINATED:
            return
        conn = drive.conn
        try:
            drive.quic.handle_timer(now)
            self._drain_events(drive)
        except Exception:  # a bug for one connection must not stop the endpoint
            self._engine_failed(conn, "handling its timer")
            return
        if drive.phase is not _TERMINATED:
            self._check_engine_closed(conn)
            self._mark_dirty(conn)

    # ------------------------------------------------------------------ closing

    def _close_connection(self, conn: Connection, reason: str, local_reason: str) -> None:
        """Close ``conn`` gracefully: flush pending ACKs, then CONNECTION_CLOSE(reason)."""
        drive = self._drives.get(conn)
        if drive is None:  # no longer driven: closed already
            return
        quic = drive.quic
        now = _now()
        try:
            drive.port.before_send()  # receipts owed: the peer's sends that reached us complete
            quic.ack_now(now)
            self._backlog.extend(self._relays.wrap(quic.datagrams_to_send(now)))
        except Exception:
            self._engine_failed(conn, "closing")
            return
        quic.shutdown(wire.CLOSE_NORMAL, reason)
        self._set_closed(drive, ConnectionClosed(local_reason, wire.CLOSE_NORMAL))
        self._mark_dirty(conn)

    def _close_and_flush(self, conn: Connection, reason: str, local_reason: str) -> None:
        self._close_connection(conn, reason, local_reason)
        self._flush()

    def _check_open(self) -> None:
        if self._closed:
            raise EndpointClosed("endpoint is closed")

    def _start_port_mapping(self) -> None:
        protocols = PROTOCOLS if self.config.port_mapping is True else self.config.port_mapping
        assert isinstance(protocols, tuple)
        ip = self.local_addr[0]
        self._portmap = PortMapper(
            self.local_addr[1], protocols=protocols,
            internal_ip=ip if ipaddress.ip_address(ip).version == 4 else None,
            on_change=self._on_port_mapping)
        self._portmap.start()

    def _on_port_mapping(self, mapping: Mapping | None) -> None:
        if mapping is not None:
            self.public_addr = mapping.external
        elif self._mapped_addr is not None and self.public_addr == self._mapped_addr:
            self.public_addr = None
        self._mapped_addr = mapping.external if mapping is not None else None

    async def _close(self) -> None:
        # the lease is deleted alongside the connections' close (bounded: one delete)
        unmap = (asyncio.ensure_future(self._portmap.stop())
                 if self._portmap is not None else None)
        self._accept_signal.notify_all()  # waiting accept() calls raise EndpointClosed
        for conn in list(self._live):
            ready = self._drives[conn].ready
            if ready is not None and not ready.done():  # a dial in flight
                ready.set_exception(EndpointClosed("endpoint closed during the dial"))
                ready.exception()
            if not conn.is_closed:
                self._close_connection(conn, "endpoint closed", "endpoint closed")
        self._flush()
        deadline = self._loop.time() + CLOSE_FLUSH_TIMEOUT
        while self._backlog and self._loop.time() < deadline:
            await asyncio.sleep(0.005)
        for conn in list(self._live):
            self._drives[conn].advance(_TERMINATED)
            self._forget(conn)
        self._loop.remove_reader(self._fd)
        if self._timer_wakeup is not None:
            self._timer_wakeup.cancel()
            self._timer_wakeup = None
        self._rx_queue.clear()
        self._rx_stamps.clear()
        self._rx_fresh.clear()
        self._rx_queue_bytes = 0
        if self._writer_armed:
            self._loop.remove_writer(self._fd)
            self._writer_armed = False
        self._sock.close()
        if unmap is not None:
            await unmap
        logger.debug("endpoint %s closed", self.local_addr)

    # ------------------------------------------------------------------ diagnostics

    def debug_snapshot(self) -> dict[str, Any]:
        """Internal state, copied, for tests and diagnostics: **not** part of the API, no
        stability promise (keys and values may change in any release). Changing the
        returned values changes nothing in the endpoint.

        Keys: ``live`` (connections the engine still drives), ``half_open`` (incoming
        handshakes in progress), ``accept_queue`` (accepted, not yet taken by
        ``accept()``) — lists of :class:`Connection`; ``cids`` (``{connection: sorted
        connection IDs}``); ``table_size`` (connection IDs routed); ``rx_queue`` /
        ``rx_queue_bytes`` (datagrams read, not handled yet); ``budget_reserved``
        (bytes of the endpoint-wide receive budget granted); ``incoming_per_ip``
        (``{ip key: live incoming connections}``); ``dials_in_flight`` (shared dials not
        finished); ``quic_versions`` (the engine's supported versions); and ``relay``: a
        dict of ``sessions`` / ``by_session`` (session IDs it forwards / has paths for),
        ``offers``, ``paths`` and ``probes_seen`` (counts)."""
        relays = self._relays
        return {
            "live": list(self._live),
            "half_open": list(self._half_open),
            "accept_queue": list(self._accept_queue),
            "cids": {conn: sorted(drive.cids) for conn, drive in self._drives.items()},
            "table_size": len(self._table),
            "rx_queue": len(self._rx_queue) + len(self._rx_fresh),
            "rx_queue_bytes": self._rx_queue_bytes,
            "budget_reserved": self._budget.reserved,
            "incoming_per_ip": dict(self._incoming_per_ip),
            "dials_in_flight": self._pool.dials_in_flight(),
            "quic_versions": list(self._engine.supported_versions()),
            "relay": {
                "sessions": list(relays.sessions),
                "by_session": list(relays.by_session),
                "offers": len(relays.offers),
                "paths": len(relays.paths),
                "probes_seen": len(relays.probes_seen),
            },
        }


class Phase(enum.IntEnum):
    """A connection's life as its endpoint drives it, in order; it only moves forward
    (:meth:`_Drive.advance`), possibly skipping phases (a dial that fails goes straight
    from ``HANDSHAKING`` to ``CLOSED``)."""

    HANDSHAKING = 0  # the engine exists; TLS under way
    CONFIRMING = 1  # TLS done; a dialler waits for the acceptor's HANDSHAKE_DONE
    ESTABLISHED = 2  # both sides accepted each other: handed to the user
    CLOSED = 3  # closed by either side or lost (the engine may still drain)
    TERMINATED = 4  # the engine is done, or the endpoint forgot it: nothing to feed or send


_TERMINATED = Phase.TERMINATED  # the hot paths' test, one global lookup
_ESTABLISHED_PHASE = Phase.ESTABLISHED


class _Drive:
    """What the endpoint keeps to drive one connection (nobody else reads it): its
    engine, connection IDs and timer, its dial or handshake state, its budget standing."""

    __slots__ = ("budgeted", "cids", "conn", "fresh", "fresh_until", "handshake_deadline",
                 "phase", "pooled", "port", "quic", "ready", "stats", "timer_at")

    conn: Connection
    port: Port  # what we may do to the connection beyond its public API
    stats: dict[str, int]  # its counters (port.stats): we count the packets

    def __init__(self, quic: quic_engine.EngineConnection) -> None:
        self.quic = quic  # the engine the endpoint feeds (the Connection sends through it)
        self.cids: set[bytes] = set()  # our connection IDs for it in the table
        self.timer_at: float | None = None  # its engine's deadline in the endpoint's timers
        self.ready: asyncio.Future[None] | None = None  # a dial's outcome (dialled only)
        self.handshake_deadline: asyncio.TimerHandle | None = None  # incoming, until done
        self.phase = Phase.HANDSHAKING
        self.pooled = True  # False for private probes and race dials until adopted
        self.budgeted = False  # the receive budget counts its engine's reservation
        # datagrams left to it in the fresh receive lane, and until when (once established)
        self.fresh = RX_FRESH_DATAGRAMS
        self.fresh_until = 0.0

    def advance(self, phase: Phase) -> bool:
        """The one transition: move forward to ``phase`` (never back); returns whether the
        phase changed (False when it was there or past it already)."""
        if phase <= self.phase:
            return False
        self.phase = phase
        return True

    def attach(self, conn: Connection, port: Port) -> None:
        """Called by the new connection with its port."""
        self.conn = conn
        self.port = port
        self.stats = port.stats
        self.quic.deliver_to(port.stream_data, port.datagram)  # undone when forgotten


class _Host:
    """The endpoint as its services see it (:class:`~qp2p.services.host.ServiceHost`):
    the few things they may ask, handed over by the endpoint at bind."""

    __slots__ = ("_accept_incoming", "_endpoint", "_gone", "_handlers", "adopt", "config",
                 "connect", "connections", "dial", "family", "loop", "pooled", "relay",
                 "rendezvous", "resolve", "send_raw")

    def __init__(
        self,
        endpoint: Endpoint,
        loop: asyncio.AbstractEventLoop,
        pool: Pool,
        family: int,
        resolve: Callable[[wire.Address | SockAddr | str], Coroutine[Any, Any, SockAddr]],
        dial: Callable[..., Coroutine[Any, Any, Connection]],
        adopt: Callable[[Connection], None],
        send_raw: Callable[[bytes, SockAddr], None],
        handlers: dict[int, ControlHandler],
        gone: list[Callable[[Connection], None]],
        accept_incoming: Callable[[], bool],
    ) -> None:
        self._endpoint = endpoint  # for its public API only
        self._accept_incoming = accept_incoming
        # what is fixed at bind, and the endpoint's and pool's methods, handed over as
        # they are (no wrapper repeating each signature)
        self.config = endpoint.config
        self.rendezvous = endpoint.rendezvous
        self.relay = endpoint.relay
        self.loop = loop
        self.family = family
        self.connections = pool.all_open
        self.pooled = pool.get
        self.resolve = resolve
        self.connect = endpoint.connect_to
        self.dial = dial
        self.adopt = adopt
        self.send_raw = send_raw
        self._handlers = handlers
        self._gone = gone

    @property
    def is_closed(self) -> bool:
        return self._endpoint.is_closed

    @property
    def accepts_incoming(self) -> bool:
        return self._accept_incoming()

    def on_control(self, kind: int, handler: ControlHandler) -> None:
        if kind in self._handlers:
            raise ValueError(f"control kind {kind} already has a service")
        self._handlers[kind] = handler

    def on_connection_gone(self, callback: Callable[[Connection], None]) -> None:
        self._gone.append(callback)
