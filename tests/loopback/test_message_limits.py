"""The receiver's ``max_message_size`` reaches the sender (issue 14, item 2): a qp2p peer
advertises it in a private QUIC transport parameter, the sender refuses an over-limit
message locally, and a message the peer refused never reports success."""

from __future__ import annotations

import asyncio

import pytest

import qp2p
from qp2p import engine
from tests.support.endpoints import FAST, connected
from tests.support.udp_relay import UdpRelay

SMALL = qp2p.Config(
    max_message_size=100, idle_timeout=10.0, handshake_timeout=3.0, retry=FAST.retry
)


def test_parameter_round_trip() -> None:
    data = engine.local_transport_parameters(SMALL)
    assert engine.parse_peer_parameters(data) == engine.PeerParameters(100, False)
    # among other parameters, and absent or truncated
    data = engine.encode_transport_parameters(100, True)
    other = bytes([0x04, 0x02, 0x40, 0x10])  # initial_max_data = 16
    assert engine.parse_peer_parameters(other + data + other) == (100, True, False)
    assert engine.parse_peer_parameters(other) == engine.NO_PARAMETERS
    assert engine.parse_peer_parameters(data[:-1]) == (100, False, False)  # flag cut
    assert engine.parse_peer_parameters(data[:3]) == engine.NO_PARAMETERS
    assert engine.parse_peer_parameters(engine.encode_transport_parameters(None, True)) == (
        None, True, False
    )
    assert engine.local_transport_parameters(SMALL, rendezvous=True) != data
    assert engine.parse_peer_parameters(
        other + engine.local_transport_parameters(SMALL, rendezvous=True)
    ) == (100, False, True)
    for size in (0, 63, 64, 2**14, 2**30, 2**32 - 17):  # every varint length
        data = engine.encode_transport_parameters(size, False)
        assert engine.parse_peer_parameters(data) == (size, False, False)


@pytest.mark.asyncio
async def test_sender_learns_the_limit(impl: str) -> None:
    """Both directions learn the other's limit in the handshake; an over-limit send,
    request or reply raises MessageTooLarge before a byte is sent."""
    a = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST)
    b = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=SMALL)
    try:
        conn, accepted = await connected(a, b)
        assert conn.debug_snapshot()["peer_parameters"].max_message_size == 100
        theirs = accepted.debug_snapshot()["peer_parameters"]
        assert theirs.max_message_size == FAST.max_message_size
        before = conn.stats()
        with pytest.raises(qp2p.MessageTooLarge, match="peer's max_message_size of 100"):
            await conn.send(b"x" * 101)
        with pytest.raises(qp2p.MessageTooLarge):
            await conn.send(b"x" * 90, header=b"h" * 11)
        with pytest.raises(qp2p.MessageTooLarge):
            await conn.request(b"y" * 200, timeout=5)
        after = conn.stats()
        assert after["messages_sent"] == before["messages_sent"]
        assert after["unacked_bytes"] == 0 and after["queued_messages"] == 0
        # exactly the limit passes
        await asyncio.wait_for(conn.send(b"p" * 90, header=b"h" * 6, dst=b"d" * 4), 5)
        msg = await asyncio.wait_for(accepted.recv(), 5)
        assert len(msg.header) + len(msg.dst) + len(msg.payload) == 100
        assert accepted.stats()["streams_rejected"] == 0
        # the small side's own limit is what binds its sends (smaller than the peer's)
        with pytest.raises(qp2p.MessageTooLarge, match="exceeds max_message_size of 100"):
            await accepted.send(b"z" * 101)
    finally:
        await a.close()
        await b.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(("dialler", "acceptor"), [("aioquic", "qh3"), ("qh3", "aioquic")])
