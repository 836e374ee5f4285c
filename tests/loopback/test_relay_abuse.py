"""Hostile peers of relayed connections, judged from outside: what a raw socket standing
for a victim receives, and what the endpoint keeps."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest
from aioquic.asyncio.client import connect

import qp2p
from qp2p import connection, relay, wire
from qp2p.services.holepunch import PROBE_SCHEDULE
from tests.support.endpoints import FAST
from tests.support.forwarder import UdpForwarder
from tests.support.frames import frame
from tests.support.raw_quic import GrantsNoUniStreams, raw_client_config

pytestmark = pytest.mark.asyncio


def strays(victim: UdpForwarder) -> tuple[int, int]:
    """Bytes of probes, and of anything else, that reached the victim from anyone but the
    relay (a forwarder whose ``back`` address the relay named as the dialler's)."""
    probes = sum(len(d) for d in victim.strays if relay.is_probe(d))
    return probes, sum(len(d) for d in victim.strays) - probes


async def test_path_ok_without_the_probe_moves_nothing(impl: str) -> None:
    """A dialler that answers the target's PATH_CHECK with PATH_OK at once, without its
    probe having reached it, must not move the target's sending to the address the relay
    named (here a raw socket standing for a victim): only the target's probes reach it,
    none of the connection's packets."""
    r = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST, relay=True)
    b = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST)
    a = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST)
    # the relay sees the dialler at victim.back and names that address as the dialler's
    victim = UdpForwarder(r.local_addr)
    acks: list[asyncio.Future[None]] = []

    def liar(conn: qp2p.Connection, msg: object) -> None:  # PATH_OK for any check
        fut = conn.send_control(wire.KIND_PATH_OK, bytes(msg.payload))  # type: ignore[attr-defined]
        if fut is not None:
            acks.append(fut)

    try:
        await b.connect_to(r.local_addr)
        # private reaches, on purpose: ``a`` plays a hostile dialler, so its own endpoint is
        # rewired (answer every PATH_CHECK with PATH_OK; never probe); no API offers that
        a._control_handlers[wire.KIND_PATH_CHECK] = liar
        a._services.relay._start_upgrade = lambda conn: None  # the attacker never probes
        conn = await a.connect_relayed(victim.addr, b.peer_id)
        accepted = await asyncio.wait_for(b.accept(), 5)
        # the target probes and checks on the dialler's first check
        conn.send_control(wire.KIND_PATH_CHECK, os.urandom(relay.PROBE_LEN - 1))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while not acks and loop.time() < deadline:
            await asyncio.sleep(0.01)
        assert acks, "the target sent no PATH_CHECK"
        await asyncio.wait(acks, timeout=3)
        sends = [asyncio.ensure_future(accepted.send(b"x" * 1000 + b"%d" % i))
                 for i in range(50)]  # the target's application sends to the dialler
        _done, pending = await asyncio.wait(sends, timeout=5)
        for fut in pending:
            fut.cancel()
        probe_bytes, other_bytes = strays(victim)
        print(f"\n[{impl}] after a false PATH_OK: target path {accepted.path}, "
              f"victim got {other_bytes} B of the connection's packets, "
              f"{probe_bytes} B of probes")
        assert accepted.path == "relayed"
        assert not pending
        assert other_bytes == 0
        # one probe train: PROBE_SCHEDULE probes of PROBE_LEN bytes

        assert probe_bytes <= len(PROBE_SCHEDULE) * relay.PROBE_LEN
    finally:
        victim.close()
        for ep in (a, b, r):
            await ep.close()


