"""The package layering README.md's "Layout" section states, checked on the source with `ast`:
which top-level package may import which, and no import cycle among the modules at import time.

Lowest first: model and losses import nothing of the project; api only model.safeio; rollout
model, losses and api; data model and api; eval and train the layers below them, never each other;
toy and bench on top. The one arrow upward is eval's `--judge oracle`, which imports toy.oracle
inside the function that needs it, never when eval is imported.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BELOW_EVAL = {"model", "losses", "api", "rollout", "data"}
ALLOWED = {
    "model": set(),
    "losses": set(),
    "api": {"model"},
    "rollout": {"model", "losses", "api"},
    "data": {"model", "api"},
    "eval": BELOW_EVAL,
    "train": BELOW_EVAL,
    "toy": BELOW_EVAL | {"eval", "train"},
    "bench": BELOW_EVAL | {"eval", "train"},
}
API_MAY_IMPORT = {"model.safeio"}  # the atomic-write helper of the response cache
BY_NAME = {("eval", "toy.oracle")}  # imported inside a function only (eval's --judge oracle)


def modules() -> dict[str, Path]:
    """Every module of the layered packages, by dotted name (a package by its own name)."""
    found = {}
    for package in ALLOWED:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> list[tuple[str, bool]]:
    """(imported project module, deferred) for each import in the file; deferred: inside a function."""
    is_package = path.name == "__init__.py"
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    deferred_nodes = {id(inner) for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                      for inner in ast.walk(node) if inner is not node}
    found = []
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")[: len(name.split(".")) - node.level + (1 if is_package else 0)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module
            targets = [module] + [f"{module}.{alias.name}" for alias in node.names]
        for target in targets:
            if target in known and target.split(".")[0] in ALLOWED:
                found.append((target, id(node) in deferred_nodes))
    return found


def test_each_package_imports_only_the_layers_below_it():
    known = modules()
    wrong = []
    for name, path in known.items():
        package = name.split(".")[0]
        for target, deferred in imports(name, path, known):
            other = target.split(".")[0]
            if other == package or other in ALLOWED[package]:
                if package == "api" and other == "model" and target not in API_MAY_IMPORT:
                    wrong.append(f"{name} imports {target}: api may import only {sorted(API_MAY_IMPORT)}")
                continue
            if deferred and (package, target) in BY_NAME:
                continue
            wrong.append(f"{name} imports {target}{' (inside a function)' if deferred else ''}")
    assert not wrong, "imports against the layering of README.md's Layout section:\n" + "\n".join(wrong)


def test_no_import_cycle_at_import_time():
    """Module-level imports only (a function's imports run later); importing a.b also runs a's
    __init__, except from inside package a, which is already being imported then."""
    known = modules()
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        edges = graph.setdefault(name, set())
        for target, deferred in imports(name, path, known):
            if deferred:
                continue
            parts = target.split(".")
            for depth in range(1, len(parts) + 1):
                ancestor = ".".join(parts[:depth])
                inside = name == ancestor or name.startswith(ancestor + ".")
                if ancestor in known and ancestor != name and (depth == len(parts) or not inside):
                    edges.add(ancestor)
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "import cycles at import time:\n" + "\n".join(cycles)