async def test_limits_cross_engines(dialler: str, acceptor: str) -> None:
    """Each engine's adapter writes the parameter the other's reads, in both roles."""
    a = await qp2p.Endpoint.bind(
        ("127.0.0.1", 0), config=qp2p.Config(engine=dialler, max_message_size=300)
    )
    b = await qp2p.Endpoint.bind(
        ("127.0.0.1", 0), config=qp2p.Config(engine=acceptor, max_message_size=200)
    )
    try:
        assert (a.engine, b.engine) == (dialler, acceptor)
        conn, accepted = await connected(a, b)
        assert conn.debug_snapshot()["peer_parameters"].max_message_size == 200
        assert accepted.debug_snapshot()["peer_parameters"].max_message_size == 300
        with pytest.raises(qp2p.MessageTooLarge, match="peer's max_message_size of 200"):
            await conn.send(b"x" * 201)
        with pytest.raises(qp2p.MessageTooLarge, match="max_message_size of 200"):
            await accepted.send(b"x" * 201)  # its own limit binds first
        await asyncio.wait_for(conn.send(b"x" * 200), 5)
        assert len((await asyncio.wait_for(accepted.recv(), 5)).payload) == 200
        assert accepted.stats()["streams_rejected"] == 0
    finally:
        await a.close()
        await b.close()


def hide_limit(monkeypatch: pytest.MonkeyPatch, limit: int) -> None:
    """Endpoints whose ``max_message_size`` is ``limit`` advertise receipts but not their
    limit: a receiver whose limit the sender does not learn (a qp2p that enforces a
    limit it did not advertise, or one lowered since)."""
    original = engine.local_transport_parameters

    def params(config: qp2p.Config, rendezvous: bool = False, receipts: bool = False) -> bytes:
        if config.max_message_size == limit:
            return engine.encode_transport_parameters(None, True)
        return original(config, rendezvous, receipts)

    monkeypatch.setattr(engine, "local_transport_parameters", params)


async def lossy_over_limit_sends(
    sender_config: qp2p.Config, receiver_config: qp2p.Config, count: int = 200
) -> tuple[dict[str, int], qp2p.Connection, qp2p.Connection, UdpRelay]:
    """``count`` sends of 200-byte messages to a receiver limited to 100 bytes, through
    a relay that drops 10 % of the receiver's packets to the sender; what each send did."""
    a = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=sender_config)
    b = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=receiver_config)
    relay = UdpRelay(("127.0.0.1", 0), b.local_addr, seed=14)
    outcomes = {"returned": 0, "MessageRejected": 0, "MessageTooLarge": 0}
    try:
        await relay.start()
        conn = await a.connect_to(relay.address)
        accepted = await asyncio.wait_for(b.accept(), 5)
        relay.set_impairment("down", loss=0.1)  # receiver -> sender
        for i in range(count):
            try:
                await asyncio.wait_for(conn.send(b"%03d" % i + b"x" * 197), 10)
                outcomes["returned"] += 1
            except (qp2p.MessageRejected, qp2p.MessageTooLarge) as exc:
                outcomes[type(exc).__name__] += 1
        relay.set_impairment("down", loss=0.0)
        # the connection still serves, and nothing over the limit was delivered
        await asyncio.wait_for(conn.send(b"ok"), 10)
        assert (await asyncio.wait_for(accepted.recv(), 5)).payload == b"ok"
        return outcomes, conn, accepted, relay
    finally:
        relay.close()
        await a.close()
        await b.close()


