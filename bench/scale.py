"""Scale: one qp2p endpoint holding N concurrent connections from N client endpoints.

    python bench/scale.py                       # 1,000 clients in 4 processes, 20 s of load
    python bench/scale.py --clients 300 --seconds 6 --procs 2
    python bench/scale.py --impl python --loop asyncio --json
    python bench/scale.py --tracemalloc         # also the server's Python heap per connection

Processes: this harness; one *server* (a qp2p ``Endpoint`` on 127.0.0.1 that accepts every
connection, reads every message and answers requests); ``--procs`` *client* processes, each
with its share of the N client endpoints. Every client endpoint is its own
``Endpoint.bind()`` (own UDP socket, own identity) on its own loopback address
(127.x.y.z: Linux routes all of 127.0.0.0/8 to ``lo``), so the server sees N source IPs
and no per-source-IP connection limit applies. Processes talk over pipes: JSON commands on
the child's stdin, JSON lines (marked ``SCALE``) on its stdout.

Phases: server up (RSS before any connection) -> one warm-up probe -> all clients dial
(handshake time and rate) -> N connections idle (RSS, optional tracemalloc) -> for each
message size, every client connection loops ``await conn.send(payload)`` for the phase
(server msg/s and MiB/s, RSS, CPU) while the harness dials the server afresh every
``--probe-interval`` seconds from a new endpoint (``connect_to`` + one request/reply: the
accept loop's responsiveness) -> senders stop, every message sent must have arrived.

Every child dies with the harness (``PR_SET_PDEATHSIG``) and exits when its stdin closes;
the harness kills what is left in any case. See bench/README.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import ctypes
import gc
import json
import os
import resource
import signal
import statistics
import sys
import time
import tracemalloc
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:  # run from a checkout: import this tree's qp2p
    sys.path.insert(0, REPO)

HOST = "127.0.0.1"
MiB = 2**20
MARK = "SCALE "  # prefix of a child's protocol lines (anything else on stdout is ignored)
CLK_TCK = os.sysconf("SC_CLK_TCK")
PR_SET_PDEATHSIG = 1


def client_host(i: int) -> str:
    """Client ``i``'s own loopback address: 127.10.1.1, 127.10.1.2, ... (never 127.0.0.1,
    which the harness's probes use)."""
    return f"127.{10 + i // 62_500}.{i // 250 % 250 + 1}.{i % 250 + 1}"


def make_config(max_connections: int = 10_000) -> Any:
    import qp2p

    return qp2p.Config(
        idle_timeout=600.0,  # idle connections must outlive the run
        handshake_timeout=10.0,
        max_connections=max_connections,
        retry=qp2p.RetryConfig(initial_interval=0.2, max_interval=2.0, max_elapsed_time=60.0),
    )


def emit(event: str, **fields: Any) -> None:
    """One protocol line to the harness."""
    sys.stdout.write(MARK + json.dumps({"event": event, **fields}) + "\n")
    sys.stdout.flush()


