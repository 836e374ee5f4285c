"""The documentation cannot rot: PyPI's long description is the one tools/pypi_readme.py
writes from README.md, and opens with what a user needs (not ``make demo``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _load_tool(name: str) -> object:
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pypi_description_is_written_from_readme() -> None:
    tool = _load_tool("pypi_readme")
    expected = tool.render((ROOT / "README.md").read_text())  # type: ignore[attr-defined]
    actual = (ROOT / "docs" / "pypi.md").read_text()
    assert actual == expected, "docs/pypi.md is stale: run `python tools/pypi_readme.py`"
    head = actual[:600]
    assert head.startswith("# qp2p\n\nqp2p is a peer-to-peer messaging library"), head
    assert "make demo" not in actual
    assert "## Install\n" in actual and 'pip install "./qp2p-' in actual
