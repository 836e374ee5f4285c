"""Config and RetryConfig validation (no network)."""

from __future__ import annotations

import pytest

import qp2p


def test_defaults_match_the_api_contract() -> None:
    cfg = qp2p.Config()
    assert (cfg.idle_timeout, cfg.keep_alive_interval, cfg.max_message_size) == (
        10.0, None, 16 * 2**20)
    assert (cfg.max_concurrent_bidi_streams, cfg.max_concurrent_uni_streams) == (100, 100)
    assert cfg.handshake_timeout == 10.0 and cfg.max_datagram_size == 1200
    assert cfg.require_address_validation is False
    retry = qp2p.RetryConfig()
    assert (retry.initial_interval, retry.multiplier, retry.max_interval,
            retry.randomization_factor, retry.max_elapsed_time) == (0.5, 1.5, 15.0, 0.3, 30.0)
    with pytest.raises(AttributeError):
        cfg.idle_timeout = 1.0  # type: ignore[misc]


def test_config_bounds() -> None:
    for bad in (
        {"max_concurrent_uni_streams": 2**61},
        {"max_concurrent_bidi_streams": 10**20},
        {"max_buffered_bytes": 2**63},
        {"max_message_size": 2**32},
        {"retry": qp2p.RetryConfig()} | {"idle_timeout": -1},
    ):
        with pytest.raises(ValueError):
            qp2p.Config(**bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        qp2p.RetryConfig(initial_interval=20, max_interval=10)


def test_hardening_limits_validated() -> None:
    cfg = qp2p.Config()
    assert cfg.max_buffered_bytes >= cfg.max_message_size + 16
    assert cfg.max_endpoint_buffered_bytes >= cfg.max_buffered_bytes
    for bad in (
        {"max_buffered_bytes": 2**20},  # smaller than one largest message
        {"max_endpoint_buffered_bytes": 2**20},
        {"max_connections_per_ip": 0},
        {"address_validation_threshold": -1},
        {"max_connections_per_ip": True},
        {"max_accept_backlog": 0},
        {"max_accept_backlog": 1.5},
    ):
        with pytest.raises(ValueError):
            qp2p.Config(**bad)
    least = 1000 + 16 + 128 * 2**10
    small = qp2p.Config(max_message_size=1000, max_buffered_bytes=least,
                        max_endpoint_buffered_bytes=least)
    assert small.max_buffered_bytes == least
    with pytest.raises(ValueError, match="max_message_size"):
        qp2p.Config(max_message_size=1000, max_buffered_bytes=least - 1)


def test_config_port_mapping_values() -> None:
    """API.md: False by default, True maps; a tuple picks protocols; nothing else."""
    assert qp2p.Config().port_mapping is False
    assert qp2p.Config(port_mapping=True).port_mapping is True
    assert qp2p.Config(port_mapping=("natpmp", "upnp")).port_mapping == ("natpmp", "upnp")
    for bad in [("ssh",), (), ("pcp", "pcp"), ["pcp"], "pcp", 1]:
        with pytest.raises(ValueError, match="port_mapping"):
            qp2p.Config(port_mapping=bad)  # type: ignore[arg-type]


#: every numeric field of RetryConfig and Config, and values of the wrong type for them
_RETRY_NUMBERS = ("initial_interval", "multiplier", "max_interval", "randomization_factor",
                  "max_elapsed_time")
_CONFIG_NUMBERS = ("idle_timeout", "keep_alive_interval", "max_message_size",
                   "max_concurrent_bidi_streams", "max_concurrent_uni_streams",
                   "handshake_timeout", "max_datagram_size", "max_pending_send_bytes",
                   "max_buffered_bytes", "max_endpoint_buffered_bytes", "max_connections",
                   "max_connections_per_ip", "max_accept_backlog",
                   "address_validation_threshold", "hole_punch_timeout")
_WRONG_TYPES = ("x", b"1", [1], {}, object(), True, False, complex(1, 0), float("nan"))
#: what a float field must also refuse: an int no float holds
_FLOAT_FIELDS = ("initial_interval", "multiplier", "max_interval", "randomization_factor",
                 "max_elapsed_time", "idle_timeout", "keep_alive_interval",
                 "handshake_timeout", "hole_punch_timeout")


@pytest.mark.parametrize("name", _RETRY_NUMBERS)
def test_retry_config_wrong_types_raise_value_error(name: str) -> None:
    """API.md: bad values raise ValueError, naming the field: not a TypeError from a
    comparison (``randomization_factor="x"`` did), not OverflowError, and a bool is no
    number. None is a wrong value for every RetryConfig field."""
    for bad in (*_WRONG_TYPES, 10**400, None):
        with pytest.raises(ValueError, match=name):
            qp2p.RetryConfig(**{name: bad})  # type: ignore[arg-type]


@pytest.mark.parametrize("name", _CONFIG_NUMBERS)
def test_config_wrong_types_raise_value_error(name: str) -> None:
    """The same for Config's numeric fields (None is allowed where API.md says so)."""
    nullable = name in ("idle_timeout", "keep_alive_interval")
    huge = (10**400,) if name in _FLOAT_FIELDS else ()
    for bad in (*_WRONG_TYPES, *huge, *(() if nullable else (None,))):
        with pytest.raises(ValueError, match=name):
            qp2p.Config(**{name: bad})  # type: ignore[arg-type]
    if nullable:
        assert getattr(qp2p.Config(**{name: None}), name) is None  # type: ignore[arg-type]


def test_randomization_factor_range_still_holds() -> None:
    assert qp2p.RetryConfig(randomization_factor=0).randomization_factor == 0
    assert qp2p.RetryConfig(randomization_factor=0.99).randomization_factor == 0.99
    for bad in (-0.1, 1, 1.5, float("inf")):
        with pytest.raises(ValueError, match="randomization_factor"):
            qp2p.RetryConfig(randomization_factor=bad)
