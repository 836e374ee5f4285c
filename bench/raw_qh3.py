"""The second baseline: the same scenarios on raw qh3 2.1 (native packet core) with its
own asyncio helpers, written exactly like ``raw_aioquic`` (qh3 keeps aioquic's API).

The server is ``qh3.asyncio.serve`` and the client ``qh3.asyncio.connect``, each
with a ``QuicConnectionProtocol`` subclass that overrides ``quic_event_received`` (the
lean way aioquic's own examples use; no ``StreamReader`` per stream), both in this
process on 127.0.0.1, 1200-byte datagrams, aioquic's default flow-control windows and
socket buffers: what a user of qh3 gets without tuning.

- Messages (bulk and small): one unidirectional stream per message, finished at once.
  The sender never opens a stream beyond the peer's stream credit (opening more makes
  aioquic's packet builder walk every blocked stream for every packet, DESIGN.md §6).
  Bulk keeps ``bulk_inflight`` messages whose streams are not yet fully acknowledged, as
  qp2p's ``send()`` does; small messages keep ``min(msg_window, credit)`` streams open.
- Datagrams: ``send_datagram_frame``, paced exactly like the qp2p scenario.
- Handshakes: the time ``connect()`` takes to yield a connected protocol; each client is
  then closed in the background (its context exit waits out the draining period).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import time
from functools import partial
from typing import Any

from qh3.asyncio import QuicConnectionProtocol, connect, serve
from qh3.quic import events
from qh3.quic.configuration import QuicConfiguration
from scenarios import (
    DATAGRAM_SIZE,
    HOST,
    Meter,
    MiB,
    Params,
    Progress,
    Result,
    paced_datagrams,
)

ALPN = ["qp2p-bench"]


def _certificate() -> tuple[Any, Any]:
    """A self-signed ECDSA P-256 certificate (the key type qp2p uses by default), in qh3's
    own types; only the certificate comes from qp2p, the QUIC side below is plain qh3."""
    from cryptography.hazmat.primitives.serialization import Encoding
    from qh3._hazmat import Certificate
    from qh3.tls import load_pem_private_key

    from qp2p import Identity

    identity = Identity.generate()
    return (Certificate(identity.certificate.public_bytes(Encoding.DER)),
            load_pem_private_key(identity.private_key_pem))


def _configs() -> tuple[QuicConfiguration, QuicConfiguration]:
    cert, key = _certificate()
    common: dict[str, Any] = {
        "alpn_protocols": ALPN,
        "max_datagram_frame_size": 65536,
        "max_datagram_size": DATAGRAM_SIZE,
        "idle_timeout": 60.0,
    }
    server = QuicConfiguration(is_client=False, certificate=cert, private_key=key, **common)
    client = QuicConfiguration(is_client=True, verify_mode=ssl.CERT_NONE, **common)
    return server, client


class Sink:
    """What the server side saw, shared by its protocols."""

    def __init__(self, p: Params) -> None:
        self.meter = Meter(time.perf_counter() + p.warmup)
        self.progress = Progress()
        self.datagrams = 0
        self.messages = 0  # streams received to their end
        self.count_bytes = True  # the meter counts stream bytes (bulk) or messages


class ServerProtocol(QuicConnectionProtocol):
    def __init__(self, *args: Any, sink: Sink, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.sink = sink

    def quic_event_received(self, event: events.QuicEvent) -> None:
        sink = self.sink
        if isinstance(event, events.StreamDataReceived):
            if sink.count_bytes:  # bulk: stream bytes as they arrive
                sink.meter.add(len(event.data))
            if event.end_stream:
                sink.messages += 1
                if not sink.count_bytes:
                    sink.meter.add(1)
        elif isinstance(event, events.DatagramFrameReceived):
            sink.datagrams += 1
            sink.meter.add(1)
            sink.progress.notify()


class ClientProtocol(QuicConnectionProtocol):
    """Wakes the sender whenever the peer sent something (ACKs, MAX_STREAMS, ...)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.progress = Progress()

    def datagram_received(self, data: bytes | str, addr: Any) -> None:
        super().datagram_received(data, addr)
        self.progress.notify()

    def datagrams_received(self, data: list[bytes], addr: Any) -> None:
        # qh3's transport hands over a batch (quinn-udp's recvmmsg/GRO) here
        super().datagrams_received(data, addr)
        self.progress.notify()

    def credit_uni(self) -> int:
        """Unidirectional streams the peer lets us open now (the native core's count)."""
        limits = self._quic._core.stream_limits
        return int(limits[1] - limits[3])

    def send_finished(self, stream_id: int) -> bool:
        # the facade forgets a local stream when the core reports it finished
        return stream_id not in self._quic._created_local_stream_ids


