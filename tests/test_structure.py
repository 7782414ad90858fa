"""The project's shape: imports flow one way, from sources.py and data.py (the foundation) up to the programs."""

import ast
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def project_imports() -> dict[str, set[str]]:
    """Each top-level module -> the top-level modules it imports, anywhere in the file (inside functions too)."""
    modules = {os.path.basename(path)[:-3]: path for path in glob.glob(os.path.join(ROOT, "*.py"))}
    graph = {}
    for module, path in modules.items():
        names = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module.split(".")[0])
        graph[module] = names & set(modules) - {module}
    return graph


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A list of modules that import each other in a circle, or None."""
    state = {}  # module -> "visiting" or "done"

    def visit(module, path):
        state[module] = "visiting"
        for imported in sorted(graph[module]):
            if state.get(imported) == "visiting":
                return path[path.index(imported):] + [imported]
            if imported not in state:
                cycle = visit(imported, path + [imported])
                if cycle:
                    return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module, [module])
            if cycle:
                return cycle
    return None


def test_the_cycle_finder_finds_direct_and_indirect_circles():
    assert import_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert import_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_no_two_project_files_import_each_other_directly_or_through_others():
    graph = project_imports()
    assert {"sources", "data", "model", "main", "demo"} <= set(graph)
    assert import_cycle(graph) is None, " -> ".join(import_cycle(graph))
    assert graph["sources"] == set() and graph["data"] == {"sources"}  # the foundation imports no program
    assert graph["cli"] == set()  # the programs parse their arguments with it before anything heavy loads
    assert graph["attention"] == set()  # transformers' attention functions, knowing nothing of TinyVLM
    assert graph["model"] <= {"sources", "data", "cli", "attention"}
    assert graph["memory"] <= {"sources", "data", "model"}
