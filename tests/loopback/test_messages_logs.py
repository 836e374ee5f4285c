"""What qp2p tells its user and its log when a peer misbehaves: who refused a handshake,
a reply nobody will read, and log lines a peer can trigger (one per cause per interval,
with counts). Attackers are raw aioquic peers."""

from __future__ import annotations

import asyncio
import logging

import pytest
from aioquic.asyncio.client import connect

import qp2p
from qp2p import wire
from qp2p.connection import _peer_log as connection_log
from qp2p.ratelog import RateLimitedLog
from tests.support.endpoints import FAST, connected
from tests.support.frames import frame
from tests.support.raw_quic import raw_client_config, raw_server


@pytest.mark.asyncio
async def test_a_bad_signature_is_our_refusal_not_the_peers(impl: str) -> None:
    """A raw aioquic server whose certificate does not match its key (its CertificateVerify
    signature cannot verify): the dialler refuses it, and says so, not 'peer rejected us'."""
    ident, other = qp2p.Identity.generate(), qp2p.Identity.generate()
    server, port = await raw_server(ident, private_key=other.private_key)
    quick = qp2p.Config(handshake_timeout=2.0, retry=qp2p.RetryConfig(max_elapsed_time=0.5))
    try:
        async with await qp2p.Endpoint.bind(("127.0.0.1", 0), config=quick) as ep:
            with pytest.raises(qp2p.PeerAuthenticationError) as info:
                await ep.connect_to(("127.0.0.1", port))
            text = str(info.value)
            assert "rejected us" not in text, text
            assert text.startswith("we rejected the peer at 127.0.0.1:"), text
    finally:
        server.close()


@pytest.mark.asyncio
async def test_reply_after_the_asker_gave_up_raises(
    pair: tuple[qp2p.Endpoint, qp2p.Endpoint],
) -> None:
    """The asker's request() times out; the answer that comes later raises
    MessageRejected instead of reporting a reply nobody reads as sent."""
    a, b = pair
    conn, accepted = await connected(a, b)
    asking = asyncio.ensure_future(conn.request(b"question", timeout=0.2))
    msg = await asyncio.wait_for(accepted.recv(), 5)
    with pytest.raises(asyncio.TimeoutError):
        await asking
    await asyncio.sleep(0.3)  # the asker's STOP_SENDING arrives
    with pytest.raises(qp2p.MessageRejected) as info:
        await asyncio.wait_for(msg.reply(b"too late"), 5)
    assert info.value.error_code == wire.ERR_CANCELLED
    assert "gave up" in str(info.value)
    # the connection serves on
    answering = asyncio.ensure_future(accepted.recv())
    reply = asyncio.ensure_future(conn.request(b"again", timeout=5))
    await (await asyncio.wait_for(answering, 5)).reply(b"answer")
    assert (await reply).payload == b"answer"


@pytest.mark.asyncio
async def test_reply_to_a_raw_asker_that_stopped_the_stream_raises(impl: str) -> None:
    """A raw aioquic asker sends a request and stops the stream (gives up): reply()
    raises MessageRejected (not a RuntimeError from the engine, not success)."""
    async with await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST) as server:
        host, port = server.local_addr
        cfg = raw_client_config()
        async with connect(host, port, configuration=cfg) as client:
            quic = client._quic
            sid = quic.get_next_available_stream_id()
            quic.send_stream_data(sid, frame(b"", b"", b"question"), end_stream=True)
            client.transmit()
            accepted = await asyncio.wait_for(server.accept(), 5)
            msg = await asyncio.wait_for(accepted.recv(), 5)
            assert msg.is_request
            quic.stop_stream(sid, wire.ERR_CANCELLED)
            client.transmit()
            await asyncio.sleep(0.2)
            with pytest.raises(qp2p.MessageRejected):
                await asyncio.wait_for(msg.reply(b"too late"), 5)


@pytest.mark.asyncio
async def test_rejected_streams_log_one_line_per_interval(
    impl: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A raw aioquic peer sends 300 malformed streams: each is rejected and counted, the
    log gets at most one WARNING line for them per interval and counts the rest."""
    cause = f"reject-{wire.ERR_FRAME_REJECTED:#x}"
    async with await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST) as server:
        host, port = server.local_addr
        cfg = raw_client_config()
        caplog.set_level(logging.INFO, logger="qp2p")
        async with connect(host, port, configuration=cfg) as client:
            accepted_task = asyncio.ensure_future(server.accept())
            quic = client._quic
            before = connection_log.suppressed(cause)
            sent = 0
            while sent < 300:
                while sent < 300 and quic._local_next_stream_id_uni // 4 < \
                        quic._remote_max_streams_uni:
                    sid = quic.get_next_available_stream_id(is_unidirectional=True)
                    quic.send_stream_data(sid, b"\x99\x99 not a frame header", end_stream=True)
                    sent += 1
                client.transmit()
                await asyncio.sleep(0.01)
            conn = await asyncio.wait_for(accepted_task, 5)
            for _ in range(300):
                if conn.stats()["streams_rejected"] == 300:
                    break
                await asyncio.sleep(0.01)
            assert conn.stats()["streams_rejected"] == 300
        lines = [r for r in caplog.records if "rejecting stream" in r.getMessage()]
        assert len(lines) <= 1, len(lines)
        assert connection_log.suppressed(cause) - (0 if lines else before) == 300 - len(lines)


def test_rate_limited_log_reports_what_it_suppressed(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    log = RateLimitedLog(logging.getLogger("qp2p.test"), interval=10.0, clock=lambda: now[0])
    caplog.set_level(logging.INFO, logger="qp2p.test")
    written = [log.warning("a", "refused %s", i) for i in range(100)]
    assert written == [True] + [False] * 99
    assert log.warning("b", "other cause")  # causes are limited separately
    now[0] = 10.0
    assert log.warning("a", "refused %s", 100)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["refused 0", "other cause",
                        "refused 100 (and 99 more like this in the last 10 s)"]
    assert log.suppressed("a") == 0
