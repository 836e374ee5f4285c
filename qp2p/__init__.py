"""qp2p: peer-to-peer messaging over QUIC for asyncio.

One :class:`Endpoint` per node owns a single UDP socket that both dials and accepts
encrypted QUIC connections; :class:`Connection` carries discrete messages, requests with
replies, and unreliable datagrams. See README.md.
"""

from __future__ import annotations

from typing import Any

from . import _speedups
from .config import Config, RetryConfig
from .connection import Connection, Message
from .endpoint import Endpoint
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
)
from .identity import CertificateAuthority, Identity, PeerId, Trust

__all__ = [
    "CertificateAuthority",
    "Config",
    "Connection",
    "ConnectionClosed",
    "ConnectionError",
    "Endpoint",
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
    "RetryConfig",
    "Trust",
    "engines",
    "implementation",
]

__version__ = "0.1.0"
implementation: str  # "cython" or "python": which fast path is active (module __getattr__)


def __getattr__(name: str) -> Any:
    if name == "implementation":
        return _speedups.implementation
    raise AttributeError(f"module 'qp2p' has no attribute {name!r}")
