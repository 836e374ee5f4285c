"""qp2p's one address parser (``wire.parse_address``): what the API, the command line and
control messages accept as address text, with the same rules everywhere."""

from __future__ import annotations

import pytest

from qp2p import wire
from qp2p.errors import ProtocolError


@pytest.mark.parametrize(("text", "want"), [
    ("127.0.0.1:5000", ("127.0.0.1", 5000)),
    (" example.org:0 ", ("example.org", 0)),  # port 0: bind picks one
    ("[::1]:65535", ("::1", 65535)),
    ("[::ffff:198.18.0.1]:7", ("::ffff:198.18.0.1", 7)),
])
def test_parse_address_accepts(text: str, want: wire.Address) -> None:
    assert wire.parse_address(text) == want
    assert wire.to_address(text) == want  # the API's parameters take the same text


@pytest.mark.parametrize("text", [
    "127.0.0.1", ":5000", "[]:5000", "::1:5000", "host:65536", "host:-1", "host:x",
    "host:\u00b2", "host:",
])
def test_parse_address_refuses(text: str) -> None:
    with pytest.raises(ValueError):
        wire.parse_address(text)
    with pytest.raises(ValueError):
        wire.to_address(text)


def test_control_message_addresses_round_trip() -> None:
    """A control message's address is the echo's text form, parsed by the same rules,
    and never port 0 (nobody can be reached there)."""
    for addr in (("198.18.0.2", 5), ("2001:2::1", 443), ("::ffff:198.18.0.2", 9)):
        text = wire.format_addr(addr)
        assert wire.parse_addr(text) == wire.to_address(wire.addr_text(addr))
    for junk in (b"198.18.0.2:0", b"\xff:1", b"::1:5", b"nothing"):
        with pytest.raises(ProtocolError):
            wire.parse_addr(junk)
