"""One exception hierarchy: everything qp2p raises on purpose is a ``Qp2pError``."""

from __future__ import annotations

import asyncio
import builtins
import sys
from collections.abc import Mapping
from typing import Any

__all__ = [
    "ConnectionClosed",
    "ConnectionError",
    "EndpointClosed",
    "HolePunchFailed",
    "MessageRejected",
    "MessageTooLarge",
    "PeerAuthenticationError",
    "ProtocolError",
    "Qp2pError",
    "RequestTimeout",
]


class Qp2pError(Exception):
    """Base class of every error qp2p raises on purpose."""


class ConnectionError(Qp2pError, builtins.ConnectionError):
    """A dial failed (after retries). ``__cause__`` holds the last cause.

    Also the builtin ``ConnectionError``, so ``except ConnectionError`` around
    ``connect_to`` catches every failed dial, a refused authentication included
    (:class:`PeerAuthenticationError` is a subclass).

    ``errors`` maps each address tried to its exception when several were
    raced (``Endpoint.connect_to_any``); otherwise it is empty.
    """

    def __init__(self, message: str, errors: Mapping[Any, BaseException] | None = None) -> None:
        super().__init__(message)
        self.errors: dict[Any, BaseException] = dict(errors or {})


class HolePunchFailed(ConnectionError):
    """``Endpoint.connect_via`` (or ``connect_relayed``) could not form a connection;
    ``reason`` says why. ``no_direct_path`` is true when the rendezvous introduced the
    peer but no direct path formed (the case a relay helps with)."""

    def __init__(self, reason: str, errors: Mapping[Any, BaseException] | None = None,
                 *, no_direct_path: bool = False) -> None:
        super().__init__(reason, errors)
        self.reason = reason
        self.no_direct_path = no_direct_path


class MessageRejected(Qp2pError):
    """The peer reset the message's stream (it broke the peer's limits or wire format)."""

    def __init__(self, message: str, error_code: int | None = None) -> None:
        super().__init__(message)
        self.error_code = error_code


class ConnectionClosed(Qp2pError):
    """The connection is closed (by either side, or it timed out); ``reason`` says why."""

    def __init__(self, reason: str = "", error_code: int | None = None) -> None:
        super().__init__(reason or "connection closed")
        self.reason = reason
        self.error_code = error_code


class PeerAuthenticationError(ConnectionError):
    """A peer and this endpoint did not accept each other; ``peer_id`` is the id the peer
    presented, if any.

    ``by_peer`` is False when this side refused the peer (it failed our trust policy) and
    True when the peer refused us (our certificate failed its policy). A dial raising it
    is not retried: the same peer gives the same answer. A subclass of
    :class:`ConnectionError`, as a dial that fails for any other reason.
    """

    def __init__(self, message: str, peer_id: Any = None, *, by_peer: bool = False) -> None:
        super().__init__(message)
        self.peer_id = peer_id
        self.by_peer = by_peer


if sys.version_info >= (3, 11):
    _TimeoutError = TimeoutError
else:  # before 3.11 asyncio.TimeoutError is a class of its own

    class _TimeoutError(TimeoutError, asyncio.TimeoutError):
        """Both timeout classes."""


class RequestTimeout(Qp2pError, _TimeoutError):
    """``Connection.request`` got no reply within its ``timeout`` (seconds, ``timeout``).

    Also a ``TimeoutError`` (= ``asyncio.TimeoutError``). The request's stream was reset,
    so a late reply is dropped; the connection stays open.
    """

    def __init__(self, message: str, timeout: float) -> None:
        super().__init__(message)
        self.timeout = timeout


class MessageTooLarge(Qp2pError, ValueError):
    """A message does not fit ``Config.max_message_size``; nothing was sent."""


class ProtocolError(Qp2pError, ValueError):
    """Bytes that break qp2p's wire format. The offending stream is reset; the connection lives."""


class EndpointClosed(Qp2pError):
    """The endpoint is closed."""
