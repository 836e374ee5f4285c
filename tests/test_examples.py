"""Every program in ``examples/`` runs (as a subprocess, on both fast-path implementations),
exits 0 within seconds and prints what it should; README.md's examples are those programs
verbatim, and its quick-start example runs too."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
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
    "private_ca.py": [
        r"bob asked alice [0-9a-f]{64}: b'yes, my certificate is from my-net too'",
        r"self-signed outsider refused: .*authentication failed",
    ],
}


def _env(impl: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.pop("QP2P_NO_EXTENSIONS", None)
    if impl == "python":
        env["QP2P_NO_EXTENSIONS"] = "1"
    env["QP2P_ENGINE"] = {"cython": "qh3", "python": "aioquic"}[impl]  # both engines covered
    return env


def _run_script(path: Path, impl: str, cwd: Path = ROOT) -> tuple[str, float]:
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


def test_every_example_is_covered() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


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
