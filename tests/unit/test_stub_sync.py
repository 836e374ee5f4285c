"""The compiled fast path, its stub and its pure-Python twin describe one interface.

- ``qp2p/_fastpath.pyi`` (read with :mod:`ast`) and ``qp2p/_purepy.py`` (read with
  :mod:`inspect`) have the same public names, and every function, method and property
  has the same parameters (names, kinds, defaults) and the same annotations;
- the compiled ``qp2p._fastpath`` exposes exactly the twin's public names, with the same
  parameters where Cython reports them and the same constant values.

(``tests/unit/test_fastpath.py`` also runs mypy's stubtest on the compiled module.)
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import inspect
from types import ModuleType
from typing import Any

import pytest

from qp2p import _purepy
from tests.support.paths import ROOT

STUB = ROOT / "qp2p" / "_fastpath.pyi"


class _Anything:
    """A stub default written as ``...``: matches any default."""

    def __repr__(self) -> str:
        return "..."


ANY_DEFAULT = _Anything()


def _stub_tree() -> ast.Module:
    return ast.parse(STUB.read_text(), filename=str(STUB))


def _stub_namespace(tree: ast.Module) -> dict[str, Any]:
    """Where stub expressions are evaluated: the twin's names, then the stub's imports."""
    ns: dict[str, Any] = dict(vars(_purepy))
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            with contextlib.suppress(ImportError):
                exec(compile(ast.Module([node], []), str(STUB), "exec"), ns)
    return ns


def _stub_all(tree: ast.Module) -> list[str]:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets
        ):
            value: list[str] = ast.literal_eval(node.value)
            return value
    raise AssertionError("the stub has no __all__")


def _stub_definitions(tree: ast.Module) -> dict[str, ast.AST]:
    """Public top-level names the stub defines or explicitly re-exports (``import x as x``)."""
    out: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            out[node.target.id] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                if isinstance(target, ast.Name) and target.id != "__all__":
                    out[target.id] = node
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if alias.asname is not None and alias.asname == alias.name:
                    out[alias.name] = node
    return {name: node for name, node in out.items() if not name.startswith("_")}


def _eval(expr: ast.expr | None, ns: dict[str, Any]) -> Any:
    if expr is None:
        return inspect.Parameter.empty
    if isinstance(expr, ast.Constant) and expr.value is Ellipsis:
        return ANY_DEFAULT
    return eval(compile(ast.Expression(expr), str(STUB), "eval"), ns)


def _stub_signature(
    fn: ast.FunctionDef | ast.AsyncFunctionDef, ns: dict[str, Any]
) -> inspect.Signature:
    a = fn.args
    P = inspect.Parameter
    positional = [*a.posonlyargs, *a.args]
    defaults: list[ast.expr | None] = [None] * (len(positional) - len(a.defaults)) + list(
        a.defaults
    )
    params: list[inspect.Parameter] = []
    for i, (arg, default) in enumerate(zip(positional, defaults, strict=True)):
        kind = P.POSITIONAL_ONLY if i < len(a.posonlyargs) else P.POSITIONAL_OR_KEYWORD
        params.append(
            P(arg.arg, kind, default=_eval(default, ns), annotation=_eval(arg.annotation, ns))
        )
    if a.vararg is not None:
        params.append(P(a.vararg.arg, P.VAR_POSITIONAL, annotation=_eval(a.vararg.annotation, ns)))
    for arg, kw_default in zip(a.kwonlyargs, a.kw_defaults, strict=True):
        params.append(
            P(arg.arg, P.KEYWORD_ONLY, default=_eval(kw_default, ns),
              annotation=_eval(arg.annotation, ns))
        )  # fmt: skip
    if a.kwarg is not None:
        params.append(P(a.kwarg.arg, P.VAR_KEYWORD, annotation=_eval(a.kwarg.annotation, ns)))
    return inspect.Signature(params, return_annotation=_eval(fn.returns, ns))


def _assert_same_signature(what: str, stub: inspect.Signature, twin: inspect.Signature) -> None:
    sp, tp = list(stub.parameters.values()), list(twin.parameters.values())
    assert len(sp) == len(tp), f"{what}: stub {stub} vs twin {twin}"
    for s, t in zip(sp, tp, strict=True):
        assert s.kind == t.kind, f"{what}: parameter {s.name}: {s.kind} vs {t.kind}"
        if s.kind != inspect.Parameter.POSITIONAL_ONLY:
            assert s.name == t.name, f"{what}: parameter {s.name!r} vs {t.name!r}"
        if s.default is not ANY_DEFAULT:
            assert s.default == t.default, (
                f"{what}: default of {s.name}: {s.default!r} vs {t.default!r}"
            )
        if s.name != "self":
            assert s.annotation == t.annotation, (
                f"{what}: annotation of {s.name}: stub {s.annotation!r} vs twin {t.annotation!r}"
            )
    assert stub.return_annotation == twin.return_annotation, (
        f"{what}: return annotation: stub {stub.return_annotation!r} "
        f"vs twin {twin.return_annotation!r}"
    )


def _twin_signature(obj: Any) -> inspect.Signature:
    return inspect.signature(obj, eval_str=True)


def _decorators(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> set[str]:
    names = set()
    for dec in fn.decorator_list:
        if isinstance(dec, ast.Name):
            names.add(dec.id)
        elif isinstance(dec, ast.Attribute):
            names.add(dec.attr)
    return names


def _public_module_names(module: ModuleType) -> set[str]:
    return {
        name
        for name, value in vars(module).items()
        if not name.startswith("_") and not isinstance(value, ModuleType)
    }


def _public_class_names(cls: type) -> set[str]:
    return {name for name in dir(cls) if not name.startswith("_")}


# --------------------------------------------------------------------------- stub vs twin


def test_stub_and_twin_export_the_same_names() -> None:
    tree = _stub_tree()
    assert sorted(_stub_all(tree)) == sorted(_purepy.__all__)
    defined = set(_stub_definitions(tree))
    assert set(_purepy.__all__) <= defined, f"not in the stub: {set(_purepy.__all__) - defined}"
    assert defined == _public_module_names(_purepy), (
        f"stub only: {defined - _public_module_names(_purepy)}; "
        f"twin only: {_public_module_names(_purepy) - defined}"
    )


def test_stub_and_twin_signatures_match() -> None:
    tree = _stub_tree()
    ns = _stub_namespace(tree)
    checked = 0
    for name, node in _stub_definitions(tree).items():
        twin = getattr(_purepy, name)
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            assert callable(twin) and not inspect.isclass(twin), name
            _assert_same_signature(name, _stub_signature(node, ns), _twin_signature(twin))
            checked += 1
        elif isinstance(node, ast.ClassDef):
            assert inspect.isclass(twin), f"{name} is a class in the stub"
            stub_members: set[str] = set()
            for item in node.body:
                if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    # a plain attribute: a slot (or class attribute) of the twin
                    stub_members.add(item.target.id)
                    assert inspect.getattr_static(twin, item.target.id, None) is not None, (
                        f"{name}.{item.target.id} is in the stub, not in the twin"
                    )
                    continue
                if not isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    continue
                stub_members.add(item.name)
                what = f"{name}.{item.name}"
                static = inspect.getattr_static(twin, item.name, None)
                assert static is not None, f"{what} is in the stub, not in the twin"
                if "property" in _decorators(item):
                    assert isinstance(static, property), f"{what} is a property in the stub"
                    assert static.fget is not None
                    _assert_same_signature(
                        what, _stub_signature(item, ns), _twin_signature(static.fget)
                    )
                else:
                    assert callable(static), f"{what} is missing from the twin"
                    _assert_same_signature(
                        what, _stub_signature(item, ns), _twin_signature(getattr(twin, item.name))
                    )
                checked += 1
            public_stub = {m for m in stub_members if not m.startswith("_")}
            assert public_stub == _public_class_names(twin), (
                f"{name}: stub {sorted(public_stub)} vs twin {sorted(_public_class_names(twin))}"
            )
        elif isinstance(node, ast.AnnAssign):
            expected = _eval(node.annotation, ns)
            assert isinstance(twin, expected), f"{name}: {twin!r} is not {expected!r}"
    assert checked >= 10  # the test really looked at the interface


# --------------------------------------------------------------------------- compiled vs twin


@pytest.fixture(scope="module")
def compiled() -> ModuleType:
    """The compiled module: a missing build fails this test, it does not skip it."""
    return importlib.import_module("qp2p._fastpath")


def test_compiled_module_names_equal_twin_names(compiled: ModuleType) -> None:
    assert _public_module_names(compiled) == _public_module_names(_purepy)
    assert sorted(getattr(compiled, "__all__", _purepy.__all__)) == sorted(_purepy.__all__)
    for name in _purepy.__all__:
        twin = getattr(_purepy, name)
        native = getattr(compiled, name)
        if inspect.isclass(twin):
            assert inspect.isclass(native), name
            assert _public_class_names(native) == _public_class_names(twin), name
        elif callable(twin):
            assert callable(native), name
        else:
            assert native == twin, f"{name}: compiled {native!r} vs twin {twin!r}"


def _comparable(sig: inspect.Signature) -> list[tuple[str | None, Any, Any]]:
    return [
        (None if p.kind == p.POSITIONAL_ONLY else p.name, p.kind, p.default)
        for p in sig.parameters.values()
    ]


def test_compiled_signatures_equal_twin_signatures(compiled: ModuleType) -> None:
    """Where Cython reports a signature (``binding=True``), names and defaults agree."""
    compared = 0
    for name in _purepy.__all__:
        twin = getattr(_purepy, name)
        native = getattr(compiled, name)
        pairs: list[tuple[str, Any, Any]] = []
        if inspect.isclass(twin):
            for member in _public_class_names(twin):
                t = inspect.getattr_static(twin, member)
                if callable(t):
                    pairs.append(
                        (f"{name}.{member}", getattr(twin, member), getattr(native, member))
                    )
        elif callable(twin):
            pairs.append((name, twin, native))
        for what, t, n in pairs:
            try:
                native_sig = inspect.signature(n)
            except (TypeError, ValueError):
                continue  # no introspectable signature: nothing to compare
            if any(p.kind == p.VAR_POSITIONAL for p in native_sig.parameters.values()):
                continue  # a generic (*args, **kwargs) wrapper says nothing
            assert _comparable(native_sig) == _comparable(inspect.signature(t)), what
            compared += 1
    assert compared >= 5
