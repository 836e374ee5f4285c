"""Where things are: the tree's root, the test helpers subprocesses run, and the qp2p
under test, for tests that start Python subprocesses.

The subprocess must import the same qp2p as the test process: this tree in a checkout, the
installed package when the suite runs from an unpacked sdist against an installed wheel (see
the rootdir ``conftest.py``). So its ``PYTHONPATH`` names the directory qp2p was imported from
first and this tree (for the ``tests`` package) second, and it runs in ``CWD``, a directory
without a ``qp2p`` package in it (``python -m`` and ``-c`` put the working directory first on
``sys.path``).
"""

from __future__ import annotations

import os
from pathlib import Path

import qp2p

#: The checkout (or unpacked sdist): the directory holding ``tests/``, ``qp2p/``, ``examples/``.
ROOT = Path(__file__).resolve().parents[2]
#: The test helpers' directory (``tests/support/``).
SUPPORT = ROOT / "tests" / "support"
#: The script of a qp2p peer in its own process (see its docstring).
PEER_PROC = SUPPORT / "peer_proc.py"
#: The directory that holds the ``qp2p`` package under test.
QP2P_HOME = Path(qp2p.__file__).resolve().parent.parent
#: A working directory for subprocesses that does not shadow the qp2p under test.
CWD = ROOT / "tests"


def pythonpath(*extra: str) -> str:
    """``PYTHONPATH`` for a child: ``extra`` first, then the qp2p under test, then this tree."""
    entries = [*extra, str(QP2P_HOME), str(ROOT)]
    return os.pathsep.join(dict.fromkeys(entries))
