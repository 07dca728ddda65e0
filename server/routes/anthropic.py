"""Anthropic Messages API routes: ``/v1/messages`` and ``/v1/messages/count_tokens``.

Claude Code calls them with ``?beta=true``; query parameters are ignored.
Errors come out in Anthropic's shape (see :func:`server.errors.error_for_path`).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from ..anthropic.responses import (
    PING,
    ContentCollector,
    StreamBuilder,
    message_body,
    message_id,
)
from ..anthropic.schemas import CountTokensRequest, MessagesRequest
from ..anthropic.translate import TranslationError, translate
from ..errors import APIError, ClientGone, error_for_path
from ..jobs import ChatSpec, ServerState, next_event, render_spec, submit_chat
from ..worker import Job
from .auth import require_key

logger = logging.getLogger("tiercache.server")

router = APIRouter(dependencies=[Depends(require_key)])

#: Routes without the API key: Claude Code checks ``HEAD /`` before its first call.
public_router = APIRouter()

#: Seconds without output after which a stream gets an ``event: ping`` (a long
#: prefill must not look like a dead connection to the client).
PING_SECONDS = 5.0

_logged_billing_header = False


def _state(request: Request) -> ServerState:
    return request.app.state.tiercache


def chat_spec(state: ServerState, body: CountTokensRequest) -> ChatSpec:
    """Turn a Messages (or count_tokens) body into a :class:`server.jobs.ChatSpec`.

    Raises:
        APIError: 400 for content this model cannot take (images...).
    """
    global _logged_billing_header
    try:
        t = translate(body, keep_billing_header=state.cfg.keep_billing_header)
    except TranslationError as exc:
        raise APIError(400, str(exc), exc.param) from None
    if t.dropped_billing_header and not _logged_billing_header:
        _logged_billing_header = True
        logger.info("dropping Claude Code's x-anthropic-billing-header system block from "
                    "prompts (its per-request value would defeat the prefix cache; "
                    "--keep-billing-header keeps it); logged once")
    if t.dropped_server_tools:
        logger.debug("server tools left out of the prompt: %s", t.dropped_server_tools)
    sampling = {}
    if isinstance(body, MessagesRequest):
        sampling = {"max_tokens": body.max_tokens, "temperature": body.temperature,
                    "top_p": body.top_p, "top_k": body.top_k, "seed": body.seed,
                    "stops": list(body.stop_sequences or ()), "salt": body.cache_salt,
                    "clamp_max_tokens": True}
    return ChatSpec(messages=t.messages, tools=t.tools, tool_choice=t.tool_choice,
                    parallel_tool_calls=t.parallel_tool_calls,
                    template_kwargs=t.template_kwargs, model=body.model, **sampling)


def _done(ev: tuple) -> tuple[str, dict, str | None]:
    return ev[1], ev[2], (ev[3] if len(ev) > 3 else None)


@router.post("/v1/messages")
async def messages(body: MessagesRequest, request: Request):
    """Create a message (streaming or not) with tools, thinking and cache usage."""
    state = _state(request)
    spec = chat_spec(state, body)
    job, usage = await submit_chat(state, spec, request)
    model = body.model or state.engine.model_id
    if body.stream:
        gen = _stream(job, StreamBuilder(message_id(), model), usage, request)
        return StreamingResponse(gen, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    content = ContentCollector()
    try:
        while True:
            ev = await next_event(job, request)
            if ev[0] == "text":
                content.text(ev[1])
            elif ev[0] == "reasoning":
                content.thinking(ev[1])
            elif ev[0] == "tool_call":
                call = ev[1]
                content.tool_use(call.id, call.name, call.arguments_json)
            elif ev[0] == "done":
                finish, usage, stop = _done(ev)
                break
            elif ev[0] == "error":
                return error_for_path(request.url.path, 500, f"generation failed: {ev[1]}")
    except BaseException:
        job.cancel()
        raise
    return message_body(message_id(), model, content.blocks, finish, stop, usage)


async def _stream(job: Job, builder: StreamBuilder, usage: dict,
                  request: Request) -> AsyncIterator[str]:
    finished = False
    try:
        for out in builder.start(usage):
            yield out
        yield PING
        while True:
            try:
                ev = await next_event(job, request, ping_after=PING_SECONDS)
            except ClientGone:
                return  # the job is cancelled; nobody reads the rest
            if ev[0] == "ping":
                outs = [PING]  # still prefilling (or a slow token): keep the client waiting
            elif ev[0] == "text":
                outs = builder.text(ev[1])
            elif ev[0] == "reasoning":
                outs = builder.thinking(ev[1])
            elif ev[0] == "tool_call":
                call = ev[1]
                outs = builder.tool_use(call.id, call.name, call.arguments_json)
            elif ev[0] == "done":
                finish, usage, stop = _done(ev)
                outs = builder.finish(finish, stop, usage)
                finished = True
            elif ev[0] == "error":
                outs = builder.error(500, f"generation failed: {ev[1]}")
                finished = True
            else:
                outs = []
            for out in outs:
                yield out
            if finished:
                break
    finally:
        if not finished:
            job.cancel()


@router.post("/v1/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, request: Request):
    """Return ``{"input_tokens": N}``: the length of the full rendered prompt."""
    state = _state(request)
    rendered = await render_spec(state, chat_spec(state, body))
    return {"input_tokens": len(rendered.tokens)}


@public_router.api_route("/", methods=["GET", "HEAD"])
async def root():
    """Answer the connectivity check clients make on the base URL."""
    return {"name": "tiercache", "status": "ok"}
