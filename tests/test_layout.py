"""The package layout: import graph, layering, module sizes and names (static, with ``ast``; imports nothing).

Rules:

* no import cycles among ``mllm_kit`` modules (module-level imports only; ``if TYPE_CHECKING:`` blocks excluded);
* component packages import neither ``mllm_kit.training`` nor ``mllm_kit.cli`` (imports at any level count);
* ``mllm_kit.data`` imports no model code (any level);
* no module is over 400 lines;
* no module shadows a standard-library module by its file name (package ``__init__``/``__main__`` excluded);
* the root of ``mllm_kit/`` holds only the shared contracts.

An import of ``a.b.c`` counts as an edge to ``a.b.c`` (a package's ``__init__`` when it is a package), not to its
parent packages; ``from a.b import c`` is an edge to ``a.b.c`` when that is a module or package, else to ``a.b``.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from functools import cache
from pathlib import Path

PACKAGE = "mllm_kit"
ROOT = Path(__file__).resolve().parent.parent / PACKAGE
MAX_LINES = 400
COMPONENT_PACKAGES = ("mllm_kit.encoders", "mllm_kit.connectors", "mllm_kit.llm", "mllm_kit.objectives", "mllm_kit.layers",
                      "mllm_kit.data")
UPPER_LAYERS = ("mllm_kit.training", "mllm_kit.cli")
MODEL_CODE = ("mllm_kit.model", "mllm_kit.encoders", "mllm_kit.connectors", "mllm_kit.llm", "mllm_kit.layers",
              "mllm_kit.objectives")
ROOT_MODULES = {"__init__", "batch", "context", "model", "saving", "registry", "errors", "log", "files", "pretrained", "tiny"}


@cache
def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its ``__init__``), ``__pycache__`` excluded."""
    found = {}
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT.parent).with_suffix("")
        if "__pycache__" in rel.parts:
            continue
        parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
        found[".".join(parts)] = path
    return found


@cache
def packages() -> set[str]:
    """Dotted names of every package directory (regular or namespace) under the package root."""
    return {".".join(p.relative_to(ROOT.parent).parts) for p in [ROOT, *ROOT.rglob("*")]
            if p.is_dir() and p.name != "__pycache__" and any(p.glob("*.py"))}


def is_package(name: str) -> bool:
    return name in packages()


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _module_level(body: list[ast.stmt]) -> Iterator[ast.Import | ast.ImportFrom]:
    """Imports executed when the module is imported: not inside functions, not under ``if TYPE_CHECKING:``."""
    for node in body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        elif isinstance(node, ast.If) and _is_type_checking(node.test):
            yield from _module_level(node.orelse)
        else:
            for field in ("body", "orelse", "finalbody", "handlers", "cases"):
                children = getattr(node, field, None)
                if isinstance(children, list):
                    for child in children:
                        if isinstance(child, ast.stmt):
                            yield from _module_level([child])
                        elif hasattr(child, "body"):  # except handlers, match cases
                            yield from _module_level(child.body)


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> list[str]:
    """The ``mllm_kit`` modules (or packages) an import statement names."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module.split(".") if is_package(module) else module.split(".")[:-1]
            base = base[: len(base) - (node.level - 1)]
            source = ".".join([*base, *([node.module] if node.module else [])])
        else:
            source = node.module or ""
        names = []
        for alias in node.names:
            sub = f"{source}.{alias.name}"
            names.append(sub if sub in modules() or is_package(sub) else source)
    return [n for n in names if n == PACKAGE or n.startswith(PACKAGE + ".")]


@cache
def _tree(name: str) -> ast.Module:
    path = modules()[name]
    return ast.parse(path.read_text(), filename=str(path))


def imports(name: str, *, any_level: bool = False) -> set[str]:
    """What module ``name`` imports from ``mllm_kit``: module-level imports, or every import (``any_level``)."""
    tree = _tree(name)
    nodes = ([n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))] if any_level
             else list(_module_level(tree.body)))
    return {target for node in nodes for target in _targets(name, node)}


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component with a cycle (Tarjan), each as ``[a, b, ..., a]``."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
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
            if len(component) > 1 or v in graph.get(v, ()):
                components.append(sorted(component))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(graph) + 100))
    try:
        for v in sorted(graph):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)

    cycles = []
    for component in components:
        members, start = set(component), component[0]
        # Shortest path from start back to start inside the component (BFS).
        parents: dict[str, str] = {}
        frontier, seen, end = [start], {start}, None
        while frontier and end is None:
            nxt = []
            for v in frontier:
                for w in sorted(graph.get(v, ())):
                    if w == start:
                        end = v
                        break
                    if w in members and w not in seen:
                        seen.add(w)
                        parents[w] = v
                        nxt.append(w)
                if end is not None:
                    break
            frontier = nxt
        path = [start]
        v = end
        while v is not None and v != start:
            path.append(v)
            v = parents.get(v)
        cycles.append([start, *reversed(path[1:]), start])
    return cycles


def test_the_scan_sees_the_package():
    mods = modules()
    assert {"mllm_kit", "mllm_kit.registry", "mllm_kit.model", "mllm_kit.connectors.mlp"} <= set(mods)
    assert "mllm_kit.registry" in imports("mllm_kit.connectors.mlp")
    assert "mllm_kit.connectors.base" in imports("mllm_kit.connectors.mlp")


def test_cycle_finder_reports_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c", "a"]]
    assert find_cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph = {name: imports(name) & set(modules()) for name in modules()}
    cycles = find_cycles(graph)
    assert not cycles, "import cycles among mllm_kit modules (module-level imports):\n" + "\n".join(
        "  " + " -> ".join(cycle) for cycle in cycles)


def test_component_packages_do_not_import_training_or_cli():
    bad = {name: sorted(t for t in imports(name, any_level=True) if _within(t, UPPER_LAYERS))
           for name in modules() if _within(name, COMPONENT_PACKAGES)}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, "component packages import training/cli code:\n" + "\n".join(f"  {k}: {v}" for k, v in sorted(bad.items()))


def test_data_imports_no_model_code():
    bad = {name: sorted(t for t in imports(name, any_level=True) if _within(t, MODEL_CODE))
           for name in modules() if _within(name, ("mllm_kit.data",))}
    bad = {k: v for k, v in bad.items() if v}
    assert not bad, "mllm_kit.data imports model code:\n" + "\n".join(f"  {k}: {v}" for k, v in sorted(bad.items()))


def test_no_module_is_over_400_lines():
    sizes = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    long = {name: n for name, n in sizes.items() if n > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: {dict(sorted(long.items()))}"


def test_no_module_shadows_the_standard_library():
    shadowing = sorted(str(path.relative_to(ROOT.parent)) for path in modules().values()
                       if path.stem not in ("__init__", "__main__") and path.stem in sys.stdlib_module_names)
    shadowing += sorted(p + "/" for p in packages() if p.rpartition(".")[2] in sys.stdlib_module_names)
    assert not shadowing, f"module names that shadow standard-library modules: {shadowing}"


def test_the_package_root_holds_only_the_shared_contracts():
    root = {path.stem for path in ROOT.glob("*.py")}
    assert root == ROOT_MODULES, (f"unexpected root modules: {sorted(root - ROOT_MODULES)}; "
                                  f"missing: {sorted(ROOT_MODULES - root)}")
