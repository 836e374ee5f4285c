"""A message whose stream the engine stalls (``engine.SendStalled``: qh3 2.1 under heavy
loss, see tests/unit/test_qh3_core.py for the engine's part) arrives exactly once: the
sender resets the stream, and the receiver's receipt says whether it took the message
(the send completes) or dropped it (``wire.ERR_STALLED``: the message goes again).

The stall itself needs a rare loss pattern, so here the engine is made to report streams
we name (its next pull returns the event, as it would), while our relay holds back one
direction. Only qh3 emits it, and only toward a receiver that sends receipts (qp2p on
qh3), so these run on qh3.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

import qp2p
from qp2p import engine, wire
from tests.support.traffic import LOSSY
from tests.support.udp_relay import UdpRelay

pytestmark = pytest.mark.asyncio

QH3 = pytest.mark.parametrize("impl", ["cython-qh3", "python-qh3"], indirect=True)

Setup = tuple[qp2p.Connection, qp2p.Connection, UdpRelay]

#: Streams the engine that owns them reports stalled at its next pull of events.
STALLS: list[int] = []


@pytest.fixture(autouse=True)
def stalls_on_demand(monkeypatch: pytest.MonkeyPatch) -> None:
    qh3_engine = pytest.importorskip("qp2p.engine._qh3")
    pull = qh3_engine.Qh3Connection.next_event

    def next_event(self: Any) -> engine.Event | None:
        for sid in STALLS:
            if not self.send_finished(sid):  # ours, and not complete: report it
                STALLS.remove(sid)
                return engine.SendStalled(sid)
        return pull(self)  # type: ignore[no-any-return]

    monkeypatch.setattr(qh3_engine.Qh3Connection, "next_event", next_event)
    STALLS.clear()


@contextlib.asynccontextmanager
async def _relayed(receiver: qp2p.Config = LOSSY) -> AsyncIterator[Setup]:
    """(sender's connection, receiver's connection, the relay between them), after one
    message went through."""
    b = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=receiver)
    relay = UdpRelay(("127.0.0.1", 0), b.local_addr)
    await relay.start()
    a = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=LOSSY)
    try:
        conn = await a.connect_to(relay.address)
        await conn.send(b"first")
        accepted = await asyncio.wait_for(b.accept(), 5)
        assert (await asyncio.wait_for(accepted.recv(), 5)).payload == b"first"
        yield conn, accepted, relay
    finally:
        await a.close()
        relay.close()
        await b.close()


@pytest_asyncio.fixture
async def through_relay(impl: str) -> AsyncIterator[Setup]:
    """``_relayed`` between two qp2p endpoints on qh3."""
    async with _relayed() as setup:
        yield setup


async def _receipt_lost(setup: Setup) -> tuple[asyncio.Future[None], list[int]]:
    """A message goes through, its receipt does not (the relay drops what the receiver
    sends): the sender's pending send, and the receiver's unacknowledged receipt streams."""
    conn, accepted, relay = setup
    relay.set_impairment("down", loss=1.0)
    sending = asyncio.ensure_future(conn.send(b"second"))
    assert (await asyncio.wait_for(accepted.recv(), 5)).payload == b"second"
    await asyncio.sleep(0.05)  # its receipt is written (and lost)
    stalled = accepted.debug_snapshot()["receipt_streams"]
    assert stalled
    return sending, stalled


async def _unacked_stream(conn: qp2p.Connection) -> int:
    for _ in range(200):
        streams = conn.debug_snapshot()["unacked_streams"]
        if streams:
            assert len(streams) == 1, streams
            return int(streams[0])
        await asyncio.sleep(0.005)
    raise AssertionError("the send never started")


async def _stall(conn: qp2p.Connection, *streams: int) -> None:
    """Have ``conn``'s engine report ``streams`` stalled; wait until it did (its next
    timer or packet makes the endpoint pull its events)."""
    before = conn.stats()["sends_stalled"]
    STALLS.extend(streams)
    for _ in range(400):
        if conn.stats()["sends_stalled"] == before + len(streams):
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"not reported: {STALLS}")


async def _nothing_more(receiver: qp2p.Connection) -> None:
    with pytest.raises(asyncio.TimeoutError):
        extra = await asyncio.wait_for(receiver.recv(), 1.0)
        pytest.fail(f"a message arrived twice: {extra.payload!r}")


@QH3
async def test_a_stalled_message_the_peer_never_got_goes_again(through_relay: Setup) -> None:
    conn, accepted, relay = through_relay
    relay.set_impairment("up", loss=1.0)  # the message is lost, as the stall loses it
    sending = asyncio.ensure_future(conn.send(b"second"))
    sid = await _unacked_stream(conn)
    await _stall(conn, sid)
    relay.set_impairment("up", loss=0.0)
    await asyncio.wait_for(sending, 10)
    assert (await asyncio.wait_for(accepted.recv(), 5)).payload == b"second"
    stats = conn.stats()
    assert (stats["sends_stalled"], stats["messages_resent"]) == (1, 1), stats
    assert sid not in conn.debug_snapshot()["unacked_streams"]
    await _nothing_more(accepted)


@QH3
async def test_a_stalled_message_the_peer_took_is_not_sent_twice(through_relay: Setup) -> None:
    conn, accepted, relay = through_relay
    relay.set_impairment("down", loss=1.0)  # it arrives; its ACK and receipt do not
    sending = asyncio.ensure_future(conn.send(b"second"))
    assert (await asyncio.wait_for(accepted.recv(), 5)).payload == b"second"
    sid = await _unacked_stream(conn)
    await _stall(conn, sid)
    relay.set_impairment("down", loss=0.0)
    await asyncio.wait_for(sending, 10)  # on the receipt it sent before the reset
    stats = conn.stats()
    assert (stats["sends_stalled"], stats["messages_resent"]) == (1, 0), stats
    await _nothing_more(accepted)


@QH3
async def test_a_stalled_receipt_goes_again(through_relay: Setup) -> None:
    # the receiver's own stream of receipts stalls: it resends the receipts (a repeated
    # receipt is ignored), and the sender's send completes
    _, accepted, relay = through_relay
    sending, stalled = await _receipt_lost(through_relay)
    await _stall(accepted, *stalled)
    # reset, so their bytes are never sent again: new streams carry the receipts (at the
    # connection's next flush)
    for _ in range(200):
        again = accepted.debug_snapshot()["receipt_streams"]
        if again:
            break
        await asyncio.sleep(0.005)
    assert again and not set(again) & set(stalled), (stalled, again)
    relay.set_impairment("down", loss=0.0)
    await asyncio.wait_for(sending, 10)
    await _nothing_more(accepted)


@QH3
async def test_a_stalled_receipt_waits_for_stream_credit(through_relay: Setup) -> None:
    # the receiver has no stream left to send the stalled receipts again on (its own
    # messages hold every one the peer grants): they wait for credit, the connection lives
    conn, accepted, relay = through_relay
    sending, stalled = await _receipt_lost(through_relay)
    replies = [i.to_bytes(2, "big") for i in range(150)]  # more than the streams granted
    answering = asyncio.gather(*(accepted.send(body) for body in replies))
    await asyncio.sleep(0.1)
    await _stall(accepted, *stalled)
    assert not accepted.is_closed
    relay.set_impairment("down", loss=0.0)
    await asyncio.wait_for(sending, 10)
    await asyncio.wait_for(answering, 10)
    got = sorted([(await asyncio.wait_for(conn.recv(), 5)).payload for _ in replies])
    assert got == replies
    assert not accepted.is_closed and not conn.is_closed


@pytest.mark.parametrize("impl", ["cython-qh3", "python-qh3"], indirect=True)
async def test_a_stall_toward_a_peer_without_receipts_fails_the_send(impl: str) -> None:
    # qp2p on aioquic sends no receipts: a stalled stream cannot be told from a message it
    # took, so send() fails (typed, with the code) instead of waiting for good
    async with _relayed(dataclasses.replace(LOSSY, engine="aioquic")) as (conn, _, relay):
        relay.set_impairment("both", loss=1.0)
        sending = asyncio.ensure_future(conn.send(b"second"))
        sid = await _unacked_stream(conn)
        await _stall(conn, sid)
        with pytest.raises(qp2p.MessageRejected) as raised:
            await asyncio.wait_for(sending, 5)
        assert raised.value.error_code == wire.ERR_STALLED
        assert conn.stats()["messages_resent"] == 0 and not conn.is_closed
