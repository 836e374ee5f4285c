"""cProfile of one scenario (bulk by default): where one connection's throughput goes.

    python bench/profile_bulk.py                      # qp2p, compiled fast path, uvloop
    python bench/profile_bulk.py --impl python --loop asyncio
    python bench/profile_bulk.py --raw                # the raw baseline (of --engine)
    python bench/profile_bulk.py --engine qh3 --scenario messages   # 64 B messages on qh3
    python bench/profile_bulk.py --scenario datagrams --engine aioquic
    python bench/profile_bulk.py --out bulk.prof      # also keep the profile (snakeviz, ...)

Prints the top functions by cumulative and by own time, then how often the QUIC engine
was entered per datagram (the number the performance work is about: DESIGN.md §6).
Both ends run in this process, so the profile holds the sender and the receiver.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import os
import pstats
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

# functions whose call counts tell how often the engine / the socket is entered
ENTRIES = [
    ("aioquic/quic/connection.py", "receive_datagram"),
    ("aioquic/quic/connection.py", "datagrams_to_send"),
    ("aioquic/quic/connection.py", "handle_timer"),
    ("aioquic/quic/connection.py", "send_stream_data"),
    ("aioquic/asyncio/protocol.py", "transmit"),
    ("qh3", "receive_datagram"),
    ("qh3", "datagrams_to_send"),
    ("qh3", "handle_timer"),
    ("qh3", "send_stream_data"),
    ("qh3", "send_datagram_frame"),
    ("qh3/asyncio/protocol.py", "transmit"),
    ("qp2p/engine/_qh3.py", "receive_datagram"),
    ("qp2p/engine/_qh3.py", "datagrams_to_send"),
    ("qp2p/connection.py", "send_datagram"),
    ("qp2p/connection.py", "recv_datagram"),
    ("qp2p/connection.py", "recv"),
    ("qp2p/endpoint.py", "_on_readable"),
    ("qp2p/endpoint.py", "_flush"),
    ("qp2p/endpoint.py", "_on_timer"),
    ("qp2p/connection.py", "_check_acks"),
    ("_fastpath", "recv_batch"),
    ("_fastpath", "send_batch"),
    ("_purepy.py", "recv_batch"),
    ("_purepy.py", "send_batch"),
]


def entry_counts(stats: pstats.Stats) -> list[tuple[str, int]]:
    out = []
    table: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
    for (filename, _line, func), (_cc, ncalls, *_rest) in table.items():
        for where, name in ENTRIES:
            named = func == name or func.endswith((f".{name}", f" {name}>"))
            if named and (where in filename or where in func):
                out.append((f"{where.split('/')[-1]}:{name}", ncalls))
    return sorted(out, key=lambda item: -item[1])


def _delivered(scenario: str, result: dict[str, Any]) -> tuple[int, str]:
    """How much the run delivered, and what: messages, datagrams or MiB."""
    extra = result.get("extra", {})
    if scenario == "messages":
        return int(extra.get("messages_received") or 0), "message"
    if scenario == "datagrams":
        return int(extra.get("datagrams_received") or 0), "datagram"
    return int(extra.get("messages_received") or 0), "1 MiB message"


def _short(filename: str) -> str:
    """A profile entry's file, from the package directory on."""
    for marker in ("site-packages/", "/qp2p/", "/bench/"):
        at = filename.find(marker)
        if at >= 0:
            return filename[at + len(marker):] if marker == "site-packages/" else (
                filename[at + 1:])
    return filename


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--impl", choices=["cython", "python"], default="cython")
    ap.add_argument("--loop", choices=["uvloop", "asyncio"], default="uvloop")
    ap.add_argument("--engine", choices=["aioquic", "qh3"], default="aioquic")
    ap.add_argument("--scenario", choices=["bulk", "messages", "datagrams"], default="bulk")
    ap.add_argument("--raw", action="store_true",
                    help="profile raw aioquic / raw qh3 (--engine) instead of qp2p")
    ap.add_argument("--duration", type=float, default=3.0, help="seconds of traffic")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--out", help="also write the raw profile here (pstats format)")
    args = ap.parse_args(argv)

    if args.impl == "python":
        os.environ["QP2P_NO_EXTENSIONS"] = "1"
    else:
        os.environ.pop("QP2P_NO_EXTENSIONS", None)
    os.environ["QP2P_ENGINE"] = args.engine
    import scenarios

    if args.raw:
        if args.engine == "qh3":
            import raw_qh3 as raw
        else:
            import raw_aioquic as raw  # type: ignore[no-redef]

        func = getattr(raw, args.scenario)
        what = f"raw {args.engine} (serve/connect helpers)"
    else:
        import qp2p

        if qp2p.implementation != args.impl:
            print(f"wanted the {args.impl} fast path, got {qp2p.implementation}: build it with "
                  "`.venv/bin/python setup.py -q build_ext --inplace`", file=sys.stderr)
            return 2
        func = getattr(scenarios, args.scenario)
        what = f"qp2p on {args.engine}, {qp2p.implementation} fast path"
    params = scenarios.Params(duration=args.duration, warmup=0.3)
    if args.loop == "uvloop":
        import uvloop

        loop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)

    profiler = cProfile.Profile()
    t0 = time.perf_counter()
    profiler.enable()
    try:
        result = loop.run_until_complete(asyncio.wait_for(func(params), args.duration + 30))
    finally:
        profiler.disable()
        loop.close()
    elapsed = time.perf_counter() - t0
    if args.out:
        profiler.dump_stats(args.out)

    print(f"{args.scenario} under cProfile: {what}, {args.loop}, {args.duration:g} s of traffic")
    for metric, value in result["metrics"].items():
        print(f"  {metric} {value:,.1f} under the profiler "
              f"(profiling slows Python code several-fold; compare shapes, not speeds)")
    extra = {k: v for k, v in result.get("extra", {}).items() if k != "features"}
    print(f"  {extra}; wall {elapsed:.1f} s")
    for order in ("cumulative", "tottime"):
        buf = io.StringIO()
        stats = pstats.Stats(profiler, stream=buf)
        stats.sort_stats(order).print_stats(args.top)
        text = buf.getvalue()
        start = text.find("   ncalls")
        print(f"\n=== top {args.top} by {order} ===")
        print(text[start:].rstrip() if start >= 0 else text.rstrip())
    stats = pstats.Stats(profiler)
    units, unit = _delivered(args.scenario, result)
    if units:
        print(f"\n=== top {args.top} by own time, per {unit} ({units:,} delivered) ===")
        table: dict[Any, Any] = stats.stats  # type: ignore[attr-defined]
        rows = sorted(table.items(), key=lambda kv: -kv[1][2])[: args.top]
        for (filename, line, func), (_cc, ncalls, tottime, _ct, _callers) in rows:
            where = f"{_short(filename)}:{line}({func})"
            print(f"  {1e6 * tottime / units:7.2f} µs  {ncalls / units:5.2f} calls  {where}")
    print("\n=== engine and socket entries (calls) ===")
    for name, calls in entry_counts(stats):
        print(f"  {name:<40} {calls:>9,}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
