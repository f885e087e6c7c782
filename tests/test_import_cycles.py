"""No first-party module imports itself, directly or through others, even through lazy imports."""

from __future__ import annotations

import ast
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("protocol", "transport", "workloads", "export", "edge_client", "aggregator", "edgefl",
            "experiments", "bench")


@dataclass(frozen=True, slots=True)
class Edge:
    """One import statement: `source` imports `target` at `where` (path:line)."""

    source: str
    target: str
    where: str


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of every first-party package."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path
    return modules


def _known(name: str, modules: Collection[str]) -> str | None:
    """`name`, or its longest prefix that is a first-party module (None: not first-party)."""
    parts = name.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if candidate in modules:
            return candidate
    return None


def _relative_base(module: str, is_package: bool, level: int, name: str | None) -> str:
    """Absolute name of `from <level dots><name> import ...` written in `module`."""
    package = module.split(".") if is_package else module.split(".")[:-1]
    anchor = package[: len(package) - (level - 1)]
    return ".".join([*anchor, *([name] if name else [])])


def import_edges(modules: Mapping[str, Path]) -> list[Edge]:
    """Every import statement of every module, wherever it sits (module level, function body,
    `if TYPE_CHECKING:`): a lazy import still closes a cycle, it only hides it until run time."""
    edges = []
    for source, path in modules.items():
        is_package = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            where = f"{path.relative_to(REPO)}:{getattr(node, 'lineno', 0)}"
            targets: list[str | None] = []
            if isinstance(node, ast.Import):
                targets = [_known(alias.name, modules) for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = (_relative_base(source, is_package, node.level, node.module)
                        if node.level else node.module or "")
                # `from pkg import name` imports the submodule pkg.name when there is one
                # (else `name` is an attribute of pkg, so the import lands on pkg itself).
                targets = [_known(f"{base}.{alias.name}" if alias.name != "*" else base, modules)
                           for alias in node.names]
            edges += [Edge(source, t, where) for t in targets if t is not None]
    return list(dict.fromkeys(edges))  # `from m import a, b` is one statement: one edge


def strongly_connected(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of `graph` (node -> successors), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in graph.get(node, ()):
            if succ not in index:
                visit(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:  # node roots a component: pop it off the stack
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def import_cycles(edges: Iterable[Edge]) -> list[tuple[list[str], list[Edge]]]:
    """Each cycle (component of 2+ modules, or a module importing itself) with its edges."""
    edges = list(edges)
    graph: dict[str, set[str]] = {}
    for edge in edges:
        graph.setdefault(edge.source, set()).add(edge.target)
        graph.setdefault(edge.target, set())
    cycles = []
    for component in strongly_connected(graph):
        members = set(component)
        inside = [e for e in edges if e.source in members and e.target in members]
        if len(component) > 1 or inside:  # a lone module with an edge inside imports itself
            cycles.append((component, inside))
    return cycles


def describe(cycles: Iterable[tuple[list[str], list[Edge]]]) -> str:
    """Readable report: the modules of each cycle and the import statements that close it."""
    lines = []
    for component, inside in cycles:
        lines.append("cycle: " + " <-> ".join(component))
        lines += [f"    {e.source} -> {e.target}  ({e.where})" for e in inside]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def edges() -> list[Edge]:
    """The whole project's import graph (parsed once for all tests here)."""
    return import_edges(module_files())


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycles(package: str, edges: list[Edge]) -> None:
    # One test per package, so a cycle names the package that owns it; a cycle that spans
    # packages fails for each of them.
    cycles = [(c, e) for c, e in import_cycles(edges)
              if any(m == package or m.startswith(package + ".") for m in c)]
    print(describe(cycles))
    assert not cycles, "import cycles:\n" + describe(cycles)


def test_graph_counts_lazy_and_submodule_imports(edges: list[Edge]) -> None:
    # Guards the graph itself: if imports inside functions were missed, or `from pkg import mod`
    # did not resolve to the module, the cycle test above would pass vacuously.
    pairs = {(e.source, e.target) for e in edges}
    assert ("edge_client.trainer", "edge_client.backends.torch_backend") in pairs  # in a function
    assert ("workloads.cnn", "workloads.fmnist") in pairs  # `from workloads import fmnist`
    assert ("workloads.registry", "workloads") in pairs  # `from workloads import WORKLOAD_NAMES`


def test_cycle_finder_on_a_known_graph() -> None:
    def edge(source: str, target: str) -> Edge:
        return Edge(source, target, "here")

    found = import_cycles([edge("a", "b"), edge("b", "c"), edge("c", "a"), edge("c", "d"),
                           edge("e", "e"), edge("f", "d")])
    assert [component for component, _ in found] == [["a", "b", "c"], ["e"]]


def test_relative_imports_resolve() -> None:
    assert _relative_base("pkg.sub.mod", False, 1, "other") == "pkg.sub.other"
    assert _relative_base("pkg.sub.mod", False, 2, None) == "pkg"
    assert _relative_base("pkg.sub", True, 1, "mod") == "pkg.sub.mod"