async def test_malformed_and_flooded_relay_control(impl: str) -> None:
    """Junk and floods of every relay control kind, from a peer to a relay and from a
    relay to a target that dialled it: nothing escapes into the event loop, the target
    keeps at most ``MAX_PATHS_PER_RELAY`` relayed paths through that relay, the relay
    holds no session or offer for them, and both keep serving."""
    r = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST, relay=True)
    b = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST)
    a = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST)
    loop = asyncio.get_running_loop()
    errors: list[dict[str, object]] = []
    old_handler = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    try:
        await b.connect_to(r.local_addr)
        to_r = await a.connect_to(r.local_addr)
        r_to_b = next(c for c in r.connections() if c.peer_id == b.peer_id)
        junk = [b"", b"\x00", os.urandom(7), os.urandom(8), os.urandom(9), os.urandom(31),
                os.urandom(33), os.urandom(200), b"\xff" * 8 + b"not an address",
                b"\x01" * 8 + b"240.1.2.3:9", b"\x02" * 8 + b"[::1]:0", os.urandom(8)
                + b"\xc3\x28:1"]
        kinds = (wire.KIND_RELAY_REQUEST, wire.KIND_RELAY_OFFER, wire.KIND_RELAY_ACCEPT,
                 wire.KIND_RELAY_RESPONSE, wire.KIND_PATH_CHECK, wire.KIND_PATH_OK)
        frames = [(kind, payload, header) for kind in kinds for payload in junk
                  for header in (b"", b"ok", b"err", os.urandom(40))]
        # a flood of well-formed offers, each its own session id and a victim address
        offers = [(wire.KIND_RELAY_OFFER, os.urandom(8) + wire.format_addr(("127.0.0.1", 9)),
                   a.peer_id.digest) for _ in range(200)]
        # in batches each side's stream credit takes, so none is dropped by the sender's
        # own bound on queued control frames (connection.MAX_QUEUED_CONTROL)
        for sender, flood in ((to_r, frames), (r_to_b, frames + offers)):
            for start in range(0, len(flood), 50):
                sent = [sender.send_control(*f) for f in flood[start:start + 50]]
                assert None not in sent
                # done, acknowledged or refused (junk); none still waiting
                _, waiting = await asyncio.wait(sent, timeout=10)  # type: ignore[arg-type]
                assert not waiting
        # each endpoint still answers a plain request
        c = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST)
        for ep in (r, b):
            conn = await c.connect_to(ep.local_addr)
            replying = asyncio.ensure_future(conn.request(b"ping"))
            peer = await asyncio.wait_for(ep.accept(), 5)
            while peer.peer_id != c.peer_id:
                peer = await asyncio.wait_for(ep.accept(), 5)
            msg = await asyncio.wait_for(peer.recv(), 5)
            await msg.reply(b"pong")
            assert (await asyncio.wait_for(replying, 5)).payload == b"pong"
        paths = b.debug_snapshot()["relay"]["paths"]
        held = r.debug_snapshot()["relay"]
        print(f"\n[{impl}] after junk and 200 offers: target holds {paths} relayed paths, "
              f"relay {len(held['sessions'])} sessions / {held['offers']} offers, "
              f"{len(errors)} loop errors")
        assert paths <= relay.MAX_PATHS_PER_RELAY
        assert not held["sessions"] and not held["offers"]
        assert errors == []
        await c.close()
    finally:
        loop.set_exception_handler(old_handler)
        for ep in (a, b, r):
            await ep.close()


