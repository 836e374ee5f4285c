"""``python -m qp2p``: the same as the ``qp2p`` command (see :mod:`qp2p.cli`)."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
