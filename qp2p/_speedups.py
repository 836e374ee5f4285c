"""Pick the fast path: the compiled ``qp2p._fastpath`` or its twin ``qp2p._purepy``.

The compiled module is used unless it is not built (or fails to import) or the
environment sets ``QP2P_NO_EXTENSIONS`` to a non-empty value other than ``"0"``.
Both modules expose the same names with the same behaviour.

``impl`` is the chosen module and ``implementation`` its name (``"cython"`` or
``"python"``). Read ``_speedups.impl`` when you need it rather than binding it once
at import: ``select`` (used by tests) switches it at runtime.
"""

from __future__ import annotations

import importlib
import logging
import os
from types import ModuleType

__all__ = ["impl", "implementation", "select"]

logger = logging.getLogger(__name__)

_MODULES = {"cython": "qp2p._fastpath", "python": "qp2p._purepy"}

impl: ModuleType
"""The active fast-path module."""
implementation: str
"""``"cython"`` or ``"python"``: which module ``impl`` is."""


def _load(name: str) -> ModuleType:
    if name not in _MODULES:
        raise ValueError(f"unknown implementation {name!r}: expected 'cython' or 'python'")
    if name == "cython":
        try:
            return importlib.import_module(_MODULES[name])
        except ImportError as exc:
            raise ImportError(
                "qp2p's compiled fast path (qp2p._fastpath) is not available: build it "
                "with `python setup.py build_ext --inplace` (or install qp2p from a wheel); "
                f"import failed with: {exc}"
            ) from exc
    return importlib.import_module(_MODULES[name])


def select(name: str) -> None:
    """Switch the active implementation to ``"cython"`` or ``"python"``.

    Raises ``ImportError`` if ``"cython"`` is asked for and the extension is not built,
    ``ValueError`` for any other name.
    """
    global impl, implementation
    module = _load(name)
    impl = module
    implementation = name
    logger.debug("qp2p fast path: using the %s implementation (%s)", name, module.__name__)


def _forced_python() -> bool:
    value = os.environ.get("QP2P_NO_EXTENSIONS", "")
    return value not in ("", "0")


def _initial() -> None:
    if _forced_python():
        logger.debug("qp2p fast path: QP2P_NO_EXTENSIONS is set")
        select("python")
        return
    try:
        select("cython")
    except ImportError as exc:
        logger.debug("qp2p fast path: compiled module unavailable (%s)", exc.__cause__ or exc)
        select("python")


_initial()
