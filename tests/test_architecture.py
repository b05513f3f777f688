"""The shape of the package (STYLE.md): no import cycle among megalite's modules, every module
under ~600 lines, and a single-device model package that never imports torch.distributed.

Read from the source with `ast`, without importing anything: a cycle hidden behind import order
(a module that happens to be imported first) still fails here. The module-level graph must be
acyclic; so must the graph with the imports inside functions, which is how a cycle hides
(plan -> train -> trainer -> plan went through a function-level import). Imports under
`if TYPE_CHECKING:` never run and do not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import REPO

MAX_LINES = 600
# Where each importable module lives: kernels/ is installed as megalite.kernels.
ROOTS = {"megalite": REPO / "megalite", "megalite.kernels": REPO / "kernels"}


def modules() -> dict[str, Path]:
    """Module name -> source file, for every .py of megalite and its kernels."""
    out = {}
    for prefix, root in ROOTS.items():
        for path in sorted(root.rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join([prefix, *parts])] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _module_level_imports(
    tree: ast.Module, in_functions: bool = False
) -> list[ast.Import | ast.ImportFrom]:
    """The imports that run when the module is imported (with `in_functions`, also those that
    run when its functions are called); never those under `if TYPE_CHECKING:`."""
    found: list[ast.Import | ast.ImportFrom] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            found.append(node)
            return
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if not in_functions and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            return
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def _targets(node: ast.Import | ast.ImportFrom, known: dict[str, Path]) -> set[str]:
    """The megalite modules an import statement names."""
    if isinstance(node, ast.Import):
        return {a.name for a in node.names if a.name in known}
    assert node.level == 0, "megalite uses absolute imports only"
    base = node.module or ""
    out = set()
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        if sub in known:  # `from megalite import launch`: the submodule itself
            out.add(sub)
        elif base in known:
            out.add(base)
    return out


def import_graph(in_functions: bool = False) -> dict[str, set[str]]:
    known = modules()
    graph = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text(), filename=str(path))
        edges = set()
        for node in _module_level_imports(tree, in_functions):
            edges |= _targets(node, known)
        graph[name] = edges - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_the_graph_walker_sees_imports_and_cycles():
    graph = import_graph()
    # Edges the package is known to have, so an empty graph cannot pass the cycle test.
    assert "megalite.config" in graph["megalite.model.transformer"]
    assert "megalite.kernels.reference" in graph["megalite.model.layers"]
    # A function-level import counts only in the second graph.
    assert "megalite.compose" not in graph["megalite.bench_grid"]
    assert "megalite.compose" in import_graph(in_functions=True)["megalite.bench_grid"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_among_megalite_modules():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_no_import_cycle_through_function_level_imports():
    cycle = find_cycle(import_graph(in_functions=True))
    assert cycle is None, "import cycle (through imports inside functions): " + " -> ".join(cycle)


def test_every_module_is_under_the_size_limit():
    too_long = {
        str(path.relative_to(REPO)): n
        for path in modules().values()
        if (n := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not too_long, f"modules over {MAX_LINES} lines (split them along a seam): {too_long}"


def _imports_anywhere(path: Path) -> set[str]:
    """Every module name a file imports, at any depth (functions included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def _is_distributed(name: str) -> bool:
    return name == "torch.distributed" or name.startswith("torch.distributed.")


def test_the_model_package_never_imports_torch_distributed():
    known = modules()
    model = {n for n in known if n == "megalite.model" or n.startswith("megalite.model.")}
    assert model, "no modules found under megalite/model/"
    # Directly, anywhere in the model package's files ...
    direct = {
        n: sorted(filter(_is_distributed, _imports_anywhere(known[n]))) for n in sorted(model)
    }
    assert not any(direct.values()), f"the model imports torch.distributed: {direct}"
    # ... and through any megalite module it imports when it is imported.
    graph = import_graph()
    reached, todo = set(model), list(model)
    while todo:
        for nxt in graph[todo.pop()] - reached:
            reached.add(nxt)
            todo.append(nxt)
    via = {}
    for name in sorted(reached - model):
        tree = ast.parse(known[name].read_text())
        hits = [
            n
            for node in _module_level_imports(tree)
            for n in (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or "", *(f"{node.module}.{a.name}" for a in node.names)]
            )
            if _is_distributed(n)
        ]
        if hits:
            via[name] = hits
    assert not via, f"importing megalite.model imports torch.distributed through {via}"