def die_with_parent(parent: int) -> None:
    """A child must never outlive the harness, however the harness ends."""
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def ensure_fds(needed: int) -> None:
    """Each client endpoint is its own UDP socket (one file descriptor): raise the soft
    limit to the hard one if ``needed`` (plus some slack) does not fit, else fail clearly.
    The server needs one socket whatever the number of connections."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = needed + 64
    if want <= soft:
        return
    if hard != resource.RLIM_INFINITY and want > hard:
        raise SystemExit(f"{needed} endpoints need {want} file descriptors, the hard limit is "
                         f"{hard}: use more --procs or raise it (ulimit -Hn)")
    resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


async def stdin_commands() -> asyncio.StreamReader:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return reader


def check_impl(want: str) -> None:
    import qp2p

    if qp2p.implementation != want:
        hint = ""
        if want == "cython":
            hint = (" (the compiled extension is not built or failed to import: run "
                    "`.venv/bin/python setup.py -q build_ext --inplace`)")
        raise RuntimeError(f"wanted the {want} fast path, got {qp2p.implementation}{hint}")


def run_loop(loop_name: str, coro: Any) -> Any:
    if loop_name == "uvloop":
        import uvloop

        return uvloop.run(coro)
    return asyncio.run(coro)


def freeze_heap() -> int:
    """``gc.freeze()``: what exists now (thousands of connections' objects) is left out of
    every later collection. Without it each full collection walks all of them (hundreds
    of ms at 10,000 connections, several times a minute under load). Returns the number
    of objects the collector tracked."""
    gc.collect()
    tracked = len(gc.get_objects())
    gc.freeze()
    return tracked


# ---------------------------------------------------------------------- server process


async def server_main(args: argparse.Namespace) -> None:
    """Accept everything, read everything, answer requests; report on ``status``."""
    import qp2p

    check_impl(args.impl)
    if args.tracemalloc:
        tracemalloc.start()
    commands = await stdin_commands()
    ep = await qp2p.Endpoint.bind((HOST, 0), config=make_config(args.max_connections))
    counts = {"accepted": 0, "messages": 0, "bytes": 0, "requests": 0, "serve_errors": 0}
    # time the server spends in the cyclic garbage collector (it walks every tracked object
    # of a full collection: thousands of connections make that long)
    gc_time = {"gc_s": 0.0, "gc_full": 0, "gc_full_max_s": 0.0}
    gc_start = [0.0]

    def on_gc(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            gc_start[0] = time.perf_counter()
            return
        spent = time.perf_counter() - gc_start[0]
        gc_time["gc_s"] += spent
        if info["generation"] == 2:
            gc_time["gc_full"] += 1
            gc_time["gc_full_max_s"] = max(gc_time["gc_full_max_s"], spent)

    gc.callbacks.append(on_gc)
    tasks: set[asyncio.Task[None]] = set()

    async def serve(conn: qp2p.Connection) -> None:
        try:
            async for msg in conn:
                if msg.is_request:
                    counts["requests"] += 1
                    await msg.reply(msg.payload)
                else:
                    counts["messages"] += 1
                    counts["bytes"] += len(msg.payload)
        except qp2p.ConnectionClosed:
            pass
        except Exception as exc:  # reported, never silent
            counts["serve_errors"] += 1
            sys.stderr.write(f"scale server: {type(exc).__name__}: {exc}\n")

    async def accept_all() -> None:
        async for conn in ep.incoming():
            counts["accepted"] += 1
            task = asyncio.ensure_future(serve(conn))
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    acceptor = asyncio.ensure_future(accept_all())
    profiler: cProfile.Profile | None = None
    emit("ready", port=ep.local_addr[1], pid=os.getpid(), impl=qp2p.implementation)
    try:
        while True:
            line = await commands.readline()
            if not line:
                break
            cmd = json.loads(line)
            if cmd["cmd"] == "status":
                status: dict[str, Any] = dict(counts, **gc_time, t=time.monotonic(),
                                              open=len(ep.connections()),
                                              endpoint=dict(ep.stats_counters))
                if cmd.get("heap") and tracemalloc.is_tracing():
                    gc.collect()
                    status["traced"] = tracemalloc.get_traced_memory()[0]
                emit("status", **status)
            elif cmd["cmd"] == "profile":  # --profile: cProfile the server per load phase
                if cmd["path"] is None:
                    profiler = cProfile.Profile()
                    profiler.enable()
                elif profiler is not None:
                    profiler.disable()
                    profiler.dump_stats(cmd["path"])
                    profiler = None
                emit("profile")
            elif cmd["cmd"] == "freeze":
                emit("frozen", tracked=freeze_heap())
            elif cmd["cmd"] == "quit":
                break
    finally:
        acceptor.cancel()
        for task in list(tasks):
            task.cancel()
        await ep.close()
    emit("bye")


# ---------------------------------------------------------------------- client process


async def clients_main(args: argparse.Namespace) -> None:
    """``--count`` client endpoints; ``connect``, ``load``/``stop`` and ``quit`` on command."""
    import qp2p

    check_impl(args.impl)
    ensure_fds(args.count)
    commands = await stdin_commands()
    host, port = args.server.rsplit(":", 1)
    server = (host, int(port))
    cfg = make_config()
    endpoints: list[qp2p.Endpoint] = []
    conns: list[qp2p.Connection] = []
    try:
        for i in range(args.first, args.first + args.count):
            endpoints.append(await qp2p.Endpoint.bind((client_host(i), 0), config=cfg,
                                                      accept_incoming=False))
        emit("ready", pid=os.getpid(), bound=len(endpoints))
        stop = asyncio.Event()
        senders: list[asyncio.Task[None]] = []
        sent = [0]
        send_errors: list[str] = []

        async def sender(conn: qp2p.Connection, payload: bytes) -> None:
            while not stop.is_set():
                try:
                    await conn.send(payload)
                except qp2p.Qp2pError as exc:
                    send_errors.append(f"{type(exc).__name__}: {exc}")
                    return
                sent[0] += 1

        while True:
            line = await commands.readline()
            if not line:
                break
            cmd = json.loads(line)
            if cmd["cmd"] == "connect":
                conns, times, errors = await dial_all(endpoints, server, args.dial_concurrency)
                emit("connected", ok=len(conns), failed=len(errors), errors=errors[:5],
                     times=times)
            elif cmd["cmd"] == "load":
                payload = os.urandom(cmd["size"])
                stop.clear()
                sent[0] = 0
                send_errors.clear()
                senders = [asyncio.ensure_future(sender(c, payload)) for c in conns]
                emit("loading")
            elif cmd["cmd"] == "stop":
                stop.set()
                pending: set[asyncio.Task[None]] = set()
                if senders:
                    _, pending = await asyncio.wait(senders, timeout=cmd.get("timeout", 60))
                stuck = [conns[senders.index(t)] for t in pending]
                stuck_stats = [dict(c.stats(), local=c.local_addr[0]) for c in stuck[:3]]
                for task in pending:  # stuck: cancelled, and counted as such
                    task.cancel()
                await asyncio.gather(*senders, return_exceptions=True)
                emit("stopped", sent=sent[0], unfinished=len(pending),
                     errors=len(send_errors), first_errors=send_errors[:5],
                     stuck=stuck_stats)
            elif cmd["cmd"] == "freeze":
                emit("frozen", tracked=freeze_heap())
            elif cmd["cmd"] == "quit":
                break
    finally:
        await asyncio.gather(*(ep.close() for ep in endpoints), return_exceptions=True)
    emit("bye")


async def dial_all(
    endpoints: list[Any], server: tuple[str, int], in_flight: int
) -> tuple[list[Any], list[float], list[str]]:
    """Each endpoint dials ``server``, ``in_flight`` at a time: (connections, seconds per
    successful dial, errors)."""
    sem = asyncio.Semaphore(in_flight)
    conns: list[Any] = []
    times: list[float] = []
    errors: list[str] = []

    async def dial(ep: Any) -> None:
        async with sem:
            t0 = time.perf_counter()
            try:
                conns.append(await ep.connect_to(server))
            except Exception as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                return
            times.append(time.perf_counter() - t0)

    await asyncio.gather(*(dial(ep) for ep in endpoints))
    return conns, times, errors


# ---------------------------------------------------------------------- harness


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of ``pid`` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def udp_socket_state(port: int) -> tuple[int, int]:
    """(bytes waiting in the receive queue, datagrams dropped so far) of the IPv4 UDP
    socket bound to 127.0.0.1:``port``, from /proc/net/udp."""
    local = f"0100007F:{port:04X}"
    with open("/proc/net/udp") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 12 and fields[1] == local:
                return int(fields[4].split(":")[1], 16), int(fields[12])
    return 0, 0


def runqueue_wait_seconds(pid: int) -> float:
    """Time ``pid``'s main thread spent runnable but waiting for a CPU (the machine busy
    with other work), from /proc/<pid>/schedstat."""
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[1]) / 1e9


class CpuMeter:
    """CPU % of a set of processes between ``start()`` and ``stop()`` (100 = one core),
    and the % of that time they waited for a CPU (``wait_pct``, after ``stop()``)."""

    def __init__(self, pids: list[int]) -> None:
        self.pids = pids
        self.t0 = self.c0 = self.w0 = 0.0
        self.wait_pct = 0.0

    def _cpu(self) -> tuple[float, float]:
        return (sum(cpu_seconds(pid) for pid in self.pids),
                sum(runqueue_wait_seconds(pid) for pid in self.pids))

    def start(self) -> CpuMeter:
        self.t0 = time.monotonic()
        self.c0, self.w0 = self._cpu()
        return self

    def stop(self) -> float:
        cpu, wait = self._cpu()
        wall = time.monotonic() - self.t0
        self.wait_pct = 100.0 * (wait - self.w0) / wall
        return 100.0 * (cpu - self.c0) / wall


class Child:
    """A child process: JSON commands in, ``SCALE`` JSON lines out."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process) -> None:
        self.name = name
        self.proc = proc
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.lock = asyncio.Lock()
        self.reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        while True:
            line = await self.proc.stdout.readline()
            if not line:
                break
            text = line.decode(errors="replace").rstrip("\n")
            if text.startswith(MARK):
                await self.events.put(json.loads(text[len(MARK):]))
        await self.events.put({"event": "eof"})

    async def send(self, **cmd: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(cmd) + "\n").encode())
        await self.proc.stdin.drain()

    async def expect(self, event: str, timeout: float) -> dict[str, Any]:
        try:
            got = await asyncio.wait_for(self.events.get(), timeout)
        except asyncio.TimeoutError:
            raise RuntimeError(f"{self.name}: no {event!r} within {timeout:g}s") from None
        if got["event"] == "eof":
            await self.events.put(got)  # every later expect fails the same way
            code = await self.proc.wait()
            raise RuntimeError(f"{self.name} exited (code {code}) while we waited for {event!r}")
        if got["event"] != event:
            raise RuntimeError(f"{self.name}: expected {event!r}, got {got}")
        return got

    async def ask(self, event: str, wait: float, **cmd: Any) -> dict[str, Any]:
        """Send ``cmd``, return the reply ``event`` (within ``wait`` seconds)."""
        async with self.lock:
            await self.send(**cmd)
            return await self.expect(event, wait)

    async def finish(self, timeout: float) -> None:
        """Ask it to quit; kill it if it doesn't within ``timeout``."""
        if self.proc.returncode is None:
            with contextlib.suppress(Exception):
                await self.send(cmd="quit")
                if self.proc.stdin is not None:
                    self.proc.stdin.close()
            try:
                await asyncio.wait_for(self.proc.wait(), timeout)
            except asyncio.TimeoutError:
                self.proc.kill()
                await self.proc.wait()
        self.reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reader


