"""How long port mapping takes, and what it adds to bind and close, against Debian's
miniupnpd in a NAT router's network namespace (the lab of tests/support/upnp_lab.py; needs root).

    .venv/bin/python bench/portmap_time.py [--rounds N]

For each setting (off, each protocol alone, all): ``bind`` time, time from bind's return to
``ep.public_addr`` being set, and ``close`` time (which deletes the lease), over N fresh
endpoints in the peer's namespace. Figures vary with the machine; they are not a test (the
tests assert behaviour, see tests/netns/test_portmap.py).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.support.netlab import Lab  # noqa: E402
from tests.support.paths import pythonpath  # noqa: E402
from tests.support.upnp_lab import upnp_router  # noqa: E402

CHILD = r'''
import asyncio, json, sys, time
import qp2p

async def main(rounds):
    out = {}
    for name in ("off", "pcp", "natpmp", "upnp", "all"):
        mapping = {"off": False, "all": True}.get(name, (name,))
        binds, maps, closes = [], [], []
        for _ in range(rounds):
            t0 = time.perf_counter()
            ep = await qp2p.Endpoint.bind(("0.0.0.0", 0),
                                          config=qp2p.Config(port_mapping=mapping))
            t1 = time.perf_counter()
            binds.append(t1 - t0)
            if mapping:
                while ep.public_addr is None:
                    await asyncio.sleep(0.001)
                maps.append(time.perf_counter() - t1)
            t2 = time.perf_counter()
            await ep.close()
            closes.append(time.perf_counter() - t2)
        out[name] = [binds, maps, closes]
    print(json.dumps(out))

asyncio.run(main(int(sys.argv[1])))
'''


def ms(values: list[float]) -> str:
    return f"median {statistics.median(values) * 1000:7.1f} ms, max {max(values) * 1000:7.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    args = parser.parse_args()
    with Lab() as lab, tempfile.TemporaryDirectory() as tmp:
        router = upnp_router(lab, Path(tmp))
        try:
            result = router.net.c.python(CHILD, str(args.rounds), timeout=600, env={
                **os.environ, "PYTHONPATH": pythonpath()}).stdout
            left = router.mappings()
        finally:
            router.close()
    print(f"qp2p {os.environ.get('QP2P_ENGINE', 'auto')} engine, {args.rounds} rounds each")
    for name, (binds, maps, closes) in json.loads(result).items():
        line = f"{name:7s} bind {ms(binds)}"
        if maps:
            line += f" | bind -> public_addr {ms(maps)}"
        print(line + f" | close {ms(closes)}")
    print("leases left on the router:", left)


if __name__ == "__main__":
    main()
