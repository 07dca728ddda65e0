"""The package's layers (docs/DESIGN.md): no import cycle, and no layer imports one above it.

Read from the sources with ``ast``: every ``import`` counts, at module level and
inside functions alike, so a function-level import cannot hide a cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Installed package name -> source folder (pyproject maps server/ and tools/).
PACKAGES = {"tiercache": ROOT / "tiercache", "tiercache.server": ROOT / "server",
            "tiercache.tools": ROOT / "tools"}
# Lower layers never import higher ones. Packages not listed (added later) are
# still checked for cycles.
LAYERS = [
    ("tiercache.errors", 0), ("tiercache.settings", 0), ("tiercache.demo_model", 0),
    ("tiercache.store", 1), ("tiercache.chat", 1), ("tiercache.remote", 1.5), ("tiercache.tiers", 2),
    ("tiercache.admin", 3), ("tiercache", 3),
    ("tiercache.server", 4), ("tiercache.tools", 4),
]
# Upward imports still to remove, each with the branch that removes it.
KNOWN_UPWARD: set[tuple[str, str]] = set()


def _modules() -> dict[str, Path]:
    mods = {}
    for pkg, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = [p for p in path.relative_to(folder).with_suffix("").parts if p != "__init__"]
            if pkg == "tiercache" and parts[:1] in (["server"], ["tools"]):
                continue
            mods[".".join([pkg, *parts])] = path
    return mods


def _targets(module: str, path: Path, node: ast.AST, known: dict) -> list[str]:
    """Return the project modules an import statement loads (submodules, not their parents)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name in known]
    base = module.split(".")
    if node.level:
        keep = len(base) - node.level + (1 if path.name == "__init__.py" else 0)
        base = base[:keep]
        prefix = ".".join(base + ([node.module] if node.module else []))
    else:
        prefix = node.module or ""
    out = []
    for alias in node.names:
        sub = f"{prefix}.{alias.name}"
        if sub in known:
            out.append(sub)  # `from . import layers`: the submodule
        elif prefix in known:
            out.append(prefix)  # `from .disk import DiskStore`: the module
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for module, path in mods.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                graph[module].update(t for t in _targets(module, path, node, mods) if t != module)
    return graph


def _layer(module: str) -> int | None:
    best = None
    for prefix, rank in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            if best is None or len(prefix) > len(best[0]):
                best = (prefix, rank)
    return best[1] if best else None


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Return one cycle per strongly connected component with more than one module."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
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
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_graph_sees_the_packages():
    graph = _graph()
    assert "tiercache.store.disk" in graph["tiercache.tiers.tiered"]
    assert "tiercache.settings" in graph["tiercache.server.config"]
    assert "tiercache.store.layers" in graph["tiercache.store.restore"]  # `from . import layers`
    assert "tiercache.server.app" in graph["tiercache.server.cli"]  # inside a function
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_no_layer_imports_a_higher_one():
    upward = set()
    for module, targets in _graph().items():
        for target in targets:
            lo, hi = _layer(module), _layer(target)
            if lo is not None and hi is not None and hi > lo:
                upward.add((module, target))
    assert upward - KNOWN_UPWARD == set()
