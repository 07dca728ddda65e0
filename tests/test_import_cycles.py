"""The import graph of tiercache (tiercache/, server/, tools/) has no cycle."""

from __future__ import annotations

from tiercache.tools.import_cycles import cycles, graph, modules


def test_no_import_cycle():
    mods = modules()
    assert "tiercache.store.index" in mods and "tiercache.server.engine" in mods
    assert cycles(graph(mods)) == []


def test_a_lazy_import_cycle_is_found(tmp_path):
    pkg = tmp_path / "tiercache"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from . import b\n")
    (pkg / "b.py").write_text("def f():\n    from .a import x\n")
    assert cycles(graph(modules(tmp_path))) == [["tiercache.a", "tiercache.b"]]
