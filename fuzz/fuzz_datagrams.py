"""atheris target: the datagram routing path, compiled against twin.

Byte 0 of an input picks the short-header connection-ID length (``% 21``); the rest is
one datagram. Both ``parse_dcid`` must agree with RFC 8999's invariants (written out
here), both ``ConnectionTable.lookup`` must find exactly the entry for that ID (for
bytes, bytearray and memoryview alike), and ``qp2p._aioquic.parse_long_header`` must
return ``None`` or a header consistent with that ID, never raise. Any difference or
exception is a crash.

Coverage comes from the twin, ``parse_long_header`` and aioquic's ``pull_quic_header``
(instrumented bytecode), plus the extension's C code under ``FUZZ_NATIVE=1``.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the in-tree qp2p
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _native import fastpath
from aioquic.quic import packet as quic_packet

from qp2p import engine
from qp2p.engine import _aioquic

assert "qp2p._purepy" not in sys.modules, "the twin must be imported instrumented"
with atheris.instrument_imports(include=["qp2p._purepy"]):
    from qp2p import _purepy as twin
atheris.instrument_func(_aioquic.parse_long_header)
atheris.instrument_func(quic_packet.pull_quic_header)

# Known connection IDs: some fixed, plus (per input) the one the datagram carries.
FIXED = [b"", b"\x00" * 8, bytes(range(8)), b"\xff" * 20, b"A" * 4]
WRAPS = (bytes, bytearray, memoryview)


class Mismatch(AssertionError):
    """The two implementations, or an implementation and the RFC, disagree."""


def reference_dcid(data: bytes, short_cid_len: int) -> bytes | None:
    if not data:
        return None
    if data[0] & 0x80:
        if len(data) < 6 or data[5] > 20 or len(data) < 6 + data[5]:
            return None
        return data[6 : 6 + data[5]]
    return data[1 : 1 + short_cid_len] if len(data) >= 1 + short_cid_len else None


def TestOneInput(data: bytes) -> None:
    fast = fastpath()
    short = data[0] % 21 if data else engine.CID_LENGTH
    datagram = data[1:]
    cid = reference_dcid(datagram, short)
    for mod in (fast, twin):
        got = mod.parse_dcid(datagram, short)
        if got != cid or (got is not None and type(got) is not bytes):
            raise Mismatch(f"{mod.__name__}.parse_dcid: {got!r}, RFC 8999 says {cid!r}")
    values: dict[bytes, Any] = {c: i for i, c in enumerate(FIXED)}
    if cid is not None and len(data) & 1:  # half the time the datagram's ID is known
        values[cid] = "mine"
    want = None if cid is None else values.get(cid)
    for mod in (fast, twin):
        table = mod.ConnectionTable(short)
        for key, value in values.items():
            table.add(key, value)
        for wrap in WRAPS:
            got = table.lookup(wrap(datagram))
            if got != want:
                raise Mismatch(f"{mod.__name__}.lookup({wrap.__name__}): {got!r}, want {want!r}")
    header = _aioquic.parse_long_header(datagram)
    if header is None:
        return
    if header.version is None:
        if header.dcid != datagram[1 : 1 + engine.CID_LENGTH] or header.is_initial:
            raise Mismatch(f"short header parsed as {header}")
    elif header.version == 0 or (
        header.dcid != reference_dcid(datagram, engine.CID_LENGTH)
        if header.version in engine.supported_versions()
        # RFC 8999: an unknown version's connection IDs may be up to 255 bytes
        else header.dcid != datagram[6 : 6 + datagram[5]] or header.is_initial
    ):
        raise Mismatch(f"long header parsed as {header}")


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