async def test_raw_probe_and_wrapped_floods(impl: str) -> None:
    """Raw probes with fresh nonces and wrapped datagrams naming random session ids, from
    raw sockets, to a relay and to a peer holding a relayed path: nothing is sent back to
    the sources, the probes remembered stay at ``MAX_PROBES_SEEN``, the heap grows by no
    more than that, and a relayed connection keeps working."""
    import tracemalloc

    r = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST, relay=True)
    b = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST)
    a = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST)
    socks = []
    for _ in range(8):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        s.setblocking(False)
        socks.append(s)
    try:
        await b.connect_to(r.local_addr)
        conn = await a.connect_relayed(r.local_addr, b.peer_id)
        accepted = await asyncio.wait_for(b.accept(), 5)
        sid = next(iter(b.debug_snapshot()["relay"]["by_session"]), b"")
        tracemalloc.start()
        await asyncio.sleep(0)
        before = tracemalloc.get_traced_memory()[0]
        sent = 0
        for _ in range(5):
            for s in socks:
                for _ in range(100):
                    for dst in (r.local_addr, b.local_addr):
                        s.sendto(bytes([relay.PROBE_MARKER]) + os.urandom(16), dst)
                        s.sendto(b"\x00" + os.urandom(8) + os.urandom(100), dst)
                        # the real session id, from the wrong address
                        s.sendto(b"\x00" + bytes(sid) + os.urandom(100), dst)
                        sent += 3
            await asyncio.sleep(0.05)
        # the relayed connection still carries a request, after the flood
        replying = asyncio.ensure_future(conn.request(b"ping"))
        msg = await asyncio.wait_for(accepted.recv(), 5)
        await msg.reply(b"pong")
        assert (await asyncio.wait_for(replying, 5)).payload == b"pong"
        grown = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        back = 0
        for s in socks:
            while True:
                try:
                    back += len(s.recv(65536))
                except BlockingIOError:
                    break
        seen_r = r.debug_snapshot()["relay"]["probes_seen"]
        seen_b = b.debug_snapshot()["relay"]["probes_seen"]
        print(f"\n[{impl}] {sent} flood datagrams: {back} B sent back, probes remembered "
              f"{seen_r} / {seen_b}, heap +{grown} B, "
              f"relay dropped {r.stats_counters['relay_dropped']}")
        assert back == 0
        assert r.debug_snapshot()["relay"]["probes_seen"] <= relay.MAX_PROBES_SEEN
        assert b.debug_snapshot()["relay"]["probes_seen"] <= relay.MAX_PROBES_SEEN
        # 8,000 probes kept would be ~3 MB; the flood's own transients stay under 1 MiB
        assert grown < 2**20
    finally:
        for s in socks:
            s.close()
        for ep in (a, b, r):
            await ep.close()


async def test_probes_to_an_address_a_relay_names(
    impl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A relay names a victim as the dialler's address (the victim socket); the dialler
    never probes and sends one PATH_CHECK. The target probes the victim for all its
    attempts: what reaches the victim is at most ``UPGRADE_ATTEMPTS`` trains of 7 probes of 17 B,
    less than the dialler sent to get it (counted at the same raw socket)."""
    monkeypatch.setattr(relay, "UPGRADE_INTERVAL", 0.85)  # a whole train per attempt
    r = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST, relay=True)
    b = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST)
    a = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST)
    # the relay sees the dialler at victim.back and names that address as the dialler's
    victim = UdpForwarder(r.local_addr)
    sent = 0

    def counting(data: bytes) -> bytes:  # what the dialler sends (to the relay, via victim)
        nonlocal sent
        sent += len(data)
        return data

    victim.tamper = counting
    loop = asyncio.get_running_loop()
    try:
        await b.connect_to(r.local_addr)
        # private reach, on purpose: the hostile dialler never probes (its own endpoint)
        a._services.relay._start_upgrade = lambda conn: None
        conn = await a.connect_relayed(victim.addr, b.peer_id)
        await asyncio.wait_for(b.accept(), 5)
        conn.send_control(wire.KIND_PATH_CHECK, os.urandom(relay.PROBE_LEN - 1))
        trains = relay.UPGRADE_ATTEMPTS * len(PROBE_SCHEDULE)
        deadline = loop.time() + relay.UPGRADE_ATTEMPTS * 0.85 + 5
        while strays(victim)[0] < trains * relay.PROBE_LEN and loop.time() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # nothing more comes
        probe_bytes, other_bytes = strays(victim)
        print(f"\n[{impl}] a named victim got {probe_bytes} B of probes "
              f"({other_bytes} B else); the dialler sent {sent} B")
        assert other_bytes == 0
        assert 0 < probe_bytes <= trains * relay.PROBE_LEN
        assert probe_bytes <= sent
    finally:
        victim.close()
        for ep in (a, b, r):
            await ep.close()


async def test_one_host_cannot_take_every_relay_session(
    impl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One host (127.0.0.1) runs diallers and targets that never answer offers and asks
    for sessions until the relay says busy; a peer pair on another host (127.0.0.2) must
    still get a relayed connection. (The limits are scaled down: 16 sessions in all,
    8 per host.)"""
    monkeypatch.setattr(relay, "UPGRADE_ATTEMPTS", 0)
    monkeypatch.setattr(relay, "MAX_SESSIONS", 16)
    monkeypatch.setattr(relay, "MAX_SESSIONS_PER_IP", 8, raising=False)
    r = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST, relay=True)
    attackers = [await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST) for _ in range(4)]
    honest = [await qp2p.Endpoint.bind(("127.0.0.2", 0), config=FAST) for _ in range(2)]
    tasks: list[asyncio.Future[qp2p.Connection]] = []
    try:
        for t in attackers[2:]:
            # private reach, on purpose: a target that never answers offers (its own endpoint)
            t._control_handlers[wire.KIND_RELAY_OFFER] = lambda c, m: None  # silent
            await t.connect_to(r.local_addr)
        for d in attackers[:2]:
            await d.connect_to(r.local_addr)
            for t in attackers[2:]:
                tasks += [asyncio.ensure_future(d.connect_relayed(r.local_addr, t.peer_id))
                          for _ in range(8)]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while (r.debug_snapshot()["relay"]["offers"] + sum(t.done() for t in tasks) < len(tasks)
               and loop.time() < deadline):
            await asyncio.sleep(0.01)
        held = r.debug_snapshot()["relay"]["offers"]
        await honest[1].connect_to(r.local_addr)
        try:
            conn = await honest[0].connect_relayed(r.local_addr, honest[1].peer_id)
            outcome = conn.path
        except qp2p.HolePunchFailed as exc:
            outcome = str(exc)
        print(f"\n[{impl}] one host asked {len(tasks)} sessions: {held} offers held; "
              f"another host's pair: {outcome}")
        assert outcome == "relayed"
    finally:
        for task in tasks:
            task.cancel()
        for ep in (*honest, *attackers, r):
            await ep.close()


