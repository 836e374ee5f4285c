"""Plain UDP echo server and client, to measure what the impairment relay and the test
network do to packets (no qp2p involved)."""

from __future__ import annotations

import asyncio
import socket
import time

from tests.support.udp_relay import set_big_buffers


class Echo(asyncio.DatagramProtocol):
    """Sends every datagram back, keeping (data, source)."""

    def __init__(self) -> None:
        self.got: list[tuple[bytes, tuple[str, int]]] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.got.append((data, addr))
        self.transport.sendto(data, addr)  # type: ignore[attr-defined]


class EchoClient(asyncio.DatagramProtocol):
    """Queues what arrives."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[bytes] = asyncio.Queue()

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait(data)


async def echo_server(host: str = "127.0.0.1", sock: socket.socket | None = None
                      ) -> tuple[asyncio.DatagramTransport, Echo]:
    """An echo server on ``sock`` (or a new socket on ``host``)."""
    loop = asyncio.get_running_loop()
    if sock is None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind((host, 0))
    set_big_buffers(sock, 8 << 20)
    return await loop.create_datagram_endpoint(Echo, sock=sock)  # type: ignore[return-value]


async def client_socket(remote: tuple[str, int], sock: socket.socket | None = None
                        ) -> tuple[asyncio.DatagramTransport, EchoClient]:
    """A client socket connected to ``remote``."""
    loop = asyncio.get_running_loop()
    sock = sock or socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    set_big_buffers(sock, 8 << 20)
    sock.connect(remote)
    return await loop.create_datagram_endpoint(EchoClient, sock=sock)  # type: ignore


async def round_trips(client: EchoClient, transport: asyncio.DatagramTransport,
                      n: int) -> list[float]:
    """``n`` round trips through the echo, in ms."""
    out = []
    for i in range(n):
        t0 = time.perf_counter()
        transport.sendto(b"%d" % i)
        while await asyncio.wait_for(client.queue.get(), 2) != b"%d" % i:
            pass
        out.append((time.perf_counter() - t0) * 1000)
    return out
