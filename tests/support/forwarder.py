"""A UDP forwarder between one client and one upstream on loopback, for tests that must
see, change or redirect what passes between a peer and a relay.

The client sends to ``addr``; the upstream sees ``back``'s address (so a relay names
``back`` as the client's address, as a lying relay could name a victim). ``seen`` holds
every datagram forwarded, both ways, in order; what reaches ``back`` from anyone but the
upstream is kept in ``strays`` and not forwarded. ``tamper``, when set, may change each
datagram from the client before it goes on. (The multi-client impairment relay, with
delay, loss and reordering, is ``tests/support/udp_relay.py``.)
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

Addr = tuple[str, int]


class UdpForwarder:
    """One client ⇄ ``upstream``; create inside a running event loop, ``close()`` after."""

    def __init__(self, upstream: Addr, host: str = "127.0.0.1",
                 tamper: Callable[[bytes], bytes] | None = None) -> None:
        self.upstream = upstream
        self.tamper = tamper
        self.front = self._socket(host)
        self.back = self._socket(host)
        self.addr: Addr = self.front.getsockname()
        self.client: Addr | None = None
        self.seen: list[bytes] = []
        self.strays: list[bytes] = []
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self.front.fileno(), self._from_client)
        self._loop.add_reader(self.back.fileno(), self._from_back)

    @staticmethod
    def _socket(host: str) -> socket.socket:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((host, 0))
        s.setblocking(False)
        return s

    def _from_client(self) -> None:
        while True:
            try:
                data, self.client = self.front.recvfrom(65536)
            except BlockingIOError:
                return
            self.seen.append(data)
            if self.tamper is not None:
                data = self.tamper(data)
            self.back.sendto(data, self.upstream)

    def _from_back(self) -> None:
        while True:
            try:
                data, src = self.back.recvfrom(65536)
            except BlockingIOError:
                return
            if src[:2] != self.upstream[:2]:
                self.strays.append(data)
                continue
            self.seen.append(data)
            if self.client is not None:
                self.front.sendto(data, self.client)

    def close(self) -> None:
        """Stop forwarding and close both sockets."""
        for s in (self.front, self.back):
            self._loop.remove_reader(s.fileno())
            s.close()
