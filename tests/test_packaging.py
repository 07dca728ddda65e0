"""pyproject.toml installs every package of the source tree, and nothing else at top level."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_every_source_package_is_installed():
    cfg = _config()
    folders = {"tiercache": ROOT / "tiercache"}
    folders.update({name: ROOT / path for name, path in cfg["package-dir"].items()})
    found = set()
    for name, folder in folders.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder).parts
            if name == "tiercache" and rel[:1] in (("server",), ("tools",)):
                continue
            found.add(".".join((name, *rel)))
    assert set(cfg["packages"]) == found


def test_only_tiercache_at_top_level():
    cfg = _config()
    assert {p.split(".")[0] for p in cfg["packages"]} == {"tiercache"}
    assert all(name.startswith("tiercache.") for name in cfg["package-dir"])
