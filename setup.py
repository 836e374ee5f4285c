"""Build the compiled fast path; everything else is in pyproject.toml.

The sdist ships the generated ``_fastpath.c`` so a user without Cython can
still build it. Environment switches, read at build time:

- ``QP2P_NO_EXTENSIONS=1`` skips the extension (the package then runs on its
  pure-Python twin);
- without a working C compiler the build does not fail: it warns and installs
  the twin (as msgpack, aiohttp and PyYAML do); ``QP2P_REQUIRE_EXTENSIONS=1``
  makes that an error instead (what wheel builders and CI want);
- ``QP2P_NO_STRIP=1`` keeps the debug symbols (on Linux the extension is linked
  with ``-s``: about 1 MB unstripped, about 165 kB stripped).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.errors import BaseError, CCompilerError

HERE = Path(__file__).parent
PYX = HERE / "qp2p" / "_fastpath.pyx"


def _flag(name: str) -> bool:
    return os.environ.get(name, "") not in ("", "0")


REQUIRE = _flag("QP2P_REQUIRE_EXTENSIONS")
LINK_ARGS = ["-s"] if sys.platform.startswith("linux") and not _flag("QP2P_NO_STRIP") else []


class OptionalBuildExt(build_ext):
    """``build_ext`` that falls back to the pure-Python twin when compiling fails."""

    failed = False

    def run(self) -> None:
        try:
            super().run()
        except (BaseError, OSError) as exc:  # no compiler at all (PlatformError, ...)
            self._fallback(exc)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except (CCompilerError, BaseError, OSError, ValueError) as exc:  # CompileError, ...
            self._fallback(exc)

    def _fallback(self, exc: BaseException) -> None:
        if self.failed:  # e.g. --inplace then finds no .so to copy: already reported
            return
        self.failed = True
        if REQUIRE:
            raise RuntimeError(
                f"qp2p: building the compiled fast path failed ({exc}) and "
                "QP2P_REQUIRE_EXTENSIONS is set"
            ) from exc
        self.warn(
            "\n" + "*" * 72 + "\n"
            f"qp2p: could not build the compiled fast path ({exc}).\n"
            "Installing the pure-Python twin instead: the same behaviour, slower per\n"
            "packet (qp2p.implementation == 'python'). Install a C compiler and the\n"
            "Python headers, then reinstall, to get it; set QP2P_REQUIRE_EXTENSIONS=1\n"
            "to make this an error.\n" + "*" * 72
        )


def extensions() -> list[Extension]:
    if _flag("QP2P_NO_EXTENSIONS"):
        return []
    ext_kw: dict[str, list[str]] = {"extra_compile_args": ["-O2"], "extra_link_args": LINK_ARGS}
    try:
        from Cython.Build import cythonize
    except ImportError:
        cythonize = None
    if cythonize is not None and PYX.exists():
        return cythonize(  # type: ignore[no-any-return]
            [Extension("qp2p._fastpath", ["qp2p/_fastpath.pyx"], **ext_kw)],
            compiler_directives={
                "language_level": "3",
                "boundscheck": False,
                "wraparound": False,
                "cdivision": True,
            },
        )
    return [Extension("qp2p._fastpath", ["qp2p/_fastpath.c"], **ext_kw)]


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
