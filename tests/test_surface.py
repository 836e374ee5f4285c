"""The public surface as a user's type checker and event loop see it: the address type,
typed stats and peer ids, async context managers and iterators, the error hierarchy,
and what the library prints into an application that configured no logging."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from aioquic.asyncio.client import connect
from aioquic.quic.configuration import QuicConfiguration

import qp2p
from tests.conftest import FAST, connected

ROOT = Path(__file__).resolve().parent.parent

# --------------------------------------------------------------------------- types

#: A user program that must type-check under ``mypy --strict`` against qp2p's annotations.
TYPED_USER_CODE = '''
import asyncio
import qp2p


async def main(ep: qp2p.Endpoint, conn: qp2p.Connection) -> None:
    peer: qp2p.PeerId = conn.require_peer_id()   # non-optional
    maybe: qp2p.PeerId | None = conn.peer_id
    here: qp2p.Address = ep.local_addr
    there: qp2p.Address = conn.remote_addr
    host: str = here[0]
    port: int = there[1]
    seen: qp2p.Address | None = ep.public_addr
    # "host:port" text is accepted wherever an address is
    await ep.connect_to("127.0.0.1:5000")
    await ep.connect_to_any(["127.0.0.1:5000", ("127.0.0.1", 5001)])
    ok: bool = await ep.is_reachable("127.0.0.1:5000")
    public: qp2p.Address = await ep.discover_public_addr("127.0.0.1:5000")
    stats: qp2p.ConnectionStats = conn.stats()
    sent: int = stats["bytes_sent"]
    rtt: float | None = stats["rtt"]
    stats["no_such_counter"]  # type: ignore[typeddict-item]
    del peer, maybe, host, port, seen, ok, public, sent, rtt
'''


def test_user_code_type_checks(tmp_path: Path) -> None:
    """mypy --strict accepts typical user code: str addresses, a non-optional peer id,
    typed stats (an unknown key is an error: the ignore above is needed and used)."""
    sample = tmp_path / "user_code.py"
    sample.write_text(TYPED_USER_CODE)
    proc = subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--warn-unused-ignores",
         "--no-incremental", "--cache-dir", str(tmp_path / "cache"), str(sample)],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_address_type_is_exported() -> None:
    assert qp2p.Address == tuple[str, int]
    assert "Address" in qp2p.__all__ and "ConnectionStats" in qp2p.__all__
    hints = typing.get_type_hints(qp2p.Endpoint.connect_to_any)
    assert str in typing.get_args(typing.get_args(hints["addrs"])[0])


@pytest.mark.asyncio
async def test_stats_keys_are_the_typed_dict(impl: str) -> None:
    """Every key stats() returns is declared (with its type) in ConnectionStats, and
    every declared key is returned: a counter added on one side only fails here."""
    async with await qp2p.Endpoint.bind(config=FAST) as a, \
            await qp2p.Endpoint.bind(config=FAST) as b:  # fmt: skip
        conn, accepted = await connected(a, b)
        await conn.send(b"hello")
        conn.send_datagram(b"dgram")
        assert await asyncio.wait_for(accepted.recv_datagram(), 5) == b"dgram"
        await accepted.recv()
        hints = typing.get_type_hints(qp2p.ConnectionStats)
        for side in (conn, accepted):
            stats = side.stats()
            assert set(stats) == set(hints), set(stats) ^ set(hints)
            for key, value in stats.items():
                expected = hints[key]
                allowed = typing.get_args(expected) or (expected,)
                assert isinstance(value, allowed), (key, value, expected)
                assert not isinstance(value, bool), key
        assert conn.stats()["messages_sent"] == 1
        assert accepted.stats()["messages_received"] == 1
        assert isinstance(conn.stats()["rtt"], float)


@pytest.mark.asyncio
async def test_require_peer_id_both_sides(impl: str) -> None:
    async with await qp2p.Endpoint.bind(config=FAST) as a, \
            await qp2p.Endpoint.bind(config=FAST) as b:  # fmt: skip
        conn, accepted = await connected(a, b)
        assert conn.require_peer_id() == conn.peer_id == b.peer_id
        assert accepted.require_peer_id() == accepted.peer_id == a.peer_id


@pytest.mark.asyncio
async def test_require_peer_id_raises_for_a_peer_without_certificate(impl: str) -> None:
    """Only a non-qp2p client can present no certificate (Trust.any() admits it)."""
    async with await qp2p.Endpoint.bind(config=FAST) as server:
        config = QuicConfiguration(is_client=True, verify_mode=ssl.CERT_NONE, alpn_protocols=None)
        host, port = server.local_addr
        async with connect(host, port, configuration=config, wait_connected=True):
            conn = await asyncio.wait_for(server.accept(), 5)
            assert conn.peer_id is None
            with pytest.raises(qp2p.PeerAuthenticationError, match="presented no certificate"):
                conn.require_peer_id()

