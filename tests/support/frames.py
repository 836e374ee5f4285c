"""qp2p's stream frame, built by hand for tests that feed raw bytes to a decoder or a peer
(the wire format is DESIGN.md's: version, three lengths, kind, reserved, then the parts)."""

from __future__ import annotations


def frame_header(
    lh: int, ld: int, lp: int, kind: int = 0, version: int = 2, reserved: int = 0
) -> bytes:
    """The 16-byte header of a frame whose parts have lengths ``lh``, ``ld``, ``lp``."""
    return (
        version.to_bytes(2, "big")
        + lh.to_bytes(4, "big")
        + ld.to_bytes(4, "big")
        + lp.to_bytes(4, "big")
        + bytes([kind, reserved])
    )


def frame(header: bytes, dst: bytes, payload: bytes, *, version: int = 2, kind: int = 0,
          reserved: int = 0, lengths: tuple[int, int, int] | None = None) -> bytes:
    """A whole frame; ``lengths`` overrides the lengths the header claims (to lie)."""
    hl, dl, pl = lengths or (len(header), len(dst), len(payload))
    return frame_header(hl, dl, pl, kind, version, reserved) + header + dst + payload
