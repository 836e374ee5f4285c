"""qp2p: peer-to-peer messaging over QUIC for asyncio.

One :class:`Endpoint` per node owns a single UDP socket that both dials and accepts
encrypted QUIC connections; :class:`Connection` carries discrete messages, requests with
replies, and unreliable datagrams. See README.md.
"""

from __future__ import annotations

import logging
from typing import Any

from . import _speedups
from .config import Config, RetryConfig
from .connection import Connection, ConnectionStats, Message
from .endpoint import Endpoint, EndpointBinding
from .engine import engines
from .errors import (
    ConnectionClosed,
    ConnectionError,
    EndpointClosed,
    HolePunchFailed,
    MessageRejected,
    MessageTooLarge,
    PeerAuthenticationError,
    ProtocolError,
    Qp2pError,
    RequestTimeout,
)
from .identity import CertificateAuthority, Identity, PeerId, Trust
from .wire import Address

__all__ = [
    "Address",
    "CertificateAuthority",
    "Config",
    "Connection",
    "ConnectionClosed",
    "ConnectionError",
    "ConnectionStats",
    "Endpoint",
    "EndpointBinding",
    "EndpointClosed",
    "HolePunchFailed",
    "Identity",
    "Message",
    "MessageRejected",
    "MessageTooLarge",
    "PeerAuthenticationError",
    "PeerId",
    "ProtocolError",
    "Qp2pError",
    "RequestTimeout",
    "RetryConfig",
    "Trust",
    "engines",
    "implementation",
]

# A library logs, the application decides where logs go: without logging configured
# nothing of qp2p's, nor of the QUIC engine's own logger ("quic", aioquic's and qh3's),
# reaches stderr through logging's last-resort handler. A NullHandler neither stops
# propagation nor filters, so an application that configured logging sees both as before.
for _name in ("qp2p", "quic"):
    logging.getLogger(_name).addHandler(logging.NullHandler())
del _name

__version__ = "0.1.0"
implementation: str  # "cython" or "python": which fast path is active (module __getattr__)


def __getattr__(name: str) -> Any:
    if name == "implementation":
        return _speedups.implementation
    raise AttributeError(f"module 'qp2p' has no attribute {name!r}")
