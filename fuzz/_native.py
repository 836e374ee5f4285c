"""Which compiled fast path the fuzz targets check.

By default the in-tree ``qp2p._fastpath``. With ``QP2P_FUZZ_NATIVE_EXT`` naming a copy
of the extension built with ``-fsanitize=fuzzer-no-link`` (``run.sh`` under
``FUZZ_NATIVE=1``), that copy, so its C code gives libFuzzer coverage too. Its
sanitizer-coverage hooks must resolve against the libFuzzer inside atheris, which
atheris loads privately when fuzzing starts: the copy is therefore loaded on the first
input, after that library has been made global (a dlopen with RTLD_NOLOAD|RTLD_GLOBAL
of the very same file: one libFuzzer, which then registers the copy's counters).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
from types import ModuleType

_loaded: list[ModuleType] = []


def _load_native(path: str) -> ModuleType:
    with open("/proc/self/maps") as maps:
        cores = sorted({line.split()[-1] for line in maps if "core_with_libfuzzer" in line})
    if not cores:
        raise RuntimeError("atheris' libFuzzer is not loaded: call fastpath() while fuzzing")
    ctypes.CDLL(cores[0], mode=os.RTLD_NOW | os.RTLD_GLOBAL | os.RTLD_NOLOAD)
    spec = importlib.util.spec_from_file_location("qp2p._fastpath", path)
    if spec is None or spec.loader is None:
        raise RuntimeError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fastpath() -> ModuleType:
    """The compiled module under test (loaded once)."""
    if not _loaded:
        import qp2p  # noqa: F401  (the extension imports qp2p.errors while it loads)

        path = os.environ.get("QP2P_FUZZ_NATIVE_EXT")
        if path:
            module = _load_native(path)
        else:
            from qp2p import _fastpath as module
        print(f"compiled module under test: {module.__file__}", file=sys.stderr)
        _loaded.append(module)
    return _loaded[0]
