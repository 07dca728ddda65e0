"""The cache dashboard: ``GET /dashboard`` and the JSON endpoints it reads.

The page (``server/static/``) is static HTML, CSS and JS: it holds no data and
loads without a key. Everything it shows comes from JSON endpoints that need
``--api-key`` when one is set, and that scripts may call too:

* ``GET /v1/cache/stats``: the tiers (already served by the admin routes).
* ``GET /v1/dashboard/requests``: the last requests, newest first.
* ``GET /v1/dashboard/store``: disk usage per namespace and the most valuable
  stored prefixes.

The only state kept for the dashboard is :class:`RecentRequests`, a bounded
ring; everything else is read from the cache's own stats and index.
"""

from __future__ import annotations

import threading
import time
from importlib import resources
from typing import Any

from fastapi import APIRouter, Depends, Query
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from tiercache.admin import inspect as I

from .errors import APIError
from .metrics import RECENT_REQUESTS, RecentRequests

STORE_CACHE_SECONDS = 5.0
PREVIEW_WORDS = 12

_STATIC = {
    "dashboard.html": "text/html; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
}


class StoreSummary:
    """Disk usage and top prefixes, read from the index at most every few seconds.

    Reading the index is proportional to its size, so a page refreshing every
    few seconds (or several pages) shares one read per ``ttl`` seconds.

    Args:
        engine: The server engine (its cache's disk store is read).
        ttl: Seconds a summary is reused.
    """

    def __init__(self, engine: Any, ttl: float = STORE_CACHE_SECONDS):
        self.engine = engine
        self.ttl = ttl
        self._lock = threading.Lock()
        self._cached: tuple[float, int, dict] | None = None

    def get(self, top: int) -> dict:
        """Return ``{"enabled", "namespaces", "total", "top_prefixes"}``."""
        with self._lock:
            now = time.monotonic()
            if self._cached and now - self._cached[0] < self.ttl and self._cached[1] >= top:
                data = self._cached[2]
            else:
                data = self._read(top)
                self._cached = (now, top, data)
        return {**data, "top_prefixes": data["top_prefixes"][:top]}

    def _read(self, top: int) -> dict:
        disk = getattr(self.engine.cache, "disk", None)
        if disk is None:
            return {"enabled": False, "namespaces": [], "total": None, "top_prefixes": []}
        disk.flush_touches()  # hits and last access are batched until a flush
        view = I.load_view(disk)
        stats = I.store_stats(disk, view)
        decoder = I.TextDecoder(view)
        rows = [I.prefix_row(view, rec, decoder, words=PREVIEW_WORDS)
                for rec in I.snapshot_ends(view)]
        for row in rows:
            row["tokens_saved"] = row["hits"] * row["tokens"]
        rows.sort(key=lambda r: (r["tokens_saved"], r["last_access"]), reverse=True)
        return {"enabled": True, "namespaces": stats["namespaces"],
                "total": stats["total"], "top_prefixes": rows[:max(top, 50)]}


def static_file(name: str) -> Response:
    """Return one of the dashboard's packaged files."""
    body = resources.files("tiercache.server").joinpath("static", name).read_bytes()
    return Response(body, media_type=_STATIC[name],
                    headers={"Cache-Control": "no-cache",
                             "X-Content-Type-Options": "nosniff"})


def dashboard_router(engine: Any, recent: RecentRequests, require_key) -> APIRouter:
    """Build the router for the page and its data endpoints.

    Args:
        engine: The server engine.
        recent: The ring the engine fills.
        require_key: The dependency enforcing ``--api-key`` on data routes.

    Returns:
        The router to include in the app.
    """
    router = APIRouter()
    store = StoreSummary(engine)
    page_headers = {"Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'")}

    @router.get("/dashboard", include_in_schema=False)
    async def page():
        resp = static_file("dashboard.html")
        resp.headers.update(page_headers)
        return resp

    @router.get("/dashboard/{name}", include_in_schema=False)
    async def asset(name: str):
        if name not in _STATIC or name == "dashboard.html":
            raise APIError(404, f"no dashboard file {name!r}", None, "not_found")
        return static_file(name)

    @router.get("/v1/dashboard/requests", dependencies=[Depends(require_key)])
    async def requests(limit: int = Query(50, ge=1, le=RECENT_REQUESTS)):
        return {"object": "dashboard.requests", "data": recent.latest(limit)}

    @router.get("/v1/dashboard/store", dependencies=[Depends(require_key)])
    async def store_summary(top: int = Query(10, ge=1, le=50)):
        if engine.cache is None:
            return {"object": "dashboard.store", "enabled": False, "namespaces": [],
                    "total": None, "top_prefixes": []}
        data = await run_in_threadpool(store.get, top)
        return {"object": "dashboard.store", **data}

    return router
