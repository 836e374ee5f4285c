"""qp2p on each engine side by side with raw aioquic and raw qh3: one table, one JSON file,
one regression guard.

    python bench/compare.py                  # full: 3 repetitions, ~2 s per rate scenario
    python bench/compare.py --quick          # short (CI smoke)
    python bench/compare.py --check          # short run of qp2p on each engine vs its raw
                                             # engine; exit 1 when a ratio falls below
                                             # bench/floors.json

Every (configuration, scenario, repetition) runs in its own subprocess, so the fast-path
implementation (``QP2P_NO_EXTENSIONS``), the engine (``QP2P_ENGINE``) and the event loop
are chosen before anything is
imported and no state leaks between runs. Repetitions are interleaved (rep 1 of every
configuration, then rep 2, ...) so slow drift of the machine hits all columns alike.
Each run is bounded in time: a stuck scenario is killed and reported as an error.
See bench/README.md for what each metric means.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import datetime
import glob
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)

from scenarios import Params, scenario_timeout  # noqa: E402

# name -> (kind, fast path, event loop, engine); "qp2p-..." without an engine name is
# qp2p on aioquic, "raw-uvloop" raw aioquic (names kept from before the qh3 engine)
CONFIGS: dict[str, tuple[str, str, str, str]] = {
    "qp2p-cy-uvloop": ("qp2p", "cython", "uvloop", "aioquic"),
    "qp2p-qh3-cy-uvloop": ("qp2p", "cython", "uvloop", "qh3"),
    "qp2p-cy-asyncio": ("qp2p", "cython", "asyncio", "aioquic"),
    "qp2p-py-asyncio": ("qp2p", "python", "asyncio", "aioquic"),
    "raw-uvloop": ("raw", "-", "uvloop", "aioquic"),
    "raw-qh3-uvloop": ("raw", "-", "uvloop", "qh3"),
}
MAIN, RAW, CY_ASYNCIO, PY_ASYNCIO = (
    "qp2p-cy-uvloop", "raw-uvloop", "qp2p-cy-asyncio", "qp2p-py-asyncio",
)
QH3, RAW_QH3 = "qp2p-qh3-cy-uvloop", "raw-qh3-uvloop"
#: (qp2p configuration, its baseline) pairs that --check guards, with their floors' key
CHECKED = [(MAIN, RAW, "ratio_floors"), (QH3, RAW_QH3, "qh3_ratio_floors")]
SCENARIOS = ["bulk", "messages", "datagrams", "handshakes", "memory"]
# metric -> (label, unit, scenario, higher is better)
METRICS: dict[str, tuple[str, str, str, bool]] = {
    "bulk_mib_s": ("bulk, 1 MiB messages", "MiB/s", "bulk", True),
    "msgs_per_s": ("64 B messages", "msg/s", "messages", True),
    "datagrams_per_s": ("64 B datagrams delivered", "dgram/s", "datagrams", True),
    "delivery_pct": ("  datagram delivery", "%", "datagrams", True),
    "handshakes_per_s": ("handshakes (connect only)", "hs/s", "handshakes", True),
    "mem_kib_acceptor": ("memory/idle conn, acceptor", "KiB", "memory", False),
    "mem_kib_dialer": ("memory/idle conn, dialer", "KiB", "memory", False),
}
RATIO_METRICS = ["bulk_mib_s", "msgs_per_s", "datagrams_per_s", "handshakes_per_s"]

FULL = Params()
QUICK = Params(duration=1.0, warmup=0.2, hs_duration=1.0, mem_connections=200)
FLOORS = os.path.join(HERE, "floors.json")
RESULT_MARK = "QP2P-BENCH-RESULT "


# ---------------------------------------------------------------------- worker side


def _worker(config: str, scenario: str, params: Params) -> int:
    """Run one scenario in this (fresh) process; print one result line."""
    kind, impl, loop_name, engine = CONFIGS[config]
    out: dict[str, Any]
    try:
        if kind == "qp2p":
            import qp2p
            from qp2p import _speedups
            from qp2p.engine import resolve

            if engine != resolve("auto").NAME:
                raise RuntimeError(f"wanted the {engine} engine: install qp2p[qh3]")
            if qp2p.implementation != impl:
                hint = ""
                if impl == "cython":
                    hint = (" (the compiled extension is not built or failed to import: "
                            "run `.venv/bin/python setup.py -q build_ext --inplace`)")
                raise RuntimeError(f"wanted the {impl} fast path, got {qp2p.implementation}"
                                   + hint)
            import scenarios as module

            features = getattr(_speedups.impl, "features", dict)()
        elif engine == "qh3":
            import raw_qh3 as module  # type: ignore[no-redef]

            features = {}
        else:
            import raw_aioquic as module  # type: ignore[no-redef]

            features = {}
        func = module.SCENARIOS[scenario]
        if loop_name == "uvloop":
            import uvloop

            loop = uvloop.new_event_loop()
        else:
            loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        try:
            out = loop.run_until_complete(
                asyncio.wait_for(func(params), scenario_timeout(params, scenario))
            )
        finally:
            loop.close()
        out.setdefault("extra", {})["features"] = features
        out["ok"] = True
    except asyncio.TimeoutError:
        out = {"ok": False, "error": f"timed out after {scenario_timeout(params, scenario):g}s"}
    except Exception as exc:
        out = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    sys.stdout.write(RESULT_MARK + json.dumps(out) + "\n")
    sys.stdout.flush()
    return 0 if out["ok"] else 1


# ---------------------------------------------------------------------- parent side


def run_one(config: str, scenario: str, params: Params) -> dict[str, Any]:
    """One scenario of one configuration in a subprocess, killed if it overruns."""
    env = dict(os.environ)
    env.pop("QP2P_NO_EXTENSIONS", None)
    if CONFIGS[config][1] == "python":
        env["QP2P_NO_EXTENSIONS"] = "1"
    env["QP2P_ENGINE"] = CONFIGS[config][3]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", config, scenario,
           "--params", params.to_json()]
    limit = scenario_timeout(params, scenario) + 20
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True,
                              timeout=limit)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"killed after {limit:g}s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            result: dict[str, Any] = json.loads(line[len(RESULT_MARK):])
            break
    else:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        result = {"ok": False, "error": f"exit {proc.returncode}: {tail}"}
    result["seconds"] = round(time.perf_counter() - t0, 2)
    return result


def _metrics_of(result: dict[str, Any]) -> dict[str, float]:
    values = dict(result.get("metrics", {}))
    if "delivery_pct" in result.get("extra", {}):
        values["delivery_pct"] = result["extra"]["delivery_pct"]
    return values


class Collector:
    def __init__(self) -> None:
        self.runs: list[dict[str, Any]] = []
        self.values: dict[str, dict[str, list[float]]] = {}
        self.errors: dict[str, dict[str, list[str]]] = {}

    def add(self, config: str, scenario: str, rep: int, result: dict[str, Any]) -> None:
        self.runs.append({"config": config, "scenario": scenario, "rep": rep, **result})
        if result.get("ok"):
            for metric, value in _metrics_of(result).items():
                self.values.setdefault(config, {}).setdefault(metric, []).append(value)
        else:
            self.errors.setdefault(config, {}).setdefault(scenario, []).append(result["error"])

    def median(self, config: str, metric: str) -> float | None:
        vals = self.values.get(config, {}).get(metric)
        return statistics.median(vals) if vals else None

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for config, metrics in self.values.items():
            for metric, vals in metrics.items():
                out.setdefault(config, {})[metric] = {
                    "median": statistics.median(vals), "min": min(vals), "max": max(vals),
                    "values": vals, "unit": METRICS[metric][1],
                }
        return out


def run_matrix(configs: list[str], scenarios: list[str], params: Params, reps: int,
               col: Collector, rep_offset: int = 0) -> None:
    total = reps * sum(1 for s in scenarios for c in configs if _applies(c, s))
    done = 0
    for rep in range(rep_offset, rep_offset + reps):
        for scenario in scenarios:
            for config in configs:
                if not _applies(config, scenario):
                    continue
                done += 1
                result = run_one(config, scenario, params)
                col.add(config, scenario, rep, result)
                if result.get("ok"):
                    shown = ", ".join(f"{k}={_fmt(v)}" for k, v in _metrics_of(result).items())
                else:
                    shown = "ERROR " + result["error"]
                print(f"[{done}/{total}] rep {rep + 1} {scenario:<10} {config:<16} "
                      f"{shown}  ({result['seconds']}s)", file=sys.stderr, flush=True)


def _applies(config: str, scenario: str) -> bool:
    return not (scenario == "memory" and CONFIGS[config][0] == "raw")


def _fmt(value: float | None) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _ratio(col: Collector, a: str, b: str, metric: str) -> float | None:
    x, y = col.median(a, metric), col.median(b, metric)
    if x is None or y is None or y == 0:
        return None
    return x / y


def table(col: Collector, configs: list[str]) -> str:
    cells: list[list[str]] = []
    head = ["metric", "unit", *configs]
    show_raw = MAIN in configs and RAW in configs
    show_qh3 = QH3 in configs and RAW_QH3 in configs
    show_cross = QH3 in configs and RAW in configs
    show_twin = CY_ASYNCIO in configs and PY_ASYNCIO in configs
    if show_raw:
        head.append("cy-uv/raw")
    if show_qh3:
        head.append("qh3/raw-qh3")
    if show_cross:
        head.append("qh3/raw")
    if show_twin:
        head.append("cy/py(asyncio)")
    for metric, (label, unit, scenario, _hi) in METRICS.items():
        row = [label, unit]
        for config in configs:
            vals = col.values.get(config, {}).get(metric)
            if vals:
                cell = _fmt(statistics.median(vals))
                if len(vals) > 1:
                    cell += f" [{_fmt(min(vals))}-{_fmt(max(vals))}]"
            elif col.errors.get(config, {}).get(scenario):
                cell = "ERROR"
            else:
                cell = "-"
            row.append(cell)
        if metric == "delivery_pct":
            row += [""] * (show_raw + show_qh3 + show_cross + show_twin)
        else:
            for shown, a, b in ((show_raw, MAIN, RAW), (show_qh3, QH3, RAW_QH3),
                                (show_cross, QH3, RAW)):
                if shown:
                    r = _ratio(col, a, b, metric)
                    row.append("-" if r is None else f"{r:.2f}x")
            if show_twin:
                r = _ratio(col, CY_ASYNCIO, PY_ASYNCIO, metric)
                row.append("-" if r is None else f"{r:.2f}x")
        cells.append(row)
    widths = [max(len(r[i]) for r in [head, *cells]) for i in range(len(head))]
    lines = ["  ".join(h.ljust(w) if i < 2 else h.rjust(w) for i, (h, w) in
                       enumerate(zip(head, widths, strict=True)))]
    lines.append("  ".join("-" * w for w in widths))
    for row in cells:
        lines.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in
                               enumerate(zip(row, widths, strict=True))))
    errors = [f"  {c} {s}: {e[0]}" + (f" (x{len(e)})" if len(e) > 1 else "")
              for c, by in col.errors.items() for s, e in by.items()]
    if errors:
        lines += ["", "errors:", *errors]
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "loadavg_start": os.getloadavg(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(
                (line.split(":", 1)[1].strip() for line in f if line.startswith("model name")),
                None,
            )
    except OSError:
        pass
    from importlib import metadata

    for pkg in ("aioquic", "qh3", "uvloop", "cryptography", "Cython"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["git"] = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=REPO, capture_output=True,
            text=True, timeout=10,
        ).stdout.strip()
    return info


def _stale_extension_warning() -> str | None:
    built = glob.glob(os.path.join(REPO, "qp2p", "_fastpath*.so"))
    sources = [p for p in (os.path.join(REPO, "qp2p", f) for f in ("_fastpath.pyx",
               "_fastpath.pxd")) if os.path.exists(p)]
    if not built:
        return "qp2p/_fastpath*.so is not built: the cy configurations will fail"
    newest = max((os.path.getmtime(p) for p in sources), default=0)
    if newest > min(os.path.getmtime(p) for p in built):
        return "qp2p/_fastpath*.so is older than its sources: rebuild it"
    return None


def wait_for_idle(limit: float, threshold: float = 1.0) -> None:
    end = time.monotonic() + limit
    while os.getloadavg()[0] >= threshold and time.monotonic() < end:
        print(f"waiting for an idle machine: load {os.getloadavg()[0]:.2f}", file=sys.stderr)
        time.sleep(min(15.0, max(0.0, end - time.monotonic())))


def load_floors(path: str) -> dict[str, Any]:
    with open(path) as f:
        floors: dict[str, Any] = json.load(f)
    return floors


def check(col: Collector, floors: dict[str, Any]) -> list[str]:
    """Failures: ratios under their floor, maxima exceeded, scenarios that errored."""
    bad = []
    for config, baseline, key in CHECKED:
        if config not in col.values and config not in col.errors:
            continue  # not run
        for metric, floor in floors.get(key, {}).items():
            r = _ratio(col, config, baseline, metric)
            if r is None:
                bad.append(f"{metric}: no {config}/{baseline} ratio (a scenario failed)")
            elif r < floor:
                bad.append(f"{metric}: {config}/{baseline} = {r:.2f}x < floor {floor}x")
    for config, prefix in ((MAIN, ""), (QH3, "qh3_")):
        for metric, ceiling in floors.get(f"{prefix}maxima", {}).items():
            if config not in col.values and config not in col.errors:
                continue
            v = col.median(config, metric)
            if v is None:
                bad.append(f"{metric}: no value for {config} (the scenario failed)")
            elif v > ceiling:
                bad.append(f"{metric}: {config} = {v:.1f} > maximum {ceiling}")
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="short runs, 1 repetition")
    ap.add_argument("--check", action="store_true",
                    help="quick run of qp2p on each engine and its raw engine; exit 1 below "
                    "bench/floors.json")
    ap.add_argument("--reps", type=int, help="repetitions (default 3, quick 1)")
    ap.add_argument("--duration", type=float, help="seconds per rate scenario")
    ap.add_argument("--connections", type=int, help="idle connections for the memory scenario")
    ap.add_argument("--configs", help=f"comma-separated subset of {','.join(CONFIGS)}")
    ap.add_argument("--scenarios", help=f"comma-separated subset of {','.join(SCENARIOS)}")
    ap.add_argument("--floors", default=FLOORS, help="floors file for --check")
    ap.add_argument("--wait-idle", type=float, default=0.0, metavar="SECONDS",
                    help="first wait up to this long for the 1-minute load average to "
                    "drop below 1.0 (other work on the machine skews every number)")
    ap.add_argument("--out", help="JSON output (default bench/results.json, "
                    "bench/results-check.json with --check)")
    ap.add_argument("--worker", nargs=2, metavar=("CONFIG", "SCENARIO"), help=argparse.SUPPRESS)
    ap.add_argument("--params", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        return _worker(args.worker[0], args.worker[1], Params.from_json(args.params))

    quick = args.quick or args.check
    params = dataclasses.replace(QUICK if quick else FULL)
    if args.duration:
        params.duration = params.hs_duration = args.duration
    if args.connections:
        params.mem_connections = args.connections
    reps = args.reps or (1 if quick else 3)
    configs = args.configs.split(",") if args.configs else (
        [MAIN, RAW, QH3, RAW_QH3] if args.check else list(CONFIGS))
    scenarios = args.scenarios.split(",") if args.scenarios else list(SCENARIOS)
    for name in configs:
        if name not in CONFIGS:
            ap.error(f"unknown configuration {name!r}")
    for name in scenarios:
        if name not in SCENARIOS:
            ap.error(f"unknown scenario {name!r}")
    floors = load_floors(args.floors) if args.check else {}
    out = args.out or os.path.join(HERE, "results-check.json" if args.check else "results.json")

    warning = _stale_extension_warning()
    if warning and any(CONFIGS[c][1] == "cython" for c in configs):
        print(f"warning: {warning}", file=sys.stderr)
    if args.wait_idle > 0:
        wait_for_idle(args.wait_idle)
    info = machine()
    started = time.perf_counter()
    col = Collector()
    run_matrix(configs, scenarios, params, reps, col)

    failures: list[str] = []
    if args.check:
        failures = check(col, floors)
        retry = {METRICS[f.split(":")[0]][2] for f in failures if f.split(":")[0] in METRICS}
        if retry:  # confirm before failing: two more repetitions of what fell short
            print(f"below the floor, confirming with 2 more repetitions: {sorted(retry)}",
                  file=sys.stderr)
            run_matrix(configs, [s for s in scenarios if s in retry], params, 2, col,
                       rep_offset=reps)
            failures = check(col, floors)

    info["loadavg_end"] = os.getloadavg()
    info["seconds"] = round(time.perf_counter() - started, 1)
    text = table(col, configs)
    print()
    done_reps = max((run["rep"] + 1 for run in col.runs), default=0)
    extra_reps = f" ({done_reps - reps} more to confirm a shortfall)" if done_reps > reps else ""
    print(f"qp2p vs raw aioquic and raw qh3, loopback, both ends in one process, "
          f"{params.duration:g} s "
          f"per rate scenario, {reps} repetition(s){extra_reps}: median [min-max]")
    print(f"machine: {info.get('cpu')}, {info['cpus']} CPUs, Python {info['python']}, "
          f"aioquic {info['aioquic']}, qh3 {info['qh3']}, uvloop {info['uvloop']}; load "
          f"{info['loadavg_start'][0]:.2f} -> {info['loadavg_end'][0]:.2f}")
    print(text)
    report = {
        "machine": info, "params": dataclasses.asdict(params), "reps": reps,
        "configs": {c: dict(zip(("kind", "fastpath", "loop", "engine"), CONFIGS[c], strict=True))
                    for c in configs},
        "summary": col.summary(),
        "ratios": {
            "qp2p-cy-uvloop/raw-uvloop": {m: _ratio(col, MAIN, RAW, m) for m in RATIO_METRICS},
            f"{QH3}/{RAW_QH3}": {m: _ratio(col, QH3, RAW_QH3, m) for m in RATIO_METRICS},
            f"{QH3}/{RAW}": {m: _ratio(col, QH3, RAW, m) for m in RATIO_METRICS},
            "qp2p-cy-asyncio/qp2p-py-asyncio": {
                m: _ratio(col, CY_ASYNCIO, PY_ASYNCIO, m)
                for m in [*RATIO_METRICS, "mem_kib_acceptor", "mem_kib_dialer"]
            },
        },
        "runs": col.runs,
        "table": text,
    }
    if args.check:
        report["floors"] = floors
        report["check_failures"] = failures
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nJSON: {out}")
    if args.check:
        if failures:
            print("bench-check FAILED:\n  " + "\n  ".join(failures))
            return 1
        for prefix, what in (("", "aioquic"), ("qh3_", "qh3")):
            limits = [f"{k} >= {v}x" for k, v in floors.get(f"{prefix}ratio_floors", {}).items()]
            limits += [f"{k} <= {v}" for k, v in floors.get(f"{prefix}maxima", {}).items()]
            print(f"bench-check passed on {what} ({', '.join(limits)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
