"""Packaging: the sdist and the wheel that ``make wheel`` builds, installed and run.

Slow (a Cython build, a C compile and a fresh venv: about 30-60 s), and part of
``make test`` on purpose: it is the only test that sees qp2p the way a user gets it.

- ``python -m build --no-isolation`` makes an sdist and a wheel from a clean copy of the
  tree (or reuses ``dist/`` when it is newer than every source file);
- the sdist carries the generated ``_fastpath.c``, the ``.pyx``/``.pxd``/``.pyi`` and
  ``py.typed``, and its extension builds from the C file with Cython hidden;
- the wheel installs into a fresh venv (``pip install --no-index --find-links``; the
  runtime dependencies come from this venv's site-packages through a ``.pth`` file) and
  runs a loopback exchange there, on the compiled fast path, and the ``qp2p`` command.
"""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.paths import ROOT

PY_TAG = f"cp{sys.version_info.major}{sys.version_info.minor}"
SOURCES = [
    *ROOT.glob("qp2p/*.py"),
    *ROOT.glob("qp2p/engine/*.py"),
    *ROOT.glob("qp2p/services/*.py"),
    *ROOT.glob("qp2p/_fastpath.p*"),
    ROOT / "setup.py",
    ROOT / "pyproject.toml",
    ROOT / "MANIFEST.in",
    ROOT / "README.md",
    ROOT / "docs" / "pypi.md",
]
IGNORE = shutil.ignore_patterns(
    ".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so", "*.pyd",
    "*.pyc", "_fastpath.c", "_fastpath.html", ".mypy_cache", ".ruff_cache", ".pytest_cache",
    ".hypothesis", ".benchmarks", "bench",
)  # fmt: skip

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]


@dataclass
class Artifacts:
    sdist: Path
    wheel: Path


def _fresh_dist() -> Artifacts | None:
    """``dist/``'s sdist and wheel for this interpreter if newer than every source."""
    dist = ROOT / "dist"
    wheels = sorted(dist.glob(f"qp2p-*-{PY_TAG}-{PY_TAG}-*.whl"))
    sdists = sorted(dist.glob("qp2p-*.tar.gz"))
    if not wheels or not sdists:
        return None
    newest_source = max(p.stat().st_mtime for p in SOURCES if p.exists())
    if min(wheels[-1].stat().st_mtime, sdists[-1].stat().st_mtime) <= newest_source:
        return None
    return Artifacts(sdists[-1], wheels[-1])


def _run(cmd: list[str], timeout: float = 240, **kw: object) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)  # type: ignore[call-overload]
    assert result.returncode == 0, (
        f"{' '.join(map(str, cmd))} failed ({result.returncode}):\n"
        f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    )
    return result  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> Artifacts:
    fresh = _fresh_dist()
    if fresh is not None:
        return fresh
    work = tmp_path_factory.mktemp("build")
    src = work / "src"
    shutil.copytree(ROOT, src, ignore=IGNORE)
    out = work / "dist"
    env = {k: v for k, v in os.environ.items() if k != "QP2P_NO_EXTENSIONS"}
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(src)],
         env=env)  # fmt: skip
    [sdist] = out.glob("qp2p-*.tar.gz")
    [wheel] = out.glob("qp2p-*.whl")
    return Artifacts(sdist, wheel)


def test_sdist_carries_c_source_stub_and_types(artifacts: Artifacts) -> None:
    with tarfile.open(artifacts.sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in (
        "qp2p/_fastpath.c",
        "qp2p/_fastpath.pyx",
        "qp2p/_fastpath.pxd",
        "qp2p/_fastpath.pyi",
        "qp2p/py.typed",
        "qp2p/cli.py",
        "setup.py",
        "pyproject.toml",
        "README.md",
        "tests/conftest.py",
        "tests/support/paths.py",  # every layer of the suite, and its helpers
        "tests/support/peer_proc.py",
        "tests/unit/test_fastpath.py",
        "tests/loopback/test_endpoint.py",
        "tests/netns/test_netlab.py",
        "conftest.py",  # the rootdir conftest: the suite tests the installed qp2p
        "docs/pypi.md",
        "docs/api.rst",
        "CHANGELOG.md",
        "SECURITY.md",
        "examples/demo.py",
    ):
        assert needed in names, f"{needed} missing from the sdist"
    assert not [n for n in names if n.endswith((".so", ".pyc"))]
    with tarfile.open(artifacts.sdist) as tar:
        [pkg_info] = [m for m in tar.getmembers() if m.name.count("/") == 1
                      and m.name.endswith("/PKG-INFO")]  # fmt: skip
        meta = tar.extractfile(pkg_info).read().decode()  # type: ignore[union-attr]
    # the long description (PyPI's page) opens with what qp2p is, then how to install it
    description = meta.split("\n\n", 1)[1]
    assert description.startswith("# qp2p\n\nqp2p is a peer-to-peer"), description[:300]
    assert "make demo" not in description and "## Install" in description


def test_wheel_contents(artifacts: Artifacts) -> None:
    assert f"-{PY_TAG}-{PY_TAG}-" in artifacts.wheel.name  # a binary wheel, not py3-none-any
    with zipfile.ZipFile(artifacts.wheel) as zf:
        names = set(zf.namelist())
        entry_points = next(
            zf.read(n).decode() for n in names if n.endswith(".dist-info/entry_points.txt")
        )
    assert any(n.startswith("qp2p/_fastpath.") and n.endswith(".so") for n in names), names
    for needed in ("qp2p/py.typed", "qp2p/_fastpath.pyi", "qp2p/cli.py", "qp2p/__main__.py",
                   "qp2p/engine/__init__.py", "qp2p/engine/_aioquic.py", "qp2p/engine/_qh3.py",
                   "qp2p/services/__init__.py", "qp2p/services/host.py",
                   "qp2p/services/holepunch.py"):
        assert needed in names
    assert not [n for n in names if n.startswith(("tests/", "examples/"))]
    assert "qp2p = qp2p.cli:main" in entry_points
    # `make wheel` (python -m build) writes qp2p's two files and no dependency wheels
    assert sorted(p.name for p in artifacts.wheel.parent.iterdir()) == sorted(
        [artifacts.sdist.name, artifacts.wheel.name]
    )


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="-s is applied on Linux")
def test_wheel_extension_is_stripped(artifacts: Artifacts) -> None:
    """The extension is linked with ``-s``: no symbol table, no DWARF (1 MB -> ~165 kB)."""
    with zipfile.ZipFile(artifacts.wheel) as zf:
        [so] = [n for n in zf.namelist() if n.startswith("qp2p/_fastpath.") and n.endswith(".so")]
        data = zf.read(so)
    assert data[:4] == b"\x7fELF"
    assert b".debug_info" not in data and b".symtab" not in data, "the extension is not stripped"
    assert len(data) < 400_000, len(data)  # unstripped it is about 1 MB


