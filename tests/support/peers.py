"""Drive ``tests/support/peer_proc.py``: a qp2p peer in its own process (in a network
namespace when given a ``netlab.Host``), for tests that kill, restart or namespace a peer."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import qp2p
from tests.support.paths import CWD, PEER_PROC, pythonpath


class PeerProcess:
    """One peer process: bound at ``host_addr:port`` (port 0: any), ready when constructed.

    ``flags`` are peer_proc.py's (``--rendezvous``, ``--relay``, ``--port-mapping``, ...);
    ``env`` replaces the child's environment (default: ours, with ``PYTHONPATH`` naming
    the qp2p under test); ``netns`` is a ``netlab.Host`` to run in."""

    def __init__(self, host_addr: str = "127.0.0.1", port: int = 0, idle: float = 30.0,
                 *flags: str, netns: Any = None, env: dict[str, str] | None = None,
                 stderr: int | None = None) -> None:
        argv = [sys.executable, str(PEER_PROC), host_addr, str(port), str(idle), *flags]
        kw: dict[str, Any] = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr,
                                  text=True, cwd=CWD,
                                  env=env or {**os.environ, "PYTHONPATH": pythonpath()})
        self.proc: subprocess.Popen[str] = (
            netns.popen(*argv, **kw) if netns is not None else subprocess.Popen(argv, **kw))
        line = self._line().split()
        assert line and line[0] == "READY", line
        self.addr = (line[1], int(line[2]))
        self.port = self.addr[1]
        self.peer_id = qp2p.PeerId.from_str(line[3])

    def _line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline()

    def ask(self, command: str, answer: str) -> list[str]:
        """Send one stdin ``command``; the words of its reply line after ``answer``."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        words = self._line().split()
        assert words and words[0] == answer, words
        return words[1:]

    def user_messages(self) -> int:
        """How many user messages the peer has received."""
        return int(self.ask("count", "COUNT")[0])

    def relayed_bytes(self) -> int:
        """What the peer forwarded as a relay."""
        return int(self.ask("relayed", "RELAYED")[0])

    def public_addr(self) -> tuple[str, int] | None:
        """The peer's ``public_addr``."""
        words = self.ask("public", "PUBLIC")
        return None if words[0] == "none" else (words[0], int(words[1]))

    def kill(self) -> None:
        """Kill the process (no goodbye) and reap it."""
        self.proc.kill()
        self.proc.wait()

    def close(self) -> None:
        """Close stdin: the peer closes its endpoint and exits, with status 0."""
        assert self.proc.stdin is not None
        if not self.proc.stdin.closed:
            self.proc.stdin.close()
        try:
            assert self.proc.wait(15) == 0
        finally:
            if self.proc.poll() is None:
                self.kill()
