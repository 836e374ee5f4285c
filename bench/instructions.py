"""Instructions per 64 B message (or per handshake), counted by valgrind: qp2p on qh3 next
to raw qh3.

Wall-clock rates on a shared VM move by 10-20 % from run to run; an instruction count moves
by a few percent, so it can tell a small change apart. Each configuration runs the messages
scenario of ``bench/scenarios.py`` (or of ``bench/raw_qh3.py``) twice under
``valgrind --tool=cachegrind --cache-sim=no``, for a short and a long time; the difference
of the two instruction counts divided by the difference of the messages delivered is the
cost of one message, without the start-up (imports, handshake). The ratio raw/qp2p is what
the rate ratio would be at equal instructions per cycle.

    python bench/instructions.py                    # qp2p (compiled, uvloop) and raw qh3
    python bench/instructions.py --configs qp2p --short 0.5 --long 3
    python bench/instructions.py --scenario handshakes   # per mutual-TLS handshake

Needs valgrind (Debian: ``apt install valgrind``); not part of ``make test``. About three
minutes per configuration (valgrind runs Python some 30 times slower).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
CONFIGS = ("qp2p", "raw_qh3")


#: scenario -> what one unit is, and where its count is in the scenario's result
UNITS = {"messages": ("message", "messages_received"), "handshakes": ("handshake", "handshakes")}


def _worker(config: str, scenario: str, duration: float) -> None:
    import uvloop

    sys.path.insert(0, HERE)
    import scenarios

    module = scenarios if config == "qp2p" else __import__(config)
    # the rate is not used: only the count of units done in that time
    params = scenarios.Params(duration=duration, warmup=duration / 4, hs_duration=duration)
    result = uvloop.run(getattr(module, scenario)(params))
    print(json.dumps({"units": result["extra"][UNITS[scenario][1]]}))


def _count(config: str, scenario: str, duration: float) -> tuple[int, int]:
    """(instructions, units done) of one run under cachegrind."""
    with tempfile.NamedTemporaryFile() as out:
        proc = subprocess.run(
            ["valgrind", "--tool=cachegrind", "--cache-sim=no",
             f"--cachegrind-out-file={out.name}", sys.executable, os.path.abspath(__file__),
             "--worker", config, scenario, str(duration)],
            capture_output=True, text=True, check=True,
        )
    refs = re.search(r"I\s+refs:\s+([\d,]+)", proc.stderr)
    if refs is None:
        raise RuntimeError(f"no instruction count from valgrind:\n{proc.stderr[-2000:]}")
    units = json.loads(proc.stdout.strip().splitlines()[-1])["units"]
    return int(refs.group(1).replace(",", "")), int(units)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help="comma-separated: qp2p (this tree), raw_qh3")
    parser.add_argument("--short", type=float, default=0.5, help="seconds of the short run")
    parser.add_argument("--long", type=float, default=2.0, help="seconds of the long run")
    parser.add_argument("--scenario", choices=sorted(UNITS), default="messages",
                        help="count per 64 B message (default) or per handshake")
    parser.add_argument("--worker", nargs=3, metavar=("CONFIG", "SCENARIO", "SECONDS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        _worker(args.worker[0], args.worker[1], float(args.worker[2]))
        return 0
    unit = UNITS[args.scenario][0]
    per_unit: dict[str, float] = {}
    for config in args.configs.split(","):
        if config not in CONFIGS:
            parser.error(f"unknown config {config!r}")
        (i1, m1) = _count(config, args.scenario, args.short)
        (i2, m2) = _count(config, args.scenario, args.long)
        per_unit[config] = (i2 - i1) / (m2 - m1)
        print(f"{config:8} {per_unit[config]:11,.0f} instructions/{unit} "
              f"(runs of {args.short:g} s and {args.long:g} s: {m1} and {m2} {unit}s)",
              flush=True)
    if len(per_unit) == 2:
        print(f"raw_qh3/qp2p {per_unit['raw_qh3'] / per_unit['qp2p']:.2f}x "
              "(the rate ratio at equal instructions per cycle)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
