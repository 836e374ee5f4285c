"""The ``qp2p`` command: run a node, send a message, benchmark a link, manage identities.

Usage (``qp2p --help`` and ``qp2p SUBCOMMAND --help`` say more)::

    qp2p node --listen 127.0.0.1:5000            # prints its address and peer id, echoes
    qp2p send 127.0.0.1:5000 hello [--request]   # one message (or a request: prints the reply)
    qp2p send 127.0.0.1:5000 - | @FILE           # the payload from stdin or a file
    qp2p bench [--size N] [--count N] [--duration S] [--to ADDR]
    qp2p identity new key.pem | identity show key.pem
    qp2p ca new ca.pem | ca issue ca.pem peer.pem | ca cert ca.pem

The parser is built on :mod:`argparse`: the standard library is enough for a handful of
subcommands, and a library's command should not pull a CLI framework into every install.
Output goes through `rich <https://rich.readthedocs.io>`_ (the optional ``cli`` extra)
when it is installed and falls back to plain text otherwise. ``--json`` makes every
subcommand print one JSON object per line on stdout (errors and logs as JSON lines on
stderr). Failures print exactly one line on stderr and exit non-zero, never a traceback.

Exit codes: 0 success, 1 failure (unreachable peer, refused authentication, timeout, bad
file), 2 bad usage, 130 interrupted. uvloop runs the event loop when it is installed
(``--loop asyncio`` opts out).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import json
import logging
import math
import os
import signal
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from typing import IO, Any, NoReturn, TypeVar

from . import __version__, _speedups, wire
from .config import Config, RetryConfig
from .connection import Connection, Message
from .endpoint import Endpoint
from .errors import (
    ConnectionClosed,
    ConnectionError,
    MessageRejected,
    PeerAuthenticationError,
    Qp2pError,
)
from .identity import CertificateAuthority, Identity, PeerId, Trust
from .retry import format_seconds
from .wire import Address

__all__ = [
    "BENCH_HEADER",
    "SHUTDOWN_REASON",
    "CliError",
    "Output",
    "Server",
    "build_parser",
    "main",
]

logger = logging.getLogger("qp2p.cli")

T = TypeVar("T")

#: Header that marks ``qp2p bench`` traffic: a node counts such messages without
#: printing or echoing them (requests carrying it are still answered, for RTT probes).
BENCH_HEADER = b"qp2p-bench"
#: The close reason peers of a ``qp2p node`` see when it stops on SIGINT/SIGTERM.
SHUTDOWN_REASON = "qp2p node shutting down"
#: How much of a payload a human-readable line shows.
PREVIEW_CHARS = 200

try:  # rich is the optional ``cli`` extra
    from rich import box as _rich_box
    from rich.console import Console as _Console
    from rich.logging import RichHandler as _RichHandler
    from rich.progress import (
        BarColumn as _BarColumn,
    )
    from rich.progress import (
        Progress as _Progress,
    )
    from rich.progress import (
        TaskProgressColumn as _TaskProgressColumn,
    )
    from rich.progress import (
        TextColumn as _TextColumn,
    )
    from rich.progress import (
        TimeElapsedColumn as _TimeElapsedColumn,
    )
    from rich.table import Table as _Table
    from rich.text import Text as _Text

    HAVE_RICH = True
except ImportError:  # pragma: no cover - exercised by the plain-text fallback
    HAVE_RICH = False


class CliError(Exception):
    """A failure the command reports as one line on stderr (exit code 1).

    ``kind`` names the failure in ``--json`` output (``"type"``).
    """

    def __init__(self, message: str, kind: str = "error") -> None:
        super().__init__(message)
        self.kind = kind


class _UsageError(Exception):
    """argparse found bad usage; ``main`` reports it (as text or JSON) and exits 2."""

    def __init__(self, parser: argparse.ArgumentParser, message: str) -> None:
        super().__init__(message)
        self.parser = parser


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose usage errors ``main`` reports, so ``--json`` gets JSON."""

    def error(self, message: str) -> NoReturn:
        raise _UsageError(self, message)


# --------------------------------------------------------------------------- output


class Output:
    """Where every subcommand writes: rich or plain text for humans, JSON lines for tools.

    ``emit(event, text, **fields)`` writes ``text`` for a human, or the object
    ``{"event": event, **fields}`` as one JSON line with ``--json``.
    """

    def __init__(self, json_mode: bool, *, plain: bool = False) -> None:
        self.json = json_mode
        self.rich = HAVE_RICH and not plain and not json_mode
        self._console: Any = None
        self._err_console: Any = None
        if self.rich:
            self._console = _Console(soft_wrap=True, highlight=False)
            self._err_console = _Console(stderr=True, soft_wrap=True, highlight=False)

    @property
    def console(self) -> Any:
        """The rich console on stdout (``None`` without rich)."""
        return self._console

    @property
    def err_console(self) -> Any:
        """The rich console on stderr (``None`` without rich)."""
        return self._err_console

    def emit(self, event: str, text: str, style: str | None = None, **fields: Any) -> None:
        """One record: a line of ``text`` (in ``style``), or one JSON object."""
        if self.json:
            self.json_line(sys.stdout, {"event": event, **fields})
        elif self.rich:
            self._console.print(_Text(text, style=style or ""))
        else:
            print(text, flush=True)

    @staticmethod
    def json_line(stream: IO[str], obj: dict[str, Any]) -> None:
        """Write ``obj`` as one JSON line and flush."""
        stream.write(json.dumps(obj, default=str, separators=(",", ":")) + "\n")
        stream.flush()

    def error(self, message: str, kind: str = "error") -> None:
        """The one line a failing command prints on stderr."""
        message = " ".join(message.split())
        if self.json:
            self.json_line(sys.stderr, {"event": "error", "type": kind, "error": message})
        else:
            sys.stderr.write(f"qp2p: error: {message}\n")
            sys.stderr.flush()


