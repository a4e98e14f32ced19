"""The engine's modules import in one direction: no cycle among them, counting the
imports made only for type checking (a cycle there still ties two modules' designs)."""

from __future__ import annotations

import ast
from pathlib import Path

import pagedserve.engine

ENGINE = Path(pagedserve.engine.__file__).parent


def engine_imports(path: Path) -> set[str]:
    """The engine modules `path` imports, anywhere in the file (TYPE_CHECKING blocks and
    function bodies included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "pagedserve.engine":
                names.update(a.name for a in node.names)
            elif node.module.startswith("pagedserve.engine."):
                names.add(node.module.split(".")[2])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[2] for a in node.names
                         if a.name.startswith("pagedserve.engine."))
    return names


def test_engine_modules_import_without_cycles():
    graph = {p.stem: engine_imports(p) - {p.stem} for p in ENGINE.glob("*.py")}
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(name):] + [name]))
        if name in done or name not in graph:
            return
        for dep in sorted(graph[name]):
            visit(dep, path + [name])
        done.add(name)

    for name in sorted(graph):
        visit(name, [])
    assert done == set(graph) and {"scheduler", "beam_search", "llm_engine"} <= done
