"""Every program in ``examples/`` runs (as a subprocess, on both fast-path implementations),
exits 0 within seconds and prints what it should; README.md's examples are those programs
verbatim, and its quick-start example runs too."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import qp2p
from tests.support.paths import CWD, ROOT, pythonpath

EXAMPLES = ROOT / "examples"
README = ROOT / "README.md"
#: Each example must finish well within this (they take about a second).
BUDGET = 30.0

EXPECTED: dict[str, list[str]] = {
    "p2p_node.py": [
        r"marco node at \('127\.0\.0\.1', \d+\), peer id [0-9a-f]{12}",
        r"(?s)(polo node heard 'marco' from 127\.0\.0\.1:\d+\nmarco node heard 'polo'\n.*){3}",
        r"done \({impl} fast path\)",
    ],
    "client_server.py": [
        r"request b'hello' -> reply b'HELLO' \(header b'upper'\)",
        r"request b'world' -> reply b'WORLD'",
        r"10 concurrent requests -> \['N0', 'N1', .*'N9'\]",
        r"rtt \d+\.\d+ ms",
    ],
    "demo.py": [
        r"qp2p demo: three peers on loopback \({impl} fast path, (uvloop|asyncio) loop\)",
        r"(?m)^  alice 127\.0\.0\.1:\d+ +peer id [0-9a-f]{64}$",
        r"bob received \"hi bob, it's alice\" from alice",
        r"carol received 'hello carol, bob here' from bob",
        r"alice received 'hey alice, carol says hi' from carol",
        r"carol answers alice's request '6 \* 7' with '42'",
        r"alice got the reply '42' from carol",
        r"alice received datagram 'position 12,34' from bob",
        r"the connection from step 1\? True",
        r"\d+ connect_to calls so far, 3 QUIC connections in all",
        r"bob saw the connection from alice close: 'alice is going offline'",
        r"done in \d+\.\d+ s",
    ],
    "pinned_peers.py": [
        r"server got b\"hello, it's me\" from pinned peer [0-9a-f]{64}",
        r"stranger refused by the server: .*authentication failed",
        r"friend refused the stranger: peer [0-9a-f]{64} is not pinned",
    ],
    "nat_traversal.py": [
        r"rendezvous at \('127\.0\.0\.1', \d+\)",
        r"bob \([0-9a-f]{12}\) is connected to the rendezvous",
        r"alice reached bob directly at \('127\.0\.0\.1', \d+\): peer id [0-9a-f]{64}",
        r"bob got b'hello through the hole' from [0-9a-f]{64}",
        r"direct path \(no relay\): True",
    ],
    "datagram_loop.py": [
        r"datagrams up to 1168 bytes on this path",
        # loopback loses nothing in practice, but the example must not pretend it cannot
        r"sent 50 datagrams, (?:[1-9]|[1-4]\d|50) came back; newest: tick \d+ at \(",
    ],
    "private_ca.py": [
        r"bob asked alice [0-9a-f]{64}: b'yes, my certificate is from my-net too'",
        r"self-signed outsider refused: .*authentication failed",
    ],
}


def _env(impl: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = pythonpath(*filter(None, [env.get("PYTHONPATH")]))
    env.pop("QP2P_NO_EXTENSIONS", None)
    if impl == "python":
        env["QP2P_NO_EXTENSIONS"] = "1"
    env["QP2P_ENGINE"] = {"cython": "qh3", "python": "aioquic"}[impl]  # both engines covered
    return env


def _run_script(path: Path, impl: str, cwd: Path = CWD) -> tuple[str, float]:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(path)],
        env=_env(impl),
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=BUDGET * 2,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, f"{path.name} exited {result.returncode}:\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    return result.stdout, elapsed


#: Examples that run until signalled: each has its own test below.
SERVERS = ["server.py"]


def test_every_example_is_covered() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted([*EXPECTED, *SERVERS])


@pytest.mark.parametrize("impl", ["cython", "python"])
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(name: str, impl: str) -> None:
    out, elapsed = _run_script(EXAMPLES / name, impl)
    for pattern in EXPECTED[name]:
        assert re.search(pattern.replace("{impl}", impl), out), f"{pattern!r} not in:\n{out}"
    assert elapsed < BUDGET, f"{name} took {elapsed:.1f}s"


# --------------------------------------------------------------------------- README


def _readme_blocks() -> list[tuple[str | None, str, str]]:
    """(marker, language, code) for every fenced block; marker from ``<!-- example: X -->``."""
    text = README.read_text()
    pattern = re.compile(
        r"(?:<!-- example: (?P<marker>[^ ]+) -->\n)?```(?P<lang>[a-z]*)\n(?P<code>.*?)^```$",
        re.DOTALL | re.MULTILINE,
    )
    return [(m["marker"], m["lang"], m["code"]) for m in pattern.finditer(text)]


def test_readme_opens_with_the_two_commands() -> None:
    _, lang, code = _readme_blocks()[0]
    assert (lang, code) == ("sh", "make demo\nmake test\n")


def test_readme_examples_are_the_example_files() -> None:
    shown = {marker: code for marker, _, code in _readme_blocks() if marker and marker != "run"}
    assert set(shown) == {"examples/pinned_peers.py", "examples/private_ca.py"}
    for path, code in shown.items():
        assert code == (ROOT / path).read_text(), f"README's copy of {path} is out of date"


@pytest.mark.parametrize("impl", ["cython", "python"])
def test_readme_quick_example_runs(impl: str, tmp_path: Path) -> None:
    [code] = [code for marker, _, code in _readme_blocks() if marker == "run"]
    assert 10 <= len(code.strip().splitlines()) <= 25
    script = tmp_path / "quick.py"
    script.write_text(code)
    out, _ = _run_script(script, impl, cwd=tmp_path)
    assert re.search(r"^b'hello bob' from [0-9a-f]{64}\nb'4'$", out.strip()), out


# --------------------------------------------------------------------------- server.py


async def _talk_to_server(proc: subprocess.Popen[str]) -> str:
    """Read the server's address, ask it something, signal it, see the graceful close."""
    assert proc.stdout is not None
    first = await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), BUDGET)
    match = re.match(r"listening on (127\.0\.0\.1:\d+), peer id ([0-9a-f]{64})$", first.strip())
    assert match, first
    async with await qp2p.Endpoint.bind() as client:
        conn = await client.connect_to(match[1], expect_peer_id=match[2])
        reply = await conn.request(b"are you there?", timeout=BUDGET)
        assert reply.payload == b"ARE YOU THERE?"
        proc.send_signal(signal.SIGTERM)  # the connection is still open: the server closes it
        with pytest.raises(qp2p.ConnectionClosed) as closed:
            await asyncio.wait_for(conn.recv(), BUDGET)
    return str(closed.value.reason)


@pytest.mark.parametrize("impl", ["cython", "python"])
def test_server_example_serves_until_signalled_then_closes_gracefully(impl: str) -> None:
    proc = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "server.py"), "--listen", "127.0.0.1:0"],
        env=_env(impl), cwd=CWD, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        reason = asyncio.run(_talk_to_server(proc))
        out, err = proc.communicate(timeout=BUDGET)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "server shutting down" in reason, reason
    assert proc.returncode == 0, err
    assert "Traceback" not in err, err
    assert "signal received: closing connections" in out
    assert "stopped after serving 1 connection(s)" in out, out
    assert re.search(r"server: connection from \('127\.0\.0\.1', \d+\)", err), err
