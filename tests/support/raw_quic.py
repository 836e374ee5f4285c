"""Raw aioquic peers for the hostile-peer tests (no qp2p code on the attacking side), and
an honest qp2p peer to check that the endpoint under attack still serves."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from typing import Any

from aioquic.asyncio.client import connect
from aioquic.asyncio.protocol import QuicConnectionProtocol
from aioquic.asyncio.server import QuicServer, serve
from aioquic.quic.configuration import QuicConfiguration
from aioquic.quic.connection import QuicConnection
from aioquic.quic.events import QuicEvent, StopSendingReceived, StreamReset

import qp2p
from tests.support.endpoints import FAST
from tests.support.unvalidated import raw_client_config

__all__ = ["Attacker", "GrantsNoUniStreams", "RawPeer", "attacker", "client_initials",
           "honest_exchange", "raw_client_config", "raw_server"]


class RawPeer(QuicConnectionProtocol):
    """A raw aioquic peer that sends whole qp2p frames, each on a new stream of its own."""

    def send_frames(self, frames: Iterable[bytes], *, unidirectional: bool) -> None:
        """Each frame on its own new stream, ended. Streams beyond the endpoint's credit
        wait in aioquic (blocked) until the endpoint grants more (MAX_STREAMS)."""
        quic = self._quic
        for data in frames:
            sid = quic.get_next_available_stream_id(is_unidirectional=unidirectional)
            quic.send_stream_data(sid, data, end_stream=True)
        self.transmit()


class GrantsNoUniStreams(RawPeer):
    """A raw aioquic peer that grants the endpoint no unidirectional stream, so nothing
    the endpoint queues for it on one (a message, a control frame) ever leaves."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        limit = self._quic._local_max_streams_uni  # aioquic offers no setting for it
        limit.value = limit.sent = 0


class Attacker(QuicConnectionProtocol):
    """A raw aioquic client that records the stream stops and resets the endpoint sent."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.stopped: dict[int, int] = {}
        self.reset: dict[int, int] = {}

    def quic_event_received(self, event: QuicEvent) -> None:
        if isinstance(event, StopSendingReceived):
            self.stopped[event.stream_id] = event.error_code
        elif isinstance(event, StreamReset):
            self.reset[event.stream_id] = event.error_code


@contextlib.asynccontextmanager
async def attacker(server: qp2p.Endpoint) -> AsyncIterator[Attacker]:
    """A raw client connected to ``server``."""
    host, port = server.local_addr
    async with connect(host, port, configuration=raw_client_config(),
                       create_protocol=Attacker, wait_connected=True) as client:
        assert isinstance(client, Attacker)
        yield client


def client_initials(count: int, server_addr: tuple[str, int]) -> list[bytes]:
    """``count`` genuine first Initials from fresh aioquic clients (distinct DCIDs)."""
    out = []
    for _ in range(count):
        quic = QuicConnection(configuration=raw_client_config())
        quic.connect(server_addr, now=0.0)
        (datagram, _), *_ = quic.datagrams_to_send(now=0.0)
        out.append(datagram)
    return out


async def honest_exchange(server: qp2p.Endpoint, rounds: int = 10) -> None:
    """An honest qp2p peer connects and exchanges messages and requests with ``server``."""
    async with await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST) as peer:
        conn = await asyncio.wait_for(peer.connect_to(server.local_addr), 10)
        accepted = None
        while accepted is None:
            candidate = await asyncio.wait_for(server.accept(), 10)
            if candidate.peer_id == peer.peer_id:
                accepted = candidate

        async def echo() -> None:
            async for msg in accepted:
                if msg.is_request:
                    await msg.reply(msg.payload)

        echoing = asyncio.ensure_future(echo())
        try:
            for i in range(rounds):
                body = b"honest %d " % i * 100
                assert (await asyncio.wait_for(conn.request(body), 10)).payload == body
                await asyncio.wait_for(conn.send(body), 10)
        finally:
            echoing.cancel()


async def raw_server(identity: qp2p.Identity, create_protocol: type[QuicConnectionProtocol]
                     = QuicConnectionProtocol, private_key: Any = None) -> tuple[QuicServer, int]:
    """A stock aioquic server on 127.0.0.1 with ``identity``'s certificate (and its key, or
    ``private_key``), no ALPN; returns it (``close()`` it after) and its UDP port."""
    config = QuicConfiguration(is_client=False, alpn_protocols=None,
                               certificate=identity.certificate,
                               private_key=private_key or identity.private_key)
    server = await serve("127.0.0.1", 0, configuration=config, create_protocol=create_protocol)
    # a private reach into aioquic, on purpose: its QuicServer has no public address
    return server, server._transport.get_extra_info("sockname")[1]
