"""Hostile peers of relayed connections, judged from outside: what a raw socket standing
for a victim receives, and what the endpoint keeps."""

from __future__ import annotations

import asyncio
import os
import socket

import pytest

import qp2p
from qp2p import relay, wire
from tests.conftest import FAST

pytestmark = pytest.mark.asyncio


class Victim:
    """A UDP forwarder between the dialler and the relay: the relay sees the dialler at
    ``back``'s address and names it as the dialler's address (as a lying relay would name
    a victim). What reaches ``back`` from anyone but the relay is counted, not forwarded."""

    def __init__(self, relay_addr: tuple[str, int]) -> None:
        self.relay_addr = relay_addr
        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.front.bind(("127.0.0.1", 0))
        self.front.setblocking(False)
        self.back = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.back.bind(("127.0.0.1", 0))
        self.back.setblocking(False)
        self.addr = self.front.getsockname()
        self.client: tuple[str, int] | None = None
        self.probe_bytes = 0
        self.other_bytes = 0
        loop = asyncio.get_running_loop()
        loop.add_reader(self.front.fileno(), self._from_client)
        loop.add_reader(self.back.fileno(), self._from_back)

    def _from_client(self) -> None:
        while True:
            try:
                data, self.client = self.front.recvfrom(65536)
            except BlockingIOError:
                return
            self.back.sendto(data, self.relay_addr)

    def _from_back(self) -> None:
        while True:
            try:
                data, src = self.back.recvfrom(65536)
            except BlockingIOError:
                return
            if src[:2] == self.relay_addr[:2]:
                if self.client is not None:
                    self.front.sendto(data, self.client)
            elif relay.is_probe(data):
                self.probe_bytes += len(data)
            else:
                self.other_bytes += len(data)

    def close(self) -> None:
        loop = asyncio.get_running_loop()
        for s in (self.front, self.back):
            loop.remove_reader(s.fileno())
            s.close()


async def test_path_ok_without_the_probe_moves_nothing(impl: str) -> None:
    """A dialler that answers the target's PATH_CHECK with PATH_OK at once, without its
    probe having reached it, must not move the target's sending to the address the relay
    named (here a raw socket standing for a victim): only the target's probes reach it,
    none of the connection's packets."""
    r = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST, relay=True)
    b = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST)
    a = await qp2p.Endpoint.bind(("127.0.0.1", 0), config=FAST)
    victim = Victim(r.local_addr)
    acks: list[asyncio.Future[None]] = []

    def liar(conn: qp2p.Connection, msg: object) -> None:  # PATH_OK for any check
        fut = conn.send_control(wire.KIND_PATH_OK, bytes(msg.payload))  # type: ignore[attr-defined]
        if fut is not None:
            acks.append(fut)

    try:
        await b.connect_to(r.local_addr)
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
        done, pending = await asyncio.wait(sends, timeout=5)
        for fut in pending:
            fut.cancel()
        print(f"\n[{impl}] after a false PATH_OK: target path {accepted.path}, "
              f"victim got {victim.other_bytes} B of the connection's packets, "
              f"{victim.probe_bytes} B of probes")
        assert accepted.path == "relayed"
        assert not pending
        assert victim.other_bytes == 0
        # one probe train: PROBE_SCHEDULE probes of PROBE_LEN bytes
        from qp2p.services.holepunch import PROBE_SCHEDULE
        assert victim.probe_bytes <= len(PROBE_SCHEDULE) * relay.PROBE_LEN
    finally:
        victim.close()
        for ep in (a, b, r):
            await ep.close()