class _Silent(Output):
    """An output that drops everything (the in-process far end of ``bench``)."""

    def __init__(self) -> None:
        super().__init__(json_mode=False, plain=True)

    def emit(self, event: str, text: str, style: str | None = None, **fields: Any) -> None:
        """Drop the record."""


class _JsonLogFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        obj = {
            "event": "log",
            "time": round(record.created, 6),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        return json.dumps(obj, default=str, separators=(",", ":"))


def _setup_logging(level_name: str, out: Output) -> None:
    level = getattr(logging, level_name.upper())
    handler: logging.Handler
    if out.json:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_JsonLogFormatter())
    elif out.rich:
        handler = _RichHandler(console=out.err_console, show_path=False, markup=False)
        handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


# --------------------------------------------------------------------------- helpers


def _addr_arg(text: str) -> Address:
    try:
        return wire.parse_address(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _peer_id_arg(text: str) -> PeerId:
    try:
        return PeerId.from_str(text.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number: {text!r}")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer: {text!r}")
    return value


def _short(peer_id: PeerId | None) -> str:
    return peer_id.short() if peer_id is not None else "anonymous"


def _text_fields(name: str, data: bytes) -> dict[str, Any]:
    """A byte string for JSON: text when it is UTF-8, else base64 under ``NAME_b64``."""
    try:
        return {name: data.decode("utf-8")}
    except UnicodeDecodeError:
        import base64

        return {f"{name}_b64": base64.b64encode(data).decode("ascii")}


def _preview(data: bytes) -> str:
    text = data.decode("utf-8", errors="replace")
    if len(text) > PREVIEW_CHARS:
        text = text[:PREVIEW_CHARS] + f"… ({len(data)} bytes)"
    return text.replace("\n", "\\n").replace("\r", "\\r")


def _bind_host_for(target: Address) -> str:
    """The wildcard (or loopback) address of the family that reaches ``target``."""
    try:
        ip = ipaddress.ip_address(target[0])
    except ValueError:
        return "0.0.0.0"
    if ip.is_loopback:
        return "::1" if ip.version == 6 else "127.0.0.1"
    return "::" if ip.version == 6 else "0.0.0.0"


def _load_file(load: Callable[[str], T], path: str, what: str) -> T:
    """``load(path)``, its failures as one-line ``CliError``s naming ``what`` it loads."""
    try:
        return load(path)
    except FileNotFoundError:
        raise CliError(f"{what} file {path} does not exist") from None
    except (OSError, ValueError) as exc:
        raise CliError(f"cannot load {what} {path}: {exc}") from None


def _load_identity(path: str | None) -> Identity | None:
    return None if path is None else _load_file(Identity.load, path, "identity")


def _make_trust(pins: Sequence[PeerId] | None, ca_path: str | None) -> Trust | None:
    if pins and ca_path:
        raise CliError("use either --pin or --trust-ca, not both")
    if pins:
        return Trust.pinned(pins)
    if ca_path:
        try:
            with open(ca_path, "rb") as f:
                pem = f.read()
            return Trust.ca(pem)
        except (OSError, ValueError) as exc:
            raise CliError(f"cannot load CA certificate {ca_path}: {exc}") from None
    return None


def _key_kind(identity: Identity) -> str:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519

    key = identity.private_key
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return "ed25519"
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return "p256" if key.curve.name == "secp256r1" else key.curve.name
    return type(key).__name__


def _loop_name() -> str:
    loop = asyncio.get_running_loop()
    return "uvloop" if type(loop).__module__.startswith("uvloop") else "asyncio"


def _run(coro: Coroutine[Any, Any, T], loop_choice: str) -> T:
    """Run ``coro`` on uvloop when installed (unless ``--loop asyncio``)."""
    if loop_choice != "asyncio":
        try:
            import uvloop
        except ImportError:
            if loop_choice == "uvloop":
                coro.close()
                raise CliError("--loop uvloop: uvloop is not installed") from None
        else:
            result: T = uvloop.run(coro)
            return result
    return asyncio.run(coro)


def _one_line(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return " ".join(text.split())


def _dial_failure(target: str, exc: BaseException, waited: float | None = None) -> CliError:
    """The one line for a failed dial: which side refused whom, or why nobody answered."""
    if isinstance(exc, PeerAuthenticationError):
        if exc.by_peer:  # "peer at X refused our certificate: ..."
            return CliError(_one_line(exc), "PeerAuthenticationError")
        return CliError(
            f"we refused {target}: authentication failed: {_one_line(exc)}",
            "PeerAuthenticationError",
        )
    if isinstance(exc, ConnectionError):  # already says "could not connect to X after ..."
        return CliError(_one_line(exc), "ConnectionError")
    if isinstance(exc, asyncio.TimeoutError) and waited is not None:
        return CliError(
            f"could not connect to {target} in {format_seconds(waited)}", "TimeoutError"
        )
    return CliError(f"could not connect to {target}: {_one_line(exc)}", type(exc).__name__)


def _read_payload(spec: str) -> bytes:
    """``send``'s MESSAGE: text, ``-`` for stdin, ``@PATH`` for a file (``@@`` for a
    literal leading ``@``)."""
    if spec == "-":
        data = sys.stdin.buffer.read()
        if not data:
            raise CliError("nothing to send: stdin was empty")
        return data
    if spec.startswith("@@"):
        return spec[1:].encode("utf-8")
    if spec.startswith("@"):
        path = spec[1:]
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as exc:
            raise CliError(f"cannot read {path}: {exc.strerror or exc}") from None
        if not data:
            raise CliError(f"nothing to send: {path} is empty")
        return data
    return spec.encode("utf-8")


def _message_arg(text: str) -> str:
    if not text:  # bad usage (exit 2), not a failure
        raise argparse.ArgumentTypeError("must not be empty (give text, - for stdin or @FILE)")
    return text


def _version_text() -> str:
    """``--version``: qp2p's version, the fast path, the QUIC engine and Python."""
    import importlib.metadata
    import platform

    from .engine import resolve

    try:  # what Config(engine="auto") picks here (QP2P_ENGINE, else the preferred one)
        engine = resolve("auto").NAME
        try:
            engine_version = importlib.metadata.version(engine)
        except importlib.metadata.PackageNotFoundError:  # pragma: no cover - importable
            engine_version = "?"
        engine_text = f"{engine} {engine_version}"
    except ValueError as exc:
        engine_text = f"none ({exc})"
    return (
        f"qp2p {__version__} (fast path: {_speedups.implementation}, "
        f"engine: {engine_text}, Python {platform.python_version()})"
    )


# --------------------------------------------------------------------------- serving


class Server:
    """What a ``qp2p node`` does with its connections (also the far end of ``bench``).

    Prints each message and echoes it (a request is answered with the same payload, a
    message sent back, a datagram returned); ``qp2p bench`` traffic (header
    :data:`BENCH_HEADER`) is counted silently. ``quiet`` prints only connections.
    """

    #: Echo sends in flight per node; past this, new echoes wait (backpressure).
    MAX_ECHOES = 1024

    def __init__(
        self, endpoint: Endpoint, out: Output, *, quiet: bool = False, silent: bool = False
    ) -> None:
        self.endpoint = endpoint
        self.out = out if not silent else _Silent()
        self.quiet = quiet or silent
        self._tasks: set[asyncio.Task[Any]] = set()
        self._echo_slots = asyncio.Semaphore(self.MAX_ECHOES)
        self.connections: set[Connection] = set()

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` as a task this server owns and cancels on :meth:`stop`."""
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and not isinstance(exc, (ConnectionClosed, MessageRejected)):
            logger.warning("task failed: %r", exc)

    async def accept_loop(self) -> None:
        """Serve every incoming connection until the endpoint closes."""
        async for conn in self.endpoint.incoming():
            self.spawn(self.serve(conn, "accepted"))

    async def dial(self, addr: Address) -> None:
        """Connect to ``addr`` (``--connect``) and serve that connection."""
        try:
            conn = await self.endpoint.connect_to(addr)
        except (Qp2pError, OSError, asyncio.TimeoutError) as exc:
            failure = _dial_failure(wire.addr_text(addr), exc)
            self.out.emit(
                "connect_failed",
                f"✗ {failure}",
                style="red",
                addr=wire.addr_text(addr),
                error=str(failure),
                type=failure.kind,
            )
            return
        await self.serve(conn, "dialled")

    async def serve(self, conn: Connection, how: str) -> None:
        """Print and echo everything ``conn`` brings until it closes."""
        out = self.out
        remote = wire.addr_text(conn.remote_addr)
        peer = str(conn.peer_id) if conn.peer_id is not None else None
        self.connections.add(conn)
        out.emit(
            "connected",
            f"+ {how} {remote}  peer {peer or 'anonymous'}",
            style="green",
            addr=remote,
            peer_id=peer,
            direction=how,
        )
        datagrams = self.spawn(self._datagrams(conn, remote))
        bench_messages = bench_bytes = 0
        try:
            async for msg in conn:
                if msg.header == BENCH_HEADER:
                    if msg.is_request:
                        self._echo(msg.reply(msg.payload, header=msg.header))
                    else:
                        bench_messages += 1
                        bench_bytes += len(msg.payload)
                    continue
                self._show(msg, remote, peer)
                if msg.is_request:
                    self._echo(msg.reply(msg.payload, header=msg.header, dst=msg.dst))
                else:
                    self._echo(conn.send(msg.payload, header=msg.header, dst=msg.dst))
        finally:
            self.connections.discard(conn)
            datagrams.cancel()
        reason = ""
        try:
            await conn.recv()
        except ConnectionClosed as exc:
            reason = exc.reason
        if bench_messages:
            out.emit(
                "bench_received",
                f"  bench traffic from {remote}: {bench_messages} messages, "
                f"{bench_bytes / 2**20:.1f} MiB",
                addr=remote,
                messages=bench_messages,
                bytes=bench_bytes,
            )
        out.emit(
            "disconnected",
            f"- {remote} closed: {reason or 'no reason given'}",
            style="yellow",
            addr=remote,
            peer_id=peer,
            reason=reason,
        )

    def _show(self, msg: Message, remote: str, peer: str | None) -> None:
        if self.quiet:
            return
        kind = "request" if msg.is_request else "message"
        extra = ""
        if msg.header:
            extra += f" header={_preview(msg.header)!r}"
        if msg.dst:
            extra += f" dst={_preview(msg.dst)!r}"
        self.out.emit(
            kind,
            f"← {kind} from {remote}{extra}: {_preview(msg.payload)}",
            style="cyan" if msg.is_request else None,
            addr=remote,
            peer_id=peer,
            size=len(msg.payload),
            **_text_fields("payload", msg.payload),
            **_text_fields("header", msg.header),
            **_text_fields("dst", msg.dst),
        )

    async def _datagrams(self, conn: Connection, remote: str) -> None:
        while True:
            try:
                data = await conn.recv_datagram()
            except ConnectionClosed:
                return
            if not self.quiet:
                self.out.emit(
                    "datagram",
                    f"← datagram from {remote}: {_preview(data)}",
                    addr=remote,
                    size=len(data),
                    **_text_fields("payload", data),
                )
            with contextlib.suppress(ConnectionClosed, ValueError, Qp2pError):
                conn.send_datagram(data)

    def _echo(self, coro: Coroutine[Any, Any, None]) -> None:
        async def guarded() -> None:
            async with self._echo_slots:
                with contextlib.suppress(ConnectionClosed, MessageRejected):
                    await coro

        self.spawn(guarded())

    async def stop(self, reason: str) -> None:
        """Close every connection with ``reason``, then cancel what is left."""
        for conn in list(self.endpoint.connections()):
            await conn.close(reason)
        await asyncio.sleep(0)  # let the serving tasks see the close and report it
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=2)


# --------------------------------------------------------------------------- node


async def _node(args: argparse.Namespace, out: Output) -> int:
    identity = _load_identity(args.identity)
    trust = _make_trust(args.pin, args.trust_ca)
    config = Config(keep_alive_interval=args.keep_alive, idle_timeout=args.idle_timeout)
    try:
        endpoint = await Endpoint.bind(
            args.listen, config=config, identity=identity, trust=trust, rendezvous=args.rendezvous
        )
    except OSError as exc:
        where = wire.addr_text(args.listen)
        raise CliError(f"cannot listen on {where}: {exc.strerror or exc}") from None
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    received: list[str] = []

    def on_signal(name: str) -> None:
        if received:  # a second Ctrl-C: stop waiting for a graceful close
            raise KeyboardInterrupt
        received.append(name)
        stop.set()

    installed: list[signal.Signals] = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, on_signal, sig.name)
            installed.append(sig)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - not on POSIX
            pass
    server = Server(endpoint, out, quiet=args.quiet)
    addr = wire.addr_text(endpoint.local_addr)
    out.emit(
        "listening",
        f"qp2p node listening on {addr}",
        style="bold",
        addr=addr,
        peer_id=str(endpoint.peer_id),
        implementation=endpoint.implementation,
        engine=endpoint.engine,
        loop=_loop_name(),
        rendezvous=args.rendezvous,
    )
    if not out.json:
        out.emit("info", f"peer id {endpoint.peer_id}")
        out.emit(
            "info",
            f"engine {endpoint.engine} · implementation {endpoint.implementation} · "
            f"loop {_loop_name()} · "
            f"trust {trust or Trust.any()!r}"
            f"{' · rendezvous' if args.rendezvous else ''} · Ctrl-C to stop",
            style="dim",
        )
    try:
        server.spawn(server.accept_loop())
        for target in args.connect or ():
            server.spawn(server.dial(target))
        await stop.wait()
        name = received[0]
        out.emit("stopping", f"{name}: closing connections", style="bold", signal=name)
        await server.stop(SHUTDOWN_REASON)
    finally:
        await endpoint.close()
        for sig in installed:
            loop.remove_signal_handler(sig)
    out.emit("stopped", "node stopped", style="bold")
    return 0


# --------------------------------------------------------------------------- send


async def _send(args: argparse.Namespace, out: Output) -> int:
    payload = _read_payload(args.message)
    identity = _load_identity(args.identity)
    trust = _make_trust(args.pin, args.trust_ca)
    budget: float = args.timeout
    config = Config(
        handshake_timeout=min(2.0, budget),
        retry=RetryConfig(initial_interval=0.2, max_interval=1.0, max_elapsed_time=budget),
        idle_timeout=max(10.0, budget),
    )
    bind = args.bind or (_bind_host_for(args.addr), 0)
    try:
        endpoint = await Endpoint.bind(
            bind, config=config, identity=identity, trust=trust, accept_incoming=False
        )
    except OSError as exc:
        raise CliError(f"cannot bind {wire.addr_text(bind)}: {exc.strerror or exc}") from None
    target = wire.addr_text(args.addr)
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        try:
            conn = await asyncio.wait_for(
                endpoint.connect_to(args.addr, expect_peer_id=args.expect_peer_id), budget + 1
            )
        except (Qp2pError, OSError, asyncio.TimeoutError) as exc:
            raise _dial_failure(target, exc, loop.time() - started) from None
        peer = str(conn.peer_id) if conn.peer_id is not None else None
        remaining = max(0.1, budget - (loop.time() - started))
        sent_at = time.perf_counter()
        try:
            if args.request:
                reply = await conn.request(payload, timeout=remaining)
                elapsed = time.perf_counter() - sent_at
                out.emit(
                    "reply",
                    reply.payload.decode("utf-8", errors="replace"),
                    addr=target,
                    peer_id=peer,
                    rtt_ms=round(elapsed * 1000, 3),
                    size=len(reply.payload),
                    **_text_fields("payload", reply.payload),
                )
            else:
                await asyncio.wait_for(conn.send(payload), remaining)
                elapsed = time.perf_counter() - sent_at
                out.emit(
                    "sent",
                    f"sent {len(payload)} bytes to {target} (peer {_short(conn.peer_id)}), "
                    f"acknowledged in {elapsed * 1000:.1f} ms",
                    addr=target,
                    peer_id=peer,
                    size=len(payload),
                    ack_ms=round(elapsed * 1000, 3),
                )
        except asyncio.TimeoutError:  # RequestTimeout too
            what = "reply" if args.request else "acknowledgement"
            waited = format_seconds(loop.time() - started)
            raise CliError(
                f"no {what} from {target} in {waited} (--timeout {budget:g}s, connecting "
                "included)",
                "TimeoutError",
            ) from None
        except ConnectionClosed as exc:
            raise CliError(f"{target} closed the connection: {exc}", "ConnectionClosed") from None
        except MessageRejected as exc:
            raise CliError(f"{target} rejected the message: {exc}", "MessageRejected") from None
        await conn.close("qp2p send: done")
    finally:
        await endpoint.close()
    return 0


# --------------------------------------------------------------------------- bench


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of already sorted values (``nan`` if there are none)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


class _BenchProgress:
    """The live progress bar (rich) or periodic lines on stderr (plain); silent in JSON."""

    def __init__(self, out: Output, total: float, by_time: bool) -> None:
        self.out = out
        self.by_time = by_time
        self.total = total
        self._progress: Any = None
        self._task: Any = None
        self._last_plain = 0.0
        if out.rich:
            self._progress = _Progress(
                _TextColumn("[bold]bench"),
                _BarColumn(),
                _TaskProgressColumn(),
                _TextColumn("{task.fields[messages]:>10,} msgs"),
                _TextColumn("{task.fields[rate]:>9,.0f} msg/s"),
                _TextColumn("{task.fields[mibs]:>8.2f} MiB/s"),
                _TimeElapsedColumn(),
                console=out.err_console,
                refresh_per_second=10,
            )

    def __enter__(self) -> _BenchProgress:
        if self._progress is not None:
            self._progress.start()
            self._task = self._progress.add_task(
                "bench", total=self.total, messages=0, rate=0.0, mibs=0.0
            )
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()

    def update(self, messages: int, nbytes: int, elapsed: float) -> None:
        rate = messages / elapsed if elapsed > 0 else 0.0
        mibs = nbytes / 2**20 / elapsed if elapsed > 0 else 0.0
        if self._progress is not None:
            done = min(elapsed, self.total) if self.by_time else messages
            self._progress.update(
                self._task, completed=done, messages=messages, rate=rate, mibs=mibs
            )
        elif not self.out.json and elapsed - self._last_plain >= 1.0:
            self._last_plain = elapsed
            sys.stderr.write(f"bench: {messages} messages, {rate:,.0f} msg/s, {mibs:.2f} MiB/s\n")
            sys.stderr.flush()


async def _bench(args: argparse.Namespace, out: Output) -> int:
    size: int = args.size
    duration: float | None = args.duration
    count: int | None = args.count
    if count is None and duration is None:
        count = 10_000
    window: int = args.window
    payload = os.urandom(size)
    defaults = Config()
    max_message = max(defaults.max_message_size, size + 64 + len(BENCH_HEADER))
    buffered = max(defaults.max_buffered_bytes, max_message + 4 * 2**20)
    config = Config(
        idle_timeout=30.0,
        handshake_timeout=3.0,
        retry=RetryConfig(initial_interval=0.1, max_interval=1.0, max_elapsed_time=5.0),
        max_message_size=max_message,
        max_buffered_bytes=buffered,
        max_endpoint_buffered_bytes=max(defaults.max_endpoint_buffered_bytes, buffered),
    )
    endpoints: list[Endpoint] = []
    server: Server | None = None
    try:
        if args.to is None:
            far = await Endpoint.bind(("127.0.0.1", 0), config=config)
            endpoints.append(far)
            server = Server(far, out, silent=True)
            server.spawn(server.accept_loop())
            target: Address = far.local_addr
            mode = "loopback"
        else:
            target = args.to
            mode = f"to {wire.addr_text(target)}"
        near = await Endpoint.bind(
            (_bind_host_for(target), 0), config=config, accept_incoming=False
        )
        endpoints.append(near)
        try:
            conn = await near.connect_to(target)
        except (Qp2pError, OSError) as exc:
            raise _dial_failure(wire.addr_text(target), exc) from None

        # Idle round trips first: the link's RTT without our own load on it.
        probes: list[float] = []
        for _ in range(20):
            t0 = time.perf_counter()
            await conn.request(b"ping", header=BENCH_HEADER, timeout=5)
            probes.append(time.perf_counter() - t0)
        probes.sort()
        quic_rtt = conn.stats().get("rtt")

        latencies: list[float] = []
        state = {"claimed": 0, "done": 0, "bytes": 0}
        started = time.perf_counter()
        deadline = started + duration if duration is not None else math.inf

        async def worker() -> None:
            while True:
                if count is not None and state["claimed"] >= count:
                    return
                if time.perf_counter() >= deadline:
                    return
                state["claimed"] += 1
                t0 = time.perf_counter()
                await conn.send(payload, header=BENCH_HEADER)
                latencies.append(time.perf_counter() - t0)
                state["done"] += 1
                state["bytes"] += size

        if duration is not None:
            progress = _BenchProgress(out, duration, by_time=True)
        else:
            assert count is not None
            progress = _BenchProgress(out, count, by_time=False)
        with progress:
            workers = [asyncio.ensure_future(worker()) for _ in range(window)]
            try:
                pending: set[asyncio.Future[None]] = set(workers)
                while pending:
                    done, pending = await asyncio.wait(pending, timeout=0.1)
                    for task in done:
                        task.result()  # a failed send ends the bench with its error
                    progress.update(state["done"], state["bytes"], time.perf_counter() - started)
            except (ConnectionClosed, MessageRejected) as exc:
                raise CliError(f"bench connection failed: {_one_line(exc)}") from None
            finally:
                for task in workers:
                    task.cancel()
            elapsed = time.perf_counter() - started
            progress.update(state["done"], state["bytes"], elapsed)
        await conn.close("qp2p bench: done")
    finally:
        if server is not None:
            await server.stop("qp2p bench: done")
        for ep in endpoints:
            await ep.close()

    latencies.sort()
    messages = state["done"]
    result: dict[str, Any] = {
        "mode": mode,
        "size": size,
        "messages": messages,
        "bytes": state["bytes"],
        "seconds": round(elapsed, 6),
        "messages_per_s": round(messages / elapsed, 1) if elapsed > 0 else None,
        "mib_per_s": round(state["bytes"] / 2**20 / elapsed, 3) if elapsed > 0 else None,
        "latency_p50_ms": round(_percentile(latencies, 50) * 1000, 3),
        "latency_p99_ms": round(_percentile(latencies, 99) * 1000, 3),
        "rtt_ms": round(_percentile(probes, 50) * 1000, 3),
        "quic_rtt_ms": round(quic_rtt * 1000, 3) if quic_rtt is not None else None,
        "window": window,
        "implementation": near.implementation,
        "engine": near.engine,
        "loop": _loop_name(),
    }
    if out.json:
        out.emit("bench", "", **result)
    else:
        _bench_table(out, result)
    return 0


def _bench_table(out: Output, r: dict[str, Any]) -> None:
    rows = [
        ("target", r["mode"]),
        ("messages", f"{r['messages']:,} x {r['size']:,} B (window {r['window']})"),
        ("time", f"{r['seconds']:.2f} s"),
        ("messages/s", f"{r['messages_per_s']:,.0f}"),
        ("MiB/s", f"{r['mib_per_s']:,.2f}"),
        ("latency p50 (send → ack)", f"{r['latency_p50_ms']:.2f} ms"),
        ("latency p99 (send → ack)", f"{r['latency_p99_ms']:.2f} ms"),
        ("RTT (idle request/reply)", f"{r['rtt_ms']:.2f} ms"),
        ("engine", r["engine"]),
        ("implementation", r["implementation"]),
        ("loop", r["loop"]),
    ]
    if out.rich:
        table = _Table(title="qp2p bench", box=_rich_box.SIMPLE_HEAVY, title_justify="left")
        table.add_column("metric", style="bold")
        table.add_column("value", justify="right")
        for name, value in rows:
            table.add_row(name, value)
        out.console.print(table)
    else:
        width = max(len(name) for name, _ in rows)
        print("qp2p bench")
        for name, value in rows:
            print(f"  {name:<{width}}  {value}")
        sys.stdout.flush()


# --------------------------------------------------------------------------- identity / ca


def _refuse_overwrite(path: str, force: bool) -> None:
    if os.path.exists(path) and not force:
        raise CliError(f"{path} already exists (use --force to overwrite it)")


def _write_identity(identity: Identity, path: str, out: Output, note: str, **extra: Any) -> int:
    """Save a new identity, report it, and say where it went."""
    try:
        identity.save(path)
    except OSError as exc:
        raise CliError(f"cannot write {path}: {exc.strerror or exc}") from None
    out.emit(
        "identity",
        f"{identity.peer_id}",
        path=path,
        peer_id=str(identity.peer_id),
        key=_key_kind(identity),
        created=True,
        **extra,
    )
    if not out.json:
        _note(out, note)
    return 0


def _identity_new(args: argparse.Namespace, out: Output) -> int:
    _refuse_overwrite(args.path, args.force)
    identity = Identity.generate("ed25519" if args.ed25519 else "p256")
    return _write_identity(
        identity, args.path, out, f"wrote {args.path} ({_key_kind(identity)} key, mode 0600)"
    )


def _identity_show(args: argparse.Namespace, out: Output) -> int:
    identity = _load_identity(args.path)
    assert identity is not None
    issuer = identity.certificate.issuer.rfc4514_string()
    out.emit(
        "identity",
        f"{identity.peer_id}",
        path=args.path,
        peer_id=str(identity.peer_id),
        key=_key_kind(identity),
        issuer=issuer,
        chain_length=len(identity.chain),
        not_after=identity.certificate.not_valid_after_utc.isoformat(),
        created=False,
    )
    return 0


def _load_ca(path: str) -> CertificateAuthority:
    return _load_file(CertificateAuthority.load, path, "CA")


def _ca_new(args: argparse.Namespace, out: Output) -> int:
    _refuse_overwrite(args.path, args.force)
    try:
        ca = CertificateAuthority.generate(args.name)
        ca.save(args.path)
    except ValueError as exc:
        raise CliError(str(exc)) from None
    except OSError as exc:
        raise CliError(f"cannot write {args.path}: {exc.strerror or exc}") from None
    out.emit(
        "ca",
        f"created CA {args.name!r} in {args.path} (mode 0600)",
        path=args.path,
        name=args.name,
        created=True,
    )
    return 0


def _ca_issue(args: argparse.Namespace, out: Output) -> int:
    ca = _load_ca(args.ca_path)
    _refuse_overwrite(args.out_path, args.force)
    identity = ca.issue("ed25519" if args.ed25519 else "p256")
    issuer = ca.certificate.subject.rfc4514_string()
    return _write_identity(
        identity, args.out_path, out, f"wrote {args.out_path}, issued by {issuer}", issuer=issuer
    )


def _ca_cert(args: argparse.Namespace, out: Output) -> int:
    ca = _load_ca(args.ca_path)
    pem = ca.certificate_pem.decode("ascii")
    if out.json:
        out.emit("ca_certificate", "", path=args.ca_path, pem=pem)
    else:
        sys.stdout.write(pem)
        sys.stdout.flush()
    return 0


def _note(out: Output, text: str) -> None:
    """A human-only remark on stderr, so stdout stays the one useful line."""
    if out.rich:
        out.err_console.print(_Text(text, style="dim"))
    else:
        sys.stderr.write(text + "\n")


# --------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    """The ``qp2p`` argument parser (exposed for documentation and tests)."""
    parser = _Parser(
        prog="qp2p",
        description="Peer-to-peer messaging over QUIC: run a node, send messages, "
        "benchmark a link, manage identities and private CAs.",
        epilog="--json (before or after the subcommand) makes every subcommand print one JSON "
        "object per line. Exit codes: 0 ok, 1 failure, 2 usage, 130 interrupted.",
    )
    parser.add_argument(
        "--version",
        action="version",
        version=_version_text(),
        help="print qp2p's version, fast path, QUIC engine and Python, and exit",
    )
    parser.add_argument(
        "--log-level",
        default=None,
        choices=["debug", "info", "warning", "error", "critical"],
        help="log level of the library's logs on stderr (default: warning for node and "
        "bench, error for the others, whose failure is already the one error line)",
    )
    parser.add_argument(
        "--json", action="store_true", help="machine-readable output: one JSON object per line"
    )
    parser.add_argument(
        "--plain", action="store_true", help="plain text output even when rich is installed"
    )
    parser.add_argument(
        "--loop",
        default="auto",
        choices=["auto", "uvloop", "asyncio"],
        help="event loop (default: uvloop when installed)",
    )
    # The same global options are accepted after the subcommand too (``qp2p send --json``);
    # SUPPRESS keeps a subcommand from resetting a value given before it.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--log-level",
        default=argparse.SUPPRESS,
        choices=["debug", "info", "warning", "error", "critical"],
        help=argparse.SUPPRESS,
    )
    common.add_argument(
        "--json", action="store_true", default=argparse.SUPPRESS, help="one JSON object per line"
    )
    common.add_argument(
        "--plain", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS
    )
    common.add_argument(
        "--loop",
        default=argparse.SUPPRESS,
        choices=["auto", "uvloop", "asyncio"],
        help=argparse.SUPPRESS,
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def leaf(group: Any, name: str, **kw: Any) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = group.add_parser(name, parents=[common], **kw)
        return parser

    def trust_options(p: argparse.ArgumentParser) -> None:
        p.add_argument("--identity", metavar="PATH", help="identity file (default: a fresh one)")
        p.add_argument(
            "--pin",
            metavar="PEER_ID",
            type=_peer_id_arg,
            action="append",
            help="only talk to this peer id (repeatable): Trust.pinned",
        )
        p.add_argument(
            "--trust-ca",
            metavar="PEM",
            help="only talk to peers whose certificate a CA in this PEM file issued: Trust.ca",
        )

    # the subcommands below are alike in shape only: argparse declarations of their options
    node = leaf(
        sub,
        "node",
        help="run a node: print and echo every message until Ctrl-C",
        description="Listen for peers; print every message, echo it back and answer every "
        "request with the same payload. SIGINT/SIGTERM close every connection (peers see "
        f"the reason {SHUTDOWN_REASON!r}) and exit 0. Messages with the header "
        f"{BENCH_HEADER.decode()!r} (qp2p bench traffic) are counted, not printed or echoed.",
    )
    node.add_argument(
        "--listen",
        metavar="HOST:PORT",
        type=_addr_arg,
        default=("127.0.0.1", 0),
        help="address to bind (default 127.0.0.1:0, any free port)",
    )
    node.add_argument(
        "--connect",
        metavar="ADDR",
        type=_addr_arg,
        nargs="+",
        action="extend",
        help="also dial these peers at start",
    )
    trust_options(node)
    node.add_argument(
        "--rendezvous",
        action="store_true",
        help="introduce connected peers to each other for hole punching (connect_via)",
    )
    node.add_argument("--quiet", "-q", action="store_true", help="print connections only")
    node.add_argument(
        "--idle-timeout",
        type=_positive_float,
        default=Config().idle_timeout,
        metavar="S",
        help="close connections idle this long (default %(default)s s)",
    )
    node.add_argument(
        "--keep-alive",
        type=_positive_float,
        default=None,
        metavar="S",
        help="ping idle connections this often (default: off)",
    )
    node.set_defaults(handler=_node, needs_loop=True)

    send = leaf(
        sub,
        "send",
        help="send one message (or a request, printing the reply)",
        description="Send MESSAGE (UTF-8 text, - for stdin, @FILE for a file) to the peer "
        "at ADDR and wait for its "
        "acknowledgement; with --request, print the reply. Fails with one line on stderr "
        "and exit code 1 when the peer is unreachable, refuses authentication or times out.",
    )
    send.add_argument("addr", metavar="ADDR", type=_addr_arg, help="HOST:PORT of the peer")
    send.add_argument(
        "message",
        metavar="MESSAGE",
        type=_message_arg,
        help="the payload: text (UTF-8, non-empty), - to read it from stdin, @FILE to send "
        "a file's bytes (@@text for text starting with @)",
    )
    send.add_argument("--request", action="store_true", help="send a request, print the reply")
    send.add_argument(
        "--expect-peer-id",
        metavar="PEER_ID",
        type=_peer_id_arg,
        default=None,
        help="refuse the peer unless it has this peer id",
    )
    send.add_argument(
        "--timeout",
        metavar="S",
        type=_positive_float,
        default=5.0,
        help="give up after this many seconds, retries included (default %(default)s)",
    )
    send.add_argument(
        "--bind", metavar="HOST:PORT", type=_addr_arg, default=None, help="local address"
    )
    trust_options(send)
    send.set_defaults(handler=_send, needs_loop=True)

    bench = leaf(
        sub,
        "bench",
        help="measure message rate, throughput, latency and RTT",
        description="Send messages over one connection, WINDOW at a time, and report "
        "messages/s, MiB/s, p50/p99 latency (send until the peer acknowledged the "
        "message), RTT (median of 20 idle request/reply round trips), implementation and "
        "loop. Without --to, both endpoints run in this process on loopback; with --to, "
        "it dials a running `qp2p node`.",
    )
    bench.add_argument(
        "--size", type=_positive_int, default=1024, metavar="N", help="payload bytes (1024)"
    )
    bench.add_argument(
        "--count",
        type=_positive_int,
        default=None,
        metavar="N",
        help="messages to send (default 10000 unless --duration is given)",
    )
    bench.add_argument(
        "--duration", type=_positive_float, default=None, metavar="S", help="run this long"
    )
    bench.add_argument(
        "--window", type=_positive_int, default=32, metavar="N", help="sends in flight (32)"
    )
    bench.add_argument(
        "--to", type=_addr_arg, default=None, metavar="ADDR", help="dial a running qp2p node"
    )
    bench.set_defaults(handler=_bench, needs_loop=True)

    identity = sub.add_parser("identity", help="create or inspect an identity file")
    isub = identity.add_subparsers(dest="identity_command", metavar="ACTION", required=True)
    inew = leaf(
        isub,
        "new",
        help="generate a key pair and self-signed certificate (file mode 0600)",
        description="Write a new identity (private key + certificate, PEM, mode 0600) to "
        "PATH and print its peer id.",
    )
    inew.add_argument("path", metavar="PATH")
    inew.add_argument("--ed25519", action="store_true", help="Ed25519 instead of ECDSA P-256")
    inew.add_argument("--force", action="store_true", help="overwrite an existing file")
    inew.set_defaults(handler=_identity_new, needs_loop=False)
    ishow = leaf(isub, "show", help="print the peer id of an identity file")
    ishow.add_argument("path", metavar="PATH")
    ishow.set_defaults(handler=_identity_show, needs_loop=False)

    ca = sub.add_parser("ca", help="private certificate authority for a closed network")
    csub = ca.add_subparsers(dest="ca_command", metavar="ACTION", required=True)
    cnew = leaf(csub, "new", help="create a CA (key + certificate, mode 0600)")
    cnew.add_argument("path", metavar="PATH")
    cnew.add_argument("--name", default="qp2p-ca", help="the CA's name (default %(default)s)")
    cnew.add_argument("--force", action="store_true", help="overwrite an existing file")
    cnew.set_defaults(handler=_ca_new, needs_loop=False)
    cissue = leaf(
        csub,
        "issue",
        help="issue an identity signed by the CA",
        description="Write a new identity whose certificate CA_PATH signs to OUT_PATH "
        "(mode 0600) and print its peer id. Peers run with --trust-ca accept it.",
    )
    cissue.add_argument("ca_path", metavar="CA_PATH")
    cissue.add_argument("out_path", metavar="OUT_PATH")
    cissue.add_argument("--ed25519", action="store_true", help="Ed25519 instead of ECDSA P-256")
    cissue.add_argument("--force", action="store_true", help="overwrite an existing file")
    cissue.set_defaults(handler=_ca_issue, needs_loop=False)
    ccert = leaf(
        csub, "cert", help="print the CA certificate (PEM, no key) for --trust-ca / Trust.ca"
    )
    ccert.add_argument("ca_path", metavar="CA_PATH")
    ccert.set_defaults(handler=_ca_cert, needs_loop=False)
    return parser


def _json_requested(argv: Sequence[str]) -> bool:
    """Whether ``--json`` was given (before a ``--``), even if the rest does not parse."""
    options = argv[: list(argv).index("--")] if "--" in argv else argv
    return "--json" in options


def _usage_failure(exc: _UsageError, json_mode: bool) -> None:
    """Report bad usage as argparse does (usage + one line), or as one JSON line."""
    message = " ".join(str(exc).split())
    if json_mode:
        Output.json_line(
            sys.stderr,
            {
                "event": "error",
                "type": "usage",
                "error": message,
                "usage": " ".join(exc.parser.format_usage().split()),
            },
        )
    else:
        exc.parser.print_usage(sys.stderr)
        sys.stderr.write(f"{exc.parser.prog}: error: {message}\n")
        sys.stderr.flush()


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``qp2p`` command with ``argv`` (default ``sys.argv[1:]``); the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except _UsageError as exc:
        _usage_failure(exc, _json_requested(argv))
        return 2
    out = Output(args.json, plain=args.plain)
    level = args.log_level or ("warning" if args.command in ("node", "bench") else "error")
    _setup_logging(level, out)
    handler: Callable[[argparse.Namespace, Output], Any] = args.handler
    try:
        if args.needs_loop:
            code: int = _run(handler(args, out), args.loop)
        else:
            code = handler(args, out)
    except CliError as exc:
        out.error(str(exc), kind=exc.kind)
        return 1
    except KeyboardInterrupt:
        out.error("interrupted", kind="interrupted")
        return 130
    except Qp2pError as exc:
        out.error(_one_line(exc), kind=type(exc).__name__)
        return 1
    except (OSError, asyncio.TimeoutError) as exc:
        out.error(_one_line(exc), kind=type(exc).__name__)
        return 1
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