def test_sdist_builds_without_cython(artifacts: Artifacts, tmp_path: Path) -> None:
    """The generated C in the sdist is enough: the extension builds with Cython hidden."""
    with tarfile.open(artifacts.sdist) as tar:
        tar.extractall(tmp_path, filter="data")
    [src] = [p for p in tmp_path.iterdir() if p.is_dir()]
    (src / "qp2p" / "_fastpath.pyx").unlink()  # nothing to cythonize even if it were there
    blocker = tmp_path / "no-cython" / "Cython"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('Cython is hidden by this test')\n")
    env = {k: v for k, v in os.environ.items() if k != "QP2P_NO_EXTENSIONS"}
    env["PYTHONPATH"] = str(blocker.parent)
    _run([sys.executable, "setup.py", "-q", "build_ext", "--inplace"], cwd=src, env=env)
    assert list((src / "qp2p").glob("_fastpath.*.so"))
    env["PYTHONPATH"] = str(src)
    probe = "import qp2p, qp2p._fastpath as f; print(qp2p.implementation, f.__file__)"
    result = _run([sys.executable, "-c", probe], cwd=tmp_path, env=env)
    implementation, path = result.stdout.split()
    assert implementation == "cython" and path.startswith(str(src))


EXCHANGE = textwrap.dedent(
    """
    import asyncio, json, qp2p

    async def main():
        async with await qp2p.Endpoint.bind() as a, await qp2p.Endpoint.bind() as b:
            conn = await a.connect_to(b.local_addr)
            peer = await b.accept()
            await conn.send(b"hello from the wheel", header=b"h", dst=b"d")
            msg = await asyncio.wait_for(peer.recv(), 10)
            pending = asyncio.ensure_future(conn.request(b"ping", timeout=10))
            req = await asyncio.wait_for(peer.recv(), 10)
            await req.reply(req.payload[::-1])
            reply = await pending
            print(json.dumps({
                "implementation": qp2p.implementation,
                "file": qp2p.__file__,
                "message": [msg.payload.decode(), msg.header.decode(), msg.dst.decode()],
                "reply": reply.payload.decode(),
                "peer_ok": conn.peer_id == b.peer_id and peer.peer_id == a.peer_id,
            }))

    asyncio.run(main())
    """
)


def test_wheel_installs_into_fresh_venv_and_runs(artifacts: Artifacts, tmp_path: Path) -> None:
    venv, env = _fresh_venv(tmp_path)
    python = venv / "bin" / "python"
    _run(
        [str(python), "-m", "pip", "install", "-q", "--no-index",
         "--find-links", str(artifacts.wheel.parent), str(artifacts.wheel)],
        env=env,
    )  # fmt: skip

    result = _run([str(python), "-c", EXCHANGE], cwd=tmp_path, env=env, timeout=60)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["implementation"] == "cython"
    assert report["file"].startswith(str(venv)), report["file"]
    assert report["message"] == ["hello from the wheel", "h", "d"]
    assert report["reply"] == "gnip"
    assert report["peer_ok"] is True

    # the console script and python -m qp2p come with the wheel
    qp2p_cmd = venv / "bin" / "qp2p"
    assert "bench" in _run([str(qp2p_cmd), "--help"], cwd=tmp_path, env=env).stdout
    bench = _run(
        [str(qp2p_cmd), "--json", "bench", "--count", "300", "--size", "64"],
        cwd=tmp_path, env=env, timeout=60,
    )  # fmt: skip
    summary = json.loads(bench.stdout.strip().splitlines()[-1])
    assert summary["implementation"] == "cython" and summary["messages"] == 300
    ident = _run(
        [str(python), "-m", "qp2p", "--json", "identity", "new", str(tmp_path / "k.pem")],
        cwd=tmp_path, env=env,
    )  # fmt: skip
    assert len(json.loads(ident.stdout)["peer_id"]) == 64


