"""``engine.replace_transport_parameters``: how the qh3 adapter puts qp2p's stream limits
into qh3's own transport-parameter encoding (which fixes them at 100 and 103), in one
pass instead of a decode and re-encode of every parameter."""

from __future__ import annotations

import pytest

from qp2p.engine import (
    TP_INITIAL_MAX_STREAMS_BIDI,
    TP_INITIAL_MAX_STREAMS_UNI,
    TP_MAX_MESSAGE_SIZE,
    encode_transport_parameters,
    parse_peer_parameters,
    replace_transport_parameters,
)

packet = pytest.importorskip("qh3.quic.packet")
hazmat = pytest.importorskip("qh3._hazmat")


def _encoded(params: object) -> bytes:
    buf = hazmat.Buffer(capacity=4096)
    packet.push_quic_transport_parameters(buf, params)
    return bytes(buf.data)


def _decoded(data: bytes) -> object:
    return packet.pull_quic_transport_parameters(hazmat.Buffer(data=data))


def _qh3_parameters(**overrides: object) -> object:
    """What qh3's TLS bridge advertises (its fixed stream limits included)."""
    fields: dict[str, object] = {
        "ack_delay_exponent": 3,
        "active_connection_id_limit": 8,
        "max_idle_timeout": 60_000,
        "initial_max_data": 1 << 20,
        "initial_max_stream_data_bidi_local": 1 << 18,
        "initial_max_stream_data_bidi_remote": 1 << 18,
        "initial_max_stream_data_uni": 1 << 18,
        "initial_max_streams_bidi": 100,
        "initial_max_streams_uni": 103,
        "initial_source_connection_id": b"\x01" * 8,
        "max_ack_delay": 25,
        "max_datagram_frame_size": 65536,
        "stateless_reset_token": b"\x02" * 16,
    }
    fields.update(overrides)
    return packet.QuicTransportParameters(**fields)


@pytest.mark.parametrize("bidi, uni", [(100, 100), (1, 60), (4000, 16_384), (0, 0)])
def test_same_bytes_as_decode_and_reencode(bidi: int, uni: int) -> None:
    original = _encoded(_qh3_parameters())
    # what the adapter did before: decode everything, set the two limits, encode again
    params = _decoded(original)
    params.initial_max_streams_bidi, params.initial_max_streams_uni = bidi, uni
    expected = _encoded(params)
    got = replace_transport_parameters(
        original, {TP_INITIAL_MAX_STREAMS_BIDI: bidi, TP_INITIAL_MAX_STREAMS_UNI: uni}
    )
    assert got == expected
    back = _decoded(got)
    assert (back.initial_max_streams_bidi, back.initial_max_streams_uni) == (bidi, uni)
    assert back.initial_max_data == 1 << 20 and back.max_ack_delay == 25


def test_missing_parameters_are_appended_and_others_kept() -> None:
    original = _encoded(_qh3_parameters(initial_max_streams_bidi=None,
                                        initial_max_streams_uni=None))
    got = replace_transport_parameters(
        original, {TP_INITIAL_MAX_STREAMS_BIDI: 7, TP_INITIAL_MAX_STREAMS_UNI: 9}
    )
    assert got.startswith(original)
    back = _decoded(got)
    assert (back.initial_max_streams_bidi, back.initial_max_streams_uni) == (7, 9)


def test_qp2p_parameters_still_found_after_the_rewrite() -> None:
    original = _encoded(_qh3_parameters())
    ours = encode_transport_parameters(1 << 20, receipts=True)
    blob = replace_transport_parameters(original, {TP_INITIAL_MAX_STREAMS_UNI: 5}) + ours
    assert parse_peer_parameters(blob) == (1 << 20, True, False)
    # a qp2p parameter can be replaced too (any integer parameter)
    changed = replace_transport_parameters(blob, {TP_MAX_MESSAGE_SIZE: 4096})
    assert parse_peer_parameters(changed).max_message_size == 4096


@pytest.mark.parametrize("bad", [b"\x08", b"\x08\x05\x01", b"\x40"])
def test_malformed_input_is_a_value_error(bad: bytes) -> None:
    with pytest.raises(ValueError, match="malformed transport parameters"):
        replace_transport_parameters(bad, {TP_INITIAL_MAX_STREAMS_UNI: 1})
