"""The import graph of job/ is one-way (issue 24): no module imports, directly or through others,
one that imports it back, counting imports inside functions too (a deferred import is still a
dependency, only a later one)."""

from __future__ import annotations

import ast
from pathlib import Path

JOB = Path(__file__).resolve().parent.parent / "job"


def job_imports(path: Path) -> set[str]:
    """The job modules `path` imports anywhere in it, by module name (`job.x` -> `x`)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("job."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.module == "job":
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("job."))
    return found - {path.stem}


def import_graph() -> dict[str, set[str]]:
    modules = {p.stem: p for p in JOB.glob("*.py")}
    return {name: job_imports(path) & set(modules) for name, path in modules.items()}


def cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, str] = {}
    stack: list[str] = []

    def visit(name: str) -> list[str] | None:
        state[name] = "open"
        stack.append(name)
        for dep in sorted(graph[name]):
            if state.get(dep) == "open":
                return [*stack[stack.index(dep) :], dep]
            if dep not in state and (found := visit(dep)):
                return found
        stack.pop()
        state[name] = "done"
        return None

    for name in sorted(graph):
        if name not in state and (found := visit(name)):
            return found
    return None


def test_job_imports_go_one_way():
    graph = import_graph()
    assert {"config", "train", "__main__", "process_group", "checkpoint"} <= set(graph)
    found = cycle(graph)
    assert found is None, "import cycle: " + " -> ".join(found)


def test_the_cycle_check_sees_a_cycle_through_a_deferred_import():
    graph = import_graph()
    graph["config"] = graph["config"] | {"train"}  # as if config.py imported job.train in a function
    found = cycle(graph)
    assert found is not None and found[0] == found[-1] and "train" in found
