"""Write the committed seed corpora (fuzz/corpus/frames, fuzz/corpus/datagrams).

Run once from the repository root: ``.venv/bin/python fuzz/make_seeds.py``. Frames are
valid (and a few near-valid) frames behind the control bytes ``fuzz_frames.py`` reads;
datagrams are a real aioquic handshake's packets (``tests.support.packets.captured``).
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from qp2p import _purepy  # noqa: E402
from tests.support.frames import frame_header  # noqa: E402
from tests.support.packets import captured  # noqa: E402

enc = _purepy.encode_frame


def frame_seeds() -> list[bytes]:
    frames = [
        enc(b"", b"", b"x"),
        enc(b"hdr", b"destination", b"payload!", 0),
        enc(b"", b"", b"1.2.3.4:5", 2),
        enc(b"h" * 40, b"d" * 20, bytes(range(256)), 7),
        frame_header(0, 0, 2**32 - 1) + b"abc",  # claims 4 GiB
        frame_header(2**32 - 1, 2**32 - 1, 2**32 - 1, 1),
    ]
    seeds = []
    for f in frames:
        seeds.append(b"\x00\x00" + f)  # whole, fin on it, limit = its length
    body = enc(b"hd", b"dst", b"payload in pieces", 3)
    seeds += [
        b"\x00\x03" + bytes([3, 10, 5]) + body,  # four pieces
        b"\x01\x13" + bytes([16, 0, 2]) + body,  # never fin, bytearray pieces
        b"\x02\x33" + bytes([0x85, 11, 0x80]) + body,  # fin per piece, rotating wraps
        b"\x03\x21" + bytes([16]) + body,  # late feeds after the end, memoryview
        b"\x04\x00" + body,  # limit one below the frame
        b"\x00\x0f" + bytes(range(1, 16)) + body + b"trailing",
    ]
    return seeds


def datagram_seeds() -> list[bytes]:
    return [bytes([8]) + d for d in captured().datagrams] + [
        bytes([8]) + bytes([0xC0, 0x1A, 0x2A, 0x3A, 0x4A, 8]) + bytes(8) + b"\x08" + bytes(8),
        bytes([0]) + b"\x40",
    ]


def write(name: str, seeds: list[bytes]) -> None:
    out = ROOT / "fuzz" / "corpus" / name
    out.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        (out / hashlib.sha1(seed).hexdigest()[:16]).write_bytes(seed)
    print(f"{out}: {len(seeds)} seeds")


if __name__ == "__main__":
    write("frames", frame_seeds())
    write("datagrams", datagram_seeds())
