"""atheris target: the compiled frame parser, checked against its pure-Python twin.

One input is a control header and a stream (see ``plan``). The stream is cut into
pieces whose lengths come from the input, fed to ``FrameAssembler`` of the compiled
``qp2p._fastpath`` and of ``qp2p._purepy``, and decoded whole by both ``decode_frame``.
The stream cut in three is also encoded by both ``encode_frame``.
A crash is any exception other than ``ProtocolError``, any difference between the two
(results, error messages, ``buffered`` after every feed), or a broken invariant:
``buffered`` is what was fed while the frame is open and 0 after, every error and
result is what ``decode_frame`` says about the bytes fed so far, a result re-encodes
to exactly those bytes, and a failed assembler repeats its error.

Coverage: the twin's bytecode is instrumented (``atheris.instrument_imports``); with
``QP2P_FUZZ_NATIVE_EXT`` naming a copy of the extension built with
``-fsanitize=fuzzer-no-link`` (``run.sh`` does this under ``FUZZ_NATIVE=1``), that copy
is the one checked and its C code gives coverage too.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import atheris

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the in-tree qp2p
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _native import fastpath

import qp2p  # noqa: F401  (the package first, uninstrumented)
from qp2p.errors import ProtocolError

assert "qp2p._purepy" not in sys.modules, "the twin must be imported instrumented"
with atheris.instrument_imports(include=["qp2p._purepy"]):
    from qp2p import _purepy as twin


class Mismatch(AssertionError):
    """The two implementations disagree, or an invariant is broken."""


# Control byte 0: fin mode (bits 0-1), limit (bits 2-4), max_kind (bits 5-7).
MAX_KINDS = (7, 0, 1, 6, 8, 127, 254, 255)
WRAPS: tuple[Callable[[bytes], Any], ...] = (
    bytes,
    bytearray,
    lambda b: memoryview(b"<" + b + b">")[1 : 1 + len(b)],
)


def claimed(stream: bytes) -> int:
    """The frame length the stream's header claims (16 while there is no header)."""
    if len(stream) < 16:
        return 16
    return 16 + sum(int.from_bytes(stream[i : i + 4], "big") for i in (2, 6, 10))


def limit_for(index: int, stream: bytes) -> int:
    total = claimed(stream)
    return (total, total - 1, 16 << 20, 1 << 40, 0, 17, 1 << 16, 1 << 80)[index]


def plan(data: bytes) -> tuple[list[tuple[bytes, bool, int]], int, int, bytes]:
    """``(feeds, limit, max_kind, stream)`` from one input.

    Byte 0: control (above). Byte 1: pieces - 1 (bits 0-3) and how pieces are wrapped
    (bits 4-5: bytes, bytearray, memoryview, or rotating). Then one byte per piece but
    the last: its length (bits 0-6) and, in fin mode 2, its fin flag (bit 7). The rest
    is the stream; the last piece takes what is left (with fin in modes 0, 2 and 3).
    Fin modes: 0 on the last piece, 1 never, 2 per piece, 3 last and then late feeds.
    """
    control = data[0] if data else 0
    shape = data[1] if len(data) > 1 else 0
    count = (shape & 0x0F) + 1
    lens = data[2 : 2 + count - 1]
    stream = data[2 + len(lens) :]
    fin_mode = control & 3
    wrap_mode = (shape >> 4) & 3
    feeds: list[tuple[bytes, bool, int]] = []
    pos = 0
    for i in range(count):
        if i < len(lens):
            size = lens[i] & 0x7F
            piece = stream[pos : pos + size]
            flag = bool(lens[i] & 0x80)
        else:
            piece = stream[pos:]
            flag = True
        pos += len(piece)
        last = i == count - 1
        fin = {0: last, 1: False, 2: flag, 3: last}[fin_mode]
        wrap = wrap_mode if wrap_mode < 3 else i % 3
        feeds.append((piece, fin, wrap))
    if fin_mode == 3:  # late feeds after the end
        feeds += [(b"", True, 0), (b"x", False, 1), (b"", True, 2)]
    limit = limit_for((control >> 2) & 7, stream)
    return feeds, limit, MAX_KINDS[control >> 5], stream


def outcome(call: Callable[[], Any]) -> tuple[Any, ...]:
    """A call's result, or the message of its ``ProtocolError``; anything else escapes."""
    try:
        return ("ok", call())
    except ProtocolError as exc:
        if type(exc) is not ProtocolError:
            raise
        return ("raised", str(exc))


def run(mod: ModuleType, feeds: list[tuple[bytes, bool, int]], limit: int,
        max_kind: int) -> list[tuple[Any, ...]]:
    asm = mod.FrameAssembler(limit, max_kind)
    trace: list[tuple[Any, ...]] = []
    fed = b""
    state = "open"
    for piece, fin, wrap in feeds:
        got = outcome(lambda: asm.feed(WRAPS[wrap](piece), fin))  # noqa: B023
        fed += piece
        buffered = asm.buffered
        trace.append((got, buffered))
        if state != "open":
            if state == "done":
                want = ("raised", f"{len(piece)} bytes after the end of the frame") \
                    if piece else ("ok", None)
            else:
                want = ("raised", state)
            if got != want or buffered != 0:
                raise Mismatch(f"{mod.__name__}: after {state!r}: {got}, buffered {buffered}")
            if got[0] == "raised":
                state = got[1]
            continue
        whole = outcome(lambda: mod.decode_frame(fed, limit, max_kind))  # noqa: B023
        if got[0] == "raised":
            if whole != got or buffered != 0:
                raise Mismatch(f"{mod.__name__}: feed {got} but decode {whole}, "
                               f"buffered {buffered}")
            state = got[1]
        elif got[1] is not None:
            kind, header, dst, payload = got[1]
            if not fin or whole != got or buffered != 0 \
                    or mod.encode_frame(header, dst, payload, kind) != fed \
                    or {type(header), type(dst), type(payload)} != {bytes}:
                raise Mismatch(f"{mod.__name__}: result {got} for {fed!r} (decode {whole})")
            state = "done"
        elif fin or buffered != len(fed) or not (
            whole[0] == "ok" or whole[1].startswith("stream ended after")
        ):
            raise Mismatch(f"{mod.__name__}: open after {len(fed)} bytes, fin={fin}, "
                           f"buffered {buffered}, decode {whole}")
    return trace


def TestOneInput(data: bytes) -> None:
    fast = fastpath()
    feeds, limit, max_kind, stream = plan(data)
    a = run(fast, feeds, limit, max_kind)
    b = run(twin, feeds, limit, max_kind)
    if a != b:
        raise Mismatch(f"traces differ:\n compiled {a}\n twin     {b}")
    third = len(stream) // 3
    parts = (stream[:third], stream[third : 2 * third], stream[2 * third :])
    kind = stream[0] if stream else 0
    for wrap in WRAPS:
        da = outcome(lambda: fast.decode_frame(wrap(stream), limit, max_kind))  # noqa: B023
        db = outcome(lambda: twin.decode_frame(wrap(stream), limit, max_kind))  # noqa: B023
        if da != db:
            raise Mismatch(f"decode_frame differs: compiled {da}, twin {db}")
        # and the encoder, on the stream cut in three
        ea = fast.encode_frame(*(wrap(p) for p in parts), kind)
        if ea != twin.encode_frame(*(wrap(p) for p in parts), kind) or type(ea) is not bytes:
            raise Mismatch(f"encode_frame differs on {parts!r}, kind {kind}")


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
