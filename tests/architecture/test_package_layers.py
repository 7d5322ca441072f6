"""The package's layers (issue 22): no import cycle among costeer's modules, and nothing
below the Python API (api.py) imports it or the proxy above it.

The graph is read from the source with ast, so it holds every import, also those
inside functions (which run later, and can close a cycle all the same)."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"
PACKAGE = "costeer"
# the layers above api.py (and the package's own __init__): only they may import it, or the proxy
ABOVE_API = ("costeer.cli", "costeer.proxy", "costeer.evaluation", "costeer.bench")
TOP = ("costeer.api", "costeer.proxy")


def _modules() -> dict[str, Path]:
    found = {}
    for path in sorted((SRC / PACKAGE).rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def import_graph() -> dict[str, set[str]]:
    """Each costeer module and the costeer modules it imports (anywhere in its code): a copy
    of the graph, which is read from the source once a session."""
    return {name: set(targets) for name, targets in _read_import_graph().items()}


@functools.cache
def _read_import_graph() -> dict[str, set[str]]:
    modules = _modules()
    graph: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[: len(base) - node.level + 1]
                    source = ".".join(base + ([node.module] if node.module else []))
                else:
                    source = node.module or ""
                # `from PACKAGE import submodule` imports the submodule
                targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in modules else source for a in node.names]
            else:
                continue
            for target in targets:
                while target and target not in modules:  # `import costeer.x.y` names a module; keep the longest
                    target = target.rpartition(".")[0]
                if target.startswith(PACKAGE) and target != name:
                    graph[name].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
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

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "costeer.transport.connect" in graph["costeer.api"]  # imported where a cloud is connected
    assert "costeer.backends.llama_cpp.model" in graph["costeer.backends"]  # imported in load_model


def test_no_import_cycle():
    assert cycles(import_graph()) == []


def test_nothing_below_the_api_imports_it_or_the_proxy():
    below = {name: targets for name, targets in import_graph().items()
             if name != PACKAGE and not _within(name, ABOVE_API)}
    assert "costeer.transport.server.app" in below and "costeer.decoding" in below
    wrong = sorted(f"{name} imports {target}" for name, targets in below.items() for target in targets
                   if _within(target, TOP))
    assert wrong == []


def test_the_llama_cpp_backend_parts_do_not_import_its_model():
    graph = import_graph()
    for part in ("lib", "streams", "tree", "batch"):
        assert "costeer.backends.llama_cpp.model" not in graph[f"costeer.backends.llama_cpp.{part}"]
