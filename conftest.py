"""pytest's set-up for this tree: which qp2p the suite tests.

The tests import helpers from the ``tests`` package (``tests.netlab``, ``tests.conftest``),
so this directory must be on ``sys.path``; but it must not shadow an installed qp2p. A packager
who unpacks the sdist, installs the wheel and runs ``pytest`` there wants the installed
package tested, not the uncompiled source beside the tests. So this directory goes to the
*end* of ``sys.path``, behind site-packages: an installed qp2p wins, and this tree's is the
fallback. In a checkout ``make test`` installs qp2p in editable mode, so the qp2p found is
this tree, with its in-place build, either way. The header of every run says which one it is,
and ``tests/support/paths.py`` gives subprocesses the same one.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent


def _is_root(entry: str) -> bool:
    try:
        return Path(entry or ".").resolve() == ROOT
    except OSError:  # pragma: no cover - an unreadable sys.path entry
        return False


sys.path[:] = [p for p in sys.path if not _is_root(p)] + [str(ROOT)]


def pytest_report_header(config: pytest.Config) -> str:
    import qp2p

    return f"qp2p under test: {Path(qp2p.__file__).parent} ({qp2p.implementation} fast path)"