def _fresh_venv(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """A new venv that sees this venv's packages (runtime and build dependencies) behind
    its own site-packages, so what pip installs into it is what ``import qp2p`` finds."""
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)])
    python = venv / "bin" / "python"
    purelib = Path(
        _run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"]
        ).stdout.strip()
    )
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    (purelib / "_qp2p_test_deps.pth").write_text("\n".join(deps) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "QP2P_NO_EXTENSIONS")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    # the venv's own (older) setuptools would shadow this venv's setuptools>=77
    _run([str(python), "-m", "pip", "uninstall", "-q", "-y", "setuptools"], env=env)
    return venv, env


def test_sdist_without_compiler_installs_the_twin(artifacts: Artifacts, tmp_path: Path) -> None:
    """No C compiler (``CC=/bin/false``) and no Cython: installing the sdist warns and
    installs the pure-Python twin, which runs a loopback exchange; with
    ``QP2P_REQUIRE_EXTENSIONS=1`` the same install fails and says why."""
    venv, env = _fresh_venv(tmp_path)
    blocker = tmp_path / "no-cython" / "Cython"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('Cython is hidden by this test')\n")
    env["CC"] = "/bin/false"
    env["PYTHONPATH"] = str(blocker.parent)  # seen by pip's build of the sdist, too
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-v", "--no-index",
           "--no-build-isolation", str(artifacts.sdist)]  # fmt: skip

    required = subprocess.run(
        pip, capture_output=True, text=True, timeout=240, cwd=tmp_path,
        env={**env, "QP2P_REQUIRE_EXTENSIONS": "1"},
    )  # fmt: skip
    assert required.returncode != 0, required.stdout[-2000:]
    assert "QP2P_REQUIRE_EXTENSIONS is set" in required.stdout + required.stderr

    installed = _run(pip, cwd=tmp_path, env=env)
    assert "could not build the compiled fast path" in installed.stdout + installed.stderr
    assert "Installing the pure-Python twin instead" in installed.stdout + installed.stderr

    del env["PYTHONPATH"]
    python = str(venv / "bin" / "python")
    result = _run([python, "-c", EXCHANGE], cwd=tmp_path, env=env, timeout=60)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["implementation"] == "python"
    assert report["file"].startswith(str(venv)), report["file"]
    assert report["message"] == ["hello from the wheel", "h", "d"]
    assert report["reply"] == "gnip"
    assert report["peer_ok"] is True
    package = Path(report["file"]).parent
    assert not list(package.glob("_fastpath*.so")), list(package.iterdir())


def test_sdist_suite_tests_the_installed_wheel(artifacts: Artifacts, tmp_path: Path) -> None:
    """A packager's run: unpack the sdist, install the wheel, run ``pytest`` in the unpacked
    tree. The suite must test the installed, compiled package — in-process and in the
    subprocesses it starts — not the uncompiled source beside the tests."""
    venv, env = _fresh_venv(tmp_path)
    python = str(venv / "bin" / "python")
    _run([python, "-m", "pip", "install", "-q", "--no-index", "--no-deps", str(artifacts.wheel)],
         env=env)  # fmt: skip
    with tarfile.open(artifacts.sdist) as tar:
        tar.extractall(tmp_path / "sdist", filter="data")
    [src] = (tmp_path / "sdist").iterdir()
    assert not list((src / "qp2p").glob("*.so"))  # the tree beside the tests is not compiled
    selection = [
        "tests/loopback/test_endpoint.py::test_message_with_header_and_dst",  # in-process
        "tests/unit/test_fastpath.py::test_qp2p_no_extensions_env",  # subprocess `python -c`
        "tests/loopback/test_examples.py::test_example_runs",  # subprocess running a script
        "tests/loopback/test_cli.py::test_help_lists_every_subcommand",  # `python -m qp2p`
    ]
    result = subprocess.run(
        [python, "-m", "pytest", "-p", "no:cacheprovider", *selection,
         "-k", "p2p_node or no_extensions or header or help"],
        cwd=src, env=env, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    out = result.stdout + result.stderr
    assert result.returncode == 0, out[-4000:]
    site_pkgs = Path(_run([python, "-c", "import qp2p; print(qp2p.__file__)"], cwd=tmp_path,
                          env=env).stdout.strip()).parent  # fmt: skip
    assert f"qp2p under test: {site_pkgs} (cython fast path)" in out, out[:2000]
    assert str(site_pkgs).startswith(str(venv))
    summary = out.strip().splitlines()[-1]
    assert " passed" in summary and "skipped" not in summary and "deselected" in summary, summary
