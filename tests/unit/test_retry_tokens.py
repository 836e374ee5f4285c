"""Stateless Retry tokens (RFC 9000 §8.1.2): what makes one valid."""

from __future__ import annotations

from qp2p import engine


def test_retry_tokens_bound_to_address_secret_and_time() -> None:
    """A Retry token validates only for the address it was issued to, at the endpoint
    that issued it, for the Retry's own connection ID, within its lifetime."""
    validator, other = engine.AddressValidator(), engine.AddressValidator()
    addr, odcid, scid = ("198.18.0.7", 4433), b"\x01" * 8, b"\x02" * 8
    token = validator.make_token(addr, odcid, scid, now=100.0)

    def header(token: bytes, dcid: bytes = scid) -> engine.LongHeader:
        return engine.LongHeader(1, True, dcid, b"\x03" * 8, token)

    assert validator.validate(header(token), addr, now=101.0) == odcid
    assert validator.validate(header(token), ("198.18.0.8", 4433), now=101.0) is None
    assert validator.validate(header(token), ("198.18.0.7", 4434), now=101.0) is None
    assert other.validate(header(token), addr, now=101.0) is None  # per-endpoint secret
    assert validator.validate(header(token, b"\x09" * 8), addr, now=101.0) is None
    assert validator.validate(header(token), addr, now=100.0 + validator.lifetime + 1) is None
    assert validator.validate(header(token), addr, now=90.0) is None  # from the future
    tampered = bytearray(token)
    tampered[3] ^= 1
    assert validator.validate(header(bytes(tampered)), addr, now=101.0) is None
    for junk in (b"", b"x", token[:-1], token + b"x", bytes(len(token))):
        assert validator.validate(header(junk), addr, now=101.0) is None
