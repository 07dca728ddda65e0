"""Polling helpers for the server tests.

Server processes come from :mod:`tiercache.tools.server_process` (shared with
the fault and load tools): ``ServerProcess``, ``start_server``, ``subprocess_env``.
"""

from __future__ import annotations

import time

import httpx


def wait_for(predicate, timeout: float = 30.0, interval: float = 0.1):
    """Poll ``predicate`` until it returns a truthy value (or fail)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not met in time")


def disk_entries(base_url: str, headers: dict | None = None) -> int:
    """Return the entries on the disk tier according to ``/v1/cache/stats``."""
    stats = httpx.get(base_url + "/v1/cache/stats", headers=headers, timeout=10).json()
    disk = (stats.get("tiers") or {}).get("disk") or {}
    return int(disk.get("entries") or 0)
