"""Every module of the library, the application, the validation scripts and the benchmarks says what it exports
(``__all__``)."""

import ast
import importlib
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
MODULES = sorted(path for folder in ("opinionpool", "applications", "validation", "benchmarks")
                 for path in (ROOT / folder).rglob("*.py"))


def _declared(tree: ast.Module) -> list[str]:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("no top-level __all__")


def _bound(tree: ast.Module, path: pathlib.Path) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    if path.name == "__init__.py":  # a package exports its submodules too
        names |= {p.stem for p in path.parent.glob("*.py")} | {p.parent.name for p in path.parent.glob("*/__init__.py")}
    return names


@pytest.mark.parametrize("path", MODULES, ids=[str(p.relative_to(ROOT)) for p in MODULES])
def test_module_declares_all_and_binds_every_name(path):
    tree = ast.parse(path.read_text())
    declared = _declared(tree)
    assert all(isinstance(name, str) for name in declared)
    assert len(declared) == len(set(declared)), f"duplicates in {path.name}'s __all__"
    missing = set(declared) - _bound(tree, path)
    assert not missing, f"{path.name}'s __all__ names {sorted(missing)}, which it does not define"


@pytest.mark.parametrize("module", sorted(
    ".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
    for p in (ROOT / "opinionpool").rglob("*.py")))
def test_library_exports_resolve(module):
    imported = importlib.import_module(module)
    for name in imported.__all__:
        assert hasattr(imported, name), f"{module}.{name}"


def test_what_the_application_needs_is_public():
    import opinionpool
    import opinionpool.functional as opf

    assert "exact_order" in opinionpool.__all__ and "exact_order" in opf.__all__
    assert opf.exact_order(0.25) == 4 and opf.exact_order(0.3) is None
    assert "GaussianMixture" in opf.__all__ and callable(opf.GaussianMixture.moments)
