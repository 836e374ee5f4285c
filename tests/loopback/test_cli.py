"""The ``qp2p`` command, run for real in subprocesses (``python -m qp2p``) on loopback.

Subprocess tests run under both fast-path implementations (``QP2P_NO_EXTENSIONS``) and
both event loops (``--loop``); the node's own report of its implementation and loop is
checked, so a missing extension fails rather than silently testing the twin twice.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import signal
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import qp2p
from qp2p.cli import SHUTDOWN_REASON
from qp2p.wire import parse_address as parse_addr
from tests.support.endpoints import dead_udp_port
from tests.support.paths import CWD, pythonpath

COMBOS = [
    ("cython", "uvloop"),
    ("cython", "asyncio"),
    ("python", "uvloop"),
    ("python", "asyncio"),
]


#: The engine a child runs with each implementation: the CLI tests cover both engines
#: without doubling (the in-process suite crosses engines with implementations fully).
ENGINE_OF = {"cython": "qh3", "python": "aioquic"}


def cli_env(impl: str = "cython") -> dict[str, str]:
    """The environment for a ``python -m qp2p`` child running ``impl`` (and its engine)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = pythonpath(*filter(None, [env.get("PYTHONPATH")]))
    env.pop("QP2P_NO_EXTENSIONS", None)
    if impl == "python":
        env["QP2P_NO_EXTENSIONS"] = "1"
    env["QP2P_ENGINE"] = ENGINE_OF[impl]
    env["COLUMNS"] = "200"
    return env


def qp2p_cmd(*args: str, loop: str = "auto") -> list[str]:
    return [sys.executable, "-m", "qp2p", "--loop", loop, *args]


def run(
    *args: str,
    impl: str = "cython",
    loop: str = "auto",
    timeout: float = 60,
    stdin: str | None = None,
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        qp2p_cmd(*args, loop=loop),
        env=cli_env(impl),
        cwd=CWD,
        capture_output=True,
        text=True,
        timeout=timeout,
        input=stdin,
    )


