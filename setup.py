"""Build the compiled fast path; everything else is in pyproject.toml.

The sdist ships the generated ``_fastpath.c`` so a user without Cython can
still build it. ``QP2P_NO_EXTENSIONS=1`` at build time skips the extension
(the package then runs on its pure-Python twin).
"""

import os
from pathlib import Path

from setuptools import Extension, setup

HERE = Path(__file__).parent
PYX = HERE / "qp2p" / "_fastpath.pyx"
C_SRC = HERE / "qp2p" / "_fastpath.c"


def extensions() -> list[Extension]:
    if os.environ.get("QP2P_NO_EXTENSIONS"):
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        cythonize = None
    if cythonize is not None and PYX.exists():
        return cythonize(
            [Extension("qp2p._fastpath", ["qp2p/_fastpath.pyx"], extra_compile_args=["-O2"])],
            compiler_directives={
                "language_level": "3",
                "boundscheck": False,
                "wraparound": False,
                "cdivision": True,
            },
        )
    return [Extension("qp2p._fastpath", ["qp2p/_fastpath.c"], extra_compile_args=["-O2"])]


setup(ext_modules=extensions())
