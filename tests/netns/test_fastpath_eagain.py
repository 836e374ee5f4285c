"""``send_batch`` meeting EAGAIN resumes without loss, compiled module and twin, in a
private network namespace whose loopback has a rate-limiting qdisc (fixture ``fp``)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from types import ModuleType

import pytest

from tests.support.paths import CWD, pythonpath

# The EAGAIN path needs a socket whose send buffer really fills. On the host's loopback
# the kernel frees a datagram's send buffer at once, so this runs in a private network
# namespace whose loopback has a rate-limiting qdisc (a real kernel queue, no mocks).
EAGAIN_SCRIPT = r"""
import json, select, socket, sys, time
from qp2p import _speedups
_speedups.select(sys.argv[1])
fp = _speedups.impl

rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
rx.bind(("127.0.0.1", 0))
rx.setblocking(False)
tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
tx.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)
tx.bind(("127.0.0.1", 0))
tx.setblocking(False)
import random
rng = random.Random(7)
payloads = [rng.randbytes(rng.randint(1, 1472)) for _ in range(1500)]
datagrams = [(d, rx.getsockname()) for d in payloads]

def receive_exactly(count):
    got = []
    deadline = time.monotonic() + 5
    while len(got) < count and time.monotonic() < deadline:
        select.select([rx], [], [], 0.05)
        got += fp.recv_batch(rx)
    time.sleep(0.05)
    got += fp.recv_batch(rx)  # nothing more may come
    return got

received, calls, partial, pos, errors = [], 0, 0, 0, 0
while pos < len(datagrams):
    select.select([], [tx], [], 5)
    nxt, errs = fp.send_batch(tx, datagrams, pos)
    calls += 1
    errors += errs
    assert pos <= nxt <= len(datagrams)
    if nxt < len(datagrams):
        partial += 1
    # the receiver reads only now: exactly datagrams[pos:nxt] must arrive
    got = receive_exactly(nxt - pos)
    assert [d for d, _ in got] == payloads[pos:nxt], (pos, nxt, len(got))
    received += got
    pos = nxt
print(json.dumps({"calls": calls, "partial": partial, "errors": errors,
                  "received": len(received), "same": [d for d, _ in received] == payloads,
                  "features": fp.features()}))
"""


def netns_available() -> bool:
    return os.geteuid() == 0 and all(shutil.which(t) for t in ("unshare", "ip", "tc"))


@pytest.mark.netns
@pytest.mark.skipif(not netns_available(), reason="needs root, unshare, ip and tc")
@pytest.mark.parametrize("gso", ["gso-on", "gso-off"])
def test_send_batch_eagain_resumes_without_loss(fp: ModuleType, gso: str) -> None:
    name = "cython" if fp.__name__.endswith("_fastpath") else "python"
    env = dict(os.environ, PYTHONPATH=pythonpath())
    env.pop("QP2P_NO_EXTENSIONS", None)
    if gso == "gso-off":
        env["QP2P_NO_GSO"] = "1"
    else:
        env.pop("QP2P_NO_GSO", None)
    setup = (
        "ip link set lo up && "
        "tc qdisc add dev lo root tbf rate 40mbit burst 16kb latency 2s && "
        'exec "$0" -c "$1" "$2"'
    )
    proc = subprocess.run(
        ["unshare", "-n", "sh", "-c", setup, sys.executable, EAGAIN_SCRIPT, name],
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        cwd=CWD,
    )
    if (
        proc.returncode != 0
        and "Operation not permitted" in proc.stderr
        and "unshare" in proc.stderr
    ):
        pytest.skip("network namespaces are not permitted here")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["partial"] >= 1, result  # EAGAIN really happened, and more than once
    assert result["calls"] > 2
    assert result["errors"] == 0
    assert result["received"] == 1500 and result["same"], result
