"""Structure checks for ``make lint`` (DESIGN.md §2): imports go downward, and modules do
not reach into other objects' private attributes.

- **Import cycles** among qp2p's modules, ``TYPE_CHECKING`` imports included: any is an
  error (a lower layer that must call up takes a callback or a Protocol).
- **Private reaches**: ``obj._name`` where ``obj`` is not ``self``/``cls``/``super()`` nor
  a module the file imports. Outside ``qp2p/engine/`` (whose adapters must reach into the
  QUIC libraries) their count may not exceed ``BASELINE`` below: lower it as reaches go,
  never raise it. ``--list`` prints each one.
- **Private reaches from the tests** (``tests/``), counted the same way, except reaches to
  names the file itself defines (a test helper's own attributes): at most
  ``TESTS_BASELINE``. A test reads qp2p's internal state through
  ``Endpoint.debug_snapshot()`` / ``Connection.debug_snapshot()``; what remains is a hostile
  peer rewiring its own endpoint, a raw aioquic attacker driving aioquic's internals, and a
  fast-path test hook, each commented where it is.

    python tools/check_structure.py [--list]
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "qp2p"
#: Private reaches allowed outside qp2p/engine/ (the count when this check was added,
#: lowered since); a new reach fails ``make lint``.
BASELINE = 0
EXEMPT = ("engine",)  # sub-packages whose reaches are not counted
TESTS = ROOT / "tests"
#: Private reaches allowed in tests/ (41 when this check was added, from 127 before
#: ``debug_snapshot``); a new reach fails ``make lint``.
TESTS_BASELINE = 39


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(tree: ast.Module, name: str, is_package: bool) -> set[str]:
    """Every module (or possible module) ``name``'s file imports, absolute names."""
    package = name if is_package else name.rpartition(".")[0]
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            out.add(source)
            out.update(f"{source}.{alias.name}" for alias in node.names)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (iterative Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, edges = work[-1]
            for nxt in edges:
                if nxt not in index:
                    index[nxt] = low[nxt] = len(index)
                    stack.append(nxt)
                    on_stack.add(nxt)
                    work.append((nxt, iter(sorted(graph[nxt]))))
                    break
                if nxt in on_stack:
                    low[node] = min(low[node], index[nxt])
            else:
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index[node]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == node:
                            break
                    if len(component) > 1:
                        found.append(sorted(component))
    return found


def private_reaches(tree: ast.Module) -> list[ast.Attribute]:
    """``obj._name`` attribute uses whose ``obj`` is not self/cls/super() or a module."""
    modules: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules.update((a.asname or a.name).partition(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            # a lower-case or underscored name may be a module (from . import wire)
            modules.update(a.asname or a.name for a in node.names
                           if not (a.asname or a.name)[:1].isupper())
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute):
            continue
        attr = node.attr
        if not attr.startswith("_") or (attr.startswith("__") and attr.endswith("__")):
            continue
        owner = node.value
        if isinstance(owner, ast.Name) and (owner.id in ("self", "cls") or owner.id in modules):
            continue
        if (isinstance(owner, ast.Call) and isinstance(owner.func, ast.Name)
                and owner.func.id == "super"):
            continue
        out.append(node)
    return out


def own_names(tree: ast.Module) -> set[str]:
    """Underscored names a file defines itself: ``self._x = ...`` / ``obj._x = ...`` in its
    classes, methods and class-level names (so its helpers may use each other's)."""
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) \
                and isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            out.add(node.attr)
    for cls in (n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)):
        for stmt in cls.body:
            targets = stmt.targets if isinstance(stmt, ast.Assign) else (
                [stmt.target] if isinstance(stmt, ast.AnnAssign) else [])
            out.update(t.id for t in targets if isinstance(t, ast.Name))
    return {n for n in out if n.startswith("_")}


def test_reaches(show: bool) -> int:
    """Private reaches from tests/ into objects the file does not define."""
    counted = 0
    for path in sorted(TESTS.rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        own = own_names(tree)
        for node in private_reaches(tree):
            if node.attr in own:
                continue
            counted += 1
            if show:
                print(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    return counted


def main(argv: list[str]) -> int:
    show = "--list" in argv
    graph: dict[str, set[str]] = {}
    trees: dict[Path, ast.Module] = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        trees[path] = tree = ast.parse(path.read_text(), str(path))
        graph[module_name(path)] = imported(tree, module_name(path), path.name == "__init__.py")
    for name in graph:  # keep edges between qp2p's own modules (not to the package root)
        graph[name] = {m for m in graph[name] if m in graph and m != name and m != "qp2p"}
    failed = False
    for component in cycles(graph):
        print("import cycle:", " ".join(component))
        failed = True
    counted = 0
    for path, tree in trees.items():
        rel = path.relative_to(PACKAGE)
        reaches = private_reaches(tree)
        if rel.parts[0] in EXEMPT:
            continue
        counted += len(reaches)
        if show:
            for node in reaches:
                print(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    print(f"{counted} private reaches outside qp2p/engine/ (baseline {BASELINE})")
    if counted > BASELINE:
        print("new private reaches: ask the owner through a method instead "
              "(tools/check_structure.py --list shows them)")
        failed = True
    in_tests = test_reaches(show)
    print(f"{in_tests} private reaches in tests/ (baseline {TESTS_BASELINE})")
    if in_tests > TESTS_BASELINE:
        print("new private reaches in tests/: read qp2p's state through debug_snapshot() "
              "or public API (tools/check_structure.py --list shows them)")
        failed = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