async def spawn(name: str, args: argparse.Namespace, *role_args: str) -> Child:
    env = dict(os.environ)
    env.pop("QP2P_NO_EXTENSIONS", None)
    if args.impl == "python":
        env["QP2P_NO_EXTENSIONS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, os.path.abspath(__file__), *role_args,
        "--parent", str(os.getpid()), "--impl", args.impl, "--loop", args.loop,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, env=env, cwd=REPO,
    )
    return Child(name, proc)


async def probe(server: tuple[str, int], cfg: Any) -> dict[str, Any]:
    """A fresh peer (new identity, new endpoint) dials the server and makes one request:
    how long ``connect_to`` and ``connect_to`` + request/reply take."""
    import qp2p

    ep = await qp2p.Endpoint.bind((HOST, 0), config=cfg, identity=qp2p.Identity.generate(),
                                  accept_incoming=False)
    try:
        t0 = time.perf_counter()
        conn = await ep.connect_to(server)
        t1 = time.perf_counter()
        payload = os.urandom(16)
        reply = await conn.request(payload, timeout=30)
        t2 = time.perf_counter()
        if reply.payload != payload:
            raise RuntimeError("probe: the reply is not our payload")
        return {"ok": True, "connect_s": t1 - t0, "total_s": t2 - t0}
    except Exception as exc:
        return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    finally:
        await ep.close()


