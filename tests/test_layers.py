"""Layers: no import cycles, clients/ stands alone, Flower internals only in fedsim.flower_adapter.

Imports are read with `ast` (no module is imported), at module level and inside functions
(a function-level import is a dependency too: it only hides the cycle from the interpreter),
and under `if TYPE_CHECKING:` (a type one module names is a type it depends on).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("fedsim", "clients", "analysis")  # the layered code: cycles are looked for among these
# Where a Flower internal would count: everything that runs fedsim's code, tests and scripts included.
# bench/ is left out: bench/secagg.py runs Flower's own SecAgg+ workflow (its legacy public
# strategy API) as the reference fedsim's SecAgg+ is measured against.
FLOWER_SCANNED = (*PACKAGES, "tests", "scripts")
CLIENTS_MAY_NOT_IMPORT = ("fedsim", "flwr", "flwr_datasets", "hydra", "omegaconf", "ray")
# Flower's public entry points fedsim builds on (the Message API and the simulation launcher,
# and the package itself for its __version__); anything else under flwr.* is an internal and
# belongs in fedsim/flower_adapter.py.
FLOWER_PUBLIC = ("flwr", "flwr.app", "flwr.serverapp", "flwr.clientapp", "flwr.simulation")
ADAPTER = "fedsim.flower_adapter"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def python_files(top: str) -> list[Path]:
    return sorted(p for p in (REPO / top).rglob("*.py") if "__pycache__" not in p.parts)


def imports(path: Path, module: str | None = None) -> Iterator[tuple[str, list[str], int]]:
    """(module, names imported from it, line) for every import statement in the file
    (`module`: the file's dotted name, default from its place in the repository)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    module = module or module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from . import x, from ..y import z
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            yield base, [a.name for a in node.names], node.lineno


def local_graph() -> dict[str, dict[str, int]]:
    """{module: {module it imports: line}} over PACKAGES. `from pkg import name` points at the
    submodule pkg.name when there is one, else at pkg itself."""
    files = {module_name(p): p for top in PACKAGES for p in python_files(top)}
    graph: dict[str, dict[str, int]] = {m: {} for m in files}
    for mod, path in files.items():
        for base, names, line in imports(path):
            targets = [f"{base}.{n}" for n in names if f"{base}.{n}" in files]
            if len(targets) < len(names) or not names:
                targets.append(base)
            for target in targets:
                # `import a.b.c` also runs a and a.b; the edge that matters is the one named.
                if target in files and target != mod:
                    graph[mod].setdefault(target, line)
    return graph


def cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), each as one cycle
    through its modules, found by walking edges inside the component."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

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
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                components.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [shortest_cycle(graph, comp) for comp in components]


def shortest_cycle(graph: dict[str, dict[str, int]], comp: list[str]) -> list[str]:
    """A shortest cycle through the component's first module (breadth first inside it)."""
    start, members = comp[0], set(comp)
    previous: dict[str, str] = {}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for w in sorted(graph[v]):
                if w not in members:
                    continue
                if w == start:
                    path = [v]
                    while path[-1] != start:
                        path.append(previous[path[-1]])
                    return [*reversed(path), start]
                if w not in previous:
                    previous[w] = v
                    nxt.append(w)
        frontier = nxt
    raise AssertionError(f"no cycle through {start}")


def describe(graph: dict[str, dict[str, int]], cycle: list[str]) -> str:
    return " -> ".join(f"{a} (line {graph[a][b]})" for a, b in zip(cycle, cycle[1:])) + f" -> {cycle[-1]}"


def test_no_import_cycles() -> None:
    graph = local_graph()
    found = cycles(graph)
    assert not found, "import cycles:\n" + "\n".join(describe(graph, c) for c in found)


def test_cycle_finder_sees_function_level_imports(tmp_path: Path) -> None:
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3}, "d": {"a": 4}}
    assert cycles(graph) == [["a", "b", "c", "a"]]
    src = tmp_path / "m.py"
    src.write_text("import os\n\ndef f():\n    from fedsim import wire\n    if True:\n        import fedsim.worker\n")
    found = [(base, names) for base, names, _ in imports(src, "fedsim.m")]
    assert ("fedsim", ["wire"]) in found and ("fedsim.worker", []) in found


def test_clients_import_neither_fedsim_nor_flower_hydra_ray() -> None:
    bad = [
        f"{path.relative_to(REPO)}:{line} imports {base}"
        for path in python_files("clients")
        for base, _, line in imports(path)
        if base.split(".")[0] in CLIENTS_MAY_NOT_IMPORT
    ]
    assert not bad, "\n".join(bad)


def flower_internal(base: str) -> bool:
    if base.split(".")[0] != "flwr":
        return False  # flwr_datasets is its own package with its own public API
    return base not in FLOWER_PUBLIC


def test_flower_internals_only_in_the_adapter() -> None:
    bad = [
        f"{path.relative_to(REPO)}:{line} imports {base}"
        for top in FLOWER_SCANNED
        for path in python_files(top)
        if module_name(path) != ADAPTER
        for base, _, line in imports(path)
        if flower_internal(base)
    ]
    assert not bad, f"Flower internals outside {ADAPTER}:\n" + "\n".join(bad)


def test_flower_internal_attributes_only_in_the_adapter() -> None:
    """Internals reached through attributes (no import to see) are named in the adapter's
    INTERNALS; no other file may spell them."""
    from fedsim.flower_adapter import INTERNALS

    bad = [
        f"{path.relative_to(REPO)} uses {name}"
        for top in FLOWER_SCANNED
        for path in python_files(top)
        if module_name(path) not in (ADAPTER, "tests.test_layers")
        for name in INTERNALS
        if re.search(rf"(?<!\w){re.escape(name)}(?!\w)", path.read_text())
    ]
    assert not bad, "\n".join(bad)


def test_flower_is_the_version_the_adapter_was_checked_against() -> None:
    """A Flower upgrade must re-check every internal in fedsim/flower_adapter.py (its docstring)."""
    import flwr

    from fedsim.flower_adapter import FLOWER_CHECKED

    assert flwr.__version__.split(".")[:2] == FLOWER_CHECKED.split(".")[:2]


@pytest.mark.parametrize("name", ["flwr.server.superlink.fleet.vce", "flwr.supercore.task_identity", "flwr.common"])
def test_internal_paths_are_recognized(name: str) -> None:
    assert flower_internal(name) and not flower_internal("flwr.app") and not flower_internal("flwr_datasets.partitioner")
