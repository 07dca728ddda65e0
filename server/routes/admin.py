"""Admin routes: ``/health``, ``/metrics``, ``/v1/cache/stats``, ``/v1/cache/reset``."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool

from ..errors import APIError, envelope
from ..jobs import ServerState
from ..metrics import CONTENT_TYPE
from ..schemas import CacheResetRequest
from ..worker import NotAccepting
from .auth import require_key

logger = logging.getLogger("tiercache.server")

router = APIRouter()


def _state(request: Request) -> ServerState:
    return request.app.state.tiercache


def _summary(stats: dict | None) -> dict:
    out: dict = {}
    for tier in ("memory", "disk"):
        t = (stats or {}).get(tier)
        if isinstance(t, dict):
            out[tier] = {k: t[k] for k in ("entries", "bytes", "hits", "hit_tokens") if k in t}
        else:
            out[tier] = None
    return out


@router.get("/health")
async def health(request: Request):
    """Readiness: 200 with queue and cache summary once the model is loaded, else 503."""
    state = _state(request)
    worker, engine = state.worker, state.engine
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
                  "max": state.cfg.max_queue, "batch_size": worker.running,
                  "max_batch_size": state.cfg.max_batch_size},
        "cache": {"disk_dir": state.cfg.disk_dir, **_summary(stats)},
    }


@router.get("/metrics", dependencies=[Depends(require_key)])
async def prometheus(request: Request):
    """Prometheus text exposition."""
    state = _state(request)
    state.metrics.queue_depth.set(state.worker.queue_depth)
    state.metrics.running.set(state.worker.running)
    data = await run_in_threadpool(state.metrics.render)
    return Response(data, media_type=CONTENT_TYPE)


@router.get("/v1/cache/stats", dependencies=[Depends(require_key)])
async def cache_stats(request: Request):
    """Per-tier cache statistics and the disk namespaces."""
    state = _state(request)
    state.require_ready()
    engine, cfg = state.engine, state.cfg
    stats = await run_in_threadpool(engine.cache_stats)
    namespaces = await run_in_threadpool(engine.namespaces)
    return {"object": "cache.stats", "model": engine.model_id,
            "model_key": engine.model_key, "namespace": engine.namespace,
            "disk_dir": cfg.disk_dir, "block_size": cfg.block_size,
            "write_policy": cfg.write_policy, "tiers": stats,
            "namespaces": namespaces}


@router.post("/v1/cache/reset", dependencies=[Depends(require_key)])
async def cache_reset(request: Request):
    """Clear one tier (``{"tier": "memory" | "disk"}``) or all of them."""
    state = _state(request)
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
            raise APIError(422, "tier must be \"memory\", \"disk\" or absent", "tier") from None
    state.require_ready()
    try:
        fut = state.worker.call(lambda: state.engine.cache.clear(tier))
    except NotAccepting as exc:
        raise APIError(503, str(exc), None, "not_ready") from None
    try:
        await asyncio.wrap_future(fut)
    except NotAccepting as exc:  # shutdown began before it ran
        raise APIError(503, str(exc), None, "not_ready") from None
    logger.info("cache reset (%s)", tier or "all tiers")
    return {"object": "cache.reset", "tier": tier or "all", "status": "ok"}
