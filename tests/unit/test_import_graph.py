"""No import cycles among the modules of src/ccproxy (issue 12.4).

The import graph is read with `ast`, without importing anything: an edge A -> B for every
`import B` / `from B import x` (and `from A import B` when B is a submodule) in A. Imports under
`if TYPE_CHECKING:` are for the type checker only and are left out. Two graphs are checked: the
module-level imports (a cycle there breaks or half-initialises a module at import time) and all
imports, function-local ones included (a cycle there is a layering knot: e.g. `server` used to
import `commands.serve`, which imports `server`).

Print the graph's cycles and largest modules with `python tests/unit/test_import_graph.py`.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted((SRC / "ccproxy").rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(stmts: list[ast.stmt], module_level: bool) -> list[ast.Import | ast.ImportFrom]:
    found: list[ast.Import | ast.ImportFrom] = []
    for node in stmts:
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If) and _is_type_checking(node):
            found.extend(_imports(node.orelse, module_level))
        elif module_level and isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            continue  # runs when called, not at import time
        else:
            for field in ("body", "orelse", "finalbody", "handlers"):
                children = getattr(node, field, None)
                if isinstance(children, list):
                    found.extend(_imports([c for c in children if isinstance(c, ast.stmt | ast.ExceptHandler)],
                                          module_level))
            if isinstance(node, ast.ExceptHandler):
                found.extend(_imports(node.body, module_level))
            if isinstance(node, ast.Match):
                for case in node.cases:
                    found.extend(_imports(case.body, module_level))
    return found


def import_graph(module_level: bool) -> dict[str, set[str]]:
    """module -> the ccproxy modules it imports (module-level only, or anywhere in the file)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in _imports(ast.parse(path.read_text(), str(path)).body, module_level):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)
        # a module importing its own package (`from ccproxy import errors`) is not a cycle by itself
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_no_cycle_among_module_level_imports() -> None:
    assert cycles(import_graph(module_level=True)) == []


def test_no_cycle_even_through_function_local_imports() -> None:
    assert cycles(import_graph(module_level=False)) == []


def test_the_checker_sees_a_cycle() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(graph) == [["a", "b", "c"]]


def test_the_graph_reads_local_relative_and_type_checking_imports(tmp_path: Path, monkeypatch) -> None:
    pkg = tmp_path / "ccproxy"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from ccproxy import b\n"
                              "def f():\n    from ccproxy.sub import c\n")
    (pkg / "b.py").write_text("from ccproxy import a\n")
    (pkg / "sub" / "c.py").write_text("from .. import a\ntry:\n    import ccproxy.b\nexcept ImportError:\n    raise\n")
    monkeypatch.setattr(sys.modules[__name__], "SRC", tmp_path)
    assert import_graph(module_level=True) == {
        "ccproxy": set(), "ccproxy.a": set(), "ccproxy.b": {"ccproxy", "ccproxy.a"}, "ccproxy.sub": set(),
        "ccproxy.sub.c": {"ccproxy", "ccproxy.a", "ccproxy.b"}}
    assert import_graph(module_level=False)["ccproxy.a"] == {"ccproxy.sub", "ccproxy.sub.c"}  # not b
    assert cycles(import_graph(module_level=False)) == [["ccproxy.a", "ccproxy.b", "ccproxy.sub.c"]]


if __name__ == "__main__":
    for level, label in ((True, "module-level imports"), (False, "all imports")):
        print(f"cycles among {label}: {cycles(import_graph(level)) or 'none'}")
    sizes = sorted(((len(p.read_text().splitlines()), n) for n, p in _modules().items()), reverse=True)
    print("largest modules:", ", ".join(f"{n} ({lines})" for lines, n in sizes[:8]))
