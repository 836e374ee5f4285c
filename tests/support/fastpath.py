"""Helpers for the fast-path tests: the two implementations, and outcomes comparable
across them (the ``fp`` fixture itself is in ``tests/conftest.py``)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any

from qp2p import _purepy


def compiled() -> ModuleType:
    """The compiled module; an ImportError here fails the test (the build is required)."""
    return importlib.import_module("qp2p._fastpath")


def both() -> tuple[ModuleType, ModuleType]:
    """(compiled, twin)."""
    return compiled(), _purepy


def outcome(fn: Callable[..., Any], *args: Any) -> tuple[Any, ...]:
    """A call's result, or its exception's type and message: comparable across twins."""
    try:
        return ("ok", fn(*args))
    except Exception as exc:
        return ("raised", type(exc), str(exc))
