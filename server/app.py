"""The FastAPI application: middleware, lifespan and the routers.

The routes live in ``server/routes/`` (OpenAI, admin; the dashboard in
``server/dashboard.py``) and share the job layer
of ``server/jobs.py``; ``app.state.tiercache`` is the :class:`ServerState`.
"""

from __future__ import annotations

import contextlib
import logging

from fastapi import FastAPI
from starlette.concurrency import run_in_threadpool

from .config import ServerConfig
from .dashboard import dashboard_router
from .engine import Engine
from .errors import APIError, error_for_path, install_handlers
from .jobs import ServerState
from .metrics import Metrics
from .routes import admin as admin_routes
from .routes import anthropic as anthropic_routes
from .routes import openai as openai_routes
from .routes.auth import require_key
from .worker import Worker

logger = logging.getLogger("tiercache.server")

MAX_BODY_BYTES = 4 * 1024 * 1024


_KNOWN_PATHS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/messages": "messages",
    "/v1/messages/count_tokens": "count_tokens",
    "/v1/models": "models",
    "/v1/cache/stats": "cache_stats",
    "/v1/cache/reset": "cache_reset",
    "/health": "health",
    "/": "root",
    "/metrics": "metrics",
    "/dashboard": "dashboard",
    "/v1/dashboard/requests": "dashboard_requests",
    "/v1/dashboard/store": "dashboard_store",
}


class CountRequests:
    """ASGI middleware counting responses by endpoint and status code."""

    def __init__(self, app, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope.get("path", "")
        endpoint = _KNOWN_PATHS.get(path)
        if endpoint is None:
            endpoint = "models" if path.startswith("/v1/models/") else "other"

        async def counting_send(message):
            if message["type"] == "http.response.start":
                self.metrics.requests.labels(endpoint=endpoint,
                                             status=str(message["status"])).inc()
            await send(message)

        return await self.app(scope, receive, counting_send)


class BodyLimit:
    """ASGI middleware refusing request bodies over ``limit`` bytes (413)."""

    def __init__(self, app, limit: int = MAX_BODY_BYTES):
        self.app = app
        self.limit = limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                try:
                    too_big = int(value) > self.limit
                except ValueError:
                    too_big = False
                if too_big:
                    resp = error_for_path(
                        scope.get("path", ""), 413,
                        f"request body is larger than {self.limit} bytes", None,
                        "body_too_large")
                    return await resp(scope, receive, send)
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise APIError(413, f"request body is larger than {self.limit} bytes")
            return message

        return await self.app(scope, limited_receive, send)


class JsonByDefault:
    """ASGI middleware reading POST bodies as JSON whatever their content type.

    ``curl -d`` sends ``application/x-www-form-urlencoded`` unless told
    otherwise; FastAPI would then not parse the body at all and answer a
    confusing 422. Like OpenAI and mlx_lm.server, every POST body here is JSON.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope.get("method") == "POST":
            headers = [(k, v) for k, v in scope.get("headers", ()) if k != b"content-type"]
            ctype = next((v for k, v in scope.get("headers", ()) if k == b"content-type"), b"")
            if b"json" not in ctype.lower():
                scope = dict(scope, headers=headers + [(b"content-type", b"application/json")])
        return await self.app(scope, receive, send)


def create_app(cfg: ServerConfig, on_load_failed=None) -> FastAPI:
    """Build the application; the worker starts with the app's lifespan.

    Args:
        cfg: Server configuration.
        on_load_failed: Called if the model cannot be loaded.

    Returns:
        The FastAPI app, with ``app.state.engine``, ``.worker`` and ``.metrics``.
    """
    holder: dict = {}
    metrics = Metrics(lambda: holder["engine"].cache_stats())
    engine = Engine(cfg, metrics)
    holder["engine"] = engine
    worker = Worker(engine, cfg.max_queue, on_load_failed, cfg.max_batch_size)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        worker.start()
        try:
            yield
        finally:
            logger.info("shutting down: stopping the worker")
            await run_in_threadpool(worker.stop, cfg.shutdown_timeout)
            if engine.cache is not None:
                logger.info("flushing the cache (up to %.1fs)", cfg.flush_timeout)
                try:
                    await run_in_threadpool(engine.close, cfg.flush_timeout)
                except Exception:
                    logger.exception("cache close failed")
            logger.info("shutdown complete")

    app = FastAPI(title="tiercache", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine, app.state.worker, app.state.metrics = engine, worker, metrics
    # Called on SIGINT/SIGTERM (server.cli), before uvicorn waits for connections:
    # queued requests are answered 503 now, the running one within the timeout.
    app.state.begin_shutdown = lambda: worker.begin_shutdown(cfg.shutdown_timeout)
    app.state.tiercache = ServerState(cfg=cfg, engine=engine, worker=worker, metrics=metrics)
    app.add_middleware(JsonByDefault)
    app.add_middleware(BodyLimit)
    app.add_middleware(CountRequests, metrics=metrics)
    install_handlers(app)

    app.include_router(openai_routes.router)
    app.include_router(admin_routes.router)
    app.include_router(anthropic_routes.router)
    app.include_router(anthropic_routes.public_router)
    app.include_router(dashboard_router(engine, metrics.recent, require_key))
    return app