@pytest.mark.asyncio
async def test_lossy_rejections_never_pass_when_limit_unknown(
    impl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The receiver rejects all 200 messages; 10 % of its packets to the sender are lost
    (so an ACK often arrives without the STOP_SENDING it was sent with, and qh3 sends
    none for a stream that arrived whole): every send raises MessageRejected."""
    hide_limit(monkeypatch, 100)
    outcomes, conn, accepted, relay = await lossy_over_limit_sends(FAST, SMALL)
    assert conn.stats()["unacked_bytes"] == 0
    assert relay.downstream.dropped > 0  # the loss happened
    assert outcomes == {"returned": 0, "MessageRejected": 200, "MessageTooLarge": 0}, outcomes
    assert accepted.stats()["streams_rejected"] == 200
    assert accepted.stats()["messages_received"] == 1  # only "ok"


@pytest.mark.asyncio
async def test_lossy_limit_known_refused_locally(impl: str) -> None:
    outcomes, conn, accepted, _ = await lossy_over_limit_sends(FAST, SMALL)
    assert conn.stats()["unacked_bytes"] == 0
    assert outcomes == {"returned": 0, "MessageRejected": 0, "MessageTooLarge": 200}, outcomes
    assert accepted.stats()["streams_rejected"] == 0
    assert accepted.stats()["messages_received"] == 1


@pytest.mark.asyncio
@pytest.mark.parametrize(("sender", "receiver"), [("aioquic", "qh3"), ("qh3", "aioquic")])
async def test_lossy_rejections_cross_engines(
    sender: str, receiver: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Receipts between the two engines: the limit unknown, then known."""
    hide_limit(monkeypatch, 100)
    sender_config = qp2p.Config(engine=sender, idle_timeout=10.0, handshake_timeout=3.0)
    receiver_config = qp2p.Config(
        engine=receiver, max_message_size=100, idle_timeout=10.0, handshake_timeout=3.0
    )
    outcomes, _, accepted, _ = await lossy_over_limit_sends(sender_config, receiver_config, 100)
    assert outcomes == {"returned": 0, "MessageRejected": 100, "MessageTooLarge": 0}, outcomes
    assert accepted.stats()["streams_rejected"] == 100
    monkeypatch.undo()
    outcomes, _, accepted, _ = await lossy_over_limit_sends(sender_config, receiver_config, 100)
    assert outcomes == {"returned": 0, "MessageRejected": 0, "MessageTooLarge": 100}, outcomes
    assert accepted.stats()["streams_rejected"] == 0


def test_receipt_encoding() -> None:
    from qp2p import wire

    entries = [(2, 0), (6, wire.ERR_FRAME_REJECTED), (2**62 - 1, 2**62 - 1), (4 * 10**6, 1)]
    payload = b"".join(wire.encode_receipt(sid, code) for sid, code in entries)
    assert wire.parse_receipts(payload) == entries
    for bad in (payload[:-1], wire.encode_varint(3), b"\xc0\x00"):
        with pytest.raises(qp2p.ProtocolError):
            wire.parse_receipts(bad)


@pytest.mark.asyncio
async def test_peer_without_parameters(impl: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A peer that advertises none of qp2p's parameters (another QUIC stack) gets no
    receipts, and our sends to it complete on the QUIC ACK as before."""
    original = engine.local_transport_parameters

    def params(config: qp2p.Config, rendezvous: bool = False, receipts: bool = False) -> bytes:
        return b"" if config.max_message_size == 100 else original(config, rendezvous, receipts)

    monkeypatch.setattr(engine, "local_transport_parameters", params)
    a = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST)
    b = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=SMALL)
    try:
        conn, accepted = await connected(a, b)
        assert conn.debug_snapshot()["peer_parameters"] == engine.NO_PARAMETERS
        # qp2p on qh3 promises receipts on top of its limit (its core acknowledges early)
        assert accepted.debug_snapshot()["peer_parameters"] == (
            FAST.max_message_size, a.engine == "qh3", False)
        for i in range(20):
            await asyncio.wait_for(conn.send(b"m%d" % i), 5)
        for i in range(20):
            assert (await asyncio.wait_for(accepted.recv(), 5)).payload == b"m%d" % i
        assert conn.stats()["unacked_bytes"] == 0
        assert accepted.stats()["messages_received"] == 20
        assert accepted.stats()["streams_rejected"] == conn.stats()["streams_rejected"] == 0
    finally:
        await a.close()
        await b.close()


@pytest.mark.asyncio
async def test_junk_receipts(impl: str) -> None:
    """Receipts from a peer are only about our own waiting sends: a malformed one is
    counted and dropped, one naming streams we never sent changes nothing, and the
    connection keeps serving."""
    from qp2p import wire

    a = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST)
    b = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST)
    try:
        conn, accepted = await connected(a, b)
        for payload in (b"\xc0", wire.encode_receipt(2, 0) + wire.encode_receipt(1002, 7)):
            accepted.send_control(wire.KIND_RECEIPT, payload)
        await asyncio.wait_for(accepted.send(b"after"), 5)
        assert (await asyncio.wait_for(conn.recv(), 5)).payload == b"after"
        assert conn.stats()["streams_rejected"] == 1  # the malformed one
        assert conn.stats()["messages_received"] == 1
        await asyncio.wait_for(conn.send(b"still"), 5)
        assert (await asyncio.wait_for(accepted.recv(), 5)).payload == b"still"
    finally:
        await a.close()
        await b.close()
