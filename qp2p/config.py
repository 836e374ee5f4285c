"""``Config`` and ``RetryConfig``: frozen dataclasses with validated defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["Config", "RetryConfig"]


def _check_number(name: str, value: object) -> float:
    """``value`` as a finite float; ``ValueError`` naming the field for anything else (a
    bool, a string, None, NaN, an int too large for a float)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:
        raise ValueError(f"{name} must be a finite number, got {value!r}") from None
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return number


def _check_positive(name: str, value: float | None, *, allow_none: bool = False) -> None:
    if value is None:
        if allow_none:
            return
        raise ValueError(f"{name} must not be None")
    if _check_number(name, value) <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


@dataclass(frozen=True)
class RetryConfig:
    """Exponential backoff with jitter for dialling, bounded by a time budget.

    The n-th wait is ``min(initial_interval * multiplier**n, max_interval)``,
    scaled by a random factor in ``[1 - randomization_factor, 1 + randomization_factor]``.
    Retries stop once ``max_elapsed_time`` seconds have passed since the first try.
    """

    initial_interval: float = 0.5
    multiplier: float = 1.5
    max_interval: float = 15.0
    randomization_factor: float = 0.3
    max_elapsed_time: float = 30.0

    def __post_init__(self) -> None:
        _check_positive("initial_interval", self.initial_interval)
        _check_positive("max_interval", self.max_interval)
        _check_positive("max_elapsed_time", self.max_elapsed_time)
        _check_positive("multiplier", self.multiplier)
        if self.initial_interval > self.max_interval:
            raise ValueError(
                f"initial_interval ({self.initial_interval!r}) exceeds max_interval "
                f"({self.max_interval!r})"
            )
        if self.multiplier < 1:
            raise ValueError(f"multiplier must be >= 1, got {self.multiplier!r}")
        if not 0 <= _check_number("randomization_factor", self.randomization_factor) < 1:
            raise ValueError(
                f"randomization_factor must be in [0, 1), got {self.randomization_factor!r}"
            )


