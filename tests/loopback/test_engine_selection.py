"""Choosing the QUIC engine: Config(engine=...), QP2P_ENGINE, qp2p.engines(), Endpoint.engine,
and a clear ValueError naming the extra when the engine asked for is not installed."""

from __future__ import annotations

import subprocess
import sys

import pytest

import qp2p
from qp2p import engine
from tests.support.paths import ROOT


def test_engines_lists_both_preferred_first() -> None:
    assert qp2p.engines() == ["qh3", "aioquic"]


def test_config_rejects_unknown_engine() -> None:
    with pytest.raises(ValueError, match="engine"):
        qp2p.Config(engine="quiche")
    assert qp2p.Config().engine == "auto"


def test_auto_follows_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("QP2P_ENGINE", raising=False)
    assert engine.resolve("auto").NAME == "qh3"  # preferred when installed
    monkeypatch.setenv("QP2P_ENGINE", "aioquic")
    assert engine.resolve("auto").NAME == "aioquic"
    assert engine.resolve("qh3").NAME == "qh3"  # an explicit choice wins
    monkeypatch.setenv("QP2P_ENGINE", "bogus")
    with pytest.raises(ValueError, match="unknown engine 'bogus'"):
        engine.resolve("auto")


@pytest.mark.asyncio
@pytest.mark.parametrize("name", ["aioquic", "qh3"])
async def test_endpoint_names_its_engine(name: str) -> None:
    async with await qp2p.Endpoint.bind(config=qp2p.Config(engine=name)) as ep:
        assert ep.engine == name


def test_missing_engine_raises_at_bind_naming_the_extra() -> None:
    """In a child whose import of qh3 fails: auto falls back to aioquic, engine="qh3"
    raises ValueError at bind naming qp2p[qh3], and engines() lists aioquic only."""
    code = """
import asyncio, builtins, sys
real = builtins.__import__
def fake(name, *a, **k):
    if name == "qh3" or name.startswith("qh3."):
        raise ImportError("No module named 'qh3'")
    return real(name, *a, **k)
builtins.__import__ = fake
import qp2p
assert qp2p.engines() == ["aioquic"], qp2p.engines()
async def main():
    async with await qp2p.Endpoint.bind(config=qp2p.Config()) as ep:
        assert ep.engine == "aioquic"
    try:
        await qp2p.Endpoint.bind(config=qp2p.Config(engine="qh3"))
    except ValueError as exc:
        print("ERROR:", exc)
asyncio.run(main())
"""
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "ERROR:" in out.stdout and "qp2p[qh3]" in out.stdout, out.stdout


def test_version_names_the_engine() -> None:
    out = subprocess.run([sys.executable, "-m", "qp2p", "--version"], capture_output=True,
                         text=True, timeout=60, cwd=ROOT, env={"PYTHONPATH": str(ROOT),
                                                               "QP2P_ENGINE": "aioquic"})
    assert "engine: aioquic " in out.stdout, out.stdout + out.stderr