async def test_one_host_cannot_take_the_relay_bandwidth(
    impl: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two peers of one host (127.0.0.1) with two sessions between them flood wrapped
    datagrams through the relay from their own endpoint sockets: the relay forwards no
    more than the host's burst for them (scaled down to 20 KB, refilled at 1 KB/s), and a
    pair on another host (127.0.0.2) still exchanges messages through it."""
    monkeypatch.setattr(relay, "UPGRADE_ATTEMPTS", 0)
    monkeypatch.setattr(relay, "HOST_RATE", 1000, raising=False)
    monkeypatch.setattr(relay, "HOST_BURST", 20_000, raising=False)
    r = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST, relay=True)
    d = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST)
    t = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST)
    hd = await qp2p.Endpoint.bind(("127.0.0.2", 0), config=FAST)
    ht = await qp2p.Endpoint.bind(("127.0.0.2", 0), config=FAST)
    try:
        await t.connect_to(r.local_addr)
        await ht.connect_to(r.local_addr)
        for _ in range(2):
            await d.connect_relayed(r.local_addr, t.peer_id)
        honest = await hd.connect_relayed(r.local_addr, ht.peer_id)
        honest_peer = await asyncio.wait_for(ht.accept(), 5)
        before = r.stats_counters["relayed_bytes"]
        for _ in range(100):
            for sid in list(d.debug_snapshot()["relay"]["by_session"]):
                # private reach, on purpose: the flood must leave the session's own socket
                d._send_raw(b"\x00" + sid + os.urandom(1190), r.local_addr)
            await asyncio.sleep(0)
        await asyncio.sleep(0.2)
        flooded = r.stats_counters["relayed_bytes"] - before
        await asyncio.wait_for(honest.send(b"still here"), 5)
        assert (await asyncio.wait_for(honest_peer.recv(), 5)).payload == b"still here"
        print(f"\n[{impl}] one host sent 200 x 1,199 B through 2 sessions: the relay "
              f"forwarded {flooded} B, dropped {r.stats_counters['relay_dropped']}")
        assert flooded <= 20_000 + 5_000  # the burst, and a little refill and ACKs
    finally:
        for ep in (hd, ht, d, t, r):
            await ep.close()


async def test_offers_from_a_peer_granting_no_streams_queue_little(impl: str) -> None:
    """A raw aioquic peer grants the endpoint no unidirectional stream, so no answer to
    it ever leaves, then sends 3,000 RELAY_OFFERs (each ~40 bytes, each answered with a
    decline). The endpoint keeps at most ``MAX_QUEUED_CONTROL`` answers queued for it
    and drops and counts the rest (before: all 3,000 queued, each a frame, a future and
    a pending send), and still serves an honest peer."""
    offers = 3000
    async with await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST) as ep:
        host, port = ep.local_addr
        async with connect(host, port, configuration=raw_client_config(),
                           create_protocol=GrantsNoUniStreams) as raw:
            assert isinstance(raw, GrantsNoUniStreams)
            victim = await asyncio.wait_for(ep.accept(), 5)
            offer = frame(os.urandom(32), b"", os.urandom(relay.SESSION_LEN)
                          + wire.format_addr(("127.0.0.1", 9)), kind=wire.KIND_RELAY_OFFER)
            raw.send_frames([offer] * offers, unidirectional=True)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while loop.time() < deadline:
                stats = victim.stats()
                if stats["queued_messages"] + stats["control_dropped"] >= offers:
                    break
                await asyncio.sleep(0.01)
            stats = victim.stats()
            print(f"\n[{impl}] {offers} offers from a peer granting no stream: "
                  f"{stats['queued_messages']} answers queued, "
                  f"{stats['control_dropped']} dropped")
            assert stats["queued_messages"] == connection.MAX_QUEUED_CONTROL
            assert stats["control_dropped"] == offers - connection.MAX_QUEUED_CONTROL
        async with await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST) as honest:
            conn = await honest.connect_to(ep.local_addr)
            await asyncio.wait_for(conn.send(b"still serving"), 5)
            accepted = await asyncio.wait_for(ep.accept(), 5)
            assert (await asyncio.wait_for(accepted.recv(), 5)).payload == b"still serving"


async def test_a_repeated_path_check_confirms_once(impl: str) -> None:
    """A relayed dialler probes the target once, from a raw socket on its host, then
    names that probe's tag in 500 PATH_CHECKs. The target answers the first with PATH_OK
    and the rest with nothing (before: one PATH_OK each, as long as the dialler kept
    asking)."""
    r = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST, relay=True)
    b = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST)
    a = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST)
    nonce = os.urandom(relay.PROBE_LEN - 1)
    answers: list[bytes] = []  # the PATH_OKs for our probe (not those for a's own)
    prober = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        prober.bind(("127.0.0.1", 0))
        await b.connect_to(r.local_addr)
        # private reach, on purpose: ``a`` plays the hostile dialler (its own endpoint)
        # and counts the PATH_OKs it gets
        a._control_handlers[wire.KIND_PATH_OK] = lambda conn, msg: (  # type: ignore[attr-defined]
            answers.append(nonce) if bytes(msg.payload) == nonce else None)
        conn = await a.connect_relayed(r.local_addr, b.peer_id)
        await asyncio.wait_for(b.accept(), 5)
        prober.sendto(bytes([relay.PROBE_MARKER]) + nonce, b.local_addr)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 5
        while not answers and loop.time() < deadline:  # the probe, then the first check
            fut = conn.send_control(wire.KIND_PATH_CHECK, relay.probe_tag(nonce))
            assert fut is not None
            await asyncio.wait_for(fut, 5)
            await asyncio.sleep(0.05)
        assert answers == [nonce], "the target never confirmed the probe"
        for _ in range(10):  # 500 more, in batches the target grants streams for
            batch = [conn.send_control(wire.KIND_PATH_CHECK, relay.probe_tag(nonce))
                     for _ in range(50)]
            await asyncio.wait_for(asyncio.gather(*batch), 5)  # type: ignore[arg-type]
        await asyncio.sleep(0.5)  # any answers still on their way arrive
        print(f"\n[{impl}] 500 repeated checks of one probe: {len(answers)} PATH_OK")
        assert answers == [nonce]
    finally:
        prober.close()
        for ep in (a, b, r):
            await ep.close()
