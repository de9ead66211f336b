"""The package is layered: no module imports (at the top or inside a function) a module that
imports it back, directly or through others."""

from __future__ import annotations

import ast
from pathlib import Path

import bidiattn

ROOT = Path(bidiattn.__file__).parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, name: str, modules: set[str]) -> set[str]:
    """bidiattn modules that ``path`` imports anywhere (top level or inside functions)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                stem = ".".join(base + ([node.module] if node.module else []))
            else:
                stem = node.module or ""
            targets = [stem] + [f"{stem}.{alias.name}" for alias in node.names]
        else:
            continue
        found |= {t for t in targets if t in modules}
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    paths = {_module_name(p): p for p in ROOT.rglob("*.py")}
    modules = set(paths)
    # A package's __init__ re-exports; importing bidiattn.x also runs bidiattn/__init__, which
    # is allowed to import anything below it, so edges into a package are not counted.
    packages = {n for n, p in paths.items() if p.name == "__init__.py"}
    return {n: _imports(p, n, modules) - packages for n, p in paths.items() if n not in packages}


def test_no_import_cycles():
    graph = import_graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_graph_sees_function_level_imports():
    graph = import_graph()
    assert "bidiattn.kernels.span_builder" in graph["bidiattn.rules"]  # imported inside build_from_blocks
    assert "bidiattn.spans" in graph["bidiattn.rules"]
