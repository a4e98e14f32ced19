"""The engine's and the runner's modules import in one direction: no cycle among them,
counting the imports made only for type checking (a cycle there still ties two modules'
designs). The runner sees the engine only through its step contract (engine.batch)."""

from __future__ import annotations

import ast
from pathlib import Path

import pagedserve.engine
import pagedserve.runner

PACKAGES = {"engine": Path(pagedserve.engine.__file__).parent,
            "runner": Path(pagedserve.runner.__file__).parent}


def engine_imports(path: Path) -> set[str]:
    """The engine and runner modules `path` imports ("engine.scheduler"), anywhere in
    the file (TYPE_CHECKING blocks and function bodies included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            package = node.module.split(".")[1] if node.module.count(".") else ""
            if package not in PACKAGES:
                continue
            if node.module.count(".") == 1:
                names.update(f"{package}.{a.name}" for a in node.names)
            else:
                names.add(".".join(node.module.split(".")[1:3]))
        elif isinstance(node, ast.Import):
            names.update(".".join(a.name.split(".")[1:3]) for a in node.names
                         if a.name.count(".") >= 2 and a.name.split(".")[1] in PACKAGES)
    return names


def modules() -> dict[str, Path]:
    return {f"{package}.{p.stem}": p for package, root in PACKAGES.items()
            for p in root.glob("*.py")}


def test_engine_modules_import_without_cycles():
    graph = {name: engine_imports(p) - {name} for name, p in modules().items()}
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
    assert done == set(graph)
    assert {"engine.scheduler", "engine.beam_search", "engine.llm_engine",
            "runner.model_runner"} <= done


def test_the_runner_sees_the_engine_only_through_the_step_contract():
    for name, path in modules().items():
        if name.startswith("runner."):
            engine = {m for m in engine_imports(path) if m.startswith("engine.")}
            assert engine <= {"engine.batch"}, (name, engine)
