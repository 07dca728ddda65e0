"""FastAPI routes: OpenAI-compatible completions, health, metrics, cache admin."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from .config import ServerConfig
from .engine import Engine, GenParams, RequestError
from .errors import (
    APIError,
    ClientGone,
    envelope,
    error_response,
    install_handlers,
    sse_error,
)
from .metrics import CONTENT_TYPE, Metrics
from .schemas import CacheResetRequest, ChatCompletionRequest, CompletionRequest
from .worker import Job, NotAccepting, QueueFull, Worker

logger = logging.getLogger("tiercache.server")

MAX_BODY_BYTES = 4 * 1024 * 1024


_KNOWN_PATHS = {
    "/v1/chat/completions": "chat",
    "/v1/completions": "completions",
    "/v1/models": "models",
    "/v1/cache/stats": "cache_stats",
    "/v1/cache/reset": "cache_reset",
    "/health": "health",
    "/metrics": "metrics",
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
                    resp = error_response(
                        413, f"request body is larger than {self.limit} bytes", None,
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
            await run_in_threadpool(worker.stop, 30.0)
            if engine.cache is not None:
                logger.info("flushing the cache (up to %.1fs)", cfg.flush_timeout)
                try:
                    await run_in_threadpool(engine.close, cfg.flush_timeout)
                except Exception:
                    logger.exception("cache close failed")
            logger.info("shutdown complete")

    app = FastAPI(title="tiercache", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.engine, app.state.worker, app.state.metrics = engine, worker, metrics
    app.add_middleware(JsonByDefault)
    app.add_middleware(BodyLimit)
    app.add_middleware(CountRequests, metrics=metrics)
    install_handlers(app)

    async def require_key(request: Request) -> None:
        if cfg.api_key is None:
            return
        auth = request.headers.get("authorization", "")
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), cfg.api_key.encode()
        ):
            raise APIError(401, "invalid or missing API key", None, "invalid_api_key")

    def require_ready() -> None:
        if not worker.ready:
            raise APIError(503, worker._why_not(), None, "not_ready")

    # ----------------------------------------------------------- helpers
    async def _start_job(body, tokens_fn, request: Request) -> tuple[Job, dict]:
        require_ready()
        if not engine.matches_model(body.model):
            raise APIError(404, f"the model {body.model!r} does not exist; this server "
                           f"serves {engine.model_id!r}", "model", "model_not_found")
        try:
            tokens = await run_in_threadpool(tokens_fn)
            user_start = 0
            if isinstance(tokens, tuple):
                tokens, user_start = tokens
            max_tokens = engine.resolve_max_tokens(tokens, body.requested_max_tokens())
        except RequestError as exc:
            raise APIError(400, str(exc), exc.param, exc.code) from None
        temperature = 0.0 if body.temperature is None else body.temperature
        params = GenParams(
            tokens=tokens,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=1.0 if body.top_p is None else body.top_p,
            seed=body.seed,
            stops=body.stop_list(),
            salt=body.cache_salt,
            request_id=uuid.uuid4().hex[:12],
            user_start=user_start,
        )
        job = Job(params, asyncio.get_running_loop())
        try:
            worker.submit(job)
        except QueueFull as exc:
            raise APIError(429, str(exc), None, "queue_full") from None
        except NotAccepting as exc:
            raise APIError(503, str(exc), None, "not_ready") from None
        metrics.queue_depth.set(worker.queue_depth)
        try:
            first = await _next(job, request)
        except BaseException:
            job.cancel()
            raise
        if first[0] == "error":
            exc = first[1]
            if isinstance(exc, NotAccepting):
                raise APIError(503, str(exc), None, "not_ready")
            raise APIError(500, f"generation failed: {type(exc).__name__}: {exc}",
                           None, "generation_failed")
        return job, first[1]

    async def _next(job: Job, request: Request) -> tuple:
        while True:
            try:
                return await asyncio.wait_for(job.events.get(), timeout=1.0)
            except TimeoutError:
                if await request.is_disconnected():
                    job.cancel()
                    raise ClientGone()

    def _finish(reason: str) -> str:
        return "stop" if reason == "cancelled" else reason

    async def _serve(request: Request, body, tokens_fn, chat: bool):
        job, usage = await _start_job(body, tokens_fn, request)
        created = int(time.time())
        rid = ("chatcmpl-" if chat else "cmpl-") + job.id
        base = {"id": rid, "created": created, "model": engine.model_id,
                "system_fingerprint": "tiercache"}
        if body.stream:
            gen = _stream(job, base, chat, body.include_usage(), request)
            return StreamingResponse(gen, media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        pieces = []
        try:
            while True:
                ev = await _next(job, request)
                if ev[0] == "text":
                    pieces.append(ev[1])
                elif ev[0] == "done":
                    finish, usage = ev[1], ev[2]
                    break
                elif ev[0] == "error":
                    return error_response(500, f"generation failed: {ev[1]}", None,
                                          "generation_failed")
        except BaseException:
            job.cancel()
            raise
        text = "".join(pieces)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text},
                      "finish_reason": _finish(finish), "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": _finish(finish),
                      "logprobs": None}
        return {**base, "object": "chat.completion" if chat else "text_completion",
                "choices": [choice], "usage": usage}

    async def _stream(job: Job, base: dict, chat: bool, include_usage: bool,
                      request: Request) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if chat else "text_completion"
        extra = {"usage": None} if include_usage else {}

        def chunk(content: str | None, finish: str | None, role: bool = False) -> str:
            if chat:
                delta: dict = {}
                if role:
                    delta["role"] = "assistant"
                if content is not None:
                    delta["content"] = content
                choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            else:
                choice = {"index": 0, "text": content or "", "finish_reason": finish,
                          "logprobs": None}
            return "data: " + json.dumps({**base, "object": obj, "choices": [choice], **extra}) + "\n\n"

        done = False
        try:
            if chat:
                yield chunk("", None, role=True)
            while True:
                ev = await job.events.get()
                if ev[0] == "text":
                    yield chunk(ev[1], None)
                elif ev[0] == "done":
                    yield chunk(None if chat else "", _finish(ev[1]))
                    if include_usage:
                        yield "data: " + json.dumps(
                            {**base, "object": obj, "choices": [], "usage": ev[2]}) + "\n\n"
                    break
                elif ev[0] == "error":
                    yield sse_error(f"generation failed: {ev[1]}")
                    break
            done = True
            yield "data: [DONE]\n\n"
        finally:
            if not done:
                job.cancel()

    # ------------------------------------------------------------ routes
    @app.post("/v1/chat/completions", dependencies=[Depends(require_key)])
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        try:
            messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        except ValueError as exc:
            raise APIError(400, str(exc), "messages") from None
        return await _serve(request, body, lambda: engine.chat_request_tokens(messages),
                            chat=True)

    @app.post("/v1/completions", dependencies=[Depends(require_key)])
    async def completions(body: CompletionRequest, request: Request):
        if body.echo:
            raise APIError(400, "echo is not supported", "echo")
        return await _serve(request, body, lambda: engine.prompt_tokens(body.prompt),
                            chat=False)

    def _model_card() -> dict:
        return {"id": engine.model_id, "object": "model", "created": engine.created,
                "owned_by": "tiercache"}

    @app.get("/v1/models", dependencies=[Depends(require_key)])
    async def models():
        return {"object": "list", "data": [_model_card()]}

    @app.get("/v1/models/{model_id:path}", dependencies=[Depends(require_key)])
    async def model(model_id: str):
        if not engine.matches_model(model_id):
            raise APIError(404, f"the model {model_id!r} does not exist", "model",
                           "model_not_found")
        return _model_card()

    def _summary(stats: dict | None) -> dict:
        out: dict = {}
        for tier in ("memory", "disk"):
            t = (stats or {}).get(tier)
            if isinstance(t, dict):
                out[tier] = {k: t[k] for k in ("entries", "bytes", "hits", "hit_tokens")
                             if k in t}
            else:
                out[tier] = None
        return out

    @app.get("/health")
    async def health():
        if worker.state != "ready":
            status = "loading" if worker.state == "loading" else worker.state
            body: dict[str, Any] = {"status": status, "model": engine.model_id}
            if worker.load_error:
                body.update(envelope(503, worker.load_error))
            return JSONResponse(body, status_code=503)
        stats = await run_in_threadpool(engine.cache_stats)
        return {
            "status": "ok",
            "model": engine.model_id,
            "model_path": engine.model_path,
            "context_length": engine.context_length,
            "queue": {"waiting": worker.queue_depth, "running": worker.busy,
                      "max": cfg.max_queue, "batch_size": worker.running,
                      "max_batch_size": cfg.max_batch_size},
            "cache": {"disk_dir": cfg.disk_dir, **_summary(stats)},
        }

    @app.get("/metrics", dependencies=[Depends(require_key)])
    async def prometheus():
        metrics.queue_depth.set(worker.queue_depth)
        metrics.running.set(worker.running)
        data = await run_in_threadpool(metrics.render)
        return Response(data, media_type=CONTENT_TYPE)

    @app.get("/v1/cache/stats", dependencies=[Depends(require_key)])
    async def cache_stats():
        require_ready()
        stats = await run_in_threadpool(engine.cache_stats)
        namespaces = await run_in_threadpool(engine.namespaces)
        return {"object": "cache.stats", "model": engine.model_id,
                "model_key": engine.model_key, "namespace": engine.namespace,
                "disk_dir": cfg.disk_dir, "block_size": cfg.block_size,
                "write_policy": cfg.write_policy, "tiers": stats,
                "namespaces": namespaces}

    @app.post("/v1/cache/reset", dependencies=[Depends(require_key)])
    async def cache_reset(request: Request):
        raw = await request.body()
        tier = None
        if raw.strip():
            try:
                data = json.loads(raw)
            except ValueError:
                raise APIError(400, "the request body is not valid JSON", None,
                               "invalid_json") from None
            try:
                tier = CacheResetRequest.model_validate(data).tier
            except ValidationError:
                raise APIError(422, "tier must be \"memory\", \"disk\" or absent",
                               "tier") from None
        require_ready()
        try:
            fut = worker.call(lambda: engine.cache.clear(tier))
        except NotAccepting as exc:
            raise APIError(503, str(exc), None, "not_ready") from None
        await asyncio.wrap_future(fut)
        logger.info("cache reset (%s)", tier or "all tiers")
        return {"object": "cache.reset", "tier": tier or "all", "status": "ok"}

    return app
