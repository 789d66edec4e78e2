"""Layering (DESIGN.md): PruneRL's modules import one another without a circle, checkpoint loading
has one home below ``fit`` and ``evaluate``, and ``prunerl`` never imports ``callbacks``.

Imports are read from the source (``ast``), at module level *and* inside functions: a deferred
import hides a circle from Python, not from the design.
"""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("prunerl", "callbacks")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def import_graph() -> dict[str, set[str]]:
    """Module → the project modules it imports anywhere in its source."""
    modules = {_module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                # `from prunerl import attacks` imports the module prunerl.attacks
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            deps |= {t for t in targets if t in modules and t != name}
        graph[name] = deps - {n for n in deps if n in PACKAGES}  # package __init__s hold nothing
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        path.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return path[path.index(m):] + [m]
            if m not in state and (found := visit(m)):
                return found
        state[n] = 2
        path.pop()
        return None

    for n in sorted(graph):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_graph_reader_sees_function_level_imports_and_finds_circles():
    graph = import_graph()
    assert "prunerl.fit" in graph["prunerl.trained_attacks"]  # a module-level import
    assert "prunerl.fit" in graph["prunerl.cli"]              # imported inside a function
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_circle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_fit_and_evaluate_do_not_import_each_other_and_load_checkpoints_from_one_home():
    graph = import_graph()
    assert "prunerl.evaluate" not in graph["prunerl.fit"]
    assert "prunerl.fit" not in graph["prunerl.evaluate"]
    for user in ("prunerl.fit", "prunerl.evaluate", "prunerl.config", "prunerl.trained_attacks"):
        assert "prunerl.checkpoint" in graph[user], user
    # the home sits below both entry points: it imports neither, nor anything that does
    below, todo = set(), ["prunerl.checkpoint"]
    while todo:
        for m in graph[todo.pop()] - below:
            below.add(m)
            todo.append(m)
    assert not below & {"prunerl.fit", "prunerl.evaluate", "prunerl.trained_attacks", "prunerl.config"}


def test_prunerl_never_imports_callbacks():
    graph = import_graph()
    for name, deps in graph.items():
        if name.startswith("prunerl"):
            assert not any(d.startswith("callbacks") for d in deps), name
