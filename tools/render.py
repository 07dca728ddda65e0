"""Output for the ``tiercache`` CLI: JSON or aligned tables, human sizes and times."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import Any

import click


def human_size(n: int | None) -> str:
    if n is None:
        return "-"
    n = int(n)
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    i = 0
    x = float(n)
    while abs(x) >= 1024 and i < len(units) - 1:
        x /= 1024
        i += 1
    return f"{n} B" if i == 0 else f"{x:.1f} {units[i]}"


def human_time(t: float | None, now: float | None = None) -> str:
    if t is None:
        return "-"
    now = time.time() if now is None else now
    d = now - t
    if d < 0:
        return datetime.fromtimestamp(t).strftime("%Y-%m-%d %H:%M")
    for limit, div, unit in ((60, 1, "s"), (3600, 60, "m"), (86400, 3600, "h"), (86400 * 60, 86400, "d")):
        if d < limit:
            return f"{int(d // div)}{unit} ago"
    return datetime.fromtimestamp(t).strftime("%Y-%m-%d")


def iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t).astimezone().isoformat(timespec="seconds")


def console(stderr: bool = False):
    from rich.console import Console

    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else 200
    return Console(file=stream, width=width, soft_wrap=False, highlight=False)


def print_table(columns: list[tuple[str, str]], rows: Iterable[dict], title: str | None = None) -> None:
    """An aligned table; ``columns`` = ``[(header, key)]``; numbers right-aligned."""
    from rich import box
    from rich.table import Table

    rows = list(rows)
    t = Table(box=box.SIMPLE_HEAD, title=title, title_justify="left", pad_edge=False)
    for header, key in columns:
        numeric = any(isinstance(r.get(key), (int, float)) and not isinstance(r.get(key), bool) for r in rows)
        t.add_column(header, justify="right" if numeric else "left", overflow="fold")
    for r in rows:
        t.add_row(*["" if r.get(k) is None else str(r.get(k)) for _, k in columns])
    console().print(t)


def emit(data: Any, table: bool, render: Callable[[Any], None]) -> None:
    if table:
        render(data)
    else:
        click.echo(json.dumps(data, indent=2, ensure_ascii=False, default=str))



def short(x: Any, n: int = 80) -> str:
    s = x if isinstance(x, str) else json.dumps(x)
    s = " ".join(s.split())
    return s if len(s) <= n else s[: n - 1] + "…"