def log(msg: str) -> None:
    sys.stderr.write(f"[scale {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


def summary(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"min": min(values), "median": statistics.median(values), "max": max(values),
            "n": len(values)}


async def load_phase(
    args: argparse.Namespace, server: Child, clients: list[Child], server_pid: int,
    addr: tuple[str, int], size: int, seconds: float, probe_cfg: Any,
) -> dict[str, Any]:
    """Every client connection sends ``size``-byte messages for ``seconds``; meanwhile
    sample the server (messages, RSS) every second and probe its accept loop."""
    before = await server.ask("status", 10, cmd="status")
    if args.profile:
        await server.ask("profile", 10, cmd="profile", path=None)
    for c in clients:
        await c.send(cmd="load", size=size)
    for c in clients:
        await c.expect("loading", 30)
    cpu_server = CpuMeter([server_pid]).start()
    cpu_clients = CpuMeter([c.proc.pid for c in clients]).start()
    t_start = time.monotonic()
    end = t_start + seconds
    warm_until = t_start + min(args.warmup, seconds / 4)
    samples: list[dict[str, Any]] = []
    rss_max = queue_max = 0
    drops0 = udp_socket_state(addr[1])[1]
    probes: list[dict[str, Any]] = []

    async def prober() -> None:
        await asyncio.sleep(min(1.0, seconds / 4))
        while time.monotonic() < end - 0.5:
            t_next = time.monotonic() + args.probe_interval
            probes.append(await probe(addr, probe_cfg))
            await asyncio.sleep(max(0.0, t_next - time.monotonic()))

    probing = asyncio.ensure_future(prober())
    try:
        while True:
            now = time.monotonic()
            if now >= end:
                break
            await asyncio.sleep(min(1.0, end - now))
            st = await server.ask("status", 10, cmd="status")
            rss_max = max(rss_max, rss_kib(server_pid))
            queue_max = max(queue_max, udp_socket_state(addr[1])[0])
            if st["t"] >= warm_until:
                samples.append(st)
        cpu_s = cpu_server.stop()
        cpu_c = cpu_clients.stop()
        if args.profile:
            await server.ask("profile", 60, cmd="profile", path=f"{args.profile}.{size}")
        rss_load = rss_kib(server_pid)
        await asyncio.wait_for(probing, 60)  # the last probe in flight
    finally:
        probing.cancel()
    for c in clients:  # all at once: a client still sending would load the others' drain
        await c.send(cmd="stop", timeout=args.stop_timeout)
    stopped = [await c.expect("stopped", args.stop_timeout + 30) for c in clients]
    sent = sum(s["sent"] for s in stopped)
    unfinished = sum(s["unfinished"] for s in stopped)
    send_errors = sum(s["errors"] for s in stopped)
    # every completed send was acknowledged, so the server must see all of them soon
    deadline = time.monotonic() + 20
    while True:
        after = await server.ask("status", 10, cmd="status")
        received = after["messages"] - before["messages"]
        if received >= sent or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    dgrams_in = after["endpoint"]["datagrams_received"] - before["endpoint"]["datagrams_received"]
    dgrams_out = after["endpoint"]["datagrams_sent"] - before["endpoint"]["datagrams_sent"]
    rate = mib = None
    if len(samples) >= 2:
        first, last = samples[0], samples[-1]
        dt = last["t"] - first["t"]
        rate = (last["messages"] - first["messages"]) / dt
        mib = (last["bytes"] - first["bytes"]) / dt / MiB
    probe_ok = [p for p in probes if p["ok"]]
    return {
        "size": size,
        "seconds": seconds,
        "msgs_per_s": rate,
        "mib_per_s": mib,
        "rate_window_s": samples[-1]["t"] - samples[0]["t"] if len(samples) >= 2 else 0.0,
        "messages_sent": sent,
        "messages_received": received,
        "messages_missing": max(0, sent - received),
        "sends_unfinished": unfinished,
        "send_errors": send_errors,
        "first_send_errors": [e for s in stopped for e in s["first_errors"]][:5],
        "stuck_senders": [st for s in stopped for st in s["stuck"]][:3],
        "open_at_end": after["open"],
        "server_counters": after["endpoint"],
        "serve_errors": after["serve_errors"],
        "server_cpu_pct": cpu_s,
        "server_cpu_wait_pct": cpu_server.wait_pct,
        "server_gc_s": after["gc_s"] - before["gc_s"],
        "server_gc_full": after["gc_full"] - before["gc_full"],
        "server_gc_full_max_s": after["gc_full_max_s"],
        "clients_cpu_pct": cpu_c,
        "clients_cpu_wait_pct": cpu_clients.wait_pct,
        "server_datagrams_in_per_msg": dgrams_in / received if received else None,
        "server_datagrams_out_per_msg": dgrams_out / received if received else None,
        "server_udp_queue_kib_max": queue_max / 1024,
        "server_udp_drops": udp_socket_state(addr[1])[1] - drops0,
        # the endpoint's own read-ahead queue: dropped when full or more than 1 s late
        "server_rx_queue_dropped": (after["endpoint"].get("rx_queue_dropped", 0)
                                    - before["endpoint"].get("rx_queue_dropped", 0)),
        "server_rss_kib_end": rss_load,
        "server_rss_kib_max": max(rss_max, rss_load),
        "probes": len(probes),
        "probes_failed": [p["error"] for p in probes if not p["ok"]],
        "probe_connect_s": summary([p["connect_s"] for p in probe_ok]),
        "probe_connect_request_s": summary([p["total_s"] for p in probe_ok]),
    }


async def harness(args: argparse.Namespace) -> dict[str, Any]:
    import qp2p

    check_impl(args.impl)
    n = args.clients
    procs = max(1, min(args.procs, n))
    sizes = [int(s) for s in args.sizes.split(",")]
    seconds = args.seconds / len(sizes)
    result: dict[str, Any] = {
        "clients": n, "client_procs": procs, "impl": qp2p.implementation, "loop": args.loop,
        "engine": os.environ.get("QP2P_ENGINE") or "auto",
        "sizes": sizes, "seconds_per_size": seconds, "dial_concurrency": args.dial_concurrency,
        "loadavg_before": os.getloadavg()[0],
    }
    children: list[Child] = []
    try:
        log(f"server: {args.impl} fast path, {args.loop}")
        server = await spawn("server", args, "--role", "server",
                             "--max-connections", str(n + 100),
                             *(["--tracemalloc"] if args.tracemalloc else []))
        children.append(server)
        ready = await server.expect("ready", 60)
        server_pid, addr = ready["pid"], (HOST, ready["port"])
        await asyncio.sleep(0.5)
        result["server_rss_kib_start"] = rss_kib(server_pid)
        heap0 = (await server.ask("status", 30, cmd="status", heap=True)).get("traced")

        log(f"{n} client endpoints in {procs} processes: binding")
        clients: list[Child] = []
        share, extra = divmod(n, procs)
        first = 0
        for i in range(procs):
            count = share + (1 if i < extra else 0)
            clients.append(await spawn(f"clients[{i}]", args, "--role", "clients",
                                       "--first", str(first), "--count", str(count),
                                       "--server", f"{HOST}:{addr[1]}",
                                       "--dial-concurrency", str(args.dial_concurrency)))
            first += count
        children.extend(clients)
        for c in clients:
            await c.expect("ready", 60 + n * 0.05)

        probe_cfg = make_config()
        warm = await probe(addr, probe_cfg)
        if not warm["ok"]:
            raise RuntimeError(f"warm-up probe failed: {warm['error']}")
        result["probe_idle_server_s"] = warm["total_s"]
        await asyncio.sleep(0.5)
        result["server_rss_kib_after_warmup"] = rss_kib(server_pid)

        log(f"{n} clients dialling ({args.dial_concurrency} in flight per process)")
        cpu = CpuMeter([server_pid]).start()
        t0 = time.perf_counter()
        for c in clients:
            await c.send(cmd="connect")
        connected = [await c.expect("connected", 120 + n * 0.5) for c in clients]
        t_connect = time.perf_counter() - t0
        ok = sum(r["ok"] for r in connected)
        result["handshake"] = {
            "connected": ok,
            "failed": sum(r["failed"] for r in connected),
            "first_errors": [e for r in connected for e in r["errors"]][:5],
            "seconds": t_connect,
            "handshakes_per_s": ok / t_connect,
            "dial_s": summary([t for r in connected for t in r["times"]]),
            "server_cpu_pct": cpu.stop(),
            "server_cpu_wait_pct": cpu.wait_pct,
        }
        log(f"{ok}/{n} connected in {t_connect:.2f}s")
        deadline = time.monotonic() + 30
        while True:
            st = await server.ask("status", 10, cmd="status")
            if st["accepted"] >= ok + 1 or time.monotonic() > deadline:  # + the warm-up probe
                break
            await asyncio.sleep(0.2)
        result["handshake"]["server_accepted"] = st["accepted"] - 1
        result["handshake"]["server_counters"] = st["endpoint"]

        cpu = CpuMeter([server_pid]).start()
        await asyncio.sleep(args.settle)
        idle = await server.ask("status", 60, cmd="status", heap=True)
        result["idle"] = {
            "open": idle["open"],
            "server_rss_kib": rss_kib(server_pid),
            "server_cpu_pct": cpu.stop(),
        }
        base = result["server_rss_kib_start"]
        result["idle"]["rss_kib_per_conn"] = (result["idle"]["server_rss_kib"] - base) / max(ok, 1)
        if heap0 is not None and "traced" in idle:
            result["idle"]["heap_kib_per_conn"] = (idle["traced"] - heap0) / 1024 / max(ok, 1)
        log(f"{idle['open']} open, RSS {result['idle']['server_rss_kib'] / 1024:.1f} MiB")
        if args.gc_freeze:  # after the memory reading: gc.collect() would move it
            frozen = await server.ask("frozen", 60, cmd="freeze")
            result["idle"]["server_gc_tracked"] = frozen["tracked"]
            for c in clients:
                await c.send(cmd="freeze")
            for c in clients:
                await c.expect("frozen", 60)

        result["load"] = []
        for size in sizes:
            log(f"load: {size} B messages for {seconds:g}s on every connection, probing")
            phase = await load_phase(args, server, clients, server_pid, addr, size, seconds,
                                     probe_cfg)
            phase["rss_kib_per_conn"] = (phase["server_rss_kib_max"] - base) / max(ok, 1)
            result["load"].append(phase)
            log(f"{phase['msgs_per_s'] or 0:,.0f} msg/s, {phase['messages_missing']} missing, "
                f"{phase['probes']} probes")
        result["ok"] = True
    except Exception as exc:
        result["ok"] = False
        result["error"] = f"{type(exc).__name__}: {exc}"
        log(f"FAILED: {result['error']}")
    finally:
        # clients first: their connections close while the server still answers
        await asyncio.gather(*(c.finish(60) for c in children[1:]), return_exceptions=True)
        if children:
            await children[0].finish(30)
    result["loadavg_after"] = os.getloadavg()[0]
    result["verdict"] = verdict(result)
    return result


def verdict(r: dict[str, Any]) -> list[str]:
    """What went wrong, if anything (an empty list: all connections, all messages, all
    probes within a second)."""
    problems = []
    if not r.get("ok"):
        problems.append(f"run failed: {r.get('error')}")
    hs = r.get("handshake")
    if hs and hs["connected"] < r["clients"]:
        problems.append(f"only {hs['connected']}/{r['clients']} clients connected")
    for ph in r.get("load", []):
        if ph["messages_missing"] or ph["send_errors"] or ph["sends_unfinished"]:
            problems.append(f"{ph['size']} B: {ph['messages_missing']} missing, "
                            f"{ph['send_errors']} send errors, {ph['sends_unfinished']} stuck")
        if ph["probes_failed"]:
            problems.append(f"{ph['size']} B: {len(ph['probes_failed'])} probes failed")
        slow = ph["probe_connect_request_s"]
        if slow and slow["max"] >= 1.0:
            problems.append(f"{ph['size']} B: slowest fresh peer took {slow['max']:.2f}s "
                            "(goal < 1 s)")
        if ph["open_at_end"] < (hs or {}).get("connected", 0):
            problems.append(f"{ph['size']} B: {ph['open_at_end']} connections open at the end")
    return problems


def _ms(s: dict[str, float] | None) -> str:
    if not s:
        return "-"
    return f"{1000 * s['min']:.0f} / {1000 * s['median']:.0f} / {1000 * s['max']:.0f} ms"


def table(r: dict[str, Any]) -> str:
    rows: list[tuple[str, str]] = []
    add = rows.append
    add(("setup", f"{r['clients']} client endpoints in {r['client_procs']} processes, "
                  f"{r['impl']} fast path, {r['loop']}, engine {r.get('engine', 'auto')}"))
    if "server_rss_kib_start" in r:
        add(("server RSS, no connections", f"{r['server_rss_kib_start'] / 1024:.1f} MiB"))
    if "server_rss_kib_after_warmup" in r:
        add(("  after one warm-up peer",
             f"{r['server_rss_kib_after_warmup'] / 1024:.1f} MiB "
             f"({1000 * r['probe_idle_server_s']:.0f} ms connect+request)"))
    hs = r.get("handshake")
    if hs:
        add(("handshakes", f"{hs['connected']}/{r['clients']} connected "
                           f"({hs['server_accepted']} accepted) in {hs['seconds']:.2f} s = "
                           f"{hs['handshakes_per_s']:.0f} hs/s; "
                           f"server CPU {hs['server_cpu_pct']:.0f}% "
                           f"(+{hs['server_cpu_wait_pct']:.0f}% waiting for a CPU)"))
        counters = hs.get("server_counters", {})
        add(("  server: Retries sent, refused",
             f"{counters.get('retries_sent', 0)}, {counters.get('handshakes_refused', 0)}"))
        add(("  one dial (min/median/max)", _ms(hs["dial_s"])))
        if hs["failed"]:
            add(("  failed dials", f"{hs['failed']}: {hs['first_errors']}"))
    idle = r.get("idle")
    if idle:
        add(("server RSS, N idle", f"{idle['server_rss_kib'] / 1024:.1f} MiB, {idle['open']} open; "
                                   f"CPU {idle['server_cpu_pct']:.1f}%"))
        add(("memory per connection (RSS)", f"{idle['rss_kib_per_conn']:.1f} KiB"
             + (" (inflated by tracemalloc's own records)" if "heap_kib_per_conn" in idle else "")))
        if "heap_kib_per_conn" in idle:
            add(("  Python heap per conn (tracemalloc)", f"{idle['heap_kib_per_conn']:.1f} KiB"))
        if "server_gc_tracked" in idle:
            add(("  objects the GC tracks, frozen",
                 f"{idle['server_gc_tracked']:,} in the server = "
                 f"{idle['server_gc_tracked'] / max(idle['open'], 1):.0f} per connection "
                 "(gc.freeze() once all are connected; --no-gc-freeze to compare)"))
    for ph in r.get("load", []):
        name = f"load {ph['size']} B"
        rate = (f"{ph['msgs_per_s']:,.0f} msg/s, {ph['mib_per_s']:.2f} MiB/s"
                if ph["msgs_per_s"] is not None else "no rate (too few samples)")
        add((name, f"{rate} received ({ph['rate_window_s']:.1f} s window)"))
        add(("  delivered", f"{ph['messages_received']:,} of {ph['messages_sent']:,} sent "
                            f"({ph['messages_missing']} missing, {ph['send_errors']} send errors); "
                            f"{ph['open_at_end']} open at the end"))
        add(("  CPU (100% = one core)",
             f"server {ph['server_cpu_pct']:.0f}% (+{ph['server_cpu_wait_pct']:.0f}% waiting "
             f"for a CPU), clients {ph['clients_cpu_pct']:.0f}% "
             f"(+{ph['clients_cpu_wait_pct']:.0f}% waiting)"))
        if "server_gc_s" in ph:
            add(("  server garbage collector", f"{ph['server_gc_s']:.2f} s in the phase, "
                                               f"{ph['server_gc_full']} full collections "
                                               f"(longest {1000 * ph['server_gc_full_max_s']:.0f}"
                                               " ms)"))
        if ph["server_datagrams_in_per_msg"] is not None:
            add(("  server datagrams per message", f"{ph['server_datagrams_in_per_msg']:.2f} in, "
                                                   f"{ph['server_datagrams_out_per_msg']:.2f} out"))
        add(("  server UDP receive queue", f"{ph['server_udp_queue_kib_max']:.0f} KiB at most "
                                           f"(1 s samples), {ph['server_udp_drops']} dropped"))
        if "server_rx_queue_dropped" in ph:
            add(("  endpoint read-ahead queue", f"{ph['server_rx_queue_dropped']} dropped "
                                                "(full, or waited > 1 s)"))
        add(("  server RSS under load", f"{ph['server_rss_kib_max'] / 1024:.1f} MiB max = "
                                        f"{ph['rss_kib_per_conn']:.1f} KiB/conn"))
        add(("  fresh peer connect_to", _ms(ph["probe_connect_s"]) + " (min/median/max)"))
        add(("  fresh peer connect+request", _ms(ph["probe_connect_request_s"])
             + f" over {ph['probes']} probes"))
        if ph["probes_failed"]:
            add(("  failed probes", "; ".join(ph["probes_failed"][:3])))
    add(("load average", f"{r['loadavg_before']:.2f} -> {r['loadavg_after']:.2f}"))
    add(("verdict", "; ".join(r["verdict"]) or "ok: all connected, every message arrived, "
                                                "every fresh peer in < 1 s"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clients", type=int, default=1000, help="client endpoints (N)")
    ap.add_argument("--procs", type=int, default=4, help="client processes")
    ap.add_argument("--seconds", type=float, default=20.0,
                    help="seconds of load in total, split over the message sizes")
    ap.add_argument("--sizes", default="64,1024", help="message sizes, comma-separated")
    ap.add_argument("--impl", choices=["cython", "python"], default="cython")
    ap.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    ap.add_argument("--engine", choices=["auto", "qh3", "aioquic"], default="auto",
                    help="QP2P_ENGINE for the server and the clients (auto: qh3 when installed)")
    ap.add_argument("--dial-concurrency", type=int, default=16,
                    help="dials in flight per client process")
    ap.add_argument("--probe-interval", type=float, default=1.5,
                    help="seconds between fresh-peer probes under load")
    ap.add_argument("--warmup", type=float, default=2.0,
                    help="seconds of each load phase left out of the rate")
    ap.add_argument("--settle", type=float, default=3.0,
                    help="seconds the N connections sit idle before the memory reading")
    ap.add_argument("--stop-timeout", type=float, default=30.0,
                    help="seconds a sender may take to finish its last send after the load")
    ap.add_argument("--no-gc-freeze", dest="gc_freeze", action="store_false",
                    help="do not gc.freeze() the server and clients once all are connected")
    ap.add_argument("--tracemalloc", action="store_true",
                    help="trace the server's Python heap (slows the server down)")
    ap.add_argument("--profile", metavar="PATH",
                    help="cProfile the server during each load phase into PATH.<size> "
                         "(read with pstats; slows the server down)")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                    help="first wait (up to SECONDS) for the 1-minute load average < 1")
    ap.add_argument("--timeout", type=float, default=900.0, help="bound on the whole run")
    ap.add_argument("--json", action="store_true", help="print JSON instead of the table")
    # internal: child processes
    ap.add_argument("--role", choices=["harness", "server", "clients"], default="harness",
                    help=argparse.SUPPRESS)
    ap.add_argument("--parent", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--count", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--server", help=argparse.SUPPRESS)
    ap.add_argument("--max-connections", type=int, default=10_000, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.role == "harness" and args.engine != "auto":
        os.environ["QP2P_ENGINE"] = args.engine  # inherited by every child

    if args.role != "harness":
        die_with_parent(args.parent)
        run_loop(args.loop, server_main(args) if args.role == "server" else clients_main(args))
        return 0
    if args.clients < 1 or args.seconds <= 0:
        ap.error("--clients and --seconds must be positive")
    deadline = time.monotonic() + args.wait_idle
    while os.getloadavg()[0] >= 1.0 and time.monotonic() < deadline:
        time.sleep(5)
    # the harness's own probes use the same fast path as the children
    os.environ.pop("QP2P_NO_EXTENSIONS", None)
    if args.impl == "python":
        os.environ["QP2P_NO_EXTENSIONS"] = "1"
    try:
        result = run_loop(args.loop, asyncio.wait_for(harness(args), args.timeout))
    except asyncio.TimeoutError:
        print(f"scale: the run did not finish within --timeout {args.timeout:g}s")
        return 2
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(table(result))
    return 0 if not result["verdict"] else 1


if __name__ == "__main__":
    sys.exit(main())