@dataclass(frozen=True)
class Config:
    """Endpoint settings. Every field has a sensible default; bad values raise ``ValueError``.

    - ``idle_timeout``: seconds without traffic before a connection closes (``None``: never).
    - ``keep_alive_interval``: send a PING this often on idle connections (``None``: off).
    - ``max_message_size``: the largest header+dst+payload (the 16-byte frame header not
      counted) a receiver accepts and a sender sends.
    - ``max_concurrent_bidi_streams`` / ``max_concurrent_uni_streams``: streams a peer may
      have open toward us at once (QUIC stream credit).
    - ``retry``: backoff for ``connect_to``/``connect_to_any``.
    - ``handshake_timeout``: the longest one dial attempt may take.
    - ``max_datagram_size``: the UDP payload size QUIC builds packets for (1200 is safe on
      every path).
    - ``max_pending_send_bytes`` (4 MiB): per connection, ``send()`` waits while more than
      this many bytes are queued and unacknowledged (backpressure).
    - ``max_buffered_bytes``: per connection, the most stream bytes the peer can make us
      hold: messages waiting for ``recv()``, messages still arriving, out-of-order data.
      QUIC flow control stops the peer there (its ``send()`` calls wait); if half-sent
      messages alone fill it while nothing waits for ``recv()``, the newest is reset
      (the sender gets ``MessageRejected``). Must leave room for one largest message and
      the tail of the one before: at least ``max_message_size + 16 + 128 KiB``.
    - ``max_endpoint_buffered_bytes``: the same bound summed over all the endpoint's
      connections (plus 256 KiB of credit each connection always keeps); when it is
      reached, peers wait until the application reads.
    - ``max_connections``: the most connections one endpoint holds; further incoming
      handshakes are refused with CONNECTION_REFUSED (the dialler gets ``ConnectionError``).
    - ``max_connections_per_ip``: the most incoming connections from one IP address, or
      for IPv6 from one /64 (refused the same way beyond it).
    - ``max_accept_backlog``: the most incoming connections waiting for ``accept()``
      (handshakes in progress included, and closed connections whose unread messages are
      still queued); further incoming handshakes are refused like at ``max_connections``
      ("accept backlog full"). The unread messages of a queued connection stay charged to
      ``max_endpoint_buffered_bytes`` (after it closed too) until they are read.
    - ``address_validation_threshold``: with this many incoming handshakes in progress,
      new ones must first prove their address with a QUIC Retry (spoofed floods then
      cost no state).
    - ``hole_punch_timeout`` (5 s): the longest the hole punch of ``connect_via`` takes
      before ``HolePunchFailed``; when it finds no direct path and the relay is allowed,
      the relayed attempt gets as long again, so ``connect_via`` takes at most twice it.
    - ``require_address_validation``: answer every new incoming handshake with a QUIC Retry
      first (costs one round trip, protects against spoofed-source floods).
    - ``engine``: the QUIC engine, ``"aioquic"`` or ``"qh3"``; ``"auto"`` (the default)
      takes the environment variable ``QP2P_ENGINE`` when set, else qh3 when it is
      installed, else aioquic. An engine that is not installed raises ``ValueError`` at
      bind, naming the extra that installs it.
    - ``port_mapping``: ``True`` asks the local gateway to forward a UDP port to this
      endpoint (PCP, then NAT-PMP, then UPnP-IGD; IGD needs the ``qp2p[portmap]`` extra),
      renews the lease and removes it at close; the mapped address becomes
      ``Endpoint.public_addr``. It runs in the background after bind; a gateway that has
      none of these costs nothing. A tuple of ``"pcp"``, ``"natpmp"``, ``"upnp"`` tries only
      those. ``False`` (the default): no mapping.
    - Incoming handshakes that do not finish within ``handshake_timeout`` are dropped.
    """

    idle_timeout: float | None = 10.0
    keep_alive_interval: float | None = None
    max_message_size: int = 16 * 2**20
    max_concurrent_bidi_streams: int = 100
    max_concurrent_uni_streams: int = 100
    retry: RetryConfig = field(default_factory=RetryConfig)
    handshake_timeout: float = 10.0
    max_datagram_size: int = 1200
    max_pending_send_bytes: int = 4 * 2**20
    max_buffered_bytes: int = 20 * 2**20
    max_endpoint_buffered_bytes: int = 512 * 2**20
    max_connections: int = 10_000
    max_connections_per_ip: int = 256
    max_accept_backlog: int = 128
    address_validation_threshold: int = 64
    hole_punch_timeout: float = 5.0
    require_address_validation: bool = False
    engine: str = "auto"
    port_mapping: bool | tuple[str, ...] = False

    def __post_init__(self) -> None:
        _check_positive("idle_timeout", self.idle_timeout, allow_none=True)
        _check_positive("keep_alive_interval", self.keep_alive_interval, allow_none=True)
        _check_positive("handshake_timeout", self.handshake_timeout)
        _check_positive("hole_punch_timeout", self.hole_punch_timeout)
        for name in (
            "max_message_size",
            "max_concurrent_bidi_streams",
            "max_concurrent_uni_streams",
            "max_pending_send_bytes",
            "max_buffered_bytes",
            "max_endpoint_buffered_bytes",
            "max_connections",
            "max_connections_per_ip",
            "max_accept_backlog",
            "address_validation_threshold",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        for name in ("max_concurrent_bidi_streams", "max_concurrent_uni_streams"):
            if getattr(self, name) > 2**60:  # QUIC's limit (RFC 9000 §4.6)
                raise ValueError(f"{name} must be at most 2**60")
        for name in ("max_buffered_bytes", "max_endpoint_buffered_bytes", "max_pending_send_bytes"):
            if getattr(self, name) > 2**62 - 1:  # QUIC variable-length integers
                raise ValueError(f"{name} must be below 2**62")
        if self.max_message_size > 2**32 - 17:
            raise ValueError("max_message_size must be below 4 GiB (32-bit length fields)")
        # room for one largest message and the tail of the previous large one (a sender
        # starts the next when the last has under 64 KiB to go)
        least = self.max_message_size + 16 + 128 * 2**10
        if self.max_buffered_bytes < least:
            raise ValueError(
                f"max_buffered_bytes ({self.max_buffered_bytes}) must be at least "
                f"max_message_size + 16 + 128 KiB ({least}): raise it with max_message_size"
            )
        if self.max_endpoint_buffered_bytes < self.max_buffered_bytes:
            raise ValueError("max_endpoint_buffered_bytes must be at least max_buffered_bytes")
        if isinstance(self.max_datagram_size, bool) or not isinstance(self.max_datagram_size, int):
            raise ValueError(f"max_datagram_size must be an int, got {self.max_datagram_size!r}")
        if not 1200 <= self.max_datagram_size <= 65527:
            raise ValueError(
                f"max_datagram_size must be in [1200, 65527], got {self.max_datagram_size!r}"
            )
        if not isinstance(self.retry, RetryConfig):
            raise ValueError(f"retry must be a RetryConfig, got {self.retry!r}")
        if not isinstance(self.require_address_validation, bool):
            raise ValueError("require_address_validation must be a bool")
        if not isinstance(self.port_mapping, bool):
            names = ("pcp", "natpmp", "upnp")
            if (not isinstance(self.port_mapping, tuple) or not self.port_mapping
                    or any(p not in names for p in self.port_mapping)
                    or len(set(self.port_mapping)) != len(self.port_mapping)):
                raise ValueError(f"port_mapping must be a bool or a tuple of distinct names "
                                 f"from {names}, got {self.port_mapping!r}")
        if self.engine not in ("auto", "aioquic", "qh3"):
            raise ValueError(f"engine must be 'auto', 'aioquic' or 'qh3', got {self.engine!r}")
