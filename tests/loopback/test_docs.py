"""The documentation cannot rot: PyPI's long description is the one tools/pypi_readme.py
writes from README.md, and opens with what a user needs (not ``make demo``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from tests.support.paths import ROOT


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


def _public_attrs(obj: object) -> set[str]:
    names = set(getattr(obj, "__dict__", ()))
    for klass in type(obj).__mro__:
        names.update(getattr(klass, "__slots__", ()))
    return {n for n in names if not n.startswith("_")}


async def _live_objects() -> dict[str, set[str]]:
    """Public instance attributes (what help() cannot see) of live objects, by class name."""
    import asyncio

    import qp2p

    async with await qp2p.Endpoint.bind() as a, await qp2p.Endpoint.bind() as b:
        conn = await a.connect_to(b.local_addr)
        await conn.send(b"x")
        peer = await b.accept()
        msg = await asyncio.wait_for(peer.recv(), 10)
        return {
            "Endpoint": _public_attrs(a),
            "Connection": _public_attrs(conn),
            "Message": _public_attrs(msg),
        }


def test_api_reference_builds_and_documents_every_public_name(tmp_path: Path) -> None:
    """``make docs`` with warnings as errors; every public name, method, property and instance
    attribute of the API is in the reference (so a new one without docs fails here)."""
    import asyncio
    import inspect

    import pytest

    pytest.importorskip("sphinx", reason="sphinx comes with the dev extra (make test has it)")
    from sphinx.cmd.build import build_main
    from sphinx.util.inventory import InventoryFile

    import qp2p

    out = tmp_path / "html"
    assert build_main(["-q", "-W", "--keep-going", "-b", "html", str(ROOT / "docs"), str(out)]) == 0
    with (out / "objects.inv").open("rb") as f:
        inventory = InventoryFile.load(f, "", lambda base, uri: uri)
    documented = {name for entries in inventory.values() for name in entries}

    missing = [f"qp2p.{n}" for n in qp2p.__all__ if f"qp2p.{n}" not in documented]
    live = asyncio.run(_live_objects())
    for name in qp2p.__all__:
        cls = getattr(qp2p, name)
        if not inspect.isclass(cls) or issubclass(cls, BaseException):
            continue
        members = {n for n in vars(cls) if not n.startswith("_")} | live.get(name, set())
        members -= set(getattr(cls, "__slots__", ())) - live.get(name, set())
        missing += [f"qp2p.{name}.{m}" for m in sorted(members)
                    if f"qp2p.{name}.{m}" not in documented]  # fmt: skip
    assert not missing, f"not in the API reference (docs/api.rst): {missing}"
    for attr in ("local_addr", "public_addr"):
        assert f"qp2p.Endpoint.{attr}" in documented
    for attr in ("remote_addr", "peer_id", "is_closed", "local_addr"):
        assert f"qp2p.Connection.{attr}" in documented
    assert "timeout=None" in (out / "api.html").read_text()
