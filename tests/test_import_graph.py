"""The package's import graph, read from the source with ``ast`` (function-level imports
included: a lazy import is a cycle postponed, not removed): no cycle among the solvers, and the
stages import only what comes before them."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "moeplace"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_module(name: str) -> bool:
    rel = Path(*name.split("."))
    return (ROOT.parent / rel).with_suffix(".py").is_file() or (ROOT.parent / rel / "__init__.py"
                                                               ).is_file()


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of import nodes under ``if TYPE_CHECKING:`` (never run)."""
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for sub in node.body:
                skip.update(id(n) for n in ast.walk(sub))
    return skip


def _imports(path: Path) -> set[str]:
    """moeplace modules that ``path`` imports, at any depth of its code."""
    me = _module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    tree = ast.parse(path.read_text(), str(path))
    skip = _type_checking_only(tree)
    out: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                sub = f"{base}.{a.name}"
                # ``from pkg import mod`` imports the submodule; ``from pkg import name`` the
                # package (whose __init__ runs).
                out.add(sub if _is_module(sub) else base)
    return {m for m in out if m == "moeplace" or m.startswith("moeplace.")}


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in ROOT.rglob("*.py")}


def _cycle(graph: dict[str, set[str]], nodes: set[str]) -> list[str] | None:
    """One cycle among ``nodes`` (as a path that returns to its start), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, set()) & nodes):
            if state.get(m) == 1:
                return [*stack[stack.index(m):], m]
            if m not in state and (found := visit(m)):
                return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(nodes):
        if n not in state and (found := visit(n)):
            return found
    return None


def test_the_reader_sees_known_imports(graph):
    # The graph is only as good as the parser: spot-check edges written in three styles.
    assert "moeplace.solvers.evaluator" in graph["moeplace.solvers.objective"]  # from-import
    assert "moeplace.solvers.registry" in graph["moeplace.solvers.search_solver"]
    assert "moeplace.solvers.exact" in graph["moeplace.solvers.solve"]  # plain import
    assert "moeplace.solvers.simulator" in graph["moeplace.solvers.scoring"]  # inside a function


def test_cycle_finder_finds_a_planted_cycle(graph):
    planted = {k: set(v) for k, v in graph.items()}
    planted["moeplace.solvers.registry"].add("moeplace.solvers.solve")
    solvers = {n for n in planted if n.startswith("moeplace.solvers")}
    cycle = _cycle(planted, solvers)
    assert cycle is not None and cycle[0] == cycle[-1]
    assert "moeplace.solvers.registry" in cycle and "moeplace.solvers.solve" in cycle


def test_solvers_import_graph_is_acyclic(graph):
    solvers = {n for n in graph if n == "moeplace.solvers" or n.startswith("moeplace.solvers.")}
    assert len(solvers) > 10
    assert _cycle(graph, solvers) is None, f"import cycle: {' -> '.join(_cycle(graph, solvers))}"


def test_traces_import_no_later_stage(graph):
    later = ("moeplace.profiling", "moeplace.solvers", "moeplace.placement", "moeplace.service",
             "moeplace.integrations", "moeplace.cli")
    bad = {(m, t) for m, targets in graph.items() if m.startswith("moeplace.traces")
           for t in targets if t.startswith(later) or t == "moeplace"}
    assert not bad


def test_solvers_import_only_traces_placement_and_helpers(graph):
    helpers = {_module_name(p) for p in ROOT.glob("*.py")} - {"moeplace", "moeplace.cli"}
    allowed = ("moeplace.traces", "moeplace.placement", "moeplace.solvers")
    bad = {(m, t) for m, targets in graph.items() if m.startswith("moeplace.solvers")
           for t in targets if t not in helpers and not t.startswith(allowed)}
    assert not bad


@pytest.mark.parametrize("stage", ["moeplace.profiling", "moeplace.placement"])
def test_profiling_and_placement_import_only_traces_and_helpers(graph, stage):
    helpers = {_module_name(p) for p in ROOT.glob("*.py")} - {"moeplace", "moeplace.cli"}
    bad = {(m, t) for m, targets in graph.items() if m.startswith(stage)
           for t in targets if t not in helpers and not t.startswith(("moeplace.traces", stage))}
    assert not bad


def test_only_the_glue_imports_integrations(graph):
    # The engines' plug-ins are leaves: the core (and import moeplace) never reaches them.
    glue = ("moeplace.integrations", "moeplace.cli", "moeplace.service")
    bad = {(m, t) for m, targets in graph.items() if not m.startswith(glue)
           for t in targets if t.startswith("moeplace.integrations")}
    assert not bad
