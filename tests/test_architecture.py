"""The module structure of the library and the application: no import cycle, one unambiguous alias per
``functional`` module. Read from the source with ``ast``, so nothing is imported."""

import ast
import functools
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("opinionpool", "applications")


def modules() -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (file, whether it is a package's ``__init__``), for every module of ``PACKAGES``."""
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            is_package = parts[-1] == "__init__"
            found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


@functools.cache
def import_graph() -> dict[str, set[str]]:
    """Module -> the project modules it imports, wherever the import statement is: an import inside a function
    that would close a cycle only hides the cycle until the function runs."""
    known = modules()
    graph = {}
    for name, (path, is_package) in known.items():
        package = name if is_package else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = package
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                if node.level == 0:
                    base = node.module
                elif node.module:
                    base = f"{base}.{node.module}"
                # ``from package import submodule`` depends on the submodule, ``from module import name`` on it
                targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
        graph[name] = {t for t in targets if t in known and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan's algorithm, iterative)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
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


def test_cycle_finder_finds_a_cycle_and_only_cycles():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": set(), "d": {"a", "c"}}) == []


def test_the_graph_sees_every_module_and_relative_imports():
    graph = import_graph()
    app = "applications.multimodal_vae"
    expected = {f"{app}.train", f"{app}.evaluation", f"{app}.data", f"{app}.data.polymnist", "opinionpool.functional"}
    assert expected <= set(graph)
    assert f"{app}.files" in graph[f"{app}.data.core"]  # from ..files import
    assert f"{app}.objectives" in graph[f"{app}.models"]  # from . import objectives
    assert f"{app}.data.build_polymnist" in graph[f"{app}.data"]  # inside load_dataset


def test_no_import_cycle_in_the_library_or_the_application():
    assert cycles(import_graph()) == []


def test_no_bare_F_alias_in_the_application():
    """``F`` meant ``opinionpool.functional`` in some files and ``torch.nn.functional`` in others."""
    offenders = []
    for path in sorted((ROOT / "applications").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                offenders += [f"{path.relative_to(ROOT)}:{node.lineno}" for alias in node.names
                              if (alias.asname or alias.name) == "F"]
    assert offenders == []