def json_lines(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


class Node:
    """A ``qp2p --json node`` child; its stdout events are read by a thread."""

    def __init__(self, *args: str, impl: str = "cython", loop: str = "auto") -> None:
        self.proc = subprocess.Popen(
            qp2p_cmd("--json", "node", "--listen", "127.0.0.1:0", *args, loop=loop),
            env=cli_env(impl),
            cwd=CWD,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.events: queue.Queue[dict[str, Any] | None] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        self.stderr = ""
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._read_err, daemon=True).start()
        listening = self.wait_for("listening", timeout=30)
        self.addr_text: str = listening["addr"]
        self.addr = parse_addr(self.addr_text)
        self.peer_id: str = listening["peer_id"]
        self.implementation: str = listening["implementation"]
        self.loop: str = listening["loop"]

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.strip():
                self.events.put(json.loads(line))
        self.events.put(None)

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        self.stderr = self.proc.stderr.read()

    def wait_for(self, event: str, timeout: float = 10, **match: Any) -> dict[str, Any]:
        """The next stdout event named ``event`` whose fields include ``match``."""
        deadline = time.monotonic() + timeout
        for seen in self.seen:
            if seen["event"] == event and all(seen.get(k) == v for k, v in match.items()):
                self.seen.remove(seen)
                return seen
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {event} {match} from the node; stderr: {self.stderr}")
            try:
                item = self.events.get(timeout=remaining)
            except queue.Empty:
                continue
            if item is None:
                self.proc.wait(5)
                raise AssertionError(
                    f"node exited ({self.proc.returncode}) before {event}: {self.stderr}"
                )
            if item["event"] == event and all(item.get(k) == v for k, v in match.items()):
                return item
            self.seen.append(item)

    def stop(self, sig: signal.Signals = signal.SIGINT, timeout: float = 10) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def node_factory() -> Iterator[Any]:
    nodes: list[Node] = []

    def make(*args: str, impl: str = "cython", loop: str = "auto") -> Node:
        node = Node(*args, impl=impl, loop=loop)
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.kill()


# --------------------------------------------------------------------------- help


def test_help_lists_every_subcommand() -> None:
    result = run("--help")
    assert result.returncode == 0, result.stderr
    for name in ("node", "send", "bench", "identity", "ca", "--json", "--log-level"):
        assert name in result.stdout
    assert run("bogus").returncode == 2


# --------------------------------------------------------------------------- node + send


@pytest.mark.parametrize(("impl", "loop"), COMBOS)
def test_node_and_send_message_and_request(node_factory: Any, impl: str, loop: str) -> None:
    node = node_factory(impl=impl, loop=loop)
    assert (node.implementation, node.loop) == (impl, loop)

    sent = run("--json", "send", node.addr_text, "hello node", impl=impl, loop=loop)
    assert sent.returncode == 0, sent.stderr
    [event] = json_lines(sent.stdout)
    assert event["event"] == "sent" and event["peer_id"] == node.peer_id
    msg = node.wait_for("message")
    assert msg["payload"] == "hello node" and msg["size"] == len("hello node")

    # a request is answered with the same payload; the plain-text output is the reply
    reply = run("send", node.addr_text, "marco?", "--request", impl=impl, loop=loop)
    assert reply.returncode == 0, reply.stderr
    assert reply.stdout.strip() == "marco?"
    assert node.wait_for("request")["payload"] == "marco?"
    node.wait_for("disconnected", reason="qp2p send: done")

    reply = run("send", node.addr_text, "ünïcode ✓", "--request", "--json", impl=impl, loop=loop)
    assert reply.returncode == 0, reply.stderr
    [event] = json_lines(reply.stdout)
    assert event["event"] == "reply" and event["payload"] == "ünïcode ✓"
    assert event["rtt_ms"] > 0
    assert node.stop() == 0


def test_node_connect_dials_peers(node_factory: Any) -> None:
    first = node_factory()
    second = node_factory("--connect", first.addr_text)
    dialled = second.wait_for("connected", direction="dialled")
    assert dialled["peer_id"] == first.peer_id
    accepted = first.wait_for("connected", direction="accepted")
    assert accepted["peer_id"] == second.peer_id
    assert second.stop() == 0
    assert first.wait_for("disconnected")["reason"] == SHUTDOWN_REASON
    assert first.stop() == 0


@pytest.mark.parametrize("json_mode", [False, True])
def test_send_to_dead_port_fails_with_one_line(json_mode: bool) -> None:
    port = dead_udp_port()
    args = ["--json"] if json_mode else []
    started = time.monotonic()
    result = run(*args, "send", f"127.0.0.1:{port}", "anyone there?", timeout=30)
    elapsed = time.monotonic() - started
    assert result.returncode == 1
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert f"127.0.0.1:{port}" in lines[0]
    if json_mode:
        error = json.loads(lines[0])
        assert error["event"] == "error" and error["type"] == "ConnectionError"
    else:
        assert lines[0].startswith("qp2p: error: could not connect")
    # the default budget is 5 s of retries (+ interpreter start-up)
    assert elapsed < 12, elapsed


def test_send_timeout_option_bounds_the_failure() -> None:
    port = dead_udp_port()
    started = time.monotonic()
    result = run("send", f"127.0.0.1:{port}", "x", "--timeout", "1")
    assert result.returncode == 1 and len(result.stderr.splitlines()) == 1
    assert time.monotonic() - started < 8


def test_send_refused_authentication_is_one_line(node_factory: Any, tmp_path: Path) -> None:
    node = node_factory()
    wrong = qp2p.Identity.generate().peer_id
    result = run("send", node.addr_text, "hi", "--expect-peer-id", str(wrong))
    assert result.returncode == 1
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    assert "authentication failed" in line and str(wrong) in line
    assert line.startswith(f"qp2p: error: we refused {node.addr_text}: "), line  # who refused

    # the other way round: a node that pins someone else refuses the sender
    pinned = node_factory("--pin", str(wrong))
    result = run("--json", "send", pinned.addr_text, "hi")
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    error = json.loads(line)
    assert error["event"] == "error" and error["type"] == "PeerAuthenticationError"
    assert error["error"].startswith(f"peer at {pinned.addr_text} refused our certificate"), error


def test_send_bad_arguments_are_usage_errors() -> None:
    result = run("send", "no-port", "hi")
    assert result.returncode == 2
    assert "HOST:PORT" in result.stderr
    result = run("send", "127.0.0.1:1", "hi", "--expect-peer-id", "junk")
    assert result.returncode == 2


# --------------------------------------------------------------------------- SIGINT


@pytest.mark.asyncio
async def test_node_sigint_exits_zero_and_peer_sees_reason(impl: str) -> None:
    """Runs under both loops (conftest); the node child uses the same loop and impl."""
    aloop = asyncio.get_running_loop()
    loop_name = "uvloop" if type(aloop).__module__.startswith("uvloop") else "asyncio"
    node = await aloop.run_in_executor(None, lambda: Node(impl=impl, loop=loop_name))
    try:
        assert (node.implementation, node.loop) == (impl, loop_name)
        async with await qp2p.Endpoint.bind(("127.0.0.1", 0)) as ep:
            conn = await ep.connect_to(node.addr, expect_peer_id=qp2p.PeerId.from_str(node.peer_id))
            await conn.send(b"echo me")
            echoed = await asyncio.wait_for(conn.recv(), 10)
            assert echoed.payload == b"echo me"
            reply = await conn.request(b"and me", timeout=10)
            assert reply.payload == b"and me"
            await aloop.run_in_executor(None, node.wait_for, "message")

            node.proc.send_signal(signal.SIGINT)
            with pytest.raises(qp2p.ConnectionClosed) as info:
                await asyncio.wait_for(conn.recv(), 10)
            assert info.value.reason == SHUTDOWN_REASON
            code = await aloop.run_in_executor(None, node.proc.wait, 10)
            assert code == 0, node.stderr
            await aloop.run_in_executor(None, node.wait_for, "stopped")
    finally:
        node.kill()


def test_node_sigterm_exits_zero(node_factory: Any) -> None:
    node = node_factory()
    assert node.stop(signal.SIGTERM) == 0
    assert node.wait_for("stopping")["signal"] == "SIGTERM"


def test_node_human_output(tmp_path: Path) -> None:
    """Without --json the node prints its address and peer id as text."""
    proc = subprocess.Popen(
        qp2p_cmd("node", "--listen", "127.0.0.1:0"),
        env=cli_env(),
        cwd=CWD,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        first = proc.stdout.readline()
        assert first.startswith("qp2p node listening on 127.0.0.1:")
        second = proc.stdout.readline()
        assert second.startswith("peer id ")
        qp2p.PeerId.from_str(second.split()[-1])
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=10)
        assert proc.returncode == 0, err
        assert "node stopped" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------- bench


@pytest.mark.parametrize("impl", ["cython", "python"])
def test_bench_json(impl: str) -> None:
    result = run("--json", "bench", "--count", "2000", impl=impl, timeout=90)
    assert result.returncode == 0, result.stderr
    [report] = json_lines(result.stdout)
    assert report["event"] == "bench"
    for field in (
        "messages_per_s",
        "mib_per_s",
        "latency_p50_ms",
        "latency_p99_ms",
        "rtt_ms",
        "implementation",
        "loop",
    ):
        assert field in report, field
    assert report["messages"] == 2000
    assert report["bytes"] == 2000 * 1024
    assert report["messages_per_s"] > 0 and report["mib_per_s"] > 0
    assert 0 < report["latency_p50_ms"] <= report["latency_p99_ms"]
    assert report["rtt_ms"] > 0
    assert report["implementation"] == impl
    assert report["loop"] == "uvloop"


def test_bench_human_table_and_duration() -> None:
    result = run("bench", "--duration", "0.5", "--size", "100", "--loop", "asyncio")
    assert result.returncode == 0, result.stderr
    for row in ("messages/s", "MiB/s", "latency p50", "latency p99", "RTT", "asyncio"):
        assert row in result.stdout, result.stdout


def test_bench_to_running_node(node_factory: Any) -> None:
    node = node_factory()
    result = run("--json", "bench", "--count", "500", "--size", "256", "--to", node.addr_text)
    assert result.returncode == 0, result.stderr
    [report] = json_lines(result.stdout)
    assert report["messages"] == 500 and report["mode"] == f"to {node.addr_text}"
    counted = node.wait_for("bench_received")
    assert counted["messages"] == 500 and counted["bytes"] == 500 * 256
    # bench traffic is neither printed nor echoed
    assert not [e for e in node.seen if e["event"] == "message"]


# --------------------------------------------------------------------------- identity / ca


def test_identity_new_show_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "me.pem"
    created = run("--json", "identity", "new", str(path))
    assert created.returncode == 0, created.stderr
    [event] = json_lines(created.stdout)
    assert event["key"] == "p256"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert str(qp2p.Identity.load(path).peer_id) == event["peer_id"]

    shown = run("identity", "show", str(path))
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.strip() == event["peer_id"]

    again = run("identity", "new", str(path))
    assert again.returncode == 1
    assert len(again.stderr.splitlines()) == 1 and "--force" in again.stderr
    assert str(qp2p.Identity.load(path).peer_id) == event["peer_id"]  # untouched

    forced = run("--json", "identity", "new", str(path), "--force", "--ed25519")
    assert forced.returncode == 0, forced.stderr
    [event2] = json_lines(forced.stdout)
    assert event2["key"] == "ed25519" and event2["peer_id"] != event["peer_id"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    missing = run("identity", "show", str(tmp_path / "nope.pem"))
    assert missing.returncode == 1 and len(missing.stderr.splitlines()) == 1


def test_ca_new_issue_cert(tmp_path: Path) -> None:
    ca_path, peer_path = tmp_path / "ca.pem", tmp_path / "peer.pem"
    made = run("--json", "ca", "new", str(ca_path), "--name", "test-net")
    assert made.returncode == 0, made.stderr
    assert stat.S_IMODE(ca_path.stat().st_mode) == 0o600
    issued = run("--json", "ca", "issue", str(ca_path), str(peer_path))
    assert issued.returncode == 0, issued.stderr
    [event] = json_lines(issued.stdout)
    assert stat.S_IMODE(peer_path.stat().st_mode) == 0o600
    assert event["issuer"] == "CN=test-net"

    ca = qp2p.CertificateAuthority.load(ca_path)
    peer = qp2p.Identity.load(peer_path)
    assert str(peer.peer_id) == event["peer_id"]
    assert peer.chain[1] == ca.certificate
    cert = run("ca", "cert", str(ca_path))
    assert cert.returncode == 0
    assert cert.stdout.encode() == ca.certificate_pem
    assert "PRIVATE KEY" not in cert.stdout
    assert qp2p.Trust.ca(cert.stdout).check(peer.chain) == peer.peer_id


def test_ca_trust_end_to_end(node_factory: Any, tmp_path: Path) -> None:
    """A node and a sender holding CA-issued identities talk; a self-signed one is refused."""
    ca_path, crt = tmp_path / "ca.pem", tmp_path / "ca.crt"
    assert run("ca", "new", str(ca_path)).returncode == 0
    crt.write_text(run("ca", "cert", str(ca_path)).stdout)
    for name in ("a", "b"):
        assert run("ca", "issue", str(ca_path), str(tmp_path / f"{name}.pem")).returncode == 0
    node = node_factory("--identity", str(tmp_path / "a.pem"), "--trust-ca", str(crt))
    assert node.peer_id == str(qp2p.Identity.load(tmp_path / "a.pem").peer_id)

    ok = run(
        "send", node.addr_text, "member", "--request",
        "--identity", str(tmp_path / "b.pem"), "--trust-ca", str(crt),
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "member"

    stranger = run("send", node.addr_text, "outsider", "--trust-ca", str(crt), "--timeout", "3")
    assert stranger.returncode == 1
    assert len(stranger.stderr.splitlines()) == 1, stranger.stderr
    assert node.stop() == 0
    assert not [e for e in node.seen if e.get("payload") == "outsider"]


def test_plain_text_without_rich(tmp_path: Path) -> None:
    """rich is an optional extra: with it hidden, every subcommand still prints plain text."""
    blocker = tmp_path / "rich"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('rich is hidden by this test')\n")
    env = cli_env()
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), env["PYTHONPATH"]])
    result = subprocess.run(
        qp2p_cmd("bench", "--count", "200"),
        env=env,
        cwd=CWD,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("qp2p bench\n")
    assert "messages/s" in result.stdout and "implementation            cython" in result.stdout
    result = subprocess.run(
        qp2p_cmd("identity", "new", str(tmp_path / "k.pem")),
        env=env,
        cwd=CWD,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    qp2p.PeerId.from_str(result.stdout.strip())


# --------------------------------------------------------------------------- messages


def test_empty_message_is_a_usage_error() -> None:
    result = run("send", "127.0.0.1:1", "")
    assert result.returncode == 2
    assert result.stderr.startswith("usage: qp2p send")
    assert result.stderr.splitlines()[-1] == (
        "qp2p send: error: argument MESSAGE: must not be empty (give text, - for stdin or @FILE)"
    )


@pytest.mark.parametrize(
    "args",
    [
        ("--json", "send", "127.0.0.1:1", ""),
        ("send", "--json", "no-port", "hi"),
        ("--json", "bogus"),
        ("--json", "send", "127.0.0.1:1"),
    ],
)
def test_json_usage_errors_are_json(args: tuple[str, ...]) -> None:
    result = run(*args)
    assert result.returncode == 2
    assert result.stdout == ""
    [line] = result.stderr.splitlines()
    error = json.loads(line)
    assert error["event"] == "error" and error["type"] == "usage"
    assert error["error"] and error["usage"].startswith("usage: qp2p")


@pytest.mark.parametrize(("impl", "loop"), COMBOS)
def test_send_reads_its_payload_from_stdin_or_a_file(
    node_factory: Any, tmp_path: Path, impl: str, loop: str
) -> None:
    node = node_factory(impl=impl, loop=loop)
    reply = run("send", node.addr_text, "-", "--request", stdin="line one\nline two\n",
                impl=impl, loop=loop)  # fmt: skip
    assert reply.returncode == 0, reply.stderr
    assert reply.stdout == "line one\nline two\n\n"  # the reply, then print's newline
    assert node.wait_for("request")["payload"] == "line one\nline two\n"

    blob = bytes(range(256)) * 40
    path = tmp_path / "blob.bin"
    path.write_bytes(blob)
    sent = run("--json", "send", node.addr_text, f"@{path}", impl=impl, loop=loop)
    assert sent.returncode == 0, sent.stderr
    assert json_lines(sent.stdout)[0]["size"] == len(blob)
    import base64

    got = node.wait_for("message")
    assert base64.b64decode(got["payload_b64"]) == blob

    literal = run("send", node.addr_text, "@@not a file", impl=impl, loop=loop)
    assert literal.returncode == 0, literal.stderr
    assert node.wait_for("message")["payload"] == "@not a file"
    assert node.stop() == 0


def test_send_payload_file_problems_are_one_line(tmp_path: Path) -> None:
    missing = run("send", "127.0.0.1:1", f"@{tmp_path / 'nope.bin'}")
    assert missing.returncode == 1
    assert missing.stderr.splitlines() == [
        f"qp2p: error: cannot read {tmp_path / 'nope.bin'}: No such file or directory"
    ]
    empty = run("send", "127.0.0.1:1", "-", stdin="")
    assert empty.returncode == 1
    assert empty.stderr.splitlines() == ["qp2p: error: nothing to send: stdin was empty"]


def test_dial_failures_say_could_not_connect_once_with_the_real_time() -> None:
    port = dead_udp_port()
    started = time.monotonic()
    result = run("send", f"127.0.0.1:{port}", "x", "--timeout", "0.5")
    waited = time.monotonic() - started
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert line.count("could not connect") == 1, line
    match = re.search(r"after (\d+) attempts? in (\d+(?:\.\d+)?)s", line)
    assert match, line
    reported = float(match.group(2))
    assert 0.45 <= reported <= waited, (reported, waited)  # what was spent, not a budget
    bench = run("bench", "--to", f"127.0.0.1:{port}", "--count", "10", timeout=60)
    assert bench.returncode == 1
    [line] = bench.stderr.splitlines()
    assert line.startswith(f"qp2p: error: could not connect to 127.0.0.1:{port} after")
    assert line.count("could not connect") == 1, line


@pytest.mark.parametrize("impl", ["cython", "python"])
def test_version_names_fast_path_engine_and_python(impl: str) -> None:
    result = run("--version", impl=impl)
    assert result.returncode == 0, result.stderr
    [line] = result.stdout.splitlines()
    assert re.fullmatch(
        rf"qp2p {re.escape(qp2p.__version__)} \(fast path: {impl}, engine: "
        rf"{ENGINE_OF[impl]} \d+\.\d+\S*, Python {sys.version_info[0]}\."
        rf"{sys.version_info[1]}\.\S+\)",
        line,
    ), line


def test_ca_issue_refuses_a_file_that_is_not_a_ca(tmp_path: Path) -> None:
    me = tmp_path / "me.pem"
    assert run("identity", "new", str(me)).returncode == 0
    out = tmp_path / "out.pem"
    result = run("ca", "issue", str(me), str(out))
    assert result.returncode == 1
    [line] = result.stderr.splitlines()
    assert "not a certificate authority" in line and "leaf" in line, line
    assert not out.exists()


def test_trust_ca_refuses_a_leaf_certificate(tmp_path: Path) -> None:
    me = tmp_path / "me.pem"
    assert run("identity", "new", str(me)).returncode == 0
    for args in (("send", "127.0.0.1:1", "hi"), ("node",)):
        result = run(*args, "--trust-ca", str(me))
        assert result.returncode == 1, result
        [line] = result.stderr.splitlines()
        assert line.startswith(f"qp2p: error: cannot load CA certificate {me}: "), line
        assert "is a leaf" in line, line