@contextlib.asynccontextmanager
async def raw_pair(p: Params) -> Any:
    """(client protocol, sink) connected through qh3's ``serve``/``connect``."""
    server_cfg, client_cfg = _configs()
    sink = Sink(p)
    server = await serve(
        HOST, 0, configuration=server_cfg, create_protocol=partial(ServerProtocol, sink=sink)
    )
    try:
        port = server._transport.get_extra_info("sockname")[1]
        async with connect(
            HOST, port, configuration=client_cfg, create_protocol=ClientProtocol
        ) as client:
            yield client, sink
    finally:
        server.close()


async def _stream_scenario(p: Params, size: int, window: int, count_bytes: bool) -> Result:
    payload = os.urandom(size)
    async with raw_pair(p) as (client, sink):
        sink.count_bytes = count_bytes
        quic = client._quic
        sink.meter.warmup_until = time.perf_counter() + p.warmup
        deadline = time.perf_counter() + p.duration
        outstanding: list[int] = []
        sent = 0
        while time.perf_counter() < deadline:
            if outstanding:
                outstanding = [s for s in outstanding if not client.send_finished(s)]
            room = min(window - len(outstanding), client.credit_uni())
            for _ in range(room):
                sid = quic.get_next_available_stream_id(is_unidirectional=True)
                quic.send_stream_data(sid, payload, end_stream=True)
                outstanding.append(sid)
                sent += 1
            if room > 0:
                client.transmit()
            await client.progress.wait(0.05)
        sink.meter.stop_at = time.perf_counter()
        return {
            "metrics": {},
            "extra": {"messages_sent": sent, "messages_received": sink.messages,
                      "window_s": round(sink.meter.window(), 3)},
            "rate": sink.meter.rate(),
        }


async def bulk(p: Params) -> Result:
    res = await _stream_scenario(p, p.bulk_message, p.bulk_inflight, count_bytes=True)
    res["metrics"]["bulk_mib_s"] = res.pop("rate") / MiB
    return res


async def messages(p: Params) -> Result:
    res = await _stream_scenario(p, p.small_message, p.msg_window, count_bytes=False)
    res["metrics"]["msgs_per_s"] = res.pop("rate")
    return res


async def datagrams(p: Params) -> Result:
    payload = os.urandom(p.small_message)
    async with raw_pair(p) as (client, sink):
        quic = client._quic
        sink.meter.warmup_until = time.perf_counter() + p.warmup

        def send_burst(n: int) -> None:
            for _ in range(n):
                quic.send_datagram_frame(payload)
            client.transmit()

        return await paced_datagrams(
            p, send_burst, lambda: sink.datagrams, sink.progress, sink.meter
        )


async def handshakes(p: Params) -> Result:
    server_cfg, client_cfg = _configs()
    sink = Sink(p)
    server = await serve(
        HOST, 0, configuration=server_cfg, create_protocol=partial(ServerProtocol, sink=sink)
    )
    port = server._transport.get_extra_info("sockname")[1]
    closing: list[asyncio.Future[Any]] = []
    try:
        spent = 0.0
        n = 0
        end = time.perf_counter() + p.hs_duration
        while time.perf_counter() < end:
            manager = connect(HOST, port, configuration=client_cfg)
            t0 = time.perf_counter()
            await manager.__aenter__()
            spent += time.perf_counter() - t0
            n += 1
            # the context exit closes and waits out draining (~3 PTO): not timed
            closing.append(asyncio.ensure_future(manager.__aexit__(None, None, None)))
        await asyncio.wait_for(asyncio.gather(*closing, return_exceptions=True), 10)
    finally:
        for fut in closing:
            fut.cancel()
        server.close()
    return {
        "metrics": {"handshakes_per_s": n / spent},
        "extra": {"handshakes": n, "mean_ms": 1000 * spent / n},
    }


SCENARIOS = {
    "bulk": bulk,
    "messages": messages,
    "datagrams": datagrams,
    "handshakes": handshakes,
}
