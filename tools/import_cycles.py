"""Report import cycles among tiercache's modules (tiercache/, server/, tools/).

    python -m tiercache.tools.import_cycles      # exit 1 if there is a cycle

Every ``import`` and ``from ... import`` is read with ``ast``, at module level and
inside functions (a lazy import still ties two modules together), relative
imports resolved; cycles are the strongly connected components of that graph.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = (("tiercache", ()), ("server", ("tiercache",)), ("tools", ("tiercache",)))


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Return every module's dotted name (as installed) and file."""
    out = {}
    for folder, prefix in FOLDERS:
        for p in (root / folder).rglob("*.py"):
            if ".venv" in p.parts:
                continue
            name = ".".join(prefix + p.relative_to(root).with_suffix("").parts)
            out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = p
    return out


def _targets(mods: dict[str, Path], cur: str, node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    pkg = cur if mods[cur].name == "__init__.py" else cur.rsplit(".", 1)[0]
    if node.level:
        parts = pkg.split(".")
        base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    return [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]


def graph(mods: dict[str, Path]) -> dict[str, set[str]]:
    """Return module -> modules it imports (anywhere in its file)."""
    g: dict[str, set[str]] = {m: set() for m in mods}
    for m, p in mods.items():
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                g[m].update(t for t in _targets(mods, m, node) if t in mods and t != m)
    return g


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Return the strongly connected components with more than one module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for v in g:
        if v not in index:
            visit(v)
    return found


def main() -> int:
    mods = modules()
    found = cycles(graph(mods))
    print(f"{len(mods)} modules, {len(found)} import cycle(s)")
    for c in found:
        print("  " + " <-> ".join(c))
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
